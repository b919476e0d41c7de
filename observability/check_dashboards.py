#!/usr/bin/env python3
"""Run every query of every Conclave dashboard against a real Prometheus.

    check_dashboards.py http://127.0.0.1:9090 [--dir charts/conclave/dashboards]
        [--var namespace=conclave] [--var zone=zone-a] [--range 15m] [--step 15s] [--json]

Loads every dashboard JSON, takes each panel target's expr, substitutes the dashboard
variables ($datasource, $namespace, $zone: their "All" regex unless --var gives a value;
$__rate_interval, $__interval, $__range: Grafana-like values, overridable with --var),
runs it as a range query over the last --range, and exits 1 listing each query that
errors or returns no data, naming the metrics of that query Prometheus has no series of.
Queries whose every value is NaN (a histogram quantile with no observations in the
window) are listed as warnings: they have data, just nothing to show yet.
Exit codes: 0 all queries returned data, 1 some did not, 2 Prometheus unreachable.
"""
import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dashlib  # noqa: E402

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
            "bool", "offset", "inf", "nan", "atan2"}


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 15s, 10m, 1h)")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]


def metric_names(expr: str) -> set:
    """Metric names an expression selects (identifiers that are not functions, keywords,
    label names or durations)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", s):
        if m.group(2) or m.group(1).lower() in KEYWORDS:
            continue
        names.add(m.group(1))
    return names


def check(prom, dashboards, overrides, range_s, step_s):
    end = time.time()
    start = end - range_s
    results = []
    known = {}

    def has_series(name):
        if name not in known:
            try:
                known[name] = bool(prom.query_range(f"count({name})", start, end, step_s))
            except dashlib.PromError:
                known[name] = False
        return known[name]

    for fname, dash in dashboards.items():
        values = dashlib.variable_values(dash, overrides)
        for q in dashlib.queries(dash):
            entry = {"file": fname, "dashboard": q.dashboard, "panel": q.panel, "ref": q.ref,
                     "expr": q.expr}
            try:
                expr = dashlib.substitute(q.expr, values)
            except KeyError as e:
                entry.update(status="error", detail=str(e.args[0]))
                results.append(entry)
                continue
            entry["query"] = expr
            try:
                series = prom.query_range(expr, start, end, step_s)
            except dashlib.PromError as e:
                if "unreachable" in str(e):
                    raise
                entry.update(status="error", detail=str(e))
                results.append(entry)
                continue
            samples = [float(v) for s in series for _, v in s.get("values", [])]
            if not samples:
                missing = sorted(n for n in metric_names(expr) if not has_series(n))
                entry.update(status="empty", missing_metrics=missing,
                             detail="no data" + (f"; no series of {', '.join(missing)}" if missing else ""))
            elif all(math.isnan(v) for v in samples):
                entry.update(status="nan", detail="only NaN (no observations in the window)")
            else:
                entry.update(status="ok", series=len(series))
            results.append(entry)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--dir", type=Path, default=dashlib.DASHBOARD_DIR)
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="value of a dashboard variable (repeatable)")
    p.add_argument("--range", type=seconds, default=seconds("15m"), help="time range to query (default 15m)")
    p.add_argument("--step", type=seconds, default=seconds("15s"), help="query resolution (default 15s)")
    p.add_argument("--json", action="store_true", help="print every result as JSON lines")
    args = p.parse_args(argv)
    overrides = {}
    for v in args.var:
        name, sep, value = v.partition("=")
        if not sep:
            p.error(f"--var wants NAME=VALUE, got {v!r}")
        overrides[name] = value
    dashboards = dashlib.load(args.dir)
    if not dashboards:
        print(f"no dashboards in {args.dir}", file=sys.stderr)
        return 1
    try:
        results = check(dashlib.Prometheus(args.url), dashboards, overrides, args.range, args.step)
    except dashlib.PromError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = [r for r in results if r["status"] in ("error", "empty")]
    nan = [r for r in results if r["status"] == "nan"]
    if args.json:
        for r in results:
            print(json.dumps(r, sort_keys=True))
    else:
        for r in bad + nan:
            kind = "WARN" if r["status"] == "nan" else "FAIL"
            print(f"{kind} {r['file']} / {r['panel']} [{r['ref']}]: {r['detail']}\n     {r.get('query', r['expr'])}")
    print(f"{len(results)} queries in {len(dashboards)} dashboards: {len(results) - len(bad) - len(nan)} with data, "
          f"{len(nan)} only NaN, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
