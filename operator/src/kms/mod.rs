//! KeyManagementServer: the kms-node StatefulSet that owns every meeting key.

mod children;
mod reconcile;
#[cfg(test)]
mod remote_tests;

pub use children::*;
pub use reconcile::{FINALIZER, KIND, KmsInfo, parse_info, reconcile, validate};

use crate::shared::{DURATION_PATTERN, Placement, SecretKeyRef};

/// What `spec.recordingReaders` entries look like (kms-node checks the same).
const RECORDING_READER_PATTERN: &str = "^(conclave://.+|token:.+:.+)$";
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A key management server: issues meeting keys only to listed participants, signs relay
/// tickets and rosters, and writes every key release to a tamper-evident audit log first.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "conclave.dev",
    version = "v1alpha1",
    kind = "KeyManagementServer",
    namespaced,
    doc = "A key management server (kms-node): issues meeting keys only to listed participants, signs relay tickets and rosters, and audits every key release.",
    status = "KeyManagementServerStatus",
    shortname = "kms",
    category = "conclave",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct KeyManagementServerSpec {
    /// Number of kms-node pods. Must be 1: the KMS store does not replicate yet, so a second
    /// replica would hold a diverging copy of the keys. Larger values are refused.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1))]
    pub replicas: i32,
    /// Container image of kms-node. Defaults to the operator's `--kms-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// How participants and services reach the KMS.
    #[serde(default)]
    pub exposure: KmsExposure,
    /// Persistent storage of the key store and audit log.
    #[serde(default)]
    pub storage: KmsStorage,
    /// Source of the root key that wraps every key-encryption key. When absent the operator
    /// generates one into the Secret `<name>-kms-root-key`; such a key is development-grade
    /// (it lives in etcd next to the data it protects) and status says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_key: Option<RootKeySource>,
    /// Who may join meetings: the identity providers whose join tokens the KMS accepts.
    #[serde(default)]
    pub participant_auth: ParticipantAuth,
    /// How often keys rotate.
    #[serde(default)]
    pub key_rotation: KeyRotation,
    /// Audit log settings.
    #[serde(default)]
    pub audit: AuditSettings,
    /// Request limits of the KMS; fields left out take the KMS's defaults.
    #[serde(default)]
    pub limits: KmsLimits,
    /// CPU and memory requests/limits of the kms-node container. Defaults to 100m CPU and
    /// 128Mi memory requested, 512Mi memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selection, tolerations and affinity of the kms-node pods.
    #[serde(default)]
    pub placement: Placement,
    /// Lifetime of the KMS server certificate, e.g. `24h`; renewed at two thirds of it without
    /// restarting pods. At least `60s` (a shorter one would renew faster than Secrets reach the
    /// pods). Defaults to the operator's `--cert-lifetime` (chart value `certificates.lifetime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub certificate_lifetime: Option<String>,
    /// Relays and connector pools that run elsewhere (another namespace, cluster or data center)
    /// and reach this KMS through their `externalKms`. For each entry the operator issues a
    /// client certificate, signed by this namespace's CA, into the Secret
    /// `<name>-kms-remote-<entry name>-tls` (`tls.crt`, `tls.key`, `ca.crt`) for you to copy
    /// where the remote resource runs; connector entries are also granted their connector type,
    /// so the KMS assigns invitations to the remote pool. Removing an entry deletes its Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_clients: Vec<RemoteClient>,
    /// Who may read recordings after the meeting (unwrap their data keys), besides the
    /// recording pool that made them: `token:<issuer name>:<subject>` for a person with a join
    /// token from one of `participantAuth.issuers` (only recordings of the meeting the token
    /// names), or `conclave://<namespace>/<kind>/<name>` for a certificate of the namespace CA,
    /// e.g. the operator-issued admin certificate `conclave://<ns>/admin/<kms name>`. Every read
    /// and refusal is audited. Default: nobody but the recorder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = RECORDING_READER_PATTERN)))]
    pub recording_readers: Vec<String>,
}

/// What a remote client is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RemoteClientKind {
    /// The relays of a MeetingZone with `externalKms`. They share the one certificate, so the
    /// KMS sees them as one relay: give such a zone `relays.replicas: 1`.
    Relay,
    /// The pods of a ConnectorPool with `externalKms`.
    Connector,
}

/// A relay zone or connector pool elsewhere that this KMS serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind == 'connector' ? has(self.connectorType) : !has(self.connectorType)").message("remoteClients: connectorType is required for kind connector and not allowed for kind relay"))]
pub struct RemoteClient {
    /// Names this entry and its Secret `<kms>-kms-remote-<name>-tls`. A DNS label, unique in
    /// the list.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// `relay` for a MeetingZone, `connector` for a ConnectorPool.
    pub kind: RemoteClientKind,
    /// Namespace of the remote MeetingZone or ConnectorPool (in its own cluster). Part of the
    /// certificate's identity `conclave://<namespace>/<kind>/<resourceName>`.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Name of the remote MeetingZone or ConnectorPool. A relay registers under its zone's name,
    /// which must be this.
    #[schemars(length(min = 1, max = 63))]
    pub resource_name: String,
    /// What the remote pool does; required for kind `connector`, not allowed for `relay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector_type: Option<crate::shared::ConnectorType>,
}

fn one() -> i32 {
    1
}

/// Kubernetes Service types a participant-facing endpoint may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only (or through an Ingress/gateway you add).
    #[default]
    ClusterIP,
    /// Reachable on a port of every node.
    NodePort,
    /// Reachable through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Participant-facing exposure of the KMS HTTPS API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.nodePort) || self.serviceType == 'NodePort'").message("exposure.nodePort needs exposure.serviceType NodePort"))]
pub struct KmsExposure {
    /// Type of the `<name>-kms` Service.
    #[serde(default)]
    pub service_type: ServiceType,
    /// HTTPS port of the Service and the pod.
    #[serde(default = "default_kms_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Fixed node port when serviceType is NodePort (30000-32767); chosen by Kubernetes when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30000, max = 32767))]
    pub node_port: Option<i32>,
    /// URL participants are told to use, e.g. `https://kms.example.com`. Defaults to the
    /// in-cluster Service URL `https://<name>-kms.<namespace>.svc:<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('https://')").message("exposure.advertisedUrl must start with https://"))]
    pub advertised_url: Option<String>,
}

impl Default for KmsExposure {
    fn default() -> Self {
        Self {
            service_type: ServiceType::ClusterIP,
            port: default_kms_port(),
            node_port: None,
            advertised_url: None,
        }
    }
}

fn default_kms_port() -> i32 {
    8443
}

/// Persistent volume of the KMS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KmsStorage {
    /// Size of each pod's PersistentVolumeClaim, as a Kubernetes quantity.
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub size: String,
    /// StorageClass of the claims; the cluster default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Keep the PersistentVolumeClaims when this resource is deleted (default true: keys are data).
    /// Set false to delete them with the resource.
    #[serde(default = "yes")]
    pub retain_on_delete: bool,
}

impl Default for KmsStorage {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
            retain_on_delete: true,
        }
    }
}

fn default_storage_size() -> String {
    "1Gi".into()
}
fn yes() -> bool {
    true
}

/// Where the root key comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootKeySource {
    /// Secret holding 32 random bytes (raw or hex) under the key (default `root.key`).
    pub secret_ref: SecretKeyRef,
}

/// Identity providers whose join tokens the KMS accepts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParticipantAuth {
    /// Accepted token issuers. Without any, nobody can join a meeting.
    #[serde(default)]
    pub issuers: Vec<TokenIssuer>,
}

/// One identity provider (a meeting portal or IdP) that signs join tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenIssuer {
    /// Expected `iss` claim; also names the issuer in audit entries.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Secret holding the issuer's public keys as a JWKS document (key defaults to `jwks.json`).
    pub jwks_secret_ref: SecretKeyRef,
    /// Expected `aud` claim of the tokens.
    #[schemars(length(min = 1))]
    pub audience: String,
}

/// Key rotation schedule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRotation {
    /// How often a new key-encryption key (KEK) version is created, e.g. `720h`.
    #[serde(default = "default_kek_interval")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub kek_interval: String,
    /// Rotate the meeting key (new epoch) whenever a participant leaves, so the leaver
    /// cannot read what follows. Turning this off weakens the product's promise.
    #[serde(default = "yes")]
    pub meeting_key_on_leave: bool,
    /// Also rotate each meeting key on this interval, e.g. `1h`.
    #[serde(default = "default_meeting_interval")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub meeting_key_interval: String,
}

impl Default for KeyRotation {
    fn default() -> Self {
        Self {
            kek_interval: default_kek_interval(),
            meeting_key_on_leave: true,
            meeting_key_interval: default_meeting_interval(),
        }
    }
}

fn default_kek_interval() -> String {
    "720h".into()
}
fn default_meeting_interval() -> String {
    "1h".into()
}

/// Audit log settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditSettings {
    /// How long audit entries are kept, e.g. `2160h` (90 days).
    #[serde(default = "default_retention")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub retention: String,
    /// Most audit entries made durable by one commit (one fsync). Default 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub group_commit_max: Option<i32>,
    /// Microseconds a busy KMS (its last commit carried 4 or more requests) waits for more
    /// requests to share a commit; an idle one commits at once. Under load, fewer and larger
    /// commits leave more CPU for answering, at up to this much added latency. Default 1000;
    /// 0 commits whatever is queued at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub group_commit_linger_micros: Option<i32>,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            retention: default_retention(),
            group_commit_max: None,
            group_commit_linger_micros: None,
        }
    }
}

/// Request limits of the KMS. Requests beyond a rate are answered 429 with `Retry-After`.
/// The names are those of the kms-node config's `limits`, to which they are passed as set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KmsLimits {
    /// Sustained requests per second of one identity (a participant's session, a join token's
    /// subject, a service certificate). Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub per_identity_rps: Option<i32>,
    /// Requests one identity may make at once above its rate. Default 40.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub per_identity_burst: Option<i32>,
    /// Sustained requests per second concerning one meeting, from all its members. Default 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub per_meeting_rps: Option<i32>,
    /// Requests concerning one meeting at once above its rate. Default 400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub per_meeting_burst: Option<i32>,
    /// Requests handled at once by one KMS pod; beyond this it answers 429. Default 2048.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_in_flight: Option<i32>,
    /// Largest request body in bytes (join tokens travel in bodies). Default 16384.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 1048576))]
    pub max_body_bytes: Option<i32>,
    /// Most members (participants and connectors) of one meeting. A MeetingZone's
    /// `limits.participantsPerMeeting` caps its meetings too: the smaller applies. Default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 65000))]
    pub max_members: Option<i32>,
}

fn default_retention() -> String {
    "2160h".into()
}

/// Observed state of a KeyManagementServer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyManagementServerStatus {
    /// Ready, Progressing and Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kms-node pods that pass their readiness check.
    #[serde(default)]
    pub ready_replicas: i32,
    /// URL participants and services use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Hex Ed25519 public key that verifies relay tickets and rosters, read from the KMS's
    /// `/v1/info`. MeetingZones copy it into their relays' config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket_public_key: Option<String>,
    /// SHA-256 fingerprint (hex) of the ticket-signing public key that relays trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket_signing_key_fingerprint: Option<String>,
    /// Current KEK version, as reported by the KMS. Absent until the KMS reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_kek_version: Option<i64>,
    /// `generated (development-grade)` when the operator generated the root key, `secret` when
    /// it comes from spec.rootKey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_key: Option<String>,
}
