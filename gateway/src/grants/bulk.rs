//! A customer's kill switch: `postern access revoke --customer C [--app A]` (`POST
//! /v1/grants/revoke`) ends every live grant on the customer's appliances at once.
//!
//! The work is batched so that a thousand grants cost about what one does: one read of the
//! live grants with their appliances, one transaction of compare-and-set updates (each grant
//! moves by the grant state machine from the state that read saw; one that another request
//! moved meanwhile is left alone and not in the answer), the `grant.revoked` records queued to
//! the group-commit audit writer together, only the grants that still have an active endpoint
//! looked at by the endpoints, and each connected agent's new grant set read in one query for
//! all of them and sent through the acknowledged delivery, under each appliance's ordering lock.

use super::{internal, record, Grants};
use crate::{
    audit::Subject,
    identity::Caller,
    store::{GrantChange, GrantRow, GrantWithOwner, IDS_PER_STATEMENT},
};
use endpoint_types::{
    api::Role,
    control::{GrantRecord, GrantState},
    frame::ToAgent,
    lifecycle::{
        grant::{self as grant_lifecycle, GrantEvent},
        grant_state,
    },
    resource::CloseReason,
    ApiError, ErrorCode,
};
use futures_util::StreamExt;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// `POST /v1/grants/revoke`: every live grant of `customer`'s appliances (of `app`'s only,
/// when given).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkRevokeRequest {
    pub customer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// Why, kept in each `grant.revoked` record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The answer: the grants this call revoked, as `access list` shows them, and how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkRevoked {
    pub grants: Vec<GrantRecord>,
    pub revoked: usize,
}

/// Grants whose endpoints are being ended at once.
const ENDINGS_AT_ONCE: usize = 16;
/// Appliances whose grant sets are read in one query (and whose ordering locks are held
/// together meanwhile).
const PUSH_CHUNK: usize = IDS_PER_STATEMENT;
/// Chunks of appliances being pushed at once.
const PUSHES_AT_ONCE: usize = 4;

impl Grants {
    /// The kill switch (see the module docs). Admins, and approvers for their own customer;
    /// an unknown customer (or app) is NOT_FOUND; nothing live is `revoked: 0`.
    pub async fn revoke_customer(
        &self,
        caller: &Caller,
        req: BulkRevokeRequest,
    ) -> Result<BulkRevoked, ApiError> {
        may_pull(caller, &req.customer)?;
        let reason = req
            .reason
            .as_deref()
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_string);
        let now = self.stored_now();
        let scope = self
            .store
            .live_grants_of_customer(&req.customer, req.app.as_deref(), now)
            .await
            .map_err(internal)?;
        if scope.appliances.is_empty() {
            return Err(not_found(&req.customer, req.app.as_deref()));
        }
        let who = caller.actor();
        let revoked = self.revoke_live(&scope.live, &who, now).await?;
        let grant_ids: Vec<String> = revoked.iter().map(|g| g.grant.id.clone()).collect();
        let appliance_ids: Vec<String> = revoked
            .iter()
            .map(|g| g.grant.appliance_id.clone())
            .collect();
        // All three at once: the agents get their sets while the trail records commit and
        // the sessions are cut.
        tokio::join!(
            self.record_revocations(&who, &revoked, reason.as_deref()),
            self.end_endpoints_of(grant_ids, caller),
            self.push_grant_sets(appliance_ids),
        );
        let grants: Vec<GrantRecord> = revoked
            .iter()
            .filter_map(|g| {
                let to = grant_lifecycle::next(g.grant.state, GrantEvent::Revoke).ok()?;
                let row = GrantRow {
                    state: to,
                    ..g.grant.clone()
                };
                Some(record(&row, &g.app, &g.customer, now))
            })
            .collect();
        Ok(BulkRevoked {
            revoked: grants.len(),
            grants,
        })
    }

    /// Moves every grant of `live` that the grant state machine lets be revoked at `now`, in
    /// one store transaction; the ones it moved (not those another request moved first).
    async fn revoke_live<'a>(
        &self,
        live: &'a [GrantWithOwner],
        who: &str,
        now: Timestamp,
    ) -> Result<Vec<&'a GrantWithOwner>, ApiError> {
        let moving: Vec<&GrantWithOwner> = live
            .iter()
            .filter(|g| {
                let at_now = grant_state(g.grant.state, g.grant.expires_at, now);
                grant_lifecycle::next(at_now, GrantEvent::Revoke).is_ok()
            })
            .collect();
        if moving.is_empty() {
            return Ok(Vec::new());
        }
        let moves: Vec<(String, GrantState)> = moving
            .iter()
            .map(|g| (g.grant.id.clone(), g.grant.state))
            .collect();
        let change = GrantChange {
            by: who,
            at: now,
            message: None,
            expires_at: None,
        };
        let moved: HashSet<String> = self
            .store
            .revoke_grants(&moves, change)
            .await
            .map_err(internal)?
            .into_iter()
            .collect();
        Ok(moving
            .into_iter()
            .filter(|g| moved.contains(&g.grant.id))
            .collect())
    }

    /// One `grant.revoked` per grant, as the single revoke writes it plus `bulk` and the
    /// reason; queued together, so the writer commits them in a round or a few.
    async fn record_revocations(
        &self,
        who: &str,
        revoked: &[&GrantWithOwner],
        reason: Option<&str>,
    ) {
        futures_util::future::join_all(revoked.iter().map(|g| {
            self.audit.record(
                "grant.revoked",
                who,
                Subject::appliance(&g.grant.appliance_id),
                serde_json::json!({
                    "grant_id": g.grant.id, "was": g.grant.state.as_str(), "bulk": true, "reason": reason,
                }),
            )
        }))
        .await;
    }

    /// Ends every active endpoint of the revoked grants (sessions cut, reason `revoked`),
    /// asking the endpoints only about grants that still have one.
    async fn end_endpoints_of(&self, grant_ids: Vec<String>, caller: &Caller) {
        if grant_ids.is_empty() {
            return;
        }
        let with_endpoints = match self.store.grants_with_active_endpoints(&grant_ids).await {
            Ok(ids) => ids,
            Err(e) => {
                // Asking about each one is slower but misses none.
                tracing::error!(error = %e, "cannot tell which revoked grants have endpoints; ending each one's");
                grant_ids
            }
        };
        futures_util::stream::iter(with_endpoints)
            .for_each_concurrent(ENDINGS_AT_ONCE, |id| async move {
                self.endpoints
                    .end_all_of_grant(&id, CloseReason::Revoked, caller)
                    .await
            })
            .await;
    }

    /// Sends each connected agent of `appliance_ids` its new grant set, chunks of appliances
    /// at once, each chunk's sets read in one query.
    async fn push_grant_sets(&self, mut appliance_ids: Vec<String>) {
        appliance_ids.sort();
        appliance_ids.dedup();
        let chunks: Vec<Vec<String>> = appliance_ids
            .chunks(PUSH_CHUNK)
            .map(<[String]>::to_vec)
            .collect();
        futures_util::stream::iter(chunks)
            .for_each_concurrent(PUSHES_AT_ONCE, |chunk| self.push_chunk(chunk))
            .await;
    }

    /// [`Grants::push_grants`] for many appliances: each one's ordering lock is held from
    /// before the read until its set is queued, so an older set never overtakes a newer one.
    /// The locks are taken in id order (`ids` is sorted), as every holder of several takes
    /// them, so two kill switches cannot wait on each other.
    async fn push_chunk(&self, ids: Vec<String>) {
        let mut held = Vec::with_capacity(ids.len());
        for id in ids {
            // Not connected: the agent gets the store's set when it reconnects.
            if let Some(order) = self.agents.grant_sync_lock(&id) {
                let guard = order.lock_owned().await;
                held.push((id, guard));
            }
        }
        if held.is_empty() {
            return;
        }
        let connected: Vec<String> = held.iter().map(|(id, _)| id.clone()).collect();
        let now = self.clock.now();
        let mut by_appliance: HashMap<String, Vec<GrantRow>> = HashMap::new();
        match self.store.active_grants_of_appliances(&connected).await {
            Ok(rows) => {
                for g in rows {
                    by_appliance
                        .entry(g.appliance_id.clone())
                        .or_default()
                        .push(g);
                }
            }
            // As `push_grants` does: an empty set (the agent honours nothing) rather than
            // none, which would leave the revoked grants honoured.
            Err(e) => {
                tracing::error!(error = %e, appliances = connected.len(), "cannot read the grant sets for the agents; sending empty ones")
            }
        }
        for (id, _order) in &held {
            let rows = by_appliance.remove(id).unwrap_or_default();
            let grants = self.live_set(rows, now).await;
            // Not queued means not connected (or dropped for a full queue): the agent
            // resynchronises from the store on reconnect.
            self.agents.send(id, ToAgent::GrantSync { grants });
        }
    }
}

/// Admins, and approvers of `customer`; operators revoke their own grants one by one.
fn may_pull(caller: &Caller, customer: &str) -> Result<(), ApiError> {
    caller
        .require(
            &[Role::Admin, Role::Approver],
            "revoke every grant of a customer",
        )
        .map_err(|e| {
            e.hint("this needs a token with role admin or approver; an operator revokes their own grants one by one: postern access revoke ID")
        })?;
    if customer.trim().is_empty() {
        return Err(ApiError::invalid("the kill switch needs a customer")
            .hint("name it: postern access revoke --customer CUSTOMER"));
    }
    caller.require_customer(customer)
}

fn not_found(customer: &str, app: Option<&str>) -> ApiError {
    let message = match app {
        Some(app) => format!("no appliance for app {app} and customer {customer}"),
        None => format!("no appliance of customer {customer}"),
    };
    ApiError::new(ErrorCode::NotFound, message)
        .hint("`postern appliance list` shows the registered appliances")
}
