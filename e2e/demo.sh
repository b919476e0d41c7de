#!/usr/bin/env bash
# `make demo`: local cluster (or the cluster KUBECONFIG points at), Conclave
# images, the chart, the examples and a short meeting with a recorder, then a
# summary of what happened. The cluster is left running so you can look
# around; `make demo-down` removes it.
source "$(dirname "$0")/lib.sh"

start=$SECONDS
if [ -n "${KUBECONFIG:-}" ] && [ "$KUBECONFIG" != "$KUBECONFIG_FILE" ] && kubectl get --raw /readyz >/dev/null 2>&1; then
  log "using the cluster KUBECONFIG points at ($KUBECONFIG): images conclave/*:${TAG:?set TAG to the image tag your cluster can pull (make images TAG=... REGISTRY=...)} must be pullable there"
  # demo.py then skips what needs this host to be the cluster's node (the recording's hostPath volume).
  export CONCLAVE_DEMO_EXTERNAL=1
else
  log "bringing up the local Kubernetes cluster (the first run builds Kubernetes from Debian's source: several minutes)"
  timed cluster-up "$REPO_ROOT/e2e/cluster/up.sh"
  export KUBECONFIG=$KUBECONFIG_FILE
  TAG=${TAG:-demo}
  log "building Conclave's images (static Rust binaries; the first build takes minutes)"
  timed images "$REPO_ROOT/e2e/images.sh" "$TAG"
fi
export CONCLAVE_IMAGE_TAG=$TAG
timed demo "$VENV/bin/python" "$REPO_ROOT/e2e/scenarios/demo.py"
log "make demo took $((SECONDS - start)) s; Conclave is still running: export KUBECONFIG=$KUBECONFIG; kubectl get conclave -A"
