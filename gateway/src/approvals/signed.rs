//! Approvers' signed decisions at the gateway: the statement an approver signs (built here,
//! from what the request will make the appliance do), the check that a decision sent with
//! `approvals approve|deny` matches it, and where it is kept until it goes to the appliance.
//!
//! The gateway cannot make a signed decision and does not need to verify one: the appliance
//! verifies every decision its policy reserves for a person against its own `[[approver]]`
//! keys (see `tunnel-client/src/approval_check.rs`). What the gateway checks here is only for
//! the approver's sake — a decision that the appliance would refuse anyway (for another
//! request, for other content, unsigned where the appliance lists keys) is refused now, with a
//! hint, instead of failing later in the appliance.

use crate::{
    ports::{Clock, GrantGate},
    store::{Store, StoreResult},
};
use async_trait::async_trait;
use endpoint_types::{
    approval::{
        ApprovalStatement, DecidedContent, Decision, SignedDecision, DEFAULT_VALIDITY, MAX_VALIDITY,
    },
    control::{ApprovalItem, ApprovalStage},
    ApiError, ErrorCode,
};
use jiff::Timestamp;
use std::sync::Arc;

/// The store's name for a stage (`signed_decisions.stage`).
pub fn stage_name(stage: ApprovalStage) -> &'static str {
    match stage {
        ApprovalStage::Command => "command",
        ApprovalStage::Output => "output",
    }
}

/// Where signed decisions are kept, as the approver's key made them.
#[async_trait]
pub trait SignedDecisions: Send + Sync {
    async fn put(
        &self,
        record_id: &str,
        stage: ApprovalStage,
        signed: &SignedDecision,
        at: Timestamp,
    ) -> StoreResult<()>;
    /// The decision kept for `record_id` at `stage`; one that no longer parses is absent (the
    /// appliance then refuses the request as unsigned).
    async fn get(
        &self,
        record_id: &str,
        stage: ApprovalStage,
    ) -> StoreResult<Option<SignedDecision>>;
}

#[async_trait]
impl SignedDecisions for Store {
    async fn put(
        &self,
        record_id: &str,
        stage: ApprovalStage,
        signed: &SignedDecision,
        at: Timestamp,
    ) -> StoreResult<()> {
        let text = serde_json::to_string(signed).unwrap_or_default();
        self.put_signed_decision(record_id, stage_name(stage), &text, at)
            .await
    }

    async fn get(
        &self,
        record_id: &str,
        stage: ApprovalStage,
    ) -> StoreResult<Option<SignedDecision>> {
        Ok(self
            .signed_decision(record_id, stage_name(stage))
            .await?
            .and_then(|t| serde_json::from_str(&t).ok()))
    }
}

/// What the approvals service needs to handle signed decisions.
pub struct Signing {
    pub store: Arc<dyn SignedDecisions>,
    /// The appliance's policy as it reported it, for its approvers' key ids (informational).
    pub policies: Arc<dyn GrantGate>,
    pub clock: Arc<dyn Clock>,
}

/// The statement an approver signs to approve `item`, whose decided content is `content`:
/// valid from now for [`DEFAULT_VALIDITY`] (a grant: see [`grant_validity`]); `key_id` is
/// filled in by the signing key.
pub fn statement_for(
    item: &ApprovalItem,
    content: DecidedContent,
    now: Timestamp,
) -> ApprovalStatement {
    let validity = match &content {
        DecidedContent::Grant { duration_s, .. } => grant_validity(*duration_s),
        _ => DEFAULT_VALIDITY,
    };
    ApprovalStatement {
        record_id: item.id.clone(),
        appliance_id: item.appliance_id.clone(),
        decision: Decision::Approve,
        content,
        issued_at: now,
        not_after: now.saturating_add(validity).unwrap_or(now),
        key_id: String::new(),
    }
}

/// A grant's statement is valid for as long as the grant may be approved and then last: the
/// appliance first accepts it when the grant arrives and keeps accepting it, for that grant
/// only, until the grant ends (see the README: re-sent grant sets are not replays).
pub fn grant_validity(duration_s: u64) -> jiff::SignedDuration {
    let grant = jiff::SignedDuration::from_secs(duration_s.min(i64::MAX as u64) as i64);
    DEFAULT_VALIDITY
        .checked_add(grant)
        .unwrap_or(MAX_VALIDITY)
        .min(MAX_VALIDITY)
}

fn invalid(message: String, reason: &str) -> ApiError {
    ApiError::new(ErrorCode::ApprovalInvalid, message)
        .hint("sign what `postern approvals show ID` prints, with a key listed in the appliance's agent.toml: postern approvals approve ID --key PATH")
        .details(serde_json::json!({ "reason": reason }))
}

/// Whether a decision sent for `item` is one the appliance could accept: the same request,
/// appliance, decision and content, a key the appliance lists (when it reported any), and a
/// validity the appliance allows. No signature check: the appliance makes that one.
pub fn check_sent(
    signed: &SignedDecision,
    item: &ApprovalItem,
    content: &DecidedContent,
    approve: bool,
    key_ids: &[String],
    now: Timestamp,
) -> Result<(), ApiError> {
    let s = &signed.statement;
    if s.record_id != item.id {
        return Err(invalid(
            format!(
                "the signed decision is for {}, not {}",
                s.record_id, item.id
            ),
            "wrong_record",
        ));
    }
    if s.appliance_id != item.appliance_id {
        return Err(invalid(
            format!(
                "the signed decision is for appliance {}, not {}",
                s.appliance_id, item.appliance_id
            ),
            "wrong_appliance",
        ));
    }
    let decided = if approve {
        Decision::Approve
    } else {
        Decision::Deny
    };
    if s.decision != decided {
        return Err(invalid(
            format!(
                "the signed decision says `{}`, but this request would {}",
                s.decision.as_str(),
                decided.as_str()
            ),
            "not_approved",
        ));
    }
    if let Some(field) = s.content.first_difference(content) {
        return Err(invalid(
            format!(
                "the signed {field} differs from what {} would make the appliance do",
                item.id
            ),
            "content_mismatch",
        ));
    }
    if !key_ids.is_empty() && !key_ids.contains(&s.key_id) {
        return Err(invalid(
            format!(
                "key {} is not one of the approvers appliance {} lists ({})",
                s.key_id,
                item.appliance_id,
                key_ids.join(", ")
            ),
            "unknown_key",
        ));
    }
    if s.not_after.duration_since(s.issued_at) > MAX_VALIDITY {
        return Err(invalid(
            "the signed decision is valid for longer than 24 h".into(),
            "too_long",
        ));
    }
    if now > s.not_after {
        return Err(invalid(
            format!("the signed decision expired at {}", s.not_after),
            "expired",
        ));
    }
    Ok(())
}

/// The refusal of an unsigned approval the appliance would refuse.
pub fn signature_required(item: &ApprovalItem, key_ids: &[String]) -> ApiError {
    ApiError::new(
        ErrorCode::ApprovalInvalid,
        format!(
            "appliance {} requires a decision signed by one of its approvers ({}); this one is unsigned",
            item.appliance_id,
            key_ids.join(", ")
        ),
    )
    .hint(format!(
        "make your key once with `postern approvals key create` (the customer lists its public key as [[approver]] in agent.toml), then: postern approvals approve {} --key PATH",
        item.id
    ))
    .details(serde_json::json!({ "reason": "missing", "approver_key_ids": key_ids }))
}

#[cfg(test)]
pub mod memory {
    //! Signed decisions in memory, for the services' unit tests.
    use super::*;
    use std::{collections::HashMap, sync::Mutex};

    #[derive(Debug, Default)]
    pub struct MemorySignedDecisions(Mutex<HashMap<(String, &'static str), SignedDecision>>);

    #[async_trait]
    impl SignedDecisions for MemorySignedDecisions {
        async fn put(
            &self,
            record_id: &str,
            stage: ApprovalStage,
            signed: &SignedDecision,
            _at: Timestamp,
        ) -> StoreResult<()> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((record_id.to_string(), stage_name(stage)), signed.clone());
            Ok(())
        }

        async fn get(
            &self,
            record_id: &str,
            stage: ApprovalStage,
        ) -> StoreResult<Option<SignedDecision>> {
            Ok(self
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(record_id.to_string(), stage_name(stage)))
                .cloned())
        }
    }
}
