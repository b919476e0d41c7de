//! connector-node: wires config, metrics and the connector of the pool's type.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use connector_node::recording::container::{DataKey, LocalKek};
use connector_node::recording::decrypt::decrypt_dir;
use connector_node::recording::recorder::{ChatLine, Recorder};
use connector_node::{metrics, service};
use meeting_proto::config::connector::ConnectorConfig;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Parser)]
#[command(
    name = "connector-node",
    about = "Conclave connectors: recording, live streaming, telephony, room systems"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the connector described by a config file (JSON or YAML).
    Run {
        #[arg(long, env = "CONCLAVE_CONNECTOR_CONFIG")]
        config: PathBuf,
    },
    /// Recording tools.
    Recording {
        #[command(subcommand)]
        cmd: RecordingCmd,
    },
}

#[derive(Subcommand)]
enum RecordingCmd {
    /// Restore a recording directory to plain Ogg Opus, JSON lines and manifest.
    #[command(alias = "restore")]
    Decrypt {
        /// The recording directory (*.enc files).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Local key-encryption key file (32 bytes hex), for recordings made with one.
        #[arg(long, conflicts_with = "kms")]
        local_kek: Option<PathBuf>,
        /// KMS URL: the KMS releases the data key to authorized readers only.
        #[arg(long, requires = "ca")]
        kms: Option<String>,
        /// CA bundle that signs the KMS's certificate.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// DNS name the KMS certificate must carry, when --kms reaches it at
        /// an address the certificate does not name (e.g. its pod IP).
        #[arg(long, requires = "kms")]
        kms_name: Option<String>,
        /// A join token for the recording's meeting naming an authorized reader.
        #[arg(long, env = "CONCLAVE_TOKEN")]
        token: Option<String>,
        /// Client certificate + key (PEM) of an authorized reader identity.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Record a 48 kHz mono 16-bit WAV as one participant, in real time
    /// (exercises the recorder end to end; used by crash tests).
    RecordWav {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        wav: PathBuf,
        #[arg(long)]
        local_kek: PathBuf,
        #[arg(long, default_value = "dev-meeting")]
        meeting: String,
    },
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn read_kek(path: &PathBuf) -> anyhow::Result<LocalKek> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    let raw = zeroize::Zeroizing::new(hex::decode(text.trim()).context("KEK file must be hex")?);
    let key = DataKey::from_bytes(&raw).context("KEK must be 32 bytes")?;
    Ok(LocalKek::new(&key))
}

fn load_config(path: &PathBuf) -> anyhow::Result<ConnectorConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: ConnectorConfig = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).context("parsing config JSON")?
    } else {
        serde_yaml_ng::from_str(&text).context("parsing config YAML")?
    };
    cfg.validate().context("invalid config")?;
    Ok(cfg)
}

fn record_wav(dir: PathBuf, wav: PathBuf, kek: LocalKek, meeting: String) -> anyhow::Result<()> {
    let mut reader =
        hound::WavReader::open(&wav).with_context(|| format!("opening {}", wav.display()))?;
    let spec = reader.spec();
    if spec.sample_rate != 48_000 || spec.channels != 1 || spec.bits_per_sample != 16 {
        bail!("{}: need 48 kHz mono 16-bit PCM", wav.display());
    }
    let samples: Vec<i16> = reader.samples::<i16>().collect::<Result<_, _>>()?;
    let key = DataKey::generate();
    let wrapped = kek.wrap(&key);
    let mut rec = Recorder::create(&dir, &meeting, key, wrapped, now_ms())?;
    rec.participant_joined(1, "wav", now_ms())?;
    let mut enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip)
        .map_err(|e| anyhow::anyhow!("opus: {e}"))?;
    let mut out = vec![0u8; 4000];
    let start = std::time::Instant::now();
    for (i, frame) in samples.chunks(960).enumerate() {
        let mut f = frame.to_vec();
        f.resize(960, 0);
        let n = enc
            .encode(&f, &mut out)
            .map_err(|e| anyhow::anyhow!("opus: {e}"))?;
        rec.audio(1, i as u16, &out[..n])?;
        rec.tick()?;
        if i % 50 == 0 {
            rec.chat(&ChatLine {
                at_ms: now_ms(),
                participant: 1,
                name: "wav".into(),
                text: format!("second {}", i / 50),
            })?;
            rec.flush()?;
            println!("flushed {}", i / 50);
        }
        // Real time, so a crash test can stop it part-way.
        let due = start + Duration::from_millis(20 * (i as u64 + 1));
        std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
    }
    let (m, _) = rec.finish(now_ms())?;
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run { config } => {
            let cfg = load_config(&config)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let metrics = Arc::new(metrics::Metrics::new());
                let listener = tokio::net::TcpListener::bind(cfg.metrics_listen)
                    .await
                    .with_context(|| format!("binding metrics on {}", cfg.metrics_listen))?;
                tokio::spawn(metrics::serve(listener, metrics.clone()));
                service::run(cfg, metrics).await
            })
        }
        Cmd::Recording { cmd } => match cmd {
            RecordingCmd::Decrypt {
                dir,
                out,
                local_kek,
                kms,
                ca,
                kms_name,
                token,
                cert,
                key,
            } => {
                let reports = match (local_kek, kms) {
                    (Some(k), _) => {
                        let kek = read_kek(&k)?;
                        decrypt_dir(&dir, &out, |w| {
                            kek.unwrap_key(w).ok_or_else(|| {
                                "the local KEK does not open this recording's data key".to_string()
                            })
                        })?
                    }
                    (None, Some(url)) => {
                        let ca = ca.context("--ca is required with --kms")?;
                        let tls = connector_node::kms_tls::client_config(
                            &ca,
                            cert.as_deref().zip(key.as_deref()),
                            kms_name.as_deref(),
                        )?;
                        let client = kms_client::KmsClient::new(&url, tls)?;
                        let rt = tokio::runtime::Runtime::new()?;
                        decrypt_dir(&dir, &out, |w| {
                            rt.block_on(connector_node::kms::fetch_recording_key(
                                &client,
                                w,
                                token.clone(),
                            ))
                            .map_err(|e| e.to_string())
                        })?
                    }
                    (None, None) => bail!("give --local-kek or --kms"),
                };
                for r in &reports {
                    println!(
                        "{}",
                        serde_json::json!({
                            "file": r.name, "bytes": r.bytes, "chunks": r.chunks, "complete": r.complete
                        })
                    );
                }
                Ok(())
            }
            RecordingCmd::RecordWav {
                dir,
                wav,
                local_kek,
                meeting,
            } => record_wav(dir, wav, read_kek(&local_kek)?, meeting),
        },
    }
}
