//! Bare resource names in a scope (`statefulsets`, `certificates`) resolved through the
//! cluster's discovery documents (`/api/v1`, `/apis`, `/apis/<group>/<version>`), once per
//! resource and cached for the agent's lifetime: the canonical, group-qualified names are what
//! the agent enforces and what it reports to the gateway in its hello, so both sides decide
//! alike. An ambiguous, unserved or cluster-scoped name is a config error at start-up; when the
//! cluster cannot be reached, resolution is retried before each hello and each endpoint
//! stream, and until then a bare name means the core group only (it grants nothing the
//! cluster would read as another group's resource).

use super::{
    upstream::{Upstream, UpstreamError},
    Clusters,
};
use crate::config::{AgentConfig, ResourceConfig};
use bytes::Bytes;
use endpoint_types::{
    kube_names::{DiscoveryIndex, NameError},
    resource::ResourceKind,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{header::HOST, Request, StatusCode};
use std::{collections::HashMap, time::Duration};

const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_DOCUMENT: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("GET {path}: {status}")]
    Status { path: String, status: StatusCode },
    #[error("GET {path}: the document is not JSON or too large")]
    Document { path: String },
    #[error("the cluster's discovery did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Name(#[from] NameError),
}

impl DiscoveryError {
    /// The customer's config is wrong (not the cluster unreachable).
    pub fn is_config(&self) -> bool {
        matches!(self, DiscoveryError::Name(_))
    }
}

impl Clusters {
    fn resolved(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<String>>> {
        self.resolved.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The resource names the scope grants (and the hello reports): resolved through discovery
    /// when that has been done, else as configured (a bare name then means core).
    pub fn scope_resources(&self, resource: &ResourceConfig) -> Vec<String> {
        let done = self.resolved().get(&resource.id).cloned();
        done.unwrap_or_else(|| resource.kube_resources())
    }

    fn needs_resolution(&self, resource: &ResourceConfig) -> bool {
        resource.kind == ResourceKind::Kubernetes
            && resource.namespaces.is_some()
            && !self.resolved().contains_key(&resource.id)
    }

    async fn resolve_one(&self, resource: &ResourceConfig) -> Result<Vec<String>, DiscoveryError> {
        let upstream = self.upstream_for(resource).await?;
        let index = tokio::time::timeout(DISCOVERY_TIMEOUT, discover(&upstream))
            .await
            .map_err(|_| DiscoveryError::Timeout(DISCOVERY_TIMEOUT))??;
        let mut names = Vec::new();
        for entry in resource.kube_resources() {
            let name = index.resolve(&entry)?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// At start-up: resolves every kubernetes resource's names. A name the cluster reads as
    /// ambiguous, unserved or cluster-scoped is an error (`Err((resource id, message))`); a
    /// cluster that cannot be reached only leaves the names for a later attempt. Also says, for
    /// each resource without `impersonate`, that only reads will pass.
    pub async fn prepare(&self, config: &AgentConfig) -> Result<(), (String, String)> {
        for r in config
            .resources
            .iter()
            .filter(|r| r.kind == ResourceKind::Kubernetes)
        {
            if r.impersonate.is_none() {
                let writes: Vec<String> = r
                    .kube_verbs()
                    .into_iter()
                    .filter(|v| !endpoint_types::kube_request::READ_VERBS.contains(&v.as_str()))
                    .collect();
                tracing::warn!(
                    resource = %r.id,
                    refused_verbs = ?writes,
                    "no `impersonate` identity: the agent forwards read verbs only (get, list, watch, logs) to this cluster; writes, exec, attach and port-forward are refused"
                );
            }
        }
        for r in config.resources.iter().filter(|r| self.needs_resolution(r)) {
            match self.resolve_one(r).await {
                Ok(names) => {
                    tracing::info!(resource = %r.id, resources = ?names, "kubernetes scope resolved through discovery");
                    self.resolved().insert(r.id.clone(), names);
                }
                Err(e) if e.is_config() => return Err((r.id.clone(), e.to_string())),
                Err(e) => {
                    tracing::warn!(resource = %r.id, error = %e, "cannot read the cluster's discovery yet; bare resource names mean the core group until it answers")
                }
            }
        }
        Ok(())
    }

    /// Before a hello or an endpoint stream: retries resources not resolved yet. A config error
    /// found now is logged (the agent is already running) and the names stay as configured.
    pub async fn resolve_pending(&self, config: &AgentConfig) {
        for r in config.resources.iter().filter(|r| self.needs_resolution(r)) {
            self.retry(r).await;
        }
    }

    pub async fn retry(&self, resource: &ResourceConfig) {
        if !self.needs_resolution(resource) {
            return;
        }
        match self.resolve_one(resource).await {
            Ok(names) => {
                tracing::info!(resource = %resource.id, resources = ?names, "kubernetes scope resolved through discovery");
                self.resolved().insert(resource.id.clone(), names);
            }
            Err(e) if e.is_config() => {
                tracing::error!(resource = %resource.id, error = %e, "agent.toml: kubernetes resource names do not resolve")
            }
            Err(e) => {
                tracing::warn!(resource = %resource.id, error = %e, "cannot read the cluster's discovery yet")
            }
        }
    }
}

pub(super) async fn get_json(
    upstream: &Upstream,
    path: &str,
) -> Result<serde_json::Value, DiscoveryError> {
    get_json_as(upstream, path, &[]).await
}

/// [`get_json`] with extra headers (the steady-state identity's `Impersonate-*`).
pub(super) async fn get_json_as(
    upstream: &Upstream,
    path: &str,
    headers: &[(hyper::header::HeaderName, hyper::header::HeaderValue)],
) -> Result<serde_json::Value, DiscoveryError> {
    let mut req = Request::builder()
        .method("GET")
        .uri(path)
        .header(HOST, upstream.authority())
        .header("accept", "application/json");
    for (name, value) in headers {
        req = req.header(name, value);
    }
    if let Some(auth) = upstream.authorization().await? {
        req = req.header(hyper::header::AUTHORIZATION, auth);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|_| DiscoveryError::Document {
            path: path.to_string(),
        })?;
    let resp = upstream.send(req, false).await?;
    if resp.status() == StatusCode::UNAUTHORIZED {
        upstream.credential_refused().await;
    }
    if resp.status() != StatusCode::OK {
        return Err(DiscoveryError::Status {
            path: path.to_string(),
            status: resp.status(),
        });
    }
    let body = Limited::new(resp.into_body(), MAX_DOCUMENT)
        .collect()
        .await
        .map_err(|_| DiscoveryError::Document {
            path: path.to_string(),
        })?;
    serde_json::from_slice(&body.to_bytes()).map_err(|_| DiscoveryError::Document {
        path: path.to_string(),
    })
}

/// Reads `/api/v1`, `/apis` and each group's preferred version.
pub async fn discover(upstream: &Upstream) -> Result<DiscoveryIndex, DiscoveryError> {
    let mut index = DiscoveryIndex::default();
    index.add_resource_list("", &get_json(upstream, "/api/v1").await?);
    let groups = get_json(upstream, "/apis").await?;
    for gv in DiscoveryIndex::preferred_group_versions(&groups) {
        let group = gv
            .split_once('/')
            .map(|(g, _)| g)
            .unwrap_or_default()
            .to_string();
        // A group whose version does not answer (an unavailable aggregated API) is skipped,
        // as kubectl does; its names then resolve as unserved.
        match get_json(upstream, &format!("/apis/{gv}")).await {
            Ok(list) => index.add_resource_list(&group, &list),
            Err(e) => tracing::debug!(group_version = %gv, error = %e, "discovery: group skipped"),
        }
    }
    Ok(index)
}
