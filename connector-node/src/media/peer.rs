//! Where a phone leg's RTP really comes from, and where ours goes.
//!
//! SDP names an address, but the phone's packets may leave from another
//! one: a phone behind NAT, or a phone on a Kubernetes node whose RTP socket
//! is bound to the wildcard address, so its packets to a pod leave from the
//! pod bridge's address while its SDP names the node's. Dropping those
//! packets silences the phone in the meeting. So the leg uses symmetric RTP
//! (RFC 4961): media is taken from where it arrives and ours is sent back
//! there, under rules that keep a stranger from taking the leg over:
//! - SRTP: a packet that authenticates (and is no replay) proves its sender
//!   holds the key exchanged over signalling, wherever it comes from; the
//!   leg follows the source of the latest such packet (NAT rebinding).
//! - Plain RTP: nothing proves anything, so packets are taken from the SDP
//!   address, or, when the first packet of the negotiated payload type comes
//!   from elsewhere, from that one source, once ("latching"); after that,
//!   other sources are dropped.
//!
//! Sans-IO: the media loop asks [`RtpPeer::admits`] before decrypting and
//! reports a packet it accepted with [`RtpPeer::accepted`].

use std::net::SocketAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpPeer {
    signalled: SocketAddr,
    srtp: bool,
    /// Where our RTP goes: the SDP address until the phone's media shows
    /// where it really is.
    send_to: SocketAddr,
    /// Plain RTP: the first accepted packet fixed the source for the call.
    settled: bool,
}

impl RtpPeer {
    pub fn new(signalled: SocketAddr, srtp: bool) -> Self {
        Self {
            signalled,
            srtp,
            send_to: signalled,
            settled: false,
        }
    }

    /// Whether a packet from `from` may be processed at all (before SRTP).
    pub fn admits(&self, from: SocketAddr) -> bool {
        self.srtp || !self.settled || from == self.send_to || from.ip() == self.signalled.ip()
    }

    /// A packet from `from` was accepted: authenticated SRTP, or plain RTP of
    /// the negotiated payload types. Returns the new address our RTP goes to
    /// when it changed.
    pub fn accepted(&mut self, from: SocketAddr) -> Option<SocketAddr> {
        if !self.srtp && self.settled {
            return None;
        }
        self.settled = true;
        if from == self.send_to {
            return None;
        }
        // Plain RTP from the SDP address keeps the SDP port: some phones send
        // from another port than they receive on, and their SDP is right.
        if !self.srtp && from.ip() == self.signalled.ip() {
            return None;
        }
        self.send_to = from;
        Some(from)
    }

    pub fn send_to(&self) -> SocketAddr {
        self.send_to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn srtp_follows_authenticated_packets_wherever_they_come_from() {
        let mut p = RtpPeer::new(a("198.18.255.1:31000"), true);
        assert!(p.admits(a("10.244.0.1:31000")));
        assert_eq!(
            p.accepted(a("10.244.0.1:31000")),
            Some(a("10.244.0.1:31000"))
        );
        assert_eq!(p.send_to(), a("10.244.0.1:31000"));
        assert_eq!(p.accepted(a("10.244.0.1:31000")), None);
        // NAT rebinding: the next authenticated source wins.
        assert_eq!(
            p.accepted(a("10.244.0.1:40000")),
            Some(a("10.244.0.1:40000"))
        );
    }

    #[test]
    fn plain_rtp_latches_once() {
        let mut p = RtpPeer::new(a("198.18.255.1:31000"), false);
        assert!(
            p.admits(a("10.244.0.1:31000")),
            "before any media, any source may be the phone"
        );
        assert_eq!(
            p.accepted(a("10.244.0.1:31000")),
            Some(a("10.244.0.1:31000"))
        );
        assert!(p.admits(a("10.244.0.1:31000")));
        assert!(
            !p.admits(a("203.0.113.9:31000")),
            "a stranger cannot take the leg over"
        );
        assert_eq!(p.accepted(a("203.0.113.9:31000")), None);
        assert_eq!(p.send_to(), a("10.244.0.1:31000"));
        assert!(
            p.admits(a("198.18.255.1:5004")),
            "the SDP address stays admitted"
        );
    }

    #[test]
    fn plain_rtp_from_the_sdp_address_keeps_the_sdp_port() {
        let mut p = RtpPeer::new(a("127.0.0.1:31000"), false);
        assert_eq!(p.accepted(a("127.0.0.1:31002")), None);
        assert_eq!(p.send_to(), a("127.0.0.1:31000"));
        assert!(!p.admits(a("127.0.0.2:31000")));
    }
}
