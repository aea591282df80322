//! Permission phases: grant requests, customer decisions, expiry, and the live-`operate`
//! check every op and endpoint goes through before anything reaches the appliance.

use crate::{
    audit::Subject,
    identity::{random_hex, Caller},
    server::Gateway,
    store::{ApplianceRow, GrantChange, GrantRow, StoreError},
};
use endpoint_types::{
    api::Role,
    control::{GrantLevel, GrantRecord, GrantRequest, GrantState},
    duration::{format_duration, TTL_MAX, TTL_MIN},
    lifecycle::{
        grant::{self as grant_lifecycle, GrantEvent},
        grant_state,
    },
    policy::{Decision, Policy},
    resource::PolicySummary,
    ApiError, ErrorCode,
};
use jiff::{SignedDuration, Timestamp};
use std::time::Duration;

fn internal(e: StoreError) -> ApiError {
    ApiError::internal(e.to_string())
}

/// Who approved automatically, as recorded in `decided_by`.
pub const BY_POLICY_AUTOMATIC: &str = "policy:automatic";
pub const BY_POLICY_WINDOW: &str = "policy:window";
pub const BY_STEADY_STATE_DEFAULT: &str = "policy:steady-state";

/// Steady-state is on unless the customer turned it off, in its agent.toml or through an approver.
pub async fn steady_state_enabled(gw: &Gateway, appliance_id: &str) -> bool {
    let by_config = policy_of(gw, appliance_id).await.steady_state;
    let by_approver = gw
        .store
        .steady_state(appliance_id)
        .await
        .ok()
        .flatten()
        .unwrap_or(true);
    by_config && by_approver
}

/// The customer's policy as the appliance last reported it. Unknown (never connected) is
/// treated as `manual`: a person decides.
pub async fn policy_of(gw: &Gateway, appliance_id: &str) -> PolicySummary {
    if let Some(link) = gw.agents.get(appliance_id) {
        return link.policy;
    }
    gw.store
        .appliance_policy(appliance_id)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// What the policy says right now, as (decided_by, latest expiry) when it approves by itself.
pub async fn automatic_decision(
    gw: &Gateway,
    appliance_id: &str,
    now: Timestamp,
) -> Option<(&'static str, Option<Timestamp>)> {
    let summary = policy_of(gw, appliance_id).await;
    let policy = match Policy::parse(&summary) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(appliance = %appliance_id, error = %e, "appliance reported an unusable policy; a person must decide");
            return None;
        }
    };
    match policy.evaluate(now) {
        Decision::Automatic => Some((BY_POLICY_AUTOMATIC, None)),
        Decision::InWindow { closes_at } => Some((BY_POLICY_WINDOW, Some(closes_at))),
        Decision::NeedsPerson => None,
    }
}

pub fn access_hint(app: &str, customer: &str) -> String {
    format!("request it: postern access request --app {app} --customer {customer} --level operate --duration 30m --reason \"…\"")
}

fn earliest(a: Timestamp, b: Option<Timestamp>) -> Timestamp {
    match b {
        Some(b) if b < a => b,
        _ => a,
    }
}

pub fn record(row: &GrantRow, appliance: &ApplianceRow, now: Timestamp) -> GrantRecord {
    GrantRecord {
        id: row.id.clone(),
        level: row.level,
        state: grant_state(row.state, row.expires_at, now),
        appliance_id: row.appliance_id.clone(),
        app: appliance.app.clone(),
        customer: appliance.customer.clone(),
        requested_by: row.requested_by.clone(),
        reason: row.reason.clone(),
        duration_s: row.duration_ms.max(0) as u64 / 1000,
        requested_at: row.requested_at,
        approved_at: if row.state == GrantState::Active || row.state == GrantState::Revoked {
            row.decided_at
        } else {
            None
        },
        expires_at: row.expires_at,
        decided_by: row.decided_by.clone(),
        message: row.message.clone(),
    }
}

async fn appliance_of(gw: &Gateway, app: &str, customer: &str) -> Result<ApplianceRow, ApiError> {
    gw.store
        .find_appliance(app, customer)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("no appliance for app {app} and customer {customer}"),
            )
            .hint("`postern appliance list` shows the registered appliances")
        })
}

pub async fn request(
    gw: &Gateway,
    caller: &Caller,
    req: GrantRequest,
) -> Result<GrantRecord, ApiError> {
    caller.require(&[Role::Admin, Role::Operator], "request access")?;
    let duration = Duration::from_secs(req.duration_s);
    if duration < TTL_MIN || duration > TTL_MAX {
        return Err(ApiError::invalid(format!(
            "duration {} is outside the allowed range",
            format_duration(duration)
        ))
        .hint("use a duration between 10s and 7d, e.g. --duration 30m"));
    }
    if req.reason.trim().is_empty() {
        return Err(ApiError::invalid("a grant needs a reason")
            .hint("say why, e.g. --reason \"INC-1234: pods crash-looping\""));
    }
    let appliance = appliance_of(gw, &req.app, &req.customer).await?;
    let now = crate::store::now();
    let mut row = GrantRow {
        id: format!("gr_{}", random_hex(8)),
        appliance_id: appliance.id.clone(),
        level: req.level,
        state: GrantState::PendingApproval,
        requested_by: caller.actor(),
        reason: req.reason.clone(),
        duration_ms: duration.as_millis() as i64,
        requested_at: now,
        decided_by: None,
        decided_at: None,
        message: None,
        expires_at: None,
    };
    let auto = match req.level {
        // Read-only observability is on by default: the customer's agent.toml and the customer
        // approver (`access steady-state --disable`) can each turn it off.
        GrantLevel::SteadyState if steady_state_enabled(gw, &appliance.id).await => {
            Some((BY_STEADY_STATE_DEFAULT, None))
        }
        GrantLevel::SteadyState => {
            return Err(ApiError::new(ErrorCode::Forbidden, format!("the customer has disabled steady-state access to {}/{}", req.app, req.customer))
                .hint("ask the customer to re-enable it: postern access steady-state --enable (customer approver)"));
        }
        _ => automatic_decision(gw, &appliance.id, now).await,
    };
    if let Some((by, window_end)) = auto {
        row.state = grant_lifecycle::next(row.state, GrantEvent::Approve)
            .map_err(|e| e.to_api_error(&row.id))?;
        row.decided_by = Some(by.to_string());
        row.decided_at = Some(now);
        // A grant the policy approved inside a window ends with the window.
        row.expires_at = Some(earliest(
            now + SignedDuration::from_millis(row.duration_ms),
            window_end,
        ));
    }
    gw.store.insert_grant(&row).await.map_err(internal)?;
    let subject = Subject::appliance(&appliance.id);
    let detail = serde_json::json!({
        "grant_id": row.id, "level": req.level.as_str(), "duration_s": req.duration_s, "reason": req.reason,
    });
    gw.audit
        .record("grant.requested", &caller.actor(), subject.clone(), detail)
        .await;
    match auto {
        Some((by, _)) => {
            gw.audit
                .record("grant.approved", by, subject, serde_json::json!({
                    "grant_id": row.id, "level": req.level.as_str(), "expires_at": row.expires_at,
                }))
                .await;
            crate::agents_sync::push_grants(gw, &appliance.id).await;
        }
        None => crate::notify::waiting(gw, &appliance.customer, "grant", &row.id).await,
    }
    Ok(record(&row, &appliance, now))
}

async fn load(
    gw: &Gateway,
    caller: &Caller,
    id: &str,
) -> Result<(GrantRow, ApplianceRow), ApiError> {
    let nf = || {
        ApiError::new(ErrorCode::NotFound, format!("no grant {id}"))
            .hint("`postern access list` shows your grants")
    };
    let row = gw
        .store
        .get_grant(id)
        .await
        .map_err(internal)?
        .ok_or_else(nf)?;
    let appliance = gw
        .store
        .get_appliance(&row.appliance_id)
        .await
        .map_err(internal)?
        .ok_or_else(nf)?;
    if !caller.sees_customer(&appliance.customer) {
        return Err(nf());
    }
    Ok((row, appliance))
}

pub async fn get(gw: &Gateway, caller: &Caller, id: &str) -> Result<GrantRecord, ApiError> {
    let (row, appliance) = load(gw, caller, id).await?;
    Ok(record(&row, &appliance, Timestamp::now()))
}

pub async fn list(gw: &Gateway, caller: &Caller) -> Result<Vec<GrantRecord>, ApiError> {
    let now = Timestamp::now();
    let mut out = Vec::new();
    for row in gw.store.list_grants().await.map_err(internal)? {
        if let Some(a) = gw
            .store
            .get_appliance(&row.appliance_id)
            .await
            .map_err(internal)?
        {
            if caller.sees_customer(&a.customer) {
                out.push(record(&row, &a, now));
            }
        }
    }
    Ok(out)
}

/// The refusal for `event` on grant `id` after a compare-and-set found it moved by another
/// request or replica: the same structured error as for any other state that does not take it,
/// from the state it is in now.
async fn lost_race(gw: &Gateway, id: &str, event: GrantEvent, now: Timestamp) -> ApiError {
    let state = match gw.store.get_grant(id).await {
        Ok(Some(row)) => grant_state(row.state, row.expires_at, now),
        Ok(None) => return ApiError::new(ErrorCode::NotFound, format!("no grant {id}")),
        Err(e) => return internal(e),
    };
    match grant_lifecycle::next(state, event) {
        Err(e) => e.to_api_error(id),
        // It moved and came back to a state that takes the event: report the race itself.
        Ok(_) => ApiError::new(ErrorCode::Conflict, format!("grant {id} changed while this request was deciding it"))
            .hint("look at it again (`postern access list`) and repeat if it still applies")
            .details(serde_json::json!({"id": id, "record": "grant", "state": state.as_str(), "event": event.name(), "ended": false})),
    }
}

/// Moves grant `row` by `event` through the grant state machine and a compare-and-set in the
/// store; a refusal (the machine's, or a lost race) is audited as `denied` and returned.
async fn move_grant(
    gw: &Gateway,
    caller: &Caller,
    row: &GrantRow,
    event: GrantEvent,
    action: &str,
    change: GrantChange<'_>,
) -> Result<GrantState, ApiError> {
    let subject = Subject::appliance(&row.appliance_id);
    let refusal =
        match grant_lifecycle::next(grant_state(row.state, row.expires_at, change.at), event) {
            Err(e) => e.to_api_error(&row.id),
            Ok(to) => match gw.store.move_grant(&row.id, row.state, event, change).await {
                Ok(true) => return Ok(to),
                Ok(false) => lost_race(gw, &row.id, event, change.at).await,
                Err(e) => return Err(internal(e)),
            },
        };
    Err(crate::approvals::refused(&gw.audit, caller, subject, action, refusal).await)
}

/// A customer approver's decision on a pending grant. Duration counts from the approval. A
/// grant that is no longer pending (decided, withdrawn, ended) is not changed: CONFLICT.
pub async fn decide(
    gw: &Gateway,
    caller: &Caller,
    id: &str,
    approve: bool,
    message: Option<String>,
) -> Result<GrantRecord, ApiError> {
    caller.require(&[Role::Approver], "decide on grants")?;
    let (row, appliance) = load(gw, caller, id).await?;
    caller.require_customer(&appliance.customer)?;
    let now = crate::store::now();
    let (event, action) = if approve {
        (GrantEvent::Approve, "approve")
    } else {
        (GrantEvent::Deny, "deny")
    };
    let expires_at = approve.then(|| now + SignedDuration::from_millis(row.duration_ms));
    let who = caller.actor();
    let change = GrantChange {
        by: &who,
        at: now,
        message: message.as_deref(),
        expires_at,
    };
    move_grant(gw, caller, &row, event, action, change).await?;
    let kind = if approve {
        "grant.approved"
    } else {
        "grant.denied"
    };
    gw.audit
        .record(kind, &caller.actor(), Subject::appliance(&appliance.id), serde_json::json!({
            "grant_id": id, "level": row.level.as_str(), "expires_at": expires_at, "message": message,
        }))
        .await;
    if approve {
        crate::agents_sync::push_grants(gw, &appliance.id).await;
    }
    let row = gw
        .store
        .get_grant(id)
        .await
        .map_err(internal)?
        .ok_or_else(|| ApiError::internal("grant vanished"))?;
    Ok(record(&row, &appliance, now))
}

/// Ends a grant: an active one (its endpoints are cut, the agent told), or a pending request
/// its requester withdraws. Revoking a grant that already ended (denied, expired, revoked) is
/// an error (CONFLICT), not a silent success: the caller learns it was over already.
pub async fn revoke(gw: &Gateway, caller: &Caller, id: &str) -> Result<GrantRecord, ApiError> {
    let (row, appliance) = load(gw, caller, id).await?;
    let own = row.requested_by == caller.actor();
    if !own {
        caller.require(
            &[Role::Admin, Role::Approver],
            "revoke other people's grants",
        )?;
    }
    let now = crate::store::now();
    let who = caller.actor();
    let change = GrantChange {
        by: &who,
        at: now,
        message: None,
        expires_at: None,
    };
    move_grant(gw, caller, &row, GrantEvent::Revoke, "revoke", change).await?;
    gw.audit
        .record(
            "grant.revoked",
            &caller.actor(),
            Subject::appliance(&appliance.id),
            serde_json::json!({
                "grant_id": id, "was": row.state.as_str(),
            }),
        )
        .await;
    crate::endpoints::end_all_of_grant(
        gw,
        id,
        endpoint_types::resource::CloseReason::Revoked,
        caller,
    )
    .await;
    crate::agents_sync::push_grants(gw, &appliance.id).await;
    let row = gw
        .store
        .get_grant(id)
        .await
        .map_err(internal)?
        .ok_or_else(|| ApiError::internal("grant vanished"))?;
    Ok(record(&row, &appliance, now))
}

/// The live operate grant that authorises an op or endpoint now, or the structured refusal.
pub async fn require_operate(
    gw: &Gateway,
    appliance: &ApplianceRow,
    now: Timestamp,
) -> Result<GrantRow, ApiError> {
    let grants = gw.store.grants_of(&appliance.id).await.map_err(internal)?;
    let operate: Vec<&GrantRow> = grants
        .iter()
        .filter(|g| g.level == GrantLevel::Operate)
        .collect();
    if let Some(live) = operate
        .iter()
        .filter(|g| grant_state(g.state, g.expires_at, now) == GrantState::Active)
        .max_by_key(|g| g.expires_at)
    {
        return Ok((*live).clone());
    }
    let hint = access_hint(&appliance.app, &appliance.customer);
    if let Some(last) = operate
        .iter()
        .filter(|g| g.decided_at.is_some() && g.state != GrantState::Denied)
        .max_by_key(|g| g.expires_at)
    {
        return Err(ApiError::new(
            ErrorCode::OperateAccessExpired,
            format!(
                "the operate grant {} on {}/{} has ended",
                last.id, appliance.app, appliance.customer
            ),
        )
        .hint(hint)
        .details(serde_json::json!({"grant_id": last.id, "expired_at": last.expires_at})));
    }
    Err(ApiError::new(
        ErrorCode::OperateAccessRequired,
        format!(
            "no live operate grant on {}/{}",
            appliance.app, appliance.customer
        ),
    )
    .hint(hint))
}

/// The grants service as [`crate::ports::GrantGate`], until it stands on its own ports.
pub struct GatewayGrants(pub std::sync::Arc<Gateway>);

#[async_trait::async_trait]
impl crate::ports::GrantGate for GatewayGrants {
    async fn require_operate(
        &self,
        appliance: &ApplianceRow,
        now: Timestamp,
    ) -> Result<GrantRow, ApiError> {
        require_operate(&self.0, appliance, now).await
    }

    async fn automatic_decision(
        &self,
        appliance_id: &str,
        now: Timestamp,
    ) -> Option<(&'static str, Option<Timestamp>)> {
        automatic_decision(&self.0, appliance_id, now).await
    }

    async fn policy_of(&self, appliance_id: &str) -> PolicySummary {
        policy_of(&self.0, appliance_id).await
    }
}
