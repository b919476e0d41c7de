//! Conclave client library: joins a meeting through a relay, protects and
//! opens media with per-sender SFrame keys, encodes and decodes Opus audio,
//! and generates load.
//!
//! [`session::Session`] is the sans-IO core; [`join`] and [`load`] drive it
//! over tokio UDP sockets.

pub mod audio;
pub mod dev;
pub mod join;
pub mod load;
pub mod session;
