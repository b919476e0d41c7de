//! Conclave connector-node: recording, live streaming, telephony and room
//! systems. Protocol cores are sans-IO (bytes and time in, bytes and events
//! out); the tokio shells around them own sockets, files and child processes.

pub mod bridge;
pub mod kms;
pub mod kms_tls;
pub mod media;
pub mod meeting;
pub mod metrics;
pub mod recording;
pub mod service;
pub mod sip;
pub mod streaming;
pub mod telephony;
