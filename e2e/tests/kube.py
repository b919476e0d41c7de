"""Small helpers the e2e scenarios share: kubectl with the e2e kubeconfig,
waiting on conditions, and pod specs that satisfy the restricted Pod Security
profile."""
import json
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TAG = os.environ.get("CONCLAVE_IMAGE_TAG", "e2e")



def kubectl(*args, input=None, check=True, timeout=120) -> str:
    proc = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def kubectl_json(*args):
    return json.loads(kubectl(*args, "-o", "json"))


def apply(obj: dict | list) -> None:
    items = obj if isinstance(obj, list) else [obj]
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def wait_until(what: str, predicate, timeout=120, interval=1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # the next attempt may succeed; keep the reason for the report
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last})" if last else ""))


def restricted_security_context() -> dict:
    """What the restricted Pod Security profile asks of every container."""
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod(name: str, namespace: str, image: str, args: list[str], labels=None, port=None) -> dict:
    container = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",
        "args": args,
        "securityContext": restricted_security_context(),
    }
    if port:
        container["ports"] = [{"containerPort": port}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "automountServiceAccountToken": False,
            "containers": [container],
            "terminationGracePeriodSeconds": 2,
        },
    }


def wait_pod_ready(namespace: str, name: str, timeout=120):
    def ready():
        p = kubectl_json("get", "pod", "-n", namespace, name)
        conds = {c["type"]: c["status"] for c in p.get("status", {}).get("conditions", [])}
        return p if conds.get("Ready") == "True" else None
    return wait_until(f"pod {namespace}/{name} Ready", ready, timeout=timeout)
