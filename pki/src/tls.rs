//! rustls configurations for Conclave services, built on the reloading
//! certificate and trust types so rotations need no restart.
//!
//! TLS 1.3 only: every peer is Conclave code built on rustls.

use crate::error::PkiError;
use crate::reload::{
    ReloadingCertifiedKey, ReloadingClientVerifier, ReloadingServerVerifier, ReloadingTrust,
    provider,
};
use rustls::{ClientConfig, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a node finds its TLS material (PEM files, usually a mounted Secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate (chain), end-entity first.
    pub cert: PathBuf,
    /// PKCS#8 private key for `cert`.
    pub key: PathBuf,
    /// CA bundle that peers' certificates must chain to.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The layout of a Kubernetes TLS Secret mounted at `dir`
    /// (`tls.crt`, `tls.key`, `ca.crt`).
    pub fn in_secret_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
        }
    }
}

/// Whether a server demands client certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Peers may connect without a certificate (participants with join
    /// tokens); a certificate that is presented must verify against the CA.
    Optional,
    /// Every peer must present a certificate that verifies against the CA.
    Required,
}

/// A server configuration that reloads its certificate and CA from `files`.
/// Set `alpn_protocols` on the result as the server needs.
pub fn server_config(files: &TlsFiles, client_auth: ClientAuth) -> Result<ServerConfig, PkiError> {
    let cert = Arc::new(ReloadingCertifiedKey::new(&files.cert, &files.key)?);
    let trust = Arc::new(ReloadingTrust::new(&files.ca)?);
    server_config_from(cert, trust, client_auth)
}

/// Like [`server_config`], from reloaders the caller keeps (e.g. to export
/// certificate expiry as a metric from `cert.info()`).
pub fn server_config_from(
    cert: Arc<ReloadingCertifiedKey>,
    trust: Arc<ReloadingTrust>,
    client_auth: ClientAuth,
) -> Result<ServerConfig, PkiError> {
    let verifier = ReloadingClientVerifier::new(trust, client_auth == ClientAuth::Required);
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(cert);
    // A resumed session reports the certificate of the original handshake, so
    // a peer could keep an identity after its certificate expired or was
    // replaced. Full handshakes with P-256 are cheap; identities stay current.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client configuration that trusts the CA in `files.ca` and presents the
/// certificate in `files.cert`/`files.key`, all reloaded when they change.
pub fn client_config(files: &TlsFiles) -> Result<ClientConfig, PkiError> {
    let cert = Arc::new(ReloadingCertifiedKey::new(&files.cert, &files.key)?);
    let trust = Arc::new(ReloadingTrust::new(&files.ca)?);
    client_config_from(Some(cert), trust)
}

/// A client configuration that trusts the CA bundle at `ca` and presents no
/// certificate (participants, who authenticate with a join token instead).
pub fn anonymous_client_config(ca: &Path) -> Result<ClientConfig, PkiError> {
    client_config_from(None, Arc::new(ReloadingTrust::new(ca)?))
}

/// Like [`client_config`], from reloaders the caller keeps.
pub fn client_config_from(
    cert: Option<Arc<ReloadingCertifiedKey>>,
    trust: Arc<ReloadingTrust>,
) -> Result<ClientConfig, PkiError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ReloadingServerVerifier::new(trust)));
    let mut config = match cert {
        Some(cert) => builder.with_client_cert_resolver(cert),
        None => builder.with_no_client_auth(),
    };
    // See server_config_from: every connection proves the current certificate.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}
