//! connector-node configuration: the file the operator renders from a
//! ConnectorPool into a ConfigMap, and connector-node parses at start-up.
//!
//! The file is JSON or YAML with camelCase keys. Unknown keys are refused so a
//! typo in a pool spec is an error, not a silently ignored setting. Secrets
//! (TLS keys, streaming credentials, SIP passwords) are never inline: the
//! config names files mounted from Secrets.
//!
//! ```yaml
//! type: telephony              # recording | liveStreaming | telephony | roomSystem
//! pool: phones                 # the ConnectorPool's name (shown in logs and metrics)
//! kms:
//!   url: https://kms.conclave.svc:8443
//!   caFile: /etc/conclave/tls/ca.crt
//!   certFile: /etc/conclave/tls/tls.crt
//!   keyFile: /etc/conclave/tls/tls.key
//! metricsListen: 0.0.0.0:9090   # default
//! sip:
//!   listen: 0.0.0.0:5060        # default
//!   transport: tls              # udp (default) | tcp | tls
//!   trunk: sip.example.net:5061 # optional: where dial-out calls go
//!   credentialsFile: /etc/conclave/sip/credentials   # "user:password" for digest auth
//!   tlsCertFile: /etc/conclave/tls/tls.crt           # needed when transport is tls
//!   tlsKeyFile: /etc/conclave/tls/tls.key
//!   tlsCaFile: /etc/conclave/sip/trunk-ca.crt       # verifies the trunk on dial-out
//!   srtp: required              # required | preferred (default) | off
//!   dialIn:
//!     "+15550100": weekly-sync
//! ```
//!
//! A `liveStreaming` pool has a `streaming` section instead:
//!
//! ```yaml
//! streaming:
//!   allowedTargets: ["rtmps://live.example.com/app"]
//!   credentialsFile: /etc/conclave/streaming/credentials   # stream key
//!   tlsCaFile: /etc/conclave/streaming-ca/ca.crt          # verifies rtmps:// targets
//!   ffmpeg: ffmpeg                                         # default
//! ```

use crate::ids::MeetingId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Most dial-in numbers one pool may map (keeps the ConfigMap and lookups small).
pub const MAX_DIAL_IN_ENTRIES: usize = 10_000;
/// Most live-streaming targets one pool may allow.
pub const MAX_ALLOWED_TARGETS: usize = 256;
/// Longest dial-in number or SIP user part accepted as a map key.
pub const MAX_DIAL_IN_KEY_LEN: usize = 64;

/// What a connector pool does. One kind per pool, so one kind per pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ConnectorKind {
    Recording,
    LiveStreaming,
    Telephony,
    RoomSystem,
}

impl ConnectorKind {
    /// The role this connector takes in a meeting's roster (`connector:<type>`).
    pub fn role(self) -> &'static str {
        match self {
            Self::Recording => "connector:recording",
            Self::LiveStreaming => "connector:liveStreaming",
            Self::Telephony => "connector:telephony",
            Self::RoomSystem => "connector:roomSystem",
        }
    }

    /// Label value used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Recording => "recording",
            Self::LiveStreaming => "liveStreaming",
            Self::Telephony => "telephony",
            Self::RoomSystem => "roomSystem",
        }
    }

    fn uses_sip(self) -> bool {
        matches!(self, Self::Telephony | Self::RoomSystem)
    }
}

/// The whole connector-node config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectorConfig {
    /// Which connector this pod runs.
    #[serde(rename = "type")]
    pub kind: ConnectorKind,
    /// The ConnectorPool's name.
    pub pool: String,
    /// The KMS this pool takes assignments and keys from (mTLS).
    pub kms: KmsEndpoint,
    /// Where /metrics and /healthz are served. Default `0.0.0.0:9090`.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Required for `type: recording`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<RecordingSettings>,
    /// Required for `type: liveStreaming`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streaming: Option<StreamingSettings>,
    /// Required for `type: telephony` and `type: roomSystem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip: Option<SipSettings>,
}

/// How to reach the KMS: its URL and the files of this pod's client identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KmsEndpoint {
    /// `https://host:port`.
    pub url: String,
    /// PEM bundle of the CA that signs the KMS's server certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate (URI SAN `conclave://<ns>/connectorpool/<name>/<pod>`).
    pub cert_file: PathBuf,
    /// PEM private key of the client certificate.
    pub key_file: PathBuf,
}

/// Recording storage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecordingSettings {
    /// Directory on the pool's volume where encrypted recordings are written.
    pub dir: PathBuf,
    /// Recordings older than this many days are deleted. Default 30; 0 keeps forever.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
}

/// Live streaming targets and credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StreamingSettings {
    /// Targets a host may stream to: `rtmp://` or `rtmps://` URL prefixes
    /// (scheme, host and optional port, optional path prefix). A target matches
    /// when it starts with one of these at a path boundary.
    pub allowed_targets: Vec<String>,
    /// File holding the stream key appended to the target (from a Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// The ffmpeg binary. Default `ffmpeg` (found on PATH).
    #[serde(default = "default_ffmpeg")]
    pub ffmpeg: PathBuf,
    /// PEM CA bundle that verifies `rtmps://` targets' certificates (chain and
    /// host name). Without it, the system trust store does. Verification is
    /// never skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
}

/// SIP signalling transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SipTransport {
    #[default]
    Udp,
    Tcp,
    Tls,
}

/// Whether media to the phone side must be SRTP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SrtpPolicy {
    /// Refuse calls whose peer does not do SRTP (SDES).
    Required,
    /// Use SRTP when the peer offers or accepts it, plain RTP otherwise.
    #[default]
    Preferred,
    /// Plain RTP only.
    Off,
}

/// SIP user agent settings for telephony and room-system pools.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SipSettings {
    /// Address the user agent listens on. Default `0.0.0.0:5060`.
    #[serde(default = "default_sip_listen")]
    pub listen: SocketAddr,
    /// Signalling transport. Default udp.
    #[serde(default)]
    pub transport: SipTransport,
    /// Trunk or PBX that dial-out calls go to (`host:port`). Without it, dial-out
    /// needs full SIP URIs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk: Option<String>,
    /// File holding `user:password` for digest authentication with the trunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// PEM server certificate for SIP over TLS (required with `transport: tls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for SIP over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA bundle that verifies the trunk's certificate on dial-out over
    /// TLS (required with `transport: tls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// SRTP policy for the phone leg. Default preferred.
    #[serde(default)]
    pub srtp: SrtpPolicy,
    /// Dial-in: the called number or SIP user part -> meeting.
    /// Calls to numbers not listed here are asked for a meeting number by DTMF.
    #[serde(default)]
    pub dial_in: BTreeMap<String, MeetingId>,
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}
fn default_sip_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5060))
}
fn default_retention_days() -> u32 {
    30
}
fn default_ffmpeg() -> PathBuf {
    PathBuf::from("ffmpeg")
}

/// Why a connector config is refused. Each message names the offending key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectorConfigError {
    #[error("pool: must be a non-empty name")]
    EmptyPool,
    #[error("kms.url: must start with https:// (got {0:?})")]
    KmsUrl(String),
    #[error("{0}: a path must not be empty")]
    EmptyPath(&'static str),
    #[error("type {kind}: the `{section}` section is required")]
    MissingSection {
        kind: &'static str,
        section: &'static str,
    },
    #[error("type {kind}: the `{section}` section does not apply to this connector type")]
    UnexpectedSection {
        kind: &'static str,
        section: &'static str,
    },
    #[error("streaming.allowedTargets: at least one target is required")]
    NoTargets,
    #[error("streaming.allowedTargets: at most {MAX_ALLOWED_TARGETS} targets")]
    TooManyTargets,
    #[error("streaming.allowedTargets: {0:?} must be an rtmp:// or rtmps:// URL with a host")]
    BadTarget(String),
    #[error("sip.transport is tls: sip.tlsCertFile, sip.tlsKeyFile and sip.tlsCaFile are required")]
    TlsFilesMissing,
    #[error("sip.trunk: {0:?} must be host:port")]
    BadTrunk(String),
    #[error("sip.dialIn: at most {MAX_DIAL_IN_ENTRIES} entries")]
    TooManyDialIn,
    #[error(
        "sip.dialIn: key {0:?} must be 1-{MAX_DIAL_IN_KEY_LEN} characters of digits, '+', letters, '-', '_' or '.'"
    )]
    BadDialInKey(String),
}

impl ConnectorConfig {
    /// Check everything serde cannot: cross-field rules and value shapes.
    pub fn validate(&self) -> Result<(), ConnectorConfigError> {
        use ConnectorConfigError as E;
        if self.pool.trim().is_empty() {
            return Err(E::EmptyPool);
        }
        self.kms.validate()?;
        let kind = self.kind.as_str();
        let need = |present: bool, section: &'static str| {
            if present {
                Ok(())
            } else {
                Err(E::MissingSection { kind, section })
            }
        };
        let refuse = |present: bool, section: &'static str| {
            if present {
                Err(E::UnexpectedSection { kind, section })
            } else {
                Ok(())
            }
        };
        match self.kind {
            ConnectorKind::Recording => {
                need(self.recording.is_some(), "recording")?;
                refuse(self.streaming.is_some(), "streaming")?;
                refuse(self.sip.is_some(), "sip")?;
            }
            ConnectorKind::LiveStreaming => {
                need(self.streaming.is_some(), "streaming")?;
                refuse(self.recording.is_some(), "recording")?;
                refuse(self.sip.is_some(), "sip")?;
            }
            k => {
                debug_assert!(k.uses_sip());
                need(self.sip.is_some(), "sip")?;
                refuse(self.recording.is_some(), "recording")?;
                refuse(self.streaming.is_some(), "streaming")?;
            }
        }
        if let Some(r) = &self.recording {
            non_empty(&r.dir, "recording.dir")?;
        }
        if let Some(s) = &self.streaming {
            s.validate()?;
        }
        if let Some(s) = &self.sip {
            s.validate()?;
        }
        Ok(())
    }
}

fn non_empty(p: &std::path::Path, key: &'static str) -> Result<(), ConnectorConfigError> {
    if p.as_os_str().is_empty() {
        Err(ConnectorConfigError::EmptyPath(key))
    } else {
        Ok(())
    }
}

impl KmsEndpoint {
    fn validate(&self) -> Result<(), ConnectorConfigError> {
        let rest = self
            .url
            .strip_prefix("https://")
            .ok_or_else(|| ConnectorConfigError::KmsUrl(self.url.clone()))?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(ConnectorConfigError::KmsUrl(self.url.clone()));
        }
        non_empty(&self.ca_file, "kms.caFile")?;
        non_empty(&self.cert_file, "kms.certFile")?;
        non_empty(&self.key_file, "kms.keyFile")
    }
}

impl StreamingSettings {
    fn validate(&self) -> Result<(), ConnectorConfigError> {
        if self.allowed_targets.is_empty() {
            return Err(ConnectorConfigError::NoTargets);
        }
        if self.allowed_targets.len() > MAX_ALLOWED_TARGETS {
            return Err(ConnectorConfigError::TooManyTargets);
        }
        for t in &self.allowed_targets {
            if split_stream_url(t).is_none() {
                return Err(ConnectorConfigError::BadTarget(t.clone()));
            }
        }
        if let Some(p) = &self.credentials_file {
            non_empty(p, "streaming.credentialsFile")?;
        }
        if let Some(p) = &self.tls_ca_file {
            non_empty(p, "streaming.tlsCaFile")?;
        }
        non_empty(&self.ffmpeg, "streaming.ffmpeg")
    }

    /// Whether a host-requested target is in the allow-list. Matching is on
    /// scheme, exact authority and a path prefix ending at a `/` boundary, so
    /// `rtmp://a.example/live` allows `rtmp://a.example/live/x` but neither
    /// `rtmp://a.example/liveevil` nor `rtmp://a.example.evil/live`.
    pub fn allows(&self, target: &str) -> bool {
        let Some((scheme, authority, path)) = split_stream_url(target) else {
            return false;
        };
        self.allowed_targets.iter().any(|allowed| {
            let Some((s, a, p)) = split_stream_url(allowed) else {
                return false;
            };
            if s != scheme || !a.eq_ignore_ascii_case(authority) {
                return false;
            }
            let p = p.trim_end_matches('/');
            path == p || path.strip_prefix(p).is_some_and(|r| r.starts_with('/'))
        })
    }
}

/// `scheme://authority/path` for rtmp/rtmps URLs; None when malformed.
fn split_stream_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "rtmp" && scheme != "rtmps" {
        return None;
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let authority_ok = !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    let path_ok = path
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'@'))
        && !path.split('/').any(|seg| seg == "..");
    (authority_ok && path_ok).then_some((scheme, authority, path))
}

impl SipSettings {
    fn validate(&self) -> Result<(), ConnectorConfigError> {
        use ConnectorConfigError as E;
        if self.transport == SipTransport::Tls {
            match (&self.tls_cert_file, &self.tls_key_file, &self.tls_ca_file) {
                (Some(c), Some(k), Some(ca)) => {
                    non_empty(c, "sip.tlsCertFile")?;
                    non_empty(k, "sip.tlsKeyFile")?;
                    non_empty(ca, "sip.tlsCaFile")?;
                }
                _ => return Err(E::TlsFilesMissing),
            }
        }
        if let Some(t) = &self.trunk {
            let ok = t
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
            if !ok {
                return Err(E::BadTrunk(t.clone()));
            }
        }
        if let Some(p) = &self.credentials_file {
            non_empty(p, "sip.credentialsFile")?;
        }
        if self.dial_in.len() > MAX_DIAL_IN_ENTRIES {
            return Err(E::TooManyDialIn);
        }
        for k in self.dial_in.keys() {
            let ok = !k.is_empty()
                && k.len() <= MAX_DIAL_IN_KEY_LEN
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'_' | b'.'));
            if !ok {
                return Err(E::BadDialInKey(k.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kms() -> KmsEndpoint {
        KmsEndpoint {
            url: "https://kms:8443".into(),
            ca_file: "/ca".into(),
            cert_file: "/c".into(),
            key_file: "/k".into(),
        }
    }

    fn telephony() -> ConnectorConfig {
        serde_json::from_value(serde_json::json!({
            "type": "telephony",
            "pool": "phones",
            "kms": {"url": "https://kms:8443", "caFile": "/ca", "certFile": "/c", "keyFile": "/k"},
            "sip": {"transport": "tls", "tlsCertFile": "/c", "tlsKeyFile": "/k", "tlsCaFile": "/ca",
                    "trunk": "pbx.example:5061", "srtp": "required",
                    "dialIn": {"+15550100": "weekly-sync"}}
        }))
        .unwrap()
    }

    #[test]
    fn parses_with_documented_defaults() {
        let c = telephony();
        c.validate().unwrap();
        assert_eq!(c.metrics_listen, "0.0.0.0:9090".parse().unwrap());
        let sip = c.sip.as_ref().unwrap();
        assert_eq!(sip.listen, "0.0.0.0:5060".parse().unwrap());
        assert_eq!(sip.srtp, SrtpPolicy::Required);
        assert_eq!(sip.dial_in["+15550100"].as_str(), "weekly-sync");
        assert_eq!(c.kind.role(), "connector:telephony");

        let r: ConnectorConfig = serde_json::from_value(serde_json::json!({
            "type": "recording", "pool": "rec",
            "kms": {"url": "https://kms:8443", "caFile": "/ca", "certFile": "/c", "keyFile": "/k"},
            "recording": {"dir": "/data"}
        }))
        .unwrap();
        r.validate().unwrap();
        assert_eq!(r.recording.unwrap().retention_days, 30);
        let s: SipSettings = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(s.transport, SipTransport::Udp);
        assert_eq!(s.srtp, SrtpPolicy::Preferred);
    }

    #[test]
    fn unknown_keys_and_bad_meeting_ids_are_refused() {
        let e = serde_json::from_value::<ConnectorConfig>(serde_json::json!({
            "type": "recording", "pool": "rec", "kms": {"url": "https://k", "caFile": "/a",
            "certFile": "/b", "keyFile": "/c"}, "recordin": {"dir": "/d"}
        }))
        .unwrap_err();
        assert!(e.to_string().contains("recordin"), "{e}");
        let e = serde_json::from_value::<SipSettings>(serde_json::json!({
            "dialIn": {"+1": "bad meeting id!"}
        }))
        .unwrap_err();
        assert!(e.to_string().contains("meeting id"), "{e}");
    }

    #[test]
    fn cross_field_rules() {
        let mut c = telephony();
        c.sip.as_mut().unwrap().tls_key_file = None;
        assert_eq!(c.validate(), Err(ConnectorConfigError::TlsFilesMissing));

        let mut c = telephony();
        c.sip.as_mut().unwrap().trunk = Some("pbx.example".into());
        assert!(matches!(
            c.validate(),
            Err(ConnectorConfigError::BadTrunk(_))
        ));

        let mut c = telephony();
        c.recording = Some(RecordingSettings {
            dir: "/d".into(),
            retention_days: 1,
        });
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "type telephony: the `recording` section does not apply to this connector type"
        );

        let mut c = telephony();
        c.sip = None;
        assert!(matches!(
            c.validate(),
            Err(ConnectorConfigError::MissingSection { section: "sip", .. })
        ));

        let mut c = telephony();
        c.kms = KmsEndpoint {
            url: "http://kms".into(),
            ..kms()
        };
        assert!(matches!(c.validate(), Err(ConnectorConfigError::KmsUrl(_))));

        let mut c = telephony();
        c.sip
            .as_mut()
            .unwrap()
            .dial_in
            .insert("12 34".into(), MeetingId::new("m").unwrap());
        assert!(matches!(
            c.validate(),
            Err(ConnectorConfigError::BadDialInKey(_))
        ));
    }

    #[test]
    fn streaming_allow_list_matches_on_boundaries() {
        let s = StreamingSettings {
            allowed_targets: vec![
                "rtmp://127.0.0.1:1935/live".into(),
                "rtmps://cdn.example".into(),
            ],
            credentials_file: None,
            ffmpeg: "ffmpeg".into(),
            tls_ca_file: None,
        };
        assert!(s.validate().is_ok());
        assert!(s.allows("rtmp://127.0.0.1:1935/live"));
        assert!(s.allows("rtmp://127.0.0.1:1935/live/stream1"));
        assert!(s.allows("rtmps://cdn.example/anything"));
        assert!(!s.allows("rtmp://127.0.0.1:1935/liveevil"));
        assert!(!s.allows("rtmp://127.0.0.1:1936/live/x"));
        assert!(!s.allows("rtmp://127.0.0.1:1935/live/../admin"));
        assert!(!s.allows("rtmp://cdn.example/x"), "scheme must match");
        assert!(!s.allows("rtmps://cdn.example.evil/x"));
        assert!(!s.allows("rtmps://user@cdn.example/x"));
        assert!(!s.allows("http://cdn.example/x"));
        let bad = StreamingSettings {
            allowed_targets: vec!["ftp://x".into()],
            ..s
        };
        assert!(matches!(
            bad.validate(),
            Err(ConnectorConfigError::BadTarget(_))
        ));
        let s: StreamingSettings = serde_json::from_value(serde_json::json!({
            "allowedTargets": ["rtmps://cdn.example"], "tlsCaFile": "/ca/ca.crt"
        }))
        .unwrap();
        assert_eq!(
            s.tls_ca_file.as_deref(),
            Some(std::path::Path::new("/ca/ca.crt"))
        );
        let empty = StreamingSettings {
            tls_ca_file: Some(PathBuf::new()),
            ..s
        };
        assert_eq!(
            empty.validate(),
            Err(ConnectorConfigError::EmptyPath("streaming.tlsCaFile"))
        );
    }
}
