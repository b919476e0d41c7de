#!/usr/bin/env bash
# Generated files must match the code they come from: crds/ and the chart's
# copy are regenerated into a temporary directory and compared.
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo run -q -p operator --bin crdgen -- "$tmp/crds" "$tmp/chart-crds"
status=0
for pair in "crds:$tmp/crds" "charts/conclave/crds:$tmp/chart-crds"; do
  committed=${pair%%:*} fresh=${pair#*:}
  if ! diff -ru "$committed" "$fresh" >"$tmp/diff" 2>&1; then
    echo "error: $committed/ is out of date with the operator's types; run 'make crds' and commit:" >&2
    head -40 "$tmp/diff" >&2
    status=1
  fi
done
[ $status -eq 0 ] && log "crds/ and charts/conclave/crds/ match the operator's types"
exit $status
