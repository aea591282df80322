//! Permission phases: grant requests, customer decisions, expiry, and the live-`operate`
//! check every op and endpoint goes through before anything reaches the appliance.
//!
//! [`Grants`] is the service; it reaches the rest of the gateway only through its ports: the
//! [`GrantStore`], the audit sink, the clock, the connected agents, the approval notifier and
//! [`EndpointsOfGrant`] (what was opened under a grant ends with it).

mod bulk;
mod expiry;
mod gate;
mod refused;
mod store;
mod sync;

#[cfg(test)]
mod bulk_tests;
#[cfg(test)]
pub(crate) mod memory;
#[cfg(test)]
mod tests;

pub use bulk::{BulkRevokeRequest, BulkRevoked};
pub use expiry::run as record_expiries;
pub use gate::access_hint;
pub use store::GrantStore;

use crate::{
    audit::Subject,
    identity::{random_hex, Caller},
    lookup,
    ports::{AgentPort, AuditSink, Clock, Notifier},
    store::{ApplianceRow, GrantChange, GrantMove, GrantRow, StoreError},
};
use async_trait::async_trait;
use endpoint_types::{
    api::Role,
    control::{GrantLevel, GrantRecord, GrantRequest, GrantState},
    duration::{format_duration, TTL_MAX, TTL_MIN},
    lifecycle::{
        grant::{self as grant_lifecycle, GrantEvent},
        grant_state,
    },
    resource::CloseReason,
    ApiError, ErrorCode,
};
use jiff::{SignedDuration, Timestamp};
use std::{sync::Arc, time::Duration};

fn internal(e: StoreError) -> ApiError {
    ApiError::internal(e.to_string())
}

/// Who approved automatically, as recorded in `decided_by`.
pub const BY_POLICY_AUTOMATIC: &str = "policy:automatic";
pub const BY_POLICY_WINDOW: &str = "policy:window";
pub const BY_STEADY_STATE_DEFAULT: &str = "policy:steady-state";

/// Ends every endpoint (and its sessions) opened under a grant, when the grant ends.
#[async_trait]
pub trait EndpointsOfGrant: Send + Sync {
    async fn end_all_of_grant(&self, grant_id: &str, reason: CloseReason, caller: &Caller);
}

/// The grants service.
pub struct Grants {
    store: Arc<dyn GrantStore>,
    audit: Arc<dyn AuditSink>,
    clock: Arc<dyn Clock>,
    agents: Arc<dyn AgentPort>,
    notifier: Arc<dyn Notifier>,
    endpoints: Arc<dyn EndpointsOfGrant>,
    /// Wakes the expiry recorder (`expiry`) when a grant is approved.
    expiry_bell: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Grants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grants").finish_non_exhaustive()
    }
}

fn earliest(a: Timestamp, b: Option<Timestamp>) -> Timestamp {
    match b {
        Some(b) if b < a => b,
        _ => a,
    }
}

/// A grant as the API shows it, with its appliance's app and customer.
pub fn record(row: &GrantRow, app: &str, customer: &str, now: Timestamp) -> GrantRecord {
    GrantRecord {
        id: row.id.clone(),
        level: row.level,
        state: grant_state(row.state, row.expires_at, now),
        appliance_id: row.appliance_id.clone(),
        app: app.to_string(),
        customer: customer.to_string(),
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
        refused: None,
    }
}

impl Grants {
    pub fn new(
        store: Arc<dyn GrantStore>,
        audit: Arc<dyn AuditSink>,
        clock: Arc<dyn Clock>,
        agents: Arc<dyn AgentPort>,
        notifier: Arc<dyn Notifier>,
        endpoints: Arc<dyn EndpointsOfGrant>,
    ) -> Grants {
        Grants {
            store,
            audit,
            clock,
            agents,
            notifier,
            endpoints,
            expiry_bell: Arc::default(),
        }
    }

    /// Now, at the store's precision (see [`Clock::stored_now`]).
    fn stored_now(&self) -> Timestamp {
        self.clock.stored_now()
    }

    async fn appliance_of(&self, app: &str, customer: &str) -> Result<ApplianceRow, ApiError> {
        lookup::registered(
            self.store.find_appliance(app, customer).await,
            app,
            customer,
        )
    }

    pub async fn request(
        &self,
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
        let appliance = self.appliance_of(&req.app, &req.customer).await?;
        caller.require_customer(&appliance.customer)?;
        self.audit.room_for_request(&appliance.id).await?;
        let now = self.stored_now();
        let mut row = GrantRow {
            id: format!("gr_{}", random_hex(8)),
            appliance_id: appliance.id.clone(),
            level: req.level,
            state: GrantState::PendingApproval,
            requested_by: caller.actor(),
            requested_by_id: Some(caller.token_id.clone()).filter(|id| !id.is_empty()),
            reason: req.reason.clone(),
            duration_ms: i64::try_from(duration.as_millis()).unwrap_or(i64::MAX),
            requested_at: now,
            decided_by: None,
            decided_at: None,
            message: None,
            expires_at: None,
        };
        let auto = match req.level {
            // Read-only observability is on by default: the customer's agent.toml and the customer
            // approver (`access steady-state --disable`) can each turn it off.
            GrantLevel::SteadyState if self.steady_state_enabled(&appliance.id).await => {
                Some((BY_STEADY_STATE_DEFAULT, None))
            }
            GrantLevel::SteadyState => {
                return Err(ApiError::new(ErrorCode::Forbidden, format!("the customer has disabled steady-state access to {}/{}", req.app, req.customer))
                    .hint("ask the customer to re-enable it: postern access steady-state --enable (customer approver)"));
            }
            level => self.automatic_decision(&appliance.id, level, now).await,
        };
        let ruling = match req.level {
            GrantLevel::SteadyState => None,
            level => Some(endpoint_types::phase_policy::ruling(
                &self.policy_of(&appliance.id).await,
                level,
                now,
            )),
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
        self.store.insert_grant(&row).await.map_err(internal)?;
        let subject = Subject::appliance(&appliance.id);
        let mut detail = serde_json::json!({
            "grant_id": row.id, "level": req.level.as_str(), "duration_s": req.duration_s, "reason": req.reason,
        });
        if let Some(r) = &ruling {
            r.add_to(&mut detail);
        }
        self.audit
            .record("grant.requested", &caller.actor(), subject.clone(), detail)
            .await;
        match auto {
            Some((by, _)) => {
                self.audit
                    .record("grant.approved", by, subject, {
                        let mut d = serde_json::json!({
                            "grant_id": row.id, "level": req.level.as_str(), "expires_at": row.expires_at,
                        });
                        if let Some(r) = &ruling {
                            r.add_to(&mut d);
                        }
                        d
                    })
                    .await;
                self.ring_expiry_bell();
                self.push_grants(&appliance.id).await;
            }
            None => {
                self.notifier
                    .waiting(&appliance.customer, "grant", &row.id)
                    .await
            }
        }
        Ok(record(&row, &appliance.app, &appliance.customer, now))
    }

    /// The grant and its appliance, if the caller may see them; NOT_FOUND otherwise (an
    /// approver of another customer learns nothing about it).
    async fn load(&self, caller: &Caller, id: &str) -> Result<(GrantRow, ApplianceRow), ApiError> {
        let nf = || {
            ApiError::new(ErrorCode::NotFound, format!("no grant {id}"))
                .hint("`postern access list` shows your grants")
        };
        let (row, appliance) = lookup::found(self.store.grant_with_appliance(id).await, nf)?;
        Ok((row, lookup::seen_by(caller, Ok(Some(appliance)), nf)?))
    }

    pub async fn get(&self, caller: &Caller, id: &str) -> Result<GrantRecord, ApiError> {
        let (row, appliance) = self.load(caller, id).await?;
        let rec = record(&row, &appliance.app, &appliance.customer, self.clock.now());
        Ok(self.with_refusal(rec).await)
    }

    /// The grants the caller may see, oldest request first: one store query, filtered there
    /// by the caller's customer when it is bound to one.
    pub async fn list(&self, caller: &Caller) -> Result<Vec<GrantRecord>, ApiError> {
        let now = self.clock.now();
        let rows = self
            .store
            .list_grants_with_owner(caller.customer_scope())
            .await
            .map_err(internal)?;
        let mut out = Vec::with_capacity(rows.len());
        for g in &rows {
            let rec = record(&g.grant, &g.app, &g.customer, now);
            // Only a revoked grant can carry the appliance's refusal.
            out.push(if rec.state == GrantState::Revoked {
                self.with_refusal(rec).await
            } else {
                rec
            });
        }
        Ok(out)
    }

    /// The refusal for `event` on grant `id` after a compare-and-set found it moved by another
    /// request or replica: the same structured error as for any other state that does not take
    /// it, from the state it is in now.
    async fn lost_race(&self, id: &str, event: GrantEvent, now: Timestamp) -> ApiError {
        let state = match self.store.get_grant(id).await {
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

    /// Moves grant `row` by `event` through the grant state machine and a compare-and-set in
    /// the store, in one transaction with its record `(kind, detail)`: the move is never
    /// stored without its record, nor recorded without the move. A refusal (the machine's, or
    /// a lost race) is audited as `denied` and returned.
    async fn move_grant(
        &self,
        caller: &Caller,
        row: &GrantRow,
        (event, action): (GrantEvent, &str),
        change: GrantChange<'_>,
        (kind, detail): (&str, serde_json::Value),
    ) -> Result<GrantState, ApiError> {
        let subject = Subject::appliance(&row.appliance_id);
        let refusal =
            match grant_lifecycle::next(grant_state(row.state, row.expires_at, change.at), event) {
                Err(e) => e.to_api_error(&row.id),
                Ok(to) => {
                    let grant_move = GrantMove::new(&row.id, row.state, event, change);
                    let grants: &dyn crate::ports::GrantMover = self.store.as_ref();
                    let moved = self
                        .audit
                        .record_grant_move(
                            grants,
                            kind,
                            change.by,
                            subject.clone(),
                            detail,
                            grant_move,
                        )
                        .await
                        .map_err(|e| e.to_api_error())?;
                    if moved {
                        return Ok(to);
                    }
                    self.lost_race(&row.id, event, change.at).await
                }
            };
        Err(crate::approvals::refused(self.audit.as_ref(), caller, subject, action, refusal).await)
    }

    /// The grant as stored after a move, for the answer.
    async fn reread(
        &self,
        id: &str,
        appliance: &ApplianceRow,
        now: Timestamp,
    ) -> Result<GrantRecord, ApiError> {
        let row = self
            .store
            .get_grant(id)
            .await
            .map_err(internal)?
            .ok_or_else(|| ApiError::internal("grant vanished"))?;
        Ok(record(&row, &appliance.app, &appliance.customer, now))
    }

    /// A customer approver's decision on a pending grant. Duration counts from the approval. A
    /// grant that is no longer pending (decided, withdrawn, ended) is not changed: CONFLICT.
    pub async fn decide(
        &self,
        caller: &Caller,
        id: &str,
        approve: bool,
        message: Option<String>,
    ) -> Result<GrantRecord, ApiError> {
        caller.require(&[Role::Approver], "decide on grants")?;
        let (row, appliance) = self.load(caller, id).await?;
        caller.require_customer(&appliance.customer)?;
        let now = self.stored_now();
        let (event, action, kind) = if approve {
            (GrantEvent::Approve, "approve", "grant.approved")
        } else {
            (GrantEvent::Deny, "deny", "grant.denied")
        };
        let expires_at = approve.then(|| now + SignedDuration::from_millis(row.duration_ms));
        let who = caller.actor();
        let change = GrantChange {
            by: &who,
            at: now,
            message: message.as_deref(),
            expires_at,
        };
        let detail = serde_json::json!({
            "grant_id": id, "level": row.level.as_str(), "expires_at": expires_at, "message": message,
            "phase": row.level.as_str(), "rule": format!("a person ({who})"),
        });
        self.move_grant(caller, &row, (event, action), change, (kind, detail))
            .await?;
        if approve {
            self.ring_expiry_bell();
            self.push_grants(&appliance.id).await;
        }
        self.reread(id, &appliance, now).await
    }

    /// Ends a grant: an active one (its endpoints are cut, the agent told), or a pending request
    /// its requester withdraws. Revoking a grant that already ended (denied, expired, revoked) is
    /// an error (CONFLICT), not a silent success: the caller learns it was over already.
    pub async fn revoke(&self, caller: &Caller, id: &str) -> Result<GrantRecord, ApiError> {
        let (row, appliance) = self.load(caller, id).await?;
        let who = caller.actor();
        if !caller.made(row.requested_by_id.as_deref()) {
            caller.require(
                &[Role::Admin, Role::Approver],
                "revoke other people's grants",
            )?;
        }
        let now = self.stored_now();
        let change = GrantChange {
            by: &who,
            at: now,
            message: None,
            expires_at: None,
        };
        let detail = serde_json::json!({ "grant_id": id, "was": row.state.as_str() });
        let to = self
            .move_grant(
                caller,
                &row,
                (GrantEvent::Revoke, "revoke"),
                change,
                ("grant.revoked", detail),
            )
            .await?;
        // The revocation and its record committed together: now the grant's endpoints are cut
        // and the agent is told its new set, both at once (the answer waits for both).
        tokio::join!(
            self.endpoints
                .end_all_of_grant(id, CloseReason::Revoked, caller),
            self.push_grants(&appliance.id),
        );
        // The compare-and-set changed only the state (and who revoked it, which the record
        // does not show): the answer needs no second read.
        let row = GrantRow { state: to, ..row };
        Ok(record(&row, &appliance.app, &appliance.customer, now))
    }
}
