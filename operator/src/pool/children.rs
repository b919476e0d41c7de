//! Children of a ConnectorPool, built as pure functions of the resource and its KMS link.

use super::{ConnectorPool, SipTransport, SrtpPolicy};
use crate::context::Settings;
use crate::pod::{self, CONFIG_FILE, HTTP_PORT, TLS_DIR, child_meta, selector_labels, typed};
use crate::shared::{ConnectorType, parse_duration};
use crate::zone::{KMS_CA_DIR, KmsLink};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use meeting_proto::config::connector::ConnectorConfig;
use serde_json::json;

/// Pod label naming the MeetingZone a connector pool serves.
pub const ZONE_LABEL: &str = "conclave.dev/zone";
pub const COMPONENT: &str = "connector";
pub const RECORDINGS_DIR: &str = "/var/lib/conclave-recordings";
pub const STREAMING_DIR: &str = "/etc/conclave/streaming";
pub const SIP_DIR: &str = "/etc/conclave/sip";
/// Where the CA that verifies the pool's outbound TLS peer is mounted: the SIP trunk, the room
/// systems' CA, or the RTMPS streaming targets (a pool has one type, so one of them).
pub const PEER_CA_DIR: &str = "/etc/conclave/peer-ca";

pub fn workload_name(pool: &str) -> String {
    format!("{pool}-connector")
}
pub fn config_name(pool: &str) -> String {
    format!("{pool}-connector-config")
}
pub fn tls_name(pool: &str) -> String {
    format!("{pool}-connector-tls")
}
pub fn recordings_name(pool: &str) -> String {
    format!("{pool}-recordings")
}

/// The connector type as the KMS API names it.
pub fn kind_of(t: ConnectorType) -> meeting_proto::kms_api::ConnectorKind {
    use meeting_proto::kms_api::ConnectorKind as K;
    match t {
        ConnectorType::Recording => K::Recording,
        ConnectorType::LiveStreaming => K::LiveStreaming,
        ConnectorType::Telephony => K::Telephony,
        ConnectorType::RoomSystem => K::RoomSystem,
    }
}

/// SIP listen port: 5061 for TLS, 5060 otherwise.
pub fn sip_port(pool: &ConnectorPool) -> Option<(i32, SipTransport)> {
    let transport = match pool.spec.connector_type {
        ConnectorType::Telephony => pool.spec.telephony.as_ref()?.transport,
        ConnectorType::RoomSystem => pool
            .spec
            .room_system
            .as_ref()
            .map(|r| r.transport)
            .unwrap_or_default(),
        _ => return None,
    };
    Some((
        if transport == SipTransport::Tls {
            5061
        } else {
            5060
        },
        transport,
    ))
}

/// DNS names of the pool's SIP Service, for the SIP-over-TLS server certificate.
pub fn sip_dns_names(pool: &ConnectorPool, domain: &str) -> Vec<String> {
    let ns = pool.namespace().unwrap_or_default();
    let svc = workload_name(&pool.name_any());
    vec![
        svc.clone(),
        format!("{svc}.{ns}"),
        format!("{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.{domain}"),
    ]
}

fn srtp(p: SrtpPolicy) -> &'static str {
    match p {
        SrtpPolicy::Required => "required",
        SrtpPolicy::Preferred => "preferred",
        SrtpPolicy::Off => "off",
    }
}

fn transport(t: SipTransport) -> &'static str {
    match t {
        SipTransport::Udp => "udp",
        SipTransport::Tcp => "tcp",
        SipTransport::Tls => "tls",
    }
}

pub fn config(pool: &ConnectorPool, kms: &KmsLink) -> Result<ConnectorConfig, String> {
    let s = &pool.spec;
    let mut v = json!({
        "type": s.connector_type.as_str(),
        "pool": pool.name_any(),
        "kms": {
            "url": kms.url,
            "caFile": format!("{KMS_CA_DIR}/{}", kms.ca_key),
            "certFile": format!("{TLS_DIR}/tls.crt"),
            "keyFile": format!("{TLS_DIR}/tls.key"),
        },
        "metricsListen": format!("0.0.0.0:{HTTP_PORT}"),
    });
    match s.connector_type {
        ConnectorType::Recording => {
            let r = s
                .recording
                .as_ref()
                .ok_or("spec.recording: required for type recording")?;
            let days = parse_duration(&r.retention)
                .ok_or(format!(
                    "spec.recording.retention: {:?} is not a duration like 720h",
                    r.retention
                ))?
                .as_secs()
                .div_ceil(86_400);
            v["recording"] = json!({"dir": RECORDINGS_DIR, "retentionDays": days});
        }
        ConnectorType::LiveStreaming => {
            let l = s
                .live_streaming
                .as_ref()
                .ok_or("spec.liveStreaming: required for type liveStreaming")?;
            let mut st = json!({"allowedTargets": l.allowed_targets});
            if l.credentials_secret_ref.is_some() {
                st["credentialsFile"] = json!(format!("{STREAMING_DIR}/credentials"));
            }
            if let Some(ca) = &l.target_ca_secret_ref {
                st["tlsCaFile"] = json!(format!("{PEER_CA_DIR}/{}", ca.key_or("ca.crt")));
            }
            v["streaming"] = st;
        }
        ConnectorType::Telephony => {
            let t = s
                .telephony
                .as_ref()
                .ok_or("spec.telephony: required for type telephony")?;
            let (port, tr) = sip_port(pool).ok_or("spec.telephony: required for type telephony")?;
            let mut sip = json!({
                "listen": format!("0.0.0.0:{port}"),
                "transport": transport(tr),
                "trunk": t.trunk_address,
                "srtp": srtp(t.srtp),
                "dialIn": t.dial_in.iter().map(|d| (d.number.clone(), d.meeting_id.clone())).collect::<std::collections::BTreeMap<_, _>>(),
            });
            if t.credentials_secret_ref.is_some() {
                sip["credentialsFile"] = json!(format!("{SIP_DIR}/credentials"));
            }
            if tr == SipTransport::Tls {
                sip["tlsCertFile"] = json!(format!("{TLS_DIR}/tls.crt"));
                sip["tlsKeyFile"] = json!(format!("{TLS_DIR}/tls.key"));
                let ca = t
                    .trunk_ca_secret_ref
                    .as_ref()
                    .ok_or("spec.telephony.trunkCaSecretRef: required with transport tls")?;
                sip["tlsCaFile"] = json!(format!("{PEER_CA_DIR}/{}", ca.key_or("ca.crt")));
            }
            v["sip"] = sip;
        }
        ConnectorType::RoomSystem => {
            let r = s.room_system.clone().unwrap_or_default();
            let (port, tr) = sip_port(pool).ok_or("spec.roomSystem: invalid")?;
            let mut sip = json!({"listen": format!("0.0.0.0:{port}"), "transport": transport(tr), "srtp": srtp(r.srtp)});
            if tr == SipTransport::Tls {
                sip["tlsCertFile"] = json!(format!("{TLS_DIR}/tls.crt"));
                sip["tlsKeyFile"] = json!(format!("{TLS_DIR}/tls.key"));
                sip["tlsCaFile"] = json!(match &r.ca_secret_ref {
                    Some(ca) => format!("{PEER_CA_DIR}/{}", ca.key_or("ca.crt")),
                    None => format!("{TLS_DIR}/ca.crt"),
                });
            }
            v["sip"] = sip;
        }
    }
    let c: ConnectorConfig =
        serde_json::from_value(v).map_err(|e| format!("connector config: {e}"))?;
    c.validate().map_err(|e| format!("connector config: {e}"))?;
    Ok(c)
}

pub fn service_account(pool: &ConnectorPool) -> ServiceAccount {
    ServiceAccount {
        metadata: child_meta(pool, &workload_name(&pool.name_any()), COMPONENT),
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

pub fn config_map(pool: &ConnectorPool, rendered: &str) -> ConfigMap {
    ConfigMap {
        metadata: child_meta(pool, &config_name(&pool.name_any()), COMPONENT),
        data: Some([("config.yaml".to_string(), rendered.to_string())].into()),
        ..Default::default()
    }
}

/// The recordings volume. It carries no owner reference: recordings outlive the pool and are
/// deleted by hand.
pub fn recordings_claim(
    pool: &ConnectorPool,
) -> Option<Result<PersistentVolumeClaim, serde_json::Error>> {
    let r = pool
        .spec
        .recording
        .as_ref()
        .filter(|_| pool.spec.connector_type == ConnectorType::Recording)?;
    let mut spec = json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": r.storage_size}}});
    if let Some(sc) = &r.storage_class_name {
        spec["storageClassName"] = json!(sc);
    }
    Some(typed(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": recordings_name(&pool.name_any()),
            "namespace": pool.namespace(),
            "labels": pod::labels(COMPONENT, &pool.name_any()),
        },
        "spec": spec,
    })))
}

/// SIP Service for telephony and room systems (trunks and room systems call in).
pub fn sip_service(pool: &ConnectorPool) -> Option<Result<Service, serde_json::Error>> {
    let (port, tr) = sip_port(pool)?;
    let proto = if tr == SipTransport::Udp {
        "UDP"
    } else {
        "TCP"
    };
    Some(
        typed::<Service>(json!({
            "apiVersion": "v1", "kind": "Service",
            "spec": {
                "selector": selector_labels(COMPONENT, &pool.name_any()),
                "ports": [{"name": "sip", "port": port, "targetPort": "sip", "protocol": proto}],
            }
        }))
        .map(|mut svc| {
            svc.metadata = child_meta(pool, &workload_name(&pool.name_any()), COMPONENT);
            svc
        }),
    )
}

pub fn deployment(
    pool: &ConnectorPool,
    kms: &KmsLink,
    settings: &Settings,
    config_hash: &str,
) -> Result<Deployment, serde_json::Error> {
    let name = pool.name_any();
    let s = &pool.spec;
    let mut labels = pod::labels(COMPONENT, &name);
    // Dashboards filter connectors by the zone they serve (the PodMonitor maps this label).
    if let Some(zone) = &s.zone_ref {
        labels.insert(ZONE_LABEL.to_string(), zone.name.clone());
    }
    let mut ports = vec![json!(pod::http_port())];
    let mut mounts = vec![
        json!({"name": "config", "mountPath": pod::CONFIG_DIR, "readOnly": true}),
        json!({"name": "tls", "mountPath": TLS_DIR, "readOnly": true}),
        json!({"name": "kms-ca", "mountPath": KMS_CA_DIR, "readOnly": true}),
        json!({"name": "tmp", "mountPath": "/tmp"}),
    ];
    let mut volumes = vec![
        json!({"name": "config", "configMap": {"name": config_name(&name)}}),
        json!({"name": "tls", "secret": {"secretName": kms.client_secret}}),
        json!({"name": "kms-ca", "secret": {"secretName": kms.ca_secret, "items": [{"key": kms.ca_key, "path": kms.ca_key}]}}),
        json!({"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}),
    ];
    if let Some((port, tr)) = sip_port(pool) {
        let proto = if tr == SipTransport::Udp {
            "UDP"
        } else {
            "TCP"
        };
        ports.push(json!({"name": "sip", "containerPort": port, "protocol": proto}));
    }
    if s.connector_type == ConnectorType::Recording {
        mounts.push(json!({"name": "recordings", "mountPath": RECORDINGS_DIR}));
        volumes.push(json!({"name": "recordings", "persistentVolumeClaim": {"claimName": recordings_name(&name)}}));
    }
    if let Some(c) = s
        .live_streaming
        .as_ref()
        .and_then(|l| l.credentials_secret_ref.as_ref())
    {
        mounts.push(json!({"name": "streaming", "mountPath": STREAMING_DIR, "readOnly": true}));
        volumes.push(
            json!({"name": "streaming", "secret": {"secretName": c.name, "defaultMode": 0o400}}),
        );
    }
    let peer_ca = s
        .telephony
        .as_ref()
        .and_then(|t| t.trunk_ca_secret_ref.as_ref())
        .or(s
            .room_system
            .as_ref()
            .and_then(|r| r.ca_secret_ref.as_ref()))
        .or(s
            .live_streaming
            .as_ref()
            .and_then(|l| l.target_ca_secret_ref.as_ref()));
    if let Some(ca) = peer_ca {
        mounts.push(json!({"name": "peer-ca", "mountPath": PEER_CA_DIR, "readOnly": true}));
        volumes.push(json!({"name": "peer-ca", "secret": {"secretName": ca.name}}));
    }
    if let Some(c) = s
        .telephony
        .as_ref()
        .and_then(|t| t.credentials_secret_ref.as_ref())
    {
        mounts.push(json!({"name": "sip", "mountPath": SIP_DIR, "readOnly": true}));
        volumes
            .push(json!({"name": "sip", "secret": {"secretName": c.name, "defaultMode": 0o400}}));
    }
    let mut pod_spec = json!({
        "serviceAccountName": workload_name(&name),
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "securityContext": pod::pod_security_context(),
        "terminationGracePeriodSeconds": 60,
        "containers": [{
            "name": "connector",
            "image": s.image.clone().unwrap_or_else(|| settings.connector_image.clone()),
            "imagePullPolicy": settings.image_pull_policy,
            "args": ["run", "--config", CONFIG_FILE],
            "env": pod::downward_env(),
            "ports": ports,
            // connector-node serves /healthz only; it is ready once it serves.
            "readinessProbe": pod::probe("/healthz", 5),
            "livenessProbe": pod::probe("/healthz", 10),
            "resources": pod::resources(s.resources.as_ref(), "100m", "128Mi", "1Gi"),
            "securityContext": pod::container_security_context(),
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    });
    if let Some(obj) = pod_spec.as_object_mut() {
        obj.extend(pod::placement_json(&s.placement));
    }
    // A recording volume is ReadWriteOnce: replace pods rather than surge a second mounter.
    let strategy = if s.connector_type == ConnectorType::Recording {
        json!({"type": "Recreate"})
    } else {
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}})
    };
    let mut d: Deployment = typed(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "spec": {
            "replicas": s.replicas,
            "strategy": strategy,
            "selector": {"matchLabels": selector_labels(COMPONENT, &name)},
            "template": {
                "metadata": {"labels": labels, "annotations": {pod::CONFIG_HASH: config_hash}},
                "spec": pod_spec,
            },
        }
    }))?;
    d.metadata = child_meta(pool, &workload_name(&name), COMPONENT);
    Ok(d)
}

/// Ingress only: the ops port, and SIP for telephony/room systems (from allowedSources when
/// set). Egress stays open: connectors reach the KMS, relays, and destinations the spec names
/// by URL or address (trunks, RTMP targets) that a NetworkPolicy cannot express by name.
pub fn network_policy(pool: &ConnectorPool) -> Result<NetworkPolicy, serde_json::Error> {
    let mut ingress = vec![json!({"ports": [{"protocol": "TCP", "port": HTTP_PORT}]})];
    if let Some((port, tr)) = sip_port(pool) {
        let proto = if tr == SipTransport::Udp {
            "UDP"
        } else {
            "TCP"
        };
        // RTP ports are chosen per call, so UDP stays open for the media legs of SIP pools.
        let mut rule = json!({"ports": [{"protocol": proto, "port": port}, {"protocol": "UDP"}]});
        let sources: Vec<_> = pool
            .spec
            .room_system
            .as_ref()
            .filter(|_| pool.spec.connector_type == ConnectorType::RoomSystem)
            .map(|r| {
                r.allowed_sources
                    .iter()
                    .map(|c| json!({"ipBlock": {"cidr": c}}))
                    .collect()
            })
            .unwrap_or_default();
        if !sources.is_empty() {
            rule["from"] = json!(sources);
        }
        ingress.push(rule);
    }
    let mut np: NetworkPolicy = typed(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "spec": {
            "podSelector": {"matchLabels": selector_labels(COMPONENT, &pool.name_any())},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        }
    }))?;
    np.metadata = child_meta(pool, &workload_name(&pool.name_any()), COMPONENT);
    Ok(np)
}
