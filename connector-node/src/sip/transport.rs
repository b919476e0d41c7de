//! The tokio shell around the sans-IO user agent: UDP, TCP or TLS sockets,
//! stream framing, timers, and the command/event channels.

use crate::sip::message::{self, ParseError};
use crate::sip::ua::{CallRef, Event, Transport, UaStats, UserAgent};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};

/// Bytes buffered per stream connection before a message must be complete.
const STREAM_BUF: usize = message::MAX_MESSAGE_LEN * 2;
/// Most simultaneous stream connections.
const MAX_CONNECTIONS: usize = 256;

pub enum Command {
    Invite {
        peer: SocketAddr,
        uri: String,
        offer: Vec<u8>,
        reply: oneshot::Sender<Result<CallRef, crate::sip::ua::UaError>>,
    },
    Answer(CallRef, Vec<u8>),
    Reject {
        call: CallRef,
        code: u16,
        reason: String,
        warning: Option<String>,
    },
    Hangup(CallRef),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invite { uri, .. } => write!(f, "Invite({uri})"),
            Self::Answer(c, _) => write!(f, "Answer({c:?})"),
            Self::Reject { call, code, .. } => write!(f, "Reject({call:?}, {code})"),
            Self::Hangup(c) => write!(f, "Hangup({c:?})"),
        }
    }
}

/// TLS material for SIP over TLS.
#[derive(Clone)]
pub struct TlsSetup {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsSetup")
    }
}

enum Socket {
    Udp(Arc<UdpSocket>),
    Stream(TcpListener, Option<TlsSetup>),
}

/// Handle to a running SIP endpoint.
#[derive(Debug, Clone)]
pub struct SipHandle {
    pub commands: mpsc::Sender<Command>,
    pub stats: watch::Receiver<UaStats>,
    pub local: SocketAddr,
}

type Inbound = (SocketAddr, Result<Vec<u8>, ParseError>);

enum Recv {
    Datagram(usize, SocketAddr),
    Conn(TcpStream, SocketAddr),
}

/// Bind and run. Events go to `events`; the task ends when all command
/// senders are dropped. A port 0 in the engine's address becomes the bound port.
pub async fn spawn(
    mut ua: UserAgent,
    bind: SocketAddr,
    transport: Transport,
    tls: Option<TlsSetup>,
    events: mpsc::Sender<Event>,
) -> std::io::Result<SipHandle> {
    let (socket, local) = match transport {
        Transport::Udp => {
            let s = UdpSocket::bind(bind).await?;
            let a = s.local_addr()?;
            (Socket::Udp(Arc::new(s)), a)
        }
        Transport::Tcp | Transport::Tls => {
            let l = TcpListener::bind(bind).await?;
            let a = l.local_addr()?;
            if transport == Transport::Tls && tls.is_none() {
                return Err(std::io::Error::other("SIP over TLS needs certificates"));
            }
            (Socket::Stream(l, tls), a)
        }
    };
    if ua.local().port() == 0 {
        ua.set_local(SocketAddr::new(ua.local().ip(), local.port()));
    }
    let local = ua.local();
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(64);
    let (stats_tx, stats_rx) = watch::channel(UaStats::default());
    let (in_tx, mut in_rx) = mpsc::channel::<Inbound>(256);
    tokio::spawn(async move {
        let mut conns: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
        let mut buf = vec![0u8; message::MAX_MESSAGE_LEN + 1];
        loop {
            let deadline = ua.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = async {
                    match &socket {
                        Socket::Udp(s) => s.recv_from(&mut buf).await.map(|(n, a)| Recv::Datagram(n, a)),
                        Socket::Stream(l, _) => l.accept().await.map(|(s, a)| Recv::Conn(s, a)),
                    }
                } => match r {
                    Ok(Recv::Datagram(n, from)) => ua.handle_message(from, &buf[..n], Instant::now()),
                    Ok(Recv::Conn(s, from)) => accept_stream(s, from, &socket, &in_tx, &mut conns),
                    Err(e) => tracing::warn!(error = %e, "SIP socket error"),
                },
                Some((from, msg)) = in_rx.recv() => match msg {
                    Ok(bytes) => ua.handle_message(from, &bytes, Instant::now()),
                    Err(e) => {
                        ua.note_parse_error(&e);
                        conns.remove(&from);
                    }
                },
                c = cmd_rx.recv() => {
                    let Some(c) = c else { break };
                    let now = Instant::now();
                    match c {
                        Command::Invite { peer, uri, offer, reply } => {
                            let _ = reply.send(ua.invite(peer, &uri, offer, now));
                        }
                        Command::Answer(call, sdp) => { let _ = ua.answer(call, sdp, now); }
                        Command::Reject { call, code, reason, warning } => {
                            let _ = ua.reject(call, code, &reason, warning.as_deref(), now);
                        }
                        Command::Hangup(call) => { let _ = ua.hangup(call, now); }
                    }
                }
                () = sleep => ua.handle_timeout(Instant::now()),
            }
            while let Some(t) = ua.poll_transmit() {
                match &socket {
                    Socket::Udp(s) => {
                        if let Err(e) = s.send_to(&t.data, t.to).await {
                            tracing::debug!(to = %t.to, error = %e, "SIP send failed");
                        }
                    }
                    Socket::Stream(_, tls) => {
                        if !conns.contains_key(&t.to) && conns.len() < MAX_CONNECTIONS {
                            match connect_stream(t.to, tls.clone(), &in_tx).await {
                                Ok(tx) => {
                                    conns.insert(t.to, tx);
                                }
                                Err(e) => {
                                    tracing::warn!(to = %t.to, error = %e, "SIP connect failed")
                                }
                            }
                        }
                        if let Some(tx) = conns.get(&t.to)
                            && tx.try_send(t.data).is_err()
                        {
                            conns.remove(&t.to);
                        }
                    }
                }
            }
            while let Some(e) = ua.poll_event() {
                if events.send(e).await.is_err() {
                    return;
                }
            }
            let _ = stats_tx.send(ua.stats);
        }
    });
    Ok(SipHandle {
        commands: cmd_tx,
        stats: stats_rx,
        local,
    })
}

fn accept_stream(
    s: TcpStream,
    from: SocketAddr,
    socket: &Socket,
    in_tx: &mpsc::Sender<Inbound>,
    conns: &mut HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
) {
    conns.retain(|_, tx| !tx.is_closed());
    if conns.len() >= MAX_CONNECTIONS {
        return;
    }
    let Socket::Stream(_, tls) = socket else {
        return;
    };
    let (out_tx, out_rx) = mpsc::channel(64);
    conns.insert(from, out_tx);
    let in_tx = in_tx.clone();
    let tls = tls.clone();
    tokio::spawn(async move {
        match tls {
            Some(t) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(t.server);
                match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(s))
                    .await
                {
                    Ok(Ok(s)) => run_stream(s, from, in_tx, out_rx).await,
                    Ok(Err(e)) => tracing::info!(%from, error = %e, "SIP TLS handshake failed"),
                    Err(_) => tracing::info!(%from, "SIP TLS handshake timed out"),
                }
            }
            None => run_stream(s, from, in_tx, out_rx).await,
        }
    });
}

async fn connect_stream(
    to: SocketAddr,
    tls: Option<TlsSetup>,
    in_tx: &mpsc::Sender<Inbound>,
) -> std::io::Result<mpsc::Sender<Vec<u8>>> {
    let s = tokio::time::timeout(std::time::Duration::from_secs(5), TcpStream::connect(to))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    let (out_tx, out_rx) = mpsc::channel(64);
    let in_tx = in_tx.clone();
    match tls {
        Some(t) => {
            let name = rustls::pki_types::ServerName::IpAddress(to.ip().into());
            let s = tokio_rustls::TlsConnector::from(t.client)
                .connect(name, s)
                .await?;
            tokio::spawn(run_stream(s, to, in_tx, out_rx));
        }
        None => {
            tokio::spawn(run_stream(s, to, in_tx, out_rx));
        }
    }
    Ok(out_tx)
}

/// Frame messages off one stream connection; writes what the engine sends.
async fn run_stream<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    peer: SocketAddr,
    in_tx: mpsc::Sender<Inbound>,
    mut out_rx: mpsc::Receiver<Vec<u8>>,
) {
    let (mut rd, mut wr) = tokio::io::split(s);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 4096];
    loop {
        tokio::select! {
            n = rd.read(&mut chunk) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                buf.extend_from_slice(&chunk[..n]);
                loop {
                    match message::parse(&buf) {
                        Ok((_, used)) => {
                            let bytes: Vec<u8> = buf.drain(..used).collect();
                            let start = bytes.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
                            if in_tx.send((peer, Ok(bytes[start..].to_vec()))).await.is_err() {
                                return;
                            }
                        }
                        Err(ParseError::Incomplete) if buf.len() <= STREAM_BUF => break,
                        Err(e) => {
                            // A broken stream cannot be resynchronised: drop the connection.
                            let _ = in_tx.send((peer, Err(e))).await;
                            return;
                        }
                    }
                }
            }
            m = out_rx.recv() => {
                let Some(m) = m else { return };
                if wr.write_all(&m).await.is_err() { return; }
            }
        }
    }
}
