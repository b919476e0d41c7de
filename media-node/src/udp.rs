//! The media socket: batched receive (recvmmsg, GRO) and per-destination
//! send through quinn-udp, which wraps the syscalls without `unsafe` here.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

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
