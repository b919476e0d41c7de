"""Conclave on the local cluster, installed as a user would (Helm chart,
examples applied with kubectl): everything becomes Ready, pods are locked
down, invalid resources are refused with a clear reason, and three
participants in pods hear each other through the KMS and relays."""
import json

import pytest

from deploy import SYSTEM_NS, TONES, condition, run_meeting, setup_meetings_namespace, wait_ready
from kube import kubectl, kubectl_json, wait_until

MEETINGS_NS = "meetings"


@pytest.fixture(scope="module")
def conclave(conclave_release):
    setup_meetings_namespace(MEETINGS_NS)
    yield MEETINGS_NS
    kubectl("delete", "namespace", MEETINGS_NS, "--wait=true", "--timeout=120s", check=False, timeout=180)


def test_everything_becomes_ready(conclave):
    kms = wait_ready(conclave, "kms", "main")
    assert kms["status"]["endpoint"].startswith("https://")
    zone = wait_ready(conclave, "mz", "zone-a")
    assert zone["status"]["readyRelays"] == 2
    wait_ready(conclave, "cp", "recorder")
    wait_ready(conclave, "cp", "phones")


def test_every_pod_passes_the_restricted_profile(conclave):
    pods = kubectl_json("get", "pods", "-n", conclave)["items"] + kubectl_json("get", "pods", "-n", SYSTEM_NS)["items"]
    assert pods
    for p in pods:
        spec = p["spec"]
        psc = spec.get("securityContext", {})
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            where = f"{p['metadata']['name']}/{c['name']}"
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert (sc.get("seccompProfile") or psc.get("seccompProfile", {})).get("type") in ("RuntimeDefault", "Localhost"), where
        assert not spec.get("hostPID") and not spec.get("hostIPC"), p["metadata"]["name"]
        for v in spec.get("volumes", []):
            assert "hostPath" not in v, f"{p['metadata']['name']} mounts a hostPath"


def test_invalid_zone_is_refused_with_a_clear_reason(conclave):
    bad = {"apiVersion": "conclave.dev/v1alpha1", "kind": "MeetingZone",
           "metadata": {"name": "no-such-kms", "namespace": conclave},
           "spec": {"kmsRef": {"name": "does-not-exist"}, "relays": {"replicas": 1}}}
    kubectl("apply", "-f", "-", input=json.dumps(bad))
    def not_ready():
        obj = kubectl_json("get", "mz", "-n", conclave, "no-such-kms")
        c = condition(obj, "Ready")
        return c if c and c["status"] == "False" else None
    c = wait_until("the zone without a KMS to report why", not_ready, timeout=60)
    assert "does-not-exist" in c["message"]
    kubectl("delete", "mz", "-n", conclave, "no-such-kms")


def test_three_participants_hear_each_other_through_the_cluster(conclave):
    reports = run_meeting(conclave)
    index_of = {i: r["sender_index"] for i, r in reports.items()}
    for i, report in reports.items():
        assert report["joined"], f"participant-{i} did not join"
        for j, hz in TONES.items():
            if j == i:
                continue
            heard = report["dominant_hz"].get(str(index_of[j]))
            assert heard is not None and abs(heard - hz) < 15, f"user-{i} heard {heard} Hz from user-{j}, expected {hz}"
            assert any(c["text"] == f"hello from user-{j}" for c in report["chats"]), f"user-{i} missed user-{j}'s chat"
        # Every frame that arrived opened: nothing failed authentication.
        assert report["stats"]["open_failures"].get("authentication", 0) == 0, report["stats"]
