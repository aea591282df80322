//! Grants and endpoints the appliance refused although a person was said to approve them:
//! their signed decision was missing or did not verify against the appliance's own
//! `[[approver]]` keys (`tunnel-client/src/record_approval.rs`). The appliance honours nothing
//! of them; the gateway follows — the grant is revoked, the endpoint ended — keeps the
//! appliance's error for the operator (`refused` in the record: `APPROVAL_INVALID`, its reason
//! and hint) and records the refusal in its trail.

use crate::{
    approvals::SignedDecisions,
    endpoints::Endpoints,
    grants::Grants,
    store::{Store, StoreResult},
};
use endpoint_types::{approval::SignedDecision, control::ApprovalStage, ApiError, ErrorCode};
use jiff::Timestamp;

/// The longest message, hint or reason kept from the appliance's error.
const MAX_TEXT: usize = 1000;

fn bounded(text: &str) -> String {
    text.chars().take(MAX_TEXT).collect()
}

/// The appliance's refusal as the gateway keeps and shows it: always `APPROVAL_INVALID`, its
/// texts bounded, only the reason kept from its details (it comes from the peer).
pub fn sanitized(record_id: &str, error: &ApiError) -> ApiError {
    let reason = bounded(error.details["reason"].as_str().unwrap_or("unknown"));
    let hint = if error.hint.is_empty() {
        "an approver listed in the appliance's agent.toml ([[approver]]) must sign the decision: postern approvals approve ID --key PATH".to_string()
    } else {
        bounded(&error.hint)
    };
    ApiError::new(
        ErrorCode::ApprovalInvalid,
        format!(
            "the appliance refused {record_id}: {}",
            bounded(&error.message)
        ),
    )
    .hint(hint)
    .details(serde_json::json!({ "reason": reason, "record_id": record_id }))
}

/// The signed decision kept for a grant or endpoint (its one stage is `command`).
pub async fn signed_of(store: &Store, id: &str) -> StoreResult<Option<SignedDecision>> {
    SignedDecisions::get(store, id, ApprovalStage::Command).await
}

pub async fn put(
    store: &Store,
    id: &str,
    appliance_id: &str,
    error: &ApiError,
    at: Timestamp,
) -> StoreResult<()> {
    let text = serde_json::to_string(error).unwrap_or_default();
    store.put_refusal(id, appliance_id, &text, at).await
}

pub async fn get(store: &Store, id: &str) -> StoreResult<Option<ApiError>> {
    Ok(store
        .refusal(id)
        .await?
        .and_then(|t| serde_json::from_str(&t).ok()))
}

/// `ToGateway::ApprovalRefused` from `appliance_id`'s agent: routed by the id's kind. An id of
/// another appliance, or of no grant or endpoint, changes nothing (logged).
pub async fn on_agent_refusal(
    grants: &Grants,
    endpoints: &Endpoints,
    appliance_id: &str,
    record_id: &str,
    error: &ApiError,
) {
    let error = sanitized(record_id, error);
    if record_id.starts_with("gr_") {
        grants
            .appliance_refused(appliance_id, record_id, error)
            .await;
    } else if record_id.starts_with("ep_") {
        endpoints
            .appliance_refused(appliance_id, record_id, error)
            .await;
    } else {
        tracing::warn!(appliance = %appliance_id, record = %bounded(record_id), "the agent refused an approval of something that is neither a grant nor an endpoint");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_error_is_kept_bounded_and_as_approval_invalid() {
        let from_agent = ApiError::new(ErrorCode::Internal, "x".repeat(5000))
            .details(serde_json::json!({ "reason": "content_mismatch", "other": [1, 2, 3] }));
        let kept = sanitized("gr_1", &from_agent);
        assert_eq!(kept.code, ErrorCode::ApprovalInvalid);
        assert!(kept.message.len() < 1100);
        assert!(kept.hint.contains("approvals approve"));
        assert_eq!(
            kept.details,
            serde_json::json!({ "reason": "content_mismatch", "record_id": "gr_1" })
        );
        let bare = sanitized("ep_1", &ApiError::new(ErrorCode::ApprovalInvalid, "no"));
        assert_eq!(bare.details["reason"], "unknown");
    }
}
