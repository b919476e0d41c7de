#!/usr/bin/env python3
"""Writes a prometheus.yml for a plain Prometheus (Debian's package) that scrapes every
Conclave pod of a cluster the way the chart's PodMonitor does, and loads the alert rules.

    prometheus_config.py --kubeconfig ~/.cache/conclave/cluster/kubeconfig > prometheus.yml
    prometheus_config.py --static relay=127.0.0.1:9090,namespace=dev,zone=zone-a,pod=relay-0

--kubeconfig: Kubernetes pod discovery from outside the cluster (pod IPs must be routable
from where Prometheus runs, as on the local e2e cluster). --static (repeatable): one target
with its labels, for processes started on this machine. Both give the same labels:
namespace, pod, component (kms|relay|connector|operator) and zone.
"""
import argparse
import sys
from pathlib import Path

import yaml

RULES = Path(__file__).resolve().parent / "rules"

# Keep in step with charts/conclave/templates/podmonitor.yaml (the test compares them).
POD_RELABELS = [
    {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"], "regex": "conclave", "action": "keep"},
    {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "http", "action": "keep"},
    {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Pending|Running", "action": "keep"},
    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"], "target_label": "component"},
]

# Shared with the PodMonitor: a relay's zone is its MeetingZone (app.kubernetes.io/instance);
# a pod labelled conclave.dev/zone (connectors of a zone) takes that.
ZONE_RELABELS = [
    {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component",
                       "__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
     "regex": "relay;(.+)", "target_label": "zone", "replacement": "$1"},
    {"source_labels": ["__meta_kubernetes_pod_label_conclave_dev_zone"], "regex": "(.+)",
     "target_label": "zone", "replacement": "$1"},
]


def config(kubeconfig=None, static=(), interval="15s", rules=True):
    scrape = []
    if kubeconfig:
        scrape.append({
            "job_name": "conclave-pods",
            "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(kubeconfig)}],
            "relabel_configs": POD_RELABELS + ZONE_RELABELS,
        })
    for i, spec in enumerate(static):
        labels = dict(kv.split("=", 1) for kv in spec.split(","))
        component = next((k for k in ("kms", "relay", "connector", "operator") if k in labels), None)
        if component is None:
            raise ValueError(f"--static {spec!r}: name the component, e.g. relay=127.0.0.1:9090")
        target = labels.pop(component)
        scrape.append({"job_name": f"conclave-static-{i}",
                       "static_configs": [{"targets": [target], "labels": {"component": component, **labels}}]})
    cfg = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
           "scrape_configs": scrape}
    if rules:
        cfg["rule_files"] = [str(p) for p in sorted(RULES.glob("*.yaml"))]
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeconfig", type=Path)
    p.add_argument("--static", action="append", default=[])
    p.add_argument("--interval", default="15s", help="scrape and rule evaluation interval")
    p.add_argument("--no-rules", action="store_true")
    args = p.parse_args(argv)
    if not args.kubeconfig and not args.static:
        p.error("give --kubeconfig or --static")
    try:
        cfg = config(args.kubeconfig, args.static, args.interval, not args.no_rules)
    except ValueError as e:
        p.error(str(e))
    yaml.safe_dump(cfg, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
