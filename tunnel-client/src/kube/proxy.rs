//! The agent's scoped Kubernetes proxy, one instance per endpoint stream or per `kubectl` op:
//! every request is classified and checked against the customer's scope, stripped of any
//! identity the client claims, sent upstream with the appliance's credential (as the
//! impersonated identity when the resource names one), and recorded as `kube.request`.

use super::upstream::Upstream;
use bytes::Bytes;
use endpoint_types::kube_request::{
    asks_upgrade, classify, decide, display_resource, forbidden_status, forwardable_header,
    status_json, stream_target, Decision, KubeScope, RequestInfo,
};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::{
    body::Incoming,
    header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST},
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};
use tokio_util::sync::CancellationToken;

pub type Body = BoxBody<Bytes, hyper::Error>;
const MAX_BODY: usize = 10 * 1024 * 1024;

/// Where a proxy's records go: `(kind, detail)`, kind `kube.request` or `denied`.
pub type AuditSink = Box<dyn Fn(&'static str, serde_json::Value) + Send + Sync>;

pub struct Proxy {
    scope: KubeScope,
    upstream: Arc<Upstream>,
    impersonate: Vec<(HeaderName, HeaderValue)>,
    /// Cancelled when the endpoint or op ends: upgraded pipes stop, requests are refused.
    stop: CancellationToken,
    audit: AuditSink,
    /// The byte pipe of an upgraded request; the connection lasts until it ends.
    upgraded: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// `Impersonate-User`/`Impersonate-Group` headers for a resource's `impersonate`.
pub fn impersonation_headers(
    resource: &crate::config::ResourceConfig,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    if let Some(i) = &resource.impersonate {
        for (name, v) in i
            .user
            .iter()
            .map(|u| ("impersonate-user", u))
            .chain(i.groups.iter().map(|g| ("impersonate-group", g)))
        {
            if let Ok(v) = HeaderValue::from_str(v) {
                out.push((HeaderName::from_static(name), v));
            }
        }
    }
    out
}

pub fn local(code: StatusCode, body: String) -> Response<Body> {
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

/// The headers that cross to the API server ([`forwardable_header`]), except `Host`: the
/// request names the upstream's own authority instead.
pub(super) fn forwardable(name: &HeaderName, upgrade: bool) -> bool {
    *name != HOST && forwardable_header(name.as_str(), upgrade)
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

impl Proxy {
    pub fn new(
        scope: KubeScope,
        upstream: Arc<Upstream>,
        impersonate: Vec<(HeaderName, HeaderValue)>,
        stop: CancellationToken,
        audit: AuditSink,
    ) -> Proxy {
        Proxy {
            scope,
            upstream,
            impersonate,
            stop,
            audit,
            upgraded: Mutex::new(None),
        }
    }

    /// The upgraded pipe, if a request upgraded: the caller awaits it before it calls the
    /// connection done.
    pub fn take_upgraded(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.upgraded.lock().ok().and_then(|mut u| u.take())
    }

    pub async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        if self.stop.is_cancelled() {
            return local(
                StatusCode::UNAUTHORIZED,
                status_json(401, "Unauthorized", "postern: this endpoint has ended"),
            );
        }
        let method = req.method().as_str().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        let info = match classify(&method, &path, query.as_deref()) {
            Ok(i) => i,
            Err(e) => {
                self.record(None, &method, &path, None, 400, Some(&e.to_string()));
                return local(
                    StatusCode::BAD_REQUEST,
                    status_json(400, "BadRequest", &format!("postern agent: {e}")),
                );
            }
        };
        if let Decision::Deny { reason } = decide(&info, &self.scope) {
            self.record(
                Some(&info),
                &method,
                &path,
                query.as_deref(),
                403,
                Some(&reason),
            );
            return local(
                StatusCode::FORBIDDEN,
                forbidden_status(&format!("(appliance) {reason}")),
            );
        }
        if req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            self.record(Some(&info), &method, &path, query.as_deref(), 413, None);
            return local(
                StatusCode::PAYLOAD_TOO_LARGE,
                status_json(
                    413,
                    "RequestEntityTooLarge",
                    "postern agent: request body too large",
                ),
            );
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
                    return local(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        status_json(
                            413,
                            "RequestEntityTooLarge",
                            "postern agent: request body too large",
                        ),
                    )
                }
            }
        };
        let target = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut out = Request::builder()
            .method(parts.method.clone())
            .uri(target)
            .header(HOST, self.upstream.authority());
        for (k, v) in parts
            .headers
            .iter()
            .filter(|(k, _)| forwardable(k, upgrade))
        {
            out = out.header(k, v);
        }
        match self.upstream.authorization().await {
            Ok(Some(auth)) => out = out.header(hyper::header::AUTHORIZATION, auth),
            Ok(None) => {}
            Err(e) => {
                return self.unavailable(&info, &method, &path, query.as_deref(), &e.to_string())
            }
        }
        for (k, v) in &self.impersonate {
            out = out.header(k, v);
        }
        let Ok(out) = out.body(Full::new(body)) else {
            return local(
                StatusCode::BAD_REQUEST,
                status_json(
                    400,
                    "BadRequest",
                    "postern agent: the request could not be rebuilt",
                ),
            );
        };
        let mut resp = match self.upstream.send(out, upgrade).await {
            Ok(r) => r,
            Err(e) => {
                return self.unavailable(&info, &method, &path, query.as_deref(), &e.to_string())
            }
        };
        if resp.status() == StatusCode::UNAUTHORIZED {
            self.upstream.credential_refused().await;
        }
        self.record(
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
                let stop = self.stop.clone();
                let pipe = tokio::spawn(async move {
                    let (Ok(c), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) else {
                        return;
                    };
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut c, &mut u) => {}
                        () = stop.cancelled() => {}
                    }
                });
                if let Ok(mut u) = self.upgraded.lock() {
                    *u = Some(pipe);
                }
            } else {
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
        }
        resp.map(|b| b.boxed())
    }

    fn unavailable(
        &self,
        info: &RequestInfo<'_>,
        method: &str,
        path: &str,
        query: Option<&str>,
        msg: &str,
    ) -> Response<Body> {
        tracing::warn!(error = %msg, "kube upstream failed");
        self.record(Some(info), method, path, query, 503, Some(msg));
        local(
            StatusCode::SERVICE_UNAVAILABLE,
            status_json(503, "ServiceUnavailable", &format!("postern agent: {msg}")),
        )
    }

    /// `kube.request` (and `denied` for a scope refusal) in the customer's trail.
    fn record(
        &self,
        info: Option<&RequestInfo<'_>>,
        method: &str,
        path: &str,
        query: Option<&str>,
        code: u16,
        error: Option<&str>,
    ) {
        (self.audit)(
            "kube.request",
            request_detail(info, method, path, query, code, error),
        );
        if let (403, Some(reason)) = (code, error) {
            (self.audit)(
                "denied",
                serde_json::json!({"action": "kube.request", "code": code, "reason": reason, "method": method, "path": path, "resource": info.map(display_resource)}),
            );
        }
    }
}

/// The detail of a `kube.request` record, the same fields in both trails.
pub fn request_detail(
    info: Option<&RequestInfo<'_>>,
    method: &str,
    path: &str,
    query: Option<&str>,
    code: u16,
    error: Option<&str>,
) -> serde_json::Value {
    let target = info.and_then(|i| stream_target(i, query));
    serde_json::json!({
        "verb": info.map(|i| i.verb.to_string()).unwrap_or_else(|| method.to_lowercase()),
        "resource": info.map(|i| i.resource.to_string()).unwrap_or_default(),
        "subresource": info.map(|i| i.subresource.to_string()).unwrap_or_default(),
        "api_group": info.map(|i| i.api_group.to_string()).unwrap_or_default(),
        "namespace": info.and_then(|i| i.namespace.as_deref().map(str::to_string)),
        "name": info.map(|i| i.name.to_string()).unwrap_or_default(),
        "command": target.as_ref().map(|t| t.command.clone()),
        "container": target.and_then(|t| t.container),
        "path": path,
        "code": code,
        "reason": error,
    })
}
