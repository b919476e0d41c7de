"""Installing Conclave on the local cluster as a user would: images already
imported, the chart through the real Helm engine, examples applied with
kubectl. Shared by the e2e scenarios and `make demo`."""
import json
import os
import subprocess
import sys
from pathlib import Path

from kube import REPO, TAG, kubectl, kubectl_json, wait_until

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
