#!/usr/bin/env bash
# The pod sandbox ("pause") image, built from the Kubernetes source tree
# without Docker and imported into the cluster's containerd.
source "$(dirname "$0")/../lib.sh"

ARCHIVE=$CONCLAVE_CACHE/k8s-$K8S_VERSION/pause-3.2.tar
if [ ! -f "$ARCHIVE" ]; then
  src=$CONCLAVE_CACHE/k8s-$K8S_VERSION/build/kubernetes-$K8S_VERSION/build/pause/linux/pause.c
  [ -f "$src" ] || die "missing $src: run e2e/cluster/build-k8s.sh"
  bin=$(mktemp -d)/pause
  gcc -Os -static -o "$bin" "$src" -DVERSION=3.2
  build_oci_image "$ARCHIVE" pause 3.2 "$bin" /pause 65535
  rm -rf "$(dirname "$bin")"
fi
import_image "$ARCHIVE" registry.k8s.io/pause
