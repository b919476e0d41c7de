"""Conclave observed by a real Prometheus on the local cluster.

Debian's Prometheus 2.42 (no Kubernetes discovery) runs on the host, by PID, on 127.0.0.1
and a free port, with its own data directory in a temp dir. It scrapes every Conclave pod
(operator in conclave-system; KMS, relays and connector pools in the namespace `observed`)
over their plain-HTTP ops port (`http`, 9090: /metrics is not TLS) from a file_sd list made
from the pods' IPs (observability/prometheus_config.py; pod IPs are routable from the host),
and evaluates the chart's alert rules (rule_files) every 2 s. A real meeting of three
participant pods runs while it scrapes. Then:

- every pod answers its scrape and passes `promtool check metrics`;
- every query of every dashboard the chart ships, with the dashboard variables substituted
  (datasource, namespace=observed, zone at its default "All"; the zone variable must list
  zone-a), returns data from that Prometheus, except the one allow-listed below with its
  reason (a series whose label only exists once the event happens); an allow-listed query
  that returns data fails too, so the list stays exact;
- a relay pod killed with `kubectl delete --grace-period=0 --force` makes the chart's
  ConclaveRelayDown alert fire in that Prometheus within its `for` window. The targets file is
  not refreshed after the kill, so the dead pod's address stays a target and shows as down
  (with Kubernetes discovery a recreated pod replaces it instead, and a relay that stays down
  still fires).

CONCLAVE_OBS_RENDER=DIR also draws the overview, relays and KMS dashboards from this
Prometheus into DIR (observability/render_overview.py) for the README.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from deploy import SYSTEM_NS, delete_namespace, run_meeting, setup_meetings_namespace, wait_ready
from kube import REPO, kubectl, kubectl_json, wait_until

sys.path.insert(0, str(REPO / "observability"))
import check_dashboards  # noqa: E402
import check_metrics  # noqa: E402
import dashlib  # noqa: E402
import prometheus_config  # noqa: E402

NS = "observed"
ZONE = "zone-a"
INTERVAL = "2s"
# Grafana's $__rate_interval is at least four scrape intervals; 2 s scrapes give 8 s, and a
# little more keeps one missed scrape from emptying a rate.
RATE_INTERVAL = "20s"
RULES = REPO / "charts" / "conclave" / "rules" / "conclave-alerts.yaml"

# Dashboard queries that may return no data in this scenario, by (file, panel title, refId),
# each with why. Everything else must return data, and an entry that does return data fails
# the test too (it is stale: remove it), so the list stays exact. Families with bounded label
# values exist at 0 from the start; only those whose labels come from the event itself (a SIP
# failure code) have no series until it happens.
ALLOWED_EMPTY = {
    ("connectors.json", "Failures/s", "A"): "no failed phone call in this scenario: conclave_connector_sip_calls_failed_total"
                                            "{code} gets its first series with the first SIP failure code",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


class Prom:
    """Debian's prometheus, started by PID with its own data dir and stopped by that PID."""

    def __init__(self, workdir: Path, targets: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = prometheus_config.config(file_sd=targets, interval=INTERVAL, rules=False)
        cfg["rule_files"] = [str(RULES)]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [shutil.which("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1d"],
            stdout=self.log, stderr=subprocess.STDOUT)
        (workdir / "prometheus.pid").write_text(str(self.proc.pid))
        self.api = dashlib.Prometheus(self.url)

    def wait_ready(self):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}: {self.log_tail()}")
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        wait_until("prometheus to be ready", ready, timeout=60, interval=0.5)

    def targets(self) -> list:
        return get_json(f"{self.url}/api/v1/targets?state=active")["data"]["activeTargets"]

    def alerts(self) -> list:
        return get_json(f"{self.url}/api/v1/alerts")["data"]["alerts"]

    def query(self, expr: str) -> list:
        return self.api.query(expr, time.time())

    def log_tail(self) -> str:
        self.log.flush()
        return (self.workdir / "prometheus.log").read_text()[-3000:]

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        self.log.close()


def write_targets(path: Path) -> list:
    """The Conclave pods of this scenario (operator and NS) as a file_sd list."""
    pods = kubectl_json("get", "pods", "--all-namespaces", "-l", "app.kubernetes.io/name=conclave")
    # Pods on their way out (an earlier module's rollout) would only show as down.
    pods["items"] = [p for p in pods["items"] if p["metadata"]["namespace"] in (SYSTEM_NS, NS)
                     and not p["metadata"].get("deletionTimestamp")]
    targets = prometheus_config.pod_targets(pods)
    prometheus_config.write_atomically(path, json.dumps(targets, indent=1) + "\n")
    return targets


@pytest.fixture(scope="module")
def observed(conclave_release):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus missing (Debian package prometheus)")
    # The cluster's PersistentVolumes are a small static pool (Retain): take back what an
    # earlier run of this module left behind.
    delete_namespace(NS)
    setup_meetings_namespace(NS)
    workdir = Path(tempfile.mkdtemp(prefix="conclave-obs-"))
    prom = None
    try:
        for kind, name in (("kms", "main"), ("mz", ZONE), ("cp", "recorder"), ("cp", "phones")):
            wait_ready(NS, kind, name)

        def all_running():
            pods = kubectl_json("get", "pods", "-n", NS, "-l", "app.kubernetes.io/name=conclave")["items"]
            pods += kubectl_json("get", "pods", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/name=conclave")["items"]
            pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
            running = [p for p in pods if p["status"].get("phase") == "Running" and p["status"].get("podIP")]
            return len(running) == len(pods) and {p["metadata"]["labels"].get("app.kubernetes.io/component")
                                                  for p in running} >= {"operator", "kms", "relay", "connector"}
        wait_until("every Conclave pod to run", all_running, timeout=180, interval=2)
        targets_file = workdir / "targets.json"
        targets = write_targets(targets_file)
        prom = Prom(workdir, targets_file)
        prom.wait_ready()
        yield {"prom": prom, "targets": targets, "targets_file": targets_file, "workdir": workdir}
    finally:
        if prom is not None:
            prom.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        delete_namespace(NS)


def test_every_conclave_pod_is_scraped(observed):
    prom, targets = observed["prom"], observed["targets"]
    want = {t["targets"][0]: t["labels"] for t in targets}
    components = sorted(lbl["component"] for lbl in want.values())
    # One operator, one KMS, the zone's two relays, the recording and telephony pools.
    assert components.count("operator") >= 1 and components.count("kms") == 1, components
    assert components.count("relay") == 2 and components.count("connector") == 2, components

    def all_up():
        active = {t["labels"]["instance"]: t for t in prom.targets()}
        down = {a: active.get(a, {}).get("lastError", "not scraped yet") for a in want
                if active.get(a, {}).get("health") != "up"}
        if down:
            raise AssertionError(f"not up: {down}")
        return True
    wait_until("Prometheus to scrape every Conclave pod", all_up, timeout=60, interval=1)
    for addr, labels in want.items():
        up = prom.query(f'up{{instance="{addr}"}}')
        assert up and up[0]["metric"]["component"] == labels["component"], (addr, up)
        assert up[0]["metric"]["namespace"] == labels["namespace"] and up[0]["metric"]["pod"] == labels["pod"]
    relay_zones = {r["metric"].get("zone") for r in prom.query('up{component="relay"}')}
    assert relay_zones == {ZONE}


def test_every_pod_passes_promtool_check_metrics(observed):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing (Debian package prometheus)"
    failures = {}
    for t in observed["targets"]:
        url = f"http://{t['targets'][0]}/metrics"
        with urllib.request.urlopen(url, timeout=15) as resp:
            found = check_metrics.problems(resp.read().decode(), promtool)
        if found:
            failures[f"{t['labels']['namespace']}/{t['labels']['pod']}"] = found
    assert not failures, json.dumps(failures, indent=1)


def test_a_meeting_runs_while_prometheus_scrapes(observed):
    prom = observed["prom"]
    reports = run_meeting(NS)
    assert all(r["joined"] for r in reports.values()), reports
    # The relays counted the meeting's media and the KMS its key releases, and Prometheus has
    # scraped both since (awaited, not slept: the next scrapes come within seconds).
    wait_until("relay packets in Prometheus", lambda: prom.query(
        f'sum(conclave_relay_packets_sent_total{{namespace="{NS}"}}) > 0'), timeout=30)
    wait_until("key releases in Prometheus", lambda: prom.query(
        f'sum(conclave_kms_key_releases_total{{namespace="{NS}"}}) >= 3'), timeout=30)


def test_every_dashboard_query_returns_data(observed):
    prom = observed["prom"]
    dashboards = dashlib.load()
    assert {"overview.json", "relays.json", "kms.json", "connectors.json", "operator.json"} <= set(dashboards)
    # The variables' own queries offer what is substituted below.
    namespaces = {r["metric"].get("namespace") for r in
                  prom.query('count by (namespace) (up{component=~"kms|relay|connector"})')}
    zones = {r["metric"].get("zone") for r in
             prom.query(f'count by (zone) (up{{component="relay", namespace=~"{NS}"}})')}
    assert NS in namespaces and zones == {ZONE}, (namespaces, zones)

    overrides = {"namespace": NS, "__rate_interval": RATE_INTERVAL, "__interval": INTERVAL}
    results = check_dashboards.check(prom.api, dashboards, overrides, range_s=600, step_s=2)
    assert len(results) >= 80, len(results)
    empty = [r for r in results if r["status"] in ("error", "empty")]
    unexplained = [r for r in empty if (r["file"], r["panel"], r["ref"]) not in ALLOWED_EMPTY]
    stale = sorted(k for k in ALLOWED_EMPTY if not any((r["file"], r["panel"], r["ref"]) == k for r in empty))
    summary = {s: sum(r["status"] == s for r in results) for s in ("ok", "nan", "empty", "error")}
    print(f"\n{len(results)} dashboard queries: {summary}; allow-listed empty: {len(empty) - len(unexplained)}")
    for r in results:
        if r["status"] != "ok":
            print(f"  {r['status']:5} {r['file']} / {r['panel']} [{r['ref']}]: {r.get('detail', '')}")
    assert not unexplained, "dashboard queries without data:\n" + "\n".join(
        f"{r['file']} / {r['panel']} [{r['ref']}]: {r.get('detail')}\n    {r.get('query', r['expr'])}"
        for r in unexplained)
    assert not stale, f"allow-listed dashboard queries that return data (remove them from ALLOWED_EMPTY): {stale}"
    render = os.environ.get("CONCLAVE_OBS_RENDER")
    if render:
        out = subprocess.run([sys.executable, str(REPO / "observability" / "render_overview.py"), prom.url,
                              "--out-dir", render, "--range", "5m", "--step", "2s",
                              "--var", f"namespace={NS}", "--var", f"__rate_interval={RATE_INTERVAL}"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr


def relay_down_for() -> float:
    rule = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                if r.get("alert") == "ConclaveRelayDown")
    return check_dashboards.seconds(rule.get("for", "0s"))


def test_killing_a_relay_pod_fires_relay_down(observed):
    prom = observed["prom"]
    relay = next(t for t in observed["targets"] if t["labels"]["component"] == "relay")
    pod = relay["labels"]["pod"]
    assert not [a for a in prom.alerts() if a["labels"].get("alertname") == "ConclaveRelayDown"]
    kubectl("delete", "pod", "-n", NS, pod, "--grace-period=0", "--force", "--wait=false", check=False)
    killed = time.monotonic()

    def firing():
        return [a for a in prom.alerts() if a["labels"].get("alertname") == "ConclaveRelayDown"
                and a["labels"].get("pod") == pod and a["state"] == "firing"]
    # The `for` window, plus a scrape timeout (Prometheus' default 10 s) and a few 2 s
    # scrape/evaluation intervals for the target to be seen down.
    hold = relay_down_for()
    alert = wait_until(f"ConclaveRelayDown for {pod} to fire", firing, timeout=hold + 30, interval=1)[0]
    print(f"\nConclaveRelayDown fired for {pod} {time.monotonic() - killed:.0f} s after the kill (for: {hold:.0f} s)")
    assert alert["labels"]["namespace"] == NS and alert["labels"]["zone"] == ZONE
    assert alert["labels"]["severity"] == "critical"
    # Only the killed relay: the other one is still scraped.
    others = [a for a in prom.alerts() if a["labels"].get("alertname") == "ConclaveRelayDown"
              and a["labels"].get("pod") != pod]
    assert not others, others
