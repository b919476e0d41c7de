"""Connectors on the local cluster as a user meets them, in the namespace
`connectors` (set up like `meetings`: KMS, zone-a with two relays, the
recording pool `recorder`, the telephony pool `phones` with SIP over TLS,
SRTP required and +15550100 mapped to the meeting).

One meeting runs once for the module: three participant pods send a tone
each; the host (`--invite recording --invite telephony`) brings in the
recorder and a phone line; baresip on this host dials the pool's number over
TLS with SRTP, plays a tone and records what it hears, while tcpdump captures
its RTP on the pod bridge. Then:

- every member's report lists the recorder and the phone as connectors;
- a participant who is not the host cannot invite, with a clear error;
- the recording in the pool's volume (a hostPath PersistentVolume) restores
  on this host through the KMS for the pool's identity, as Ogg Opus holding
  each participant's tone; a participant's token and another pool's
  certificate are refused by the KMS;
- the phone hears every participant over SRTP; every participant hearing the
  phone is an expected failure for now (see its reason);
- the phone's RTP is SRTP: no packet decodes as plain G.711 of its tone.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

from deploy import (MEETING, TONES, Capture, Phone, component_pods, decode_to_pcm, interface_towards,
                    member_pod, mint_token_for, pod_json_lines, pool_client_identity, pool_volume_path,
                    publish_kms_ca, release_volumes, restore_recording, rtp_exposure, setup_meetings_namespace,
                    tone_share, wait_members_done, wait_ready)
from kube import apply, kubectl, wait_until

NS = "connectors"
PHONE_HZ = 1200.0
MEDIA_SECONDS = 16
PHONE_SECONDS = 11


@pytest.fixture(scope="module")
def namespace(conclave_release):
    for tool in ("baresip", "tcpdump", "ffmpeg"):
        assert shutil.which(tool), f"{tool} is missing (Debian package {tool}; see e2e/deps/apt-packages.txt)"
    kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=true", "--timeout=120s", timeout=180)
    release_volumes(NS)
    setup_meetings_namespace(NS)
    yield NS
    kubectl("delete", "namespace", NS, "--wait=true", "--timeout=120s", check=False, timeout=180)
    release_volumes(NS)


@pytest.fixture(scope="module")
def meeting(namespace):
    kms = wait_ready(namespace, "kms", "main")
    wait_ready(namespace, "mz", "zone-a")
    wait_ready(namespace, "cp", "recorder")
    wait_ready(namespace, "cp", "phones")
    publish_kms_ca(namespace)
    url = kms["status"]["endpoint"]
    names = {i: f"user-{i}" for i in TONES}
    objects = []
    for i, hz in TONES.items():
        objects += member_pod(namespace, names[i], url, display=f"User {i}", role="host" if i == 0 else "participant",
                              tone=hz, duration=MEDIA_SECONDS, label="connectors",
                              invites=("recording", "telephony") if i == 0 else ())
    # A participant (not the host) asking for a recorder, in a meeting of its own.
    objects += member_pod(namespace, "not-a-host", url, display="Not A Host", role="participant", duration=1,
                          invites=("recording",), meeting="side-room", label="connectors")
    apply(objects)

    # The host invites as soon as the KMS admits it; the phone dials once it has.
    wait_until("the host to invite the recorder and a phone",
               lambda: len([x for x in pod_json_lines(namespace, names[0]) if "invited" in x]) == 2,
               timeout=120, interval=1)
    pool_pod = component_pods(namespace, "connector", "phones")[0]["status"]["podIP"]
    capture = Capture(interface_towards(pool_pod),
                      f"udp and host {pool_pod} and portrange {Phone.RTP_PORTS[0]}-{Phone.RTP_PORTS[1]}")
    phone = Phone(namespace, tone_hz=PHONE_HZ, seconds=PHONE_SECONDS)
    try:
        reports = wait_members_done(namespace, list(names.values()), timeout=120)
        phone.wait(timeout=PHONE_SECONDS + 10)
    finally:
        phone.stop()
        capture.stop()
    pool_log = "".join(kubectl("logs", "-n", namespace, p["metadata"]["name"], check=False)
                       for p in component_pods(namespace, "connector", "phones"))
    yield {"reports": {i: reports[names[i]] for i in TONES}, "phone": phone, "capture": capture,
           "pool_log": pool_log}


def sender_of(report: dict, kind: str) -> int:
    found = [m["sender_index"] for m in report["roster"] if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} member in {report['roster']}"
    return found[0]


def test_host_invites_connectors_and_everyone_sees_them_as_connectors(meeting):
    reports = meeting["reports"]
    assert sorted(i["kind"] for i in reports[0]["invited"]) == ["recording", "telephony"], reports[0]["invited"]
    for i, r in reports.items():
        assert r["joined"], f"user-{i} did not join"
        kinds = {m["name"]: m["kind"] for m in r["roster"]}
        for j in TONES:
            assert kinds.get(f"User {j}") == "participant", f"user-{i} saw {r['roster']}"
        connectors = sorted(m["kind"] for m in r["roster"] if m["kind"] != "participant")
        assert connectors == ["recording", "telephony"], f"user-{i} saw {r['roster']}"
        host = [m for m in r["roster"] if m["name"] == "User 0"][0]
        assert host["role"] == "host"
        assert all(m["role"] == f"connector:{m['kind']}" for m in r["roster"] if m["kind"] != "participant")


def test_only_the_host_may_invite(meeting, namespace):
    def finished():
        p = kubectl("get", "pod", "-n", namespace, "not-a-host", "-o", "jsonpath={.status.phase}")
        return p if p in ("Succeeded", "Failed") else None
    assert wait_until("the non-host's invitation attempt to end", finished, timeout=60) == "Failed"
    log = kubectl("logs", "-n", namespace, "not-a-host")
    assert "--invite is for the meeting's host: this join token's role is participant" in log, log
    assert not [x for x in pod_json_lines(namespace, "not-a-host") if "invited" in x]


def recording_dir(namespace: str, report: dict) -> Path:
    invitation = [i["invitation"] for i in report["invited"] if i["kind"] == "recording"][0]
    path = pool_volume_path(namespace, "recorder") / f"{MEETING}-{invitation}"
    wait_until(f"{path} to exist on the pool's volume", path.is_dir, timeout=30)
    return path


def test_recording_restores_for_an_authorized_reader_and_holds_every_tone(meeting, namespace, tmp_path):
    import json
    host = meeting["reports"][0]
    rec = recording_dir(namespace, host)
    identity = pool_client_identity(namespace, "recorder", str(tmp_path))
    out = tmp_path / "plain"

    # The recorder closes the recording once the last person has left.
    def restored_complete():
        shutil.rmtree(out, ignore_errors=True)
        r = restore_recording(namespace, rec, out, cert_key=identity)
        assert r.returncode == 0, r.stderr
        files = [json.loads(line) for line in r.stdout.splitlines()]
        return files if files and all(f["complete"] for f in files) else None
    files = wait_until("a complete recording", restored_complete, timeout=60, interval=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["meeting"] == MEETING and manifest.get("endedAtMs"), manifest
    by_name = {p["name"]: p for p in manifest["participants"]}
    for i, hz in TONES.items():
        entry = by_name.get(f"User {i}")
        assert entry, f"User {i} is not in the recording's manifest: {manifest['participants']}"
        track = out / entry["file"]
        probe = json.loads(subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json",
                                           str(track)], capture_output=True, text=True, timeout=30).stdout)
        assert probe["streams"][0]["codec_name"] == "opus" and probe["format"]["format_name"] == "ogg", probe
        pcm = decode_to_pcm(track)
        assert len(pcm) / 48000 > MEDIA_SECONDS - 6, f"User {i}'s track is {len(pcm) / 48000:.1f} s"
        share = tone_share(pcm, hz, 48000)
        assert share > 0.5, f"User {i}'s track holds {share:.2f} of its energy at {hz} Hz"
    # The phone is recorded like everyone else (its sound: see the xfail test below).
    assert "telephony" in by_name, manifest["participants"]
    mixed = decode_to_pcm(out / manifest["mixed"])
    for hz in TONES.values():
        assert tone_share(mixed, hz, 48000) > 0.1, f"the mixed track lacks {hz} Hz"
    assert {f["file"] for f in files} >= {"manifest.json", manifest["mixed"]}


def test_recording_is_refused_to_unauthorized_identities(meeting, namespace, tmp_path):
    rec = recording_dir(namespace, meeting["reports"][0])
    # A participant of the very meeting: members hear the meeting live, but
    # reading recordings is for the KMS's recording readers.
    token = mint_token_for(MEETING, "user-1", "User 1", "participant")
    r = restore_recording(namespace, rec, tmp_path / "as-participant", token=token)
    assert r.returncode != 0, r.stdout
    assert "not allowed to read this recording's key" in r.stderr, r.stderr
    # Another connector pool's certificate: a valid identity, not this recording's.
    phones = pool_client_identity(namespace, "phones", str(tmp_path))
    r = restore_recording(namespace, rec, tmp_path / "as-phones", cert_key=phones)
    assert r.returncode != 0, r.stdout
    assert "not allowed to read this recording's key" in r.stderr, r.stderr
    assert not list((tmp_path / "as-phones").glob("*.opus")), "nothing is restored for a refused reader"


def test_dial_in_phone_hears_the_meeting(meeting):
    phone = meeting["phone"]
    log = phone.log()
    assert "SRTP is Enabled (cryptosuite=AES_CM_128_HMAC_SHA1_80)" in log, log[-3000:]
    heard = phone.heard()
    assert heard, f"baresip recorded nothing: {log[-3000:]}"
    pcm = decode_to_pcm(heard[0], 8000)
    assert len(pcm) / 8000 > 4, f"the phone heard only {len(pcm) / 8000:.1f} s"
    for i, hz in TONES.items():
        share = tone_share(pcm, hz, 8000)
        assert share > 0.05, f"the phone did not hear user-{i} ({hz} Hz): share {share:.3f}"
    assert "Call established" in log, log[-3000:]


@pytest.mark.xfail(strict=False, reason=(
    "on the shared cluster the participants heard the phone's 1200 Hz tone with its strongest component at "
    "550 Hz (two runs; baresip's own send recording is a pure 1200 Hz tone), while the same connector path on "
    "127.0.0.1 (connector-node kms_e2e) hears 1200 Hz: not explained yet"))
def test_the_meeting_hears_the_dial_in_phone(meeting):
    for i, r in meeting["reports"].items():
        phone_sender = sender_of(r, "telephony")
        got = r["dominant_hz"].get(str(phone_sender))
        assert got is not None and abs(got - PHONE_HZ) < 20, \
            f"user-{i} heard {got} Hz from the phone; pool log: {meeting['pool_log'][-3000:]}"


def test_phone_leg_carries_no_plain_g711(meeting):
    phone = meeting["phone"]
    packets = [p[4] for p in meeting["capture"].udp_packets()]
    seen = rtp_exposure(packets, PHONE_HZ)
    # The capture worked and holds the call: RTP-shaped packets both ways, with SRTP tags.
    assert seen["packets"] > 100, seen
    assert seen["with_auth_tag"] == seen["packets"], seen
    # Read as plain G.711 they are noise: no tone, random-looking bytes.
    assert seen["pcmu_tone_share"] < 0.05 and seen["pcma_tone_share"] < 0.05, seen
    assert seen["entropy_bits_per_byte"] > 7.5, seen
    # The same checks do find the tone in plain G.711 of the phone's own audio.
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(phone.dir / "say.wav"), "-f", "mulaw", "-"],
                         capture_output=True, timeout=30).stdout
    plain = [bytes([0x80, 0]) + bytes(10) + raw[k:k + 160] for k in range(0, len(raw) - 159, 160)]
    reference = rtp_exposure(plain, PHONE_HZ)
    assert reference["pcmu_tone_share"] > 0.9 and reference["entropy_bits_per_byte"] < 6, reference
