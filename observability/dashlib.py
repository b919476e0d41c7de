"""What check_dashboards.py and render_overview.py share: reading the dashboards the chart
ships, substituting Grafana's variables the way Grafana would, and asking a Prometheus HTTP
API for the result. Standard library only."""
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = REPO / "charts" / "conclave" / "dashboards"

# Grafana's built-in interval variables, with the values a dashboard showing the last hour at
# a 15 s scrape interval would give them ($__rate_interval is at least four scrape intervals).
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


@dataclass
class Query:
    dashboard: str
    panel: str
    ref: str
    expr: str
    legend: str
    panel_type: str
    unit: str


def load(directory: Path = DASHBOARD_DIR) -> dict:
    """File name -> dashboard JSON, for every *.json in the directory."""
    return {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def variables(dashboard: dict) -> list:
    return dashboard.get("templating", {}).get("list", [])


def queries(dashboard: dict) -> list:
    out = []
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            out.append(Query(dashboard.get("uid", ""), panel.get("title", ""), target.get("refId", ""),
                             target.get("expr", ""), target.get("legendFormat", ""), panel.get("type", ""),
                             panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")))
    return out


def variable_values(dashboard: dict, overrides: dict) -> dict:
    """Value of every variable: an override (also for the built-ins such as $__rate_interval),
    else the "All" value of a multi-value variable (a regex, as Grafana substitutes it), else
    the variable's current value."""
    values = dict(BUILTINS)
    for v in variables(dashboard):
        name = v["name"]
        if name in overrides:
            values[name] = overrides[name]
        elif v.get("type") == "datasource":
            values[name] = overrides.get("datasource", "prometheus")
        elif v.get("includeAll"):
            values[name] = v.get("allValue") or ".*"
        else:
            current = v.get("current", {}).get("value", "")
            values[name] = current[0] if isinstance(current, list) and current else str(current)
    values.update(overrides)
    return values


def substitute(expr: str, values: dict) -> str:
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"unknown variable ${name}")
        return values[name]
    return VAR_RE.sub(repl, expr)


def label_names_used(expr: str) -> set:
    """Label names an expression groups by, filters on or matches: by(...)/without(...)
    lists and selector matchers."""
    names = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        names.update(n.strip() for n in group.split(",") if n.strip())
    names.update(re.findall(r"[{,]\s*(\w+)\s*(?:=~|!~|!=|=)", expr))
    return names


def legend_labels(legend: str) -> set:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend or ""))


class PromError(Exception):
    pass


class Prometheus:
    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, params: dict) -> dict:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:
            try:
                body = json.load(e)
            except ValueError:
                raise PromError(f"HTTP {e.code} from {path}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise PromError(f"{self.url} unreachable: {e}") from None
        if body.get("status") != "success":
            raise PromError(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list:
        """Matrix result: [{"metric": {...}, "values": [[t, "v"], ...]}, ...]."""
        return self._get("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step})["result"]

    def query(self, expr: str, at: float) -> list:
        return self._get("/api/v1/query", {"query": expr, "time": at})["result"]


def legend_of(legend: str, metric: dict) -> str:
    if not legend or legend == "__auto":
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
        return f"{{{inner}}}" if inner else "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), legend)
