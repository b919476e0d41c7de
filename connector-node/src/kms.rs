//! The connector's dealings with the KMS: pick up assignments (invitations)
//! with the pod's client certificate, join with the invitation (so the
//! connector is in the roster as `connector:<type>`), follow epoch changes,
//! and create or fetch recording data keys.

use crate::recording::container::DataKey;
use kms_client::{KmsClient, Session};
use meeting_client::join::Credentials;
use meeting_proto::ids::{MeetingId, ParticipantId};
use meeting_proto::key_release::EphemeralKey;
use meeting_proto::kms_api::{self as api, Hex};
use meeting_proto::media_keys::EpochKey;
use std::net::SocketAddr;
use std::time::Duration;

/// Prefix of the wrapped-key blob in recording headers: the KMS keeps the
/// wrapped data key; files carry only the recording id.
const KMS_BLOB: &[u8] = b"KMS1";

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("KMS: {0}")]
    Api(#[from] kms_client::Error),
    #[error("cannot open the key the KMS released: {0}")]
    Open(String),
    #[error("relay address {0:?} from the KMS is not host:port")]
    RelayAddress(String),
    #[error("recording file does not name a KMS recording key")]
    NotKmsKey,
}

/// A connector's membership in one meeting, as the KMS sees it.
pub struct Membership {
    /// The roster as of the join (signature checked).
    pub roster: RosterView,
    pub meeting: MeetingId,
    pub participant: ParticipantId,
    pub session: Session,
    pub version: u64,
    key: EphemeralKey,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("meeting", &self.meeting)
            .field("participant", &self.participant)
            .finish_non_exhaustive()
    }
}

fn epoch_key(
    key: &EphemeralKey,
    sealed: &api::SealedKey,
    m: &Membership,
) -> Result<EpochKey, KmsError> {
    let opened = key
        .open_meeting_key(sealed, &m.meeting, m.participant)
        .map_err(|e| KmsError::Open(e.to_string()))?;
    EpochKey::new(m.meeting.clone(), opened.epoch, opened.as_bytes())
        .map_err(|e| KmsError::Open(e.to_string()))
}

/// Join the meeting of an assignment with its invitation.
pub async fn join_assignment(
    client: &KmsClient,
    a: &api::Assignment,
) -> Result<(Membership, Credentials), KmsError> {
    join_assignment_as(client, a, None).await
}

/// [`join_assignment`] under a roster name of its own (a phone leg's
/// "Phone …4567", a room system's name) instead of the connector's kind;
/// `display_name` must be in [`api::display_name`]'s canonical form.
pub async fn join_assignment_as(
    client: &KmsClient,
    a: &api::Assignment,
    display_name: Option<&str>,
) -> Result<(Membership, Credentials), KmsError> {
    let key = EphemeralKey::generate();
    let joined = client
        .join(
            &a.meeting,
            &api::JoinRequest {
                token: None,
                invitation: Some(a.invitation),
                public_key: Hex(key.public_key().to_vec()),
                display_name: display_name.map(str::to_string),
            },
        )
        .await?;
    let relay: SocketAddr = joined
        .relay
        .address
        .parse()
        .map_err(|_| KmsError::RelayAddress(joined.relay.address.clone()))?;
    let vk = client
        .info()
        .await?
        .signing_public_key
        .array()
        .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok())
        .ok_or_else(|| KmsError::Open("KMS signing key is malformed".into()))?;
    let r = joined
        .roster
        .verify(&vk)
        .map_err(|e| KmsError::Open(format!("roster: {e}")))?;
    let m = Membership {
        roster: RosterView {
            member: true,
            people: people(&r),
            names: r
                .members
                .iter()
                .map(|x| (x.sender_index, x.name.clone()))
                .collect(),
        },
        meeting: a.meeting.clone(),
        participant: joined.participant,
        session: Session(joined.session.clone()),
        version: 0,
        key,
    };
    let epoch = epoch_key(&m.key, &joined.key, &m)?;
    let creds = Credentials {
        meeting: a.meeting.clone(),
        sender_index: joined.sender_index,
        relay,
        ticket: joined.relay.ticket.0.clone(),
        key: epoch,
    };
    Ok((m, creds))
}

/// Tell the host what became of an assignment: the KMS puts `outcome` in
/// the roster. Best effort: a KMS that is briefly away gets two more tries;
/// a refusal (the invitation already has an outcome, or another connector
/// took it) is only logged, as there is nothing better to do with it.
pub async fn report_outcome(
    client: &KmsClient,
    a: &api::Assignment,
    outcome: api::InvitationOutcome,
) {
    for attempt in 1..=3 {
        match client
            .report_outcome(&a.meeting, a.invitation, outcome.clone())
            .await
        {
            Ok(_) => {
                tracing::info!(meeting = %a.meeting, invitation = a.invitation, %outcome, "invitation outcome reported to the host");
                return;
            }
            Err(e) if e.status().is_some_and(|s| s < 500) || attempt == 3 => {
                tracing::warn!(meeting = %a.meeting, invitation = a.invitation, %outcome, error = %e, "could not report the invitation outcome");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, attempt, "reporting the invitation outcome; retrying");
                tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
            }
        }
    }
}

/// What the connector currently knows of its meeting's roster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RosterView {
    /// Sender index -> display name.
    pub names: std::collections::BTreeMap<u16, String>,
    /// False once the host removed this connector (or the meeting ended for it).
    pub member: bool,
    /// Members who are people (hosts and participants), not connectors.
    pub people: usize,
}

fn people(r: &api::Roster) -> usize {
    r.members
        .iter()
        .filter(|m| matches!(m.role, api::Role::Host | api::Role::Participant))
        .count()
}

/// Follow roster versions: hand new epoch keys to the meeting link and
/// publish the (signature-checked) roster until the link closes. Errors are
/// logged and retried with a pause.
pub async fn follow_epochs(
    client: KmsClient,
    mut m: Membership,
    link_keys: tokio::sync::mpsc::Sender<EpochKey>,
    roster: tokio::sync::watch::Sender<RosterView>,
) {
    let mut vk = None;
    while !link_keys.is_closed() {
        if vk.is_none() {
            vk = match client.info().await {
                Ok(i) => i
                    .signing_public_key
                    .array()
                    .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok()),
                Err(e) => {
                    tracing::warn!(error = %e, "KMS info failed");
                    None
                }
            };
        }
        match client
            .events(&m.meeting, &m.session, m.version, 20_000)
            .await
        {
            Ok(ev) => {
                m.version = ev.version;
                if let (Some(signed), Some(vk)) = (ev.roster, vk.as_ref()) {
                    match signed.verify(vk) {
                        Ok(r) => {
                            let view = RosterView {
                                member: r.members.iter().any(|x| x.participant == m.participant),
                                people: people(&r),
                                names: r
                                    .members
                                    .iter()
                                    .map(|x| (x.sender_index, x.name.clone()))
                                    .collect(),
                            };
                            let _ = roster.send(view);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "roster signature does not verify; ignored")
                        }
                    }
                }
                if let Some(sealed) = ev.key {
                    match epoch_key(&m.key, &sealed, &m) {
                        Ok(k) => {
                            if link_keys.send(k).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "could not open a new epoch key"),
                    }
                }
            }
            Err(e) => {
                if matches!(e.code(), Some("gone" | "not_member")) {
                    // Removed by the host: the session is gone.
                    let _ = roster.send(RosterView {
                        member: false,
                        ..RosterView::default()
                    });
                    return;
                }
                tracing::warn!(error = %e, meeting = %m.meeting, "KMS events failed");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// A fresh data key for a recording of `meeting` and the blob files carry.
pub async fn create_recording_key(
    client: &KmsClient,
    meeting: &MeetingId,
) -> Result<(DataKey, Vec<u8>), KmsError> {
    let key = EphemeralKey::generate();
    let created = client
        .create_recording_key(&api::CreateRecordingKeyRequest {
            meeting: meeting.clone(),
            public_key: Hex(key.public_key().to_vec()),
        })
        .await?;
    let dk = key
        .open_data_key(&created.key)
        .map_err(|e| KmsError::Open(e.to_string()))?;
    let data_key = DataKey::from_bytes(dk.as_bytes())
        .ok_or_else(|| KmsError::Open("data key is not 32 bytes".into()))?;
    let mut blob = KMS_BLOB.to_vec();
    blob.extend_from_slice(created.key.recording.as_bytes());
    Ok((data_key, blob))
}

/// Ask the KMS for a recording's data key as an authorized reader (a join
/// token for the meeting, or the client certificate in `client`).
pub async fn fetch_recording_key(
    client: &KmsClient,
    blob: &[u8],
    token: Option<String>,
) -> Result<DataKey, KmsError> {
    let id = blob
        .strip_prefix(KMS_BLOB)
        .and_then(|r| std::str::from_utf8(r).ok())
        .ok_or(KmsError::NotKmsKey)?;
    let key = EphemeralKey::generate();
    let got = client
        .recording_key(
            id,
            &api::RecordingKeyRequest {
                public_key: Hex(key.public_key().to_vec()),
                token,
            },
        )
        .await?;
    let dk = key
        .open_data_key(&got.key)
        .map_err(|e| KmsError::Open(e.to_string()))?;
    DataKey::from_bytes(dk.as_bytes())
        .ok_or_else(|| KmsError::Open("data key is not 32 bytes".into()))
}
