"""A run killed outright (every cluster process SIGKILLed, its state directory,
mounts, pod network and containerd shims left behind) is recovered by the next
`make cluster-up`, without harming processes that merely inherited a stale
pid. run-e2e.sh runs this last, on the e2e cluster, since it replaces it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from kube import REPO  # noqa: E402

CACHE = Path(os.environ.get("CONCLAVE_CACHE", Path.home() / ".cache" / "conclave"))
STATE = Path(os.environ.get("CLUSTER_STATE", CACHE / "cluster"))
NODE_IP = "198.18.255.1"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not reaped it yet.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def wait_dead(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running after SIGKILL: {[p for p in pids if alive(p)]}"
        time.sleep(0.2)


def started_s(pid: int) -> float:
    """When a process started, in seconds since boot (/proc/PID/stat field 22)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return ticks / os.sysconf("SC_CLK_TCK")


def uptime_s() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def container_processes() -> set[int]:
    """Processes in containerd's per-container cgroups (cgroup v1 or v2)."""
    found = set()
    for procs in list(Path("/sys/fs/cgroup").glob("k8s.io/*/cgroup.procs")) + \
            list(Path("/sys/fs/cgroup").glob("*/k8s.io/*/cgroup.procs")):
        found |= {int(p) for p in procs.read_text().split()}
    return found


def run_a_pod(kubeconfig: str) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "left-running", "namespace": "default"},
           "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.2",
                                    "imagePullPolicy": "Never"}]}}
    subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "apply", "-f", "-"], input=json.dumps(pod),
                   check=True, capture_output=True, text=True, timeout=60)
    subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "wait", "--for=condition=Ready", "pod/left-running",
                    "--timeout=90s"], check=True, capture_output=True, text=True, timeout=120)


def test_cluster_up_recovers_from_a_killed_run():
    kubeconfig = str(STATE / "kubeconfig")
    # A pod runs when the run is killed, so its container outlives containerd.
    run_a_pod(kubeconfig)
    orphans = container_processes()
    assert orphans, "the pod's container processes were not found in containerd's cgroups"
    pid_files = sorted((STATE / "pids").glob("*.pid"))
    assert pid_files, f"no running cluster at {STATE} to kill"
    killed = {f.stem: int(f.read_text()) for f in pid_files}
    killed_at = uptime_s()
    for pid in killed.values():
        os.kill(pid, signal.SIGKILL)
    wait_dead(list(killed.values()))
    probe = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "--raw", "/readyz"],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0, "the apiserver still answers after being killed"

    # After a reboot a stale pid can belong to anyone: it must survive.
    bystander = subprocess.Popen(["sleep", "300"])
    (STATE / "pids" / "kube-scheduler.pid").write_text(f"{bystander.pid}\n")
    try:
        up = subprocess.run(["bash", str(REPO / "e2e" / "cluster" / "up.sh")],
                            capture_output=True, text=True, timeout=600)
        out = up.stdout + up.stderr
        assert up.returncode == 0, out[-3000:]
        assert "found state from an earlier run that is not healthy" in out, out[-3000:]
        assert f"pid {bystander.pid}, which is no longer kube-scheduler" in out, out[-3000:]
        assert bystander.poll() is None, "cluster-up killed a process that only reused a stale pid"
        assert "left behind by a dead containerd" in out, out[-3000:]
        assert not [p for p in orphans if alive(p)], "containers of the killed run are still running"
    finally:
        bystander.kill()
        bystander.wait()

    node = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "node", "-o",
                           "jsonpath={.items[0].status.conditions[?(@.type==\"Ready\")].status}"],
                          capture_output=True, text=True, timeout=30)
    assert node.stdout == "True", node.stdout + node.stderr
    dns = subprocess.run(["dig", "+short", "+time=2", "+tries=2", f"@{NODE_IP}", "kubernetes.default.svc.cluster.local"],
                         capture_output=True, text=True, timeout=30)
    assert dns.stdout.strip() == "198.18.128.1", dns.stdout + dns.stderr
    fresh = {f.stem: int(f.read_text()) for f in (STATE / "pids").glob("*.pid")}
    assert set(fresh) == set(killed), f"components after recovery: {sorted(fresh)}"
    # The killed processes are dead (wait_dead above), so a component's pid
    # may be reused by its successor: the kernel hands out pids in order and
    # wraps (pid_max is often 32768), and up.sh starts components in the same
    # order as before. What matters is that each runs and started afresh.
    stale = {name: pid for name, pid in fresh.items() if not alive(pid) or started_s(pid) < killed_at}
    assert not stale, f"components not running or not started after the kill: {stale}"
