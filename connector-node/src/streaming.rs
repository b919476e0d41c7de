//! Live streaming: the meeting's mixed audio goes into an ffmpeg child that
//! encodes AAC and pushes RTMP/RTMPS to an allow-listed target.
//!
//! ffmpeg is supervised: it is restarted with exponential backoff when it
//! exits, its last error line is kept in the status and counted in metrics,
//! it is always reaped (no zombies), and it is stopped through its own
//! process handle, never by name.

use crate::media::mix::mix;
use crate::metrics::Metrics;
use meeting_proto::config::connector::StreamingSettings;
use meeting_proto::kms_api::{InvitationOutcome, OutcomeState, redacted_target};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A run this long resets the backoff: the target was healthy.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
/// Sample rate of the PCM fed to ffmpeg.
pub const RATE: u32 = 48_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("stream target {0} is not in this pool's allow-list")]
    NotAllowed(String),
    #[error("credentials file unreadable: {0}")]
    Credentials(String),
    #[error("streaming.tlsCaFile unreadable: {0}")]
    TlsCa(String),
}

/// Check a host-requested target and build the push URL (stream key from
/// the pool's Secret appended). The key never appears in errors or logs.
pub fn resolve_target(
    settings: &StreamingSettings,
    target: &str,
    metrics: &Metrics,
) -> Result<PushUrl, StreamError> {
    if !settings.allows(target) {
        metrics.stream_refused();
        // A host-chosen URL may carry its stream key in the path.
        return Err(StreamError::NotAllowed(redacted_target(target)));
    }
    let (url, key) = match &settings.credentials_file {
        Some(p) => {
            let key = std::fs::read_to_string(p)
                .map_err(|e| StreamError::Credentials(format!("{}: {e}", p.display())))?;
            let key = key.trim().to_string();
            (format!("{}/{key}", target.trim_end_matches('/')), Some(key))
        }
        None => (target.to_string(), None),
    };
    // Checked here so a missing Secret mount is one clear error, not an
    // ffmpeg restart loop.
    if let Some(ca) = &settings.tls_ca_file
        && let Err(e) = std::fs::File::open(ca)
    {
        return Err(StreamError::TlsCa(format!("{}: {e}", ca.display())));
    }
    Ok(PushUrl {
        url,
        shown: redacted_target(target),
        key: key.filter(|k| !k.is_empty()),
        tls_ca: settings.tls_ca_file.clone(),
    })
}

/// The full push URL; Debug and Display show only the allow-listed part.
#[derive(Clone)]
pub struct PushUrl {
    url: String,
    shown: String,
    /// The stream key, kept to scrub it from ffmpeg's messages.
    key: Option<String>,
    /// CA bundle for `rtmps://` (None: the system trust store).
    tls_ca: Option<PathBuf>,
}

impl std::fmt::Debug for PushUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PushUrl({})", self.shown)
    }
}

impl PushUrl {
    /// For targets that need no credentials (tests, open ingest).
    pub fn plain(url: &str) -> Self {
        Self {
            url: url.to_string(),
            shown: url.to_string(),
            key: None,
            tls_ca: None,
        }
    }

    fn is_tls(&self) -> bool {
        self.url.starts_with("rtmps://")
    }

    /// An ffmpeg message fit for status, logs and metrics: the full URL
    /// and the stream key never leave this process.
    fn scrub(&self, line: &str) -> String {
        let mut l = line.replace(&self.url, &self.shown);
        if let Some(k) = &self.key {
            l = l.replace(k.as_str(), "<stream key>");
        }
        l
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStatus {
    /// PID of the running ffmpeg, if one runs.
    pub pid: Option<u32>,
    pub restarts: u64,
    pub last_error: Option<String>,
    /// ffmpeg runs in a row that failed before [`HEALTHY_RUN`] (or did not
    /// start): a target that keeps refusing counts up, a healthy run resets.
    pub failures_in_a_row: u32,
    /// The last exit was the rtmps target failing certificate verification.
    pub tls_verify_failed: bool,
}

#[derive(Debug)]
pub struct Supervisor {
    pub status: watch::Receiver<StreamStatus>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Supervisor {
    /// Stop streaming: ffmpeg gets end of input, then is killed if it lingers,
    /// and is reaped before this returns.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

fn ffmpeg_command(ffmpeg: &PathBuf, url: &PushUrl) -> Command {
    let mut c = Command::new(ffmpeg);
    c.args([
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        "-f",
        "s16le",
        "-ar",
    ])
    .arg(RATE.to_string())
    .args([
        "-ac", "1", "-i", "pipe:0", "-c:a", "aac", "-b:a", "96k", "-f", "flv",
    ]);
    if url.is_tls() {
        // ffmpeg's TLS does not verify unless asked; with it, chain and host
        // name are both checked (against the pool's CA, else the system's).
        c.args(["-tls_verify", "1"]);
        if let Some(ca) = &url.tls_ca {
            c.arg("-ca_file").arg(ca);
        }
    }
    c.arg(&url.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// ffmpeg's last lines of stderr kept to explain an exit.
const STDERR_LINES: usize = 4;
/// Longest stderr line kept (ffmpeg can print long dumps).
const STDERR_LINE_MAX: usize = 300;

/// Why ffmpeg exited, for status and logs, and whether it was the TLS
/// target failing certificate verification.
fn describe_exit(status: &str, lines: &[String], url: &PushUrl) -> (String, bool) {
    let detail: Vec<String> = lines
        .iter()
        .map(|l| {
            // "[tls @ 0x55d0c0a0] msg" -> "tls: msg" (addresses are noise).
            let l = match l.strip_prefix('[').and_then(|r| r.split_once(" @ ")) {
                Some((module, rest)) => match rest.split_once("] ") {
                    Some((_, msg)) => format!("{module}: {msg}"),
                    None => l.clone(),
                },
                None => l.clone(),
            };
            url.scrub(&l)
        })
        .collect();
    let tls_verify = url.is_tls()
        && detail.iter().any(|l| {
            l.starts_with("tls: ") && (l.contains("certificate") || l.contains("Certificate"))
        });
    let mut why = format!("ffmpeg exited ({status})");
    if tls_verify {
        why.push_str(&format!(
            ": the target's TLS certificate failed verification against {}",
            match &url.tls_ca {
                Some(ca) => format!("streaming.tlsCaFile ({})", ca.display()),
                None => "the system trust store (no streaming.tlsCaFile)".to_string(),
            }
        ));
    }
    if !detail.is_empty() {
        why.push_str(": ");
        why.push_str(&detail.join("; "));
    }
    (why, tls_verify)
}

/// Start pushing `audio` (48 kHz mono, any frame size) to `url`.
pub fn start(
    ffmpeg: PathBuf,
    url: PushUrl,
    mut audio: mpsc::Receiver<Vec<i16>>,
    metrics: Arc<Metrics>,
) -> Supervisor {
    let (status_tx, status) = watch::channel(StreamStatus::default());
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut backoff = BACKOFF_START;
        let mut restarts = 0u64;
        loop {
            let started = tokio::time::Instant::now();
            let mut child: Child = match ffmpeg_command(&ffmpeg, &url).spawn() {
                Ok(c) => c,
                Err(e) => {
                    status_tx.send_modify(|s| {
                        s.last_error = Some(format!("cannot start ffmpeg: {e}"));
                        s.failures_in_a_row += 1;
                    });
                    metrics.ffmpeg_started(restarts > 0);
                    metrics.ffmpeg_exited("spawnError");
                    if wait_or_stop(&mut stop_rx, &mut audio, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    restarts += 1;
                    continue;
                }
            };
            metrics.ffmpeg_started(restarts > 0);
            status_tx.send_modify(|s| {
                s.pid = child.id();
                s.restarts = restarts;
            });
            tracing::info!(target = ?url, pid = child.id(), "ffmpeg started");
            let mut stdin = child.stdin.take();
            // The reader owns stderr until EOF and hands back the last lines,
            // so an exit is explained by everything ffmpeg said before it.
            let stderr = child.stderr.take().map(|e| {
                tokio::spawn(async move {
                    let mut lines = tokio::io::BufReader::new(e).lines();
                    let mut last = std::collections::VecDeque::with_capacity(STDERR_LINES);
                    while let Ok(Some(l)) = lines.next_line().await {
                        if last.len() == STDERR_LINES {
                            last.pop_front();
                        }
                        last.push_back(l.chars().take(STDERR_LINE_MAX).collect::<String>());
                    }
                    Vec::from(last)
                })
            });
            let outcome = loop {
                tokio::select! {
                    _ = &mut stop_rx => break None,
                    st = child.wait() => break Some(st),
                    f = audio.recv() => {
                        let Some(f) = f else { break None };
                        let bytes: Vec<u8> = f.iter().flat_map(|s| s.to_le_bytes()).collect();
                        if let Some(w) = stdin.as_mut()
                            && w.write_all(&bytes).await.is_err()
                        {
                            // ffmpeg is going away; its exit status tells why.
                            stdin = None;
                        }
                    }
                }
            };
            match outcome {
                None => {
                    // Stop: close its input so it finishes the stream cleanly,
                    // then make sure it is gone and reaped.
                    drop(stdin);
                    if tokio::time::timeout(Duration::from_secs(5), child.wait())
                        .await
                        .is_err()
                    {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                    }
                    metrics.ffmpeg_exited("stopped");
                    status_tx.send_modify(|s| s.pid = None);
                    return;
                }
                Some(st) => {
                    // stderr reaches EOF with the exit; bounded in case a
                    // grandchild kept the pipe open.
                    let lines = match stderr {
                        Some(h) => tokio::time::timeout(Duration::from_secs(2), h)
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .unwrap_or_default(),
                        None => Vec::new(),
                    };
                    let (why, tls_verify) = match st {
                        Ok(s) => describe_exit(&s.to_string(), &lines, &url),
                        Err(e) => (format!("ffmpeg wait failed: {e}"), false),
                    };
                    tracing::warn!(target = ?url, error = %why, "ffmpeg exited; restarting");
                    metrics.ffmpeg_exited("error");
                    if tls_verify {
                        metrics.stream_tls_verify_failed();
                    }
                    let healthy = started.elapsed() >= HEALTHY_RUN;
                    status_tx.send_modify(|s| {
                        s.pid = None;
                        s.last_error = Some(why);
                        s.tls_verify_failed = tls_verify;
                        s.failures_in_a_row = if healthy { 0 } else { s.failures_in_a_row + 1 };
                    });
                    if healthy {
                        backoff = BACKOFF_START;
                    }
                    if wait_or_stop(&mut stop_rx, &mut audio, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    restarts += 1;
                }
            }
        }
    });
    Supervisor {
        status,
        stop: Some(stop_tx),
        task,
    }
}

/// Wait out a backoff while discarding audio (live means live). True: stop.
async fn wait_or_stop(
    stop: &mut tokio::sync::oneshot::Receiver<()>,
    audio: &mut mpsc::Receiver<Vec<i16>>,
    d: Duration,
) -> bool {
    let sleep = tokio::time::sleep(d);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut *stop => return true,
            () = &mut sleep => return false,
            f = audio.recv() => if f.is_none() { return true },
        }
    }
}

/// Frames a sender's queue holds before it is played (60 ms).
const PREBUFFER: usize = 3;
/// Most frames queued per sender (500 ms); beyond, the oldest go.
const MAX_QUEUED: usize = 25;

/// One sender's decoded 20 ms frames on their way into the mix. Playing
/// starts, and starts again after the queue ran dry, only once PREBUFFER
/// frames wait: network jitter then costs a little latency (nothing next to
/// RTMP's seconds) instead of a gap, and a phase jump, at every late packet.
#[derive(Debug, Default)]
struct Playout {
    frames: std::collections::VecDeque<Vec<i16>>,
    playing: bool,
}

impl Playout {
    fn push(&mut self, frame: Vec<i16>) {
        if self.frames.len() >= MAX_QUEUED {
            self.frames.pop_front();
        }
        self.frames.push_back(frame);
    }

    fn pop(&mut self) -> Option<Vec<i16>> {
        self.playing |= self.frames.len() >= PREBUFFER;
        if !self.playing {
            return None;
        }
        let f = self.frames.pop_front();
        self.playing = !self.frames.is_empty();
        f
    }
}

/// Serve one KMS assignment for a liveStreaming pool: join with the
/// invitation (in the roster as `connector:liveStreaming`), mix everyone's
/// audio and push it through a supervised ffmpeg until stopped or the
/// meeting link ends. The target is the host's (the invitation's), else
/// `default_target`; either must pass the pool's allow-list, checked before
/// joining.
pub async fn stream_assignment(
    client: kms_client::KmsClient,
    assignment: meeting_proto::kms_api::Assignment,
    settings: &StreamingSettings,
    default_target: &str,
    mut stop: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<StreamStatus> {
    use crate::meeting::MeetingEvent;
    use anyhow::Context;
    let target = assignment.target.as_deref().unwrap_or(default_target);
    let url = match resolve_target(settings, target, &metrics) {
        Ok(url) => url,
        Err(e) => {
            crate::kms::report_outcome(&client, &assignment, e.outcome()).await;
            return Err(e.into());
        }
    };
    let (membership, creds) = crate::kms::join_assignment(&client, &assignment)
        .await
        .context("joining with the invitation")?;
    let (meeting, session) = (membership.meeting.clone(), membership.session.clone());
    let mut link = crate::meeting::join(creds, Duration::from_secs(10))
        .await
        .context("reaching the relay")?;
    let (roster_tx, mut roster) = watch::channel(membership.roster.clone());
    tokio::spawn(crate::kms::follow_epochs(
        client.clone(),
        membership,
        link.keys.clone(),
        roster_tx,
    ));
    let (audio_tx, audio_rx) = mpsc::channel(100);
    let sup = start(settings.ffmpeg.clone(), url, audio_rx, metrics.clone());
    let mut ffmpeg = sup.status.clone();
    // Why streaming ended, for the host: (code, text), or a failure.
    let mut end = ("link_closed", "the connection to the meeting ended");
    let mut failure = None;
    let mut decoders: std::collections::BTreeMap<u16, meeting_client::audio::Decoder> =
        Default::default();
    let mut queues: std::collections::BTreeMap<u16, Playout> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {
                end = ("stopped", "the streaming connector stopped");
                break;
            }
            _ = roster.wait_for(|r| !r.member) => {
                tracing::info!(meeting = %meeting, "removed from the meeting by the host: streaming stops");
                end = ("removed", "the host removed the stream from the meeting");
                break;
            }
            r = ffmpeg.wait_for(|s| s.tls_verify_failed || s.failures_in_a_row >= GIVE_UP_AFTER) => {
                failure = r.ok().map(|s| given_up(&s));
                tracing::warn!(meeting = %meeting, "the stream target keeps failing: streaming stops");
                break;
            }
            _ = tick.tick() => {
                let mixed = mix(queues.values_mut().filter_map(|q| q.pop()), 960);
                let _ = audio_tx.try_send(mixed);
            }
            ev = link.events.recv() => match ev {
                None | Some(MeetingEvent::Left(_)) => break,
                Some(MeetingEvent::Audio { sender, packet, .. }) => {
                    if let std::collections::btree_map::Entry::Vacant(v) = decoders.entry(sender)
                        && let Ok(d) = meeting_client::audio::Decoder::new()
                    {
                        v.insert(d);
                    }
                    if let Some(d) = decoders.get_mut(&sender)
                        && let Ok(pcm) = d.decode(&packet)
                    {
                        let q = queues.entry(sender).or_default();
                        for f in pcm.chunks(960) {
                            let mut f = f.to_vec();
                            f.resize(960, 0);
                            q.push(f);
                        }
                    }
                }
                Some(_) => {}
            }
        }
    }
    link.leave();
    let status = sup.status.borrow().clone();
    drop(audio_tx);
    sup.stop().await;
    if let Err(e) = client.leave(&meeting, &session).await {
        tracing::warn!(error = %e, "KMS leave failed");
    }
    let outcome =
        failure.unwrap_or_else(|| InvitationOutcome::new(OutcomeState::Ended, end.0, None, end.1));
    crate::kms::report_outcome(&client, &assignment, outcome).await;
    Ok(status)
}

/// ffmpeg runs failing in a row before the connector gives the target up
/// and tells the host (about 8 s of backoff in all): a target that refuses
/// this often is not coming back by itself.
pub const GIVE_UP_AFTER: u32 = 6;

/// The host's view of a target given up on. ffmpeg's own words stay in the
/// connector's status and logs: they may quote parts of the target.
fn given_up(s: &StreamStatus) -> InvitationOutcome {
    if s.tls_verify_failed {
        return InvitationOutcome::new(
            OutcomeState::Failed,
            "tls_verify_failed",
            None,
            "the stream target's TLS certificate failed verification against the pool's CA",
        );
    }
    InvitationOutcome::new(
        OutcomeState::Failed,
        "stream_failed",
        None,
        &format!(
            "the stream target kept refusing: ffmpeg failed {} times in a row",
            s.failures_in_a_row
        ),
    )
}

impl StreamError {
    /// What the host is told when a target is refused before streaming.
    pub fn outcome(&self) -> InvitationOutcome {
        let (code, message) = match self {
            Self::NotAllowed(_) => (
                "target_not_allowed",
                "the stream target is not in this pool's allowedTargets",
            ),
            Self::Credentials(_) | Self::TlsCa(_) => (
                "pool_misconfigured",
                "the pool's stream credentials or CA file is unreadable",
            ),
        };
        InvitationOutcome::new(OutcomeState::Failed, code, None, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn playout_waits_for_a_prebuffer_then_plays_every_frame_in_order() {
        let mut q = Playout::default();
        let frame = |n: i16| vec![n; 960];
        q.push(frame(1));
        q.push(frame(2));
        assert_eq!(q.pop(), None, "two frames are not enough to start");
        q.push(frame(3));
        assert_eq!(q.pop(), Some(frame(1)));
        // Playing: a late packet is absorbed by what waits.
        assert_eq!(q.pop(), Some(frame(2)));
        q.push(frame(4));
        assert_eq!(q.pop(), Some(frame(3)));
        assert_eq!(q.pop(), Some(frame(4)));
        // Ran dry: wait for the prebuffer again.
        q.push(frame(5));
        assert_eq!(q.pop(), None);
        for n in 6..40 {
            q.push(frame(n));
        }
        assert_eq!(q.frames.len(), MAX_QUEUED, "bounded");
        assert_eq!(q.pop(), Some(frame(15)), "the oldest went first");
    }

    #[test]
    fn the_host_is_told_why_without_the_target() {
        let refused = StreamError::NotAllowed("rtmp://evil.example".into()).outcome();
        assert_eq!(
            (refused.state, refused.code.as_str()),
            (OutcomeState::Failed, "target_not_allowed")
        );
        assert!(!refused.message.contains("evil"), "{refused}");
        assert_eq!(
            StreamError::Credentials("/secret/key: gone".into())
                .outcome()
                .code,
            "pool_misconfigured"
        );
        let tls = given_up(&StreamStatus {
            tls_verify_failed: true,
            failures_in_a_row: 1,
            last_error: Some("ffmpeg exited: tls: rtmps://cdn.example:443".into()),
            ..StreamStatus::default()
        });
        assert_eq!(tls.code, "tls_verify_failed");
        let refusing = given_up(&StreamStatus {
            failures_in_a_row: GIVE_UP_AFTER,
            last_error: Some("ffmpeg exited: rtmp://cdn.example: publish refused".into()),
            ..StreamStatus::default()
        });
        assert_eq!(refusing.code, "stream_failed");
        assert_eq!(
            refusing.message,
            "the stream target kept refusing: ffmpeg failed 6 times in a row"
        );
        for o in [refused, tls, refusing] {
            assert_eq!(o.check(), Ok(()), "{o}");
            assert!(!o.message.contains("cdn.example"), "{o}");
        }
    }

    #[test]
    fn ffmpeg_messages_lose_the_push_url_and_stream_key() {
        let url = PushUrl {
            url: "rtmps://cdn.example:443/live/s3cret".into(),
            shown: "rtmps://cdn.example:443".into(),
            key: Some("s3cret".into()),
            tls_ca: Some("/etc/conclave/streaming-ca/ca.crt".into()),
        };
        let lines = [
            "[tls @ 0x55d0c0a0b480] Peer certificate failed verification".to_string(),
            "[rtmps @ 0x55d0c0a0b5c0] Cannot open connection tls://cdn.example:443".to_string(),
            "rtmps://cdn.example:443/live/s3cret: Input/output error".to_string(),
            "publish s3cret refused".to_string(),
        ];
        let (why, tls) = describe_exit("exit status: 1", &lines, &url);
        assert!(tls);
        assert_eq!(
            why,
            "ffmpeg exited (exit status: 1): the target's TLS certificate failed verification \
             against streaming.tlsCaFile (/etc/conclave/streaming-ca/ca.crt): \
             tls: Peer certificate failed verification; \
             rtmps: Cannot open connection tls://cdn.example:443; \
             rtmps://cdn.example:443: Input/output error; publish <stream key> refused"
        );
        let (why, tls) = describe_exit("signal: 9 (SIGKILL)", &[], &PushUrl::plain("rtmp://a/b"));
        assert!(!tls);
        assert_eq!(why, "ffmpeg exited (signal: 9 (SIGKILL))");
    }
}
