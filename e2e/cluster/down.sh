#!/usr/bin/env bash
# Stops exactly what up.sh started (by pid file), tears down pod networking,
# unmounts what kubelet and containerd mounted under the state directory,
# removes our iptables chains and the node address, and deletes the state.
# Logs of the last cluster are kept in $CONCLAVE_CACHE/last-cluster-logs.
source "$(dirname "$0")/../lib.sh"
set +e

require_root cluster-down
PIDS=$CLUSTER_STATE/pids
if [ ! -d "$CLUSTER_STATE" ]; then
  log "no cluster state at $CLUSTER_STATE: nothing to do"
  exit 0
fi

pid_of() { local f=$PIDS/$1.pid; [ -f "$f" ] && cat "$f"; }
alive() { local p; p=$(pid_of "$1") && is_component "$p" "$1"; }

stop() {
  local name=$1 pid i
  pid=$(pid_of "$name") || return 0
  if kill -0 "$pid" 2>/dev/null && ! is_component "$pid" "$name"; then
    log "pid file of $name names pid $pid, which is no longer $name (stale from a killed run): leaving that process alone"
  elif kill -0 "$pid" 2>/dev/null; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "$name did not stop on SIGTERM; sending SIGKILL"; kill -KILL "$pid" 2>/dev/null; sleep 0.2; }
  fi
  rm -f "$PIDS/$name.pid"
}

ctr_() { ctr -a "$CONTAINERD_SOCK" -n k8s.io "$@"; }

# 1. Let kubelet tear pods down through the CRI (this runs CNI DEL, which
#    releases addresses and removes per-pod iptables rules). Controllers are
#    stopped first so nothing is recreated meanwhile.
stop kube-controller-manager
stop kube-scheduler
if alive kube-apiserver && alive kubelet; then
  log "deleting all pods"
  kubectl_ delete pods -A --all --force --grace-period=0 --wait=false >/dev/null 2>&1
  for ((i = 0; i < 60; i++)); do
    [ -z "$(ctr_ tasks ls -q 2>/dev/null)" ] && break
    sleep 1
  done
fi
stop kubelet

# 2. Whatever still runs in containerd (kubelet dead or slow) is killed through
#    containerd itself; each task's shim exits with it.
if alive containerd; then
  for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s KILL "$t" >/dev/null 2>&1; done
  sleep 1
  for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$t" >/dev/null 2>&1; done
  for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$c" >/dev/null 2>&1; done
fi
stop containerd
# Shims serving our containerd socket, should any outlive it (found by the
# socket path in their arguments, i.e. only processes tied to this cluster).
for p in /proc/[0-9]*; do
  if { tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null | grep -q -- "$CONTAINERD_SOCK\|$CLUSTER_STATE/containerd"; then
    pid=${p#/proc/}
    log "killing leftover process $pid bound to this cluster's containerd"
    kill -KILL "$pid" 2>/dev/null
  fi
done

# Containers whose shim died with containerd (a run killed outright) keep
# running, reparented to init. Their task bundles under our state directory
# name them, and each runs in the cgroup containerd made for that id.
for bundle in "$CLUSTER_STATE"/containerd/state/io.containerd.runtime.v2.task/k8s.io/*/; do
  [ -d "$bundle" ] || continue
  id=$(basename "$bundle")
  for procs in /sys/fs/cgroup/k8s.io/"$id"/cgroup.procs /sys/fs/cgroup/*/k8s.io/"$id"/cgroup.procs; do
    [ -f "$procs" ] || continue
    for pid in $(cat "$procs"); do
      log "killing container process $pid left behind by a dead containerd (container ${id:0:12})"
      kill -KILL "$pid" 2>/dev/null
    done
  done
done
sleep 0.2
for cg in /sys/fs/cgroup/k8s.io /sys/fs/cgroup/*/k8s.io; do
  [ -d "$cg" ] || continue
  for d in "$cg"/*/; do
    [ -d "$d" ] && [ -d "$CLUSTER_STATE/containerd/state/io.containerd.runtime.v2.task/k8s.io/$(basename "$d")" ] && rmdir "$d" 2>/dev/null
  done
  rmdir "$cg" 2>/dev/null
done

stop kube-proxy
stop dns-sync
stop dnsmasq
stop kube-apiserver
stop etcd

# 3. Mounts under the state directory (pod volumes, rootfs, netns), deepest first.
for m in $(awk -v s="$CLUSTER_STATE" 'index($2, s) == 1 {print $2}' /proc/mounts | sort -r); do
  umount -l "$m" 2>/dev/null || log "could not unmount $m"
done

# 4. Network state: our iptables chains and rules (kube-proxy, kubelet, CNI),
#    the bridge, CNI's address bookkeeping and the node address.
if [ -x "$K8S_BIN/kube-proxy" ]; then "$K8S_BIN/kube-proxy" --cleanup >/dev/null 2>&1; fi
for table in filter nat mangle; do
  if iptables-save -t "$table" 2>/dev/null | grep -- 'KUBE-\|CNI-' >/dev/null; then
    iptables-save -t "$table" | grep -v -- 'KUBE-\|CNI-' | iptables-restore -T "$table" 2>/dev/null \
      || log "could not clean iptables table $table"
  fi
done
ip link show conclave0 >/dev/null 2>&1 && ip link delete conclave0
ip addr show dev lo | grep " $NODE_IP/32" >/dev/null && ip addr del "$NODE_IP/32" dev lo

rm -rf "$CONCLAVE_CACHE/last-cluster-logs"
[ -d "$CLUSTER_STATE/logs" ] && cp -r "$CLUSTER_STATE/logs" "$CONCLAVE_CACHE/last-cluster-logs"
rm -rf "$CLUSTER_STATE" || die "could not remove $CLUSTER_STATE; a mount may still be busy (see /proc/mounts)"
log "cluster down; logs of this run kept in $CONCLAVE_CACHE/last-cluster-logs"
