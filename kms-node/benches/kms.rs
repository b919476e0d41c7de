//! KMS benchmarks. Prints `BENCH {...}` lines (see the repo's bench rules).
//!
//! 1. Audit commit throughput and latency with group commit (one fsync per
//!    batch) against the baseline of one fsync per request, same store code.
//! 2. HPKE sealing (every key release seals once): the server's
//!    implementation (aws-lc-rs X25519, ring key schedule and AEAD),
//!    against the `hpke` crate.
//! 3. Key releases (joins: token check, state change, durable audit, HPKE
//!    seal, roster and ticket signatures) over mTLS (the client presents a
//!    certificate; participants are still authenticated by their join
//!    token) against the real binary: the most per second, with every
//!    connection kept busy; then p50/p99 latency with releases offered at
//!    the goal's rate ([`GOAL_RATE`]), open loop. Baselines: unauthenticated
//!    `/v1/info` requests over the same connections, offered the same ways
//!    (HTTP + TLS stack alone). The load generator (see [`load`]) shares the
//!    machine's two cores with the server, so it is kept lean, and the CPU
//!    time each side spends per release is reported too (load-independent).
//! 4. The Ed25519 operations of a release (join token check, signing)
//!    against the alternatives. `KMS_BENCH_MICRO_ONLY=1` stops after the
//!    micro figures (1, 2, 4), for quick comparisons while changing code.

#[path = "../tests/support/mod.rs"]
mod support;

use kms_node::audit::AuditRecord;
use kms_node::core::Write;
use kms_node::store::{Committer, Grouping, Store};
use load::Pace;
use meeting_proto::ids::MeetingId;
use meeting_proto::key_release::EphemeralKey;
use meeting_proto::kms_api::{self as api, AuditKind, Hex};
use meeting_proto::ticket::Ticket;
use meeting_proto::token::Role;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The rate the KMS must sustain (#4's goal: 5,000 releases/s on two cores
/// with p99 under 20 ms); latency is measured with releases offered at it.
const GOAL_RATE: f64 = 5000.0;
/// How long releases are offered at [`GOAL_RATE`]: 10,000 samples, so the
/// p99 rests on 100 of them.
const PACED_SECONDS: f64 = 2.0;

fn bench(name: &str, value: f64, unit: &str, baseline: Option<f64>) {
    let baseline = baseline.map_or("null".to_owned(), |b| format!("{b:.3}"));
    println!(
        r#"BENCH {{"name": "{name}", "value": {value:.3}, "unit": "{unit}", "baseline": {baseline}}}"#
    );
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat
/// (USER_HZ ticks, 100 per second on Linux).
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// Microseconds per call of `f`, from the fastest of `n / 20` rounds of 20
/// calls: other work on the shared cores (preemption, the sibling
/// hyperthread, caches) only ever slows a round down, so the fastest round
/// is the comparable figure and a mean over all rounds is not.
fn min_round_us(n: u32, f: &mut dyn FnMut()) -> f64 {
    (0..n / 20)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..20 {
                f();
            }
            started.elapsed().as_secs_f64() * 1e6 / 20.0
        })
        .fold(f64::INFINITY, f64::min)
}

/// Microseconds per HPKE seal: (the server's, the `hpke` crate's).
fn seal_us(n: u32) -> (f64, f64) {
    use hpke::{Deserializable, Kem, OpModeS, Serializable};
    let (ring, _) = kms_node::keys::KeyRing::open(
        kms_node::keys::RootKey::from_bytes(&[1; 32]).unwrap(),
        None,
        vec![],
    )
    .unwrap();
    let key = ring.random_key().unwrap();
    let recipient = meeting_proto::key_release::EphemeralKey::generate().public_key();
    let ours = min_round_us(n, &mut || {
        std::hint::black_box(kms_node::keys::seal(&recipient, b"info", &key).unwrap());
    });
    let pk = <hpke::kem::X25519HkdfSha256 as Kem>::PublicKey::from_bytes(&recipient).unwrap();
    let crate_us = min_round_us(n, &mut || {
        let (enc, ct) = hpke::single_shot_seal::<
            hpke::aead::ChaCha20Poly1305,
            hpke::kdf::HkdfSha256,
            hpke::kem::X25519HkdfSha256,
            _,
        >(
            &OpModeS::Base,
            &pk,
            b"info",
            key.expose(),
            &[],
            &mut rand_core::OsRng,
        )
        .unwrap();
        std::hint::black_box((enc.to_bytes(), ct));
    });
    (ours, crate_us)
}

/// Microseconds per Ed25519 operation of a key release, each against the
/// alternative backend in the same run.
struct Ed25519Us {
    /// A whole join token check (`TokenVerifier::verify`: parsing, claims,
    /// signature).
    token_verify: f64,
    /// The join token's signature alone: ed25519-dalek's `verify` with the
    /// issuer key decoded once (what the token verifier does, plus an
    /// 8-entry small-order lookup), its `verify_strict` (which decodes R
    /// too), ring (decodes the key each time).
    dalek_verify: f64,
    dalek_verify_strict: f64,
    ring_verify: f64,
    /// A relay ticket's signature: the server's signer (aws-lc-rs),
    /// ed25519-dalek.
    server_sign: f64,
    dalek_sign: f64,
}

/// Microseconds per roster version of 32 members, each against what the
/// KMS did before in the same run.
struct RosterUs {
    /// `SignedRoster::sign` (serialize, SHA-256, sign the digest) against
    /// serializing and signing the whole text (Ed25519 hashes it twice).
    sign: f64,
    sign_whole_text: f64,
    /// Writing a signed roster into an answer: already serialized (copied
    /// as is) against serializing it each time (its JSON text escaped).
    answer: f64,
    answer_escaped: f64,
}

fn roster_us(n: u32) -> RosterUs {
    use ed25519_dalek::Signer as _;
    let time = |f: &mut dyn FnMut()| min_round_us(n, f);
    let roster = api::Roster {
        meeting: MeetingId::new("b1").unwrap(),
        version: 64,
        epoch: 33,
        members: (1..=32)
            .map(|i| api::RosterMember {
                participant: meeting_proto::ids::ParticipantId(i),
                sender_index: i as u16,
                role: api::Role::Participant,
                name: format!("Participant {i}"),
                subject: format!("user-{i}@example.org"),
            })
            .collect(),
        invitations: Vec::new(),
        issued_at_ms: 1_700_000_000_000,
    };
    let key = kms_node::keys::Ed25519Signer::new(&ed25519_dalek::SigningKey::from_bytes(&[3; 32]))
        .unwrap();
    let sign = time(&mut || {
        std::hint::black_box(api::SignedRoster::sign(&roster, &key).unwrap());
    });
    let sign_whole_text = time(&mut || {
        let text = serde_json::to_string(&roster).unwrap();
        std::hint::black_box(
            key.sign(&[b"conclave roster v1\0".as_slice(), text.as_bytes()].concat()),
        );
    });
    let signed = api::SignedRoster::sign(&roster, &key).unwrap();
    let json = signed.to_json().unwrap();
    let answer = time(&mut || {
        std::hint::black_box(serde_json::to_vec(&json.clone()).unwrap());
    });
    let answer_escaped = time(&mut || {
        std::hint::black_box(serde_json::to_vec(&signed.clone()).unwrap());
    });
    RosterUs {
        sign,
        sign_whole_text,
        answer,
        answer_escaped,
    }
}

fn ed25519_us(n: u32) -> Ed25519Us {
    use meeting_proto::token::{
        Claims, DevIssuerKey, Jwks, Role as TokenRole, TokenVerifier, TrustedIssuer,
    };
    use ring::signature::{ED25519, UnparsedPublicKey};
    let time = |f: &mut dyn FnMut()| min_round_us(n, f);
    let issuer = DevIssuerKey::from_seed("k1", &[7; 32]).unwrap();
    let now = support::now_s();
    let token = issuer.mint(&Claims {
        sub: "user-1".into(),
        name: "Participant One".into(),
        mid: MeetingId::new("b1").unwrap(),
        role: TokenRole::Participant,
        aud: vec![support::AUDIENCE.into()],
        exp: now + 300,
        nbf: None,
        iat: Some(now),
        iss: None,
    });
    let verifier = TokenVerifier::new(vec![TrustedIssuer {
        name: "portal".into(),
        audience: support::AUDIENCE.into(),
        jwks: Jwks::from_json(issuer.jwks_json().as_bytes()).unwrap(),
    }]);
    let token_verify = time(&mut || {
        std::hint::black_box(verifier.verify(&token, now).unwrap());
    });
    let (signed, sig64) = token.rsplit_once('.').unwrap();
    use base64::Engine as _;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig64)
        .unwrap();
    let pk = issuer.public_key();
    let ring_verify = time(&mut || {
        UnparsedPublicKey::new(&ED25519, &pk)
            .verify(signed.as_bytes(), &sig)
            .unwrap();
    });
    let dalek_sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
    let dalek_pk = ed25519_dalek::VerifyingKey::from_bytes(&pk).unwrap();
    let dalek_verify = time(&mut || {
        use ed25519_dalek::Verifier as _;
        dalek_pk.verify(signed.as_bytes(), &dalek_sig).unwrap();
    });
    let dalek_verify_strict = time(&mut || {
        dalek_pk
            .verify_strict(signed.as_bytes(), &dalek_sig)
            .unwrap();
    });
    let ticket = [7u8; 80];
    let dalek_key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let dalek_sign = time(&mut || {
        use ed25519_dalek::Signer as _;
        std::hint::black_box(dalek_key.sign(std::hint::black_box(&ticket)));
    });
    let server_key = kms_node::keys::Ed25519Signer::new(&dalek_key).unwrap();
    let server_sign = time(&mut || {
        use ed25519_dalek::Signer as _;
        std::hint::black_box(server_key.sign(std::hint::black_box(&ticket)));
    });
    Ed25519Us {
        token_verify,
        dalek_verify,
        dalek_verify_strict,
        ring_verify,
        server_sign,
        dalek_sign,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The `q` quantile, as the upper bound of its bucket (so within a factor
/// of two for these exponential buckets), of the observations a histogram
/// gained between two scrapes of `/metrics`; `series` picks the histogram's
/// bucket lines (name and, where it has them, a label).
fn histogram_quantile(before: &str, after: &str, series: &[&str], q: f64) -> f64 {
    let buckets = |text: &str| -> Vec<(f64, f64)> {
        text.lines()
            .filter(|l| series.iter().all(|s| l.contains(s)) && l.contains("_bucket{"))
            .filter_map(|l| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, l.rsplit(' ').next()?.trim().parse().ok()?))
            })
            .collect()
    };
    let (b0, b1) = (buckets(before), buckets(after));
    let gained: Vec<(f64, f64)> = b1
        .iter()
        .map(|&(le, n)| {
            let n0 = b0.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
            (le, n - n0)
        })
        .collect();
    let total = gained.iter().map(|b| b.1).fold(0.0, f64::max);
    gained
        .iter()
        .find(|b| b.1 >= q * total)
        .map_or(f64::NAN, |b| b.0)
}

/// (entries per second, p99 latency ms) for `jobs` one-entry commits
/// submitted by `concurrency` tasks.
async fn audit_run(max_batch: usize, jobs: usize, concurrency: usize) -> (f64, f64) {
    let dir = std::env::temp_dir().join(format!(
        "kms-bench-audit-{max_batch}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Arc::new(Store::open(&dir).unwrap());
    let grouping = Grouping {
        max_entries: max_batch,
        linger: Duration::ZERO,
    };
    let committer = Committer::start(store, grouping, || 0, Box::new(|_, _, _| {})).unwrap();
    let meeting = MeetingId::new("bench").unwrap();
    let started = Instant::now();
    let per_task = jobs / concurrency;
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (committer, meeting) = (committer.clone(), meeting.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for i in 0..per_task {
                let t0 = Instant::now();
                let rx = committer.submit(
                    vec![Write::Meeting(meeting.clone(), vec![b'x'; 200])],
                    vec![AuditRecord::new(
                        AuditKind::KeyRelease,
                        "bench",
                        format!("{t}/{i}"),
                    )],
                );
                rx.await.unwrap().unwrap();
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let rate = (per_task * concurrency) as f64 / started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    drop(committer);
    let _ = std::fs::remove_dir_all(&dir);
    (rate, percentile(&lat, 0.99))
}

/// The load generator, kept lean as real load tools are, because it shares
/// the machine's two cores with the server: one kept-alive HTTP/1.1
/// connection per task over mTLS (tokio-rustls and hyper's bare client
/// connection, no pool), every request built before timing, a
/// current-thread runtime. During the timed phase each response is checked
/// for status 200 and kept; one in [`SAMPLE_EVERY`] is decoded and verified
/// at once, and after the timed phase every response is: the meeting key
/// opened with the participant's key (HPKE), the roster and ticket
/// signatures checked against the KMS's key.
mod load {
    use bytes::Bytes;
    use http::{Method, Request, StatusCode, header};
    use http_body_util::{BodyExt, Full};
    use hyper::client::conn::http1::SendRequest;
    use hyper_util::rt::TokioIo;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    pub const SAMPLE_EVERY: usize = 50;

    pub struct Conn(SendRequest<Full<Bytes>>);

    pub async fn connect(port: u16, tls: Arc<rustls::ClientConfig>) -> Conn {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        Conn(send)
    }

    pub fn request(method: Method, path: &str, body: Vec<u8>) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "127.0.0.1")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    }

    /// One answer: (request index, latency ms, body).
    pub type Answer = (usize, f64, Bytes);

    /// Looks at one answer body (by request index) during the run.
    pub type Check = Arc<dyn Fn(usize, &[u8]) + Send + Sync>;

    /// How requests are offered.
    #[derive(Clone, Copy)]
    pub enum Pace {
        /// Each connection sends its next request as soon as it has the
        /// last answer (closed loop): the server's maximum rate, with
        /// latency that is all queueing behind the other connections.
        Saturate,
        /// Request `i` is due `i / rate` seconds after the start (open
        /// loop, as wrk2 does); its latency counts from when it was due, so
        /// time spent waiting for a free connection is counted too rather
        /// than hidden by the server slowing the senders down.
        Rate(f64),
    }

    /// Sends every request over `conns` (one task per connection, each
    /// taking the next request from a shared queue), paced by `pace`;
    /// `check` sees each `SAMPLE_EVERY`-th answer during the run. Returns
    /// the connections, the answers and the elapsed seconds.
    pub async fn run(
        conns: Vec<Conn>,
        requests: Vec<Request<Full<Bytes>>>,
        check: Check,
        pace: Pace,
    ) -> (Vec<Conn>, Vec<Answer>, f64) {
        let queue = Arc::new(Mutex::new(
            requests.into_iter().enumerate().rev().collect::<Vec<_>>(),
        ));
        let started = Instant::now();
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|mut conn| {
                let (queue, check) = (queue.clone(), check.clone());
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    loop {
                        let Some((i, req)) = queue.lock().unwrap().pop() else {
                            break;
                        };
                        let t0 = match pace {
                            Pace::Saturate => Instant::now(),
                            Pace::Rate(rate) => {
                                let due = started + Duration::from_secs_f64(i as f64 / rate);
                                tokio::time::sleep_until(due.into()).await;
                                due
                            }
                        };
                        let resp = conn.0.send_request(req).await.unwrap();
                        let status = resp.status();
                        let body = resp.into_body().collect().await.unwrap().to_bytes();
                        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
                        let ms = t0.elapsed().as_secs_f64() * 1000.0;
                        if i % SAMPLE_EVERY == 0 {
                            check(i, &body);
                        }
                        answers.push((i, ms, body));
                    }
                    (conn, answers)
                })
            })
            .collect();
        let (mut conns, mut answers) = (Vec::new(), Vec::new());
        for t in tasks {
            let (c, a) = t.await.unwrap();
            conns.push(c);
            answers.extend(a);
        }
        (conns, answers, started.elapsed().as_secs_f64())
    }
}

/// Everything needed to verify one release after the fact.
struct Expected {
    meeting: MeetingId,
    key: EphemeralKey,
}

/// Checks a join response as a participant would: opens the meeting key,
/// verifies the roster (and that it lists the participant) and the ticket.
fn verify_release(body: &[u8], e: &Expected, kms_key: &ed25519_dalek::VerifyingKey) {
    let r: api::JoinResponse = serde_json::from_slice(body).expect("join response decodes");
    e.key
        .open_meeting_key(&r.key, &e.meeting, r.participant)
        .expect("sealed meeting key opens");
    let roster = r.roster.verify(kms_key).expect("roster signature");
    assert!(
        roster
            .members
            .iter()
            .any(|m| m.participant == r.participant)
    );
    Ticket::verify(&r.relay.ticket.0, kms_key, &r.relay.relay, support::now_s())
        .expect("ticket signature");
}

/// Join requests for `total` fresh participants spread over `meetings`
/// meetings (named `{set}0`, `{set}1`, ...). Tokens and participant key
/// pairs are made here, before timing: the portal and each participant's
/// device make them, not the KMS.
fn join_requests(
    kms: &support::Kms,
    (set, meetings): (&str, usize),
    prefix: &str,
    total: usize,
) -> (
    Vec<http::Request<http_body_util::Full<bytes::Bytes>>>,
    Vec<Expected>,
) {
    (0..total)
        .map(|i| {
            let meeting = MeetingId::new(format!("{set}{}", i % meetings)).unwrap();
            let token = kms.token(&format!("{prefix}{i}"), meeting.as_str(), Role::Participant);
            let key = EphemeralKey::generate();
            let body = serde_json::to_vec(&serde_json::json!({
                "token": token,
                "public_key": Hex::encode(&key.public_key()),
            }))
            .unwrap();
            let path = api::paths::fill(api::paths::JOIN, "meeting", meeting.as_str());
            (
                load::request(http::Method::POST, &path, body),
                Expected { meeting, key },
            )
        })
        .unzip()
}

fn main() {
    // One thread for the whole benchmark: the load generator must not take
    // both cores from the server it measures.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(50);
        let (group_rate, group_p99) = audit_run(512, 4000, 64).await;
        let (single_rate, single_p99) = audit_run(1, 600, 64).await;
        bench(
            "kms_audit_commits_per_s",
            group_rate,
            "entries/s",
            Some(single_rate),
        );
        bench(
            "kms_audit_commit_latency_p99_ms",
            group_p99,
            "ms",
            Some(single_p99),
        );

        let (ours, crate_us) = seal_us(2000);
        bench("kms_hpke_seal_us", ours, "us", Some(crate_us));

        let ed = ed25519_us(3000);
        bench(
            "kms_token_verify_us",
            ed.token_verify,
            "us",
            Some(ed.ring_verify),
        );
        bench(
            "kms_ed25519_verify_us",
            ed.dalek_verify,
            "us",
            Some(ed.ring_verify),
        );
        bench(
            "kms_ed25519_verify_strict_us",
            ed.dalek_verify_strict,
            "us",
            Some(ed.ring_verify),
        );
        bench(
            "kms_ed25519_sign_us",
            ed.server_sign,
            "us",
            Some(ed.dalek_sign),
        );
        let roster = roster_us(2000);
        bench(
            "kms_roster_sign_us",
            roster.sign,
            "us",
            Some(roster.sign_whole_text),
        );
        bench(
            "kms_roster_answer_us",
            roster.answer,
            "us",
            Some(roster.answer_escaped),
        );
        if std::env::var_os("KMS_BENCH_MICRO_ONLY").is_some() {
            return;
        }

        let kms = support::Kms::start("bench", "audit: {groupCommitMax: 512}\n");
        kms.register_relay().await;
        let kms_key = {
            let info = kms.admin().info().await.unwrap();
            ed25519_dalek::VerifyingKey::from_bytes(&info.signing_public_key.array().unwrap())
                .unwrap()
        };
        // The admin certificate: mTLS on every connection (participants are
        // still authenticated by their join tokens).
        let files = kms
            .pki
            .client(
                "admin",
                &conclave_pki::Identity::new(support::NS, conclave_pki::Kind::Admin, "auditor")
                    .unwrap(),
            )
            .unwrap();
        let tls = Arc::new(conclave_pki::tls::client_config(&files).unwrap());
        const CONCURRENCY: usize = 64;
        let mut conns = Vec::new();
        for _ in 0..CONCURRENCY {
            conns.push(load::connect(kms.port, tls.clone()).await);
        }
        let no_check: load::Check = Arc::new(|_, _| {});
        let sorted_latencies = |answers: &[load::Answer]| {
            let mut lat: Vec<f64> = answers.iter().map(|a| a.1).collect();
            lat.sort_by(f64::total_cmp);
            lat
        };
        let infos = |n: usize| {
            (0..n)
                .map(|_| load::request(http::Method::GET, api::paths::INFO, Vec::new()))
                .collect()
        };
        // Baselines: unauthenticated /v1/info over the same connections
        // (HTTP + TLS stack alone), saturating and at the goal's rate.
        let (conns, answers, secs) =
            load::run(conns, infos(4000), no_check.clone(), Pace::Saturate).await;
        let info_rate = answers.len() as f64 / secs;
        let info_saturated = sorted_latencies(&answers);
        // KMS_BENCH_RATE offers another rate, to see how latency grows
        // with load.
        let offered: f64 = std::env::var("KMS_BENCH_RATE")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(GOAL_RATE);
        let paced_total = (offered * PACED_SECONDS) as usize;
        let (conns, answers, _) = load::run(
            conns,
            infos(paced_total),
            no_check.clone(),
            Pace::Rate(offered),
        )
        .await;
        let info_paced = sorted_latencies(&answers);
        // Warm up (meetings created, allocator and caches warm), then measure.
        let total = if Instant::now() < deadline {
            6000
        } else {
            1000
        };
        // 200 meetings grow to 32 members in the saturated phase (2 from
        // the warm-up); the paced phase's participants join meetings of
        // their own, as many as make them grow to the same size (rosters,
        // signed and sent in every answer, cost more the longer they are).
        let (warm, _) = join_requests(&kms, ("b", 200), "warm", 400);
        let (requests, mut expected) = join_requests(&kms, ("b", 200), "u", total);
        let (paced_requests, paced_expected) =
            join_requests(&kms, ("p", paced_total.div_ceil(32)), "v", paced_total);
        expected.extend(paced_expected);
        let expected = Arc::new(expected);
        // The bench relay sends no heartbeats: registering again keeps it
        // live however long the steps above took on a loaded machine.
        kms.register_relay().await;
        let (conns, _, _) = load::run(conns, warm, no_check, Pace::Saturate).await;
        let sampled = |offset: usize| {
            let expected = expected.clone();
            Arc::new(move |i: usize, body: &[u8]| {
                verify_release(body, &expected[offset + i], &kms_key)
            }) as load::Check
        };
        let server_cpu = || async {
            let text = kms.admin().metrics_text().await.unwrap_or_default();
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("process_cpu_seconds_total ")?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or(f64::NAN)
        };
        let metrics0 = kms.admin().metrics_text().await.unwrap_or_default();
        let (server0, client0) = (server_cpu().await, own_cpu_seconds());
        let disk0 = kms.disk_write_bytes();
        let (conns, answers, secs) = load::run(conns, requests, sampled(0), Pace::Saturate).await;
        let (server1, client1) = (server_cpu().await, own_cpu_seconds());
        let disk1 = kms.disk_write_bytes();
        let text = kms.admin().metrics_text().await.unwrap_or_default();
        let rate = answers.len() as f64 / secs;
        let saturated = sorted_latencies(&answers);
        kms.register_relay().await;
        let server2 = server_cpu().await;
        let (conns, paced_answers, paced_secs) =
            load::run(conns, paced_requests, sampled(total), Pace::Rate(offered)).await;
        let server3 = server_cpu().await;
        drop(conns);
        let paced = sorted_latencies(&paced_answers);
        // KMS_BENCH_LATENCIES=FILE writes each paced release's index (its
        // due time is index / rate) and latency: a queue that grows all run
        // (the server short of CPU) looks different from one stall.
        if let Some(path) = std::env::var_os("KMS_BENCH_LATENCIES") {
            let mut lines: Vec<(usize, f64)> = paced_answers.iter().map(|a| (a.0, a.1)).collect();
            lines.sort_by_key(|l| l.0);
            let text: String = lines
                .iter()
                .map(|(i, ms)| format!("{i} {ms:.3}\n"))
                .collect();
            std::fs::write(path, text).expect("KMS_BENCH_LATENCIES is writable");
        }
        println!(
            "kms bench load generator: {CONCURRENCY} kept-alive mTLS HTTP/1.1 connections, \
             one client thread, requests (tokens, participant keys) built before timing; \
             {total} releases as fast as the server answers, then {paced_total} offered \
             at {offered}/s; 1 in {} responses verified during the run, all after it",
            load::SAMPLE_EVERY,
        );
        // Every release, verified after the timed phases.
        for (i, _, body) in &answers {
            verify_release(body, &expected[*i], &kms_key);
        }
        for (i, _, body) in &paced_answers {
            verify_release(body, &expected[total + *i], &kms_key);
        }
        bench(
            "kms_releases_verified",
            (answers.len() + paced_answers.len()) as f64,
            "responses",
            Some((total + paced_total) as f64),
        );
        // The most the server answers with every connection kept busy.
        bench(
            "kms_key_releases_per_s",
            rate,
            "releases/s",
            Some(info_rate),
        );
        // Latency at the goal's rate, offered open loop; baselines: the
        // `/v1/info` requests offered the same way (HTTP + TLS + queueing
        // alone).
        bench(
            "kms_paced_releases_per_s",
            paced_answers.len() as f64 / paced_secs,
            "releases/s",
            Some(offered),
        );
        bench(
            "kms_release_latency_p50_ms",
            percentile(&paced, 0.5),
            "ms",
            Some(percentile(&info_paced, 0.5)),
        );
        bench(
            "kms_release_latency_p99_ms",
            percentile(&paced, 0.99),
            "ms",
            Some(percentile(&info_paced, 0.99)),
        );
        // Latency when saturated: every connection waits behind the other
        // 63, so it is about CONCURRENCY / rate whatever the server does.
        bench(
            "kms_saturated_latency_p50_ms",
            percentile(&saturated, 0.5),
            "ms",
            Some(percentile(&info_saturated, 0.5)),
        );
        bench(
            "kms_saturated_latency_p99_ms",
            percentile(&saturated, 0.99),
            "ms",
            Some(percentile(&info_saturated, 0.99)),
        );
        // CPU per release on each side of the connection, and the rate the
        // two cores could sustain if they ran nothing but this server and
        // this client (the machine is shared, so the measured rate is lower
        // whenever something else runs).
        let n = saturated.len() as f64;
        let server_us = (server1 - server0) * 1e6 / n;
        let client_us = (client1 - client0) * 1e6 / n;
        bench("kms_server_cpu_us_per_release", server_us, "us", None);
        // The server's CPU per release while paced, against saturated: paced
        // releases arrive spread out, so fewer share a group commit (about 6
        // against 8-9 in runs on Nov 27 2026) and a wakeup.
        bench(
            "kms_paced_server_cpu_us_per_release",
            (server3 - server2) * 1e6 / paced.len() as f64,
            "us",
            Some(server_us),
        );
        bench("kms_client_cpu_us_per_release", client_us, "us", None);
        // What the durable writes cost the disk (and the committer, which copies, checksums
        // and syncs every page a commit touches): bytes dirtied per release, saturated.
        if let (Some(d0), Some(d1)) = (disk0, disk1) {
            bench(
                "kms_disk_bytes_per_release",
                d1.saturating_sub(d0) as f64 / n,
                "bytes",
                None,
            );
        }
        bench(
            "kms_cpu_bound_releases_per_s",
            2.0 * 1e6 / (server_us + client_us),
            "releases/s",
            Some(rate),
        );
        // Where the time went on the server: durable commits during the
        // saturated run (what a counter gained over it, not since start).
        let gained = |name: &str| {
            let value = |text: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                    .unwrap_or(f64::NAN)
            };
            value(&text) - value(&metrics0)
        };
        // Where the release latency tail comes from: the server's own time
        // per join (request in to response out, durable commit included)
        // and the commits' time, both p99 during the run.
        bench(
            "kms_server_join_p99_ms",
            histogram_quantile(
                &metrics0,
                &text,
                &["conclave_kms_request_duration_seconds", "/join"],
                0.99,
            ) * 1000.0,
            "ms (bucket upper bound)",
            None,
        );
        bench(
            "kms_server_commit_p99_ms",
            histogram_quantile(
                &metrics0,
                &text,
                &["conclave_kms_audit_commit_seconds"],
                0.99,
            ) * 1000.0,
            "ms (bucket upper bound)",
            None,
        );
        let commits = gained("conclave_kms_audit_commit_seconds_count");
        bench(
            "kms_server_commit_mean_ms",
            gained("conclave_kms_audit_commit_seconds_sum") / commits * 1000.0,
            "ms",
            None,
        );
        bench(
            "kms_server_commit_mean_entries",
            gained("conclave_kms_audit_batch_entries_sum") / commits,
            "entries/commit",
            None,
        );
    });
}
