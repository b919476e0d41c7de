#!/usr/bin/env bash
# Cluster DNS without CoreDNS: keeps dnsmasq's hosts file in step with the
# cluster's Services and named pods, and tells dnsmasq to reload on change.
source "$(dirname "$0")/../lib.sh"

HOSTS=$CLUSTER_STATE/dns-hosts
render() {
  # ClusterIP services resolve to their cluster IP; headless services to their
  # ready endpoints; endpoints with a hostname (StatefulSet pods behind a
  # headless service) also get their own stable names.
  kubectl_ get services,endpoints -A -o json | jq -r '
    .items as $all
    | ([ $all[] | select(.kind == "Service" and .spec.clusterIP == "None")
         | "\(.metadata.namespace)/\(.metadata.name)" ]) as $headless
    | $all[]
    | if .kind == "Service" then
        select(.spec.clusterIP != null and .spec.clusterIP != "None")
        | "\(.spec.clusterIP) \(.metadata.name).\(.metadata.namespace).svc.cluster.local"
      else
        .metadata as $m | (.subsets // [])[] | (.addresses // [])[]
        | (if ($headless | index("\($m.namespace)/\($m.name)")) then "\(.ip) \($m.name).\($m.namespace).svc.cluster.local" else empty end),
          (if .hostname then "\(.ip) \(.hostname).\($m.name).\($m.namespace).svc.cluster.local" else empty end)
      end' | sort -u
}

while true; do
  if new=$(render 2>/dev/null); then
    if [ "$new" != "$(cat "$HOSTS" 2>/dev/null)" ]; then
      printf '%s\n' "$new" > "$HOSTS.tmp" && mv "$HOSTS.tmp" "$HOSTS"
      [ -f "$CLUSTER_STATE/pids/dnsmasq.pid" ] && kill -HUP "$(cat "$CLUSTER_STATE/pids/dnsmasq.pid")" 2>/dev/null || true
    fi
  fi
  sleep 1
done
