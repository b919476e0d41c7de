#!/usr/bin/env bash
# The chart, dashboard and alert-rule tests: the real Helm engine, promtool and
# a real Prometheus (charts/conclave/tests, observability/tests). Extra
# arguments go to pytest (e.g. -k dashboards).
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider charts/conclave/tests observability/tests "$@"
