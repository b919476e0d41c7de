//! Mutation smoke test (deterministic, bounded): request bodies and stored
//! records, mutated thousands of ways, are refused with errors, never panics.
//! The cargo-fuzz targets in connector-node follow the same idea; this runs
//! in every `cargo test`.

use kms_node::core::{MeetingRecord, MemberRecord, RecordingRecord, Write};
use kms_node::keys::StoredKek;
use kms_node::store::Store;
use meeting_proto::ids::MeetingId;
use meeting_proto::kms_api::{self as api, AuditEntry};

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut XorShift, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out.remove(i);
            }
            2 => {
                let i = rng.below(out.len() + 1);
                let alphabet = b"{}[]\",:0-e9\\u\xff";
                out.insert(i, alphabet[rng.below(alphabet.len())]);
            }
            3 => out.truncate(rng.below(out.len() + 1)),
            _ => {
                let i = rng.below(out.len() + 1);
                let j = rng.below(out.len() + 1);
                let (a, b) = (i.min(j), i.max(j));
                let chunk = out[a..b].to_vec();
                out.splice(a..a, chunk);
            }
        }
    }
    out
}

fn samples() -> Vec<Vec<u8>> {
    vec![
        br#"{"token":"eyJ.a.b","public_key":"0101010101010101010101010101010101010101010101010101010101010101"}"#.to_vec(),
        br#"{"invitation":3,"public_key":"00"}"#.to_vec(),
        br#"{"kind":"recording"}"#.to_vec(),
        br#"{"zone":"zone-a","address":"127.0.0.1:4000","capacity":10}"#.to_vec(),
        br#"{"id":"m","version":3,"epoch":2,"epoch_started_ms":1,"wrapped_key":"00ff","next_participant":4,"next_sender":3,"next_invitation":1,"invitations":[{"id":1,"kind":"telephony","invited_by":1}],"relay":"z/r","updated_ms":5}"#.to_vec(),
        br#"{"participant":1,"sender_index":0,"role":"connector:recording","name":"n","subject":"s","public_key":"01","session_hash":"02","released_epoch":1,"joined_ms":0}"#.to_vec(),
        br#"{"seq":1,"time_ms":2,"kind":"key_release","actor":"a","meeting":"m","participant":1,"epoch":1,"detail":"d","prev":"00","hash":"11"}"#.to_vec(),
        br#"{"version":1,"wrapped":"abcd","created_ms":1,"superseded_ms":null}"#.to_vec(),
        br#"{"kind":"liveStreaming","target":"rtmps://[::1]:443/app/key?x=1#f"}"#.to_vec(),
        br#"{"kind":"telephony","target":"sips:+15551234567@pbx.example.com:5061;transport=tls?h=1"}"#.to_vec(),
        br#"{"meeting":"m","invitation":2,"outcome":{"state":"failed","code":"busy","status":486,"message":"the callee is busy"}}"#.to_vec(),
    ]
}

#[test]
fn mutated_bodies_and_records_never_panic() {
    let originals = samples();
    // The unmutated samples are valid, so the mutations start from real shapes.
    assert!(serde_json::from_slice::<api::JoinRequest>(&originals[0]).is_ok());
    assert!(serde_json::from_slice::<MeetingRecord>(&originals[4]).is_ok());
    assert!(serde_json::from_slice::<MemberRecord>(&originals[5]).is_ok());
    assert!(serde_json::from_slice::<AuditEntry>(&originals[6]).is_ok());
    assert!(serde_json::from_slice::<api::InvitationOutcomeRequest>(&originals[10]).is_ok());
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut refused = 0;
    for round in 0..20_000 {
        let input = mutate(&mut rng, &originals[round % originals.len()]);
        let results = [
            serde_json::from_slice::<api::JoinRequest>(&input).is_ok(),
            serde_json::from_slice::<api::InviteRequest>(&input).is_ok(),
            serde_json::from_slice::<api::RelayRegisterRequest>(&input).is_ok(),
            serde_json::from_slice::<MeetingRecord>(&input).is_ok(),
            serde_json::from_slice::<MemberRecord>(&input).is_ok(),
            serde_json::from_slice::<RecordingRecord>(&input).is_ok(),
            serde_json::from_slice::<AuditEntry>(&input).is_ok(),
            serde_json::from_slice::<StoredKek>(&input).is_ok(),
            serde_json::from_slice::<api::InvitationOutcomeRequest>(&input).is_ok(),
        ];
        refused += results.iter().filter(|ok| !**ok).count();
        // Whatever target survives decoding, checking it never panics, and
        // what it says about an accepted target never holds more than it.
        if let Ok(req) = serde_json::from_slice::<api::InviteRequest>(&input)
            && let Some(target) = req.target
        {
            use api::ConnectorKind::*;
            for kind in [Recording, LiveStreaming, Telephony, RoomSystem] {
                if let Ok(summary) = api::check_invite_target(kind, &target) {
                    assert!(summary.to_string().len() <= target.len().max(14));
                }
            }
            let _ = api::redacted_target(&target);
        }
        // Whatever outcome survives decoding, checking it never panics, and
        // one that passes prints as one roster line.
        if let Ok(req) = serde_json::from_slice::<api::InvitationOutcomeRequest>(&input)
            && req.outcome.check().is_ok()
        {
            assert!(!req.outcome.to_string().contains(['\n', '\r']));
        }
    }
    assert!(refused > 0);
}

#[test]
fn a_corrupt_stored_record_is_an_error_not_a_panic() {
    let dir = std::env::temp_dir().join(format!("kms-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir).unwrap();
    let mut head = None;
    let m = MeetingId::new("m").unwrap();
    store
        .commit(
            &[Write::Meeting(m, b"{\"id\":".to_vec())],
            vec![],
            &mut head,
            0,
        )
        .unwrap();
    let err = store.load().unwrap_err();
    assert!(err.to_string().contains("meeting m"), "{err}");
    store.overwrite_audit_raw(0, b"\xff\xfe").unwrap();
    let v = store.verify_audit().unwrap();
    assert!(!v.ok);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}
