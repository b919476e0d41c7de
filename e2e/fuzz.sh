#!/usr/bin/env bash
# Short libFuzzer run of every fuzz target (meeting-proto, kms-node and
# connector-node), on the stable toolchain: the targets are built with
# libfuzzer-sys and rustc's stable SanitizerCoverage flags (what cargo-fuzz
# passes with `-s none`), so neither nightly nor cargo-fuzz is needed.
# Rust's own checks (bounds, overflow, debug assertions, panics) are the
# oracle; there is no AddressSanitizer on stable.
#
# Usage:
#   e2e/fuzz.sh                         every target, FUZZ_SECONDS (5) each
#   e2e/fuzz.sh meeting-proto           one crate's targets
#   e2e/fuzz.sh kms-node join_token     one target
#   FUZZ_SECONDS=600 e2e/fuzz.sh ...    longer runs (corpora keep growing
#                                       across runs, so repeated short runs add up)
#   FUZZ_JOBS=2 FUZZ_SECONDS=3600 e2e/fuzz.sh meeting-proto wire_packet
#                                       several libFuzzer workers on one target
#   FUZZ_ARGS="-max_len=1500" e2e/fuzz.sh   extra libFuzzer flags
#
# Corpora:   $CONCLAVE_CACHE/fuzz/corpus/<crate>/<target>/ (seeded from
#            <crate>/fuzz/seeds/<target>/ when that exists)
# Crashes:   $CONCLAVE_CACHE/fuzz/artifacts/<crate>/<target>/crash-*; the
#            script fails and prints the command that reproduces each one.
# Builds:    $CONCLAVE_CACHE/fuzz/target (instrumented; kept apart from the
#            normal builds). Idempotent: a warm run only fuzzes.
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

CACHE=${CONCLAVE_CACHE:-$HOME/.cache/conclave}/fuzz
SECONDS_EACH=${FUZZ_SECONDS:-5}
JOBS=${FUZZ_JOBS:-1}
HOST=$(rustc -vV | sed -n 's/^host: //p')
CRATES=(meeting-proto kms-node connector-node)
only_crate=${1:-}
only_target=${2:-}

export CARGO_TARGET_DIR="$CACHE/target"
mkdir -p "$CACHE/logs"
# --target keeps these flags off build scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"

# The [[bin]] names of a crate's fuzz/Cargo.toml.
targets_of() {
  awk '/^\[\[bin\]\]/ { bin = 1; next } bin && /^name *=/ { gsub(/"/, "", $3); print $3; bin = 0 }' \
    "$1/fuzz/Cargo.toml"
}

failed=()
ran=0
for crate in "${CRATES[@]}"; do
  [[ -n $only_crate && $crate != "$only_crate" ]] && continue
  [[ -f $crate/fuzz/Cargo.toml ]] || die "$crate/fuzz/Cargo.toml is missing"
  log "fuzz: building $crate targets"
  cargo build --quiet --release --bins --target "$HOST" \
    --manifest-path "$crate/fuzz/Cargo.toml" || die "building $crate fuzz targets failed"
  for target in $(targets_of "$crate"); do
    [[ -n $only_target && $target != "$only_target" ]] && continue
    bin="$CARGO_TARGET_DIR/$HOST/release/$target"
    corpus="$CACHE/corpus/$crate/$target"
    artifacts="$CACHE/artifacts/$crate/$target"
    mkdir -p "$corpus" "$artifacts"
    seeds=()
    [[ -d $crate/fuzz/seeds/$target ]] && seeds=("$crate/fuzz/seeds/$target")
    log "fuzz: $crate/$target for ${SECONDS_EACH}s"
    out="$CACHE/logs/$crate-$target.log"
    parallel=()
    (( JOBS > 1 )) && parallel=(-jobs="$JOBS" -workers="$JOBS")
    # Run from the cache: libFuzzer may write fuzz-N.log files to the cwd.
    if (cd "$CACHE/logs" && "$bin" -max_total_time="$SECONDS_EACH" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 "${parallel[@]}" ${FUZZ_ARGS:-} \
        -artifact_prefix="$artifacts/" "$corpus" "${seeds[@]/#/$REPO_ROOT/}") >"$out" 2>&1; then
      sed -n 's/^stat::number_of_executed_units: */  executions: /p' "$out" | tail -1 >&2
    else
      failed+=("$crate/$target")
      tail -n 25 "$out" >&2
      for f in $(ls -t "$artifacts" | head -5); do
        echo "fuzz: $crate/$target crashed; reproduce with: $bin $artifacts/$f" >&2
      done
    fi
    ran=$((ran + 1))
  done
done

(( ran > 0 )) || die "no fuzz target matched ${only_crate:-*}/${only_target:-*}"
if (( ${#failed[@]} )); then
  echo "fuzz: FAILED: ${failed[*]} (reproducers above; inputs under $CACHE/artifacts)" >&2
  exit 1
fi
log "fuzz: $ran targets ran ${SECONDS_EACH}s each without a crash"
