//! The KMS HTTP API: paths, request and response bodies (JSON), and the
//! byte strings both ends must agree on (HPKE `info`, roster signatures).
//!
//! Authentication is not in the bodies except where a request *is* the
//! credential exchange:
//! - services (relays, connectors, the operator) present a client certificate
//!   whose URI SAN names them (`conclave://ns/kind/name[/pod]`);
//! - a participant presents its join token once, in [`JoinRequest::token`], and
//!   then the opaque session secret from [`JoinResponse::session`] as
//!   `Authorization: Bearer <session>` on every later call.
//!
//! Binary values (keys, signatures, HPKE encapsulations) travel as lowercase
//! hex strings ([`Hex`]): they are short and hex needs no extra dependency.

use crate::ids::{MeetingId, ParticipantId};
use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Every path of the API. `{meeting}`, `{participant}` and `{recording}` are
/// filled in by the caller (axum route syntax).
pub mod paths {
    /// POST [`super::JoinRequest`] -> [`super::JoinResponse`].
    pub const JOIN: &str = "/v1/meetings/{meeting}/join";
    /// GET `?since=<roster version>&wait_ms=<n>` -> [`super::EventsResponse`] (long poll).
    pub const EVENTS: &str = "/v1/meetings/{meeting}/events";
    /// POST (empty body) -> [`super::LeaveResponse`].
    pub const LEAVE: &str = "/v1/meetings/{meeting}/leave";
    /// POST (host session) -> [`super::RemoveResponse`].
    pub const REMOVE: &str = "/v1/meetings/{meeting}/participants/{participant}/remove";
    /// POST [`super::InviteRequest`] (host session) -> [`super::InviteResponse`].
    pub const INVITE: &str = "/v1/meetings/{meeting}/connectors";
    /// GET `?wait_ms=<n>` (connector certificate) -> [`super::AssignmentsResponse`].
    pub const ASSIGNMENTS: &str = "/v1/connector/assignments";
    /// POST [`super::InvitationOutcomeRequest`] (connector certificate)
    /// -> [`super::InvitationOutcomeResponse`].
    pub const INVITATION_OUTCOME: &str = "/v1/connector/outcomes";
    /// POST [`super::RelayRegisterRequest`] (relay certificate) -> [`super::RelayRegisterResponse`].
    pub const RELAY_REGISTER: &str = "/v1/relays/register";
    /// POST [`super::RelayHeartbeatRequest`] (relay certificate) -> [`super::RelayHeartbeatResponse`].
    pub const RELAY_HEARTBEAT: &str = "/v1/relays/heartbeat";
    /// POST [`super::CreateRecordingKeyRequest`] (recording connector in the meeting)
    /// -> [`super::RecordingKeyResponse`].
    pub const RECORDING_KEYS: &str = "/v1/recordings";
    /// POST [`super::RecordingKeyRequest`] (creator or configured reader)
    /// -> [`super::RecordingKeyResponse`].
    pub const RECORDING_KEY: &str = "/v1/recordings/{recording}/key";
    /// GET `?from=<seq>&limit=<n>` (admin certificate) -> [`super::AuditPage`].
    pub const AUDIT: &str = "/v1/audit";
    /// POST (admin certificate) -> [`super::AuditVerifyResponse`].
    pub const AUDIT_VERIFY: &str = "/v1/audit/verify";
    /// POST (admin certificate) -> [`super::KekRotateResponse`].
    pub const KEK_ROTATE: &str = "/v1/admin/kek/rotate";
    /// GET (admin certificate) -> [`super::SignedRoster`].
    pub const ROSTER_EXPORT: &str = "/v1/admin/meetings/{meeting}/roster";
    /// GET, no authentication -> [`super::InfoResponse`].
    pub const INFO: &str = "/v1/info";
    pub const HEALTHZ: &str = "/healthz";
    pub const READYZ: &str = "/readyz";
    pub const METRICS: &str = "/metrics";

    /// Fills `{name}` in a path template. Values are URL-path-safe by
    /// construction (meeting ids, numbers), so no escaping is needed.
    pub fn fill(template: &str, name: &str, value: &str) -> String {
        template.replace(&format!("{{{name}}}"), value)
    }
}

/// Longest wait a long poll may ask for; the server clamps to this.
pub const MAX_WAIT_MS: u64 = 30_000;

/// Bytes as lowercase hex in JSON.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Hex(pub Vec<u8>);

impl fmt::Debug for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hex values are public (keys sealed or public, signatures): printing
        // the length keeps logs short without hiding anything that matters.
        write!(f, "Hex({} bytes)", self.0.len())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid hex string")]
pub struct HexError;

impl Hex {
    pub fn encode(bytes: &[u8]) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            out.push(DIGITS[(b >> 4) as usize] as char);
            out.push(DIGITS[(b & 15) as usize] as char);
        }
        out
    }

    pub fn decode(s: &str) -> Result<Vec<u8>, HexError> {
        fn nibble(c: u8) -> Result<u8, HexError> {
            match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                b'A'..=b'F' => Ok(c - b'A' + 10),
                _ => Err(HexError),
            }
        }
        let s = s.as_bytes();
        if !s.len().is_multiple_of(2) {
            return Err(HexError);
        }
        s.chunks_exact(2)
            .map(|p| Ok(nibble(p[0])? << 4 | nibble(p[1])?))
            .collect()
    }

    /// The bytes as a fixed-size array, or `None` if the length differs.
    pub fn array<const N: usize>(&self) -> Option<[u8; N]> {
        self.0.as_slice().try_into().ok()
    }
}

impl TryFrom<String> for Hex {
    type Error = HexError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Hex::decode(&value).map(Hex)
    }
}

impl From<Hex> for String {
    fn from(value: Hex) -> Self {
        Hex::encode(&value.0)
    }
}

/// A participant's role in a meeting. Connectors are `connector:<kind>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Role {
    Host,
    Participant,
    Connector(ConnectorKind),
}

impl Role {
    pub fn is_host(&self) -> bool {
        matches!(self, Role::Host)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown role {0:?} (expected host, participant or connector:<kind>)")]
pub struct RoleError(pub String);

impl std::str::FromStr for Role {
    type Err = RoleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(Role::Host),
            "participant" => Ok(Role::Participant),
            other => other
                .strip_prefix("connector:")
                .and_then(|k| k.parse().ok())
                .map(Role::Connector)
                .ok_or_else(|| RoleError(s.chars().take(40).collect())),
        }
    }
}

impl TryFrom<String> for Role {
    type Error = RoleError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Role> for String {
    fn from(value: Role) -> Self {
        value.to_string()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Host => f.write_str("host"),
            Role::Participant => f.write_str("participant"),
            Role::Connector(k) => write!(f, "connector:{k}"),
        }
    }
}

/// The kinds of connector a ConnectorPool can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ConnectorKind {
    Recording,
    LiveStreaming,
    Telephony,
    RoomSystem,
}

impl std::str::FromStr for ConnectorKind {
    type Err = RoleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "recording" => Ok(Self::Recording),
            "liveStreaming" => Ok(Self::LiveStreaming),
            "telephony" => Ok(Self::Telephony),
            "roomSystem" => Ok(Self::RoomSystem),
            _ => Err(RoleError(s.chars().take(40).collect())),
        }
    }
}

impl fmt::Display for ConnectorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Recording => "recording",
            Self::LiveStreaming => "liveStreaming",
            Self::Telephony => "telephony",
            Self::RoomSystem => "roomSystem",
        })
    }
}

/// POST [`paths::JOIN`]. Exactly one of `token` (people) or `invitation`
/// (connectors, authenticated by their client certificate) is set.
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The join token (JWT) from the customer's portal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The invitation a connector picked up from [`paths::ASSIGNMENTS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invitation: Option<u64>,
    /// The participant's ephemeral X25519 public key (32 bytes): every meeting
    /// key released to this participant is sealed to it.
    pub public_key: Hex,
    /// Connectors only: the roster name of what joins ("Phone …4567", a room
    /// system's SIP display name), in [`display_name`]'s canonical form.
    /// People's names come from their token. Without it a connector is
    /// named by its kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

impl fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a bearer credential: never print it.
        f.debug_struct("JoinRequest")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("invitation", &self.invitation)
            .field("public_key", &self.public_key)
            .field("display_name", &self.display_name)
            .finish()
    }
}

/// Longest connector display name, in characters.
pub const MAX_DISPLAY_NAME_CHARS: usize = 64;

/// The canonical form of a connector's display name, from whatever a SIP
/// peer sent: control and bidirectional-override characters removed (they
/// could make a roster line read as something else), runs of white space
/// made one space, trimmed, cut to [`MAX_DISPLAY_NAME_CHARS`]. `None` when
/// nothing is left. The KMS accepts only names already in this form.
pub fn display_name(raw: &str) -> Option<String> {
    canonical_text(raw, MAX_DISPLAY_NAME_CHARS)
}

/// [`display_name`]'s canonical form, cut to `max` characters.
fn canonical_text(raw: &str, max: usize) -> Option<String> {
    let mut out = String::new();
    let mut space = false;
    for c in raw.chars() {
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        // Bidi embeddings/overrides/isolates and the marks: U+200E/F, U+202A-202E, U+2066-2069.
        if c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            continue;
        }
        if out.chars().count() + usize::from(space) >= max {
            break;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.push(c);
    }
    (!out.is_empty()).then_some(out)
}

/// A meeting key (or recording data key) sealed with HPKE (RFC 9180, base
/// mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305) to one
/// participant's X25519 key. `info` is [`meeting_key_info`] / [`recording_key_info`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedKey {
    pub meeting: MeetingId,
    pub epoch: u64,
    pub participant: ParticipantId,
    /// HPKE encapsulated key (32 bytes).
    pub enc: Hex,
    /// HPKE ciphertext of the 32-byte key.
    pub ciphertext: Hex,
}

/// A data key for one recording, sealed like [`SealedKey`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedDataKey {
    pub recording: String,
    pub meeting: MeetingId,
    pub enc: Hex,
    pub ciphertext: Hex,
}

const MEETING_KEY_INFO: &[u8] = b"conclave meeting key v1\0";
const RECORDING_KEY_INFO: &[u8] = b"conclave recording key v1\0";
const ROSTER_DOMAIN: &[u8] = b"conclave roster v2\0";

/// HPKE `info` for a meeting key: binds the sealed key to its meeting, epoch
/// and recipient, so a sealed key moved to another context fails to open.
pub fn meeting_key_info(meeting: &MeetingId, epoch: u64, participant: ParticipantId) -> Vec<u8> {
    let m = meeting.as_str().as_bytes();
    let mut out = Vec::with_capacity(MEETING_KEY_INFO.len() + 1 + m.len() + 16);
    out.extend_from_slice(MEETING_KEY_INFO);
    out.push(m.len() as u8);
    out.extend_from_slice(m);
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&participant.0.to_be_bytes());
    out
}

/// HPKE `info` for a recording data key.
pub fn recording_key_info(meeting: &MeetingId, recording: &str) -> Vec<u8> {
    let m = meeting.as_str().as_bytes();
    let mut out = Vec::with_capacity(RECORDING_KEY_INFO.len() + 2 + m.len() + recording.len());
    out.extend_from_slice(RECORDING_KEY_INFO);
    out.push(m.len() as u8);
    out.extend_from_slice(m);
    out.push(recording.len().min(255) as u8);
    out.extend_from_slice(recording.as_bytes());
    out
}

/// Where to send media, and the KMS's permission to do so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayAssignment {
    /// The relay's identity as named in the ticket.
    pub relay: String,
    /// `host:port` of the relay's media socket.
    pub address: String,
    /// The ticket ([`crate::ticket::Ticket`]) to present in HELLO.
    pub ticket: Hex,
    /// Unix seconds after which the ticket is refused; poll events before then.
    pub not_after: u64,
}

/// One member of a meeting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterMember {
    pub participant: ParticipantId,
    /// SFrame sender index (also in routing headers).
    pub sender_index: u16,
    pub role: Role,
    /// Display name (token `name` claim, or the connector kind).
    pub name: String,
    /// Token subject, or the connector's certificate identity.
    pub subject: String,
}

/// A host's invitation of a connector. It is in the roster from the moment
/// it is made, so everyone sees who will be able to read the meeting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invitation {
    pub id: u64,
    pub kind: ConnectorKind,
    pub invited_by: ParticipantId,
    /// The connector identity that picked it up, once one has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    /// The participant the connector joined as, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participant: Option<ParticipantId>,
    /// What became of it, as its connector reported: a dial-out that was
    /// busy, a stream target the pool refused. Absent while it is open or
    /// running (and in records made before outcomes existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<InvitationOutcome>,
}

impl Invitation {
    /// Still waiting for a connector: not claimed, no outcome.
    pub fn is_open(&self) -> bool {
        self.claimed_by.is_none() && self.outcome.is_none()
    }
}

/// How an invitation finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeState {
    /// The connector could not do what the host asked (busy, refused target).
    Failed,
    /// It did, and that has ended (the phone hung up, the stream stopped).
    Ended,
}

impl fmt::Display for OutcomeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Failed => "failed",
            Self::Ended => "ended",
        })
    }
}

/// What a connector reports about an invitation, shown in the roster to
/// every member. Never carries the target (a stream URL holds its key, a SIP
/// URI a number or credentials): a `code` and a short text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvitationOutcome {
    pub state: OutcomeState,
    /// Machine-readable, lowercase `[a-z0-9_]`, at most
    /// [`MAX_OUTCOME_CODE_LEN`]: `busy`, `no_answer`, `rejected`,
    /// `unreachable`, `call_failed`, `target_not_allowed`, `bad_target`,
    /// `tls_verify_failed`, `stream_failed`, `hung_up`, `stopped`.
    pub code: String,
    /// The protocol's status, where there is one (a SIP final response).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Short human text in [`display_name`]'s canonical form, at most
    /// [`MAX_OUTCOME_MESSAGE_CHARS`] characters.
    pub message: String,
}

/// Longest [`InvitationOutcome::code`], in bytes.
pub const MAX_OUTCOME_CODE_LEN: usize = 32;
/// Longest [`InvitationOutcome::message`], in characters.
pub const MAX_OUTCOME_MESSAGE_CHARS: usize = 200;

impl InvitationOutcome {
    /// An outcome with `message` put in canonical form (cut to fit), as a
    /// connector builds it from whatever its peer said.
    pub fn new(state: OutcomeState, code: &str, status: Option<u16>, message: &str) -> Self {
        Self {
            state,
            code: code.to_string(),
            status,
            message: canonical_text(message, MAX_OUTCOME_MESSAGE_CHARS).unwrap_or_default(),
        }
    }

    /// What the KMS accepts: a well-formed code and a canonical message, so
    /// no report can make a roster line read as something else.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.code.is_empty()
            || self.code.len() > MAX_OUTCOME_CODE_LEN
            || !self
                .code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err("code must be 1 to 32 of a-z, 0-9 and _");
        }
        if !self.message.is_empty()
            && canonical_text(&self.message, MAX_OUTCOME_MESSAGE_CHARS).as_deref()
                != Some(self.message.as_str())
        {
            return Err(
                "message must be at most 200 characters without control characters or extra spaces",
            );
        }
        Ok(())
    }
}

impl fmt::Display for InvitationOutcome {
    /// `failed: busy (486): the callee is busy`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.state, self.code)?;
        if let Some(s) = self.status {
            write!(f, " ({s})")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

/// POST [`paths::INVITATION_OUTCOME`]: a connector of the invitation's kind
/// reports what became of an invitation it was assigned (one it could not
/// fulfil, or that has ended). Bodies above [`MAX_OUTCOME_BODY`] bytes are
/// refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvitationOutcomeRequest {
    pub meeting: MeetingId,
    pub invitation: u64,
    pub outcome: InvitationOutcome,
}

/// Longest [`InvitationOutcomeRequest`] body, in bytes.
pub const MAX_OUTCOME_BODY: usize = 2048;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InvitationOutcomeResponse {
    /// The invitation as the roster now shows it.
    pub invitation: Invitation,
}

/// Who is in a meeting at one version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    pub meeting: MeetingId,
    /// Increases on every change; `since` of [`paths::EVENTS`].
    pub version: u64,
    /// The current key epoch.
    pub epoch: u64,
    pub members: Vec<RosterMember>,
    pub invitations: Vec<Invitation>,
    /// Unix milliseconds when this version was made.
    pub issued_at_ms: u64,
}

/// A roster signed by the KMS: Ed25519 over `"conclave roster v2\0" ||
/// SHA-256(roster_json)`. The JSON text itself is signed, so members verify
/// exactly what they parse. It is hashed first because Ed25519 reads its
/// message twice with SHA-512, and every join signs a new roster of up to a
/// few dozen members: one SHA-256 pass costs a fraction of that.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRoster {
    pub roster_json: String,
    pub signature: Hex,
}

/// A [`SignedRoster`] already serialized: written into an answer as is.
pub type SignedRosterJson = Box<serde_json::value::RawValue>;

#[derive(Debug, thiserror::Error)]
pub enum RosterError {
    #[error("roster signature does not verify")]
    BadSignature,
    #[error("roster is not valid JSON: {0}")]
    Malformed(#[from] serde_json::Error),
}

impl SignedRoster {
    /// Signs with any Ed25519 signer: the KMS's is faster than
    /// ed25519-dalek's `SigningKey`, which tests use.
    pub fn sign(roster: &Roster, key: &impl Signer<Signature>) -> Result<Self, serde_json::Error> {
        let roster_json = serde_json::to_string(roster)?;
        let signature = key.sign(&Self::signed_message(&roster_json));
        Ok(Self {
            roster_json,
            signature: Hex(signature.to_bytes().to_vec()),
        })
    }

    /// Checks the KMS signature, then parses.
    pub fn verify(&self, key: &VerifyingKey) -> Result<Roster, RosterError> {
        let signature =
            Signature::from_slice(&self.signature.0).map_err(|_| RosterError::BadSignature)?;
        key.verify(&Self::signed_message(&self.roster_json), &signature)
            .map_err(|_| RosterError::BadSignature)?;
        Ok(serde_json::from_str(&self.roster_json)?)
    }

    /// The JSON an answer carries for this roster.
    pub fn to_json(&self) -> Result<SignedRosterJson, serde_json::Error> {
        serde_json::value::to_raw_value(self)
    }

    fn signed_message(roster_json: &str) -> Vec<u8> {
        let digest = ring::digest::digest(&ring::digest::SHA256, roster_json.as_bytes());
        [ROSTER_DOMAIN, digest.as_ref()].concat()
    }
}

/// `R` is how the roster is held: clients read a [`SignedRoster`]; the KMS
/// sends one it serialized once per roster version ([`SignedRosterJson`]),
/// since every member's answer carries the same one.
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinResponse<R = SignedRoster> {
    pub participant: ParticipantId,
    /// Session secret: `Authorization: Bearer <session>` on later calls.
    pub session: String,
    pub sender_index: u16,
    pub roster: R,
    pub key: SealedKey,
    pub relay: RelayAssignment,
}

impl<R: fmt::Debug> fmt::Debug for JoinResponse<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinResponse")
            .field("participant", &self.participant)
            .field("session", &"<redacted>")
            .field("sender_index", &self.sender_index)
            .field("roster", &self.roster)
            .field("key", &self.key)
            .field("relay", &self.relay)
            .finish()
    }
}

/// Query of [`paths::EVENTS`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EventsQuery {
    /// The roster version the caller already has. 0 asks for a resync:
    /// roster, the current epoch's key and a fresh relay ticket, at once.
    #[serde(default)]
    pub since: u64,
    /// How long to wait for a change (clamped to [`MAX_WAIT_MS`]).
    #[serde(default)]
    pub wait_ms: u64,
}

/// What changed since `since`. Fields are absent when nothing changed.
/// `R` as in [`JoinResponse`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventsResponse<R = SignedRoster> {
    pub version: u64,
    // No `default`: on a generic field serde would ask `R: Default`; a
    // missing `Option` is `None` anyway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roster: Option<R>,
    /// The current epoch's key, when the caller does not have it yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<SealedKey>,
    /// A new relay assignment (meeting re-placed or ticket renewed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayAssignment>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaveResponse {
    /// The epoch the remaining members move to.
    pub epoch: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoveResponse {
    pub epoch: u64,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct InviteRequest {
    pub kind: ConnectorKind,
    /// Where the connector sends the meeting, chosen by the host (see
    /// [`check_invite_target`]): an `rtmp://`/`rtmps://` URL for
    /// liveStreaming, an E.164 number or `sip:`/`sips:` URI for telephony.
    /// Absent: the connector pool's own configured target. Older clients
    /// never send it, and it is omitted when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl fmt::Debug for InviteRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InviteRequest")
            .field("kind", &self.kind)
            .field("target", &self.target.as_deref().map(redacted_target))
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InviteResponse {
    pub invitation: Invitation,
    pub roster: SignedRoster,
}

/// Query of [`paths::ASSIGNMENTS`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AssignmentsQuery {
    #[serde(default)]
    pub wait_ms: u64,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub meeting: MeetingId,
    pub invitation: u64,
    pub kind: ConnectorKind,
    /// The host's [`InviteRequest::target`], already checked by the KMS with
    /// [`check_invite_target`]. It may carry a stream key: do not log it
    /// (log [`redacted_target`] instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl fmt::Debug for Assignment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Assignment")
            .field("meeting", &self.meeting)
            .field("invitation", &self.invitation)
            .field("kind", &self.kind)
            .field("target", &self.target.as_deref().map(redacted_target))
            .finish()
    }
}

/// Longest invitation target accepted, in bytes (stream URLs with long keys fit).
pub const MAX_TARGET_LEN: usize = 2048;

/// Why a host-chosen invitation target was refused. Messages never quote the
/// target: a stream URL carries its stream key in the path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("connector kind {0} takes no target")]
    NotAllowed(ConnectorKind),
    #[error("target is longer than {MAX_TARGET_LEN} bytes")]
    TooLong,
    #[error("target contains whitespace, control or non-ASCII characters (percent-encode them)")]
    BadCharacters,
    #[error("liveStreaming target must be an rtmp:// or rtmps:// URL")]
    NotStreamUrl,
    #[error("stream URL needs a host name or IP address, and an optional numeric port")]
    BadHost,
    #[error("stream URL must not carry user:password@ (put the stream key in the path)")]
    Credentials,
    #[error("telephony target must be an E.164 number (+ then 8 to 15 digits) or a sip:/sips: URI")]
    NotDialable,
}

/// A checked target, reduced to what may be written to logs and the audit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetSummary {
    /// Scheme and host (and port) of a stream URL; the path, which usually
    /// holds the stream key, is dropped.
    Stream(String),
    /// The domain of a SIP URI, e.g. `sip:pbx.example.com`; the user part is
    /// a phone number or account name.
    Sip(String),
    /// A phone number: personal data, so only that it was one.
    Phone,
}

impl fmt::Display for TargetSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stream(s) | Self::Sip(s) => f.write_str(s),
            Self::Phone => f.write_str("a phone number"),
        }
    }
}

fn valid_host(host: &str) -> bool {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Splits `host[:port]` (IPv6 in brackets) and checks both.
fn host_port(authority: &str) -> Option<&str> {
    let host = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => {
            let port = &authority[i + 1..];
            if port.is_empty() || port.len() > 5 || port.parse::<u16>().is_err() {
                return None;
            }
            &authority[..i]
        }
        _ => authority,
    };
    valid_host(host).then_some(host)
}

/// Checks a host-chosen invitation target for its connector kind and returns
/// what may be recorded about it. The KMS refuses an invitation whose target
/// fails this; connectors may rely on it having passed.
pub fn check_invite_target(
    kind: ConnectorKind,
    target: &str,
) -> Result<TargetSummary, TargetError> {
    if !matches!(
        kind,
        ConnectorKind::LiveStreaming | ConnectorKind::Telephony
    ) {
        return Err(TargetError::NotAllowed(kind));
    }
    if target.len() > MAX_TARGET_LEN {
        return Err(TargetError::TooLong);
    }
    // These end up on a child process's command line or in SIP headers:
    // nothing that could split an argument or a header line.
    if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TargetError::BadCharacters);
    }
    let (scheme, rest) = target.split_once(':').unwrap_or(("", target));
    let scheme = scheme.to_ascii_lowercase();
    match kind {
        ConnectorKind::LiveStreaming => {
            if !matches!(scheme.as_str(), "rtmp" | "rtmps") {
                return Err(TargetError::NotStreamUrl);
            }
            let rest = rest.strip_prefix("//").ok_or(TargetError::NotStreamUrl)?;
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            if authority.contains('@') {
                return Err(TargetError::Credentials);
            }
            let host = host_port(authority).ok_or(TargetError::BadHost)?;
            Ok(TargetSummary::Stream(format!(
                "{scheme}://{}",
                host.to_ascii_lowercase()
            )))
        }
        _ => {
            if let Some(digits) = target.strip_prefix('+') {
                let ok = (8..=15).contains(&digits.len())
                    && digits.bytes().all(|b| b.is_ascii_digit())
                    && !digits.starts_with('0');
                return if ok {
                    Ok(TargetSummary::Phone)
                } else {
                    Err(TargetError::NotDialable)
                };
            }
            if !matches!(scheme.as_str(), "sip" | "sips") || target.len() > 256 {
                return Err(TargetError::NotDialable);
            }
            // sip:user@host[:port][;params][?headers]; the user part is optional.
            let uri = rest.split('?').next().unwrap_or_default();
            let hostpart = uri
                .rsplit_once('@')
                .map_or(uri, |(user, host)| if user.is_empty() { "" } else { host });
            let authority = hostpart.split(';').next().unwrap_or_default();
            let host = host_port(authority).ok_or(TargetError::NotDialable)?;
            Ok(TargetSummary::Sip(format!(
                "{scheme}:{}",
                host.to_ascii_lowercase()
            )))
        }
    }
}

/// What a log line may say about a target: the [`TargetSummary`] if it
/// checks, else only that it is invalid.
pub fn redacted_target(target: &str) -> String {
    // Kind-agnostic: try both kinds that take targets.
    check_invite_target(ConnectorKind::LiveStreaming, target)
        .or_else(|_| check_invite_target(ConnectorKind::Telephony, target))
        .map_or_else(|_| "<invalid target>".to_owned(), |s| s.to_string())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AssignmentsResponse {
    pub assignments: Vec<Assignment>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RelayRegisterRequest {
    /// MeetingZone name.
    pub zone: String,
    /// `host:port` clients send media to.
    pub address: String,
    /// Participants this relay accepts at most.
    pub capacity: u32,
    /// Drawn at random by each relay process when it starts (not a secret;
    /// 1 to [`MAX_RELAY_INSTANCE_LEN`] ASCII letters, digits, `-` or `_`).
    /// A restarted relay keeps its id (its pod, its certificate) but has lost
    /// every binding: a new instance tells the KMS to move the meetings it
    /// had onto a fresh placement at once, while the same instance
    /// registering again (the KMS restarted) keeps them where they are.
    /// Absent from older relays: then the KMS cannot tell a restart apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// Longest [`RelayRegisterRequest::instance`] the KMS accepts.
pub const MAX_RELAY_INSTANCE_LEN: usize = 64;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RelayRegisterResponse {
    /// The relay id tickets for this relay carry (verify tickets against it).
    pub relay: String,
    /// Ed25519 public key that signs tickets and rosters (32 bytes).
    pub ticket_public_key: Hex,
    /// Heartbeat at least this often, or stop receiving meetings.
    pub heartbeat_interval_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RelayHeartbeatRequest {
    /// Participants currently bound on the relay.
    pub load: u32,
    /// False while draining: keep existing meetings, take no new ones.
    #[serde(default = "yes")]
    pub ready: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RelayHeartbeatResponse {
    /// Meetings placed on this relay.
    pub meetings: u32,
    pub heartbeat_interval_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateRecordingKeyRequest {
    pub meeting: MeetingId,
    /// X25519 public key the data key is sealed to.
    pub public_key: Hex,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct RecordingKeyRequest {
    pub public_key: Hex,
    /// A join token for the recording's meeting, for readers authorised by
    /// token subject rather than by certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl fmt::Debug for RecordingKeyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordingKeyRequest")
            .field("public_key", &self.public_key)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordingKeyResponse {
    pub key: SealedDataKey,
}

/// Query of [`paths::AUDIT`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AuditQuery {
    #[serde(default)]
    pub from: u64,
    #[serde(default)]
    pub limit: u32,
}

/// What an audit entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    KeyRelease,
    RosterChange,
    EpochChange,
    Denial,
    Invitation,
    RecordingKey,
    Relay,
    Admin,
}

/// One link of the audit hash chain.
/// `hash = SHA-256("conclave audit v1\0" || prev || canonical JSON of the entry without hash)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub time_ms: u64,
    pub kind: AuditKind,
    /// Who acted: a certificate identity, `token:<iss>:<sub>`, or `kms`.
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meeting: Option<MeetingId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participant: Option<ParticipantId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Short human-readable detail (never a secret).
    pub detail: String,
    pub prev: Hex,
    pub hash: Hex,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Sequence number of the newest entry (entries exist up to here).
    pub head_seq: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditVerifyResponse {
    pub ok: bool,
    /// Entries checked.
    pub entries: u64,
    pub head_seq: Option<u64>,
    pub head_hash: Hex,
    /// The first problem found, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KekRotateResponse {
    /// The new current KEK version.
    pub version: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InfoResponse {
    /// Ed25519 key that signs tickets and rosters (32 bytes).
    pub signing_public_key: Hex,
    pub api_version: String,
    /// Version of the key-encryption key that wraps new keys (absent before the first one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_kek_version: Option<u32>,
}

/// Body of every error response (4xx/5xx).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable reason, e.g. `token_expired`, `not_invited`.
    pub code: String,
    /// Human-readable explanation. Never contains secrets.
    pub error: String,
}

#[cfg(test)]
mod tests {

    #[test]
    fn display_names_are_bounded_and_cannot_fake_a_roster_line() {
        assert_eq!(display_name("Phone …4567").as_deref(), Some("Phone …4567"));
        assert_eq!(
            display_name("  Board\troom \r\n  East ").as_deref(),
            Some("Board room East")
        );
        assert_eq!(
            display_name("Ada\u{202e}tsoh\u{0}").as_deref(),
            Some("Adatsoh"),
            "no direction overrides or controls"
        );
        assert_eq!(display_name(" \u{7}\t "), None);
        let long = display_name(&"x ".repeat(100)).unwrap();
        assert_eq!(long.chars().count(), MAX_DISPLAY_NAME_CHARS - 1);
        assert!(!long.ends_with(' '));
        let canonical = display_name(&"é".repeat(200)).unwrap();
        assert_eq!(canonical.chars().count(), MAX_DISPLAY_NAME_CHARS);
        assert_eq!(
            display_name(&canonical),
            Some(canonical.clone()),
            "canonical is a fixed point"
        );
        let req = JoinRequest {
            token: None,
            invitation: Some(1),
            public_key: Hex(vec![0; 32]),
            display_name: None,
        };
        assert!(
            !serde_json::to_string(&req)
                .unwrap()
                .contains("display_name")
        );
    }

    use super::*;
    use ed25519_dalek::SigningKey;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let bytes = vec![0u8, 1, 0xab, 0xff];
        let s = Hex::encode(&bytes);
        assert_eq!(s, "0001abff");
        assert_eq!(Hex::decode(&s).unwrap(), bytes);
        assert_eq!(Hex::decode("0g"), Err(HexError));
        assert_eq!(Hex::decode("abc"), Err(HexError));
        assert!(serde_json::from_str::<Hex>("\"zz\"").is_err());
    }

    #[test]
    fn roles_parse_and_print() {
        for s in [
            "host",
            "participant",
            "connector:recording",
            "connector:liveStreaming",
        ] {
            assert_eq!(s.parse::<Role>().unwrap().to_string(), s);
        }
        assert!("connector:fax".parse::<Role>().is_err());
        assert!("admin".parse::<Role>().is_err());
    }

    #[test]
    fn signed_roster_detects_any_change() {
        let key = SigningKey::generate(&mut rand_core::OsRng);
        let roster = Roster {
            meeting: MeetingId::new("m").unwrap(),
            version: 3,
            epoch: 2,
            members: vec![RosterMember {
                participant: ParticipantId(1),
                sender_index: 0,
                role: Role::Host,
                name: "Ada".into(),
                subject: "ada".into(),
            }],
            invitations: vec![],
            issued_at_ms: 5,
        };
        let signed = SignedRoster::sign(&roster, &key).unwrap();
        assert_eq!(signed.verify(&key.verifying_key()).unwrap(), roster);
        // What the KMS sends (serialized once) is what clients read.
        let sent: JoinResponse<SignedRosterJson> = JoinResponse {
            participant: ParticipantId(1),
            session: "s".into(),
            sender_index: 0,
            roster: signed.to_json().unwrap(),
            key: SealedKey {
                meeting: roster.meeting.clone(),
                epoch: 2,
                participant: ParticipantId(1),
                enc: Hex(vec![1]),
                ciphertext: Hex(vec![2]),
            },
            relay: RelayAssignment {
                relay: "r".into(),
                address: "127.0.0.1:1".into(),
                ticket: Hex(vec![3]),
                not_after: 9,
            },
        };
        let read: JoinResponse =
            serde_json::from_slice(&serde_json::to_vec(&sent).unwrap()).unwrap();
        assert_eq!(read.roster, signed);
        let quiet: EventsResponse = serde_json::from_str(r#"{"version":3}"#).unwrap();
        assert!(quiet.roster.is_none() && quiet.key.is_none());
        let mut tampered = signed.clone();
        tampered.roster_json = tampered.roster_json.replace("Ada", "Eve");
        assert!(matches!(
            tampered.verify(&key.verifying_key()),
            Err(RosterError::BadSignature)
        ));
        let other = SigningKey::generate(&mut rand_core::OsRng);
        assert!(signed.verify(&other.verifying_key()).is_err());
    }

    #[test]
    fn info_binds_every_field() {
        let m = MeetingId::new("m").unwrap();
        let base = meeting_key_info(&m, 1, ParticipantId(1));
        assert_ne!(base, meeting_key_info(&m, 2, ParticipantId(1)));
        assert_ne!(base, meeting_key_info(&m, 1, ParticipantId(2)));
        assert_ne!(
            base,
            meeting_key_info(&MeetingId::new("n").unwrap(), 1, ParticipantId(1))
        );
    }

    #[test]
    fn invite_targets_are_checked_per_kind() {
        use ConnectorKind::*;
        let ok = [
            (
                LiveStreaming,
                "rtmp://live.example.com/app/sk-123",
                "rtmp://live.example.com",
            ),
            (
                LiveStreaming,
                "RTMPS://Live.Example.com:443/app/sk",
                "rtmps://live.example.com",
            ),
            (
                LiveStreaming,
                "rtmp://127.0.0.1:1935/live/key",
                "rtmp://127.0.0.1",
            ),
            (LiveStreaming, "rtmp://[::1]:1935/live", "rtmp://[::1]"),
            (Telephony, "+15551234567", "a phone number"),
            (
                Telephony,
                "sip:+15551234567@pbx.example.com;transport=tls",
                "sip:pbx.example.com",
            ),
            (Telephony, "sips:alice@10.0.0.1:5061", "sips:10.0.0.1"),
            (Telephony, "sip:pbx.example.com", "sip:pbx.example.com"),
        ];
        for (kind, target, summary) in ok {
            let s = check_invite_target(kind, target).unwrap_or_else(|e| panic!("{target}: {e}"));
            assert_eq!(s.to_string(), summary);
        }
        let long = format!("rtmp://h/{}", "k".repeat(MAX_TARGET_LEN));
        let bad = [
            (Recording, "rtmp://h/k", TargetError::NotAllowed(Recording)),
            (RoomSystem, "sip:h", TargetError::NotAllowed(RoomSystem)),
            (LiveStreaming, long.as_str(), TargetError::TooLong),
            (LiveStreaming, "", TargetError::BadCharacters),
            (LiveStreaming, "rtmp://h/a b", TargetError::BadCharacters),
            (
                LiveStreaming,
                "rtmp://h/a\nX-Evil: 1",
                TargetError::BadCharacters,
            ),
            (LiveStreaming, "rtmp://h/\u{e9}", TargetError::BadCharacters),
            (LiveStreaming, "http://h/live", TargetError::NotStreamUrl),
            (LiveStreaming, "rtmp:h/live", TargetError::NotStreamUrl),
            (
                LiveStreaming,
                "file:///etc/passwd",
                TargetError::NotStreamUrl,
            ),
            (LiveStreaming, "rtmp:///live", TargetError::BadHost),
            (LiveStreaming, "rtmp://h:99999/live", TargetError::BadHost),
            (LiveStreaming, "rtmp://-h/live", TargetError::BadHost),
            (LiveStreaming, "rtmp://u:p@h/live", TargetError::Credentials),
            (Telephony, "+1555", TargetError::NotDialable),
            (Telephony, "+1555123456789012", TargetError::NotDialable),
            (Telephony, "+1555-123-4567", TargetError::NotDialable),
            (Telephony, "15551234567", TargetError::NotDialable),
            (Telephony, "tel:+15551234567", TargetError::NotDialable),
            (Telephony, "rtmp://h/live", TargetError::NotDialable),
            (Telephony, "sip:@h", TargetError::NotDialable),
            (Telephony, "sip:a@", TargetError::NotDialable),
        ];
        for (kind, target, want) in bad {
            let got = check_invite_target(kind, target).unwrap_err();
            assert_eq!(got, want, "{kind} {target:?}");
            // The refusal never quotes the target.
            if target.len() > 3 {
                assert!(!got.to_string().contains(target));
            }
        }
    }

    #[test]
    fn invite_target_is_optional_on_the_wire_and_redacted_in_debug() {
        // An old client's body still parses, and no target means no field.
        let old: InviteRequest = serde_json::from_str(r#"{"kind":"recording"}"#).unwrap();
        assert_eq!(old.target, None);
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"kind":"recording"}"#
        );
        let a: Assignment =
            serde_json::from_str(r#"{"meeting":"m","invitation":1,"kind":"liveStreaming"}"#)
                .unwrap();
        assert_eq!(a.target, None);
        let req = InviteRequest {
            kind: ConnectorKind::LiveStreaming,
            target: Some("rtmps://live.example.com/app/sk-secret".into()),
        };
        let back: InviteRequest =
            serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        assert_eq!(back.target, req.target);
        let a = Assignment {
            target: req.target.clone(),
            ..a
        };
        for debug in [format!("{req:?}"), format!("{a:?}")] {
            assert!(!debug.contains("sk-secret"), "{debug}");
            assert!(debug.contains("rtmps://live.example.com"), "{debug}");
        }
        assert_eq!(redacted_target("rtmp://u:p@h/x"), "<invalid target>");
    }

    #[test]
    fn invitation_outcomes_are_optional_on_the_wire_and_checked() {
        // Records and rosters from before outcomes parse, and stay byte-identical.
        let old = r#"{"id":3,"kind":"telephony","invited_by":1}"#;
        let inv: Invitation = serde_json::from_str(old).unwrap();
        assert!(inv.is_open() && inv.outcome.is_none());
        assert_eq!(serde_json::to_string(&inv).unwrap(), old);
        let busy = InvitationOutcome::new(
            OutcomeState::Failed,
            "busy",
            Some(486),
            "the callee is busy\r\nX-Fake: 1",
        );
        assert_eq!(busy.message, "the callee is busy X-Fake: 1");
        assert_eq!(busy.check(), Ok(()));
        assert_eq!(
            busy.to_string(),
            "failed: busy (486): the callee is busy X-Fake: 1"
        );
        let with = Invitation {
            outcome: Some(busy.clone()),
            ..inv
        };
        assert!(!with.is_open());
        let json = serde_json::to_string(&with).unwrap();
        assert!(json.contains(r#""outcome":{"state":"failed","code":"busy","status":486"#));
        assert_eq!(serde_json::from_str::<Invitation>(&json).unwrap(), with);
        let long = InvitationOutcome::new(OutcomeState::Ended, "hung_up", None, &"é".repeat(500));
        assert_eq!(long.message.chars().count(), MAX_OUTCOME_MESSAGE_CHARS);
        assert_eq!(long.check(), Ok(()));
        for code in ["", "Busy", "busy-here", "busy here", &"x".repeat(33)] {
            let o = InvitationOutcome {
                code: code.into(),
                ..busy.clone()
            };
            assert!(o.check().is_err(), "{code:?}");
        }
        for message in [
            "two\nlines",
            " padded",
            "a  b",
            "\u{202e}evil",
            &"x".repeat(201),
        ] {
            let o = InvitationOutcome {
                message: message.into(),
                ..busy.clone()
            };
            assert!(o.check().is_err(), "{message:?}");
        }
        assert!(
            serde_json::from_str::<InvitationOutcome>(
                r#"{"state":"lost","code":"x","message":""}"#
            )
            .is_err()
        );
    }

    #[test]
    fn secrets_are_not_in_debug() {
        let req = JoinRequest {
            token: Some("eyJsecret".into()),
            invitation: None,
            public_key: Hex(vec![1; 32]),
            display_name: None,
        };
        assert!(!format!("{req:?}").contains("eyJsecret"));
    }
}
