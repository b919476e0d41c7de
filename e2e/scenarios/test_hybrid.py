"""Scenario 7, hybrid deployments, as a customer with sites in several places
would run them. Three namespaces stand for three sites:

- `hybrid-kms`: the KMS only (no zone, no pool). Its `spec.remoteClients`
  lists the remote zone and the remote recording pool, so the operator issues
  their client certificates into `main-kms-remote-<name>-tls`;
- `hybrid-relays`: MeetingZone `zone-b` with `externalKms` (URL, CA, client
  certificate) and one relay (relays sharing a zone certificate share one
  relay id at the KMS);
- `hybrid-rec`: recording ConnectorPool `recorder-c` with `externalKms`.

The issued Secrets are copied across as a customer would copy them between
clusters (`kubectl get secret -o json`, keep the data, new name). Then two
participant pods join a meeting through the KMS, the host invites a recorder,
and: everything was Ready; the meeting ran on the remote zone's relay (the
only relay the KMS has) and both participants heard each other; the roster
lists the remote recorder as a connector; the audit shows key releases to the
two participants and the recording key going to the remote pool's identity;
the recording in the remote pool's volume restores through the KMS for that
identity. Last, removing the recorder's entry deletes its Secret and grant.
"""
import base64
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from deploy import (audit_entries, decode_to_pcm, delete_namespace, dev_jwks, kms_admin, member_pod, pool_volume_path,
                    publish_kms_ca, restore_recording, tone_share, wait_members_done, wait_ready)
from kube import apply, kubectl, kubectl_json, wait_until

KMS_NS, RELAY_NS, REC_NS = "hybrid-kms", "hybrid-relays", "hybrid-rec"
NAMESPACES = (KMS_NS, RELAY_NS, REC_NS)
MEETING = "hybrid-sync"
TONES = {"host-a": 440.0, "guest-b": 660.0}
MEDIA_SECONDS = 14
RELAY_ID = f"conclave://{RELAY_NS}/relay/zone-b"
RECORDER_ID = f"conclave://{REC_NS}/connector/recorder-c"


def kms_manifest() -> dict:
    return {
        "apiVersion": "conclave.dev/v1alpha1", "kind": "KeyManagementServer",
        "metadata": {"name": "main", "namespace": KMS_NS},
        "spec": {
            "participantAuth": {"issuers": [{"name": "https://portal.example.com",
                                             "jwksSecretRef": {"name": "portal-jwks"}, "audience": "conclave"}]},
            "remoteClients": [
                {"name": "zone-b", "kind": "relay", "namespace": RELAY_NS, "resourceName": "zone-b"},
                {"name": "rec-c", "kind": "connector", "namespace": REC_NS, "resourceName": "recorder-c",
                 "connectorType": "recording"},
            ],
        },
    }


def copy_secret(src_ns: str, src: str, dst_ns: str, dst: str) -> None:
    """What a customer does between clusters: the Secret's type and data under a
    name of their choosing, nothing of its metadata (owner, labels)."""
    s = kubectl_json("get", "secret", "-n", src_ns, src)
    apply({"apiVersion": "v1", "kind": "Secret", "type": s["type"], "data": s["data"],
           "metadata": {"name": dst, "namespace": dst_ns}})


def external_kms(url: str, ticket_key: str | None = None) -> dict:
    e = {"url": url, "caSecret": {"name": "kms-client"}, "clientCertificateSecret": {"name": "kms-client"}}
    if ticket_key:
        e["ticketPublicKey"] = ticket_key
    return e


def delete_namespaces() -> None:
    with ThreadPoolExecutor(len(NAMESPACES)) as pool:
        list(pool.map(delete_namespace, NAMESPACES))


@pytest.fixture(scope="module")
def sites(conclave_release):
    delete_namespaces()
    for ns in NAMESPACES:
        kubectl("create", "namespace", ns)
    kubectl("create", "secret", "generic", "portal-jwks", "-n", KMS_NS, f"--from-literal=jwks.json={dev_jwks()}")
    apply(kms_manifest())
    # The certificates are issued as soon as the KMS reconciles, before its pod is up.
    for entry, ns in (("zone-b", RELAY_NS), ("rec-c", REC_NS)):
        secret = f"main-kms-remote-{entry}-tls"
        wait_until(f"{KMS_NS}/{secret}", lambda: kubectl("get", "secret", "-n", KMS_NS, secret, "--ignore-not-found",
                                                         "-o", "name").strip(), timeout=60)
        copy_secret(KMS_NS, secret, ns, "kms-client")
    wait_ready(KMS_NS, "kms", "main", timeout=240)
    # What the remote zone's owner is told: the KMS's ticket key, published in its status.
    kms = wait_until("the KMS to publish its ticket key",
                     lambda: (k := kubectl_json("get", "keymanagementservers.conclave.dev", "-n", KMS_NS, "main"))["status"].get("ticketPublicKey")
                     and k, timeout=60)
    url = kms["status"]["endpoint"]
    apply([
        {"apiVersion": "conclave.dev/v1alpha1", "kind": "MeetingZone",
         "metadata": {"name": "zone-b", "namespace": RELAY_NS},
         "spec": {"externalKms": external_kms(url, kms["status"]["ticketPublicKey"]), "relays": {"replicas": 1},
                  "encryption": {"allowedConnectors": ["recording"]}}},
        {"apiVersion": "conclave.dev/v1alpha1", "kind": "ConnectorPool",
         "metadata": {"name": "recorder-c", "namespace": REC_NS},
         "spec": {"externalKms": external_kms(url), "type": "recording", "replicas": 1,
                  "recording": {"storageSize": "1Gi", "retention": "24h"}}},
    ])
    zone = wait_ready(RELAY_NS, "mz", "zone-b", timeout=180)
    pool = wait_ready(REC_NS, "cp", "recorder-c", timeout=180)
    yield {"kms": kms, "zone": zone, "pool": pool, "url": url}
    delete_namespaces()


@pytest.fixture(scope="module")
def meeting(sites):
    publish_kms_ca(KMS_NS)
    objects = []
    for name, hz in TONES.items():
        host = name == "host-a"
        objects += member_pod(KMS_NS, name, sites["url"], display=name.replace("-", " ").title(),
                              role="host" if host else "participant", tone=hz, duration=MEDIA_SECONDS,
                              invites=("recording",) if host else (), meeting=MEETING, label="hybrid")
    apply(objects)
    reports = wait_members_done(KMS_NS, list(TONES), timeout=150)
    return reports


def test_the_issued_certificates_carry_the_remote_identities(sites):
    import subprocess
    for entry, want in (("zone-b", RELAY_ID), ("rec-c", RECORDER_ID)):
        s = kubectl_json("get", "secret", "-n", KMS_NS, f"main-kms-remote-{entry}-tls")
        assert s["type"] == "kubernetes.io/tls"
        assert s["metadata"]["ownerReferences"][0]["kind"] == "KeyManagementServer"
        assert set(s["data"]) == {"tls.crt", "tls.key", "ca.crt"}
        san = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"],
                             input=base64.b64decode(s["data"]["tls.crt"]).decode(),
                             capture_output=True, text=True, check=True).stdout
        assert f"URI:{want}" in san, san
    # The remote sites run on their copies, not on anything of the KMS's namespace.
    zone_ns_secrets = {v["secret"]["secretName"] for v in kubectl_json(
        "get", "statefulset", "-n", RELAY_NS, "zone-b-relay")["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    assert zone_ns_secrets == {"kms-client"}, zone_ns_secrets
    cfg = kubectl_json("get", "configmap", "-n", KMS_NS, "main-kms-config")["data"]["config.yaml"]
    assert RECORDER_ID in cfg and RELAY_ID not in cfg, cfg


def test_remote_zone_and_pool_are_ready_and_reach_the_kms(sites):
    assert sites["zone"]["status"]["readyRelays"] == 1
    assert sites["zone"]["status"]["kms"]["url"] == sites["url"], sites["zone"]["status"]
    assert sites["pool"]["status"]["readyReplicas"] == 1
    assert sites["pool"]["status"]["kms"]["url"] == sites["url"]


def test_participants_meet_on_the_remote_relay_and_hear_each_other(meeting):
    index = {n: r["sender_index"] for n, r in meeting.items()}
    for name, r in meeting.items():
        assert r["joined"], f"{name} did not join: {r}"
        for other, hz in TONES.items():
            if other == name:
                continue
            heard = r["dominant_hz"].get(str(index[other]))
            assert heard is not None and abs(heard - hz) < 15, f"{name} heard {heard} Hz from {other}, expected {hz}"
        assert r["stats"]["open_failures"].get("authentication", 0) == 0, r["stats"]
    # The KMS knows one relay, the remote zone's: the meeting can only have been placed there.
    relays = [e for e in audit() if e["kind"] == "relay"]
    assert relays, "no relay registered with the KMS"
    assert {e["actor"] for e in relays} == {RELAY_ID}, [e["actor"] for e in relays]
    pod_ip = kubectl_json("get", "pod", "-n", RELAY_NS, "zone-b-relay-0")["status"]["podIP"]
    assert any(f"at {pod_ip}:" in e["detail"] for e in relays), relays


def test_the_roster_lists_the_remote_recorder_as_a_connector(meeting):
    host = meeting["host-a"]
    assert [i["kind"] for i in host["invited"]] == ["recording"], host["invited"]
    for name, r in meeting.items():
        kinds = {m["name"]: m["kind"] for m in r["roster"]}
        assert kinds.get("Host A") == "participant" and kinds.get("Guest B") == "participant", r["roster"]
        connectors = [m for m in r["roster"] if m["kind"] != "participant"]
        assert [(m["kind"], m["role"]) for m in connectors] == [("recording", "connector:recording")], r["roster"]


def audit() -> list[dict]:
    return audit_entries(KMS_NS)


def test_the_audit_shows_keys_to_the_participants_and_the_remote_recorder(meeting):
    # The namespace is fresh and holds this one meeting.
    entries = audit()
    releases = {e["actor"] for e in entries if e["kind"] == "key_release"}
    subjects = {a.rsplit(":", 1)[-1] for a in releases if a.startswith("token:")}
    assert subjects == set(TONES), f"key releases went to {sorted(releases)}"
    assert any(a.startswith(RECORDER_ID) for a in releases), f"no key release to {RECORDER_ID}: {sorted(releases)}"
    assert not [a for a in releases if "/relay/" in a], sorted(releases)
    assert [e for e in entries if e["kind"] == "recording_key" and e["actor"].startswith(RECORDER_ID)], \
        [(e["kind"], e["actor"]) for e in entries]
    verify = kms_admin(KMS_NS, "/v1/audit/verify", method="POST")
    assert verify["ok"], verify


def test_the_remote_recording_restores_through_the_kms(meeting, tmp_path):
    invitation = [i["invitation"] for i in meeting["host-a"]["invited"]][0]
    rec = pool_volume_path(REC_NS, "recorder-c") / f"{MEETING}-{invitation}"
    wait_until(f"{rec} on the remote pool's volume", rec.is_dir, timeout=30)
    data = kubectl_json("get", "secret", "-n", REC_NS, "kms-client")["data"]
    paths = []
    for key in ("tls.crt", "tls.key"):
        p = tmp_path / key
        p.write_bytes(base64.b64decode(data[key]))
        p.chmod(0o600)
        paths.append(str(p))
    out = tmp_path / "plain"

    def restored_complete():
        shutil.rmtree(out, ignore_errors=True)
        r = restore_recording(KMS_NS, rec, out, cert_key=(paths[0], paths[1]))
        assert r.returncode == 0, r.stderr
        files = [json.loads(line) for line in r.stdout.splitlines()]
        return files if files and all(f["complete"] for f in files) else None
    wait_until("a complete recording", restored_complete, timeout=60, interval=2)
    manifest = json.loads((out / "manifest.json").read_text())
    by_name = {p["name"]: p for p in manifest["participants"]}
    for name, hz in TONES.items():
        entry = by_name.get(name.replace("-", " ").title())
        assert entry, f"{name} is not in the recording: {manifest['participants']}"
        share = tone_share(decode_to_pcm(out / entry["file"]), hz, 48000)
        assert share > 0.5, f"{name}'s track holds {share:.2f} of its energy at {hz} Hz"



def test_an_entry_leaving_remote_clients_takes_its_certificate_and_grant(sites, meeting):
    """Last (it changes the KMS config, which rolls the KMS pod): the recorder's
    entry goes, and with it its Secret and its connectorPools grant."""
    kms = kms_manifest()
    kms["spec"]["remoteClients"] = kms["spec"]["remoteClients"][:1]
    apply(kms)
    wait_until("main-kms-remote-rec-c-tls to be deleted",
               lambda: not kubectl("get", "secret", "-n", KMS_NS, "main-kms-remote-rec-c-tls", "--ignore-not-found",
                                   "-o", "name").strip(), timeout=60)
    wait_until("the recorder's grant to leave the KMS config",
               lambda: RECORDER_ID not in kubectl_json("get", "configmap", "-n", KMS_NS,
                                                       "main-kms-config")["data"]["config.yaml"], timeout=30)
    assert kubectl("get", "secret", "-n", KMS_NS, "main-kms-remote-zone-b-tls", "-o", "name").strip()
