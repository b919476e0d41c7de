//! media-node: `media-node --config relay.yaml`.
//!
//! Prints one JSON line on stdout once both sockets are bound
//! (`{"media":"ip:port","http":"ip:port"}`) so supervisors and tests can use
//! port 0. Logs go to stderr as JSON.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use meeting_proto::config::relay::RelayConfig;
use tokio::sync::mpsc;

use media_node::core::Relay;
use media_node::metrics::RelayMetrics;
use media_node::server::{self, Control, Health};
use media_node::{http, kms, udp};

/// Overrides the config's `advertise` (set by the operator from the downward API).
const ADVERTISE_ENV: &str = "CONCLAVE_RELAY_ADVERTISE";

#[derive(Parser, Debug)]
#[command(version, about = "Conclave media relay")]
struct Args {
    /// Relay config file (YAML or JSON).
    #[arg(long, env = "CONCLAVE_RELAY_CONFIG")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let mut config: RelayConfig = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("parsing {}", args.config.display()))?;
    // A new relay pod learns its own address (pod or host IP) only from the
    // kubelet, before the operator can write it into the config file.
    if let Ok(advertise) = std::env::var(ADVERTISE_ENV)
        && !advertise.is_empty()
    {
        config.advertise = advertise;
    }
    config
        .validate()
        .with_context(|| format!("invalid config {}", args.config.display()))?;
    // Registered before the relay says it listens: a SIGTERM from then on drains it rather
    // than killing it with the default action.
    let mut signals = conclave_shutdown::Signals::listen()?;
    let metrics = Arc::new(RelayMetrics::new());
    let health = Arc::new(Health::default());
    let socket = udp::MediaSocket::bind(config.listen)
        .with_context(|| format!("binding media socket {}", config.listen))?;
    let media_addr = socket.local_addr()?;
    let listener = http::bind(config.http_listen)
        .await
        .with_context(|| format!("binding http {}", config.http_listen))?;
    let http_addr = listener.local_addr()?;
    // Port 0 in `advertise` means "the port the media socket got".
    if let Some(host) = config.advertise.strip_suffix(":0") {
        config.advertise = format!("{host}:{}", media_addr.port());
    }
    let mut ticket_key = config.ticket_verifying_key()?;
    let mut relay_id = config.relay_id.clone();
    let mut kms_link = None;
    if let Some(k) = &config.kms {
        let client = kms::client(k)?;
        let instance = kms::new_instance()?;
        let reg = kms::register(&client, &config, &instance)
            .await
            .context("the KMS refused this relay's registration")?;
        // The KMS names relays by their certificate and signs their tickets:
        // its answer wins over the rendered config.
        if reg.relay != relay_id {
            tracing::warn!(config = %relay_id, kms = %reg.relay, "relay id differs from the KMS's; using the KMS's");
            relay_id = reg.relay.clone();
        }
        if let Some(bytes) = reg.ticket_public_key.array::<32>() {
            ticket_key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                .context("KMS returned an invalid ticket key")?;
        }
        tracing::info!(relay = %relay_id, %instance, "registered with the KMS");
        let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(500)) / 2;
        kms_link = Some((client, interval, instance));
    }

    println!(
        "{}",
        serde_json::json!({"media": media_addr.to_string(), "http": http_addr.to_string()})
    );
    tracing::info!(%media_addr, %http_addr, relay = %config.relay_id, "relay listening");

    let relay = Relay::new(relay_id, ticket_key, config.limits.clone(), metrics.clone());
    let (ctl_tx, ctl_rx) = mpsc::channel(8);
    let forwarding = tokio::spawn(server::run(
        socket,
        relay,
        metrics.clone(),
        health.clone(),
        ctl_rx,
    ));
    let heartbeat = kms_link.map(|(client, interval, instance)| {
        tokio::spawn(kms::heartbeat(
            client,
            config.clone(),
            instance,
            interval,
            ctl_tx.clone(),
            health.clone(),
        ))
    });
    let app = http::router(metrics.clone(), health.clone());
    tokio::spawn(async move {
        if let Err(e) = http::serve(listener, app).await {
            tracing::error!(error = %e, "http server stopped");
        }
    });

    signals.recv().await;
    let drain = Duration::from_secs(config.drain_seconds as u64);
    tracing::info!(
        seconds = config.drain_seconds,
        "shutdown requested: draining"
    );
    ctl_tx
        .send(Control::Drain { forward_for: drain })
        .await
        .ok();
    // Keep forwarding while clients move; a second signal ends it at once.
    tokio::select! {
        _ = tokio::time::sleep(drain) => {}
        _ = signals.recv() => {}
    }
    if let Some(h) = heartbeat {
        h.abort();
    }
    drop(ctl_tx);
    forwarding.await.ok();
    tracing::info!("relay stopped");
    Ok(())
}
