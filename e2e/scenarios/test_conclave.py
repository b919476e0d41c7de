"""Conclave on the local cluster, installed as a user would (Helm chart,
examples applied with kubectl): everything becomes Ready, pods are locked
down, invalid resources are refused with a clear reason, and three
participants in pods hear each other through the KMS and relays."""
import json

import pytest

from deploy import (SYSTEM_NS, TONES, audit_entries, condition, delete_namespace, kms_admin, run_meeting,
                    setup_meetings_namespace, wait_ready)
from kube import kubectl, kubectl_json, wait_until

MEETINGS_NS = "meetings"


@pytest.fixture(scope="module")
def conclave(conclave_release):
    setup_meetings_namespace(MEETINGS_NS)
    yield MEETINGS_NS
    delete_namespace(MEETINGS_NS)


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


def test_the_audit_lists_key_releases_to_exactly_the_members_and_verifies(conclave):
    """Scenarios 2 and 3, read as a security team would with the admin
    certificate: every key release of the meeting went to one of its members
    (none to a relay or any other service identity), every member got one,
    and the hash chain verifies."""
    entries = audit_entries(conclave)
    releases = [e for e in entries if e["kind"] == "key_release"]
    assert releases, f"no key release in {len(entries)} audit entries"
    members = {f"user-{i}" for i in TONES}
    got = {e["actor"].rsplit(":", 1)[-1] for e in releases}
    assert got == members, f"key releases went to {sorted(got)}, members are {sorted(members)}"
    # A join's release names the token's issuer and subject; later epochs are
    # released to the member by its participant id.
    assert all(e["actor"].startswith("token:") or e["actor"] in members for e in releases), \
        [e["actor"] for e in releases]
    assert not [e for e in releases if "/relay/" in e["actor"]]
    verify = kms_admin(conclave, "/v1/audit/verify", method="POST")
    assert verify["ok"] and verify["entries"] >= len(entries), verify


def test_relays_hold_no_key_material(conclave):
    """Scenario 3: what a relay pod is given (config, environment, mounted
    Secrets) holds its own TLS identity and the KMS's public ticket key, and
    nothing that could open media."""
    import base64
    import hashlib
    import re
    import subprocess

    import yaml

    kms = wait_ready(conclave, "kms", "main")
    relays = [p for p in kubectl_json("get", "pods", "-n", conclave)["items"]
              if p["metadata"]["name"].startswith("zone-a-relay-")]
    assert len(relays) == 2
    long_secretish = re.compile(r"^(?:[0-9a-fA-F]{32,}|[A-Za-z0-9+/=_-]{40,})$")
    for p in relays:
        name = p["metadata"]["name"]
        for c in p["spec"]["containers"]:
            for env in c.get("env", []):
                assert "secretKeyRef" not in env.get("valueFrom", {}), f"{name} takes {env['name']} from a Secret"
        for v in p["spec"]["volumes"]:
            if "secret" in v:
                data = kubectl_json("get", "secret", "-n", conclave, v["secret"]["secretName"])["data"]
                # The zone's relays share one Secret with a certificate per relay pod
                # (a StatefulSet's pods share one template), plus the CA certificate.
                assert all(k == "ca.crt" or re.fullmatch(r"(tls|zone-a-relay-\d+)\.(crt|key)", k) for k in data), \
                    f"{name} mounts {sorted(data)}"
                for k in data:
                    if k.endswith(".crt") and k != "ca.crt":
                        text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"],
                                              input=base64.b64decode(data[k]).decode(),
                                              capture_output=True, text=True, check=True).stdout
                        assert f"URI:conclave://{conclave}/relay/" in text, f"{name}: {k} is not a relay identity: {text}"
            elif "configMap" in v:
                cm = kubectl_json("get", "configmap", "-n", conclave, v["configMap"]["name"])["data"]
                for doc in cm.values():
                    config = json.loads(doc) if doc.lstrip().startswith("{") else yaml.safe_load(doc)

                    def strings(node, path=""):
                        if isinstance(node, dict):
                            for k, val in node.items():
                                yield from strings(val, f"{path}.{k}")
                        elif isinstance(node, list):
                            for i, val in enumerate(node):
                                yield from strings(val, f"{path}[{i}]")
                        elif isinstance(node, str):
                            yield path, node
                    for path, value in strings(config):
                        if path == ".ticketPublicKey":
                            continue
                        assert not long_secretish.match(value), f"{name} config {path} looks like key material"
                    # The one key a relay holds verifies tickets; it is the KMS's public key.
                    fp = hashlib.sha256(bytes.fromhex(config["ticketPublicKey"])).hexdigest()
                    assert config["ticketPublicKey"] == kms["status"]["ticketPublicKey"], \
                        f"{name}'s ticket key is not the KMS's public key"
                    assert fp == kms["status"]["ticketSigningKeyFingerprint"]
            else:
                assert set(v) & {"emptyDir", "projected", "downwardAPI"}, f"{name} mounts {v}"


def policy_allows(policies: list[dict], pod: dict, direction: str, peer: dict, port: int, protocol: str) -> bool:
    """Kubernetes NetworkPolicy semantics for one flow: a pod no policy selects
    (for that direction) allows everything; a selected pod allows a flow only if
    some rule's ports and peers match. `peer` is {"labels", "namespace", "ip"}."""
    import ipaddress

    def selects(selector: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    ns = pod["metadata"]["namespace"]
    selecting = [p for p in policies if p["metadata"]["namespace"] == ns
                 and selects(p["spec"]["podSelector"], pod["metadata"].get("labels", {}))
                 and direction.capitalize() in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    key, peers_key = ("ingress", "from") if direction == "ingress" else ("egress", "to")
    for p in selecting:
        for rule in p["spec"].get(key, []):
            ports = rule.get("ports")
            if ports and not any(r.get("protocol", "TCP") == protocol and r.get("port") in (None, port) for r in ports):
                continue
            peers = rule.get(peers_key)
            if not peers:
                return True
            for peer_rule in peers:
                if "ipBlock" in peer_rule:
                    if peer.get("ip") and ipaddress.ip_address(peer["ip"]) in ipaddress.ip_network(peer_rule["ipBlock"]["cidr"]):
                        return True
                    continue
                if peer.get("labels") is None:
                    continue  # not a pod: only ipBlock rules match it
                ns_ok = (selects(peer_rule["namespaceSelector"], {"kubernetes.io/metadata.name": peer["namespace"]})
                         if "namespaceSelector" in peer_rule else peer["namespace"] == ns)
                if ns_ok and selects(peer_rule.get("podSelector", {}), peer["labels"]):
                    return True
    return False


def test_network_policies_allow_only_the_flows_the_design_needs(conclave):
    """Scenario 8: evaluated on the live NetworkPolicies and pods. This
    cluster's CNI (the reference bridge plugin) does not enforce policies, so
    a denied flow would still connect here; an enforcing CNI (Calico, Cilium)
    applies exactly what is checked below."""
    policies = kubectl_json("get", "networkpolicies", "-n", conclave)["items"]
    pods = {p["metadata"]["name"]: p for p in kubectl_json("get", "pods", "-n", conclave)["items"]}
    kms = pods["main-kms-0"]
    relay = pods["zone-a-relay-0"]
    recorder = next(p for n, p in pods.items() if n.startswith("recorder-"))
    participant = {"labels": {"app": "participant"}, "namespace": "elsewhere", "ip": "198.18.0.250"}
    def peer(p):
        return {"labels": p["metadata"].get("labels", {}), "namespace": p["metadata"]["namespace"],
                "ip": p["status"].get("podIP")}
    kms_port = int(kms["spec"]["containers"][0]["ports"][0]["containerPort"])
    relay_udp = next(int(pt["containerPort"]) for pt in relay["spec"]["containers"][0]["ports"] if pt.get("protocol") == "UDP")
    needed = [
        ("participants reach the KMS", kms, "ingress", participant, kms_port, "TCP"),
        ("participants reach their relay", relay, "ingress", participant, relay_udp, "UDP"),
        ("relays register with the KMS", relay, "egress", peer(kms), kms_port, "TCP"),
        ("relays resolve names", relay, "egress", {"labels": {}, "namespace": "kube-system", "ip": "198.18.255.1"}, 53, "UDP"),
        ("Prometheus scrapes the relay", relay, "ingress", participant, 9090, "TCP"),
    ]
    denied = [
        ("a relay opening anything but the KMS (here: the recorder's metrics)", relay, "egress", peer(recorder), 9090, "TCP"),
        ("a relay reaching the Kubernetes API", relay, "egress", {"labels": None, "namespace": "", "ip": "198.18.128.1"}, 443, "TCP"),
        ("the KMS opening connections (it only answers)", kms, "egress", peer(relay), relay_udp, "UDP"),
        ("anything reaching the KMS on another port", kms, "ingress", participant, 2379, "TCP"),
        ("anything reaching a relay over TCP on its media port", relay, "ingress", participant, relay_udp, "TCP"),
    ]
    for what, pod, direction, other, port, proto in needed:
        assert policy_allows(policies, pod, direction, other, port, proto), f"needed flow denied: {what}"
    for what, pod, direction, other, port, proto in denied:
        assert not policy_allows(policies, pod, direction, other, port, proto), f"flow allowed: {what}"


def test_the_operator_runs_with_exactly_the_charts_rbac(conclave):
    """Scenario 8: the operator's ServiceAccount is bound only by the chart's
    own bindings, and the API server refuses what the chart does not grant."""
    deploy_ = kubectl_json("get", "deployments", "-n", SYSTEM_NS)["items"]
    sa = next(d["spec"]["template"]["spec"]["serviceAccountName"] for d in deploy_
              if d["metadata"]["labels"].get("app.kubernetes.io/instance") == "conclave")
    subject = {"kind": "ServiceAccount", "name": sa, "namespace": SYSTEM_NS}
    bindings = kubectl_json("get", "clusterrolebindings")["items"] + kubectl_json("get", "rolebindings", "-A")["items"]
    ours = [b for b in bindings if any(s.get("kind") == "ServiceAccount" and s.get("name") == sa
                                       and s.get("namespace", b["metadata"].get("namespace")) == SYSTEM_NS
                                       for s in b.get("subjects") or [])]
    assert ours, f"nothing binds {subject}"
    for b in ours:
        assert b["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by") == "Helm", \
            f"{b['metadata']['name']} binds the operator but is not the chart's"
    who = f"system:serviceaccount:{SYSTEM_NS}:{sa}"
    def can(*args):
        out = kubectl("auth", "can-i", *args, "--as", who, check=False).strip()
        return out == "yes"
    assert can("patch", "statefulsets", "-n", conclave)
    assert can("create", "secrets", "-n", conclave)
    for refused in (["delete", "statefulsets", "-n", conclave], ["create", "pods/exec", "-n", conclave],
                    ["list", "nodes"], ["create", "clusterrolebindings"], ["update", "secrets", "-n", conclave],
                    ["delete", "namespaces"], ["create", "pods", "-n", conclave]):
        assert not can(*refused), f"the operator may {' '.join(refused)}"
