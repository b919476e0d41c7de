//! Prometheus metrics of one relay (`conclave_relay_*`, base units).
//!
//! Every label value is known up front, so each counter handle is created once
//! and the forwarding path only does atomic adds.

use meeting_proto::wire::StreamKind;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::core::DropReason;

/// Traffic class used as the `kind` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Media(StreamKind),
    /// Parsed non-media packets (HELLO, keep-alive, NACK, ...).
    Control,
    /// Datagrams that did not parse.
    Unparsed,
}

impl Kind {
    const COUNT: usize = 6;
    fn index(self) -> usize {
        match self {
            Kind::Media(k) => k as usize - 1,
            Kind::Control => 4,
            Kind::Unparsed => 5,
        }
    }
    fn label(i: usize) -> &'static str {
        ["audio", "video", "screen", "chat", "control", "unparsed"][i]
    }
}

type Labels = Vec<(&'static str, &'static str)>;

#[derive(Clone, Debug)]
struct ByKind {
    packets: Vec<Counter>,
    bytes: Vec<Counter>,
}

impl ByKind {
    fn new(registry: &mut Registry, dir: &str) -> Self {
        let packets = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        registry.register(
            format!("conclave_relay_packets_{dir}"),
            format!("UDP datagrams {dir} by the relay, by stream kind"),
            packets.clone(),
        );
        registry.register(
            format!("conclave_relay_{dir}_bytes"),
            format!("UDP payload bytes {dir} by the relay, by stream kind"),
            bytes.clone(),
        );
        let mk = |f: &Family<Labels, Counter>| {
            (0..Kind::COUNT)
                .map(|i| f.get_or_create(&vec![("kind", Kind::label(i))]).clone())
                .collect()
        };
        Self {
            packets: mk(&packets),
            bytes: mk(&bytes),
        }
    }
    fn add(&self, kind: Kind, bytes: usize) {
        self.packets[kind.index()].inc();
        self.bytes[kind.index()].inc_by(bytes as u64);
    }
}

/// Handles to every relay metric plus the registry that exposes them.
#[derive(Debug)]
pub struct RelayMetrics {
    registry: Registry,
    received: ByKind,
    sent: ByKind,
    drops: Vec<Counter>,
    pub meetings: Gauge,
    pub participants: Gauge,
    pub draining: Gauge,
    pub fanout: Histogram,
    pub forwarding_latency: Histogram,
    recv_errors: Counter,
    send_errors: Counter,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        // CPU and memory for the relay dashboard, under the standard unprefixed names.
        registry.register_collector(Box::new(process_metrics::ProcessCollector));
        let received = ByKind::new(&mut registry, "received");
        let sent = ByKind::new(&mut registry, "sent");
        let drops_family = Family::<Labels, Counter>::default();
        registry.register(
            "conclave_relay_dropped_packets",
            "Datagrams the relay refused, by reason",
            drops_family.clone(),
        );
        let drops = DropReason::ALL
            .iter()
            .map(|r| {
                drops_family
                    .get_or_create(&vec![("reason", r.as_str())])
                    .clone()
            })
            .collect();
        let meetings = Gauge::default();
        registry.register(
            "conclave_relay_meetings",
            "Meetings with at least one bound participant",
            meetings.clone(),
        );
        let participants = Gauge::default();
        registry.register(
            "conclave_relay_participants",
            "Bound participants (source addresses)",
            participants.clone(),
        );
        let draining = Gauge::default();
        registry.register(
            "conclave_relay_draining",
            "1 while the relay drains before shutdown",
            draining.clone(),
        );
        let fanout = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        registry.register(
            "conclave_relay_fanout",
            "Destinations each forwarded media datagram was sent to",
            fanout.clone(),
        );
        let forwarding_latency = Histogram::new(exponential_buckets(0.000_005, 2.0, 16));
        registry.register(
            "conclave_relay_forwarding_latency_seconds",
            "Time from receiving a media datagram to handing its last copy to the kernel",
            forwarding_latency.clone(),
        );
        let socket_errors = Family::<Labels, Counter>::default();
        registry.register(
            "conclave_relay_socket_errors",
            "Failed socket operations, by operation",
            socket_errors.clone(),
        );
        let recv_errors = socket_errors.get_or_create(&vec![("op", "recv")]).clone();
        let send_errors = socket_errors.get_or_create(&vec![("op", "send")]).clone();
        Self {
            registry,
            received,
            sent,
            drops,
            meetings,
            participants,
            draining,
            fanout,
            forwarding_latency,
            recv_errors,
            send_errors,
        }
    }

    pub fn received(&self, kind: Kind, bytes: usize) {
        self.received.add(kind, bytes);
    }
    pub fn sent(&self, kind: Kind, bytes: usize) {
        self.sent.add(kind, bytes);
    }
    /// Datagrams sent so far of one kind.
    pub fn sent_packets(&self, kind: Kind) -> u64 {
        self.sent.packets[kind.index()].get()
    }
    pub fn dropped(&self, reason: DropReason) {
        self.drops[reason as usize].inc();
    }
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].get()
    }
    pub fn recv_error(&self) {
        self.recv_errors.inc();
    }
    pub fn send_error(&self) {
        self.send_errors.inc();
    }

    /// OpenMetrics text for `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_relay_and_standard_process_metrics() {
        let m = RelayMetrics::new();
        m.dropped(DropReason::Unbound);
        let text = m.encode();
        for name in [
            "conclave_relay_meetings ",
            "conclave_relay_dropped_packets_total{reason=\"unbound\"} 1",
            "\nprocess_cpu_seconds_total ",
            "\nprocess_resident_memory_bytes ",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
