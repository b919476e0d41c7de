//! Children of a MeetingZone, built as pure functions of the resource and what it references.

use super::{MediaMode, MeetingZone};
use crate::context::Settings;
use crate::pod::{self, HTTP_PORT, TLS_DIR, child_meta, selector_labels, typed};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use meeting_proto::config::relay::RelayConfig;
use serde_json::json;

pub const COMPONENT: &str = "relay";
/// Component label of the per-relay media Services (pruned when relays scale down).
pub const MEDIA_COMPONENT: &str = "relay-media";
/// Where an external KMS's CA bundle is mounted.
pub const KMS_CA_DIR: &str = "/etc/conclave/kms-ca";

pub fn workload_name(zone: &str) -> String {
    format!("{zone}-relay")
}
pub fn config_name(zone: &str) -> String {
    format!("{zone}-relay-config")
}
pub fn tls_name(zone: &str) -> String {
    format!("{zone}-relay-tls")
}
/// Per-relay Service, named like the pod it selects.
pub fn relay_service_name(zone: &str, ordinal: i32) -> String {
    pod_name(zone, ordinal)
}
/// Name of relay pod `ordinal` (StatefulSet naming).
pub fn pod_name(zone: &str, ordinal: i32) -> String {
    format!("{zone}-relay-{ordinal}")
}

/// How relays reach and trust their KMS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmsLink {
    pub url: String,
    /// Hex Ed25519 public key verifying tickets.
    pub ticket_public_key: String,
    /// Secret with `tls.crt`/`tls.key` of the client identity.
    pub client_secret: String,
    /// Secret and key holding the CA that signs the KMS certificate.
    pub ca_secret: String,
    pub ca_key: String,
    /// Port on which egress to the KMS is allowed, and the pods (same namespace) if known.
    pub port: i32,
    pub kms_pod_selector: Option<std::collections::BTreeMap<String, String>>,
    /// `client_secret` holds one certificate per relay pod (`<pod>.crt`, `<pod>.key`).
    pub per_pod_certs: bool,
}

/// Address relay `ordinal` advertises in its config file: the spec's advertisedAddress, else
/// what the operator observed (`known`: the pod IP, host IP or Service address), else the pod's
/// DNS name. Pods also get `CONCLAVE_RELAY_ADVERTISE` (see [`advertise_env`]), which the
/// kubelet fills with the pod's own address before the operator can know it.
pub fn advertise_for(zone: &MeetingZone, ordinal: i32, known: Option<&str>) -> String {
    let m = &zone.spec.media;
    match (&m.advertised_address, known) {
        (Some(a), _) => format!(
            "{}:{}",
            a.replace("{ordinal}", &ordinal.to_string()),
            m.udp_port
        ),
        (None, Some(k)) => k.to_string(),
        (None, None) => format!(
            "{}.{}.{}.svc:{}",
            pod_name(&zone.name_any(), ordinal),
            workload_name(&zone.name_any()),
            zone.namespace().unwrap_or_default(),
            m.udp_port
        ),
    }
}

/// The advertise value a pod computes from its environment (expanded by the kubelet).
pub fn advertise_env(zone: &MeetingZone) -> String {
    let m = &zone.spec.media;
    match (&m.advertised_address, m.mode) {
        (Some(a), _) => format!(
            "{}:{}",
            a.replace("{ordinal}", "$(POD_ORDINAL)"),
            m.udp_port
        ),
        (None, MediaMode::HostNetwork) => format!("$(HOST_IP):{}", m.udp_port),
        (None, MediaMode::PodIp) => format!("$(POD_IP):{}", m.udp_port),
        // The per-relay Service's address is only known once it exists; the operator reports it
        // in status.relayEndpoints and users set advertisedAddress for production.
        (None, MediaMode::Service) => format!(
            "$(POD_NAME).{}.svc:{}",
            zone.namespace().unwrap_or_default(),
            m.udp_port
        ),
    }
}

/// Where relay `pod` finds its client certificate: its own pair in the zone's Secret when the
/// operator issues them, else the user's Secret for an external KMS.
fn cert_files(kms: &KmsLink, pod: &str) -> (String, String) {
    if kms.per_pod_certs {
        (
            format!("{TLS_DIR}/{pod}.crt"),
            format!("{TLS_DIR}/{pod}.key"),
        )
    } else {
        (format!("{TLS_DIR}/tls.crt"), format!("{TLS_DIR}/tls.key"))
    }
}

/// The config of relay `ordinal`; `advertise` from [`advertise_for`].
pub fn config(
    zone: &MeetingZone,
    kms: &KmsLink,
    ordinal: i32,
    advertise: &str,
) -> Result<RelayConfig, String> {
    let s = &zone.spec;
    let pod = pod_name(&zone.name_any(), ordinal);
    let (cert_file, key_file) = cert_files(kms, &pod);
    let v = json!({
        // The KMS names relays `<zone>/<pod>` after their certificates.
        "relayId": format!("{}/{pod}", zone.name_any()),
        "zone": zone.name_any(),
        "listen": format!("0.0.0.0:{}", s.media.udp_port),
        "advertise": advertise,
        "httpListen": format!("0.0.0.0:{HTTP_PORT}"),
        "ticketPublicKey": kms.ticket_public_key,
        "kms": {
            "url": kms.url,
            "caFile": format!("{KMS_CA_DIR}/{}", kms.ca_key),
            "certFile": cert_file,
            "keyFile": key_file,
        },
        "limits": {
            "participantsPerMeeting": s.limits.participants_per_meeting,
            "meetings": s.limits.meetings_per_relay,
        },
    });
    let c: RelayConfig = serde_json::from_value(v).map_err(|e| format!("relay config: {e}"))?;
    c.validate().map_err(|e| format!("relay config: {e}"))?;
    Ok(c)
}

pub fn service_account(zone: &MeetingZone) -> ServiceAccount {
    ServiceAccount {
        metadata: child_meta(zone, &workload_name(&zone.name_any()), COMPONENT),
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

/// One file per relay, `<pod>.yaml`; each pod reads its own (`--config .../$(POD_NAME).yaml`).
pub fn config_map(zone: &MeetingZone, rendered: &[(String, String)]) -> ConfigMap {
    ConfigMap {
        metadata: child_meta(zone, &config_name(&zone.name_any()), COMPONENT),
        data: Some(
            rendered
                .iter()
                .map(|(pod, text)| (format!("{pod}.yaml"), text.clone()))
                .collect(),
        ),
        ..Default::default()
    }
}

/// Headless Service: stable DNS per relay pod and the StatefulSet's serviceName.
pub fn headless_service(zone: &MeetingZone) -> Result<Service, serde_json::Error> {
    let mut svc: Service = typed(json!({
        "apiVersion": "v1", "kind": "Service",
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": selector_labels(COMPONENT, &zone.name_any()),
            "ports": [{"name": "media", "port": zone.spec.media.udp_port, "targetPort": "media", "protocol": "UDP"}],
        }
    }))?;
    svc.metadata = child_meta(zone, &workload_name(&zone.name_any()), COMPONENT);
    Ok(svc)
}

/// Per-relay Services for media mode `service`, one per ordinal.
pub fn relay_services(zone: &MeetingZone) -> Result<Vec<Service>, serde_json::Error> {
    if zone.spec.media.mode != MediaMode::Service {
        return Ok(vec![]);
    }
    (0..zone.spec.relays.replicas)
        .map(|i| {
            let name = relay_service_name(&zone.name_any(), i);
            let mut svc: Service = typed(json!({
                "apiVersion": "v1", "kind": "Service",
                "spec": {
                    "type": zone.spec.media.service_type.as_str(),
                    "externalTrafficPolicy": "Local",
                    "selector": {"statefulset.kubernetes.io/pod-name": name},
                    "ports": [{"name": "media", "port": zone.spec.media.udp_port, "targetPort": "media", "protocol": "UDP"}],
                }
            }))?;
            svc.metadata = child_meta(zone, &name, MEDIA_COMPONENT);
            Ok(svc)
        })
        .collect()
}

pub fn stateful_set(
    zone: &MeetingZone,
    kms: &KmsLink,
    settings: &Settings,
    config_hash: &str,
) -> Result<StatefulSet, serde_json::Error> {
    let name = zone.name_any();
    let s = &zone.spec;
    let labels = pod::labels(COMPONENT, &name);
    let mut env = pod::downward_env();
    if let Some(list) = env.as_array_mut() {
        list.push(json!({"name": "POD_ORDINAL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}}));
        list.push(json!({"name": "CONCLAVE_RELAY_ADVERTISE", "value": advertise_env(zone)}));
    }
    let mut pod_spec = json!({
        "serviceAccountName": workload_name(&name),
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "securityContext": pod::pod_security_context(),
        "terminationGracePeriodSeconds": 30,
        "containers": [{
            "name": "relay",
            "image": s.image.clone().unwrap_or_else(|| settings.relay_image.clone()),
            "imagePullPolicy": settings.image_pull_policy,
            "args": ["--config", format!("{}/$(POD_NAME).yaml", pod::CONFIG_DIR)],
            "env": env,
            "ports": [
                {"name": "media", "containerPort": s.media.udp_port, "protocol": "UDP"},
                pod::http_port(),
            ],
            "readinessProbe": pod::probe("/readyz", 5),
            "livenessProbe": pod::probe("/healthz", 10),
            "resources": pod::resources(s.resources.as_ref(), "100m", "64Mi", "512Mi"),
            "securityContext": pod::container_security_context(),
            "volumeMounts": [
                {"name": "config", "mountPath": pod::CONFIG_DIR, "readOnly": true},
                {"name": "tls", "mountPath": TLS_DIR, "readOnly": true},
                {"name": "kms-ca", "mountPath": KMS_CA_DIR, "readOnly": true},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }],
        "volumes": [
            {"name": "config", "configMap": {"name": config_name(&name)}},
            {"name": "tls", "secret": {"secretName": kms.client_secret}},
            {"name": "kms-ca", "secret": {"secretName": kms.ca_secret, "items": [{"key": kms.ca_key, "path": kms.ca_key}]}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}},
        ],
    });
    if s.media.mode == MediaMode::HostNetwork {
        pod_spec["hostNetwork"] = json!(true);
        pod_spec["dnsPolicy"] = json!("ClusterFirstWithHostNet");
        if s.placement.affinity.is_none() {
            // Two relays on one node would fight over the same host ports.
            pod_spec["affinity"] = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": selector_labels(COMPONENT, &name)}, "topologyKey": "kubernetes.io/hostname"}
            ]}});
        }
    }
    if let Some(obj) = pod_spec.as_object_mut() {
        obj.extend(pod::placement_json(&s.placement));
    }
    let mut sts: StatefulSet = typed(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "spec": {
            "replicas": s.relays.replicas,
            "serviceName": workload_name(&name),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector_labels(COMPONENT, &name)},
            "template": {
                "metadata": {"labels": labels, "annotations": {pod::CONFIG_HASH: config_hash}},
                "spec": pod_spec,
            },
        }
    }))?;
    sts.metadata = child_meta(zone, &workload_name(&name), COMPONENT);
    Ok(sts)
}

pub fn pdb(zone: &MeetingZone) -> Result<PodDisruptionBudget, serde_json::Error> {
    let mut p: PodDisruptionBudget = typed(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(COMPONENT, &zone.name_any())}}
    }))?;
    p.metadata = child_meta(zone, &workload_name(&zone.name_any()), COMPONENT);
    Ok(p)
}

/// Ingress: UDP media from anywhere, the ops port. Egress: the KMS port (only the KMS pods
/// when they run in this namespace) and DNS.
pub fn network_policy(
    zone: &MeetingZone,
    kms: &KmsLink,
) -> Result<NetworkPolicy, serde_json::Error> {
    let mut to_kms = json!({"ports": [{"protocol": "TCP", "port": kms.port}]});
    if let Some(sel) = &kms.kms_pod_selector {
        to_kms["to"] = json!([{"podSelector": {"matchLabels": sel}}]);
    }
    let mut np: NetworkPolicy = typed(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "spec": {
            "podSelector": {"matchLabels": selector_labels(COMPONENT, &zone.name_any())},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"ports": [{"protocol": "UDP", "port": zone.spec.media.udp_port}]},
                {"ports": [{"protocol": "TCP", "port": HTTP_PORT}]},
            ],
            "egress": [to_kms, pod::dns_egress()],
        }
    }))?;
    np.metadata = child_meta(zone, &workload_name(&zone.name_any()), COMPONENT);
    Ok(np)
}
