//! SIP user agent: message parsing, digest auth, SDP, and the sans-IO
//! call engine, plus the tokio transport shell.

pub mod auth;
pub mod message;
pub mod sdp;
pub mod transport;
pub mod ua;
