//! The appliance refused a grant a person was said to approve (`approvals::refusal`): the
//! grant is revoked, the appliance's error kept for the operator, the refusal in the trail.

use super::Grants;
use crate::{
    audit::Subject,
    identity::Caller,
    store::{GrantChange, GrantMove},
};
use endpoint_types::{
    approval::SignedDecision,
    control::{GrantRecord, GrantState},
    lifecycle::{grant::GrantEvent, grant_state},
    resource::CloseReason,
    ApiError,
};

impl Grants {
    /// `appliance_id`'s agent refused grant `id` with `error` (already sanitized).
    pub async fn appliance_refused(&self, appliance_id: &str, id: &str, error: ApiError) {
        let row = match self.store.get_grant(id).await {
            Ok(Some(row)) if row.appliance_id == appliance_id => row,
            Ok(_) => {
                tracing::warn!(appliance = %appliance_id, grant = %id, "the agent refused a grant that is not its appliance's");
                return;
            }
            Err(e) => {
                tracing::error!(grant = %id, error = %e, "cannot read a grant the appliance refused");
                return;
            }
        };
        let now = self.stored_now();
        if let Err(e) = self.store.put_refusal(id, appliance_id, &error, now).await {
            tracing::error!(grant = %id, error = %e, "cannot keep the appliance's refusal of a grant");
        }
        let actor = format!("agent:{appliance_id}");
        self.audit
            .record(
                "denied",
                &actor,
                Subject::appliance(appliance_id),
                serde_json::json!({
                    "action": "grant", "grant_id": id, "code": error.code,
                    "approval": error.details["reason"], "reason": error.message,
                }),
            )
            .await;
        if grant_state(row.state, row.expires_at, now) != GrantState::Active {
            return;
        }
        let change = GrantChange {
            by: &actor,
            at: now,
            message: None,
            expires_at: None,
        };
        // The revocation and its record commit together.
        let grants: &dyn crate::ports::GrantMover = self.store.as_ref();
        let revoked = self
            .audit
            .record_grant_move(
                grants,
                "grant.revoked",
                &actor,
                Subject::appliance(appliance_id),
                serde_json::json!({
                    "grant_id": id, "was": "active", "reason": "APPROVAL_INVALID",
                }),
                GrantMove::new(id, GrantState::Active, GrantEvent::Revoke, change),
            )
            .await;
        match revoked {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!(grant = %id, error = %e, "cannot revoke a grant the appliance refused");
                return;
            }
        }
        self.endpoints
            .end_all_of_grant(id, CloseReason::Revoked, &Caller::system())
            .await;
        self.push_grants(appliance_id).await;
    }

    /// The grant as the API shows it, with the appliance's refusal if it refused it.
    pub(super) async fn with_refusal(&self, mut rec: GrantRecord) -> GrantRecord {
        rec.refused = self.store.refusal(&rec.id).await.ok().flatten();
        rec
    }

    /// The approver's signed decision on grant `id`, sent to the agent with the grant.
    pub(super) async fn signed_decision_of(&self, id: &str) -> Option<SignedDecision> {
        self.store.signed_decision(id).await.unwrap_or_else(|e| {
            tracing::error!(grant = %id, error = %e, "cannot read a grant's signed decision; the appliance will refuse it as unsigned");
            None
        })
    }
}
