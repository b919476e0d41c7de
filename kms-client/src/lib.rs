//! HTTPS client for the Conclave KMS API ([`meeting_proto::kms_api`]).
//!
//! One client type for every caller: participants (join token, then the
//! session secret), relays, connectors and the operator (client
//! certificates, configured in the `rustls::ClientConfig` passed in; use
//! `conclave_pki::tls::client_config` or `anonymous_client_config`).
//!
//! This crate never enables meeting-proto's `keys` feature: the relay links
//! it, and a relay must not be able to open meeting keys. Callers that open
//! sealed keys use `meeting_proto::key_release` themselves.

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meeting_proto::ids::{MeetingId, ParticipantId};
use meeting_proto::kms_api::{self as api, paths};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::time::Duration;

/// Largest response body accepted (rosters of big meetings fit easily).
const MAX_RESPONSE_BYTES: usize = 8 << 20;
/// Time allowed for a request beyond any long-poll wait it asks for.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KMS URL is invalid: {0}")]
    BadUrl(String),
    #[error("KMS unreachable: {0}")]
    Transport(String),
    #[error("KMS request timed out")]
    Timeout,
    /// The KMS answered with an error status.
    #[error("KMS refused ({status} {code}): {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        /// Seconds to wait (429 responses).
        retry_after: Option<u64>,
    },
    #[error("KMS response is not what the API says: {0}")]
    Decode(String),
}

impl Error {
    /// The API error code (`not_member`, `token_expired`, ...), if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A participant's session secret from [`api::JoinResponse::session`].
#[derive(Clone, PartialEq, Eq)]
pub struct Session(pub String);

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Session(<redacted>)")
    }
}

/// Cheap to clone; connections are pooled and reused (keep-alive).
#[derive(Clone)]
pub struct KmsClient {
    base: String,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl fmt::Debug for KmsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsClient")
            .field("base", &self.base)
            .finish()
    }
}

impl KmsClient {
    /// `base_url` like `https://kms.conclave.svc:8443` (no trailing path).
    pub fn new(base_url: &str, tls: rustls::ClientConfig) -> Result<Self, Error> {
        let base = base_url.trim_end_matches('/').to_owned();
        if !base.starts_with("https://") {
            return Err(Error::BadUrl("must start with https://".into()));
        }
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self { base, http })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: String,
        session: Option<&Session>,
        body: Option<Vec<u8>>,
        extra_wait: Duration,
    ) -> Result<T, Error> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
            .header(header::ACCEPT, "application/json");
        if let Some(s) = session {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", s.0));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Error::BadUrl(e.to_string()))?;
        let fut = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| Error::Transport(error_chain(&e)))?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| Error::Transport(e.to_string()))?
                .to_bytes();
            Ok::<_, Error>((status, retry_after, bytes))
        };
        let (status, retry_after, bytes) = tokio::time::timeout(REQUEST_TIMEOUT + extra_wait, fut)
            .await
            .map_err(|_| Error::Timeout)??;
        if status != StatusCode::OK {
            let body: Option<api::ErrorBody> = serde_json::from_slice(&bytes).ok();
            return Err(Error::Api {
                status: status.as_u16(),
                code: body
                    .as_ref()
                    .map_or_else(|| "http".into(), |b| b.code.clone()),
                message: body.map_or_else(
                    || String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
                    |b| b.error,
                ),
                retry_after,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()))
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: String,
        session: Option<&Session>,
        body: &B,
    ) -> Result<T, Error> {
        let body = serde_json::to_vec(body).map_err(|e| Error::Decode(e.to_string()))?;
        self.call(Method::POST, path, session, Some(body), Duration::ZERO)
            .await
    }

    async fn get<T: DeserializeOwned>(
        &self,
        path: String,
        session: Option<&Session>,
        wait_ms: u64,
    ) -> Result<T, Error> {
        self.call(
            Method::GET,
            path,
            session,
            None,
            Duration::from_millis(wait_ms),
        )
        .await
    }

    // ----- participants and connectors -----

    /// Joins with a token (people) or an invitation (connectors, whose
    /// certificate is in the TLS config).
    pub async fn join(
        &self,
        meeting: &MeetingId,
        req: &api::JoinRequest,
    ) -> Result<api::JoinResponse, Error> {
        self.post(
            paths::fill(paths::JOIN, "meeting", meeting.as_str()),
            None,
            req,
        )
        .await
    }

    /// Long-polls for roster changes, new epoch keys and relay assignments
    /// after roster version `since`, waiting up to `wait_ms`.
    pub async fn events(
        &self,
        meeting: &MeetingId,
        session: &Session,
        since: u64,
        wait_ms: u64,
    ) -> Result<api::EventsResponse, Error> {
        let path = format!(
            "{}?since={since}&wait_ms={wait_ms}",
            paths::fill(paths::EVENTS, "meeting", meeting.as_str())
        );
        self.get(path, Some(session), wait_ms).await
    }

    pub async fn leave(
        &self,
        meeting: &MeetingId,
        session: &Session,
    ) -> Result<api::LeaveResponse, Error> {
        self.post(
            paths::fill(paths::LEAVE, "meeting", meeting.as_str()),
            Some(session),
            &serde_json::json!({}),
        )
        .await
    }

    /// Host only.
    pub async fn remove(
        &self,
        meeting: &MeetingId,
        session: &Session,
        participant: ParticipantId,
    ) -> Result<api::RemoveResponse, Error> {
        let path = paths::fill(
            &paths::fill(paths::REMOVE, "meeting", meeting.as_str()),
            "participant",
            &participant.0.to_string(),
        );
        self.post(path, Some(session), &serde_json::json!({})).await
    }

    /// Host only. `target` is where the connector sends the meeting (an
    /// `rtmp(s)://` URL for liveStreaming, an E.164 number or `sip(s):` URI
    /// for telephony; see [`api::check_invite_target`]); `None` leaves it to
    /// the connector pool's configuration. A bad target is refused with 400
    /// `bad_target` (or `target_not_allowed` for kinds that take none).
    pub async fn invite(
        &self,
        meeting: &MeetingId,
        session: &Session,
        kind: api::ConnectorKind,
        target: Option<&str>,
    ) -> Result<api::InviteResponse, Error> {
        self.post(
            paths::fill(paths::INVITE, "meeting", meeting.as_str()),
            Some(session),
            &api::InviteRequest {
                kind,
                target: target.map(str::to_owned),
            },
        )
        .await
    }

    /// Connector certificate: open invitations for this pool's kind.
    pub async fn assignments(&self, wait_ms: u64) -> Result<api::AssignmentsResponse, Error> {
        self.get(
            format!("{}?wait_ms={wait_ms}", paths::ASSIGNMENTS),
            None,
            wait_ms,
        )
        .await
    }

    /// Connector certificate: report what became of an assigned invitation
    /// (the host sees it in the roster). Never put the target in `outcome`.
    pub async fn report_outcome(
        &self,
        meeting: &MeetingId,
        invitation: u64,
        outcome: api::InvitationOutcome,
    ) -> Result<api::InvitationOutcomeResponse, Error> {
        let req = api::InvitationOutcomeRequest {
            meeting: meeting.clone(),
            invitation,
            outcome,
        };
        self.post(paths::INVITATION_OUTCOME.into(), None, &req)
            .await
    }

    // ----- relays -----

    pub async fn register_relay(
        &self,
        req: &api::RelayRegisterRequest,
    ) -> Result<api::RelayRegisterResponse, Error> {
        self.post(paths::RELAY_REGISTER.into(), None, req).await
    }

    /// A 409 with code `unknown_relay` means: register again (KMS restarted).
    pub async fn heartbeat(
        &self,
        req: &api::RelayHeartbeatRequest,
    ) -> Result<api::RelayHeartbeatResponse, Error> {
        self.post(paths::RELAY_HEARTBEAT.into(), None, req).await
    }

    // ----- recordings -----

    pub async fn create_recording_key(
        &self,
        req: &api::CreateRecordingKeyRequest,
    ) -> Result<api::RecordingKeyResponse, Error> {
        self.post(paths::RECORDING_KEYS.into(), None, req).await
    }

    pub async fn recording_key(
        &self,
        recording: &str,
        req: &api::RecordingKeyRequest,
    ) -> Result<api::RecordingKeyResponse, Error> {
        if recording.is_empty() || !recording.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(Error::BadUrl("recording id must be alphanumeric".into()));
        }
        self.post(
            paths::fill(paths::RECORDING_KEY, "recording", recording),
            None,
            req,
        )
        .await
    }

    // ----- admin -----

    pub async fn audit(&self, from: u64, limit: u32) -> Result<api::AuditPage, Error> {
        self.get(
            format!("{}?from={from}&limit={limit}", paths::AUDIT),
            None,
            0,
        )
        .await
    }

    pub async fn verify_audit(&self) -> Result<api::AuditVerifyResponse, Error> {
        self.post(paths::AUDIT_VERIFY.into(), None, &serde_json::json!({}))
            .await
    }

    pub async fn rotate_kek(&self) -> Result<api::KekRotateResponse, Error> {
        self.post(paths::KEK_ROTATE.into(), None, &serde_json::json!({}))
            .await
    }

    pub async fn export_roster(&self, meeting: &MeetingId) -> Result<api::SignedRoster, Error> {
        self.get(
            paths::fill(paths::ROSTER_EXPORT, "meeting", meeting.as_str()),
            None,
            0,
        )
        .await
    }

    pub async fn info(&self) -> Result<api::InfoResponse, Error> {
        self.get(paths::INFO.into(), None, 0).await
    }

    /// The Prometheus text exposition from `/metrics`.
    pub async fn metrics_text(&self) -> Result<String, Error> {
        let req = Request::builder()
            .uri(format!("{}{}", self.base, paths::METRICS))
            .body(Full::new(Bytes::new()))
            .map_err(|e| Error::BadUrl(e.to_string()))?;
        let fut = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| Error::Transport(error_chain(&e)))?;
            let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| Error::Transport(e.to_string()))?
                .to_bytes();
            String::from_utf8(bytes.to_vec()).map_err(|e| Error::Decode(e.to_string()))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| Error::Timeout)?
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls() -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
    }

    #[test]
    fn refuses_plain_http_and_hides_sessions() {
        assert!(matches!(
            KmsClient::new("http://kms:80", tls()),
            Err(Error::BadUrl(_))
        ));
        assert!(!format!("{:?}", Session("secret-value".into())).contains("secret"));
    }

    #[tokio::test]
    async fn unreachable_kms_is_a_transport_error() {
        // Bind then drop a listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = KmsClient::new(&format!("https://127.0.0.1:{port}"), tls()).unwrap();
        let err = c.info().await.unwrap_err();
        assert!(matches!(err, Error::Transport(_)), "{err}");
        assert!(err.code().is_none());
    }
}
