//! The kms-node config file: parse + validate never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = meeting_proto::config::kms::KmsConfig::from_yaml(text);
    }
});
