//! Recording connector: encrypted chunked containers, Ogg Opus, the
//! per-meeting recorder, and decryption for authorized users.

pub mod container;
pub mod decrypt;
pub mod live;
pub mod ogg;
pub mod recorder;
pub mod retention;
