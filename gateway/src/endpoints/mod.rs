//! Endpoint lifecycle, shared by every endpoint type: create, serve, retire, expire, restore.
//!
//! One [`LiveEndpoint`] per active endpoint holds a cancellation token; every session of the
//! endpoint selects on it, so retire, expiry and revocation cut all sessions at once.

pub mod credential;
pub mod front_ends;
pub mod kube;
pub mod postgres;
mod registry;
pub mod session;
pub mod ssh;
mod tcp;

pub use registry::{CredentialTaken, EndpointRegistry, LiveEndpoint};

use crate::{
    audit::Subject,
    identity::Caller,
    server::Gateway,
    store::{EndpointRow, StoreError},
};
use endpoint_types::{
    api::{ClientCredential, EndpointCreateRequest, EndpointRecord, EndpointState, Role},
    duration::{format_duration, TTL_MAX, TTL_MIN},
    frame::{EndpointGrant, Frame},
    lifecycle::endpoint::{self as endpoint_lifecycle, EndpointEvent},
    resource::{CloseReason, EndpointType, ResourceScope},
    ApiError, ErrorCode,
};
use jiff::Timestamp;
use std::{sync::Arc, time::Duration};

impl LiveEndpoint {
    /// The customer's scope for the resource as the connected agent last reported it (None
    /// while the appliance is offline: then nothing can reach it anyway).
    pub fn scope(&self, gw: &Gateway) -> Option<ResourceScope> {
        gw.agents.get(&self.appliance_id).and_then(|link| {
            link.resource(&self.resource_id)
                .and_then(|r| r.scope.clone())
        })
    }

    pub fn grant(&self) -> EndpointGrant {
        EndpointGrant {
            endpoint_id: self.id.clone(),
            endpoint_type: self.endpoint_type,
            resource_id: self.resource_id.clone(),
            expires_at: self.expires_at,
            grant_id: self.grant_id.clone(),
        }
    }
}

fn internal(e: StoreError) -> ApiError {
    ApiError::internal(e.to_string())
}

pub async fn grants_for(gw: &Gateway, appliance_id: &str) -> Vec<EndpointGrant> {
    match gw.store.active_endpoints_of(appliance_id).await {
        Ok(rows) => rows
            .into_iter()
            .filter_map(|r| gw.endpoints.get(&r.id))
            .map(|ep| ep.grant())
            .collect(),
        Err(e) => {
            tracing::error!(error = %e, "could not list endpoints for the agent");
            Vec::new()
        }
    }
}

/// The record as `caller` may see it: the creator of an active endpoint also gets what their
/// client needs to connect.
pub async fn record_for(
    gw: &Gateway,
    caller: &Caller,
    row: EndpointRow,
) -> Result<EndpointRecord, ApiError> {
    let rec = record(gw, row).await?;
    with_access(gw, caller, rec)
}

/// Adds what the creator of an active endpoint needs to connect.
fn with_access(
    gw: &Gateway,
    caller: &Caller,
    mut rec: EndpointRecord,
) -> Result<EndpointRecord, ApiError> {
    if rec.created_by == caller.actor() && rec.state == EndpointState::Active {
        if let Some(ep) = gw.endpoints.get(&rec.id) {
            rec.access = match ep.endpoint_type {
                EndpointType::Tcp => Some(tcp::access(&gw.front, &ep, rec.address.as_deref())?),
                EndpointType::Kubectl => Some(kube::access(&gw.front, &ep)?),
                EndpointType::Postgres => Some(postgres::access(&gw.front, &ep)?),
                EndpointType::Ssh => Some(ssh::access(&gw.front, &ep)?),
            };
        }
    }
    Ok(rec)
}

/// The endpoint's state at `now`: past its expiry an active endpoint is expired, even in the
/// instant before the timer has recorded it so.
fn state_at(row: &EndpointRow, now: Timestamp) -> EndpointState {
    match row.state {
        EndpointState::Active if row.expires_at <= now => EndpointState::Expired,
        s => s,
    }
}

pub async fn record(gw: &Gateway, row: EndpointRow) -> Result<EndpointRecord, ApiError> {
    let appliance = gw
        .store
        .get_appliance(&row.appliance_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| ApiError::internal(format!("endpoint {} has no appliance", row.id)))?;
    let sessions = gw.endpoints.live_sessions(&row.id);
    Ok(record_of(
        row,
        appliance.app,
        appliance.customer,
        sessions,
        Timestamp::now(),
    ))
}

/// The record of a stored endpoint of `app` for `customer` with `sessions` live at `now`.
fn record_of(
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
    }
}

/// The endpoint, if the caller may see it.
pub async fn get(gw: &Gateway, caller: &Caller, id: &str) -> Result<EndpointRecord, ApiError> {
    let row = gw
        .store
        .get_endpoint(id)
        .await
        .map_err(internal)?
        .ok_or_else(|| not_found(id))?;
    let appliance = gw
        .store
        .get_appliance(&row.appliance_id)
        .await
        .map_err(internal)?
        .filter(|a| caller.sees_customer(&a.customer))
        .ok_or_else(|| not_found(id))?;
    let sessions = gw.endpoints.live_sessions(&row.id);
    let rec = record_of(
        row,
        appliance.app,
        appliance.customer,
        sessions,
        Timestamp::now(),
    );
    with_access(gw, caller, rec)
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no endpoint {id}"))
        .hint("`postern ops endpoint list` shows the endpoints you can see")
}

/// Every endpoint the caller may see, oldest first: one query, however many there are.
pub async fn list(gw: &Gateway, caller: &Caller) -> Result<Vec<EndpointRecord>, ApiError> {
    let now = Timestamp::now();
    let rows = gw
        .store
        .list_endpoints_with_owner(caller.customer_scope())
        .await
        .map_err(internal)?;
    Ok(rows
        .into_iter()
        .filter(|r| caller.sees_customer(&r.customer))
        .map(|r| {
            let sessions = gw.endpoints.live_sessions(&r.endpoint.id);
            record_of(r.endpoint, r.app, r.customer, sessions, now)
        })
        .collect())
}

pub fn validate_ttl(ttl: Duration) -> Result<(), ApiError> {
    if ttl < TTL_MIN || ttl > TTL_MAX {
        return Err(ApiError::invalid(format!(
            "TTL {} is outside the allowed range",
            format_duration(ttl)
        ))
        .hint("use a TTL between 10s and 7d, e.g. --ttl 2h"));
    }
    Ok(())
}

pub async fn create(
    gw: &Arc<Gateway>,
    caller: &Caller,
    req: EndpointCreateRequest,
) -> Result<EndpointRecord, ApiError> {
    caller.require(&[Role::Admin, Role::Operator], "open ops endpoints")?;
    let ttl = req
        .ttl_s
        .map(Duration::from_secs)
        .unwrap_or(gw.limits.default_endpoint_ttl);
    validate_ttl(ttl)?;
    let appliance = gw
        .store
        .find_appliance(&req.app, &req.customer)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!(
                    "no appliance for app {} and customer {}",
                    req.app, req.customer
                ),
            )
            .hint("`postern appliance list` shows the registered appliances")
        })?;
    caller.require_customer(&appliance.customer)?;
    let link = gw.agents.get(&appliance.id).ok_or_else(|| {
        ApiError::new(ErrorCode::ApplianceOffline, format!("appliance {} ({}/{}) is offline", appliance.id, appliance.app, appliance.customer))
            .hint("the agent in the appliance is not connected; check `postern appliance list` and the agent's log")
            .details(serde_json::json!({"appliance_id": appliance.id, "last_seen": appliance.last_seen}))
    })?;
    let resource = link.resource(&req.origin_resource_id).ok_or_else(|| {
        let known: Vec<&str> = link.resources.iter().map(|r| r.id.as_str()).collect();
        ApiError::new(
            ErrorCode::InvalidOriginResourceId,
            format!(
                "appliance {} has no resource {:?}",
                appliance.id, req.origin_resource_id
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
                endpoint_types::resource::ResourceKind::Kubernetes => "kubectl",
                endpoint_types::resource::ResourceKind::Postgres => "postgres",
                endpoint_types::resource::ResourceKind::Ssh => "ssh",
                endpoint_types::resource::ResourceKind::Tcp => "tcp",
                // These kinds take one-off ops only (`postern ops docker|aws|gcloud|az|doctl`).
                endpoint_types::resource::ResourceKind::Docker
                | endpoint_types::resource::ResourceKind::Cloud =>
                    "tcp, kubectl, postgres or ssh with another resource",
            }
        )));
    }
    match req.endpoint_type {
        EndpointType::Tcp => tcp::validate(req.credential.as_ref())?,
        EndpointType::Kubectl => kube::validate(req.credential.as_ref())?,
        EndpointType::Postgres => postgres::validate(req.credential.as_ref())?,
        EndpointType::Ssh => ssh::validate(req.credential.as_ref())?,
    }
    credential_is_free(&gw.endpoints, req.endpoint_type, req.credential.as_ref())?;

    let now = crate::store::now();
    let grant = crate::grants::require_operate(gw, &appliance, now).await?;
    let ttl_signed =
        jiff::SignedDuration::try_from(ttl).map_err(|_| ApiError::invalid("TTL too large"))?;
    let requested_until = now
        .checked_add(ttl_signed)
        .map_err(|_| ApiError::invalid("TTL too large"))?;
    let id = format!("ep_{}", crate::identity::random_hex(8));
    let mut row = EndpointRow {
        id: id.clone(),
        endpoint_type: req.endpoint_type,
        appliance_id: appliance.id.clone(),
        resource_id: resource.id.clone(),
        state: EndpointState::PendingApproval,
        created_by: caller.actor(),
        created_at: now,
        expires_at: requested_until,
        ended_at: None,
        address: None,
        sessions_total: 0,
        grant_id: Some(grant.id.clone()),
        credential: req.credential.clone(),
    };
    let subject = Subject::endpoint(&appliance.id, &id);
    let requested = serde_json::json!({
        "type": req.endpoint_type, "origin_resource_id": resource.id, "ttl_s": ttl.as_secs(), "grant_id": grant.id,
    });
    let Some((by, window_end)) = crate::grants::automatic_decision(gw, &appliance.id, now).await
    else {
        // Created waiting: the policy wants a person.
        // A person decides; the listener opens on approval.
        gw.store.insert_endpoint(&row).await.map_err(internal)?;
        gw.audit
            .record("endpoint.requested", &caller.actor(), subject, requested)
            .await;
        crate::notify::waiting(gw, &appliance.customer, "endpoint", &id).await;
        return record(gw, row).await;
    };
    // Never past the grant, nor past the window that approved it.
    row.expires_at = [Some(requested_until), grant.expires_at, window_end]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(requested_until);
    let (address, listener) = listen(gw, req.endpoint_type, None)?;
    row.state = endpoint_lifecycle::next(row.state, EndpointEvent::Approve)
        .map_err(|e| e.to_api_error(&id))?;
    row.address = Some(address.clone());
    gw.store.insert_endpoint(&row).await.map_err(internal)?;
    let ep = activate(gw, &row, listener);
    gw.agents
        .send(&appliance.id, Frame::EndpointOpen(ep.grant()));
    gw.audit
        .record(
            "endpoint.requested",
            &caller.actor(),
            subject.clone(),
            requested,
        )
        .await;
    gw.audit
        .record("endpoint.created", by, subject, serde_json::json!({
            "type": req.endpoint_type, "origin_resource_id": resource.id, "expires_at": row.expires_at, "address": address,
            "approved_by": by,
        }))
        .await;
    record_for(gw, caller, row).await
}

/// Every endpoint has its own client credential: one that already opens a live endpoint would
/// make the front ends choose between two. (A postgres endpoint is found by its new id, which
/// is always free.)
fn credential_is_free(
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

/// Where an endpoint's clients connect: its own listener (tcp), or its type's shared front end.
fn listen(
    gw: &Gateway,
    t: EndpointType,
    preferred: Option<std::net::SocketAddr>,
) -> Result<(String, Option<std::net::TcpListener>), ApiError> {
    if let Some(addr) = gw.front_ends.of(t) {
        return Ok((addr.to_string(), None));
    }
    let listener = tcp::bind(gw.endpoint_host, preferred)
        .map_err(|e| ApiError::internal(format!("cannot open a listener: {e}")))?;
    let address = listener
        .local_addr()
        .map_err(|e| ApiError::internal(e.to_string()))?
        .to_string();
    Ok((address, Some(listener)))
}

/// The refusal for `event` on endpoint `id` after a compare-and-set found it moved by another
/// request or replica: the same structured error as for any state that does not take it, from
/// the state it is in now.
async fn lost_race(gw: &Gateway, id: &str, event: EndpointEvent) -> ApiError {
    let state = match gw.store.get_endpoint(id).await {
        Ok(Some(row)) => state_at(&row, Timestamp::now()),
        Ok(None) => return not_found(id),
        Err(e) => return internal(e),
    };
    match endpoint_lifecycle::next(state, event) {
        Err(e) => e.to_api_error(id),
        Ok(_) => ApiError::new(ErrorCode::Conflict, format!("endpoint {id} changed while this request was deciding it"))
            .hint(format!("look at it again (`postern ops endpoint get {id}`) and repeat if it still applies"))
            .details(serde_json::json!({"id": id, "record": "endpoint", "state": state.as_str(), "event": event.name(), "ended": false})),
    }
}

/// Ends a pending endpoint by `event` (deny, retire, or expire when its grant ended before the
/// decision) with a compare-and-set; the lost race as a refusal.
async fn end_pending(
    gw: &Gateway,
    id: &str,
    event: EndpointEvent,
    now: Timestamp,
) -> Result<(), ApiError> {
    match gw
        .store
        .move_endpoint(id, EndpointState::PendingApproval, event, now)
        .await
    {
        Ok(true) => Ok(()),
        Ok(false) => Err(lost_race(gw, id, event).await),
        Err(e) => Err(internal(e)),
    }
}

/// A customer approver's decision on a pending endpoint. On approval the endpoint lives for
/// its TTL from now, never past its operate grant. An endpoint that is no longer pending
/// (denied, retired, expired, or already active) is not changed: CONFLICT, audited as `denied`.
pub async fn decide(
    gw: &Arc<Gateway>,
    caller: &Caller,
    id: &str,
    approve: bool,
    message: Option<String>,
) -> Result<EndpointRecord, ApiError> {
    let rec = get(gw, caller, id).await?;
    caller.require_customer(&rec.customer)?;
    let row = gw
        .store
        .get_endpoint(id)
        .await
        .map_err(internal)?
        .ok_or_else(|| not_found(id))?;
    let now = crate::store::now();
    let subject = Subject::endpoint(&row.appliance_id, id);
    let (event, action) = if approve {
        (EndpointEvent::Approve, "approve")
    } else {
        (EndpointEvent::Deny, "deny")
    };
    let refused =
        |err: ApiError| crate::approvals::refused(&gw.audit, caller, subject.clone(), action, err);
    if let Err(e) = endpoint_lifecycle::next(state_at(&row, now), event) {
        return Err(refused(e.to_api_error(id)).await);
    }
    if !approve {
        if let Err(e) = end_pending(gw, id, EndpointEvent::Deny, now).await {
            return Err(refused(e).await);
        }
        gw.audit
            .record(
                "endpoint.denied",
                &caller.actor(),
                subject,
                serde_json::json!({"message": message}),
            )
            .await;
        return get(gw, caller, id).await;
    }
    let appliance = gw
        .store
        .get_appliance(&row.appliance_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| not_found(id))?;
    let live_grant = crate::grants::require_operate(gw, &appliance, now)
        .await
        .ok()
        .filter(|g| row.grant_id.as_deref() == Some(g.id.as_str()));
    let Some(grant) = live_grant else {
        // The grant it was requested under ended before anyone decided: it can never become
        // active, so it expires now rather than waiting forever.
        let err = ApiError::new(
            ErrorCode::OperateAccessExpired,
            format!("the operate grant endpoint {id} was requested under has ended"),
        )
        .hint(crate::grants::access_hint(
            &appliance.app,
            &appliance.customer,
        ))
        .details(serde_json::json!({"id": id, "grant_id": row.grant_id}));
        if let Err(e) = end_pending(gw, id, EndpointEvent::Expire, now).await {
            return Err(refused(e).await);
        }
        gw.audit
            .record("endpoint.expired", "system:gateway", subject.clone(), serde_json::json!({
                "reason": "expired", "sessions_cut": 0, "while": "pending approval", "grant_id": row.grant_id,
            }))
            .await;
        return Err(refused(err).await);
    };
    let ttl = row.expires_at.duration_since(row.created_at);
    let expires_at = [now.checked_add(ttl).ok(), grant.expires_at]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now);
    let (address, listener) = listen(gw, row.endpoint_type, None)?;
    // Compare-and-set on pending-approval: a retire or another decision that got there first
    // wins, and the listener just made is dropped unused.
    if !gw
        .store
        .activate_endpoint(id, expires_at, &address)
        .await
        .map_err(internal)?
    {
        let err = lost_race(gw, id, EndpointEvent::Approve).await;
        return Err(refused(err).await);
    }
    let row = gw
        .store
        .get_endpoint(id)
        .await
        .map_err(internal)?
        .ok_or_else(|| not_found(id))?;
    let ep = activate(gw, &row, listener);
    gw.agents
        .send(&row.appliance_id, Frame::EndpointOpen(ep.grant()));
    gw.audit
        .record("endpoint.created", &caller.actor(), subject, serde_json::json!({
            "type": row.endpoint_type, "origin_resource_id": row.resource_id, "expires_at": expires_at, "address": address,
            "approved_by": caller.actor(),
        }))
        .await;
    get(gw, caller, id).await
}

/// Registers a live endpoint, starts serving its listener and arms its expiry.
fn activate(
    gw: &Arc<Gateway>,
    row: &EndpointRow,
    listener: Option<std::net::TcpListener>,
) -> Arc<LiveEndpoint> {
    let ep = Arc::new(LiveEndpoint::new(row, gw.shutdown.child_token()));
    if let Err(e) = gw.endpoints.insert(ep.clone()) {
        // Only reachable by a race of two creates with one key, or rows stored before keys
        // were checked: the newcomer stays unreachable rather than shared.
        tracing::error!(endpoint = %row.id, error = %e, "endpoint has no client credential of its own: no client can connect");
    }
    if let Some(listener) = listener {
        gw.tasks.spawn_on(
            tcp::serve(gw.front.clone(), ep.clone(), listener),
            &gw.data_plane,
        );
    }
    let (gw2, ep2) = (gw.clone(), ep.clone());
    gw.tasks.spawn_on(
        async move {
            let left = ep2.expires_at.duration_since(Timestamp::now());
            let wait = if left.is_negative() {
                Duration::ZERO
            } else {
                left.unsigned_abs()
            };
            tokio::select! {
                _ = ep2.cancel.cancelled() => {}
                _ = tokio::time::sleep(wait) => {
                    end(&gw2, &ep2.id, CloseReason::Expired, &Caller::system()).await;
                }
            }
        },
        &gw.data_plane,
    );
    ep
}

/// Ends an active endpoint: store state, cut sessions, tell the agent, audit. Returns the
/// number of sessions cut, or None if it was not active.
pub async fn end(gw: &Gateway, id: &str, reason: CloseReason, caller: &Caller) -> Option<u64> {
    let event = if reason == CloseReason::Expired {
        EndpointEvent::Expire
    } else {
        EndpointEvent::Retire
    };
    match gw
        .store
        .move_endpoint(id, EndpointState::Active, event, Timestamp::now())
        .await
    {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => {
            tracing::error!(endpoint = %id, error = %e, "could not end endpoint in the store");
            return None;
        }
    }
    let ep = gw.endpoints.remove(id)?;
    let cut = ep.live_sessions.load(std::sync::atomic::Ordering::Relaxed);
    ep.end(reason);
    gw.agents.send(
        &ep.appliance_id,
        Frame::EndpointClose {
            endpoint_id: id.to_string(),
            reason,
        },
    );
    let kind = if reason == CloseReason::Expired {
        "endpoint.expired"
    } else {
        "endpoint.retired"
    };
    gw.audit
        .record(
            kind,
            &caller.actor(),
            Subject::endpoint(&ep.appliance_id, id),
            serde_json::json!({
                "reason": reason.as_str(), "sessions_cut": cut,
            }),
        )
        .await;
    tracing::info!(endpoint = %id, reason = reason.as_str(), sessions_cut = cut, "endpoint ended");
    Some(cut)
}

/// Retires an endpoint: an active one is ended with its sessions cut; a pending request is
/// withdrawn (and can then never be approved). One that already ended is an error with its
/// own code (`ENDPOINT_RETIRED`, `ENDPOINT_EXPIRED`; `CONFLICT` for a denied one), audited.
pub async fn retire(gw: &Gateway, caller: &Caller, id: &str) -> Result<EndpointRecord, ApiError> {
    get(gw, caller, id).await?;
    // Customers may tear down any endpoint into their appliances; operators their own or any
    // (the vendor decides who operates), admins all.
    caller.require(
        &[Role::Admin, Role::Operator, Role::Approver],
        "retire endpoints",
    )?;
    // A lost race (an approval or expiry got there first) is retried from the state it left:
    // an endpoint approved meanwhile is still retired, one that ended is refused.
    let mut attempts = 0;
    let (row, moved) = loop {
        attempts += 1;
        let row = gw
            .store
            .get_endpoint(id)
            .await
            .map_err(internal)?
            .ok_or_else(|| not_found(id))?;
        let now = crate::store::now();
        let moved = match endpoint_lifecycle::next(state_at(&row, now), EndpointEvent::Retire) {
            Err(e) => Err(e.to_api_error(id)),
            Ok(_) if row.state == EndpointState::PendingApproval => {
                match gw
                    .store
                    .move_endpoint(
                        id,
                        EndpointState::PendingApproval,
                        EndpointEvent::Retire,
                        now,
                    )
                    .await
                {
                    // Nothing listened yet: there is nothing to cut or to tell the agent.
                    Ok(true) => Ok(0),
                    Ok(false) if attempts < 3 => continue,
                    Ok(false) => Err(lost_race(gw, id, EndpointEvent::Retire).await),
                    Err(e) => Err(internal(e)),
                }
            }
            Ok(_) => match end(gw, id, CloseReason::Retired, caller).await {
                Some(cut) => Ok(cut),
                None if attempts < 3 => continue,
                None => Err(lost_race(gw, id, EndpointEvent::Retire).await),
            },
        };
        break (row, moved);
    };
    let cut = match moved {
        Ok(cut) => cut,
        Err(mut err) => {
            // An endpoint that already ended keeps its own codes for this.
            err.code = match err.details.get("state").and_then(|s| s.as_str()) {
                Some("retired") => ErrorCode::EndpointRetired,
                Some("expired") => ErrorCode::EndpointExpired,
                _ => err.code,
            };
            let subject = Subject::endpoint(&row.appliance_id, id);
            return Err(crate::approvals::refused(&gw.audit, caller, subject, "retire", err).await);
        }
    };
    if row.state == EndpointState::PendingApproval {
        gw.audit
            .record(
                "endpoint.retired",
                &caller.actor(),
                Subject::endpoint(&row.appliance_id, id),
                serde_json::json!({
                    "reason": "retired", "sessions_cut": 0, "while": "pending approval",
                }),
            )
            .await;
    }
    let mut rec = get(gw, caller, id).await?;
    rec.sessions_cut = Some(cut);
    Ok(rec)
}

/// Ends every active endpoint created under a grant (grant revoked).
pub async fn end_all_of_grant(gw: &Gateway, grant_id: &str, reason: CloseReason, caller: &Caller) {
    if let Ok(rows) = gw.store.active_endpoints().await {
        for r in rows
            .into_iter()
            .filter(|r| r.grant_id.as_deref() == Some(grant_id))
        {
            end(gw, &r.id, reason, caller).await;
        }
    }
}

/// Ends every active endpoint of an appliance (revocation).
pub async fn end_all_of(gw: &Gateway, appliance_id: &str, reason: CloseReason, caller: &Caller) {
    if let Ok(rows) = gw.store.active_endpoints_of(appliance_id).await {
        for r in rows {
            end(gw, &r.id, reason, caller).await;
        }
    }
}

/// At start-up: endpoints the store says are active come back on their old address when it is
/// free (a new one otherwise); those that expired while the gateway was down are marked so.
pub async fn restore(gw: &Arc<Gateway>) -> Result<(), StoreError> {
    let now = Timestamp::now();
    for row in gw.store.active_endpoints().await? {
        if row.expires_at <= now {
            if gw
                .store
                .end_endpoint(&row.id, EndpointState::Expired, row.expires_at)
                .await?
            {
                gw.audit
                    .record(
                        "endpoint.expired",
                        "system:gateway",
                        Subject::endpoint(&row.appliance_id, &row.id),
                        serde_json::json!({
                            "reason": "expired", "sessions_cut": 0, "while": "gateway down",
                        }),
                    )
                    .await;
            }
            continue;
        }
        let old = row.address.as_deref().and_then(|a| a.parse().ok());
        match listen(gw, row.endpoint_type, old) {
            Ok((addr, listener)) => {
                if row.address.as_deref() != Some(addr.as_str()) {
                    gw.store.set_endpoint_address(&row.id, &addr).await?;
                }
                activate(gw, &row, listener);
            }
            Err(e) => {
                tracing::error!(endpoint = %row.id, error = %e.message, "could not restore endpoint listener")
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
