//! Conclave's shared protocol library.
//!
//! Everything two components must agree on lives here once: wire formats,
//! tickets, join tokens, KMS API types and node configuration. Nothing in this
//! crate does I/O; callers feed bytes and time in and take bytes and events out.
//!
//! Media key derivation and SFrame live behind the `keys` feature, which the
//! relay does not enable: a relay build cannot even name a media key.

pub mod config;
pub mod ids;
#[cfg(feature = "keys")]
pub mod key_release;
pub mod kms_api;
#[cfg(feature = "keys")]
pub mod media_crypto;
#[cfg(feature = "keys")]
pub mod media_keys;
#[cfg(feature = "keys")]
pub mod sframe;
pub mod ticket;
pub mod token;
pub mod wire;
