//! The CA: issuing, saving and loading, and what issued certificates say.

use conclave_pki::rustls::pki_types::CertificateDer;
use conclave_pki::{
    CertificateAuthority, DevPki, Identity, Kind, PkiError, ServerNames, Validity, identity_of,
    inspect, peer_identity, renew_after,
};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("conclave-pki-ca-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ca() -> CertificateAuthority {
    CertificateAuthority::generate("prod", Validity::starting_now(Duration::from_secs(86400)))
        .unwrap()
}

#[test]
fn server_certificates_carry_identity_names_and_lifetime() {
    let ca = ca();
    let identity = Identity::new("prod", Kind::Relay, "zone-a")
        .unwrap()
        .with_pod("zone-a-0")
        .unwrap();
    let names = ServerNames {
        dns: vec!["zone-a.prod.svc".into()],
        ips: vec![IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))],
    };
    let validity = Validity::starting_now(Duration::from_secs(3000));
    let issued = ca.issue_server(&identity, &names, validity).unwrap();
    let info = inspect(&issued.cert_der).unwrap();
    assert_eq!(info.identity, Some(identity.clone()));
    assert_eq!(info.dns_names, vec!["zone-a.prod.svc".to_string()]);
    assert_eq!(info.ips, names.ips);
    assert!(ca.issued(&issued.cert_der));
    assert!(!info.is_ca);
    assert_eq!(info.validity, validity);
    assert_eq!(
        renew_after(&issued.cert_der).unwrap(),
        validity.not_before + Duration::from_secs(2000)
    );
    assert_eq!(
        issued.renew_after(),
        validity.not_before + Duration::from_secs(2000)
    );
    assert_eq!(
        peer_identity(Some(std::slice::from_ref(&issued.cert_der))).unwrap(),
        Some(identity)
    );
    assert_eq!(peer_identity(None).unwrap(), None);
}

#[test]
fn client_certificates_carry_only_the_identity() {
    let ca = ca();
    let identity = Identity::new("prod", Kind::RecordingReader, "auditor").unwrap();
    let issued = ca
        .issue_client(&identity, Validity::starting_now(Duration::from_secs(60)))
        .unwrap();
    assert_eq!(identity_of(&issued.cert_der).unwrap(), identity);
    assert!(inspect(&issued.cert_der).unwrap().dns_names.is_empty());
}

#[test]
fn saved_ca_loads_back_and_keeps_issuing_verifiable_certificates() {
    let dir = scratch("roundtrip");
    let original = ca();
    original
        .save(&dir.join("ca.crt"), &dir.join("ca.key"))
        .unwrap();
    let loaded = CertificateAuthority::load(&dir.join("ca.crt"), &dir.join("ca.key")).unwrap();
    assert_eq!(loaded.cert_der(), original.cert_der());
    assert_eq!(*loaded.key_pem(), *original.key_pem());

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn loading_refuses_a_key_of_another_ca_and_a_leaf_posing_as_ca() {
    let a = ca();
    let b = ca();
    let err = CertificateAuthority::from_pem(a.cert_pem(), &b.key_pem()).unwrap_err();
    assert!(matches!(err, PkiError::KeyMismatch), "{err}");

    let leaf = a
        .issue_client(
            &Identity::new("prod", Kind::Admin, "x").unwrap(),
            Validity::starting_now(Duration::from_secs(60)),
        )
        .unwrap();
    let err = CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
    assert!(matches!(err, PkiError::BadCertificate), "{err}");

    assert!(matches!(
        CertificateAuthority::from_pem("not pem", &a.key_pem()).unwrap_err(),
        PkiError::NoPem { .. }
    ));
}

#[test]
fn a_ca_recognises_only_its_own_certificates() {
    let a = ca();
    let b = ca();
    let id = Identity::new("prod", Kind::Operator, "operator").unwrap();
    let from_a = a
        .issue_client(&id, Validity::starting_now(Duration::from_secs(60)))
        .unwrap();
    assert!(a.issued(&from_a.cert_der));
    // Same subject name (both are "conclave CA prod"), different key.
    assert!(!b.issued(&from_a.cert_der));
    assert!(!a.issued(&CertificateDer::from(vec![0u8; 8])));
}

#[test]
fn debug_output_never_contains_key_material() {
    let ca = ca();
    let issued = ca
        .issue_client(
            &Identity::new("prod", Kind::Admin, "x").unwrap(),
            Validity::starting_now(Duration::from_secs(60)),
        )
        .unwrap();
    let key_body = |pem: &str| pem.lines().nth(1).unwrap().to_owned();
    let dbg = format!("{ca:?} {issued:?}");
    assert!(!dbg.contains(&key_body(&ca.key_pem())), "{dbg}");
    assert!(!dbg.contains(&key_body(&issued.key_pem)), "{dbg}");
    assert!(dbg.contains("redacted"));
}

#[test]
fn empty_or_pre_epoch_validity_is_refused() {
    let ca = ca();
    let id = Identity::new("prod", Kind::Admin, "x").unwrap();
    let now = SystemTime::now();
    let empty = Validity {
        not_before: now,
        not_after: now,
    };
    assert!(matches!(
        ca.issue_client(&id, empty).unwrap_err(),
        PkiError::BadValidity
    ));
    let pre_epoch = Validity {
        not_before: UNIX_EPOCH - Duration::from_secs(10),
        not_after: now,
    };
    assert!(matches!(
        ca.issue_client(&id, pre_epoch).unwrap_err(),
        PkiError::BadValidity
    ));
}

#[test]
fn certificates_without_or_with_two_identities_are_refused() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["plain.example".to_string()]).unwrap();
    let plain: CertificateDer<'static> = params.self_signed(&key).unwrap().der().clone();
    assert!(matches!(identity_of(&plain), Err(PkiError::NoIdentity)));
    assert_eq!(inspect(&plain).unwrap().identity, None);

    for uri in ["conclave://a/kms/one", "conclave://a/kms/two"] {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(uri.try_into().unwrap()));
    }
    let two = params.self_signed(&key).unwrap().der().clone();
    assert!(matches!(
        identity_of(&two),
        Err(PkiError::MultipleIdentities)
    ));

    params.subject_alt_names = vec![rcgen::SanType::URI(
        "conclave://a/kms/UPPER".try_into().unwrap(),
    )];
    let bad = params.self_signed(&key).unwrap().der().clone();
    assert!(matches!(identity_of(&bad), Err(PkiError::Identity(_))));

    let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    assert!(matches!(inspect(&garbage), Err(PkiError::BadCertificate)));
}

#[test]
fn dev_pki_writes_the_documented_layout_and_reopens() {
    let dir = scratch("dev");
    let pki = DevPki::create(&dir, "test").unwrap();
    let files = pki
        .server("kms", &Identity::new("test", Kind::Kms, "kms").unwrap())
        .unwrap();
    assert_eq!(files.cert, dir.join("kms.crt"));
    assert_eq!(files.key, dir.join("kms.key"));
    assert_eq!(files.ca, dir.join("ca.crt"));
    for f in ["ca.crt", "ca.key", "kms.crt", "kms.key"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let reopened = DevPki::open(&dir).unwrap();
    assert_eq!(reopened.ca().cert_der(), pki.ca().cert_der());
    let id = Identity::new("test", Kind::Admin, "x").unwrap();
    for bad in ["", "ca", "../x", "a/b", "a.b"] {
        assert!(pki.client(bad, &id).is_err(), "{bad:?} accepted");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
