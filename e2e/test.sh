#!/usr/bin/env bash
# `make test`: everything CI runs, in the order that fits two cores.
#
# The e2e scenarios spend most of their twenty minutes waiting on the cluster,
# while clippy, the unit, fuzz and chart tests want the CPU and no cluster. So:
#   1. formatting, then what the e2e stage needs built, side by side:
#      Kubernetes (once per version) and the images' static release binaries;
#   2. the e2e stage in the background (cluster up, images imported, scenarios,
#      cluster down), its output kept in target/e2e-test.log;
#   3. meanwhile clippy, the unit tests, fuzzing and the chart tests, in the
#      foreground and niced, each building what it needs;
#   4. the e2e output, printed once it is done, so the two never interleave.
# Every stage of 3 runs even when another failed; the exit status is non-zero
# when any stage failed. `make check`, `make unit-test`, `make e2e-test`, ...
# run one stage alone.
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

E2E_LOG=$REPO_ROOT/target/e2e-test.log
mkdir -p "$(dirname "$E2E_LOG")"

timed format cargo fmt --all -- --check || exit 1
# Side by side: each build has long single-threaded stretches (Go's linker,
# rustc on the last crates) in which the other can use the second core.
timed kubernetes-binaries bash e2e/cluster/build-k8s.sh &
k8s_pid=$!
images_rc=0
CONCLAVE_E2E=1 timed image-binaries bash e2e/images.sh --binaries-only || images_rc=$?
k8s_rc=0
wait "$k8s_pid" || k8s_rc=$?
[ "$images_rc" -eq 0 ] && [ "$k8s_rc" -eq 0 ] || exit 1

log "e2e stage started in the background; its output follows the other stages (live: $E2E_LOG)"
CONCLAVE_BINARIES_BUILT=1 bash e2e/run-e2e.sh >"$E2E_LOG" 2>&1 &
e2e_pid=$!
# Interrupted: the e2e stage's own exit trap brings its cluster down.
trap 'kill -TERM "$e2e_pid" 2>/dev/null; wait "$e2e_pid"; exit 130' INT TERM

# At a lower priority than the cluster and its pods, whose timing the e2e
# scenarios watch; these stages only want throughput.
failed=()
# Clippy lints our crates while they are built for the tests, the way
# `cargo clippy` does for `cargo check` (clippy-driver as the workspace's rustc
# wrapper), so the dependencies are compiled once rather than once checked for
# clippy and once built (a cold clippy alone took 270 s here).
lint=(env RUSTC_WORKSPACE_WRAPPER="$(rustc --print sysroot)/bin/clippy-driver"
      CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__)
timed clippy-and-build nice "${lint[@]}" cargo build --workspace --all-targets || failed+=(clippy-and-build)
timed unit-test nice "${lint[@]}" cargo nextest run --workspace --no-fail-fast || failed+=(unit-test)
timed fuzz nice bash e2e/fuzz.sh || failed+=(fuzz)
timed chart-test nice bash e2e/chart-test.sh || failed+=(chart-test)

log "waiting for the e2e stage"
e2e_rc=0
wait "$e2e_pid" || e2e_rc=$?
trap - INT TERM
echo "----- e2e stage (target/e2e-test.log) -----"
cat "$E2E_LOG"
echo "----- end of e2e stage -----"
[ "$e2e_rc" -eq 0 ] || failed+=(e2e-test)

if [ ${#failed[@]} -gt 0 ]; then
  log "make test FAILED: ${failed[*]}"
  exit 1
fi
log "make test passed: format, clippy-and-build, unit-test, fuzz, chart-test, e2e-test"
