//! Cancel keys: each session gets one no other live session holds, freed when it ends; a
//! client's CancelRequest with it is carried to the agent of that session.

use super::{random_bytes, shared, CancelTarget, Front, HANDSHAKE_TIMEOUT};
use crate::{audit::Subject, endpoints::front_ends::FrontEndContext};
use bytes::BytesMut;
use endpoint_types::pgwire::{self, CancelKey};
use std::{net::SocketAddr, sync::Arc};

/// A mint of cancel keys no other live session holds.
pub(super) fn mint_key(front: &Front, target: CancelTarget) -> CancelKey {
    let mut cancels = front.cancels();
    loop {
        let [a, b, c, d, e, f, g, h] = random_bytes::<8>();
        let key = CancelKey {
            process_id: i32::from_be_bytes([a & 0x7f, b, c, d]).max(1),
            secret: i32::from_be_bytes([e, f, g, h]),
        };
        if let std::collections::hash_map::Entry::Vacant(v) = cancels.entry(key) {
            v.insert(target);
            return key;
        }
    }
}

/// Frees the session's cancel key however the session ends.
pub(super) struct KeyGuard<'a>(pub &'a Front, pub CancelKey);

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.0.cancels().remove(&self.1);
    }
}

/// A client's CancelRequest: routed to the session its key was minted for; the agent sends
/// the real key to the database. As PostgreSQL does, the client gets no answer either way.
pub(super) async fn cancel(
    ctx: &Arc<FrontEndContext>,
    front: &Front,
    key: CancelKey,
    client: SocketAddr,
) {
    let target = front.cancels().get(&key).cloned();
    let Some(CancelTarget {
        endpoint: ep,
        session_id,
    }) = target
    else {
        tracing::info!(%client, "cancel request with an unknown key");
        return;
    };
    ctx.audit
        .record(
            "sql.cancel",
            &ep.operator,
            Subject::session(&ep.appliance_id, &ep.id, &session_id),
            serde_json::json!({
                "client_addr": client.to_string(),
            }),
        )
        .await;
    let sent = async {
        let mut stream = shared::open_stream(ctx, &ep, &session_id, client)
            .await
            .map_err(|e| e.message)?;
        let mut out = BytesMut::new();
        pgwire::cancel_request(&mut out, key);
        stream
            .send
            .write_all(&out)
            .await
            .map_err(|e| e.to_string())?;
        let _ = stream.send.finish();
        // Wait for the agent to finish, so the cancel has been sent when we close.
        let _ = stream.recv.read_to_end(64).await;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, sent).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(endpoint = %ep.id, error = %e, "could not pass a cancel request to the agent")
        }
        Err(_) => tracing::warn!(endpoint = %ep.id, "cancel request timed out"),
    }
}
