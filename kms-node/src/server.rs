//! The tokio/axum shell: TLS accept loop (client certificates optional at
//! the TLS level; each route decides who may call it), authentication,
//! rate limits, and the handlers that drive [`Core`] and wait for the
//! committer before answering.

use crate::audit::AuditRecord;
use crate::core::{Claims, Core, CoreConfig, Denial, Effects, Joiner, Placement, Reader, Release};
use crate::keys::{self, Ed25519Signer, KeyRing, RootKey, SecretKey};
use crate::metrics::{KindLabels, Metrics, RequestLabels, RouteLabels};
use crate::rate::RateLimiter;
use crate::store::{Committer, Grouping, Store};
use axum::extract::{DefaultBodyLimit, Extension, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use conclave_pki::{Identity, Kind};
use ed25519_dalek::SigningKey;
use meeting_proto::config::kms::KmsConfig;
use meeting_proto::ids::{MeetingId, ParticipantId};
use meeting_proto::kms_api::{self as api, AuditKind, Hex, paths};
use meeting_proto::ticket::Ticket;
use meeting_proto::token::{TokenError, TokenVerifier, TrustedIssuer};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything the handlers share.
pub struct Shared {
    core: Mutex<Core>,
    committer: Committer,
    store: Arc<Store>,
    config: KmsConfig,
    tokens: RwLock<TokenVerifier>,
    signing: Arc<Ed25519Signer>,
    metrics: Metrics,
    per_identity: Mutex<RateLimiter>,
    per_meeting: Mutex<RateLimiter>,
    /// Refusals (401/403) per source address: past the budget, requests get
    /// 429 before reaching the core, so a flood of bad credentials cannot
    /// flood the audit log.
    failures: Mutex<RateLimiter>,
    in_flight: Semaphore,
    /// Bumped on any roster change (connector assignment polls wait on it).
    changed: watch::Sender<u64>,
    /// Bumped per meeting, so a member's long poll wakes only for its meeting.
    meeting_changed: Mutex<HashMap<MeetingId, watch::Sender<u64>>>,
    /// Set once the server stops: connections close after their request, and long polls
    /// answer with what there is, so clients poll again elsewhere instead of being cut.
    stopping: watch::Sender<bool>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// The code of an error response, for the metrics middleware (429s are
/// counted as denials there: they never reach the audit log).
#[derive(Clone, Copy, Debug)]
struct Refused(&'static str);

/// An HTTP error: the core's denial as JSON [`api::ErrorBody`].
#[derive(Debug)]
pub struct ApiError(pub Denial, pub Option<u64>);

impl From<Denial> for ApiError {
    fn from(d: Denial) -> Self {
        ApiError(d, None)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = Json(api::ErrorBody {
            code: self.0.code.to_owned(),
            error: self.0.message,
        });
        let mut resp = (status, body).into_response();
        resp.extensions_mut().insert(Refused(self.0.code));
        if let Some(ms) = self.1 {
            let secs = ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

fn bad_request(code: &'static str, msg: impl Into<String>) -> ApiError {
    Denial::new(400, code, msg).into()
}

/// The client certificate identity of the connection, if any, and its
/// source address.
#[derive(Clone, Debug)]
pub struct Peer(pub Option<Identity>, pub std::net::IpAddr);

/// Loads the issuers' JWKS files into a verifier.
fn load_verifier(config: &KmsConfig) -> anyhow::Result<TokenVerifier> {
    let mut issuers = Vec::new();
    for i in &config.issuers {
        let bytes = std::fs::read(&i.jwks_file).map_err(|e| {
            anyhow::anyhow!(
                "issuer {}: reading {}: {e}",
                i.issuer,
                i.jwks_file.display()
            )
        })?;
        let jwks = meeting_proto::token::Jwks::from_json(&bytes)
            .map_err(|e| anyhow::anyhow!("issuer {}: {e}", i.issuer))?;
        issuers.push(TrustedIssuer {
            name: i.issuer.clone(),
            audience: i.audience.clone(),
            jwks,
        });
    }
    Ok(TokenVerifier::new(issuers))
}

/// Opens the store and key hierarchy (creating them on first start).
pub fn open_state(config: &KmsConfig) -> anyhow::Result<(Arc<Store>, Core)> {
    let store = Arc::new(Store::open(&config.data_dir)?);
    let root = RootKey::load(&config.root_key.file, config.root_key.generate_if_missing)?;
    let stored = store.keys()?;
    let first_start = stored.keks.is_empty();
    let (mut ring, new_check) = KeyRing::open(root, stored.root_check.as_deref(), stored.keks)?;
    let now = now_ms();
    let signing = if first_start {
        let new_keks = ring.rotate(now)?;
        let signing = SigningKey::from_bytes(&ring.random_bytes::<32>()?);
        let wrapped = ring.wrap_signing_key(&signing)?;
        store.init_keys(new_check.as_deref(), &new_keks, Some(&wrapped))?;
        signing
    } else {
        let wrapped = stored
            .signing_key
            .ok_or_else(|| anyhow::anyhow!("store has KEKs but no signing key: corrupt"))?;
        ring.unwrap_signing_key(&wrapped)?
    };
    let core_config = CoreConfig {
        max_members: config.limits.max_members,
        meeting_key_interval_ms: config.rotation.meeting_key_interval_s * 1000,
        kek_interval_ms: config.rotation.kek_interval_s * 1000,
        kek_retire_after_ms: config.rotation.kek_retire_after_s * 1000,
        relay_timeout_ms: config.relays.heartbeat_timeout_ms,
        zone: config.relays.zone.clone(),
        recording_key_readers: config.recording_key_readers.clone(),
    };
    let loaded = store.load()?;
    let core = Core::new(
        core_config,
        ring,
        Arc::new(Ed25519Signer::new(&signing)?),
        loaded,
    )?;
    Ok((store, core))
}

impl Shared {
    pub fn new(config: KmsConfig, store: Arc<Store>, core: Core) -> anyhow::Result<Arc<Self>> {
        let metrics = Metrics::default();
        let (commit_seconds, batch_entries) = (
            metrics.audit_commit_seconds.clone(),
            metrics.audit_batch_entries.clone(),
        );
        let committer = Committer::start(
            store.clone(),
            Grouping {
                max_entries: config.audit.group_commit_max,
                linger: Duration::from_micros(config.audit.group_commit_linger_micros),
            },
            now_ms,
            Box::new(move |_, entries, took| {
                commit_seconds.observe(took.as_secs_f64());
                batch_entries.observe(entries as f64);
            }),
        )?;
        let tokens = RwLock::new(load_verifier(&config)?);
        let signing = core.signing_key().clone();
        Ok(Arc::new(Self {
            per_identity: Mutex::new(RateLimiter::new(
                config.limits.per_identity_rps,
                config.limits.per_identity_burst,
            )),
            per_meeting: Mutex::new(RateLimiter::new(
                config.limits.per_meeting_rps,
                config.limits.per_meeting_burst,
            )),
            failures: Mutex::new(RateLimiter::new(
                config.limits.per_identity_rps,
                config.limits.per_identity_burst,
            )),
            in_flight: Semaphore::new(config.limits.max_in_flight),
            changed: watch::channel(0).0,
            meeting_changed: Mutex::new(HashMap::new()),
            stopping: watch::channel(false).0,
            core: Mutex::new(core),
            committer,
            store,
            tokens,
            signing,
            metrics,
            config,
        }))
    }

    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        // A panic while holding the lock is a bug; the state it guards is
        // still consistent with what was committed, so keep serving.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts what the effects say happened, queues them for commit (still
    /// under the core lock, to keep commit order = state order).
    fn submit(
        &self,
        fx: Effects,
    ) -> tokio::sync::oneshot::Receiver<Result<(), crate::store::StoreError>> {
        for a in &fx.audit {
            match a.kind {
                AuditKind::KeyRelease => {
                    self.metrics.key_releases.inc();
                }
                AuditKind::EpochChange => {
                    self.metrics
                        .rotations
                        .get_or_create(&KindLabels { kind: "epoch" })
                        .inc();
                }
                AuditKind::Admin if a.detail.starts_with("KEK rotated") => {
                    self.metrics
                        .rotations
                        .get_or_create(&KindLabels { kind: "kek" })
                        .inc();
                }
                AuditKind::Denial => {
                    self.metrics
                        .deny(a.detail.split(':').next().unwrap_or_default());
                }
                _ => {}
            }
        }
        let wake = !fx.changed.is_empty();
        if wake {
            let mut map = self
                .meeting_changed
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for m in &fx.changed {
                if let Some(tx) = map.get(m) {
                    tx.send_modify(|v| *v += 1);
                    if tx.receiver_count() == 0 {
                        map.remove(m);
                    }
                }
            }
        }
        let rx = self.committer.submit(fx.writes, fx.audit);
        if wake {
            self.changed.send_modify(|v| *v += 1);
        }
        rx
    }

    /// Resolves once the server stops.
    async fn stopped(&self) {
        let mut stopping = self.stopping.subscribe();
        // The Ref that wait_for returns is not Send: drop it at once.
        drop(stopping.wait_for(|s| *s).await);
    }

    /// A long poll's wait: whether `changed` moved before `deadline`. Also false once the
    /// server stops, so the poll answers at once with what there is.
    async fn wait_for_change(
        &self,
        changed: &mut watch::Receiver<u64>,
        deadline: tokio::time::Instant,
    ) -> bool {
        tokio::select! {
            moved = tokio::time::timeout_at(deadline, changed.changed()) => moved.is_ok(),
            () = self.stopped() => false,
        }
    }

    async fn durable(
        &self,
        rx: tokio::sync::oneshot::Receiver<Result<(), crate::store::StoreError>>,
    ) -> Result<(), ApiError> {
        match rx.await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Denial::new(
                503,
                "store_unavailable",
                "could not make the change durable",
            )
            .into()),
        }
    }

    /// Runs a core operation and queues its effects for commit; the
    /// receiver resolves once they are durable. Nothing may be answered
    /// before then, but work for the answer can overlap the commit.
    fn begin<T>(
        &self,
        f: impl FnOnce(&mut Core) -> (Result<T, Denial>, Effects),
    ) -> (
        Result<T, Denial>,
        tokio::sync::oneshot::Receiver<Result<(), crate::store::StoreError>>,
    ) {
        let mut core = self.core();
        let (result, fx) = f(&mut core);
        (result, self.submit(fx))
    }

    /// Runs a core operation, commits its effects, then returns its result.
    async fn run<T>(
        &self,
        f: impl FnOnce(&mut Core) -> (Result<T, Denial>, Effects),
    ) -> Result<T, ApiError> {
        let (result, rx) = self.begin(f);
        self.durable(rx).await?;
        result.map_err(ApiError::from)
    }

    /// Records a denial decided here (authentication) and returns it.
    async fn deny(&self, actor: &str, meeting: Option<&MeetingId>, d: Denial) -> ApiError {
        let rx = {
            let core = self.core();
            let (_, fx) = core.deny(actor, meeting, d.clone());
            self.submit(fx)
        };
        match self.durable(rx).await {
            Ok(()) => d.into(),
            Err(e) => e,
        }
    }

    fn limit(&self, identity: &str, meeting: Option<&MeetingId>) -> Result<(), ApiError> {
        let now = now_ms();
        let too_many = |ms| {
            ApiError(
                Denial::new(429, "rate_limited", "too many requests; retry later"),
                Some(ms),
            )
        };
        self.per_identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(identity, now)
            .map_err(too_many)?;
        if let Some(m) = meeting {
            self.per_meeting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .check(m.as_str(), now)
                .map_err(too_many)?;
        }
        Ok(())
    }

    fn seal(&self, r: &Release) -> Result<api::SealedKey, ApiError> {
        let info = api::meeting_key_info(&r.meeting, r.epoch, r.participant);
        let (enc, ct) = keys::seal(&r.public_key, &info, &r.key)
            .map_err(|e| Denial::new(500, "internal", e.to_string()))?;
        Ok(api::SealedKey {
            meeting: r.meeting.clone(),
            epoch: r.epoch,
            participant: r.participant,
            enc: Hex(enc),
            ciphertext: Hex(ct),
        })
    }

    fn assignment(
        &self,
        meeting: &MeetingId,
        p: &Placement,
        participant: ParticipantId,
        sender_index: u16,
    ) -> Result<api::RelayAssignment, ApiError> {
        let not_after = now_ms() / 1000 + self.config.ticket_lifetime_s;
        let ticket = Ticket {
            meeting: meeting.clone(),
            participant,
            sender_index,
            relay: p.relay.clone(),
            not_after,
        }
        .sign(self.signing.as_ref())
        .map_err(|e| Denial::new(500, "internal", e.to_string()))?;
        Ok(api::RelayAssignment {
            relay: p.relay.clone(),
            address: p.address.clone(),
            ticket: Hex(ticket),
            not_after,
        })
    }

    fn is_admin(&self, peer: &Peer) -> Option<String> {
        let uri = peer.0.as_ref()?.to_uri();
        self.config.admins.contains(&uri).then_some(uri)
    }

    fn connector_kind(&self, peer: &Peer) -> Option<(String, api::ConnectorKind)> {
        let id = peer.0.as_ref()?;
        if id.kind() != Kind::Connector {
            return None;
        }
        let uri = id.to_uri();
        self.config
            .connector_pools
            .iter()
            .find(|p| uri == p.identity || uri.starts_with(&format!("{}/", p.identity)))
            .map(|p| (uri, p.kind))
    }

    pub fn is_healthy(&self) -> bool {
        !self.committer.is_poisoned()
    }

    /// Walks the audit chain (off the async threads) and counts the outcome.
    async fn verify_audit(&self) -> Result<api::AuditVerifyResponse, String> {
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || store.verify_audit())
            .await
            .map_err(|_| "audit verification task failed".to_owned())?
            .map_err(|e| e.to_string());
        self.metrics.audit_verifications.inc();
        if !result.as_ref().is_ok_and(|r| r.ok) {
            self.metrics.audit_verify_failures.inc();
        }
        result
    }

    /// A TLS handshake refused for its client certificate never reaches a
    /// route, so it is recorded here: a denial metric always, and an audit
    /// entry while the source address is within its refusal budget (the same
    /// budget that answers 429 to floods of bad credentials, so a flood of
    /// handshakes cannot flood the audit log).
    ///
    /// The handshake itself stays refused rather than accepted and answered
    /// with 401: accepting certificates that do not chain to our CA would put
    /// every route's authorisation one bug away from trusting a forged
    /// identity, and the TLS alert (unknown_ca / bad_certificate) is already
    /// a clear answer to the client.
    async fn refused_handshake(&self, remote: std::net::IpAddr, error: &std::io::Error) {
        let Some(code) = certificate_refusal(error) else {
            return;
        };
        let ip = remote.to_string();
        let now = now_ms();
        let audited = {
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            failures.has_budget(&ip, now).is_ok() && failures.check(&ip, now).is_ok()
        };
        if !audited {
            self.metrics.deny(code);
            return;
        }
        let message = match code {
            "foreign_ca" => "client certificate is not issued by this KMS's CA".to_owned(),
            _ => format!("client certificate refused: {error}"),
        };
        let _ = self
            .deny(&format!("tls:{ip}"), None, Denial::new(401, code, message))
            .await;
    }
}

/// The denial code for a handshake that failed on the client certificate,
/// or None for other failures (scanners, clients that hang up).
fn certificate_refusal(e: &std::io::Error) -> Option<&'static str> {
    use rustls::{CertificateError, Error};
    match e.get_ref()?.downcast_ref::<Error>()? {
        // Another CA's certificate: its issuer is unknown here, or (when
        // the other CA reuses our CA's name) its signature does not verify.
        Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => Some("foreign_ca"),
        Error::InvalidCertificate(_) => Some("bad_certificate"),
        _ => None,
    }
}

fn meeting_id(s: &str) -> Result<MeetingId, ApiError> {
    MeetingId::new(s).map_err(|e| bad_request("bad_meeting_id", e.to_string()))
}

fn public_key(h: &Hex) -> Result<[u8; 32], ApiError> {
    h.array()
        .ok_or_else(|| bad_request("bad_public_key", "public_key must be 32 bytes (X25519)"))
}

/// A connector's roster name, if it gave one: only in canonical form (the
/// connector sanitizes what its SIP peer sent), and never from a person,
/// whose name is the token's.
fn connector_display_name(req: &api::JoinRequest) -> Result<Option<String>, ApiError> {
    let Some(name) = &req.display_name else {
        return Ok(None);
    };
    if req.token.is_some() {
        return Err(bad_request(
            "bad_display_name",
            "display_name is for connectors; a person's name comes from the join token",
        ));
    }
    match api::display_name(name) {
        Some(canonical) if &canonical == name => Ok(Some(canonical)),
        _ => Err(bad_request(
            "bad_display_name",
            "display_name must be 1 to 64 characters without control characters or extra white space",
        )),
    }
}

fn bearer(headers: &HeaderMap) -> Option<[u8; 32]> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let s = v.strip_prefix("Bearer ")?;
    (s.len() == 64).then(|| crate::core::session_hash(s))
}

fn token_denial(e: &TokenError) -> Denial {
    let code = match e {
        TokenError::Expired => "token_expired",
        TokenError::WrongAudience => "wrong_audience",
        TokenError::UnknownIssuer | TokenError::MissingIssuer | TokenError::UnknownKid => {
            "unknown_issuer"
        }
        TokenError::BadSignature | TokenError::KeyAlgMismatch => "bad_signature",
        TokenError::NotYetValid | TokenError::IssuedInFuture | TokenError::LifetimeTooLong => {
            "token_time"
        }
        _ => "bad_token",
    };
    Denial::new(401, code, e.to_string())
}

async fn join(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    Path(meeting): Path<String>,
    Json(req): Json<api::JoinRequest>,
) -> ApiResult<api::JoinResponse<api::SignedRosterJson>> {
    let meeting = meeting_id(&meeting)?;
    let pk = public_key(&req.public_key)?;
    let display_name = connector_display_name(&req)?;
    let joiner = match (&req.token, req.invitation) {
        (Some(token), None) => {
            let verified = s
                .tokens
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .verify(token, now_ms() / 1000);
            let v = match verified {
                Ok(v) => v,
                Err(e) => {
                    let actor = peer
                        .0
                        .as_ref()
                        .map_or("anonymous".to_owned(), Identity::to_uri);
                    return Err(s.deny(&actor, Some(&meeting), token_denial(&e)).await);
                }
            };
            let claims = Claims {
                issuer: v.issuer,
                subject: v.claims.sub,
                name: v.claims.name,
                meeting: v.claims.mid,
                role: match v.claims.role {
                    meeting_proto::token::Role::Host => api::Role::Host,
                    meeting_proto::token::Role::Participant => api::Role::Participant,
                },
                expires_s: v.claims.exp,
                token_hash: Sha256::digest(token.as_bytes()).into(),
            };
            s.limit(&claims.actor(), Some(&meeting))?;
            Joiner::Person(claims)
        }
        (None, Some(invitation)) => {
            let Some((identity, kind)) = s.connector_kind(&peer) else {
                let actor = peer
                    .0
                    .as_ref()
                    .map_or("anonymous".to_owned(), Identity::to_uri);
                return Err(s
                    .deny(
                        &actor,
                        Some(&meeting),
                        Denial::new(
                            403,
                            "not_a_connector",
                            "joining by invitation needs the certificate of a configured connector pool",
                        ),
                    )
                    .await);
            };
            s.limit(&identity, Some(&meeting))?;
            Joiner::Connector {
                identity,
                kind,
                invitation,
                display_name,
            }
        }
        _ => {
            return Err(s
                .deny(
                    "anonymous",
                    Some(&meeting),
                    Denial::new(
                        401,
                        "no_credentials",
                        "send exactly one of token or invitation",
                    ),
                )
                .await);
        }
    };
    let now = now_ms();
    let (granted, rx) = s.begin(|c| c.join(now, &meeting, joiner, pk));
    // Sealing and signing (most of a release's CPU) run while the commit's
    // fsync is under way; the answer still waits for durability below.
    let response = granted.map_err(ApiError::from).and_then(|g| {
        let key = s.seal(&g.release)?;
        let relay = s.assignment(&meeting, &g.placement, g.participant, g.sender_index)?;
        Ok(api::JoinResponse {
            participant: g.participant,
            session: g.session,
            sender_index: g.sender_index,
            roster: g.roster.json(),
            key,
            relay,
        })
    });
    s.durable(rx).await?;
    Ok(Json(response?))
}

async fn session_or_deny(
    s: &Shared,
    headers: &HeaderMap,
    meeting: &MeetingId,
) -> Result<[u8; 32], ApiError> {
    match bearer(headers) {
        Some(h) => {
            s.limit(&Hex::encode(&h[..8]), Some(meeting))?;
            Ok(h)
        }
        None => Err(s
            .deny(
                "anonymous",
                Some(meeting),
                Denial::new(
                    401,
                    "no_session",
                    "Authorization: Bearer <session> is required",
                ),
            )
            .await),
    }
}

async fn events(
    State(s): State<Arc<Shared>>,
    Path(meeting): Path<String>,
    Query(q): Query<api::EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<api::EventsResponse<api::SignedRosterJson>> {
    let meeting = meeting_id(&meeting)?;
    let session = session_or_deny(&s, &headers, &meeting).await?;
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(q.wait_ms.min(api::MAX_WAIT_MS));
    let mut changed = s
        .meeting_changed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(meeting.clone())
        .or_insert_with(|| watch::channel(0).0)
        .subscribe();
    loop {
        changed.mark_unchanged();
        let now = now_ms();
        let grant = s
            .run(|c| c.events(now, &meeting, &session, q.since))
            .await?;
        if let Some(g) = grant {
            let key = g.release.as_ref().map(|r| s.seal(r)).transpose()?;
            let relay = match &g.placement {
                Some((p, pid, sender)) => Some(s.assignment(&meeting, p, *pid, *sender)?),
                None => None,
            };
            return Ok(Json(api::EventsResponse {
                version: g.version,
                roster: g.roster.map(|r| r.json()),
                key,
                relay,
            }));
        }
        if !s.wait_for_change(&mut changed, deadline).await {
            return Ok(Json(api::EventsResponse {
                version: q.since,
                roster: None,
                key: None,
                relay: None,
            }));
        }
    }
}

async fn leave(
    State(s): State<Arc<Shared>>,
    Path(meeting): Path<String>,
    headers: HeaderMap,
) -> ApiResult<api::LeaveResponse> {
    let meeting = meeting_id(&meeting)?;
    let session = session_or_deny(&s, &headers, &meeting).await?;
    let now = now_ms();
    let epoch = s.run(|c| c.leave(now, &meeting, &session)).await?;
    Ok(Json(api::LeaveResponse { epoch }))
}

async fn remove(
    State(s): State<Arc<Shared>>,
    Path((meeting, participant)): Path<(String, u64)>,
    headers: HeaderMap,
) -> ApiResult<api::RemoveResponse> {
    let meeting = meeting_id(&meeting)?;
    let session = session_or_deny(&s, &headers, &meeting).await?;
    let now = now_ms();
    let epoch = s
        .run(|c| c.remove(now, &meeting, &session, ParticipantId(participant)))
        .await?;
    Ok(Json(api::RemoveResponse { epoch }))
}

async fn invite(
    State(s): State<Arc<Shared>>,
    Path(meeting): Path<String>,
    headers: HeaderMap,
    Json(req): Json<api::InviteRequest>,
) -> ApiResult<api::InviteResponse> {
    let meeting = meeting_id(&meeting)?;
    let session = session_or_deny(&s, &headers, &meeting).await?;
    let now = now_ms();
    let (invitation, roster) = s
        .run(|c| c.invite(now, &meeting, &session, req.kind, req.target))
        .await?;
    Ok(Json(api::InviteResponse {
        invitation,
        roster: roster.signed(),
    }))
}

async fn assignments(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    Query(q): Query<api::AssignmentsQuery>,
) -> ApiResult<api::AssignmentsResponse> {
    let Some((identity, kind)) = s.connector_kind(&peer) else {
        let actor = peer
            .0
            .as_ref()
            .map_or("anonymous".to_owned(), Identity::to_uri);
        return Err(s
            .deny(
                &actor,
                None,
                Denial::new(
                    403,
                    "not_a_connector",
                    "assignments are for configured connector pools",
                ),
            )
            .await);
    };
    s.limit(&identity, None)?;
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(q.wait_ms.min(api::MAX_WAIT_MS));
    let mut changed = s.changed.subscribe();
    loop {
        changed.mark_unchanged();
        let assignments = s.core().assignments(kind);
        if !assignments.is_empty() || !s.wait_for_change(&mut changed, deadline).await {
            return Ok(Json(api::AssignmentsResponse { assignments }));
        }
    }
}

/// A connector reports what became of an invitation it was assigned. The
/// body is parsed here rather than by the `Json` extractor so oversize and
/// malformed reports are refused with an audited denial like any other.
async fn invitation_outcome(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    body: axum::body::Bytes,
) -> ApiResult<api::InvitationOutcomeResponse> {
    let Some((identity, kind)) = s.connector_kind(&peer) else {
        let actor = peer
            .0
            .as_ref()
            .map_or("anonymous".to_owned(), Identity::to_uri);
        let d = Denial::new(
            403,
            "not_a_connector",
            "invitation outcomes are for configured connector pools",
        );
        return Err(s.deny(&actor, None, d).await);
    };
    s.limit(&identity, None)?;
    if body.len() > api::MAX_OUTCOME_BODY {
        let d = Denial::new(
            413,
            "too_large",
            format!(
                "an outcome report is at most {} bytes",
                api::MAX_OUTCOME_BODY
            ),
        );
        return Err(s.deny(&identity, None, d).await);
    }
    let req: api::InvitationOutcomeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            // serde's messages can quote the input: say only where it broke.
            let msg = format!(
                "not an outcome report ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            );
            let d = Denial::new(400, "bad_request", msg);
            return Err(s.deny(&identity, None, d).await);
        }
    };
    let now = now_ms();
    let invitation = s
        .run(|c| {
            c.report_outcome(
                now,
                &identity,
                kind,
                &req.meeting,
                req.invitation,
                req.outcome,
            )
        })
        .await?;
    Ok(Json(api::InvitationOutcomeResponse { invitation }))
}

fn relay_identity(peer: &Peer) -> Option<(String, String, String)> {
    let id = peer.0.as_ref()?;
    if id.kind() != Kind::Relay {
        return None;
    }
    let relay = match id.pod() {
        Some(pod) => format!("{}/{pod}", id.name()),
        None => id.name().to_owned(),
    };
    Some((relay, id.name().to_owned(), id.to_uri()))
}

async fn relay_register(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    Json(req): Json<api::RelayRegisterRequest>,
) -> ApiResult<api::RelayRegisterResponse> {
    let actor = peer
        .0
        .as_ref()
        .map_or("anonymous".to_owned(), Identity::to_uri);
    let Some((relay, zone, uri)) = relay_identity(&peer) else {
        return Err(s
            .deny(
                &actor,
                None,
                Denial::new(403, "not_a_relay", "relay certificate required"),
            )
            .await);
    };
    if req.zone != zone {
        return Err(s
            .deny(
                &actor,
                None,
                Denial::new(
                    403,
                    "wrong_zone",
                    "zone does not match the relay certificate",
                ),
            )
            .await);
    }
    if req.address.len() > 255 || req.address.parse::<std::net::SocketAddr>().is_err() {
        return Err(bad_request("bad_address", "address must be ip:port"));
    }
    s.limit(&uri, None)?;
    let now = now_ms();
    s.run(|c| c.register_relay(now, relay.clone(), req, &uri))
        .await?;
    Ok(Json(api::RelayRegisterResponse {
        relay,
        ticket_public_key: Hex(s.signing.verifying_key().to_bytes().to_vec()),
        heartbeat_interval_ms: s.config.relays.heartbeat_interval_ms,
    }))
}

async fn relay_heartbeat(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    Json(req): Json<api::RelayHeartbeatRequest>,
) -> ApiResult<api::RelayHeartbeatResponse> {
    let Some((relay, _, uri)) = relay_identity(&peer) else {
        let actor = peer
            .0
            .as_ref()
            .map_or("anonymous".to_owned(), Identity::to_uri);
        return Err(s
            .deny(
                &actor,
                None,
                Denial::new(403, "not_a_relay", "relay certificate required"),
            )
            .await);
    };
    s.limit(&uri, None)?;
    let now = now_ms();
    let meetings = s
        .run(|c| {
            let (meetings, fx) = c.heartbeat(now, &relay, req.load, req.ready, &uri);
            (Ok(meetings), fx)
        })
        .await?;
    match meetings {
        Some(meetings) => Ok(Json(api::RelayHeartbeatResponse {
            meetings,
            heartbeat_interval_ms: s.config.relays.heartbeat_interval_ms,
        })),
        None => Err(Denial::new(409, "unknown_relay", "register first").into()),
    }
}

fn sealed_data_key(
    meeting: &MeetingId,
    recording: &str,
    pk: &[u8; 32],
    key: &SecretKey,
) -> Result<api::SealedDataKey, ApiError> {
    let info = api::recording_key_info(meeting, recording);
    let (enc, ct) = keys::seal(pk, &info, key)
        .map_err(|e| Denial::new(400, "bad_public_key", e.to_string()))?;
    Ok(api::SealedDataKey {
        recording: recording.to_owned(),
        meeting: meeting.clone(),
        enc: Hex(enc),
        ciphertext: Hex(ct),
    })
}

async fn recording_create(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    Json(req): Json<api::CreateRecordingKeyRequest>,
) -> ApiResult<api::RecordingKeyResponse> {
    let pk = public_key(&req.public_key)?;
    let identity = peer
        .0
        .as_ref()
        .map_or("anonymous".to_owned(), Identity::to_uri);
    s.limit(&identity, Some(&req.meeting))?;
    let now = now_ms();
    let (id, key) = s
        .run(|c| c.create_recording_key(now, &identity, &req.meeting))
        .await?;
    Ok(Json(api::RecordingKeyResponse {
        key: sealed_data_key(&req.meeting, &id, &pk, &key)?,
    }))
}

async fn recording_key(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    Path(recording): Path<String>,
    Json(req): Json<api::RecordingKeyRequest>,
) -> ApiResult<api::RecordingKeyResponse> {
    let pk = public_key(&req.public_key)?;
    if recording.len() > 64 {
        return Err(bad_request("bad_recording_id", "recording id too long"));
    }
    let reader = match (&req.token, &peer.0) {
        (Some(token), _) => {
            let verified = s
                .tokens
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .verify(token, now_ms() / 1000);
            match verified {
                Ok(v) => Reader::Token(Claims {
                    issuer: v.issuer,
                    subject: v.claims.sub,
                    name: v.claims.name,
                    meeting: v.claims.mid,
                    role: api::Role::Participant,
                    expires_s: v.claims.exp,
                    token_hash: Sha256::digest(token.as_bytes()).into(),
                }),
                Err(e) => return Err(s.deny("anonymous", None, token_denial(&e)).await),
            }
        }
        (None, Some(id)) => Reader::Certificate(id.to_uri()),
        (None, None) => {
            return Err(s
                .deny(
                    "anonymous",
                    None,
                    Denial::new(401, "no_credentials", "certificate or token required"),
                )
                .await);
        }
    };
    let actor = match &reader {
        Reader::Certificate(c) => c.clone(),
        Reader::Token(c) => c.actor(),
    };
    s.limit(&actor, None)?;
    let (meeting, key) = s.run(|c| c.recording_key(&recording, &reader)).await?;
    Ok(Json(api::RecordingKeyResponse {
        key: sealed_data_key(&meeting, &recording, &pk, &key)?,
    }))
}

async fn admin_or_deny(s: &Shared, peer: &Peer, what: &str) -> Result<String, ApiError> {
    match s.is_admin(peer) {
        Some(a) => {
            s.limit(&a, None)?;
            Ok(a)
        }
        None => {
            let actor = peer
                .0
                .as_ref()
                .map_or("anonymous".to_owned(), Identity::to_uri);
            Err(s
                .deny(
                    &actor,
                    None,
                    Denial::new(
                        403,
                        "not_admin",
                        format!("{what} needs an admin certificate"),
                    ),
                )
                .await)
        }
    }
}

async fn audit_read(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    Query(q): Query<api::AuditQuery>,
) -> ApiResult<api::AuditPage> {
    admin_or_deny(&s, &peer, "reading the audit log").await?;
    let limit = if q.limit == 0 { 100 } else { q.limit.min(1000) } as usize;
    let store = s.store.clone();
    let page = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::store::StoreError>((store.audit_page(q.from, limit)?, store.head()?))
    })
    .await
    .map_err(|_| Denial::new(500, "internal", "audit read failed"))?
    .map_err(|e| Denial::new(500, "store", e.to_string()))?;
    Ok(Json(api::AuditPage {
        entries: page.0,
        head_seq: page.1.map(|h| h.0),
    }))
}

async fn audit_verify(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<api::AuditVerifyResponse> {
    let admin = admin_or_deny(&s, &peer, "verifying the audit log").await?;
    let result = s
        .verify_audit()
        .await
        .map_err(|e| Denial::new(500, "store", e))?;
    let detail = format!(
        "audit verified: ok={} entries={}",
        result.ok, result.entries
    );
    s.run(|_| {
        let mut fx = Effects::default();
        fx.audit
            .push(AuditRecord::new(AuditKind::Admin, admin, detail));
        (Ok(()), fx)
    })
    .await?;
    Ok(Json(result))
}

async fn kek_rotate(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<api::KekRotateResponse> {
    let admin = admin_or_deny(&s, &peer, "rotating the KEK").await?;
    let now = now_ms();
    let version = s.run(|c| c.rotate_kek(now, &admin)).await?;
    Ok(Json(api::KekRotateResponse { version }))
}

async fn roster_export(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    Path(meeting): Path<String>,
) -> ApiResult<api::SignedRosterJson> {
    let admin = admin_or_deny(&s, &peer, "exporting a roster").await?;
    let meeting = meeting_id(&meeting)?;
    let now = now_ms();
    let roster = s
        .run(|c| {
            let mut fx = Effects::default();
            let r = c.roster(&meeting, now);
            if r.is_some() {
                fx.audit.push(
                    AuditRecord::new(AuditKind::Admin, admin, "roster exported").meeting(&meeting),
                );
            }
            (
                r.ok_or_else(|| Denial::new(404, "no_such_meeting", "unknown meeting")),
                fx,
            )
        })
        .await?;
    Ok(Json(roster.json()))
}

async fn info(State(s): State<Arc<Shared>>) -> Json<api::InfoResponse> {
    Json(api::InfoResponse {
        signing_public_key: Hex(s.signing.verifying_key().to_bytes().to_vec()),
        api_version: "v1".into(),
        current_kek_version: s.core().keys().current_version(),
    })
}

async fn healthz(State(s): State<Arc<Shared>>) -> StatusCode {
    if s.is_healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn metrics_handler(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    {
        let core = s.core();
        let now = now_ms();
        s.metrics.active_meetings.set(core.active_meetings() as i64);
        s.metrics.live_relays.set(core.live_relays(now) as i64);
    }
    s.metrics.store_bytes.set(s.store.size_bytes() as i64);
    s.metrics.ready.set(i64::from(s.is_healthy()));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// Load shedding and request metrics around every route.
async fn track(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_owned(), |m| m.as_str().to_owned());
    let started = Instant::now();
    let source = req.extensions().get::<Peer>().map(|p| p.1.to_string());
    let failures = || s.failures.lock().unwrap_or_else(|p| p.into_inner());
    let budget = source
        .as_ref()
        .map_or(Ok(()), |ip| failures().has_budget(ip, now_ms()));
    let response = match (budget, s.in_flight.try_acquire()) {
        (Err(ms), _) => ApiError(
            Denial::new(
                429,
                "too_many_failures",
                "too many refused requests from this address",
            ),
            Some(ms),
        )
        .into_response(),
        (Ok(()), Ok(_permit)) => next.run(req).await,
        (Ok(()), Err(_)) => ApiError(
            Denial::new(429, "overloaded", "too many requests in flight"),
            Some(1000),
        )
        .into_response(),
    };
    let mut response = response;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        // The unread body makes the connection unusable: say so, so the
        // client does not send its next request on it.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if matches!(response.status().as_u16(), 401 | 403)
        && let Some(ip) = &source
    {
        let _ = failures().check(ip, now_ms());
    }
    if response.status() == StatusCode::TOO_MANY_REQUESTS
        && let Some(Refused(code)) = response.extensions().get::<Refused>()
    {
        s.metrics.deny(code);
    }
    s.metrics
        .requests
        .get_or_create(&RequestLabels {
            route: route.clone(),
            status: response.status().as_u16(),
        })
        .inc();
    s.metrics
        .request_seconds
        .get_or_create(&RouteLabels { route })
        .observe(started.elapsed().as_secs_f64());
    response
}

fn ops_routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(paths::HEALTHZ, get(healthz))
        .route(paths::READYZ, get(healthz))
        .route(paths::METRICS, get(metrics_handler))
}

pub fn router(s: Arc<Shared>) -> Router {
    Router::new()
        .route(paths::JOIN, post(join))
        .route(paths::EVENTS, get(events))
        .route(paths::LEAVE, post(leave))
        .route(paths::REMOVE, post(remove))
        .route(paths::INVITE, post(invite))
        .route(paths::ASSIGNMENTS, get(assignments))
        .route(paths::INVITATION_OUTCOME, post(invitation_outcome))
        .route(paths::RELAY_REGISTER, post(relay_register))
        .route(paths::RELAY_HEARTBEAT, post(relay_heartbeat))
        .route(paths::RECORDING_KEYS, post(recording_create))
        .route(paths::RECORDING_KEY, post(recording_key))
        .route(paths::AUDIT, get(audit_read))
        .route(paths::AUDIT_VERIFY, post(audit_verify))
        .route(paths::KEK_ROTATE, post(kek_rotate))
        .route(paths::ROSTER_EXPORT, get(roster_export))
        .route(paths::INFO, get(info))
        .merge(ops_routes())
        .layer(middleware::from_fn_with_state(s.clone(), track))
        .layer(DefaultBodyLimit::max(s.config.limits.max_body_bytes))
        .with_state(s)
}

/// What the JWKS files look like now (size, mtime, content hash), to notice changes.
fn jwks_stamp(config: &KmsConfig) -> Vec<Option<[u8; 32]>> {
    config
        .issuers
        .iter()
        .map(|i| {
            std::fs::read(&i.jwks_file)
                .ok()
                .map(|b| Sha256::digest(&b).into())
        })
        .collect()
}

/// Periodic work: rotations, relay liveness wakeups, JWKS reload, audit pruning.
async fn ticker(s: Arc<Shared>) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    let mut seconds = 0u64;
    let mut jwks_seen = jwks_stamp(&s.config);
    loop {
        interval.tick().await;
        seconds += 1;
        let now = now_ms();
        let rx = {
            let mut core = s.core();
            let fx = core.tick(now);
            s.submit(fx)
        };
        let _ = rx.await;
        // Kubernetes updates mounted Secrets by swapping files: reload the
        // issuers' keys whenever any JWKS file changes.
        let stamp = jwks_stamp(&s.config);
        if stamp != jwks_seen {
            match load_verifier(&s.config) {
                Ok(v) => {
                    *s.tokens.write().unwrap_or_else(|p| p.into_inner()) = v;
                    tracing::info!("issuer keys reloaded");
                    jwks_seen = stamp;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "issuer keys not reloaded; keeping the previous ones")
                }
            }
        }
        // Verify the chain a minute after start and hourly, so tampering
        // with the store is noticed (conclave_kms_audit_verify_failures_total)
        // without waiting for an admin to ask.
        if seconds % 3600 == 60 {
            let s = s.clone();
            tokio::spawn(async move {
                match s.verify_audit().await {
                    Ok(r) if r.ok => {
                        tracing::info!(entries = r.entries, "audit chain verified")
                    }
                    Ok(r) => tracing::error!(error = ?r.error, "audit chain is broken"),
                    Err(e) => tracing::error!(error = %e, "audit chain verification failed"),
                }
            });
        }
        if seconds.is_multiple_of(3600) && s.config.audit.retention_days > 0 {
            let before = now.saturating_sub(s.config.audit.retention_days * 86_400_000);
            let store = s.store.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.prune_audit(before)).await
            {
                tracing::warn!(error = %e, "audit pruning failed");
            }
        }
    }
}

/// How long a stopping KMS lets open connections finish the request they
/// are serving. Writes are committed before they are answered, so a request
/// cut off after this is one its client never saw acknowledged; long polls
/// (up to 25 s) are what it cuts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the API until SIGTERM or SIGINT, then stops accepting, reports
/// not ready, lets open connections finish their request (at most
/// [`SHUTDOWN_GRACE`]) and returns.
pub async fn serve(config: KmsConfig) -> anyhow::Result<()> {
    let tls_files = conclave_pki::TlsFiles {
        cert: config.tls.cert_file.clone(),
        key: config.tls.key_file.clone(),
        ca: config.tls.client_ca_file.clone(),
    };
    let mut tls = conclave_pki::tls::server_config(&tls_files, conclave_pki::ClientAuth::Optional)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let (store, core) = tokio::task::block_in_place(|| open_state(&config))?;
    let listener = TcpListener::bind(config.listen).await?;
    let ops = match config.ops_listen {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let shared = Shared::new(config, store, core)?;
    tracing::info!(addr = %listener.local_addr()?, "kms listening (https)");
    if let Some(ops) = ops {
        tracing::info!(addr = %ops.local_addr()?, "kms ops listening (http)");
        let app = ops_routes().with_state(shared.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(ops, app).await {
                tracing::error!(error = %e, "ops listener failed");
            }
        });
    }
    tokio::spawn(ticker(shared.clone()));
    let app = router(shared.clone());
    shared.metrics.ready.set(1);
    let mut connections = tokio::task::JoinSet::new();
    let mut signals = conclave_shutdown::Signals::listen()?;
    loop {
        while connections.try_join_next().is_some() {}
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = signals.recv() => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let shared = shared.clone();
        connections.spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake failed");
                        shared.refused_handshake(remote.ip(), &e).await;
                        return;
                    }
                    Err(_) => return,
                };
            let identity = conclave_pki::peer_identity(tls.get_ref().1.peer_certificates())
                .ok()
                .flatten();
            let svc = app.layer(Extension(Peer(identity, remote.ip())));
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                () = shared.stopped() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
    // Closed now, so new connections are refused at once (their clients try elsewhere) rather
    // than completed by the kernel and left unanswered until the process exits.
    drop(listener);
    shared.metrics.ready.set(0);
    let open = connections.len();
    tracing::info!(
        open,
        "shutdown requested: no new connections, finishing open requests"
    );
    shared.stopping.send_replace(true);
    let cut = conclave_shutdown::join_within(&mut connections, SHUTDOWN_GRACE).await;
    if cut > 0 {
        tracing::info!(
            cut,
            "connections still open after the grace period are closed"
        );
    }
    tracing::info!("kms stopped");
    Ok(())
}
