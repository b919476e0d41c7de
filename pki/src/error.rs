use crate::identity::IdentityError;
use std::path::PathBuf;

/// Everything that can go wrong in this crate. No variant carries key bytes:
/// messages name files and rules, never their secret contents.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("invalid identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: no usable PEM block found")]
    NoPem { what: String },
    #[error("{what}: malformed PEM")]
    BadPem { what: String },
    #[error("certificate is not valid DER X.509")]
    BadCertificate,
    #[error("certificate carries no conclave:// identity")]
    NoIdentity,
    #[error("certificate carries more than one conclave:// identity")]
    MultipleIdentities,
    #[error("certificate validity window is empty or out of range")]
    BadValidity,
    #[error("certificate and private key do not belong together")]
    KeyMismatch,
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("certificate verifier setup failed: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

impl PkiError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PkiError::Io {
            path: path.into(),
            source,
        }
    }
}
