#!/usr/bin/env bash
# The e2e stage of `make test`: cluster up, images, scenarios, cluster down,
# then a check that the cluster left nothing of ours running.
source "$(dirname "$0")/lib.sh"
require_root e2e-test

# A second `make test` on the same machine reuses a healthy cluster (up.sh is
# idempotent) but always ends with a full teardown and the leftovers check.
teardown() {
  local rc=$?
  local pids
  pids=$(cat "$CLUSTER_STATE"/pids/*.pid 2>/dev/null | tr '\n' ' ')
  timed cluster-down "$REPO_ROOT/e2e/cluster/down.sh"
  local left=()
  for p in $pids; do kill -0 "$p" 2>/dev/null && left+=("$p"); done
  if [ ${#left[@]} -gt 0 ]; then
    echo "FAILED: cluster-down left processes running: ${left[*]}" >&2
    rc=1
  else
    log "cluster-down left none of the ${pids:+$(wc -w <<<"$pids")} processes it started running"
  fi
  exit $rc
}
trap teardown EXIT

timed cluster-up "$REPO_ROOT/e2e/cluster/up.sh"
CONCLAVE_E2E=1 timed images "$REPO_ROOT/e2e/images.sh" "${TAG:-e2e}"
export KUBECONFIG=$KUBECONFIG_FILE CONCLAVE_IMAGE_TAG=${TAG:-e2e}
timed e2e-scenarios "$VENV/bin/python" -m pytest -v -p no:cacheprovider --durations=25 "$REPO_ROOT/e2e/tests" "$REPO_ROOT/e2e/scenarios" "$@"
# Last, as it kills the cluster: the next cluster-up must recover from that.
timed stale-state-recovery "$VENV/bin/python" -m pytest -v -p no:cacheprovider "$REPO_ROOT/e2e/recovery"
