//! PEM and file helpers shared by the CA, the reloaders and DevPki.

use crate::error::PkiError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Write;
use std::path::Path;
use zeroize::Zeroizing;

/// All certificates in a PEM text, in order (end-entity first for chains).
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| PkiError::BadPem { what: what.into() })?;
    if certs.is_empty() {
        return Err(PkiError::NoPem { what: what.into() });
    }
    Ok(certs)
}

/// The one private key in a PEM text (PKCS#8, SEC1 or PKCS#1).
pub fn key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => PkiError::NoPem { what: what.into() },
        _ => PkiError::BadPem { what: what.into() },
    })
}

pub(crate) fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>, PkiError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| PkiError::io(path, e))
}

/// Writes a file so that readers see either the old or the new content, never
/// a torn one: write a sibling temporary file, fsync, rename over the target.
/// `secret` files are created with mode 0600.
pub fn write_atomic(path: &Path, contents: &[u8], secret: bool) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file_name = path
        .file_name()
        .ok_or_else(|| PkiError::io(path, std::io::ErrorKind::InvalidInput.into()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut options = std::fs::OpenOptions::new();
    options
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 });
    let result = options.open(&tmp).and_then(|mut f| {
        f.write_all(contents)?;
        f.sync_all()
    });
    result.map_err(|e| PkiError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| PkiError::io(path, e))
}
