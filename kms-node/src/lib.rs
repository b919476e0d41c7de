//! Conclave's key management server.
//!
//! Follow the names from `main.rs`: [`server`] is the tokio/axum shell; it
//! authenticates callers and hands them to [`core::Core`], the sans-IO state
//! machine (meetings, epochs, invitations, relays, recordings). The core's
//! effects are made durable by [`store::Committer`] before any answer leaves.
//! [`keys`] holds the key hierarchy, [`audit`] the hash chain.

pub mod audit;
pub mod core;
pub mod keys;
pub mod metrics;
pub mod rate;
pub mod relays;
pub mod server;
pub mod store;
