//! Any HELLO ticket bytes: verification never panics and never accepts a
//! ticket the fixed key did not sign.
#![no_main]
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use meeting_proto::ticket::Ticket;

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[42u8; 32]).verifying_key();
    assert!(Ticket::verify(data, &key, "zone/relay-0", 0).is_err());
});
