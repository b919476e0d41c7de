//! Reconcile cost against the in-memory API server of `operator::fixtures`.
//!
//! For N MeetingZones sharing one ready KeyManagementServer: the first reconcile (creates every
//! child, issues a certificate) and the steady-state reconcile (reads only), each compared with
//! a baseline measured in the same run: building the same children as pure functions. Also the
//! API writes each kind of reconcile makes.
//!
//! Then the real `operator` binary runs against the same in-memory API server served over HTTP
//! (lists and watches included, leader election off, `--resync 5s`): 1,000 MeetingZones are
//! created through it, the first 100 one at a time to time apply -> children applied and status
//! written (`operator_apply_to_children_p50/p99_ms`; the p99's baseline is the p99 of the
//! in-process first reconcile above, i.e. without HTTP, watch delivery and scheduling),
//! the rest at once. Its resident memory is read from /proc/<pid>/status once all 1,000 are
//! reconciled and held in its caches (`operator_rss_mib_1000_zones`, baseline: the same process
//! with only the KMS). Writes per zone reconcile come from the API server's log and the
//! operator's own reconcile counter; idle writes are counted over 15 s of steady state (three
//! resync passes over every zone) and scaled to a minute. The API server here answers in
//! microseconds, so latencies are the operator's own cost, not a real API server's.

use operator::context::{Capabilities, Settings};
use operator::fixtures::{self, FakeApi};
use operator::zone::{self, MeetingZone};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ZONES: usize = 200;

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

fn bench(name: &str, value: f64, unit: &str, baseline: Option<f64>) {
    let b = baseline.map(|b| json!(b)).unwrap_or(json!(null));
    println!(
        "BENCH {}",
        json!({"name": name, "value": value, "unit": unit, "baseline": b})
    );
}

fn zone_path(name: &str) -> String {
    fixtures::path("conclave.dev/v1alpha1", "meetingzones", name)
}

fn writes(fake: &FakeApi) -> usize {
    fake.writes()
        .iter()
        .filter(|c| !c.path.contains("/events"))
        .count()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let first_p99 = in_process().await;
    real_process(first_p99).await;
}

/// Returns the p99 of the first reconcile, the baseline of the apply-to-children figure.
async fn in_process() -> f64 {
    let (ctx, fake) = fixtures::context(Capabilities { pdb_v1: true });
    let mut kms = serde_json::to_value(fixtures::kms("main")).unwrap();
    kms["status"] = json!({
        "conditions": [{"type": "Ready", "status": "True", "reason": "PodsReady", "message": "1/1", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "ticketPublicKey": "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29",
    });
    fake.put(
        &fixtures::path("conclave.dev/v1alpha1", "keymanagementservers", "main"),
        kms,
    );
    // The namespace CA is made once; keep its key generation out of the per-zone figures.
    operator::certs::ensure_ca(&ctx, fixtures::NS)
        .await
        .unwrap();

    let zones: Vec<MeetingZone> = (0..ZONES)
        .map(|i| fixtures::zone(&format!("z{i}"), "main"))
        .collect();
    for z in &zones {
        fake.put(
            &zone_path(&z.metadata.name.clone().unwrap()),
            serde_json::to_value(z).unwrap(),
        );
    }

    // Baseline: the same children built as pure functions, serialized as they would be sent.
    let link = zone::KmsLink {
        url: "https://main-kms.team.svc:8443".into(),
        ticket_public_key: "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
            .into(),
        client_secret: "x".into(),
        ca_secret: "x".into(),
        ca_key: "ca.crt".into(),
        port: 8443,
        kms_pod_selector: None,
        per_pod_certs: false,
    };
    let settings = Settings::default();
    let mut base = Vec::with_capacity(ZONES);
    for z in &zones {
        let t = Instant::now();
        let name = z.metadata.name.clone().unwrap();
        let cfg: Vec<(String, String)> = (0..z.spec.relays.replicas)
            .map(|i| {
                let c = zone::config(z, &link, i, &zone::advertise_for(z, i, None)).unwrap();
                (
                    zone::pod_name(&name, i),
                    serde_yaml_ng::to_string(&c).unwrap(),
                )
            })
            .collect();
        let objs = json!([
            zone::service_account(z),
            zone::config_map(z, &cfg),
            zone::headless_service(z).unwrap(),
            zone::stateful_set(z, &link, &settings, "h").unwrap(),
            zone::pdb(z).unwrap(),
            zone::network_policy(z, &link).unwrap(),
        ]);
        std::hint::black_box(serde_json::to_vec(&objs).unwrap());
        base.push(t.elapsed());
    }

    let mut first = Vec::with_capacity(ZONES);
    fake.clear_calls();
    for z in &zones {
        let t = Instant::now();
        zone::reconcile(Arc::new(z.clone()), ctx.clone())
            .await
            .unwrap();
        first.push(t.elapsed());
    }
    let first_writes = writes(&fake) as f64 / ZONES as f64;

    let mut steady = Vec::with_capacity(ZONES);
    fake.clear_calls();
    for z in &zones {
        let stored: MeetingZone = serde_json::from_value(
            fake.get(&zone_path(&z.metadata.name.clone().unwrap()))
                .unwrap(),
        )
        .unwrap();
        let t = Instant::now();
        zone::reconcile(Arc::new(stored), ctx.clone())
            .await
            .unwrap();
        steady.push(t.elapsed());
    }
    let steady_writes = writes(&fake) as f64 / ZONES as f64;

    let b50 = pct(&mut base, 0.5);
    bench(
        "operator_zone_first_reconcile_p50_ms",
        pct(&mut first, 0.5),
        "ms",
        Some(b50),
    );
    let first_p99 = pct(&mut first, 0.99);
    bench(
        "operator_zone_first_reconcile_p99_ms",
        first_p99,
        "ms",
        Some(pct(&mut base, 0.99)),
    );
    bench(
        "operator_zone_steady_reconcile_p50_ms",
        pct(&mut steady, 0.5),
        "ms",
        Some(b50),
    );
    bench(
        "operator_zone_steady_reconcile_p99_ms",
        pct(&mut steady, 0.99),
        "ms",
        Some(pct(&mut base, 0.99)),
    );
    bench(
        "operator_writes_per_first_reconcile",
        first_writes,
        "writes",
        None,
    );
    bench(
        "operator_writes_per_steady_reconcile",
        steady_writes,
        "writes",
        None,
    );
    first_p99
}

fn without_name(path: &str) -> &str {
    path.rsplit_once('/').map(|(c, _)| c).unwrap_or(path)
}

const PROCESS_ZONES: usize = 1000;
const TIMED_ZONES: usize = 100;

fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .expect("VmRSS of the operator")
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Kills the operator when the benchmark ends, however it ends.
struct Operator(std::process::Child);
impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for the status write of each path in `want` (all of them), bounded.
async fn statuses(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String, serde_json::Value)>,
    want: &mut std::collections::HashSet<String>,
) {
    let deadline = Duration::from_secs(300);
    tokio::time::timeout(deadline, async {
        while !want.is_empty() {
            let (_, path, obj) = rx.recv().await.expect("API server gone");
            if obj["status"]["observedGeneration"].is_i64() {
                want.remove(&path);
            }
        }
    })
    .await
    .expect("the operator did not reconcile every zone within 300 s");
}

async fn real_process(first_reconcile_p99_ms: f64) {
    let fake = Arc::new(FakeApi::default());
    let kms_path = fixtures::path("conclave.dev/v1alpha1", "keymanagementservers", "main");
    let mut kms = serde_json::to_value(fixtures::kms("main")).unwrap();
    kms["metadata"]["finalizers"] = json!([operator::kms::FINALIZER]);
    fake.create(&kms_path, kms);
    // A ready kms-node: its StatefulSet status and its /v1/info behind the service proxy.
    let mut sts = json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "main-kms", "namespace": fixtures::NS},
        "status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": 1}});
    sts["metadata"]["generation"] = json!(1);
    fake.put(&fixtures::path("apps/v1", "statefulsets", "main-kms"), sts);
    let port = fixtures::kms("main").spec.exposure.port;
    fake.put(
        &format!("/api/v1/namespaces/{}/services/https:main-kms:{port}/proxy/v1/info", fixtures::NS),
        json!({"signing_public_key": "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29", "api_version": "v1"}),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_addr = listener.local_addr().unwrap();
    tokio::spawn(fake.clone().serve(listener));

    let dir = std::env::temp_dir().join(format!("operator-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: 'http://{api_addr}'}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u, namespace: {}}}}}]\ncurrent-context: c\n",
            fixtures::NS
        ),
    )
    .unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_addr = http.local_addr().unwrap();
    drop(http);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_operator"))
        .args([
            "run",
            "--leader-elect=false",
            "--resync",
            "5s",
            "--log-format",
            "text",
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg(format!("--http-addr={http_addr}"))
        .env(
            "RUST_LOG",
            std::env::var("OPERATOR_BENCH_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("starting the operator binary");
    let op = Operator(child);
    let pid = op.0.id();

    let mut rx = fake.subscribe();
    // Converged with the KMS only: its status carries the ticket key read through the proxy.
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let done = fake
                .get(&kms_path)
                .is_some_and(|k| k["status"]["ticketSigningKeyFingerprint"].is_string());
            if done {
                break;
            }
            let _ = rx.recv().await;
        }
    })
    .await
    .expect("the operator did not reconcile the KMS within 60 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = rss_kib(pid);
    let metrics_before = http_get(http_addr, "/metrics").await;
    let zone_reconciles_before = metric_sum(
        &metrics_before,
        "conclave_operator_reconciles_total{kind=\"MeetingZone\"}",
    );
    fake.clear_calls();

    let mut apply = Vec::with_capacity(TIMED_ZONES);
    for i in 0..TIMED_ZONES {
        let name = format!("z{i}");
        let p = zone_path(&name);
        let t = Instant::now();
        fake.create(
            &p,
            serde_json::to_value(fixtures::zone(&name, "main")).unwrap(),
        );
        statuses(&mut rx, &mut [p].into_iter().collect()).await;
        apply.push(t.elapsed());
    }
    let mut want = std::collections::HashSet::new();
    for i in TIMED_ZONES..PROCESS_ZONES {
        let name = format!("z{i}");
        let p = zone_path(&name);
        fake.create(
            &p,
            serde_json::to_value(fixtures::zone(&name, "main")).unwrap(),
        );
        want.insert(p);
    }
    statuses(&mut rx, &mut want).await;
    // Converged: the re-reconciles that status writes trigger have run out (no write for 3 s).
    tokio::time::timeout(Duration::from_secs(180), async {
        loop {
            let n = fake.writes().len();
            tokio::time::sleep(Duration::from_secs(3)).await;
            if fake.writes().len() == n {
                break;
            }
        }
    })
    .await
    .expect("the operator kept writing for 180 s after creating the zones");
    let creation_writes = fake
        .writes()
        .iter()
        .filter(|c| !c.path.contains("/events") && !c.path.contains("keymanagementservers"))
        .count();
    let metrics_after = http_get(http_addr, "/metrics").await;
    let zone_reconciles = metric_sum(
        &metrics_after,
        "conclave_operator_reconciles_total{kind=\"MeetingZone\"}",
    ) - zone_reconciles_before;
    let rss_full = rss_kib(pid);

    fake.clear_calls();
    let idle_window = Duration::from_secs(15);
    tokio::time::sleep(idle_window).await;
    let idle = fake.writes();
    if std::env::var("OPERATOR_BENCH_LOG").is_ok() {
        let mut seen = std::collections::BTreeMap::new();
        for c in &idle {
            *seen
                .entry(format!("{} {}", c.method, without_name(&c.path)))
                .or_insert(0) += 1;
        }
        eprintln!("idle writes: {seen:?}");
    }
    let idle_writes = idle.len() as f64 * 60.0 / idle_window.as_secs_f64();
    let idle_reads = fake.calls().len();
    drop(op);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(idle_reads > 0, "no resync happened in the idle window");

    bench(
        "operator_apply_to_children_p50_ms",
        pct(&mut apply, 0.5),
        "ms",
        None,
    );
    bench(
        "operator_apply_to_children_p99_ms",
        pct(&mut apply, 0.99),
        "ms",
        Some(first_reconcile_p99_ms),
    );
    bench(
        "operator_rss_mib_1000_zones",
        rss_full / 1024.0,
        "MiB",
        Some(rss_idle / 1024.0),
    );
    bench(
        "operator_writes_per_reconcile",
        creation_writes as f64 / zone_reconciles.max(1.0),
        "writes",
        None,
    );
    bench(
        "operator_idle_writes_per_min",
        idle_writes,
        "writes/min",
        None,
    );
}
