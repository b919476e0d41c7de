//! media-node configuration: the file the operator renders from a MeetingZone
//! into a ConfigMap, and each relay parses at start-up.
//!
//! JSON or YAML with camelCase keys; unknown keys are refused. The relay holds
//! no secret of the meeting: only the KMS's ticket-verification *public* key
//! and the files of its own mTLS identity towards the KMS.
//!
//! ```yaml
//! relayId: zone-a/relay-0          # must match the `relay` field of tickets
//! zone: zone-a
//! listen: 0.0.0.0:40000            # UDP media port
//! advertise: 198.18.0.12:40000     # what clients are told to send to
//! httpListen: 0.0.0.0:9090         # /healthz /readyz /metrics (default)
//! ticketPublicKey: 3b6a27bc...     # hex Ed25519 public key of the KMS ticket signer
//! kms:                             # optional: register and heartbeat
//!   url: https://kms.conclave.svc:8443
//!   caFile: /etc/conclave/tls/ca.crt
//!   certFile: /etc/conclave/tls/tls.crt
//!   keyFile: /etc/conclave/tls/tls.key
//!   heartbeatSeconds: 5            # default
//! limits:
//!   participantsPerMeeting: 100    # default
//!   meetings: 1000                 # default
//!   memoryBytes: 268435456         # routing state bound (default 256 MiB)
//! drainSeconds: 10                 # after SIGTERM: keep forwarding this long (default)
//! ```

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Bytes of routing state one bound participant costs, counted generously
/// (address, ids, counters, hash-map overhead). The relay refuses a join that
/// would push the estimate past `limits.memoryBytes`.
pub const PARTICIPANT_STATE_BYTES: u64 = 256;
/// Bytes of routing state one meeting costs besides its participants.
pub const MEETING_STATE_BYTES: u64 = 512;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayConfig {
    /// This relay's identity; tickets name it and are refused elsewhere.
    pub relay_id: String,
    /// The MeetingZone the relay belongs to (reported to the KMS for placement).
    pub zone: String,
    /// UDP address the media socket binds.
    pub listen: SocketAddr,
    /// `host:port` clients send media to (pod IP, node IP or per-pod Service).
    /// Port 0 means the port `listen` was given (useful with `listen: ...:0`).
    pub advertise: String,
    /// Where /healthz, /readyz and /metrics are served. Default `0.0.0.0:9090`.
    #[serde(default = "default_http_listen")]
    pub http_listen: SocketAddr,
    /// Hex-encoded 32-byte Ed25519 public key that verifies relay tickets.
    pub ticket_public_key: String,
    /// Registration and heartbeat with the KMS. Without it the relay still
    /// forwards for tickets it can verify (tests, static placement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<RelayKms>,
    #[serde(default)]
    pub limits: RelayLimits,
    /// After SIGTERM: how long the relay keeps forwarding while clients move.
    #[serde(default = "default_drain_seconds")]
    pub drain_seconds: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayKms {
    /// `https://host:port` of the KMS.
    pub url: String,
    /// PEM bundle of the CA that signs the KMS's server certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate (URI SAN `conclave://<ns>/meetingzone/<zone>/<pod>`).
    pub cert_file: PathBuf,
    /// PEM private key of the client certificate.
    pub key_file: PathBuf,
    /// Seconds between heartbeats. Default 5.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayLimits {
    /// Most participants bound in one meeting. Default 100.
    #[serde(default = "default_participants")]
    pub participants_per_meeting: u32,
    /// Most meetings on this relay. Default 1000.
    #[serde(default = "default_meetings")]
    pub meetings: u32,
    /// Upper bound of routing state in bytes. Default 256 MiB.
    #[serde(default = "default_memory")]
    pub memory_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            participants_per_meeting: default_participants(),
            meetings: default_meetings(),
            memory_bytes: default_memory(),
        }
    }
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}
fn default_drain_seconds() -> u32 {
    10
}
fn default_heartbeat() -> u32 {
    5
}
fn default_participants() -> u32 {
    100
}
fn default_meetings() -> u32 {
    1000
}
fn default_memory() -> u64 {
    256 << 20
}

/// Why a relay config is refused. Each message names the offending key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RelayConfigError {
    #[error("relayId: must be 1-{max} bytes", max = crate::ticket::MAX_RELAY_ID_LEN)]
    RelayId,
    #[error("zone: must be a non-empty name")]
    Zone,
    #[error("advertise: {0:?} must be host:port")]
    Advertise(String),
    #[error("ticketPublicKey: must be 64 hex characters of a valid Ed25519 public key")]
    TicketKey,
    #[error("kms.url: must start with https:// (got {0:?})")]
    KmsUrl(String),
    #[error("{0}: a path must not be empty")]
    EmptyPath(&'static str),
    #[error("kms.heartbeatSeconds: must be between 1 and 300")]
    Heartbeat,
    #[error("limits.{0}: must be at least 1")]
    ZeroLimit(&'static str),
    #[error(
        "limits.memoryBytes: {got} bytes cannot hold one full meeting ({need} bytes); raise it or lower limits.participantsPerMeeting"
    )]
    MemoryTooSmall { got: u64, need: u64 },
    #[error("drainSeconds: must be at most 600")]
    Drain,
    #[error("listen and httpListen must differ")]
    SameListen,
}

impl RelayConfig {
    pub fn validate(&self) -> Result<(), RelayConfigError> {
        use RelayConfigError as E;
        if self.relay_id.is_empty() || self.relay_id.len() > crate::ticket::MAX_RELAY_ID_LEN {
            return Err(E::RelayId);
        }
        if self.zone.trim().is_empty() {
            return Err(E::Zone);
        }
        let ok = self
            .advertise
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !ok {
            return Err(E::Advertise(self.advertise.clone()));
        }
        self.ticket_verifying_key()?;
        if let Some(kms) = &self.kms {
            if !kms.url.starts_with("https://") || kms.url.len() <= "https://".len() {
                return Err(E::KmsUrl(kms.url.clone()));
            }
            for (p, key) in [
                (&kms.ca_file, "kms.caFile"),
                (&kms.cert_file, "kms.certFile"),
                (&kms.key_file, "kms.keyFile"),
            ] {
                if p.as_os_str().is_empty() {
                    return Err(E::EmptyPath(key));
                }
            }
            if !(1..=300).contains(&kms.heartbeat_seconds) {
                return Err(E::Heartbeat);
            }
        }
        let l = &self.limits;
        if l.participants_per_meeting == 0 {
            return Err(E::ZeroLimit("participantsPerMeeting"));
        }
        if l.meetings == 0 {
            return Err(E::ZeroLimit("meetings"));
        }
        let need =
            MEETING_STATE_BYTES + PARTICIPANT_STATE_BYTES * l.participants_per_meeting as u64;
        if l.memory_bytes < need {
            return Err(E::MemoryTooSmall {
                got: l.memory_bytes,
                need,
            });
        }
        if self.drain_seconds > 600 {
            return Err(E::Drain);
        }
        // Port 0 (tests) asks the kernel for a free port on each, so they cannot clash.
        if self.listen == self.http_listen && self.listen.port() != 0 {
            return Err(E::SameListen);
        }
        Ok(())
    }

    /// The decoded ticket-verification key.
    pub fn ticket_verifying_key(&self) -> Result<ed25519_dalek::VerifyingKey, RelayConfigError> {
        let s = self.ticket_public_key.trim();
        if s.len() != 64 {
            return Err(RelayConfigError::TicketKey);
        }
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(
                s.get(2 * i..2 * i + 2).ok_or(RelayConfigError::TicketKey)?,
                16,
            )
            .map_err(|_| RelayConfigError::TicketKey)?;
        }
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| RelayConfigError::TicketKey)
    }
}

/// Hex encoding of a ticket-verification key, as `ticketPublicKey` expects.
pub fn encode_ticket_key(key: &ed25519_dalek::VerifyingKey) -> String {
    key.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_hex() -> String {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        encode_ticket_key(&sk.verifying_key())
    }

    fn minimal() -> serde_json::Value {
        serde_json::json!({
            "relayId": "zone-a/relay-0",
            "zone": "zone-a",
            "listen": "0.0.0.0:40000",
            "advertise": "198.18.0.12:40000",
            "ticketPublicKey": key_hex(),
        })
    }

    fn parse(v: serde_json::Value) -> RelayConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn parses_with_documented_defaults() {
        let c = parse(minimal());
        c.validate().unwrap();
        assert_eq!(c.http_listen, "0.0.0.0:9090".parse().unwrap());
        assert_eq!(c.limits, RelayLimits::default());
        assert_eq!(c.limits.participants_per_meeting, 100);
        assert_eq!(c.drain_seconds, 10);
        assert!(c.kms.is_none());
        assert_eq!(
            encode_ticket_key(&c.ticket_verifying_key().unwrap()),
            key_hex()
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let mut v = minimal();
        v["listn"] = "0.0.0.0:1".into();
        assert!(serde_json::from_value::<RelayConfig>(v).is_err());
    }

    #[test]
    fn each_bad_setting_has_its_own_error() {
        use RelayConfigError as E;
        let cases: Vec<(serde_json::Value, E)> = vec![
            (serde_json::json!({"relayId": ""}), E::RelayId),
            (serde_json::json!({"zone": " "}), E::Zone),
            (
                serde_json::json!({"advertise": "host"}),
                E::Advertise("host".into()),
            ),
            (
                serde_json::json!({"advertise": "host:x"}),
                E::Advertise("host:x".into()),
            ),
            (serde_json::json!({"ticketPublicKey": "abcd"}), E::TicketKey),
            (
                serde_json::json!({"ticketPublicKey": "zz".repeat(32)}),
                E::TicketKey,
            ),
            (
                serde_json::json!({"kms": {"url": "http://kms", "caFile": "a", "certFile": "b", "keyFile": "c"}}),
                E::KmsUrl("http://kms".into()),
            ),
            (
                serde_json::json!({"kms": {"url": "https://kms", "caFile": "", "certFile": "b", "keyFile": "c"}}),
                E::EmptyPath("kms.caFile"),
            ),
            (
                serde_json::json!({"kms": {"url": "https://kms", "caFile": "a", "certFile": "b", "keyFile": "c", "heartbeatSeconds": 0}}),
                E::Heartbeat,
            ),
            (
                serde_json::json!({"limits": {"meetings": 0}}),
                E::ZeroLimit("meetings"),
            ),
            (
                serde_json::json!({"limits": {"participantsPerMeeting": 0}}),
                E::ZeroLimit("participantsPerMeeting"),
            ),
            (
                serde_json::json!({"limits": {"memoryBytes": 1000}}),
                E::MemoryTooSmall {
                    got: 1000,
                    need: MEETING_STATE_BYTES + 100 * PARTICIPANT_STATE_BYTES,
                },
            ),
            (serde_json::json!({"drainSeconds": 601}), E::Drain),
            (
                serde_json::json!({"httpListen": "0.0.0.0:40000"}),
                E::SameListen,
            ),
        ];
        for (patch, want) in cases {
            let mut v = minimal();
            for (k, val) in patch.as_object().unwrap() {
                v[k] = val.clone();
            }
            let got = parse(v).validate();
            assert_eq!(got, Err(want), "patch {patch}");
        }
    }

    #[test]
    fn a_full_config_with_kms_validates() {
        let mut v = minimal();
        v["kms"] = serde_json::json!({"url": "https://kms:8443", "caFile": "/ca", "certFile": "/c", "keyFile": "/k"});
        let c = parse(v);
        c.validate().unwrap();
        assert_eq!(c.kms.unwrap().heartbeat_seconds, 5);
    }
}
