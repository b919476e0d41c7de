//! The connector's side of a meeting: it joins through a relay as a client
//! (meeting-client's sans-IO session), so its media is end-to-end encrypted
//! like everyone's, and it appears to the relay as a member.
//!
//! Credentials come from the KMS assignment in production; until the KMS
//! assignment API exists they are the dev credentials conclave-client uses
//! (a ticket signed with a dev seed and a shared epoch key).

use meeting_client::join::{Credentials, flush, relay_socket};
use meeting_client::session::{Event, Session};
use meeting_proto::media_keys::EpochKey;
use meeting_proto::wire::{StreamKind, flags};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeetingEvent {
    Joined,
    /// A decrypted Opus packet from another participant.
    Audio {
        sender: u16,
        seq: u32,
        packet: Vec<u8>,
    },
    Chat {
        sender: u16,
        text: String,
    },
    /// The relay refused or the link ended; the reason is for logs and status.
    Left(String),
}

/// A running meeting link. Dropping `audio` / calling `leave` ends it.
#[derive(Debug)]
pub struct MeetingLink {
    pub sender_index: u16,
    pub events: mpsc::Receiver<MeetingEvent>,
    /// Opus packets (20 ms) this connector sends into the meeting.
    pub audio: mpsc::Sender<Vec<u8>>,
    /// New epoch keys from the KMS (after a leave, the meeting rotates).
    pub keys: mpsc::Sender<EpochKey>,
    leave: Option<tokio::sync::oneshot::Sender<()>>,
}

impl MeetingLink {
    /// Say BYE to the relay and stop.
    pub fn leave(&mut self) {
        if let Some(l) = self.leave.take() {
            let _ = l.send(());
        }
    }
}

/// Start joining; events (first `Joined`) arrive on the link.
pub async fn join(creds: Credentials, join_timeout: Duration) -> std::io::Result<MeetingLink> {
    let socket = relay_socket(creds.relay).await?;
    let (ev_tx, events) = mpsc::channel(512);
    let (audio_tx, mut audio_rx) = mpsc::channel::<Vec<u8>>(100);
    let (leave_tx, mut leave_rx) = tokio::sync::oneshot::channel::<()>();
    let (keys_tx, mut keys_rx) = mpsc::channel::<EpochKey>(4);
    let sender_index = creds.sender_index;
    tokio::spawn(async move {
        let start = Instant::now();
        let mut session = Session::new(
            creds.meeting,
            creds.sender_index,
            creds.ticket,
            creds.key,
            rand::random(),
            start,
        );
        let join_deadline = tokio::time::Instant::now() + join_timeout;
        let mut ts: u32 = 0;
        let mut buf = vec![0u8; 2048];
        let why = loop {
            if flush(&mut session, &socket).await.is_err() {
                break "relay unreachable".to_string();
            }
            let wake = tokio::time::Instant::from_std(session.poll_timeout());
            tokio::select! {
                _ = &mut leave_rx => break "left".to_string(),
                _ = tokio::time::sleep_until(join_deadline), if !session.is_joined() => {
                    break "no WELCOME from the relay".to_string();
                }
                _ = tokio::time::sleep_until(wake) => session.handle_timeout(Instant::now()),
                r = socket.recv(&mut buf) => {
                    if let Ok(n) = r {
                        session.handle_datagram(&buf[..n], Instant::now());
                    }
                }
                Some(k) = keys_rx.recv() => session.set_epoch(k, Instant::now()),
                p = audio_rx.recv() => {
                    let Some(p) = p else { break "left".to_string() };
                    if session.is_joined() {
                        let _ = session.send_media(StreamKind::Audio, flags::FRAME_START | flags::FRAME_END, ts, &p);
                        ts = ts.wrapping_add(960);
                    }
                }
            }
            let mut ended = None;
            while let Some(ev) = session.poll_event() {
                let out = match ev {
                    Event::Joined { .. } => MeetingEvent::Joined,
                    Event::Rejected(r) => {
                        ended = Some(format!("relay refused the join: {r:?}"));
                        continue;
                    }
                    Event::Media(o) if o.header.kind == StreamKind::Audio => MeetingEvent::Audio {
                        sender: o.header.sender,
                        seq: o.header.seq,
                        packet: o.payload,
                    },
                    Event::Chat { sender, text, .. } => MeetingEvent::Chat { sender, text },
                    _ => continue,
                };
                if matches!(out, MeetingEvent::Audio { .. }) {
                    // A slow consumer loses media (concealed downstream) rather than stalling the link.
                    let _ = ev_tx.try_send(out);
                } else if ev_tx.send(out).await.is_err() {
                    ended = Some("consumer gone".to_string());
                }
            }
            if let Some(e) = ended {
                break e;
            }
        };
        session.leave();
        let _ = flush(&mut session, &socket).await;
        let _ = ev_tx.send(MeetingEvent::Left(why)).await;
    });
    Ok(MeetingLink {
        sender_index,
        events,
        audio: audio_tx,
        keys: keys_tx,
        leave: Some(leave_tx),
    })
}
