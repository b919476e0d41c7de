//! The media socket: batched receive (recvmmsg, GRO) through quinn-udp and
//! batched send: datagrams of one receive batch go out together, runs of
//! equal-size datagrams to one destination as one UDP GSO send (quinn-udp,
//! when the kernel and device support it; it probes at bind time and turns
//! GSO off on the first send the device refuses, and those datagrams are
//! then resent one by one), everything else through sendmmsg (nix). No
//! `unsafe` here: both crates wrap the syscalls.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;

/// Datagrams fetched per receive call at most.
pub const BATCH: usize = quinn_udp::BATCH_SIZE;
/// Receive buffer per batch slot: large enough for a GRO-coalesced burst.
pub const SLOT_BYTES: usize = 64 * 1024;

#[derive(Debug)]
pub struct MediaSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
}

impl MediaSocket {
    /// Binds `addr`; must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let std = std::net::UdpSocket::bind(addr)?;
        std.set_nonblocking(true)?;
        let state = UdpSocketState::new((&std).into())?;
        // Bursty fan-out needs room; the kernel caps this at its rmem/wmem max.
        let _ = state.set_recv_buffer_size((&std).into(), 8 << 20);
        let _ = state.set_send_buffer_size((&std).into(), 8 << 20);
        Ok(Self {
            io: tokio::net::UdpSocket::from_std(std)?,
            state,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// Waits for and receives a batch; returns how many `meta` entries are filled.
    pub async fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        self.io
            .async_io(Interest::READABLE, || {
                self.state.recv((&self.io).into(), bufs, meta)
            })
            .await
    }

    /// Receives a batch if one is ready, without waiting (`WouldBlock` otherwise).
    pub fn try_recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        self.io.try_io(Interest::READABLE, || {
            self.state.recv((&self.io).into(), bufs, meta)
        })
    }

    /// Most datagrams one GSO send may carry (1 when GSO is unavailable).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Sends every datagram of `out`, waiting while the socket buffer is
    /// full, and reports each one's outcome through `done(index, result)`.
    /// Order is kept per destination.
    pub async fn send_batch(
        &self,
        out: &[Outgoing<'_>],
        mut done: impl FnMut(usize, io::Result<()>),
    ) {
        let mut order: Vec<usize> = (0..out.len()).collect();
        order.sort_by_key(|&i| out[i].to);
        let mut singles: Vec<usize> = Vec::with_capacity(out.len());
        let mut arena = Vec::new();
        let mut i = 0;
        while i < order.len() {
            let run = self.gso_run(out, &order[i..]);
            if run < 2 {
                singles.push(order[i]);
                i += 1;
                continue;
            }
            // Earlier datagrams to this destination may be waiting in `singles`.
            self.send_singles(out, &mut singles, &mut done).await;
            let items = &order[i..i + run];
            arena.clear();
            for &k in items {
                arena.extend_from_slice(out[k].data);
            }
            let t = Transmit {
                destination: out[items[0]].to,
                ecn: None,
                contents: &arena,
                segment_size: Some(out[items[0]].data.len()),
                src_ip: None,
            };
            let sent = self
                .io
                .async_io(Interest::WRITABLE, || {
                    self.state.try_send((&self.io).into(), &t)
                })
                .await;
            match sent {
                Ok(()) => items.iter().for_each(|&k| done(k, Ok(()))),
                // The device refused segmentation (quinn-udp has now turned
                // it off) or the send failed: retry them one by one.
                Err(_) => singles.extend_from_slice(items),
            }
            i += run;
        }
        self.send_singles(out, &mut singles, &mut done).await;
    }

    /// How many datagrams from the start of `order` fit one GSO send: same
    /// destination, same size (the last may be shorter), within the kernel's
    /// segment and 64 KiB limits.
    fn gso_run(&self, out: &[Outgoing<'_>], order: &[usize]) -> usize {
        let max = self.state.max_gso_segments();
        let first = &out[order[0]];
        let size = first.data.len();
        if max < 2 || size == 0 {
            return 1;
        }
        let mut n = 1;
        let mut total = size;
        for &k in &order[1..] {
            let d = &out[k];
            if n == max || d.to != first.to || d.data.len() > size || total + d.data.len() > 65_000
            {
                break;
            }
            n += 1;
            total += d.data.len();
            if d.data.len() < size {
                break;
            }
        }
        n
    }

    /// Sends the datagrams listed in `pending` with sendmmsg and empties it.
    async fn send_singles(
        &self,
        out: &[Outgoing<'_>],
        pending: &mut Vec<usize>,
        done: &mut impl FnMut(usize, io::Result<()>),
    ) {
        const CHUNK: usize = 64;
        let mut next = 0;
        while next < pending.len() {
            let chunk = &pending[next..(next + CHUNK).min(pending.len())];
            let r = self
                .io
                .async_io(Interest::WRITABLE, || self.sendmmsg(out, chunk))
                .await;
            match r {
                Ok(n) => {
                    chunk[..n].iter().for_each(|&k| done(k, Ok(())));
                    next += n.max(1).min(chunk.len());
                    if n == 0 {
                        done(chunk[0], Err(io::Error::other("sendmmsg sent nothing")));
                    }
                }
                // sendmmsg reports an error only for the first datagram of
                // a call: count it and go on with the rest.
                Err(e) => {
                    done(chunk[0], Err(e));
                    next += 1;
                }
            }
        }
        pending.clear();
    }

    fn sendmmsg(&self, out: &[Outgoing<'_>], chunk: &[usize]) -> io::Result<usize> {
        let slices: Vec<[IoSlice<'_>; 1]> =
            chunk.iter().map(|&k| [IoSlice::new(out[k].data)]).collect();
        let addrs: Vec<Option<SockaddrStorage>> = chunk
            .iter()
            .map(|&k| Some(SockaddrStorage::from(out[k].to)))
            .collect();
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(chunk.len(), None);
        let sent = sendmmsg(
            self.io.as_raw_fd(),
            &mut headers,
            &slices,
            &addrs,
            [],
            MsgFlags::MSG_DONTWAIT,
        )?;
        Ok(sent.count())
    }

    /// Sends one datagram, waiting while the socket buffer is full.
    pub async fn send_to(&self, destination: SocketAddr, contents: &[u8]) -> io::Result<()> {
        let t = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        };
        self.io
            .async_io(Interest::WRITABLE, || {
                self.state.try_send((&self.io).into(), &t)
            })
            .await
    }
}

/// One datagram to send.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub to: SocketAddr,
    pub data: &'a [u8],
}

/// Owned receive buffers for one batch.
#[derive(Debug)]
pub struct RecvBuffers {
    storage: Vec<u8>,
    pub meta: Vec<RecvMeta>,
}

impl Default for RecvBuffers {
    fn default() -> Self {
        Self {
            storage: vec![0u8; BATCH * SLOT_BYTES],
            meta: vec![RecvMeta::default(); BATCH],
        }
    }
}

impl RecvBuffers {
    /// Receives one batch into the buffers; returns the number of slots filled.
    pub async fn recv_from(&mut self, socket: &MediaSocket) -> io::Result<usize> {
        let mut slices: Vec<IoSliceMut<'_>> = self
            .storage
            .chunks_mut(SLOT_BYTES)
            .map(IoSliceMut::new)
            .collect();
        socket.recv(&mut slices, &mut self.meta).await
    }

    /// Like [`RecvBuffers::recv_from`] but returns `WouldBlock` instead of waiting.
    pub fn try_recv_from(&mut self, socket: &MediaSocket) -> io::Result<usize> {
        let mut slices: Vec<IoSliceMut<'_>> = self
            .storage
            .chunks_mut(SLOT_BYTES)
            .map(IoSliceMut::new)
            .collect();
        socket.try_recv(&mut slices, &mut self.meta)
    }

    /// The datagrams of slot `i` (several when GRO coalesced them) with their source.
    pub fn datagrams(&self, i: usize) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        let m = &self.meta[i];
        let slot = &self.storage[i * SLOT_BYTES..i * SLOT_BYTES + m.len];
        let stride = m.stride.max(1);
        slot.chunks(stride).map(move |d| (m.addr, d))
    }
}
