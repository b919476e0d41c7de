//! The KMS state machine: meetings (roster, epochs, invitations), relays,
//! recordings and KEKs. Sans-IO: callers pass the time and authenticated
//! principals in, and get back a result plus [`Effects`] (store writes and
//! audit records) that must be committed before the result is answered.
//!
//! Crypto that costs real CPU (HPKE sealing, ticket and roster signing) is
//! left to the caller, outside the lock that guards this state: grants carry
//! the key to seal and the caller seals it, and rosters are signed on first
//! use ([`RosterVersion::signed`]).

use crate::audit::AuditRecord;
use crate::keys::{Ed25519Signer, KeyError, KeyRing, Purpose, SecretKey, StoredKek};
use crate::relays::Relays;
use meeting_proto::ids::{MeetingId, ParticipantId};
use meeting_proto::kms_api::{
    Assignment, AuditKind, ConnectorKind, Hex, Invitation, MAX_RELAY_INSTANCE_LEN,
    RelayRegisterRequest, Role, Roster, RosterMember, SignedRoster, SignedRosterJson, TargetError,
    check_invite_target, redacted_target,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

/// A refusal: HTTP status, stable code and a message without secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl Denial {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

/// One store mutation. Records are JSON so the store stays inspectable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Meeting(MeetingId, Vec<u8>),
    /// A meeting's record as a join left it, kept beside the new member (in join order)
    /// rather than in place: joins land on random meetings, and the store rewrites every
    /// page a commit touches. The store keeps whichever copy of a meeting's record was
    /// saved last ([`MeetingRecord::saves`]); it drops this one with the member.
    /// Never written while the meeting holds an invitation target (a stream key, a phone
    /// number): copies outlive the record they were taken of, and a target must not.
    MeetingAtJoin(MemberKey, Vec<u8>),
    /// A member's record, or None when it left.
    Member(MemberKey, Option<Vec<u8>>),
    Token(UsedToken),
    /// A remembered join token expired: it can no longer be replayed anyway.
    ForgetToken(UsedToken),
    Recording(String, Vec<u8>),
    Kek(StoredKek),
}

/// Where the store keeps a member: in join order. Joins spread over many meetings, and the
/// store rewrites every page a commit touches, so keyed by meeting each join of a group
/// commit would dirty a page of its own; in join order they share the table's last pages.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemberKey {
    pub joined_ms: u64,
    pub meeting: MeetingId,
    pub participant: ParticipantId,
}

impl MemberKey {
    pub fn of(meeting: &MeetingId, member: &MemberRecord) -> Self {
        Self {
            joined_ms: member.joined_ms,
            meeting: meeting.clone(),
            participant: member.participant,
        }
    }
}

/// A join token that was used, remembered until it expires so it cannot be replayed. Ordered
/// (and stored) by expiry, then by when it was used: tokens of an issuer expire in the order
/// they were minted, and many share a second, so inserts land on the table's last pages
/// rather than where their hashes would put them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct UsedToken {
    pub expires_s: u64,
    pub used_ms: u64,
    pub hash: [u8; 32],
}

/// What must be durable before answering.
#[derive(Debug, Default)]
pub struct Effects {
    pub writes: Vec<Write>,
    pub audit: Vec<AuditRecord>,
    /// Meetings whose roster version changed (wake their long polls).
    pub changed: Vec<MeetingId>,
}

impl Effects {
    fn deny(&mut self, actor: &str, meeting: Option<&MeetingId>, d: Denial) -> Denial {
        let mut rec = AuditRecord::new(
            AuditKind::Denial,
            actor,
            format!("{}: {}", d.code, d.message),
        );
        rec.meeting = meeting.cloned();
        self.audit.push(rec);
        d
    }
}

/// A verified join token, reduced to what the KMS uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub issuer: String,
    pub subject: String,
    pub name: String,
    pub meeting: MeetingId,
    pub role: Role,
    pub expires_s: u64,
    /// SHA-256 of the token text, for replay detection. Keying replays on
    /// the text holds only while one token has one accepted text: Ed25519
    /// checked one signature at a time (strongly unforgeable; batch
    /// verification is not) and canonical base64. Loosen either and this
    /// must key on the claims instead.
    pub token_hash: [u8; 32],
}

impl Claims {
    pub fn actor(&self) -> String {
        format!("token:{}:{}", self.issuer, self.subject)
    }
}

/// Who is joining.
#[derive(Clone, Debug)]
pub enum Joiner {
    Person(Claims),
    Connector {
        identity: String,
        kind: ConnectorKind,
        invitation: u64,
        /// Roster name (canonical, checked by the server); else the kind.
        display_name: Option<String>,
    },
}

/// Who asks for a recording key after the fact.
#[derive(Clone, Debug)]
pub enum Reader {
    Certificate(String),
    Token(Claims),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeetingRecord {
    pub id: MeetingId,
    pub version: u64,
    pub epoch: u64,
    pub epoch_started_ms: u64,
    pub wrapped_key: Hex,
    pub next_participant: u64,
    pub next_sender: u16,
    pub next_invitation: u64,
    pub invitations: Vec<Invitation>,
    /// Host-chosen targets of open invitations, by invitation id. Kept out
    /// of [`Invitation`] because that is in the roster every member gets,
    /// and a stream URL carries the stream key; dropped once claimed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<u64, Target>,
    pub relay: Option<String>,
    /// The relay process (its registration's instance) the meeting was
    /// placed on: a relay restarted under the same id has lost the members'
    /// bindings, and only a different instance tells the KMS so. None in
    /// records from before relays sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_instance: Option<String>,
    pub updated_ms: u64,
    /// How many times the record was saved: of a meeting's copies in the store, the one
    /// with the most saves is current. 0 in records from before joins saved copies.
    #[serde(default)]
    pub saves: u64,
}

/// An invitation target. Debug shows only the checked summary (scheme and
/// host), never the stream key in the path.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Target(pub String);

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({})", redacted_target(&self.0))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub participant: ParticipantId,
    pub sender_index: u16,
    pub role: Role,
    pub name: String,
    pub subject: String,
    pub public_key: Hex,
    pub session_hash: Hex,
    pub released_epoch: u64,
    pub joined_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingRecord {
    pub id: String,
    pub meeting: MeetingId,
    pub wrapped_key: Hex,
    pub creator: String,
    pub created_ms: u64,
}

struct Meeting {
    record: MeetingRecord,
    key: Arc<SecretKey>,
    members: BTreeMap<ParticipantId, MemberRecord>,
    sessions: HashMap<[u8; 32], ParticipantId>,
    /// Sessions that left or were removed, with when: their last long poll
    /// is still in flight when they go, and its answer is no denial.
    gone: HashMap<[u8; 32], u64>,
    signed: Option<(u64, Arc<RosterVersion>)>,
}

/// One roster version, signed once, by whoever needs it first, after the
/// core lock is released: serializing and signing a roster of a few dozen
/// members costs as much as the rest of a join's state change, and every
/// join makes a new version. The signed roster is serialized once too: the
/// joiner's answer and every member's next events answer carry it.
pub struct RosterVersion {
    roster: Roster,
    key: Arc<Ed25519Signer>,
    signed: OnceLock<SignedRosterJson>,
}

impl RosterVersion {
    /// The signed roster as answers carry it.
    pub fn json(&self) -> SignedRosterJson {
        self.signed
            .get_or_init(|| {
                SignedRoster::sign(&self.roster, self.key.as_ref())
                    .and_then(|signed| signed.to_json())
                    .expect("roster serializes")
            })
            .clone()
    }

    /// The signed roster as a value (read back from [`Self::json`]; for the
    /// rare answers that are not join or events ones).
    pub fn signed(&self) -> SignedRoster {
        serde_json::from_str(self.json().get()).expect("a signed roster reads back")
    }
}

impl std::fmt::Debug for RosterVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RosterVersion")
            .field("meeting", &self.roster.meeting)
            .field("version", &self.roster.version)
            .finish_non_exhaustive()
    }
}

/// How long a gone session's poll gets `gone` rather than `not_member`.
const GONE_SESSION_MEMORY_MS: u64 = 10 * 60 * 1000;

impl Meeting {
    fn roster(&self, now_ms: u64) -> Roster {
        Roster {
            meeting: self.record.id.clone(),
            version: self.record.version,
            epoch: self.record.epoch,
            members: self
                .members
                .values()
                .map(|m| RosterMember {
                    participant: m.participant,
                    sender_index: m.sender_index,
                    role: m.role.clone(),
                    name: m.name.clone(),
                    subject: m.subject.clone(),
                })
                .collect(),
            invitations: self.record.invitations.clone(),
            issued_at_ms: now_ms,
        }
    }
}

/// Where a participant sends media. The caller signs the ticket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub relay: String,
    pub address: String,
}

/// A key to seal to one participant's public key.
#[derive(Clone, Debug)]
pub struct Release {
    pub meeting: MeetingId,
    pub epoch: u64,
    pub participant: ParticipantId,
    pub public_key: [u8; 32],
    pub key: Arc<SecretKey>,
}

#[derive(Debug)]
pub struct JoinGrant {
    pub participant: ParticipantId,
    pub sender_index: u16,
    /// Session secret, returned once; only its hash is kept.
    pub session: String,
    pub roster: Arc<RosterVersion>,
    pub release: Release,
    pub placement: Placement,
}

#[derive(Debug)]
pub struct EventsGrant {
    pub version: u64,
    pub roster: Option<Arc<RosterVersion>>,
    pub release: Option<Release>,
    pub placement: Option<(Placement, ParticipantId, u16)>,
}

/// The limits the core enforces itself.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub max_members: usize,
    pub meeting_key_interval_ms: u64,
    pub kek_interval_ms: u64,
    pub kek_retire_after_ms: u64,
    pub relay_timeout_ms: u64,
    pub zone: Option<String>,
    pub recording_key_readers: Vec<String>,
}

pub struct Core {
    config: CoreConfig,
    keys: KeyRing,
    signing: Arc<Ed25519Signer>,
    meetings: HashMap<MeetingId, Meeting>,
    open_invitations: BTreeSet<(ConnectorKind, MeetingId, u64)>,
    tokens: HashMap<[u8; 32], UsedToken>,
    recordings: HashMap<String, RecordingRecord>,
    relays: Relays,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("meetings", &self.meetings.len())
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

pub fn session_hash(session: &str) -> [u8; 32] {
    Sha256::digest(session.as_bytes()).into()
}

fn internal(e: KeyError) -> Denial {
    Denial::new(500, "internal", format!("key operation failed: {e}"))
}

/// Everything loaded from the store at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub meetings: Vec<MeetingRecord>,
    pub members: Vec<(MeetingId, MemberRecord)>,
    pub tokens: Vec<UsedToken>,
    pub recordings: Vec<RecordingRecord>,
}

impl Core {
    pub fn new(
        config: CoreConfig,
        keys: KeyRing,
        signing: Arc<Ed25519Signer>,
        loaded: Loaded,
    ) -> Result<Self, KeyError> {
        let mut core = Self {
            relays: Relays::new(config.relay_timeout_ms),
            config,
            keys,
            signing,
            meetings: HashMap::new(),
            open_invitations: BTreeSet::new(),
            tokens: loaded.tokens.into_iter().map(|t| (t.hash, t)).collect(),
            recordings: loaded
                .recordings
                .into_iter()
                .map(|r| (r.id.clone(), r))
                .collect(),
        };
        for record in loaded.meetings {
            let key = core.keys.unwrap(
                &Purpose::MeetingKey {
                    meeting: &record.id,
                    epoch: record.epoch,
                },
                &record.wrapped_key.0,
            )?;
            for inv in &record.invitations {
                if inv.is_open() {
                    core.open_invitations
                        .insert((inv.kind, record.id.clone(), inv.id));
                }
            }
            core.meetings.insert(
                record.id.clone(),
                Meeting {
                    record,
                    key: Arc::new(key),
                    members: BTreeMap::new(),
                    sessions: HashMap::new(),
                    gone: HashMap::new(),
                    signed: None,
                },
            );
        }
        for (meeting, member) in loaded.members {
            if let Some(m) = core.meetings.get_mut(&meeting) {
                if let Some(hash) = member.session_hash.array::<32>() {
                    m.sessions.insert(hash, member.participant);
                }
                m.members.insert(member.participant, member);
            }
        }
        Ok(core)
    }

    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    pub fn signing_key(&self) -> &Arc<Ed25519Signer> {
        &self.signing
    }

    pub fn active_meetings(&self) -> usize {
        self.meetings
            .values()
            .filter(|m| !m.members.is_empty())
            .count()
    }

    pub fn live_relays(&self, now_ms: u64) -> usize {
        self.relays.live_count(now_ms)
    }

    fn roster_version(&mut self, meeting: &MeetingId, now_ms: u64) -> Arc<RosterVersion> {
        let m = self.meetings.get_mut(meeting).expect("caller checked");
        if let Some((v, signed)) = &m.signed
            && *v == m.record.version
        {
            return signed.clone();
        }
        let signed = Arc::new(RosterVersion {
            roster: m.roster(now_ms),
            key: self.signing.clone(),
            signed: OnceLock::new(),
        });
        m.signed = Some((m.record.version, signed.clone()));
        signed
    }

    fn save_meeting(m: &mut Meeting, now_ms: u64, fx: &mut Effects) {
        let record = Self::stamp(m, now_ms);
        fx.writes.push(Write::Meeting(m.record.id.clone(), record));
    }

    /// Saves the meeting's record beside the member `joined` (see [`Write::MeetingAtJoin`]).
    fn save_meeting_at_join(m: &mut Meeting, joined: MemberKey, now_ms: u64, fx: &mut Effects) {
        let record = Self::stamp(m, now_ms);
        fx.writes.push(Write::MeetingAtJoin(joined, record));
    }

    fn stamp(m: &mut Meeting, now_ms: u64) -> Vec<u8> {
        m.record.updated_ms = now_ms;
        m.record.saves += 1;
        json(&m.record)
    }

    fn new_meeting(&self, id: &MeetingId, now_ms: u64) -> Result<Meeting, Denial> {
        let key = self.keys.random_key().map_err(internal)?;
        let wrapped = self
            .keys
            .wrap(
                &Purpose::MeetingKey {
                    meeting: id,
                    epoch: 1,
                },
                &key,
            )
            .map_err(internal)?;
        Ok(Meeting {
            record: MeetingRecord {
                id: id.clone(),
                version: 0,
                epoch: 1,
                epoch_started_ms: now_ms,
                wrapped_key: Hex(wrapped),
                next_participant: 1,
                next_sender: 0,
                next_invitation: 1,
                invitations: Vec::new(),
                targets: BTreeMap::new(),
                relay: None,
                relay_instance: None,
                updated_ms: now_ms,
                saves: 0,
            },
            key: Arc::new(key),
            members: BTreeMap::new(),
            sessions: HashMap::new(),
            gone: HashMap::new(),
            signed: None,
        })
    }

    /// Moves a meeting to a fresh epoch key. The caller saves the record.
    fn rotate_meeting(
        keys: &KeyRing,
        m: &mut Meeting,
        now_ms: u64,
        actor: &str,
        reason: &str,
        fx: &mut Effects,
    ) -> Result<(), Denial> {
        let epoch = m.record.epoch + 1;
        let key = keys.random_key().map_err(internal)?;
        let wrapped = keys
            .wrap(
                &Purpose::MeetingKey {
                    meeting: &m.record.id,
                    epoch,
                },
                &key,
            )
            .map_err(internal)?;
        m.record.epoch = epoch;
        m.record.epoch_started_ms = now_ms;
        m.record.wrapped_key = Hex(wrapped);
        m.record.version += 1;
        m.key = Arc::new(key);
        fx.audit.push(
            AuditRecord::new(AuditKind::EpochChange, actor, reason)
                .meeting(&m.record.id)
                .epoch(epoch),
        );
        fx.changed.push(m.record.id.clone());
        Ok(())
    }

    /// Ensures the meeting sits on a live relay, still the process it was
    /// placed on; re-places it otherwise.
    fn ensure_placement(&mut self, meeting: &MeetingId, now_ms: u64) -> Option<Placement> {
        let record = &self.meetings.get(meeting)?.record;
        if let Some(id) = &record.relay
            && self
                .relays
                .still_serves(id, record.relay_instance.as_deref(), now_ms)
        {
            let id = id.clone();
            self.relays.add_pending(&id);
            let r = self.relays.get(&id)?;
            let placement = Placement {
                relay: r.id.clone(),
                address: r.address.clone(),
            };
            let instance = r.instance.clone();
            // A record from before relays sent an instance learns the one
            // it trusted, so the next restart of that relay is noticed.
            let record = &mut self.meetings.get_mut(meeting)?.record;
            if record.relay_instance.is_none() {
                record.relay_instance = instance;
            }
            return Some(placement);
        }
        self.place_meeting(meeting, now_ms)
    }

    /// Places the meeting on the least-loaded relay that takes it; a move
    /// from an earlier placement is a new roster version, which sends the
    /// members their new ticket. The caller saves the record.
    fn place_meeting(&mut self, meeting: &MeetingId, now_ms: u64) -> Option<Placement> {
        let r = self.relays.place(self.config.zone.as_deref(), now_ms)?;
        let placement = Placement {
            relay: r.id.clone(),
            address: r.address.clone(),
        };
        let instance = r.instance.clone();
        let m = self.meetings.get_mut(meeting)?;
        if m.record.relay.is_some() {
            m.record.version += 1;
        }
        m.record.relay = Some(placement.relay.clone());
        m.record.relay_instance = instance;
        Some(placement)
    }

    pub fn join(
        &mut self,
        now_ms: u64,
        meeting: &MeetingId,
        joiner: Joiner,
        public_key: [u8; 32],
    ) -> (Result<JoinGrant, Denial>, Effects) {
        let mut fx = Effects::default();
        let r = self.join_inner(now_ms, meeting, joiner, public_key, &mut fx);
        (r, fx)
    }

    fn join_inner(
        &mut self,
        now_ms: u64,
        meeting: &MeetingId,
        joiner: Joiner,
        public_key: [u8; 32],
        fx: &mut Effects,
    ) -> Result<JoinGrant, Denial> {
        let actor = match &joiner {
            Joiner::Person(c) => c.actor(),
            Joiner::Connector { identity, .. } => identity.clone(),
        };
        // Authorisation first, so a refused caller changes nothing.
        match &joiner {
            Joiner::Person(c) => {
                if &c.meeting != meeting {
                    return Err(fx.deny(
                        &actor,
                        Some(meeting),
                        Denial::new(403, "wrong_meeting", "join token is for another meeting"),
                    ));
                }
                if !matches!(c.role, Role::Host | Role::Participant) {
                    return Err(fx.deny(
                        &actor,
                        Some(meeting),
                        Denial::new(
                            403,
                            "connector_role_in_token",
                            "connectors join with their certificate and an invitation",
                        ),
                    ));
                }
                if self.tokens.contains_key(&c.token_hash) {
                    return Err(fx.deny(
                        &actor,
                        Some(meeting),
                        Denial::new(401, "token_replayed", "join token was already used"),
                    ));
                }
            }
            Joiner::Connector {
                kind, invitation, ..
            } => {
                let invited = self.meetings.get(meeting).is_some_and(|m| {
                    m.record
                        .invitations
                        .iter()
                        .any(|i| i.id == *invitation && i.kind == *kind && i.is_open())
                });
                if !invited {
                    return Err(fx.deny(
                        &actor,
                        Some(meeting),
                        Denial::new(
                            403,
                            "not_invited",
                            "no open invitation for this connector in this meeting",
                        ),
                    ));
                }
            }
        }
        if let Some(m) = self.meetings.get(meeting)
            && m.members.len() >= self.config.max_members
        {
            return Err(fx.deny(
                &actor,
                Some(meeting),
                Denial::new(403, "meeting_full", "meeting has reached its member limit"),
            ));
        }
        if !self.meetings.contains_key(meeting) {
            // Check a relay exists before creating anything.
            if !self.relays.can_place(self.config.zone.as_deref(), now_ms) {
                return Err(Denial::new(503, "no_relay", "no live relay with capacity"));
            }
            let m = self.new_meeting(meeting, now_ms)?;
            fx.audit.push(
                AuditRecord::new(AuditKind::EpochChange, &actor, "meeting created")
                    .meeting(meeting)
                    .epoch(1),
            );
            self.meetings.insert(meeting.clone(), m);
        }
        let Some(placement) = self.ensure_placement(meeting, now_ms) else {
            return Err(Denial::new(503, "no_relay", "no live relay with capacity"));
        };
        let session_bytes: [u8; 32] = self.keys.random_bytes().map_err(internal)?;
        let session = Hex::encode(&session_bytes);
        let hash = session_hash(&session);
        let m = self.meetings.get_mut(meeting).expect("ensured above");
        if m.record.next_sender == u16::MAX {
            return Err(Denial::new(
                409,
                "sender_indexes_exhausted",
                "meeting ran out of sender indexes",
            ));
        }
        if !m.members.is_empty() {
            // The newcomer gets a key nobody has sent with yet: whatever it
            // captured before joining stays closed to it. The members get
            // the new key through their events (released_epoch < epoch).
            Self::rotate_meeting(
                &self.keys,
                m,
                now_ms,
                &actor,
                "member joined: new epoch for the newcomer",
                fx,
            )?;
        }
        // A connector's join claims its invitation and drops the target, which must then go
        // from the record in place too.
        let claims_target = matches!(joiner, Joiner::Connector { .. });
        let participant = ParticipantId(m.record.next_participant);
        let sender_index = m.record.next_sender;
        m.record.next_participant += 1;
        m.record.next_sender += 1;
        let (role, name, subject) = match joiner {
            Joiner::Person(c) => {
                let used = UsedToken {
                    expires_s: c.expires_s,
                    used_ms: now_ms,
                    hash: c.token_hash,
                };
                self.tokens.insert(c.token_hash, used);
                fx.writes.push(Write::Token(used));
                (c.role, c.name, c.subject)
            }
            Joiner::Connector {
                identity,
                kind,
                invitation,
                display_name,
            } => {
                if let Some(inv) = m.record.invitations.iter_mut().find(|i| i.id == invitation) {
                    inv.claimed_by = Some(identity.clone());
                    inv.participant = Some(participant);
                }
                // The connector has the target from its assignment; the
                // store need not keep a stream key any longer than that.
                m.record.targets.remove(&invitation);
                self.open_invitations
                    .remove(&(kind, meeting.clone(), invitation));
                let name = display_name.unwrap_or_else(|| kind.to_string());
                (Role::Connector(kind), name, identity)
            }
        };
        let member = MemberRecord {
            participant,
            sender_index,
            role: role.clone(),
            name,
            subject,
            public_key: Hex(public_key.to_vec()),
            session_hash: Hex(hash.to_vec()),
            released_epoch: m.record.epoch,
            joined_ms: now_ms,
        };
        let joined = MemberKey::of(meeting, &member);
        fx.writes
            .push(Write::Member(joined.clone(), Some(json(&member))));
        m.members.insert(participant, member);
        m.sessions.insert(hash, participant);
        m.record.version += 1;
        let epoch = m.record.epoch;
        let key = m.key.clone();
        if claims_target || !m.record.targets.is_empty() {
            Self::save_meeting(m, now_ms, fx);
        } else {
            Self::save_meeting_at_join(m, joined, now_ms, fx);
        }
        fx.audit.push(
            AuditRecord::new(AuditKind::RosterChange, &actor, format!("joined as {role}"))
                .meeting(meeting)
                .participant(participant),
        );
        fx.audit.push(
            AuditRecord::new(
                AuditKind::KeyRelease,
                &actor,
                "meeting key sealed to participant",
            )
            .meeting(meeting)
            .participant(participant)
            .epoch(epoch),
        );
        fx.changed.push(meeting.clone());
        let roster = self.roster_version(meeting, now_ms);
        Ok(JoinGrant {
            participant,
            sender_index,
            session,
            roster,
            release: Release {
                meeting: meeting.clone(),
                epoch,
                participant,
                public_key,
                key,
            },
            placement,
        })
    }

    /// Resolves a session to its member, or a denial (audited).
    fn member_of(
        &self,
        meeting: &MeetingId,
        session: &[u8; 32],
        fx: &mut Effects,
    ) -> Result<ParticipantId, Denial> {
        self.meetings
            .get(meeting)
            .and_then(|m| m.sessions.get(session).copied())
            .ok_or_else(|| {
                fx.deny(
                    &format!("session:{}", Hex::encode(&session[..6])),
                    Some(meeting),
                    Denial::new(403, "not_member", "session is not a member of this meeting"),
                )
            })
    }

    /// What changed for this member since roster version `since`.
    /// `Ok(None)`: nothing yet (wait and ask again).
    pub fn events(
        &mut self,
        now_ms: u64,
        meeting: &MeetingId,
        session: &[u8; 32],
        since: u64,
    ) -> (Result<Option<EventsGrant>, Denial>, Effects) {
        let mut fx = Effects::default();
        if self
            .meetings
            .get(meeting)
            .is_some_and(|m| m.gone.contains_key(session))
        {
            // Not an intruder: a leaver's own poll, answered after its leave.
            return (
                Err(Denial::new(
                    410,
                    "gone",
                    "this session left or was removed from the meeting",
                )),
                fx,
            );
        }
        let participant = match self.member_of(meeting, session, &mut fx) {
            Ok(p) => p,
            Err(d) => return (Err(d), fx),
        };
        // A dead relay is replaced on the next poll of any member.
        let placement = self.ensure_placement(meeting, now_ms);
        let m = self.meetings.get_mut(meeting).expect("member found");
        let version = m.record.version;
        let member = m
            .members
            .get_mut(&participant)
            .expect("session maps to member");
        // `since == 0` is a resync (new connection, lost response): the
        // current key is released again, audited like any release.
        let needs_key = member.released_epoch < m.record.epoch || since == 0;
        if version <= since && !needs_key {
            return (Ok(None), fx);
        }
        let release = if needs_key {
            // Kept in memory only: after a restart each member is given the current key
            // again at its next poll, audited like any release. Storing it would rewrite an
            // old member row, on a page of its own, for every member at every new epoch.
            member.released_epoch = m.record.epoch;
            let actor = member.subject.clone();
            let public_key = member.public_key.array().unwrap_or_default();
            fx.audit.push(
                AuditRecord::new(
                    AuditKind::KeyRelease,
                    actor,
                    "meeting key sealed to participant",
                )
                .meeting(meeting)
                .participant(participant)
                .epoch(m.record.epoch),
            );
            Some(Release {
                meeting: meeting.clone(),
                epoch: m.record.epoch,
                participant,
                public_key,
                key: m.key.clone(),
            })
        } else {
            None
        };
        let sender = m.members[&participant].sender_index;
        if m.record.version != version {
            // Re-placement bumped the version: persist it.
            Self::save_meeting(m, now_ms, &mut fx);
            fx.changed.push(meeting.clone());
        }
        let version = m.record.version;
        let roster = (version > since).then(|| self.roster_version(meeting, now_ms));
        let placement = if version > since {
            placement.map(|p| (p, participant, sender))
        } else {
            None
        };
        (
            Ok(Some(EventsGrant {
                version,
                roster,
                release,
                placement,
            })),
            fx,
        )
    }

    fn remove_member(
        &mut self,
        now_ms: u64,
        meeting: &MeetingId,
        participant: ParticipantId,
        actor: &str,
        why: &str,
        fx: &mut Effects,
    ) -> Result<u64, Denial> {
        let m = self.meetings.get_mut(meeting).expect("caller checked");
        let Some(member) = m.members.remove(&participant) else {
            return Err(Denial::new(
                404,
                "no_such_participant",
                "participant is not in the meeting",
            ));
        };
        if let Some(hash) = member.session_hash.array::<32>() {
            m.sessions.remove(&hash);
            m.gone.insert(hash, now_ms);
        }
        fx.writes
            .push(Write::Member(MemberKey::of(meeting, &member), None));
        fx.audit.push(
            AuditRecord::new(AuditKind::RosterChange, actor, why)
                .meeting(meeting)
                .participant(participant),
        );
        Self::rotate_meeting(
            &self.keys,
            m,
            now_ms,
            actor,
            "member left: new epoch for the rest",
            fx,
        )?;
        Self::save_meeting(m, now_ms, fx);
        Ok(m.record.epoch)
    }

    pub fn leave(
        &mut self,
        now_ms: u64,
        meeting: &MeetingId,
        session: &[u8; 32],
    ) -> (Result<u64, Denial>, Effects) {
        let mut fx = Effects::default();
        let r = self.member_of(meeting, session, &mut fx).and_then(|p| {
            let actor = self.meetings[meeting].members[&p].subject.clone();
            self.remove_member(now_ms, meeting, p, &actor, "left", &mut fx)
        });
        (r, fx)
    }

    fn host_of(
        &self,
        meeting: &MeetingId,
        session: &[u8; 32],
        fx: &mut Effects,
    ) -> Result<(ParticipantId, String), Denial> {
        let p = self.member_of(meeting, session, fx)?;
        let member = &self.meetings[meeting].members[&p];
        if !member.role.is_host() {
            return Err(fx.deny(
                &member.subject,
                Some(meeting),
                Denial::new(403, "not_host", "only the host may do this"),
            ));
        }
        Ok((p, member.subject.clone()))
    }

    pub fn remove(
        &mut self,
        now_ms: u64,
        meeting: &MeetingId,
        session: &[u8; 32],
        target: ParticipantId,
    ) -> (Result<u64, Denial>, Effects) {
        let mut fx = Effects::default();
        let r = self
            .host_of(meeting, session, &mut fx)
            .and_then(|(_, actor)| {
                self.remove_member(now_ms, meeting, target, &actor, "removed by host", &mut fx)
            });
        (r, fx)
    }

    /// Host only. `target` (a stream URL or a number to dial) is checked
    /// with [`check_invite_target`]; a bad one is refused with 400, audited,
    /// and changes nothing.
    pub fn invite(
        &mut self,
        now_ms: u64,
        meeting: &MeetingId,
        session: &[u8; 32],
        kind: ConnectorKind,
        target: Option<String>,
    ) -> (Result<(Invitation, Arc<RosterVersion>), Denial>, Effects) {
        let mut fx = Effects::default();
        let r = self
            .host_of(meeting, session, &mut fx)
            .and_then(|(host, actor)| {
                let summary = match target.as_deref().map(|t| check_invite_target(kind, t)) {
                    None => None,
                    Some(Ok(s)) => Some(s),
                    Some(Err(e)) => {
                        let code = match e {
                            TargetError::NotAllowed(_) => "target_not_allowed",
                            _ => "bad_target",
                        };
                        // The message never quotes the target (see TargetError).
                        let d = Denial::new(400, code, e.to_string());
                        return Err(fx.deny(&actor, Some(meeting), d));
                    }
                };
                Ok((host, actor, summary))
            })
            .map(|(host, actor, summary)| {
                let m = self.meetings.get_mut(meeting).expect("host found");
                let invitation = Invitation {
                    id: m.record.next_invitation,
                    kind,
                    invited_by: host,
                    claimed_by: None,
                    participant: None,
                    outcome: None,
                };
                m.record.next_invitation += 1;
                m.record.invitations.push(invitation.clone());
                if let Some(t) = target {
                    m.record.targets.insert(invitation.id, Target(t));
                }
                m.record.version += 1;
                Self::save_meeting(m, now_ms, &mut fx);
                self.open_invitations
                    .insert((kind, meeting.clone(), invitation.id));
                // The audit chain is kept for years and read by auditors: a
                // stream URL's path is usually the stream key (a credential
                // for the streaming platform) and a phone number is personal
                // data, so only scheme and host of a URL are recorded.
                let to = summary.map_or(String::new(), |s| format!(" to {s}"));
                fx.audit.push(
                    AuditRecord::new(
                        AuditKind::Invitation,
                        actor,
                        format!("invited connector:{kind}{to}"),
                    )
                    .meeting(meeting)
                    .participant(host),
                );
                fx.changed.push(meeting.clone());
                (invitation, self.roster_version(meeting, now_ms))
            });
        (r, fx)
    }

    /// Open invitations a connector of `kind` may pick up.
    pub fn assignments(&self, kind: ConnectorKind) -> Vec<Assignment> {
        self.open_invitations
            .range((kind, MeetingId::new("0").expect("valid"), 0)..)
            .take_while(|(k, _, _)| *k == kind)
            .map(|(k, m, i)| Assignment {
                meeting: m.clone(),
                invitation: *i,
                kind: *k,
                target: self
                    .meetings
                    .get(m)
                    .and_then(|m| m.record.targets.get(i))
                    .map(|t| t.0.clone()),
            })
            .collect()
    }

    /// A connector of `kind` (certificate `identity`) reports what became of
    /// invitation `invitation`: one it could not fulfil, or whose work has
    /// ended. Only the kind it was for may report, and once it is claimed
    /// only the connector that claimed it; the first outcome stands. The
    /// outcome goes into the roster (every member, the host first, sees
    /// it), the invitation is no longer offered and its target is dropped.
    pub fn report_outcome(
        &mut self,
        now_ms: u64,
        identity: &str,
        kind: ConnectorKind,
        meeting: &MeetingId,
        invitation: u64,
        outcome: meeting_proto::kms_api::InvitationOutcome,
    ) -> (Result<Invitation, Denial>, Effects) {
        let mut fx = Effects::default();
        let refuse = |fx: &mut Effects, status, code, message: &str| {
            Err(fx.deny(identity, Some(meeting), Denial::new(status, code, message)))
        };
        if let Err(why) = outcome.check() {
            return (refuse(&mut fx, 400, "bad_outcome", why), fx);
        }
        let Some(inv) = self
            .meetings
            .get_mut(meeting)
            .and_then(|m| m.record.invitations.iter_mut().find(|i| i.id == invitation))
        else {
            let r = refuse(
                &mut fx,
                404,
                "unknown_invitation",
                "no such invitation in this meeting",
            );
            return (r, fx);
        };
        if inv.kind != kind {
            let msg = format!("invitation {invitation} is for connector:{}", inv.kind);
            return (refuse(&mut fx, 403, "wrong_kind", &msg), fx);
        }
        if inv.claimed_by.as_deref().is_some_and(|c| c != identity) {
            let msg = "another connector took this invitation";
            return (refuse(&mut fx, 403, "claimed_by_other", msg), fx);
        }
        if inv.outcome.is_some() {
            let msg = "this invitation already has an outcome";
            return (refuse(&mut fx, 409, "outcome_reported", msg), fx);
        }
        let detail = format!("connector:{kind} invitation {invitation} {outcome}");
        inv.outcome = Some(outcome);
        let reported = inv.clone();
        let m = self.meetings.get_mut(meeting).expect("found above");
        m.record.targets.remove(&invitation);
        m.record.version += 1;
        Self::save_meeting(m, now_ms, &mut fx);
        self.open_invitations
            .remove(&(kind, meeting.clone(), invitation));
        // The outcome holds no target (connectors never put it there, and
        // the message is canonical text of bounded length).
        let mut rec = AuditRecord::new(AuditKind::Invitation, identity, detail).meeting(meeting);
        if let Some(p) = reported.participant {
            rec = rec.participant(p);
        }
        fx.audit.push(rec);
        fx.changed.push(meeting.clone());
        (Ok(reported), fx)
    }

    /// Records a denial decided outside the core (authentication failures).
    pub fn deny(&self, actor: &str, meeting: Option<&MeetingId>, d: Denial) -> (Denial, Effects) {
        let mut fx = Effects::default();
        let d = fx.deny(actor, meeting, d);
        (d, fx)
    }

    /// A relay (re)registers. When it is a new process under an id that
    /// holds meetings (a restarted pod keeps its name), those meetings are
    /// placed again at once: the process lost their bindings, and waiting
    /// for its heartbeat to time out would never happen, as it is alive.
    pub fn register_relay(
        &mut self,
        now_ms: u64,
        relay: String,
        req: RelayRegisterRequest,
        actor: &str,
    ) -> (Result<(), Denial>, Effects) {
        let mut fx = Effects::default();
        if let Some(i) = &req.instance
            && (i.is_empty()
                || i.len() > MAX_RELAY_INSTANCE_LEN
                || !i
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            let d = Denial::new(
                400,
                "bad_instance",
                format!(
                    "instance must be 1 to {MAX_RELAY_INSTANCE_LEN} ASCII letters, digits, '-' or '_'"
                ),
            );
            return (Err(fx.deny(actor, None, d)), fx);
        }
        let RelayRegisterRequest {
            zone,
            address,
            capacity,
            instance,
        } = req;
        let process = instance.as_deref().unwrap_or("unknown");
        fx.audit.push(AuditRecord::new(
            AuditKind::Relay,
            actor,
            format!(
                "registered relay {relay} in zone {zone} at {address} capacity {capacity} instance {process}"
            ),
        ));
        self.relays.register(
            relay.clone(),
            zone,
            address,
            capacity,
            instance.clone(),
            now_ms,
        );
        self.place_again(
            &relay,
            |r| r.relay_instance.is_some() && r.relay_instance != instance,
            now_ms,
            actor,
            &format!("relay {relay} restarted as instance {process}"),
            &mut fx,
        );
        (Ok(()), fx)
    }

    /// Returns the number of meetings on the relay, or None if unknown. A
    /// relay that reports it is draining still forwards for a while: its
    /// meetings move now, while the members can switch without a gap.
    pub fn heartbeat(
        &mut self,
        now_ms: u64,
        relay: &str,
        load: u32,
        ready: bool,
        actor: &str,
    ) -> (Option<u32>, Effects) {
        let mut fx = Effects::default();
        if !self.relays.heartbeat(relay, load, ready, now_ms) {
            return (None, fx);
        }
        if !ready {
            let why = format!("relay {relay} is draining");
            self.place_again(relay, |_| true, now_ms, actor, &why, &mut fx);
        }
        let meetings = self
            .meetings
            .values()
            .filter(|m| m.record.relay.as_deref() == Some(relay) && !m.members.is_empty())
            .count() as u32;
        (Some(meetings), fx)
    }

    /// Places again every meeting with members on `relay` that `stranded`
    /// picks, on whichever live, ready relay takes it (possibly a new process
    /// under the same id); the members' long polls wake with a new ticket.
    /// A meeting no relay takes stays, and the members' next polls retry.
    fn place_again(
        &mut self,
        relay: &str,
        stranded: impl Fn(&MeetingRecord) -> bool,
        now_ms: u64,
        actor: &str,
        why: &str,
        fx: &mut Effects,
    ) {
        let mut ids: Vec<MeetingId> = self
            .meetings
            .values()
            .filter(|m| {
                !m.members.is_empty()
                    && m.record.relay.as_deref() == Some(relay)
                    && stranded(&m.record)
            })
            .map(|m| m.record.id.clone())
            .collect();
        ids.sort();
        for id in ids {
            let Some(placement) = self.place_meeting(&id, now_ms) else {
                continue;
            };
            let m = self.meetings.get_mut(&id).expect("listed above");
            Self::save_meeting(m, now_ms, fx);
            fx.audit.push(
                AuditRecord::new(
                    AuditKind::Relay,
                    actor,
                    format!("{why}: meeting placed again on relay {}", placement.relay),
                )
                .meeting(&id),
            );
            fx.changed.push(id);
        }
    }

    pub fn create_recording_key(
        &mut self,
        now_ms: u64,
        identity: &str,
        meeting: &MeetingId,
    ) -> (Result<(String, SecretKey), Denial>, Effects) {
        let mut fx = Effects::default();
        let is_recorder = self.meetings.get(meeting).is_some_and(|m| {
            m.members.values().any(|x| {
                x.subject == identity && x.role == Role::Connector(ConnectorKind::Recording)
            })
        });
        if !is_recorder {
            let d = fx.deny(
                identity,
                Some(meeting),
                Denial::new(
                    403,
                    "not_recording_connector",
                    "only a recording connector in the meeting may create recording keys",
                ),
            );
            return (Err(d), fx);
        }
        let r = (|| {
            let id = Hex::encode(&self.keys.random_bytes::<16>()?);
            let key = self.keys.random_key()?;
            let wrapped = self.keys.wrap(
                &Purpose::RecordingKey {
                    meeting,
                    recording: &id,
                },
                &key,
            )?;
            Ok::<_, KeyError>((id, key, wrapped))
        })();
        let (id, key, wrapped) = match r {
            Ok(v) => v,
            Err(e) => return (Err(internal(e)), fx),
        };
        let record = RecordingRecord {
            id: id.clone(),
            meeting: meeting.clone(),
            wrapped_key: Hex(wrapped),
            creator: identity.to_owned(),
            created_ms: now_ms,
        };
        fx.writes.push(Write::Recording(id.clone(), json(&record)));
        fx.audit.push(
            AuditRecord::new(
                AuditKind::RecordingKey,
                identity,
                format!("created recording key {id}"),
            )
            .meeting(meeting),
        );
        self.recordings.insert(id.clone(), record);
        (Ok((id, key)), fx)
    }

    pub fn recording_key(
        &mut self,
        recording: &str,
        reader: &Reader,
    ) -> (Result<(MeetingId, SecretKey), Denial>, Effects) {
        let mut fx = Effects::default();
        let actor = match reader {
            Reader::Certificate(id) => id.clone(),
            Reader::Token(c) => c.actor(),
        };
        let Some(record) = self.recordings.get(recording) else {
            let d = fx.deny(
                &actor,
                None,
                Denial::new(404, "no_such_recording", "unknown recording"),
            );
            return (Err(d), fx);
        };
        let allowed = match reader {
            Reader::Certificate(id) => {
                *id == record.creator || self.config.recording_key_readers.contains(id)
            }
            Reader::Token(c) => {
                c.meeting == record.meeting && self.config.recording_key_readers.contains(&actor)
            }
        };
        if !allowed {
            let d = fx.deny(
                &actor,
                Some(&record.meeting),
                Denial::new(
                    403,
                    "not_a_reader",
                    "not allowed to read this recording's key",
                ),
            );
            return (Err(d), fx);
        }
        let meeting = record.meeting.clone();
        match self.keys.unwrap(
            &Purpose::RecordingKey {
                meeting: &meeting,
                recording,
            },
            &record.wrapped_key.0,
        ) {
            Ok(key) => {
                fx.audit.push(
                    AuditRecord::new(
                        AuditKind::RecordingKey,
                        &actor,
                        format!("released recording key {recording}"),
                    )
                    .meeting(&meeting),
                );
                (Ok((meeting, key)), fx)
            }
            Err(e) => (Err(internal(e)), fx),
        }
    }

    pub fn rotate_kek(&mut self, now_ms: u64, actor: &str) -> (Result<u32, Denial>, Effects) {
        let mut fx = Effects::default();
        match self.keys.rotate(now_ms) {
            Ok(stored) => {
                fx.writes.extend(stored.into_iter().map(Write::Kek));
                let v = self.keys.current_version().expect("just rotated");
                fx.audit.push(AuditRecord::new(
                    AuditKind::Admin,
                    actor,
                    format!("KEK rotated to version {v}"),
                ));
                (Ok(v), fx)
            }
            Err(e) => (Err(internal(e)), fx),
        }
    }

    pub fn roster(&mut self, meeting: &MeetingId, now_ms: u64) -> Option<Arc<RosterVersion>> {
        self.meetings
            .contains_key(meeting)
            .then(|| self.roster_version(meeting, now_ms))
    }

    /// Time-driven work: interval rotation of meeting keys, KEK rotation and
    /// retirement (re-wrapping what the retiring KEK still protects), expiry
    /// of remembered tokens.
    pub fn tick(&mut self, now_ms: u64) -> Effects {
        let mut fx = Effects::default();
        for m in self.meetings.values_mut() {
            m.gone
                .retain(|_, left| now_ms.saturating_sub(*left) < GONE_SESSION_MEMORY_MS);
        }
        let interval = self.config.meeting_key_interval_ms;
        if interval > 0 {
            for m in self.meetings.values_mut() {
                let due = !m.members.is_empty()
                    && now_ms.saturating_sub(m.record.epoch_started_ms) >= interval;
                if due
                    && Self::rotate_meeting(
                        &self.keys,
                        m,
                        now_ms,
                        "kms",
                        "interval rotation",
                        &mut fx,
                    )
                    .is_ok()
                {
                    Self::save_meeting(m, now_ms, &mut fx);
                }
            }
        }
        let kek_due = self
            .keys
            .current_version()
            .and_then(|v| self.keys.kek(v))
            .is_none_or(|k| now_ms.saturating_sub(k.created_ms) >= self.config.kek_interval_ms);
        if kek_due {
            let (_, more) = self.rotate_kek(now_ms, "kms");
            fx.writes.extend(more.writes);
            fx.audit.extend(more.audit);
        }
        let cutoff = now_ms.saturating_sub(self.config.kek_retire_after_ms);
        let retiring: Vec<u32> = self
            .keys
            .keks()
            .filter(|k| k.superseded_ms.is_some_and(|t| t < cutoff))
            .map(|k| k.version)
            .collect();
        if !retiring.is_empty() {
            self.rewrap(&retiring, now_ms, &mut fx);
            for v in self.keys.retire(cutoff) {
                fx.audit.push(AuditRecord::new(
                    AuditKind::Admin,
                    "kms",
                    format!("KEK version {v} retired"),
                ));
            }
        }
        let now_s = now_ms / 1000;
        // Tokens are remembered until they expire (plus clock skew), so a
        // replay is refused for as long as the token itself would be accepted.
        let expired: Vec<UsedToken> = self
            .tokens
            .values()
            .filter(|t| t.expires_s + 300 < now_s)
            .copied()
            .collect();
        for t in expired {
            self.tokens.remove(&t.hash);
            fx.writes.push(Write::ForgetToken(t));
        }
        fx
    }

    fn rewrap(&mut self, versions: &[u32], now_ms: u64, fx: &mut Effects) {
        let under = |w: &[u8]| crate::keys::wrapped_version(w).is_ok_and(|v| versions.contains(&v));
        for m in self.meetings.values_mut() {
            if under(&m.record.wrapped_key.0) {
                let purpose = Purpose::MeetingKey {
                    meeting: &m.record.id,
                    epoch: m.record.epoch,
                };
                if let Ok(w) = self.keys.wrap(&purpose, &m.key) {
                    m.record.wrapped_key = Hex(w);
                    Self::save_meeting(m, now_ms, fx);
                }
            }
        }
        for r in self.recordings.values_mut() {
            if under(&r.wrapped_key.0) {
                let purpose = Purpose::RecordingKey {
                    meeting: &r.meeting,
                    recording: &r.id,
                };
                if let Ok(key) = self.keys.unwrap(&purpose, &r.wrapped_key.0)
                    && let Ok(w) = self.keys.wrap(&purpose, &key)
                {
                    r.wrapped_key = Hex(w);
                    fx.writes.push(Write::Recording(r.id.clone(), json(&*r)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::RootKey;
    use ed25519_dalek::SigningKey;

    const MIN: u64 = 60_000;

    fn core() -> Core {
        core_with(30 * 24 * 60 * MIN, 365 * 24 * 60 * MIN)
    }

    fn core_with(kek_interval_ms: u64, kek_retire_after_ms: u64) -> Core {
        let (mut keys, _) =
            KeyRing::open(RootKey::from_bytes(&[1; 32]).unwrap(), None, vec![]).unwrap();
        keys.rotate(0).unwrap();
        let mut c = Core::new(
            CoreConfig {
                max_members: 4,
                meeting_key_interval_ms: 60 * MIN,
                kek_interval_ms,
                kek_retire_after_ms,
                relay_timeout_ms: 15_000,
                zone: None,
                recording_key_readers: vec!["token:portal:auditor".into()],
            },
            keys,
            Arc::new(Ed25519Signer::new(&SigningKey::from_bytes(&[3; 32])).unwrap()),
            Loaded::default(),
        )
        .unwrap();
        register(&mut c, 0, "z/r0", 4000, Some("i0"));
        c
    }

    fn register(
        c: &mut Core,
        now_ms: u64,
        relay: &str,
        port: u16,
        instance: Option<&str>,
    ) -> Effects {
        let req = RelayRegisterRequest {
            zone: "z".into(),
            address: format!("127.0.0.1:{port}"),
            capacity: 100,
            instance: instance.map(str::to_owned),
        };
        let (r, fx) = c.register_relay(now_ms, relay.into(), req, "relay");
        r.unwrap();
        fx
    }

    fn m() -> MeetingId {
        MeetingId::new("m1").unwrap()
    }

    fn claims(sub: &str, role: Role, nonce: u8) -> Claims {
        Claims {
            issuer: "portal".into(),
            subject: sub.into(),
            name: sub.to_uppercase(),
            meeting: m(),
            role,
            expires_s: 10_000,
            token_hash: [nonce; 32],
        }
    }

    fn join(c: &mut Core, sub: &str, role: Role, nonce: u8) -> JoinGrant {
        let (r, fx) = c.join(
            1000,
            &m(),
            Joiner::Person(claims(sub, role, nonce)),
            [nonce; 32],
        );
        let g = r.unwrap();
        assert!(fx.audit.iter().any(|a| a.kind == AuditKind::KeyRelease));
        g
    }

    fn session(g: &JoinGrant) -> [u8; 32] {
        session_hash(&g.session)
    }

    #[test]
    fn each_join_starts_an_epoch_the_members_get_and_the_newcomer_alone_cannot_go_back() {
        let mut c = core();
        let a = join(&mut c, "ada", Role::Host, 1);
        let (r, fx) = c.join(
            1000,
            &m(),
            Joiner::Person(claims("bob", Role::Participant, 2)),
            [2; 32],
        );
        let b = r.unwrap();
        // The first member starts epoch 1; every later one a new epoch,
        // before its key is released, audited with who caused it.
        assert_eq!((a.release.epoch, b.release.epoch), (1, 2));
        assert_ne!(a.release.key.expose(), b.release.key.expose());
        let change = fx
            .audit
            .iter()
            .find(|x| x.kind == AuditKind::EpochChange)
            .unwrap();
        assert_eq!(
            (change.epoch, change.actor.as_str(), change.detail.as_str()),
            (
                Some(2),
                "token:portal:bob",
                "member joined: new epoch for the newcomer"
            )
        );
        assert_eq!(fx.changed, vec![m(), m()], "the members' polls wake");
        let d = join(&mut c, "dan", Role::Participant, 3);
        assert_eq!(d.release.epoch, 3);
        assert_ne!(a.sender_index, b.sender_index);
        let roster = d
            .roster
            .signed()
            .verify(&c.signing_key().verifying_key())
            .unwrap();
        assert_eq!((roster.members.len(), roster.epoch), (3, 3));
        assert_eq!(a.placement.relay, "z/r0");
        // The members get the newcomer's epoch through their events.
        for (who, since) in [
            (&a, 0),
            (
                &b,
                b.roster
                    .signed()
                    .verify(&c.signing_key().verifying_key())
                    .unwrap()
                    .version,
            ),
        ] {
            let (r, fx) = c.events(1001, &m(), &session(who), since);
            let rel = r.unwrap().unwrap().release.unwrap();
            assert_eq!(rel.epoch, 3);
            assert_eq!(rel.key.expose(), d.release.key.expose());
            // Audited, and nothing stored: which epoch a member was given is kept in memory.
            assert_eq!(fx.audit.len(), 1);
            assert_eq!(fx.audit[0].kind, AuditKind::KeyRelease);
            assert_eq!(fx.writes, []);
        }

        // Real SFrame: ada and bob talk in epoch 2; dan captured it before
        // joining and holds only epoch 3's key.
        use meeting_proto::media_crypto::{DEFAULT_GRACE, OpenError, Receiver, Sender};
        use meeting_proto::media_keys::EpochKey;
        use meeting_proto::wire::{RoutingHeader, StreamKind};
        let t = std::time::Instant::now();
        let epoch_key =
            |epoch, secret: &SecretKey| EpochKey::new(m(), epoch, secret.expose()).unwrap();
        let header = RoutingHeader {
            slot: 1,
            sender: a.sender_index,
            kind: StreamKind::Audio,
            flags: 0,
            seq: 0,
            timestamp: 960,
        };
        let mut captured = Vec::new();
        Sender::new(&epoch_key(2, &b.release.key), a.sender_index)
            .protect(&header, b"before dan joined", &mut captured)
            .unwrap();
        let mut bob = Receiver::new(m(), DEFAULT_GRACE);
        bob.set_epoch(epoch_key(2, &b.release.key), t);
        assert_eq!(
            bob.open(&captured, t).unwrap().payload,
            b"before dan joined"
        );
        let mut dan = Receiver::new(m(), DEFAULT_GRACE);
        dan.set_epoch(epoch_key(3, &d.release.key), t);
        assert!(matches!(
            dan.open(&captured, t),
            Err(OpenError::UnknownEpoch(2))
        ));
        // Not a label check: dan's key bytes, claimed as epoch 2's, do not
        // authenticate the frame either.
        let mut forger = Receiver::new(m(), DEFAULT_GRACE);
        forger.set_epoch(epoch_key(2, &d.release.key), t);
        assert!(matches!(
            forger.open(&captured, t),
            Err(OpenError::Authentication)
        ));
    }

    #[test]
    fn leave_rotates_and_only_the_rest_get_the_new_key() {
        let mut c = core();
        let a = join(&mut c, "ada", Role::Host, 1);
        let b = join(&mut c, "bob", Role::Participant, 2);
        // bob's join started epoch 2; his leave starts epoch 3.
        let (r, fx) = c.leave(2000, &m(), &session(&b));
        assert_eq!(r.unwrap(), 3);
        assert!(
            fx.writes
                .iter()
                .any(|w| matches!(w, Write::Member(_, None)))
        );
        // The one who stayed gets epoch 3 sealed to their key.
        let (r, fx) = c.events(2001, &m(), &session(&a), 0);
        let g = r.unwrap().unwrap();
        let rel = g.release.unwrap();
        assert_eq!((rel.epoch, rel.public_key), (3, [1; 32]));
        assert_ne!(rel.key.expose(), a.release.key.expose());
        assert_ne!(
            rel.key.expose(),
            b.release.key.expose(),
            "the leaver's last key"
        );
        assert_eq!(fx.audit[0].kind, AuditKind::KeyRelease);
        // Asking again: nothing new, nothing written.
        let (r, fx) = c.events(2002, &m(), &session(&a), g.version);
        assert!(r.unwrap().is_none());
        assert!(fx.writes.is_empty() && fx.audit.is_empty());
        // A resync (since = 0, e.g. after a lost response) releases the
        // current key again, audited.
        let (r, fx) = c.events(2002, &m(), &session(&a), 0);
        assert_eq!(r.unwrap().unwrap().release.unwrap().epoch, 3);
        assert_eq!(fx.audit[0].kind, AuditKind::KeyRelease);
        // The leaver's own (in-flight) poll gets no key and is told it is
        // gone: no denial, nothing written.
        let (r, fx) = c.events(2003, &m(), &session(&b), 0);
        assert_eq!(r.unwrap_err().code, "gone");
        assert!(fx.writes.is_empty() && fx.audit.is_empty());
        // Once that is long past, it is any other non-member: refused, audited.
        c.tick(2003 + GONE_SESSION_MEMORY_MS);
        let (r, fx) = c.events(2004 + GONE_SESSION_MEMORY_MS, &m(), &session(&b), 0);
        assert_eq!(r.unwrap_err().code, "not_member");
        assert_eq!(fx.audit.len(), 1);
        assert_eq!(fx.audit[0].kind, AuditKind::Denial);
        assert!(fx.writes.is_empty());
    }

    #[test]
    fn remembered_tokens_are_forgotten_after_expiry() {
        let mut c = core();
        join(&mut c, "ada", Role::Host, 1);
        let forgot = |fx: &Effects| {
            fx.writes
                .iter()
                .any(|w| matches!(w, Write::ForgetToken(t) if t.hash == [1; 32] && t.expires_s == 10_000))
        };
        assert!(!forgot(&c.tick(1_000_000)));
        assert!(forgot(&c.tick(10_301_000)));
        // Once forgotten the token is expired anyway: the verifier refuses it.
        assert!(!forgot(&c.tick(10_302_000)));
    }

    #[test]
    fn replayed_foreign_or_connector_tokens_are_refused_and_audited() {
        let mut c = core();
        join(&mut c, "ada", Role::Host, 1);
        for (claims, code) in [
            (claims("ada", Role::Host, 1), "token_replayed"),
            (
                Claims {
                    meeting: MeetingId::new("other").unwrap(),
                    ..claims("eve", Role::Host, 9)
                },
                "wrong_meeting",
            ),
            (
                claims("eve", Role::Connector(ConnectorKind::Recording), 8),
                "connector_role_in_token",
            ),
        ] {
            let (r, fx) = c.join(1000, &m(), Joiner::Person(claims), [5; 32]);
            assert_eq!(r.unwrap_err().code, code);
            assert!(fx.writes.is_empty());
            assert_eq!(fx.audit.len(), 1);
        }
    }

    #[test]
    fn host_only_actions() {
        let mut c = core();
        let host = join(&mut c, "ada", Role::Host, 1);
        let p = join(&mut c, "bob", Role::Participant, 2);
        let (r, fx) = c.invite(1000, &m(), &session(&p), ConnectorKind::Recording, None);
        assert_eq!(r.unwrap_err().code, "not_host");
        assert!(fx.writes.is_empty());
        let (r, fx) = c.remove(1000, &m(), &session(&p), host.participant);
        assert_eq!(r.unwrap_err().code, "not_host");
        assert!(fx.writes.is_empty());
        let (r, _) = c.remove(1000, &m(), &session(&host), p.participant);
        assert_eq!(r.unwrap(), 3, "epoch 2 came with bob's join");
    }

    #[test]
    fn a_phone_leg_is_in_the_roster_by_its_display_name_and_role() {
        let mut c = core();
        let host = join(&mut c, "ada", Role::Host, 1);
        let (r, _) = c.invite(1000, &m(), &session(&host), ConnectorKind::Telephony, None);
        let (inv, _) = r.unwrap();
        let joiner = Joiner::Connector {
            identity: "conclave://ns/connector/phones/phones-0".into(),
            kind: ConnectorKind::Telephony,
            invitation: inv.id,
            display_name: Some("Phone …4567".into()),
        };
        let g = c.join(1000, &m(), joiner, [7; 32]).0.unwrap();
        let roster = g
            .roster
            .signed()
            .verify(&c.signing_key().verifying_key())
            .unwrap();
        let member = roster
            .members
            .iter()
            .find(|x| x.participant == g.participant)
            .unwrap();
        assert_eq!(
            (member.name.as_str(), member.role.to_string().as_str()),
            ("Phone …4567", "connector:telephony")
        );
    }

    #[test]
    fn invitation_is_in_the_roster_at_once_and_only_the_invited_kind_joins_once() {
        let mut c = core();
        let host = join(&mut c, "ada", Role::Host, 1);
        let (r, _) = c.invite(1000, &m(), &session(&host), ConnectorKind::Recording, None);
        let (inv, roster) = r.unwrap();
        let roster = roster
            .signed()
            .verify(&c.signing_key().verifying_key())
            .unwrap();
        assert_eq!(roster.invitations, vec![inv.clone()]);
        assert_eq!(c.assignments(ConnectorKind::Recording).len(), 1);
        assert!(c.assignments(ConnectorKind::Telephony).is_empty());
        let connector = |kind, invitation| Joiner::Connector {
            identity: "conclave://ns/connector/rec/rec-0".into(),
            kind,
            invitation,
            display_name: None,
        };
        // Wrong kind, wrong invitation: refused and audited.
        for j in [
            connector(ConnectorKind::Telephony, inv.id),
            connector(ConnectorKind::Recording, 99),
        ] {
            let (r, fx) = c.join(1000, &m(), j, [7; 32]);
            assert_eq!(r.unwrap_err().code, "not_invited");
            assert!(fx.writes.is_empty());
            assert_eq!(fx.audit[0].kind, AuditKind::Denial);
        }
        let (r, _) = c.join(
            1000,
            &m(),
            connector(ConnectorKind::Recording, inv.id),
            [7; 32],
        );
        let g = r.unwrap();
        let roster = g
            .roster
            .signed()
            .verify(&c.signing_key().verifying_key())
            .unwrap();
        let member = roster
            .members
            .iter()
            .find(|x| x.participant == g.participant)
            .unwrap();
        assert_eq!(member.role.to_string(), "connector:recording");
        assert_eq!(member.name, "recording", "without a display name, the kind");
        assert_eq!(roster.invitations[0].participant, Some(g.participant));
        assert!(c.assignments(ConnectorKind::Recording).is_empty());
        // The same invitation cannot be used twice.
        let (r, _) = c.join(
            1000,
            &m(),
            connector(ConnectorKind::Recording, inv.id),
            [8; 32],
        );
        assert_eq!(r.unwrap_err().code, "not_invited");
        // The recorder can create a recording key; the host cannot; readers can unwrap.
        let (r, _) = c.create_recording_key(1000, "conclave://ns/connector/rec/rec-0", &m());
        let (id, key) = r.unwrap();
        let (r, _) = c.create_recording_key(1000, "token:portal:ada", &m());
        assert_eq!(r.unwrap_err().code, "not_recording_connector");
        let (r, _) = c.recording_key(
            &id,
            &Reader::Token(claims("auditor", Role::Participant, 40)),
        );
        assert_eq!(r.unwrap().1.expose(), key.expose());
        let (r, fx) = c.recording_key(&id, &Reader::Token(claims("bob", Role::Participant, 41)));
        assert_eq!(r.unwrap_err().code, "not_a_reader");
        assert_eq!(fx.audit[0].kind, AuditKind::Denial);
    }

    #[test]
    fn a_connector_reports_an_outcome_the_host_sees_and_nobody_else_may() {
        use meeting_proto::kms_api::{InvitationOutcome, OutcomeState};
        let mut c = core();
        let vk = c.signing_key().verifying_key();
        let host = join(&mut c, "ada", Role::Host, 1);
        let (r, _) = c.invite(
            1000,
            &m(),
            &session(&host),
            ConnectorKind::Telephony,
            Some("sip:+15551234567@pbx.example.com".into()),
        );
        let (inv, roster) = r.unwrap();
        let before = roster.signed().verify(&vk).unwrap().version;
        let (r, _) = c.invite(1000, &m(), &session(&host), ConnectorKind::Recording, None);
        let (rec_inv, _) = r.unwrap();
        let phones = "conclave://ns/connector/phones/phones-0";
        let busy = InvitationOutcome::new(OutcomeState::Failed, "busy", Some(486), "Busy Here");
        // Refusals change nothing and are audited as denials.
        let refusals = [
            (
                ConnectorKind::Telephony,
                m(),
                99,
                busy.clone(),
                404,
                "unknown_invitation",
            ),
            (
                ConnectorKind::Telephony,
                MeetingId::new("elsewhere").unwrap(),
                inv.id,
                busy.clone(),
                404,
                "unknown_invitation",
            ),
            (
                ConnectorKind::LiveStreaming,
                m(),
                inv.id,
                busy.clone(),
                403,
                "wrong_kind",
            ),
            (
                ConnectorKind::Telephony,
                m(),
                rec_inv.id,
                busy.clone(),
                403,
                "wrong_kind",
            ),
            (
                ConnectorKind::Telephony,
                m(),
                inv.id,
                InvitationOutcome {
                    message: "line\nbreak".into(),
                    ..busy.clone()
                },
                400,
                "bad_outcome",
            ),
            (
                ConnectorKind::Telephony,
                m(),
                inv.id,
                InvitationOutcome {
                    code: "x".repeat(1000),
                    ..busy.clone()
                },
                400,
                "bad_outcome",
            ),
        ];
        for (kind, meeting, id, outcome, status, code) in refusals {
            let (r, fx) = c.report_outcome(1000, phones, kind, &meeting, id, outcome);
            let d = r.unwrap_err();
            assert_eq!((d.status, d.code), (status, code), "{}", d.message);
            assert!(fx.writes.is_empty() && fx.changed.is_empty());
            assert_eq!(fx.audit[0].kind, AuditKind::Denial);
        }
        assert_eq!(c.assignments(ConnectorKind::Telephony).len(), 1);

        let (r, fx) = c.report_outcome(
            2000,
            phones,
            ConnectorKind::Telephony,
            &m(),
            inv.id,
            busy.clone(),
        );
        let reported = r.unwrap();
        assert_eq!(reported.outcome.as_ref(), Some(&busy));
        assert_eq!(fx.changed, vec![m()], "the host's long poll wakes");
        assert_eq!(fx.writes.len(), 1);
        assert_eq!(fx.audit[0].kind, AuditKind::Invitation);
        assert_eq!(
            fx.audit[0].detail,
            "connector:telephony invitation 1 failed: busy (486): Busy Here"
        );
        let Write::Meeting(_, record) = &fx.writes[0] else {
            panic!("a meeting write")
        };
        let record: MeetingRecord = serde_json::from_slice(record).unwrap();
        assert!(record.targets.is_empty(), "the dial target is dropped");
        assert!(
            !String::from_utf8_lossy(&serde_json::to_vec(&record).unwrap()).contains("5551234567")
        );
        // Not offered any more, and nobody can join with it.
        assert!(c.assignments(ConnectorKind::Telephony).is_empty());
        let (r, _) = c.join(
            2000,
            &m(),
            Joiner::Connector {
                identity: phones.into(),
                kind: ConnectorKind::Telephony,
                invitation: inv.id,
                display_name: None,
            },
            [9; 32],
        );
        assert_eq!(r.unwrap_err().code, "not_invited");
        // The host's next event is the roster showing the outcome.
        let (r, _) = c.events(2000, &m(), &session(&host), before + 1);
        let roster = r
            .unwrap()
            .unwrap()
            .roster
            .unwrap()
            .signed()
            .verify(&vk)
            .unwrap();
        let shown = roster.invitations.iter().find(|i| i.id == inv.id).unwrap();
        assert_eq!(shown.outcome.as_ref(), Some(&busy));
        // The first outcome stands.
        let again = InvitationOutcome::new(OutcomeState::Failed, "rejected", Some(603), "");
        let (r, fx) = c.report_outcome(3000, phones, ConnectorKind::Telephony, &m(), inv.id, again);
        assert_eq!(r.unwrap_err().code, "outcome_reported");
        assert_eq!(fx.audit[0].kind, AuditKind::Denial);

        // A claimed invitation: only the connector that claimed it reports its end.
        let (r, _) = c.invite(3000, &m(), &session(&host), ConnectorKind::Recording, None);
        let (claimed, _) = r.unwrap();
        let recorder = "conclave://ns/connector/rec/rec-0";
        let (r, _) = c.join(
            3000,
            &m(),
            Joiner::Connector {
                identity: recorder.into(),
                kind: ConnectorKind::Recording,
                invitation: claimed.id,
                display_name: None,
            },
            [10; 32],
        );
        let g = r.unwrap();
        let stopped = InvitationOutcome::new(OutcomeState::Ended, "stopped", None, "");
        let (r, _) = c.report_outcome(
            4000,
            "conclave://ns/connector/rec/rec-1",
            ConnectorKind::Recording,
            &m(),
            claimed.id,
            stopped.clone(),
        );
        assert_eq!(r.unwrap_err().code, "claimed_by_other");
        let (r, fx) = c.report_outcome(
            4000,
            recorder,
            ConnectorKind::Recording,
            &m(),
            claimed.id,
            stopped,
        );
        assert_eq!(r.unwrap().participant, Some(g.participant));
        assert_eq!(fx.audit[0].participant, Some(g.participant));
        assert_eq!(
            fx.audit[0].detail,
            format!(
                "connector:recording invitation {} ended: stopped",
                claimed.id
            )
        );
    }

    #[test]
    fn invitation_targets_reach_the_assignment_and_bad_ones_change_nothing() {
        let mut c = core();
        let host = join(&mut c, "ada", Role::Host, 1);
        let stream = "rtmps://live.example.com:443/app/sk-live-SECRET";
        let (r, fx) = c.invite(
            1000,
            &m(),
            &session(&host),
            ConnectorKind::LiveStreaming,
            Some(stream.into()),
        );
        let (inv, roster) = r.unwrap();
        // Members see the invitation, not the stream key.
        assert!(!roster.signed().roster_json.contains("SECRET"));
        let audited = &fx.audit[0];
        assert_eq!(audited.kind, AuditKind::Invitation);
        assert_eq!(
            audited.detail,
            "invited connector:liveStreaming to rtmps://live.example.com"
        );
        let (r, fx) = c.invite(
            1000,
            &m(),
            &session(&host),
            ConnectorKind::Telephony,
            Some("+15551234567".into()),
        );
        let (phone_inv, _) = r.unwrap();
        assert_eq!(
            fx.audit[0].detail,
            "invited connector:telephony to a phone number"
        );
        let live = c.assignments(ConnectorKind::LiveStreaming);
        assert_eq!(live[0].invitation, inv.id);
        assert_eq!(live[0].target.as_deref(), Some(stream));
        let phone = c.assignments(ConnectorKind::Telephony);
        assert_eq!(phone[0].target.as_deref(), Some("+15551234567"));
        // Without a target the pool's own default applies.
        let (r, _) = c.invite(1000, &m(), &session(&host), ConnectorKind::Recording, None);
        r.unwrap();
        assert_eq!(c.assignments(ConnectorKind::Recording)[0].target, None);

        let version = c.meetings[&m()].record.version;
        let bad = [
            (
                ConnectorKind::Recording,
                "rtmp://h/k-SECRET",
                "target_not_allowed",
            ),
            (
                ConnectorKind::LiveStreaming,
                "http://h/k-SECRET",
                "bad_target",
            ),
            (
                ConnectorKind::LiveStreaming,
                "rtmp://h/k-SECRET\r\n",
                "bad_target",
            ),
            (ConnectorKind::Telephony, "+1555-SECRET", "bad_target"),
            (ConnectorKind::Telephony, "tel:SECRET", "bad_target"),
        ];
        let long = format!("rtmp://h/SECRET{}", "k".repeat(3000));
        for (kind, target, code) in
            bad.into_iter()
                .chain([(ConnectorKind::LiveStreaming, long.as_str(), "bad_target")])
        {
            let (r, fx) = c.invite(1000, &m(), &session(&host), kind, Some(target.into()));
            let d = r.unwrap_err();
            assert_eq!((d.status, d.code), (400, code), "{target}");
            assert!(fx.writes.is_empty() && fx.changed.is_empty(), "{target}");
            assert_eq!(fx.audit.len(), 1);
            assert_eq!(fx.audit[0].kind, AuditKind::Denial);
            assert!(fx.audit[0].detail.starts_with(code));
            assert!(!fx.audit[0].detail.contains("SECRET"), "{}", d.message);
            assert!(!d.message.contains("SECRET"));
        }
        assert_eq!(c.meetings[&m()].record.version, version);
        assert_eq!(c.assignments(ConnectorKind::LiveStreaming).len(), 1);
        // A join while targets are stored saves the record in place, never as a copy.
        let (r, fx) = c.join(
            1000,
            &m(),
            Joiner::Person(claims("bob", Role::Participant, 2)),
            [2; 32],
        );
        let bob = r.unwrap();
        assert!(
            fx.writes.iter().any(|w| matches!(w, Write::Meeting(..)))
                && !fx
                    .writes
                    .iter()
                    .any(|w| matches!(w, Write::MeetingAtJoin(..))),
            "{:?}",
            fx.writes
        );
        // A participant is refused as not_host before the target is looked at.
        let (r, _) = c.invite(
            1000,
            &m(),
            &session(&bob),
            ConnectorKind::Recording,
            Some("x".into()),
        );
        assert_eq!(r.unwrap_err().code, "not_host");
        // Claiming an invitation drops its target from the record saved in place: the
        // stream key first, then the last target, which leaves none to keep it in place.
        let mut claim = |kind: ConnectorKind, invitation: u64, nonce: u8| {
            let (r, fx) = c.join(
                1000,
                &m(),
                Joiner::Connector {
                    identity: format!("conclave://ns/connector/{kind}/c-{nonce}"),
                    kind,
                    invitation,
                    display_name: None,
                },
                [nonce; 32],
            );
            r.unwrap();
            match fx.writes.iter().find(|w| matches!(w, Write::Meeting(..))) {
                Some(Write::Meeting(_, saved)) => String::from_utf8_lossy(saved).into_owned(),
                _ => panic!("saved in place: {:?}", fx.writes),
            }
        };
        assert!(!claim(ConnectorKind::LiveStreaming, inv.id, 9).contains("SECRET"));
        assert!(!claim(ConnectorKind::Telephony, phone_inv.id, 10).contains("5551234567"));
        let record = &c.meetings[&m()].record;
        assert!(record.targets.is_empty());
        assert!(!format!("{record:?}").contains("SECRET"));
        assert!(!String::from_utf8_lossy(&json(record)).contains("SECRET"));
    }

    #[test]
    fn interval_rotation_and_relay_failover() {
        let mut c = core();
        let a = join(&mut c, "ada", Role::Host, 1);
        let fx = c.tick(30 * MIN);
        assert!(fx.audit.iter().all(|x| x.kind != AuditKind::EpochChange));
        let fx = c.tick(61 * MIN);
        assert!(fx.audit.iter().any(|x| x.kind == AuditKind::EpochChange));
        // The relay went silent long ago; a new one registers; the next poll re-places.
        register(&mut c, 61 * MIN, "z/r1", 4001, Some("i1"));
        let (r, _) = c.events(61 * MIN + 1, &m(), &session(&a), 0);
        let g = r.unwrap().unwrap();
        assert_eq!(g.placement.unwrap().0.relay, "z/r1");
        assert_eq!(g.release.unwrap().epoch, 2);
    }

    /// The same state read back the way a restarted KMS reads its store;
    /// relays are not stored, so it knows none.
    fn restarted(c: &Core) -> Core {
        let (keys, _) = KeyRing::open(
            RootKey::from_bytes(&[1; 32]).unwrap(),
            None,
            c.keys().keks().cloned().collect(),
        )
        .unwrap();
        let mut loaded = Loaded::default();
        for m in c.meetings.values() {
            loaded
                .meetings
                .push(serde_json::from_slice(&json(&m.record)).unwrap());
            for member in m.members.values() {
                loaded.members.push((m.record.id.clone(), member.clone()));
            }
        }
        Core::new(c.config.clone(), keys, c.signing.clone(), loaded).unwrap()
    }

    #[test]
    fn a_relay_restarted_as_a_new_process_gets_its_meetings_placed_again() {
        let mut c = core();
        let a = join(&mut c, "ada", Role::Host, 1);
        let placed = c.meetings[&m()].record.clone();
        assert_eq!(placed.relay_instance.as_deref(), Some("i0"));
        // The same process registering again moves nothing.
        let fx = register(&mut c, 2000, "z/r0", 4000, Some("i0"));
        assert!(fx.changed.is_empty() && fx.writes.is_empty());
        assert_eq!(fx.audit.len(), 1);
        // A new process under the same id, well within the heartbeat
        // timeout, at a new address: the meeting is placed again at once.
        let fx = register(&mut c, 3000, "z/r0", 4002, Some("i1"));
        assert_eq!(fx.changed, vec![m()]);
        assert!(
            fx.writes
                .iter()
                .any(|w| matches!(w, Write::Meeting(id, _) if *id == m()))
        );
        let moved = &fx.audit[1];
        assert_eq!(
            (moved.kind, moved.meeting.as_ref()),
            (AuditKind::Relay, Some(&m()))
        );
        assert_eq!(
            moved.detail,
            "relay z/r0 restarted as instance i1: meeting placed again on relay z/r0"
        );
        let record = &c.meetings[&m()].record;
        assert_eq!(record.version, placed.version + 1);
        assert_eq!(record.relay_instance.as_deref(), Some("i1"));
        // The member's (woken) poll returns the new placement, no new key.
        let (r, _) = c.events(3001, &m(), &session(&a), placed.version);
        let g = r.unwrap().unwrap();
        assert_eq!(g.placement.unwrap().0.address, "127.0.0.1:4002");
        assert!(g.release.is_none());
        // A meeting nobody is in is left alone (its next join places it).
        let (r, _) = c.leave(4000, &m(), &session(&a));
        r.unwrap();
        let fx = register(&mut c, 5000, "z/r0", 4003, Some("i2"));
        assert!(fx.changed.is_empty() && fx.writes.is_empty());
        // A malformed instance is refused, audited, and registers nothing.
        for bad in ["", "a b", &"x".repeat(MAX_RELAY_INSTANCE_LEN + 1)] {
            let req = RelayRegisterRequest {
                zone: "z".into(),
                address: "127.0.0.1:4009".into(),
                capacity: 100,
                instance: Some(bad.to_owned()),
            };
            let (r, fx) = c.register_relay(6000, "z/r9".into(), req, "relay");
            assert_eq!(r.unwrap_err().code, "bad_instance");
            assert_eq!(fx.audit[0].kind, AuditKind::Denial);
            assert!(c.relays.get("z/r9").is_none());
        }
    }

    #[test]
    fn a_draining_relay_hands_its_meetings_to_another_while_it_still_forwards() {
        let mut c = core();
        let a = join(&mut c, "ada", Role::Host, 1);
        let placed = c.meetings[&m()].record.clone();
        assert_eq!(placed.relay.as_deref(), Some("z/r0"));
        // The only relay drains: nowhere to go, the meeting stays.
        let (n, fx) = c.heartbeat(1000, "z/r0", 1, false, "relay");
        assert_eq!(n, Some(1));
        assert!(fx.changed.is_empty() && fx.writes.is_empty() && fx.audit.is_empty());
        // With a second relay, the next draining heartbeat moves it there.
        register(&mut c, 1500, "z/r1", 4001, Some("j0"));
        let (n, fx) = c.heartbeat(2000, "z/r0", 1, false, "relay");
        assert_eq!(n, Some(0));
        assert_eq!(fx.changed, vec![m()]);
        assert_eq!(
            fx.audit[0].detail,
            "relay z/r0 is draining: meeting placed again on relay z/r1"
        );
        let record = &c.meetings[&m()].record;
        assert_eq!(record.version, placed.version + 1);
        assert_eq!(record.relay_instance.as_deref(), Some("j0"));
        let (r, _) = c.events(2001, &m(), &session(&a), placed.version);
        assert_eq!(r.unwrap().unwrap().placement.unwrap().0.relay, "z/r1");
        // Ready heartbeats and an unknown relay change nothing.
        let (_, fx) = c.heartbeat(2500, "z/r1", 1, true, "relay");
        assert!(fx.changed.is_empty() && fx.audit.is_empty());
        assert_eq!(c.heartbeat(2600, "z/r9", 0, false, "relay").0, None);
    }

    #[test]
    fn a_kms_restart_moves_nothing_and_records_without_an_instance_are_trusted() {
        let mut c = core();
        let a = join(&mut c, "ada", Role::Host, 1);
        let version = c.meetings[&m()].record.version;
        // The KMS restarts; the same relay process registers again.
        let mut c = restarted(&c);
        assert_eq!(
            c.meetings[&m()].record.relay_instance.as_deref(),
            Some("i0")
        );
        let fx = register(&mut c, 2000, "z/r0", 4000, Some("i0"));
        assert!(fx.changed.is_empty() && fx.writes.is_empty());
        let (r, fx) = c.events(2001, &m(), &session(&a), version);
        assert!(r.unwrap().is_none());
        assert!(fx.writes.is_empty());

        // A record stored before relays sent an instance: the live relay is
        // trusted (no move) and its instance remembered from then on.
        c.meetings.get_mut(&m()).unwrap().record.relay_instance = None;
        let mut c = restarted(&c);
        assert_eq!(c.meetings[&m()].record.relay_instance, None);
        let fx = register(&mut c, 3000, "z/r0", 4000, Some("i1"));
        assert!(fx.changed.is_empty() && fx.writes.is_empty());
        let (r, _) = c.events(3001, &m(), &session(&a), version);
        assert!(r.unwrap().is_none());
        let b = join(&mut c, "bob", Role::Participant, 2);
        assert_eq!(b.placement.relay, "z/r0");
        assert_eq!(
            c.meetings[&m()].record.relay_instance.as_deref(),
            Some("i1")
        );
        // From then on its restart is noticed.
        let fx = register(&mut c, 4000, "z/r0", 4000, Some("i2"));
        assert_eq!(fx.changed, vec![m()]);
    }

    #[test]
    fn kek_schedule_rotates_and_retiring_rewraps_first() {
        let mut c = core_with(10 * MIN, 20 * MIN);
        let host = join(&mut c, "ada", Role::Host, 1);
        let (r, _) = c.invite(1000, &m(), &session(&host), ConnectorKind::Recording, None);
        let inv = r.unwrap().0;
        let rec = "conclave://ns/connector/rec/rec-0";
        let joiner = Joiner::Connector {
            identity: rec.into(),
            kind: ConnectorKind::Recording,
            invitation: inv.id,
            display_name: None,
        };
        c.join(1000, &m(), joiner, [7; 32]).0.unwrap();
        let (r, _) = c.create_recording_key(1000, rec, &m());
        let (id, key) = r.unwrap();
        // Due after 10 minutes: version 2 becomes current, version 1 stays for unwrapping.
        let fx = c.tick(11 * MIN);
        assert_eq!(c.keys().current_version(), Some(2));
        assert!(
            fx.audit
                .iter()
                .any(|a| a.detail.contains("KEK rotated to version 2"))
        );
        assert!(c.keys().kek(1).is_some());
        // 20 minutes after being superseded, version 1 is retired, after
        // everything it protected was re-wrapped under a current version.
        let fx = c.tick(32 * MIN);
        assert!(c.keys().kek(1).is_none());
        assert!(
            fx.writes
                .iter()
                .any(|w| matches!(w, Write::Recording(i, _) if *i == id))
        );
        assert!(fx.writes.iter().any(|w| matches!(w, Write::Meeting(..))));
        assert!(fx.audit.iter().any(|a| a.detail == "KEK version 1 retired"));
        let reader = Reader::Token(claims("auditor", Role::Participant, 50));
        let (r, _) = c.recording_key(&id, &reader);
        assert_eq!(r.unwrap().1.expose(), key.expose());
        // The meeting still works: the next epoch key is released as usual.
        let (r, _) = c.leave(33 * MIN, &m(), &session(&host));
        assert!(r.unwrap() >= 2);
    }

    #[test]
    fn no_relay_means_nothing_is_created() {
        let mut c = core();
        let (r, fx) = c.join(
            60 * MIN,
            &m(),
            Joiner::Person(claims("ada", Role::Host, 1)),
            [1; 32],
        );
        assert_eq!(r.unwrap_err().code, "no_relay");
        assert!(fx.writes.is_empty());
        assert_eq!(c.active_meetings(), 0);
    }
}
