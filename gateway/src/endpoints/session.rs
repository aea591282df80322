//! What every endpoint type does per client session: claim a slot under the endpoint's
//! session limit, open the QUIC data stream to the agent, and audit open, close and refusal.

use super::{front_ends::FrontEndContext, LiveEndpoint};
use crate::{
    audit::Subject,
    framed::{write_frame, FramedError, FramedRecv},
    identity::random_hex,
    ports::AuditSink,
};
use bytes::Bytes;
use endpoint_types::{
    frame::{StreamAnswer, StreamHeader, StreamOpen, MAX_STREAM_HEADER_LEN},
    resource::CloseReason,
    ApiError, ErrorCode,
};
use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;

const STREAM_SETUP_TIMEOUT: Duration = Duration::from_secs(10);

pub fn new_session_id() -> String {
    format!("ses_{}", random_hex(8))
}

/// One live session of an endpoint; the count drops however the session ends.
#[derive(Debug)]
pub struct SessionSlot(Arc<LiveEndpoint>);

impl SessionSlot {
    /// Claims a slot, or refuses past the endpoint's session limit (each type shows the
    /// refusal its clients understand: HTTP 429, SQLSTATE 53300, an SSH open failure).
    pub fn claim(ep: &Arc<LiveEndpoint>, limit: u64) -> Result<SessionSlot, ApiError> {
        let n = ep.live_sessions.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = SessionSlot(ep.clone());
        if n > limit {
            return Err(ApiError::new(
                ErrorCode::SessionLimit,
                format!("endpoint {} already has {} sessions", ep.id, n - 1),
            )
            .hint("close a session, or ask for a higher limit"));
        }
        Ok(slot)
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.live_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A data stream the agent accepted: its raw bytes (or the type's framing) follow.
#[derive(Debug)]
pub struct DataStream {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    /// Bytes the agent sent after its accept frame, already read.
    pub leftover: Bytes,
    pub connection: quinn::Connection,
}

/// Opens a data stream to the endpoint's agent and waits for its decision.
pub async fn open_stream(
    ctx: &FrontEndContext,
    ep: &LiveEndpoint,
    session_id: &str,
    client: SocketAddr,
) -> Result<DataStream, ApiError> {
    // Nothing starts that the vendor trail could not record.
    ctx.audit.session_watch().map_err(|e| e.to_api_error())?;
    let connection = ctx.agents.connection(&ep.appliance_id).ok_or_else(|| {
        ApiError::new(
            ErrorCode::ApplianceOffline,
            format!("appliance {} is offline", ep.appliance_id),
        )
    })?;
    let offline = |e: String| {
        ApiError::new(
            ErrorCode::ApplianceOffline,
            format!("could not reach the agent: {e}"),
        )
    };
    let (mut send, recv) = tokio::time::timeout(STREAM_SETUP_TIMEOUT, connection.open_bi())
        .await
        .map_err(|_| offline("timed out opening a stream".into()))?
        .map_err(|e| offline(e.to_string()))?;
    let header = StreamHeader::StreamOpen(StreamOpen {
        endpoint_id: ep.id.clone(),
        session_id: session_id.to_string(),
        resource_id: ep.resource_id.clone(),
        operator: ep.operator.clone(),
        client_addr: client.to_string(),
    });
    write_frame(&mut send, &header)
        .await
        .map_err(|e| offline(e.to_string()))?;
    let mut framed = FramedRecv::<StreamAnswer>::new(recv, MAX_STREAM_HEADER_LEN);
    match framed.next_within(STREAM_SETUP_TIMEOUT).await {
        Ok(Some(StreamAnswer::StreamAccept)) => {
            let (recv, leftover) = framed.into_parts();
            Ok(DataStream {
                send,
                recv,
                leftover,
                connection,
            })
        }
        Ok(Some(StreamAnswer::StreamRefuse(e))) => Err(e),
        Ok(None) => Err(offline("the agent closed the stream".into())),
        Err(FramedError::Frame(e)) => Err(e.to_api_error()),
        Err(e) => Err(offline(e.to_string())),
    }
}

/// Cuts both directions of a data stream, telling the agent why.
pub fn cut_stream(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, reason: CloseReason) {
    let code = quinn::VarInt::from_u32(reason.stream_code());
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

/// The reason the agent gave when it cut a stream, from its reset or stop code.
pub fn agent_reason_read(e: &quinn::ReadError) -> Option<CloseReason> {
    match e {
        quinn::ReadError::Reset(c) => CloseReason::from_stream_code(c.into_inner()),
        _ => None,
    }
}

pub fn agent_reason_write(e: &quinn::WriteError) -> Option<CloseReason> {
    match e {
        quinn::WriteError::Stopped(c) => CloseReason::from_stream_code(c.into_inner()),
        _ => None,
    }
}

pub async fn deny(
    audit: &dyn AuditSink,
    ep: &LiveEndpoint,
    session_id: &str,
    client: SocketAddr,
    err: &ApiError,
) {
    tracing::info!(endpoint = %ep.id, %client, code = %err.code, "session refused: {}", err.message);
    audit
        .record("denied", &ep.operator, Subject::session(&ep.appliance_id, &ep.id, session_id), serde_json::json!({
            "action": "session", "client_addr": client.to_string(), "code": err.code, "reason": err.message,
        }))
        .await;
}

/// Counts and audits a session the agent accepted. `extra` adds type-specific fields.
/// Returns the token that is cancelled when the vendor trail can no longer be written (the
/// session must then be cut with reason `error`), or the refusal if `session.opened` itself
/// could not be stored: then the session must not go ahead.
pub async fn opened(
    ctx: &FrontEndContext,
    ep: &LiveEndpoint,
    session_id: &str,
    client: SocketAddr,
    extra: serde_json::Value,
) -> Result<tokio_util::sync::CancellationToken, ApiError> {
    if let Err(e) = ctx.store.count_session(&ep.id).await {
        tracing::error!(error = %e, "could not count session");
    }
    let mut detail = serde_json::json!({
        "client_addr": client.to_string(), "origin_resource_id": ep.resource_id, "type": ep.endpoint_type.as_str(),
    });
    merge(&mut detail, extra);
    let watch = ctx.audit.session_watch().map_err(|e| e.to_api_error())?;
    ctx.audit
        .record_before(
            "session.opened",
            &ep.operator,
            Subject::session(&ep.appliance_id, &ep.id, session_id),
            detail,
        )
        .await
        .map_err(|e| e.to_api_error())?;
    Ok(watch)
}

/// Audits a session's end. `extra` adds type-specific fields (an error, a recording id).
pub async fn closed(
    audit: &dyn AuditSink,
    ep: &LiveEndpoint,
    session_id: &str,
    reason: CloseReason,
    (bytes_up, bytes_down): (u64, u64),
    started: Instant,
    extra: serde_json::Value,
) {
    let mut detail = serde_json::json!({
        "type": ep.endpoint_type.as_str(),
        "reason": reason.as_str(),
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "duration_ms": started.elapsed().as_millis() as u64,
    });
    merge(&mut detail, extra);
    audit
        .record(
            "session.closed",
            &ep.operator,
            Subject::session(&ep.appliance_id, &ep.id, session_id),
            detail,
        )
        .await;
}

fn merge(into: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(into), serde_json::Value::Object(extra)) = (into.as_object_mut(), extra) {
        into.extend(extra);
    }
}

/// The next client of a listener, or None once the gateway shuts down. Accept errors (out of
/// file descriptors, mostly) are logged and retried after a short pause rather than ending
/// the listener.
pub async fn accept_next(
    shutdown: &CancellationToken,
    listener: &tokio::net::TcpListener,
    what: &str,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(c) => return Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::front_ends::fakes::{endpoint_row, Parts};
    use endpoint_types::{api::EndpointState, resource::EndpointType};
    use std::sync::atomic::Ordering::SeqCst;

    fn client() -> SocketAddr {
        "127.0.0.1:40000".parse().unwrap()
    }

    fn live(parts: &Parts) -> Arc<LiveEndpoint> {
        parts.go_live(&endpoint_row(
            "ep_1",
            EndpointType::Postgres,
            EndpointState::Active,
            None,
        ))
    }

    #[test]
    fn a_session_past_the_endpoint_limit_is_refused_and_a_slot_frees_when_dropped() {
        let ep = live(&Parts::new());
        let first = SessionSlot::claim(&ep, 2).unwrap();
        let _second = SessionSlot::claim(&ep, 2).unwrap();
        let e = SessionSlot::claim(&ep, 2).unwrap_err();
        assert_eq!(e.code, ErrorCode::SessionLimit);
        assert_eq!(
            ep.live_sessions.load(Ordering::Relaxed),
            2,
            "the refused claim holds nothing"
        );
        drop(first);
        assert!(SessionSlot::claim(&ep, 2).is_ok());
    }

    #[tokio::test]
    async fn no_stream_is_asked_of_an_offline_agent_nor_while_the_trail_is_down() {
        let parts = Parts::new();
        let ctx = parts.context(4);
        let ep = live(&parts);
        let e = open_stream(&ctx, &ep, "ses_1", client()).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::ApplianceOffline);
        assert!(e.message.contains("ap_1"), "{}", e.message);

        parts.audit.fail_before.store(true, SeqCst);
        let e = open_stream(&ctx, &ep, "ses_1", client()).await.unwrap_err();
        assert_eq!(
            e.code,
            ErrorCode::Internal,
            "the trail refuses before any agent is asked"
        );
    }

    #[tokio::test]
    async fn an_opened_session_is_counted_and_recorded_before_it_goes_ahead() {
        let parts = Parts::new();
        let ctx = parts.context(4);
        let ep = live(&parts);
        opened(
            &ctx,
            &ep,
            "ses_1",
            client(),
            serde_json::json!({"database": "app"}),
        )
        .await
        .unwrap();
        assert_eq!(
            *parts.store.counted.lock().unwrap(),
            vec!["ep_1".to_string()]
        );
        let rec = parts.audit.of_kind("session.opened");
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].actor, "bob");
        assert_eq!(rec[0].subject.session_id.as_deref(), Some("ses_1"));
        assert_eq!(rec[0].detail["type"], "postgres");
        assert_eq!(rec[0].detail["database"], "app");
        assert_eq!(rec[0].detail["origin_resource_id"], "res_1");
        assert_eq!(rec[0].detail["client_addr"], "127.0.0.1:40000");

        // A trail that cannot take the record stops the session.
        parts.audit.fail_before.store(true, SeqCst);
        let e = opened(&ctx, &ep, "ses_2", client(), serde_json::json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Internal);
        assert_eq!(parts.audit.of_kind("session.opened").len(), 1);
    }

    #[tokio::test]
    async fn refusals_and_ends_are_recorded_with_their_reason() {
        let parts = Parts::new();
        let ep = live(&parts);
        let refusal = ApiError::new(
            ErrorCode::SessionLimit,
            "endpoint ep_1 already has 2 sessions",
        );
        deny(&*parts.audit, &ep, "ses_2", client(), &refusal).await;
        closed(
            &*parts.audit,
            &ep,
            "ses_1",
            CloseReason::Retired,
            (3, 5),
            Instant::now(),
            serde_json::json!({"requests": 2}),
        )
        .await;
        assert_eq!(parts.audit.kinds(), ["denied", "session.closed"]);
        let denied = &parts.audit.of_kind("denied")[0];
        assert_eq!(denied.detail["code"], "SESSION_LIMIT");
        assert_eq!(denied.detail["action"], "session");
        assert_eq!(denied.detail["reason"], refusal.message);
        let closed = &parts.audit.of_kind("session.closed")[0];
        assert_eq!(closed.detail["reason"], "retired");
        assert_eq!(
            (
                closed.detail["bytes_up"].as_u64(),
                closed.detail["bytes_down"].as_u64()
            ),
            (Some(3), Some(5))
        );
        assert_eq!(closed.detail["requests"], 2);
    }

    #[tokio::test]
    async fn a_listener_stops_accepting_at_shutdown() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let next = tokio::time::timeout(
            Duration::from_secs(5),
            accept_next(&shutdown, &listener, "test"),
        )
        .await
        .expect("accept_next returns at shutdown without a client");
        assert!(next.is_none());
    }
}
