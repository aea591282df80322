//! What waits for a customer approver, and the decisions. Approvals are addressed by the id
//! of what they decide: a grant (`gr_…`), an op (`op_…`) or an endpoint (`ep_…`).
//!
//! [`Approvals`] holds one [`Queue`] per kind of request (the grants, ops and endpoints
//! services, see `queues.rs`) and nothing else: it merges what waits and routes a decision to
//! the queue that owns the id.

mod queues;
#[cfg(test)]
mod tests;

pub use queues::EndpointQueue;

use crate::{identity::Caller, ports::AuditSink};
use async_trait::async_trait;
use endpoint_types::{api::Role, control::ApprovalItem, ApiError, ErrorCode};
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
    pub fn new(queues: Vec<Arc<dyn Queue>>) -> Approvals {
        Approvals { queues }
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

    /// One pending item, with what its queue adds for the approver's screen.
    pub async fn show(&self, caller: &Caller, id: &str) -> Result<serde_json::Value, ApiError> {
        let queue = self.queue_of(id)?;
        let item = queue
            .waiting(caller)
            .await?
            .into_iter()
            .find(|i| i.id == id)
            .ok_or_else(|| not_waiting(id))?;
        let mut v = serde_json::to_value(&item).unwrap_or_default();
        if let Some((key, extra)) = queue.detail(caller, &item).await? {
            v[key] = extra;
        }
        Ok(v)
    }

    pub async fn decide(
        &self,
        caller: &Caller,
        id: &str,
        approve: bool,
        message: Option<String>,
    ) -> Result<serde_json::Value, ApiError> {
        caller.require(
            &[Role::Approver],
            "approve or deny requests (approvals belong to the customer)",
        )?;
        self.queue_of(id)?
            .decide(caller, id, approve, message)
            .await
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
