//! KMS benchmarks. Prints `BENCH {...}` lines (see the repo's bench rules).
//!
//! 1. Audit commit throughput and latency with group commit (one fsync per
//!    batch) against the baseline of one fsync per request, same store code.
//! 2. HPKE sealing (every key release seals once): the ring-based
//!    implementation the server uses, against the `hpke` crate.
//! 3. Key releases (joins: token check, state change, durable audit, HPKE
//!    seal, ticket) per second over mTLS (the client presents a certificate;
//!    participants are still authenticated by their join token) through kms-client against the real
//!    binary, with p50/p99 latency; baseline: unauthenticated `/v1/info`
//!    requests over the same client (HTTP + TLS stack alone). The bench
//!    client shares the machine's cores with the server, so the CPU time
//!    each side spends per release is reported too (load-independent).

#[path = "../tests/support/mod.rs"]
mod support;

use kms_node::audit::AuditRecord;
use kms_node::core::Write;
use kms_node::store::{Committer, Store};
use meeting_proto::ids::MeetingId;
use meeting_proto::key_release::EphemeralKey;
use meeting_proto::kms_api::AuditKind;
use meeting_proto::token::Role;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    let started = Instant::now();
    for _ in 0..n {
        std::hint::black_box(kms_node::keys::seal(&recipient, b"info", &key).unwrap());
    }
    let ours = started.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    let pk = <hpke::kem::X25519HkdfSha256 as Kem>::PublicKey::from_bytes(&recipient).unwrap();
    let started = Instant::now();
    for _ in 0..n {
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
    }
    let crate_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    (ours, crate_us)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
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
    let committer = Committer::start(store, max_batch, || 0, Box::new(|_, _, _| {})).unwrap();
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

async fn releases(
    kms: &support::Kms,
    c: &kms_client::KmsClient,
    prefix: &str,
    total: usize,
    concurrency: usize,
) -> (f64, Vec<f64>) {
    // Tokens and participant key pairs are made before timing: the portal
    // and each participant's device make them, not the KMS.
    let tokens: Vec<_> = (0..total)
        .map(|i| {
            let meeting = format!("b{}", i % 200);
            let token = kms.token(&format!("{prefix}{i}"), &meeting, Role::Participant);
            (meeting, token, EphemeralKey::generate())
        })
        .collect();
    let queue = Arc::new(std::sync::Mutex::new(tokens));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (c, queue) = (c.clone(), queue.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let Some((meeting, token, key)) = queue.lock().unwrap().pop() else {
                    break;
                };
                let t0 = Instant::now();
                support::join_with_key(&c, &meeting, token, key)
                    .await
                    .unwrap();
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let rate = lat.len() as f64 / started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    (rate, lat)
}

async fn info_rate(c: &kms_client::KmsClient, total: usize, concurrency: usize) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..total / concurrency {
                c.info().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (total / concurrency * concurrency) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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

        let kms = support::Kms::start("bench", "audit: {groupCommitMax: 512}\n");
        kms.register_relay().await;
        // One client (one connection pool) for the whole run: the warm-up
        // opens its 64 mTLS connections, so handshakes are not timed as
        // releases (they were 2% of the samples, i.e. the p99, before).
        let client = kms.admin();
        let baseline = info_rate(&client, 2000, 64).await;
        // Warm up the connection pool, then measure.
        let _ = releases(&kms, &client, "warm", 200, 64).await;
        let total = if Instant::now() < deadline { 3000 } else { 500 };
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
        let (server0, client0) = (server_cpu().await, own_cpu_seconds());
        let (rate, lat) = releases(&kms, &client, "u", total, 64).await;
        let (server1, client1) = (server_cpu().await, own_cpu_seconds());
        bench("kms_key_releases_per_s", rate, "releases/s", Some(baseline));
        bench(
            "kms_release_latency_p50_ms",
            percentile(&lat, 0.5),
            "ms",
            None,
        );
        bench(
            "kms_release_latency_p99_ms",
            percentile(&lat, 0.99),
            "ms",
            None,
        );
        // CPU per release on each side of the connection, and the rate the
        // two cores could sustain if they ran nothing but this server and
        // this client (the machine is shared, so the measured rate is lower
        // whenever something else runs).
        let n = lat.len() as f64;
        let server_us = (server1 - server0) * 1e6 / n;
        let client_us = (client1 - client0) * 1e6 / n;
        bench("kms_server_cpu_us_per_release", server_us, "us", None);
        bench("kms_client_cpu_us_per_release", client_us, "us", None);
        bench(
            "kms_cpu_bound_releases_per_s",
            2.0 * 1e6 / (server_us + client_us),
            "releases/s",
            Some(rate),
        );
        // Where the time went on the server: durable commits during the run.
        let text = kms.admin().metrics_text().await.unwrap_or_default();
        let metric = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let commits = metric("conclave_kms_audit_commit_seconds_count");
        bench(
            "kms_server_commit_mean_ms",
            metric("conclave_kms_audit_commit_seconds_sum") / commits * 1000.0,
            "ms",
            None,
        );
        bench(
            "kms_server_commit_mean_entries",
            metric("conclave_kms_audit_batch_entries_sum") / commits,
            "entries/commit",
            None,
        );
    });
}
