//! Kubernetes API requests through an endpoint, in the appliance. The gateway carries each
//! client connection as HTTP/1.1 on one data stream; the agent checks every request against
//! the customer's own scope in `agent.toml` again (same classifier and decision as the
//! gateway), strips any client identity, and forwards it to the cluster's API server with the
//! appliance's credentials, optionally impersonating the configured user and groups so the
//! cluster's RBAC applies as well.

mod discovery;
pub mod exec_credential;
pub mod op_proxy;
mod proxy;
mod upstream;

use crate::{
    audit::Entry,
    config::ResourceConfig,
    grants::Cut,
    sessions::{accept, entry, refuse, Sessions},
};
use endpoint_types::{
    frame::StreamOpen, kube_request::KubeScope, resource::CloseReason, ApiError, ErrorCode,
};
use hyper_util::rt::TokioIo;
use proxy::Proxy;
use quinn::{RecvStream, SendStream};
use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use upstream::Upstream;

/// The scope the agent enforces: the resource names resolved through discovery, and reads
/// only when the resource names no identity to impersonate (writes never go upstream with
/// the appliance's own credential).
pub(crate) fn scope_of(
    clusters: &Clusters,
    resource: &ResourceConfig,
) -> Result<KubeScope, String> {
    let namespaces = resource.namespaces.clone().unwrap_or_default();
    let scope = KubeScope::compile(
        &namespaces,
        &clusters.scope_resources(resource),
        &resource.kube_verbs(),
    )
    .map_err(|e| e.to_string())?;
    Ok(if resource.impersonate.is_some() {
        scope
    } else {
        scope.reads_only()
    })
}

/// What one agent knows of its kubernetes resources while it runs: an upstream (and its
/// connection pool) per resource and the resource names discovery resolved. Owned by the agent
/// run, not the process (one process may run many agents, whose resource ids coincide); the
/// config does not change while the agent runs. Cheap to clone.
#[derive(Clone, Default)]
pub struct Clusters {
    upstreams: Arc<Mutex<HashMap<String, Arc<Upstream>>>>,
    /// Canonical resource names by resource id, once discovery answered.
    resolved: Arc<Mutex<HashMap<String, Vec<String>>>>,
}

impl Clusters {
    /// The resource's upstream, made on first use.
    async fn upstream_for(
        &self,
        resource: &ResourceConfig,
    ) -> Result<Arc<Upstream>, upstream::UpstreamError> {
        let known = self
            .upstreams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&resource.id)
            .cloned();
        if let Some(u) = known {
            return Ok(u);
        }
        let u = Arc::new(Upstream::load(resource.kubeconfig.as_deref()).await?);
        self.upstreams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(resource.id.clone(), u.clone());
        Ok(u)
    }
}

impl Clusters {
    /// A read-only `GET` of a JSON document as the resource's credential (steady-state
    /// collection, [`crate::steady_state`]); the upstream is shared with endpoints.
    pub async fn get_json(
        &self,
        resource: &ResourceConfig,
        path: &str,
    ) -> Result<serde_json::Value, String> {
        let upstream = self
            .upstream_for(resource)
            .await
            .map_err(|e| e.to_string())?;
        // As the resource's `impersonate` says, when it says anything: the steady-state
        // collector passes its phase's view of the resource (see `steady_state_identity`).
        discovery::get_json_as(&upstream, path, &proxy::impersonation_headers(resource))
            .await
            .map_err(|e| e.to_string())
    }
}

/// `agent.toml` checks for a kubernetes resource: namespaces valid, resource names RBAC-like
/// (bare ones are resolved through discovery at start-up), verbs known.
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
    KubeScope::compile(
        &probe.namespaces.clone().unwrap_or_default(),
        &probe.kube_resources(),
        &probe.kube_verbs(),
    )
    .map_err(|e| e.to_string())?;
    if let Some(i) = &resource.impersonate {
        if i.user.as_deref().is_none_or(str::is_empty) {
            return Err("impersonate needs a `user`".into());
        }
    }
    Ok(())
}

pub async fn serve_stream(
    ctx: &Sessions,
    open: StreamOpen,
    resource: ResourceConfig,
    cut: Cut,
    mut send: SendStream,
    recv: RecvStream,
) {
    ctx.kube.retry(&resource).await;
    let scope = match scope_of(&ctx.kube, &resource) {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                &mut send,
                ApiError::invalid(format!("resource {:?}: {e}", resource.id)),
            )
            .await
        }
    };
    let upstream = match ctx.kube.upstream_for(&resource).await {
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
    // Durable before any request is served: no trail, no session.
    let opened = entry(
        "session.opened",
        &open,
        serde_json::json!({"client_addr": open.client_addr, "origin_resource_id": open.resource_id, "type": "kubectl"}),
    );
    if let Err(e) = ctx.audit.write(opened).await {
        tracing::error!(error = %e, "cannot write the customer's audit trail; refusing the kubectl session");
        return refuse(&mut send, crate::sessions::trail_refusal()).await;
    }
    if accept(&mut send).await.is_err() {
        return;
    }
    let started = Instant::now();
    let stop = CancellationToken::new();
    let sink = {
        let (audit, open) = (ctx.audit.clone(), open.clone());
        Box::new(move |kind: &'static str, mut detail: serde_json::Value| {
            detail["operator"] = serde_json::json!(open.operator);
            let e: Entry = entry(kind, &open, detail);
            audit.record_or_log(e);
        })
    };
    let proxy = Arc::new(Proxy::new(
        scope,
        upstream,
        proxy::impersonation_headers(&resource),
        stop.clone(),
        sink,
    ));
    let p = proxy.clone();
    let svc = hyper::service::service_fn(move |req| {
        let p = p.clone();
        async move { Ok::<_, Infallible>(p.handle(req).await) }
    });
    let io = tokio::io::join(recv, send);
    let http = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    let serve = async {
        let r = http.await;
        if let Some(pipe) = proxy.take_upgraded() {
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
    stop.cancel();
    ctx.audit.record_or_log(entry("session.closed", &open, serde_json::json!({"reason": reason.as_str(), "duration_ms": started.elapsed().as_millis() as u64})));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use endpoint_types::kube_request::{classify, decide, Decision};
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
        let scope = scope_of(&Clusters::default(), &c.resources[0]).unwrap();
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

    #[test]
    fn writes_need_an_identity_to_impersonate() {
        let verbs = "namespaces = [\"a\"]\nresources = [\"pods\", \"pods/exec\", \"statefulsets.apps\"]\nverbs = [\"get\", \"list\", \"create\", \"delete\"]\n";
        let plain = parse(verbs).unwrap();
        let scope = scope_of(&Clusters::default(), &plain.resources[0]).unwrap();
        assert!(scope.is_reads_only());
        let d = |s: &KubeScope, m: &str, p: &str| decide(&classify(m, p, None).unwrap(), s);
        assert_eq!(
            d(&scope, "GET", "/apis/apps/v1/namespaces/a/statefulsets"),
            Decision::Allow
        );
        assert!(
            matches!(d(&scope, "DELETE", "/api/v1/namespaces/a/pods/p"), Decision::Deny { reason } if reason.contains("impersonat"))
        );
        assert!(matches!(
            d(&scope, "POST", "/api/v1/namespaces/a/pods/p/exec"),
            Decision::Deny { .. }
        ));
        let with = parse(&format!("{verbs}impersonate = {{ user = \"vendor\" }}\n")).unwrap();
        let scope = scope_of(&Clusters::default(), &with.resources[0]).unwrap();
        assert_eq!(
            d(&scope, "DELETE", "/api/v1/namespaces/a/pods/p"),
            Decision::Allow
        );
    }

    #[test]
    fn identity_headers_never_go_upstream() {
        use hyper::header::HeaderName;
        for h in [
            "authorization",
            "impersonate-user",
            "impersonate-group",
            "x-remote-user",
            "x-remote-group",
            "x-remote-extra-scopes",
        ] {
            assert!(
                !proxy::forwardable(&HeaderName::from_static(h), false),
                "{h}"
            );
        }
        assert!(proxy::forwardable(
            &HeaderName::from_static("accept"),
            false
        ));
    }
}
