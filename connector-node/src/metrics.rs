//! Prometheus metrics (`conclave_connector_*`, base units) and the small
//! HTTP server for /metrics and /healthz.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    calls: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    failed: Family<Labels, Counter>,
    ended: Family<Labels, Counter>,
    legs: Family<Labels, Counter>,
    legs_active: Gauge,
    rtp: Family<Labels, Counter>,
    rtp_dropped: Family<Labels, Counter>,
    dtmf: Counter,
    sip_rejected: Family<Labels, Counter>,
    ffmpeg_restarts: Counter,
    ffmpeg_running: Gauge,
    ffmpeg_errors: Family<Labels, Counter>,
    stream_refused: Counter,
    stream_tls_verify: Counter,
    recording_bytes: Counter,
    recording_storage: Gauge,
    recording_chunks: Counter,
    recordings_active: Gauge,
}

fn l(k: &'static str, v: impl Into<String>) -> Labels {
    vec![(k, v.into())]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // The standard process_* metrics keep their unprefixed names.
        let mut root = Registry::default();
        root.register_collector(Box::new(process_metrics::ProcessCollector));
        let r = root.sub_registry_with_prefix("conclave_connector");
        let m = Self {
            calls: Family::default(),
            refused: Family::default(),
            failed: Family::default(),
            ended: Family::default(),
            legs: Family::default(),
            legs_active: Gauge::default(),
            rtp: Family::default(),
            rtp_dropped: Family::default(),
            dtmf: Counter::default(),
            sip_rejected: Family::default(),
            ffmpeg_restarts: Counter::default(),
            ffmpeg_running: Gauge::default(),
            ffmpeg_errors: Family::default(),
            stream_refused: Counter::default(),
            stream_tls_verify: Counter::default(),
            recording_bytes: Counter::default(),
            recording_storage: Gauge::default(),
            recording_chunks: Counter::default(),
            recordings_active: Gauge::default(),
            registry: Registry::default(),
        };
        r.register(
            "sip_calls",
            "SIP calls started, by direction",
            m.calls.clone(),
        );
        r.register(
            "sip_calls_refused",
            "Calls refused before media, by reason",
            m.refused.clone(),
        );
        r.register(
            "sip_calls_failed",
            "Dial-out calls that failed, by SIP status",
            m.failed.clone(),
        );
        r.register(
            "sip_calls_ended",
            "Established calls that ended, by reason",
            m.ended.clone(),
        );
        r.register(
            "phone_legs",
            "Phone legs started, by whether media is SRTP",
            m.legs.clone(),
        );
        r.register(
            "phone_legs_active",
            "Phone legs with live media",
            m.legs_active.clone(),
        );
        r.register(
            "rtp_packets",
            "RTP packets on phone legs, by direction",
            m.rtp.clone(),
        );
        r.register(
            "rtp_packets_dropped",
            "RTP packets dropped, by reason",
            m.rtp_dropped.clone(),
        );
        r.register("dtmf_digits", "DTMF digits received", m.dtmf.clone());
        r.register(
            "sip_messages_rejected",
            "Inbound SIP messages rejected, by reason",
            m.sip_rejected.clone(),
        );
        r.register(
            "ffmpeg_restarts",
            "Streaming ffmpeg child restarts",
            m.ffmpeg_restarts.clone(),
        );
        r.register(
            "ffmpeg_running",
            "Streaming ffmpeg children running",
            m.ffmpeg_running.clone(),
        );
        r.register(
            "ffmpeg_exits",
            "Streaming ffmpeg exits, by kind",
            m.ffmpeg_errors.clone(),
        );
        r.register(
            "stream_targets_refused",
            "Stream targets refused by the allow-list",
            m.stream_refused.clone(),
        );
        r.register(
            "stream_tls_verify_failures",
            "Streaming ffmpeg exits because an rtmps target's certificate failed verification (also counted as ffmpeg_exits kind error)",
            m.stream_tls_verify.clone(),
        );
        r.register(
            "recording_storage_used_bytes",
            "Bytes of recordings on the pool's volume (scanned at start, then tracked as recordings are written and deleted by retention)",
            m.recording_storage.clone(),
        );
        r.register(
            "recording_written_bytes",
            "Encrypted recording bytes written",
            m.recording_bytes.clone(),
        );
        r.register(
            "recording_chunks",
            "Encrypted recording chunks written",
            m.recording_chunks.clone(),
        );
        r.register(
            "recordings_active",
            "Recordings being written now",
            m.recordings_active.clone(),
        );
        // Every bounded label value exists from the start, so dashboards and
        // rate() see 0 rather than no series until the first event.
        let pre = [
            (&m.calls, "direction", &["dialIn", "dialOut"][..]),
            (&m.legs, "srtp", &["true", "false"][..]),
            (&m.rtp, "direction", &["sent", "received"][..]),
            (
                &m.rtp_dropped,
                "reason",
                &[
                    "recvError",
                    "source",
                    "srtpAuth",
                    "srtpReplay",
                    "malformed",
                    "undecodable",
                    "payloadType",
                ][..],
            ),
            (
                &m.refused,
                "reason",
                &[
                    "srtpRequired",
                    "srtpOff",
                    "noCryptoSuite",
                    "noCodec",
                    "badSdp",
                ][..],
            ),
            (
                &m.ffmpeg_errors,
                "kind",
                &["spawnError", "stopped", "error"][..],
            ),
        ];
        for (family, key, values) in pre {
            for v in values {
                drop(family.get_or_create(&l(key, *v)));
            }
        }
        Self {
            registry: root,
            ..m
        }
    }

    pub fn calls_started(&self, direction: &str) {
        self.calls.get_or_create(&l("direction", direction)).inc();
    }
    pub fn call_refused(&self, reason: &str) {
        self.refused.get_or_create(&l("reason", reason)).inc();
    }
    pub fn call_failed(&self, code: u16) {
        self.failed
            .get_or_create(&l("code", code.to_string()))
            .inc();
    }
    pub fn call_ended(&self, reason: &str) {
        self.ended.get_or_create(&l("reason", reason)).inc();
    }
    pub fn leg_started(&self, srtp: bool) {
        self.legs.get_or_create(&l("srtp", srtp.to_string())).inc();
        self.legs_active.inc();
    }
    pub fn leg_ended(&self) {
        self.legs_active.dec();
    }
    pub fn rtp_sent(&self) {
        self.rtp.get_or_create(&l("direction", "sent")).inc();
    }
    pub fn rtp_received(&self) {
        self.rtp.get_or_create(&l("direction", "received")).inc();
    }
    pub fn rtp_dropped(&self, reason: &str) {
        self.rtp_dropped.get_or_create(&l("reason", reason)).inc();
    }
    pub fn dtmf_digit(&self) {
        self.dtmf.inc();
    }
    /// Apply a delta of the SIP engine's counters.
    pub fn sip_rejected(&self, reason: &str, n: u64) {
        if n > 0 {
            self.sip_rejected
                .get_or_create(&l("reason", reason))
                .inc_by(n);
        }
    }
    pub fn ffmpeg_started(&self, restart: bool) {
        if restart {
            self.ffmpeg_restarts.inc();
        }
        self.ffmpeg_running.inc();
    }
    pub fn ffmpeg_exited(&self, kind: &str) {
        self.ffmpeg_running.dec();
        self.ffmpeg_errors.get_or_create(&l("kind", kind)).inc();
    }
    pub fn stream_refused(&self) {
        self.stream_refused.inc();
    }
    pub fn stream_tls_verify_failed(&self) {
        self.stream_tls_verify.inc();
    }
    /// The volume's recordings as found at start.
    pub fn recording_storage_set(&self, bytes: u64) {
        self.recording_storage
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
    /// Bytes that appeared on the volume (written) or left it (negative: deleted).
    pub fn recording_storage_add(&self, delta: i64) {
        self.recording_storage.inc_by(delta);
    }
    pub fn recording_written(&self, bytes: u64) {
        self.recording_bytes.inc_by(bytes);
        self.recording_chunks.inc();
    }

    pub fn recording_started(&self) {
        self.recordings_active.inc();
    }
    pub fn recording_ended(&self) {
        self.recordings_active.dec();
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}

/// Serve /metrics and /healthz until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut req = vec![0u8; 2048];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut req))
                .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let line = String::from_utf8_lossy(&req[..n]);
            let path = line.split(' ').nth(1).unwrap_or("");
            let (status, ctype, body) = match path {
                "/metrics" => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.render(),
                ),
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashboard_series_exist_before_the_first_event() {
        let m = Metrics::new();
        m.recording_started();
        let text = m.render();
        for series in [
            "conclave_connector_recordings_active 1",
            "conclave_connector_sip_calls_total{direction=\"dialIn\"} 0",
            "conclave_connector_phone_legs_total{srtp=\"false\"} 0",
            "conclave_connector_rtp_packets_total{direction=\"received\"} 0",
            "conclave_connector_rtp_packets_dropped_total{reason=\"srtpAuth\"} 0",
            "conclave_connector_sip_calls_refused_total{reason=\"srtpRequired\"} 0",
            "conclave_connector_ffmpeg_exits_total{kind=\"error\"} 0",
            "conclave_connector_stream_tls_verify_failures_total 0",
            "conclave_connector_recording_storage_used_bytes 0",
            "\nprocess_cpu_seconds_total ",
            "\nprocess_resident_memory_bytes ",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }
}
