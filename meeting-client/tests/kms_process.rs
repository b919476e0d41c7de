//! With a real kms-node: the relay registers over mTLS, participants join
//! with tokens, keys come sealed from the KMS, a leaver is locked out.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::kms::{RelayFault, fault_the_meetings_relay, start_kms};
use common::*;
use meeting_client::join;
use meeting_client::session::{Event, Session};
use meeting_proto::ids::MeetingId;

#[test]
fn three_participants_join_through_the_kms_and_hear_each_other() {
    let kms = start_kms();
    let relay = start_relay(&kms.relay_yaml("relay-0"));
    let tones = [440.0, 660.0, 880.0];
    let children: Vec<Child> = ["alice", "bob", "carol"]
        .iter()
        .zip(tones)
        .map(|(who, f)| {
            kms.join_cmd("kms-standup", who, f, 3.0)
                .args(["--chat", &format!("hi from {who}")])
                .spawn()
                .unwrap()
        })
        .collect();
    let reports: Vec<serde_json::Value> = children.into_iter().map(report).collect();
    let senders: Vec<u64> = reports
        .iter()
        .map(|r| r["sender_index"].as_u64().unwrap())
        .collect();
    // Each join started an epoch of its own (a newcomer gets no key that
    // was used before it joined); all three ended on the last one.
    let epochs: Vec<Vec<u64>> = reports
        .iter()
        .map(|r| serde_json::from_value(r["epochs"].clone()).unwrap())
        .collect();
    let mut first: Vec<u64> = epochs.iter().map(|e| e[0]).collect();
    first.sort();
    assert_eq!(first, [1, 2, 3], "{epochs:?}");
    assert!(epochs.iter().all(|e| e.last() == Some(&3)), "{epochs:?}");
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r["joined"], true, "{r}");
        let auth = r["stats"]["open_failures"]["authentication"]
            .as_u64()
            .unwrap_or(0);
        assert_eq!(auth, 0, "no frame may fail authentication: {r}");
        for (j, other) in senders.iter().enumerate().filter(|(j, _)| *j != i) {
            let frames = r["audio_frames"][other.to_string()].as_u64().unwrap_or(0);
            assert!(
                frames >= 75,
                "participant {i} decoded {frames} frames of {j}: {r}"
            );
            let hz = r["dominant_hz"][other.to_string()].as_f64().unwrap();
            assert!(
                (hz - tones[j]).abs() <= 10.0,
                "{i} hears {hz} Hz from {j}: {r}"
            );
        }
        assert_eq!(r["chats"].as_array().unwrap().len(), 2, "{r}");
    }
    let (_, text) = http_get(relay.http, "/metrics");
    assert!(metric(&text, r#"conclave_relay_packets_sent_total{kind="audio"}"#) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaver_that_keeps_capturing_cannot_decrypt_after_the_rotation() {
    let kms = start_kms();
    let relay = start_relay(&kms.relay_yaml("relay-0"));
    let stay: Vec<Child> = [("alice", 440.0), ("bob", 660.0)]
        .iter()
        .map(|(who, f)| kms.join_cmd("rotation", who, *f, 8.0).spawn().unwrap())
        .collect();

    // The leaver runs in this test so it can keep listening after leaving.
    let tls = conclave_pki::tls::anonymous_client_config(&kms.ca()).unwrap();
    let client = kms_client::KmsClient::new(&kms.url, tls).unwrap();
    let meeting = MeetingId::new("rotation").unwrap();
    let (creds, link) = join::kms_join(client, meeting.clone(), &kms.token("mallory", "rotation"))
        .await
        .unwrap();
    let socket = join::relay_socket(creds.relay).await.unwrap();
    let mut s = Session::new(
        meeting.clone(),
        creds.sender_index,
        creds.ticket,
        creds.key,
        1,
        Instant::now(),
    );
    let (mut updates, follower) = join::follow_events(link);
    let mut buf = vec![0u8; 2048];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);

    // Phase 1: a member like any other, installing new keys as they come.
    let mut opened_as_member = 0u64;
    join::flush(&mut s, &socket).await.unwrap();
    while opened_as_member < 50 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never heard the meeting"
        );
        tokio::select! {
            r = socket.recv(&mut buf) => if let Ok(n) = r { s.handle_datagram(&buf[..n], Instant::now()) },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(s.poll_timeout())) => s.handle_timeout(Instant::now()),
            Some(u) = updates.recv() => if let join::Update::Key(k) = u { s.set_epoch(k, Instant::now()) },
        }
        while let Some(ev) = s.poll_event() {
            opened_as_member += matches!(ev, Event::Media(_)) as u64;
        }
        join::flush(&mut s, &socket).await.unwrap();
    }

    // Phase 2: leave through the KMS, but keep the relay binding (keep-alives)
    // and every key held so far, and keep capturing.
    drop(updates);
    let link = follower.await.unwrap();
    link.client
        .leave(&link.meeting, &link.session)
        .await
        .unwrap();
    let last_epoch = s.epoch();
    let failures = |s: &Session| {
        s.stats()
            .open_failures
            .get("unknown_epoch")
            .copied()
            .unwrap_or(0)
    };
    let failures_at_leave = failures(&s);
    let capture_end = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut opened_newer = 0u64;
    let mut opened_last_second = 0u64;
    while tokio::time::Instant::now() < capture_end {
        tokio::select! {
            r = socket.recv(&mut buf) => if let Ok(n) = r { s.handle_datagram(&buf[..n], Instant::now()) },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(s.poll_timeout())) => s.handle_timeout(Instant::now()),
            _ = tokio::time::sleep_until(capture_end) => {}
        }
        while let Some(ev) = s.poll_event() {
            if let Event::Media(o) = ev {
                opened_newer += (o.epoch > last_epoch) as u64;
                opened_last_second +=
                    (capture_end - tokio::time::Instant::now() < Duration::from_secs(1)) as u64;
            }
        }
        join::flush(&mut s, &socket).await.unwrap();
    }
    let refused = failures(&s) - failures_at_leave;
    assert_eq!(
        opened_newer, 0,
        "a frame of an epoch after the leave opened"
    );
    assert_eq!(
        opened_last_second, 0,
        "the leaver still decrypts the meeting after rotation"
    );
    assert!(
        refused >= 50,
        "the relay kept forwarding ({refused} frames captured) and none opened"
    );
    for c in stay {
        let r = report(c);
        assert!(
            r["epochs"].as_array().unwrap().len() >= 2,
            "the others moved to a new epoch: {r}"
        );
    }
    drop(relay);
}

#[test]
fn listen_after_leave_reports_that_nothing_after_the_rotation_opens() {
    let kms = start_kms();
    let _relay = start_relay(&kms.relay_yaml("relay-0"));
    let stay: Vec<Child> = [("alice", 440.0), ("bob", 660.0)]
        .iter()
        .map(|(who, f)| kms.join_cmd("linger", who, *f, 9.0).spawn().unwrap())
        .collect();
    let leaver = kms
        .join_cmd("linger", "mallory", 550.0, 2.0)
        .args(["--listen-after-leave", "4"])
        .spawn()
        .unwrap();
    let r = report(leaver);
    let after = &r["after_leave"];
    let last = after["last_epoch"].as_u64().unwrap();
    let opened = after["opened_by_epoch"].as_object().unwrap();
    assert!(
        opened.keys().all(|e| e.parse::<u64>().unwrap() <= last),
        "a frame newer than the leaver's last epoch opened: {r}"
    );
    // Old-epoch frames in flight may open just after the leave, never at the end.
    let last_opened = after["last_opened_ms"].as_u64().unwrap_or(0);
    assert!(
        last_opened < 3_000,
        "still decrypting after the rotation: {r}"
    );
    let refused = after["open_failures"]["unknown_epoch"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        refused >= 100,
        "the relay kept forwarding and the leaver opened none of it: {r}"
    );
    for c in stay {
        let s = report(c);
        let newest = s["epochs"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .as_u64()
            .unwrap();
        assert!(newest > last, "the others rotated past {last}: {s}");
    }
}

#[test]
fn killing_the_relay_moves_the_meeting_to_another_and_media_resumes() {
    the_meeting_outlives_its_relay("failover", &["relay-0", "relay-1"], RelayFault::Kill);
}

/// A relay restarted under the same id (the pod's certificate) registers
/// again long before its heartbeat times out, with none of the bindings:
/// the KMS must tell the new process from the old one and send the members
/// a new placement, even though it is the same relay id.
#[test]
fn a_relay_restarted_under_its_id_takes_the_meeting_back_and_media_resumes() {
    the_meeting_outlives_its_relay("restart", &["relay-0"], RelayFault::KillAndRestart);
}

/// A relay told to stop (a rolling update) drains: it keeps forwarding and
/// tells the KMS at once, which moves the meeting to the other relay while
/// the draining one still runs, so the members move before it is gone.
#[test]
fn a_draining_relay_hands_the_meeting_over_while_it_still_forwards() {
    let (_, relays) =
        the_meeting_outlives_its_relay("drain", &["relay-0", "relay-1"], RelayFault::Drain);
    let mut draining = relays.into_iter().nth(1).expect("the drained relay");
    assert!(
        draining.child.try_wait().unwrap().is_none(),
        "the drained relay exited: the members moved because it died, not because it drained"
    );
    let (status, body) = http_get(draining.http, "/readyz");
    assert_eq!((status, body.as_str()), (503, "draining"));
}

/// Two participants meet through the KMS's relays (`pods`); the one carrying
/// the meeting suffers `fault` mid-meeting. Both must re-join and hear each
/// other again through a relay that is up and not draining (`relays[0]`).
fn the_meeting_outlives_its_relay(
    meeting: &str,
    pods: &[&str],
    fault: RelayFault,
) -> (Vec<serde_json::Value>, Vec<common::RelayProc>) {
    let kms = start_kms();
    let (reports, relays) = fault_the_meetings_relay(&kms, meeting, pods, fault);
    for r in &reports {
        assert!(
            r["rejoins"].as_u64().unwrap() >= 1,
            "client did not re-join: {r}"
        );
        let gap = r["max_audio_gap_ms"].as_u64().unwrap();
        eprintln!("rejoin gap {gap} ms");
        assert!(gap < 12_000, "media did not resume in time: {r}");
        let frames: u64 = r["audio_frames"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert!(frames >= 150, "too little audio overall: {r}");
        let resumed: u64 = r["audio_frames_since_rejoin"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert!(resumed >= 50, "too little audio after the re-join: {r}");
    }
    let survivor = &relays[0];
    let (_, text) = http_get(survivor.http, "/metrics");
    assert!(
        metric(&text, r#"conclave_relay_packets_sent_total{kind="audio"}"#) >= 100.0,
        "media did not flow through the relay that is still up:\n{text}"
    );
    (reports, relays)
}
