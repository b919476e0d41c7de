//! Children of a KeyManagementServer, built as pure functions of the resource.

use super::KeyManagementServer;
use crate::context::Settings;
use crate::pod::{self, CONFIG_FILE, HTTP_PORT, TLS_DIR, child_meta, selector_labels, typed};
use crate::shared::parse_duration;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use meeting_proto::config::kms::KmsConfig;
use serde_json::json;

pub const COMPONENT: &str = "kms";
pub const DATA_DIR: &str = "/var/lib/conclave-kms";
pub const ROOT_KEY_DIR: &str = "/etc/conclave/root-key";
pub const ISSUERS_DIR: &str = "/etc/conclave/issuers";
/// Key of the generated root key inside `<name>-kms-root-key`.
pub const GENERATED_ROOT_KEY: &str = "root.key";

/// Names of the children of KMS `name`.
pub fn workload_name(name: &str) -> String {
    format!("{name}-kms")
}
pub fn headless_name(name: &str) -> String {
    format!("{name}-kms-headless")
}
pub fn config_name(name: &str) -> String {
    format!("{name}-kms-config")
}
pub fn tls_name(name: &str) -> String {
    format!("{name}-kms-tls")
}
pub fn root_key_name(name: &str) -> String {
    format!("{name}-kms-root-key")
}
/// Secret with the client certificate of the KMS's admin identity.
pub fn admin_tls_name(name: &str) -> String {
    format!("{name}-kms-admin-tls")
}

/// Secret with the client certificate of remote client `entry` of KMS `name`.
pub fn remote_tls_name(name: &str, entry: &str) -> String {
    format!("{name}-kms-remote-{entry}-tls")
}
/// Prefix shared by every [`remote_tls_name`] of KMS `name`: Secrets with it whose entry left
/// `spec.remoteClients` are deleted.
pub fn remote_tls_prefix(name: &str) -> String {
    format!("{name}-kms-remote-")
}

/// The identity a remote client's certificate carries: `conclave://<namespace>/<kind>/<resourceName>`,
/// exactly what the remote MeetingZone's or ConnectorPool's local operator would have issued.
pub fn remote_identity(rc: &super::RemoteClient) -> Result<conclave_pki::Identity, String> {
    let kind = match rc.kind {
        super::RemoteClientKind::Relay => conclave_pki::Kind::Relay,
        super::RemoteClientKind::Connector => conclave_pki::Kind::Connector,
    };
    conclave_pki::Identity::new(rc.namespace.as_str(), kind, rc.resource_name.as_str())
        .map_err(|e| format!("{e}"))
}

/// Grants for the connector entries of `spec.remoteClients` (invalid entries are left to
/// `validate`, which runs first).
pub fn remote_grants(kms: &KeyManagementServer) -> Vec<PoolGrant> {
    kms.spec
        .remote_clients
        .iter()
        .filter(|rc| rc.kind == super::RemoteClientKind::Connector)
        .filter_map(|rc| {
            let t = rc.connector_type?;
            Some((remote_identity(rc).ok()?.to_uri(), crate::pool::kind_of(t)))
        })
        .collect()
}

/// The identity allowed to read and verify the audit log and export rosters. The operator
/// issues its certificate into [`admin_tls_name`], so who may audit is decided by Kubernetes
/// RBAC on that one Secret rather than by a CA key handed to people.
pub fn admin_identity(kms: &KeyManagementServer) -> Result<conclave_pki::Identity, String> {
    conclave_pki::Identity::new(
        kms.namespace().unwrap_or_default(),
        conclave_pki::Kind::Admin,
        kms.name_any(),
    )
    .map_err(|e| format!("admin identity: {e}"))
}

/// In-cluster URL of KMS `name` in `ns`: what relays and connectors use.
pub fn internal_url(name: &str, ns: &str, port: i32) -> String {
    format!("https://{}.{ns}.svc:{port}", workload_name(name))
}

/// DNS names the KMS server certificate covers.
pub fn server_dns_names(kms: &KeyManagementServer, domain: &str) -> Vec<String> {
    let ns = kms.namespace().unwrap_or_default();
    let svc = workload_name(&kms.name_any());
    let mut names = vec![
        svc.clone(),
        format!("{svc}.{ns}"),
        format!("{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.{domain}"),
        format!("*.{}.{ns}.svc", headless_name(&kms.name_any())),
        format!("*.{}.{ns}.svc.{domain}", headless_name(&kms.name_any())),
    ];
    if let Some(host) = kms
        .spec
        .exposure
        .advertised_url
        .as_deref()
        .and_then(|u| u.strip_prefix("https://"))
        .map(|h| h.split(['/', ':']).next().unwrap_or(h))
        .filter(|h| !h.is_empty() && h.parse::<std::net::IpAddr>().is_err())
    {
        names.push(host.to_string());
    }
    names
}

/// Connector pools the KMS must accept, as (identity prefix, type).
pub type PoolGrant = (String, meeting_proto::kms_api::ConnectorKind);

/// The kms-node config. `pools` come from the ConnectorPools that reach this KMS.
pub fn config(kms: &KeyManagementServer, pools: &[PoolGrant]) -> Result<KmsConfig, String> {
    let s = &kms.spec;
    let dur = |field: &str, v: &str| {
        parse_duration(v).ok_or(format!(
            "{field}: {v:?} is not a duration like 90s, 15m, 12h or 30d"
        ))
    };
    let root_key_file = match &s.root_key {
        Some(r) => format!("{ROOT_KEY_DIR}/{}", r.secret_ref.key_or("root.key")),
        None => format!("{ROOT_KEY_DIR}/{GENERATED_ROOT_KEY}"),
    };
    let issuers: Vec<_> = s
        .participant_auth
        .issuers
        .iter()
        .enumerate()
        .map(|(i, iss)| {
            json!({
                "issuer": iss.name,
                "jwksFile": format!("{ISSUERS_DIR}/{i}/{}", iss.jwks_secret_ref.key_or("jwks.json")),
                "audience": iss.audience,
            })
        })
        .collect();
    let pools: Vec<_> = pools
        .iter()
        .map(|(identity, kind)| json!({"identity": identity, "kind": kind}))
        .collect();
    let retention = dur("spec.audit.retention", &s.audit.retention)?;
    // Fields left out of the spec are left out here too: the kms-node's defaults apply.
    let mut audit = json!({"retentionDays": retention.as_secs().div_ceil(86_400)});
    if let Some(n) = s.audit.group_commit_max {
        audit["groupCommitMax"] = n.into();
    }
    if let Some(us) = s.audit.group_commit_linger_micros {
        audit["groupCommitLingerMicros"] = us.into();
    }
    let v = json!({
        "listen": format!("0.0.0.0:{}", s.exposure.port),
        "opsListen": format!("0.0.0.0:{HTTP_PORT}"),
        "dataDir": DATA_DIR,
        "tls": {
            "certFile": format!("{TLS_DIR}/tls.crt"),
            "keyFile": format!("{TLS_DIR}/tls.key"),
            "clientCaFile": format!("{TLS_DIR}/ca.crt"),
        },
        "rootKey": {"file": root_key_file},
        "issuers": issuers,
        "rotation": {
            "meetingKeyIntervalS": dur("spec.keyRotation.meetingKeyInterval", &s.key_rotation.meeting_key_interval)?.as_secs(),
            "kekIntervalS": dur("spec.keyRotation.kekInterval", &s.key_rotation.kek_interval)?.as_secs(),
        },
        "audit": audit,
        "limits": s.limits,
        "admins": [admin_identity(kms)?.to_uri()],
        "recordingKeyReaders": s.recording_readers,
        "connectorPools": pools,
    });
    let config: KmsConfig = serde_json::from_value(v).map_err(|e| format!("kms config: {e}"))?;
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

pub fn service_account(kms: &KeyManagementServer) -> ServiceAccount {
    ServiceAccount {
        metadata: child_meta(kms, &workload_name(&kms.name_any()), COMPONENT),
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

pub fn config_map(kms: &KeyManagementServer, rendered: &str) -> ConfigMap {
    ConfigMap {
        metadata: child_meta(kms, &config_name(&kms.name_any()), COMPONENT),
        data: Some([("config.yaml".to_string(), rendered.to_string())].into()),
        ..Default::default()
    }
}

/// The generated root key Secret (only when spec.rootKey is absent). `key` is 32 random bytes,
/// kept from the live Secret once generated.
pub fn root_key_secret(kms: &KeyManagementServer, key: Vec<u8>) -> Secret {
    Secret {
        metadata: child_meta(kms, &root_key_name(&kms.name_any()), COMPONENT),
        type_: Some("Opaque".into()),
        data: Some([(GENERATED_ROOT_KEY.to_string(), k8s_openapi::ByteString(key))].into()),
        ..Default::default()
    }
}

pub fn service(kms: &KeyManagementServer) -> Result<Service, serde_json::Error> {
    let e = &kms.spec.exposure;
    let mut port =
        json!({"name": "https", "port": e.port, "targetPort": "https", "protocol": "TCP"});
    if let Some(np) = e.node_port {
        port["nodePort"] = json!(np);
    }
    let mut svc: Service = typed(json!({
        "apiVersion": "v1", "kind": "Service",
        "spec": {
            "type": e.service_type.as_str(),
            "selector": selector_labels(COMPONENT, &kms.name_any()),
            "ports": [port],
        }
    }))?;
    svc.metadata = child_meta(kms, &workload_name(&kms.name_any()), COMPONENT);
    Ok(svc)
}

pub fn headless_service(kms: &KeyManagementServer) -> Result<Service, serde_json::Error> {
    let mut svc: Service = typed(json!({
        "apiVersion": "v1", "kind": "Service",
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": selector_labels(COMPONENT, &kms.name_any()),
            "ports": [{"name": "https", "port": kms.spec.exposure.port, "targetPort": "https", "protocol": "TCP"}],
        }
    }))?;
    svc.metadata = child_meta(kms, &headless_name(&kms.name_any()), COMPONENT);
    Ok(svc)
}

pub fn stateful_set(
    kms: &KeyManagementServer,
    settings: &Settings,
    config_hash: &str,
) -> Result<StatefulSet, serde_json::Error> {
    let name = kms.name_any();
    let s = &kms.spec;
    let labels = pod::labels(COMPONENT, &name);
    let root_secret = match &s.root_key {
        Some(r) => r.secret_ref.name.clone(),
        None => root_key_name(&name),
    };
    let mut volumes = vec![
        json!({"name": "config", "configMap": {"name": config_name(&name)}}),
        json!({"name": "tls", "secret": {"secretName": tls_name(&name)}}),
        json!({"name": "root-key", "secret": {"secretName": root_secret, "defaultMode": 0o400}}),
        json!({"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}),
    ];
    let mut mounts = vec![
        json!({"name": "config", "mountPath": pod::CONFIG_DIR, "readOnly": true}),
        json!({"name": "tls", "mountPath": TLS_DIR, "readOnly": true}),
        json!({"name": "root-key", "mountPath": ROOT_KEY_DIR, "readOnly": true}),
        json!({"name": "tmp", "mountPath": "/tmp"}),
        json!({"name": "data", "mountPath": DATA_DIR}),
    ];
    for (i, iss) in s.participant_auth.issuers.iter().enumerate() {
        volumes.push(json!({"name": format!("issuer-{i}"), "secret": {"secretName": iss.jwks_secret_ref.name}}));
        mounts.push(json!({"name": format!("issuer-{i}"), "mountPath": format!("{ISSUERS_DIR}/{i}"), "readOnly": true}));
    }
    let mut pod_spec = json!({
        "serviceAccountName": workload_name(&name),
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "securityContext": pod::pod_security_context(),
        "terminationGracePeriodSeconds": 30,
        "containers": [{
            "name": "kms",
            "image": s.image.clone().unwrap_or_else(|| settings.kms_image.clone()),
            "imagePullPolicy": settings.image_pull_policy,
            "args": ["serve", "--config", CONFIG_FILE],
            "env": pod::downward_env(),
            "ports": [
                {"name": "https", "containerPort": s.exposure.port, "protocol": "TCP"},
                pod::http_port(),
            ],
            "readinessProbe": pod::probe("/readyz", 5),
            "livenessProbe": pod::probe("/healthz", 10),
            "resources": pod::resources(s.resources.as_ref(), "100m", "128Mi", "512Mi"),
            "securityContext": pod::container_security_context(),
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    });
    if let Some(obj) = pod_spec.as_object_mut() {
        obj.extend(pod::placement_json(&s.placement));
    }
    let mut claim = json!({
        "metadata": {"name": "data", "labels": labels},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": s.storage.size}},
        }
    });
    if let Some(sc) = &s.storage.storage_class_name {
        claim["spec"]["storageClassName"] = json!(sc);
    }
    let mut sts: StatefulSet = typed(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "spec": {
            "replicas": s.replicas,
            "serviceName": headless_name(&name),
            "podManagementPolicy": "OrderedReady",
            "selector": {"matchLabels": selector_labels(COMPONENT, &name)},
            "template": {
                "metadata": {"labels": labels, "annotations": {pod::CONFIG_HASH: config_hash}},
                "spec": pod_spec,
            },
            "volumeClaimTemplates": [claim],
        }
    }))?;
    sts.metadata = child_meta(kms, &workload_name(&name), COMPONENT);
    Ok(sts)
}

pub fn pdb(kms: &KeyManagementServer) -> Result<PodDisruptionBudget, serde_json::Error> {
    let mut p: PodDisruptionBudget = typed(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(COMPONENT, &kms.name_any())}}
    }))?;
    p.metadata = child_meta(kms, &workload_name(&kms.name_any()), COMPONENT);
    Ok(p)
}

/// Ingress: the HTTPS API (participants come from anywhere) and the ops port. Egress: DNS only;
/// the KMS calls nobody.
pub fn network_policy(kms: &KeyManagementServer) -> Result<NetworkPolicy, serde_json::Error> {
    let mut np: NetworkPolicy = typed(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "spec": {
            "podSelector": {"matchLabels": selector_labels(COMPONENT, &kms.name_any())},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"ports": [{"protocol": "TCP", "port": kms.spec.exposure.port}]},
                {"ports": [{"protocol": "TCP", "port": HTTP_PORT}]},
            ],
            "egress": [pod::dns_egress()],
        }
    }))?;
    np.metadata = child_meta(kms, &workload_name(&kms.name_any()), COMPONENT);
    Ok(np)
}
