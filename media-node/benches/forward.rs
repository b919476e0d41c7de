//! Relay forwarding against a plain UDP reflector built on the same socket
//! code (quinn-udp recvmmsg, batched send: sendmmsg and UDP GSO), in the same
//! run, on loopback.
//!
//! 1. Maximum rate: a generator thread floods 200-byte MEDIA datagrams from a
//!    bound participant; the figure is datagrams forwarded per second by the
//!    relay (one receiver, fan-out 1) vs by the reflector (to one sink).
//!    Both forwarders run on a single-threaded runtime: one core. The two
//!    are flooded in alternating rounds (each forwarder's backlog drained
//!    before the next round) and the figures are medians, so load from
//!    elsewhere on a shared machine does not land on one side only.
//! 2. Latency: the generator paces at half the relay's maximum rate, a sink
//!    thread timestamps arrivals; p99 one-way latency through the relay vs
//!    through the reflector at the same rate.
//!
//! Prints `BENCH` lines.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use media_node::core::Relay;
use media_node::metrics::{Kind, RelayMetrics};
use media_node::server::{self, Health};
use media_node::udp::{MediaSocket, Outgoing, RecvBuffers};
use meeting_proto::config::relay::RelayLimits;
use meeting_proto::ids::{MeetingId, ParticipantId};
use meeting_proto::ticket::Ticket;
use meeting_proto::wire::{Packet, RoutingHeader, StreamKind, flags};

const RELAY: &str = "bench/relay-0";
const FLOOD_ROUND: Duration = Duration::from_millis(600);
const ROUNDS: usize = 5;
const PACED: Duration = Duration::from_secs(3);

fn bench(name: &str, value: f64, unit: &str, baseline: Option<f64>) {
    let b = baseline.map_or("null".to_string(), |b| format!("{b}"));
    println!(
        "BENCH {{\"name\": \"{name}\", \"value\": {value}, \"unit\": \"{unit}\", \"baseline\": {b}}}"
    );
}

/// A forwarder under test running on its own single-threaded runtime.
struct Forwarder {
    addr: SocketAddr,
    forwarded: Box<dyn Fn() -> u64 + Send>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the receive loop so it sees the flag.
        let _ = UdpSocket::bind("127.0.0.1:0").and_then(|s| s.send_to(b"x", self.addr));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn reflector(sink: SocketAddr) -> Forwarder {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let (c, s) = (count.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let sock = MediaSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            tx.send(sock.local_addr().unwrap()).unwrap();
            let mut bufs = RecvBuffers::default();
            while !s.load(Ordering::Relaxed) {
                let n = bufs.recv_from(&sock).await.unwrap_or(0);
                let out: Vec<Outgoing<'_>> = (0..n)
                    .flat_map(|i| bufs.datagrams(i))
                    .map(|(_, data)| Outgoing { to: sink, data })
                    .collect();
                sock.send_batch(&out, |_, r| {
                    if r.is_ok() {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .await;
            }
        });
    });
    Forwarder {
        addr: rx.recv().unwrap(),
        forwarded: Box::new(move || count.load(Ordering::Relaxed)),
        stop,
        thread: Some(thread),
    }
}

fn relay(key: &SigningKey) -> Forwarder {
    let metrics = Arc::new(RelayMetrics::new());
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let m = metrics.clone();
    let vk = key.verifying_key();
    let s = stop.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let sock = MediaSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            tx.send(sock.local_addr().unwrap()).unwrap();
            let relay = Relay::new(RELAY.into(), vk, RelayLimits::default(), m.clone());
            let (ctl_tx, ctl_rx) = tokio::sync::mpsc::channel(1);
            let run = server::run(sock, relay, m, Arc::new(Health::default()), ctl_rx);
            tokio::pin!(run);
            loop {
                tokio::select! {
                    _ = &mut run => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {
                        if s.load(Ordering::Relaxed) { drop(ctl_tx); break; }
                    }
                }
            }
        });
    });
    Forwarder {
        addr: rx.recv().unwrap(),
        forwarded: Box::new(move || metrics.sent_packets(Kind::Media(StreamKind::Audio))),
        stop,
        thread: Some(thread),
    }
}

fn hello(sock: &UdpSocket, relay: SocketAddr, key: &SigningKey, sender: u16) -> u32 {
    let ticket = Ticket {
        meeting: MeetingId::new("bench").unwrap(),
        participant: ParticipantId(sender as u64),
        sender_index: sender,
        relay: RELAY.into(),
        not_after: u64::MAX,
    }
    .sign(key)
    .unwrap();
    sock.send_to(
        &Packet::Hello {
            nonce: 1,
            ticket: &ticket,
        }
        .to_vec()
        .unwrap(),
        relay,
    )
    .unwrap();
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf).unwrap();
    match Packet::parse(&buf[..n]).unwrap() {
        Packet::Welcome { slot, .. } => slot,
        other => panic!("{other:?}"),
    }
}

fn media(slot: u32, seq: u32, stamp_ns: u64) -> Vec<u8> {
    let mut payload = [0u8; 200 - 18];
    payload[..8].copy_from_slice(&stamp_ns.to_be_bytes());
    Packet::Media {
        header: RoutingHeader {
            slot,
            sender: 1,
            kind: StreamKind::Audio,
            flags: flags::FRAME_START | flags::FRAME_END,
            seq,
            timestamp: seq,
        },
        header_bytes: &[],
        payload: &payload,
    }
    .to_vec()
    .unwrap()
}

/// Floods for FLOOD_ROUND and returns forwarded datagrams per second.
fn flood(sender: &UdpSocket, target: SocketAddr, slot: u32, fwd: &Forwarder) -> f64 {
    let d = media(slot, 0, 0);
    let before = (fwd.forwarded)();
    let start = Instant::now();
    while start.elapsed() < FLOOD_ROUND {
        for _ in 0..64 {
            let _ = sender.send_to(&d, target);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let pps = ((fwd.forwarded)() - before) as f64 / elapsed;
    // Let the forwarder work off its socket backlog before anything else runs.
    let mut last = (fwd.forwarded)();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = (fwd.forwarded)();
        if now == last {
            break;
        }
        last = now;
    }
    pps
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Paces `rate` datagrams/s for PACED; returns p99 one-way latency (ms) seen by `sink`.
fn paced_p99(
    sender: &UdpSocket,
    target: SocketAddr,
    slot: u32,
    rate: f64,
    sink: &UdpSocket,
    clock: Instant,
) -> f64 {
    let done = Arc::new(AtomicBool::new(false));
    let s2 = sink.try_clone().unwrap();
    s2.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let d2 = done.clone();
    let collector = std::thread::spawn(move || {
        let mut lat = Vec::new();
        let mut buf = [0u8; 1500];
        while !d2.load(Ordering::Relaxed) {
            if let Ok(n) = s2.recv(&mut buf)
                && n == 200
            {
                let sent = u64::from_be_bytes(buf[18..26].try_into().unwrap());
                // Flood datagrams carry no stamp; only paced ones count.
                if sent != 0 {
                    lat.push((clock.elapsed().as_nanos() as u64).saturating_sub(sent));
                }
            }
        }
        lat
    });
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut next = start;
    let mut seq = 0u32;
    while start.elapsed() < PACED {
        while Instant::now() < next {
            std::hint::spin_loop();
        }
        let _ = sender.send_to(&media(slot, seq, clock.elapsed().as_nanos() as u64), target);
        seq += 1;
        next += interval;
    }
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    let mut lat = collector.join().unwrap();
    lat.sort_unstable();
    if lat.is_empty() {
        return f64::NAN;
    }
    lat[(lat.len() - 1) * 99 / 100] as f64 / 1e6
}

fn main() {
    let key = SigningKey::from_bytes(&[1u8; 32]);
    let clock = Instant::now();

    // Sinks: one for the reflector; the relay's receiver is a bound member.
    let reflector_sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let refl = reflector(reflector_sink.local_addr().unwrap());
    let refl_sender = UdpSocket::bind("127.0.0.1:0").unwrap();

    let relay = relay(&key);
    let member_sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    member_sender
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let member_sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    member_sink
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let slot = hello(&member_sender, relay.addr, &key, 1);
    hello(&member_sink, relay.addr, &key, 2);

    let (mut refl_rounds, mut relay_rounds, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let r = flood(&refl_sender, refl.addr, 1, &refl);
        let m = flood(&member_sender, relay.addr, slot, &relay);
        refl_rounds.push(r);
        relay_rounds.push(m);
        ratios.push(m / r);
    }
    let (reflector_pps, relay_pps) = (median(refl_rounds), median(relay_rounds));

    bench(
        "relay_forward_pps",
        relay_pps,
        "packets/s",
        Some(reflector_pps),
    );
    bench("relay_forward_ratio", median(ratios), "ratio", None);

    // Latency at half the relay's maximum rate, same rate for both paths.
    let rate = (relay_pps / 2.0).max(1000.0);
    // Let both forwarders work off the flood's backlog, then drain the sinks.
    std::thread::sleep(Duration::from_secs(1));
    for s in [&reflector_sink, &member_sink] {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1500];
        while s.recv(&mut b).is_ok() {}
        s.set_nonblocking(false).unwrap();
    }
    let relay_p99 = paced_p99(&member_sender, relay.addr, slot, rate, &member_sink, clock);
    let refl_p99 = paced_p99(&refl_sender, refl.addr, 1, rate, &reflector_sink, clock);
    bench(
        "relay_added_latency_p99_ms",
        relay_p99,
        "ms",
        Some(refl_p99),
    );
    bench("relay_latency_test_rate", rate, "packets/s", None);
}
