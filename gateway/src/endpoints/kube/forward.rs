//! One kubectl client connection: each request is re-checked (endpoint still live), classified
//! and scope-checked, stripped of client identity headers, audited, and carried to the agent
//! as HTTP/1.1 over the connection's QUIC data stream (opened on the first request that needs
//! it, then kept). Upgrades (exec, attach, port-forward) become a byte pipe once the upstream
//! answered `101`; any other answer to an upgrade ends the connection.

use super::still_live;
use crate::{
    audit::Subject,
    endpoints::{
        front_ends::FrontEndContext,
        session::{self, SessionSlot},
        LiveEndpoint,
    },
};
use bytes::Bytes;
use endpoint_types::{
    kube_request::{
        asks_upgrade, classify, decide, display_resource, forbidden_status, forwardable_header,
        status_json, stream_target, Decision, KubeScope, RequestInfo,
    },
    resource::CloseReason,
    ErrorCode,
};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::{
    body::Incoming,
    client::conn::http1::SendRequest,
    header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE},
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tokio::{io::AsyncReadExt, net::TcpStream};

type Body = BoxBody<Bytes, hyper::Error>;
type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Request bodies above this are refused with 413 (DESIGN.md limits).
pub const MAX_BODY: usize = 10 * 1024 * 1024;

/// Why a connection gets only refusals.
pub enum Refusal {
    Unauthenticated,
    TooMany(String),
    Unavailable(String),
}

fn local(code: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *r.status_mut() = code;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    local(code, status_json(code.as_u16(), reason, message))
}

fn unauthenticated() -> Response<Body> {
    status(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "postern: this client certificate belongs to no live endpoint (it was retired or has expired); create a new endpoint",
    )
}

/// Answers every request on the connection with the same refusal, briefly.
pub async fn refuse_all(stream: TlsStream, why: Refusal) {
    let why = Arc::new(why);
    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
        let why = why.clone();
        async move {
            Ok::<_, Infallible>(match why.as_ref() {
                Refusal::Unauthenticated => unauthenticated(),
                Refusal::TooMany(m) => status(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TooManyRequests",
                    &format!("postern: {m}"),
                ),
                Refusal::Unavailable(m) => status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    &format!("postern: {m}"),
                ),
            })
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc);
    let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
}

struct Conn {
    ctx: Arc<FrontEndContext>,
    ep: Arc<LiveEndpoint>,
    scope: KubeScope,
    client: SocketAddr,
    session_id: String,
    upstream: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
    opened: AtomicBool,
    requests: AtomicU64,
    /// The byte pipe of an upgraded request (exec, attach, port-forward): the session lasts
    /// until it ends, though hyper considers the HTTP connection done at the upgrade.
    upgraded: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

pub async fn serve_connection(
    ctx: Arc<FrontEndContext>,
    ep: Arc<LiveEndpoint>,
    scope: KubeScope,
    stream: TlsStream,
    client: SocketAddr,
    slot: SessionSlot,
) {
    let started = Instant::now();
    let conn = Arc::new(Conn {
        ctx: ctx.clone(),
        ep: ep.clone(),
        scope,
        client,
        session_id: session::new_session_id(),
        upstream: tokio::sync::Mutex::new(None),
        opened: AtomicBool::new(false),
        requests: AtomicU64::new(0),
        upgraded: std::sync::Mutex::new(None),
    });
    let c = conn.clone();
    let svc = hyper::service::service_fn(move |req| {
        let c = c.clone();
        async move { Ok::<_, Infallible>(c.handle(req).await) }
    });
    let http = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    let serve = async {
        let r = http.await;
        let pipe = conn.upgraded.lock().ok().and_then(|mut u| u.take());
        if let Some(pipe) = pipe {
            let _ = pipe.await;
        }
        r
    };
    // While the trail is down, requests get the refusal from `open` (a 503 saying why); once
    // this connection's session is open, the trail going down cuts it.
    let trail = ctx.audit.session_watch().unwrap_or_default();
    let reason = tokio::select! {
        r = serve => if r.is_ok() { CloseReason::Client } else { CloseReason::Error },
        _ = ep.cancel.cancelled() => ep.end_reason(),
        _ = trail.cancelled() => CloseReason::Error,
    };
    if conn.opened.load(Ordering::Relaxed) {
        let extra = serde_json::json!({"requests": conn.requests.load(Ordering::Relaxed)});
        session::closed(
            &*ctx.audit,
            &ep,
            &conn.session_id,
            reason,
            (0, 0),
            started,
            extra,
        )
        .await;
    }
    drop(slot);
}

/// The reason of the appliance's own scope refusal: the message of a `403` Status the agent
/// made (it prefixes it); `None` for any other 403 (the cluster's RBAC).
fn appliance_refusal(body: &[u8]) -> Option<String> {
    const PREFIX: &str = "postern endpoint scope: ";
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let message = v.get("message")?.as_str()?;
    message
        .strip_prefix(PREFIX)
        .filter(|m| m.starts_with("(appliance) "))
        .map(str::to_string)
}

/// Headers that never cross: the client's identity claims (the appliance authenticates
/// upstream with its own credentials) and hop-by-hop headers ([`forwardable_header`]).
fn forwardable(name: &HeaderName, upgrade: bool) -> bool {
    forwardable_header(name.as_str(), upgrade)
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    asks_upgrade(
        req.headers().contains_key(hyper::header::UPGRADE),
        req.headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

impl Conn {
    async fn handle(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !still_live(&self.ctx.endpoints, &self.ep) {
            return unauthenticated();
        }
        let method = req.method().as_str().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        let info = match classify(&method, &path, query.as_deref()) {
            Ok(i) => i,
            Err(e) => {
                self.audit(None, &method, &path, None, 400, Some(&e.to_string()));
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("postern: {e}"),
                );
            }
        };
        if let Decision::Deny { reason } = decide(&info, &self.scope) {
            self.audit(
                Some(&info),
                &method,
                &path,
                query.as_deref(),
                403,
                Some(&reason),
            );
            return local(StatusCode::FORBIDDEN, forbidden_status(&reason));
        }
        let too_large = || {
            status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                &format!("postern: request bodies are limited to {MAX_BODY} bytes"),
            )
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            self.audit(Some(&info), &method, &path, query.as_deref(), 413, None);
            return too_large();
        }
        let upgrade = is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let body = if upgrade {
            Bytes::new()
        } else {
            match Limited::new(body, MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    self.audit(Some(&info), &method, &path, query.as_deref(), 413, None);
                    return too_large();
                }
            }
        };
        let target = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut out = Request::builder().method(parts.method.clone()).uri(target);
        for (k, v) in parts
            .headers
            .iter()
            .filter(|(k, _)| forwardable(k, upgrade))
        {
            out = out.header(k, v);
        }
        let Ok(out) = out.body(Full::new(body)) else {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "postern: the request could not be rebuilt",
            );
        };

        let mut resp = match self.send(out, upgrade).await {
            Ok(r) => r,
            Err((code, msg)) => {
                self.audit(
                    Some(&info),
                    &method,
                    &path,
                    query.as_deref(),
                    code.as_u16(),
                    Some(&msg),
                );
                return status(
                    code,
                    if code == StatusCode::FORBIDDEN {
                        "Forbidden"
                    } else {
                        "ServiceUnavailable"
                    },
                    &format!("postern: {msg}"),
                );
            }
        };
        // The appliance refused it (its own scope decision, e.g. a write without an identity
        // to impersonate): its reason goes into this trail too, as a denial.
        if resp.status() == StatusCode::FORBIDDEN {
            let (mut parts, body) = resp.into_parts();
            let bytes = Limited::new(body, 64 * 1024)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let reason = appliance_refusal(&bytes);
            self.audit(
                Some(&info),
                &method,
                &path,
                query.as_deref(),
                403,
                reason.as_deref(),
            );
            if upgrade {
                parts
                    .headers
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            return Response::from_parts(
                parts,
                Full::new(bytes).map_err(|n: Infallible| match n {}).boxed(),
            );
        }
        self.audit(
            Some(&info),
            &method,
            &path,
            query.as_deref(),
            resp.status().as_u16(),
            None,
        );
        if let Some(client_upgrade) = client_upgrade {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let cancel = self.ep.cancel.clone();
                let pipe = self.ctx.tasks.spawn(async move {
                    let (Ok(c), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) else {
                        return;
                    };
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut c, &mut u) => {}
                        _ = cancel.cancelled() => {}
                    }
                });
                if let Ok(mut u) = self.upgraded.lock() {
                    *u = Some(pipe);
                }
            } else {
                // An upgrade the upstream refused ends the connection: no half-upgraded state.
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
        }
        resp.map(|b| b.boxed())
    }

    /// Sends on the connection's data stream, opening it first if needed.
    async fn send(
        &self,
        req: Request<Full<Bytes>>,
        upgrade: bool,
    ) -> Result<Response<Incoming>, (StatusCode, String)> {
        let mut guard = self.upstream.lock().await;
        if guard.as_ref().is_none_or(|s| s.is_closed()) {
            *guard = Some(self.open().await?);
        }
        let Some(sender) = guard.as_mut() else {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "no stream to the appliance".into(),
            ));
        };
        let sent = async {
            sender.ready().await?;
            sender.send_request(req).await
        };
        let r = sent.await.map_err(|e| {
            (
                StatusCode::BAD_GATEWAY,
                format!("the appliance did not answer: {e}"),
            )
        });
        if upgrade || r.is_err() {
            // The stream now carries the upgraded bytes (or is broken): never reuse it.
            *guard = None;
        }
        r
    }

    async fn open(&self) -> Result<SendRequest<Full<Bytes>>, (StatusCode, String)> {
        let ds = session::open_stream(&self.ctx, &self.ep, &self.session_id, self.client)
            .await
            .map_err(|e| {
                let code = if e.code == ErrorCode::ForbiddenByScope {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, e.message)
            })?;
        let reader = std::io::Cursor::new(ds.leftover).chain(ds.recv);
        let io = tokio::io::join(reader, ds.send);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, Full<Bytes>>(TokioIo::new(io))
            .await
            .map_err(|e| {
                (
                    StatusCode::BAD_GATEWAY,
                    format!("could not start HTTP to the appliance: {e}"),
                )
            })?;
        let cancel = self.ep.cancel.clone();
        self.ctx.tasks.spawn(async move {
            tokio::select! {
                _ = conn.with_upgrades() => {}
                _ = cancel.cancelled() => {}
            }
        });
        if !self.opened.swap(true, Ordering::Relaxed) {
            session::opened(
                &self.ctx,
                &self.ep,
                &self.session_id,
                self.client,
                serde_json::json!({}),
            )
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.message))?;
        }
        Ok(sender)
    }

    /// `kube.request` in the vendor trail (and `denied` for refusals), written off the
    /// request path so the audit store does not add to every request's latency.
    fn audit(
        &self,
        info: Option<&RequestInfo<'_>>,
        method: &str,
        path: &str,
        query: Option<&str>,
        code: u16,
        denied: Option<&str>,
    ) {
        let target = info.and_then(|i| stream_target(i, query));
        let detail = serde_json::json!({
            "command": target.as_ref().map(|t| t.command.clone()),
            "container": target.and_then(|t| t.container),
            "verb": info.map(|i| i.verb.to_string()).unwrap_or_else(|| method.to_lowercase()),
            "resource": info.map(|i| i.resource.to_string()).unwrap_or_default(),
            "subresource": info.map(|i| i.subresource.to_string()).unwrap_or_default(),
            "namespace": info.and_then(|i| i.namespace.as_deref().map(str::to_string)),
            "name": info.map(|i| i.name.to_string()).unwrap_or_default(),
            "api_group": info.map(|i| i.api_group.to_string()).unwrap_or_default(),
            "path": path,
            "code": code,
            "endpoint": self.ep.id,
            "session": self.session_id,
            "operator": self.ep.operator,
            "reason": denied,
        });
        let denial = denied.map(|reason| {
            serde_json::json!({
                "action": "kube.request", "code": code, "reason": reason, "method": method, "path": path,
                "resource": info.map(display_resource), "client_addr": self.client.to_string(),
            })
        });
        let (ctx, ep, session_id) = (self.ctx.clone(), self.ep.clone(), self.session_id.clone());
        self.ctx.tasks.spawn(async move {
            let subject = || Subject::session(&ep.appliance_id, &ep.id, &session_id);
            ctx.audit
                .record("kube.request", &ep.operator, subject(), detail)
                .await;
            if let Some(d) = denial {
                ctx.audit.record("denied", &ep.operator, subject(), d).await;
            }
        });
    }
}
