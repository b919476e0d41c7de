//! Real TLS handshakes over 127.0.0.1 with the configurations this crate builds.

use conclave_pki::rustls::pki_types::ServerName;
use conclave_pki::rustls::{ClientConfig, ServerConfig};
use conclave_pki::tls::{self, ClientAuth, TlsFiles};
use conclave_pki::{
    DevPki, Identity, Kind, PkiError, ReloadingCertifiedKey, ServerNames, Validity, peer_identity,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const BOUND: Duration = Duration::from_secs(20);

/// A scratch directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "conclave-pki-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn id(kind: Kind, name: &str) -> Identity {
    Identity::new("test", kind, name).unwrap()
}

struct Outcome {
    /// The server's view: the peer identity, or why the handshake failed.
    server: Result<Option<Identity>, String>,
    /// The client's view: the server's identity, or why it failed.
    client: Result<Identity, String>,
}

/// One connection: the server accepts, reports the peer identity and sends
/// one byte; the client reads that byte, which only arrives if the server
/// accepted the client's certificate (TLS 1.3 client auth completes after the
/// client's handshake future returns).
async fn handshake(server: &ServerConfig, client: &ClientConfig, name: &str) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server.clone()));
    let connector = TlsConnector::from(Arc::new(client.clone()));
    let server_name = ServerName::try_from(name.to_owned()).unwrap();

    let server_side = async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = peer_identity(tls.get_ref().1.peer_certificates()).map_err(|e| e.to_string())?;
        tls.write_all(b"!").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    };
    let client_side = async move {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let server_id = peer_identity(tls.get_ref().1.peer_certificates())
            .map_err(|e| e.to_string())?
            .ok_or("server presented no certificate")?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(server_id)
    };
    let (server, client) =
        tokio::time::timeout(BOUND, async { tokio::join!(server_side, client_side) })
            .await
            .expect("handshake did not finish in time");
    Outcome { server, client }
}

struct Setup {
    _dir: TempDir,
    pki: DevPki,
    server_files: TlsFiles,
}

fn setup() -> Setup {
    let dir = TempDir::new();
    let pki = DevPki::create(dir.0.join("pki"), "test").unwrap();
    let server_files = pki.server("kms", &id(Kind::Kms, "kms")).unwrap();
    Setup {
        _dir: dir,
        pki,
        server_files,
    }
}

#[tokio::test]
async fn mutual_tls_works_and_server_sees_client_identity() {
    let s = setup();
    let relay = id(Kind::Relay, "zone-a").with_pod("zone-a-0").unwrap();
    let client_files = s.pki.client("relay", &relay).unwrap();
    let server = tls::server_config(&s.server_files, ClientAuth::Required).unwrap();
    let client = tls::client_config(&client_files).unwrap();
    for name in ["localhost", "127.0.0.1"] {
        let out = handshake(&server, &client, name).await;
        assert_eq!(out.server, Ok(Some(relay.clone())), "server name {name}");
        assert_eq!(out.client, Ok(id(Kind::Kms, "kms")));
    }
}

#[tokio::test]
async fn optional_client_auth_admits_anonymous_peers_but_required_does_not() {
    let s = setup();
    let anonymous = tls::anonymous_client_config(&s.pki.ca_path()).unwrap();
    let optional = tls::server_config(&s.server_files, ClientAuth::Optional).unwrap();
    let out = handshake(&optional, &anonymous, "localhost").await;
    assert_eq!(out.server, Ok(None));
    assert!(out.client.is_ok());

    let required = tls::server_config(&s.server_files, ClientAuth::Required).unwrap();
    let out = handshake(&required, &anonymous, "localhost").await;
    assert!(
        out.server.is_err(),
        "required client auth let an anonymous peer in"
    );
    assert!(out.client.is_err());
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused_both_ways() {
    let s = setup();
    let other_dir = TempDir::new();
    let other = DevPki::create(&other_dir.0, "test").unwrap();
    let intruder = other
        .client("intruder", &id(Kind::Admin, "mallory"))
        .unwrap();
    // The optional mode must refuse a presented certificate that does not verify,
    // not quietly treat the peer as anonymous.
    for auth in [ClientAuth::Optional, ClientAuth::Required] {
        let server = tls::server_config(&s.server_files, auth).unwrap();
        let client = tls::client_config(&TlsFiles {
            ca: s.pki.ca_path(),
            ..intruder.clone()
        })
        .unwrap();
        let out = handshake(&server, &client, "localhost").await;
        let err = out.server.expect_err("foreign client certificate accepted");
        assert!(err.contains("invalid peer certificate"), "{err}");
        assert!(out.client.is_err());
    }
    // A client that trusts only the other CA refuses our server.
    let server = tls::server_config(&s.server_files, ClientAuth::Optional).unwrap();
    let client = tls::anonymous_client_config(&other.ca_path()).unwrap();
    let out = handshake(&server, &client, "localhost").await;
    assert!(out.client.is_err());
    assert!(out.server.is_err());
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let s = setup();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let windows = [
        Validity {
            not_before: now - 2 * hour,
            not_after: now - hour,
        },
        Validity {
            not_before: now + hour,
            not_after: now + 2 * hour,
        },
    ];
    let server = tls::server_config(&s.server_files, ClientAuth::Required).unwrap();
    for (i, validity) in windows.into_iter().enumerate() {
        let files = s
            .pki
            .client_with(&format!("stale{i}"), &id(Kind::Relay, "zone-a"), validity)
            .unwrap();
        let client = tls::client_config(&files).unwrap();
        let out = handshake(&server, &client, "localhost").await;
        let err = out.server.expect_err("out-of-window certificate accepted");
        let expected = if i == 0 { "expired" } else { "not valid yet" };
        assert!(err.contains(expected), "{err}");
    }
}

#[tokio::test]
async fn server_name_must_match_the_certificate() {
    let s = setup();
    let server = tls::server_config(&s.server_files, ClientAuth::Optional).unwrap();
    let client = tls::anonymous_client_config(&s.pki.ca_path()).unwrap();
    let out = handshake(&server, &client, "kms.elsewhere.example").await;
    let err = out.client.expect_err("wrong server name accepted");
    assert!(err.contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn rotated_certificate_files_are_used_by_the_next_handshake() {
    let s = setup();
    let first = id(Kind::Connector, "rec").with_pod("rec-1").unwrap();
    let second = id(Kind::Connector, "rec").with_pod("rec-2").unwrap();
    let client_files = s.pki.client("conn", &first).unwrap();
    let server = tls::server_config(&s.server_files, ClientAuth::Required).unwrap();
    let client = tls::client_config(&client_files).unwrap();
    assert_eq!(
        handshake(&server, &client, "localhost").await.server,
        Ok(Some(first))
    );

    // Same configurations, new files: both sides follow.
    s.pki.client("conn", &second).unwrap();
    let kms2 = id(Kind::Kms, "kms").with_pod("kms-0").unwrap();
    s.pki.server("kms", &kms2).unwrap();
    let out = handshake(&server, &client, "localhost").await;
    assert_eq!(out.server, Ok(Some(second)));
    assert_eq!(out.client, Ok(kms2));
}

#[tokio::test]
async fn a_torn_rotation_keeps_the_previous_certificate() {
    let s = setup();
    let resolver = ReloadingCertifiedKey::new(&s.server_files.cert, &s.server_files.key).unwrap();
    let before = resolver.info().identity;
    // New certificate written, its key not (yet): the pair must not be used.
    let issued = s
        .pki
        .ca()
        .issue_server(
            &id(Kind::Kms, "other"),
            &ServerNames::default(),
            Validity::starting_now(Duration::from_secs(600)),
        )
        .unwrap();
    conclave_pki::pem::write_atomic(&s.server_files.cert, issued.cert_pem.as_bytes(), false)
        .unwrap();
    assert_eq!(resolver.info().identity, before);
    // Once the key arrives, the new pair is picked up.
    conclave_pki::pem::write_atomic(&s.server_files.key, issued.key_pem.as_bytes(), true).unwrap();
    assert_eq!(resolver.info().identity, Some(id(Kind::Kms, "other")));
}

#[tokio::test]
async fn rotated_ca_bundle_is_trusted_by_the_next_handshake() {
    let s = setup();
    let server = tls::server_config(&s.server_files, ClientAuth::Required).unwrap();
    let new_dir = TempDir::new();
    let new_ca = DevPki::create(&new_dir.0, "test").unwrap();
    let admin = id(Kind::Admin, "alice");
    let files = new_ca.client("alice", &admin).unwrap();
    let client = tls::client_config(&TlsFiles {
        ca: s.pki.ca_path(),
        ..files
    })
    .unwrap();
    assert!(
        handshake(&server, &client, "localhost")
            .await
            .server
            .is_err()
    );

    // The server's bundle now holds the old and the new CA.
    let bundle = format!("{}{}", s.pki.ca().cert_pem(), new_ca.ca().cert_pem());
    conclave_pki::pem::write_atomic(&s.pki.ca_path(), bundle.as_bytes(), false).unwrap();
    assert_eq!(
        handshake(&server, &client, "localhost").await.server,
        Ok(Some(admin))
    );
}

#[test]
fn starting_without_files_is_a_clear_error() {
    let dir = TempDir::new();
    let err =
        tls::server_config(&TlsFiles::in_secret_dir(&dir.0), ClientAuth::Required).unwrap_err();
    assert!(matches!(err, PkiError::Io { .. }), "{err}");
    assert!(err.to_string().contains("tls.crt"), "{err}");
}

/// Kubelet updates a mounted Secret by writing a new timestamped directory and
/// flipping the `..data` symlink; the visible files are symlinks through it.
#[tokio::test]
async fn kubelet_style_symlink_flip_is_picked_up() {
    use std::os::unix::fs::symlink;
    let s = setup();
    let mount = s._dir.0.join("mount");
    std::fs::create_dir_all(&mount).unwrap();
    let publish = |version: &str, identity: &Identity| {
        let files = s
            .pki
            .client(&format!("issued-{version}"), identity)
            .unwrap();
        let data_dir = mount.join(format!("..{version}"));
        std::fs::create_dir_all(&data_dir).unwrap();
        std::fs::copy(&files.cert, data_dir.join("tls.crt")).unwrap();
        std::fs::copy(&files.key, data_dir.join("tls.key")).unwrap();
        std::fs::copy(&files.ca, data_dir.join("ca.crt")).unwrap();
        let tmp = mount.join("..data_tmp");
        symlink(format!("..{version}"), &tmp).unwrap();
        std::fs::rename(&tmp, mount.join("..data")).unwrap();
    };
    let first = id(Kind::Relay, "zone-a").with_pod("zone-a-0").unwrap();
    let second = id(Kind::Relay, "zone-a").with_pod("zone-a-1").unwrap();
    publish("v1", &first);
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        symlink(format!("..data/{f}"), mount.join(f)).unwrap();
    }
    let server = tls::server_config(&s.server_files, ClientAuth::Required).unwrap();
    let client = tls::client_config(&TlsFiles::in_secret_dir(&mount)).unwrap();
    assert_eq!(
        handshake(&server, &client, "localhost").await.server,
        Ok(Some(first))
    );
    publish("v2", &second);
    std::fs::remove_dir_all(mount.join("..v1")).unwrap();
    assert_eq!(
        handshake(&server, &client, "localhost").await.server,
        Ok(Some(second))
    );
}
