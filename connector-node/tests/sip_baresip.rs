//! Interop with baresip 1.0 (Debian) as the phone, all on 127.0.0.1:
//! dial-in and dial-out, audio both ways asserted by tone detection,
//! TLS + SRTP, and `srtp: required` refusing a plain-RTP phone.

mod common;

use common::{Baresip, BaresipOpts, TempDir};
use connector_node::media::tone;
use connector_node::metrics::Metrics;
use connector_node::sip::transport::{self, TlsSetup};
use connector_node::sip::ua::{Transport, UaConfig, UserAgent};
use connector_node::telephony::{self, PhoneLeg, Telephony, TelephonySettings};
use meeting_proto::config::connector::SrtpPolicy;
use meeting_proto::ids::MeetingId;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The phone plays this; we must hear it.
const PHONE_TONE: f32 = 1000.0;
/// We play this into the call; the phone must hear it.
const MEETING_TONE: f32 = 440.0;
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

struct Connector {
    telephony: Telephony,
    legs: mpsc::Receiver<PhoneLeg>,
    local: SocketAddr,
    metrics: Arc<Metrics>,
    stats: tokio::sync::watch::Receiver<connector_node::sip::ua::UaStats>,
}

async fn connector(t: Transport, srtp: SrtpPolicy, tls: Option<TlsSetup>) -> Connector {
    let ua = UserAgent::new(UaConfig {
        local: "127.0.0.1:0".parse().unwrap(),
        transport: t,
        user: "conclave".into(),
        display_name: "Conclave".into(),
        credentials: None,
        max_calls: 8,
        invites_per_second: 20,
    });
    let (ev_tx, ev_rx) = mpsc::channel(64);
    let sip = transport::spawn(ua, "127.0.0.1:0".parse().unwrap(), t, tls, ev_tx)
        .await
        .unwrap();
    let local = sip.local;
    let stats = sip.stats.clone();
    let metrics = Arc::new(Metrics::new());
    let (legs_tx, legs) = mpsc::channel(8);
    let telephony = telephony::start(
        sip.clone(),
        ev_rx,
        TelephonySettings {
            media_ip: "127.0.0.1".parse().unwrap(),
            srtp,
            dial_in: [(
                "+15550100".to_string(),
                MeetingId::new("weekly-sync").unwrap(),
            )]
            .into_iter()
            .collect(),
            name_prefix: Some("Phone".into()),
            media_timeout: connector_node::telephony::DEFAULT_MEDIA_TIMEOUT,
        },
        metrics.clone(),
        legs_tx,
    );
    Connector {
        telephony,
        legs,
        local,
        metrics,
        stats,
    }
}

fn phone_wav(dir: &TempDir) -> std::path::PathBuf {
    let p = dir.0.join("phone.wav");
    common::write_wav(
        &p,
        8000,
        &tone::sine(PHONE_TONE, 8000, 8000.0, 0, 8000 * 20),
    );
    p
}

/// Play the meeting tone to the phone for `secs` and collect what the phone sends.
async fn exchange(leg: &mut PhoneLeg, secs: usize) -> Vec<i16> {
    let mut heard = Vec::new();
    let mut n = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while n < secs * 50 {
        tick.tick().await;
        let _ = leg
            .to_phone
            .try_send(tone::sine(MEETING_TONE, 8000, 8000.0, n * 160, 160));
        while let Ok(f) = leg.from_phone.try_recv() {
            heard.extend(f);
        }
        n += 1;
    }
    heard
}

fn assert_heard_tone(samples: &[i16], freq: f32, what: &str) {
    assert_heard_tone_at(samples, 8000, freq, what);
}

fn assert_heard_tone_at(samples: &[i16], rate: u32, freq: f32, what: &str) {
    // Skip the start (prefetch, ringing) and look at the best second.
    let best = samples
        .chunks(rate as usize)
        .map(|c| (tone::tone_ratio(c, freq, rate), tone::rms(c)))
        .fold((0f32, 0f32), |a, b| if b.0 > a.0 { b } else { a });
    assert!(
        best.0 > 0.8 && best.1 > 1000.0,
        "{what}: {freq} Hz not found (best ratio {:.2}, rms {:.0}, {} samples)",
        best.0,
        best.1,
        samples.len()
    );
}

async fn phone_heard_meeting(phone: &mut Baresip) {
    // baresip writes its recording when the call ends.
    assert!(
        phone.wait_for_log("terminated", Duration::from_secs(10)) || !phone.heard().is_empty(),
        "call did not end on the phone:\n{}",
        phone.log()
    );
    phone.stop();
    let files = phone.heard();
    assert!(
        !files.is_empty(),
        "baresip recorded nothing:\n{}",
        phone.log()
    );
    // 8 kHz for G.711; baresip records Opus calls at 48 kHz.
    let (rate, samples) = common::read_wav(&files[0]);
    assert_heard_tone_at(&samples, rate, MEETING_TONE, "phone hearing the meeting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_out_to_baresip_audio_both_ways() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = TempDir::new("bs-out");
        let mut phone = Baresip::start(
            &dir.0,
            &phone_wav(&dir),
            BaresipOpts {
                transport: "udp",
                mediaenc: None,
                tls: None,
                dial: None,
                codecs: None,
                max_calls: None,
            },
        );
        let c = connector(Transport::Udp, SrtpPolicy::Preferred, None).await;
        let peer: SocketAddr = format!("127.0.0.1:{}", phone.port).parse().unwrap();
        let mut leg = c
            .telephony
            .dial(
                peer,
                &format!("sip:phone@127.0.0.1:{}", phone.port),
                MeetingId::new("m1").unwrap(),
            )
            .await
            .unwrap_or_else(|e| panic!("dial failed: {e}\n{}", phone.log()));
        assert_eq!(leg.display_name, "Phone phone");
        assert_eq!(leg.meeting.as_str(), "m1");
        let heard = exchange(&mut leg, 4).await;
        assert_heard_tone(&heard, PHONE_TONE, "meeting hearing the phone");
        c.telephony.hangup(leg.call).await;
        leg.ended.wait_for(|e| *e).await.unwrap();
        phone_heard_meeting(&mut phone).await;
        let m = c.metrics.render();
        assert!(
            m.contains("conclave_connector_sip_calls_total{direction=\"dialOut\"} 1"),
            "{m}"
        );
        let _ = c.local;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_in_from_baresip_maps_number_to_meeting() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = TempDir::new("bs-in");
        let mut c = connector(Transport::Udp, SrtpPolicy::Preferred, None).await;
        let mut phone = Baresip::start(
            &dir.0,
            &phone_wav(&dir),
            BaresipOpts {
                transport: "udp",
                mediaenc: None,
                tls: None,
                dial: Some(format!("sip:+15550100@127.0.0.1:{}", c.local.port())),
                codecs: None,
                max_calls: None,
            },
        );
        let mut leg = c.legs.recv().await.expect("a phone leg");
        assert_eq!(leg.meeting.as_str(), "weekly-sync");
        assert!(
            leg.display_name.starts_with("Phone "),
            "{}",
            leg.display_name
        );
        assert_eq!(leg.info.srtp, None);
        let heard = exchange(&mut leg, 4).await;
        assert_heard_tone(&heard, PHONE_TONE, "meeting hearing the phone");
        c.telephony.hangup(leg.call).await;
        leg.ended.wait_for(|e| *e).await.unwrap();
        phone_heard_meeting(&mut phone).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srtp_required_refuses_plain_rtp_phone() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = TempDir::new("bs-plain");
        let c = connector(Transport::Udp, SrtpPolicy::Required, None).await;
        let mut phone = Baresip::start(
            &dir.0,
            &phone_wav(&dir),
            BaresipOpts {
                transport: "udp",
                mediaenc: None,
                tls: None,
                dial: Some(format!("sip:+15550100@127.0.0.1:{}", c.local.port())),
                codecs: None,
                max_calls: None,
            },
        );
        assert!(
            phone.wait_for_log("488", Duration::from_secs(10)),
            "phone was not refused:\n{}",
            phone.log()
        );
        // The reason reaches the phone's side too (Warning header) and our metrics.
        let m = c.metrics.render();
        assert!(
            m.contains("conclave_connector_sip_calls_refused_total{reason=\"srtpRequired\"} 1"),
            "{m}"
        );
    })
    .await
    .expect("test timed out");
}

struct TestPki {
    setup: TlsSetup,
    /// baresip's certificate + key PEM, and the CA PEM.
    phone_pem: std::path::PathBuf,
    ca_pem: std::path::PathBuf,
}

fn pki(dir: &TempDir) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, &ca_key);
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), name.to_string()]).unwrap();
        (params.signed_by(&key, &issuer).unwrap(), key)
    };
    let (ours, our_key) = leaf("connector.test");
    let (phone, phone_key) = leaf("phone.test");
    let ca_pem = dir.0.join("ca.pem");
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    let phone_pem = dir.0.join("phone.pem");
    std::fs::write(
        &phone_pem,
        format!("{}{}", phone.pem(), phone_key.serialize_pem()),
    )
    .unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::try_from(our_key.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ours.der().clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TestPki {
        setup: TlsSetup {
            server: Arc::new(server),
            client: Arc::new(client),
        },
        phone_pem,
        ca_pem,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_in_over_tls_with_srtp_required() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = TempDir::new("bs-tls");
        let pki = pki(&dir);
        let mut c = connector(
            Transport::Tls,
            SrtpPolicy::Required,
            Some(pki.setup.clone()),
        )
        .await;
        let mut phone = Baresip::start(
            &dir.0,
            &phone_wav(&dir),
            BaresipOpts {
                transport: "tls",
                mediaenc: Some("srtp-mand"),
                tls: Some((pki.phone_pem.clone(), pki.ca_pem.clone())),
                dial: Some(format!("sip:+15550100@127.0.0.1:{}", c.local.port())),
                codecs: None,
                max_calls: None,
            },
        );
        let mut leg = c.legs.recv().await.expect("a phone leg");
        assert_eq!(
            leg.info.srtp,
            Some("AES_CM_128_HMAC_SHA1_80"),
            "negotiated crypto"
        );
        let heard = exchange(&mut leg, 4).await;
        // Audio arriving at all proves SRTP interop: unauthenticated packets are dropped.
        assert_heard_tone(&heard, PHONE_TONE, "meeting hearing the phone over SRTP");
        let m = c.metrics.render();
        assert!(
            m.contains("conclave_connector_rtp_packets_dropped_total{reason=\"srtpAuth\"} 0\n"),
            "{m}"
        );
        assert!(
            m.contains("conclave_connector_phone_legs_total{srtp=\"true\"} 1"),
            "{m}"
        );
        assert!(
            phone
                .log()
                .contains("SRTP is Enabled (cryptosuite=AES_CM_128_HMAC_SHA1_80)"),
            "{}",
            phone.log()
        );
        c.telephony.hangup(leg.call).await;
        leg.ended.wait_for(|e| *e).await.unwrap();
        phone_heard_meeting(&mut phone).await;
    })
    .await
    .expect("test timed out");
}

/// A phone whose RTP leaves from another address than its SDP names, as a
/// phone on a cluster node calling a pod does (its RTP socket is bound to
/// the wildcard address, so the kernel picks the pod bridge's address while
/// SDP names the node's): the connector must take the phone's audio from
/// where it really comes (SRTP authenticates it) and answer there
/// (symmetric RTP, RFC 4961), and the meeting hears the phone's tone as its
/// strongest component over the whole call, as participants measure it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_in_over_srtp_from_an_address_other_than_the_sdp_one() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = TempDir::new("bs-latch");
        let pki = pki(&dir);
        let mut c = connector(
            Transport::Tls,
            SrtpPolicy::Required,
            Some(pki.setup.clone()),
        )
        .await;
        let mut phone = Baresip::start_as(
            &dir.0,
            &phone_wav(&dir),
            BaresipOpts {
                transport: "tls",
                mediaenc: Some("srtp-mand"),
                tls: Some((pki.phone_pem.clone(), pki.ca_pem.clone())),
                dial: Some(format!("sip:+15550100@127.0.0.1:{}", c.local.port())),
                codecs: None,
                max_calls: None,
            },
            "127.0.0.2",
            "+15551234567",
            None,
        );
        let mut leg = c.legs.recv().await.expect("a phone leg");
        assert_eq!(
            leg.display_name, "Phone …4567",
            "only the number's last digits"
        );
        assert_eq!(
            leg.info.remote.ip().to_string(),
            "127.0.0.2",
            "SDP names the other address"
        );
        let heard = exchange(&mut leg, 4).await;
        assert_heard_tone(&heard, PHONE_TONE, "meeting hearing the phone");
        // Participants name the strongest frequency of everything they heard from the phone.
        let dominant =
            meeting_client::audio::dominant_frequency(&connector_node::bridge::upsample(&heard));
        assert!(
            (f64::from(PHONE_TONE) - dominant).abs() <= 10.0,
            "the phone's strongest component is {dominant} Hz"
        );
        let m = c.metrics.render();
        assert!(
            m.contains("conclave_connector_rtp_packets_dropped_total{reason=\"source\"} 0\n"),
            "{m}"
        );
        c.telephony.hangup(leg.call).await;
        leg.ended.wait_for(|e| *e).await.unwrap();
        phone_heard_meeting(&mut phone).await;
    })
    .await
    .expect("test timed out");
}

fn invite(i: usize, port: u16, body: &str) -> Vec<u8> {
    format!(
        "INVITE sip:+15550100@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKf{i}\r\n\
         From: <sip:flood@127.0.0.1>;tag={i}\r\nTo: <sip:+15550100@127.0.0.1>\r\nCall-ID: flood-{i}\r\n\
         CSeq: 1 INVITE\r\nContact: <sip:flood@127.0.0.1:{port}>\r\nContent-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sip_is_rejected_counted_and_survived() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = connector(Transport::Udp, SrtpPolicy::Preferred, None).await;
        let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = attacker.local_addr().unwrap().port();
        // Garbage, an oversized datagram, oversized headers.
        attacker.send_to(b"\x00\x01\x02 not sip", c.local).await.unwrap();
        attacker.send_to(&vec![b'A'; 30_000], c.local).await.unwrap();
        let huge_header = String::from_utf8(invite(1, port, "v=0"))
            .unwrap()
            .replace("CSeq: 1 INVITE", &format!("CSeq: 1 INVITE\r\nX-Junk: {}", "j".repeat(5000)));
        attacker.send_to(huge_header.as_bytes(), c.local).await.unwrap();
        // Bad SDP, then a flood of INVITEs from the same address, in bursts
        // until well over the limit has been counted: the kernel drops what
        // overflows the socket's buffer, all the more on a busy machine.
        attacker.send_to(&invite(2, port, "v=0\r\nm=audio x RTP/AVP 0\r\n"), c.local).await.unwrap();
        let mut sent = 0;
        while sent < 3_000 && c.stats.borrow().rate_limited < 50 {
            for _ in 0..50 {
                attacker.send_to(&invite(3 + sent, port, "v=0\r\n"), c.local).await.unwrap();
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = c
            .stats
            .wait_for(|s| s.parse_errors >= 3 && s.rate_limited >= 50)
            .await
            .unwrap()
            .to_owned();
        assert!((s.rate_limited as usize) < sent, "every INVITE was refused: {s:?}");
        // The bad-SDP INVITE was answered 488 with the reason in a Warning header.
        let mut buf = vec![0u8; 4096];
        let mut saw_488 = false;
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_secs(2), attacker.recv_from(&mut buf)).await
        {
            let text = String::from_utf8_lossy(&buf[..n]);
            if text.starts_with("SIP/2.0 488") && text.contains("Warning: 399 conclave") {
                saw_488 = true;
                break;
            }
        }
        assert!(saw_488, "no 488 with a reason for bad SDP");
        assert!(c.legs.try_recv().is_err(), "no leg from hostile input");
        // Still alive: OPTIONS from another address is answered.
        let probe = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let pport = probe.local_addr().unwrap().port();
        let options = format!(
            "OPTIONS sip:conclave@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{pport};branch=z9hG4bKo\r\n\
             From: <sip:p@127.0.0.1>;tag=1\r\nTo: <sip:conclave@127.0.0.1>\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\n\
             Content-Length: 0\r\n\r\n"
        );
        // Sent again every 500 ms, as a SIP client over UDP does: the flood's
        // backlog may still fill the socket's buffer and crowd out the first.
        let n = loop {
            probe.send_to(options.as_bytes(), c.local).await.unwrap();
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), probe.recv_from(&mut buf)).await {
                break r.unwrap().0;
            }
        };
        assert!(buf[..n].starts_with(b"SIP/2.0 200 OK"));
        let rate_limited = "conclave_connector_sip_messages_rejected_total{reason=\"rateLimited\"}";
        let m = common::metrics_containing(&c.metrics, rate_limited).await;
        assert!(m.contains(rate_limited), "{m}");
        assert!(m.contains("conclave_connector_sip_calls_refused_total{reason=\"badSdp\"}"), "{m}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_number_enters_meeting_by_dtmf() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        use connector_node::media::{dtmf, rtp};
        let mut c = connector(Transport::Udp, SrtpPolicy::Preferred, None).await;
        // Our own stack plays the phone; the test injects RFC 4733 events.
        let phone = connector(Transport::Udp, SrtpPolicy::Off, None).await;
        let peer = c.local;
        let phone_leg = phone
            .telephony
            .dial(
                peer,
                &format!("sip:999@127.0.0.1:{}", peer.port()),
                MeetingId::new("x").unwrap(),
            )
            .await
            .unwrap();
        assert!(
            c.legs.try_recv().is_err(),
            "no leg before the meeting number"
        );
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut seq = 1u16;
        for (i, d) in "42#".chars().enumerate() {
            for p in dtmf::event_payloads(d, 4) {
                let pkt = rtp::build(false, 101, seq, 8000 * (i as u32 + 1), 99, &p);
                seq += 1;
                sock.send_to(&pkt, phone_leg.info.remote).await.unwrap();
            }
        }
        let leg = c.legs.recv().await.expect("leg after #");
        assert_eq!(leg.meeting.as_str(), "42");
        assert!(
            c.metrics
                .render()
                .contains("conclave_connector_dtmf_digits_total 3")
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_out_over_tls_with_srtp_required() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = TempDir::new("bs-tls-out");
        let pki = pki(&dir);
        let mut phone = Baresip::start(
            &dir.0,
            &phone_wav(&dir),
            BaresipOpts {
                transport: "tls",
                mediaenc: Some("srtp-mand"),
                tls: Some((pki.phone_pem.clone(), pki.ca_pem.clone())),
                dial: None,
                codecs: None,
                max_calls: None,
            },
        );
        let c = connector(
            Transport::Tls,
            SrtpPolicy::Required,
            Some(pki.setup.clone()),
        )
        .await;
        // baresip serves SIP over TLS one port above its UDP/TCP port.
        let tls_port = phone.port + 1;
        let peer: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();
        let mut leg = c
            .telephony
            .dial(
                peer,
                &format!("sip:phone@127.0.0.1:{tls_port};transport=tls"),
                MeetingId::new("m2").unwrap(),
            )
            .await
            .unwrap_or_else(|e| panic!("dial failed: {e}\n{}", phone.log()));
        assert_eq!(leg.info.srtp, Some("AES_CM_128_HMAC_SHA1_80"));
        let heard = exchange(&mut leg, 4).await;
        assert_heard_tone(
            &heard,
            PHONE_TONE,
            "meeting hearing the phone over TLS+SRTP",
        );
        c.telephony.hangup(leg.call).await;
        leg.ended.wait_for(|e| *e).await.unwrap();
        phone_heard_meeting(&mut phone).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_in_negotiates_opus_when_the_phone_prefers_it() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = TempDir::new("bs-opus");
        let mut c = connector(Transport::Udp, SrtpPolicy::Preferred, None).await;
        let mut phone = Baresip::start(
            &dir.0,
            &phone_wav(&dir),
            BaresipOpts {
                transport: "udp",
                mediaenc: None,
                tls: None,
                dial: Some(format!("sip:+15550100@127.0.0.1:{}", c.local.port())),
                codecs: Some("opus/48000/2"),
                max_calls: None,
            },
        );
        let mut leg = c.legs.recv().await.expect("a phone leg");
        assert_eq!(leg.info.codec, connector_node::sip::sdp::Codec::Opus);
        let heard = exchange(&mut leg, 4).await;
        assert_heard_tone(&heard, PHONE_TONE, "meeting hearing the phone over Opus");
        c.telephony.hangup(leg.call).await;
        leg.ended.wait_for(|e| *e).await.unwrap();
        phone_heard_meeting(&mut phone).await;
    })
    .await
    .expect("test timed out");
}
