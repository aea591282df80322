//! A person's signed decision on an endpoint goes to the appliance with it; an endpoint the
//! appliance refused (`approvals::refusal`) is ended, the appliance's error kept for the
//! operator and the refusal in the trail.

use super::Endpoints;
use crate::{audit::Subject, identity::Caller};
use endpoint_types::{
    api::{EndpointRecord, EndpointState},
    frame::EndpointGrant,
    resource::CloseReason,
    ApiError,
};

impl Endpoints {
    /// `appliance_id`'s agent refused endpoint `id` with `error` (already sanitized).
    pub async fn appliance_refused(&self, appliance_id: &str, id: &str, error: ApiError) {
        let row = match self.store.get_endpoint(id).await {
            Ok(Some(row)) if row.appliance_id == appliance_id => row,
            Ok(_) => {
                tracing::warn!(appliance = %appliance_id, endpoint = %id, "the agent refused an endpoint that is not its appliance's");
                return;
            }
            Err(e) => {
                tracing::error!(endpoint = %id, error = %e, "cannot read an endpoint the appliance refused");
                return;
            }
        };
        let now = self.now();
        if let Err(e) = self.store.put_refusal(id, appliance_id, &error, now).await {
            tracing::error!(endpoint = %id, error = %e, "cannot keep the appliance's refusal of an endpoint");
        }
        let actor = format!("agent:{appliance_id}");
        self.audit
            .record(
                "denied",
                &actor,
                Subject::endpoint(appliance_id, id),
                serde_json::json!({
                    "action": "endpoint", "code": error.code,
                    "approval": error.details["reason"], "reason": error.message,
                }),
            )
            .await;
        if row.state == EndpointState::Active {
            self.end(id, CloseReason::Revoked, &Caller::system()).await;
        }
    }

    /// The endpoint as the API shows it, with the appliance's refusal if it refused it.
    pub(super) async fn with_refusal(&self, mut rec: EndpointRecord) -> EndpointRecord {
        rec.refused = self.store.refusal(&rec.id).await.ok().flatten();
        rec
    }

    /// The endpoint as the agent is told it, with the approver's signed decision when a
    /// person approved it (the appliance checks it, and accepts it once, before serving it).
    pub(super) async fn announced(&self, mut grant: EndpointGrant) -> EndpointGrant {
        grant.signed_decision = self
            .store
            .signed_decision(&grant.endpoint_id)
            .await
            .unwrap_or_else(|e| {
                tracing::error!(endpoint = %grant.endpoint_id, error = %e, "cannot read an endpoint's signed decision; the appliance will refuse it as unsigned");
                None
            });
        grant
    }
}
