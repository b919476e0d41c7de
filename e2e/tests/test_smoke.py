"""Smoke test of the local cluster itself: a real pod from our relay image,
locked down as the restricted profile asks; another pod reaches it through a
Service by DNS name; logs, exec and a Helm release."""
import json
import subprocess
import sys

from kube import REPO, TAG, apply, kubectl, kubectl_json, pod, wait_pod_ready, wait_until

# Any valid Ed25519 public key will do: this relay never sees a ticket.
TICKET_KEY = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"


def relay_objects(namespace: str) -> list[dict]:
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "relay", "namespace": namespace},
              "data": {"relay.yaml": json.dumps({
                  "relayId": "smoke/relay-0", "zone": "smoke", "listen": "0.0.0.0:40000",
                  "advertise": "relay:40000", "httpListen": "0.0.0.0:9090", "ticketPublicKey": TICKET_KEY})}}
    relay = pod("relay", namespace, f"conclave/media-node:{TAG}", ["--config", "/etc/conclave/relay.yaml"],
                port=9090)
    relay["spec"]["volumes"] = [{"name": "config", "configMap": {"name": "relay"}}]
    relay["spec"]["containers"][0]["volumeMounts"] = [{"name": "config", "mountPath": "/etc/conclave"}]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "relay", "namespace": namespace},
               "spec": {"selector": {"app": "relay"}, "ports": [{"name": "http", "port": 80, "targetPort": 9090}]}}
    return [config, relay, service]


def test_our_relay_runs_locked_down_and_is_reached_by_dns_name(namespace):
    apply(relay_objects(namespace))
    p = wait_pod_ready(namespace, "relay")

    # Locked down as the restricted Pod Security profile asks, and it runs so.
    sc = p["spec"]["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["allowPrivilegeEscalation"] is False
    assert p["spec"]["securityContext"]["runAsUser"] == 65532
    status = kubectl("exec", "-n", namespace, "relay", "--", "/media-node", "--version")
    assert status.startswith("media-node ")
    assert "relay listening" in kubectl("logs", "-n", namespace, "relay")

    # Another pod reaches it through the Service's short name (cluster DNS + kube-proxy).
    probe = pod("probe", namespace, f"conclave/e2e-probe:{TAG}", ["http://relay/healthz"])
    probe["spec"]["restartPolicy"] = "OnFailure"
    apply(probe)

    def succeeded():
        q = kubectl_json("get", "pod", "-n", namespace, "probe")
        return q if q["status"].get("phase") == "Succeeded" else None
    wait_until("the probe pod to reach the relay by name", succeeded, timeout=120)
    out = kubectl("logs", "-n", namespace, "probe")
    assert " 200 " in out.splitlines()[0], out


def test_helm_installs_and_uninstalls_a_release(namespace, tmp_path):
    chart = tmp_path / "smoke"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: smoke\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: smoke\ndata:\n  greeting: {{ .Values.greeting | quote }}\n")
    helm = [sys.executable, str(REPO / "e2e" / "helm.py")]
    out = subprocess.run([*helm, "install", "smoke", "--chart", str(chart), "-n", namespace,
                          "--set-json", json.dumps({"greeting": "hello"})], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    cm = kubectl_json("get", "configmap", "-n", namespace, "smoke")
    assert cm["data"]["greeting"] == "hello"
    out = subprocess.run([*helm, "uninstall", "smoke", "-n", namespace], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    gone = kubectl("get", "configmap", "-n", namespace, "--field-selector", "metadata.name=smoke", "-o", "name")
    assert gone.strip() == ""
