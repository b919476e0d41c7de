//! TLS to the KMS for host-side tools (`recording restore`): like
//! `conclave_pki::tls`, plus reaching the KMS at an address its certificate
//! does not name (a pod IP from outside the cluster) while still checking
//! the certificate against the DNS name it must carry.

use anyhow::Context;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

/// Verifies the chain as usual, against `name` instead of the connect address.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _connect_address: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// A client configuration trusting `ca`, presenting `cert`/`key` when given,
/// and requiring the KMS certificate to name `server_name` when given.
pub fn client_config(
    ca: &Path,
    cert_key: Option<(&Path, &Path)>,
    server_name: Option<&str>,
) -> anyhow::Result<rustls::ClientConfig> {
    let Some(name) = server_name else {
        return Ok(match cert_key {
            Some((cert, key)) => conclave_pki::tls::client_config(&conclave_pki::tls::TlsFiles {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                ca: ca.to_path_buf(),
            })?,
            None => conclave_pki::tls::anonymous_client_config(ca)?,
        });
    };
    let name = ServerName::try_from(name.to_string())
        .with_context(|| format!("{name:?} is not a DNS name"))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &read(ca)?[..]) {
        roots
            .add(c.with_context(|| format!("parsing {}", ca.display()))?)
            .with_context(|| format!("adding {} to the trust store", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("building the KMS certificate verifier")?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NamedVerifier { inner, name }));
    Ok(match cert_key {
        Some((cert, key)) => {
            let chain = rustls_pemfile::certs(&mut &read(cert)?[..])
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing {}", cert.display()))?;
            let key = rustls_pemfile::private_key(&mut &read(key)?[..])
                .with_context(|| format!("parsing {}", key.display()))?
                .with_context(|| format!("{} holds no private key", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("client certificate and key do not match")?
        }
        None => builder.with_no_client_auth(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    fn verifier(ca: &rcgen::Certificate, name: &str) -> NamedVerifier {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        NamedVerifier {
            inner: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap(),
            name: ServerName::try_from(name.to_string()).unwrap(),
        }
    }

    #[test]
    fn checks_the_certificate_against_the_given_name_not_the_address() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, &ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["main-kms.ns.svc".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let pod_ip = ServerName::try_from("198.18.0.7").unwrap();
        let now = UnixTime::now();
        let ok =
            verifier(&ca, "main-kms.ns.svc").verify_server_cert(leaf.der(), &[], &pod_ip, &[], now);
        assert!(ok.is_ok(), "{ok:?}");
        let wrong =
            verifier(&ca, "other.ns.svc").verify_server_cert(leaf.der(), &[], &pod_ip, &[], now);
        assert!(wrong.is_err(), "a certificate for another name is refused");
        // A certificate from another CA is refused whatever its name.
        let other_key = KeyPair::generate().unwrap();
        let mut other_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other = other_params.self_signed(&other_key).unwrap();
        let bad = verifier(&other, "main-kms.ns.svc").verify_server_cert(
            leaf.der(),
            &[],
            &pod_ip,
            &[],
            now,
        );
        assert!(bad.is_err());
    }
}
