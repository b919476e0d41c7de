#!/usr/bin/env bash
# Builds every Conclave binary statically and wraps each in a minimal OCI
# image (the binary alone, non-root). Imports them into the local cluster's
# containerd when it runs; with a REGISTRY argument also pushes them there.
#   images.sh TAG [REGISTRY]
#   images.sh --binaries-only     only the static builds (`make test` builds
#                                 everything before it runs anything)
source "$(dirname "$0")/lib.sh"

binaries_only=
if [ "${1:-}" = --binaries-only ]; then binaries_only=1; shift; fi
TAG=${1:-}
[ -n "$TAG$binaries_only" ] || die "usage: images.sh TAG [REGISTRY] | images.sh --binaries-only"
REGISTRY=${2:-}
IMAGES=(${CONCLAVE_IMAGES:-operator kms-node media-node connector-node conclave-client})
# The e2e scenarios also need their test-only probe; it is never pushed.
[ -n "${CONCLAVE_E2E:-}" ] && IMAGES+=(e2e-probe)
TARGET=x86_64-unknown-linux-gnu
BUILD_DIR=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
OUT=$BUILD_DIR/images
mkdir -p "$OUT"

cd "$REPO_ROOT"
# `make test` builds the binaries before it starts the e2e stage, whose other
# stages then hold cargo's lock on the build directory: no second cargo here.
if [ -z "${CONCLAVE_BINARIES_BUILT:-}" ]; then
  log "building static release binaries (${IMAGES[*]})"
  # crt-static gives static-pie binaries that run in an empty root filesystem;
  # libopus is linked from Debian's static archive.
  RUSTFLAGS="-C target-feature=+crt-static" PKG_CONFIG_ALL_STATIC=1 \
    cargo build --release --target "$TARGET" $(printf -- '--bin %s ' "${IMAGES[@]}")
fi
[ -n "$binaries_only" ] && exit 0

for name in "${IMAGES[@]}"; do
  bin=$BUILD_DIR/$TARGET/release/$name
  file "$bin" | grep -q 'static' || die "$bin is not statically linked"
  build_oci_image "$OUT/$name-$TAG.tar" "$name" "$TAG" "$bin" "/$name"
  log "image conclave/$name:$TAG ($(du -h "$OUT/$name-$TAG.tar" | cut -f1))"
done

if [ -S "$CONTAINERD_SOCK" ]; then
  for name in "${IMAGES[@]}"; do import_image "$OUT/$name-$TAG.tar" "docker.io/conclave/$name"; done
  log "imported into the local cluster as conclave/<name>:$TAG"
else
  log "local cluster not running: images left in $OUT (run 'make cluster-up' and 'make images' to import)"
fi

if [ -n "$REGISTRY" ]; then
  command -v skopeo >/dev/null || { require_root images; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq skopeo >/dev/null; }
  for name in "${IMAGES[@]}"; do
    [ "$name" = e2e-probe ] && continue
    # Plain HTTP only for a registry on this machine; anything else must be TLS.
    tls=true
    case "$REGISTRY" in 127.*|localhost*|"[::1]"*) tls=false ;; esac
    skopeo copy --quiet --dest-tls-verify="$tls" "oci-archive:$OUT/$name-$TAG.tar:$TAG" "docker://$REGISTRY/$name:$TAG"
    log "pushed $REGISTRY/$name:$TAG"
  done
fi
