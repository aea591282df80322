//! TCP endpoints: a listener per endpoint; every accepted connection must finish a TLS
//! handshake presenting the client certificate made for this endpoint (the operator's CSR,
//! signed by the gateway CA for the endpoint's lifetime) before it becomes one QUIC data
//! stream to the agent, which connects to the resource's configured target. A plain TCP
//! connection, another endpoint's certificate or an ended one is refused here and audited as
//! `denied`; the agent never hears of it.

use super::{
    credential::CredentialKey,
    front_ends::FrontEndContext,
    session::{
        agent_reason_read, agent_reason_write, closed, cut_stream, deny, new_session_id,
        open_stream, opened, DataStream, SessionSlot,
    },
    LiveEndpoint,
};
use bytes::{Bytes, BytesMut};
use endpoint_types::{
    api::{ClientCredential, EndpointAccess, EndpointState},
    resource::{CloseReason, EndpointType},
    ApiError, ErrorCode,
};
use jiff::Timestamp;
use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const PUMP_BUF: usize = 256 * 1024;
/// The common name the gateway gives every endpoint client certificate it signs.
const CN_PREFIX: &str = "postern:endpoint:";

/// Checks the credential sent with `create`: a CSR whose signature verifies.
pub fn validate(cred: Option<&ClientCredential>) -> Result<(), ApiError> {
    match cred {
        Some(ClientCredential::Tcp { csr_pem }) => certs::verified_csr_spki(csr_pem).map(|_| ()).map_err(|e| {
            ApiError::invalid(format!("the tcp credential is not a usable CSR: {e}")).hint("create the endpoint with the postern CLI, which makes one")
        }),
        _ => Err(ApiError::invalid("a tcp endpoint needs a client credential (a CSR)")
            .hint("create it with the postern CLI (or upgrade it): it makes a key and sends only its CSR")),
    }
}

/// What the endpoint's creator needs for `postern ops endpoint connect`: the listener, the CA
/// and the operator's CSR signed for exactly the endpoint's lifetime.
pub fn access(
    ctx: &FrontEndContext,
    ep: &LiveEndpoint,
    address: Option<&str>,
) -> Result<EndpointAccess, ApiError> {
    let Some(ClientCredential::Tcp { csr_pem }) = &ep.credential else {
        return Err(ApiError::internal(format!(
            "endpoint {} has no tcp credential",
            ep.id
        )));
    };
    let address =
        address.ok_or_else(|| ApiError::internal(format!("endpoint {} has no address", ep.id)))?;
    let cert_pem = ctx
        .ca
        .sign_client_csr(
            csr_pem,
            &format!("{CN_PREFIX}{}", ep.id),
            Timestamp::now(),
            ep.expires_at,
        )
        .map_err(|e| ApiError::internal(format!("cannot sign the tcp credential: {e}")))?;
    let ip = ctx.endpoint_host;
    let tls_server_name = if ip.is_loopback() || ip.is_unspecified() {
        "localhost".to_string()
    } else {
        ip.to_string()
    };
    Ok(EndpointAccess::Tcp {
        address: address.to_string(),
        tls_server_name,
        ca_pem: ctx.ca.cert_pem().to_string(),
        cert_pem,
    })
}

fn tls_config(ctx: &FrontEndContext) -> Result<rustls::ServerConfig, certs::CertError> {
    let id = &ctx.server_identity;
    let mut c = certs::server_config(
        &id.cert_pem,
        &id.key_pem,
        Some(ctx.ca.cert_pem()),
        certs::ClientAuth::Required,
        Vec::new(),
    )?;
    // No resumption: every connection presents its certificate and is matched to the endpoint.
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    c.send_tls13_tickets = 0;
    Ok(c)
}

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

pub async fn serve(
    ctx: Arc<FrontEndContext>,
    ep: Arc<LiveEndpoint>,
    listener: std::net::TcpListener,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            return tracing::error!(endpoint = %ep.id, error = %e, "cannot serve endpoint listener")
        }
    };
    let tls = match tls_config(&ctx) {
        Ok(c) => tokio_rustls::TlsAcceptor::from(Arc::new(c)),
        // Without TLS nobody could be authenticated: accept no one rather than everyone.
        Err(e) => {
            return tracing::error!(endpoint = %ep.id, error = %e, "tcp endpoint disabled: no TLS configuration")
        }
    };
    while let Some((tcp, client, permit)) =
        crate::admission::accept_admitted(&ctx.doors.tcp, &ep.cancel, &listener).await
    {
        ctx.tasks.spawn(session(
            ctx.clone(),
            ep.clone(),
            tls.clone(),
            (tcp, permit),
            client,
        ));
    }
}

/// Why a client that reached the listener is not this endpoint's: the refusal that is audited.
fn refused(code: ErrorCode, message: String) -> ApiError {
    ApiError::new(code, message).hint("connect with `postern ops endpoint connect <id>`, which presents the endpoint's client certificate")
}

/// The TLS handshake failed: say what it was (no TLS at all, an expired or unknown certificate).
fn handshake_refusal(e: &std::io::Error) -> ApiError {
    use rustls::{CertificateError, Error};
    let tls = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>());
    match tls {
        Some(Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => refused(
            ErrorCode::EndpointExpired,
            format!("client certificate expired: {e}"),
        ),
        Some(Error::NoCertificatesPresented) => refused(
            ErrorCode::Unauthenticated,
            "TLS client presented no certificate".into(),
        ),
        Some(_) => refused(
            ErrorCode::Unauthenticated,
            format!("TLS handshake failed: {e}"),
        ),
        None => refused(
            ErrorCode::Unauthenticated,
            format!("not a TLS client with the endpoint's certificate: {e}"),
        ),
    }
}

/// Admits only the certificate made for this endpoint while it is live. The chain was verified
/// against the gateway CA during the handshake, so the common name names the endpoint the
/// certificate was made for, which says why a foreign one is refused.
async fn admit(
    ctx: &FrontEndContext,
    ep: &LiveEndpoint,
    peer: Option<&[u8]>,
) -> Result<(), ApiError> {
    let Some(cert) = peer else {
        return Err(refused(
            ErrorCode::Unauthenticated,
            "TLS client presented no certificate".into(),
        ));
    };
    let presented = CredentialKey::of_certificate(EndpointType::Tcp, cert);
    let holder = presented
        .as_ref()
        .and_then(|k| ctx.endpoints.by_credential(k));
    if presented.is_some() && presented.as_ref() == ep.credential_key() {
        // Out of the index once it ended (or never in it, if another endpoint held the key).
        let indexed = holder.is_some_and(|h| std::ptr::eq(Arc::as_ptr(&h), ep));
        if ep.cancel.is_cancelled() || Timestamp::now() >= ep.expires_at || !indexed {
            let code =
                if ep.end_reason() == CloseReason::Expired || Timestamp::now() >= ep.expires_at {
                    ErrorCode::EndpointExpired
                } else {
                    ErrorCode::EndpointRetired
                };
            return Err(refused(code, format!("endpoint {} has ended", ep.id)));
        }
        return Ok(());
    }
    if let Some(other) = holder {
        return Err(refused(
            ErrorCode::Unauthenticated,
            format!(
                "certificate of endpoint {}, not of endpoint {}",
                other.id, ep.id
            ),
        ));
    }
    let named = certs::cert_common_name(cert)
        .ok()
        .and_then(|cn| cn.strip_prefix(CN_PREFIX).map(str::to_string));
    let Some(other) = named else {
        return Err(refused(
            ErrorCode::Unauthenticated,
            "certificate of no postern endpoint".into(),
        ));
    };
    let state = ctx
        .store
        .get_endpoint(&other)
        .await
        .ok()
        .flatten()
        .map(|r| r.state);
    Err(match state {
        Some(EndpointState::Retired) => refused(
            ErrorCode::EndpointRetired,
            format!("certificate of endpoint {other}, which is retired"),
        ),
        Some(EndpointState::Expired) => refused(
            ErrorCode::EndpointExpired,
            format!("certificate of endpoint {other}, which has expired"),
        ),
        _ => refused(
            ErrorCode::Unauthenticated,
            format!("certificate of endpoint {other}, not of endpoint {}", ep.id),
        ),
    })
}

async fn session(
    ctx: Arc<FrontEndContext>,
    ep: Arc<LiveEndpoint>,
    tls: tokio_rustls::TlsAcceptor,
    (tcp, permit): (TcpStream, crate::admission::Permit),
    client: SocketAddr,
) {
    let session_id = new_session_id();
    // Unauthenticated clients get the handshake grace time and not a moment more.
    let handshake = tokio::select! {
        _ = ep.cancel.cancelled() => return,
        r = tokio::time::timeout(ctx.limits.handshake_timeout, tls.accept(tcp)) => r,
    };
    let mut stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return deny(
                &*ctx.audit,
                &ep,
                &session_id,
                client,
                &handshake_refusal(&e),
            )
            .await
        }
        Err(_) => {
            let e = refused(
                ErrorCode::Unauthenticated,
                format!("no TLS handshake within {:?}", ctx.limits.handshake_timeout),
            );
            return deny(&*ctx.audit, &ep, &session_id, client, &e).await;
        }
    };
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let admitted = admit(&ctx, &ep, peer.as_deref()).await;
    // The certificate is checked: past the unauthenticated part.
    drop(permit);
    if let Err(e) = admitted {
        deny(&*ctx.audit, &ep, &session_id, client, &e).await;
        let _ = stream.shutdown().await;
        return;
    }
    let _slot = match SessionSlot::claim(&ep, ctx.limits.sessions_per_endpoint) {
        Ok(slot) => slot,
        Err(e) => return deny(&*ctx.audit, &ep, &session_id, client, &e).await,
    };
    let opened_stream = tokio::select! {
        _ = ep.cancel.cancelled() => return,
        r = open_stream(&ctx, &ep, &session_id, client) => r,
    };
    let DataStream {
        mut send,
        mut recv,
        leftover,
        connection,
    } = match opened_stream {
        Ok(stream) => stream,
        Err(e) => return deny(&*ctx.audit, &ep, &session_id, client, &e).await,
    };
    let trail = match opened(&ctx, &ep, &session_id, client, serde_json::json!({})).await {
        Ok(watch) => watch,
        Err(e) => {
            cut_stream(&mut send, &mut recv, CloseReason::Error);
            let _ = stream.shutdown().await;
            return deny(&*ctx.audit, &ep, &session_id, client, &e).await;
        }
    };
    let _ = stream.get_ref().0.set_nodelay(true);
    let started = Instant::now();
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let mut trail_down = false;
    let outcome = tokio::select! {
        r = pump(&mut stream, &mut send, &mut recv, leftover, &up, &down) => Some(r),
        _ = ep.cancel.cancelled() => None,
        // The vendor trail cannot be written: nothing more may pass unrecorded.
        _ = trail.cancelled() => { trail_down = true; None }
    };
    let reason = match &outcome {
        None if trail_down => CloseReason::Error,
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
    drop(stream);
    let extra = match &outcome {
        Some(Err(e)) => serde_json::json!({ "error": e.to_string() }),
        None if trail_down => {
            serde_json::json!({ "error": "the vendor audit trail cannot be written" })
        }
        _ => serde_json::json!({}),
    };
    closed(
        &*ctx.audit,
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
    tcp: &mut (impl AsyncRead + AsyncWrite + Unpin),
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    leftover: Bytes,
    up: &AtomicU64,
    down: &AtomicU64,
) -> Result<(), PumpError> {
    let (mut tcp_r, mut tcp_w) = tokio::io::split(tcp);
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
            endpoint_types::chunk_write::write_all_chunks(&mut tcp_w, got)
                .await
                .map_err(PumpError::Tcp)?;
        }
        tcp_w.shutdown().await.map_err(PumpError::Tcp)?;
        Ok::<(), PumpError>(())
    };
    tokio::try_join!(client_to_agent, agent_to_client).map(|_| ())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::{
        credential::test_credentials::csr,
        front_ends::fakes::{endpoint_row, Parts},
    };

    fn tcp_endpoint(parts: &Parts, id: &str) -> (Arc<LiveEndpoint>, Vec<u8>) {
        let (cred, csr_pem) = csr(EndpointType::Tcp);
        let row = endpoint_row(id, EndpointType::Tcp, EndpointState::Active, Some(cred));
        parts.store.put_endpoint(row.clone());
        (parts.go_live(&row), parts.sign(&csr_pem, id))
    }

    #[tokio::test]
    async fn only_the_certificate_made_for_this_live_endpoint_is_admitted() {
        let parts = Parts::new();
        let ctx = parts.context(4);
        let (ep, cert) = tcp_endpoint(&parts, "ep_a");
        let (_other, other_cert) = tcp_endpoint(&parts, "ep_b");

        admit(&ctx, &ep, Some(&cert)).await.unwrap();
        let e = admit(&ctx, &ep, None).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthenticated);
        let e = admit(&ctx, &ep, Some(&other_cert)).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthenticated);
        assert!(e.message.contains("ep_b"), "{}", e.message);
    }

    #[tokio::test]
    async fn a_certificate_of_an_ended_endpoint_is_refused_with_why() {
        let parts = Parts::new();
        let ctx = parts.context(4);
        let (ep, _) = tcp_endpoint(&parts, "ep_a");
        let (_old, old_cert) = tcp_endpoint(&parts, "ep_old");
        parts.retire("ep_old");
        let mut row = endpoint_row("ep_old", EndpointType::Tcp, EndpointState::Retired, None);
        row.ended_at = Some(Timestamp::now());
        parts.store.put_endpoint(row);
        // Presented to another endpoint: the store says which it was and that it is retired.
        let e = admit(&ctx, &ep, Some(&old_cert)).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::EndpointRetired);
        assert!(e.message.contains("ep_old"), "{}", e.message);

        // Presented to its own endpoint after it ended.
        let (own, own_cert) = tcp_endpoint(&parts, "ep_c");
        parts.retire("ep_c");
        let e = admit(&ctx, &own, Some(&own_cert)).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::EndpointRetired);
    }

    #[test]
    fn access_signs_the_operators_csr_for_the_endpoints_listener() {
        let parts = Parts::new();
        let ctx = parts.context(4);
        let (ep, _) = tcp_endpoint(&parts, "ep_a");
        let EndpointAccess::Tcp {
            address,
            tls_server_name,
            ca_pem,
            cert_pem,
        } = access(&ctx, &ep, Some("127.0.0.1:7000")).unwrap()
        else {
            panic!("not a tcp access");
        };
        assert_eq!(
            (address.as_str(), tls_server_name.as_str()),
            ("127.0.0.1:7000", "localhost")
        );
        assert_eq!(ca_pem, parts.ca.cert_pem());
        assert!(cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(access(&ctx, &ep, None).is_err(), "no address, no access");
    }
}
