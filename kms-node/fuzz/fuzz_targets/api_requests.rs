//! Request bodies as the KMS decodes them: never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meeting_proto::kms_api as api;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<api::JoinRequest>(data);
    if let Ok(api::InviteRequest {
        kind,
        target: Some(target),
    }) = serde_json::from_slice::<api::InviteRequest>(data)
    {
        let _ = api::check_invite_target(kind, &target);
        let _ = api::redacted_target(&target);
    }
    let _ = serde_json::from_slice::<api::RelayRegisterRequest>(data);
    let _ = serde_json::from_slice::<api::RelayHeartbeatRequest>(data);
    let _ = serde_json::from_slice::<api::CreateRecordingKeyRequest>(data);
    let _ = serde_json::from_slice::<api::RecordingKeyRequest>(data);
    if let Ok(r) = serde_json::from_slice::<api::SignedRoster>(data) {
        let key = ed25519_dalek_key();
        let _ = r.verify(&key);
    }
});

fn ed25519_dalek_key() -> ed25519_dalek::VerifyingKey {
    ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key()
}
