#!/usr/bin/env bash
# `make demo-down`: undoes `make demo`. On the local cluster that is the whole
# cluster; on a cluster KUBECONFIG points at, only what the demo installed.
source "$(dirname "$0")/lib.sh"

if [ -n "${KUBECONFIG:-}" ] && [ "$KUBECONFIG" != "$KUBECONFIG_FILE" ] && kubectl get --raw /readyz >/dev/null 2>&1; then
  log "removing the demo from the cluster KUBECONFIG points at ($KUBECONFIG)"
  CONCLAVE_DEMO_EXTERNAL=1 "$VENV/bin/python" "$REPO_ROOT/e2e/scenarios/demo.py" --down
else
  bash "$REPO_ROOT/e2e/cluster/down.sh"
fi
