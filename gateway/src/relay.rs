//! The QUIC relay agents dial out to: enrollment (ALPN `postern-enroll/1`, no client
//! certificate yet) and tunnels (ALPN `postern/1`, mutual TLS).

use crate::{
    agents::{AgentLink, AgentRegistry},
    audit::{AuditLog, Subject},
    config::Limits,
    delivery::{Delivery, DeliveryError},
    endpoints::{front_ends::FrontEndContext, Endpoints},
    framed::{write_frame, write_frame_within, FramedError, FramedRecv},
    grants::Grants,
    head_pacing::HeadPacer,
    identity,
    ops::Ops,
    store::Store,
};
use certs::{Ca, Issued};
use endpoint_types::{
    api::EnrollResponse,
    frame::{
        Enrollment, EnrollmentAnswer, Handshake, HandshakeAnswer, HelloAck, SentByGateway, ToAgent,
        ToGateway, MAX_FRAME_LEN,
    },
    token::EnrollmentToken,
    trail_head::SignedHead,
    ApiError, ErrorCode, ALPN_ENROLL, ALPN_TUNNEL, PROTOCOL_VERSION,
};
use jiff::Timestamp;
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::sync::{mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// QUIC application close codes the gateway uses.
pub mod close {
    pub const NORMAL: u32 = 0;
    pub const PROTOCOL: u32 = 1;
    pub const UNKNOWN_CERTIFICATE: u32 = 2;
    pub const REVOKED: u32 = 3;
    pub const DUPLICATE: u32 = 4;
    pub const LOST: u32 = 5;
    pub const RESYNC: u32 = crate::agents::RESYNC_CLOSE;
}

const ENROLL_FRAME_MAX: usize = 64 * 1024;

/// What the relay reaches: the services agents report to, the store for identities and
/// presence, the CA, and the front ends (for reports about their sessions). Built by `server.rs`.
#[derive(Debug)]
pub struct Relay {
    pub store: Store,
    pub audit: Arc<AuditLog>,
    pub ca: Arc<Ca>,
    pub agents: Arc<AgentRegistry>,
    pub grants: Arc<Grants>,
    pub endpoint_service: Arc<Endpoints>,
    pub ops: Arc<Ops>,
    pub front: Arc<FrontEndContext>,
    pub limits: Limits,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// The gateway audit key's public half, for agents to pin.
    pub audit_key: String,
    /// Caps the unauthenticated connections the relay holds (`crate::admission`).
    pub door: Arc<crate::admission::Door>,
    /// Failed enrollments and certificate-less attempts, aggregated (`crate::denied_aggregate`).
    pub denied: Arc<crate::denied_aggregate::DeniedTrail>,
    /// The vendor trail's latest signed head, sent to every connected agent (paced,
    /// `crate::head_pacing`).
    pub gateway_heads: tokio::sync::watch::Receiver<Option<SignedHead>>,
    /// Steady-state snapshots on their way to the store (crate::steady_state_snapshots).
    pub snapshots: Arc<crate::steady_state_snapshots::SnapshotQueue>,
    /// Presence and customer-trail positions on their way to the store (crate::agent_rounds).
    pub rounds: Arc<crate::agent_rounds::AgentRounds>,
}

pub fn transport_config(lost_after: Duration, keep_alive: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(lost_after).ok());
    t.keep_alive_interval(Some(keep_alive));
    // Bulk sessions need windows well above the bandwidth-delay product of a fast path.
    t.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    t.send_window(64 * 1024 * 1024);
    // Agents open one stream (control or enrollment); the data streams are the gateway's. quinn
    // reserves state per allowed stream, so a large limit here costs ~300 KiB per idle agent.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(8));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

/// `reset_key` must survive restarts: a restarted gateway then answers packets of connections
/// it no longer knows with a stateless reset the agent recognises, and the agent reconnects at
/// once instead of waiting out its idle timeout.
pub fn bind(
    gw: &Arc<Relay>,
    server: &Issued,
    addr: SocketAddr,
    reset_key: &[u8],
) -> anyhow::Result<quinn::Endpoint> {
    let tls = certs::server_config(
        &server.cert_pem,
        &server.key_pem,
        Some(gw.ca.cert_pem()),
        certs::ClientAuth::Optional,
        vec![ALPN_TUNNEL.to_vec(), ALPN_ENROLL.to_vec()],
    )?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = transport_config(gw.limits.agent_lost_after, gw.limits.heartbeat_interval);
    crate::relay_windows::start_unauthenticated(&mut transport);
    cfg.transport_config(Arc::new(transport));
    let socket = std::net::UdpSocket::bind(addr)?;
    widen_receive_buffer(&socket);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset_key,
    )));
    // Connection ids carry a keyed check that must also survive a restart, or the new process
    // drops the old connection's packets as invalid instead of answering with a reset.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&ring::digest::digest(&ring::digest::SHA256, reset_key).as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // After a restart every agent needs its reset at once; quinn's default of one reset per
    // 20 ms would bring 1000 agents back over 20 s. Resets are always smaller than the packet
    // that triggers them, so this cannot amplify.
    endpoint_config.min_reset_interval(Duration::ZERO);
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(cfg),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok(endpoint)
}

/// What the tunnel socket asks the kernel to buffer: a restarted gateway gets every agent's
/// Initial at once, and with the kernel's default (~208 KiB) thousands were dropped per
/// restart in scale_bench; a dropped Initial costs its agent QUIC's retransmit timer and, when
/// several go, its whole 5 s dial. The kernel caps the size at `net.core.rmem_max`.
const TUNNEL_RECEIVE_BUFFER: usize = 8 << 20;

fn widen_receive_buffer(socket: &std::net::UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    if let Err(e) = sock.set_recv_buffer_size(TUNNEL_RECEIVE_BUFFER) {
        tracing::warn!(error = %e, "cannot widen the tunnel socket's receive buffer");
    }
    match sock.recv_buffer_size() {
        // Linux reports twice what it grants (its bookkeeping share), so this speaks up when
        // less than half was granted: the default cap of ~208 KiB, not a tuned host.
        Ok(n) if n < TUNNEL_RECEIVE_BUFFER => tracing::info!(
            bytes = n,
            wanted = TUNNEL_RECEIVE_BUFFER,
            "the tunnel socket's receive buffer is capped by net.core.rmem_max; raise it for large fleets"
        ),
        _ => {}
    }
}

pub async fn serve(gw: Arc<Relay>, endpoint: quinn::Endpoint) {
    loop {
        let incoming = tokio::select! {
            _ = gw.shutdown.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        let Some((incoming, permit)) = crate::admission::admit_quic(&gw.door, incoming) else {
            continue;
        };
        let gw2 = gw.clone();
        gw.tasks.spawn(async move {
            let remote = incoming.remote_address();
            match tokio::time::timeout(gw2.limits.handshake_timeout, incoming).await {
                Ok(Ok(conn)) => handle_connection(gw2, conn, permit).await,
                Ok(Err(e)) => tracing::info!(%remote, error = %e, "relay handshake failed"),
                Err(_) => tracing::info!(%remote, "relay handshake timed out"),
            }
        });
    }
}

fn alpn_of(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The DER certificate the agent presented on this connection.
fn peer_leaf(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| c.to_vec())
}

/// The DER of the client certificate the connection was authenticated with.
fn peer_leaf_der(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| c.to_vec())
}

/// `permit` is the connection's unauthenticated slot: held through an enrollment, given up by
/// a tunnel once its certificate maps to an appliance.
async fn handle_connection(
    gw: Arc<Relay>,
    conn: quinn::Connection,
    permit: crate::admission::Permit,
) {
    match alpn_of(&conn).as_deref() {
        Some(p) if p == ALPN_ENROLL => handle_enroll(gw, conn).await,
        Some(p) if p == ALPN_TUNNEL => handle_agent(gw, conn, permit).await,
        _ => conn.close(close::PROTOCOL.into(), b"unsupported ALPN"),
    }
}

fn close_with(conn: &quinn::Connection, code: u32, err: &ApiError) {
    let reason = format!("{}: {}", err.code, err.message);
    conn.close(code.into(), reason.as_bytes());
}

/// Sends an `Error` frame (of the type the stream is at) and finishes the stream, giving the
/// peer a moment to read it before the connection closes, so it can show the structured error
/// rather than a bare close.
async fn send_error<F: SentByGateway>(send: &mut quinn::SendStream, error: &F) {
    if write_frame(send, error).await.is_ok() {
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    }
}

async fn handle_enroll(gw: Arc<Relay>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let Ok(Ok((mut send, recv))) =
        tokio::time::timeout(gw.limits.handshake_timeout, conn.accept_bi()).await
    else {
        conn.close(close::PROTOCOL.into(), b"no enrollment request");
        return;
    };
    let mut framed = FramedRecv::<Enrollment>::new(recv, ENROLL_FRAME_MAX);
    let answer = match framed.next_within(gw.limits.handshake_timeout).await {
        Ok(Some(Enrollment::EnrollRequest(req))) => match enroll(&gw, &req, remote).await {
            Ok(resp) => EnrollmentAnswer::EnrollResponse(resp),
            Err(e) => {
                gw.denied.note(remote.ip(), "enroll", &e);
                EnrollmentAnswer::Error(e)
            }
        },
        Ok(None) => EnrollmentAnswer::Error(ApiError::new(
            ErrorCode::MalformedFrame,
            "the stream ended before a request",
        )),
        Err(FramedError::Frame(e)) => {
            tracing::info!(%remote, error = %e, "refused a malformed enrollment frame");
            EnrollmentAnswer::Error(e.to_api_error())
        }
        Err(e) => {
            tracing::info!(%remote, error = %e, "enrollment stream failed");
            conn.close(close::PROTOCOL.into(), b"enrollment stream failed");
            return;
        }
    };
    if write_frame(&mut send, &answer).await.is_ok() {
        let _ = send.finish();
        // Let the answer arrive before the connection goes away.
        let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
    }
    conn.close(close::NORMAL.into(), b"enrollment done");
}

fn token_error(code: ErrorCode, message: &str) -> ApiError {
    ApiError::new(code, message.to_string())
        .hint("ask the vendor for a new token: `postern appliance add --app A --customer C` prints one (valid 1 h, single use)")
}

async fn enroll(
    gw: &Relay,
    req: &endpoint_types::api::EnrollRequest,
    remote: SocketAddr,
) -> Result<EnrollResponse, ApiError> {
    let internal = |e: crate::store::StoreError| ApiError::internal(e.to_string());
    let token = EnrollmentToken::parse(req.token.expose())
        .map_err(|e| token_error(ErrorCode::EnrollmentTokenInvalid, &e.to_string()))?;
    if token.ca != gw.ca.fingerprint() {
        return Err(token_error(
            ErrorCode::EnrollmentTokenInvalid,
            "this enrollment token was issued by a different gateway",
        ));
    }
    let row = gw
        .store
        .get_enrollment_token(&token.id)
        .await
        .map_err(internal)?
        .filter(|row| identity::secret_matches(&token.secret, &row.secret_hash))
        .ok_or_else(|| {
            token_error(
                ErrorCode::EnrollmentTokenInvalid,
                "this enrollment token is not known to the gateway",
            )
        })?;
    let now = Timestamp::now();
    if row.used {
        return Err(token_error(
            ErrorCode::EnrollmentTokenUsed,
            "this enrollment token has already been used",
        ));
    }
    if row.expires_at <= now {
        return Err(token_error(
            ErrorCode::EnrollmentTokenExpired,
            &format!("this enrollment token expired at {}", row.expires_at),
        ));
    }
    let appliance = gw
        .store
        .get_appliance(&row.appliance_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| ApiError::internal("enrollment token without appliance"))?;
    if appliance.revoked_at.is_some() {
        return Err(ApiError::new(
            ErrorCode::ApplianceRevoked,
            format!("appliance {} has been revoked", appliance.id),
        ));
    }
    // Sign before consuming, so a bad CSR does not burn the token.
    let cert_pem = gw
        .ca
        .sign_agent_csr(
            &req.csr_pem,
            &appliance.id,
            now,
            gw.limits.agent_cert_lifetime,
        )
        .map_err(|e| {
            ApiError::invalid(format!("the certificate signing request was refused: {e}"))
        })?;
    if !gw
        .store
        .consume_enrollment_token(&row.id, now)
        .await
        .map_err(internal)?
    {
        return Err(token_error(
            ErrorCode::EnrollmentTokenUsed,
            "this enrollment token has already been used",
        ));
    }
    let fp = certs::fingerprint_pem(&cert_pem).map_err(|e| ApiError::internal(e.to_string()))?;
    gw.store
        .set_enrolled(&appliance.id, &fp, now)
        .await
        .map_err(internal)?;
    // Kept so that what this appliance signs (teardown proofs) can be checked later.
    if let Err(e) = gw
        .store
        .keep_appliance_cert(&appliance.id, &fp, &cert_pem, now)
        .await
    {
        tracing::warn!(appliance = %appliance.id, error = %e, "could not keep the appliance certificate; it is kept with its first teardown proof");
    }
    crate::cert_renewal::enrolled(&gw.store, &appliance.id, &cert_pem).await;
    gw.audit
        .record(
            "appliance.enrolled",
            &format!("agent:{}", appliance.id),
            Subject::appliance(&appliance.id),
            serde_json::json!({"remote": remote.to_string(), "agent_version": req.agent_version, "cert_fingerprint": fp}),
        )
        .await;
    tracing::info!(appliance = %appliance.id, %remote, "appliance enrolled");
    Ok(EnrollResponse {
        appliance_id: appliance.id,
        app: appliance.app,
        customer: appliance.customer,
        cert_pem,
        ca_pem: gw.ca.cert_pem().to_string(),
        audit_key: Some(gw.audit_key.clone()),
    })
}

async fn refuse_agent(
    gw: &Relay,
    conn: &quinn::Connection,
    code: u32,
    err: ApiError,
    appliance_id: Option<&str>,
) {
    tracing::info!(remote = %conn.remote_address(), code = %err.code, "refused agent connection: {}", err.message);
    let subject = appliance_id.map(Subject::appliance).unwrap_or_default();
    let kind = if err.code == ErrorCode::DuplicateConnection {
        "agent.duplicate"
    } else {
        "denied"
    };
    gw.audit
        .record(
            kind,
            &format!("agent@{}", conn.remote_address()),
            subject,
            serde_json::json!({
                "action": "connect", "code": err.code, "reason": err.message,
            }),
        )
        .await;
    close_with(conn, code, &err);
}

async fn handle_agent(gw: Arc<Relay>, conn: quinn::Connection, permit: crate::admission::Permit) {
    let Some(peer_der) = peer_leaf(&conn) else {
        let e = ApiError::new(ErrorCode::Unauthenticated, "a client certificate is required on postern/1")
            .hint("enroll the agent first: postern-agent enroll --gateway HOST:PORT --token T --config FILE");
        gw.denied.note(conn.remote_address().ip(), "connect", &e);
        return close_with(&conn, close::UNKNOWN_CERTIFICATE, &e);
    };
    // The current certificate, or a renewed one at its first use (crate::cert_renewal).
    let appliance = match crate::cert_renewal::appliance_for_cert(&gw.store, &peer_der).await {
        Ok(Some(a)) => a,
        Ok(None) => {
            let (e, appliance) = crate::cert_renewal::unknown_cert(&gw.store, &peer_der).await;
            return refuse_agent(
                &gw,
                &conn,
                close::UNKNOWN_CERTIFICATE,
                e,
                appliance.as_deref(),
            )
            .await;
        }
        Err(e) => {
            tracing::error!(error = %e, "store lookup failed");
            conn.close(close::PROTOCOL.into(), b"INTERNAL");
            return;
        }
    };
    if appliance.revoked_at.is_some() {
        let e = ApiError::new(
            ErrorCode::ApplianceRevoked,
            format!("appliance {} has been revoked", appliance.id),
        );
        return refuse_agent(&gw, &conn, close::REVOKED, e, Some(&appliance.id)).await;
    }
    crate::relay_windows::open_for_appliance(&conn);
    drop(permit);

    let limit = gw.limits.handshake_timeout;
    let Ok(Ok((mut send, recv))) = tokio::time::timeout(limit, conn.accept_bi()).await else {
        conn.close(close::PROTOCOL.into(), b"no control stream");
        return;
    };
    let mut framed = FramedRecv::<Handshake>::new(recv, MAX_FRAME_LEN);
    let hello = match framed.next_within(limit).await {
        Ok(Some(Handshake::Hello(h))) if h.protocol_version == PROTOCOL_VERSION => h,
        Ok(Some(Handshake::Hello(h))) => {
            let e = ApiError::new(
                ErrorCode::ProtocolVersion,
                format!(
                    "agent speaks protocol {}, this gateway speaks {PROTOCOL_VERSION}",
                    h.protocol_version
                ),
            )
            .hint("upgrade the agent or the gateway so both speak the same version");
            send_error(&mut send, &HandshakeAnswer::Error(e.clone())).await;
            return refuse_agent(&gw, &conn, close::PROTOCOL, e, Some(&appliance.id)).await;
        }
        Ok(None) => {
            let e = ApiError::new(
                ErrorCode::MalformedFrame,
                "the first frame on the control stream must be a hello",
            );
            send_error(&mut send, &HandshakeAnswer::Error(e.clone())).await;
            return refuse_agent(&gw, &conn, close::PROTOCOL, e, Some(&appliance.id)).await;
        }
        Err(err) => {
            let e = match &err {
                FramedError::Frame(f) => f.to_api_error(),
                other => ApiError::new(ErrorCode::MalformedFrame, other.to_string()),
            };
            send_error(&mut send, &HandshakeAnswer::Error(e.clone())).await;
            return refuse_agent(&gw, &conn, close::PROTOCOL, e, Some(&appliance.id)).await;
        }
    };

    let (tx, rx) = mpsc::channel(256);
    let link = AgentLink {
        appliance_id: appliance.id.clone(),
        connection: conn.clone(),
        control: tx,
        agent_version: hello.agent_version.clone(),
        resources: hello.resources.clone(),
        policy: hello.policy.clone(),
        connected_at: Timestamp::now(),
        grant_sync: Default::default(),
    };
    if gw.agents.try_register(link).is_err() {
        let e = ApiError::new(
            ErrorCode::DuplicateConnection,
            format!("appliance {} is already connected; a second connection with its certificate is refused", appliance.id),
        )
        .hint("if the agent was restarted, the old connection is dropped within the heartbeat timeout; retry then");
        send_error(&mut send, &HandshakeAnswer::Error(e.clone())).await;
        return refuse_agent(&gw, &conn, close::DUPLICATE, e, Some(&appliance.id)).await;
    }

    let resources_json = serde_json::to_string(&hello.resources).unwrap_or_else(|_| "[]".into());
    let policy_json = serde_json::to_string(&hello.policy).ok();
    if let Err(e) = gw
        .store
        .set_presence(
            &appliance.id,
            Timestamp::now(),
            Some(&hello.agent_version),
            Some(&resources_json),
            policy_json.as_deref(),
        )
        .await
    {
        tracing::error!(error = %e, "could not record presence");
    }
    gw.audit
        .record(
            "agent.connected",
            &format!("agent:{}", appliance.id),
            Subject::appliance(&appliance.id),
            serde_json::json!({
                "remote": conn.remote_address().to_string(),
                "agent_version": hello.agent_version,
                "resources": hello.resources,
                "policy": hello.policy,
            }),
        )
        .await;
    tracing::info!(appliance = %appliance.id, remote = %conn.remote_address(), version = %hello.agent_version, "agent connected");

    let ack = HandshakeAnswer::HelloAck(HelloAck {
        appliance_id: appliance.id.clone(),
        app: appliance.app.clone(),
        customer: appliance.customer.clone(),
        heartbeat_interval_ms: gw.limits.heartbeat_interval.as_millis() as u64,
        lost_after_ms: gw.limits.agent_lost_after.as_millis() as u64,
        audit_key: Some(gw.audit_key.clone()),
        approval_refusals: true,
        cert_renewal: true,
    });
    let reason = match write_frame(&mut send, &ack).await {
        Ok(()) => {
            // Grants first: the agent checks every endpoint against them.
            // Full state first, as commands 1 and 2 (crate::delivery); deltas queued meanwhile
            // follow it.
            let mut delivery = Delivery::default();
            let deadline = tokio::time::Instant::now() + gw.limits.agent_lost_after;
            let live = gw.grants.live_grants(&appliance.id).await;
            let endpoints = gw.endpoint_service.grants_for(&appliance.id).await;
            let grant_sync = delivery.outgoing(ToAgent::GrantSync { grants: live }, deadline);
            let endpoint_sync = delivery.outgoing(ToAgent::EndpointSync { endpoints }, deadline);
            match write_frame(&mut send, &grant_sync).await {
                Ok(()) => match write_frame(&mut send, &endpoint_sync).await {
                    Ok(()) => {
                        // Approved ops that waited for the appliance go out after the hello.
                        let (gw2, id) = (gw.clone(), appliance.id.clone());
                        gw.tasks
                            .spawn(async move { gw2.ops.dispatch_pending(&id).await });
                        let trail = start_customer_trail(&gw, &appliance.id, hello.trail_number);
                        let control = Control {
                            send,
                            framed: framed.switch_to(),
                            outgoing: rx,
                            delivery,
                            trail_reports: trail.as_ref().map(|(reports, _)| reports.clone()),
                            trail_heads: hello.trail_heads,
                            steady_state: hello.steady_state,
                        };
                        let ended = control_loop(&gw, &conn, &appliance.id, control).await;
                        if let Some((_, stop)) = trail {
                            stop.cancel();
                        }
                        ended
                    }
                    Err(e) => format!("control stream failed: {e}"),
                },
                Err(e) => format!("control stream failed: {e}"),
            }
        }
        Err(e) => format!("control stream failed: {e}"),
    };

    // Whatever ended the control loop (a write that timed out included), the connection goes
    // with it: the agent reconnects and is resynchronised rather than half-connected.
    if conn.close_reason().is_none() {
        conn.close(close::LOST.into(), reason.as_bytes());
    }
    gw.agents.unregister(&appliance.id, &conn);
    gw.ops.interrupted(&appliance.id).await;
    let _ = gw
        .store
        .set_presence(&appliance.id, Timestamp::now(), None, None, None)
        .await;
    gw.audit
        .record(
            "agent.disconnected",
            &format!("agent:{}", appliance.id),
            Subject::appliance(&appliance.id),
            serde_json::json!({
                "reason": reason,
            }),
        )
        .await;
    tracing::info!(appliance = %appliance.id, %reason, "agent disconnected");
}

/// One connection's control stream: both directions, the queue of frames to send, and the
/// delivery state of the commands among them.
struct Control {
    send: quinn::SendStream,
    framed: FramedRecv<ToGateway>,
    outgoing: mpsc::Receiver<ToAgent>,
    delivery: Delivery<tokio::time::Instant>,
    /// The agent takes the gateway's signed heads (crate::audit_heads).
    trail_heads: bool,
    /// The agent's `TrailRecorded` numbers, for this connection's customer-trail sender.
    trail_reports: Option<watch::Sender<u64>>,
    /// The agent takes `SteadyState` and sends snapshots (crate::steady_state_snapshots).
    steady_state: bool,
}

/// Starts the connection's customer-trail sender (`crate::customer_trail`) for an agent that
/// keeps those records (its hello says how far its trail is); older agents get none.
fn start_customer_trail(
    gw: &Relay,
    appliance_id: &str,
    trail_number: Option<u64>,
) -> Option<(watch::Sender<u64>, CancellationToken)> {
    let number = trail_number?;
    let (reports, watched) = watch::channel(number);
    let stop = gw.shutdown.child_token();
    let agents: Arc<dyn crate::ports::AgentPort> = gw.agents.clone();
    gw.tasks.spawn(crate::customer_trail::deliver(
        gw.store.clone(),
        agents,
        gw.rounds.clone(),
        appliance_id.to_string(),
        watched,
        stop.clone(),
    ));
    Some((reports, stop))
}

async fn control_loop(
    gw: &Relay,
    conn: &quinn::Connection,
    appliance_id: &str,
    control: Control,
) -> String {
    let Control {
        mut send,
        mut framed,
        mut outgoing,
        mut delivery,
        trail_reports,
        trail_heads,
        steady_state,
    } = control;
    let mut heartbeat = tokio::time::interval(gw.limits.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rx = tokio::time::Instant::now();
    let mut seq = 0u64;
    let peer_cert = peer_leaf_der(conn);
    // The vendor trail's latest signed head goes to the agent now, and then as it changes, at
    // most once per interval (crate::head_pacing).
    let mut heads = gw.gateway_heads.clone();
    let mut pacer = HeadPacer::new(gw.limits.trail_head_interval);
    let latest = heads.borrow_and_update().clone().filter(|_| trail_heads);
    if let Some(head) = latest {
        if let Err(e) = write_frame_within(
            &mut send,
            &ToAgent::TrailHead(head),
            gw.limits.agent_lost_after,
        )
        .await
        {
            return format!("control stream failed: {e}");
        }
        pacer.sent(tokio::time::Instant::now());
    }
    // Whether to collect, as a command: the customer approver's switch (on by default).
    if steady_state {
        let enabled = gw
            .store
            .steady_state(appliance_id)
            .await
            .ok()
            .flatten()
            .unwrap_or(true);
        let deadline = tokio::time::Instant::now() + gw.limits.agent_lost_after;
        let frame = delivery.outgoing(ToAgent::SteadyState { enabled }, deadline);
        if let Err(e) = write_frame_within(&mut send, &frame, gw.limits.agent_lost_after).await {
            return format!("control stream failed: {e}");
        }
    }
    loop {
        let head_at = pacer.next_at(tokio::time::Instant::now());
        tokio::select! {
            _ = gw.shutdown.cancelled() => {
                conn.close(close::NORMAL.into(), b"gateway shutting down");
                return "gateway shutting down".into();
            }
            err = conn.closed() => return format!("connection closed: {err}"),
            frame = framed.next() => {
                last_rx = tokio::time::Instant::now();
                match frame {
                    Ok(Some(ToGateway::Heartbeat { seq })) => {
                        if let Err(e) = write_frame_within(&mut send, &ToAgent::HeartbeatAck { seq }, gw.limits.agent_lost_after).await {
                            return format!("control stream failed: {e}");
                        }
                        // Off the frame path: a slow store must not delay the lost-heartbeat
                        // check; written with every other agent's in the next round.
                        gw.rounds.seen(appliance_id, Timestamp::now());
                    }
                    Ok(Some(ToGateway::HeartbeatAck { .. })) => {}
                    Ok(Some(ToGateway::CommandAck { seq })) => {
                        if let Err(e) = delivery.acked(seq) {
                            return resync(conn, &e);
                        }
                    }
                    Ok(Some(ToGateway::Error(e))) => tracing::warn!(appliance = %appliance_id, "agent reported: {e}"),
                    Ok(Some(ToGateway::TrailRecorded { number })) => {
                        if let Some(reports) = &trail_reports {
                            reports.send_replace(number);
                        }
                    }
                    Ok(Some(f @ (ToGateway::OpStarted { .. } | ToGateway::OpOutput { .. } | ToGateway::OpFinished(_) | ToGateway::OpRefused { .. }))) => {
                        gw.ops.on_agent_frame(appliance_id, f).await;
                    }
                    Ok(Some(ToGateway::OpRecord { op_id, kind, detail })) => {
                        crate::endpoints::kube::on_op_record(&gw.front, appliance_id, &op_id, &kind, detail).await;
                    }
                    Ok(Some(ToGateway::TrailHead(head))) => {
                        crate::audit_heads::on_agent_head(&gw.audit, appliance_id, peer_cert.as_deref(), head).await;
                    }
                    Ok(Some(ToGateway::ApprovalRefused { record_id, error })) => {
                        // Off the frame path: revoking a grant sends its new set to this agent.
                        let (grants, endpoints, id) = (gw.grants.clone(), gw.endpoint_service.clone(), appliance_id.to_string());
                        gw.tasks.spawn(async move {
                            crate::approvals::refusal::on_agent_refusal(&grants, &endpoints, &id, &record_id, &error).await;
                        });
                    }
                    Ok(Some(ToGateway::SshTeardown(report))) => {
                        crate::endpoints::ssh::teardown::on_report(&gw.front, appliance_id, report).await;
                    }
                    Ok(Some(ToGateway::CertRenew(req))) => {
                        let renewals = crate::cert_renewal::Renewals {
                            store: &gw.store,
                            audit: &*gw.audit,
                            ca: &gw.ca,
                            lifetime: gw.limits.agent_cert_lifetime,
                        };
                        let answer = renewals.on_request(appliance_id, peer_cert.as_deref(), req, Timestamp::now()).await;
                        if let Err(e) = write_frame_within(&mut send, &answer, gw.limits.agent_lost_after).await {
                            return format!("control stream failed: {e}");
                        }
                    }
                    Ok(Some(ToGateway::SteadyStateSnapshot(snapshot))) => {
                        gw.snapshots.offer(appliance_id, snapshot, Timestamp::now());
                    }
                    Ok(Some(ToGateway::TeardownProof(signed))) => {
                        let cert = peer_leaf(conn).unwrap_or_default();
                        let ack = crate::teardown_proofs::on_proof(&gw.store, &*gw.audit, appliance_id, &cert, signed).await;
                        if let Some(ack) = ack {
                            if let Err(e) = write_frame_within(&mut send, &ack, gw.limits.agent_lost_after).await {
                                return format!("control stream failed: {e}");
                            }
                        }
                    }
                    Ok(None) => {
                        conn.close(close::NORMAL.into(), b"control stream ended");
                        return "agent ended the control stream".into();
                    }
                    Err(FramedError::Frame(fe)) => {
                        let e = fe.to_api_error();
                        send_error(&mut send, &ToAgent::Error(e.clone())).await;
                        close_with(conn, close::PROTOCOL, &e);
                        return e.message;
                    }
                    Err(e) => return format!("control stream failed: {e}"),
                }
            }
            Ok(()) = heads.changed(), if trail_heads => {
                if pacer.changed(tokio::time::Instant::now()) {
                    if let Err(e) = send_latest_head(&mut send, &heads, &mut pacer, gw.limits.agent_lost_after).await {
                        return format!("control stream failed: {e}");
                    }
                }
            }
            () = sleep_until_opt(head_at) => {
                if let Err(e) = send_latest_head(&mut send, &heads, &mut pacer, gw.limits.agent_lost_after).await {
                    return format!("control stream failed: {e}");
                }
            }
            Some(frame) = outgoing.recv() => {
                // An older agent cannot read it (and collects nothing anyway).
                if matches!(frame, ToAgent::SteadyState { .. }) && !steady_state {
                    continue;
                }
                let deadline = tokio::time::Instant::now() + gw.limits.agent_lost_after;
                let frame = delivery.outgoing(frame, deadline);
                if let Err(e) = write_frame_within(&mut send, &frame, gw.limits.agent_lost_after).await {
                    return format!("control stream failed: {e}");
                }
            }
            _ = heartbeat.tick() => {
                if let Err(e) = delivery.check(tokio::time::Instant::now()) {
                    return resync(conn, &e);
                }
                if last_rx.elapsed() > gw.limits.agent_lost_after {
                    conn.close(close::LOST.into(), b"heartbeat lost");
                    return "heartbeat lost".into();
                }
                seq += 1;
                if let Err(e) = write_frame_within(&mut send, &ToAgent::Heartbeat { seq }, gw.limits.agent_lost_after).await {
                    return format!("control stream failed: {e}");
                }
            }
        }
    }
}

/// Writes the vendor trail's latest signed head (what the pacer let through) to the agent.
async fn send_latest_head(
    send: &mut quinn::SendStream,
    heads: &watch::Receiver<Option<SignedHead>>,
    pacer: &mut HeadPacer<tokio::time::Instant>,
    limit: Duration,
) -> Result<(), FramedError> {
    let head = heads.borrow().clone();
    pacer.sent(tokio::time::Instant::now());
    match head {
        Some(head) => write_frame_within(send, &ToAgent::TrailHead(head), limit).await,
        None => Ok(()),
    }
}

/// Sleeps until `at`; pends forever without one.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Drops a connection whose command delivery failed; the agent reconnects and is sent its full
/// state again.
fn resync(conn: &quinn::Connection, e: &DeliveryError) -> String {
    let reason = e.to_string();
    tracing::warn!(remote = %conn.remote_address(), %reason, "dropping the agent connection so it resynchronises");
    conn.close(close::RESYNC.into(), reason.as_bytes());
    reason
}
