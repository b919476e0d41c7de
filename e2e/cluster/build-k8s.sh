#!/usr/bin/env bash
# Builds the Kubernetes server binaries from Debian's source package, once per
# version: later calls find them in the cache and return at once.
source "$(dirname "$0")/../lib.sh"

WANT=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
have_all() { local b; for b in "${WANT[@]}"; do [ -x "$K8S_BIN/$b" ] || return 1; done; }
if have_all; then
  log "Kubernetes $K8S_VERSION binaries cached in $K8S_BIN"
  exit 0
fi
require_root cluster-up
ensure_packages

# Debian lists only binary packages by default: add a source entry for the same
# archive the machine already uses.
SRC_LIST=/etc/apt/sources.list.d/conclave-deb-src.sources
if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes'; then
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uri" ] || die "cannot find the Debian archive address in /etc/apt/sources.list.d/debian.sources"
  log "adding a deb-src entry for $uri (bookworm main) in $SRC_LIST"
  printf 'Types: deb-src\nURIs: %s\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" > "$SRC_LIST"
  apt-get update -qq
fi

BUILD=$CONCLAVE_CACHE/k8s-$K8S_VERSION/build
mkdir -p "$BUILD"
cd "$BUILD"
if ! ls kubernetes_*.orig.tar.gz >/dev/null 2>&1; then
  log "downloading Debian's kubernetes source package"
  apt-get source --download-only kubernetes >/dev/null
fi
SRC=$BUILD/kubernetes-$K8S_VERSION
if [ ! -d "$SRC" ]; then
  tar xzf kubernetes_*.orig.tar.gz
fi
[ -d "$SRC" ] || die "expected $SRC after unpacking the source package"
cd "$SRC"

# reflect2 1.0.1 (vendored) faults at run time on Go >= 1.18; Debian ships 1.0.2.
R2=vendor/github.com/modern-go/reflect2
if ! grep -q 'unsafeMapIterType' "$R2"/*.go 2>/dev/null || [ ! -f "$R2/.conclave-replaced" ]; then
  log "replacing vendored reflect2 with Debian's 1.0.2"
  rm -f "$R2"/*.go "$R2"/*.s
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$R2"/
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$R2"/ 2>/dev/null || true
  rm -f "$R2"/*_test.go
  touch "$R2/.conclave-replaced"
fi

export GOPATH=$PWD/.go CGO_ENABLED=0 GOFLAGS=-mod=vendor
export HOME=$BUILD/home GOCACHE=$BUILD/gocache
mkdir -p "$HOME" .go/src/k8s.io
ln -sfn ../../.. .go/src/k8s.io/kubernetes
log "building Kubernetes $K8S_VERSION server binaries (several minutes, cached afterwards)"
build() { make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kube-proxy" >"$BUILD/make.log" 2>&1; }
if ! build; then
  # A run killed half-way leaves empty generator binaries behind; one clean retry.
  log "build failed; retrying once from a clean _output (log: $BUILD/make.log)"
  rm -rf _output
  build || { tail -30 "$BUILD/make.log" >&2; die "Kubernetes build failed; full log in $BUILD/make.log"; }
fi
mkdir -p "$K8S_BIN.tmp"
for b in "${WANT[@]}"; do cp "_output/bin/$b" "$K8S_BIN.tmp/"; done
rm -rf "$K8S_BIN" && mv "$K8S_BIN.tmp" "$K8S_BIN"
log "Kubernetes binaries cached in $K8S_BIN"
