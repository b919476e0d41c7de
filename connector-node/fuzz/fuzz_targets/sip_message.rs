#![no_main]
//! Any bytes into the SIP parser and the user agent: no panic, bounded work.

use connector_node::sip::message;
use connector_node::sip::ua::{Transport, UaConfig, UserAgent};
use libfuzzer_sys::fuzz_target;
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    if let Ok((m, used)) = message::parse(data) {
        assert!(used <= data.len());
        let again = message::parse(&m.to_bytes()).expect("serialized message parses");
        assert_eq!(again.0.headers.len(), m.headers.len() + usize::from(m.header("Content-Length").is_none()));
    }
    let mut ua = UserAgent::new(UaConfig {
        local: "127.0.0.1:5060".parse().unwrap(),
        transport: Transport::Udp,
        user: "fuzz".into(),
        display_name: "fuzz".into(),
        credentials: None,
        max_calls: 4,
        invites_per_second: 100,
    });
    ua.handle_message("127.0.0.1:5070".parse().unwrap(), data, Instant::now());
    while ua.poll_transmit().is_some() {}
});
