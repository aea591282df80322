//! `postern-agent run`: keep one tunnel to the gateway up, forever.
//!
//! Each connection: hello on the control stream, then heartbeats, endpoint announcements,
//! one-off ops (see [`crate::op_runner`]) and data streams until it is lost; then every
//! session is cut (`interrupted`), the live set is forgotten (the gateway resends it after the
//! next hello) and the agent redials with jittered exponential backoff. Running ops and held
//! output outlive a connection; a running op's frames go only to the connection it came on.

use crate::{
    audit::{AuditError, AuditLog, Entry},
    config::{AgentConfig, ConfigError, Enrollment},
    dial::{self, DialError},
    gateway_trail::GatewayTrail,
    grants::{LiveEndpoints, Removed},
    op_runner::{OpRunner, Outbox},
    sessions::Sessions,
    wire::{read_one_frame, write_frame, FrameReader, WireError},
    AGENT_VERSION,
};
use endpoint_types::{
    frame::{
        AgentCommand, EndpointGrant, Handshake, HandshakeAnswer, Hello, HelloAck, SentByAgent,
        ToAgent, ToGateway, MAX_FRAME_LEN,
    },
    resource::CloseReason,
    secret::Secret,
    ErrorCode, ALPN_TUNNEL, PROTOCOL_VERSION,
};
use jiff::Timestamp;
use quinn::{Connection, RecvStream, SendStream};
use serde_json::json;
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds one dial attempt, so a gateway that comes back is found by the next attempt rather
/// than after the handshake's own 15 s idle timeout.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// How long after losing a working connection the agent keeps redialling quickly: a gateway
/// restart or a failover is over within it; an outage that lasts longer gets the full backoff.
const QUICK_REDIAL_WINDOW: Duration = Duration::from_secs(60);
/// The backoff's ceiling inside that window: 1000 agents spread over it still arrive at a rate
/// a restarted gateway takes (scale_bench connects 1000 at once in a few seconds).
const QUICK_REDIAL_CEILING: Duration = Duration::from_millis(3200);
const SESSION_DRAIN: Duration = Duration::from_secs(2);
const CLOSE_DRAIN: Duration = Duration::from_secs(3);
/// Frames from running ops waiting for the control stream (each at most ~256 KiB of output).
const OP_OUTBOX: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent's credentials are unusable: {0}")]
    Credentials(String),
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Proofs(#[from] crate::teardown_proof::ProofsError),
}

impl TunnelError {
    pub fn to_api_error(&self) -> endpoint_types::ApiError {
        use endpoint_types::ApiError;
        match self {
            TunnelError::Config(e) => e.to_api_error(),
            TunnelError::Audit(e) => e.to_api_error(),
            TunnelError::ReadFile { .. } | TunnelError::Credentials(_) => ApiError::invalid(self.to_string())
                .hint("key_file, cert_file and ca_file are written by `postern-agent enroll`; enroll again if they are lost"),
            TunnelError::Dial(_) => ApiError::new(ErrorCode::Internal, self.to_string()),
            TunnelError::Proofs(_) => ApiError::invalid(self.to_string()).hint(
                "teardowns.json next to the agent key holds the endpoints owed a teardown proof; move a damaged one aside and start again (its endpoints' proofs are lost)",
            ),
        }
    }
}

/// How one connection ended.
#[derive(Debug)]
enum Ended {
    Shutdown,
    Lost { reason: String, revoked: bool },
}

impl Ended {
    fn lost(reason: impl Into<String>) -> Ended {
        Ended::Lost {
            reason: reason.into(),
            revoked: false,
        }
    }
}

/// Whether the gateway closed `conn` because the appliance is revoked. A revoked appliance is
/// refused before its hello (and cut when revoked while connected) by a connection close whose
/// reason starts with the error code, not by an `Error` frame.
fn closed_as_revoked(conn: &Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.reason.starts_with(ErrorCode::ApplianceRevoked.as_str().as_bytes())
    )
}

/// Delay before reconnect attempt `attempt` (0-based): full jitter over an exponentially
/// growing ceiling, so a fleet of agents does not redial a restarted gateway in lockstep.
/// `just_lost`: a working connection ended less than [`QUICK_REDIAL_WINDOW`] ago; the ceiling
/// then stops at [`QUICK_REDIAL_CEILING`]. A restarted gateway turns many of a fleet's first
/// dials away at its door (admission limits), and with the ceiling free to grow one unlucky agent
/// drew a 12.8 s step and came back long after the other 999 (scale_bench's reconnect).
pub fn backoff(attempt: u32, cap: Duration, just_lost: bool) -> Duration {
    let mut ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(20))
        .min(cap);
    if just_lost {
        ceiling = ceiling.min(QUICK_REDIAL_CEILING);
    }
    Duration::from_millis(rand::random_range(0..=ceiling.as_millis() as u64))
}

struct Agent {
    config: Arc<AgentConfig>,
    enrollment: Enrollment,
    /// Built again when a renewed certificate is installed (crate::cert_renewal).
    quic: Mutex<quinn::ClientConfig>,
    renewal: Arc<crate::cert_renewal::CertRenewal>,
    sessions: Sessions,
    live: Arc<Mutex<LiveEndpoints>>,
    audit: AuditLog,
    gateway_trail: GatewayTrail,
    ops: OpRunner,
    tracker: TaskTracker,
    /// The gateway's signed heads, checked against its pinned audit key.
    anchors: crate::trail_heads::GatewayAnchors,
    /// The approvers' decisions on grants and endpoints this appliance accepted.
    record_approvals: crate::record_approval::RecordApprovals,
    /// The connected gateway takes `ApprovalRefused` (from its hello answer).
    reports_refusals: std::sync::atomic::AtomicBool,
    /// Steady-state snapshots, collected while the gateway says so (crate::steady_state).
    steady: crate::steady_state::Collector,
}

/// Runs the agent until `shutdown` is cancelled. `ready` receives the first accepted hello.
pub async fn run(
    config: AgentConfig,
    shutdown: CancellationToken,
    mut ready: Option<oneshot::Sender<HelloAck>>,
) -> Result<(), TunnelError> {
    let enrollment = config.enrollment()?;
    match crate::cert_renewal::recover(&enrollment.key_file, &enrollment.cert_file) {
        Ok(Some(done)) => tracing::warn!("certificate renewal interrupted by a stop: {done}"),
        Ok(None) => {}
        Err(e) => return Err(TunnelError::Credentials(e.to_string())),
    }
    if let Some(why) = crate::cert_renewal::expired(&enrollment.cert_file, Timestamp::now()) {
        return Err(TunnelError::Credentials(why));
    }
    let quic = dial::quic_client_config(tls_config(&enrollment)?)?;
    let heads = crate::trail_heads::HeadSigner::load(
        &enrollment.key_file,
        &enrollment.cert_file,
        &enrollment.appliance_id,
        &config.audit_path,
    )
    .map_err(|e| TunnelError::Credentials(e.to_string()))?;
    // Heads and teardown proofs sign with one key, swapped together by a renewal.
    let appliance_key = heads.key();
    let missing_head = heads.check_trail_reaches(&config.audit_path);
    let mut trail_number = 0;
    let audit = AuditLog::open_with_heads(
        &config.audit_path,
        Some(enrollment.appliance_id.clone()),
        &mut |line| {
            if let Some(n) = crate::gateway_trail::number_in(line) {
                trail_number = trail_number.max(n);
            }
        },
        Some(heads),
    )?;
    if let Some(m) = &config.metrics {
        audit.count_in(m.clone());
    }
    let gateway_trail = GatewayTrail::new(audit.clone(), trail_number);
    let anchors = crate::trail_heads::GatewayAnchors::load(&enrollment.ca_file);
    if let Some((head, kept)) = missing_head {
        audit.record_or_log(crate::audit::Entry::new(
            "audit.head_missing",
            audit.agent_actor(),
            json!({ "head": head, "kept_in": kept }),
        ));
    }
    let config = Arc::new(config);
    let live = Arc::new(Mutex::new(LiveEndpoints::new()));
    let proofs = Arc::new(crate::teardown_proof::Proofs::open_with_key(
        crate::teardown_proof::state_path(&enrollment.key_file),
        appliance_key.clone(),
        &enrollment.appliance_id,
    )?);
    let renewal = Arc::new(crate::cert_renewal::CertRenewal::new(
        &enrollment,
        audit.clone(),
        appliance_key,
        proofs.clone(),
    ));
    let sessions = Sessions {
        config: config.clone(),
        live: live.clone(),
        audit: audit.clone(),
        teardowns: Default::default(),
        postgres: Default::default(),
        kube: Default::default(),
        proofs,
    };
    // SSH endpoints live when the agent last stopped are owed their VM teardown too, should
    // the first sync show they ended meanwhile.
    for g in sessions.proofs.owed() {
        sessions.teardowns.owe(&g);
    }
    let tracker = TaskTracker::new();
    // Config validation parsed the policy already; this cannot fail for a loaded config.
    let confinement = crate::op_sandbox::Confinement::detect(config.ops.user.as_deref())
        .map_err(|e| ConfigError::Invalid {
            path: config.path.clone(),
            problem: e.to_string(),
        })?
        .with_launcher(config.ops.launcher.clone());
    crate::op_sandbox::announce(&confinement);
    let ops = OpRunner::new_confined(
        config.clone(),
        live.clone(),
        audit.clone(),
        shutdown.clone(),
        tracker.clone(),
        confinement,
        sessions.kube.clone(),
    )
    .map_err(|e| ConfigError::Invalid {
        path: config.path.clone(),
        problem: format!("[policy] {e}"),
    })?;
    // Bare kubernetes resource names resolve through the cluster's discovery; one that is
    // ambiguous (or unserved, or cluster-scoped) is a config error now.
    sessions
        .kube
        .prepare(&config)
        .await
        .map_err(|(id, problem)| ConfigError::Resource {
            path: config.path.clone(),
            id,
            problem,
        })?;
    let record_approvals =
        crate::record_approval::RecordApprovals::from_config(&config, Timestamp::now());
    let steady = crate::steady_state::Collector::new(
        config.clone(),
        sessions.kube.clone(),
        audit.clone(),
        tracker.clone(),
    );
    let agent = Agent {
        record_approvals,
        reports_refusals: Default::default(),
        steady,
        config,
        enrollment,
        quic: Mutex::new(quic),
        renewal,
        sessions,
        live,
        audit,
        gateway_trail,
        ops,
        tracker,
        anchors,
    };

    let cap = agent.config.reconnect_max();
    let mut attempt: u32 = 0;
    let mut revoked = false;
    // When the last connection that got as far as the hello ended.
    let mut lost_at: Option<std::time::Instant> = None;
    loop {
        agent.sessions.kube.resolve_pending(&agent.config).await;
        let (ended, helloed) = agent.connection(&shutdown, &mut ready).await;
        if helloed {
            attempt = 0;
            revoked = false;
            lost_at = Some(std::time::Instant::now());
        }
        let delay = match ended {
            Ended::Shutdown => break,
            Ended::Lost { reason, revoked: r } => {
                if r {
                    crate::endpoint_setup::appliance_revoked(&agent.sessions);
                }
                revoked |= r;
                let just_lost = lost_at.is_some_and(|t| t.elapsed() < QUICK_REDIAL_WINDOW);
                let delay = if revoked {
                    cap
                } else {
                    backoff(attempt, cap, just_lost)
                };
                tracing::info!(gateway = %agent.enrollment.gateway, "disconnected: {reason}; reconnecting in {delay:?}");
                delay
            }
        };
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => break,
        }
        if let Some(m) = &agent.config.metrics {
            m.reconnecting();
        }
    }
    agent.tracker.close();
    let _ = tokio::time::timeout(SESSION_DRAIN, agent.tracker.wait()).await;
    // Records queued without waiting (the sessions' ends, agent.disconnected) reach the disk.
    let _ = tokio::time::timeout(SESSION_DRAIN, agent.audit.flush()).await;
    // The trail's end is signed, so cutting it off is caught (crate::trail_heads).
    let _ = tokio::time::timeout(SESSION_DRAIN, agent.audit.seal()).await;
    Ok(())
}

fn tls_config(e: &Enrollment) -> Result<rustls::ClientConfig, TunnelError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| TunnelError::ReadFile {
            path: path.to_path_buf(),
            source,
        })
    };
    let ca = read(&e.ca_file)?;
    let cert = read(&e.cert_file)?;
    let key = Secret::new(read(&e.key_file)?);
    certs::client_config(&ca, Some((&cert, &key)), vec![ALPN_TUNNEL.to_vec()])
        .map_err(|err| TunnelError::Credentials(err.to_string()))
}

impl Agent {
    /// One connection, from dial to teardown. Returns how it ended and whether a hello was accepted.
    async fn connection(
        &self,
        shutdown: &CancellationToken,
        ready: &mut Option<oneshot::Sender<HelloAck>>,
    ) -> (Ended, bool) {
        let gateway = &self.enrollment.gateway;
        if let Some(why) =
            crate::cert_renewal::expired(&self.enrollment.cert_file, Timestamp::now())
        {
            tracing::error!(
                "{why}; enroll the agent again (postern appliance add, then postern-agent enroll)"
            );
            return (Ended::lost("the agent certificate expired"), false);
        }
        if self.renewal.swap_if_renewed() {
            match tls_config(&self.enrollment).and_then(|tls| Ok(dial::quic_client_config(tls)?)) {
                Ok(quic) => *self.quic.lock().unwrap_or_else(|p| p.into_inner()) = quic,
                Err(e) => tracing::error!("cannot use the renewed certificate: {e}"),
            }
        }
        let quic = self.quic.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let dialed = tokio::select! {
            r = dial::connect(gateway, &quic, DIAL_TIMEOUT) => r,
            () = shutdown.cancelled() => return (Ended::Shutdown, false),
        };
        let (endpoint, conn) = match dialed {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!("{e}");
                return (Ended::lost("could not connect"), false);
            }
        };
        let mut hello: Option<HelloAck> = None;
        let ended = tokio::select! {
            ended = self.serve(&conn, &mut hello, ready) => ended,
            () = shutdown.cancelled() => Ended::Shutdown,
        };
        if let Some(m) = &self.config.metrics {
            m.set_connected(false);
        }
        // The next connection's gateway says again whether to collect.
        self.steady.stop();
        let ended = match ended {
            Ended::Lost {
                reason,
                revoked: false,
            } if closed_as_revoked(&conn) => Ended::Lost {
                reason,
                revoked: true,
            },
            other => other,
        };
        let endpoints_cut = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear(CloseReason::Interrupted);
        if hello.is_some() {
            let reason = match &ended {
                Ended::Shutdown => "agent shutting down".to_string(),
                Ended::Lost { reason, .. } => reason.clone(),
            };
            self.audit.record_or_log(Entry::new(
                "agent.disconnected",
                self.audit.agent_actor(),
                json!({ "gateway": gateway, "reason": reason, "endpoints_cut": endpoints_cut }),
            ));
        }
        match &ended {
            Ended::Shutdown => {
                // Let cut sessions reset their streams and write session.closed while the
                // connection can still carry the resets.
                self.tracker.close();
                let _ = tokio::time::timeout(SESSION_DRAIN, self.tracker.wait()).await;
                self.tracker.reopen();
                conn.close(0u32.into(), b"agent shutting down");
                let _ = tokio::time::timeout(CLOSE_DRAIN, endpoint.wait_idle()).await;
                tracing::info!(%gateway, "disconnected: agent shutting down");
            }
            Ended::Lost { .. } => {
                conn.close(0u32.into(), b"connection lost");
            }
        }
        (ended, hello.is_some())
    }

    /// Hello, then the control loop. Sets `hello` once the gateway accepts us.
    async fn serve(
        &self,
        conn: &Connection,
        hello: &mut Option<HelloAck>,
        ready: &mut Option<oneshot::Sender<HelloAck>>,
    ) -> Ended {
        let gateway = &self.enrollment.gateway;
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(pair) => pair,
            Err(e) => return Ended::lost(format!("cannot open the control stream: {e}")),
        };
        let frame = Handshake::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: AGENT_VERSION.to_string(),
            resources: self.config.descriptors(&self.sessions.kube),
            policy: self.config.policy_summary(),
            trail_number: Some(self.gateway_trail.last()),
            trail_heads: true,
            steady_state: true,
        });
        if let Err(e) = send_frame(&mut send, &frame, HELLO_TIMEOUT).await {
            return Ended::lost(format!("cannot send the hello: {e}"));
        }
        // One frame exactly: nothing else may arrive before the answer to our hello.
        let ack = match tokio::time::timeout(
            HELLO_TIMEOUT,
            read_one_frame(&mut recv, MAX_FRAME_LEN),
        )
        .await
        {
            Ok(Ok(HandshakeAnswer::HelloAck(ack))) => ack,
            Ok(Ok(HandshakeAnswer::Error(e))) => {
                let hint = if e.hint.is_empty() {
                    String::new()
                } else {
                    format!(" (hint: {})", e.hint)
                };
                tracing::error!(%gateway, code = %e.code, "the gateway refused the agent: {}{hint}", e.message);
                return Ended::Lost {
                    reason: format!("refused: {}", e.code),
                    revoked: e.code == ErrorCode::ApplianceRevoked,
                };
            }
            Ok(Err(e)) => return Ended::lost(format!("no answer to the hello: {e}")),
            Err(_) => {
                return Ended::lost(format!("no answer to the hello within {HELLO_TIMEOUT:?}"))
            }
        };
        if ack.appliance_id != self.enrollment.appliance_id {
            tracing::warn!(configured = %self.enrollment.appliance_id, gateway_says = %ack.appliance_id, "the gateway knows this agent under another appliance id");
        }
        tracing::info!(%gateway, appliance = %ack.appliance_id, app = %ack.app, customer = %ack.customer, "connected");
        self.audit.record_or_log(Entry::new(
            "agent.connected",
            self.audit.agent_actor(),
            json!({ "gateway": gateway, "app": ack.app, "customer": ack.customer, "agent_version": AGENT_VERSION }),
        ));
        self.anchors.hello(ack.audit_key.as_deref(), &self.audit);
        self.reports_refusals
            .store(ack.approval_refusals, std::sync::atomic::Ordering::Relaxed);
        *hello = Some(ack.clone());
        if let Some(m) = &self.config.metrics {
            m.set_connected(true);
        }
        if let Some(tx) = ready.take() {
            let _ = tx.send(ack.clone());
        }
        self.control_loop(conn, &ack, send, recv).await
    }

    async fn control_loop(
        &self,
        conn: &Connection,
        ack: &HelloAck,
        mut send: SendStream,
        recv: RecvStream,
    ) -> Ended {
        let every = Duration::from_millis(ack.heartbeat_interval_ms.clamp(50, 3_600_000));
        let lost_after = Duration::from_millis(ack.lost_after_ms).max(every);
        let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reader = FrameReader::<_, ToAgent>::new(recv, MAX_FRAME_LEN);
        let mut seq: u64 = 0;
        let mut last_rx = Instant::now();
        let mut synced = false;
        // Ops write through this; a connection's ops answer on that connection only.
        let (op_tx, mut op_rx) = mpsc::channel::<ToGateway>(OP_OUTBOX);
        self.ops.connected(&ack.app, &ack.customer, &op_tx);
        self.sessions.teardowns.connected(&op_tx);
        self.sessions.proofs.connected(&op_tx);
        if ack.cert_renewal {
            self.renewal.connected(&op_tx);
        }
        // The trail's latest signed head goes to the gateway now and whenever it changes.
        // Only a gateway that signs heads itself (it names its audit key) knows the frame.
        let mut heads = self.audit.latest_head().filter(|_| ack.audit_key.is_some());
        let latest = heads.as_mut().and_then(|h| h.borrow_and_update().clone());
        let mut snapshots = self.steady.subscribe();
        if let Some(head) = latest {
            if let Err(e) = send_frame(&mut send, &ToGateway::TrailHead(head), lost_after).await {
                return Ended::lost(format!("cannot send the trail's head: {e}"));
            }
        }
        loop {
            let next_expiry = self
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .next_expiry();
            let expiry_at = next_expiry.map(instant_of);
            tokio::select! {
                _ = ticker.tick() => {
                    seq += 1;
                    if let Err(e) = send_frame(&mut send, &ToGateway::Heartbeat { seq }, lost_after).await {
                        return Ended::lost(format!("cannot send a heartbeat: {e}"));
                    }
                }
                frame = reader.next() => match frame {
                    Ok(Some(frame)) => {
                        last_rx = Instant::now();
                        synced |= is_endpoint_sync(&frame);
                        if let Some(ended) = self.on_frame(frame, &mut send, lost_after, &op_tx).await {
                            return ended;
                        }
                    }
                    Ok(None) => return Ended::lost("the gateway closed the control stream"),
                    Err(WireError::Frame(e)) => {
                        let _ = send_frame(&mut send, &ToGateway::Error(e.to_api_error()), lost_after).await;
                        return Ended::lost(format!("bad frame from the gateway: {e}"));
                    }
                    Err(e) => return Ended::lost(format!("control stream: {e}")),
                },
                Some(head) = next_head(&mut heads) => {
                    if let Err(e) = send_frame(&mut send, &ToGateway::TrailHead(head), lost_after).await {
                        return Ended::lost(format!("cannot send the trail's head: {e}"));
                    }
                }
                // Latest wins: only the newest snapshot is sent (crate::steady_state).
                Ok(()) = snapshots.changed() => {
                    let snapshot = snapshots.borrow_and_update().clone();
                    if let Some(snapshot) = snapshot {
                        if let Err(e) = send_frame(&mut send, &ToGateway::SteadyStateSnapshot(snapshot), lost_after).await {
                            return Ended::lost(format!("cannot send a steady-state snapshot: {e}"));
                        }
                    }
                }
                Some(frame) = op_rx.recv() => {
                    if let Err(e) = send_frame(&mut send, &frame, lost_after).await {
                        return Ended::lost(format!("cannot send an op's frames: {e}"));
                    }
                }
                () = tokio::time::sleep_until(last_rx + lost_after) => {
                    return Ended::lost(format!("no frame from the gateway for {lost_after:?}"));
                }
                () = sleep_until_opt(expiry_at) => {
                    let removed = self.live.lock().unwrap_or_else(|p| p.into_inner()).expire_due(Timestamp::now());
                    self.audit_removed(&removed);
                }
                // No session is served on a connection before its full state (grants, then
                // endpoints) has been applied: a revocation made while the agent was away or
                // stopped takes effect before any stream the gateway opens.
                stream = conn.accept_bi(), if synced => match stream {
                    Ok((s, r)) => {
                        let sessions = self.sessions.clone();
                        let conn = conn.clone();
                        self.tracker.spawn(async move { sessions.serve(conn, s, r).await });
                    }
                    Err(e) => return Ended::lost(e.to_string()),
                },
            }
        }
    }

    /// Handles one control frame; `Some` ends the connection.
    async fn on_frame(
        &self,
        frame: ToAgent,
        send: &mut SendStream,
        write_limit: Duration,
        ops: &Outbox,
    ) -> Option<Ended> {
        let now = Timestamp::now();
        match frame {
            ToAgent::Heartbeat { seq } => {
                if let Err(e) =
                    send_frame(send, &ToGateway::HeartbeatAck { seq }, write_limit).await
                {
                    return Some(Ended::lost(format!("cannot answer a heartbeat: {e}")));
                }
            }
            ToAgent::HeartbeatAck { .. } => {}
            ToAgent::EndpointSync { endpoints } => {
                let endpoints = match self.screened(endpoints, now, send, write_limit).await {
                    Ok(kept) => kept,
                    Err(ended) => return Some(ended),
                };
                let grants = endpoints.clone();
                let (added, removed) = self
                    .live
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .sync(endpoints, now);
                self.audit_removed(&removed);
                for g in grants.iter().filter(|g| added.contains(&g.endpoint_id)) {
                    self.audit_opened(g, "sync");
                    crate::endpoint_setup::opened(&self.sessions, g);
                }
                self.audit_stale(grants.iter().filter(|g| g.expires_at <= now));
                crate::endpoint_setup::synced(&self.sessions, &grants);
            }
            ToAgent::EndpointOpen(grant) => {
                let id = grant.endpoint_id.clone();
                let Some(grant) = (match self.screened(vec![grant], now, send, write_limit).await {
                    Ok(kept) => kept.into_iter().next(),
                    Err(ended) => return Some(ended),
                }) else {
                    // Refused: nothing of it is served, also if it was live before.
                    let removed = self
                        .live
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .close(&id, CloseReason::Revoked);
                    self.audit_removed(removed.as_slice());
                    return None;
                };
                let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
                let was_live = matches!(
                    live.check(&grant.endpoint_id, now),
                    crate::grants::Liveness::Live { .. }
                );
                let is_live = live.insert(grant.clone(), now);
                drop(live);
                if is_live && !was_live {
                    self.audit_opened(&grant, "open");
                    crate::endpoint_setup::opened(&self.sessions, &grant);
                } else if !is_live {
                    self.audit_stale(std::iter::once(&grant));
                }
            }
            ToAgent::GrantSync { grants } => {
                let grants = match self.screened(grants, now, send, write_limit).await {
                    Ok(kept) => kept,
                    Err(ended) => return Some(ended),
                };
                let policy = self.config.policy_summary();
                let summary: Vec<serde_json::Value> = grants
                    .iter()
                    .map(|g| {
                        let mut v = serde_json::json!({
                            "grant_id": g.grant_id, "level": g.level.as_str(), "approved_by": g.approved_by, "expires_at": g.expires_at,
                        });
                        // The phase and the rule that decided: a policy table or a person.
                        if let (Some(o), serde_json::Value::Object(rule)) = (
                            v.as_object_mut(),
                            endpoint_types::phase_policy::decided_rule(&policy, g.level, &g.approved_by),
                        ) {
                            o.extend(rule);
                        }
                        v
                    })
                    .collect();
                self.ops.grants_synced(&grants, now);
                let removed = self
                    .live
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .sync_grants(grants, now);
                self.audit_grants(summary);
                self.audit_removed(&removed);
            }
            ToAgent::EndpointClose {
                endpoint_id,
                reason,
            } => {
                let removed = self
                    .live
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .close(&endpoint_id, reason);
                self.audit_removed(removed.as_slice());
            }
            // Ops never block the loop: each runs on its own task and answers through `ops`.
            ToAgent::OpDispatch(d) => self.ops.dispatch(d, ops.clone()),
            ToAgent::OutputFetch { op_id } => self.ops.fetch(&op_id, ops.clone()),
            ToAgent::OutputRelease {
                op_id,
                approved_by,
                signed_decision,
            } => self
                .ops
                .release(op_id, approved_by, signed_decision, ops.clone()),
            ToAgent::OutputDestroy {
                op_id,
                denied_by,
                message,
            } => self.ops.destroy(op_id, denied_by, message, ops.clone()),
            ToAgent::TrailRecords {
                records,
                lost_through,
            } => {
                // Durable first, then reported: the gateway sends what follows the number.
                let number = match self.gateway_trail.take(records, lost_through).await {
                    Ok(number) => number,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot record the gateway's records in the customer trail; they are asked for again");
                        self.gateway_trail.last()
                    }
                };
                if let Err(e) =
                    send_frame(send, &ToGateway::TrailRecorded { number }, write_limit).await
                {
                    return Some(Ended::lost(format!(
                        "cannot report the customer trail: {e}"
                    )));
                }
            }
            ToAgent::TeardownAck {
                endpoint_id,
                refused,
            } => self.sessions.proofs.acked(&endpoint_id, refused.as_ref()),
            ToAgent::TrailHead(head) => self.anchors.on_head(head, &self.audit),
            ToAgent::CertRenewal(answer) => self.renewal.answer(answer),
            ToAgent::SteadyState { enabled } => self.steady.set_enabled(enabled),
            ToAgent::Error(e) => {
                let hint = if e.hint.is_empty() {
                    String::new()
                } else {
                    format!(" (hint: {})", e.hint)
                };
                tracing::error!(code = %e.code, "the gateway reported an error: {}{hint}", e.message);
                return Some(Ended::Lost {
                    reason: format!("gateway error {}", e.code),
                    revoked: e.code == ErrorCode::ApplianceRevoked,
                });
            }
            // A command is applied first and acknowledged after, so the gateway knows it took
            // effect (gateway/src/delivery.rs). It holds no command itself, so this recurses
            // once.
            ToAgent::Command { seq, command } => {
                let applied = Box::pin(self.on_frame(command.into(), send, write_limit, ops));
                if let Some(ended) = applied.await {
                    return Some(ended);
                }
                if let Err(e) = send_frame(send, &ToGateway::CommandAck { seq }, write_limit).await
                {
                    return Some(Ended::lost(format!("cannot acknowledge a command: {e}")));
                }
                if let Some(m) = &self.config.metrics {
                    m.command_applied();
                }
            }
        }
        None
    }

    /// What of the announced grants or endpoints the appliance honours: a person's decision is
    /// checked (crate::record_approval), each refusal recorded and reported to the gateway.
    async fn screened<T: crate::record_approval::Approvable>(
        &self,
        items: Vec<T>,
        now: Timestamp,
        send: &mut SendStream,
        write_limit: Duration,
    ) -> Result<Vec<T>, Ended> {
        let screened = self.record_approvals.screen(
            self.ops.signed_approvals(),
            items,
            &self.audit.agent_actor(),
            now,
        );
        for entry in screened.records {
            self.audit.record_or_log(entry);
        }
        // An older gateway would drop the connection for the frame: it learns nothing, and the
        // refusal stands in the customer trail all the same.
        let reports = self
            .reports_refusals
            .load(std::sync::atomic::Ordering::Relaxed);
        for (record_id, error) in screened.refused.into_iter().filter(|_| reports) {
            let refused = ToGateway::ApprovalRefused { record_id, error };
            if let Err(e) = send_frame(send, &refused, write_limit).await {
                return Err(Ended::lost(format!(
                    "cannot report a refused approval: {e}"
                )));
            }
        }
        Ok(screened.kept)
    }

    fn audit_opened(&self, g: &EndpointGrant, via: &str) {
        tracing::info!(endpoint = %g.endpoint_id, resource = %g.resource_id, expires_at = %g.expires_at, "endpoint live");
        self.audit.record_or_log(
            Entry::new("endpoint.opened", self.audit.agent_actor(), {
                let mut v = json!({
                    "type": g.endpoint_type.as_str(),
                    "resource_id": g.resource_id,
                    "expires_at": g.expires_at.to_string(),
                    "via": via,
                });
                // The phase and the rule that let it open, as this appliance's policy reads.
                let ruling = endpoint_types::phase_policy::ruling(
                    &self.config.policy_summary(),
                    g.phase,
                    jiff::Timestamp::now(),
                );
                ruling.add_to(&mut v);
                if g.signed_decision.is_some() && ruling.decided_by().is_none() {
                    v["rule"] = "a person (signed decision)".into();
                }
                v
            })
            .endpoint(g.endpoint_id.clone()),
        );
    }

    /// The customer's trail records every grant set the gateway announced: what the agent
    /// was told it may honour, and until when.
    fn audit_grants(&self, grants: Vec<serde_json::Value>) {
        self.audit.record_or_log(Entry::new(
            "grant.sync",
            self.audit.agent_actor(),
            json!({ "grants": grants }),
        ));
    }

    fn audit_removed(&self, removed: &[Removed]) {
        for r in removed {
            tracing::info!(endpoint = %r.endpoint_id, reason = r.reason.as_str(), "endpoint ended");
            self.audit.record_or_log(
                Entry::new(
                    "endpoint.closed",
                    self.audit.agent_actor(),
                    json!({ "reason": r.reason.as_str() }),
                )
                .endpoint(r.endpoint_id.clone()),
            );
            crate::endpoint_setup::closed(&self.sessions, r);
        }
    }

    /// A grant the gateway announced but that is already past its expiry by our clock.
    fn audit_stale<'a>(&self, grants: impl Iterator<Item = &'a EndpointGrant>) {
        for g in grants {
            tracing::warn!(endpoint = %g.endpoint_id, expires_at = %g.expires_at, "ignoring an endpoint that has already expired by this appliance's clock");
            self.audit.record_or_log(
                Entry::new(
                    "denied",
                    self.audit.agent_actor(),
                    json!({
                        "reason": ErrorCode::EndpointExpired.as_str(),
                        "message": "the gateway announced an endpoint that had already expired by the appliance's clock",
                        "expires_at": g.expires_at.to_string(),
                    }),
                )
                .endpoint(g.endpoint_id.clone()),
            );
        }
    }
}

/// Writes a control frame, giving up after `limit`: a gateway that stops reading must not
/// stall the loop that would notice it is gone.
async fn send_frame<F: SentByAgent>(
    send: &mut SendStream,
    frame: &F,
    limit: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(limit, write_frame(send, frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("the gateway accepted nothing for {limit:?}")),
    }
}

/// Whether `frame` carries the appliance's full set of endpoints, bare or as a command.
/// The next signed head of the trail; pends forever without heads or once the writer is gone.
async fn next_head(
    heads: &mut Option<
        tokio::sync::watch::Receiver<Option<endpoint_types::trail_head::SignedHead>>,
    >,
) -> Option<endpoint_types::trail_head::SignedHead> {
    let Some(rx) = heads else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        return std::future::pending().await;
    }
    let head = rx.borrow_and_update().clone();
    head
}

fn is_endpoint_sync(frame: &ToAgent) -> bool {
    matches!(
        frame,
        ToAgent::EndpointSync { .. }
            | ToAgent::Command {
                command: AgentCommand::EndpointSync { .. },
                ..
            }
    )
}

/// The monotonic instant at which wall-clock `at` arrives (now, if it has passed).
fn instant_of(at: Timestamp) -> Instant {
    let wait = Duration::try_from(at.duration_since(Timestamp::now())).unwrap_or(Duration::ZERO);
    Instant::now() + wait
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_full_jitter() {
        let cap = Duration::from_secs(5);
        for attempt in 0..40 {
            let ceiling = BACKOFF_BASE
                .saturating_mul(1u32 << attempt.min(20))
                .min(cap);
            for _ in 0..50 {
                assert!(backoff(attempt, cap, false) <= ceiling);
            }
        }
        assert!(backoff(0, cap, false) <= BACKOFF_BASE);
        // Full jitter: late attempts spread over the whole range, not bunched at the cap.
        let late: Vec<Duration> = (0..200).map(|_| backoff(30, cap, false)).collect();
        assert!(late.iter().any(|d| *d < cap / 2) && late.iter().any(|d| *d > cap / 2));
    }

    #[test]
    fn right_after_losing_a_connection_the_backoff_stays_short_however_many_dials_failed() {
        let cap = Duration::from_secs(300);
        let quick: Vec<Duration> = (0..400).map(|_| backoff(30, cap, true)).collect();
        assert!(quick.iter().all(|d| *d <= QUICK_REDIAL_CEILING));
        // Still jittered over the whole (short) range.
        assert!(quick.iter().any(|d| *d < QUICK_REDIAL_CEILING / 2));
        assert!(quick.iter().any(|d| *d > QUICK_REDIAL_CEILING / 2));
        // Early attempts are no longer than without the window.
        assert!((0..50).all(|_| backoff(0, cap, true) <= BACKOFF_BASE));
        // Outside the window the ceiling grows past it.
        let late: Vec<Duration> = (0..400).map(|_| backoff(30, cap, false)).collect();
        assert!(late.iter().any(|d| *d > QUICK_REDIAL_CEILING));
    }

    #[test]
    fn an_endpoint_sync_is_seen_bare_or_as_a_command() {
        assert!(is_endpoint_sync(&ToAgent::EndpointSync {
            endpoints: vec![]
        }));
        assert!(is_endpoint_sync(&ToAgent::Command {
            seq: 2,
            command: AgentCommand::EndpointSync { endpoints: vec![] },
        }));
        assert!(!is_endpoint_sync(&ToAgent::Command {
            seq: 1,
            command: AgentCommand::GrantSync { grants: vec![] },
        }));
        assert!(!is_endpoint_sync(&ToAgent::Heartbeat { seq: 1 }));
    }

    #[test]
    fn instant_of_past_is_now() {
        let before = Instant::now();
        let i = instant_of("2000-01-01T00:00:00Z".parse().unwrap());
        assert!(i >= before && i <= Instant::now());
    }
}
