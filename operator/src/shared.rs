//! Spec fragments that more than one custom resource uses.

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// The API group of every Conclave resource.
pub const GROUP: &str = "conclave.dev";

/// A key inside a Secret in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret (same namespace as this resource).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data. Each field that takes a SecretKeyRef documents its default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl SecretKeyRef {
    pub fn key_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.key.as_deref().unwrap_or(default)
    }
}

/// A resource of another kind in the same namespace, by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalRef {
    /// Name of the referenced resource (same namespace).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A key management server that runs outside this namespace or cluster (hybrid deployments).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalKms {
    /// HTTPS URL of the KMS, e.g. `https://kms.example.com:8443`.
    #[x_kube(validation = Rule::new("self.startsWith('https://')").message("externalKms.url must start with https://"))]
    pub url: String,
    /// Secret holding the PEM CA bundle that signs the KMS's server certificate (key defaults to `ca.crt`).
    pub ca_secret: SecretKeyRef,
    /// Secret of type kubernetes.io/tls (`tls.crt`, `tls.key`) with the client certificate this
    /// component presents to the KMS. Its URI SAN must be the identity the KMS expects,
    /// `conclave://<namespace>/<kind>/<name>`.
    pub client_certificate_secret: LocalRef,
    /// Hex-encoded Ed25519 public key of the KMS ticket signer (64 hex characters).
    /// Required for MeetingZones: relays verify join tickets with it and never ask the KMS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket_public_key: Option<String>,
}

/// Where pods of this resource may run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Node labels a node must have to run these pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints these pods tolerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Node and pod (anti-)affinity rules, as in a Pod spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

/// What a connector does. One type per ConnectorPool.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum ConnectorType {
    /// Records meetings (Ogg Opus + chat transcript, encrypted at rest).
    Recording,
    /// Streams a meeting to an RTMP/RTMPS target.
    LiveStreaming,
    /// Connects phones through a SIP trunk.
    Telephony,
    /// Connects SIP room systems.
    RoomSystem,
}

impl ConnectorType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Recording => "recording",
            Self::LiveStreaming => "liveStreaming",
            Self::Telephony => "telephony",
            Self::RoomSystem => "roomSystem",
        }
    }
}

/// Schema pattern of durations such as `90s`, `15m`, `12h`, `30d`, `1h30m`.
pub const DURATION_PATTERN: &str = "^([0-9]+(s|m|h|d))+$";

/// Parses a duration written as in [`DURATION_PATTERN`]. `None` when malformed or zero.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return None,
        };
        let n: u64 = digits.parse().ok()?;
        digits.clear();
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    if !digits.is_empty() || total == 0 {
        return None;
    }
    Some(Duration::from_secs(total))
}

/// Whether `s` is 64 hex characters (a hex-encoded 32-byte key).
pub fn is_hex_key(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses a Kubernetes quantity such as `500m`, `1Gi`, `2` into a number of base units.
/// Used to compare what we apply with what the server stores (it canonicalises).
pub fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        "Pi" => 1024.0f64.powi(5),
        "Ei" => 1024.0f64.powi(6),
        _ => {
            let exp: i32 = suffix.strip_prefix(['e', 'E'])?.parse().ok()?;
            10f64.powi(exp)
        }
    };
    Some(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_malformed_ones_do_not() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("30d"), Some(Duration::from_secs(30 * 86400)));
        for bad in ["", "10", "h", "1x", "0s", "-1h", "1.5h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn quantities_compare_across_spellings() {
        assert_eq!(parse_quantity("500m"), parse_quantity("0.5"));
        assert_eq!(parse_quantity("1Gi"), Some(1073741824.0));
        assert_eq!(parse_quantity("1k"), parse_quantity("1000"));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("abc"), None);
        assert_eq!(parse_quantity("1Xi"), None);
    }
}
