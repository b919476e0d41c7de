//! Phone leg <-> meeting: the phone's audio is resampled to 48 kHz, Opus
//! encoded and sent (SFrame-protected by the session) into the meeting; the
//! meeting's audio is decoded per sender, mixed and resampled to 8 kHz for
//! the phone. The relay never returns a sender's own audio, so the mix is
//! "minus the caller" by construction.

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
                let mut mix = vec![0i32; FRAME_SAMPLES];
                for q in queues.values_mut() {
                    if let Some(f) = q.pop_front() {
                        for (m, s) in mix.iter_mut().zip(f) {
                            *m += i32::from(s);
                        }
                    }
                }
                let mix: Vec<i16> = mix.into_iter().map(|s| s.clamp(-32768, 32767) as i16).collect();
                let _ = leg.to_phone.try_send(downsample(&mix));
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

/// Connect phone legs to meetings through the KMS: each leg needs an open
/// invitation of this pool for its meeting (the host invited a phone), which
/// it uses to join; the connector then appears in the roster as
/// `connector:telephony` / `connector:roomSystem`. A leg for a meeting with
/// no invitation is hung up: nobody joins a meeting uninvited.
pub async fn serve_legs(
    client: kms_client::KmsClient,
    mut legs: tokio::sync::mpsc::Receiver<PhoneLeg>,
    telephony: crate::telephony::Telephony,
) {
    use meeting_proto::kms_api::Assignment;
    use std::sync::{Arc, Mutex};
    let open: Arc<Mutex<BTreeMap<String, VecDeque<Assignment>>>> = Arc::default();
    let poller = tokio::spawn({
        let (client, open) = (client.clone(), open.clone());
        async move {
            loop {
                match client.assignments(25_000).await {
                    Ok(r) => {
                        let pending = !r.assignments.is_empty();
                        {
                            let mut o = open.lock().unwrap_or_else(|p| p.into_inner());
                            for a in r.assignments {
                                let q = o.entry(a.meeting.as_str().to_string()).or_default();
                                if !q.iter().any(|x| x.invitation == a.invitation) {
                                    q.push_back(a);
                                }
                            }
                        }
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
    while let Some(leg) = legs.recv().await {
        let mut assignment = take(&open, leg.meeting.as_str());
        if assignment.is_none() {
            // The invitation may be newer than the poller's last answer: ask now.
            if let Ok(r) = client.assignments(0).await {
                let mut o = open.lock().unwrap_or_else(|p| p.into_inner());
                for a in r.assignments {
                    let q = o.entry(a.meeting.as_str().to_string()).or_default();
                    if !q.iter().any(|x| x.invitation == a.invitation) {
                        q.push_back(a);
                    }
                }
            }
            assignment = take(&open, leg.meeting.as_str());
        }
        let Some(a) = assignment else {
            tracing::warn!(meeting = %leg.meeting.as_str(), caller = %leg.display_name,
                "no invitation for this meeting: hanging up (the host must invite a phone)");
            telephony.hangup(leg.call).await;
            continue;
        };
        let (client, telephony) = (client.clone(), telephony.clone());
        tokio::spawn(async move {
            let call = leg.call;
            match crate::kms::join_assignment(&client, &a).await {
                Ok((membership, creds)) => {
                    let (meeting, session) =
                        (membership.meeting.clone(), membership.session.clone());
                    match crate::meeting::join(creds, Duration::from_secs(10)).await {
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
                        }
                        Err(e) => tracing::warn!(error = %e, "relay unreachable"),
                    }
                    if let Err(e) = client.leave(&meeting, &session).await {
                        tracing::warn!(error = %e, "KMS leave failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "joining with the invitation failed"),
            }
            telephony.hangup(call).await;
        });
    }
    poller.abort();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::tone;

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
