//! The audit hash chain: each entry commits to the previous entry's hash, so
//! a flipped, dropped, reordered or truncated entry breaks verification.
//!
//! `hash = SHA-256("conclave audit v1\0" || prev || JSON(entry without hash))`.
//! Truncation of the tail is caught against the head (seq, hash) that the
//! store keeps in the same transaction as the entries; the head is also
//! returned by the verify endpoint so monitors can pin it externally.

use meeting_proto::ids::{MeetingId, ParticipantId};
use meeting_proto::kms_api::{AuditEntry, AuditKind, Hex};
use serde::Serialize;
use sha2::{Digest, Sha256};

const DOMAIN: &[u8] = b"conclave audit v1\0";

/// What the core wants recorded; the committer turns it into a chained entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub kind: AuditKind,
    pub actor: String,
    pub meeting: Option<MeetingId>,
    pub participant: Option<ParticipantId>,
    pub epoch: Option<u64>,
    pub detail: String,
}

impl AuditRecord {
    pub fn new(kind: AuditKind, actor: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            kind,
            actor: actor.into(),
            meeting: None,
            participant: None,
            epoch: None,
            detail: detail.into(),
        }
    }
    pub fn meeting(mut self, m: &MeetingId) -> Self {
        self.meeting = Some(m.clone());
        self
    }
    pub fn participant(mut self, p: ParticipantId) -> Self {
        self.participant = Some(p);
        self
    }
    pub fn epoch(mut self, e: u64) -> Self {
        self.epoch = Some(e);
        self
    }
}

#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    time_ms: u64,
    kind: AuditKind,
    actor: &'a str,
    meeting: Option<&'a MeetingId>,
    participant: Option<ParticipantId>,
    epoch: Option<u64>,
    detail: &'a str,
}

fn hash_of(prev: &[u8], e: &Hashed<'_>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(prev);
    h.update(serde_json::to_vec(e).expect("plain struct serializes"));
    h.finalize().into()
}

/// Links `record` after `prev` as entry number `seq`.
pub fn chain(prev: [u8; 32], seq: u64, time_ms: u64, record: AuditRecord) -> AuditEntry {
    let hash = hash_of(
        &prev,
        &Hashed {
            seq,
            time_ms,
            kind: record.kind,
            actor: &record.actor,
            meeting: record.meeting.as_ref(),
            participant: record.participant,
            epoch: record.epoch,
            detail: &record.detail,
        },
    );
    AuditEntry {
        seq,
        time_ms,
        kind: record.kind,
        actor: record.actor,
        meeting: record.meeting,
        participant: record.participant,
        epoch: record.epoch,
        detail: record.detail,
        prev: Hex(prev.to_vec()),
        hash: Hex(hash.to_vec()),
    }
}

/// Where verification starts: the first sequence number kept and the hash
/// before it (zeros for a chain that was never pruned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub next_seq: u64,
    pub hash: [u8; 32],
}

impl Checkpoint {
    pub const GENESIS: Checkpoint = Checkpoint {
        next_seq: 0,
        hash: [0; 32],
    };
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("entry {got} found where {expected} was expected (dropped or reordered entry)")]
    Sequence { expected: u64, got: u64 },
    #[error("entry {0} does not link to the previous entry (dropped, reordered or edited)")]
    Link(u64),
    #[error("entry {0} content does not match its hash (edited entry)")]
    Content(u64),
    #[error("entry {0} is unreadable")]
    Unreadable(u64),
    #[error("chain ends at {got:?} but the head says {expected:?} (truncated log)")]
    Truncated {
        expected: Option<u64>,
        got: Option<u64>,
    },
    #[error("head hash does not match the last entry")]
    HeadMismatch,
}

/// Incremental verifier, fed entries in key order.
#[derive(Debug)]
pub struct Verifier {
    expected_seq: u64,
    prev: [u8; 32],
    count: u64,
}

impl Verifier {
    pub fn new(start: Checkpoint) -> Self {
        Self {
            expected_seq: start.next_seq,
            prev: start.hash,
            count: 0,
        }
    }

    /// Checks one entry; `key` is the sequence number it was stored under.
    pub fn push(&mut self, key: u64, entry: &AuditEntry) -> Result<(), VerifyError> {
        if key != self.expected_seq || entry.seq != key {
            return Err(VerifyError::Sequence {
                expected: self.expected_seq,
                got: if key != self.expected_seq {
                    key
                } else {
                    entry.seq
                },
            });
        }
        if entry.prev.0 != self.prev {
            return Err(VerifyError::Link(key));
        }
        let recomputed = hash_of(
            &self.prev,
            &Hashed {
                seq: entry.seq,
                time_ms: entry.time_ms,
                kind: entry.kind,
                actor: &entry.actor,
                meeting: entry.meeting.as_ref(),
                participant: entry.participant,
                epoch: entry.epoch,
                detail: &entry.detail,
            },
        );
        if entry.hash.0 != recomputed {
            return Err(VerifyError::Content(key));
        }
        self.prev = recomputed;
        self.expected_seq += 1;
        self.count += 1;
        Ok(())
    }

    /// Checks the end of the chain against the stored head.
    pub fn finish(self, head: Option<(u64, [u8; 32])>) -> Result<(u64, [u8; 32]), VerifyError> {
        let last = self.expected_seq.checked_sub(1).filter(|_| self.count > 0);
        match head {
            Some((seq, hash)) => {
                if last != Some(seq) {
                    return Err(VerifyError::Truncated {
                        expected: Some(seq),
                        got: last,
                    });
                }
                if hash != self.prev {
                    return Err(VerifyError::HeadMismatch);
                }
            }
            None if self.count > 0 => {
                return Err(VerifyError::Truncated {
                    expected: None,
                    got: last,
                });
            }
            None => {}
        }
        Ok((self.count, self.prev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(n: u64) -> Vec<AuditEntry> {
        let mut prev = [0u8; 32];
        (0..n)
            .map(|i| {
                let rec = AuditRecord::new(AuditKind::KeyRelease, "token:portal:ada", "release")
                    .meeting(&MeetingId::new("m").unwrap())
                    .participant(ParticipantId(i))
                    .epoch(1);
                let e = chain(prev, i, 1000 + i, rec);
                prev = e.hash.array().unwrap();
                e
            })
            .collect()
    }

    fn verify(
        entries: &[(u64, AuditEntry)],
        head: Option<(u64, [u8; 32])>,
    ) -> Result<u64, VerifyError> {
        let mut v = Verifier::new(Checkpoint::GENESIS);
        for (k, e) in entries {
            v.push(*k, e)?;
        }
        v.finish(head).map(|(n, _)| n)
    }

    fn keyed(entries: &[AuditEntry]) -> Vec<(u64, AuditEntry)> {
        entries.iter().map(|e| (e.seq, e.clone())).collect()
    }

    #[test]
    fn intact_chain_verifies() {
        let entries = build(5);
        let head = Some((4, entries[4].hash.array().unwrap()));
        assert_eq!(verify(&keyed(&entries), head), Ok(5));
        assert_eq!(verify(&[], None), Ok(0));
    }

    #[test]
    fn every_kind_of_tampering_is_detected() {
        let entries = build(5);
        let head = Some((4, entries[4].hash.array().unwrap()));
        // flipped field
        let mut edited = keyed(&entries);
        edited[2].1.detail = "nothing to see".into();
        assert_eq!(verify(&edited, head), Err(VerifyError::Content(2)));
        let mut edited = keyed(&entries);
        edited[1].1.participant = Some(ParticipantId(99));
        assert_eq!(verify(&edited, head), Err(VerifyError::Content(1)));
        // dropped entry
        let mut dropped = keyed(&entries);
        dropped.remove(2);
        assert!(matches!(
            verify(&dropped, head),
            Err(VerifyError::Sequence {
                expected: 2,
                got: 3
            })
        ));
        // dropped and renumbered
        let mut renumbered = keyed(&entries);
        renumbered.remove(2);
        for (i, (k, e)) in renumbered.iter_mut().enumerate() {
            *k = i as u64;
            e.seq = i as u64;
        }
        assert!(verify(&renumbered, head).is_err());
        // reordered
        let mut reordered = keyed(&entries);
        reordered.swap(1, 2);
        assert!(verify(&reordered, head).is_err());
        // truncated tail
        let truncated = keyed(&entries[..3]);
        assert!(matches!(
            verify(&truncated, head),
            Err(VerifyError::Truncated { .. })
        ));
        // head forged to another hash
        assert_eq!(
            verify(&keyed(&entries), Some((4, [7; 32]))),
            Err(VerifyError::HeadMismatch)
        );
    }

    /// Property: any single random edit (field flip, drop, swap, truncate)
    /// of a random-length chain is detected.
    #[test]
    fn random_single_edits_are_always_detected() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        for _ in 0..500 {
            let n = 2 + next(30);
            let entries = build(n);
            let head = Some((n - 1, entries[n as usize - 1].hash.array().unwrap()));
            let mut t = keyed(&entries);
            let i = next(n) as usize;
            match next(6) {
                0 => t[i].1.time_ms += 1,
                1 => t[i].1.actor.push('x'),
                2 => t[i].1.epoch = Some(t[i].1.epoch.unwrap_or(0) + 1),
                3 => {
                    t.remove(i);
                }
                4 => {
                    let j = (i + 1 + next(n - 1) as usize) % n as usize;
                    t.swap(i, j);
                }
                _ => t.truncate(i),
            }
            assert!(verify(&t, head).is_err());
        }
    }

    #[test]
    fn a_pruned_chain_verifies_from_its_checkpoint() {
        let entries = build(6);
        let start = Checkpoint {
            next_seq: 3,
            hash: entries[2].hash.array().unwrap(),
        };
        let mut v = Verifier::new(start);
        for e in &entries[3..] {
            v.push(e.seq, e).unwrap();
        }
        assert_eq!(
            v.finish(Some((5, entries[5].hash.array().unwrap())))
                .unwrap()
                .0,
            3
        );
    }
}
