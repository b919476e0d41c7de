//! Service identities: who a certificate speaks for.
//!
//! Every certificate the Conclave CA issues carries exactly one URI SAN of the
//! form `conclave://<namespace>/<kind>/<name>[/<pod>]`. Authorization decisions
//! (a relay may register, a recording connector may unwrap data keys, an admin
//! may read the audit log) are made on this value and nothing else, so parsing is
//! strict: one spelling per identity, no escapes, no case folding.

use std::fmt;
use std::str::FromStr;

/// URI scheme of identity SANs.
pub const SCHEME: &str = "conclave://";

/// Longest segment accepted: a DNS label, like Kubernetes namespace and pod names.
pub const MAX_SEGMENT_LEN: usize = 63;

/// What kind of component an identity names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A kms-node (server certificates; also client when replicas talk to each other).
    Kms,
    /// A media-node relay (client to the KMS for registration and heartbeats).
    Relay,
    /// A connector-node pod (client to the KMS for assignments and data keys).
    Connector,
    /// The operator itself.
    Operator,
    /// A human or tool allowed to read and verify the audit log.
    Admin,
    /// A user or tool allowed to unwrap recording data keys later.
    RecordingReader,
}

impl Kind {
    /// Every kind, for exhaustive tests and help texts.
    pub const ALL: [Kind; 6] = [
        Kind::Kms,
        Kind::Relay,
        Kind::Connector,
        Kind::Operator,
        Kind::Admin,
        Kind::RecordingReader,
    ];

    /// The spelling used in identity URIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Kms => "kms",
            Kind::Relay => "relay",
            Kind::Connector => "connector",
            Kind::Operator => "operator",
            Kind::Admin => "admin",
            Kind::RecordingReader => "recording-reader",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or(IdentityError::UnknownKind)
    }
}

/// Why a string is not an identity. Messages name the rule, never echo the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity must start with `{SCHEME}`")]
    BadScheme,
    #[error("identity must have 3 or 4 path segments: namespace/kind/name[/pod]")]
    WrongSegmentCount,
    #[error("identity kind is not one of kms, relay, connector, operator, admin, recording-reader")]
    UnknownKind,
    #[error(
        "identity {0} must be a DNS label: 1-{MAX_SEGMENT_LEN} of a-z, 0-9, '-', starting and ending with a letter or digit"
    )]
    BadSegment(&'static str),
}

/// A parsed `conclave://<namespace>/<kind>/<name>[/<pod>]` identity.
///
/// Serializes as its URI string (audit entries, configuration), and
/// deserializes only through the same strict parser.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    namespace: String,
    kind: Kind,
    name: String,
    pod: Option<String>,
}

fn check_label(segment: &str, what: &'static str) -> Result<(), IdentityError> {
    let b = segment.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_SEGMENT_LEN
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadSegment(what))
    }
}

impl Identity {
    /// An identity for a whole component (a Service, a pool, a user).
    pub fn new(
        namespace: impl Into<String>,
        kind: Kind,
        name: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let namespace = namespace.into();
        let name = name.into();
        check_label(&namespace, "namespace")?;
        check_label(&name, "name")?;
        Ok(Self {
            namespace,
            kind,
            name,
            pod: None,
        })
    }

    /// The same identity narrowed to one pod (relays register per pod).
    pub fn with_pod(mut self, pod: impl Into<String>) -> Result<Self, IdentityError> {
        let pod = pod.into();
        check_label(&pod, "pod")?;
        self.pod = Some(pod);
        Ok(self)
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pod(&self) -> Option<&str> {
        self.pod.as_deref()
    }

    /// The identity without its pod segment: what a policy usually names.
    pub fn component(&self) -> Identity {
        Identity {
            pod: None,
            ..self.clone()
        }
    }

    /// The URI SAN value, e.g. `conclave://prod/relay/zone-a/zone-a-relay-0`.
    pub fn to_uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}/{}", self.namespace, self.kind, self.name)?;
        if let Some(pod) = &self.pod {
            write!(f, "/{pod}")?;
        }
        Ok(())
    }
}

impl FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix(SCHEME).ok_or(IdentityError::BadScheme)?;
        let segments: Vec<&str> = rest.split('/').collect();
        let (namespace, kind, name, pod) = match segments.as_slice() {
            [ns, kind, name] => (*ns, *kind, *name, None),
            [ns, kind, name, pod] => (*ns, *kind, *name, Some(*pod)),
            _ => return Err(IdentityError::WrongSegmentCount),
        };
        check_label(namespace, "namespace")?;
        let identity = Identity::new(namespace, kind.parse()?, name)?;
        match pod {
            Some(pod) => identity.with_pod(pod),
            None => Ok(identity),
        }
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Kind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_and_without_pod() {
        for s in [
            "conclave://prod/relay/zone-a/zone-a-0",
            "conclave://prod/kms/kms",
            "conclave://a/recording-reader/alice-2",
        ] {
            let id: Identity = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
        }
        let id: Identity = "conclave://ns/relay/z/z-0".parse().unwrap();
        assert_eq!(id.namespace(), "ns");
        assert_eq!(id.kind(), Kind::Relay);
        assert_eq!(id.name(), "z");
        assert_eq!(id.pod(), Some("z-0"));
        assert_eq!(id.component().to_string(), "conclave://ns/relay/z");
    }

    #[test]
    fn every_kind_round_trips() {
        for kind in Kind::ALL {
            assert_eq!(kind.as_str().parse::<Kind>().unwrap(), kind);
        }
    }

    #[test]
    fn refuses_malformed_identities() {
        use IdentityError::*;
        let cases: &[(&str, IdentityError)] = &[
            ("https://ns/kms/a", BadScheme),
            ("CONCLAVE://ns/kms/a", BadScheme),
            ("conclave://ns/kms", WrongSegmentCount),
            ("conclave://ns/kms/a/b/c", WrongSegmentCount),
            ("conclave://ns/kms/a/", BadSegment("pod")),
            ("conclave://ns/wizard/a", UnknownKind),
            ("conclave://ns/KMS/a", UnknownKind),
            ("conclave://Ns/kms/a", BadSegment("namespace")),
            ("conclave:///kms/a", BadSegment("namespace")),
            ("conclave://ns/kms/-a", BadSegment("name")),
            ("conclave://ns/kms/a-", BadSegment("name")),
            ("conclave://ns/kms/a.b", BadSegment("name")),
            ("conclave://ns/kms/a%2f", BadSegment("name")),
            ("conclave://ns/kms/a b", BadSegment("name")),
            ("conclave://ns/kms/a?x=1", BadSegment("name")),
            ("conclave://ns/kms/a#f", BadSegment("name")),
            ("conclave://u@ns/kms/a", BadSegment("namespace")),
            ("conclave://ns:1/kms/a", BadSegment("namespace")),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Identity>().as_ref(), Err(want), "{input}");
        }
        let long = "a".repeat(64);
        assert_eq!(
            format!("conclave://ns/kms/{long}").parse::<Identity>(),
            Err(BadSegment("name"))
        );
        assert!(
            format!("conclave://ns/kms/{}", &long[..63])
                .parse::<Identity>()
                .is_ok()
        );
    }

    #[test]
    fn serde_uses_the_uri_and_the_strict_parser() {
        let id: Identity = "conclave://ns/relay/z/z-0".parse().unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"conclave://ns/relay/z/z-0\"");
        assert_eq!(serde_json::from_str::<Identity>(&json).unwrap(), id);
        assert!(serde_json::from_str::<Identity>("\"conclave://ns/relay/Z\"").is_err());
        assert_eq!(
            serde_json::from_str::<Kind>("\"recording-reader\"").unwrap(),
            Kind::RecordingReader
        );
        assert!(serde_json::from_str::<Kind>("\"root\"").is_err());
    }

    #[test]
    fn errors_do_not_echo_input() {
        let err = "conclave://ns/kms/SECRET".parse::<Identity>().unwrap_err();
        assert!(!err.to_string().contains("SECRET"));
    }
}
