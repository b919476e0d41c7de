#!/usr/bin/env bash
# Brings up a real single-node Kubernetes cluster on this machine (see
# shared notes/local-cluster.md for the recipe and its pitfalls). Idempotent:
# with a healthy cluster already running it only says so.
source "$(dirname "$0")/../lib.sh"

PIDS=$CLUSTER_STATE/pids
LOGS=$CLUSTER_STATE/logs
PKI=$CLUSTER_STATE/pki
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy dnsmasq dns-sync)

running() { local f=$PIDS/$1.pid; [ -f "$f" ] && is_component "$(cat "$f")" "$1"; }

healthy() {
  local c
  for c in "${COMPONENTS[@]}"; do running "$c" || return 1; done
  kubectl_ get --raw /readyz >/dev/null 2>&1 || return 1
  kubectl_ get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -q True
}

require_root cluster-up
if [ -d "$CLUSTER_STATE" ] && healthy; then
  log "cluster already up and healthy (kubeconfig: $KUBECONFIG_FILE)"
  exit 0
fi
if [ -d "$CLUSTER_STATE" ]; then
  log "found state from an earlier run that is not healthy ($CLUSTER_STATE): tearing it down first"
  "$(dirname "$0")/down.sh"
fi

timed packages ensure_packages
timed kubernetes-binaries "$(dirname "$0")/build-k8s.sh"

# Refuse to start over someone else's listener rather than fail obscurely later.
check_port() {
  local proto=$1 port=$2 who
  who=$(ss -Hlnp --"$proto" "( sport = :$port )" 2>/dev/null | head -1)
  [ -z "$who" ] || die "port $port/$proto is already in use ($who); stop that process or free the port, then retry"
}
for p in 2379 2380 6443 10250 10256 10257 10259; do check_port tcp "$p"; done
check_port udp 53

mkdir -p "$PIDS" "$LOGS" "$PKI" "$CLUSTER_STATE"/{etcd,kubelet,run,containerd/root,containerd/state,cni/conf,cni/ipam}
# grep without -q reads all of ip's output: with -q it may exit first, ip then dies of
# SIGPIPE, and under pipefail the address is added a second time ("Address already assigned").
ip addr show dev lo | grep " $NODE_IP/32" >/dev/null || ip addr add "$NODE_IP/32" dev lo

start() {
  local name=$1; shift
  log "starting $name"
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/$name.pid"
}

wait_for() {
  local what=$1 tries=$2; shift 2
  local i
  for ((i = 0; i < tries; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 1
  done
  die "$what did not come up within ${tries}s; see logs in $LOGS"
}

make_pki() {
  [ -f "$PKI/ca.crt" ] && return 0
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=conclave-e2e-ca \
    -keyout "$PKI/ca.key" -out "$PKI/ca.crt" 2>/dev/null
  cat > "$PKI/apiserver.ext" <<EXT
subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:$NODE_IP,IP:$FIRST_SERVICE_IP,IP:127.0.0.1
extendedKeyUsage=serverAuth
EXT
  openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver \
    -keyout "$PKI/apiserver.key" -out "$PKI/apiserver.csr" 2>/dev/null
  openssl x509 -req -in "$PKI/apiserver.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -extfile "$PKI/apiserver.ext" -out "$PKI/apiserver.crt" 2>/dev/null
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  echo "$(openssl rand -hex 24),admin,admin,system:masters" > "$PKI/tokens.csv"
  chmod 600 "$PKI"/*.key "$PKI/tokens.csv"
}

write_kubeconfig() {
  local token
  token=$(cut -d, -f1 "$PKI/tokens.csv")
  cat > "$KUBECONFIG_FILE" <<KC
apiVersion: v1
kind: Config
clusters:
- name: conclave-e2e
  cluster:
    server: https://$NODE_IP:6443
    certificate-authority: $PKI/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: conclave-e2e
  context: {cluster: conclave-e2e, user: admin}
current-context: conclave-e2e
KC
  chmod 600 "$KUBECONFIG_FILE"
}

write_containerd_config() {
  cat > "$CLUSTER_STATE/cni/conf/10-conclave.conflist" <<CNI
{
  "cniVersion": "0.4.0",
  "name": "conclave",
  "plugins": [
    {"type": "bridge", "bridge": "conclave0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$CLUSTER_STATE/cni/ipam",
              "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
CNI
  cat > "$CLUSTER_STATE/containerd.toml" <<TOML
version = 2
root = "$CLUSTER_STATE/containerd/root"
state = "$CLUSTER_STATE/containerd/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "registry.k8s.io/pause:3.2"
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$CLUSTER_STATE/cni/conf"
TOML
}

write_kubelet_config() {
  cat > "$CLUSTER_STATE/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
cgroupsPerQOS: false
enforceNodeAllocatable: []
address: $NODE_IP
healthzBindAddress: 127.0.0.1
evictionHard: {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"}
imageGCHighThresholdPercent: 100
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
clusterDomain: cluster.local
clusterDNS: [$NODE_IP]
resolvConf: $CLUSTER_STATE/resolv.conf
staticPodPath: ""
YAML
  # Pods resolve only through the cluster DNS: nothing is forwarded off the machine.
  echo "nameserver $NODE_IP" > "$CLUSTER_STATE/resolv.conf"
}

make_pki
write_kubeconfig
write_containerd_config
write_kubelet_config

start etcd etcd --name conclave --data-dir "$CLUSTER_STATE/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster conclave=http://127.0.0.1:2380
wait_for etcd 30 curl -sf http://127.0.0.1:2379/health

start kube-apiserver "$K8S_BIN/kube-apiserver" --etcd-servers http://127.0.0.1:2379 \
  --bind-address 0.0.0.0 --advertise-address "$NODE_IP" --secure-port 6443 \
  --cert-dir "$PKI" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
  --client-ca-file "$PKI/ca.crt" \
  --token-auth-file "$PKI/tokens.csv" --authorization-mode Node,RBAC \
  --service-account-key-file "$PKI/sa.key" --service-account-signing-key-file "$PKI/sa.key" \
  --service-account-issuer https://kubernetes.default.svc --service-cluster-ip-range "$SERVICE_CIDR" \
  --allow-privileged --kubelet-preferred-address-types InternalIP
wait_for kube-apiserver 90 kubectl_ get --raw /readyz

start kube-controller-manager "$K8S_BIN/kube-controller-manager" --kubeconfig "$KUBECONFIG_FILE" \
  --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
  --leader-elect=false --controllers '*,-nodeipam' --bind-address 127.0.0.1
start kube-scheduler "$K8S_BIN/kube-scheduler" --kubeconfig "$KUBECONFIG_FILE" --leader-elect=false \
  --bind-address 127.0.0.1

start containerd containerd --config "$CLUSTER_STATE/containerd.toml"
wait_for containerd 30 ctr -a "$CONTAINERD_SOCK" version
timed pause-image "$REPO_ROOT/e2e/cluster/pause-image.sh"

start kubelet "$K8S_BIN/kubelet" --kubeconfig "$KUBECONFIG_FILE" --config "$CLUSTER_STATE/kubelet.yaml" \
  --container-runtime remote --container-runtime-endpoint "unix://$CONTAINERD_SOCK" \
  --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --root-dir "$CLUSTER_STATE/kubelet"
start kube-proxy "$K8S_BIN/kube-proxy" --kubeconfig "$KUBECONFIG_FILE" --hostname-override "$NODE_NAME" \
  --cluster-cidr "$POD_CIDR" --proxy-mode iptables --metrics-bind-address 127.0.0.1:10249 \
  --healthz-bind-address 127.0.0.1:10256

touch "$CLUSTER_STATE/dns-hosts"
start dnsmasq dnsmasq --keep-in-foreground --no-resolv --no-hosts --addn-hosts="$CLUSTER_STATE/dns-hosts" \
  --listen-address="$NODE_IP" --bind-interfaces --port 53 --user=root \
  --local=/cluster.local/ --pid-file="$CLUSTER_STATE/run/dnsmasq.pid"
start dns-sync "$REPO_ROOT/e2e/cluster/dns-sync.sh"

wait_for "node $NODE_NAME Ready" 120 sh -c "kubectl --kubeconfig '$KUBECONFIG_FILE' get node $NODE_NAME -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -q True"
wait_for "cluster DNS" 60 sh -c "dig +short +time=1 +tries=1 @$NODE_IP kubernetes.default.svc.cluster.local | grep -q ."
"$REPO_ROOT/e2e/cluster/storage.sh"
log "cluster is up: export KUBECONFIG=$KUBECONFIG_FILE"
