//! What the endpoint front ends (kubectl, postgres, ssh, tcp) and their session plumbing need
//! from the rest of the gateway, as one explicit context: the live endpoints, the connected
//! agents, the vendor trail, the few store reads they make, the limits, the server identity
//! and CA, and the shutdown token and task tracker. `server.rs` builds it; unit tests build it
//! from in-memory parts.

use super::FrontEnds;
use crate::{
    agents::AgentRegistry,
    audit::{AuditLog, Subject, TrailDown},
    config::Limits,
    endpoints::{EndpointRegistry, LiveEndpoint},
    ports::AuditSink,
    store::{EndpointRow, OpRow, Store, StoreError},
};
use async_trait::async_trait;
use endpoint_types::resource::ResourceScope;
use serde_json::value::RawValue;
use std::{net::IpAddr, path::PathBuf, sync::Arc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The vendor trail as the front ends write it: whole records, the session watch that cuts
/// sessions when the trail cannot be written, and the batched queue for SQL statements.
#[async_trait]
pub trait SessionAudit: AuditSink {
    /// A token cancelled the moment the trail cannot be written; or the refusal, while it cannot.
    fn session_watch(&self) -> Result<CancellationToken, TrailDown>;
    /// Queues a record for the batch writer without waiting for its commit.
    async fn enqueue(
        &self,
        kind: &'static str,
        actor: Arc<str>,
        subject: Arc<Subject>,
        detail: Box<RawValue>,
    );
    /// Waits until everything queued before this call is stored.
    async fn flush(&self) -> Result<(), TrailDown>;
}

#[async_trait]
impl SessionAudit for AuditLog {
    fn session_watch(&self) -> Result<CancellationToken, TrailDown> {
        AuditLog::session_watch(self)
    }

    async fn enqueue(
        &self,
        kind: &'static str,
        actor: Arc<str>,
        subject: Arc<Subject>,
        detail: Box<RawValue>,
    ) {
        AuditLog::enqueue(self, kind, actor, subject, detail).await
    }

    async fn flush(&self) -> Result<(), TrailDown> {
        AuditLog::flush(self).await
    }
}

/// The connected agents, as the front ends reach them.
pub trait AgentReach: Send + Sync {
    /// The QUIC connection of the appliance's agent, while it is connected.
    fn connection(&self, appliance_id: &str) -> Option<quinn::Connection>;
    /// The customer's scope for a resource as the connected agent last reported it (None while
    /// the appliance is offline: then nothing can reach it anyway).
    fn scope(&self, appliance_id: &str, resource_id: &str) -> Option<ResourceScope>;
}

impl AgentReach for AgentRegistry {
    fn connection(&self, appliance_id: &str) -> Option<quinn::Connection> {
        self.get(appliance_id).map(|link| link.connection)
    }

    fn scope(&self, appliance_id: &str, resource_id: &str) -> Option<ResourceScope> {
        self.get(appliance_id)
            .and_then(|link| link.resource(resource_id).and_then(|r| r.scope.clone()))
    }
}

/// The store reads and writes the front ends make: why a credential finds no live endpoint,
/// the session count, and the op an agent reports on.
#[async_trait]
pub trait FrontEndStore: Send + Sync {
    async fn get_endpoint(&self, id: &str) -> Result<Option<EndpointRow>, StoreError>;
    async fn count_session(&self, endpoint_id: &str) -> Result<(), StoreError>;
    async fn get_op(&self, id: &str) -> Result<Option<OpRow>, StoreError>;
}

#[async_trait]
impl FrontEndStore for Store {
    async fn get_endpoint(&self, id: &str) -> Result<Option<EndpointRow>, StoreError> {
        Store::get_endpoint(self, id).await
    }

    async fn count_session(&self, endpoint_id: &str) -> Result<(), StoreError> {
        Store::count_session(self, endpoint_id).await
    }

    async fn get_op(&self, id: &str) -> Result<Option<OpRow>, StoreError> {
        Store::get_op(self, id).await
    }
}

/// Everything the front ends use, and nothing else of the gateway.
pub struct FrontEndContext {
    pub endpoints: Arc<EndpointRegistry>,
    pub agents: Arc<dyn AgentReach>,
    pub audit: Arc<dyn SessionAudit>,
    pub store: Arc<dyn FrontEndStore>,
    pub limits: Limits,
    /// Signs endpoint client certificates; its certificate is the trust root clients get.
    pub ca: Arc<certs::Ca>,
    /// The gateway's server certificate (chain = leaf + CA) and key, for the TLS front ends.
    pub server_identity: certs::Issued,
    /// A certificate the vendor supplies (`tls_cert`/`tls_key`), served by the kube and
    /// postgres front ends instead of `server_identity` (crate::tls_reload).
    pub served_cert: Option<Arc<crate::tls_reload::ReloadingCert>>,
    /// Where the shared front ends listen.
    pub addrs: FrontEnds,
    /// Address endpoint listeners bind to.
    pub endpoint_host: IpAddr,
    /// Where persistent keys live (the SSH host key).
    pub data_dir: PathBuf,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// Caps the unauthenticated handshakes each front end holds (`crate::admission`).
    pub doors: Arc<crate::admission::FrontDoors>,
}

impl std::fmt::Debug for FrontEndContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontEndContext")
            .field("addrs", &self.addrs)
            .field("endpoint_host", &self.endpoint_host)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl FrontEndContext {
    /// The CA clients verify the front ends with, for their kubeconfig or connection string;
    /// empty when the vendor supplies the certificate: clients then use their system roots.
    pub fn server_trust_pem(&self) -> String {
        match self.served_cert {
            Some(_) => String::new(),
            None => self.ca.cert_pem().to_string(),
        }
    }

    /// The customer's scope for the endpoint's resource as its connected agent last reported it.
    pub fn scope_of(&self, ep: &LiveEndpoint) -> Option<ResourceScope> {
        self.agents.scope(&ep.appliance_id, &ep.resource_id)
    }
}
