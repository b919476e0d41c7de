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


def rolled_out(namespace: str, selector: str | None = None) -> bool:
    """Every StatefulSet and Deployment (of `selector`, if given) has all its replicas
    updated and ready, and the controller-manager has recorded it."""
    args = ["get", "statefulsets,deployments", "-n", namespace] + (["-l", selector] if selector else [])
    for o in kubectl_json(*args)["items"]:
        spec, st = o["spec"], o.get("status", {})
        want = spec.get("replicas", 1)
        if st.get("observedGeneration") != o["metadata"]["generation"] or \
                st.get("updatedReplicas", 0) != want or st.get("readyReplicas", 0) != want:
            return False
        if o["kind"] == "StatefulSet" and st.get("currentRevision") != st.get("updateRevision"):
            return False
    return True


def wait_rolled_out(namespace: str, component: str, timeout: int = 180) -> None:
    """Waits until a Conclave component's workloads run their newest template on all
    replicas. A KMS is rolled once just after it is created, when the pools appear in
    its configuration, and its Ready condition does not wait for that."""
    wait_until(f"the {component} rollout in {namespace} to finish",
               lambda: rolled_out(namespace, f"app.kubernetes.io/component={component}"),
               timeout=timeout, interval=2)


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


# ----- Connectors in a meeting (recording, telephony): building blocks that
# compose into larger scenarios. A host participant invites connectors with
# `conclave-client join --invite KIND[=TARGET]`; the pool's pod joins; the
# test reads what each member saw from its report.

NODE_IP = os.environ.get("CONCLAVE_NODE_IP", "198.18.255.1")
"""This host's address on the cluster (the node IP, on lo): pods reach it, so a
phone on the host is reachable from the telephony pod, and the cluster's
dnsmasq answers on it."""


def publish_kms_ca(namespace: str) -> str:
    """The namespace CA certificate as the ConfigMap `kms-ca` that participant
    pods mount (a portal would hand it out; never the CA Secret). Returns it."""
    import base64
    ca = base64.b64decode(kubectl_json("get", "secret", "conclave-ca", "-n", namespace)["data"]["ca.crt"]).decode()
    apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kms-ca", "namespace": namespace},
           "data": {"ca.crt": ca}})
    return ca


def member_pod(namespace: str, name: str, kms_url: str, *, display: str, role: str = "participant",
               tone: float = 440.0, duration: float = 12.0, invites: tuple[str, ...] = (),
               chat: str | None = None, meeting: str = MEETING, label: str = "meeting") -> list[dict]:
    """A Secret with a fresh join token and a conclave-client pod joining
    `meeting` through the KMS: sends `tone`, optionally a chat line, invites
    `invites` (KIND or KIND=TARGET; host only), prints its report. Labelled
    `conclave.dev/e2e=<label>` and `app=<label>-member`."""
    token = mint_token_for(meeting, name, display, role)
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": name, "namespace": namespace, "labels": {"conclave.dev/e2e": label}},
              "stringData": {"token": token}}
    args = ["join", "--kms", kms_url, "--kms-ca", "/etc/kms-ca/ca.crt", "--meeting", meeting,
            "--tone", str(tone), "--duration", str(duration)]
    if chat:
        args += ["--chat", chat, "--chat-delay", "4"]
    for inv in invites:
        args += ["--invite", inv]
    p = pod(name, namespace, f"conclave/conclave-client:{TAG}", args,
            labels={"app": f"{label}-member", "conclave.dev/e2e": label})
    p["spec"]["restartPolicy"] = "Never"
    c = p["spec"]["containers"][0]
    c["env"] = [{"name": "CONCLAVE_JOIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": "token"}}}]
    c["volumeMounts"] = [{"name": "kms-ca", "mountPath": "/etc/kms-ca"}]
    p["spec"]["volumes"] = [{"name": "kms-ca", "configMap": {"name": "kms-ca"}}]
    return [secret, p]


def mint_token_for(meeting: str, sub: str, name: str, role: str, ttl: int = 600) -> str:
    out = subprocess.run([host_binary("conclave-client"), "token", "--meeting", meeting, "--sub", sub,
                          "--name", name, "--role", role, "--ttl", str(ttl)],
                         capture_output=True, text=True, env={"CONCLAVE_DEV_ISSUER_SEED": "11" * 32}, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def pod_json_lines(namespace: str, name: str) -> list[dict]:
    """The JSON lines a conclave-client pod printed so far (reports, chats, invitations)."""
    logs = kubectl("logs", "-n", namespace, name, check=False)
    out = []
    for line in logs.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def wait_members_done(namespace: str, names: list[str], timeout: int = 180) -> dict[str, dict]:
    """Waits for the member pods to finish; returns each one's join report.
    A pod that failed or printed no report fails with its log tail."""
    def done():
        phases = {}
        for n in names:
            p = kubectl_json("get", "pod", "-n", namespace, n)
            phases[n] = p["status"].get("phase")
        return phases if all(ph in ("Succeeded", "Failed") for ph in phases.values()) else None
    wait_until(f"members {names} to finish", done, timeout=timeout, interval=2)
    reports = {}
    for n in names:
        found = [line["report"] for line in pod_json_lines(namespace, n) if "report" in line]
        if not found:
            logs = kubectl("logs", "-n", namespace, n, check=False)
            raise AssertionError(f"{n} printed no report: {logs[-2000:]}")
        reports[n] = found[0]
    return reports


def component_pods(namespace: str, component: str, instance: str | None = None) -> list[dict]:
    """Running pods of a Conclave component (kms, relay, connector), optionally of one resource."""
    sel = f"app.kubernetes.io/component={component}"
    if instance:
        sel += f",app.kubernetes.io/instance={instance}"
    return [p for p in kubectl_json("get", "pods", "-n", namespace, "-l", sel)["items"]
            if p["status"].get("phase") == "Running" and p["status"].get("podIP")]


def kms_from_host(namespace: str, kms: str = "main") -> tuple[str, str]:
    """(URL at the KMS pod's IP, DNS name its certificate carries): this host
    has no cluster DNS in its resolver, so host-side tools connect to the pod
    IP and check the certificate against the Service name."""
    from urllib.parse import urlsplit
    endpoint = urlsplit(kubectl_json("get", KINDS["kms"], "-n", namespace, kms)["status"]["endpoint"])
    pods = component_pods(namespace, "kms", kms)
    assert pods, f"no running KMS pod for {kms} in {namespace}"
    return f"https://{pods[0]['status']['podIP']}:{endpoint.port or 443}", endpoint.hostname


def pool_client_identity(namespace: str, pool: str, out_dir: str) -> tuple[str, str]:
    """The pool's KMS client certificate and key (PEM files in `out_dir`), as
    its Deployment mounts them: the identity that created its recordings."""
    import base64
    dep = kubectl_json("get", "deployment", "-n", namespace, f"{pool}-connector")
    secret = next(v["secret"]["secretName"] for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    data = kubectl_json("get", "secret", "-n", namespace, secret)["data"]
    paths = []
    for key in ("tls.crt", "tls.key"):
        path = Path(out_dir) / f"{pool}-{key}"
        path.write_bytes(base64.b64decode(data[key]))
        path.chmod(0o600)
        paths.append(str(path))
    return paths[0], paths[1]


def pool_volume_path(namespace: str, pool: str) -> Path:
    """Where the pool's recordings volume lives on this host: the claim's
    bound PersistentVolume is a hostPath volume (static provisioning)."""
    pvc = kubectl_json("get", "pvc", "-n", namespace, f"{pool}-recordings")
    assert pvc["status"].get("phase") == "Bound", f"{pool}-recordings is {pvc['status'].get('phase')}"
    pv = kubectl_json("get", "pv", pvc["spec"]["volumeName"])
    assert "hostPath" in pv["spec"], f"{pv['metadata']['name']} is not a hostPath volume"
    return Path(pv["spec"]["hostPath"]["path"])


def restore_recording(namespace: str, recording_dir: Path, out_dir: Path, *, cert_key: tuple[str, str] | None = None,
                      token: str | None = None, kms: str = "main") -> subprocess.CompletedProcess:
    """`connector-node recording restore` on this host through the KMS, as the
    identity of `cert_key` (client certificate) or `token` (join token)."""
    ca = Path(tempfile.mkdtemp()) / "ca.crt"
    ca.write_text(publish_kms_ca(namespace))
    cmd = restore_command(namespace, recording_dir, out_dir, ca, cert_key=cert_key, kms=kms)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if token:
        env["CONCLAVE_TOKEN"] = token
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def restore_command(namespace: str, recording_dir: Path, out_dir: Path, ca: Path, *,
                    cert_key: tuple[str, str] | None = None, kms: str = "main") -> list[str]:
    """The `connector-node recording restore` command line that
    restore_recording runs (the namespace CA certificate in `ca`), for
    showing to a user who wants to run it again."""
    url, name = kms_from_host(namespace, kms)
    cmd = [host_binary("connector-node"), "recording", "restore", "--dir", str(recording_dir), "--out", str(out_dir),
           "--kms", url, "--kms-name", name, "--ca", str(ca)]
    if cert_key:
        cmd += ["--cert", cert_key[0], "--key", cert_key[1]]
    return cmd


def decode_to_pcm(path: Path, rate: int = 48000) -> list[int]:
    """Decodes any audio file ffmpeg reads (Ogg Opus, WAV) to mono 16-bit samples."""
    import array
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-ar", str(rate), "-"],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, f"ffmpeg could not decode {path}: {out.stderr.decode()[-500:]}"
    a = array.array("h")
    a.frombytes(out.stdout[: len(out.stdout) // 2 * 2])
    return a.tolist()


def tone_share(samples: list[int], hz: float, rate: int) -> float:
    """Share of the signal's energy at `hz` (Goertzel over 100 ms blocks,
    summed): about 1 for a pure tone, near 0 when the tone is absent."""
    import math
    n = rate // 10
    k = 2 * math.cos(2 * math.pi * hz / rate)
    at, total = 0.0, 0.0
    for start in range(0, len(samples) - n + 1, n):
        block = samples[start:start + n]
        s1 = s2 = 0.0
        for x in block:
            s1, s2 = x + k * s1 - s2, s1
        power = s1 * s1 + s2 * s2 - k * s1 * s2
        at += 2 * power / n
        total += sum(x * x for x in block)
    return at / total if total else 0.0


def delete_namespace(namespace: str, timeout: int = 180) -> None:
    """Deletes a test namespace, waits until it is gone and frees its volumes.

    Kubernetes' namespace controller, when it finds pods that have not ended,
    looks again only after their termination grace period (60 s for connector
    pods), however quickly they actually stop. So the namespace is emptied
    first: the Conclave resources (the operator runs its finalizers), then
    the workloads and every pod, with a short grace (a test's teardown needs
    no drain). The namespace itself then goes in seconds."""
    if not kubectl("get", "namespace", namespace, "--ignore-not-found", "-o", "name").strip():
        release_volumes(namespace)
        return
    wait = ("--wait=true", f"--timeout={timeout}s")
    # A step may find nothing to delete, or no such resource type when the
    # chart never installed: what matters is that the namespace goes.
    kubectl("delete", "connectorpools,meetingzones,keymanagementservers", "--all", "-n", namespace, *wait,
            check=False, timeout=timeout + 30)
    kubectl("delete", "statefulsets,deployments,replicasets,jobs,pods", "--all", "-n", namespace,
            "--grace-period=5", *wait, check=False, timeout=timeout + 30)
    kubectl("delete", "namespace", namespace, "--ignore-not-found", *wait, timeout=timeout + 30)
    release_volumes(namespace)


def release_volumes(namespace: str) -> None:
    """Makes the hostPath PersistentVolumes that claims of a deleted
    `namespace` left Released usable again (emptied, claim reference
    dropped): the cluster's PVs are a small static pool with reclaim policy
    Retain, and test data is not worth keeping."""
    import shutil

    def claimed():
        return [pv for pv in kubectl_json("get", "pv")["items"]
                if (pv["spec"].get("claimRef") or {}).get("namespace") == namespace]
    # The PV controller marks a volume Released a moment after its claim is gone.
    if kubectl("get", "namespace", namespace, "--ignore-not-found", "-o", "name").strip():
        return
    wait_until(f"volumes of {namespace} to be released",
               lambda: all(pv["status"].get("phase") != "Bound" for pv in claimed()), timeout=60, interval=1)
    for pv in claimed():
        ref = pv["spec"].get("claimRef") or {}
        if ref.get("namespace") != namespace or pv["status"].get("phase") != "Released":
            continue
        path = Path(pv["spec"].get("hostPath", {}).get("path", ""))
        if path.is_dir():
            for child in path.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        kubectl("patch", "pv", pv["metadata"]["name"], "--type", "json",
                "-p", '[{"op": "remove", "path": "/spec/claimRef"}]')


def write_tone_wav(path: Path, hz: float, seconds: float, rate: int = 8000, level: float = 0.4) -> None:
    import math
    import struct
    import wave
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        n = int(seconds * rate)
        w.writeframes(b"".join(struct.pack("<h", int(level * 32767 * math.sin(2 * math.pi * hz * i / rate)))
                               for i in range(n)))


def free_port(host: str) -> int:
    import socket
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            try:
                t.bind((host, port))
                return port
            except OSError:
                continue


class Phone:
    """baresip (Debian) on this host as a phone that dials a telephony pool's
    dial-in number: SIP over TLS to the pool's Service name (resolved by the
    cluster's DNS, certificate checked against the namespace CA), SRTP
    mandatory, G.711. It plays a tone of `tone_hz`, records what it hears
    (`heard()`), and hangs up and quits after `seconds`. Stopped by its PID."""

    RTP_PORTS = (31000, 31199)

    def __init__(self, namespace: str, pool: str = "phones", number: str = "+15550100",
                 caller: str = "+15551234567", tone_hz: float = 1200.0, seconds: int = 12):
        self.dir = Path(tempfile.mkdtemp(prefix="conclave-phone-"))
        self.tone_hz = tone_hz
        self.caller = caller
        wav = self.dir / "say.wav"
        # baresip ends the call when its source file ends: outlast the call.
        write_tone_wav(wav, tone_hz, seconds + 5.0)
        ca = self.dir / "ca.crt"
        ca.write_text(publish_kms_ca(namespace))
        (self.dir / "rec").mkdir()
        port = free_port(NODE_IP)
        (self.dir / "config").write_text(
            "poll_method epoll\n"
            f"net_interface {NODE_IP}\n"
            f"sip_listen {NODE_IP}:{port}\n"
            f"dns_server {NODE_IP}:53\n"
            f"sip_cafile {ca}\n"
            "call_local_timeout 30\n"
            "audio_player aubridge,nil\n"
            f"audio_source aufile,{wav}\n"
            "audio_alert aubridge,nil\n"
            "ausrc_srate 8000\nauplay_srate 8000\nausrc_channels 1\nauplay_channels 1\n"
            f"rtp_ports {self.RTP_PORTS[0]}-{self.RTP_PORTS[1]}\n"
            "rtcp_mux no\n"
            "jitter_buffer_delay 2-6\n"
            f"snd_path {self.dir / 'rec'}\n"
            "module_path /usr/lib/baresip/modules\n"
            "module g711.so\nmodule aufile.so\nmodule aubridge.so\nmodule sndfile.so\nmodule srtp.so\n"
            "module_tmp account.so\n"
            "module_app menu.so\n")
        (self.dir / "accounts").write_text(
            f"<sip:{caller}@{NODE_IP};transport=tls>;regint=0;answermode=auto;"
            "audio_codecs=PCMU,PCMA;mediaenc=srtp-mand\n")
        (self.dir / "contacts").write_text("")
        # baresip adds ";transport=tls" from the account.
        self.uri = f"sip:{number}@{pool}-connector.{namespace}.svc.cluster.local:5061"
        self._log = open(self.dir / "baresip.log", "wb")
        self.proc = subprocess.Popen(["baresip", "-f", str(self.dir), "-v", "-t", str(seconds), "-e", f"/dial {self.uri}"],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return (self.dir / "baresip.log").read_text(errors="replace")

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def heard(self) -> list[Path]:
        """WAV files of what the phone decoded (sndfile module)."""
        return sorted(p for p in (self.dir / "rec").glob("*-dec.wav"))


def interface_towards(ip: str) -> str:
    """The host interface that carries traffic to `ip` (the pod bridge for a pod IP)."""
    route = json.loads(subprocess.run(["ip", "-j", "route", "get", ip], capture_output=True, text=True,
                                      check=True).stdout)
    return route[0]["dev"]


class Capture:
    """tcpdump (Debian) writing a pcap of `bpf` on one host interface. Stopped by its PID."""

    def __init__(self, interface: str, bpf: str):
        self.path = Path(tempfile.mkdtemp(prefix="conclave-capture-")) / "capture.pcap"
        self._err = open(self.path.with_suffix(".log"), "wb")
        self.proc = subprocess.Popen(["tcpdump", "-i", interface, "-n", "-U", "-s", "0", "-w", str(self.path), bpf],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err)
        wait_until("tcpdump to listen", lambda: b"listening on" in self.path.with_suffix(".log").read_bytes()
                   or self.proc.poll() is not None, timeout=10, interval=0.1)
        assert self.proc.poll() is None, self.path.with_suffix(".log").read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()

    def udp_packets(self) -> list[tuple[str, int, str, int, bytes]]:
        """(source, source port, destination, destination port, UDP payload) of every IPv4 UDP packet."""
        import ipaddress
        import struct
        data = self.path.read_bytes()
        magic = struct.unpack("<I", data[:4])[0]
        endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
        linktype = struct.unpack(endian + "I", data[20:24])[0]
        out, pos = [], 24
        while pos + 16 <= len(data):
            incl = struct.unpack(endian + "I", data[pos + 8:pos + 12])[0]
            frame = data[pos + 16:pos + 16 + incl]
            pos += 16 + incl
            if linktype == 1:  # Ethernet
                if len(frame) < 14 or frame[12:14] != b"\x08\x00":
                    continue
                ip = frame[14:]
            elif linktype == 113:  # Linux cooked capture
                if len(frame) < 16 or frame[14:16] != b"\x08\x00":
                    continue
                ip = frame[16:]
            else:
                raise AssertionError(f"unexpected pcap link type {linktype}")
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
                continue
            ihl = (ip[0] & 0x0F) * 4
            udp = ip[ihl:]
            sport, dport, length = struct.unpack("!HHH", udp[:6])
            out.append((str(ipaddress.ip_address(ip[12:16])), sport, str(ipaddress.ip_address(ip[16:20])), dport,
                        udp[8:length]))
        return out


def g711_decode(payload: bytes, alaw: bool) -> list[int]:
    """ITU-T G.711 expansion of µ-law (PCMU) or A-law (PCMA) bytes to 16-bit samples."""
    out = []
    for b in payload:
        if alaw:
            a = b ^ 0x55
            seg = (a & 0x70) >> 4
            t = (a & 0x0F) << 4
            t = t + 8 if seg == 0 else (t + 0x108) << (seg - 1)
            out.append(t if a & 0x80 else -t)
        else:
            u = ~b & 0xFF
            t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
            out.append(0x84 - t if u & 0x80 else t - 0x84)
    return out


def byte_entropy(data: bytes) -> float:
    """Shannon entropy in bits per byte (8 for random bytes)."""
    import math
    from collections import Counter
    if not data:
        return 0.0
    n = len(data)
    return -sum(c / n * math.log2(c / n) for c in Counter(data).values())


def rtp_exposure(packets: list[bytes], tone_hz: float) -> dict:
    """What an eavesdropper gets from RTP packets taken as plain G.711: the
    share of the tone in their payloads decoded as PCMU and as PCMA, the
    payload entropy, and how many carry a 10-byte SRTP authentication tag
    after a 20 ms G.711 payload (12 + 160 + 10 bytes)."""
    rtp = [p for p in packets if len(p) >= 12 and p[0] >> 6 == 2 and (p[1] & 0x7F) in (0, 8)]
    payloads = [p[12:12 + 160] for p in rtp]
    joined = b"".join(payloads)
    return {
        "packets": len(rtp),
        "with_auth_tag": sum(1 for p in rtp if len(p) == 12 + 160 + 10),
        "pcmu_tone_share": tone_share(g711_decode(joined, alaw=False), tone_hz, 8000) if joined else 0.0,
        "pcma_tone_share": tone_share(g711_decode(joined, alaw=True), tone_hz, 8000) if joined else 0.0,
        "entropy_bits_per_byte": byte_entropy(joined),
    }


def kms_admin(namespace: str, path: str, method: str = "GET", kms: str = "main"):
    """Calls the KMS's admin API (audit read and verify, roster export) from
    this host with the admin certificate the operator issues into the Secret
    `<kms>-kms-admin-tls`: what a security team allowed to read that Secret
    does. Returns the decoded JSON answer."""
    import base64
    from urllib.parse import urlsplit
    url, name = kms_from_host(namespace, kms)
    where = urlsplit(url)
    d = Path(tempfile.mkdtemp())
    data = kubectl_json("get", "secret", "-n", namespace, f"{kms}-kms-admin-tls")["data"]
    for key in ("tls.crt", "tls.key"):
        (d / key).write_bytes(base64.b64decode(data[key]))
        (d / key).chmod(0o600)
    (d / "ca.crt").write_text(publish_kms_ca(namespace))
    out = subprocess.run(["curl", "-sS", "--fail-with-body", "--max-time", "30", "-X", method,
                          "--cert", str(d / "tls.crt"), "--key", str(d / "tls.key"), "--cacert", str(d / "ca.crt"),
                          "--resolve", f"{name}:{where.port}:{where.hostname}", f"https://{name}:{where.port}{path}"],
                         capture_output=True, text=True, timeout=60)
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    if out.returncode != 0:
        raise RuntimeError(f"KMS {method} {path}: {out.stderr.strip()} {out.stdout.strip()}")
    return json.loads(out.stdout)


def audit_entries(namespace: str, kms: str = "main") -> list[dict]:
    """The whole audit chain of a KMS, oldest first."""
    entries: list[dict] = []
    while True:
        page = kms_admin(namespace, f"/v1/audit?from={entries[-1]['seq'] + 1 if entries else 0}&limit=1000", kms=kms)
        if not page["entries"]:
            return entries
        entries += page["entries"]
