//! Reading what a certificate says: its identity and validity window.

use crate::error::PkiError;
use crate::identity::{Identity, SCHEME};
use rustls::pki_types::CertificateDer;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::extensions::GeneralName;

/// When a certificate is valid, and when it should be replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from now (rounded down to the second X.509 can express) for `lifetime`.
    pub fn starting_now(lifetime: Duration) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let not_before = UNIX_EPOCH + Duration::from_secs(now);
        Self {
            not_before,
            not_after: not_before + lifetime,
        }
    }

    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// Two thirds into the lifetime: late enough not to churn, early enough
    /// that a failed renewal has a third of the lifetime to be retried and
    /// that kubelet's Secret propagation delay (up to a minute or two) fits.
    pub fn renew_after(&self) -> SystemTime {
        self.not_before + self.lifetime() * 2 / 3
    }

    pub fn contains(&self, t: SystemTime) -> bool {
        self.not_before <= t && t <= self.not_after
    }
}

/// The parts of a certificate that Conclave cares about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The `conclave://` URI SAN, if the certificate has exactly one.
    pub identity: Option<Identity>,
    pub validity: Validity,
    /// DNS SANs, for diagnostics and the operator's "is this still right" check.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ips: Vec<IpAddr>,
    /// Whether the certificate is a CA (basic constraints).
    pub is_ca: bool,
}

fn to_system_time(t: x509_parser::time::ASN1Time) -> Result<SystemTime, PkiError> {
    let secs = u64::try_from(t.timestamp()).map_err(|_| PkiError::BadValidity)?;
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Reads identity, validity and names from a DER certificate.
///
/// A certificate with two `conclave://` URIs is an error rather than "pick
/// one": an identity must never be ambiguous.
pub fn inspect(cert: &CertificateDer<'_>) -> Result<CertInfo, PkiError> {
    let (rest, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|_| PkiError::BadCertificate)?;
    if !rest.is_empty() {
        return Err(PkiError::BadCertificate);
    }
    let validity = Validity {
        not_before: to_system_time(x509.validity().not_before)?,
        not_after: to_system_time(x509.validity().not_after)?,
    };
    let mut identities = Vec::new();
    let mut dns_names = Vec::new();
    let mut ips = Vec::new();
    let san = x509
        .subject_alternative_name()
        .map_err(|_| PkiError::BadCertificate)?;
    if let Some(san) = san {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) if uri.starts_with(SCHEME) => identities.push(*uri),
                GeneralName::DNSName(dns) => dns_names.push(dns.to_string()),
                GeneralName::IPAddress(raw) => match raw.len() {
                    4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*raw).unwrap_or_default())),
                    16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*raw).unwrap_or_default())),
                    _ => return Err(PkiError::BadCertificate),
                },
                _ => {}
            }
        }
    }
    let identity = match identities.as_slice() {
        [] => None,
        [one] => Some(one.parse::<Identity>()?),
        _ => return Err(PkiError::MultipleIdentities),
    };
    Ok(CertInfo {
        identity,
        validity,
        dns_names,
        ips,
        is_ca: x509.is_ca(),
    })
}

/// The identity a certificate speaks for; an error when it has none.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, PkiError> {
    inspect(cert)?.identity.ok_or(PkiError::NoIdentity)
}

/// The identity of a TLS peer, from what rustls reports after the handshake
/// (`ServerConnection::peer_certificates()`).
///
/// `Ok(None)` means the peer presented no certificate (a participant who
/// authenticates with a join token instead). Chain verification has already
/// happened in the handshake; this only reads the end-entity certificate.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Option<Identity>, PkiError> {
    match certs.and_then(|c| c.first()) {
        None => Ok(None),
        Some(end_entity) => identity_of(end_entity).map(Some),
    }
}

/// When a certificate should be replaced: issued + 2/3 of its lifetime.
pub fn renew_after(cert: &CertificateDer<'_>) -> Result<SystemTime, PkiError> {
    Ok(inspect(cert)?.validity.renew_after())
}
