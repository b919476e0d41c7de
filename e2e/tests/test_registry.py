"""`make images REGISTRY=...` publishes our images to a registry a user runs,
and they can be pulled back intact: shown against Debian's docker-registry
on 127.0.0.1 (its own config, storage and pid; stopped by PID)."""
import json
import os
import socket
import subprocess
import time

from kube import REPO, TAG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_images_are_pushed_to_a_registry_and_pull_back_identical(tmp_path):
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(json.dumps({
        "version": 0.1, "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "storage")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }))
    registry = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "registry.log", "w"))
    try:
        for _ in range(50):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        dest = f"127.0.0.1:{port}/conclave"
        push = subprocess.run(["bash", str(REPO / "e2e" / "images.sh"), TAG, dest],
                              capture_output=True, text=True, timeout=900, env=os.environ)
        assert push.returncode == 0, push.stderr[-3000:]
        assert f"pushed {dest}/media-node:{TAG}" in push.stderr
        assert "e2e-probe" not in "".join(l for l in push.stderr.splitlines() if "pushed" in l)

        pulled = tmp_path / "pulled"
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{dest}/media-node:{TAG}", f"dir:{pulled}"], check=True, timeout=120)
        manifest = json.loads((pulled / "manifest.json").read_text())
        layers = manifest["layers"]
        assert len(layers) == 1, "the image is the binary alone: one layer"
        local = subprocess.run(["skopeo", "inspect", "--raw",
                                f"oci-archive:{os.environ.get('CARGO_TARGET_DIR', REPO / 'target')}/images/media-node-{TAG}.tar:{TAG}"],
                               capture_output=True, text=True, check=True).stdout
        assert json.loads(local)["layers"][0]["digest"] == layers[0]["digest"]
    finally:
        registry.terminate()
        registry.wait(timeout=10)
