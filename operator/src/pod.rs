//! What every Conclave pod and child object shares: labels, owner references and the
//! restricted security settings.

use k8s_openapi::api::core::v1::{
    Capabilities, ContainerPort, HTTPGetAction, PodSecurityContext, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;

pub const MANAGED_BY: &str = "conclave-operator";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Annotation on pod templates carrying a hash of the rendered node config, so a config
/// change rolls the pods (nodes read their config once at start-up).
pub const CONFIG_HASH: &str = "conclave.dev/config-hash";
/// Port of /healthz, /readyz and /metrics on every node.
pub const HTTP_PORT: i32 = 9090;
/// Where each node finds its config file.
pub const CONFIG_DIR: &str = "/etc/conclave";
pub const CONFIG_FILE: &str = "/etc/conclave/config.yaml";
/// Where each node finds its TLS identity (tls.crt, tls.key, ca.crt).
pub const TLS_DIR: &str = "/etc/conclave/tls";
/// Non-root user every node runs as.
pub const RUN_AS_USER: i64 = 65532;

/// Labels identifying the children of one resource's component, e.g. ("relay", "zone-a").
pub fn selector_labels(component: &str, instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), "conclave".to_string()),
        (LABEL_COMPONENT.to_string(), component.to_string()),
        (LABEL_INSTANCE.to_string(), instance.to_string()),
    ])
}

/// Selector labels plus the managed-by label: what every child object carries.
pub fn labels(component: &str, instance: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(component, instance);
    l.insert(LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string());
    l
}

/// Label selector string matching [`labels`].
pub fn selector_string(component: &str, instance: &str) -> String {
    labels(component, instance)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Controller owner reference to `owner`, so children are garbage-collected with it and
/// `Controller::owns` maps their events back.
pub fn owner_ref<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    // Objects from the API always have a uid; a missing one only happens in hand-built tests.
    owner
        .controller_owner_ref(&())
        .unwrap_or_else(|| OwnerReference {
            api_version: K::api_version(&()).into(),
            kind: K::kind(&()).into(),
            name: owner.name_any(),
            uid: String::new(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        })
}

/// Metadata of a child object named `name`, owned by `owner`.
pub fn child_meta<K: Resource<DynamicType = ()>>(
    owner: &K,
    name: &str,
    component: &str,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: owner.namespace(),
        labels: Some(labels(component, &owner.name_any())),
        owner_references: Some(vec![owner_ref(owner)]),
        ..Default::default()
    }
}

/// Pod-level security: non-root, fixed ids, RuntimeDefault seccomp.
pub fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        run_as_group: Some(RUN_AS_USER),
        fs_group: Some(RUN_AS_USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Container-level security: read-only root, no privilege escalation, every capability dropped.
pub fn container_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The spec's resources, or defaults with requests (so the scheduler can place pods) and a
/// memory limit.
pub fn resources(
    spec: Option<&ResourceRequirements>,
    cpu: &str,
    mem: &str,
    mem_limit: &str,
) -> ResourceRequirements {
    spec.cloned().unwrap_or_else(|| ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(mem.into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity(mem_limit.into()),
        )])),
        ..Default::default()
    })
}

pub fn http_port() -> ContainerPort {
    ContainerPort {
        name: Some("http".into()),
        container_port: HTTP_PORT,
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

pub fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        success_threshold: Some(1),
        initial_delay_seconds: Some(1),
        ..Default::default()
    }
}

/// Short hex SHA-256 of a rendered config.
pub fn config_hash(rendered: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(rendered.as_bytes())[..8])
}

/// Converts a JSON literal into a typed object. The literals are ours, so a failure is a bug
/// that the builder tests catch; it still surfaces as an error rather than a panic.
pub fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, serde_json::Error> {
    serde_json::from_value(v)
}

/// Placement fields of a pod spec as JSON (absent ones omitted).
pub fn placement_json(p: &crate::shared::Placement) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    if let Some(ns) = &p.node_selector {
        m.insert("nodeSelector".into(), serde_json::json!(ns));
    }
    if let Some(t) = &p.tolerations {
        m.insert("tolerations".into(), serde_json::json!(t));
    }
    if let Some(a) = &p.affinity {
        m.insert("affinity".into(), serde_json::json!(a));
    }
    m
}

/// Egress rule allowing DNS lookups (UDP and TCP 53) to anywhere.
pub fn dns_egress() -> serde_json::Value {
    serde_json::json!({"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]})
}

/// The container environment every node gets: its pod name, namespace and IPs.
pub fn downward_env() -> serde_json::Value {
    serde_json::json!([
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}
    ])
}
