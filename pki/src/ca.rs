//! A small certificate authority: one per namespace, kept by the operator in a
//! Secret, issuing short-lived ECDSA P-256 certificates.

use crate::error::PkiError;
use crate::identity::Identity;
use crate::inspect::Validity;
use crate::pem;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls::pki_types::CertificateDer;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// A certificate and its freshly generated private key, as PEM.
pub struct IssuedCert {
    /// The certificate alone (no chain: peers trust the CA directly).
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    /// PKCS#8 private key; zeroized on drop.
    pub key_pem: Zeroizing<String>,
    pub validity: Validity,
}

impl IssuedCert {
    /// When to issue a replacement (2/3 of the lifetime).
    pub fn renew_after(&self) -> SystemTime {
        self.validity.renew_after()
    }

    /// Writes `cert_path` (0644) and `key_path` (0600), each atomically.
    /// The key is written first so that a reloader that sees the new
    /// certificate also finds its key.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        pem::write_atomic(key_path, self.key_pem.as_bytes(), true)?;
        pem::write_atomic(cert_path, self.cert_pem.as_bytes(), false)
    }
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("validity", &self.validity)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// What a server certificate covers besides its identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerNames {
    /// DNS SANs, e.g. `kms.prod.svc`, `kms.prod.svc.cluster.local`.
    pub dns: Vec<String>,
    /// IP SANs, e.g. a relay pod's IP or 127.0.0.1 in tests.
    pub ips: Vec<IpAddr>,
}

/// The CA: its certificate and signing key.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let subject = crate::inspect::inspect(&self.cert_der)
            .map(|i| i.validity)
            .ok();
        f.debug_struct("CertificateAuthority")
            .field("validity", &subject)
            .field("key", &"<redacted>")
            .finish()
    }
}

fn to_offset(t: SystemTime) -> Result<OffsetDateTime, PkiError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| PkiError::BadValidity)?
        .as_secs();
    OffsetDateTime::from_unix_timestamp(i64::try_from(secs).map_err(|_| PkiError::BadValidity)?)
        .map_err(|_| PkiError::BadValidity)
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Generate(rcgen::Error::RingUnspecified))?;
    // Positive and non-zero as DER INTEGER serials must be (RFC 5280 4.1.2.2).
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn base_params(common_name: &str, validity: &Validity) -> Result<CertificateParams, PkiError> {
    if validity.not_after <= validity.not_before {
        return Err(PkiError::BadValidity);
    }
    let mut params = CertificateParams::default();
    params.not_before = to_offset(validity.not_before)?;
    params.not_after = to_offset(validity.not_after)?;
    params.serial_number = Some(random_serial()?);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "conclave");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    Ok(params)
}

fn uri_san(identity: &Identity) -> Result<SanType, PkiError> {
    Ok(SanType::URI(identity.to_uri().try_into()?))
}

impl CertificateAuthority {
    /// A new self-signed CA for `namespace`.
    pub fn generate(namespace: &str, validity: Validity) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = base_params(&format!("conclave CA {namespace}"), &validity)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let cert_der = cert.der().clone();
        Ok(Self {
            cert_pem,
            cert_der,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and PKCS#8 key in PEM (what the
    /// operator keeps in its CA Secret, or what a user brings).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert_der = pem::certs_from_pem(cert_pem.as_bytes(), "CA certificate")?
            .into_iter()
            .next()
            .ok_or(PkiError::NoPem {
                what: "CA certificate".into(),
            })?;
        let key = KeyPair::from_pem(key_pem).map_err(|_| PkiError::BadPem {
            what: "CA key".into(),
        })?;
        if !crate::inspect::inspect(&cert_der)?.is_ca {
            return Err(PkiError::BadCertificate);
        }
        let spki = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|_| PkiError::BadCertificate)?
            .1
            .public_key()
            .subject_public_key
            .data
            .to_vec();
        if spki != key.public_key_raw() {
            return Err(PkiError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    /// Loads a CA from two PEM files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert = pem::read(cert_path)?;
        let key = pem::read(key_path)?;
        let cert = std::str::from_utf8(&cert).map_err(|_| PkiError::BadPem {
            what: cert_path.display().to_string(),
        })?;
        let key = std::str::from_utf8(&key).map_err(|_| PkiError::BadPem {
            what: key_path.display().to_string(),
        })?;
        Self::from_pem(cert, key)
    }

    /// Saves the certificate (0644) and key (0600) as PEM, each atomically.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        pem::write_atomic(key_path, self.key_pem().as_bytes(), true)?;
        pem::write_atomic(cert_path, self.cert_pem.as_bytes(), false)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's private key as PKCS#8 PEM, for storing in a Secret.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.issuer.key().serialize_pem())
    }

    /// Whether `cert` was signed by this CA's key (signature check only; the
    /// validity window is not looked at). The operator uses it to replace
    /// certificates left over from a previous CA.
    pub fn issued(&self, cert: &CertificateDer<'_>) -> bool {
        let Ok((_, ca)) = x509_parser::parse_x509_certificate(&self.cert_der) else {
            return false;
        };
        let Ok((_, leaf)) = x509_parser::parse_x509_certificate(cert) else {
            return false;
        };
        leaf.issuer() == ca.subject() && leaf.verify_signature(Some(ca.public_key())).is_ok()
    }

    /// A server certificate: DNS and IP SANs for hostname checks, plus the
    /// identity URI. It also allows client authentication, because services
    /// that serve (kms, relays) also call other services with the same identity.
    pub fn issue_server(
        &self,
        identity: &Identity,
        names: &ServerNames,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        let mut sans = Vec::with_capacity(names.dns.len() + names.ips.len() + 1);
        sans.push(uri_san(identity)?);
        for dns in &names.dns {
            sans.push(SanType::DnsName(dns.clone().try_into()?));
        }
        sans.extend(names.ips.iter().copied().map(SanType::IpAddress));
        self.issue(
            identity,
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            validity,
        )
    }

    /// A client certificate carrying only the identity URI.
    pub fn issue_client(
        &self,
        identity: &Identity,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        self.issue(
            identity,
            vec![uri_san(identity)?],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            validity,
        )
    }

    fn issue(
        &self,
        identity: &Identity,
        sans: Vec<SanType>,
        ekus: Vec<ExtendedKeyUsagePurpose>,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        let mut key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = base_params(identity.name(), &validity)?;
        params.subject_alt_names = sans;
        params.extended_key_usages = ekus;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        zeroize::Zeroize::zeroize(&mut key);
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem,
            validity,
        })
    }
}
