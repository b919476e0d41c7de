"""Connectors on the local cluster as a user meets them, in the namespace
`connectors` (set up like `meetings`: KMS, zone-a with two relays, the
recording pool `recorder`, the telephony pool `phones` with SIP over TLS,
SRTP required and +15550100 mapped to the meeting).

One meeting runs once for the module (issue 9, scenario 2): six participant
pods send a tone each; the host (`--invite recording --invite telephony`)
brings in the recorder and a phone line; baresip on this host dials the
pool's number over TLS with SRTP as +15551234567, plays a tone and records
what it hears, while tcpdump captures its RTP on the pod bridge. Then:

- every member's roster lists all eight: the six people, the recorder and
  the phone as connectors, the phone named "Phone …4567";
- every participant hears the five others and the phone (each sender's
  strongest frequency), and the phone hears all six over SRTP;
- the KMS audit, read with the admin certificate, lists key releases to
  exactly those eight identities and verifies;
- a participant who is not the host cannot invite, with a clear error;
- the recording in the pool's volume (a hostPath PersistentVolume) restores
  on this host through the KMS for the pool's identity, as Ogg Opus holding
  each participant's tone and the phone's; a participant's token and
  another pool's certificate are refused by the KMS;
- the phone's RTP is SRTP: no packet decodes as plain G.711 of its tone.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

from deploy import (MEETING, Capture, Phone, audit_entries, component_pods, decode_to_pcm, interface_towards,
                    kms_admin, member_pod, mint_token_for, pod_json_lines, pool_client_identity, pool_volume_path,
                    delete_namespace, publish_kms_ca, restore_recording, rtp_exposure, setup_meetings_namespace,
                    tone_share, wait_members_done, wait_ready, wait_rolled_out)
from kube import apply, kubectl, kubectl_json, wait_until

NS = "connectors"
# Six participants, a tone each; none near the phone's tone, and none at
# 550 Hz, the strongest bin of Opus-coded silence (what a silent sender shows).
TONES = {0: 440.0, 1: 660.0, 2: 880.0, 3: 1040.0, 4: 1480.0, 5: 1760.0}
PHONE_HZ = 1200.0
PHONE_CALLER = "+15551234567"
PHONE_NAME = "Phone …4567"
MEDIA_SECONDS = 16
PHONE_SECONDS = 11


@pytest.fixture(scope="module")
def namespace(conclave_release):
    for tool in ("baresip", "tcpdump", "ffmpeg"):
        assert shutil.which(tool), f"{tool} is missing (Debian package {tool}; see e2e/deps/apt-packages.txt)"
    delete_namespace(NS)
    setup_meetings_namespace(NS)
    yield NS
    delete_namespace(NS)


@pytest.fixture(scope="module")
def meeting(namespace):
    kms = wait_ready(namespace, "kms", "main")
    wait_ready(namespace, "mz", "zone-a")
    wait_ready(namespace, "cp", "recorder")
    wait_ready(namespace, "cp", "phones")
    # A meeting started while the KMS or a relay still rolls sees it restart or drain;
    # that is test_faults' subject.
    wait_rolled_out(namespace, "kms")
    wait_rolled_out(namespace, "relay")
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
    phone = Phone(namespace, caller=PHONE_CALLER, tone_hz=PHONE_HZ, seconds=PHONE_SECONDS)
    try:
        reports = wait_members_done(namespace, list(names.values()), timeout=180)
        phone.wait(timeout=PHONE_SECONDS + 10)
    finally:
        phone.stop()
        capture.stop()
    pool_log = "".join(kubectl("logs", "-n", namespace, p["metadata"]["name"], check=False)
                       for p in component_pods(namespace, "connector", "phones"))
    yield {"reports": {i: reports[names[i]] for i in TONES}, "phone": phone, "capture": capture,
           "pool_log": pool_log, "diagnosis": diagnosis(namespace)}


def diagnosis(namespace: str) -> str:
    """What the recorder and the KMS said, and when their pods started: for a
    failure message, to tell a recorder that joined late from one that never did."""
    parts = []
    for component, instance in (("connector", "recorder"), ("kms", None)):
        for p in component_pods(namespace, component, instance):
            name = p["metadata"]["name"]
            log = kubectl("logs", "-n", namespace, name, "--tail=40", check=False)
            parts.append(f"--- {name} (created {p['metadata']['creationTimestamp']}, "
                         f"restarts {[c.get('restartCount') for c in p['status'].get('containerStatuses', [])]})\n"
                         f"{log}")
    for sts in kubectl_json("get", "statefulsets", "-n", namespace, "-l", "app.kubernetes.io/component=kms")["items"]:
        st = sts.get("status", {})
        parts.append(f"--- statefulset {sts['metadata']['name']}: generation {sts['metadata']['generation']}, "
                     f"revisions {st.get('currentRevision')} -> {st.get('updateRevision')}")
    return "\n".join(parts)


def test_every_roster_lists_all_eight_with_connectors_as_connectors(meeting):
    reports = meeting["reports"]
    assert sorted(i["kind"] for i in reports[0]["invited"]) == ["recording", "telephony"], reports[0]["invited"]
    for i, r in reports.items():
        assert r["joined"], f"user-{i} did not join"
        seen = sorted((m["name"], m["kind"], m["role"]) for m in r["roster"])
        expected = sorted([(f"User {j}", "participant", "host" if j == 0 else "participant") for j in TONES]
                          + [("recording", "recording", "connector:recording"),
                             (PHONE_NAME, "telephony", "connector:telephony")])
        assert seen == expected, f"user-{i} saw {r['roster']}\n{meeting['diagnosis']}"


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
    # Every tone is below 2 kHz: tracks are analysed at 8 kHz (ffmpeg
    # resamples), six times less pure-Python Goertzel than at 48 kHz.
    RATE = 8000
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
        assert entry, f"User {i} is not in the recording's manifest: {manifest['participants']}\n" \
                      f"{meeting['diagnosis']}"
        track = out / entry["file"]
        probe = json.loads(subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json",
                                           str(track)], capture_output=True, text=True, timeout=30).stdout)
        assert probe["streams"][0]["codec_name"] == "opus" and probe["format"]["format_name"] == "ogg", probe
        pcm = decode_to_pcm(track, RATE)
        assert len(pcm) / RATE > MEDIA_SECONDS - 6, f"User {i}'s track is {len(pcm) / RATE:.1f} s"
        share = tone_share(pcm, hz, RATE)
        assert share > 0.5, f"User {i}'s track holds {share:.2f} of its energy at {hz} Hz"
    # The phone is recorded like everyone else, under its roster name.
    assert PHONE_NAME in by_name, manifest["participants"]
    share = tone_share(decode_to_pcm(out / by_name[PHONE_NAME]["file"], RATE), PHONE_HZ, RATE)
    assert share > 0.5, f"the phone's track holds {share:.2f} of its energy at {PHONE_HZ} Hz"
    mixed = decode_to_pcm(out / manifest["mixed"], RATE)
    for hz in [*TONES.values(), PHONE_HZ]:
        assert tone_share(mixed, hz, RATE) > 0.03, f"the mixed track lacks {hz} Hz"
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


def test_every_participant_hears_the_five_others_and_the_phone(meeting):
    for i, r in meeting["reports"].items():
        senders = {m["name"]: m["sender_index"] for m in r["roster"]}
        heard = {name: r["dominant_hz"].get(str(senders[name])) for name in senders}
        for j, hz in TONES.items():
            if j == i:
                continue
            got = heard[f"User {j}"]
            assert got is not None and abs(got - hz) < 15, f"user-{i} heard {got} Hz from user-{j}, expected {hz}"
        got = heard[PHONE_NAME]
        assert got is not None and abs(got - PHONE_HZ) < 15, \
            f"user-{i} heard {got} Hz from the phone; pool log: {meeting['pool_log'][-3000:]}"
        assert r["stats"]["open_failures"].get("authentication", 0) == 0, r["stats"]


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


def test_the_audit_lists_key_releases_to_exactly_the_eight_and_verifies(meeting, namespace):
    """Read as a security team would, with the operator-issued admin
    certificate: the meeting's keys went to the six people (token subjects),
    the recording pool and the telephony pool (certificate identities), and
    to nobody else."""
    entries = audit_entries(namespace)
    releases = [e for e in entries if e["kind"] == "key_release" and e.get("meeting") == MEETING]
    got = {e["actor"] if e["actor"].startswith("conclave://") else e["actor"].rsplit(":", 1)[-1]
           for e in releases}
    expected = {f"user-{i}" for i in TONES} | {f"conclave://{namespace}/connector/{pool}"
                                               for pool in ("recorder", "phones")}
    assert got == expected, f"key releases went to {sorted(got)}, expected {sorted(expected)}"
    verify = kms_admin(namespace, "/v1/audit/verify", method="POST")
    assert verify["ok"] and verify["entries"] >= len(entries), verify


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
