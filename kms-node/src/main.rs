//! `kms-node`: the Conclave key management server and its offline tools.

use anyhow::Context;
use clap::{Parser, Subcommand};
use kms_node::server;
use kms_node::store::{FILE_NAME, Store};
use meeting_proto::config::kms::KmsConfig;
use meeting_proto::ids::MeetingId;
use std::path::{Path, PathBuf};

// mimalloc rather than glibc's malloc: every key release allocates and
// frees a few hundred small buffers (JSON, HTTP, TLS records, redb pages)
// across the runtime's threads and the committer thread, and glibc's
// malloc/free took ~11% of a release's server CPU in perf (arena locking,
// consolidation). mimalloc's per-thread free lists cut that; it is a
// well-kept allocator (Microsoft, used by many Rust servers), needs no
// `unsafe` here and links into the static-pie images as well.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "kms-node", version, about = "Conclave key management server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the HTTPS API.
    Serve {
        #[arg(long, env = "KMS_CONFIG")]
        config: PathBuf,
    },
    /// Verify the audit hash chain of a stopped KMS's store. Exit 1 if broken.
    AuditVerify {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Print a meeting's current roster, signed (needs the root key).
    ExportRoster {
        #[arg(long, env = "KMS_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        meeting: String,
    },
    /// Make a new current KEK in a stopped KMS's store (needs the root key).
    RotateKek {
        #[arg(long, env = "KMS_CONFIG")]
        config: PathBuf,
    },
    /// Copy a stopped KMS's store to a backup file (wrapped keys only).
    Backup {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into an empty data dir. Fails closed unless the
    /// configured root key opens the backup's keys and its audit chain verifies.
    Restore {
        #[arg(long, env = "KMS_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        from: PathBuf,
    },
}

fn load_config(path: &Path) -> anyhow::Result<KmsConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    Ok(KmsConfig::from_yaml(&text)?)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve { config } => {
            let config = load_config(&config)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(server::serve(config))
        }
        Command::AuditVerify { data_dir } => {
            let store = Store::open(&data_dir)?;
            let result = store.verify_audit()?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            if !result.ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::ExportRoster { config, meeting } => {
            let config = load_config(&config)?;
            let meeting = MeetingId::new(meeting)?;
            let (_, mut core) = server::open_state(&config)?;
            let roster = core
                .roster(&meeting, server::now_ms())
                .ok_or_else(|| anyhow::anyhow!("no meeting {meeting}"))?;
            println!("{}", serde_json::to_string_pretty(&roster.signed())?);
            Ok(())
        }
        Command::RotateKek { config } => {
            let config = load_config(&config)?;
            let (store, mut core) = server::open_state(&config)?;
            let (version, fx) = core.rotate_kek(server::now_ms(), "cli");
            let version = version.map_err(|d| anyhow::anyhow!(d.message))?;
            let mut head = store.head()?;
            store.commit(&fx.writes, fx.audit, &mut head, server::now_ms())?;
            println!("KEK version {version} is now current");
            Ok(())
        }
        Command::Backup { data_dir, out } => {
            let store = Store::open(&data_dir)?;
            store.copy_to(&out)?;
            println!("backup written to {}", out.display());
            Ok(())
        }
        Command::Restore { config, from } => {
            let config = load_config(&config)?;
            let target = config.data_dir.join(FILE_NAME);
            if target.exists() {
                anyhow::bail!(
                    "{} exists: restore only into an empty data dir",
                    target.display()
                );
            }
            let backup = Store::open_file(&from)?;
            let verified = backup.verify_audit()?;
            if !verified.ok {
                anyhow::bail!(
                    "backup audit chain is broken: {}",
                    verified.error.unwrap_or_default()
                );
            }
            std::fs::create_dir_all(&config.data_dir)?;
            backup.copy_to(&target)?;
            drop(backup);
            // Fail closed: the configured root key must open everything.
            let mut strict = config.clone();
            strict.root_key.generate_if_missing = false;
            if let Err(e) = server::open_state(&strict) {
                let _ = std::fs::remove_file(&target);
                anyhow::bail!("restore refused, the root key does not open this backup: {e}");
            }
            println!(
                "restored {} entries of audit into {}",
                verified.entries,
                target.display()
            );
            Ok(())
        }
    }
}
