# Shared settings for Conclave's e2e scripts. Sourced, not run.
# Everything the scripts create lives under CONCLAVE_CACHE (builds, venv) or
# CLUSTER_STATE (a running cluster's data, pid files and logs).
set -euo pipefail

K8S_VERSION=1.20.2
CONCLAVE_CACHE=${CONCLAVE_CACHE:-$HOME/.cache/conclave}
CLUSTER_STATE=${CLUSTER_STATE:-$CONCLAVE_CACHE/cluster}
K8S_BIN=$CONCLAVE_CACHE/k8s-$K8S_VERSION/bin
VENV=$CONCLAVE_CACHE/venv
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Addresses: all on this machine, in the benchmarking range 198.18.0.0/15.
NODE_IP=198.18.255.1
POD_CIDR=198.18.0.0/17
SERVICE_CIDR=198.18.128.0/20
FIRST_SERVICE_IP=198.18.128.1
NODE_NAME=node1
CONTAINERD_SOCK=$CLUSTER_STATE/run/containerd.sock
KUBECONFIG_FILE=$CLUSTER_STATE/kubeconfig

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

require_root() {
  [ "$(id -u)" = 0 ] || die "this step must run as root (it installs packages, adds an address to lo and runs containerd/kubelet); try: sudo make $1"
}

# Installs the Debian packages listed in e2e/deps/apt-packages.txt that are
# missing. Idempotent: with everything present it runs no apt command at all.
ensure_packages() {
  local missing=() pkg
  while read -r pkg; do
    case "$pkg" in ''|'#'*) continue ;; esac
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done < "$REPO_ROOT/e2e/deps/apt-packages.txt"
  [ ${#missing[@]} -eq 0 ] && return 0
  require_root packages
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Python venv with helm-python-sdk (the real Helm engine as a library).
ensure_venv() {
  # Re-installs only when requirements.txt changed (its hash is the stamp).
  local want stamp=$VENV/.requirements.sha256
  want=$(sha256sum "$REPO_ROOT/e2e/deps/requirements.txt" | cut -d' ' -f1)
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  log "installing Python packages (helm-python-sdk, pytest, ...) into $VENV"
  mkdir -p "$CONCLAVE_CACHE"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REPO_ROOT/e2e/deps/requirements.txt"
  echo "$want" > "$stamp"
}

kubectl_() { kubectl --kubeconfig "$KUBECONFIG_FILE" "$@"; }

# Whether PID is still the cluster component NAME. A pid file can outlive its
# process (a killed run, a reboot) and the number be reused by something else,
# which must then be neither trusted as running nor killed.
is_component() {
  local pid=$1 name=$2
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -q -- "$name"
}

# Runs "$@" and prints how long it took, for the phase timings `make test` reports.
# Keeps the command's exit status: callers chain phases with &&, where bash
# suspends `set -e` inside functions, so the status must be returned explicitly.
timed() {
  local name=$1; shift
  local start=$SECONDS rc=0
  "$@" || rc=$?
  if [ "$rc" -eq 0 ]; then
    log "phase '$name' took $((SECONDS - start)) s"
  else
    log "phase '$name' FAILED (exit $rc) after $((SECONDS - start)) s"
  fi
  return "$rc"
}

# Builds a minimal OCI image archive from one static binary: the binary alone
# in an otherwise empty root filesystem, run as a non-root user.
#   build_oci_image OUT.tar NAME TAG BINARY ENTRYPOINT [UID]
build_oci_image() {
  local out=$1 name=$2 tag=$3 binary=$4 entrypoint=$5 uid=${6:-65532}
  local work
  work=$(mktemp -d "${TMPDIR:-/tmp}/conclave-oci.XXXXXX")
  umoci init --layout "$work/img"
  umoci new --image "$work/img:$tag"
  umoci unpack --rootless --image "$work/img:$tag" "$work/bundle" >/dev/null
  install -m 0755 "$binary" "$work/bundle/rootfs/$(basename "$entrypoint")"
  umoci repack --image "$work/img:$tag" "$work/bundle" >/dev/null
  umoci config --image "$work/img:$tag" --config.entrypoint "$entrypoint" \
    --config.user "$uid:$uid" --config.workingdir / --tag "$tag" \
    --config.label "org.opencontainers.image.title=$name" >/dev/null
  (cd "$work/img" && tar cf "$out.tmp" .) && mv "$out.tmp" "$out"
  rm -rf "$work"
}

# Imports an OCI archive into the cluster's containerd under NAME:TAG.
import_image() {
  local archive=$1 name=$2
  ctr -a "$CONTAINERD_SOCK" -n k8s.io images import --base-name "$name" "$archive" >/dev/null
}
