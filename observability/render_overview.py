#!/usr/bin/env python3
"""Draw what the main Conclave dashboards show, from the same queries against a real
Prometheus, as PNG files (there is no Grafana server here; the pictures go in the README).

    ~/.cache/conclave/venv/bin/python observability/render_overview.py http://127.0.0.1:9090 \
        [--dashboards overview,relays,kms] [--out-dir docs/img] [--range 30m] [--step 15s] \
        [--var namespace=conclave]

Each panel is placed where its gridPos puts it in Grafana; stat panels show their last
value, time series panels their lines with Grafana's legend format. A query that fails or
returns nothing is drawn as "no data" (check_dashboards.py is the tool that fails on it).
Writes <out-dir>/<dashboard>.png and prints each path.
"""
import argparse
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dashlib  # noqa: E402
from check_dashboards import seconds  # noqa: E402

UNIT_SCALES = [(1e9, "G"), (1e6, "M"), (1e3, "k")]


def fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "NaN"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "s":
        if abs(value) >= 86400:
            return f"{value / 86400:.1f} d"
        if abs(value) >= 3600:
            return f"{value / 3600:.1f} h"
        if abs(value) >= 1 or value == 0:
            return f"{value:.2f} s"
        if abs(value) >= 1e-3:
            return f"{value * 1e3:.2f} ms"
        return f"{value * 1e6:.1f} µs"
    suffix = {"bytes": "B", "Bps": "B/s", "pps": " p/s", "ops": " /s", "reqps": " req/s"}.get(unit, "")
    for scale, prefix in UNIT_SCALES:
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{suffix.strip()}"
    return f"{value:.3g}{suffix}"


def fetch(prom, dash, overrides, start, end, step):
    values = dashlib.variable_values(dash, overrides)
    panels = []
    for panel in dash["panels"]:
        series = []
        for target in panel.get("targets", []):
            try:
                result = prom.query_range(dashlib.substitute(target["expr"], values), start, end, step)
            except (dashlib.PromError, KeyError):
                result = []
            for s in result:
                points = [(float(t), float(v)) for t, v in s["values"]]
                series.append((dashlib.legend_of(target.get("legendFormat", ""), s["metric"]), points))
        panels.append((panel, series))
    return panels


def draw(dash, panels, path: Path, start: float, end: float):
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p, _ in panels)
    unit_in = 0.42  # inches per Grafana grid unit (24 across, rows down)
    top = 1.2       # room for the dashboard title, in grid units
    fig = plt.figure(figsize=(24 * unit_in * 1.6, (rows + top) * unit_in), dpi=90)
    fig.text(0.005, 1 - 0.4 / (rows + top),
             f"{dash['title']}   {datetime.fromtimestamp(start):%Y-%m-%d %H:%M} - {datetime.fromtimestamp(end):%H:%M}",
             fontsize=15, va="center")
    for panel, series in panels:
        g = panel["gridPos"]
        # Inside each grid cell, leave room for the title above and the tick labels below.
        left = (g["x"] + 1.1) / 24
        width = (g["w"] - 1.35) / 24
        bottom = 1 - (g["y"] + g["h"] + top - 0.8) / (rows + top)
        height = (g["h"] - 1.9) / (rows + top)
        ax = fig.add_axes([left, bottom, width, height])
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_title(panel["title"], fontsize=10, loc="left")
        values = [v for _, pts in series for _, v in pts]
        if not values or all(math.isnan(v) for v in values):
            ax.text(0.5, 0.5, "no data" if not values else "no observations", ha="center", va="center",
                    color="grey", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        if panel["type"] == "stat":
            lasts = [next((v for _, v in reversed(pts) if not math.isnan(v)), math.nan) for _, pts in series]
            text = "  ".join(fmt(v, unit) for v in lasts[:3])
            ax.text(0.5, 0.4, text, ha="center", va="center", fontsize=20, weight="bold",
                    color="#2a7", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        for label, pts in series[:12]:
            xs = [datetime.fromtimestamp(t) for t, _ in pts]
            ax.plot(xs, [v for _, v in pts], label=label, linewidth=1.2)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_formatter(matplotlib.dates.DateFormatter("%H:%M" if end - start > 900 else "%H:%M:%S"))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _, unit=unit: fmt(v, unit)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", ncol=3, frameon=False)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("--dir", type=Path, default=dashlib.DASHBOARD_DIR)
    p.add_argument("--dashboards", default="overview,relays,kms",
                   help="comma-separated file names without .json (default overview,relays,kms)")
    p.add_argument("--out-dir", type=Path, default=Path("."))
    p.add_argument("--range", type=seconds, default=seconds("30m"))
    p.add_argument("--step", type=seconds, default=seconds("15s"))
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE")
    args = p.parse_args(argv)
    overrides = dict(v.split("=", 1) for v in args.var)
    dashboards = dashlib.load(args.dir)
    prom = dashlib.Prometheus(args.url)
    end = time.time()
    start = end - args.range
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for stem in args.dashboards.split(","):
        dash = dashboards.get(f"{stem}.json")
        if dash is None:
            print(f"error: no dashboard {stem}.json in {args.dir}", file=sys.stderr)
            return 1
        try:
            prom.query("vector(1)", end)
        except dashlib.PromError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        out = args.out_dir / f"{stem}.png"
        draw(dash, fetch(prom, dash, overrides, start, end, args.step), out, start, end)
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
