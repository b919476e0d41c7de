#!/usr/bin/env bash
# This cluster has no dynamic volume provisioner: create a StorageClass named
# `local` and a pool of hostPath PersistentVolumes under the state directory
# that claims bind to (static provisioning). Idempotent. The capacity is
# nominal (hostPath does not enforce it), so claims of any usual size bind.
source "$(dirname "$0")/../lib.sh"

COUNT=${PV_COUNT:-24}
SIZE=${PV_SIZE:-20Gi}
{
  cat <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
YAML
  for i in $(seq -w 1 "$COUNT"); do
    dir=$CLUSTER_STATE/volumes/pv$i
    mkdir -p "$dir"
    # Pods run as arbitrary non-root users with an fsGroup; let them write.
    chmod 0777 "$dir"
    cat <<YAML
---
apiVersion: v1
kind: PersistentVolume
metadata:
  name: local-pv$i
  labels: {conclave.dev/e2e: "true"}
spec:
  capacity: {storage: $SIZE}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: local
  hostPath: {path: $dir, type: DirectoryOrCreate}
YAML
  done
} | kubectl_ apply -f - >/dev/null
log "storage: StorageClass 'local' with $COUNT hostPath PersistentVolumes of $SIZE"
