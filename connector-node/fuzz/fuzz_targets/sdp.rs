#![no_main]
//! Any bytes as an SDP offer: parse and answer must not panic.

use connector_node::sip::sdp::{self, Local, SrtpKey};
use libfuzzer_sys::fuzz_target;
use meeting_proto::config::connector::SrtpPolicy;

fuzz_target!(|data: &[u8]| {
    if let Ok(offer) = sdp::parse(data) {
        for policy in [SrtpPolicy::Required, SrtpPolicy::Preferred, SrtpPolicy::Off] {
            let local = Local {
                addr: "127.0.0.1".parse().unwrap(),
                port: 4000,
                session_id: 1,
                policy,
                key: SrtpKey::random(),
            };
            let _ = local.answer(&offer);
        }
    }
});
