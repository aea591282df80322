//! The endpoint service's decisions and endings: approve or deny a pending endpoint, retire,
//! expire, end everything of a grant or an appliance, and restore the live ones at start-up.
//! Every move is checked with the endpoint state machine, then written with a compare-and-set.

use super::service::{internal, not_found, state_at, Endpoints, Listening};
use crate::{audit::Subject, identity::Caller, store::StoreError};
use endpoint_types::{
    api::{EndpointRecord, EndpointState, Role},
    frame::ToAgent,
    lifecycle::endpoint::{self as endpoint_lifecycle, EndpointEvent},
    resource::CloseReason,
    ApiError, ErrorCode,
};
use jiff::Timestamp;
use std::sync::Arc;

impl Endpoints {
    /// The refusal for `event` on endpoint `id` after a compare-and-set found it moved by
    /// another request or replica: the same structured error as for any state that does not
    /// take it, from the state it is in now.
    async fn lost_race(&self, id: &str, event: EndpointEvent) -> ApiError {
        let state = match self.store.get_endpoint(id).await {
            Ok(Some(row)) => state_at(&row, self.now()),
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

    /// Ends a pending endpoint by `event` (deny, retire, or expire when its grant ended before
    /// the decision) with a compare-and-set; the lost race as a refusal.
    async fn end_pending(
        &self,
        id: &str,
        event: EndpointEvent,
        now: Timestamp,
    ) -> Result<(), ApiError> {
        match self
            .store
            .move_endpoint(id, EndpointState::PendingApproval, event, now)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.lost_race(id, event).await),
            Err(e) => Err(internal(e)),
        }
    }

    /// When the token that asked for the endpoint stops working (None: never, or no token
    /// asked). `Ok(Err(refusal))` once it has stopped (expired, or revoked): its endpoint must
    /// not become active, already past its end.
    async fn creator_token_end(
        &self,
        row: &crate::store::EndpointRow,
        now: Timestamp,
    ) -> Result<Result<Option<Timestamp>, ApiError>, ApiError> {
        let Some(token_id) = row.created_by_id.as_deref() else {
            return Ok(Ok(None));
        };
        let end = self.store.token_expiry(token_id).await.map_err(internal)?;
        Ok(match end {
            Some(end) if end <= now => Err(ApiError::new(
                ErrorCode::Unauthenticated,
                format!(
                    "the API token that asked for endpoint {} stopped working at {end}; the endpoint cannot become active",
                    row.id
                ),
            )
            .hint("the endpoint has expired; its creator asks again with a live token (an admin mints one with `postern token create`)")
            .details(serde_json::json!({"id": row.id, "creator_token_id": token_id, "token_ended_at": end}))),
            end => Ok(end),
        })
    }

    /// A pending endpoint that can never become active (`why` says what ended before the
    /// decision) expires now rather than waiting forever; `err` is the refusal to return, or
    /// the lost race.
    async fn expire_undecidable(
        &self,
        id: &str,
        subject: &Subject,
        now: Timestamp,
        why: serde_json::Value,
        err: ApiError,
    ) -> ApiError {
        if let Err(e) = self.end_pending(id, EndpointEvent::Expire, now).await {
            return e;
        }
        let mut detail = serde_json::json!({
            "reason": "expired", "sessions_cut": 0, "while": "pending approval",
        });
        if let (Some(d), Some(w)) = (detail.as_object_mut(), why.as_object()) {
            d.extend(w.clone());
        }
        self.audit
            .record(
                "endpoint.expired",
                "system:gateway",
                subject.clone(),
                detail,
            )
            .await;
        err
    }

    /// A customer approver's decision on a pending endpoint. On approval the endpoint lives
    /// for its TTL from now, never past its operate grant nor its creator's token (one whose
    /// token stopped working before the decision expires instead, UNAUTHENTICATED). An endpoint that is no longer
    /// pending (denied, retired, expired, or already active) is not changed: CONFLICT, audited
    /// as `denied`.
    pub async fn decide(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        approve: bool,
        message: Option<String>,
    ) -> Result<EndpointRecord, ApiError> {
        let rec = self.get(caller, id).await?;
        caller.require_customer(&rec.customer)?;
        let row = self
            .store
            .get_endpoint(id)
            .await
            .map_err(internal)?
            .ok_or_else(|| not_found(id))?;
        let now = self.now();
        let subject = Subject::endpoint(&row.appliance_id, id);
        let (event, action) = if approve {
            (EndpointEvent::Approve, "approve")
        } else {
            (EndpointEvent::Deny, "deny")
        };
        let refused = |err: ApiError| {
            crate::approvals::refused(&*self.audit, caller, subject.clone(), action, err)
        };
        if let Err(e) = endpoint_lifecycle::next(state_at(&row, now), event) {
            return Err(refused(e.to_api_error(id)).await);
        }
        if !approve {
            if let Err(e) = self.end_pending(id, EndpointEvent::Deny, now).await {
                return Err(refused(e).await);
            }
            self.audit
                .record(
                    "endpoint.denied",
                    &caller.actor(),
                    subject,
                    serde_json::json!({"message": message}),
                )
                .await;
            return self.get(caller, id).await;
        }
        let appliance = self
            .store
            .get_appliance(&row.appliance_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| not_found(id))?;
        let live_grant = self
            .grants
            .require_phase(&appliance, row.phase, now)
            .await
            .ok()
            .filter(|g| row.grant_id.as_deref() == Some(g.id.as_str()));
        let Some(grant) = live_grant else {
            // The grant it was requested under ended before anyone decided: it can never
            // become active, so it expires now rather than waiting forever.
            let err = ApiError::new(
                ErrorCode::OperateAccessExpired,
                format!("the operate grant endpoint {id} was requested under has ended"),
            )
            .hint(crate::grants::access_hint(
                &appliance.app,
                &appliance.customer,
            ))
            .details(serde_json::json!({"id": id, "grant_id": row.grant_id}));
            let why = serde_json::json!({"grant_id": row.grant_id});
            return Err(refused(self.expire_undecidable(id, &subject, now, why, err).await).await);
        };
        let ttl = row.expires_at.duration_since(row.created_at);
        let creator_token_end = match self.creator_token_end(&row, now).await? {
            Ok(end) => end,
            Err(err) => {
                let why = serde_json::json!({"creator_token_id": row.created_by_id});
                return Err(
                    refused(self.expire_undecidable(id, &subject, now, why, err).await).await,
                );
            }
        };
        let expires_at = [
            now.checked_add(ttl).ok(),
            grant.expires_at,
            creator_token_end,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now);
        let Listening { address, listener } = self.front_ends.listen(row.endpoint_type, None)?;
        // Compare-and-set on pending-approval: a retire or another decision that got there
        // first wins, and the listener just made is dropped unused.
        if !self
            .store
            .activate_endpoint(id, expires_at, &address)
            .await
            .map_err(internal)?
        {
            let err = self.lost_race(id, EndpointEvent::Approve).await;
            return Err(refused(err).await);
        }
        let row = self
            .store
            .get_endpoint(id)
            .await
            .map_err(internal)?
            .ok_or_else(|| not_found(id))?;
        let ep = self.activate(&row, listener);
        let announced = self.announced(ep.grant()).await;
        self.agents
            .send(&row.appliance_id, ToAgent::EndpointOpen(announced));
        self.audit
            .record("endpoint.created", &caller.actor(), subject, serde_json::json!({
                "type": row.endpoint_type, "origin_resource_id": row.resource_id, "expires_at": expires_at, "address": address,
                "approved_by": caller.actor(), "phase": row.phase.as_str(), "rule": format!("a person ({})", caller.actor()),
            }))
            .await;
        self.get(caller, id).await
    }

    /// Ends an active endpoint: store state, cut sessions, tell the agent, audit. Returns the
    /// number of sessions cut, or None if it was not active.
    pub async fn end(&self, id: &str, reason: CloseReason, caller: &Caller) -> Option<u64> {
        let event = if reason == CloseReason::Expired {
            EndpointEvent::Expire
        } else {
            EndpointEvent::Retire
        };
        match self
            .store
            .move_endpoint(id, EndpointState::Active, event, self.now())
            .await
        {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::error!(endpoint = %id, error = %e, "could not end endpoint in the store");
                return None;
            }
        }
        let ep = self.live.remove(id)?;
        let cut = ep.live_sessions.load(std::sync::atomic::Ordering::Relaxed);
        ep.end(reason);
        self.agents.send(
            &ep.appliance_id,
            ToAgent::EndpointClose {
                endpoint_id: id.to_string(),
                reason,
            },
        );
        let kind = if reason == CloseReason::Expired {
            "endpoint.expired"
        } else {
            "endpoint.retired"
        };
        self.audit
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
    pub async fn retire(&self, caller: &Caller, id: &str) -> Result<EndpointRecord, ApiError> {
        match self.get(caller, id).await {
            // Only the access details wait for the appliance (a postgres endpoint's database):
            // an endpoint of an offline appliance is retired all the same, and its agent tears
            // it down when it is back.
            Err(e) if e.code == ErrorCode::ApplianceOffline => {}
            other => {
                other?;
            }
        }
        // Customers may tear down any endpoint into their appliances; operators their own or
        // any (the vendor decides who operates), admins all.
        caller.require(
            &[Role::Admin, Role::Operator, Role::Approver],
            "retire endpoints",
        )?;
        // A lost race (an approval or expiry got there first) is retried from the state it
        // left: an endpoint approved meanwhile is still retired, one that ended is refused.
        let mut attempts = 0;
        let (row, moved) = loop {
            attempts += 1;
            let row = self
                .store
                .get_endpoint(id)
                .await
                .map_err(internal)?
                .ok_or_else(|| not_found(id))?;
            let now = self.now();
            let moved = match endpoint_lifecycle::next(state_at(&row, now), EndpointEvent::Retire) {
                Err(e) => Err(e.to_api_error(id)),
                Ok(_) if row.state == EndpointState::PendingApproval => {
                    match self
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
                        Ok(false) => Err(self.lost_race(id, EndpointEvent::Retire).await),
                        Err(e) => Err(internal(e)),
                    }
                }
                Ok(_) => match self.end(id, CloseReason::Retired, caller).await {
                    Some(cut) => Ok(cut),
                    None if attempts < 3 => continue,
                    None => Err(self.lost_race(id, EndpointEvent::Retire).await),
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
                return Err(crate::approvals::refused(
                    &*self.audit,
                    caller,
                    subject,
                    "retire",
                    err,
                )
                .await);
            }
        };
        if row.state == EndpointState::PendingApproval {
            self.audit
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
        let mut rec = self.get(caller, id).await?;
        rec.sessions_cut = Some(cut);
        Ok(rec)
    }

    /// Ends every active endpoint created under a grant (grant revoked).
    pub async fn end_all_of_grant(&self, grant_id: &str, reason: CloseReason, caller: &Caller) {
        match self.store.active_endpoints_of_grant(grant_id).await {
            Ok(rows) => {
                for r in rows {
                    self.end(&r.id, reason, caller).await;
                }
            }
            Err(e) => {
                tracing::error!(grant = %grant_id, error = %e, "could not list the grant's endpoints to end them")
            }
        }
    }

    /// Ends every active endpoint of an appliance (revocation).
    pub async fn end_all_of(&self, appliance_id: &str, reason: CloseReason, caller: &Caller) {
        match self.store.active_endpoints_of(appliance_id).await {
            Ok(rows) => {
                for r in rows {
                    self.end(&r.id, reason, caller).await;
                }
            }
            Err(e) => {
                tracing::error!(appliance = %appliance_id, error = %e, "could not list the appliance's endpoints to end them")
            }
        }
    }

    /// Ends what a revoked API token made that could still be used: its active endpoints end
    /// with reason `revoked` (sessions cut, the credential refused by the front ends from now
    /// on), and its pending ones expire (an approval would otherwise open a listener for a
    /// credential its holder keeps). Returns how many endpoints were ended.
    pub async fn end_all_created_by(&self, token_id: &str, caller: &Caller) -> usize {
        let rows = match self.store.list_endpoints_with_owner(None).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(token = %token_id, error = %e, "could not list the token's endpoints to end them");
                return 0;
            }
        };
        let mut ended = 0;
        let now = self.now();
        for r in rows
            .into_iter()
            .map(|o| o.endpoint)
            .filter(|e| e.created_by_id.as_deref() == Some(token_id))
        {
            let done = match r.state {
                EndpointState::Active => self
                    .end(&r.id, CloseReason::Revoked, caller)
                    .await
                    .is_some(),
                EndpointState::PendingApproval => {
                    self.expire_pending_of_revoked(&r, token_id, caller, now)
                        .await
                }
                _ => false,
            };
            if done {
                ended += 1;
            }
        }
        ended
    }

    /// A pending endpoint of a revoked token expires (recorded); false if it was no longer
    /// pending.
    async fn expire_pending_of_revoked(
        &self,
        r: &crate::store::EndpointRow,
        token_id: &str,
        caller: &Caller,
        now: Timestamp,
    ) -> bool {
        if self
            .end_pending(&r.id, EndpointEvent::Expire, now)
            .await
            .is_err()
        {
            return false;
        }
        self.audit
            .record(
                "endpoint.expired",
                &caller.actor(),
                Subject::endpoint(&r.appliance_id, &r.id),
                serde_json::json!({
                    "reason": "revoked", "sessions_cut": 0, "while": "pending approval",
                    "token_id": token_id,
                }),
            )
            .await;
        true
    }

    /// At start-up: endpoints the store says are active come back on their old address when it
    /// is free (a new one otherwise); those that expired while the gateway was down are marked
    /// so.
    pub async fn restore(self: &Arc<Self>) -> Result<(), StoreError> {
        let now = self.now();
        for row in self.store.active_endpoints().await? {
            if row.expires_at <= now {
                if self
                    .store
                    .move_endpoint(
                        &row.id,
                        EndpointState::Active,
                        EndpointEvent::Expire,
                        row.expires_at,
                    )
                    .await?
                {
                    self.audit
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
            match self.front_ends.listen(row.endpoint_type, old) {
                Ok(Listening { address, listener }) => {
                    if row.address.as_deref() != Some(address.as_str()) {
                        self.store.set_endpoint_address(&row.id, &address).await?;
                    }
                    self.activate(&row, listener);
                }
                Err(e) => {
                    tracing::error!(endpoint = %row.id, error = %e.message, "could not restore endpoint listener")
                }
            }
        }
        Ok(())
    }
}
