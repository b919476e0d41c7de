//! Prometheus metrics (`conclave_kms_*`, base units, bounded labels: routes
//! are axum route templates, outcomes are status codes, denial codes are
//! the core's fixed strings).

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
pub struct CodeLabels {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<KindLabels, Histogram>,
    pub key_releases: Counter,
    pub denials: Family<CodeLabels, Counter>,
    pub rotations: Family<KindLabels, Counter>,
    pub active_meetings: Gauge,
    pub live_relays: Gauge,
    pub audit_commit_seconds: Histogram,
    pub audit_batch_entries: Histogram,
    pub store_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("conclave_kms");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "API requests by route and HTTP status",
            requests.clone(),
        );
        let request_seconds = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "request_duration_seconds",
            "API request latency by route (kind label holds the route)",
            request_seconds.clone(),
        );
        let key_releases = Counter::default();
        registry.register(
            "key_releases",
            "Meeting keys released (sealed to a participant) and committed to the audit log",
            key_releases.clone(),
        );
        let denials = Family::<CodeLabels, Counter>::default();
        registry.register("denials", "Requests refused, by reason", denials.clone());
        let rotations = Family::<KindLabels, Counter>::default();
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
            registry,
            requests,
            request_seconds,
            key_releases,
            denials,
            rotations,
            active_meetings,
            live_relays,
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
}
