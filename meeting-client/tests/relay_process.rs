//! Process-level tests: a real `media-node` and real `conclave-client`
//! processes on 127.0.0.1, with dev tickets signed by the test (no KMS).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Child;
use std::time::Duration;

use common::*;
use meeting_proto::ids::MeetingId;
use meeting_proto::wire::{Packet, RejectReason, RoutingHeader, StreamKind, flags};

const TONES: [f64; 3] = [440.0, 660.0, 880.0];

#[test]
fn three_participants_exchange_audio_and_chat_through_a_relay_process() {
    let relay = start_relay("");
    let out = temp_dir("audio");
    let children: Vec<Child> = (0..3u16)
        .map(|i| {
            join_cmd(relay.media, "standup", i + 1, TONES[i as usize], 3.0)
                .args(["--chat", &format!("hello from {}", i + 1)])
                .arg("--out-dir")
                .arg(out.join(format!("p{}", i + 1)))
                .spawn()
                .unwrap()
        })
        .collect();
    let reports: Vec<serde_json::Value> = children.into_iter().map(report).collect();
    for (i, r) in reports.iter().enumerate() {
        let me = i + 1;
        assert_eq!(r["joined"], true, "{r}");
        assert!(
            r["stats"]["open_failures"].as_object().unwrap().is_empty(),
            "participant {me} had frames fail to open: {r}"
        );
        for other in (1..=3).filter(|o| *o != me) {
            let frames = r["audio_frames"][other.to_string()].as_u64().unwrap_or(0);
            // 3 s at 50 frames/s = 150; start times differ by process spawn.
            assert!(
                frames >= 100,
                "participant {me} decoded {frames} frames of {other}: {r}"
            );
            let hz = r["dominant_hz"][other.to_string()].as_f64().unwrap();
            assert!(
                (hz - TONES[other - 1]).abs() <= 10.0,
                "participant {me} hears {hz} Hz from {other}, who sent {} Hz",
                TONES[other - 1]
            );
            // The WAV on disk carries that tone far above the other two.
            let pcm =
                meeting_client::audio::read_wav(&out.join(format!("p{me}/sender-{other}.wav")))
                    .unwrap();
            let want = meeting_client::audio::tone_power(&pcm, TONES[other - 1]);
            for f in TONES.iter().filter(|f| **f != TONES[other - 1]) {
                assert!(want > 50.0 * meeting_client::audio::tone_power(&pcm, *f));
            }
            let chats: Vec<String> = r["chats"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["from"] == other)
                .map(|c| c["text"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(chats, vec![format!("hello from {other}")]);
        }
        assert!(
            r["audio_frames"].get(me.to_string()).is_none(),
            "own audio echoed back"
        );
    }
    let (_, metrics) = http_get(relay.http, "/metrics");
    assert!(
        metric(
            &metrics,
            r#"conclave_relay_packets_sent_total{kind="audio"}"#
        ) >= 600.0
    );
    assert!(
        metric(
            &metrics,
            r#"conclave_relay_packets_sent_total{kind="chat"}"#
        ) >= 6.0
    );
    let _ = std::fs::remove_dir_all(&out);
}

fn udp() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn hello(sock: &UdpSocket, relay: SocketAddr, ticket: &[u8]) -> Packet<'static> {
    sock.send_to(&Packet::Hello { nonce: 1, ticket }.to_vec().unwrap(), relay)
        .unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    match Packet::parse(&buf[..n]).unwrap() {
        Packet::Welcome {
            nonce,
            slot,
            sender,
            keepalive_secs,
        } => Packet::Welcome {
            nonce,
            slot,
            sender,
            keepalive_secs,
        },
        Packet::Reject { nonce, reason } => Packet::Reject { nonce, reason },
        other => panic!("unexpected reply {other:?}"),
    }
}

fn media(slot: u32, sender: u16, body: &'static [u8]) -> Vec<u8> {
    Packet::Media {
        header: RoutingHeader {
            slot,
            sender,
            kind: StreamKind::Audio,
            flags: flags::FRAME_START | flags::FRAME_END,
            seq: 0,
            timestamp: 0,
        },
        header_bytes: &[],
        payload: body,
    }
    .to_vec()
    .unwrap()
}

#[test]
fn relay_drops_unbound_spoofed_expired_and_forged_traffic_and_counts_it() {
    let relay = start_relay("");
    let iss = issuer();
    let m = MeetingId::new("drops").unwrap();
    let (a, b) = (udp(), udp());
    let Packet::Welcome { slot, .. } = hello(&a, relay.media, &iss.ticket(&m, 1, 60).unwrap())
    else {
        panic!("a not welcomed")
    };
    hello(&b, relay.media, &iss.ticket(&m, 2, 60).unwrap());

    // Legitimate media reaches the other member byte for byte.
    let ok = media(slot, 1, b"ciphertext");
    a.send_to(&ok, relay.media).unwrap();
    let mut buf = [0u8; 1500];
    let n = b.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &ok[..]);

    // Unbound source, spoofed sender index, another meeting's slot.
    let stranger = udp();
    stranger
        .send_to(&media(slot, 1, b"x"), relay.media)
        .unwrap();
    a.send_to(&media(slot, 2, b"x"), relay.media).unwrap();
    a.send_to(&media(slot + 1, 1, b"x"), relay.media).unwrap();
    // Expired ticket and a ticket signed by someone other than the KMS.
    let expired = iss.ticket_until(&m, 3, 1).unwrap();
    assert_eq!(
        hello(&udp(), relay.media, &expired),
        Packet::Reject {
            nonce: 1,
            reason: RejectReason::Expired
        }
    );
    let forged = meeting_client::dev::DevIssuer::new([9u8; 32], RELAY_ID)
        .ticket(&m, 3, 60)
        .unwrap();
    assert_eq!(
        hello(&udp(), relay.media, &forged),
        Packet::Reject {
            nonce: 1,
            reason: RejectReason::BadTicket
        }
    );
    // A final legit packet: once it arrives, the relay has handled everything before it.
    let marker = media(slot, 1, b"marker");
    a.send_to(&marker, relay.media).unwrap();
    let n = b.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &marker[..], "b received a dropped packet");

    let (status, text) = http_get(relay.http, "/metrics");
    assert_eq!(status, 200);
    for reason in [
        "unbound",
        "spoofed_sender",
        "other_meeting",
        "expired_ticket",
        "bad_ticket",
    ] {
        let v = metric(
            &text,
            &format!("conclave_relay_dropped_packets_total{{reason=\"{reason}\"}}"),
        );
        assert_eq!(v, 1.0, "drops for {reason}:\n{text}");
    }
    assert_eq!(metric(&text, "conclave_relay_participants"), 2.0);
    assert_eq!(metric(&text, "conclave_relay_meetings"), 1.0);
    assert_eq!(http_get(relay.http, "/readyz").0, 200);
}

/// Forwards between one client and the relay, flipping one bit of the
/// routing header of every MEDIA datagram on its way to the client.
fn tampering_proxy(relay: SocketAddr) -> (SocketAddr, std::thread::JoinHandle<u64>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let addr = sock.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let mut client: Option<SocketAddr> = None;
        let mut tampered = 0u64;
        let mut buf = [0u8; 2048];
        // Ends when traffic stops for the read timeout.
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let d = &mut buf[..n];
            if from == relay {
                if let Some(c) = client {
                    if matches!(Packet::parse(d), Ok(Packet::Media { .. })) {
                        d[14] ^= 0x01; // low bit of the timestamp
                        tampered += 1;
                    }
                    let _ = sock.send_to(d, c);
                }
            } else {
                client = Some(from);
                let _ = sock.send_to(d, relay);
            }
        }
        tampered
    });
    (addr, h)
}

#[test]
fn a_relay_that_alters_the_routing_header_is_caught_by_the_receiver() {
    let relay = start_relay("");
    let (proxy, proxy_thread) = tampering_proxy(relay.media);
    let honest = join_cmd(relay.media, "tamper", 1, 440.0, 2.0)
        .args(["--chat", "secret plan"])
        .spawn()
        .unwrap();
    let victim = join_cmd(proxy, "tamper", 2, 660.0, 2.0).spawn().unwrap();
    let honest = report(honest);
    let victim = report(victim);
    assert!(proxy_thread.join().unwrap() >= 50);
    assert_eq!(victim["joined"], true);
    assert!(
        victim["audio_frames"].as_object().unwrap().is_empty(),
        "{victim}"
    );
    assert!(victim["chats"].as_array().unwrap().is_empty(), "{victim}");
    let failures = victim["stats"]["open_failures"]["authentication"]
        .as_u64()
        .unwrap_or(0);
    assert!(failures >= 50, "rejected frames must be counted: {victim}");
    // The untampered direction works.
    assert!(
        honest["audio_frames"]["2"].as_u64().unwrap_or(0) >= 50,
        "{honest}"
    );
}

#[test]
fn sigterm_drains_tells_clients_to_move_and_turns_unready() {
    let relay = start_relay("drainSeconds: 2\n");
    let client = join_cmd(relay.media, "drain", 1, 440.0, 4.0)
        .spawn()
        .unwrap();
    // Wait until the client is bound, observed through the relay's own gauge.
    let bound = (0..100).any(|_| {
        let (_, text) = http_get(relay.http, "/metrics");
        let ok = metric(&text, "conclave_relay_participants") == 1.0;
        if !ok {
            std::thread::sleep(Duration::from_millis(50));
        }
        ok
    });
    assert!(bound, "client never bound");
    signal(relay.child.id(), "TERM");
    let unready = (0..40).any(|_| {
        let (status, body) = http_get(relay.http, "/readyz");
        let draining = status == 503 && body == "draining";
        if !draining {
            std::thread::sleep(Duration::from_millis(50));
        }
        draining
    });
    assert!(unready, "/readyz did not report draining after SIGTERM");
    let r = report(client);
    assert_eq!(r["moved"], true, "client was not told to move: {r}");
}

#[test]
fn load_reports_delivery_and_latency_with_no_decrypt_failures() {
    let relay = start_relay("");
    let out = wait_bounded(
        std::process::Command::new(bin("conclave-client"))
            .args([
                "load",
                "--relay",
                &relay.media.to_string(),
                "--relay-id",
                RELAY_ID,
            ])
            .args(["--dev-ticket-seed", SEED_HEX])
            .args([
                "--meetings",
                "2",
                "--participants",
                "3",
                "--duration",
                "2",
                "--video",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let r = &v["report"];
    assert_eq!(r["joined"], 6, "{r}");
    assert_eq!(r["decrypt_failures"], 0, "{r}");
    // 2 s of audio (100) + video (~60 frames, 4-22 datagrams each) per sender.
    assert!(r["packets_sent"].as_u64().unwrap() > 6 * 300, "{r}");
    assert!(r["delivered_ratio"].as_f64().unwrap() > 0.9, "{r}");
    assert!(r["latency_p99_ms"].as_f64().unwrap() > 0.0, "{r}");
}
