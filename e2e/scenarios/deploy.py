"""Installing Conclave on the local cluster as a user would: images already
imported, the chart through the real Helm engine, examples applied with
kubectl. Shared by the e2e scenarios and `make demo`."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kube import REPO, TAG, apply, kubectl, kubectl_json, pod, wait_until

SYSTEM_NS = "conclave-system"
RELEASE = "conclave"
KINDS = {"kms": "keymanagementservers.conclave.dev", "mz": "meetingzones.conclave.dev",
         "cp": "connectorpools.conclave.dev"}


def build_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))


def host_binary(name: str) -> str:
    """The static release build of one of our binaries (made by e2e/images.sh)."""
    path = build_dir() / "x86_64-unknown-linux-gnu" / "release" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run 'make images' first")
    return str(path)


def helm(*args: str) -> str:
    out = subprocess.run([sys.executable, str(REPO / "e2e" / "helm.py"), *args],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def chart_values(tag: str = TAG, replicas: int = 2) -> dict:
    return {
        "replicaCount": replicas,
        "image": {"tag": tag, "pullPolicy": "Never"},
        "nodeImages": {"kms": f"conclave/kms-node:{tag}", "relay": f"conclave/media-node:{tag}",
                       "connector": f"conclave/connector-node:{tag}", "pullPolicy": "Never"},
    }


def install_conclave(tag: str = TAG, upgrade: bool = False) -> None:
    helm("upgrade" if upgrade else "install", RELEASE, "-n", SYSTEM_NS, "--set-json", json.dumps(chart_values(tag)))


def conclave_installed() -> bool:
    try:
        helm("status", RELEASE, "-n", SYSTEM_NS)
        return True
    except RuntimeError:
        return False


def uninstall_conclave() -> None:
    helm("uninstall", RELEASE, "-n", SYSTEM_NS)


def condition(obj: dict, kind: str) -> dict | None:
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == kind:
            return c
    return None


def wait_ready(namespace: str, kind: str, name: str, timeout: int = 300) -> dict:
    def ready():
        obj = kubectl_json("get", KINDS[kind], "-n", namespace, name)
        c = condition(obj, "Ready")
        return obj if c and c["status"] == "True" and \
            obj["status"].get("observedGeneration") == obj["metadata"]["generation"] else None
    try:
        return wait_until(f"{kind}/{name} in {namespace} Ready", ready, timeout=timeout, interval=2)
    except TimeoutError:
        obj = kubectl_json("get", KINDS[kind], "-n", namespace, name)
        raise TimeoutError(f"{kind}/{name} not Ready: {json.dumps(obj.get('status'), indent=1)}")


def apply_example(namespace: str, example: str) -> None:
    kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / example))


def setup_meetings_namespace(ns: str) -> None:
    """A namespace with what the examples reference, then the examples themselves."""
    kubectl("create", "namespace", ns)
    kubectl("create", "secret", "generic", "portal-jwks", "-n", ns, f"--from-literal=jwks.json={dev_jwks()}")
    kubectl("create", "secret", "generic", "sip-trunk", "-n", ns, "--from-literal=credentials=conclave:e2e-secret")
    kubectl("create", "secret", "generic", "trunk-ca", "-n", ns, f"--from-file=ca.crt={trunk_ca()}")
    for example in ("kms.yaml", "zone.yaml", "recording.yaml", "telephony.yaml"):
        apply_example(ns, example)


def trunk_ca() -> str:
    """A CA certificate for the telephony pool's trunk (no trunk answers in this scenario)."""
    d = tempfile.mkdtemp()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "1", "-subj", "/CN=e2e-trunk-ca", "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt"],
                   check=True, capture_output=True)
    return f"{d}/ca.crt"


def dev_jwks() -> str:
    out = subprocess.run([host_binary("conclave-client"), "token", "--jwks"], capture_output=True, text=True,
                         env={"CONCLAVE_DEV_ISSUER_SEED": "11" * 32}, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


MEETING = "weekly-sync"
TONES = {0: 440.0, 1: 660.0, 2: 880.0}


def mint_token(sub: str, name: str, role: str) -> str:
    out = subprocess.run([host_binary("conclave-client"), "token", "--meeting", MEETING, "--sub", sub,
                          "--name", name, "--role", role, "--ttl", "600"],
                         capture_output=True, text=True, env={"CONCLAVE_DEV_ISSUER_SEED": "11" * 32}, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def participant_pod(namespace: str, i: int, kms_url: str) -> list[dict]:
    name = f"participant-{i}"
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": name, "namespace": namespace, "labels": {"conclave.dev/e2e": "meeting"}},
              "stringData": {"token": mint_token(f"user-{i}", f"User {i}", "host" if i == 0 else "participant")}}
    p = pod(name, namespace, f"conclave/conclave-client:{TAG}",
            ["join", "--kms", kms_url, "--kms-ca", "/etc/kms-ca/ca.crt", "--meeting", MEETING,
             "--tone", str(TONES[i]), "--duration", "12", "--chat", f"hello from user-{i}", "--chat-delay", "4"],
            labels={"app": "participant", "conclave.dev/e2e": "meeting"})
    p["spec"]["restartPolicy"] = "Never"
    c = p["spec"]["containers"][0]
    c["env"] = [{"name": "CONCLAVE_JOIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": "token"}}}]
    c["volumeMounts"] = [{"name": "kms-ca", "mountPath": "/etc/kms-ca"}]
    p["spec"]["volumes"] = [{"name": "kms-ca", "configMap": {"name": "kms-ca"}}]
    return [secret, p]



def run_meeting(namespace: str) -> dict[int, dict]:
    """Three participant pods (conclave-client) join through the KMS, send a
    tone each and a chat line, and report what they heard. Returns the
    reports by participant number."""
    import base64
    kms = wait_ready(namespace, "kms", "main")
    wait_ready(namespace, "mz", "zone-a")
    # Participants get only the CA certificate (their portal would hand it out), never the CA Secret.
    ca = base64.b64decode(kubectl_json("get", "secret", "conclave-ca", "-n", namespace)["data"]["ca.crt"]).decode()
    apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kms-ca", "namespace": namespace},
           "data": {"ca.crt": ca}})
    kubectl("delete", "pods,secrets", "-n", namespace, "-l", "conclave.dev/e2e=meeting", "--wait=true", check=False)
    objects = []
    for i in TONES:
        objects += participant_pod(namespace, i, kms["status"]["endpoint"])
    apply(objects)

    def all_done():
        pods = kubectl_json("get", "pods", "-n", namespace, "-l", "app=participant")["items"]
        phases = [p["status"].get("phase") for p in pods]
        return pods if len(pods) == len(TONES) and all(ph in ("Succeeded", "Failed") for ph in phases) else None
    wait_until("the three participants to finish", all_done, timeout=180, interval=2)

    reports = {}
    for i in TONES:
        logs = kubectl("logs", "-n", namespace, f"participant-{i}")
        lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
        found = [line["report"] for line in lines if "report" in line]
        if not found:
            raise AssertionError(f"participant-{i} printed no report: {logs[-2000:]}")
        reports[i] = found[0]
    return reports
