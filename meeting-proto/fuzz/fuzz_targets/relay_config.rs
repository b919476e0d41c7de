//! Any relay config document: parsing and validation never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meeting_proto::config::relay::RelayConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = serde_json::from_slice::<RelayConfig>(data) {
        let _ = c.validate();
    }
});
