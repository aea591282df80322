//! In-memory parts for the front ends' unit tests: a [`FrontEndContext`] without SQLite,
//! sockets or agents (no agent is ever connected, so nothing opens a QUIC stream).

use super::{AgentReach, FrontEndContext, FrontEndStore, FrontEnds, SessionAudit};
use crate::{
    audit::{Subject, TrailDown},
    config::Limits,
    endpoints::{EndpointRegistry, LiveEndpoint},
    ports::fakes::{MemoryAudit, Recorded},
    store::{EndpointRow, OpRow, StoreError},
};
use async_trait::async_trait;
use endpoint_types::{
    api::{ClientCredential, EndpointState},
    control::{OpState, OpTool},
    resource::{EndpointType, ResourceScope},
};
use jiff::Timestamp;
use serde_json::value::RawValue;
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl SessionAudit for MemoryAudit {
    /// Down exactly when `fail_before` is set, as a failing store makes the real trail.
    fn session_watch(&self) -> Result<CancellationToken, TrailDown> {
        if self.fail_before.load(Ordering::SeqCst) {
            return Err(TrailDown("the test store refuses records".into()));
        }
        Ok(CancellationToken::new())
    }

    async fn enqueue(
        &self,
        kind: &'static str,
        actor: Arc<str>,
        subject: Arc<Subject>,
        detail: Box<RawValue>,
    ) {
        lock(&self.records).push(Recorded {
            kind: kind.into(),
            actor: actor.to_string(),
            subject: (*subject).clone(),
            detail: serde_json::from_str(detail.get()).unwrap_or_default(),
        });
    }

    async fn flush(&self) -> Result<(), TrailDown> {
        self.session_watch().map(|_| ())
    }
}

/// Endpoint and op rows by id; `counted` keeps each session count in order.
#[derive(Debug, Default)]
pub struct MemoryStore {
    pub endpoints: Mutex<HashMap<String, EndpointRow>>,
    pub ops: Mutex<HashMap<String, OpRow>>,
    pub counted: Mutex<Vec<String>>,
}

impl MemoryStore {
    pub fn put_endpoint(&self, row: EndpointRow) {
        lock(&self.endpoints).insert(row.id.clone(), row);
    }
    pub fn put_op(&self, row: OpRow) {
        lock(&self.ops).insert(row.id.clone(), row);
    }
}

#[async_trait]
impl FrontEndStore for MemoryStore {
    async fn get_endpoint(&self, id: &str) -> Result<Option<EndpointRow>, StoreError> {
        Ok(lock(&self.endpoints).get(id).cloned())
    }
    async fn count_session(&self, endpoint_id: &str) -> Result<(), StoreError> {
        lock(&self.counted).push(endpoint_id.into());
        Ok(())
    }
    async fn get_op(&self, id: &str) -> Result<Option<OpRow>, StoreError> {
        Ok(lock(&self.ops).get(id).cloned())
    }
}

/// Agents that reported scopes but have no connection a test could open a stream on.
#[derive(Debug, Default)]
pub struct ReportedScopes(pub Mutex<HashMap<(String, String), ResourceScope>>);

impl ReportedScopes {
    pub fn report(&self, appliance_id: &str, resource_id: &str, scope: ResourceScope) {
        lock(&self.0).insert((appliance_id.into(), resource_id.into()), scope);
    }
}

impl AgentReach for ReportedScopes {
    fn connection(&self, _appliance_id: &str) -> Option<quinn::Connection> {
        None
    }
    fn scope(&self, appliance_id: &str, resource_id: &str) -> Option<ResourceScope> {
        lock(&self.0)
            .get(&(appliance_id.to_string(), resource_id.to_string()))
            .cloned()
    }
}

/// The in-memory parts of a context, kept so a test can look at what the front end did.
pub struct Parts {
    pub audit: Arc<MemoryAudit>,
    pub store: Arc<MemoryStore>,
    pub agents: Arc<ReportedScopes>,
    pub endpoints: Arc<EndpointRegistry>,
    pub ca: Arc<certs::Ca>,
}

impl Default for Parts {
    fn default() -> Parts {
        Parts {
            audit: Arc::default(),
            store: Arc::default(),
            agents: Arc::default(),
            endpoints: Arc::default(),
            ca: Arc::new(certs::Ca::generate("test gateway", Timestamp::now()).unwrap()),
        }
    }
}

impl Parts {
    pub fn new() -> Parts {
        Parts::default()
    }

    /// A context over these parts with `sessions_per_endpoint` sessions allowed per endpoint.
    pub fn context(&self, sessions_per_endpoint: u64) -> FrontEndContext {
        let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let server_identity = self
            .ca
            .issue_server(
                &["localhost".into()],
                Timestamp::now(),
                Duration::from_secs(3600),
            )
            .unwrap();
        FrontEndContext {
            endpoints: self.endpoints.clone(),
            agents: self.agents.clone(),
            audit: self.audit.clone(),
            store: self.store.clone(),
            limits: Limits {
                sessions_per_endpoint,
                ..Limits::default()
            },
            ca: self.ca.clone(),
            server_identity,
            served_cert: None,
            addrs: FrontEnds {
                kube: SocketAddr::new(host, 6443),
                postgres: SocketAddr::new(host, 5432),
                ssh: SocketAddr::new(host, 2222),
            },
            endpoint_host: host,
            data_dir: std::env::temp_dir(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            doors: crate::admission::FrontDoors::new(Default::default()),
        }
    }

    /// A DER client certificate for `csr_pem`, signed by the parts' CA as `access` signs it.
    pub fn sign(&self, csr_pem: &str, endpoint_id: &str) -> Vec<u8> {
        use rustls_pki_types::{pem::PemObject, CertificateDer};
        let now = Timestamp::now();
        let until = now + jiff::SignedDuration::from_secs(3600);
        let pem = self
            .ca
            .sign_client_csr(
                csr_pem,
                &format!("postern:endpoint:{endpoint_id}"),
                now,
                until,
            )
            .unwrap();
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    /// Ends a live endpoint as retiring does: out of the registry, its sessions cut.
    pub fn retire(&self, id: &str) {
        let ep = self.endpoints.remove(id).unwrap();
        ep.end(endpoint_types::resource::CloseReason::Retired);
    }

    /// Registers a live endpoint of `row`, as activation does.
    pub fn go_live(&self, row: &EndpointRow) -> Arc<LiveEndpoint> {
        let ep = Arc::new(LiveEndpoint::new(row, CancellationToken::new()));
        self.endpoints.insert(ep.clone()).unwrap();
        ep
    }
}

/// A stored endpoint of appliance `ap_1`, created by `bob`, expiring in an hour.
pub fn endpoint_row(
    id: &str,
    endpoint_type: EndpointType,
    state: EndpointState,
    credential: Option<ClientCredential>,
) -> EndpointRow {
    let now = Timestamp::now();
    EndpointRow {
        phase: endpoint_types::phase::operate(),
        id: id.into(),
        endpoint_type,
        appliance_id: "ap_1".into(),
        resource_id: "res_1".into(),
        state,
        created_by: "bob".into(),
        created_by_id: None,
        created_at: now,
        expires_at: now + jiff::SignedDuration::from_secs(3600),
        ended_at: None,
        address: None,
        sessions_total: 0,
        grant_id: Some("gr_1".into()),
        credential,
    }
}

/// A running kubectl op of `appliance_id` requested by `alice`.
pub fn op_row(id: &str, appliance_id: &str) -> OpRow {
    OpRow {
        phase: endpoint_types::phase::operate(),
        id: id.into(),
        appliance_id: appliance_id.into(),
        tool: OpTool::Kubectl,
        command: "kubectl get pods".into(),
        origin_resource_id: "res_1".into(),
        timeout: Duration::from_secs(60),
        state: OpState::Running,
        requested_by: "alice".into(),
        requested_at: Timestamp::now(),
        grant_id: Some("gr_1".into()),
        command_approved_by: None,
        command_approved_at: None,
        output_approved_by: None,
        output_approved_at: None,
        started_at: None,
        finished_at: None,
        exit_code: None,
        stdout: None,
        stderr: None,
        truncated: false,
        error: None,
        message: None,
        requested_by_id: None,
    }
}
