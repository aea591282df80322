//! One client connection of the Postgres front end: startup (TLS required), SCRAM against the
//! endpoint's verifier, the startup policy, then the session relayed over a QUIC data stream,
//! or a cancel request routed to the session it names.

use super::{database_of, CancelTarget, Front};
use crate::{
    audit::Subject,
    endpoints::{
        credential::CredentialKey,
        front_ends::{FrontEndContext, FrontEndStore, SessionAudit},
        session::{self as shared, DataStream, SessionSlot},
        LiveEndpoint,
    },
    ports::AuditSink,
};
use bytes::{Bytes, BytesMut};
use endpoint_types::{
    api::EndpointState,
    pgwire::{self, sqlstate, CancelKey, FrontendScan, PgError, Startup},
    resource::{CloseReason, EndpointType},
    ApiError, ErrorCode,
};
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// DESIGN: an unauthenticated client has 10 s to finish its handshake (`[limits]
/// handshake_timeout` for the startup and SCRAM; this for cancel requests and refusals).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent logs in to the database while the client waits.
const AGENT_LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
const READ_BUF: usize = 64 * 1024;

type Tls = tokio_rustls::server::TlsStream<TcpStream>;

#[path = "cancel_keys.rs"]
mod cancel_keys;
#[path = "startup_refusal.rs"]
mod startup_refusal;
use cancel_keys::{cancel, mint_key, KeyGuard};
use startup_refusal::refuse_startup;

pub(super) async fn connection(
    ctx: Arc<FrontEndContext>,
    front: Arc<Front>,
    tcp: TcpStream,
    client: SocketAddr,
    permit: crate::admission::Permit,
) {
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::select! {
        r = tokio::time::timeout(ctx.limits.handshake_timeout, handshake(&ctx, &front, tcp, client)) => r,
        _ = ctx.shutdown.cancelled() => return,
    };
    match handshake {
        Ok(Some(Hello::Session(tls, ep, params, buf))) => {
            let ready = tokio::select! {
                r = tokio::time::timeout(ctx.limits.handshake_timeout, authenticate(&ctx, front.end_point.clone(), tls, &ep, params, buf)) => r.ok().flatten(),
                _ = ep.cancel.cancelled() => None,
            };
            // SCRAM is done (or failed): past the unauthenticated part.
            drop(permit);
            match ready {
                Some((tls, auth, Policy::Forward(forward))) => {
                    run(ctx, front, tls, ep, auth, forward, client).await
                }
                Some((tls, _auth, Policy::Refused(params, e))) => {
                    refuse_startup(&ctx, tls, &ep, params, e, client).await
                }
                None => {}
            }
        }
        Ok(Some(Hello::Cancel(key))) => cancel(&ctx, &front, key, client).await,
        Ok(None) => {}
        Err(_) => tracing::debug!(%client, "postgres client did not finish its handshake in time"),
    }
}

enum Hello {
    Session(Box<Tls>, Arc<LiveEndpoint>, Vec<(String, String)>, BytesMut),
    Cancel(CancelKey),
}

async fn read_startup<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> Option<Startup> {
    loop {
        match pgwire::parse_startup(buf) {
            Ok(Some((p, n))) => {
                let _ = buf.split_to(n);
                return Some(p);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "bad postgres startup packet");
                return None;
            }
        }
        if s.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

async fn send_error<S: AsyncWrite + Unpin>(s: &mut S, e: &PgError) {
    let mut b = BytesMut::new();
    e.write(&mut b);
    let _ = s.write_all(&b).await;
    let _ = s.flush().await;
    let _ = s.shutdown().await;
}

/// Up to a TLS session with a StartupMessage, or a cancel request.
async fn handshake(
    ctx: &FrontEndContext,
    front: &Front,
    mut tcp: TcpStream,
    client: SocketAddr,
) -> Option<Hello> {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        match read_startup(&mut tcp, &mut buf).await? {
            Startup::GssEnc => tcp.write_all(b"N").await.ok()?,
            Startup::Cancel(key) => return Some(Hello::Cancel(key)),
            Startup::Params { .. } => {
                let e = PgError::fatal(sqlstate::INVALID_AUTHORIZATION, "this endpoint accepts encrypted connections only")
                    .hint("connect with sslmode=verify-full, as the connection string postern printed does");
                send_error(&mut tcp, &e).await;
                return None;
            }
            Startup::Ssl => {
                // Bytes sent after SSLRequest but before the handshake would be read as if
                // they had come through TLS (CVE-2021-23214): refuse them.
                if !buf.is_empty() {
                    tracing::info!(%client, "postgres client sent plaintext after SSLRequest");
                    return None;
                }
                tcp.write_all(b"S").await.ok()?;
                break;
            }
        }
    }
    let mut tls = front.tls.accept(tcp).await.ok()?;
    let (params, minor) = match read_startup(&mut tls, &mut buf).await? {
        Startup::Params { params, minor } => (params, minor),
        Startup::Cancel(key) => return Some(Hello::Cancel(key)),
        _ => return None,
    };
    let protocol_options: Vec<&str> = params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("_pq_."))
        .collect();
    let mut out = BytesMut::new();
    if minor > 0 || !protocol_options.is_empty() {
        pgwire::negotiate_protocol_version(&mut out, &protocol_options);
    }
    if !out.is_empty() {
        tls.write_all(&out).await.ok()?;
    }
    let user = params
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    match ctx
        .endpoints
        .by_credential(&CredentialKey::of_postgres_user(&user))
    {
        Some(ep) => Some(Hello::Session(Box::new(tls), ep, params, buf)),
        None => {
            let e = no_endpoint(&*ctx.store, &user).await;
            tracing::info!(%client, user = %user, "postgres login refused: {}", e.message);
            send_error(&mut tls, &e).await;
            None
        }
    }
}

/// The error for a user that is no live postgres endpoint: why, when we know.
pub(super) async fn no_endpoint(store: &dyn FrontEndStore, user: &str) -> PgError {
    let hint = "create a new endpoint with `postern ops endpoint create --type postgres`";
    let state = store
        .get_endpoint(user)
        .await
        .ok()
        .flatten()
        .map(|r| (r.state, r.endpoint_type));
    let message = match state {
        Some((EndpointState::Retired, EndpointType::Postgres)) => {
            format!("endpoint \"{user}\" has been retired")
        }
        Some((EndpointState::Expired, EndpointType::Postgres))
        | Some((EndpointState::Active, EndpointType::Postgres)) => {
            format!("endpoint \"{user}\" has expired")
        }
        _ => format!("no active postgres endpoint \"{user}\""),
    };
    PgError::fatal(sqlstate::INVALID_AUTHORIZATION, message).hint(hint)
}

/// Reads one typed message of at most `limit` bytes.
async fn read_message<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<(u8, Bytes), PgError> {
    let violation = |m: String| PgError::fatal(sqlstate::PROTOCOL_VIOLATION, m);
    loop {
        if let Some((tag, _, n)) =
            pgwire::parse_message(buf, limit).map_err(|e| violation(e.to_string()))?
        {
            let msg = buf.split_to(n).freeze();
            return Ok((tag, msg.slice(5..)));
        }
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => {
                return Err(violation(
                    "the connection closed during authentication".into(),
                ))
            }
            Ok(_) => {}
        }
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    b
}

/// What a successful SCRAM exchange leaves to send: SASLFinal (held until the agent is in).
struct Authenticated {
    sasl_final: BytesMut,
    slot: SessionSlot,
    /// The SASL mechanism the client chose (`-PLUS`: bound to our TLS certificate).
    mechanism: &'static str,
}

/// What the startup policy made of an authenticated client's parameters.
enum Policy {
    /// What to pass on to the agent.
    Forward(Vec<(String, String)>),
    /// Refused: the client's parameters and why.
    Refused(Vec<(String, String)>, PgError),
}

/// SCRAM against the endpoint's verifier, then the session limit and the startup policy.
async fn authenticate(
    ctx: &FrontEndContext,
    end_point: Option<Vec<u8>>,
    mut tls: Box<Tls>,
    ep: &Arc<LiveEndpoint>,
    params: Vec<(String, String)>,
    mut buf: BytesMut,
) -> Option<(Box<Tls>, Authenticated, Policy)> {
    // Parsed when the endpoint went live; an endpoint without a usable verifier is not
    // found by its user name at all, so this is only a guard.
    let Some(verifier) = ep.scram_verifier().cloned() else {
        send_error(
            &mut tls,
            &PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "the endpoint has no usable credential",
            ),
        )
        .await;
        return None;
    };
    let mut scram = certs::scram::ScramServer::new(verifier, &random_bytes::<18>(), end_point);
    let wrong = || {
        PgError::fatal(
            sqlstate::INVALID_PASSWORD,
            format!("password authentication failed for user \"{}\"", ep.id),
        )
        .hint("use the connection string postern printed for this endpoint")
    };
    let mut out = BytesMut::new();
    pgwire::auth_sasl(&mut out, scram.mechanisms());
    let exchange = async {
        tls.write_all(&out)
            .await
            .map_err(|e| PgError::fatal(sqlstate::CONNECTION_FAILURE, e.to_string()))?;
        let (tag, body) = read_message(&mut tls, &mut buf, pgwire::MAX_AUTH_MESSAGE_LEN).await?;
        if tag != b'p' {
            return Err(PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "expected a SASL response",
            ));
        }
        let (mechanism, data) = pgwire::parse_sasl_initial(&body)
            .map_err(|e| PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))?;
        let first = scram
            .client_first(mechanism, data)
            .map_err(|e| scram_error(e, &wrong))?;
        let chosen = if mechanism == certs::scram::MECHANISM_PLUS {
            certs::scram::MECHANISM_PLUS
        } else {
            certs::scram::MECHANISM
        };
        out.clear();
        pgwire::auth_sasl_continue(&mut out, first.as_bytes());
        tls.write_all(&out)
            .await
            .map_err(|e| PgError::fatal(sqlstate::CONNECTION_FAILURE, e.to_string()))?;
        let (tag, body) = read_message(&mut tls, &mut buf, pgwire::MAX_AUTH_MESSAGE_LEN).await?;
        if tag != b'p' {
            return Err(PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "expected a SASL response",
            ));
        }
        let last = scram
            .client_final(&body)
            .map_err(|e| scram_error(e, &wrong))?;
        out.clear();
        pgwire::auth_sasl_final(&mut out, last.as_bytes());
        Ok(chosen)
    };
    let mechanism = match exchange.await {
        Ok(m) => m,
        Err(e) => {
            tracing::info!(endpoint = %ep.id, "postgres authentication failed: {}", e.message);
            deny(&*ctx.audit, ep, &e).await;
            send_error(&mut tls, &e).await;
            return None;
        }
    };
    // Authenticated: from here on the client may learn about the endpoint's limits and scope.
    let slot = match SessionSlot::claim(ep, ctx.limits.sessions_per_endpoint) {
        Ok(s) => s,
        Err(e) => {
            let pe = PgError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                "sorry, too many clients already",
            )
            .hint(e.message.clone());
            deny(&*ctx.audit, ep, &pe).await;
            send_error(&mut tls, &pe).await;
            return None;
        }
    };
    let Some(database) = database_of(ctx, ep) else {
        let e = PgError::fatal(
            sqlstate::CONNECTION_FAILURE,
            format!("appliance {} is offline", ep.appliance_id),
        );
        send_error(&mut tls, &e).await;
        return None;
    };
    if !buf.is_empty() {
        // Nothing may follow the last SASL message before the server answers.
        return None;
    }
    let policy = match pgwire::sanitize(&params, &database) {
        Ok(s) => Policy::Forward(s.forward),
        Err(e) => Policy::Refused(params, e),
    };
    Some((
        tls,
        Authenticated {
            sasl_final: out,
            slot,
            mechanism,
        },
        policy,
    ))
}

fn scram_error(e: certs::scram::ScramError, wrong: &dyn Fn() -> PgError) -> PgError {
    match e {
        certs::scram::ScramError::WrongPassword => wrong(),
        other => PgError::fatal(sqlstate::INVALID_AUTHORIZATION, other.to_string()),
    }
}

async fn deny(audit: &dyn AuditSink, ep: &LiveEndpoint, e: &PgError) {
    audit
        .record(
            "denied",
            &ep.operator,
            Subject::endpoint(&ep.appliance_id, &ep.id),
            serde_json::json!({
                "action": "session", "sqlstate": e.sqlstate, "reason": e.message,
            }),
        )
        .await;
}

fn pg_error_of(e: &ApiError) -> PgError {
    let code = match e.code {
        ErrorCode::SessionLimit => sqlstate::TOO_MANY_CONNECTIONS,
        ErrorCode::EndpointExpired
        | ErrorCode::EndpointRetired
        | ErrorCode::OperateAccessExpired
        | ErrorCode::ForbiddenByScope => sqlstate::INVALID_AUTHORIZATION,
        _ => sqlstate::CONNECTION_FAILURE,
    };
    let mut pe = PgError::fatal(code, e.message.clone());
    pe.hint = (!e.hint.is_empty()).then(|| e.hint.clone());
    pe
}

/// The session proper: the agent logs in, then messages are relayed and audited.
async fn run(
    ctx: Arc<FrontEndContext>,
    front: Arc<Front>,
    mut tls: Box<Tls>,
    ep: Arc<LiveEndpoint>,
    auth: Authenticated,
    forward: Vec<(String, String)>,
    client: SocketAddr,
) {
    let session_id = shared::new_session_id();
    let key = mint_key(
        &front,
        CancelTarget {
            endpoint: ep.clone(),
            session_id: session_id.clone(),
        },
    );
    let _key = KeyGuard(&front, key);
    let Authenticated {
        mut sasl_final,
        slot: _slot,
        mechanism,
    } = auth;
    let opened = tokio::select! {
        _ = ep.cancel.cancelled() => return,
        r = tokio::time::timeout(AGENT_LOGIN_TIMEOUT, start_at_agent(&ctx, &ep, &session_id, client, &forward, key)) => {
            r.unwrap_or_else(|_| Err(PgError::fatal(sqlstate::CONNECTION_FAILURE, "the appliance did not answer in time")))
        }
    };
    let (stream, rest) = match opened {
        Ok(s) => s,
        Err(e) => {
            shared::deny(
                &*ctx.audit,
                &ep,
                &session_id,
                client,
                &ApiError::new(ErrorCode::TargetUnreachable, e.message.clone()),
            )
            .await;
            e.write(&mut sasl_final);
            let _ = tls.write_all(&sasl_final).await;
            let _ = tls.shutdown().await;
            return;
        }
    };
    // The client's greeting: our SASLFinal, the agent's AuthenticationOk, our cancel key, then
    // the server's parameters and ReadyForQuery as the agent relayed them.
    let mut greeting = sasl_final;
    pgwire::auth_ok(&mut greeting);
    pgwire::backend_key_data(&mut greeting, key);
    greeting.extend_from_slice(&rest);
    let DataStream {
        mut send,
        mut recv,
        connection,
        ..
    } = stream;
    let trail_watch = match shared::opened(
        &ctx,
        &ep,
        &session_id,
        client,
        serde_json::json!({ "database": database_of(&ctx, &ep), "auth": mechanism }),
    )
    .await
    {
        Ok(watch) => watch,
        Err(e) => {
            shared::cut_stream(&mut send, &mut recv, CloseReason::Error);
            shared::deny(&*ctx.audit, &ep, &session_id, client, &e).await;
            send_error(&mut tls, &pg_error_of(&e)).await;
            return;
        }
    };
    let started = Instant::now();
    let subject = Subject::session(&ep.appliance_id, &ep.id, &session_id);
    let trail = Trail {
        audit: &*ctx.audit,
        actor: Arc::from(ep.operator.as_str()),
        subject: Arc::new(subject),
        watch: trail_watch.clone(),
    };
    let mut counts = Counts::default();
    let outcome = match tls.write_all(&greeting).await {
        Err(e) => Some(Err(PumpError::Client(e))),
        Ok(()) => {
            counts.down = greeting.len() as u64;
            tokio::select! {
                r = pump(&mut tls, &mut send, &mut recv, &trail, &mut counts) => Some(r),
                _ = ep.cancel.cancelled() => None,
                // Statements are pipelined: the batch holding them failed, so the session
                // ends here, before anything more reaches the agent unrecorded.
                _ = trail_watch.cancelled() => Some(Err(PumpError::TrailDown)),
            }
        }
    };
    let reason = match &outcome {
        Some(Err(PumpError::TrailDown)) => CloseReason::Error,
        Some(Ok(())) => CloseReason::Client,
        Some(Err(_)) if counts.client_quit => CloseReason::Client,
        Some(Err(_)) if ep.cancel.is_cancelled() => ep.end_reason(),
        Some(Err(PumpError::QuicRead(e))) => {
            shared::agent_reason_read(e).unwrap_or(if connection.close_reason().is_some() {
                CloseReason::Interrupted
            } else {
                CloseReason::Error
            })
        }
        Some(Err(PumpError::QuicWrite(e))) => {
            shared::agent_reason_write(e).unwrap_or(if connection.close_reason().is_some() {
                CloseReason::Interrupted
            } else {
                CloseReason::Error
            })
        }
        Some(Err(PumpError::Client(_))) => CloseReason::Client,
        Some(Err(PumpError::Protocol(_))) => CloseReason::Error,
        None => ep.end_reason(),
    };
    if !matches!(outcome, Some(Ok(()))) {
        let why = match &outcome {
            Some(Err(e)) => e.to_string(),
            _ => "the endpoint ended".to_string(),
        };
        tracing::info!(session = %session_id, reason = reason.as_str(), %why, "postgres session cut");
        shared::cut_stream(&mut send, &mut recv, reason);
    }
    if let Some(Err(PumpError::Protocol(e))) = &outcome {
        let pe = PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.clone());
        send_error(&mut tls, &pe).await;
    }
    if let Some(Err(e @ PumpError::TrailDown)) = &outcome {
        let pe = PgError::fatal(sqlstate::ADMIN_SHUTDOWN, e.to_string());
        send_error(&mut tls, &pe).await;
    }
    let _ = tls.shutdown().await;
    drop(tls);
    // The session's statements are in the vendor trail before its end is.
    // If the trail is down they are held by its writer, and this record queues behind them.
    let _ = ctx.audit.flush().await;
    let mut extra = serde_json::json!({ "statements": counts.statements });
    if let Some(Err(e)) = &outcome {
        extra["error"] = serde_json::Value::String(e.to_string());
    }
    shared::closed(
        &*ctx.audit,
        &ep,
        &session_id,
        reason,
        (counts.up, counts.down),
        started,
        extra,
    )
    .await;
}

/// Opens the data stream, hands the agent the sanitised startup parameters and our cancel
/// key, and waits for its AuthenticationOk. Returns the stream and what followed it.
async fn start_at_agent(
    ctx: &FrontEndContext,
    ep: &LiveEndpoint,
    session_id: &str,
    client: SocketAddr,
    forward: &[(String, String)],
    key: CancelKey,
) -> Result<(DataStream, Bytes), PgError> {
    let mut stream = shared::open_stream(ctx, ep, session_id, client)
        .await
        .map_err(|e| pg_error_of(&e))?;
    let mut params = forward.to_vec();
    params.push((pgwire::CANCEL_KEY_PARAM.to_string(), key.to_param()));
    let mut out = BytesMut::new();
    pgwire::startup_message(&mut out, &params);
    let lost = |e: &dyn std::fmt::Display| {
        PgError::fatal(
            sqlstate::CONNECTION_FAILURE,
            format!("the appliance connection failed: {e}"),
        )
    };
    stream.send.write_all(&out).await.map_err(|e| lost(&e))?;
    let mut buf = BytesMut::from(&stream.leftover[..]);
    loop {
        match pgwire::parse_message(&buf, pgwire::MAX_AUTH_MESSAGE_LEN).map_err(|e| lost(&e))? {
            Some((b'R', body, n)) if body == [0, 0, 0, 0] => {
                let _ = buf.split_to(n);
                return Ok((stream, buf.freeze()));
            }
            // The database's own refusal, as it wrote it.
            Some((b'E', body, _)) => {
                let (code, message) = pgwire::error_fields(body);
                let mut e = PgError::fatal(sqlstate::CONNECTION_FAILURE, message);
                e.sqlstate = known_sqlstate(&code);
                return Err(e);
            }
            Some(_) => return Err(lost(&"unexpected message from the appliance")),
            None => {}
        }
        match stream.recv.read_chunk(READ_BUF, true).await {
            Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
            Ok(None) => return Err(lost(&"the appliance closed the session")),
            Err(e) => return Err(lost(&e)),
        }
    }
}

/// `PgError` holds a static SQLSTATE; the ones a server refuses a login with map to ours.
fn known_sqlstate(code: &str) -> &'static str {
    [
        sqlstate::TOO_MANY_CONNECTIONS,
        sqlstate::INVALID_PASSWORD,
        sqlstate::INVALID_AUTHORIZATION,
        sqlstate::INSUFFICIENT_PRIVILEGE,
        sqlstate::ADMIN_SHUTDOWN,
        sqlstate::FEATURE_NOT_SUPPORTED,
        sqlstate::PROTOCOL_VIOLATION,
        "3D000",
        "57P03",
    ]
    .into_iter()
    .find(|c| *c == code)
    .unwrap_or(sqlstate::CONNECTION_FAILURE)
}

/// Where a session's statements go: the vendor trail's queue, written in batches with other
/// sessions' statements, so the message path never waits for a store commit.
struct Trail<'a> {
    audit: &'a dyn SessionAudit,
    actor: Arc<str>,
    subject: Arc<Subject>,
    /// Cancelled when a batch of the vendor trail fails.
    watch: tokio_util::sync::CancellationToken,
}

impl Trail<'_> {
    /// Queues the statement's record; refuses (and the session is cut) once the trail is
    /// down, so nothing more is forwarded after a failed batch.
    async fn statement(&self, detail: Box<serde_json::value::RawValue>) -> Result<(), PumpError> {
        if self.watch.is_cancelled() {
            return Err(PumpError::TrailDown);
        }
        self.audit
            .enqueue(
                "sql.statement",
                self.actor.clone(),
                self.subject.clone(),
                detail,
            )
            .await;
        Ok(())
    }
}

#[derive(Default)]
struct Counts {
    up: u64,
    down: u64,
    statements: u64,
    client_quit: bool,
}

#[derive(Debug, thiserror::Error)]
enum PumpError {
    #[error("client connection: {0}")]
    Client(std::io::Error),
    #[error("tunnel read: {0}")]
    QuicRead(quinn::ReadError),
    #[error("tunnel write: {0}")]
    QuicWrite(quinn::WriteError),
    #[error("{0}")]
    Protocol(String),
    #[error("the vendor audit trail cannot be written")]
    TrailDown,
}

/// Relays both ways until both directions are done. Client bytes are forwarded as soon as
/// they are whole messages for the audit (or any bytes of other messages), without copies;
/// the agent's chunks are gathered into one TLS write.
async fn pump(
    tls: &mut Tls,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    trail: &Trail<'_>,
    counts: &mut Counts,
) -> Result<(), PumpError> {
    let (mut tls_r, mut tls_w) = tokio::io::split(tls);
    let (mut up, mut statements, mut client_quit) = (0u64, 0u64, false);
    let mut down = 0u64;
    let client_to_agent = async {
        let mut scan = FrontendScan::new(pgwire::MAX_AUDITED_MESSAGE_LEN);
        let mut buf = BytesMut::with_capacity(READ_BUF);
        loop {
            if buf.capacity() - buf.len() < READ_BUF / 8 {
                buf.reserve(READ_BUF);
            }
            let n = tls_r.read_buf(&mut buf).await.map_err(PumpError::Client)?;
            if n == 0 {
                let _ = send.finish();
                return Ok::<(), PumpError>(());
            }
            up += n as u64;
            let mut seen = Vec::new();
            let ready = scan
                .scan(&buf, &mut seen)
                .map_err(|e| PumpError::Protocol(e.to_string()))?;
            for f in seen {
                match f.audit_detail_json() {
                    Some(detail) => {
                        statements += 1;
                        trail.statement(detail).await?;
                    }
                    None => client_quit = true,
                }
            }
            if ready > 0 {
                send.write_chunk(buf.split_to(ready).freeze())
                    .await
                    .map_err(PumpError::QuicWrite)?;
            }
        }
    };
    let agent_to_client = async {
        let mut chunks: [Bytes; 32] = Default::default();
        let mut gather = Vec::with_capacity(READ_BUF);
        while let Some(n) = recv
            .read_chunks(&mut chunks)
            .await
            .map_err(PumpError::QuicRead)?
        {
            let got = chunks.get(..n).unwrap_or_default();
            if let [one] = got {
                tls_w.write_all(one).await.map_err(PumpError::Client)?;
                down += one.len() as u64;
            } else {
                gather.clear();
                for c in got {
                    gather.extend_from_slice(c);
                }
                tls_w.write_all(&gather).await.map_err(PumpError::Client)?;
                down += gather.len() as u64;
            }
            tls_w.flush().await.map_err(PumpError::Client)?;
        }
        tls_w.shutdown().await.map_err(PumpError::Client)?;
        Ok::<(), PumpError>(())
    };
    let r = tokio::try_join!(client_to_agent, agent_to_client).map(|_| ());
    counts.up += up;
    counts.down += down;
    counts.statements += statements;
    counts.client_quit = client_quit;
    r
}
