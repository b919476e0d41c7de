//! Connector media: RTP, SRTP, G.711, RFC 4733 DTMF, jitter buffer with
//! concealment, the participants' mix, and tone analysis used by tests and
//! health checks.

pub mod dtmf;
pub mod g711;
pub mod jitter;
pub mod mix;
pub mod peer;
pub mod rtp;
pub mod srtp;
pub mod tone;
