//! `operator run`: the Conclave operator, from a kubeconfig or in-cluster.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use operator::context::{Capabilities, Context, Settings};
use operator::http::Health;
use operator::leader::{self, LeaseConfig, Outcome};
use operator::metrics::{CountWrites, Metrics};
use operator::shared::parse_duration;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(version, about = "Conclave Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controllers (leader-elected) and the metrics/health server.
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions as YAML.
    Crds,
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration like 90s, 15m, 24h or 30d"))
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Kubeconfig file. Without it: $KUBECONFIG, ~/.kube/config, then the in-cluster service account.
    #[arg(long, env = "CONCLAVE_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use (default: the current context).
    #[arg(long, env = "CONCLAVE_KUBE_CONTEXT")]
    context: Option<String>,
    /// Watch only this namespace (default: all namespaces; needs the chart's ClusterRole).
    #[arg(long, env = "CONCLAVE_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "CONCLAVE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Elect a leader on a Lease so several replicas can run (only the leader reconciles).
    #[arg(long, env = "CONCLAVE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "CONCLAVE_LEASE_NAME", default_value = "conclave-operator")]
    lease_name: String,
    /// Namespace of the leader Lease (in-cluster: the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease (default: the pod name, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long a Lease stays valid without renewal.
    #[arg(long, env = "CONCLAVE_LEASE_DURATION", default_value = "15s", value_parser = duration)]
    lease_duration: Duration,
    /// How often the leader renews the Lease (and a follower retries).
    #[arg(long, env = "CONCLAVE_LEASE_RENEW", default_value = "5s", value_parser = duration)]
    lease_renew: Duration,
    /// Default kms-node image (KeyManagementServer spec.image overrides it).
    #[arg(
        long,
        env = "CONCLAVE_KMS_IMAGE",
        default_value = "conclave/kms-node:latest"
    )]
    kms_image: String,
    /// Default media-node image (MeetingZone spec.image overrides it).
    #[arg(
        long,
        env = "CONCLAVE_RELAY_IMAGE",
        default_value = "conclave/media-node:latest"
    )]
    relay_image: String,
    /// Default connector-node image (ConnectorPool spec.image overrides it).
    #[arg(
        long,
        env = "CONCLAVE_CONNECTOR_IMAGE",
        default_value = "conclave/connector-node:latest"
    )]
    connector_image: String,
    /// imagePullPolicy of node containers.
    #[arg(
        long,
        env = "CONCLAVE_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    image_pull_policy: String,
    /// Lifetime of issued certificates (renewed at two thirds of it).
    #[arg(long, env = "CONCLAVE_CERT_LIFETIME", default_value = "24h", value_parser = duration)]
    cert_lifetime: Duration,
    /// Lifetime of a namespace CA the operator generates.
    #[arg(long, env = "CONCLAVE_CA_LIFETIME", default_value = "3650d", value_parser = duration)]
    ca_lifetime: Duration,
    /// Re-check interval of healthy resources (reads only unless something drifted).
    #[arg(long, env = "CONCLAVE_RESYNC", default_value = "5m", value_parser = duration)]
    resync: Duration,
    /// Cluster DNS domain used in certificate names.
    #[arg(long, env = "CONCLAVE_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Namespace where the keys of the namespace CAs are kept (Secrets `conclave-ca-<namespace>`);
    /// served namespaces get only `ca.crt`. Default: the operator's own namespace (POD_NAMESPACE);
    /// without either, keys stay in the served namespaces.
    #[arg(long, env = "CONCLAVE_CA_NAMESPACE")]
    ca_namespace: Option<String>,
    /// Log format: json or text.
    #[arg(long, env = "CONCLAVE_LOG_FORMAT", default_value = "json")]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => {
            for crd in operator::crds() {
                print!("---\n{}", operator::crd_yaml(&crd, true)?);
            }
            Ok(())
        }
        Command::Run(args) => run(*args).await,
    }
}

async fn client(args: &RunArgs, metrics: Arc<Metrics>) -> anyhow::Result<kube::Client> {
    let opts = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &opts).await?
        }
        None if args.context.is_some() => kube::Config::from_kubeconfig(&opts).await?,
        None => kube::Config::infer().await?,
    };
    Ok(ClientBuilder::try_from(config)?
        .with_layer(&CountWrites(metrics))
        .build())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    if args.log_format == "text" {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let client = client(&args, metrics.clone()).await?;

    // Registered before anything is served: a SIGTERM from then on stops the operator
    // cleanly (the leader Lease released), rather than by the signal's default action.
    let mut signals = conclave_shutdown::Signals::listen().context("registering stop signals")?;
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics /healthz /readyz");
    let app = operator::http::router(metrics.clone(), health.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "http server stopped");
        }
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        signals.recv().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let stopped = {
        let rx = stop_rx.clone();
        move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }
    };

    let lease = LeaseConfig {
        name: args.lease_name.clone(),
        namespace: args.lease_namespace.clone(),
        identity: args.identity.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "operator".into()),
                std::process::id()
            )
        }),
        lease_duration: args.lease_duration,
    };
    if args.leader_elect {
        // Stand by until we lead (or are told to stop).
        loop {
            if *stop_rx.borrow() {
                return Ok(());
            }
            match leader::try_acquire(&client, &lease).await {
                Ok(Outcome::Leader) => break,
                Ok(Outcome::Follower) => health.api_reachable.store(true, Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(args.lease_renew) => {}
                _ = stopped() => return Ok(()),
            }
        }
        tracing::info!(identity = %lease.identity, lease = %lease.name, "became leader");
    }
    health.api_reachable.store(true, Ordering::Relaxed);
    metrics.leader.set(1);

    let caps = Capabilities::discover(&client).await;
    tracing::info!(?caps, "discovered optional APIs");
    let settings = Settings {
        kms_image: args.kms_image.clone(),
        relay_image: args.relay_image.clone(),
        connector_image: args.connector_image.clone(),
        image_pull_policy: args.image_pull_policy.clone(),
        cert_lifetime: args.cert_lifetime,
        ca_lifetime: args.ca_lifetime,
        resync: args.resync,
        cluster_domain: args.cluster_domain.clone(),
        ca_namespace: args
            .ca_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok()),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        settings,
        caps,
    ));

    // Losing the Lease stops the controllers: a follower that lost its lead must not write.
    let (lost_tx, lost_rx) = tokio::sync::watch::channel(false);
    if args.leader_elect {
        let (client, lease, renew, stop_rx) = (
            client.clone(),
            lease.clone(),
            args.lease_renew,
            stop_rx.clone(),
        );
        tokio::spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(renew).await;
                if *stop_rx.borrow() {
                    return;
                }
                match leader::try_acquire(&client, &lease).await {
                    Ok(Outcome::Leader) => last_ok = tokio::time::Instant::now(),
                    Ok(Outcome::Follower) => {
                        tracing::error!("lost the leader Lease");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lease renewal failed");
                        if last_ok.elapsed() >= lease.lease_duration {
                            tracing::error!("could not renew the leader Lease in time");
                            let _ = lost_tx.send(true);
                            return;
                        }
                    }
                }
            }
        });
    }
    let shutdown = {
        let stopped = stopped.clone();
        let lost = lost_rx.clone();
        async move {
            let mut lost = lost;
            tokio::select! {
                _ = stopped() => {}
                _ = lost.wait_for(|l| *l) => {}
            }
        }
    };
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    operator::controller::run(ctx, args.watch_namespace.clone(), shutdown).await;
    metrics.leader.set(0);
    if *lost_rx.borrow() {
        anyhow::bail!("lost leadership; exiting so a fresh process can stand by");
    }
    if args.leader_elect
        && let Err(e) = leader::release(&client, &lease).await
    {
        tracing::warn!(error = %e, "could not release the leader Lease");
    }
    Ok(())
}
