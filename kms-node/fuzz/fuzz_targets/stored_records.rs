//! Records read back from the store (a damaged disk or a hostile backup):
//! decoding and audit verification return errors, never panic.
#![no_main]
use kms_node::audit::{Checkpoint, Verifier};
use kms_node::core::{MeetingRecord, MemberRecord, RecordingRecord};
use kms_node::keys::{StoredKek, wrapped_version};
use libfuzzer_sys::fuzz_target;
use meeting_proto::kms_api::AuditEntry;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<MeetingRecord>(data);
    let _ = serde_json::from_slice::<MemberRecord>(data);
    let _ = serde_json::from_slice::<RecordingRecord>(data);
    let _ = serde_json::from_slice::<StoredKek>(data);
    let _ = wrapped_version(data);
    if let Ok(entries) = serde_json::from_slice::<Vec<AuditEntry>>(data) {
        let mut v = Verifier::new(Checkpoint::GENESIS);
        for e in &entries {
            if v.push(e.seq, e).is_err() {
                return;
            }
        }
        let _ = v.finish(None);
    }
});
