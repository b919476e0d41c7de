//! ConnectorPool: connector-node pods of one type (recording, live streaming, telephony,
//! room systems). Connectors are participants: they join only when a host invites them.

mod children;
mod reconcile;

pub use children::*;
pub use reconcile::{KIND, SESSION_GAUGES, reconcile, sessions_in_exposition, validate};

use crate::shared::{
    ConnectorType, DURATION_PATTERN, ExternalKms, LocalRef, Placement, SecretKeyRef,
};
use crate::zone::KmsReachability;
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pool of connectors of one type serving a MeetingZone.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "conclave.dev",
    version = "v1alpha1",
    kind = "ConnectorPool",
    namespaced,
    doc = "A connector pool: connector-node pods of one type (recording, liveStreaming, telephony, roomSystem) that join meetings only when a host invites them.",
    status = "ConnectorPoolStatus",
    shortname = "cp",
    category = "conclave",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"KMS","type":"string","jsonPath":".status.kms.url"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("has(self.zoneRef) != has(self.externalKms)").message("set exactly one of zoneRef and externalKms"))]
#[x_kube(validation = Rule::new("self.type != 'recording' || has(self.recording)").message("type recording needs the recording settings"))]
#[x_kube(validation = Rule::new("self.type != 'liveStreaming' || has(self.liveStreaming)").message("type liveStreaming needs the liveStreaming settings"))]
#[x_kube(validation = Rule::new("self.type != 'telephony' || has(self.telephony)").message("type telephony needs the telephony settings"))]
#[serde(rename_all = "camelCase")]
pub struct ConnectorPoolSpec {
    /// The MeetingZone (same namespace) whose meetings these connectors join.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_ref: Option<LocalRef>,
    /// A KMS running elsewhere, for a pool that serves a zone in another cluster or data center.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_kms: Option<ExternalKms>,
    /// What the connectors do: recording, liveStreaming, telephony or roomSystem.
    #[serde(rename = "type")]
    pub connector_type: ConnectorType,
    /// Number of connector pods; each handles several sessions.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Settings of type recording.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<RecordingSettings>,
    /// Settings of type liveStreaming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_streaming: Option<StreamingSettings>,
    /// Settings of type telephony.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telephony: Option<TelephonySettings>,
    /// Settings of type roomSystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_system: Option<RoomSystemSettings>,
    /// Container image of connector-node. Defaults to the operator's `--connector-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// CPU and memory of each connector container. Defaults to 100m CPU and 128Mi memory
    /// requested, 1Gi memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selection, tolerations and affinity of the connector pods.
    #[serde(default)]
    pub placement: Placement,
    /// Lifetime of the connectors' certificate, e.g. `24h`; renewed at two thirds of it without
    /// restarting pods. At least `60s` (a shorter one would renew faster than Secrets reach the
    /// pods). Defaults to the operator's `--cert-lifetime` (chart value `certificates.lifetime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub certificate_lifetime: Option<String>,
}

fn one() -> i32 {
    1
}

/// Recording storage and retention.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordingSettings {
    /// Size of the recordings PersistentVolumeClaim `<name>-recordings` shared by the pool.
    #[serde(default = "default_recording_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub storage_size: String,
    /// StorageClass of the recordings claim; the cluster default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// How long recordings are kept before the connector deletes them, e.g. `720h`.
    #[serde(default = "default_recording_retention")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub retention: String,
}

fn default_recording_size() -> String {
    "10Gi".into()
}
fn default_recording_retention() -> String {
    "720h".into()
}

/// Live streaming targets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamingSettings {
    /// RTMP/RTMPS URL prefixes a host may stream to, e.g. `rtmps://live.example.com/app/`.
    /// Anything else is refused.
    #[schemars(length(min = 1))]
    pub allowed_targets: Vec<String>,
    /// Secret with stream keys or credentials, mounted read-only at /etc/conclave/streaming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<LocalRef>,
    /// Secret with the CA certificate (PEM; key `ca.crt` unless `key` says otherwise) that
    /// verifies `rtmps://` targets. Without it the system trust store of the connector image
    /// does. Verification is never skipped: a target whose certificate does not verify is
    /// refused, and the pool's status and `conclave_connector_stream_tls_verify_failures_total`
    /// say so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ca_secret_ref: Option<SecretKeyRef>,
}

/// SIP signalling transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SipTransport {
    Udp,
    Tcp,
    /// SIP over TLS (recommended).
    #[default]
    Tls,
}

/// Whether media towards SIP peers uses SRTP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SrtpPolicy {
    /// Calls without SRTP are refused.
    #[default]
    Required,
    /// SRTP when the peer offers it, RTP otherwise.
    Preferred,
    /// Plain RTP.
    Off,
}

/// Telephony through a SIP trunk or PBX.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.srtp == 'off' || self.transport == 'tls'").message("telephony.srtp needs telephony.transport tls (SDES keys must not travel in clear)"))]
#[x_kube(validation = Rule::new("self.transport != 'tls' || has(self.trunkCaSecretRef)").message("telephony.trunkCaSecretRef is required with transport tls"))]
pub struct TelephonySettings {
    /// `host:port` of the SIP trunk or PBX.
    #[schemars(length(min = 1))]
    pub trunk_address: String,
    /// Signalling transport.
    #[serde(default)]
    pub transport: SipTransport,
    /// Secret with `username` and `password` for the trunk (digest authentication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<LocalRef>,
    /// SRTP policy for the phone leg.
    #[serde(default)]
    pub srtp: SrtpPolicy,
    /// Secret with the PEM CA bundle that verifies the trunk's TLS certificate (key defaults to
    /// `ca.crt`). Required with transport tls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk_ca_secret_ref: Option<SecretKeyRef>,
    /// Dial-in numbers and the meeting each one joins.
    #[serde(default)]
    pub dial_in: Vec<DialIn>,
}

/// One dial-in number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DialIn {
    /// Called number as the trunk presents it, e.g. `+4930123456`.
    #[schemars(length(min = 1, max = 32))]
    pub number: String,
    /// Meeting id callers of this number join.
    #[schemars(length(min = 1, max = 64))]
    pub meeting_id: String,
}

/// SIP room systems.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.srtp == 'off' || self.transport == 'tls'").message("roomSystem.srtp needs roomSystem.transport tls"))]
pub struct RoomSystemSettings {
    /// Signalling transport the connectors listen on.
    #[serde(default)]
    pub transport: SipTransport,
    /// SRTP policy towards room systems.
    #[serde(default)]
    pub srtp: SrtpPolicy,
    /// Secret with the PEM CA bundle that verifies room systems' TLS certificates (key defaults
    /// to `ca.crt`). Defaults to the namespace CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// CIDRs room systems call from: the pool's NetworkPolicy admits SIP and media only from
    /// these (on a CNI that enforces NetworkPolicies; connector-node itself does not check the
    /// source). Empty: any source.
    #[serde(default)]
    pub allowed_sources: Vec<String>,
}

/// Observed state of a ConnectorPool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorPoolStatus {
    /// Ready, Progressing and Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Connector pods that pass their readiness check.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Sessions (recordings, streams, calls) in progress, as reported by the connectors.
    /// Absent until connectors report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_sessions: Option<i64>,
    /// The KMS the connectors use and whether it is usable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<KmsReachability>,
}
