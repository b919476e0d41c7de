#!/usr/bin/env bash
# `make demo`: local cluster (or the cluster KUBECONFIG points at), Conclave
# images, the chart, the examples and a short meeting. The cluster is left
# running so you can look around; `make cluster-down` removes it.
source "$(dirname "$0")/lib.sh"

if [ -n "${KUBECONFIG:-}" ] && [ "$KUBECONFIG" != "$KUBECONFIG_FILE" ] && kubectl get --raw /readyz >/dev/null 2>&1; then
  log "using the cluster KUBECONFIG points at ($KUBECONFIG): images conclave/*:${TAG:?set TAG to the image tag your cluster can pull (make images TAG=... REGISTRY=...)} must be pullable there"
else
  timed cluster-up "$REPO_ROOT/e2e/cluster/up.sh"
  export KUBECONFIG=$KUBECONFIG_FILE
  TAG=${TAG:-demo}
  timed images "$REPO_ROOT/e2e/images.sh" "$TAG"
fi
export CONCLAVE_IMAGE_TAG=$TAG
timed demo "$VENV/bin/python" "$REPO_ROOT/e2e/scenarios/demo.py"
log "Conclave is running: export KUBECONFIG=$KUBECONFIG; kubectl get conclave -A"
log "'make cluster-down' removes the local cluster and everything in it"
