//! Record a meeting the connector has joined: every sender's audio, the mix,
//! chat with sender and time, until stopped or the link ends.

use crate::kms::RosterView;
use crate::meeting::{MeetingEvent, MeetingLink};
use crate::metrics::Metrics;
use crate::recording::recorder::{ChatLine, Manifest, Recorder, RecordingSize};
use meeting_proto::kms_api::{InvitationOutcome, OutcomeState};
use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Run until `stop` becomes true or the meeting link ends; returns the final manifest.
/// With `roster`, participants get their roster names and the recording
/// stops when the host removes the connector.
pub async fn record(
    mut link: MeetingLink,
    mut rec: Recorder,
    mut stop: watch::Receiver<bool>,
    mut roster: Option<watch::Receiver<RosterView>>,
    metrics: &Metrics,
) -> std::io::Result<Manifest> {
    metrics.recording_started();
    let mut counted = RecordingSize::default();
    let result = record_loop(
        &mut link,
        &mut rec,
        &mut stop,
        &mut roster,
        metrics,
        &mut counted,
    )
    .await;
    metrics.recording_ended();
    link.leave();
    result?;
    let (manifest, size) = rec.finish(now_ms())?;
    account(metrics, &mut counted, size);
    Ok(manifest)
}

/// Report what the recording grew (or shrank: a replaced manifest) by since
/// the last report: bytes written and storage used.
fn account(metrics: &Metrics, counted: &mut RecordingSize, now: RecordingSize) {
    metrics.recording_written(now.written.saturating_sub(counted.written));
    metrics.recording_storage_add(now.on_disk as i64 - counted.on_disk as i64);
    *counted = now;
}

async fn record_loop(
    link: &mut MeetingLink,
    rec: &mut Recorder,
    stop: &mut watch::Receiver<bool>,
    roster: &mut Option<watch::Receiver<RosterView>>,
    metrics: &Metrics,
    counted: &mut RecordingSize,
) -> std::io::Result<()> {
    let mut seen = HashSet::new();
    let name = |roster: &Option<watch::Receiver<RosterView>>, sender: u16| {
        roster
            .as_ref()
            .and_then(|r| r.borrow().names.get(&sender).cloned())
            .unwrap_or_else(|| format!("participant {sender}"))
    };
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut flush = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            Some(Ok(())) = async { match roster.as_mut() { Some(r) => Some(r.changed().await), None => None } } => {
                if roster.as_ref().is_some_and(|r| !r.borrow().member) {
                    tracing::info!("removed from the meeting by the host: recording stops");
                    break;
                }
                // Connectors alone do not make a meeting: once the last
                // person left, the recording is complete.
                if roster.as_ref().is_some_and(|r| r.borrow().people == 0) {
                    tracing::info!("the last person left the meeting: recording ends");
                    break;
                }
                // Audio can arrive before the roster that names its sender.
                let names = roster.as_ref().map(|r| r.borrow().names.clone()).unwrap_or_default();
                for (sender, n) in names {
                    if seen.contains(&u64::from(sender)) {
                        rec.rename(u64::from(sender), &n)?;
                    }
                }
            }
            _ = tick.tick() => rec.tick()?,
            _ = flush.tick() => {
                let size = rec.flush()?;
                account(metrics, counted, size);
            }
            ev = link.events.recv() => match ev {
                None | Some(MeetingEvent::Left(_)) => break,
                Some(MeetingEvent::Joined) => tracing::info!("recorder joined the meeting"),
                Some(MeetingEvent::Audio { sender, seq, packet }) => {
                    let id = u64::from(sender);
                    if seen.insert(id) {
                        rec.participant_joined(id, &name(roster, sender), now_ms())?;
                    }
                    // The recorder tracks 16-bit sequence numbers for loss concealment.
                    rec.audio(id, seq as u16, &packet)?;
                }
                Some(MeetingEvent::Chat { sender, text }) => {
                    let id = u64::from(sender);
                    rec.chat(&ChatLine {
                        at_ms: now_ms(),
                        participant: id,
                        name: name(roster, sender),
                        text,
                    })?;
                }
            }
        }
    }
    Ok(())
}

/// Serve one KMS assignment: join with the invitation (the connector is in
/// the roster as `connector:recording`), follow epochs, record under a fresh
/// KMS data key into `base/<meeting>-<invitation>`, and leave when stopped or
/// when the meeting link ends. Returns the recording directory.
pub async fn record_assignment(
    client: kms_client::KmsClient,
    assignment: meeting_proto::kms_api::Assignment,
    base: &std::path::Path,
    stop: watch::Receiver<bool>,
    metrics: &Metrics,
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let (membership, creds) = crate::kms::join_assignment(&client, &assignment)
        .await
        .context("joining with the invitation")?;
    let (meeting, session) = (membership.meeting.clone(), membership.session.clone());
    let shut_down = stop.clone();
    let result = record_joined(&client, &assignment, membership, creds, base, stop, metrics).await;
    // A recorder that stopped, for whatever reason, must not stay in the
    // roster: the members would believe they are still being recorded.
    if let Err(e) = client.leave(&meeting, &session).await {
        tracing::warn!(error = %e, "KMS leave failed");
    }
    let outcome = match &result {
        Err(e) => Some(failure_outcome(e)),
        Ok(_) if *shut_down.borrow() => Some(InvitationOutcome::new(
            OutcomeState::Ended,
            "stopped",
            None,
            "the recording connector was shut down; what it recorded so far is kept",
        )),
        // The host removed the connector or the meeting ended: nothing to tell.
        Ok(_) => None,
    };
    if let Some(outcome) = outcome {
        crate::kms::report_outcome(&client, &assignment, outcome).await;
    }
    result
}

async fn record_joined(
    client: &kms_client::KmsClient,
    assignment: &meeting_proto::kms_api::Assignment,
    membership: crate::kms::Membership,
    creds: meeting_client::join::Credentials,
    base: &std::path::Path,
    stop: watch::Receiver<bool>,
    metrics: &Metrics,
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let meeting = membership.meeting.clone();
    let link = crate::meeting::join(creds, Duration::from_secs(10))
        .await
        .context("reaching the relay")?;
    let (roster_tx, roster_rx) = watch::channel(membership.roster.clone());
    tokio::spawn(crate::kms::follow_epochs(
        client.clone(),
        membership,
        link.keys.clone(),
        roster_tx,
    ));
    let (key, blob) = crate::kms::create_recording_key(client, &meeting)
        .await
        .context("creating the recording data key")?;
    let dir = base.join(format!("{}-{}", meeting.as_str(), assignment.invitation));
    let rec = Recorder::create(&dir, meeting.as_str(), key, blob, now_ms())
        .context("creating the recording files")?;
    tracing::info!(meeting = %meeting, dir = %dir.display(), "recording");
    let manifest = record(link, rec, stop, Some(roster_rx), metrics)
        .await
        .context("writing the recording")?;
    tracing::info!(meeting = %meeting, participants = manifest.participants.len(), "recording finished");
    Ok(dir)
}

/// The host's view of a recording that failed: the stage it failed at, and
/// a full disk named as such. Paths and the KMS's words stay in the logs.
fn failure_outcome(e: &anyhow::Error) -> InvitationOutcome {
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull)
    });
    if full {
        return InvitationOutcome::new(
            OutcomeState::Failed,
            "storage_full",
            None,
            "the recording stopped: the pool's storage is full; what was written so far is kept",
        );
    }
    // The outermost context is one of this module's fixed stage names.
    InvitationOutcome::new(
        OutcomeState::Failed,
        "recording_failed",
        None,
        &format!("the recording failed while {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_full_disk_is_named_and_other_failures_say_at_which_stage() {
        let full: anyhow::Result<()> = Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
            .context("/var/lib/conclave/recordings/board-1/participant-3.opus.enc")
            .context("writing the recording");
        let o = failure_outcome(&full.unwrap_err());
        assert_eq!(
            (o.state, o.code.as_str()),
            (OutcomeState::Failed, "storage_full")
        );
        assert!(!o.message.contains("/var/lib"), "{o}");

        let denied: anyhow::Result<()> =
            Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
                .context("/var/lib/conclave/recordings/board-1")
                .context("creating the recording files");
        let o = failure_outcome(&denied.unwrap_err());
        assert_eq!(o.code, "recording_failed");
        assert_eq!(
            o.message,
            "the recording failed while creating the recording files"
        );
        assert_eq!(o.check(), Ok(()));
    }
}
