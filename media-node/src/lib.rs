//! Conclave media relay: forwards SFrame ciphertext between the members of a
//! meeting. It holds the KMS's ticket-verification public key and nothing
//! else; it does not enable meeting-proto's `keys` feature, so it cannot
//! derive or use a media key (see `tests/no_media_keys.rs`).
//!
//! `core` is the sans-IO routing table; `server` and `udp` are the tokio
//! shell; `http` serves health and metrics.

pub mod core;
pub mod http;
pub mod kms;
pub mod metrics;
pub mod server;
pub mod udp;
