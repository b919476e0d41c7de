//! The tokio shell around [`crate::core::Relay`]: one task owns the routing
//! table and the media socket, so forwarding needs no locks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use crate::core::{Action, Relay};
use crate::metrics::{Kind, RelayMetrics};
use crate::udp::{MediaSocket, Outgoing, RecvBuffers};

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Health {
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    /// Fired when draining starts, so the KMS hears it at once and moves
    /// the meetings while this relay still forwards, not a heartbeat later.
    pub drain_started: tokio::sync::Notify,
}

/// Commands from the rest of the process to the forwarding task.
#[derive(Debug)]
pub enum Control {
    /// Tell every bound client to move and stop taking joins.
    Drain { forward_for: Duration },
    /// Report (meetings, participants) for KMS heartbeats.
    Load(tokio::sync::oneshot::Sender<(usize, usize)>),
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Receive batches handled per wake-up before timers and control get a turn.
pub const BATCHES_PER_WAKEUP: usize = 64;

/// Handles one receive batch and sends everything it produced in one go
/// (sendmmsg/GSO, [`MediaSocket::send_batch`]).
async fn forward_batch(
    socket: &MediaSocket,
    relay: &mut Relay,
    metrics: &RelayMetrics,
    bufs: &RecvBuffers,
    n: usize,
) {
    let now = unix_now();
    let mut out: Vec<Outgoing<'_>> = Vec::new();
    let mut kinds: Vec<Kind> = Vec::new();
    let mut replies: Vec<(std::net::SocketAddr, Vec<u8>)> = Vec::new();
    // Media datagrams that were forwarded, for the latency histogram.
    let mut forwarded: Vec<Instant> = Vec::new();
    for i in 0..n {
        for (from, data) in bufs.datagrams(i) {
            let started = Instant::now();
            match relay.handle(from, data, now) {
                Action::None => {}
                Action::Reply(bytes) => replies.push((from, bytes)),
                Action::Forward { kind, to } => {
                    for dest in to {
                        out.push(Outgoing { to: *dest, data });
                        kinds.push(kind);
                    }
                    if matches!(kind, Kind::Media(_)) && !to.is_empty() {
                        forwarded.push(started);
                    }
                }
            }
        }
    }
    for (to, bytes) in &replies {
        out.push(Outgoing {
            to: *to,
            data: bytes,
        });
        kinds.push(Kind::Control);
    }
    socket
        .send_batch(&out, |k, r| match r {
            Ok(()) => metrics.sent(kinds[k], out[k].data.len()),
            Err(e) => {
                metrics.send_error();
                tracing::debug!(error = %e, to = %out[k].to, "send failed");
            }
        })
        .await;
    for started in forwarded {
        metrics
            .forwarding_latency
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Forwards until `control` closes.
pub async fn run(
    socket: MediaSocket,
    mut relay: Relay,
    metrics: Arc<RelayMetrics>,
    health: Arc<Health>,
    mut control: mpsc::Receiver<Control>,
) {
    let mut bufs = RecvBuffers::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    health.ready.store(true, Ordering::Relaxed);
    loop {
        tokio::select! {
            r = bufs.recv_from(&socket) => {
                let mut r = r;
                // Under load, keep draining the socket without going back
                // through select! (timers, control) for every batch; bounded
                // so expiry and drain still run.
                for batch in 1..=BATCHES_PER_WAKEUP {
                    match r {
                        Ok(n) => forward_batch(&socket, &mut relay, &metrics, &bufs, n).await,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            metrics.recv_error();
                            tracing::debug!(error = %e, "receive failed");
                            break;
                        }
                    }
                    // Receive the next batch only if this wake-up will
                    // forward it: one received after the last turn would be
                    // overwritten by the next receive, unforwarded and
                    // uncounted.
                    if batch == BATCHES_PER_WAKEUP {
                        break;
                    }
                    r = bufs.try_recv_from(&socket);
                }
            }
            _ = tick.tick() => {
                relay.expire(unix_now());
            }
            c = control.recv() => match c {
                Some(Control::Drain { forward_for }) => {
                    health.draining.store(true, Ordering::Relaxed);
                    health.ready.store(false, Ordering::Relaxed);
                    health.drain_started.notify_one();
                    let ms = forward_for.as_millis().min(u32::MAX as u128) as u32;
                    let (msg, to) = relay.start_drain(ms);
                    tracing::info!(clients = to.len(), "draining: telling clients to move");
                    for dest in to {
                        send(&socket, &metrics, dest, &msg, Kind::Control).await;
                    }
                }
                Some(Control::Load(reply)) => {
                    let _ = reply.send((relay.meetings(), relay.participants()));
                }
                None => break,
            }
        }
    }
}

async fn send(
    socket: &MediaSocket,
    metrics: &RelayMetrics,
    to: std::net::SocketAddr,
    data: &[u8],
    kind: Kind,
) {
    match socket.send_to(to, data).await {
        Ok(()) => metrics.sent(kind, data.len()),
        Err(e) => {
            metrics.send_error();
            tracing::debug!(error = %e, %to, "send failed");
        }
    }
}
