//! Data streams: one per proxied client connection. The gateway asks; the agent checks its own
//! live-endpoint table and `agent.toml`, dials only the configured target, and pumps bytes.

use crate::{
    audit::{AuditLog, Entry},
    config::{AgentConfig, ResourceConfig},
    grants::{Cut, LiveEndpoints, Liveness},
    wire::{read_one_frame, write_frame, WireError},
};
use bytes::BytesMut;
use endpoint_types::{
    frame::{StreamAnswer, StreamHeader, StreamOpen, MAX_STREAM_HEADER_LEN},
    resource::{CloseReason, ResourceKind},
    ApiError, ErrorCode,
};
use jiff::Timestamp;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use serde_json::json;
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const PUMP_BUFFER: usize = 256 * 1024;

/// What every session needs; shared by all streams of all connections.
#[derive(Clone)]
pub struct Sessions {
    pub config: Arc<AgentConfig>,
    pub live: Arc<Mutex<LiveEndpoints>>,
    pub audit: AuditLog,
    /// SSH endpoints owed a teardown on the VM when they end.
    pub teardowns: Arc<crate::ssh_teardown::Teardowns>,
    /// Endpoints owed a proof of teardown, and proofs the gateway has not acknowledged.
    pub proofs: Arc<crate::teardown_proof::Proofs>,
    /// This agent's endpoint roles and sessions' cancel keys.
    pub postgres: crate::postgres::PgState,
    /// This agent's cluster connections and resolved resource names (shared with its ops).
    pub kube: crate::kube::Clusters,
}

/// A session the agent agreed to serve.
#[derive(Debug)]
pub struct Admitted {
    pub resource: ResourceConfig,
    pub cut: Cut,
}

/// The agent's decision for a `StreamOpen`, by its own table and config only.
pub fn authorize(
    live: &LiveEndpoints,
    config: &AgentConfig,
    open: &StreamOpen,
    now: Timestamp,
) -> Result<Admitted, ApiError> {
    let ep = &open.endpoint_id;
    let (grant, cut) = match live.check(ep, now) {
        Liveness::Live { grant, cut } => (grant, cut),
        Liveness::Ended(CloseReason::Expired) => {
            return Err(ApiError::new(
                ErrorCode::EndpointExpired,
                format!("endpoint {ep} has expired"),
            )
            .hint("create a new endpoint with `postern ops endpoint create`"))
        }
        Liveness::Ended(_) => {
            return Err(ApiError::new(
                ErrorCode::EndpointRetired,
                format!("endpoint {ep} has been retired"),
            )
            .hint("create a new endpoint with `postern ops endpoint create`"))
        }
        Liveness::NoGrant => {
            return Err(ApiError::new(
                ErrorCode::OperateAccessExpired,
                format!("endpoint {ep} has no live operate grant at this appliance"),
            )
            .hint("request operate access again: postern access request --level operate …"))
        }
        Liveness::Unknown => return Err(ApiError::new(
            ErrorCode::ForbiddenByScope,
            format!("endpoint {ep} has no live grant at this appliance"),
        )
        .hint(
            "the appliance serves only endpoints the gateway announced and that have not expired",
        )),
    };
    if grant.resource_id != open.resource_id {
        return Err(ApiError::new(
            ErrorCode::InvalidOriginResourceId,
            format!(
                "endpoint {ep} grants {:?}, not {:?}",
                grant.resource_id, open.resource_id
            ),
        ));
    }
    let Some(resource) = config.resource(&open.resource_id) else {
        return Err(ApiError::new(
            ErrorCode::InvalidOriginResourceId,
            format!(
                "resource {:?} is not declared in this appliance's agent.toml",
                open.resource_id
            ),
        )
        .hint("the customer declares resources as [[resource]] entries in agent.toml"));
    };
    let resource = &crate::phases::for_phase(resource, grant.phase)?;
    if grant.endpoint_type.resource_kind() != resource.kind {
        return Err(ApiError::new(
            ErrorCode::ForbiddenByScope,
            format!(
                "a {} endpoint cannot reach {:?}, which is a {} resource",
                grant.endpoint_type, resource.id, resource.kind
            ),
        ));
    }
    if resource.kind == ResourceKind::Tcp && resource.target.is_none() {
        return Err(ApiError::invalid(format!(
            "resource {:?} has no target in agent.toml",
            resource.id
        )));
    }
    Ok(Admitted {
        resource: resource.clone(),
        cut: cut.child(),
    })
}

impl Sessions {
    /// Serves one data stream the gateway opened, to its end.
    pub async fn serve(&self, conn: Connection, mut send: SendStream, mut recv: RecvStream) {
        let open = match tokio::time::timeout(
            HEADER_TIMEOUT,
            read_one_frame(&mut recv, MAX_STREAM_HEADER_LEN),
        )
        .await
        {
            Ok(Ok(StreamHeader::StreamOpen(open))) => open,
            Ok(Err(WireError::Frame(e))) => {
                refuse(&mut send, e.to_api_error()).await;
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "data stream ended before its header");
                return;
            }
            Err(_) => {
                tracing::debug!("data stream sent no header in time");
                cut_quic(&mut send, &mut recv, CloseReason::Error);
                return;
            }
        };
        let decision = {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            authorize(&live, &self.config, &open, Timestamp::now())
        };
        let admitted = match decision {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(endpoint = %open.endpoint_id, session = %open.session_id, code = %e.code, "refused a session: {}", e.message);
                self.audit.record_or_log(
                    entry("denied", &open, json!({ "reason": e.code.as_str(), "message": e.message, "resource_id": open.resource_id })),
                );
                refuse(&mut send, e).await;
                return;
            }
        };
        let Admitted { resource, cut } = admitted;
        let _open = self
            .config
            .metrics
            .as_ref()
            .map(|m| m.session_open(resource.kind));
        // A batch of the trail failing while the session is live cuts it (reason `error`): its
        // records (statements, recording, its end) could not all be kept.
        let mut failures = self.audit.failures();
        failures.borrow_and_update();
        let trail_cut = cut.clone();
        let session = self.serve_admitted(conn, send, recv, open, resource, cut);
        tokio::pin!(session);
        tokio::select! {
            () = &mut session => {}
            _ = failures.changed() => {
                tracing::error!("cutting a session: the customer's audit trail cannot be written");
                trail_cut.cut(CloseReason::Error);
                session.await;
            }
        }
    }

    async fn serve_admitted(
        &self,
        conn: Connection,
        mut send: SendStream,
        recv: RecvStream,
        open: StreamOpen,
        resource: ResourceConfig,
        cut: Cut,
    ) {
        match resource.kind {
            ResourceKind::Tcp => {
                self.run_session(conn, send, recv, open, resource, cut)
                    .await
            }
            ResourceKind::Kubernetes => {
                crate::kube::serve_stream(self, open, resource, cut, send, recv).await
            }
            ResourceKind::Postgres => {
                crate::postgres::serve_stream(self, open, resource, cut, send, recv).await
            }
            ResourceKind::Ssh => {
                crate::ssh::serve_stream(self, open, resource, cut, send, recv).await
            }
            // No endpoint type reaches these kinds (they take one-off ops only); `authorize` refused it.
            ResourceKind::Docker | ResourceKind::Cloud => {
                refuse(
                    &mut send,
                    ApiError::new(
                        ErrorCode::ForbiddenByScope,
                        "this resource takes one-off ops only",
                    ),
                )
                .await
            }
        }
    }

    async fn run_session(
        &self,
        conn: Connection,
        mut send: SendStream,
        mut recv: RecvStream,
        open: StreamOpen,
        resource: ResourceConfig,
        cut: Cut,
    ) {
        let target = resource.target.clone().unwrap_or_default();
        let started = Instant::now();
        let opened = entry(
            "session.opened",
            &open,
            json!({ "resource_id": open.resource_id, "client_addr": open.client_addr, "kind": "tcp" }),
        );
        if let Err(e) = self.audit.write(opened).await {
            // No trail, no session: the customer must be able to see everything that ran.
            tracing::error!(error = %e, "cannot write the customer's audit trail; refusing the session");
            refuse(&mut send, trail_refusal()).await;
            return;
        }
        let closed = |reason: CloseReason, up: u64, down: u64| {
            let detail = json!({
                "reason": reason.as_str(),
                "bytes_up": up,
                "bytes_down": down,
                "duration_ms": started.elapsed().as_millis() as u64,
                "resource_id": open.resource_id,
            });
            self.audit
                .record_or_log(entry("session.closed", &open, detail));
        };

        let tcp = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target)) => match r {
                Ok(Ok(tcp)) => tcp,
                failed => {
                    let cause = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".to_string(),
                    };
                    // The cause stays in the appliance's log; the vendor learns only which resource.
                    tracing::warn!(resource = %open.resource_id, error = %cause, "cannot connect to the resource's target");
                    let e = ApiError::new(ErrorCode::TargetUnreachable, format!("the appliance cannot connect to resource {:?}", open.resource_id))
                        .hint("the service behind this resource may be down; the appliance's agent log has the cause");
                    refuse(&mut send, e).await;
                    closed(CloseReason::Error, 0, 0);
                    return;
                }
            },
            () = cut.cancelled() => {
                let reason = cut.reason().unwrap_or(CloseReason::Interrupted);
                cut_quic(&mut send, &mut recv, reason);
                closed(reason, 0, 0);
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        if let Err(e) = accept(&mut send).await {
            tracing::debug!(error = %e, "gateway went away before the session started");
            closed(CloseReason::Client, 0, 0);
            return;
        }

        let mut tcp = tcp;
        let (mut send, mut recv) = (send, recv);
        let counters = Counters::default();
        let reason = tokio::select! {
            r = pump(&mut tcp, &mut send, &mut recv, &counters) => match r {
                Ok(()) => CloseReason::Client,
                Err(e) => end_reason(&conn, &cut, &e),
            },
            () = cut.cancelled() => cut.reason().unwrap_or(CloseReason::Interrupted),
        };
        if reason != CloseReason::Client {
            cut_quic(&mut send, &mut recv, reason);
        }
        // bytes_up: client → target (written to the target); bytes_down: target → client.
        closed(
            reason,
            counters.up.load(Ordering::Relaxed),
            counters.down.load(Ordering::Relaxed),
        );
        tracing::debug!(session = %open.session_id, reason = reason.as_str(), "session ended");
    }
}

/// Classifies how a pump ended in error. A lost connection or a cut endpoint wins over the
/// I/O error it caused; the gateway's reset code says why it cut; resets on the target side
/// are how services usually hang up.
fn end_reason(conn: &Connection, cut: &Cut, e: &PumpError) -> CloseReason {
    if let Some(reason) = cut.reason() {
        return reason;
    }
    if conn.close_reason().is_some() {
        return CloseReason::Interrupted;
    }
    match e {
        PumpError::QuicRead(quinn::ReadError::Reset(code))
        | PumpError::QuicWrite(quinn::WriteError::Stopped(code)) => {
            CloseReason::from_stream_code(code.into_inner()).unwrap_or(CloseReason::Error)
        }
        PumpError::Tcp(e) => match e.kind() {
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof => CloseReason::Client,
            _ => CloseReason::Error,
        },
        _ => CloseReason::Error,
    }
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
enum PumpError {
    #[error("target connection: {0}")]
    Tcp(std::io::Error),
    #[error("tunnel read: {0}")]
    QuicRead(quinn::ReadError),
    #[error("tunnel write: {0}")]
    QuicWrite(quinn::WriteError),
}

/// Moves bytes both ways until both directions finish, keeping half-closes. QUIC chunks are
/// written to the target as they arrive and target reads are handed to QUIC without a copy;
/// a read buffer is replaced only when little of it is left, so pages are not faulted in anew
/// for every read.
async fn pump(
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    counters: &Counters,
) -> Result<(), PumpError> {
    let (mut tcp_r, mut tcp_w) = tcp.split();
    let target_to_gateway = async {
        let mut buf = BytesMut::with_capacity(PUMP_BUFFER);
        loop {
            if buf.capacity() < PUMP_BUFFER / 8 {
                buf.reserve(PUMP_BUFFER);
            }
            let n = tcp_r.read_buf(&mut buf).await.map_err(PumpError::Tcp)?;
            if n == 0 {
                let _ = send.finish();
                return Ok::<(), PumpError>(());
            }
            counters.down.fetch_add(n as u64, Ordering::Relaxed);
            send.write_chunk(buf.split().freeze())
                .await
                .map_err(PumpError::QuicWrite)?;
        }
    };
    let gateway_to_target = async {
        let mut chunks: [bytes::Bytes; 32] = Default::default();
        while let Some(n) = recv
            .read_chunks(&mut chunks)
            .await
            .map_err(PumpError::QuicRead)?
        {
            let got = chunks.get_mut(..n).unwrap_or_default();
            let len: u64 = got.iter().map(|c| c.len() as u64).sum();
            endpoint_types::chunk_write::write_all_chunks(&mut tcp_w, got)
                .await
                .map_err(PumpError::Tcp)?;
            counters.up.fetch_add(len, Ordering::Relaxed);
        }
        tcp_w.shutdown().await.map_err(PumpError::Tcp)?;
        Ok::<(), PumpError>(())
    };
    tokio::try_join!(target_to_gateway, gateway_to_target).map(|_| ())
}

pub(crate) fn cut_quic(send: &mut SendStream, recv: &mut RecvStream, reason: CloseReason) {
    // Either may already be closed; that is the state we want anyway. The code tells the
    // gateway why.
    let code = VarInt::from_u32(reason.stream_code());
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

/// Tells the gateway the target is connected; raw bytes (or the type's own framing) follow.
pub(crate) async fn accept(send: &mut SendStream) -> Result<(), WireError> {
    write_frame(send, &StreamAnswer::StreamAccept).await
}

pub(crate) async fn refuse(send: &mut SendStream, error: ApiError) {
    if write_frame(send, &StreamAnswer::StreamRefuse(error))
        .await
        .is_ok()
    {
        let _ = send.finish();
    }
}

/// What the engineer is told when the appliance refuses work it cannot record; the cause
/// (path, I/O error) stays in the appliance's log.
pub(crate) fn trail_refusal() -> ApiError {
    ApiError::new(
        ErrorCode::AuditUnavailable,
        "the appliance cannot write its audit trail, so it refuses work it could not record",
    )
    .hint("the customer must free space on (or repair) the disk holding audit_path; the appliance accepts work again once its trail is writable")
}

pub(crate) fn entry(kind: &'static str, open: &StreamOpen, detail: serde_json::Value) -> Entry {
    Entry::new(kind, open.operator.clone(), detail)
        .endpoint(open.endpoint_id.clone())
        .session(open.session_id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_types::{frame::EndpointGrant, resource::EndpointType};
    use std::path::Path;

    fn config() -> AgentConfig {
        AgentConfig::parse(
            "audit_path = \"a\"\n\
             [[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:7000\"\n\
             [[resource]]\nid = \"null_resource.other\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:7001\"\n\
             [[resource]]\nid = \"aws_eks_cluster.main\"\nkind = \"kubernetes\"\n",
            Path::new("/etc/postern/agent.toml"),
        )
        .unwrap()
    }

    fn now() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    fn operate_grant() -> endpoint_types::frame::LiveGrant {
        endpoint_types::frame::LiveGrant {
            grant_id: "gr_test".into(),
            level: endpoint_types::control::GrantLevel::Operate,
            approved_by: "bob@acme".into(),
            approved_at: now(),
            expires_at: now() + jiff::SignedDuration::from_secs(3600),
            signed_decision: None,
        }
    }

    #[test]
    fn no_live_operate_grant_means_no_session() {
        let mut t = table(&[("ep1", EndpointType::Tcp, "null_resource.echo")]);
        assert!(authorize(&t, &config(), &open("ep1", "null_resource.echo"), now()).is_ok());
        // Past the grant's expiry by our clock, even though the endpoint itself is live.
        let later = now() + jiff::SignedDuration::from_secs(3600);
        let mut g = operate_grant();
        g.expires_at = later + jiff::SignedDuration::from_secs(1);
        t.sync_grants(vec![g], now());
        let e = authorize(
            &t,
            &config(),
            &open("ep1", "null_resource.echo"),
            later + jiff::SignedDuration::from_secs(2),
        );
        assert!(e.is_err());
        // The gateway withdrawing the grant ends the endpoint as revoked.
        let removed = t.sync_grants(vec![], now());
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].reason, CloseReason::Revoked);
    }

    fn table(grants: &[(&str, EndpointType, &str)]) -> LiveEndpoints {
        let mut t = LiveEndpoints::new();
        t.sync_grants(vec![operate_grant()], now());
        for (id, ty, res) in grants {
            t.insert(
                EndpointGrant {
                    phase: endpoint_types::phase::operate(),
                    endpoint_id: id.to_string(),
                    endpoint_type: *ty,
                    resource_id: res.to_string(),
                    expires_at: now() + jiff::SignedDuration::from_secs(60),
                    grant_id: Some("gr_test".into()),
                    signed_decision: None,
                },
                now(),
            );
        }
        t
    }

    fn open(ep: &str, res: &str) -> StreamOpen {
        StreamOpen {
            endpoint_id: ep.into(),
            session_id: "ses_1".into(),
            resource_id: res.into(),
            operator: "alice".into(),
            client_addr: "203.0.113.9:5555".into(),
        }
    }

    fn code(r: Result<Admitted, ApiError>) -> ErrorCode {
        r.unwrap_err().code
    }

    #[test]
    fn live_tcp_grant_is_admitted_to_the_configured_target_only() {
        let t = table(&[("ep1", EndpointType::Tcp, "null_resource.echo")]);
        let a = authorize(&t, &config(), &open("ep1", "null_resource.echo"), now()).unwrap();
        assert_eq!(a.resource.target.as_deref(), Some("127.0.0.1:7000"));
    }

    #[test]
    fn unknown_retired_and_expired_endpoints_are_refused() {
        let mut t = table(&[("ep1", EndpointType::Tcp, "null_resource.echo")]);
        let c = config();
        assert_eq!(
            code(authorize(
                &t,
                &c,
                &open("nope", "null_resource.echo"),
                now()
            )),
            ErrorCode::ForbiddenByScope
        );
        let late = now() + jiff::SignedDuration::from_secs(60);
        assert_eq!(
            code(authorize(&t, &c, &open("ep1", "null_resource.echo"), late)),
            ErrorCode::EndpointExpired
        );
        t.close("ep1", CloseReason::Retired);
        assert_eq!(
            code(authorize(&t, &c, &open("ep1", "null_resource.echo"), now())),
            ErrorCode::EndpointRetired
        );
    }

    #[test]
    fn resource_must_match_the_grant_and_the_config() {
        let t = table(&[
            ("ep1", EndpointType::Tcp, "null_resource.echo"),
            ("ep2", EndpointType::Tcp, "null_resource.gone"),
        ]);
        let c = config();
        // The gateway cannot redirect a grant to another resource, even a configured one.
        assert_eq!(
            code(authorize(
                &t,
                &c,
                &open("ep1", "null_resource.other"),
                now()
            )),
            ErrorCode::InvalidOriginResourceId
        );
        assert_eq!(
            code(authorize(&t, &c, &open("ep2", "null_resource.gone"), now())),
            ErrorCode::InvalidOriginResourceId
        );
    }

    #[test]
    fn kind_mismatch_is_refused() {
        let t = table(&[
            ("ep1", EndpointType::Tcp, "aws_eks_cluster.main"),
            ("ep2", EndpointType::Kubectl, "aws_eks_cluster.main"),
        ]);
        let c = config();
        assert_eq!(
            code(authorize(
                &t,
                &c,
                &open("ep1", "aws_eks_cluster.main"),
                now()
            )),
            ErrorCode::ForbiddenByScope
        );
        let a = authorize(&t, &c, &open("ep2", "aws_eks_cluster.main"), now()).unwrap();
        assert_eq!(a.resource.kind, ResourceKind::Kubernetes);
    }

    #[test]
    fn admitted_session_is_cut_with_its_endpoint() {
        let mut t = table(&[("ep1", EndpointType::Tcp, "null_resource.echo")]);
        let a = authorize(&t, &config(), &open("ep1", "null_resource.echo"), now()).unwrap();
        t.close("ep1", CloseReason::Retired);
        assert_eq!(a.cut.reason(), Some(CloseReason::Retired));
    }
}
