//! Reconcile cost against the in-memory API server of `operator::fixtures`.
//!
//! For N MeetingZones sharing one ready KeyManagementServer: the first reconcile (creates every
//! child, issues a certificate) and the steady-state reconcile (reads only), each compared with
//! a baseline measured in the same run: building the same children as pure functions. Also the
//! API writes each kind of reconcile makes. The real-cluster figures (apply-to-children latency,
//! RSS with 1,000 zones, idle writes per minute) come from e2e.

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

#[tokio::main(flavor = "current_thread")]
async fn main() {
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
    bench(
        "operator_zone_first_reconcile_p99_ms",
        pct(&mut first, 0.99),
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
}
