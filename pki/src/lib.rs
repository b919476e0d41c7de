//! Conclave's internal PKI.
//!
//! - [`Identity`]: the `conclave://<namespace>/<kind>/<name>[/<pod>]` URI SAN
//!   that every service certificate carries and every authorization decision
//!   reads.
//! - [`CertificateAuthority`]: an ECDSA P-256 CA (one per namespace, kept by
//!   the operator) issuing short-lived server and client certificates, renewed
//!   at two thirds of their lifetime ([`Validity::renew_after`]).
//! - [`tls`]: rustls server/client configurations whose certificate, key and
//!   CA bundle are re-read from their files when they change, so nodes follow
//!   Secret rotations without restarting.
//! - [`peer_identity`]: the identity of a verified TLS peer.
//! - [`DevPki`]: a CA and certificates in a directory, for tests and local runs.
//!
//! ring is the only crypto backend.
//!
//! ```no_run
//! use conclave_pki::{ClientAuth, DevPki, Identity, Kind, peer_identity, tls};
//! # fn main() -> Result<(), conclave_pki::PkiError> {
//! let pki = DevPki::create("/tmp/conclave-dev-pki", "test")?;
//! let kms = pki.server("kms", &Identity::new("test", Kind::Kms, "kms")?)?;
//! let relay_id = Identity::new("test", Kind::Relay, "zone-a")?.with_pod("zone-a-0")?;
//! let relay = pki.client("relay-0", &relay_id)?;
//! let server = tls::server_config(&kms, ClientAuth::Optional)?; // for tokio_rustls::TlsAcceptor
//! let client = tls::client_config(&relay)?; // for tokio_rustls::TlsConnector
//! // After the handshake, on the server:
//! // let who = peer_identity(server_conn.peer_certificates())?; // Some(identity) or None
//! # let _ = (server, client, peer_identity);
//! # Ok(())
//! # }
//! ```

mod ca;
mod dev;
mod error;
mod identity;
mod inspect;
pub mod pem;
mod reload;
pub mod tls;

pub use ca::{CertificateAuthority, IssuedCert, ServerNames};
pub use dev::{DEV_LIFETIME, DevPki};
pub use error::PkiError;
pub use identity::{Identity, IdentityError, Kind, MAX_SEGMENT_LEN, SCHEME};
pub use inspect::{CertInfo, Validity, identity_of, inspect, peer_identity, renew_after};
pub use reload::{
    ReloadingCertifiedKey, ReloadingClientVerifier, ReloadingServerVerifier, ReloadingTrust,
    provider,
};
pub use tls::{ClientAuth, TlsFiles};

/// Re-exported so callers name the same rustls as this crate.
pub use rustls;
