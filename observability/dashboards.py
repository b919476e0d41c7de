#!/usr/bin/env python3
"""Source of the Grafana dashboards the chart ships (charts/conclave/dashboards/*.json).

    python3 observability/dashboards.py          # rewrite the JSON files
    python3 observability/dashboards.py --check  # exit 1 if a JSON file is not what this writes

Panels are declared here once, so every dashboard has the same variables (datasource,
namespace, zone), the same datasource reference and the same layout rules; the JSON is
generated and committed so the chart needs nothing but its own files.

Labels the queries rely on (set by the chart's PodMonitor and by
observability/prometheus/scrape-conclave.yaml): namespace, pod, component (kms|relay|
connector) and zone (relays: their MeetingZone). Certificates carry the namespace of their
Secret as `exported_namespace`, because the operator's own target already has `namespace`.
"""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "charts" / "conclave" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
# Denial reasons of requests refused with 429 (kms-node DENIAL_REASONS, load shedding).
SHED = "rate_limited|overloaded|too_many_failures"

NS = 'namespace=~"$namespace"'
RELAY = f'{NS}, zone=~"$zone"'
CONN = f'{NS}, zone=~"$zone"'


def var_datasource():
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []}


def var_query(name, label, query, all_value=".*"):
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
        "refresh": 2, "multi": True, "includeAll": True, "allValue": all_value,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1, "hide": 0, "regex": "", "options": [],
    }


NAMESPACE_VAR = var_query("namespace", "Namespace", 'label_values(up{component=~"kms|relay|connector"}, namespace)')
ZONE_VAR = var_query("zone", "Zone", 'label_values(up{component="relay", namespace=~"$namespace"}, zone)')


def t(expr, legend="__auto"):
    return {"expr": expr, "legendFormat": legend}


def stat(title, unit, *targets, desc="", w=4):
    return {"type": "stat", "title": title, "unit": unit, "targets": list(targets), "description": desc, "w": w, "h": 4}


def ts(title, unit, *targets, desc="", w=12, stack=False):
    return {"type": "timeseries", "title": title, "unit": unit, "targets": list(targets),
            "description": desc, "w": w, "h": 8, "stack": stack}


def quantiles(metric, sel, by="", qs=(0.5, 0.9, 0.99)):
    group = f"le{', ' + by if by else ''}"
    legend_by = f"{{{{{by}}}}} " if by else ""
    return [t(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[{RATE}])))",
              f"{legend_by}p{int(q * 100)}") for q in qs]


def overview():
    up_relay = f'up{{component="relay", {RELAY}}}'
    return "conclave-overview", "Conclave / Fleet overview", [NAMESPACE_VAR, ZONE_VAR], [
        stat("Zones", "short", t(f"count(count by (namespace, zone) ({up_relay}))", "zones"),
             desc="MeetingZones with at least one relay target."),
        stat("Relays up", "short", t(f"sum({up_relay})", "up")),
        stat("Relays down", "short", t(f"sum(1 - {up_relay})", "down")),
        stat("KMS pods up", "short", t(f'sum(up{{component="kms", {NS}}})', "up")),
        stat("Connector pods up", "short", t(f'sum(up{{component="connector", {NS}}})', "up")),
        stat("Meetings now", "short", t(f"sum(conclave_kms_active_meetings{{{NS}}})", "meetings"),
             desc="Meetings with at least one member, as the KMS sees them."),
        ts("Participants by zone", "short",
           t(f"sum by (namespace, zone) (conclave_relay_participants{{{RELAY}}})", "{{namespace}}/{{zone}}"),
           desc="Bound participants on the relays of each zone.", w=8),
        ts("Meetings by zone", "short",
           t(f"sum by (namespace, zone) (conclave_relay_meetings{{{RELAY}}})", "{{namespace}}/{{zone}}"), w=8),
        ts("Relays up by zone", "short",
           t(f"sum by (namespace, zone) ({up_relay})", "{{namespace}}/{{zone}}"), w=8),
        ts("Media packets/s by zone", "pps",
           t(f"sum by (namespace, zone) (rate(conclave_relay_packets_received_total{{{RELAY}}}[{RATE}]))",
             "{{namespace}}/{{zone}} in"),
           t(f"sum by (namespace, zone) (rate(conclave_relay_packets_sent_total{{{RELAY}}}[{RATE}]))",
             "{{namespace}}/{{zone}} out"), w=8),
        ts("KMS: relays heartbeating", "short",
           t(f"sum by (namespace) (conclave_kms_live_relays{{{NS}}})", "{{namespace}}"),
           desc="Relays the KMS can place meetings on.", w=8),
        ts("KMS: key releases/s", "ops",
           t(f"sum by (namespace) (rate(conclave_kms_key_releases_total{{{NS}}}[{RATE}]))", "{{namespace}}"), w=8),
        ts("Connectors: live phone legs and streams", "short",
           t(f"sum by (namespace) (conclave_connector_phone_legs_active{{{CONN}}})", "{{namespace}} phone legs"),
           t(f"sum by (namespace) (conclave_connector_ffmpeg_running{{{CONN}}})", "{{namespace}} streams"), w=12),
        ts("Scrape targets up by component", "short",
           t(f'sum by (component) (up{{component=~"kms|relay|connector", {NS}}})', "{{component}}"), w=12),
    ]


def relays():
    return "conclave-relays", "Conclave / Relays", [NAMESPACE_VAR, ZONE_VAR], [
        stat("Participants", "short", t(f"sum(conclave_relay_participants{{{RELAY}}})", "participants")),
        stat("Meetings", "short", t(f"sum(conclave_relay_meetings{{{RELAY}}})", "meetings")),
        stat("Packets/s in", "pps", t(f"sum(rate(conclave_relay_packets_received_total{{{RELAY}}}[{RATE}]))", "in")),
        stat("Packets/s out", "pps", t(f"sum(rate(conclave_relay_packets_sent_total{{{RELAY}}}[{RATE}]))", "out")),
        stat("Drops/s", "pps", t(f"sum(rate(conclave_relay_dropped_packets_total{{{RELAY}}}[{RATE}]))", "drops")),
        stat("Draining", "short", t(f"sum(conclave_relay_draining{{{RELAY}}})", "draining"),
             desc="Relays draining before shutdown."),
        ts("Packets/s in by kind", "pps",
           t(f"sum by (kind) (rate(conclave_relay_packets_received_total{{{RELAY}}}[{RATE}]))", "{{kind}}")),
        ts("Packets/s out by kind", "pps",
           t(f"sum by (kind) (rate(conclave_relay_packets_sent_total{{{RELAY}}}[{RATE}]))", "{{kind}}")),
        ts("Bytes/s in and out", "Bps",
           t(f"sum(rate(conclave_relay_received_bytes_total{{{RELAY}}}[{RATE}]))", "in"),
           t(f"sum(rate(conclave_relay_sent_bytes_total{{{RELAY}}}[{RATE}]))", "out")),
        ts("Fan-out (copies per forwarded datagram)", "short",
           t(f"sum(rate(conclave_relay_fanout_sum{{{RELAY}}}[{RATE}])) / sum(rate(conclave_relay_fanout_count{{{RELAY}}}[{RATE}]))", "mean"),
           *quantiles("conclave_relay_fanout", RELAY, qs=(0.99,))),
        ts("Drops/s by reason", "pps",
           t(f"sum by (reason) (rate(conclave_relay_dropped_packets_total{{{RELAY}}}[{RATE}]))", "{{reason}}"),
           stack=True),
        ts("Forwarding latency", "s", *quantiles("conclave_relay_forwarding_latency_seconds", RELAY),
           desc="From receiving a media datagram to handing its last copy to the kernel."),
        ts("Load per relay: packets/s in", "pps",
           t(f"sum by (pod) (rate(conclave_relay_packets_received_total{{{RELAY}}}[{RATE}]))", "{{pod}}"), w=8),
        ts("Load per relay: participants", "short",
           t(f"sum by (pod) (conclave_relay_participants{{{RELAY}}})", "{{pod}}"), w=8),
        ts("Socket errors/s", "ops",
           t(f"sum by (pod, op) (rate(conclave_relay_socket_errors_total{{{RELAY}}}[{RATE}]))", "{{pod}} {{op}}"), w=8),
        ts("CPU per relay", "percentunit",
           t(f'sum by (pod) (rate(process_cpu_seconds_total{{component="relay", {RELAY}}}[{RATE}]))', "{{pod}}"),
           desc="Cores used (process_cpu_seconds_total)."),
        ts("Memory per relay", "bytes",
           t(f'sum by (pod) (process_resident_memory_bytes{{component="relay", {RELAY}}})', "{{pod}}")),
    ]


def kms():
    return "conclave-kms", "Conclave / KMS", [NAMESPACE_VAR], [
        stat("KMS ready", "short", t(f"sum(conclave_kms_ready{{{NS}}})", "ready"),
             desc="KMS pods whose store and audit log are open and whose API is serving."),
        stat("Active meetings", "short", t(f"sum(conclave_kms_active_meetings{{{NS}}})", "meetings")),
        stat("Relays heartbeating", "short", t(f"sum(conclave_kms_live_relays{{{NS}}})", "relays"), w=3),
        stat("Key releases/s", "ops", t(f"sum(rate(conclave_kms_key_releases_total{{{NS}}}[{RATE}]))", "releases"), w=3),
        stat("Denials/s", "ops", t(f"sum(rate(conclave_kms_denials_total{{{NS}}}[{RATE}]))", "denials"), w=3),
        stat("Store size", "bytes", t(f"sum(conclave_kms_store_size_bytes{{{NS}}})", "bytes"), w=3),
        stat("Audit verify failures", "short",
             t(f"sum(conclave_kms_audit_verify_failures_total{{{NS}}})", "failures"),
             desc="Audit chain verifications (a minute after start, hourly, and on request) that found the chain broken."),
        ts("Key releases/s", "ops",
           t(f"sum by (pod) (rate(conclave_kms_key_releases_total{{{NS}}}[{RATE}]))", "{{pod}}"),
           desc="Meeting keys sealed to a participant and committed to the audit log."),
        ts("Denials/s by reason", "ops",
           t(f"sum by (reason) (rate(conclave_kms_denials_total{{{NS}}}[{RATE}]))", "{{reason}}"), stack=True),
        ts("Rotations/s", "ops",
           t(f"sum by (kind) (rate(conclave_kms_rotations_total{{{NS}}}[{RATE}]))", "{{kind}}"),
           desc="kind=epoch: a meeting key rotated (someone left); kind=kek: key-encryption key rotated."),
        ts("Audit commit latency", "s", *quantiles("conclave_kms_audit_commit_seconds", NS),
           desc="One durable store transaction (group commit) before answers are released."),
        ts("Audit entries per commit", "short",
           t(f"sum(rate(conclave_kms_audit_batch_entries_sum{{{NS}}}[{RATE}])) / sum(rate(conclave_kms_audit_batch_entries_count{{{NS}}}[{RATE}]))", "mean"),
           *quantiles("conclave_kms_audit_batch_entries", NS, qs=(0.99,))),
        ts("Requests/s by route", "reqps",
           t(f"sum by (route) (rate(conclave_kms_requests_total{{{NS}}}[{RATE}]))", "{{route}}"), stack=True),
        ts("Request latency p99 by route", "s",
           t(f"histogram_quantile(0.99, sum by (le, route) (rate(conclave_kms_request_duration_seconds_bucket{{{NS}}}[{RATE}])))", "{{route}}"),
           desc="Long polls (events) include their wait."),
        ts("Responses/s by status", "reqps",
           t(f"sum by (status) (rate(conclave_kms_requests_total{{{NS}}}[{RATE}]))", "{{status}}"), stack=True),
        ts("Rate limiting: 429 responses/s", "reqps",
           t(f'sum by (reason) (rate(conclave_kms_denials_total{{reason=~"{SHED}", {NS}}}[{RATE}]))', "{{reason}}"),
           desc="Requests refused by per-identity/per-meeting limits, repeated failures or load shedding.", w=8),
        ts("Audit verifications", "short",
           t(f"sum(increase(conclave_kms_audit_verifications_total{{{NS}}}[1h]))", "verifications (1h)"),
           t(f"sum(increase(conclave_kms_audit_verify_failures_total{{{NS}}}[1h]))", "failures (1h)"),
           desc="Verifications of the tamper-evident audit chain in the last hour; any failure fires ConclaveAuditVerifyFailed.",
           w=8),
        ts("CPU per KMS pod", "percentunit",
           t(f'sum by (pod) (rate(process_cpu_seconds_total{{component="kms", {NS}}}[{RATE}]))', "{{pod}}"),
           desc="Cores used (process_cpu_seconds_total).", w=8),
        ts("Memory per KMS pod", "bytes",
           t(f'sum by (pod) (process_resident_memory_bytes{{component="kms", {NS}}})', "{{pod}}"), w=12),
        ts("KMS ready", "short",
           t(f"sum by (pod) (conclave_kms_ready{{{NS}}})", "{{pod}}"),
           desc="0 while a pod answers its scrape but is not serving (ConclaveKmsNotReady fires after 2 minutes).", w=12),
    ]


STORAGE_DESC = ("Bytes of encrypted recordings on the recording pools' volumes. Each pod scans its volume once at "
                "start, then adds what it writes and subtracts what retention deletes. A pool's replicas share "
                "its volume, so with several replicas their figures overlap.")


def connectors():
    legs = f"conclave_connector_phone_legs_total{{{CONN}}}"
    srtp_legs = f'conclave_connector_phone_legs_total{{srtp="true", {CONN}}}'
    return "conclave-connectors", "Conclave / Connectors", [NAMESPACE_VAR, ZONE_VAR], [
        stat("Recordings active", "short", t(f"sum(conclave_connector_recordings_active{{{CONN}}})", "recordings")),
        stat("Streams active", "short", t(f"sum(conclave_connector_ffmpeg_running{{{CONN}}})", "streams")),
        stat("Phone legs active", "short", t(f"sum(conclave_connector_phone_legs_active{{{CONN}}})", "legs")),
        stat("SRTP share of phone legs", "percentunit",
             t(f"(sum({srtp_legs}) or sum({legs}) * 0) / sum({legs})", "srtp"),
             desc="Phone legs whose media was SRTP, since the connectors started (0 when none was)."),
        stat("Recording storage used", "bytes",
             t(f"sum(conclave_connector_recording_storage_used_bytes{{{CONN}}})", "bytes"),
             desc=STORAGE_DESC),
        stat("Connector pods up", "short", t(f'sum(up{{component="connector", {CONN}}})', "up")),
        ts("Active recordings, streams and calls", "short",
           t(f"sum by (pod) (conclave_connector_recordings_active{{{CONN}}})", "{{pod}} recordings"),
           t(f"sum by (pod) (conclave_connector_ffmpeg_running{{{CONN}}})", "{{pod}} streams"),
           t(f"sum by (pod) (conclave_connector_phone_legs_active{{{CONN}}})", "{{pod}} phone legs")),
        ts("Recording storage used", "bytes",
           t(f"sum by (pod) (conclave_connector_recording_storage_used_bytes{{{CONN}}})", "{{pod}}"),
           desc=STORAGE_DESC),
        ts("Recording write rate", "Bps",
           t(f"sum by (pod) (rate(conclave_connector_recording_written_bytes_total{{{CONN}}}[{RATE}]))", "{{pod}}"),
           desc="Encrypted recording bytes written per second (manifest rewrites included)."),
        ts("Calls started/s by direction", "ops",
           t(f"sum by (direction) (rate(conclave_connector_sip_calls_total{{{CONN}}}[{RATE}]))", "{{direction}}")),
        ts("Failures/s", "ops",
           t(f"sum by (code) (rate(conclave_connector_sip_calls_failed_total{{{CONN}}}[{RATE}]))", "dial-out failed {{code}}"),
           t(f"sum by (reason) (rate(conclave_connector_sip_calls_refused_total{{{CONN}}}[{RATE}]))", "call refused {{reason}}"),
           t(f'sum by (kind) (rate(conclave_connector_ffmpeg_exits_total{{kind!="stopped", {CONN}}}[{RATE}]))', "stream {{kind}}"),
           t(f"sum(rate(conclave_connector_stream_targets_refused_total{{{CONN}}}[{RATE}]))", "stream target refused"),
           t(f"sum(rate(conclave_connector_stream_tls_verify_failures_total{{{CONN}}}[{RATE}]))",
             "stream TLS verification failed"),
           stack=True),
        ts("RTP packets/s", "pps",
           t(f"sum by (direction) (rate(conclave_connector_rtp_packets_total{{{CONN}}}[{RATE}]))", "{{direction}}"),
           t(f"sum by (reason) (rate(conclave_connector_rtp_packets_dropped_total{{{CONN}}}[{RATE}]))", "dropped {{reason}}")),
        ts("Stream (ffmpeg) restarts", "short",
           t(f"sum by (pod) (increase(conclave_connector_ffmpeg_restarts_total{{{CONN}}}[{RATE}]))", "{{pod}}"), w=24),
    ]


def operator():
    cert = "max by (exported_namespace, secret) (conclave_operator_certificate_expiry_timestamp_seconds{exported_namespace=~\"$namespace\"})"
    return "conclave-operator", "Conclave / Operator", [NAMESPACE_VAR], [
        stat("Leader", "short", t("sum(conclave_operator_leader)", "leaders"),
             desc="Replicas holding the leader Lease: 1 when healthy."),
        stat("Reconciles/s", "ops", t(f"sum(rate(conclave_operator_reconciles_total[{RATE}]))", "reconciles")),
        stat("Reconcile errors/s", "ops", t(f"sum(rate(conclave_operator_reconcile_errors_total[{RATE}]))", "errors")),
        stat("API writes/s", "ops", t(f"sum(rate(conclave_operator_api_writes_total[{RATE}]))", "writes"),
             desc="Zero in steady state (no reconcile storms)."),
        stat("Soonest certificate expiry", "s", t(f"min({cert}) - time()", "remaining")),
        stat("Queue depth", "short", t("sum(conclave_operator_queue_depth)", "waiting"),
             desc="Objects whose latest generation is not reconciled yet (max over replicas is what the leader sees)."),
        ts("Reconciles/s by kind", "ops",
           t(f"sum by (kind) (rate(conclave_operator_reconciles_total[{RATE}]))", "{{kind}}")),
        ts("Reconcile errors/s by kind and error", "ops",
           t(f"sum by (kind, error) (rate(conclave_operator_reconcile_errors_total[{RATE}]))", "{{kind}} {{error}}"),
           stack=True),
        ts("Queue depth and reconciles in flight", "short",
           t("max by (kind) (conclave_operator_queue_depth)", "{{kind}} waiting"),
           t("sum by (kind) (conclave_operator_reconciles_in_flight)", "{{kind}} in flight"),
           desc="Objects whose metadata.generation is not yet in status.observedGeneration, and reconciles running now."),
        ts("Reconcile duration", "s", *quantiles("conclave_operator_reconcile_duration_seconds", "", by="kind", qs=(0.5, 0.99))),
        ts("API writes/s by verb and resource", "ops",
           t(f"sum by (verb, resource) (rate(conclave_operator_api_writes_total[{RATE}]))", "{{verb}} {{resource}}"),
           stack=True),
        ts("Certificate time left", "s",
           t(f"{cert} - time()", "{{exported_namespace}}/{{secret}}"),
           desc="Seconds until each certificate the operator issued expires; renewed at two thirds of its life."),
        ts("CPU per operator replica", "percentunit",
           t(f'sum by (pod) (rate(process_cpu_seconds_total{{component="operator"}}[{RATE}]))', "{{pod}}")),
        ts("Memory per operator replica", "bytes",
           t('sum by (pod) (process_resident_memory_bytes{component="operator"})', "{{pod}}")),
    ]


DASHBOARDS = [overview, relays, kms, connectors, operator]


def layout(panels):
    x = y = row_h = 0
    out = []
    for i, p in enumerate(panels, 1):
        w, h = p["w"], p["h"]
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        targets = [{"datasource": DS, "refId": chr(ord("A") + j), "expr": tg["expr"],
                    "legendFormat": tg["legendFormat"], "range": True, "instant": False}
                   for j, tg in enumerate(p["targets"])]
        panel = {"id": i, "type": p["type"], "title": p["title"], "description": p["description"],
                 "datasource": DS, "gridPos": {"x": x, "y": y, "w": w, "h": h}, "targets": targets,
                 "fieldConfig": {"defaults": {"unit": p["unit"]}, "overrides": []}}
        if p["type"] == "stat":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                "colorMode": "value", "graphMode": "area", "textMode": "auto"}
        else:
            panel["fieldConfig"]["defaults"]["custom"] = {
                "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                "stacking": {"mode": "normal" if p.get("stack") else "none", "group": "A"}}
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                "tooltip": {"mode": "multi", "sort": "desc"}}
        out.append(panel)
        x += w
        row_h = max(row_h, h)
    return out


def build(fn):
    uid, title, variables, panels = fn()
    return {
        "uid": uid, "title": title, "tags": ["conclave"], "editable": True, "graphTooltip": 1,
        "schemaVersion": 39, "version": 1, "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s", "timezone": "", "annotations": {"list": []}, "links": [
            {"type": "dashboards", "tags": ["conclave"], "asDropdown": True, "title": "Conclave",
             "includeVars": True, "keepTime": True}],
        "templating": {"list": [var_datasource(), *variables]},
        "panels": layout(panels),
    }


def rendered():
    return {f"{fn.__name__}.json": json.dumps(build(fn), indent=2, sort_keys=True) + "\n" for fn in DASHBOARDS}


def main(argv):
    stale = []
    for name, text in rendered().items():
        path = OUT / name
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale dashboards (run python3 observability/dashboards.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
