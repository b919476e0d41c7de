//! The forwarding task handles at most `BATCHES_PER_WAKEUP` receive batches
//! per wake-up before timers and control get a turn. A backlog longer than
//! that must still be forwarded whole: no batch may be received at the end
//! of a wake-up and then overwritten, unforwarded and uncounted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use media_node::core::Relay;
use media_node::metrics::{Kind, RelayMetrics};
use media_node::server::{self, BATCHES_PER_WAKEUP, Health};
use media_node::udp::{BATCH, MediaSocket};
use meeting_proto::config::relay::RelayLimits;
use meeting_proto::ids::{MeetingId, ParticipantId};
use meeting_proto::ticket::Ticket;
use meeting_proto::wire::{Packet, RoutingHeader, StreamKind, flags};
use tokio::net::UdpSocket;
use tokio::time::timeout;

const RELAY: &str = "test/relay-0";

async fn hello(sock: &UdpSocket, relay: SocketAddr, key: &SigningKey, sender: u16) -> u32 {
    let ticket = Ticket {
        meeting: MeetingId::new("backlog").unwrap(),
        participant: ParticipantId(u64::from(sender)),
        sender_index: sender,
        relay: RELAY.into(),
        not_after: u64::MAX,
    }
    .sign(key)
    .unwrap();
    let hello = Packet::Hello {
        nonce: 1,
        ticket: &ticket,
    };
    sock.send_to(&hello.to_vec().unwrap(), relay).await.unwrap();
    let mut buf = [0u8; 1500];
    let n = timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("no WELCOME within 5 s")
        .unwrap();
    match Packet::parse(&buf[..n]).unwrap() {
        Packet::Welcome { slot, .. } => slot,
        other => panic!("expected WELCOME, got {other:?}"),
    }
}

// Single-threaded runtime: while the test sends without awaiting, the relay
// task cannot run, so it later finds the whole backlog queued at once.
#[tokio::test]
async fn a_backlog_longer_than_one_wakeup_is_forwarded_whole() {
    let key = SigningKey::from_bytes(&[4; 32]);
    let metrics = Arc::new(RelayMetrics::new());
    let socket = MediaSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let relay = Relay::new(
        RELAY.into(),
        key.verifying_key(),
        RelayLimits::default(),
        metrics.clone(),
    );
    let (control, control_rx) = tokio::sync::mpsc::channel(1);
    let task = tokio::spawn(server::run(
        socket,
        relay,
        metrics.clone(),
        Arc::new(Health::default()),
        control_rx,
    ));
    let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    nix::sys::socket::setsockopt(&sink, nix::sys::socket::sockopt::RcvBuf, &(4 << 20)).unwrap();
    let slot = hello(&sender, addr, &key, 1).await;
    hello(&sink, addr, &key, 2).await;

    // Full batches for every turn of one wake-up, and half a batch more.
    let total = BATCHES_PER_WAKEUP * BATCH + BATCH / 2;
    for seq in 0..total as u32 {
        let media = Packet::Media {
            header: RoutingHeader {
                slot,
                sender: 1,
                kind: StreamKind::Audio,
                flags: flags::FRAME_START | flags::FRAME_END,
                seq,
                timestamp: seq,
            },
            header_bytes: &[],
            payload: &[7; 100],
        };
        sender
            .try_send_to(&media.to_vec().unwrap(), addr)
            .expect("loopback send");
    }

    let mut got = 0;
    let mut buf = [0u8; 1500];
    while got < total {
        match timeout(Duration::from_secs(5), sink.recv(&mut buf)).await {
            Ok(r) => {
                r.unwrap();
                got += 1;
            }
            Err(_) => break,
        }
    }
    assert_eq!(
        got, total,
        "datagrams forwarded out of a {total}-datagram backlog (the relay's receive \
         buffer holds it where net.core.rmem_max allows a few MB)"
    );
    assert_eq!(
        metrics.sent_packets(Kind::Media(StreamKind::Audio)),
        total as u64
    );
    drop(control);
    timeout(Duration::from_secs(5), task)
        .await
        .expect("relay task ends when control closes")
        .unwrap();
}
