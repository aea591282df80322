//! The endpoint lifecycle as a service: create, decide, retire, expire, restore, and the records
//! callers see. It takes only what it needs: a store, the audit sink, a clock, the connected
//! agents, the approval notifier, the grants (is operate live), the endpoint types' front ends
//! and the registry of live endpoints. Ending endpoints is in `service_ending.rs`.

use super::{
    credential, kube, postgres, service_store::EndpointStore, ssh, tcp, EndpointRegistry,
    LiveEndpoint,
};
use crate::{
    audit::Subject,
    identity::Caller,
    ports::{AgentPort, AgentView, AuditSink, Clock, GrantGate, Notifier},
    store::{ApplianceRow, EndpointRow, StoreError},
};
use endpoint_types::{
    api::{
        ClientCredential, EndpointAccess, EndpointCreateRequest, EndpointRecord, EndpointState,
        Role,
    },
    frame::{EndpointGrant, ToAgent},
    lifecycle::endpoint::{self as endpoint_lifecycle, EndpointEvent},
    resource::{CloseReason, EndpointType, ResourceDescriptor, ResourceKind},
    ApiError, ErrorCode,
};
use jiff::Timestamp;
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Where a new endpoint's clients connect.
#[derive(Debug)]
pub struct Listening {
    pub address: String,
    /// The endpoint's own listener (tcp); None when its type's shared front end serves it.
    pub listener: Option<std::net::TcpListener>,
}

/// The endpoint types' front ends, as the lifecycle reaches them.
pub trait FrontEndPort: Send + Sync {
    /// Where an endpoint of type `t` listens: on `preferred` when given and free (a restored
    /// endpoint keeps its address), else anywhere.
    fn listen(&self, t: EndpointType, preferred: Option<SocketAddr>)
        -> Result<Listening, ApiError>;
    /// Serves a live endpoint's own listener until the endpoint ends.
    fn serve(&self, ep: Arc<LiveEndpoint>, listener: std::net::TcpListener);
    /// What the creator of the live endpoint `ep`, listening at `address`, needs to connect.
    fn access(&self, ep: &LiveEndpoint, address: Option<&str>) -> Result<EndpointAccess, ApiError>;
}

/// Everything the service is built from; `server.rs` wires the real ones, tests the fakes.
pub struct EndpointDeps {
    pub store: Arc<dyn EndpointStore>,
    pub audit: Arc<dyn AuditSink>,
    pub clock: Arc<dyn Clock>,
    pub agents: Arc<dyn AgentPort>,
    pub notifier: Arc<dyn Notifier>,
    pub grants: Arc<dyn GrantGate>,
    pub front_ends: Arc<dyn FrontEndPort>,
    /// The live endpoints, shared with the front ends that find them by credential.
    pub live: Arc<EndpointRegistry>,
    /// The TTL of an endpoint requested without one.
    pub default_ttl: Duration,
    /// Where each live endpoint's expiry timer runs (the data plane, with its sessions).
    pub tasks: TaskTracker,
    pub runtime: tokio::runtime::Handle,
    /// Cancelled at shutdown; every live endpoint's token is a child of it.
    pub shutdown: CancellationToken,
}

/// The endpoint lifecycle service.
pub struct Endpoints {
    pub(super) store: Arc<dyn EndpointStore>,
    pub(super) audit: Arc<dyn AuditSink>,
    clock: Arc<dyn Clock>,
    pub(super) agents: Arc<dyn AgentPort>,
    notifier: Arc<dyn Notifier>,
    pub(super) grants: Arc<dyn GrantGate>,
    pub(super) front_ends: Arc<dyn FrontEndPort>,
    pub(super) live: Arc<EndpointRegistry>,
    default_ttl: Duration,
    tasks: TaskTracker,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("live", &self.live)
            .field("default_ttl", &self.default_ttl)
            .finish_non_exhaustive()
    }
}

pub(super) fn internal(e: StoreError) -> ApiError {
    ApiError::internal(e.to_string())
}

pub(super) fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no endpoint {id}"))
        .hint("`postern ops endpoint list` shows the endpoints you can see")
}

/// The endpoint's state at `now`: past its expiry an active endpoint is expired, even in the
/// instant before the timer has recorded it so.
pub(super) fn state_at(row: &EndpointRow, now: Timestamp) -> EndpointState {
    match row.state {
        EndpointState::Active if row.expires_at <= now => EndpointState::Expired,
        s => s,
    }
}

/// The record of a stored endpoint of `app` for `customer` with `sessions` live at `now`.
pub(super) fn record_of(
    row: EndpointRow,
    app: String,
    customer: String,
    sessions: u64,
    now: Timestamp,
) -> EndpointRecord {
    let state = state_at(&row, now);
    let active = state == EndpointState::Active;
    EndpointRecord {
        sessions,
        sessions_total: row.sessions_total,
        address: if active { row.address } else { None },
        id: row.id,
        endpoint_type: row.endpoint_type,
        state,
        appliance_id: row.appliance_id,
        app,
        customer,
        origin_resource_id: row.resource_id,
        created_by: row.created_by,
        created_at: row.created_at,
        expires_at: row.expires_at,
        ended_at: row.ended_at,
        sessions_cut: None,
        access: None,
        kubeconfig: None,
        connection_string: None,
        ssh_command: None,
        ssh_config: None,
        connect_command: None,
        tcp_credential: None,
        refused: None,
        phase: row.phase,
    }
}

/// Every endpoint has its own client credential: one that already opens a live endpoint would
/// make the front ends choose between two. (A postgres endpoint is found by its new id, which
/// is always free.)
pub(super) fn credential_is_free(
    live: &EndpointRegistry,
    t: EndpointType,
    cred: Option<&ClientCredential>,
) -> Result<(), ApiError> {
    let key = cred.and_then(|c| credential::ParsedCredential::parse("", t, c).ok());
    if key.is_some_and(|p| live.by_credential(&p.key).is_some()) {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "this client credential already belongs to a live endpoint",
        )
        .hint("every endpoint needs its own key: create it with the postern CLI, which makes a new one each time"));
    }
    Ok(())
}

/// The resource of the connected appliance the request names, if an endpoint of its type can
/// reach it.
fn resource_for(
    link: &AgentView,
    appliance_id: &str,
    req: &EndpointCreateRequest,
) -> Result<ResourceDescriptor, ApiError> {
    let resource = link.resource(&req.origin_resource_id).ok_or_else(|| {
        let known: Vec<&str> = link.resources.iter().map(|r| r.id.as_str()).collect();
        ApiError::new(
            ErrorCode::InvalidOriginResourceId,
            format!(
                "appliance {} has no resource {:?}",
                appliance_id, req.origin_resource_id
            ),
        )
        .hint(format!(
            "resources this appliance declares: {}",
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        ))
        .details(serde_json::json!({"origin_resource_id": req.origin_resource_id, "known": known}))
    })?;
    if resource.kind != req.endpoint_type.resource_kind() {
        return Err(ApiError::invalid(format!(
            "resource {} is of kind {}, which a {} endpoint cannot reach",
            resource.id, resource.kind, req.endpoint_type
        ))
        .hint(format!(
            "use --type {}",
            match resource.kind {
                ResourceKind::Kubernetes => "kubectl",
                ResourceKind::Postgres => "postgres",
                ResourceKind::Ssh => "ssh",
                ResourceKind::Tcp => "tcp",
                // These kinds take one-off ops only (`postern ops docker|aws|gcloud|az|doctl`).
                ResourceKind::Docker | ResourceKind::Cloud =>
                    "tcp, kubectl, postgres or ssh with another resource",
            }
        )));
    }
    Ok(resource.clone())
}

/// The credential sent with `create`, checked by its type's front end.
fn validate_credential(t: EndpointType, cred: Option<&ClientCredential>) -> Result<(), ApiError> {
    match t {
        EndpointType::Tcp => tcp::validate(cred),
        EndpointType::Kubectl => kube::validate(cred),
        EndpointType::Postgres => postgres::validate(cred),
        EndpointType::Ssh => ssh::validate(cred),
    }
}

fn appliance_offline(appliance: &ApplianceRow) -> ApiError {
    ApiError::new(ErrorCode::ApplianceOffline, format!("appliance {} ({}/{}) is offline", appliance.id, appliance.app, appliance.customer))
        .hint("the agent in the appliance is not connected; check `postern appliance list` and the agent's log")
        .details(serde_json::json!({"appliance_id": appliance.id, "last_seen": appliance.last_seen}))
}

impl Endpoints {
    pub fn new(deps: EndpointDeps) -> Endpoints {
        let EndpointDeps {
            store,
            audit,
            clock,
            agents,
            notifier,
            grants,
            front_ends,
            live,
            default_ttl,
            tasks,
            runtime,
            shutdown,
        } = deps;
        Endpoints {
            store,
            audit,
            clock,
            agents,
            notifier,
            grants,
            front_ends,
            live,
            default_ttl,
            tasks,
            runtime,
            shutdown,
        }
    }

    /// The clock's time at the store's precision (see [`Clock::stored_now`]).
    pub(super) fn now(&self) -> Timestamp {
        self.clock.stored_now()
    }

    /// What an agent that (re)connects is told to open: its appliance's live endpoints.
    pub async fn grants_for(&self, appliance_id: &str) -> Vec<EndpointGrant> {
        match self.store.active_endpoints_of(appliance_id).await {
            Ok(rows) => {
                let mut grants = Vec::new();
                for ep in rows.into_iter().filter_map(|r| self.live.get(&r.id)) {
                    grants.push(self.announced(ep.grant()).await);
                }
                grants
            }
            Err(e) => {
                tracing::error!(error = %e, "could not list endpoints for the agent");
                Vec::new()
            }
        }
    }

    /// The record as `caller` may see it: the creator of an active endpoint also gets what
    /// their client needs to connect.
    pub async fn record_for(
        &self,
        caller: &Caller,
        row: EndpointRow,
    ) -> Result<EndpointRecord, ApiError> {
        let creator = caller.made(row.created_by_id.as_deref());
        let rec = self.record(row).await?;
        self.with_access(creator, rec)
    }

    /// Adds what the creator of an active endpoint needs to connect (`creator`: the caller's
    /// token is the one that created it, compared by id).
    fn with_access(
        &self,
        creator: bool,
        mut rec: EndpointRecord,
    ) -> Result<EndpointRecord, ApiError> {
        if creator && rec.state == EndpointState::Active {
            if let Some(ep) = self.live.get(&rec.id) {
                rec.access = Some(self.front_ends.access(&ep, rec.address.as_deref())?);
            }
        }
        Ok(rec)
    }

    pub async fn record(&self, row: EndpointRow) -> Result<EndpointRecord, ApiError> {
        let appliance = self
            .store
            .get_appliance(&row.appliance_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| ApiError::internal(format!("endpoint {} has no appliance", row.id)))?;
        let sessions = self.live.live_sessions(&row.id);
        Ok(record_of(
            row,
            appliance.app,
            appliance.customer,
            sessions,
            self.now(),
        ))
    }

    /// The endpoint, if the caller may see it.
    pub async fn get(&self, caller: &Caller, id: &str) -> Result<EndpointRecord, ApiError> {
        let nf = || not_found(id);
        let row = crate::lookup::found(self.store.get_endpoint(id).await, nf)?;
        let appliance = self.store.get_appliance(&row.appliance_id).await;
        let appliance = crate::lookup::seen_by(caller, appliance, nf)?;
        let sessions = self.live.live_sessions(&row.id);
        let creator = caller.made(row.created_by_id.as_deref());
        let rec = record_of(row, appliance.app, appliance.customer, sessions, self.now());
        let rec = self.with_refusal(rec).await;
        self.with_access(creator, rec)
    }

    /// Every endpoint the caller may see, oldest first: one query, however many there are.
    pub async fn list(&self, caller: &Caller) -> Result<Vec<EndpointRecord>, ApiError> {
        let now = self.now();
        let rows = self
            .store
            .list_endpoints_with_owner(caller.customer_scope())
            .await
            .map_err(internal)?;
        Ok(rows
            .into_iter()
            .filter(|r| caller.sees_customer(&r.customer))
            .map(|r| {
                let sessions = self.live.live_sessions(&r.endpoint.id);
                record_of(r.endpoint, r.app, r.customer, sessions, now)
            })
            .collect())
    }

    /// Opens an endpoint into a connected appliance under a live operate grant: at once when
    /// the customer's policy approves by itself, else waiting for a person.
    pub async fn create(
        self: &Arc<Self>,
        caller: &Caller,
        req: EndpointCreateRequest,
    ) -> Result<EndpointRecord, ApiError> {
        caller.require(&[Role::Admin, Role::Operator], "open ops endpoints")?;
        let ttl = req
            .ttl_s
            .map(Duration::from_secs)
            .unwrap_or(self.default_ttl);
        super::validate_ttl(ttl)?;
        let found = self.store.find_appliance(&req.app, &req.customer).await;
        let appliance = crate::lookup::registered(found, &req.app, &req.customer)?;
        caller.require_customer(&appliance.customer)?;
        self.audit.room_for_request(&appliance.id).await?;
        let link = self
            .agents
            .view(&appliance.id)
            .ok_or_else(|| appliance_offline(&appliance))?;
        let resource = resource_for(&link, &appliance.id, &req)?;
        validate_credential(req.endpoint_type, req.credential.as_ref())?;
        credential_is_free(&self.live, req.endpoint_type, req.credential.as_ref())?;

        let now = self.now();
        let phase = endpoint_types::phase::check_active(req.phase)?;
        let grant = self.grants.require_phase(&appliance, phase, now).await?;
        let ttl_signed =
            jiff::SignedDuration::try_from(ttl).map_err(|_| ApiError::invalid("TTL too large"))?;
        let requested_until = now
            .checked_add(ttl_signed)
            .map_err(|_| ApiError::invalid("TTL too large"))?;
        // Never past the creator's token: it could not fetch the credentials after that.
        let requested_until = match self
            .store
            .token_expiry(&caller.token_id)
            .await
            .map_err(internal)?
        {
            Some(token_end) => requested_until.min(token_end),
            None => requested_until,
        };
        let id = format!("ep_{}", crate::identity::random_hex(8));
        let mut row = EndpointRow {
            id: id.clone(),
            endpoint_type: req.endpoint_type,
            appliance_id: appliance.id.clone(),
            resource_id: resource.id.clone(),
            state: EndpointState::PendingApproval,
            created_by: caller.actor(),
            created_by_id: Some(caller.token_id.clone()).filter(|id| !id.is_empty()),
            created_at: now,
            expires_at: requested_until,
            ended_at: None,
            address: None,
            sessions_total: 0,
            grant_id: Some(grant.id.clone()),
            credential: req.credential.clone(),
            phase,
        };
        let subject = Subject::endpoint(&appliance.id, &id);
        // The endpoint's phase's policy decides (install: always a person).
        let ruling = self.grants.ruling(&appliance.id, phase, now).await;
        let requested = serde_json::json!({
            "type": req.endpoint_type, "origin_resource_id": resource.id, "ttl_s": ttl.as_secs(), "grant_id": grant.id,
            "phase": phase.as_str(), "policy_table": ruling.table, "rule": ruling.rule(),
        });
        // Install is decided by a person for each use, whatever the policy (the gate says so
        // too; this holds whatever gate is plugged in).
        let automatic = match endpoint_types::phase::always_needs_person(phase) {
            true => None,
            false => {
                self.grants
                    .automatic_decision(&appliance.id, phase, now)
                    .await
            }
        };
        let Some((by, window_end)) = automatic else {
            // Created waiting: the policy wants a person, and the listener opens on approval.
            self.store.insert_endpoint(&row).await.map_err(internal)?;
            self.audit
                .record("endpoint.requested", &caller.actor(), subject, requested)
                .await;
            self.notifier
                .waiting(&appliance.customer, "endpoint", &id)
                .await;
            return self.record(row).await;
        };
        // Never past the grant, nor past the window that approved it.
        row.expires_at = [Some(requested_until), grant.expires_at, window_end]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(requested_until);
        let Listening { address, listener } = self.front_ends.listen(req.endpoint_type, None)?;
        row.state = endpoint_lifecycle::next(row.state, EndpointEvent::Approve)
            .map_err(|e| e.to_api_error(&id))?;
        row.address = Some(address.clone());
        self.store.insert_endpoint(&row).await.map_err(internal)?;
        let ep = self.activate(&row, listener);
        self.agents
            .send(&appliance.id, ToAgent::EndpointOpen(ep.grant()));
        self.audit
            .record(
                "endpoint.requested",
                &caller.actor(),
                subject.clone(),
                requested,
            )
            .await;
        self.audit
            .record("endpoint.created", by, subject, serde_json::json!({
                "type": req.endpoint_type, "origin_resource_id": resource.id, "expires_at": row.expires_at, "address": address,
                "approved_by": by, "phase": phase.as_str(), "policy_table": ruling.table, "rule": ruling.rule(),
            }))
            .await;
        self.record_for(caller, row).await
    }

    /// Registers a live endpoint, starts serving its listener and arms its expiry.
    pub(super) fn activate(
        self: &Arc<Self>,
        row: &EndpointRow,
        listener: Option<std::net::TcpListener>,
    ) -> Arc<LiveEndpoint> {
        let ep = Arc::new(LiveEndpoint::new(row, self.shutdown.child_token()));
        if let Err(e) = self.live.insert(ep.clone()) {
            // Only reachable by a race of two creates with one key, or rows stored before keys
            // were checked: the newcomer stays unreachable rather than shared.
            tracing::error!(endpoint = %row.id, error = %e, "endpoint has no client credential of its own: no client can connect");
        }
        if let Some(listener) = listener {
            self.front_ends.serve(ep.clone(), listener);
        }
        let (service, timed) = (self.clone(), ep.clone());
        self.tasks.spawn_on(
            async move {
                let left = timed.expires_at.duration_since(service.now());
                let wait = if left.is_negative() {
                    Duration::ZERO
                } else {
                    left.unsigned_abs()
                };
                tokio::select! {
                    _ = timed.cancel.cancelled() => {}
                    _ = tokio::time::sleep(wait) => {
                        service.end(&timed.id, CloseReason::Expired, &Caller::system()).await;
                    }
                }
            },
            &self.runtime,
        );
        ep
    }
}
