#!/usr/bin/env python3
"""Helm for Conclave without a helm binary: the real Helm v4 engine through
helm-python-sdk. Used by the e2e scenarios and by people.

    helm.py lint [--chart DIR] [--values FILE] [--set-json JSON]
    helm.py template [RELEASE] [--chart DIR] [--values FILE] [--set-json JSON] [--namespace NS]
    helm.py install|upgrade RELEASE [--chart DIR] [--values FILE] [--set-json JSON] [--namespace NS]
    helm.py uninstall RELEASE [--namespace NS]
    helm.py status RELEASE [--namespace NS]

--chart defaults to charts/conclave; --values and --set-json may repeat and
merge in order. The cluster comes from --kubeconfig, then
$KUBECONFIG, then the local e2e cluster's kubeconfig.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CHART = REPO / "charts" / "conclave"


def local_kubeconfig() -> str:
    cache = os.environ.get("CONCLAVE_CACHE", str(Path.home() / ".cache" / "conclave"))
    state = os.environ.get("CLUSTER_STATE", f"{cache}/cluster")
    return f"{state}/kubeconfig"


def values_from(args) -> dict:
    values: dict = {}
    for f in args.values or []:
        values = deep_merge(values, yaml.safe_load(Path(f).read_text()) or {})
    for j in args.set_json or []:
        values = deep_merge(values, json.loads(j))
    return values


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config(args) -> helm.Config:
    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG") or local_kubeconfig()
    if not Path(kubeconfig).exists():
        sys.exit(f"error: kubeconfig {kubeconfig} not found; run 'make cluster-up' or set KUBECONFIG")
    return helm.Config(kubeconfig_path=kubeconfig, namespace=args.namespace)


def lint(args) -> int:
    report = helm.lint(str(args.chart), values_from(args), strict=True, namespace=args.namespace)
    for m in report.get("messages", []):
        print(f"[{ {0: 'UNKNOWN', 1: 'INFO', 2: 'WARNING', 3: 'ERROR'}.get(m['severity'], m['severity'])}] {m['path']}: {m['error']}")
    errors = [m for m in report.get("messages", []) if m["severity"] >= 2] + report.get("errors", [])
    print(f"linted {report.get('total_charts_linted', 0)} chart(s), {len(errors)} problem(s)")
    return 1 if errors else 0


def template(args) -> int:
    rendered = helm.Chart.load(str(args.chart)).render(
        values_from(args), name=args.release or "conclave", namespace=args.namespace, is_install=True
    )
    for path in sorted(rendered):
        if rendered[path].strip():
            print(f"---\n# Source: {path}\n{rendered[path].strip()}")
    return 0


def install(args) -> int:
    cfg = config(args)
    chart = helm.Chart.load(str(args.chart))
    if args.command == "install":
        rel = cfg.install(chart, args.release, values_from(args), namespace=args.namespace,
                          create_namespace=True, wait="watcher", timeout=args.timeout)
    else:
        rel = cfg.upgrade(chart, args.release, values_from(args), namespace=args.namespace,
                          wait="watcher", timeout=args.timeout)
    print(f"{args.command}: release {rel['name']} revision {rel.get('version')} {rel.get('info', {}).get('status')}")
    return 0


def uninstall(args) -> int:
    config(args).uninstall(args.release, wait="watcher", timeout=args.timeout, ignore_not_found=True)
    print(f"uninstalled {args.release}")
    return 0


def status(args) -> int:
    rel = config(args).status(args.release)
    print(json.dumps({"name": rel["name"], "version": rel.get("version"), "status": rel.get("info", {}).get("status")}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["lint", "template", "install", "upgrade", "uninstall", "status"])
    p.add_argument("release", nargs="?")
    p.add_argument("--chart", type=Path, default=DEFAULT_CHART)
    p.add_argument("--namespace", "-n", default="conclave-system")
    p.add_argument("--values", "-f", action="append")
    p.add_argument("--set-json", action="append")
    p.add_argument("--kubeconfig")
    p.add_argument("--timeout", type=int, default=300)
    args = p.parse_args()
    if args.command in ("install", "upgrade", "uninstall", "status") and not args.release:
        p.error(f"{args.command} needs a RELEASE name")
    try:
        return {"lint": lint, "template": template, "install": install, "upgrade": install,
                "uninstall": uninstall, "status": status}[args.command](args)
    except helm.HelmError as e:
        print(f"helm {args.command} failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
