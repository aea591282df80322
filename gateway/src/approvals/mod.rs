//! What waits for a customer approver, and the decisions. Approvals are addressed by the id
//! of what they decide: a grant (`gr_…`), an op (`op_…`) or an endpoint (`ep_…`).
//!
//! [`Approvals`] holds one [`Queue`] per kind of request (the grants, ops and endpoints
//! services, see `queues.rs`) and nothing else: it merges what waits and routes a decision to
//! the queue that owns the id.

mod queues;
pub mod refusal;
mod rule;
pub mod signed;
#[cfg(test)]
mod tests;

pub use queues::EndpointQueue;
pub use signed::{SignedDecisions, Signing};

use crate::{identity::Caller, ports::AuditSink};
use async_trait::async_trait;
use endpoint_types::{
    api::Role,
    approval::{DecidedContent, SignedDecision},
    control::ApprovalItem,
    ApiError, ErrorCode,
};
use std::sync::Arc;

/// One kind of request a customer approver decides.
#[async_trait]
pub trait Queue: Send + Sync {
    /// Whether `id` names a request of this kind.
    fn owns(&self, id: &str) -> bool;
    /// Requests of this kind waiting for a decision that `caller` may see.
    async fn waiting(&self, caller: &Caller) -> Result<Vec<ApprovalItem>, ApiError>;
    /// More for the approver's screen than the item holds (an op's held output).
    async fn detail(
        &self,
        _caller: &Caller,
        _item: &ApprovalItem,
    ) -> Result<Option<(&'static str, serde_json::Value)>, ApiError> {
        Ok(None)
    }
    /// What approving `item` makes the appliance do, as an approver's statement binds it; None
    /// for what no statement covers yet.
    async fn content(
        &self,
        _caller: &Caller,
        _item: &ApprovalItem,
    ) -> Result<Option<DecidedContent>, ApiError> {
        Ok(None)
    }
    /// Approves or denies; the request's record after the decision.
    async fn decide(
        &self,
        caller: &Caller,
        id: &str,
        approve: bool,
        message: Option<String>,
    ) -> Result<serde_json::Value, ApiError>;
}

pub struct Approvals {
    queues: Vec<Arc<dyn Queue>>,
    signing: Signing,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Approvals({} queues)", self.queues.len())
    }
}

fn not_waiting(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("{id} is not waiting for approval"),
    )
    .hint("`postern approvals list` shows what waits for a decision")
}

impl Approvals {
    pub fn new(queues: Vec<Arc<dyn Queue>>, signing: Signing) -> Approvals {
        Approvals { queues, signing }
    }

    /// Pending items the caller may see (approvers only their own customer's), oldest first.
    pub async fn list(&self, caller: &Caller) -> Result<Vec<ApprovalItem>, ApiError> {
        let mut items = Vec::new();
        for q in &self.queues {
            items.extend(q.waiting(caller).await?);
        }
        items.sort_by_key(|i| i.requested_at);
        Ok(items)
    }

    /// One pending item, with what its queue adds for the approver's screen and the statement
    /// an approver signs to approve it.
    pub async fn show(&self, caller: &Caller, id: &str) -> Result<serde_json::Value, ApiError> {
        let queue = self.queue_of(id)?;
        let item = Self::find(queue, caller, id).await?;
        let mut v = serde_json::to_value(&item).unwrap_or_default();
        if let Some((key, extra)) = queue.detail(caller, &item).await? {
            v[key] = extra;
        }
        self.phase_and_rule(&item).await.add_to(&mut v);
        if let serde_json::Value::Object(signing) = self.statement_of(queue, caller, &item).await? {
            if let Some(o) = v.as_object_mut() {
                o.extend(signing);
            }
        }
        Ok(v)
    }

    /// What an approver signs to approve `id`: `{"statement", "canonical", "approver_key_ids",
    /// "signature_required"}` (`statement` null when no statement covers the request).
    pub async fn statement(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<serde_json::Value, ApiError> {
        let queue = self.queue_of(id)?;
        let item = Self::find(queue, caller, id).await?;
        self.statement_of(queue, caller, &item).await
    }

    async fn find(
        queue: &Arc<dyn Queue>,
        caller: &Caller,
        id: &str,
    ) -> Result<ApprovalItem, ApiError> {
        queue
            .waiting(caller)
            .await?
            .into_iter()
            .find(|i| i.id == id)
            .ok_or_else(|| not_waiting(id))
    }

    async fn statement_of(
        &self,
        queue: &Arc<dyn Queue>,
        caller: &Caller,
        item: &ApprovalItem,
    ) -> Result<serde_json::Value, ApiError> {
        let keys = self.key_ids(&item.appliance_id).await;
        let content = queue.content(caller, item).await?;
        let statement =
            content.map(|c| signed::statement_for(item, c, self.signing.clock.stored_now()));
        Ok(serde_json::json!({
            "canonical": statement.as_ref().map(|s| s.canonical()),
            "statement": statement,
            "approver_key_ids": keys,
            "signature_required": statement.is_some() && !keys.is_empty(),
        }))
    }

    /// The phase of a waiting item and why it waits for a person, as its phase's policy said
    /// when it was requested (the policy is a pure function of the instant).
    async fn phase_and_rule(&self, item: &ApprovalItem) -> rule::WaitingRule {
        let phase = rule::phase_of(item);
        let ruling = self
            .signing
            .policies
            .ruling(&item.appliance_id, phase, item.requested_at)
            .await;
        rule::WaitingRule::new(item, ruling)
    }

    async fn key_ids(&self, appliance_id: &str) -> Vec<String> {
        self.signing
            .policies
            .policy_of(appliance_id)
            .await
            .approver_key_ids
    }

    /// A decision, signed by the approver's key or not. A signed one is checked against the
    /// request (see [`signed::check_sent`]) and kept untouched for the appliance; an unsigned
    /// approval of what a statement covers is refused when the appliance lists approver keys.
    pub async fn decide(
        &self,
        caller: &Caller,
        id: &str,
        approve: bool,
        message: Option<String>,
        sent: Option<SignedDecision>,
    ) -> Result<serde_json::Value, ApiError> {
        caller.require(
            &[Role::Approver],
            "approve or deny requests (approvals belong to the customer)",
        )?;
        let queue = self.queue_of(id)?;
        // What is no longer waiting gets the queue's own refusal (CONFLICT, audited).
        if let Ok(item) = Self::find(queue, caller, id).await {
            let keys = self.key_ids(&item.appliance_id).await;
            let now = self.signing.clock.stored_now();
            // A denial needs no signature: one whose content cannot be had now (held output
            // while the appliance is offline) goes unsigned rather than not at all.
            let content = if sent.is_some() || (approve && !keys.is_empty()) {
                match queue.content(caller, &item).await {
                    Ok(content) => content,
                    Err(e) if approve => return Err(e),
                    Err(_) => None,
                }
            } else {
                None
            };
            match (content, sent) {
                (Some(content), Some(sent)) => {
                    signed::check_sent(&sent, &item, &content, approve, &keys, now)?;
                    self.signing
                        .store
                        .put(id, item.stage, &sent, now)
                        .await
                        .map_err(|e| {
                            ApiError::internal(format!("cannot keep the signed decision: {e}"))
                        })?;
                }
                (Some(_), None) if approve && !keys.is_empty() => {
                    return Err(signed::signature_required(&item, &keys));
                }
                _ => {}
            }
        }
        queue.decide(caller, id, approve, message).await
    }

    fn queue_of(&self, id: &str) -> Result<&Arc<dyn Queue>, ApiError> {
        self.queues
            .iter()
            .find(|q| q.owns(id))
            .ok_or_else(|| not_waiting(id))
    }
}

/// A refused move of a grant, op or endpoint (deciding something no longer pending, retiring
/// or revoking what already ended, losing a race to another request or replica): recorded in
/// the gateway's trail as `denied` with its reason, then handed back to the caller unchanged.
pub async fn refused(
    audit: &dyn AuditSink,
    caller: &Caller,
    subject: crate::audit::Subject,
    action: &str,
    err: ApiError,
) -> ApiError {
    let detail = serde_json::json!({
        "action": action, "code": err.code, "reason": err.message,
        "id": err.details.get("id"), "state": err.details.get("state"), "event": err.details.get("event"),
    });
    audit
        .record("denied", &caller.actor(), subject, detail)
        .await;
    err
}
