//! Join tokens: how a participant proves who they are and which meeting they
//! may join.
//!
//! A join token is a JWT (RFC 7519) in compact JWS form (RFC 7515), signed by
//! the customer's own meeting portal or identity provider with EdDSA (Ed25519)
//! or ES256 (ECDSA P-256, SHA-256). The KMS verifies it against the issuer's
//! published keys (a JWKS, RFC 7517); `kid` selects the key.
//!
//! The verifier is deliberately narrow: two algorithms, one key per `kid`,
//! an allow-list of header parameters, strict unpadded base64url, a size cap,
//! and claims bounded before anything downstream sees them. Every refusal has
//! its own [`TokenError`] variant, and no error message repeats any part of
//! the token (tokens are bearer credentials and error text ends up in logs).
//!
//! Time is an input (`now`, Unix seconds): this module does no I/O.
//!
//! Claims:
//!
//! | claim  | meaning                                        | required |
//! |--------|------------------------------------------------|----------|
//! | `sub`  | stable user id at the issuer                   | yes      |
//! | `name` | display name shown in the roster               | yes      |
//! | `mid`  | meeting id ([`MeetingId`])                     | yes      |
//! | `role` | `host` or `participant`                        | yes      |
//! | `aud`  | must contain the issuer's configured audience  | yes      |
//! | `exp`  | expiry (Unix seconds)                          | yes      |
//! | `nbf`  | not before (Unix seconds)                      | no       |
//! | `iat`  | issued at; refused when in the future          | no       |
//! | `iss`  | issuer name; selects among trusted issuers     | when more than one issuer is trusted |
//!
//! Other claims are ignored.
//!
//! ```
//! use meeting_proto::ids::MeetingId;
//! use meeting_proto::token::*;
//!
//! let key = DevIssuerKey::from_seed("dev-1", &[7; 32]).unwrap();
//! let now = 1_800_000_000;
//! let token = key.mint(&Claims {
//!     sub: "user-1".into(),
//!     name: "Ada".into(),
//!     mid: MeetingId::new("weekly").unwrap(),
//!     role: Role::Host,
//!     aud: vec!["conclave-kms".into()],
//!     exp: now + 300,
//!     nbf: None,
//!     iat: Some(now),
//!     iss: None,
//! });
//! // The KMS side: the issuer's JWKS (here the dev key's) and its audience.
//! let jwks = Jwks::from_json(key.jwks_json().as_bytes()).unwrap();
//! let verifier = TokenVerifier::new(vec![TrustedIssuer {
//!     name: "portal".into(),
//!     audience: "conclave-kms".into(),
//!     jwks,
//! }]);
//! let ok = verifier.verify(&token, now).unwrap();
//! assert_eq!(ok.claims.role, Role::Host);
//! assert_eq!(verifier.verify(&token, now + 3600), Err(TokenError::Expired));
//! ```

use crate::ids::MeetingId;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::VerifyingKey;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// Largest token accepted, in bytes. Real join tokens are a few hundred bytes;
/// the cap bounds the work an unauthenticated caller can cause.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Default tolerance for clock differences between issuer and KMS.
pub const DEFAULT_CLOCK_SKEW_SECS: u64 = 60;
/// Longest `sub` and `name` accepted (bytes).
pub const MAX_SUBJECT_LEN: usize = 256;
pub const MAX_NAME_LEN: usize = 256;
/// Longest `kid` accepted (bytes).
pub const MAX_KID_LEN: usize = 128;

/// What a participant may do in the meeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May invite connectors and remove participants.
    Host,
    Participant,
}

/// Which part of the compact serialization a base64 error is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Header,
    Payload,
    Signature,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Header => "header",
            Part::Payload => "payload",
            Part::Signature => "signature",
        })
    }
}

/// Why a token was refused. Messages name the rule, never token content.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is empty")]
    Empty,
    #[error("token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("token is not three dot-separated base64url parts")]
    Malformed,
    #[error("token {0} is not unpadded base64url")]
    BadBase64(Part),
    #[error("token header is not a JSON object with string `alg` and `kid`")]
    BadHeader,
    #[error("token header repeats a parameter")]
    DuplicateHeader,
    #[error("token header has a parameter this verifier does not accept")]
    UnsupportedHeader,
    #[error("token header `typ` is not JWT")]
    BadType,
    #[error("token uses alg `none`: unsigned tokens are refused")]
    AlgNone,
    #[error("token uses a symmetric (HS*) algorithm: only EdDSA and ES256 are accepted")]
    AlgSymmetric,
    #[error("token uses an RSA algorithm: only EdDSA and ES256 are accepted")]
    AlgRsa,
    #[error("token algorithm is not supported: only EdDSA and ES256 are accepted")]
    AlgUnsupported,
    #[error("token header has no `kid`")]
    MissingKid,
    #[error("token `kid` names no key of a trusted issuer")]
    UnknownKid,
    #[error("token `alg` does not match the type of the key its `kid` names")]
    KeyAlgMismatch,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token payload is not a JSON object")]
    BadPayload,
    #[error("token repeats a claim")]
    DuplicateClaim,
    #[error("token lacks the `{0}` claim")]
    MissingClaim(&'static str),
    #[error("token claim `{0}` is malformed or out of bounds")]
    BadClaim(&'static str),
    #[error("token `iss` names no trusted issuer")]
    UnknownIssuer,
    #[error("token has no `iss` claim and more than one issuer is trusted")]
    MissingIssuer,
    #[error("token audience does not include this KMS")]
    WrongAudience,
    #[error("token expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token was issued in the future")]
    IssuedInFuture,
    #[error("token lives longer than this KMS accepts")]
    LifetimeTooLong,
}

/// Why a JWKS was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("JWKS is not a JSON object with a `keys` array")]
    Malformed,
    #[error("JWKS key {index} has no usable `kid`")]
    MissingKid { index: usize },
    #[error("JWKS key {index} repeats a `kid` used by an earlier key")]
    DuplicateKid { index: usize },
    #[error("JWKS key {index} contains private key material; publish only public keys")]
    PrivateKey { index: usize },
    #[error("JWKS key {index} has a malformed `{field}`")]
    BadKey { index: usize, field: &'static str },
    #[error("JWKS contains no Ed25519 or P-256 signing key")]
    NoUsableKeys,
}

/// Claims of a verified join token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Claims {
    /// Stable user id at the issuer.
    pub sub: String,
    /// Display name.
    pub name: String,
    /// The meeting this token admits to.
    pub mid: MeetingId,
    pub role: Role,
    /// Audiences; serialized as a string when there is one.
    #[serde(serialize_with = "ser_audience")]
    pub aud: Vec<String>,
    pub exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

fn ser_audience<S: serde::Serializer>(aud: &[String], s: S) -> Result<S::Ok, S::Error> {
    match aud {
        [one] => s.serialize_str(one),
        many => many.serialize(s),
    }
}

/// A public key from a JWKS.
#[derive(Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// OKP / Ed25519: the 32-byte public key.
    Ed25519([u8; 32]),
    /// EC / P-256: the uncompressed point `04 || x || y`.
    P256(Box<[u8; 65]>),
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublicKey::Ed25519(_) => f.write_str("Ed25519"),
            PublicKey::P256(_) => f.write_str("P-256"),
        }
    }
}

/// One signing key of an issuer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jwk {
    pub kid: String,
    pub key: PublicKey,
}

impl Jwk {
    pub fn ed25519(kid: impl Into<String>, public_key: [u8; 32]) -> Self {
        Self {
            kid: kid.into(),
            key: PublicKey::Ed25519(public_key),
        }
    }

    /// `point` is the uncompressed SEC1 encoding `04 || x || y`.
    pub fn p256(kid: impl Into<String>, point: [u8; 65]) -> Self {
        Self {
            kid: kid.into(),
            key: PublicKey::P256(Box::new(point)),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match &self.key {
            PublicKey::Ed25519(x) => serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA",
                "kid": self.kid, "x": URL_SAFE_NO_PAD.encode(x),
            }),
            PublicKey::P256(point) => serde_json::json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
                "kid": self.kid,
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..]),
            }),
        }
    }
}

/// An issuer's key set.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Jwks {
    keys: Vec<Jwk>,
    /// Per key, its Ed25519 point decoded once (every join would otherwise
    /// decode it again); `None` for P-256 keys and for Ed25519 keys that no
    /// token may verify under (not a curve point, or of small order).
    ed25519: Vec<Option<VerifyingKey>>,
}

impl fmt::Debug for Jwks {
    /// The keys only: the decoded points repeat them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwks").field("keys", &self.keys).finish()
    }
}

/// Decodes an Ed25519 issuer key for verification. A small-order key is
/// refused: a signature with R = identity and S = 0 would verify under it
/// for every message (ring's Ed25519 verification accepts that).
fn decode_ed25519(key: &PublicKey) -> Option<VerifyingKey> {
    let PublicKey::Ed25519(bytes) = key else {
        return None;
    };
    VerifyingKey::from_bytes(bytes)
        .ok()
        .filter(|k| !k.is_weak())
}

/// The canonical encodings of the eight points of small order (the
/// identity, one of order 2, two of order 4, four of order 8). An R among
/// them is refused, as `verify_strict` refuses it; a non-canonical R never
/// verifies, since R is compared with the canonical encoding of
/// `[S]B - [k]A`.
const SMALL_ORDER_R: [[u8; 32]; 8] = {
    const fn nib(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            _ => c - b'a' + 10,
        }
    }
    const fn hex(s: &str) -> [u8; 32] {
        let b = s.as_bytes();
        let mut out = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            out[i] = (nib(b[2 * i]) << 4) | nib(b[2 * i + 1]);
            i += 1;
        }
        out
    }
    [
        hex("0100000000000000000000000000000000000000000000000000000000000000"),
        hex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        hex("0000000000000000000000000000000000000000000000000000000000000000"),
        hex("0000000000000000000000000000000000000000000000000000000000000080"),
        hex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
        hex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"),
        hex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
        hex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"),
    ]
};

/// Ed25519 verification (RFC 8032, cofactorless) with ed25519-dalek, whose
/// AVX2 backend verifies faster here than ring's portable code (the kms
/// bench's `kms_ed25519_verify_us` against ring). It accepts a subset of
/// what ring accepts, the same set as dalek's `verify_strict`: S must be
/// canonical (below the group order; dalek checks), R must equal the
/// canonical encoding of `[S]B - [k]A` (as in ring), and neither the key
/// ([`decode_ed25519`]) nor R may be of small order. `verify_strict` itself
/// would decode R for that last check, which costs what the switch saves.
fn verify_ed25519(key: Option<&VerifyingKey>, message: &[u8], signature: &[u8]) -> bool {
    use ed25519_dalek::Verifier as _;
    let (Some(key), Ok(signature)) = (key, ed25519_dalek::Signature::from_slice(signature)) else {
        return false;
    };
    !SMALL_ORDER_R.contains(signature.r_bytes()) && key.verify(message, &signature).is_ok()
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Map<String, serde_json::Value>>,
}

fn b64_field<const N: usize>(
    key: &serde_json::Map<String, serde_json::Value>,
    field: &'static str,
    index: usize,
) -> Result<[u8; N], JwksError> {
    let bad = JwksError::BadKey { index, field };
    let text = key.get(field).and_then(|v| v.as_str()).ok_or(bad.clone())?;
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| bad.clone())?;
    bytes.try_into().map_err(|_| bad)
}

impl Jwks {
    /// A key set from keys; `kid`s must be distinct.
    pub fn new(keys: Vec<Jwk>) -> Result<Self, JwksError> {
        for (index, key) in keys.iter().enumerate() {
            if key.kid.is_empty() || key.kid.len() > MAX_KID_LEN {
                return Err(JwksError::MissingKid { index });
            }
            if keys[..index].iter().any(|k| k.kid == key.kid) {
                return Err(JwksError::DuplicateKid { index });
            }
        }
        let ed25519 = keys.iter().map(|k| decode_ed25519(&k.key)).collect();
        Ok(Self { keys, ed25519 })
    }

    /// Parses a JWKS document. Keys of other types (RSA, other curves) and
    /// keys marked for encryption are skipped, since issuers often publish
    /// those alongside; a key set with no usable key at all is an error.
    pub fn from_json(json: &[u8]) -> Result<Self, JwksError> {
        let raw: RawJwks = serde_json::from_slice(json).map_err(|_| JwksError::Malformed)?;
        let mut keys = Vec::new();
        for (index, key) in raw.keys.iter().enumerate() {
            if ["d", "p", "q", "dp", "dq", "qi", "k"]
                .iter()
                .any(|f| key.contains_key(*f))
            {
                return Err(JwksError::PrivateKey { index });
            }
            let field = |name: &str| key.get(name).and_then(|v| v.as_str());
            if field("use").is_some_and(|u| u != "sig") {
                continue;
            }
            let public = match (field("kty"), field("crv")) {
                (Some("OKP"), Some("Ed25519")) => {
                    if field("alg").is_some_and(|a| a != "EdDSA") {
                        return Err(JwksError::BadKey {
                            index,
                            field: "alg",
                        });
                    }
                    PublicKey::Ed25519(b64_field::<32>(key, "x", index)?)
                }
                (Some("EC"), Some("P-256")) => {
                    if field("alg").is_some_and(|a| a != "ES256") {
                        return Err(JwksError::BadKey {
                            index,
                            field: "alg",
                        });
                    }
                    let x = b64_field::<32>(key, "x", index)?;
                    let y = b64_field::<32>(key, "y", index)?;
                    let mut point = [0u8; 65];
                    point[0] = 4;
                    point[1..33].copy_from_slice(&x);
                    point[33..].copy_from_slice(&y);
                    PublicKey::P256(Box::new(point))
                }
                _ => continue,
            };
            let kid = field("kid").ok_or(JwksError::MissingKid { index })?;
            keys.push(Jwk {
                kid: kid.to_owned(),
                key: public,
            });
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKeys);
        }
        Self::new(keys).map_err(|e| match e {
            // Indices from `new` count usable keys only; report the kid rule.
            JwksError::DuplicateKid { .. } => JwksError::DuplicateKid { index: 0 },
            other => other,
        })
    }

    /// The JWKS document for these keys (public parts only).
    pub fn to_json(&self) -> String {
        let keys: Vec<_> = self.keys.iter().map(Jwk::to_json).collect();
        serde_json::json!({ "keys": keys }).to_string()
    }

    pub fn get(&self, kid: &str) -> Option<&Jwk> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// The key for `kid` with its decoded Ed25519 point, if it has one.
    fn get_decoded(&self, kid: &str) -> Option<(&Jwk, Option<&VerifyingKey>)> {
        let i = self.keys.iter().position(|k| k.kid == kid)?;
        Some((&self.keys[i], self.ed25519[i].as_ref()))
    }

    pub fn keys(&self) -> &[Jwk] {
        &self.keys
    }
}

/// One issuer the KMS trusts: its name (matched against `iss`), the audience
/// its tokens must name, and its keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedIssuer {
    pub name: String,
    pub audience: String,
    pub jwks: Jwks,
}

/// What a successful verification yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The trusted issuer that signed it ([`TrustedIssuer::name`]).
    pub issuer: String,
    /// The key that signed it.
    pub kid: String,
    pub claims: Claims,
}

/// Verifies join tokens against a set of trusted issuers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenVerifier {
    issuers: Vec<TrustedIssuer>,
    clock_skew_secs: u64,
    max_lifetime_secs: Option<u64>,
}

/// Header parameters we accept. Anything that could point the verifier at
/// another key (`jwk`, `jku`, `x5u`, `x5c`), change how the payload is read
/// (`crit`, `b64`, `zip`, `cty`) or is unknown is refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: String,
    kid: Option<String>,
    typ: Option<String>,
    #[serde(rename = "x5t")]
    _x5t: Option<IgnoredAny>,
    #[serde(rename = "x5t#S256")]
    _x5t_s256: Option<IgnoredAny>,
}

/// Claims as they arrive, before bounds checks. Unknown claims are ignored;
/// a repeated known claim fails deserialization.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<serde_json::Value>,
    name: Option<serde_json::Value>,
    mid: Option<serde_json::Value>,
    role: Option<serde_json::Value>,
    aud: Option<serde_json::Value>,
    exp: Option<serde_json::Value>,
    nbf: Option<serde_json::Value>,
    iat: Option<serde_json::Value>,
    iss: Option<serde_json::Value>,
}

/// Object keys of a JSON document, to find repeats that serde_json's maps
/// would silently collapse.
struct Keys(Vec<String>);

impl<'de> Deserialize<'de> for Keys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Keys;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

fn has_duplicates(keys: &mut [String]) -> bool {
    keys.sort_unstable();
    keys.windows(2).any(|w| w[0] == w[1])
}

fn decode(part: &str, which: Part) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::BadBase64(which))
}

enum Alg {
    EdDsa,
    Es256,
}

fn parse_alg(alg: &str) -> Result<Alg, TokenError> {
    match alg {
        "EdDSA" => Ok(Alg::EdDsa),
        "ES256" => Ok(Alg::Es256),
        _ if alg.eq_ignore_ascii_case("none") => Err(TokenError::AlgNone),
        _ if alg.starts_with("HS") => Err(TokenError::AlgSymmetric),
        _ if alg.starts_with("RS") || alg.starts_with("PS") => Err(TokenError::AlgRsa),
        _ => Err(TokenError::AlgUnsupported),
    }
}

fn parse_header(bytes: &[u8]) -> Result<Header, TokenError> {
    let mut keys = serde_json::from_slice::<Keys>(bytes)
        .map_err(|_| TokenError::BadHeader)?
        .0;
    if has_duplicates(&mut keys) {
        return Err(TokenError::DuplicateHeader);
    }
    const ALLOWED: [&str; 5] = ["alg", "kid", "typ", "x5t", "x5t#S256"];
    if keys.iter().any(|k| !ALLOWED.contains(&k.as_str())) {
        return Err(TokenError::UnsupportedHeader);
    }
    serde_json::from_slice::<Header>(bytes).map_err(|_| TokenError::BadHeader)
}

fn parse_raw_claims(bytes: &[u8]) -> Result<RawClaims, TokenError> {
    let mut keys = serde_json::from_slice::<Keys>(bytes)
        .map_err(|_| TokenError::BadPayload)?
        .0;
    if has_duplicates(&mut keys) {
        return Err(TokenError::DuplicateClaim);
    }
    serde_json::from_slice::<RawClaims>(bytes).map_err(|_| TokenError::BadPayload)
}

fn bounded_text(
    v: Option<serde_json::Value>,
    claim: &'static str,
    max: usize,
) -> Result<String, TokenError> {
    let v = v.ok_or(TokenError::MissingClaim(claim))?;
    let s = v.as_str().ok_or(TokenError::BadClaim(claim))?;
    // Names reach rosters and logs: no control characters, nothing unbounded.
    if s.trim().is_empty() || s.len() > max || s.chars().any(char::is_control) {
        return Err(TokenError::BadClaim(claim));
    }
    Ok(s.to_owned())
}

fn seconds(v: Option<serde_json::Value>, claim: &'static str) -> Result<Option<u64>, TokenError> {
    match v {
        None => Ok(None),
        // NumericDate may be fractional; we keep whole seconds.
        Some(v) => match (v.as_u64(), v.as_f64()) {
            (Some(n), _) => Ok(Some(n)),
            (None, Some(f)) if (0.0..1e15).contains(&f) => Ok(Some(f as u64)),
            _ => Err(TokenError::BadClaim(claim)),
        },
    }
}

fn audiences(v: Option<serde_json::Value>) -> Result<Vec<String>, TokenError> {
    let bad = TokenError::BadClaim("aud");
    let list = match v.ok_or(TokenError::MissingClaim("aud"))? {
        serde_json::Value::String(s) => vec![s],
        serde_json::Value::Array(items) if !items.is_empty() && items.len() <= 16 => items
            .into_iter()
            .map(|i| match i {
                serde_json::Value::String(s) => Ok(s),
                _ => Err(bad.clone()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad),
    };
    if list.iter().any(|a| a.is_empty() || a.len() > 512) {
        return Err(bad);
    }
    Ok(list)
}

impl TokenVerifier {
    pub fn new(issuers: Vec<TrustedIssuer>) -> Self {
        Self {
            issuers,
            clock_skew_secs: DEFAULT_CLOCK_SKEW_SECS,
            max_lifetime_secs: None,
        }
    }

    /// Refuses tokens whose `exp` lies more than `secs` after `now`, so a
    /// portal that mints long-lived bearer tokens by mistake is caught.
    /// Off by default.
    pub fn with_max_lifetime(mut self, secs: u64) -> Self {
        self.max_lifetime_secs = Some(secs);
        self
    }

    /// Tolerance applied to `exp`, `nbf` and `iat` (default 60 s).
    pub fn with_clock_skew(mut self, secs: u64) -> Self {
        self.clock_skew_secs = secs;
        self
    }

    pub fn issuers(&self) -> &[TrustedIssuer] {
        &self.issuers
    }

    /// Verifies `token` at time `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<VerifiedToken, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if h64.is_empty() || p64.is_empty() {
            return Err(TokenError::Malformed);
        }

        let header = parse_header(&decode(h64, Part::Header)?)?;
        // Before the empty-signature check, so `alg: none` tokens (which have
        // an empty signature) are reported as what they are.
        let alg = parse_alg(&header.alg)?;
        if s64.is_empty() {
            return Err(TokenError::Malformed);
        }
        if header
            .typ
            .as_deref()
            .is_some_and(|t| !t.eq_ignore_ascii_case("JWT"))
        {
            return Err(TokenError::BadType);
        }
        let kid = header.kid.ok_or(TokenError::MissingKid)?;
        let payload = decode(p64, Part::Payload)?;
        let signature = decode(s64, Part::Signature)?;
        let raw = parse_raw_claims(&payload)?;

        // `iss` is read before the signature is checked only to choose whose
        // keys to check it with; nothing else is trusted yet.
        let iss = match raw.iss.clone() {
            None => None,
            Some(serde_json::Value::String(s)) => Some(s),
            Some(_) => return Err(TokenError::BadClaim("iss")),
        };
        let issuer = match (&iss, self.issuers.as_slice()) {
            (Some(name), all) => all
                .iter()
                .find(|i| &i.name == name)
                .ok_or(TokenError::UnknownIssuer)?,
            (None, [only]) => only,
            (None, []) => return Err(TokenError::UnknownKid),
            (None, _) => return Err(TokenError::MissingIssuer),
        };
        let (key, ed25519) = issuer
            .jwks
            .get_decoded(&kid)
            .ok_or(TokenError::UnknownKid)?;

        let signed = &token.as_bytes()[..h64.len() + 1 + p64.len()];
        let verified = match (&alg, &key.key) {
            (Alg::EdDsa, PublicKey::Ed25519(_)) => verify_ed25519(ed25519, signed, &signature),
            (Alg::Es256, PublicKey::P256(point)) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point[..])
                    .verify(signed, &signature)
                    .is_ok()
            }
            _ => return Err(TokenError::KeyAlgMismatch),
        };
        if !verified {
            return Err(TokenError::BadSignature);
        }

        let claims = Claims {
            sub: bounded_text(raw.sub, "sub", MAX_SUBJECT_LEN)?,
            name: bounded_text(raw.name, "name", MAX_NAME_LEN)?,
            mid: match raw.mid {
                None => return Err(TokenError::MissingClaim("mid")),
                Some(serde_json::Value::String(s)) => {
                    MeetingId::new(s).map_err(|_| TokenError::BadClaim("mid"))?
                }
                Some(_) => return Err(TokenError::BadClaim("mid")),
            },
            role: match raw.role {
                None => return Err(TokenError::MissingClaim("role")),
                Some(v) => Role::deserialize(v).map_err(|_| TokenError::BadClaim("role"))?,
            },
            aud: audiences(raw.aud)?,
            exp: seconds(raw.exp, "exp")?.ok_or(TokenError::MissingClaim("exp"))?,
            nbf: seconds(raw.nbf, "nbf")?,
            iat: seconds(raw.iat, "iat")?,
            iss,
        };
        if !claims.aud.iter().any(|a| a == &issuer.audience) {
            return Err(TokenError::WrongAudience);
        }
        let skew = self.clock_skew_secs;
        if now >= claims.exp.saturating_add(skew) {
            return Err(TokenError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| now.saturating_add(skew) < nbf) {
            return Err(TokenError::NotYetValid);
        }
        if claims.iat.is_some_and(|iat| now.saturating_add(skew) < iat) {
            return Err(TokenError::IssuedInFuture);
        }
        if self
            .max_lifetime_secs
            .is_some_and(|max| claims.exp > now.saturating_add(max).saturating_add(skew))
        {
            return Err(TokenError::LifetimeTooLong);
        }
        Ok(VerifiedToken {
            issuer: issuer.name.clone(),
            kid,
            claims,
        })
    }
}

/// A development issuer key (Ed25519) for minting join tokens locally and in
/// tests. Production tokens come from the customer's portal.
pub struct DevIssuerKey {
    kid: String,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for DevIssuerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevIssuerKey")
            .field("kid", &self.kid)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl DevIssuerKey {
    /// The key derived from a 32-byte seed. The caller owns (and zeroizes)
    /// the seed; this crate holds no randomness source.
    pub fn from_seed(kid: impl Into<String>, seed: &[u8; 32]) -> Result<Self, JwksError> {
        let kid = kid.into();
        if kid.is_empty() || kid.len() > MAX_KID_LEN {
            return Err(JwksError::MissingKid { index: 0 });
        }
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| JwksError::BadKey {
            index: 0,
            field: "d",
        })?;
        Ok(Self { kid, pair })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// This key as a JWK.
    pub fn jwk(&self) -> Jwk {
        Jwk::ed25519(self.kid.clone(), self.public_key())
    }

    /// A JWKS document holding this key's public half, for the
    /// KeyManagementServer's issuer Secret.
    pub fn jwks_json(&self) -> String {
        serde_json::json!({ "keys": [self.jwk().to_json()] }).to_string()
    }

    /// Signs `claims` as an EdDSA compact JWS. `claims` are not checked here:
    /// tests mint deliberately bad tokens.
    pub fn mint(&self, claims: &Claims) -> String {
        let header = serde_json::json!({ "alg": "EdDSA", "typ": "JWT", "kid": self.kid });
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let mut token = URL_SAFE_NO_PAD.encode(header.to_string());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(payload));
        let sig = self.pair.sign(token.as_bytes());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

    const NOW: u64 = 1_800_000_000;
    const AUD: &str = "conclave-kms";

    fn dev_key(kid: &str, byte: u8) -> DevIssuerKey {
        DevIssuerKey::from_seed(kid, &[byte; 32]).unwrap()
    }

    fn claims() -> Claims {
        Claims {
            sub: "user-42".into(),
            name: "Ada Lovelace".into(),
            mid: MeetingId::new("weekly-sync").unwrap(),
            role: Role::Host,
            aud: vec![AUD.into()],
            exp: NOW + 600,
            nbf: Some(NOW - 10),
            iat: Some(NOW - 10),
            iss: None,
        }
    }

    fn issuer(name: &str, keys: Vec<Jwk>) -> TrustedIssuer {
        TrustedIssuer {
            name: name.into(),
            audience: AUD.into(),
            jwks: Jwks::new(keys).unwrap(),
        }
    }

    fn verifier(key: &DevIssuerKey) -> TokenVerifier {
        TokenVerifier::new(vec![issuer("portal", vec![key.jwk()])])
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    /// Signs arbitrary header and payload JSON with a dev key.
    fn sign_raw(key: &DevIssuerKey, header: &str, payload: &str) -> String {
        let signing_input = format!("{}.{}", b64(header), b64(payload));
        let sig = key.pair.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    fn header(kid: &str) -> String {
        format!(r#"{{"alg":"EdDSA","typ":"JWT","kid":"{kid}"}}"#)
    }

    fn payload_with(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v = serde_json::to_value(claims()).unwrap();
        edit(&mut v);
        v.to_string()
    }

    struct Es256 {
        pair: EcdsaKeyPair,
        rng: SystemRandom,
    }

    impl Es256 {
        fn new() -> Self {
            let rng = SystemRandom::new();
            let pkcs8 =
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let pair =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                    .unwrap();
            Self { pair, rng }
        }

        fn jwk(&self, kid: &str) -> Jwk {
            Jwk::p256(kid, self.pair.public_key().as_ref().try_into().unwrap())
        }

        fn mint(&self, kid: &str, claims: &Claims) -> String {
            let h = format!(r#"{{"alg":"ES256","typ":"JWT","kid":"{kid}"}}"#);
            let signing_input = format!(
                "{}.{}",
                b64(&h),
                URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap())
            );
            let sig = self.pair.sign(&self.rng, signing_input.as_bytes()).unwrap();
            format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
        }
    }

    #[test]
    fn minted_token_verifies_and_yields_claims() {
        let key = dev_key("dev-1", 7);
        let token = key.mint(&claims());
        let ok = verifier(&key).verify(&token, NOW).unwrap();
        assert_eq!(ok.claims, claims());
        assert_eq!(ok.issuer, "portal");
        assert_eq!(ok.kid, "dev-1");
    }

    #[test]
    fn jwks_with_both_key_types_verifies_both_algorithms() {
        let ed = dev_key("ed", 1);
        let ec = Es256::new();
        let json = Jwks::new(vec![ed.jwk(), ec.jwk("ec")]).unwrap().to_json();
        let jwks = Jwks::from_json(json.as_bytes()).unwrap();
        assert_eq!(jwks.keys().len(), 2);
        let v = TokenVerifier::new(vec![TrustedIssuer {
            name: "portal".into(),
            audience: AUD.into(),
            jwks,
        }]);
        assert_eq!(v.verify(&ed.mint(&claims()), NOW).unwrap().kid, "ed");
        assert_eq!(v.verify(&ec.mint("ec", &claims()), NOW).unwrap().kid, "ec");
        // An ES256 token claiming the Ed25519 key's kid, and vice versa.
        assert_eq!(
            v.verify(&ec.mint("ed", &claims()), NOW),
            Err(TokenError::KeyAlgMismatch)
        );
        let ed_as_ec = sign_raw(
            &ed,
            r#"{"alg":"EdDSA","kid":"ec"}"#,
            &serde_json::to_string(&claims()).unwrap(),
        );
        assert_eq!(v.verify(&ed_as_ec, NOW), Err(TokenError::KeyAlgMismatch));
    }

    #[test]
    fn dev_jwks_json_round_trips() {
        let key = dev_key("dev-1", 9);
        let jwks = Jwks::from_json(key.jwks_json().as_bytes()).unwrap();
        assert_eq!(jwks.get("dev-1"), Some(&key.jwk()));
        assert!(!key.jwks_json().contains("\"d\""));
        assert!(!format!("{key:?}").contains(&URL_SAFE_NO_PAD.encode([9u8; 32])));
    }

    #[test]
    fn small_order_table_is_the_eight_torsion_subgroup() {
        // The multiples of a point of order 8 are exactly the points of
        // small order; their canonical encodings must be the table.
        let t = VerifyingKey::from_bytes(&SMALL_ORDER_R[4])
            .unwrap()
            .to_edwards();
        let mut p = t;
        let mut multiples = Vec::new();
        for _ in 0..8 {
            multiples.push(p.compress().to_bytes());
            p += t;
        }
        multiples.sort();
        let mut table = SMALL_ORDER_R.to_vec();
        table.sort();
        assert_eq!(multiples, table);
        for r in SMALL_ORDER_R {
            assert!(VerifyingKey::from_bytes(&r).unwrap().is_weak());
        }
    }

    /// A token "signed" for a small-order issuer key with R = identity and
    /// S = 0: ring's Ed25519 verification accepts it for any message, ours
    /// refuses it (and a JWKS holding such a key still loads).
    #[test]
    fn small_order_issuer_key_verifies_nothing() {
        let identity = SMALL_ORDER_R[0];
        let jwks = Jwks::from_json(
            Jwks::new(vec![Jwk::ed25519("weak", identity)])
                .unwrap()
                .to_json()
                .as_bytes(),
        )
        .unwrap();
        let v = TokenVerifier::new(vec![TrustedIssuer {
            name: "portal".into(),
            audience: AUD.into(),
            jwks,
        }]);
        let signing_input = format!(
            "{}.{}",
            b64(&header("weak")),
            b64(&serde_json::to_string(&claims()).unwrap())
        );
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&identity);
        assert!(
            UnparsedPublicKey::new(&signature::ED25519, &identity)
                .verify(signing_input.as_bytes(), &sig)
                .is_ok(),
            "the forgery this test is about"
        );
        let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig));
        assert_eq!(v.verify(&token, NOW), Err(TokenError::BadSignature));
    }

    /// S + L (the group order) is the same signature modulo L: refused as
    /// non-canonical, as ring refuses it.
    #[test]
    fn non_canonical_s_is_refused() {
        const L: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let key = dev_key("dev-1", 7);
        let token = key.mint(&claims());
        assert!(verifier(&key).verify(&token, NOW).is_ok());
        let (signing_input, sig64) = token.rsplit_once('.').unwrap();
        let mut sig = URL_SAFE_NO_PAD.decode(sig64).unwrap();
        let mut carry = 0u16;
        for (s, l) in sig[32..].iter_mut().zip(L) {
            let sum = u16::from(*s) + u16::from(l) + carry;
            *s = sum as u8;
            carry = sum >> 8;
        }
        assert_eq!(carry, 0, "S + L fits in 32 bytes");
        assert!(
            UnparsedPublicKey::new(&signature::ED25519, &key.public_key())
                .verify(signing_input.as_bytes(), &sig)
                .is_err()
        );
        let forged = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(&sig));
        assert_eq!(
            verifier(&key).verify(&forged, NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampering_any_byte_is_refused() {
        let ed = dev_key("ed", 3);
        let ec = Es256::new();
        let v = TokenVerifier::new(vec![issuer("portal", vec![ed.jwk(), ec.jwk("ec")])]);
        for token in [ed.mint(&claims()), ec.mint("ec", &claims())] {
            assert!(v.verify(&token, NOW).is_ok());
            let bytes = token.as_bytes();
            for i in 0..bytes.len() {
                for replacement in [b'A', b'B', b'_', b'-', b'.', b'a', b'0'] {
                    if bytes[i] == replacement {
                        continue;
                    }
                    let mut t = bytes.to_vec();
                    t[i] = replacement;
                    let t = String::from_utf8(t).unwrap();
                    assert!(v.verify(&t, NOW).is_err(), "byte {i} -> {replacement}");
                }
            }
            // Truncation and extension anywhere are refused too.
            for cut in 1..token.len() {
                assert!(v.verify(&token[..cut], NOW).is_err(), "cut at {cut}");
            }
            assert!(v.verify(&format!("{token}A"), NOW).is_err());
            assert!(v.verify(&format!("{token}."), NOW).is_err());
        }
    }

    #[test]
    fn disallowed_algorithms_are_refused_by_name() {
        let key = dev_key("k", 1);
        let v = verifier(&key);
        let body = serde_json::to_string(&claims()).unwrap();
        let cases = [
            ("none", TokenError::AlgNone),
            ("None", TokenError::AlgNone),
            ("HS256", TokenError::AlgSymmetric),
            ("HS512", TokenError::AlgSymmetric),
            ("RS256", TokenError::AlgRsa),
            ("PS256", TokenError::AlgRsa),
            ("ES384", TokenError::AlgUnsupported),
            ("Ed25519", TokenError::AlgUnsupported),
            ("eddsa", TokenError::AlgUnsupported),
        ];
        for (alg, want) in cases {
            let h = format!(r#"{{"alg":"{alg}","kid":"k"}}"#);
            // Unsigned form (empty signature) and signed form.
            let unsigned = format!("{}.{}.", b64(&h), b64(&body));
            assert_eq!(v.verify(&unsigned, NOW), Err(want.clone()), "{alg}");
            assert_eq!(
                v.verify(&sign_raw(&key, &h, &body), NOW),
                Err(want),
                "{alg}"
            );
        }
    }

    #[test]
    fn header_rules() {
        let key = dev_key("k", 1);
        let v = verifier(&key);
        let body = serde_json::to_string(&claims()).unwrap();
        let cases = [
            (
                r#"{"alg":"EdDSA","alg":"EdDSA","kid":"k"}"#,
                TokenError::DuplicateHeader,
            ),
            (
                r#"{"alg":"EdDSA","kid":"k","kid":"k"}"#,
                TokenError::DuplicateHeader,
            ),
            (
                r#"{"alg":"EdDSA","kid":"k","jwk":{}}"#,
                TokenError::UnsupportedHeader,
            ),
            (
                r#"{"alg":"EdDSA","kid":"k","jku":"x"}"#,
                TokenError::UnsupportedHeader,
            ),
            (
                r#"{"alg":"EdDSA","kid":"k","crit":["b64"]}"#,
                TokenError::UnsupportedHeader,
            ),
            (
                r#"{"alg":"EdDSA","kid":"k","x5c":[]}"#,
                TokenError::UnsupportedHeader,
            ),
            (
                r#"{"alg":"EdDSA","kid":"k","cty":"JWT"}"#,
                TokenError::UnsupportedHeader,
            ),
            (
                r#"{"alg":"EdDSA","kid":"k","typ":"JOSE"}"#,
                TokenError::BadType,
            ),
            (r#"{"alg":"EdDSA"}"#, TokenError::MissingKid),
            (r#"{"alg":"EdDSA","kid":"other"}"#, TokenError::UnknownKid),
            (r#"{"alg":"EdDSA","kid":7}"#, TokenError::BadHeader),
            (r#"{"kid":"k"}"#, TokenError::BadHeader),
            (r#"["alg","EdDSA"]"#, TokenError::BadHeader),
            (r#"{"alg":"EdDSA","kid":"k"} x"#, TokenError::BadHeader),
            ("", TokenError::Malformed),
        ];
        for (h, want) in cases {
            assert_eq!(v.verify(&sign_raw(&key, h, &body), NOW), Err(want), "{h}");
        }
        // x5t is tolerated (some IdPs always send it).
        let h = r#"{"alg":"EdDSA","kid":"k","x5t":"abc","typ":"jwt"}"#;
        assert!(v.verify(&sign_raw(&key, h, &body), NOW).is_ok());
    }

    #[test]
    fn structure_and_encoding_rules() {
        let key = dev_key("k", 1);
        let v = verifier(&key);
        let token = key.mint(&claims());
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(v.verify("", NOW), Err(TokenError::Empty));
        assert_eq!(v.verify("a.b", NOW), Err(TokenError::Malformed));
        assert_eq!(v.verify("a.b.c.d", NOW), Err(TokenError::Malformed));
        assert_eq!(
            v.verify(&format!(".{}.{}", parts[1], parts[2]), NOW),
            Err(TokenError::Malformed)
        );
        let padded = format!("{}.{}.{}==", parts[0], parts[1], parts[2]);
        assert_eq!(
            v.verify(&padded, NOW),
            Err(TokenError::BadBase64(Part::Signature))
        );
        let std_alphabet = format!("{}+.{}.{}", parts[0], parts[1], parts[2]);
        assert_eq!(
            v.verify(&std_alphabet, NOW),
            Err(TokenError::BadBase64(Part::Header))
        );
        let ws = format!("{}.{} .{}", parts[0], parts[1], parts[2]);
        assert_eq!(
            v.verify(&ws, NOW),
            Err(TokenError::BadBase64(Part::Payload))
        );
        let long = format!("{token}{}", "A".repeat(MAX_TOKEN_LEN));
        assert_eq!(v.verify(&long, NOW), Err(TokenError::TooLong));
        // A payload that is not an object is refused even when signed.
        let signed_array = sign_raw(&key, &header("k"), "[1,2]");
        assert_eq!(v.verify(&signed_array, NOW), Err(TokenError::BadPayload));
    }

    #[test]
    fn claim_rules() {
        let key = dev_key("k", 1);
        let v = verifier(&key);
        let check = |payload: String, want: TokenError| {
            assert_eq!(
                v.verify(&sign_raw(&key, &header("k"), &payload), NOW),
                Err(want),
                "{payload}"
            );
        };
        for claim in ["sub", "name", "mid", "role", "aud", "exp"] {
            check(
                payload_with(|c| {
                    c.as_object_mut().unwrap().remove(claim);
                }),
                TokenError::MissingClaim(claim),
            );
        }
        let bad: [(&str, serde_json::Value); 12] = [
            ("sub", "".into()),
            ("sub", "x".repeat(MAX_SUBJECT_LEN + 1).into()),
            ("name", "Ada\nInjected: log line".into()),
            ("name", 5.into()),
            ("mid", "a/b".into()),
            ("mid", "m".repeat(65).into()),
            ("role", "admin".into()),
            ("role", "Host".into()),
            ("aud", serde_json::json!([])),
            ("aud", serde_json::json!([AUD, 1])),
            ("exp", "soon".into()),
            ("exp", (-5).into()),
        ];
        for (claim, value) in bad {
            check(
                payload_with(|c| {
                    c[claim] = value;
                }),
                TokenError::BadClaim(claim),
            );
        }
        check(
            payload_with(|c| c["iss"] = 7.into()),
            TokenError::BadClaim("iss"),
        );
        // A repeated claim, properly signed: serde_json maps would keep the last.
        let body = serde_json::to_string(&claims()).unwrap();
        let dup = format!(r#"{},"role":"participant"}}"#, &body[..body.len() - 1]);
        check(dup, TokenError::DuplicateClaim);
        // Extra claims are ignored; participant role round-trips.
        let extra = payload_with(|c| {
            c["jti"] = "abc".into();
            c["role"] = "participant".into();
        });
        let ok = v
            .verify(&sign_raw(&key, &header("k"), &extra), NOW)
            .unwrap();
        assert_eq!(ok.claims.role, Role::Participant);
    }

    #[test]
    fn audience_must_name_this_kms() {
        let key = dev_key("k", 1);
        let v = verifier(&key);
        let mut c = claims();
        c.aud = vec!["someone-else".into()];
        assert_eq!(v.verify(&key.mint(&c), NOW), Err(TokenError::WrongAudience));
        c.aud = vec!["someone-else".into(), AUD.into()];
        assert!(v.verify(&key.mint(&c), NOW).is_ok());
    }

    #[test]
    fn time_rules_with_clock_skew() {
        let key = dev_key("k", 1);
        let v = verifier(&key);
        let at = |exp: u64, nbf: Option<u64>, iat: Option<u64>| {
            let mut c = claims();
            c.exp = exp;
            c.nbf = nbf;
            c.iat = iat;
            key.mint(&c)
        };
        // exp: accepted until exp + skew.
        assert!(v.verify(&at(NOW - 59, None, None), NOW).is_ok());
        assert_eq!(
            v.verify(&at(NOW - 60, None, None), NOW),
            Err(TokenError::Expired)
        );
        let strict = verifier(&key).with_clock_skew(0);
        assert!(strict.verify(&at(NOW + 1, None, None), NOW).is_ok());
        assert_eq!(
            strict.verify(&at(NOW, None, None), NOW),
            Err(TokenError::Expired)
        );
        // nbf and iat: accepted from value - skew.
        assert!(v.verify(&at(NOW + 600, Some(NOW + 60), None), NOW).is_ok());
        assert_eq!(
            v.verify(&at(NOW + 600, Some(NOW + 61), None), NOW),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(
            v.verify(&at(NOW + 600, None, Some(NOW + 61)), NOW),
            Err(TokenError::IssuedInFuture)
        );
        // Fractional NumericDate values are read as whole seconds.
        let frac = sign_raw(
            &key,
            &header("k"),
            &payload_with(|c| c["exp"] = serde_json::json!((NOW + 5) as f64 + 0.5)),
        );
        assert_eq!(v.verify(&frac, NOW).unwrap().claims.exp, NOW + 5);
        // Huge values do not overflow.
        assert!(v.verify(&at(u64::MAX, None, None), u64::MAX - 1).is_ok());
        // An optional cap on how far ahead `exp` may lie (skew included).
        let capped = verifier(&key).with_max_lifetime(3600);
        assert!(capped.verify(&at(NOW + 3660, None, None), NOW).is_ok());
        assert_eq!(
            capped.verify(&at(NOW + 3661, None, None), NOW),
            Err(TokenError::LifetimeTooLong)
        );
    }

    #[test]
    fn issuer_selection() {
        let a = dev_key("a-1", 1);
        let b = dev_key("b-1", 2);
        let v = TokenVerifier::new(vec![
            issuer("portal-a", vec![a.jwk()]),
            issuer("portal-b", vec![b.jwk()]),
        ]);
        let with_iss = |key: &DevIssuerKey, iss: Option<&str>| {
            let mut c = claims();
            c.iss = iss.map(str::to_owned);
            key.mint(&c)
        };
        assert_eq!(
            v.verify(&with_iss(&b, Some("portal-b")), NOW)
                .unwrap()
                .issuer,
            "portal-b"
        );
        assert_eq!(
            v.verify(&with_iss(&b, Some("portal-a")), NOW),
            Err(TokenError::UnknownKid)
        );
        assert_eq!(
            v.verify(&with_iss(&b, Some("portal-c")), NOW),
            Err(TokenError::UnknownIssuer)
        );
        assert_eq!(
            v.verify(&with_iss(&b, None), NOW),
            Err(TokenError::MissingIssuer)
        );
        assert_eq!(
            TokenVerifier::new(vec![]).verify(&with_iss(&b, None), NOW),
            Err(TokenError::UnknownKid)
        );
        // A token signed by an untrusted key that reuses a trusted kid.
        let forged = dev_key("a-1", 99).mint(&claims());
        assert_eq!(
            TokenVerifier::new(vec![issuer("portal-a", vec![a.jwk()])]).verify(&forged, NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn jwks_rules() {
        let ed = dev_key("ed", 1);
        let x = URL_SAFE_NO_PAD.encode(ed.public_key());
        let parse = |s: String| Jwks::from_json(s.as_bytes());
        let okp =
            |extra: &str| format!(r#"{{"kty":"OKP","crv":"Ed25519","kid":"ed","x":"{x}"{extra}}}"#);
        let rsa = r#"{"kty":"RSA","kid":"r","n":"AQAB","e":"AQAB"}"#;
        assert_eq!(
            parse(format!(r#"{{"keys":[{rsa},{}]}}"#, okp("")))
                .unwrap()
                .keys()
                .len(),
            1
        );
        assert_eq!(
            parse(format!(r#"{{"keys":[{rsa}]}}"#)),
            Err(JwksError::NoUsableKeys)
        );
        assert_eq!(
            parse(format!(r#"{{"keys":[{}]}}"#, okp(r#","use":"enc""#))),
            Err(JwksError::NoUsableKeys)
        );
        assert_eq!(
            parse(format!(r#"{{"keys":[{}]}}"#, okp(r#","d":"AAAA""#))),
            Err(JwksError::PrivateKey { index: 0 })
        );
        assert_eq!(
            parse(format!(r#"{{"keys":[{},{}]}}"#, okp(""), okp(""))),
            Err(JwksError::DuplicateKid { index: 0 })
        );
        assert_eq!(
            parse(format!(r#"{{"keys":[{}]}}"#, okp(r#","alg":"ES256""#))),
            Err(JwksError::BadKey {
                index: 0,
                field: "alg"
            })
        );
        assert_eq!(
            parse(r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AAAA","kid":"s"}]}"#.into()),
            Err(JwksError::BadKey {
                index: 0,
                field: "x"
            })
        );
        assert_eq!(
            parse(format!(
                r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}"}}]}}"#
            )),
            Err(JwksError::MissingKid { index: 0 })
        );
        assert_eq!(
            parse(r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"e","x":"AAAA"}]}"#.into()),
            Err(JwksError::BadKey {
                index: 0,
                field: "x"
            })
        );
        assert_eq!(parse("[]".into()), Err(JwksError::Malformed));
        assert_eq!(parse(r#"{"keys":{}}"#.into()), Err(JwksError::Malformed));
    }

    #[test]
    fn error_messages_never_echo_token_content() {
        let key = dev_key("kid-SECRET", 1);
        let v = verifier(&dev_key("other", 2));
        let mut c = claims();
        c.sub = "SECRET-sub".into();
        let token = key.mint(&c);
        let mut errors = vec![v.verify(&token, NOW).unwrap_err()];
        errors.push(v.verify(&format!("{token}x"), NOW).unwrap_err());
        errors.push(v.verify(&token.replace('.', "SECRET."), NOW).unwrap_err());
        for e in errors {
            let msg = e.to_string();
            assert!(!msg.contains("SECRET"), "{msg}");
            assert!(!msg.contains(token.split('.').next().unwrap()), "{msg}");
        }
    }

    #[test]
    fn arbitrary_input_never_panics() {
        let key = dev_key("k", 1);
        let v = verifier(&key);
        let token = key.mint(&claims());
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5_000 {
            let mut bytes = token.as_bytes().to_vec();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % bytes.len();
                bytes[i] = (next() % 128) as u8;
            }
            if let Ok(s) = String::from_utf8(bytes) {
                let _ = v.verify(&s, NOW);
            }
            let len = (next() % 300) as usize;
            let junk: String = (0..len)
                .map(|_| b"eyJ0.-_AZaz09\"{}:,"[(next() % 18) as usize] as char)
                .collect();
            assert!(v.verify(&junk, NOW).is_err());
        }
    }
}
