#!/usr/bin/env python3
"""`make demo`: Conclave installed on the local cluster as a user would, and a
short encrypted meeting through it: three participants, the host inviting the
recording pool's recorder. Prints a readable summary built from what the
cluster reports (resources and pods, each member's report, the relays'
/metrics, the KMS audit read with the admin certificate, the recording
restored on this host); exits non-zero if the meeting did not work.
`demo.py --down` removes what it installed on a cluster it did not start."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from deploy import (SYSTEM_NS, TONES, audit_entries, component_pods, conclave_installed,  # noqa: E402
                    install_conclave, kms_admin, member_pod, pod_json_lines, pool_client_identity,
                    pool_volume_path, publish_kms_ca, restore_command, setup_meetings_namespace,
                    uninstall_conclave, wait_members_done, wait_ready)
from kube import apply, kubectl, kubectl_json, wait_until  # noqa: E402

NS = "demo"
SECONDS = 15
RELAY_METRICS_PORT = 9090
OUT = Path(os.environ.get("CONCLAVE_CACHE", Path.home() / ".cache" / "conclave")) / "demo"
STARTED = time.monotonic()


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - STARTED:4.0f}s] {msg}", flush=True)


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def indent(text: str, by: str = "   ") -> str:
    return "\n".join((by + line).rstrip() for line in text.rstrip().splitlines())


# ----- what was deployed

def show_deployment() -> None:
    section("what was deployed")
    print(indent(kubectl("get", "conclave", "-n", NS)))
    pods = kubectl_json("get", "pods", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/name=conclave")["items"]
    pods += kubectl_json("get", "pods", "-n", NS, "-l", "app.kubernetes.io/name=conclave")["items"]
    rows = [("NAMESPACE", "POD", "ROLE", "ZONE", "STATUS", "IP")]
    for p in pods:
        labels = p["metadata"].get("labels", {})
        role = labels.get("app.kubernetes.io/component", "?")
        zone = labels.get("conclave.dev/zone", "-")
        if role == "connector":
            role += f" ({labels.get('app.kubernetes.io/instance', '?')})"
        elif role == "relay":
            # A relay StatefulSet is its zone's: the instance is the zone.
            zone = labels.get("app.kubernetes.io/instance", zone)
        rows.append((p["metadata"]["namespace"], p["metadata"]["name"], role, zone,
                     p["status"].get("phase", "?"), p["status"].get("podIP", "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# ----- the relays' counters

def relay_metrics() -> dict[str, dict[str, float]]:
    """Each running relay pod's conclave_relay_* samples, read through the
    API server's pod proxy (works wherever kubectl does)."""
    out = {}
    for p in component_pods(NS, "relay"):
        name = p["metadata"]["name"]
        text = kubectl("get", "--raw", f"/api/v1/namespaces/{NS}/pods/{name}:{RELAY_METRICS_PORT}/proxy/metrics")
        samples = {}
        for line in text.splitlines():
            if line.startswith("conclave_relay_") and " " in line:
                key, value = line.rsplit(" ", 1)
                try:
                    samples[key] = float(value)
                except ValueError:
                    continue
        out[name] = samples
    return out


def total(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k == prefix or k.startswith(prefix + "{"))


def labelled(samples: dict[str, float], prefix: str, label: str) -> dict[str, float]:
    out = {}
    for k, v in samples.items():
        if k.startswith(prefix + "{") and f'{label}="' in k:
            out[k.split(f'{label}="', 1)[1].split('"', 1)[0]] = v
    return out


def show_relays(before: dict, after: dict, peak: dict) -> None:
    section("what the relays saw (counters from their /metrics during the meeting; no content, no keys)")
    for name in sorted(after):
        a, b = after[name], before.get(name, {})

        def delta(prefix):
            return total(a, prefix) - total(b, prefix)
        drops = {r: v - labelled(b, "conclave_relay_dropped_packets_total", "reason").get(r, 0)
                 for r, v in labelled(a, "conclave_relay_dropped_packets_total", "reason").items()}
        kinds = {k: v - labelled(b, "conclave_relay_packets_received_total", "kind").get(k, 0)
                 for k, v in labelled(a, "conclave_relay_packets_received_total", "kind").items()}
        print(f"   {name}: {delta('conclave_relay_packets_received_total'):.0f} packets in "
              f"({delta('conclave_relay_received_bytes_total'):.0f} bytes), "
              f"{delta('conclave_relay_packets_sent_total'):.0f} out "
              f"({delta('conclave_relay_sent_bytes_total'):.0f} bytes); "
              f"at most {peak.get(name, {}).get('meetings', 0):.0f} meeting(s), "
              f"{peak.get(name, {}).get('participants', 0):.0f} participant(s)")
        print("      packets in by kind: " + (", ".join(f"{k} {v:.0f}" for k, v in kinds.items() if v) or "none"))
        print("      dropped: " + (", ".join(f"{r} {v:.0f}" for r, v in drops.items() if v) or "none"))


# ----- the meeting

def run_meeting(meeting: str) -> tuple[dict[str, dict], dict, dict, dict]:
    """Three member pods (user-0 the host, inviting `recording`) join
    `meeting`. Returns their reports and the relays' counters before, after
    and at their highest while the meeting ran."""
    kms = wait_ready(NS, "kms", "main")
    publish_kms_ca(NS)
    kubectl("delete", "pods,secrets", "-n", NS, "-l", "conclave.dev/e2e=demo", "--wait=true", check=False)
    before = relay_metrics()
    objects = []
    for i, hz in TONES.items():
        objects += member_pod(NS, f"user-{i}", kms["status"]["endpoint"], display=f"User {i}",
                              role="host" if i == 0 else "participant", tone=hz, duration=SECONDS,
                              chat=f"hello from user-{i}", invites=("recording",) if i == 0 else (),
                              meeting=meeting, label="demo")
    apply(objects)
    names = [f"user-{i}" for i in TONES]
    peak: dict[str, dict[str, float]] = {}

    def finished():
        # Meetings and participants are gauges: sample them while the meeting runs.
        for relay, samples in relay_metrics().items():
            p = peak.setdefault(relay, {"meetings": 0, "participants": 0})
            p["meetings"] = max(p["meetings"], total(samples, "conclave_relay_meetings"))
            p["participants"] = max(p["participants"], total(samples, "conclave_relay_participants"))
        phases = [kubectl_json("get", "pod", "-n", NS, n)["status"].get("phase") for n in names]
        return all(ph in ("Succeeded", "Failed") for ph in phases)
    invited = False
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if not invited and any("invited" in x for x in pod_json_lines(NS, "user-0")):
            invited = True
            progress("the host invited the recorder")
        if finished():
            break
        time.sleep(2)
    reports = wait_members_done(NS, names, timeout=30)
    return reports, before, relay_metrics(), peak


def show_meeting(reports: dict[str, dict], meeting: str) -> list[str]:
    problems = []
    host = reports["user-0"]
    section(f"who joined meeting {meeting} (the KMS-signed roster each member saw)")
    for m in sorted(host["roster"], key=lambda m: m["sender_index"]):
        mark = "<- connector, invited by the host" if m["kind"] != "participant" else ""
        print(f"   {m['name']:<12} {m['role']:<22}{mark}".rstrip())
    for name, r in reports.items():
        if not r["joined"]:
            problems.append(f"{name} did not join")
        kinds = sorted(m["kind"] for m in r["roster"])
        if kinds != ["participant"] * len(TONES) + ["recording"]:
            problems.append(f"{name} saw the roster {[(m['name'], m['kind']) for m in r['roster']]}")
    if not any(m["kind"] == "recording" for r in reports.values() for m in r["roster"]):
        problems.append("the recorder never joined")
    else:
        print(f"   every member saw the recorder in the roster: "
              f"{'yes' if all(any(m['kind'] == 'recording' for m in r['roster']) for r in reports.values()) else 'no'}")

    section("what each participant heard (decrypted on the participant, SFrame end to end)")
    index_of = {name: r["sender_index"] for name, r in reports.items()}
    for name, r in reports.items():
        i = int(name.split("-")[1])
        heard = {other: r["dominant_hz"].get(str(index_of[other])) for other in reports if other != name}
        for other, hz in heard.items():
            want = TONES[int(other.split("-")[1])]
            if hz is None or abs(hz - want) >= 15:
                problems.append(f"{name} heard {hz} Hz from {other}, expected {want:.0f} Hz")
        chats = [c["text"] for c in r["chats"]]
        for other in heard:
            if f"hello from {other}" not in chats:
                problems.append(f"{name} missed {other}'s chat line")
        print(f"   {name} (sent {TONES[i]:.0f} Hz): heard " +
              ", ".join(f"{o} at {h:.0f} Hz" if h else f"nothing from {o}" for o, h in heard.items()) +
              f"; chat: {chats}; key epochs {r['epochs']}")
    return problems


# ----- the audit

def identity_kind(actor: str) -> str:
    """What kind of identity an audit actor is, in words (`token:<iss>:<sub>`,
    `conclave://<ns>/<kind>/<name>[/<pod>]`, `session:<prefix>`, a participant
    id, or `kms`)."""
    if actor.startswith("token:"):
        return f"join token ({actor.rsplit(':', 1)[-1]})"
    if actor.startswith("conclave://"):
        parts = actor[len("conclave://"):].split("/")
        return f"{parts[1]} certificate ({parts[2]})" if len(parts) >= 3 else "certificate"
    if actor == "kms":
        return "the KMS itself"
    if actor.startswith("session:"):
        return f"session ({actor.split(':', 1)[1]}…)"
    return f"participant ({actor})"


def show_audit(meeting: str) -> list[str]:
    problems = []
    section("the KMS audit (read with the operator-issued admin certificate, Secret main-kms-admin-tls; times UTC)")
    entries = [e for e in audit_entries(NS) if e.get("meeting") == meeting]
    counts = Counter(e["kind"] for e in entries)
    print(f"   {len(entries)} entries for {meeting}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    # A few lines of each kind, in order: the excerpt a reviewer reads.
    shown, per_kind = [], Counter()
    for e in entries:
        if per_kind[e["kind"]] < 2:
            per_kind[e["kind"]] += 1
            shown.append(e)
    for e in shown:
        when = time.strftime("%H:%M:%S", time.gmtime(e["time_ms"] / 1000)) + f".{e['time_ms'] % 1000:03d}"
        outcome = "denied" if e["kind"] == "denial" else "allowed"
        epoch = f"epoch {e['epoch']}" if e.get("epoch") is not None else ""
        print(f"   #{e['seq']:<4} {when}  {e['kind']:<14} {identity_kind(e['actor']):<34} {outcome:<8}"
              f"{epoch:<8} {e['detail'][:60]}")
    releases = [e for e in entries if e["kind"] == "key_release"]
    to = Counter(identity_kind(e["actor"]) for e in releases)
    print(f"   {len(releases)} key releases went to: " + (", ".join(f"{k} x{v}" for k, v in sorted(to.items()))
                                                         or "nobody"))
    relay_releases = [e for e in releases if "/relay/" in e["actor"]]
    print(f"   key releases to a relay: {len(relay_releases)}")
    if not releases:
        problems.append("the audit lists no key release for the meeting")
    if relay_releases:
        problems.append(f"{len(relay_releases)} key releases went to a relay")
    verify = kms_admin(NS, "/v1/audit/verify", method="POST")
    print(f"   chain verifies: {'yes' if verify['ok'] else 'NO'} ({verify['entries']} entries checked, "
          f"whole log)")
    if not verify["ok"]:
        problems.append("the audit chain does not verify")
    return problems


# ----- the recording

def restore(host_report: dict, meeting: str) -> tuple[list[str], list[str]]:
    """Restores the meeting's recording on this host the way a user would.
    Returns the summary's lines about it and what went wrong. Runs before the
    audit is read, so the excerpt shows the recording key's release."""
    invitation = [i["invitation"] for i in host_report["invited"] if i["kind"] == "recording"]
    if not invitation:
        return [], ["the host's report lists no recording invitation"]
    if os.environ.get("CONCLAVE_DEMO_EXTERNAL"):
        # Restoring here reads the volume as a path on this host and reaches
        # the KMS at its pod IP: both need this host to be the cluster's node.
        return [f"directory {meeting}-{invitation[0]} on the volume of claim recorder-recordings in {NS}; restore it "
                "where the volume and the KMS are reachable (connector-node/README.md: `recording restore`)"], []
    where = pool_volume_path(NS, "recorder") / f"{meeting}-{invitation[0]}"
    wait_until(f"{where} on the pool's volume", where.is_dir, timeout=30)
    work = OUT / meeting
    shutil.rmtree(work, ignore_errors=True)
    (work / "identity").mkdir(parents=True)
    ca = work / "ca.crt"
    ca.write_text(publish_kms_ca(NS))
    identity = pool_client_identity(NS, "recorder", str(work / "identity"))
    out = work / "recording"
    cmd = restore_command(NS, where, out, ca, cert_key=identity)

    # The recorder closes the recording once the last member has left.
    def restored_complete():
        shutil.rmtree(out, ignore_errors=True)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]})
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip()[-500:])
        files = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        return files if files and all(f["complete"] for f in files) else None
    progress("restoring the recording through the KMS (waits for the recorder to close it)")
    try:
        wait_until("a complete recording", restored_complete, timeout=90, interval=3)
    except TimeoutError as e:
        return [], [f"the recording did not restore: {e}"]
    stored = [p for p in where.rglob("*") if p.is_file()]
    lines = [f"encrypted on the recording pool's volume (a hostPath volume on this host): {where}",
             f"   {len(stored)} files, {sum(p.stat().st_size for p in stored)} bytes",
             "restored on this host through the KMS as the pool's certificate identity (key file mode 0600):",
             "   " + shlex.join(cmd)]
    manifest = json.loads((out / "manifest.json").read_text())
    tracks = [(p["name"], p["file"]) for p in manifest["participants"] if p.get("file")]
    tracks.append(("everyone (the mixed track)", manifest["mixed"]))
    lines.append(f"into {out}:")
    problems = []
    for who, file in tracks:
        path = out / file
        probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                                str(path)], capture_output=True, text=True, timeout=30)
        duration = probe.stdout.strip()
        if probe.returncode != 0 or not duration:
            problems.append(f"ffprobe could not read {path}: {probe.stderr.strip()[-300:]}")
            continue
        lines.append(f"   {file:<20} {float(duration):5.1f} s (ffprobe)  {who}")
    mixed = shlex.quote(str(out / manifest["mixed"]))
    lines += ["play it:", f"   ffplay -autoexit -nodisp {mixed}", f"   ffprobe -hide_banner {mixed}"]
    return lines, problems


def show_explore() -> None:
    section("look around (the cluster stays up)")
    kubeconfig = os.environ.get("KUBECONFIG", "")
    if kubeconfig:
        print(f"   export KUBECONFIG={shlex.quote(kubeconfig)}")
    for cmd in (f"kubectl get conclave -n {NS}",
                f"kubectl describe mz zone-a -n {NS}",
                f"kubectl get pods -n {NS} -o wide -L conclave.dev/zone,app.kubernetes.io/component",
                f"kubectl logs -n {NS} deploy/recorder-connector",
                f"kubectl logs -n {NS} user-0",
                f"kubectl get events -n {NS} --sort-by=.lastTimestamp",
                f"kubectl logs -n {SYSTEM_NS} -l app.kubernetes.io/component=operator"):
        print(f"   {cmd}")
    if os.environ.get("CONCLAVE_DEMO_EXTERNAL"):
        print(f"   make demo-down    # deletes namespace {NS} and uninstalls the chart (retained volumes stay)")
    else:
        print("   make demo-down    # removes everything make demo started (the whole local cluster)")


def main() -> int:
    progress("installing the conclave chart (operator, CRDs, RBAC) with the real Helm engine")
    install_conclave(upgrade=conclave_installed())
    if not kubectl("get", "ns", NS, "--ignore-not-found", "-o", "name").strip():
        progress(f"namespace {NS}: KeyManagementServer, MeetingZone (2 relays), recording and telephony pools")
        setup_meetings_namespace(NS)
    for kind, name in (("kms", "main"), ("mz", "zone-a"), ("cp", "recorder"), ("cp", "phones")):
        progress(f"waiting for {kind}/{name} to be Ready")
        wait_ready(NS, kind, name)
    wait_until("every relay pod to run", lambda: len(component_pods(NS, "relay")) == 2, timeout=120, interval=2)
    meeting = "weekly-sync-" + time.strftime("%H%M%S", time.gmtime())
    progress(f"meeting {meeting}: three participants, each sending a tone for {SECONDS} s; "
             "the host invites the recorder")
    reports, before, after, peak = run_meeting(meeting)
    progress("the meeting ended")
    recording, recording_problems = restore(reports["user-0"], meeting)
    progress("reading the audit with the admin certificate; the summary follows")

    show_deployment()
    problems = show_meeting(reports, meeting)
    show_relays(before, after, peak)
    problems += show_audit(meeting)
    section("the recording")
    print(indent("\n".join(recording)))
    problems += recording_problems
    show_explore()
    print()
    if problems:
        print("== demo FAILED:")
        print(indent("\n".join(problems)))
        return 1
    print(f"== demo succeeded in {time.monotonic() - STARTED:.0f} s")
    return 0


def down() -> int:
    """Namespace first, while the operator still runs to release its
    finalizers; then the chart. Volumes kept by the KMS's retain policy stay."""
    progress(f"deleting namespace {NS} (the demo's KMS, zone and pools)")
    kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=true", "--timeout=300s")
    if conclave_installed():
        progress("uninstalling the conclave chart")
        uninstall_conclave()
    retained = [pv["metadata"]["name"] for pv in kubectl_json("get", "pv")["items"]
                if pv["spec"].get("claimRef", {}).get("namespace") == NS]
    if retained:
        progress(f"persistent volumes kept by their reclaim policy (delete them when the data may go): "
                 f"{' '.join(retained)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(down() if sys.argv[1:] == ["--down"] else main())
    except (AssertionError, TimeoutError, RuntimeError, FileNotFoundError) as e:
        # What failed and why, without a traceback a newcomer has to decode.
        print(f"\n== demo FAILED after {time.monotonic() - STARTED:.0f} s: {e}", flush=True)
        sys.exit(1)
