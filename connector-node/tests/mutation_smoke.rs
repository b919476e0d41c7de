//! A stable-toolchain stand-in for the cargo-fuzz targets in fuzz/: random
//! mutations of valid SIP, SDP and RTP go through every parser and the user
//! agent. The assertion is that nothing panics and bounds hold.

use connector_node::media::{rtp, srtp::SrtpContext};
use connector_node::sip::message;
use connector_node::sip::sdp::{self, Local, SrtpKey};
use connector_node::sip::ua::{Transport, UaConfig, UserAgent};
use meeting_proto::config::connector::SrtpPolicy;
use rand::{Rng, SeedableRng};
use std::time::Instant;

const SEED_SIP: &str = "INVITE sip:+15550100@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n\
From: \"A\" <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:+15550100@127.0.0.1>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:a@127.0.0.1:5070>\r\nContent-Type: application/sdp\r\nContent-Length: 160\r\n\r\n\
v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/SAVP 0 101\r\n\
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n";

fn mutate(rng: &mut impl Rng, seed: &[u8]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..rng.gen_range(1..8) {
        let i = rng.gen_range(0..=d.len());
        match rng.gen_range(0..5) {
            0 if i < d.len() => d[i] = rng.r#gen(),
            1 if i < d.len() => {
                d.remove(i);
            }
            2 => d.insert(
                i,
                *b"\r\n:;<>=\"0 @".get(rng.gen_range(0..11)).unwrap_or(&b'x'),
            ),
            3 => {
                let n = rng.gen_range(0..3000);
                d.splice(i..i, std::iter::repeat_n(b'9', n));
            }
            _ => d.truncate(i),
        }
    }
    d
}

#[test]
fn mutated_inputs_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut ua = UserAgent::new(UaConfig {
        local: "127.0.0.1:5060".parse().unwrap(),
        transport: Transport::Udp,
        user: "t".into(),
        display_name: "t".into(),
        credentials: None,
        max_calls: 16,
        invites_per_second: u32::MAX,
    });
    let from = "127.0.0.1:5070".parse().unwrap();
    let rtp_seed = rtp::build(true, 0, 1, 160, 7, &[0xffu8; 160]);
    let mut srtp = SrtpContext::new(&[1u8; 30]);
    let (mut parsed, mut sdp_ok) = (0, 0);
    for _ in 0..20_000 {
        let m = mutate(&mut rng, SEED_SIP.as_bytes());
        if let Ok((msg, used)) = message::parse(&m) {
            parsed += 1;
            assert!(used <= m.len());
            assert!(msg.headers.len() <= message::MAX_HEADERS);
            if let Ok(offer) = sdp::parse(&msg.body) {
                sdp_ok += 1;
                let local = Local {
                    addr: "127.0.0.1".parse().unwrap(),
                    port: 4000,
                    session_id: 1,
                    policy: SrtpPolicy::Preferred,
                    key: SrtpKey::random(),
                };
                let _ = local.answer(&offer);
            }
        }
        ua.handle_message(from, &m, Instant::now());
        while ua.poll_transmit().is_some() {}
        while ua.poll_event().is_some() {}
        let r = mutate(&mut rng, &rtp_seed);
        let _ = rtp::parse(&r);
        let mut p = r.clone();
        let _ = srtp.unprotect(&mut p);
    }
    // The mutations must exercise the deep paths, not only the first check.
    assert!(parsed > 1000, "only {parsed} mutated messages parsed");
    assert!(sdp_ok > 100, "only {sdp_ok} SDP bodies parsed");
    assert!(ua.stats.parse_errors > 1000);
}
