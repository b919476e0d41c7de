//! `conclave-client`: join a meeting, generate load, mint dev credentials.
//!
//! Output for programs: JSON lines on stdout (`{"chat":...}` as chat
//! arrives, then one `{"report":...}` line); logs go to stderr.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use meeting_client::dev::{DevIssuer, hex_array};
use meeting_client::{audio, join, load};
use meeting_proto::ids::MeetingId;
use meeting_proto::media_keys::EpochKey;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Conclave client: join meetings, send and receive encrypted media, load-test relays"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join a meeting: send Opus audio and chat, decode the others to WAV.
    Join(JoinArgs),
    /// N participants in each of M meetings at realistic rates.
    Load(LoadArgs),
    /// Mint a development join token (EdDSA JWT) from a dev issuer seed, or
    /// print that issuer's JWKS for the KMS (`--jwks`).
    Token(TokenArgs),
    /// Print the ticket-verification public key (hex) of a dev ticket seed,
    /// for a relay's `ticketPublicKey`.
    DevTicketKey {
        /// 32-byte Ed25519 seed, hex.
        #[arg(long, env = "CONCLAVE_DEV_TICKET_SEED")]
        seed: String,
    },
}

#[derive(Args, Debug)]
struct JoinArgs {
    /// KMS URL (https://host:port): join with a token; the KMS picks the
    /// relay and releases the meeting key. Without it, dev credentials are used.
    #[arg(long, requires_all = ["kms_ca", "token"])]
    kms: Option<String>,
    /// CA bundle that signs the KMS's certificate.
    #[arg(long)]
    kms_ca: Option<PathBuf>,
    /// Join token (JWT), e.g. from `conclave-client token`.
    #[arg(long, env = "CONCLAVE_JOIN_TOKEN")]
    token: Option<String>,
    /// Relay media address (dev mode).
    #[arg(long, conflicts_with = "kms", requires_all = ["relay_id", "dev_ticket_seed", "meeting_key", "sender"])]
    relay: Option<SocketAddr>,
    /// The relay's identity (dev mode).
    #[arg(long)]
    relay_id: Option<String>,
    /// 32-byte Ed25519 seed of the dev ticket signer, hex (dev mode).
    #[arg(long, env = "CONCLAVE_DEV_TICKET_SEED")]
    dev_ticket_seed: Option<String>,
    #[arg(long)]
    meeting: String,
    /// This participant's sender index (dev mode; the KMS assigns it otherwise).
    #[arg(long)]
    sender: Option<u16>,
    /// 32-byte meeting key of the epoch, hex (dev mode).
    #[arg(long, env = "CONCLAVE_DEV_MEETING_KEY")]
    meeting_key: Option<String>,
    #[arg(long, default_value_t = 1)]
    epoch: u64,
    /// Send a sine tone of this frequency (Hz).
    #[arg(long, conflicts_with = "wav")]
    tone: Option<f64>,
    /// Send this 48 kHz 16-bit WAV file (looped).
    #[arg(long)]
    wav: Option<PathBuf>,
    /// Seconds of media after joining.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Chat message to send once joined (repeatable).
    #[arg(long)]
    chat: Vec<String>,
    /// Seconds after joining before chat is sent.
    #[arg(long, default_value_t = 1.0)]
    chat_delay: f64,
    /// Directory for decoded audio (`sender-<index>.wav`).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Seconds to wait for the relay's WELCOME.
    #[arg(long, default_value_t = 5.0)]
    join_timeout: f64,
    /// Invite a connector once joined (host only; repeatable): KIND or
    /// KIND=TARGET, KIND one of recording, liveStreaming, telephony,
    /// roomSystem; TARGET an rtmp(s):// URL for liveStreaming or a number /
    /// SIP URI for telephony to dial out to.
    #[arg(long = "invite", value_name = "KIND[=TARGET]", requires = "kms")]
    invite: Vec<join::InviteSpec>,
    /// After --duration, leave through the KMS but keep the relay binding and
    /// every key held, and try to open what still arrives for this many
    /// seconds: what a leaver that keeps capturing can read (the report's
    /// `after_leave`; the leave rotates the others to a key it never sees).
    #[arg(long, value_name = "SECS", requires = "kms")]
    listen_after_leave: Option<f64>,
}

#[derive(Args, Debug)]
struct TokenArgs {
    /// 32-byte Ed25519 seed of the dev issuer key, hex.
    #[arg(long, env = "CONCLAVE_DEV_ISSUER_SEED")]
    issuer_seed: String,
    /// Key id (`kid`) the KMS's JWKS knows the key by.
    #[arg(long, default_value = "dev")]
    kid: String,
    /// Print the issuer's JWKS instead of a token.
    #[arg(long)]
    jwks: bool,
    #[arg(long, required_unless_present = "jwks")]
    meeting: Option<String>,
    /// Subject (stable user id).
    #[arg(long, default_value = "dev-user")]
    sub: String,
    /// Display name.
    #[arg(long, default_value = "Dev User")]
    name: String,
    /// host or participant.
    #[arg(long, default_value = "participant")]
    role: String,
    /// Audience the KMS expects.
    #[arg(long, default_value = "conclave")]
    aud: String,
    /// Issuer (`iss`), if the KMS checks it.
    #[arg(long)]
    iss: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
}

#[derive(Args, Debug)]
struct LoadArgs {
    /// KMS URL (https://host:port): every participant joins through the KMS
    /// with its own join token, minted from the dev issuer key
    /// (--issuer-seed); the KMS places meetings on relays and releases keys.
    #[arg(long, requires = "kms_ca", conflicts_with = "relay")]
    kms: Option<String>,
    /// CA bundle that signs the KMS's certificate.
    #[arg(long)]
    kms_ca: Option<PathBuf>,
    /// 32-byte Ed25519 seed of the dev issuer key that mints the join tokens
    /// (with --kms), hex.
    #[arg(long, env = "CONCLAVE_DEV_ISSUER_SEED", hide_env_values = true)]
    issuer_seed: Option<String>,
    /// Key id (`kid`) the KMS's JWKS knows the issuer key by.
    #[arg(long, default_value = "dev")]
    kid: String,
    /// Audience (`aud`) the KMS expects in join tokens.
    #[arg(long, default_value = "conclave")]
    aud: String,
    /// Issuer (`iss`) of the join tokens, if the KMS checks it.
    #[arg(long)]
    iss: Option<String>,
    /// Relay media address (dev mode, without a KMS).
    #[arg(long, requires = "relay_id")]
    relay: Option<SocketAddr>,
    /// The relay's identity (its `relayId`, dev mode).
    #[arg(long)]
    relay_id: Option<String>,
    /// 32-byte Ed25519 seed of the dev ticket signer, hex (dev mode).
    #[arg(long, env = "CONCLAVE_DEV_TICKET_SEED", hide_env_values = true)]
    dev_ticket_seed: Option<String>,
    /// Meetings are named PREFIX-0, PREFIX-1, ...; default: load-<random>,
    /// so runs against a long-lived KMS or relay never share a meeting.
    #[arg(long)]
    meeting_prefix: Option<String>,
    /// Meetings (M).
    #[arg(long, default_value_t = 2)]
    meetings: usize,
    /// Participants per meeting (N).
    #[arg(long, default_value_t = 3)]
    participants: usize,
    /// Seconds of traffic once everyone has joined.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Also send video (30 fps, ~1.2 Mb/s).
    #[arg(long)]
    video: bool,
    /// Also send screen share (5 fps, 10 kB frames).
    #[arg(long)]
    screen: bool,
}

impl LoadArgs {
    fn source(&self) -> anyhow::Result<load::Source> {
        match (&self.kms, self.relay) {
            (Some(url), _) => {
                let ca = self
                    .kms_ca
                    .as_deref()
                    .context("--kms-ca is required with --kms")?;
                let tls = conclave_pki::tls::anonymous_client_config(ca)
                    .with_context(|| format!("loading {}", ca.display()))?;
                let client = kms_client::KmsClient::new(url, tls)?;
                let seed = self.issuer_seed.as_deref().context(
                    "--issuer-seed (or CONCLAVE_DEV_ISSUER_SEED) is required with --kms",
                )?;
                let key = meeting_proto::token::DevIssuerKey::from_seed(
                    self.kid.clone(),
                    &hex_array("--issuer-seed", seed)?,
                )?;
                Ok(load::Source::Kms {
                    client,
                    tokens: load::TokenMinter {
                        key,
                        audience: self.aud.clone(),
                        issuer: self.iss.clone(),
                    },
                })
            }
            (None, Some(relay)) => {
                let seed = self.dev_ticket_seed.as_deref().context(
                    "--dev-ticket-seed (or CONCLAVE_DEV_TICKET_SEED) is required with --relay",
                )?;
                let relay_id = self.relay_id.clone().context("--relay-id")?;
                Ok(load::Source::Dev {
                    relay,
                    issuer: DevIssuer::new(hex_array("--dev-ticket-seed", seed)?, relay_id),
                })
            }
            (None, None) => {
                anyhow::bail!("give --kms (with --kms-ca and --issuer-seed) or --relay (dev mode)")
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Token(t) => {
            use meeting_proto::token::{Claims, DevIssuerKey, Role};
            let seed: [u8; 32] = hex_array("--issuer-seed", &t.issuer_seed)?;
            let key = DevIssuerKey::from_seed(t.kid.clone(), &seed)?;
            if t.jwks {
                println!("{}", key.jwks_json());
                return Ok(());
            }
            let role = match t.role.as_str() {
                "host" => Role::Host,
                "participant" => Role::Participant,
                other => anyhow::bail!("--role must be host or participant, not {other:?}"),
            };
            let now = meeting_client::dev::unix_now();
            let claims = Claims {
                sub: t.sub,
                name: t.name,
                mid: MeetingId::new(t.meeting.unwrap_or_default()).context("--meeting")?,
                role,
                aud: vec![t.aud],
                exp: now + t.ttl,
                nbf: None,
                iat: Some(now),
                iss: t.iss,
            };
            println!("{}", key.mint(&claims));
        }
        Command::DevTicketKey { seed } => {
            let i = DevIssuer::new(hex_array("--seed", &seed)?, "");
            println!("{}", i.public_key_hex());
        }
        Command::Join(a) => {
            let meeting = MeetingId::new(a.meeting.clone()).context("--meeting")?;
            // Checked before joining, so a bad value never leaves us in the roster.
            let listen_after_leave = a
                .listen_after_leave
                .map(Duration::try_from_secs_f64)
                .transpose()
                .context("--listen-after-leave must be a non-negative number of seconds")?;
            let (creds, link, roster, invited) = match (&a.kms, &a.relay) {
                (Some(url), _) => {
                    let ca = a
                        .kms_ca
                        .as_ref()
                        .context("--kms-ca is required with --kms")?;
                    let tls = conclave_pki::tls::anonymous_client_config(ca)
                        .with_context(|| format!("loading {}", ca.display()))?;
                    let client = kms_client::KmsClient::new(url, tls)?;
                    let token = a
                        .token
                        .as_deref()
                        .context("--token is required with --kms")?;
                    let (c, l) = join::kms_join(client, meeting.clone(), token).await?;
                    let invited = match join::invite(&l, &a.invite).await {
                        Ok(i) => i,
                        Err(e) => {
                            // Do not stay in the roster after failing to do what was asked.
                            if let Err(le) = l.client.leave(&l.meeting, &l.session).await {
                                tracing::warn!(error = %le, "KMS leave failed");
                            }
                            return Err(e);
                        }
                    };
                    for i in &invited {
                        println!("{}", serde_json::json!({ "invited": i }));
                    }
                    let roster = l.roster.clone();
                    (c, Some(l), roster, invited)
                }
                (None, Some(relay)) => {
                    let need = |v: &Option<String>, name: &str| {
                        v.clone()
                            .with_context(|| format!("{name} is required without --kms"))
                    };
                    let secret: [u8; 32] =
                        hex_array("--meeting-key", &need(&a.meeting_key, "--meeting-key")?)?;
                    let key = EpochKey::new(meeting.clone(), a.epoch, &secret)?;
                    let sender = a.sender.context("--sender is required without --kms")?;
                    let iss = DevIssuer::new(
                        hex_array(
                            "--dev-ticket-seed",
                            &need(&a.dev_ticket_seed, "--dev-ticket-seed")?,
                        )?,
                        need(&a.relay_id, "--relay-id")?,
                    );
                    let ticket = iss.ticket(&meeting, sender, 3600)?;
                    let c = join::Credentials {
                        meeting: meeting.clone(),
                        sender_index: sender,
                        relay: *relay,
                        ticket,
                        key,
                    };
                    (c, None, Vec::new(), Vec::new())
                }
                (None, None) => {
                    anyhow::bail!("give --kms (with --kms-ca and --token) or --relay (dev mode)")
                }
            };
            let relay_addr = creds.relay;
            let pcm = match (&a.wav, a.tone) {
                (Some(p), _) => audio::read_wav(p)?,
                (None, Some(f)) => audio::tone(f, 1.0),
                (None, None) => audio::tone(440.0, 1.0),
            };
            let opts = join::JoinOptions {
                audio: pcm,
                duration: Duration::from_secs_f64(a.duration),
                chat: a.chat,
                chat_delay: Duration::from_secs_f64(a.chat_delay),
                out_dir: a.out_dir,
                join_timeout: Duration::from_secs_f64(a.join_timeout),
            };
            let (updates, mut follower) = match link {
                Some(l) => {
                    let (rx, task) = join::follow_events(l);
                    (Some(rx), Some(task))
                }
                None => (None, None),
            };
            let linger = match listen_after_leave {
                Some(listen) => follower.take().map(|task| join::LeaveThenListen {
                    leave: Box::pin(async move {
                        let l = task.await.context("the KMS event follower failed")?;
                        l.client.leave(&l.meeting, &l.session).await?;
                        Ok(())
                    }),
                    listen,
                }),
                None => None,
            };
            let result = join::run_with(creds, opts, updates, roster, invited, linger).await;
            if let Some(task) = follower {
                // The receiver is gone, so the follower returns its link: say
                // goodbye so the others rotate to a key this process never sees.
                if let Ok(l) = task.await
                    && let Err(e) = l.client.leave(&l.meeting, &l.session).await
                {
                    tracing::warn!(error = %e, "KMS leave failed");
                }
            }
            let report = result?;
            println!("{}", serde_json::json!({ "report": report }));
            if !report.joined {
                anyhow::bail!("did not join: no WELCOME from {relay_addr}");
            }
        }
        Command::Load(a) => {
            let source = a.source()?;
            let opts = load::LoadOptions {
                meeting_prefix: a
                    .meeting_prefix
                    .clone()
                    .unwrap_or_else(|| format!("load-{:08x}", rand::random::<u32>())),
                meetings: a.meetings,
                participants: a.participants,
                duration: Duration::from_secs_f64(a.duration),
                video: a.video,
                screen: a.screen,
            };
            let report = load::run(opts, source).await?;
            println!("{}", serde_json::json!({ "report": report }));
        }
    }
    Ok(())
}
