//! Durable state in one redb file on the data volume.
//!
//! Every commit is a redb write transaction with `Durability::Immediate`
//! (fsync before `commit` returns), so anything acknowledged survives kill -9.
//! Audit entries are chained and written in the same transaction as the
//! state change they describe, together with the chain head.
//!
//! [`Committer`] runs the writes on one thread and groups whatever is queued
//! into one transaction (group commit): one fsync for many requests.
//!
//! The file's growth is reserved as it grows (`reserved_file`): a commit
//! writing into a hole would make its fsync commit the filesystem's journal.

mod reserved_file;

use crate::audit::{self, AuditRecord, Checkpoint, Verifier, VerifyError};
use crate::core::{
    Loaded, MeetingRecord, MemberKey, MemberRecord, RecordingRecord, UsedToken, Write,
};
use crate::keys::StoredKek;
use meeting_proto::ids::MeetingId;
use meeting_proto::kms_api::{AuditEntry, AuditVerifyResponse, Hex};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KEKS: TableDefinition<u32, &[u8]> = TableDefinition::new("keks");
const MEETINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("meetings");
/// Members by (joined ms, meeting, participant): see [`crate::core::MemberKey`]. The KMS reads
/// members only at start, so the store's order is free, and join order keeps a group commit's
/// new members on the table's last pages (redb rewrites, checksums and syncs every page a
/// commit touches).
const MEMBERS: TableDefinition<(u64, &str, u64), &[u8]> = TableDefinition::new("members_by_join");
/// Meetings' records as joins left them, keyed like the members they joined with: see
/// [`crate::core::Write::MeetingAtJoin`].
const MEETINGS_AT_JOIN: TableDefinition<(u64, &str, u64), &[u8]> =
    TableDefinition::new("meetings_by_join");
/// Used join tokens by (expiry, used ms, hash): see [`crate::core::UsedToken`]. Looked up in
/// memory (all are loaded at start), so here too the order only decides which pages a commit
/// dirties.
const TOKENS: TableDefinition<(u64, u64, &[u8]), ()> = TableDefinition::new("used_tokens");
/// Earlier layouts, moved over at open: members by (meeting, participant); tokens by
/// (expiry, hash); before that, tokens by hash.
const MEMBERS_BY_MEETING: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("members");
const TOKENS_BY_EXPIRY: TableDefinition<(u64, &[u8]), ()> =
    TableDefinition::new("tokens_by_expiry");
const TOKENS_BY_HASH: TableDefinition<&[u8], u64> = TableDefinition::new("tokens");
const RECORDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("recordings");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

const ROOT_CHECK: &str = "root_check";
const SIGNING_KEY: &str = "signing_key";
const AUDIT_HEAD: &str = "audit_head";
const AUDIT_BASE: &str = "audit_base";

pub const FILE_NAME: &str = "kms.redb";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Db(String),
    #[error("store record {0} is corrupt")]
    Corrupt(String),
    #[error("store is unavailable after a failed commit; restart to reload")]
    Poisoned,
}

fn dbe<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// The newest audit entry (None before the first).
pub type Head = Option<(u64, [u8; 32])>;

#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
}

/// Key material kept in the store (all wrapped).
#[derive(Debug, Default)]
pub struct StoredKeys {
    pub root_check: Option<Vec<u8>>,
    pub keks: Vec<StoredKek>,
    pub signing_key: Option<Vec<u8>>,
}

/// How many times a stored meeting record was saved ([`MeetingRecord::saves`]).
fn saves(record: &[u8]) -> Result<u64, StoreError> {
    #[derive(serde::Deserialize)]
    struct Saves {
        #[serde(default)]
        saves: u64,
    }
    serde_json::from_slice::<Saves>(record)
        .map(|s| s.saves)
        .map_err(|_| StoreError::Corrupt("meeting".into()))
}

fn member_key(k: &MemberKey) -> (u64, &str, u64) {
    (k.joined_ms, k.meeting.as_str(), k.participant.0)
}

fn token_key(t: &UsedToken) -> (u64, u64, &[u8]) {
    (t.expires_s, t.used_ms, t.hash.as_slice())
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(dbe)?;
        let path = dir.join(FILE_NAME);
        Self::open_file(&path)
    }

    pub fn open_file(path: &Path) -> Result<Self, StoreError> {
        let file = reserved_file::ReservedFile::open(path).map_err(dbe)?;
        let db = Database::builder().create_with_backend(file).map_err(dbe)?;
        let txn = db.begin_write().map_err(dbe)?;
        {
            // Create every table so readers never meet a missing one.
            txn.open_table(META).map_err(dbe)?;
            txn.open_table(KEKS).map_err(dbe)?;
            txn.open_table(MEETINGS).map_err(dbe)?;
            txn.open_table(MEMBERS).map_err(dbe)?;
            txn.open_table(MEETINGS_AT_JOIN).map_err(dbe)?;
            txn.open_table(TOKENS).map_err(dbe)?;
            txn.open_table(RECORDINGS).map_err(dbe)?;
            txn.open_table(AUDIT).map_err(dbe)?;
            // When a token of an earlier layout was used is unknown: 0 sorts it first.
            let mut tokens = txn.open_table(TOKENS).map_err(dbe)?;
            for row in txn
                .open_table(TOKENS_BY_HASH)
                .map_err(dbe)?
                .iter()
                .map_err(dbe)?
            {
                let (k, v) = row.map_err(dbe)?;
                tokens.insert((v.value(), 0, k.value()), ()).map_err(dbe)?;
            }
            for row in txn
                .open_table(TOKENS_BY_EXPIRY)
                .map_err(dbe)?
                .iter()
                .map_err(dbe)?
            {
                let (k, _) = row.map_err(dbe)?;
                let (expires_s, hash) = k.value();
                tokens.insert((expires_s, 0, hash), ()).map_err(dbe)?;
            }
            let mut members = txn.open_table(MEMBERS).map_err(dbe)?;
            for row in txn
                .open_table(MEMBERS_BY_MEETING)
                .map_err(dbe)?
                .iter()
                .map_err(dbe)?
            {
                let (k, v) = row.map_err(dbe)?;
                let (meeting, pid) = k.value();
                let r: MemberRecord = serde_json::from_slice(v.value())
                    .map_err(|_| StoreError::Corrupt(format!("member {meeting}/{pid}")))?;
                members
                    .insert((r.joined_ms, meeting, pid), v.value())
                    .map_err(dbe)?;
            }
        }
        txn.delete_table(TOKENS_BY_HASH).map_err(dbe)?;
        txn.delete_table(TOKENS_BY_EXPIRY).map_err(dbe)?;
        txn.delete_table(MEMBERS_BY_MEETING).map_err(dbe)?;
        txn.commit().map_err(dbe)?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    pub fn size_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    pub fn keys(&self) -> Result<StoredKeys, StoreError> {
        let txn = self.db.begin_read().map_err(dbe)?;
        let meta = txn.open_table(META).map_err(dbe)?;
        let get = |k: &str| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(meta.get(k).map_err(dbe)?.map(|v| v.value().to_vec()))
        };
        let mut keks = Vec::new();
        for row in txn.open_table(KEKS).map_err(dbe)?.iter().map_err(dbe)? {
            let (k, v) = row.map_err(dbe)?;
            keks.push(
                serde_json::from_slice(v.value())
                    .map_err(|_| StoreError::Corrupt(format!("kek {}", k.value())))?,
            );
        }
        Ok(StoredKeys {
            root_check: get(ROOT_CHECK)?,
            keks,
            signing_key: get(SIGNING_KEY)?,
        })
    }

    /// First boot: the root check, first KEK and the signing key.
    pub fn init_keys(
        &self,
        root_check: Option<&[u8]>,
        keks: &[StoredKek],
        signing_key: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(dbe)?;
        txn.set_durability(Durability::Immediate).map_err(dbe)?;
        {
            let mut meta = txn.open_table(META).map_err(dbe)?;
            if let Some(c) = root_check {
                meta.insert(ROOT_CHECK, c).map_err(dbe)?;
            }
            if let Some(s) = signing_key {
                meta.insert(SIGNING_KEY, s).map_err(dbe)?;
            }
            let mut t = txn.open_table(KEKS).map_err(dbe)?;
            for k in keks {
                t.insert(k.version, serde_json::to_vec(k).map_err(dbe)?.as_slice())
                    .map_err(dbe)?;
            }
        }
        txn.commit().map_err(dbe)
    }

    pub fn load(&self) -> Result<Loaded, StoreError> {
        let txn = self.db.begin_read().map_err(dbe)?;
        let mut loaded = Loaded::default();
        let mut meetings = BTreeMap::new();
        let mut keep_newest = |r: MeetingRecord| match meetings.entry(r.id.clone()) {
            Entry::Vacant(e) => {
                e.insert(r);
            }
            Entry::Occupied(mut e) => {
                if r.saves > e.get().saves {
                    e.insert(r);
                }
            }
        };
        for row in txn.open_table(MEETINGS).map_err(dbe)?.iter().map_err(dbe)? {
            let (k, v) = row.map_err(dbe)?;
            keep_newest(
                serde_json::from_slice(v.value())
                    .map_err(|_| StoreError::Corrupt(format!("meeting {}", k.value())))?,
            );
        }
        for row in txn
            .open_table(MEETINGS_AT_JOIN)
            .map_err(dbe)?
            .iter()
            .map_err(dbe)?
        {
            let (k, v) = row.map_err(dbe)?;
            let (_, meeting, pid) = k.value();
            keep_newest(
                serde_json::from_slice(v.value()).map_err(|_| {
                    StoreError::Corrupt(format!("meeting {meeting} at join of {pid}"))
                })?,
            );
        }
        loaded.meetings = meetings.into_values().collect();
        for row in txn.open_table(MEMBERS).map_err(dbe)?.iter().map_err(dbe)? {
            let (k, v) = row.map_err(dbe)?;
            let (_, meeting, pid) = k.value();
            let r: MemberRecord = serde_json::from_slice(v.value())
                .map_err(|_| StoreError::Corrupt(format!("member {meeting}/{pid}")))?;
            let meeting = MeetingId::new(meeting)
                .map_err(|_| StoreError::Corrupt(format!("member {meeting}/{pid}")))?;
            loaded.members.push((meeting, r));
        }
        for row in txn.open_table(TOKENS).map_err(dbe)?.iter().map_err(dbe)? {
            let (k, _) = row.map_err(dbe)?;
            let (expires_s, used_ms, hash) = k.value();
            let hash: [u8; 32] = hash
                .try_into()
                .map_err(|_| StoreError::Corrupt("token".into()))?;
            loaded.tokens.push(UsedToken {
                expires_s,
                used_ms,
                hash,
            });
        }
        for row in txn
            .open_table(RECORDINGS)
            .map_err(dbe)?
            .iter()
            .map_err(dbe)?
        {
            let (k, v) = row.map_err(dbe)?;
            let r: RecordingRecord = serde_json::from_slice(v.value())
                .map_err(|_| StoreError::Corrupt(format!("recording {}", k.value())))?;
            loaded.recordings.push(r);
        }
        Ok(loaded)
    }

    pub fn head(&self) -> Result<Head, StoreError> {
        Self::head_in(&self.db.begin_read().map_err(dbe)?)
    }

    fn head_in(txn: &redb::ReadTransaction) -> Result<Head, StoreError> {
        let meta = txn.open_table(META).map_err(dbe)?;
        let Some(v) = meta.get(AUDIT_HEAD).map_err(dbe)? else {
            return Ok(None);
        };
        let v = v.value();
        if v.len() != 40 {
            return Err(StoreError::Corrupt("audit head".into()));
        }
        Ok(Some((
            u64::from_be_bytes(v[..8].try_into().expect("8")),
            v[8..].try_into().expect("32"),
        )))
    }

    fn base_in(txn: &redb::ReadTransaction) -> Result<Checkpoint, StoreError> {
        let meta = txn.open_table(META).map_err(dbe)?;
        match meta.get(AUDIT_BASE).map_err(dbe)? {
            Some(v) => serde_json::from_slice(v.value())
                .map_err(|_| StoreError::Corrupt("audit base".into())),
            None => Ok(Checkpoint::GENESIS),
        }
    }

    /// Applies writes and appends audit records in one durable transaction.
    /// `head` advances only if the commit succeeds.
    pub fn commit(
        &self,
        writes: &[Write],
        audit: Vec<AuditRecord>,
        head: &mut Head,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(dbe)?;
        txn.set_durability(Durability::Immediate).map_err(dbe)?;
        let mut new_head = *head;
        {
            let mut meetings = txn.open_table(MEETINGS).map_err(dbe)?;
            let mut members = txn.open_table(MEMBERS).map_err(dbe)?;
            let mut meetings_at_join = txn.open_table(MEETINGS_AT_JOIN).map_err(dbe)?;
            let mut tokens = txn.open_table(TOKENS).map_err(dbe)?;
            let mut recordings = txn.open_table(RECORDINGS).map_err(dbe)?;
            let mut keks = txn.open_table(KEKS).map_err(dbe)?;
            for w in writes {
                match w {
                    Write::Meeting(id, rec) => {
                        meetings.insert(id.as_str(), rec.as_slice()).map_err(dbe)?;
                    }
                    Write::MeetingAtJoin(k, rec) => {
                        meetings_at_join
                            .insert(member_key(k), rec.as_slice())
                            .map_err(dbe)?;
                    }
                    Write::Member(k, Some(rec)) => {
                        members.insert(member_key(k), rec.as_slice()).map_err(dbe)?;
                    }
                    Write::Member(k, None) => {
                        members.remove(member_key(k)).map_err(dbe)?;
                        let copy = meetings_at_join
                            .remove(member_key(k))
                            .map_err(dbe)?
                            .map(|v| v.value().to_vec());
                        // The copy may be the meeting's newest record: then it moves in place.
                        if let Some(copy) = copy {
                            let in_place = meetings
                                .get(k.meeting.as_str())
                                .map_err(dbe)?
                                .map(|v| saves(v.value()))
                                .transpose()?;
                            let newer = saves(&copy)?;
                            if in_place.is_none_or(|n| newer > n) {
                                meetings
                                    .insert(k.meeting.as_str(), copy.as_slice())
                                    .map_err(dbe)?;
                            }
                        }
                    }
                    Write::Token(t) => {
                        tokens.insert(token_key(t), ()).map_err(dbe)?;
                    }
                    Write::ForgetToken(t) => {
                        tokens.remove(token_key(t)).map_err(dbe)?;
                    }
                    Write::Recording(id, rec) => {
                        recordings
                            .insert(id.as_str(), rec.as_slice())
                            .map_err(dbe)?;
                    }
                    Write::Kek(k) => {
                        keks.insert(k.version, serde_json::to_vec(k).map_err(dbe)?.as_slice())
                            .map_err(dbe)?;
                    }
                }
            }
            if !audit.is_empty() {
                let mut table = txn.open_table(AUDIT).map_err(dbe)?;
                let (mut seq, mut prev) = match new_head {
                    Some((s, h)) => (s + 1, h),
                    None => (0, [0; 32]),
                };
                for rec in audit {
                    let entry = audit::chain(prev, seq, now_ms, rec);
                    table
                        .insert(seq, serde_json::to_vec(&entry).map_err(dbe)?.as_slice())
                        .map_err(dbe)?;
                    prev = entry.hash.array().expect("32-byte hash");
                    new_head = Some((seq, prev));
                    seq += 1;
                }
                let (s, h) = new_head.expect("at least one entry");
                let mut v = s.to_be_bytes().to_vec();
                v.extend_from_slice(&h);
                txn.open_table(META)
                    .map_err(dbe)?
                    .insert(AUDIT_HEAD, v.as_slice())
                    .map_err(dbe)?;
            }
        }
        txn.commit().map_err(dbe)?;
        *head = new_head;
        Ok(())
    }

    /// Entries from `from` on, at most `limit`.
    pub fn audit_page(&self, from: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let txn = self.db.begin_read().map_err(dbe)?;
        let table = txn.open_table(AUDIT).map_err(dbe)?;
        let mut out = Vec::new();
        for row in table.range(from..).map_err(dbe)?.take(limit) {
            let (k, v) = row.map_err(dbe)?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|_| StoreError::Corrupt(format!("audit {}", k.value())))?,
            );
        }
        Ok(out)
    }

    /// Walks the whole chain from its checkpoint and checks it against the head.
    pub fn verify_audit(&self) -> Result<AuditVerifyResponse, StoreError> {
        // One snapshot for base, head and entries: on a serving KMS, commits
        // in between would otherwise look like a truncated chain.
        let txn = self.db.begin_read().map_err(dbe)?;
        let base = Self::base_in(&txn)?;
        let head = Self::head_in(&txn)?;
        let table = txn.open_table(AUDIT).map_err(dbe)?;
        let mut v = Verifier::new(base);
        let mut checked = 0u64;
        let mut result: Result<(), VerifyError> = Ok(());
        for row in table.iter().map_err(dbe)? {
            let (k, val) = row.map_err(dbe)?;
            let key = k.value();
            let step = match serde_json::from_slice::<AuditEntry>(val.value()) {
                Ok(entry) => v.push(key, &entry),
                Err(_) => Err(VerifyError::Unreadable(key)),
            };
            if let Err(e) = step {
                result = Err(e);
                break;
            }
            checked += 1;
        }
        let (ok, error, head_hash) = match result.and_then(|()| v.finish(head)) {
            Ok((_, hash)) => (true, None, hash),
            Err(e) => (
                false,
                Some(e.to_string()),
                head.map(|h| h.1).unwrap_or_default(),
            ),
        };
        Ok(AuditVerifyResponse {
            ok,
            entries: checked,
            head_seq: head.map(|h| h.0),
            head_hash: Hex(head_hash.to_vec()),
            error,
        })
    }

    /// Drops audit entries older than `before_ms`, keeping a checkpoint so
    /// the rest still verifies. Returns how many were dropped.
    pub fn prune_audit(&self, before_ms: u64) -> Result<u64, StoreError> {
        let mut txn = self.db.begin_write().map_err(dbe)?;
        txn.set_durability(Durability::Immediate).map_err(dbe)?;
        let mut dropped = 0;
        {
            let mut table = txn.open_table(AUDIT).map_err(dbe)?;
            let mut last: Option<AuditEntry> = None;
            let mut keys = Vec::new();
            for row in table.iter().map_err(dbe)? {
                let (k, v) = row.map_err(dbe)?;
                let e: AuditEntry = serde_json::from_slice(v.value())
                    .map_err(|_| StoreError::Corrupt(format!("audit {}", k.value())))?;
                if e.time_ms >= before_ms {
                    break;
                }
                keys.push(k.value());
                last = Some(e);
            }
            // Never drop the newest entry: the head must stay checkable.
            if let Some(last) = last
                && Some(last.seq) != self.head()?.map(|h| h.0)
            {
                for k in &keys {
                    table.remove(*k).map_err(dbe)?;
                }
                dropped = keys.len() as u64;
                let cp = Checkpoint {
                    next_seq: last.seq + 1,
                    hash: last
                        .hash
                        .array()
                        .ok_or_else(|| StoreError::Corrupt("audit".into()))?,
                };
                txn.open_table(META)
                    .map_err(dbe)?
                    .insert(AUDIT_BASE, serde_json::to_vec(&cp).map_err(dbe)?.as_slice())
                    .map_err(dbe)?;
            }
        }
        txn.commit().map_err(dbe)?;
        Ok(dropped)
    }

    /// Copies every table into a new store file (a backup: wrapped keys only).
    pub fn copy_to(&self, dest: &Path) -> Result<(), StoreError> {
        if dest.exists() {
            return Err(StoreError::Db(format!("{} already exists", dest.display())));
        }
        let out = Store::open_file(dest)?;
        let src = self.db.begin_read().map_err(dbe)?;
        let mut txn = out.db.begin_write().map_err(dbe)?;
        txn.set_durability(Durability::Immediate).map_err(dbe)?;
        {
            macro_rules! copy {
                ($def:expr) => {{
                    let from = src.open_table($def).map_err(dbe)?;
                    let mut to = txn.open_table($def).map_err(dbe)?;
                    for row in from.iter().map_err(dbe)? {
                        let (k, v) = row.map_err(dbe)?;
                        to.insert(k.value(), v.value()).map_err(dbe)?;
                    }
                }};
            }
            copy!(META);
            copy!(KEKS);
            copy!(MEETINGS);
            copy!(MEMBERS);
            copy!(MEETINGS_AT_JOIN);
            copy!(TOKENS);
            copy!(RECORDINGS);
            copy!(AUDIT);
        }
        txn.commit().map_err(dbe)
    }

    /// Test and tooling hook: rewrites one audit entry's stored bytes.
    pub fn overwrite_audit_raw(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(dbe)?;
        txn.open_table(AUDIT)
            .map_err(dbe)?
            .insert(seq, bytes)
            .map_err(dbe)?;
        txn.commit().map_err(dbe)
    }

    /// Test and tooling hook: deletes one audit entry.
    pub fn delete_audit_raw(&self, seq: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(dbe)?;
        txn.open_table(AUDIT)
            .map_err(dbe)?
            .remove(seq)
            .map_err(dbe)?;
        txn.commit().map_err(dbe)
    }
}

/// One request's effects waiting for durability.
struct Job {
    writes: Vec<Write>,
    audit: Vec<AuditRecord>,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// Called after each transaction with (requests in it, audit entries, time taken).
pub type CommitObserver = Box<dyn Fn(usize, usize, Duration) + Send>;

/// The single writer. Cloneable handle; jobs are committed in send order.
#[derive(Clone, Debug)]
pub struct Committer {
    tx: std::sync::mpsc::Sender<Job>,
    poisoned: Arc<AtomicBool>,
}

/// How the committer groups queued requests into one transaction.
#[derive(Clone, Copy, Debug)]
pub struct Grouping {
    /// Most audit entries per transaction (1 = one fsync per request: the
    /// benchmark baseline).
    pub max_entries: usize,
    /// How long to wait for more requests after the first, when the KMS is
    /// busy (the last transaction carried at least [`BUSY_REQUESTS`]).
    pub linger: Duration,
}

/// Requests in one transaction from which the committer lingers before the
/// next: fewer mean the requests arrive slower than a commit takes, and an
/// idle KMS answers a lone request without waiting.
pub const BUSY_REQUESTS: usize = 4;

impl Committer {
    /// Starts the writer thread.
    ///
    /// A transaction's CPU is mostly per transaction, not per request (redb
    /// rewrites, checksums and syncs each touched page, and the B-tree paths
    /// above them, once per commit), so under load waiting a moment for more
    /// requests to share it leaves more CPU for answering them.
    pub fn start(
        store: Arc<Store>,
        grouping: Grouping,
        clock: fn() -> u64,
        observe: CommitObserver,
    ) -> Result<Self, StoreError> {
        let mut head = store.head()?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let poisoned = Arc::new(AtomicBool::new(false));
        let flag = poisoned.clone();
        std::thread::Builder::new()
            .name("kms-committer".into())
            .spawn(move || {
                let mut busy = false;
                while let Ok(first) = rx.recv() {
                    let linger_until = busy.then(|| Instant::now() + grouping.linger);
                    let mut batch = vec![first];
                    let mut entries = batch[0].audit.len();
                    while entries < grouping.max_entries {
                        let next = match linger_until {
                            Some(until) => rx
                                .recv_timeout(until.saturating_duration_since(Instant::now()))
                                .ok(),
                            None => rx.try_recv().ok(),
                        };
                        let Some(job) = next else { break };
                        entries += job.audit.len();
                        batch.push(job);
                    }
                    busy = batch.len() >= BUSY_REQUESTS;
                    if flag.load(Ordering::Acquire) {
                        for job in batch {
                            let _ = job.done.send(Err(StoreError::Poisoned));
                        }
                        continue;
                    }
                    let started = Instant::now();
                    let mut writes = Vec::new();
                    let mut audit = Vec::new();
                    let mut replies = Vec::with_capacity(batch.len());
                    for job in batch {
                        writes.extend(job.writes);
                        audit.extend(job.audit);
                        replies.push(job.done);
                    }
                    let result = store.commit(&writes, audit, &mut head, clock());
                    observe(replies.len(), entries, started.elapsed());
                    match result {
                        Ok(()) => {
                            for r in replies {
                                let _ = r.send(Ok(()));
                            }
                        }
                        Err(e) => {
                            // Memory is now ahead of the store: refuse everything
                            // until a restart reloads the truth from disk.
                            tracing::error!(error = %e, "commit failed; refusing further writes");
                            flag.store(true, Ordering::Release);
                            for r in replies {
                                let _ = r.send(Err(StoreError::Db(e.to_string())));
                            }
                        }
                    }
                }
            })
            .map_err(dbe)?;
        Ok(Self { tx, poisoned })
    }

    /// Queues effects; the receiver resolves once they are durable.
    /// Call while still holding the lock that produced them, so the commit
    /// order is the order of the state changes.
    pub fn submit(
        &self,
        writes: Vec<Write>,
        audit: Vec<AuditRecord>,
    ) -> tokio::sync::oneshot::Receiver<Result<(), StoreError>> {
        let (done, rx) = tokio::sync::oneshot::channel();
        if writes.is_empty() && audit.is_empty() {
            let _ = done.send(Ok(()));
        } else if let Err(e) = self.tx.send(Job {
            writes,
            audit,
            done,
        }) {
            let _ = e.0.done.send(Err(StoreError::Poisoned));
        }
        rx
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meeting_proto::ids::ParticipantId;
    use meeting_proto::kms_api::AuditKind;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kms-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn rec(i: u64) -> AuditRecord {
        AuditRecord::new(AuditKind::Admin, "test", format!("entry {i}"))
    }

    #[test]
    fn commits_chain_and_verify_then_detect_tampering() {
        let d = dir("chain");
        let store = Store::open(&d).unwrap();
        let mut head = None;
        let m = MeetingId::new("m").unwrap();
        store
            .commit(
                &[Write::Meeting(m.clone(), b"{}".to_vec())],
                (0..3).map(rec).collect(),
                &mut head,
                1,
            )
            .unwrap();
        store.commit(&[], vec![rec(3)], &mut head, 2).unwrap();
        assert_eq!(head.unwrap().0, 3);
        assert_eq!(store.head().unwrap(), head);
        let v = store.verify_audit().unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(v.entries, 4);
        let page = store.audit_page(1, 2).unwrap();
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        // Flip one field of entry 2.
        let mut e = page[1].clone();
        e.detail = "forged".into();
        store
            .overwrite_audit_raw(2, &serde_json::to_vec(&e).unwrap())
            .unwrap();
        let v = store.verify_audit().unwrap();
        assert!(!v.ok);
        assert!(v.error.unwrap().contains("entry 2"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn dropped_and_truncated_entries_are_detected() {
        let d = dir("drop");
        let store = Store::open(&d).unwrap();
        let mut head = None;
        store
            .commit(&[], (0..5).map(rec).collect(), &mut head, 1)
            .unwrap();
        store.delete_audit_raw(4).unwrap();
        assert!(!store.verify_audit().unwrap().ok, "truncated tail");
        store.delete_audit_raw(1).unwrap();
        assert!(!store.verify_audit().unwrap().ok, "dropped middle");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pruning_keeps_the_rest_verifiable_and_backup_copies_everything() {
        let d = dir("prune");
        let store = Store::open(&d).unwrap();
        let mut head = None;
        for t in 0..6 {
            store.commit(&[], vec![rec(t)], &mut head, t * 10).unwrap();
        }
        assert_eq!(store.prune_audit(25).unwrap(), 3);
        let v = store.verify_audit().unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(v.entries, 3);
        let backup = d.join("backup.redb");
        store.copy_to(&backup).unwrap();
        let copy = Store::open_file(&backup).unwrap();
        assert!(copy.verify_audit().unwrap().ok);
        assert_eq!(copy.head().unwrap(), head);
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn member(p: u64, joined_ms: u64) -> MemberRecord {
        serde_json::from_value(serde_json::json!({
            "participant": p, "sender_index": p, "role": "participant", "name": "n", "subject": "s",
            "public_key": "00", "session_hash": "00", "released_epoch": 1, "joined_ms": joined_ms,
        }))
        .unwrap()
    }

    fn used(hash: u8, expires_s: u64, used_ms: u64) -> UsedToken {
        UsedToken {
            expires_s,
            used_ms,
            hash: [hash; 32],
        }
    }

    fn loaded_tokens(store: &Store) -> Vec<UsedToken> {
        let mut tokens = store.load().unwrap().tokens;
        tokens.sort();
        tokens
    }

    #[test]
    fn members_and_tokens_of_earlier_layouts_are_moved_at_open() {
        let d = dir("layouts");
        std::fs::create_dir_all(&d).unwrap();
        let m = MeetingId::new("m1").unwrap();
        {
            // A store as written before: members by meeting, tokens by hash (the first
            // layout) and by expiry (the second).
            let db = Database::create(d.join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(TOKENS_BY_HASH).unwrap();
                t.insert([1u8; 32].as_slice(), 500).unwrap();
                let mut t = txn.open_table(TOKENS_BY_EXPIRY).unwrap();
                t.insert((400, [2u8; 32].as_slice()), ()).unwrap();
                let mut t = txn.open_table(MEMBERS_BY_MEETING).unwrap();
                for (p, joined) in [(1, 30), (2, 10)] {
                    let rec = serde_json::to_vec(&member(p, joined)).unwrap();
                    t.insert((m.as_str(), p), rec.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let store = Store::open(&d).unwrap();
        assert_eq!(
            loaded_tokens(&store),
            vec![used(2, 400, 0), used(1, 500, 0)]
        );
        let members = store.load().unwrap().members;
        assert_eq!(
            members,
            vec![(m.clone(), member(2, 10)), (m.clone(), member(1, 30))],
            "in join order"
        );
        let mut head = None;
        let key = |p: u64, joined_ms| MemberKey {
            joined_ms,
            meeting: m.clone(),
            participant: ParticipantId(p),
        };
        store
            .commit(
                &[
                    Write::Token(used(3, 600, 7)),
                    Write::ForgetToken(used(2, 400, 0)),
                    Write::Member(key(2, 10), None),
                    Write::Member(
                        key(3, 40),
                        Some(serde_json::to_vec(&member(3, 40)).unwrap()),
                    ),
                ],
                vec![],
                &mut head,
                1,
            )
            .unwrap();
        drop(store);
        // Reopening moves nothing twice and keeps what the commit left; so does a backup.
        let store = Store::open(&d).unwrap();
        let backup = d.join("backup.redb");
        store.copy_to(&backup).unwrap();
        for s in [store, Store::open_file(&backup).unwrap()] {
            assert_eq!(loaded_tokens(&s), vec![used(1, 500, 0), used(3, 600, 7)]);
            assert_eq!(
                s.load().unwrap().members,
                vec![(m.clone(), member(1, 30)), (m.clone(), member(3, 40))]
            );
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn meeting_record(id: &MeetingId, saves: u64) -> MeetingRecord {
        MeetingRecord {
            id: id.clone(),
            version: saves,
            epoch: saves,
            epoch_started_ms: 0,
            wrapped_key: Hex(vec![saves as u8; 60]),
            next_participant: saves + 1,
            next_sender: saves as u16,
            next_invitation: 1,
            invitations: Vec::new(),
            targets: Default::default(),
            relay: None,
            relay_instance: None,
            updated_ms: 0,
            saves,
        }
    }

    #[test]
    fn the_newest_copy_of_a_meeting_record_is_loaded_and_survives_its_members_leaving() {
        let d = dir("copies");
        let store = Store::open(&d).unwrap();
        let (m, other) = (MeetingId::new("m1").unwrap(), MeetingId::new("m2").unwrap());
        let key = |meeting: &MeetingId, p: u64| MemberKey {
            joined_ms: 100 + p,
            meeting: meeting.clone(),
            participant: ParticipantId(p),
        };
        let rec = |meeting: &MeetingId, saves| {
            serde_json::to_vec(&meeting_record(meeting, saves)).unwrap()
        };
        let loaded = |s: &Store| {
            let mut l = s.load().unwrap().meetings;
            l.sort_by(|a, b| a.id.cmp(&b.id));
            l.iter()
                .map(|r| (r.id.to_string(), r.saves))
                .collect::<Vec<_>>()
        };
        let mut head = None;
        let mut commit = |writes: &[Write]| store.commit(writes, vec![], &mut head, 1).unwrap();
        // m1: saved in place, then by two joins; m2 only by its first join.
        commit(&[
            Write::Meeting(m.clone(), rec(&m, 1)),
            Write::MeetingAtJoin(key(&m, 2), rec(&m, 2)),
            Write::MeetingAtJoin(key(&m, 3), rec(&m, 3)),
            Write::MeetingAtJoin(key(&other, 1), rec(&other, 1)),
        ]);
        assert_eq!(loaded(&store), [("m1".into(), 3), ("m2".into(), 1)]);
        assert_eq!(
            store.load().unwrap().meetings.iter().find(|r| r.id == m),
            Some(&meeting_record(&m, 3)),
            "the whole record, not only its count"
        );
        // The member whose join left the newest copy leaves without a save (a failed
        // rotation): its copy moves in place rather than going with it. m2's only member
        // leaves the same way.
        commit(&[
            Write::Member(key(&m, 3), None),
            Write::Member(key(&other, 1), None),
        ]);
        assert_eq!(loaded(&store), [("m1".into(), 3), ("m2".into(), 1)]);
        // A leave that saves in place (the usual one), in either order within a commit.
        commit(&[
            Write::Meeting(m.clone(), rec(&m, 4)),
            Write::Member(key(&m, 2), None),
        ]);
        assert_eq!(loaded(&store), [("m1".into(), 4), ("m2".into(), 1)]);
        commit(&[Write::MeetingAtJoin(key(&m, 5), rec(&m, 5))]);
        let backup = d.join("backup.redb");
        store.copy_to(&backup).unwrap();
        drop(store);
        for s in [Store::open(&d).unwrap(), Store::open_file(&backup).unwrap()] {
            assert_eq!(loaded(&s), [("m1".into(), 5), ("m2".into(), 1)]);
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A committer of at most 64 entries per commit, and the number of
    /// requests in each commit it made.
    fn observed_committer(
        store: &Arc<Store>,
        linger: Duration,
    ) -> (Committer, Arc<std::sync::Mutex<Vec<usize>>>) {
        let batches = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = batches.clone();
        let grouping = Grouping {
            max_entries: 64,
            linger,
        };
        let observe = Box::new(move |n, _, _| seen.lock().unwrap().push(n));
        let c = Committer::start(store.clone(), grouping, || 7, observe).unwrap();
        (c, batches)
    }

    #[test]
    fn a_busy_committer_lingers_for_more_and_an_idle_one_does_not() {
        let d = dir("linger");
        let store = Arc::new(Store::open(&d).unwrap());
        let linger = Duration::from_secs(5);
        let (c, batches) = observed_committer(&store, linger);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let records = |n: u64| (0..n).map(rec).collect::<Vec<_>>();
        rt.block_on(async {
            // Idle: a lone request is committed at once, not after the linger.
            let started = Instant::now();
            c.submit(vec![], records(1)).await.unwrap().unwrap();
            assert!(started.elapsed() < linger, "an idle committer waited");
            // Busy: requests queued during a commit make the next one large
            // (the last commit decides whether the committer lingers next).
            while batches.lock().unwrap().last() < Some(&BUSY_REQUESTS) {
                let waits: Vec<_> = (0..40).map(|_| c.submit(vec![], records(1))).collect();
                for w in waits {
                    w.await.unwrap().unwrap();
                }
            }
            // The next request waits for a later one to share its commit;
            // the later one fills the batch, so neither waits the whole linger.
            let first = c.submit(vec![], records(1));
            tokio::time::sleep(Duration::from_millis(200)).await;
            let second = c.submit(vec![], records(63));
            first.await.unwrap().unwrap();
            second.await.unwrap().unwrap();
        });
        assert_eq!(batches.lock().unwrap().last(), Some(&2));
        assert!(store.verify_audit().unwrap().ok);
        drop(c);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn committer_groups_and_acknowledges_in_order() {
        let d = dir("committer");
        let store = Arc::new(Store::open(&d).unwrap());
        let (c, batches) = observed_committer(&store, Duration::from_millis(1));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let waits: Vec<_> = (0..50).map(|i| c.submit(vec![], vec![rec(i)])).collect();
        rt.block_on(async {
            for w in waits {
                w.await.unwrap().unwrap();
            }
        });
        let entries = store.audit_page(0, 100).unwrap();
        assert_eq!(entries.len(), 50);
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.detail, format!("entry {i}"));
        }
        assert_eq!(batches.lock().unwrap().iter().sum::<usize>(), 50);
        assert!(store.verify_audit().unwrap().ok);
        drop(c);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
