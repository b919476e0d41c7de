//! Cost of the reloading TLS configurations: full mTLS handshakes per second
//! in memory (no sockets), against a baseline of plain rustls configurations
//! with the same certificates loaded once. Also certificate issuance rate, and
//! join-token verification (meeting-proto) against a bare signature check of
//! the same token, which is the floor any verifier pays.

use conclave_pki::rustls::pki_types::ServerName;
use conclave_pki::rustls::server::WebPkiClientVerifier;
use conclave_pki::rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
};
use conclave_pki::tls::{self, ClientAuth, TlsFiles};
use conclave_pki::{DevPki, Identity, Kind, Validity, pem, provider};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RUN: Duration = Duration::from_secs(3);

fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) {
    let name = ServerName::try_from("localhost").expect("static name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client");
    let mut s = ServerConnection::new(server.clone()).expect("server");
    let mut buf = Vec::new();
    while c.is_handshaking() || s.is_handshaking() {
        buf.clear();
        c.write_tls(&mut buf).expect("client write");
        if !buf.is_empty() {
            s.read_tls(&mut buf.as_slice()).expect("server read");
            s.process_new_packets().expect("server handshake");
        }
        buf.clear();
        s.write_tls(&mut buf).expect("server write");
        if !buf.is_empty() {
            c.read_tls(&mut buf.as_slice()).expect("client read");
            c.process_new_packets().expect("client handshake");
        }
    }
    assert!(s.peer_certificates().is_some(), "no client certificate");
}

fn rate(mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN {
        f();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn static_configs(server: &TlsFiles, client: &TlsFiles) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let read = |p: &std::path::Path| std::fs::read(p).expect("read");
    let mut roots = RootCertStore::empty();
    for ca in pem::certs_from_pem(&read(&server.ca), "ca").expect("ca") {
        roots.add(ca).expect("root");
    }
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .expect("verifier");
    let mut s = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&conclave_pki::rustls::version::TLS13])
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            pem::certs_from_pem(&read(&server.cert), "cert").expect("cert"),
            pem::key_from_pem(&read(&server.key), "key").expect("key"),
        )
        .expect("server config");
    s.send_tls13_tickets = 0;
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&conclave_pki::rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(
            pem::certs_from_pem(&read(&client.cert), "cert").expect("cert"),
            pem::key_from_pem(&read(&client.key), "key").expect("key"),
        )
        .expect("client config");
    c.resumption = conclave_pki::rustls::client::Resumption::disabled();
    (Arc::new(c), Arc::new(s))
}

fn main() {
    let dir = std::env::temp_dir().join(format!("conclave-pki-bench-{}", std::process::id()));
    let pki = DevPki::create(&dir, "bench").expect("dev pki");
    let server_files = pki
        .server(
            "kms",
            &Identity::new("bench", Kind::Kms, "kms").expect("id"),
        )
        .expect("server cert");
    let client_files = pki
        .client(
            "relay",
            &Identity::new("bench", Kind::Relay, "r").expect("id"),
        )
        .expect("client cert");

    let (bc, bs) = static_configs(&server_files, &client_files);
    let baseline = rate(|| handshake(&bc, &bs));
    let rc = Arc::new(tls::client_config(&client_files).expect("client config"));
    let rs =
        Arc::new(tls::server_config(&server_files, ClientAuth::Required).expect("server config"));
    let reloading = rate(|| handshake(&rc, &rs));
    println!(
        "BENCH {{\"name\": \"pki_mtls_handshakes_per_s\", \"value\": {reloading:.1}, \"unit\": \"handshakes/s\", \"baseline\": {baseline:.1}}}"
    );

    let id = Identity::new("bench", Kind::Connector, "c").expect("id");
    let issued = rate(|| {
        pki.ca()
            .issue_client(&id, Validity::starting_now(Duration::from_secs(3600)))
            .expect("issue");
    });
    println!(
        "BENCH {{\"name\": \"pki_client_certs_issued_per_s\", \"value\": {issued:.1}, \"unit\": \"certs/s\", \"baseline\": null}}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    bench_tokens();
}

fn bench_tokens() {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use meeting_proto::ids::MeetingId;
    use meeting_proto::token::{Claims, DevIssuerKey, Jwks, Role, TokenVerifier, TrustedIssuer};
    use ring::signature::{ED25519, UnparsedPublicKey};

    let key = DevIssuerKey::from_seed("bench", &[7; 32]).expect("dev key");
    let now = 1_800_000_000;
    let token = key.mint(&Claims {
        sub: "user-1".into(),
        name: "Bench User".into(),
        mid: MeetingId::new("bench-meeting").expect("mid"),
        role: Role::Participant,
        aud: vec!["kms".into()],
        exp: now + 600,
        nbf: None,
        iat: Some(now),
        iss: None,
    });
    let verifier = TokenVerifier::new(vec![TrustedIssuer {
        name: "portal".into(),
        audience: "kms".into(),
        jwks: Jwks::new(vec![key.jwk()]).expect("jwks"),
    }]);
    let full = rate(|| {
        verifier.verify(&token, now).expect("verifies");
    });
    let (signed, sig) = token.rsplit_once('.').expect("three parts");
    let sig = URL_SAFE_NO_PAD.decode(sig).expect("base64url");
    let public = key.public_key();
    let bare = rate(|| {
        UnparsedPublicKey::new(&ED25519, &public)
            .verify(signed.as_bytes(), &sig)
            .expect("signature");
    });
    println!(
        "BENCH {{\"name\": \"token_eddsa_verifications_per_s\", \"value\": {full:.1}, \"unit\": \"tokens/s\", \"baseline\": {bare:.1}}}"
    );
}
