//! Kubernetes API requests through an endpoint, in the appliance. The gateway carries each
//! client connection as HTTP/1.1 on one data stream; the agent checks every request against
//! the customer's own scope in `agent.toml` again (same classifier and decision as the
//! gateway), strips any client identity, and forwards it to the cluster's API server with the
//! appliance's credentials, optionally impersonating the configured user and groups so the
//! cluster's RBAC applies as well.

mod upstream;

use crate::{
    audit::Entry,
    config::ResourceConfig,
    grants::Cut,
    sessions::{accept, entry, refuse, Sessions},
};
use bytes::Bytes;
use endpoint_types::{
    frame::StreamOpen,
    kube_request::{
        classify, decide, forbidden_status, status_json, Decision, KubeScope, RequestInfo,
    },
    resource::CloseReason,
    ApiError, ErrorCode,
};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::{
    body::Incoming,
    header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST},
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use quinn::{RecvStream, SendStream};
use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex, OnceLock},
    time::Instant,
};
use upstream::Upstream;

type Body = BoxBody<Bytes, hyper::Error>;
const MAX_BODY: usize = 10 * 1024 * 1024;

fn scope_of(resource: &ResourceConfig) -> Result<KubeScope, String> {
    let namespaces = resource.namespaces.clone().unwrap_or_default();
    KubeScope::compile(
        &namespaces,
        &resource.kube_resources(),
        &resource.kube_verbs(),
    )
    .map_err(|e| e.to_string())
}

/// `agent.toml` checks for a kubernetes resource: namespaces valid, resources and verbs known.
/// A resource without `namespaces` still serves one-off `kubectl` ops (which run under the
/// appliance's own policy), but endpoints to it are refused until namespaces are listed.
pub fn validate_config(resource: &ResourceConfig) -> Result<(), String> {
    if resource.namespaces.as_ref().is_some_and(|n| n.is_empty()) {
        return Err("`namespaces` is empty: list the namespaces endpoints may reach".into());
    }
    let mut probe = resource.clone();
    probe
        .namespaces
        .get_or_insert_with(|| vec!["default".into()]);
    scope_of(&probe)?;
    if let Some(i) = &resource.impersonate {
        if i.user.as_deref().is_none_or(str::is_empty) {
            return Err("impersonate needs a `user`".into());
        }
    }
    Ok(())
}

/// One upstream (and its connection pool) per resource, for the agent's lifetime: the config
/// does not change while the agent runs.
async fn upstream_for(resource: &ResourceConfig) -> Result<Arc<Upstream>, upstream::UpstreamError> {
    static UPSTREAMS: OnceLock<Mutex<HashMap<String, Arc<Upstream>>>> = OnceLock::new();
    let map = UPSTREAMS.get_or_init(Default::default);
    if let Some(u) = map
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&resource.id)
    {
        return Ok(u.clone());
    }
    let u = Arc::new(Upstream::load(resource.kubeconfig.as_deref()).await?);
    map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(resource.id.clone(), u.clone());
    Ok(u)
}

struct Stream {
    ctx: Sessions,
    open: StreamOpen,
    scope: KubeScope,
    upstream: Arc<Upstream>,
    impersonate: Vec<(HeaderName, HeaderValue)>,
    cut: Cut,
    /// The byte pipe of an upgraded request; the session lasts until it ends.
    upgraded: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

pub async fn serve_stream(
    ctx: &Sessions,
    open: StreamOpen,
    resource: ResourceConfig,
    cut: Cut,
    mut send: SendStream,
    recv: RecvStream,
) {
    let scope = match scope_of(&resource) {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                &mut send,
                ApiError::invalid(format!("resource {:?}: {e}", resource.id)),
            )
            .await
        }
    };
    let upstream = match upstream_for(&resource).await {
        Ok(u) => u,
        Err(e) => {
            let e = ApiError::new(
                ErrorCode::TargetUnreachable,
                format!("resource {:?}: {e}", resource.id),
            )
            .hint("fix the resource's kubeconfig in agent.toml");
            return refuse(&mut send, e).await;
        }
    };
    let mut impersonate = Vec::new();
    if let Some(i) = &resource.impersonate {
        for (name, v) in i
            .user
            .iter()
            .map(|u| ("impersonate-user", u))
            .chain(i.groups.iter().map(|g| ("impersonate-group", g)))
        {
            if let Ok(v) = HeaderValue::from_str(v) {
                impersonate.push((HeaderName::from_static(name), v));
            }
        }
    }
    if accept(&mut send).await.is_err() {
        return;
    }
    let started = Instant::now();
    ctx.audit.record_or_log(entry("session.opened", &open, serde_json::json!({"client_addr": open.client_addr, "origin_resource_id": open.resource_id, "type": "kubectl"})));
    let stream = Arc::new(Stream {
        ctx: ctx.clone(),
        open: open.clone(),
        scope,
        upstream,
        impersonate,
        cut: cut.clone(),
        upgraded: Mutex::new(None),
    });
    let s = stream.clone();
    let svc = hyper::service::service_fn(move |req| {
        let s = s.clone();
        async move { Ok::<_, Infallible>(s.handle(req).await) }
    });
    let io = tokio::io::join(recv, send);
    let http = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    let serve = async {
        let r = http.await;
        let pipe = stream.upgraded.lock().ok().and_then(|mut u| u.take());
        if let Some(pipe) = pipe {
            let _ = pipe.await;
        }
        r
    };
    // On a cut the connection (which owns the stream halves) is dropped, ending the stream;
    // the gateway records the reason from its own signal for the same endpoint.
    let reason = tokio::select! {
        r = serve => if r.is_ok() { CloseReason::Client } else { CloseReason::Error },
        () = cut.cancelled() => cut.reason().unwrap_or(CloseReason::Interrupted),
    };
    ctx.audit.record_or_log(entry("session.closed", &open, serde_json::json!({"reason": reason.as_str(), "duration_ms": started.elapsed().as_millis() as u64})));
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

fn forwardable(name: &HeaderName, upgrade: bool) -> bool {
    let n = name.as_str();
    if n == "authorization" || n == "proxy-authorization" || n.starts_with("impersonate-") {
        return false;
    }
    match n {
        "keep-alive" | "te" | "trailer" | "transfer-encoding" | "proxy-connection"
        | "content-length" | "host" => false,
        "connection" | "upgrade" => upgrade,
        _ => true,
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(hyper::header::UPGRADE)
        && req.headers().get_all(CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

impl Stream {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        if self.cut.is_cut() {
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
                self.audit(None, &method, &path, 400, Some(&e.to_string()));
                return local(
                    StatusCode::BAD_REQUEST,
                    status_json(400, "BadRequest", &format!("postern agent: {e}")),
                );
            }
        };
        if let Decision::Deny { reason } = decide(&info, &self.scope) {
            self.audit(Some(&info), &method, &path, 403, Some(&reason));
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
            self.audit(Some(&info), &method, &path, 413, None);
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
        match self.upstream.authorization() {
            Ok(Some(auth)) => out = out.header(hyper::header::AUTHORIZATION, auth),
            Ok(None) => {}
            Err(e) => return self.unavailable(&info, &method, &path, &e.to_string()),
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
            Err(e) => return self.unavailable(&info, &method, &path, &e.to_string()),
        };
        self.audit(Some(&info), &method, &path, resp.status().as_u16(), None);
        if let Some(client_upgrade) = client_upgrade {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let cut = self.cut.clone();
                let pipe = tokio::spawn(async move {
                    let (Ok(c), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) else {
                        return;
                    };
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut c, &mut u) => {}
                        () = cut.cancelled() => {}
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
        msg: &str,
    ) -> Response<Body> {
        tracing::warn!(endpoint = %self.open.endpoint_id, error = %msg, "kube upstream failed");
        self.audit(Some(info), method, path, 503, Some(msg));
        local(
            StatusCode::SERVICE_UNAVAILABLE,
            status_json(503, "ServiceUnavailable", &format!("postern agent: {msg}")),
        )
    }

    /// `kube.request` in the customer's trail.
    fn audit(
        &self,
        info: Option<&RequestInfo<'_>>,
        method: &str,
        path: &str,
        code: u16,
        error: Option<&str>,
    ) {
        let detail = serde_json::json!({
            "verb": info.map(|i| i.verb.to_string()).unwrap_or_else(|| method.to_lowercase()),
            "resource": info.map(|i| i.resource.to_string()).unwrap_or_default(),
            "subresource": info.map(|i| i.subresource.to_string()).unwrap_or_default(),
            "namespace": info.and_then(|i| i.namespace.as_deref().map(str::to_string)),
            "name": info.map(|i| i.name.to_string()).unwrap_or_default(),
            "path": path,
            "code": code,
            "operator": self.open.operator,
            "reason": error,
        });
        let e: Entry = entry("kube.request", &self.open, detail);
        self.ctx.audit.record_or_log(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use std::path::Path;

    fn parse(extra: &str) -> Result<AgentConfig, String> {
        let text = format!("audit_path = \"a\"\n[[resource]]\nid = \"k\"\nkind = \"kubernetes\"\nkubeconfig = \"/etc/kc\"\n{extra}");
        AgentConfig::parse(&text, Path::new("/etc/postern/agent.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn validates_the_customer_scope() {
        assert!(parse("namespaces = [\"my-app-prod\"]\n").is_ok());
        assert!(
            parse("").is_ok(),
            "ops-only kubernetes resources need no namespaces"
        );
        assert!(parse("namespaces = []\n")
            .unwrap_err()
            .contains("namespaces"));
        assert!(parse("namespaces = [\"a\"]\nresources = [\"nodes\"]\n")
            .unwrap_err()
            .contains("nodes"));
        assert!(parse("namespaces = [\"a\"]\nverbs = [\"escalate\"]\n")
            .unwrap_err()
            .contains("escalate"));
        assert!(parse("namespaces = [\"Bad_NS\"]\n").is_err());
        assert!(
            parse("namespaces = [\"a\"]\nimpersonate = { groups = [\"g\"] }\n")
                .unwrap_err()
                .contains("user")
        );
    }

    #[test]
    fn the_agent_decides_with_the_customer_defaults() {
        let c = parse("namespaces = [\"my-app-prod\"]\n").unwrap();
        let scope = scope_of(&c.resources[0]).unwrap();
        let d = |m: &str, p: &str| decide(&classify(m, p, None).unwrap(), &scope);
        assert_eq!(
            d("GET", "/api/v1/namespaces/my-app-prod/pods"),
            Decision::Allow
        );
        assert_eq!(
            d("GET", "/api/v1/namespaces/my-app-prod/pods/p/log"),
            Decision::Allow
        );
        // Defaults are read-only and grant neither exec nor secrets.
        assert!(matches!(
            d("DELETE", "/api/v1/namespaces/my-app-prod/pods/p"),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            d("POST", "/api/v1/namespaces/my-app-prod/pods/p/exec"),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            d("GET", "/api/v1/namespaces/my-app-prod/secrets"),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            d("GET", "/api/v1/namespaces/other/pods"),
            Decision::Deny { .. }
        ));
    }
}
