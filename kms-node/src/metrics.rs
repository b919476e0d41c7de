//! Prometheus metrics (`conclave_kms_*`, base units, bounded labels: routes
//! are axum route templates, outcomes are status codes, denial reasons are
//! the fixed codes in [`DENIAL_REASONS`]), plus the standard unprefixed
//! `process_*` metrics (crate `process-metrics`) read from /proc at every scrape.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Every reason a request can be refused for (the `code` of the error body;
/// `foreign_ca`/`bad_certificate` are TLS handshakes refused for their client
/// certificate). Pre-created at 0 so `increase()` and alerts see the first
/// refusal; anything else is counted as `other`.
pub const DENIAL_REASONS: &[&str] = &[
    // join tokens
    "token_expired",
    "wrong_audience",
    "unknown_issuer",
    "bad_signature",
    "token_time",
    "bad_token",
    "token_replayed",
    "wrong_meeting",
    "connector_role_in_token",
    // sessions and roles
    "no_credentials",
    "no_session",
    "not_member",
    "not_host",
    "meeting_full",
    // services
    "not_a_connector",
    "not_invited",
    "not_a_relay",
    "wrong_zone",
    "not_admin",
    "not_recording_connector",
    "not_a_reader",
    "no_such_recording",
    // invitation targets
    "bad_target",
    "target_not_allowed",
    // TLS client certificates
    "foreign_ca",
    "bad_certificate",
    // load shedding (429)
    "rate_limited",
    "overloaded",
    "too_many_failures",
    "other",
];

/// Kinds of key rotation.
pub const ROTATION_KINDS: &[&str] = &["epoch", "kek"];

/// The bounded label for a denial code.
pub fn denial_reason(code: &str) -> &'static str {
    DENIAL_REASONS
        .iter()
        .find(|r| **r == code)
        .copied()
        .unwrap_or("other")
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<RouteLabels, Histogram>,
    pub key_releases: Counter,
    pub denials: Family<ReasonLabels, Counter>,
    pub rotations: Family<KindLabels, Counter>,
    pub active_meetings: Gauge,
    pub live_relays: Gauge,
    pub ready: Gauge,
    pub audit_verifications: Counter,
    pub audit_verify_failures: Counter,
    pub audit_commit_seconds: Histogram,
    pub audit_batch_entries: Histogram,
    pub store_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(process_metrics::ProcessCollector));
        let registry = root.sub_registry_with_prefix("conclave_kms");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "API requests by route and HTTP status",
            requests.clone(),
        );
        let request_seconds = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "request_duration_seconds",
            "API request latency by route (long polls include their wait)",
            request_seconds.clone(),
        );
        let key_releases = Counter::default();
        registry.register(
            "key_releases",
            "Meeting keys released (sealed to a participant) and committed to the audit log",
            key_releases.clone(),
        );
        let denials = Family::<ReasonLabels, Counter>::default();
        for reason in DENIAL_REASONS {
            let _ = denials.get_or_create(&ReasonLabels { reason });
        }
        registry.register("denials", "Requests refused, by reason", denials.clone());
        let rotations = Family::<KindLabels, Counter>::default();
        for kind in ROTATION_KINDS {
            let _ = rotations.get_or_create(&KindLabels { kind });
        }
        registry.register(
            "rotations",
            "Key rotations: kind=epoch (meeting key) or kek",
            rotations.clone(),
        );
        let active_meetings = Gauge::default();
        registry.register(
            "active_meetings",
            "Meetings with at least one member",
            active_meetings.clone(),
        );
        let live_relays = Gauge::default();
        registry.register(
            "live_relays",
            "Relays heartbeating within the timeout",
            live_relays.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while the store and audit log are open and the API is serving",
            ready.clone(),
        );
        let audit_verifications = Counter::default();
        registry.register(
            "audit_verifications",
            "Audit chain verifications run (on request and periodic)",
            audit_verifications.clone(),
        );
        let audit_verify_failures = Counter::default();
        registry.register(
            "audit_verify_failures",
            "Audit chain verifications that found the chain broken",
            audit_verify_failures.clone(),
        );
        let audit_commit_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "audit_commit_seconds",
            "Time of one durable store transaction (group commit)",
            audit_commit_seconds.clone(),
        );
        let audit_batch_entries = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "audit_batch_entries",
            "Audit entries per durable transaction",
            audit_batch_entries.clone(),
        );
        let store_bytes = Gauge::default();
        registry.register_with_unit(
            "store_size",
            "Size of the store file",
            prometheus_client::registry::Unit::Bytes,
            store_bytes.clone(),
        );
        Self {
            registry: root,
            requests,
            request_seconds,
            key_releases,
            denials,
            rotations,
            active_meetings,
            live_relays,
            ready,
            audit_verifications,
            audit_verify_failures,
            audit_commit_seconds,
            audit_batch_entries,
            store_bytes,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn deny(&self, code: &str) {
        self.denials
            .get_or_create(&ReasonLabels {
                reason: denial_reason(code),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashboard_metric_names_are_exposed_with_pre_created_labels() {
        let m = Metrics::default();
        m.request_seconds
            .get_or_create(&RouteLabels {
                route: "/v1/meetings/{meeting}/join".into(),
            })
            .observe(0.01);
        m.audit_commit_seconds.observe(0.002);
        m.audit_batch_entries.observe(4.0);
        let text = m.encode();
        for name in [
            "conclave_kms_ready ",
            "conclave_kms_audit_verify_failures_total ",
            "conclave_kms_audit_verifications_total ",
            "conclave_kms_live_relays ",
            "conclave_kms_active_meetings ",
            "conclave_kms_key_releases_total ",
            "conclave_kms_store_size_bytes ",
            "conclave_kms_audit_commit_seconds_bucket{",
            "conclave_kms_audit_batch_entries_bucket{",
            "conclave_kms_request_duration_seconds_count{route=\"/v1/meetings/{meeting}/join\"}",
            "conclave_kms_rotations_total{kind=\"epoch\"} 0",
            "conclave_kms_rotations_total{kind=\"kek\"} 0",
            "\nprocess_cpu_seconds_total ",
            "\nprocess_resident_memory_bytes ",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        for reason in DENIAL_REASONS {
            let line = format!("conclave_kms_denials_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&line), "{line} missing");
        }
        m.deny("not_member");
        m.deny("something new");
        let text = m.encode();
        assert!(text.contains("conclave_kms_denials_total{reason=\"not_member\"} 1"));
        assert!(text.contains("conclave_kms_denials_total{reason=\"other\"} 1"));
    }
}
