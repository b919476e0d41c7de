//! kms-node configuration: what the operator renders into the KMS ConfigMap.
//!
//! YAML or JSON (field names in camelCase). Every field has a default except
//! the few that have no safe one (TLS files, root key file, issuers are
//! optional but then no participant can join). [`KmsConfig::validate`]
//! returns every problem found, each naming the field.
//!
//! ```yaml
//! listen: 0.0.0.0:8443                 # HTTPS API (default)
//! opsListen: 0.0.0.0:9090              # plain /healthz /readyz /metrics (default; null = off)
//! dataDir: /var/lib/conclave-kms       # redb store on the PVC (default)
//! tls:
//!   certFile: /etc/conclave/tls/tls.crt
//!   keyFile: /etc/conclave/tls/tls.key
//!   clientCaFile: /etc/conclave/tls/ca.crt
//! rootKey: {file: /etc/conclave/root/root.key, generateIfMissing: false}
//! issuers:
//!   - {issuer: portal, jwksFile: /etc/conclave/issuers/0/jwks.json, audience: conclave}
//! rotation: {meetingKeyIntervalS: 3600, kekIntervalS: 2592000, kekRetireAfterS: 31536000}
//! audit: {retentionDays: 400, groupCommitMax: 512}
//! limits: {perIdentityRps: 20, perIdentityBurst: 40, perMeetingRps: 200, perMeetingBurst: 400,
//!          maxInFlight: 2048, maxBodyBytes: 16384, maxMembers: 1000}
//! relays: {heartbeatIntervalMs: 5000, heartbeatTimeoutMs: 15000, zone: null}
//! connectorPools:
//!   - {identity: "conclave://ns/connector/rec", kind: recording}
//! admins: ["conclave://ns/operator/conclave"]
//! recordingKeyReaders: ["token:portal:auditor", "conclave://ns/recording-reader/legal"]
//! ticketLifetimeS: 900
//! ```

use crate::kms_api::ConnectorKind;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KmsConfig {
    /// HTTPS API address. Default `0.0.0.0:8443`.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Plain-HTTP address for `/healthz`, `/readyz` and `/metrics` (probes and
    /// Prometheus scrape without a client certificate). Default `0.0.0.0:9090`;
    /// `null` serves them only on the HTTPS listener.
    #[serde(default = "defaults::ops_listen")]
    pub ops_listen: Option<SocketAddr>,
    /// Directory on the persistent volume holding the store. Default `/var/lib/conclave-kms`.
    #[serde(default = "defaults::data_dir")]
    pub data_dir: PathBuf,
    /// Server certificate, key and the CA that client certificates must chain to.
    pub tls: TlsFiles,
    /// Where the root key comes from.
    pub root_key: RootKeySource,
    /// Join-token issuers. Empty: no participant can join (services still work).
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
    /// Key rotation schedule.
    #[serde(default)]
    pub rotation: RotationConfig,
    /// Audit log retention.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Rate and size limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Relay liveness and placement.
    #[serde(default)]
    pub relays: RelayConfig,
    /// Connector pools allowed to pick up invitations, by pool name. Empty: no
    /// connector can join.
    #[serde(default)]
    pub connector_pools: Vec<ConnectorPoolConfig>,
    /// Identities (certificate URIs like `conclave://ns/operator/conclave`)
    /// allowed to read and verify the audit log and run admin actions. Default empty.
    #[serde(default)]
    pub admins: Vec<String>,
    /// Who may unwrap recording data keys after the meeting: certificate
    /// identities (`conclave://...`) or token subjects written `token:<iss>:<sub>`.
    /// The connector that created a key may always unwrap it. Default empty.
    #[serde(default)]
    pub recording_key_readers: Vec<String>,
    /// Lifetime of relay tickets in seconds. Default 900; clients renew via events.
    #[serde(default = "defaults::ticket_lifetime_s")]
    pub ticket_lifetime_s: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain of the KMS server. Reloaded when it changes.
    pub cert_file: PathBuf,
    /// PEM private key of the KMS server.
    pub key_file: PathBuf,
    /// PEM CA bundle that client certificates (relays, connectors, the
    /// operator, admins) must chain to: the operator's CA. Reloaded when it changes.
    pub client_ca_file: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RootKeySource {
    /// File holding the 32-byte root key (raw or 64 hex characters), usually
    /// mounted from a Secret.
    pub file: PathBuf,
    /// Create the file with a random key if it is missing. Dev only; default false.
    #[serde(default)]
    pub generate_if_missing: bool,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuerConfig {
    /// Expected `iss` claim; also the name used in audit entries.
    pub issuer: String,
    /// JWKS file with the issuer's public keys (EdDSA/Ed25519 or ES256). Reloaded when it changes.
    pub jwks_file: PathBuf,
    /// The `aud` value tokens must carry for this KMS.
    pub audience: String,
}

impl fmt::Debug for IssuerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerConfig")
            .field("issuer", &self.issuer)
            .field("jwks_file", &self.jwks_file)
            .field("audience", &self.audience)
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotationConfig {
    /// Rotate every meeting key at least this often, in seconds, even when
    /// nobody leaves. Default 3600. 0 disables interval rotation.
    #[serde(default = "defaults::meeting_key_interval_s")]
    pub meeting_key_interval_s: u64,
    /// Create a new KEK this often, in seconds. Default 2,592,000 (30 days).
    #[serde(default = "defaults::kek_interval_s")]
    pub kek_interval_s: u64,
    /// Keep old KEK versions for unwrapping this long after they stop being
    /// current, in seconds. Default 31,536,000 (365 days), so recordings stay readable.
    #[serde(default = "defaults::kek_retire_after_s")]
    pub kek_retire_after_s: u64,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            meeting_key_interval_s: defaults::meeting_key_interval_s(),
            kek_interval_s: defaults::kek_interval_s(),
            kek_retire_after_s: defaults::kek_retire_after_s(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditConfig {
    /// Drop audit entries older than this many days (the chain keeps its
    /// checkpoint, so verification still covers what remains). Default 400; 0 keeps everything.
    #[serde(default = "defaults::audit_retention_days")]
    pub retention_days: u64,
    /// Most audit entries committed in one fsync. Default 512.
    #[serde(default = "defaults::group_commit_max")]
    pub group_commit_max: usize,
    /// Microseconds a busy KMS waits after a request's changes are queued
    /// for more to join the same commit (busy: the last commit carried 4 or
    /// more requests; an idle KMS commits at once). Under load, fewer and
    /// larger commits leave more CPU for answering. Default 1000, at most
    /// 100000; 0 commits whatever is queued at once.
    #[serde(default = "defaults::group_commit_linger_micros")]
    pub group_commit_linger_micros: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: defaults::audit_retention_days(),
            group_commit_max: defaults::group_commit_max(),
            group_commit_linger_micros: defaults::group_commit_linger_micros(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsConfig {
    /// Sustained requests per second per identity (participant session,
    /// token subject or certificate). Default 20.
    #[serde(default = "defaults::per_identity_rps")]
    pub per_identity_rps: u32,
    /// Burst per identity. Default 40.
    #[serde(default = "defaults::per_identity_burst")]
    pub per_identity_burst: u32,
    /// Sustained requests per second per meeting. Default 200.
    #[serde(default = "defaults::per_meeting_rps")]
    pub per_meeting_rps: u32,
    /// Burst per meeting. Default 400.
    #[serde(default = "defaults::per_meeting_burst")]
    pub per_meeting_burst: u32,
    /// Requests handled at once; beyond this the KMS answers 429. Default 2048.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: usize,
    /// Largest request body in bytes. Default 16384.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    /// Most members in one meeting. Default 1000.
    #[serde(default = "defaults::max_members")]
    pub max_members: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            per_identity_rps: defaults::per_identity_rps(),
            per_identity_burst: defaults::per_identity_burst(),
            per_meeting_rps: defaults::per_meeting_rps(),
            per_meeting_burst: defaults::per_meeting_burst(),
            max_in_flight: defaults::max_in_flight(),
            max_body_bytes: defaults::max_body_bytes(),
            max_members: defaults::max_members(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayConfig {
    /// How often relays are told to heartbeat, in milliseconds. Default 5000.
    #[serde(default = "defaults::heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// A relay silent for this long (milliseconds) gets no new meetings and
    /// its meetings are re-placed. Default 15000.
    #[serde(default = "defaults::heartbeat_timeout_ms")]
    pub heartbeat_timeout_ms: u64,
    /// Zone of meetings when the relay's zone cannot be chosen otherwise:
    /// meetings are placed on relays of this zone. `null`: any zone. Default `null`.
    #[serde(default)]
    pub zone: Option<String>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: defaults::heartbeat_interval_ms(),
            heartbeat_timeout_ms: defaults::heartbeat_timeout_ms(),
            zone: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectorPoolConfig {
    /// Identity prefix of the pool's pods, e.g. `conclave://ns/connector/rec`:
    /// a certificate `conclave://ns/connector/rec/rec-0` belongs to this pool.
    pub identity: String,
    /// What the pool's pods are.
    pub kind: ConnectorKind,
}

mod defaults {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    pub fn listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 8443))
    }
    pub fn ops_listen() -> Option<SocketAddr> {
        Some(SocketAddr::from(([0, 0, 0, 0], 9090)))
    }
    pub fn data_dir() -> PathBuf {
        PathBuf::from("/var/lib/conclave-kms")
    }
    pub fn ticket_lifetime_s() -> u64 {
        900
    }
    pub fn meeting_key_interval_s() -> u64 {
        3600
    }
    pub fn kek_interval_s() -> u64 {
        30 * 86_400
    }
    pub fn kek_retire_after_s() -> u64 {
        365 * 86_400
    }
    pub fn audit_retention_days() -> u64 {
        400
    }
    pub fn group_commit_max() -> usize {
        512
    }
    pub fn group_commit_linger_micros() -> u64 {
        1000
    }
    pub fn per_identity_rps() -> u32 {
        20
    }
    pub fn per_identity_burst() -> u32 {
        40
    }
    pub fn per_meeting_rps() -> u32 {
        200
    }
    pub fn per_meeting_burst() -> u32 {
        400
    }
    pub fn max_in_flight() -> usize {
        2048
    }
    pub fn max_body_bytes() -> usize {
        16 * 1024
    }
    pub fn max_members() -> usize {
        1000
    }
    pub fn heartbeat_interval_ms() -> u64 {
        5000
    }
    pub fn heartbeat_timeout_ms() -> u64 {
        15_000
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid kms config: {}", .0.join("; "))]
pub struct ConfigErrors(pub Vec<String>);

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("kms config is not valid YAML/JSON: {0}")]
    Syntax(String),
    #[error(transparent)]
    Invalid(#[from] ConfigErrors),
}

/// Whether `reader` names a recording reader: a certificate identity (`conclave://...`) or a
/// token subject written `token:<issuer>:<subject>`.
pub fn is_recording_reader(reader: &str) -> bool {
    reader.starts_with("conclave://")
        || reader
            .strip_prefix("token:")
            .is_some_and(|r| r.contains(':'))
}

impl KmsConfig {
    /// Parses YAML (JSON is YAML) and validates.
    pub fn from_yaml(text: &str) -> Result<Self, ParseError> {
        let config: Self =
            serde_yaml_ng::from_str(text).map_err(|e| ParseError::Syntax(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Every problem in the config, each naming its field.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, msg: &str| {
            if !ok {
                errors.push(msg.to_owned());
            }
        };
        check(
            !self.data_dir.as_os_str().is_empty(),
            "dataDir must not be empty",
        );
        check(
            !self.tls.cert_file.as_os_str().is_empty() && !self.tls.key_file.as_os_str().is_empty(),
            "tls.certFile and tls.keyFile must be set",
        );
        check(
            !self.tls.client_ca_file.as_os_str().is_empty(),
            "tls.clientCaFile must be set",
        );
        check(
            !self.root_key.file.as_os_str().is_empty(),
            "rootKey.file must be set",
        );
        check(
            (30..=86_400).contains(&self.ticket_lifetime_s),
            "ticketLifetimeS must be between 30 and 86400 seconds",
        );
        let r = &self.rotation;
        check(
            r.meeting_key_interval_s == 0 || r.meeting_key_interval_s >= 10,
            "rotation.meetingKeyIntervalS must be 0 (off) or at least 10 seconds",
        );
        check(
            r.kek_interval_s >= 60,
            "rotation.kekIntervalS must be at least 60 seconds",
        );
        check(
            r.kek_retire_after_s >= r.kek_interval_s,
            "rotation.kekRetireAfterS must be at least rotation.kekIntervalS",
        );
        check(
            (1..=65_536).contains(&self.audit.group_commit_max),
            "audit.groupCommitMax must be between 1 and 65536",
        );
        check(
            self.audit.group_commit_linger_micros <= 100_000,
            "audit.groupCommitLingerMicros must be at most 100000 (0.1 s)",
        );
        let l = &self.limits;
        check(
            l.per_identity_rps > 0 && l.per_identity_burst > 0,
            "limits.perIdentityRps and perIdentityBurst must be positive",
        );
        check(
            l.per_meeting_rps > 0 && l.per_meeting_burst > 0,
            "limits.perMeetingRps and perMeetingBurst must be positive",
        );
        check(l.max_in_flight > 0, "limits.maxInFlight must be positive");
        check(
            (1024..=1 << 20).contains(&l.max_body_bytes),
            "limits.maxBodyBytes must be between 1024 and 1048576",
        );
        check(
            (2..=65_000).contains(&l.max_members),
            "limits.maxMembers must be between 2 and 65000",
        );
        let rel = &self.relays;
        check(
            rel.heartbeat_interval_ms >= 100,
            "relays.heartbeatIntervalMs must be at least 100",
        );
        check(
            rel.heartbeat_timeout_ms > rel.heartbeat_interval_ms,
            "relays.heartbeatTimeoutMs must exceed relays.heartbeatIntervalMs",
        );
        for (i, issuer) in self.issuers.iter().enumerate() {
            check(
                !issuer.issuer.is_empty(),
                &format!("issuers[{i}].issuer must not be empty"),
            );
            check(
                !issuer.audience.is_empty(),
                &format!("issuers[{i}].audience must not be empty"),
            );
            check(
                !issuer.jwks_file.as_os_str().is_empty(),
                &format!("issuers[{i}].jwksFile must be set"),
            );
            let duplicate = self.issuers[..i].iter().any(|o| o.issuer == issuer.issuer);
            check(!duplicate, &format!("issuers[{i}].issuer is listed twice"));
        }
        for (i, pool) in self.connector_pools.iter().enumerate() {
            check(
                pool.identity.starts_with("conclave://"),
                &format!("connectorPools[{i}].identity must start with conclave://"),
            );
        }
        for (i, admin) in self.admins.iter().enumerate() {
            check(
                admin.starts_with("conclave://"),
                &format!("admins[{i}] must be a certificate identity (conclave://...)"),
            );
        }
        for (i, reader) in self.recording_key_readers.iter().enumerate() {
            check(
                is_recording_reader(reader),
                &format!(
                    "recordingKeyReaders[{i}] must be conclave://... or token:<issuer>:<subject>"
                ),
            );
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
tls: {certFile: /tls/tls.crt, keyFile: /tls/tls.key, clientCaFile: /tls/ca.crt}
rootKey: {file: /root/key}
";

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = KmsConfig::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.listen.port(), 8443);
        assert_eq!(c.ops_listen.unwrap().port(), 9090);
        assert_eq!(c.rotation.meeting_key_interval_s, 3600);
        assert_eq!(c.limits.max_body_bytes, 16384);
        assert!(!c.root_key.generate_if_missing);
        assert!(c.issuers.is_empty());
    }

    #[test]
    fn the_documented_example_is_valid() {
        let doc: String = include_str!("kms.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .map(|l| l.strip_prefix(' ').unwrap_or(l))
            .skip_while(|l| !l.starts_with("```yaml"))
            .skip(1)
            .take_while(|l| !l.starts_with("```"))
            .collect::<Vec<_>>()
            .join("\n");
        let c = KmsConfig::from_yaml(&doc).unwrap();
        assert_eq!(c.connector_pools[0].kind, ConnectorKind::Recording);
        assert_eq!(c.recording_key_readers.len(), 2);
    }

    #[test]
    fn json_works_too_and_round_trips() {
        let c = KmsConfig::from_yaml(MINIMAL).unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(KmsConfig::from_yaml(&json).unwrap(), c);
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let text = format!(
            "{MINIMAL}
issuers:
  - {{issuer: portal, jwksFile: /j, audience: ''}}
  - {{issuer: portal, jwksFile: /j, audience: a}}
ticketLifetimeS: 5
admins: [operator]
limits: {{maxBodyBytes: 10}}
audit: {{groupCommitLingerMicros: 1000000}}
"
        );
        let err = match KmsConfig::from_yaml(&text) {
            Err(ParseError::Invalid(e)) => e,
            other => panic!("expected invalid, got {other:?}"),
        };
        let all = err.to_string();
        for needle in [
            "issuers[0].audience",
            "issuers[1].issuer is listed twice",
            "ticketLifetimeS",
            "admins[0]",
            "limits.maxBodyBytes",
            "audit.groupCommitLingerMicros",
        ] {
            assert!(all.contains(needle), "{needle} missing from {all}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = format!("{MINIMAL}\nrootkey: {{file: /x}}\n");
        assert!(matches!(
            KmsConfig::from_yaml(&text),
            Err(ParseError::Syntax(_))
        ));
    }
}
