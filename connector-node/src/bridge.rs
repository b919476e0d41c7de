//! Phone leg <-> meeting: the phone's audio is resampled to 48 kHz, Opus
//! encoded and sent (SFrame-protected by the session) into the meeting; the
//! meeting's audio is decoded per sender, mixed and resampled to 8 kHz for
//! the phone. The relay never returns a sender's own audio, so the mix is
//! "minus the caller" by construction.

use crate::media::mix::mix;
use crate::meeting::{MeetingEvent, MeetingLink};
use crate::telephony::{FRAME, PhoneLeg};
use meeting_client::audio::{Decoder, Encoder, FRAME_SAMPLES};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// Pause between assignment polls while invitations stay open.
pub const ASSIGNMENT_REPOLL: Duration = Duration::from_secs(1);
/// Decoded 20 ms frames kept per meeting sender.
const QUEUE: usize = 10;
const RATIO: usize = FRAME_SAMPLES / FRAME;

/// 8 kHz -> 48 kHz by linear interpolation.
pub fn upsample(pcm8: &[i16]) -> Vec<i16> {
    let mut out = Vec::with_capacity(pcm8.len() * RATIO);
    for (i, &s) in pcm8.iter().enumerate() {
        let next = pcm8.get(i + 1).copied().unwrap_or(s);
        for k in 0..RATIO {
            let v = i32::from(s) + (i32::from(next) - i32::from(s)) * k as i32 / RATIO as i32;
            out.push(v as i16);
        }
    }
    out
}

/// 48 kHz -> 8 kHz: average each group of six (a boxcar low-pass, enough
/// for telephone bandwidth) then take one sample.
pub fn downsample(pcm48: &[i16]) -> Vec<i16> {
    pcm48
        .chunks(RATIO)
        .map(|c| (c.iter().map(|&s| i32::from(s)).sum::<i32>() / c.len() as i32) as i16)
        .collect()
}

/// Run until the call or the meeting link ends; returns why.
pub async fn run(mut leg: PhoneLeg, mut link: MeetingLink) -> String {
    let Ok(mut encoder) = Encoder::new() else {
        return "opus encoder unavailable".into();
    };
    let mut decoders: BTreeMap<u16, Decoder> = BTreeMap::new();
    let mut queues: BTreeMap<u16, VecDeque<Vec<i16>>> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let why = loop {
        tokio::select! {
            _ = leg.ended.wait_for(|e| *e) => break "call ended".to_string(),
            _ = tick.tick() => {
                let mixed = mix(queues.values_mut().filter_map(VecDeque::pop_front), FRAME_SAMPLES);
                let _ = leg.to_phone.try_send(downsample(&mixed));
            }
            f = leg.from_phone.recv() => {
                let Some(f) = f else { break "call ended".to_string() };
                if let Ok(p) = encoder.encode(&upsample(&f)) {
                    let _ = link.audio.try_send(p);
                }
            }
            ev = link.events.recv() => match ev {
                None => break "meeting link closed".to_string(),
                Some(MeetingEvent::Left(r)) => break format!("left the meeting: {r}"),
                Some(MeetingEvent::Audio { sender, packet, .. }) => {
                    let dec = match decoders.entry(sender) {
                        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::btree_map::Entry::Vacant(v) => match Decoder::new() {
                            Ok(d) => v.insert(d),
                            Err(_) => continue,
                        },
                    };
                    if let Ok(pcm) = dec.decode(&packet) {
                        let q = queues.entry(sender).or_default();
                        for f in pcm.chunks(FRAME_SAMPLES) {
                            if q.len() >= QUEUE {
                                q.pop_front();
                            }
                            let mut f = f.to_vec();
                            f.resize(FRAME_SAMPLES, 0);
                            q.push_back(f);
                        }
                    }
                }
                Some(_) => {}
            }
        }
    };
    link.leave();
    why
}

fn has_port(host: &str) -> bool {
    match host.strip_prefix('[') {
        // An IPv6 literal: only a colon after the bracket starts a port.
        Some(rest) => rest
            .split_once(']')
            .is_some_and(|(_, after)| after.starts_with(':')),
        None => host.contains(':'),
    }
}

/// How host-chosen dial-out targets are reached.
#[derive(Debug, Clone, Default)]
pub struct DialOut {
    /// The pool's trunk (`host:port`): numbers are called through it.
    pub trunk: Option<String>,
    /// SIP over TLS: the default port is 5061 instead of 5060.
    pub tls: bool,
}

impl DialOut {
    /// The request URI and the `host:port` to send the INVITE to: a SIP URI
    /// goes to its own host, a number through the trunk.
    pub fn plan(&self, target: &str) -> Result<(String, String), String> {
        let default_port = if self.tls || target.starts_with("sips:") {
            5061
        } else {
            5060
        };
        if let Some(rest) = target
            .strip_prefix("sip:")
            .or_else(|| target.strip_prefix("sips:"))
        {
            let uri = rest.split(['?', ';']).next().unwrap_or_default();
            let host = uri.rsplit_once('@').map_or(uri, |(_, h)| h);
            if host.is_empty() {
                return Err("the SIP URI names no host".into());
            }
            let peer = if has_port(host) {
                host.to_string()
            } else {
                format!("{host}:{default_port}")
            };
            return Ok((target.to_string(), peer));
        }
        let trunk = self
            .trunk
            .as_deref()
            .ok_or("calling a number needs the pool's trunk (spec.telephony.trunkAddress)")?;
        let (host, peer) = if has_port(trunk) {
            (
                trunk.rsplit_once(':').map_or(trunk, |(h, _)| h),
                trunk.to_string(),
            )
        } else {
            (trunk, format!("{trunk}:{default_port}"))
        };
        Ok((format!("sip:{target}@{host}"), peer))
    }
}

/// Join the meeting of `a` for an answered leg and bridge them until either
/// ends; the host is then told how the call ended. False: the join failed
/// (the invitation is unused).
async fn connect_leg(
    client: kms_client::KmsClient,
    telephony: crate::telephony::Telephony,
    leg: PhoneLeg,
    a: meeting_proto::kms_api::Assignment,
) -> bool {
    let call = leg.call;
    let joined = match crate::kms::join_assignment_as(&client, &a, Some(&leg.display_name)).await {
        Ok((membership, creds)) => {
            let (meeting, session) = (membership.meeting.clone(), membership.session.clone());
            let why = match crate::meeting::join(creds, Duration::from_secs(10)).await {
                Ok(link) => {
                    let (roster_tx, mut roster) =
                        tokio::sync::watch::channel(membership.roster.clone());
                    tokio::spawn(crate::kms::follow_epochs(
                        client.clone(),
                        membership,
                        link.keys.clone(),
                        roster_tx,
                    ));
                    // The host removing the phone ends the call.
                    let removal = tokio::spawn({
                        let telephony = telephony.clone();
                        async move {
                            if roster.wait_for(|r| !r.member).await.is_ok() {
                                telephony.hangup(call).await;
                            }
                        }
                    });
                    let why = run(leg, link).await;
                    removal.abort();
                    tracing::info!(meeting = %meeting, why, "phone leg left the meeting");
                    why
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay unreachable");
                    "the meeting's relay is unreachable".to_string()
                }
            };
            if let Err(e) = client.leave(&meeting, &session).await {
                tracing::warn!(error = %e, "KMS leave failed");
            }
            let ended = meeting_proto::kms_api::InvitationOutcome::new(
                meeting_proto::kms_api::OutcomeState::Ended,
                "call_ended",
                None,
                &why,
            );
            crate::kms::report_outcome(&client, &a, ended).await;
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "joining with the invitation failed");
            false
        }
    };
    telephony.hangup(call).await;
    joined
}

/// Place the host's dial-out call of `a` and, once answered, join the
/// meeting. A call that does not connect (busy, no answer, rejected,
/// unreachable) is reported to the host through the KMS.
async fn dial_out(
    client: kms_client::KmsClient,
    telephony: crate::telephony::Telephony,
    plan: DialOut,
    a: meeting_proto::kms_api::Assignment,
) {
    use meeting_proto::kms_api::{InvitationOutcome, OutcomeState};
    let target = a.target.clone().unwrap_or_default();
    // Logs name only what the KMS's summary shows (never a full number).
    let shown = meeting_proto::kms_api::redacted_target(&target);
    let failed = |code: &str, message: &str| {
        InvitationOutcome::new(OutcomeState::Failed, code, None, message)
    };
    let placed = async {
        let (uri, peer) = plan.plan(&target).map_err(|e| (e, failed("not_dialable", "this pool cannot call that target (no trunk for numbers, or no host in the URI)")))?;
        let addr = tokio::net::lookup_host(&peer)
            .await
            .map_err(|e| format!("resolving {peer}: {e}"))
            .and_then(|mut a| {
                a.next()
                    .ok_or_else(|| format!("{peer} resolves to nothing"))
            })
            .map_err(|e| {
                (
                    e,
                    failed("unreachable", "the callee's SIP host does not resolve"),
                )
            })?;
        telephony
            .dial(addr, &uri, a.meeting.clone())
            .await
            .map_err(|e| (e.to_string(), e.outcome()))
    };
    match placed.await {
        Ok(leg) => {
            tracing::info!(meeting = %a.meeting.as_str(), target = %shown, "dial-out answered");
            if !connect_leg(client.clone(), telephony, leg, a.clone()).await {
                let outcome = failed(
                    "join_failed",
                    "the call was answered but could not join the meeting",
                );
                crate::kms::report_outcome(&client, &a, outcome).await;
            }
        }
        Err((e, outcome)) => {
            tracing::warn!(meeting = %a.meeting.as_str(), target = %shown, error = %e, "dial-out failed");
            crate::kms::report_outcome(&client, &a, outcome).await;
        }
    }
}

/// Connect phone legs to meetings through the KMS: each leg needs an open
/// invitation of this pool for its meeting (the host invited a phone), which
/// it uses to join; the connector then appears in the roster as
/// `connector:telephony` / `connector:roomSystem`. A leg for a meeting with
/// no invitation is hung up: nobody joins a meeting uninvited. An
/// invitation with a target (a number or SIP URI the host chose) is a
/// dial-out: the connector calls it and joins once it answers.
pub async fn serve_legs(
    client: kms_client::KmsClient,
    mut legs: tokio::sync::mpsc::Receiver<PhoneLeg>,
    telephony: crate::telephony::Telephony,
    plan: DialOut,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use meeting_proto::kms_api::Assignment;
    use std::sync::{Arc, Mutex};
    type Open = Arc<Mutex<BTreeMap<String, VecDeque<Assignment>>>>;
    let open: Open = Arc::default();
    // Dial-outs already placed: their invitations stay open until answered.
    let dialed: Arc<Mutex<std::collections::HashSet<u64>>> = Arc::default();
    // Dial-outs to place. The loop below runs them beside the legs' sessions, so a stop waits
    // for them too: a ringing call is cancelled and reported, an answered one leaves its
    // meeting, before the connector exits.
    let (dials_tx, mut dials) = tokio::sync::mpsc::unbounded_channel::<Assignment>();
    let sort = {
        let (open, dialed) = (open.clone(), dialed.clone());
        move |assignments: Vec<Assignment>| {
            let mut o = open.lock().unwrap_or_else(|p| p.into_inner());
            for a in assignments {
                if a.target.is_some() {
                    if dialed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(a.invitation)
                    {
                        let _ = dials_tx.send(a);
                    }
                    continue;
                }
                let q = o.entry(a.meeting.as_str().to_string()).or_default();
                if !q.iter().any(|x| x.invitation == a.invitation) {
                    q.push_back(a);
                }
            }
        }
    };
    let poller = tokio::spawn({
        let (client, sort) = (client.clone(), sort.clone());
        async move {
            loop {
                match client.assignments(25_000).await {
                    Ok(r) => {
                        let pending = !r.assignments.is_empty();
                        sort(r.assignments);
                        if pending {
                            // Open invitations answer the long-poll at once until
                            // a call uses them: pace the polling meanwhile.
                            tokio::time::sleep(ASSIGNMENT_REPOLL).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "fetching assignments failed");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
        }
    });
    let take = |open: &Mutex<BTreeMap<String, VecDeque<Assignment>>>, m: &str| {
        open.lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(m)
            .and_then(VecDeque::pop_front)
    };
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        let leg = tokio::select! {
            leg = legs.recv() => match leg {
                Some(leg) => leg,
                None => break,
            },
            Some(a) = dials.recv() => {
                let (client, telephony) = (client.clone(), telephony.clone());
                sessions.spawn(dial_out(client, telephony, plan.clone(), a));
                continue;
            }
            // A dropped switch never stops the pool. (The Ref that wait_for
            // returns is not Send: dropped inside.)
            Ok(()) = async { stop.wait_for(|s| *s).await.map(drop) } => {
                // Each leg's task leaves its meeting and reports call_ended
                // once its call is over.
                telephony.hangup_all().await;
                crate::service::finish_sessions(&mut sessions).await;
                break;
            }
        };
        while sessions.try_join_next().is_some() {}
        let mut assignment = take(&open, leg.meeting.as_str());
        if assignment.is_none() {
            // The invitation may be newer than the poller's last answer: ask now.
            if let Ok(r) = client.assignments(0).await {
                sort(r.assignments);
            }
            assignment = take(&open, leg.meeting.as_str());
        }
        let Some(a) = assignment else {
            tracing::warn!(meeting = %leg.meeting.as_str(),
                "no invitation for this meeting: hanging up (the host must invite a phone)");
            telephony.hangup(leg.call).await;
            continue;
        };
        let (client, telephony) = (client.clone(), telephony.clone());
        sessions.spawn(async move {
            connect_leg(client, telephony, leg, a).await;
        });
    }
    poller.abort();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::tone;

    #[test]
    fn dial_out_plans_uris_and_numbers() {
        let udp = DialOut {
            trunk: Some("trunk.example:5080".into()),
            tls: false,
        };
        assert_eq!(
            udp.plan("sip:alice@127.0.0.1:5090;transport=udp").unwrap(),
            (
                "sip:alice@127.0.0.1:5090;transport=udp".to_string(),
                "127.0.0.1:5090".to_string()
            )
        );
        assert_eq!(
            udp.plan("sip:room@pbx.example").unwrap().1,
            "pbx.example:5060"
        );
        assert_eq!(
            udp.plan("+15550123").unwrap(),
            (
                "sip:+15550123@trunk.example".to_string(),
                "trunk.example:5080".to_string()
            )
        );
        let tls = DialOut {
            trunk: Some("sip.example.net".into()),
            tls: true,
        };
        assert_eq!(tls.plan("+15550123").unwrap().1, "sip.example.net:5061");
        assert_eq!(tls.plan("sips:bob@[::1]").unwrap().1, "[::1]:5061");
        assert_eq!(tls.plan("sips:bob@[::1]:5071").unwrap().1, "[::1]:5071");
        let none = DialOut::default();
        assert!(none.plan("+15550123").unwrap_err().contains("trunk"));
        assert!(none.plan("sip:").unwrap_err().contains("no host"));
    }

    #[test]
    fn resampling_keeps_tones() {
        let s8 = tone::sine(1000.0, 8000, 8000.0, 0, 1600);
        let s48 = upsample(&s8);
        assert_eq!(s48.len(), 9600);
        assert!(tone::tone_ratio(&s48, 1000.0, 48000) > 0.9);
        let back = downsample(&tone::sine(440.0, 48000, 8000.0, 0, 9600));
        assert_eq!(back.len(), 1600);
        assert!(tone::tone_ratio(&back, 440.0, 8000) > 0.9);
        assert!(tone::rms(&back) > 5000.0, "passband level kept");
    }
}
