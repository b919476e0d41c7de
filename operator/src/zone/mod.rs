//! MeetingZone: a StatefulSet of media-node relays that forward encrypted media they cannot read.

mod children;
mod reconcile;

pub use children::*;
pub use reconcile::{
    KIND, Resolved, reconcile, resolve_external, resolve_local, validate, validate_external,
};

use crate::kms::ServiceType;
use crate::shared::{ConnectorType, DURATION_PATTERN, ExternalKms, LocalRef, Placement};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A group of relays serving meetings, tied to one key management server.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "conclave.dev",
    version = "v1alpha1",
    kind = "MeetingZone",
    namespaced,
    doc = "A meeting zone: media-node relays that forward encrypted media they cannot read, tied to one key management server.",
    status = "MeetingZoneStatus",
    shortname = "mz",
    category = "conclave",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Relays","type":"integer","jsonPath":".status.readyRelays"}"#,
    printcolumn = r#"{"name":"KMS","type":"string","jsonPath":".status.kms.url"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("has(self.kmsRef) != has(self.externalKms)").message("set exactly one of kmsRef and externalKms"))]
#[x_kube(validation = Rule::new("!has(self.externalKms) || has(self.externalKms.ticketPublicKey)").message("externalKms.ticketPublicKey is required for a MeetingZone"))]
#[serde(rename_all = "camelCase")]
pub struct MeetingZoneSpec {
    /// The KeyManagementServer (same namespace) that places meetings on these relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_ref: Option<LocalRef>,
    /// A KMS running elsewhere (another cluster or data center) instead of kmsRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_kms: Option<ExternalKms>,
    /// The relays.
    #[serde(default)]
    pub relays: Relays,
    /// How clients reach the relays' UDP media port.
    #[serde(default)]
    pub media: MediaExposure,
    /// Encryption guarantees of meetings in this zone.
    #[serde(default)]
    pub encryption: Encryption,
    /// Capacity limits.
    #[serde(default)]
    pub limits: ZoneLimits,
    /// Container image of media-node. Defaults to the operator's `--relay-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// CPU and memory of each relay container. Defaults to 100m CPU and 64Mi memory requested,
    /// 512Mi memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selection, tolerations and affinity of the relay pods.
    #[serde(default)]
    pub placement: Placement,
    /// Lifetime of the relays' client certificates, e.g. `24h`; renewed at two thirds of it without
    /// restarting pods. At least `60s` (a shorter one would renew faster than Secrets reach the
    /// pods). Defaults to the operator's `--cert-lifetime` (chart value `certificates.lifetime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub certificate_lifetime: Option<String>,
}

/// Relay pool size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Relays {
    /// Number of relay pods (0 stops the zone without deleting it).
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
}

impl Default for Relays {
    fn default() -> Self {
        Self { replicas: 1 }
    }
}

fn one() -> i32 {
    1
}

/// How a relay's address is made reachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MediaMode {
    /// Clients send to the pod IP (clients inside the pod network, or routable pod IPs).
    #[default]
    PodIp,
    /// The relay uses the node's network namespace and advertises the node's IP.
    HostNetwork,
    /// One Service per relay pod (NodePort or LoadBalancer), see media.serviceType.
    Service,
}

/// Media exposure of the relays.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode == 'service' || self.serviceType == 'ClusterIP'").message("media.serviceType applies only to media.mode service"))]
#[x_kube(validation = Rule::new("self.mode != 'service' || self.serviceType != 'ClusterIP'").message("media.mode service needs media.serviceType NodePort or LoadBalancer"))]
pub struct MediaExposure {
    /// podIp, hostNetwork or service.
    #[serde(default)]
    pub mode: MediaMode,
    /// Type of the per-relay Services when mode is service (NodePort or LoadBalancer).
    #[serde(default)]
    pub service_type: ServiceType,
    /// UDP port of the media socket (container port, and Service port in mode service).
    #[serde(default = "default_udp_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub udp_port: i32,
    /// Host or IP clients are told to send to, instead of the discovered address. With several
    /// relays, `{ordinal}` is replaced by the relay's index (e.g. `relay-{ordinal}.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_address: Option<String>,
}

impl Default for MediaExposure {
    fn default() -> Self {
        Self {
            mode: MediaMode::PodIp,
            service_type: ServiceType::ClusterIP,
            udp_port: default_udp_port(),
            advertised_address: None,
        }
    }
}

fn default_udp_port() -> i32 {
    40000
}

/// Encryption mode of meetings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum EncryptionMode {
    /// Media encrypted by senders with keys only the KMS and participants (including invited
    /// connectors) hold.
    #[default]
    Enhanced,
    /// Reserved: keys never leave participants' devices. Not implemented yet; refused.
    EndToEnd,
}

/// Encryption settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Encryption {
    /// `enhanced` (the only mode implemented) or `endToEnd` (reserved).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == 'enhanced'").message("encryption.mode endToEnd is reserved and not implemented yet"))]
    pub mode: EncryptionMode,
    /// Connector types that hosts may invite into this zone's meetings. Empty: none.
    #[serde(default)]
    pub allowed_connectors: Vec<ConnectorType>,
}

/// Capacity limits of the zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZoneLimits {
    /// Most participants in one meeting.
    #[serde(default = "default_participants")]
    #[schemars(range(min = 2, max = 10000))]
    pub participants_per_meeting: i32,
    /// Most meetings placed on one relay.
    #[serde(default = "default_meetings")]
    #[schemars(range(min = 1, max = 100000))]
    pub meetings_per_relay: i32,
}

impl Default for ZoneLimits {
    fn default() -> Self {
        Self {
            participants_per_meeting: default_participants(),
            meetings_per_relay: default_meetings(),
        }
    }
}

fn default_participants() -> i32 {
    100
}
fn default_meetings() -> i32 {
    1000
}

/// Observed state of a MeetingZone.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeetingZoneStatus {
    /// Ready, Progressing and Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Relay pods that pass their readiness check.
    #[serde(default)]
    pub ready_relays: i32,
    /// `host:port` each relay advertises, by ordinal. Known for modes hostNetwork and podIp once
    /// pods run, for mode service once Services have node ports or load balancer addresses.
    #[serde(default)]
    pub relay_endpoints: Vec<String>,
    /// The KMS this zone uses and whether it is usable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<KmsReachability>,
}

/// KMS seen from a zone or pool.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KmsReachability {
    /// URL the relays or connectors use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// True when the KMS is known to serve: a referenced KeyManagementServer is Ready, or an
    /// external KMS accepted a TCP connection from the operator.
    pub reachable: bool,
    /// Why it is not reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
