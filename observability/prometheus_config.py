#!/usr/bin/env python3
"""A plain Prometheus (Debian's package) watching Conclave: its config, and the list of pods
to scrape.

    prometheus_config.py config --file-sd /tmp/conclave-targets.json > prometheus.yml
    prometheus_config.py targets --out /tmp/conclave-targets.json [--kubeconfig K]
    prometheus_config.py config --static relay=127.0.0.1:9090,namespace=dev,zone=zone-a,pod=relay-0

Debian builds Prometheus without Kubernetes service discovery, so `targets` asks the API
server for the Conclave pods (kubectl) and writes them as a file_sd list that Prometheus
re-reads by itself; run it again whenever pods change (e2e: after each rollout, or in a
loop). A deleted pod stays listed until then, and shows as down.
`config --kubernetes-sd KUBECONFIG` is the same job for a Prometheus built with it.
All three give each target the labels the dashboards and alerts use, the same ones the
chart's PodMonitor gives: namespace, pod, component (kms|relay|connector|operator), zone.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

RULES = Path(__file__).resolve().parent / "rules"
COMPONENTS = ("kms", "relay", "connector", "operator")

# Kubernetes SD relabeling. Keep in step with charts/conclave/templates/podmonitor.yaml and
# pod_targets() below (the tests compare them).
POD_RELABELS = [
    {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"], "regex": "conclave", "action": "keep"},
    {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "http", "action": "keep"},
    {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Pending|Running", "action": "keep"},
    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"], "target_label": "component"},
]

# A relay's zone is its MeetingZone (app.kubernetes.io/instance); a pod labelled
# conclave.dev/zone (connectors of a zone, once the operator sets it) takes that.
ZONE_RELABELS = [
    {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component",
                       "__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
     "regex": "relay;(.+)", "target_label": "zone", "replacement": "$1"},
    {"source_labels": ["__meta_kubernetes_pod_label_conclave_dev_zone"], "regex": "(.+)",
     "target_label": "zone", "replacement": "$1"},
]


def zone_of(labels: dict) -> str:
    if labels.get("conclave.dev/zone"):
        return labels["conclave.dev/zone"]
    if labels.get("app.kubernetes.io/component") == "relay":
        return labels.get("app.kubernetes.io/instance", "")
    return ""


def pod_targets(pods: dict) -> list:
    """file_sd entries for a `kubectl get pods -o json` list: every Pending/Running pod
    labelled app.kubernetes.io/name=conclave with an IP and a container port named http."""
    out = []
    for pod in pods.get("items", []):
        meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
        labels = meta.get("labels", {})
        if labels.get("app.kubernetes.io/name") != "conclave" or status.get("phase") not in ("Pending", "Running"):
            continue
        if not status.get("podIP"):
            continue
        ports = [p["containerPort"] for c in spec.get("containers", []) for p in c.get("ports", [])
                 if p.get("name") == "http"]
        for port in ports:
            target_labels = {"namespace": meta["namespace"], "pod": meta["name"],
                             "component": labels.get("app.kubernetes.io/component", "")}
            zone = zone_of(labels)
            if zone:
                target_labels["zone"] = zone
            out.append({"targets": [f"{status['podIP']}:{port}"], "labels": target_labels})
    return sorted(out, key=lambda t: (t["labels"]["namespace"], t["labels"]["pod"]))


def write_atomically(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def config(kubernetes_sd=None, file_sd=None, static=(), interval="15s", rules=True):
    scrape = []
    if kubernetes_sd:
        scrape.append({"job_name": "conclave-pods",
                       "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(kubernetes_sd)}],
                       "relabel_configs": POD_RELABELS + ZONE_RELABELS})
    if file_sd:
        scrape.append({"job_name": "conclave-pods",
                       "file_sd_configs": [{"files": [str(file_sd)], "refresh_interval": "5s"}]})
    for i, spec in enumerate(static):
        labels = dict(kv.split("=", 1) for kv in spec.split(","))
        component = next((k for k in COMPONENTS if k in labels), None)
        if component is None:
            raise ValueError(f"--static {spec!r}: name the component, e.g. relay=127.0.0.1:9090")
        target = labels.pop(component)
        scrape.append({"job_name": f"conclave-static-{i}",
                       "static_configs": [{"targets": [target], "labels": {"component": component, **labels}}]})
    cfg = {"global": {"scrape_interval": interval, "evaluation_interval": interval}, "scrape_configs": scrape}
    if rules:
        cfg["rule_files"] = [str(p) for p in sorted(RULES.glob("*.yaml"))]
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("config", help="print prometheus.yml")
    c.add_argument("--file-sd", type=Path, help="targets file written by `targets`")
    c.add_argument("--kubernetes-sd", type=Path, metavar="KUBECONFIG", help="for a Prometheus built with it")
    c.add_argument("--static", action="append", default=[], help="component=host:port,label=value,...")
    c.add_argument("--interval", default="15s", help="scrape and rule evaluation interval")
    c.add_argument("--no-rules", action="store_true")
    t = sub.add_parser("targets", help="write the file_sd list of Conclave pods")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    t.add_argument("--kubectl", default="kubectl")
    args = p.parse_args(argv)
    if args.command == "config":
        if not (args.file_sd or args.kubernetes_sd or args.static):
            p.error("give --file-sd, --kubernetes-sd or --static")
        try:
            cfg = config(args.kubernetes_sd, args.file_sd, args.static, args.interval, not args.no_rules)
        except ValueError as e:
            p.error(str(e))
        yaml.safe_dump(cfg, sys.stdout, sort_keys=False)
        return 0
    cmd = [args.kubectl, "get", "pods", "--all-namespaces", "-l", "app.kubernetes.io/name=conclave", "-o", "json"]
    if args.kubeconfig:
        cmd[1:1] = ["--kubeconfig", args.kubeconfig]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        print(f"error: {' '.join(cmd)}: {r.stderr.strip()}", file=sys.stderr)
        return 1
    targets = pod_targets(json.loads(r.stdout))
    write_atomically(args.out, json.dumps(targets, indent=1) + "\n")
    print(f"{len(targets)} targets -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
