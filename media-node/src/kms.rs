//! Registration and heartbeat with the KMS over mTLS, so the KMS places
//! meetings on this relay while it is ready and stops when it drains.
//!
//! The relay talks to the KMS only for placement: tickets are verified with
//! the public key alone, so media keeps flowing if the KMS is unreachable.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use kms_client::KmsClient;
use meeting_proto::config::relay::{RelayConfig, RelayKms};
use meeting_proto::kms_api::{RelayHeartbeatRequest, RelayRegisterRequest, RelayRegisterResponse};
use tokio::sync::{mpsc, oneshot};

use crate::server::{Control, Health};

pub fn client(kms: &RelayKms) -> anyhow::Result<KmsClient> {
    let files = conclave_pki::tls::TlsFiles {
        cert: kms.cert_file.clone(),
        key: kms.key_file.clone(),
        ca: kms.ca_file.clone(),
    };
    let tls = conclave_pki::tls::client_config(&files)
        .context("loading the relay's KMS client certificate")?;
    Ok(KmsClient::new(&kms.url, tls)?)
}

/// This process's registration instance: random, so a restart under the
/// same relay id (same pod, same certificate) is told apart from the same
/// process registering again after a KMS restart. Not a secret.
pub fn new_instance() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn register_request(config: &RelayConfig, instance: &str) -> RelayRegisterRequest {
    RelayRegisterRequest {
        zone: config.zone.clone(),
        address: config.advertise.clone(),
        capacity: config
            .limits
            .participants_per_meeting
            .saturating_mul(config.limits.meetings),
        instance: Some(instance.to_owned()),
    }
}

/// Registers, retrying with backoff while the KMS is unreachable or busy.
/// A refusal (4xx other than 429) is a configuration error and is returned.
pub async fn register(
    kms: &KmsClient,
    config: &RelayConfig,
    instance: &str,
) -> Result<RelayRegisterResponse, kms_client::Error> {
    let mut wait = Duration::from_millis(200);
    loop {
        match kms
            .register_relay(&register_request(config, instance))
            .await
        {
            Ok(r) => return Ok(r),
            Err(e)
                if e.status()
                    .is_some_and(|s| (400..500).contains(&s) && s != 429) =>
            {
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(error = %e, "KMS registration failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Heartbeats until the process ends, reporting load and readiness;
/// registers again (as the same instance: its meetings stay) when the KMS
/// forgot this relay (it restarted).
pub async fn heartbeat(
    kms: KmsClient,
    config: RelayConfig,
    instance: String,
    mut interval: Duration,
    control: mpsc::Sender<Control>,
    health: Arc<Health>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = health.drain_started.notified() => {}
        }
        let (tx, rx) = oneshot::channel();
        if control.send(Control::Load(tx)).await.is_err() {
            return; // forwarding stopped
        }
        let Ok((_, participants)) = rx.await else {
            return;
        };
        let req = RelayHeartbeatRequest {
            load: participants as u32,
            ready: !health.draining.load(Ordering::Relaxed),
        };
        match kms.heartbeat(&req).await {
            Ok(r) => {
                let ms = r.heartbeat_interval_ms.clamp(500, 300_000);
                interval = Duration::from_millis(ms).min(interval.max(Duration::from_millis(500)));
            }
            Err(e) if e.code() == Some("unknown_relay") => {
                tracing::info!("KMS does not know this relay (restarted?): registering again");
                if let Err(e) = register(&kms, &config, &instance).await {
                    tracing::error!(error = %e, "KMS refused the relay's registration");
                }
            }
            Err(e) => tracing::warn!(error = %e, "KMS heartbeat failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_process_draws_its_own_instance_in_the_form_the_kms_accepts() {
        let (a, b) = (new_instance().unwrap(), new_instance().unwrap());
        assert_ne!(a, b);
        for i in [&a, &b] {
            assert_eq!(i.len(), 32);
            assert!(i.len() <= meeting_proto::kms_api::MAX_RELAY_INSTANCE_LEN);
            assert!(i.bytes().all(|c| c.is_ascii_hexdigit()), "{i}");
        }
    }
}
