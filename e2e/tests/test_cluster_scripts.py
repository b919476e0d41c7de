"""The cluster scripts fail with clear messages instead of obscure ones."""
import os
import subprocess

from kube import REPO

UP = str(REPO / "e2e" / "cluster" / "up.sh")


def test_cluster_up_without_root_says_so(tmp_path):
    env = {**os.environ, "CLUSTER_STATE": str(tmp_path / "state"), "CONCLAVE_CACHE": str(tmp_path)}
    # setpriv drops to an unprivileged user without needing a login shell.
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", UP],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0
    assert "must run as root" in out.stderr


def test_cluster_up_names_a_port_that_is_taken(tmp_path):
    # The running e2e cluster holds the control-plane ports; a second cluster
    # with its own state directory must refuse before starting anything.
    env = {**os.environ, "CLUSTER_STATE": str(tmp_path / "state")}
    out = subprocess.run(["bash", UP], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert "port 2379/tcp is already in use" in out.stderr, out.stderr
    assert not (tmp_path / "state" / "pids").exists(), "nothing may be started when a port is taken"
