//! TCP endpoints: a listener per endpoint; every accepted connection becomes one QUIC data
//! stream to the agent, which connects to the resource's configured target.

use super::{
    session::{
        agent_reason_read, agent_reason_write, closed, cut_stream, deny, new_session_id,
        open_stream, opened, DataStream, SessionSlot,
    },
    LiveEndpoint,
};
use crate::server::Gateway;
use bytes::{Bytes, BytesMut};
use endpoint_types::resource::CloseReason;
use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const PUMP_BUF: usize = 256 * 1024;

/// Binds on `preferred` if given and free, else on an ephemeral port of `host`. A std
/// listener, so it can be bound anywhere and registered with the data plane's reactor by
/// [`serve`].
pub fn bind(host: IpAddr, preferred: Option<SocketAddr>) -> std::io::Result<std::net::TcpListener> {
    let listener = match preferred.map(std::net::TcpListener::bind) {
        Some(Ok(l)) => l,
        _ => std::net::TcpListener::bind(SocketAddr::new(host, 0))?,
    };
    listener.set_nonblocking(true)?;
    Ok(listener)
}

pub async fn serve(gw: Arc<Gateway>, ep: Arc<LiveEndpoint>, listener: std::net::TcpListener) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            return tracing::error!(endpoint = %ep.id, error = %e, "cannot serve endpoint listener")
        }
    };
    loop {
        let (tcp, client) = tokio::select! {
            _ = ep.cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(endpoint = %ep.id, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        gw.tasks.spawn(session(gw.clone(), ep.clone(), tcp, client));
    }
}

async fn session(gw: Arc<Gateway>, ep: Arc<LiveEndpoint>, mut tcp: TcpStream, client: SocketAddr) {
    let session_id = new_session_id();
    let _slot = match SessionSlot::claim(&gw, &ep) {
        Ok(slot) => slot,
        Err(e) => return deny(&gw, &ep, &session_id, client, &e).await,
    };
    let opened_stream = tokio::select! {
        _ = ep.cancel.cancelled() => return,
        r = open_stream(&gw, &ep, &session_id, client) => r,
    };
    let DataStream {
        mut send,
        mut recv,
        leftover,
        connection,
    } = match opened_stream {
        Ok(stream) => stream,
        Err(e) => return deny(&gw, &ep, &session_id, client, &e).await,
    };
    opened(&gw, &ep, &session_id, client, serde_json::json!({})).await;
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let outcome = tokio::select! {
        r = pump(&mut tcp, &mut send, &mut recv, leftover, &up, &down) => Some(r),
        _ = ep.cancel.cancelled() => None,
    };
    let reason = match &outcome {
        Some(Ok(())) => CloseReason::Client,
        Some(Err(_)) if ep.cancel.is_cancelled() => ep.end_reason(),
        // The agent enforces expiry and retire on its own clock too and may cut first; its
        // reset code says why.
        Some(Err(e)) => e
            .agent_reason()
            .unwrap_or(if connection.close_reason().is_some() {
                CloseReason::Interrupted
            } else {
                CloseReason::Error
            }),
        None => ep.end_reason(),
    };
    if outcome.is_none() || matches!(outcome, Some(Err(_))) {
        cut_stream(&mut send, &mut recv, reason);
    }
    drop(tcp);
    let extra = match &outcome {
        Some(Err(e)) => serde_json::json!({ "error": e.to_string() }),
        _ => serde_json::json!({}),
    };
    closed(
        &gw,
        &ep,
        &session_id,
        reason,
        (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed)),
        started,
        extra,
    )
    .await;
}

/// Moves bytes both ways until both directions are finished, keeping half-closes: a client
/// EOF finishes the QUIC send side, a finished QUIC stream shuts down the TCP write side.
async fn pump(
    tcp: &mut TcpStream,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    leftover: Bytes,
    up: &AtomicU64,
    down: &AtomicU64,
) -> Result<(), PumpError> {
    let (mut tcp_r, mut tcp_w) = tcp.split();
    let client_to_agent = async {
        let mut buf = BytesMut::with_capacity(PUMP_BUF);
        loop {
            // Quinn holds each sent chunk until it is acknowledged; taking a fresh allocation
            // only when little is left keeps reads from faulting in new pages every time.
            if buf.capacity() < PUMP_BUF / 8 {
                buf.reserve(PUMP_BUF);
            }
            let n = tcp_r.read_buf(&mut buf).await.map_err(PumpError::Tcp)?;
            if n == 0 {
                let _ = send.finish();
                return Ok::<(), PumpError>(());
            }
            up.fetch_add(n as u64, Ordering::Relaxed);
            send.write_chunk(buf.split().freeze())
                .await
                .map_err(PumpError::QuicWrite)?;
        }
    };
    let agent_to_client = async {
        if !leftover.is_empty() {
            tcp_w.write_all(&leftover).await.map_err(PumpError::Tcp)?;
            down.fetch_add(leftover.len() as u64, Ordering::Relaxed);
        }
        let mut chunks: [Bytes; 32] = Default::default();
        while let Some(n) = recv
            .read_chunks(&mut chunks)
            .await
            .map_err(PumpError::QuicRead)?
        {
            let got = chunks.get_mut(..n).unwrap_or_default();
            down.fetch_add(got.iter().map(|c| c.len() as u64).sum(), Ordering::Relaxed);
            write_all_chunks(&mut tcp_w, got)
                .await
                .map_err(PumpError::Tcp)?;
        }
        tcp_w.shutdown().await.map_err(PumpError::Tcp)?;
        Ok::<(), PumpError>(())
    };
    tokio::try_join!(client_to_agent, agent_to_client).map(|_| ())
}

/// Writes every chunk with as few syscalls as the socket allows: QUIC hands data over in
/// packet-sized chunks, and one write per chunk would cost a syscall per ~1.2 KB.
async fn write_all_chunks(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    chunks: &mut [bytes::Bytes],
) -> std::io::Result<()> {
    use bytes::Buf;
    let mut first = 0;
    while first < chunks.len() {
        let slices: Vec<std::io::IoSlice<'_>> = chunks[first..]
            .iter()
            .map(|c| std::io::IoSlice::new(c))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && first < chunks.len() {
            let take = n.min(chunks[first].len());
            chunks[first].advance(take);
            n -= take;
            if chunks[first].is_empty() {
                first += 1;
            }
        }
    }
    Ok(())
}

impl PumpError {
    /// The reason the agent gave when it cut the stream.
    fn agent_reason(&self) -> Option<CloseReason> {
        match self {
            PumpError::QuicRead(e) => agent_reason_read(e),
            PumpError::QuicWrite(e) => agent_reason_write(e),
            PumpError::Tcp(_) => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum PumpError {
    #[error("client connection: {0}")]
    Tcp(std::io::Error),
    #[error("tunnel read: {0}")]
    QuicRead(quinn::ReadError),
    #[error("tunnel write: {0}")]
    QuicWrite(quinn::WriteError),
}
