//! Start the connector a config describes.

use crate::metrics::Metrics;
use crate::sip::auth::Credentials;
use crate::sip::transport::{self, TlsSetup};
use crate::sip::ua::{Transport, UaConfig, UserAgent};
use crate::telephony::{self, TelephonySettings};
use anyhow::{Context, bail};
use meeting_proto::config::connector::{ConnectorConfig, ConnectorKind, SipSettings, SipTransport};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::mpsc;

fn load_tls(sip: &SipSettings) -> anyhow::Result<TlsSetup> {
    let (Some(cert), Some(key), Some(ca)) =
        (&sip.tls_cert_file, &sip.tls_key_file, &sip.tls_ca_file)
    else {
        bail!("sip.transport is tls but TLS files are missing");
    };
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let chain = rustls_pemfile::certs(&mut &read(cert)?[..])
        .collect::<Result<Vec<_>, _>>()
        .context("parsing sip.tlsCertFile")?;
    let key = rustls_pemfile::private_key(&mut &read(key)?[..])
        .context("parsing sip.tlsKeyFile")?
        .context("sip.tlsKeyFile holds no private key")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &read(ca)?[..]) {
        roots.add(c.context("parsing sip.tlsCaFile")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsSetup {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// Run until the process is stopped.
pub async fn run(cfg: ConnectorConfig, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    match cfg.kind {
        ConnectorKind::Telephony | ConnectorKind::RoomSystem => {
            let sip = cfg.sip.as_ref().context("sip section")?;
            let kms = kms_client(&cfg)?;
            let t = match sip.transport {
                SipTransport::Udp => Transport::Udp,
                SipTransport::Tcp => Transport::Tcp,
                SipTransport::Tls => Transport::Tls,
            };
            let tls = if t == Transport::Tls {
                Some(load_tls(sip)?)
            } else {
                None
            };
            let credentials = match &sip.credentials_file {
                Some(p) => {
                    let text = zeroize::Zeroizing::new(
                        std::fs::read_to_string(p)
                            .with_context(|| format!("reading {}", p.display()))?,
                    );
                    Some(Credentials::parse_file(&text)?)
                }
                None => None,
            };
            // Via, Contact and SDP need an address peers can reach: with a
            // wildcard listen address that is the pod's IP (downward API).
            let advertise = if sip.listen.ip().is_unspecified() {
                std::env::var("POD_IP")
                    .ok()
                    .and_then(|v| v.parse::<std::net::IpAddr>().ok())
                    .context(
                        "sip.listen is a wildcard address: set POD_IP to the address phones reach",
                    )?
            } else {
                sip.listen.ip()
            };
            let ua = UserAgent::new(UaConfig {
                local: std::net::SocketAddr::new(advertise, sip.listen.port()),
                transport: t,
                user: cfg.pool.clone(),
                display_name: "Conclave".into(),
                credentials,
                max_calls: 64,
                invites_per_second: 20,
            });
            let (ev_tx, ev_rx) = mpsc::channel(256);
            let handle = transport::spawn(ua, sip.listen, t, tls, ev_tx)
                .await
                .with_context(|| format!("binding SIP on {}", sip.listen))?;
            let (legs_tx, legs) = mpsc::channel(16);
            let tel = telephony::start(
                handle,
                ev_rx,
                TelephonySettings {
                    media_ip: advertise,
                    srtp: sip.srtp,
                    dial_in: sip.dial_in.clone(),
                    media_timeout: telephony::DEFAULT_MEDIA_TIMEOUT,
                    name_prefix: (cfg.kind == ConnectorKind::Telephony)
                        .then(|| "Phone".to_string()),
                },
                metrics,
                legs_tx,
            );
            tracing::info!(pool = %cfg.pool, kind = cfg.kind.as_str(), listen = %sip.listen, "SIP connector running");
            let plan = crate::bridge::DialOut {
                trunk: sip.trunk.clone(),
                tls: t == Transport::Tls,
            };
            crate::bridge::serve_legs(kms, legs, tel, plan, stop_on_signal()?).await;
            Ok(())
        }
        ConnectorKind::Recording => {
            let rs = cfg.recording.as_ref().context("recording section")?;
            let client = kms_client(&cfg)?;
            let stop_rx = stop_on_signal()?;
            // The one full scan: from here on the recorders report what they
            // write and the sweep what it deletes. Before the sweep starts, so
            // nothing is deleted between being counted and being subtracted.
            let dir = rs.dir.clone();
            let used =
                tokio::task::spawn_blocking(move || crate::recording::retention::used_bytes(&dir))
                    .await?;
            metrics.recording_storage_set(used);
            tokio::spawn({
                let (dir, days, metrics) = (rs.dir.clone(), rs.retention_days, metrics.clone());
                async move {
                    let mut hourly = tokio::time::interval(std::time::Duration::from_secs(3600));
                    loop {
                        hourly.tick().await;
                        match crate::recording::retention::sweep(
                            &dir,
                            days,
                            std::time::SystemTime::now(),
                        ) {
                            Ok(d) if !d.is_empty() => {
                                let bytes: u64 = d.iter().map(|d| d.bytes).sum();
                                metrics.recording_storage_add(
                                    -i64::try_from(bytes).unwrap_or(i64::MAX),
                                );
                                tracing::info!(deleted = d.len(), bytes, "retention sweep")
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "retention sweep failed"),
                        }
                    }
                }
            });
            tracing::info!(pool = %cfg.pool, dir = %rs.dir.display(), "recording connector waiting for assignments");
            let base = rs.dir.clone();
            serve_assignments(client.clone(), stop_rx.clone(), move |a| {
                let (client, base, stop, metrics) =
                    (client.clone(), base.clone(), stop_rx.clone(), metrics.clone());
                async move {
                    let meeting = a.meeting.clone();
                    if let Err(e) = crate::recording::live::record_assignment(client, a, &base, stop, &metrics).await {
                        tracing::warn!(meeting = %meeting, error = %format!("{e:#}"), "recording failed");
                    }
                }
            })
            .await
        }
        ConnectorKind::LiveStreaming => {
            let ss = cfg.streaming.clone().context("streaming section")?;
            let client = kms_client(&cfg)?;
            let stop_rx = stop_on_signal()?;
            let base = ss
                .allowed_targets
                .first()
                .cloned()
                .context("streaming.allowedTargets")?;
            tracing::info!(pool = %cfg.pool, "streaming connector waiting for assignments");
            serve_assignments(client.clone(), stop_rx.clone(), move |a| {
                // Without a host-chosen target: one stream per meeting under
                // the pool's first allowed target.
                let target = format!("{}/{}", base.trim_end_matches('/'), a.meeting.as_str());
                let (client, ss, stop, metrics) =
                    (client.clone(), ss.clone(), stop_rx.clone(), metrics.clone());
                async move {
                    let meeting = a.meeting.clone();
                    if let Err(e) = crate::streaming::stream_assignment(client, a, &ss, &target, stop, metrics).await {
                        tracing::warn!(meeting = %meeting, error = %format!("{e:#}"), "streaming failed");
                    }
                }
            })
            .await
        }
    }
}

/// Serves a recording or streaming pool's assignments until `stop`: each
/// invitation not seen before becomes a session (an invitation stays open,
/// and is offered again, until the session's join uses it). On stop, the
/// sessions in progress, which watch `stop` too, end first.
async fn serve_assignments<Session>(
    client: kms_client::KmsClient,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut session: impl FnMut(meeting_proto::kms_api::Assignment) -> Session,
) -> anyhow::Result<()>
where
    Session: std::future::Future<Output = ()> + Send + 'static,
{
    let mut started = std::collections::HashSet::new();
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {
                finish_sessions(&mut sessions).await;
                return Ok(());
            }
            r = client.assignments(25_000) => match r {
                Ok(r) => {
                    let pending = !r.assignments.is_empty();
                    for a in r.assignments {
                        if started.insert(a.invitation) {
                            sessions.spawn(session(a));
                        }
                    }
                    while sessions.try_join_next().is_some() {}
                    if pending {
                        tokio::time::sleep(crate::bridge::ASSIGNMENT_REPOLL).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fetching assignments failed");
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            }
        }
    }
}

/// SIGTERM (a pod deletion) or SIGINT, as a flag every session watches.
fn stop_on_signal() -> anyhow::Result<tokio::sync::watch::Receiver<bool>> {
    let mut signals = conclave_shutdown::Signals::listen()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        signals.recv().await;
        let _ = stop_tx.send(true);
    });
    Ok(stop_rx)
}

/// How long a stopping connector waits for its sessions to end cleanly
/// (files closed, meetings left, outcomes reported): well inside the pool
/// pods' 60 s termination grace period.
pub const SESSION_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Waits for the sessions in progress, which have seen the stop, to end.
pub(crate) async fn finish_sessions<T: 'static>(sessions: &mut tokio::task::JoinSet<T>) {
    let open = sessions.len();
    tracing::info!(open, "shutdown requested: ending the sessions in progress");
    let cut = conclave_shutdown::join_within(sessions, SESSION_CLOSE_GRACE).await;
    if cut > 0 {
        tracing::warn!(cut, "sessions still open after the grace period are cut");
    }
    tracing::info!("connector stopped");
}

fn kms_client(cfg: &ConnectorConfig) -> anyhow::Result<kms_client::KmsClient> {
    let files = conclave_pki::tls::TlsFiles {
        cert: cfg.kms.cert_file.clone(),
        key: cfg.kms.key_file.clone(),
        ca: cfg.kms.ca_file.clone(),
    };
    let tls =
        conclave_pki::tls::client_config(&files).context("loading the KMS client certificate")?;
    Ok(kms_client::KmsClient::new(&cfg.kms.url, tls)?)
}
