//! Certificates and trust anchors that follow their files.
//!
//! The operator rotates certificates by updating Secrets; kubelet swaps the
//! mounted files (an atomic symlink flip). Nodes must pick the new files up
//! without restarting, so every handshake asks "did the files change?" with a
//! `stat` per file (cheap next to a handshake) and reloads only when they did.
//! A reload that fails (a torn write, a key that does not match its
//! certificate) keeps serving the previous material and is retried on the
//! next handshake.

use crate::error::PkiError;
use crate::inspect::{CertInfo, inspect};
use crate::pem;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// What identifies one version of a file without reading it. Kubelet's
/// symlink flip and our own atomic renames both change the inode; editors
/// that rewrite in place change size or mtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = std::fs::metadata(path).ok()?;
    Some(Fingerprint {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the state half-updated
    // (it is replaced whole), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The rustls crypto provider used everywhere in Conclave (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct KeyState {
    seen: [Option<Fingerprint>; 2],
    key: Arc<CertifiedKey>,
    info: CertInfo,
}

/// A certificate + key pair read from two PEM files and re-read when they change.
/// Serves as both a server and a client certificate resolver.
pub struct ReloadingCertifiedKey {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    state: Mutex<KeyState>,
}

impl std::fmt::Debug for ReloadingCertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCertifiedKey")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("key", &"<redacted>")
            .finish()
    }
}

fn load_key(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, CertInfo), PkiError> {
    let chain = pem::certs_from_pem(&pem::read(cert_path)?, &cert_path.display().to_string())?;
    let key = pem::key_from_pem(&pem::read(key_path)?, &key_path.display().to_string())?;
    let info = inspect(&chain[0])?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => PkiError::KeyMismatch,
        other => PkiError::Tls(other),
    })?;
    Ok((Arc::new(certified), info))
}

impl ReloadingCertifiedKey {
    /// Loads the pair now; fails if it cannot (a node must not start without
    /// its certificate). Later changes are picked up by [`Self::current`].
    pub fn new(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
    ) -> Result<Self, PkiError> {
        let cert_path = cert_path.into();
        let key_path = key_path.into();
        let provider = provider();
        let seen = [fingerprint(&cert_path), fingerprint(&key_path)];
        let (key, info) = load_key(&cert_path, &key_path, &provider)?;
        Ok(Self {
            cert_path,
            key_path,
            provider,
            state: Mutex::new(KeyState { seen, key, info }),
        })
    }

    fn refresh(&self) -> MutexGuard<'_, KeyState> {
        let now = [fingerprint(&self.cert_path), fingerprint(&self.key_path)];
        let mut state = lock(&self.state);
        if now != state.seen && now.iter().all(Option::is_some) {
            match load_key(&self.cert_path, &self.key_path, &self.provider) {
                Ok((key, info)) => {
                    tracing::info!(
                        cert = %self.cert_path.display(),
                        identity = ?info.identity.as_ref().map(ToString::to_string),
                        "reloaded certificate"
                    );
                    *state = KeyState {
                        seen: now,
                        key,
                        info,
                    };
                }
                // Not recording `now` as seen: the other half of a rotation
                // may still be on its way, so try again next handshake.
                Err(e) => tracing::warn!(
                    cert = %self.cert_path.display(),
                    error = %e,
                    "certificate files changed but do not load; keeping the previous certificate"
                ),
            }
        }
        state
    }

    /// The current certificate and key, reloading first if the files changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.refresh().key.clone()
    }

    /// Identity and validity of the current certificate (for expiry metrics).
    pub fn info(&self) -> CertInfo {
        self.refresh().info.clone()
    }
}

impl ResolvesServerCert for ReloadingCertifiedKey {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for ReloadingCertifiedKey {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

struct TrustState {
    seen: Option<Fingerprint>,
    roots: Arc<RootCertStore>,
    client_optional: Arc<dyn ClientCertVerifier>,
    client_required: Arc<dyn ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
}

/// The CA bundle (one or more PEM certificates) read from a file and re-read
/// when it changes. During a CA rotation the bundle holds old and new CA, so
/// peers with either kind of certificate are accepted.
pub struct ReloadingTrust {
    ca_path: PathBuf,
    provider: Arc<CryptoProvider>,
    state: Mutex<TrustState>,
}

impl std::fmt::Debug for ReloadingTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTrust")
            .field("ca_path", &self.ca_path)
            .finish_non_exhaustive()
    }
}

fn load_trust(ca_path: &Path, provider: &Arc<CryptoProvider>) -> Result<TrustState, PkiError> {
    let certs = pem::certs_from_pem(&pem::read(ca_path)?, &ca_path.display().to_string())?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert)?;
    }
    let roots = Arc::new(roots);
    let client_optional =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .allow_unauthenticated()
            .build()?;
    let client_required =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let server =
        WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    Ok(TrustState {
        seen: None,
        roots,
        client_optional,
        client_required,
        server,
    })
}

impl ReloadingTrust {
    /// Loads the bundle now; fails if it cannot.
    pub fn new(ca_path: impl Into<PathBuf>) -> Result<Self, PkiError> {
        let ca_path = ca_path.into();
        let provider = provider();
        let seen = fingerprint(&ca_path);
        let mut state = load_trust(&ca_path, &provider)?;
        state.seen = seen;
        Ok(Self {
            ca_path,
            provider,
            state: Mutex::new(state),
        })
    }

    fn refresh(&self) -> MutexGuard<'_, TrustState> {
        let now = fingerprint(&self.ca_path);
        let mut state = lock(&self.state);
        if now.is_some() && now != state.seen {
            match load_trust(&self.ca_path, &self.provider) {
                Ok(mut fresh) => {
                    tracing::info!(ca = %self.ca_path.display(), "reloaded CA bundle");
                    fresh.seen = now;
                    *state = fresh;
                }
                Err(e) => tracing::warn!(
                    ca = %self.ca_path.display(),
                    error = %e,
                    "CA bundle changed but does not load; keeping the previous one"
                ),
            }
        }
        state
    }

    /// The current trust anchors.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.refresh().roots.clone()
    }

    fn client_verifier(&self, mandatory: bool) -> Arc<dyn ClientCertVerifier> {
        let state = self.refresh();
        if mandatory {
            state.client_required.clone()
        } else {
            state.client_optional.clone()
        }
    }

    fn server_verifier(&self) -> Arc<WebPkiServerVerifier> {
        self.refresh().server.clone()
    }
}

/// Verifies client certificates against a [`ReloadingTrust`].
///
/// It sends no CA names in its CertificateRequest (the list would have to be
/// borrowed from state that can change under it); Conclave clients hold a
/// single certificate and present it regardless.
#[derive(Debug)]
pub struct ReloadingClientVerifier {
    trust: Arc<ReloadingTrust>,
    mandatory: bool,
}

impl ReloadingClientVerifier {
    /// `mandatory = false` lets peers without a certificate finish the
    /// handshake (participants with join tokens); a certificate that is
    /// presented must still verify.
    pub fn new(trust: Arc<ReloadingTrust>, mandatory: bool) -> Self {
        Self { trust, mandatory }
    }
}

impl ClientCertVerifier for ReloadingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust
            .client_verifier(self.mandatory)
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.trust.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.trust.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies server certificates (chain and hostname/IP) against a [`ReloadingTrust`].
#[derive(Debug)]
pub struct ReloadingServerVerifier {
    trust: Arc<ReloadingTrust>,
}

impl ReloadingServerVerifier {
    pub fn new(trust: Arc<ReloadingTrust>) -> Self {
        Self { trust }
    }
}

impl ServerCertVerifier for ReloadingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.trust.server_verifier().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.trust.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.trust.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
