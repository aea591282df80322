//! A startup the policy refused, after authentication: the client, the vendor trail and the
//! agent (for the customer's trail) all hear of it; nothing reaches the database.

use super::{deny, send_error, shared, Tls, HANDSHAKE_TIMEOUT};
use crate::endpoints::{front_ends::FrontEndContext, LiveEndpoint};
use bytes::BytesMut;
use endpoint_types::pgwire::{self, PgError};
use std::{net::SocketAddr, sync::Arc};

/// An authenticated client the startup policy refused: a FATAL for the client, `denied` in
/// the vendor trail, and the agent told, so the customer's trail has it too. The agent gets
/// the client's parameters marked with [`pgwire::REFUSED_PARAM`]: it applies its own policy
/// to them, records the refusal and answers without reaching the database; whatever it
/// answers, nothing more of this client goes anywhere.
pub(super) async fn refuse_startup(
    ctx: &FrontEndContext,
    mut tls: Box<Tls>,
    ep: &Arc<LiveEndpoint>,
    params: Vec<(String, String)>,
    e: PgError,
    client: SocketAddr,
) {
    tracing::info!(endpoint = %ep.id, %client, "postgres startup refused: {}", e.message);
    deny(&*ctx.audit, ep, &e).await;
    send_error(&mut tls, &e).await;
    drop(tls);
    let session_id = shared::new_session_id();
    let tell = async {
        let mut stream = shared::open_stream(ctx, ep, &session_id, client)
            .await
            .map_err(|e| e.message)?;
        let mut marked: Vec<(String, String)> = params
            .into_iter()
            .filter(|(k, _)| k != "user" && !k.to_ascii_lowercase().starts_with("postern."))
            .collect();
        marked.push((pgwire::REFUSED_PARAM.to_string(), e.message.clone()));
        let mut out = BytesMut::new();
        pgwire::startup_message(&mut out, &marked);
        stream
            .send
            .write_all(&out)
            .await
            .map_err(|e| e.to_string())?;
        let _ = stream.send.finish();
        // The agent's FATAL (or its reset): either way it has recorded the refusal.
        let _ = stream.recv.read_to_end(64 * 1024).await;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tell).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            tracing::warn!(endpoint = %ep.id, error = %why, "could not tell the agent of a refused startup")
        }
        Err(_) => {
            tracing::warn!(endpoint = %ep.id, "telling the agent of a refused startup timed out")
        }
    }
}
