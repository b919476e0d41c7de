//! Development PKI: a CA and named certificates written as PEM files into one
//! directory, for process-level tests and local runs.
//!
//! Layout of the directory (all PEM):
//!
//! | file            | content                                          |
//! |-----------------|--------------------------------------------------|
//! | `ca.crt`        | CA certificate (trust anchor for every peer)     |
//! | `ca.key`        | CA private key (0600)                            |
//! | `<name>.crt`    | certificate issued by [`DevPki::server`]/[`DevPki::client`] |
//! | `<name>.key`    | its private key (0600)                           |
//!
//! Server certificates cover `localhost`, `127.0.0.1` and `::1`, so tests can
//! connect to 127.0.0.1 with server name `localhost` or the IP.

use crate::ca::{CertificateAuthority, IssuedCert, ServerNames};
use crate::error::PkiError;
use crate::identity::Identity;
use crate::inspect::Validity;
use crate::tls::TlsFiles;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Lifetime of DevPki certificates unless stated: long enough for any test run.
pub const DEV_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A development CA living in a directory.
#[derive(Debug)]
pub struct DevPki {
    dir: PathBuf,
    ca: CertificateAuthority,
}

fn check_file_name(name: &str) -> Result<(), PkiError> {
    // Names become file names: keep them to one plain path component.
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "ca"
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::io(
            name,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "DevPki names are 1-64 of A-Z a-z 0-9 - _ and not `ca`",
            ),
        ))
    }
}

impl DevPki {
    /// Creates `dir` if needed and writes a fresh CA for `namespace` into it.
    pub fn create(dir: impl Into<PathBuf>, namespace: &str) -> Result<Self, PkiError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| PkiError::io(&dir, e))?;
        let ca =
            CertificateAuthority::generate(namespace, Validity::starting_now(DEV_LIFETIME * 30))?;
        ca.save(&dir.join("ca.crt"), &dir.join("ca.key"))?;
        Ok(Self { dir, ca })
    }

    /// Opens a directory written earlier by [`DevPki::create`].
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, PkiError> {
        let dir = dir.into();
        let ca = CertificateAuthority::load(&dir.join("ca.crt"), &dir.join("ca.key"))?;
        Ok(Self { dir, ca })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// `<dir>/ca.crt`.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The paths for `name` (whether or not they exist yet).
    pub fn files(&self, name: &str) -> TlsFiles {
        TlsFiles {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
            ca: self.ca_path(),
        }
    }

    /// Issues a server certificate for `localhost`, 127.0.0.1 and ::1 and
    /// writes it as `<name>.crt`/`<name>.key`.
    pub fn server(&self, name: &str, identity: &Identity) -> Result<TlsFiles, PkiError> {
        let names = ServerNames {
            dns: vec!["localhost".into()],
            ips: vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
        };
        self.server_with(name, identity, &names, Validity::starting_now(DEV_LIFETIME))
    }

    /// Like [`Self::server`] with explicit names and validity.
    pub fn server_with(
        &self,
        name: &str,
        identity: &Identity,
        names: &ServerNames,
        validity: Validity,
    ) -> Result<TlsFiles, PkiError> {
        check_file_name(name)?;
        let issued = self.ca.issue_server(identity, names, validity)?;
        self.write(name, &issued)
    }

    /// Issues a client certificate and writes it as `<name>.crt`/`<name>.key`.
    pub fn client(&self, name: &str, identity: &Identity) -> Result<TlsFiles, PkiError> {
        self.client_with(name, identity, Validity::starting_now(DEV_LIFETIME))
    }

    /// Like [`Self::client`] with an explicit validity (e.g. already expired).
    pub fn client_with(
        &self,
        name: &str,
        identity: &Identity,
        validity: Validity,
    ) -> Result<TlsFiles, PkiError> {
        check_file_name(name)?;
        let issued = self.ca.issue_client(identity, validity)?;
        self.write(name, &issued)
    }

    fn write(&self, name: &str, issued: &IssuedCert) -> Result<TlsFiles, PkiError> {
        let files = self.files(name);
        issued.write(&files.cert, &files.key)?;
        Ok(files)
    }
}
