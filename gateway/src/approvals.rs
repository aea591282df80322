//! What waits for a customer approver, and the decisions. Approvals are addressed by the id
//! of what they decide: a grant (`gr_…`), an op (`op_…`) or an endpoint (`ep_…`).

use crate::{endpoints, grants, identity::Caller, server::Gateway};
use endpoint_types::{
    api::{EndpointState, Role},
    control::{ApprovalItem, ApprovalKind, ApprovalStage, GrantState},
    ApiError, ErrorCode,
};

/// Pending items the caller may see; approvers only their own customer's.
pub async fn list(gw: &Gateway, caller: &Caller) -> Result<Vec<ApprovalItem>, ApiError> {
    let mut items = Vec::new();
    for g in grants::list(gw, caller).await? {
        if g.state == GrantState::PendingApproval {
            items.push(ApprovalItem {
                summary: format!(
                    "{} access for {} — {}",
                    g.level.as_str(),
                    endpoint_types::duration::format_duration(std::time::Duration::from_secs(
                        g.duration_s
                    )),
                    g.reason
                ),
                request: serde_json::to_value(&g).unwrap_or_default(),
                id: g.id,
                kind: ApprovalKind::Grant,
                stage: ApprovalStage::Command,
                appliance_id: g.appliance_id,
                app: g.app,
                customer: g.customer,
                requested_by: g.requested_by,
                requested_at: g.requested_at,
            });
        }
    }
    for e in endpoints::list(gw, caller).await? {
        if e.state == EndpointState::PendingApproval {
            let ttl_s = e.expires_at.duration_since(e.created_at).as_secs().max(0) as u64;
            items.push(ApprovalItem {
                summary: endpoint_types::control::endpoint_summary(e.endpoint_type, &e.origin_resource_id, ttl_s),
                request: serde_json::json!({
                    "type": e.endpoint_type, "origin_resource_id": e.origin_resource_id, "ttl_s": ttl_s,
                    "appliance_id": e.appliance_id, "requested_by": e.created_by,
                }),
                id: e.id,
                kind: ApprovalKind::Endpoint,
                stage: ApprovalStage::Command,
                appliance_id: e.appliance_id,
                app: e.app,
                customer: e.customer,
                requested_by: e.created_by,
                requested_at: e.created_at,
            });
        }
    }
    for (row, appliance) in gw.ops.list_rows(caller).await? {
        if let Some(item) = crate::ops::approval_item(&row, &appliance) {
            items.push(item);
        }
    }
    items.sort_by_key(|i| i.requested_at);
    Ok(items)
}

pub async fn show(gw: &Gateway, caller: &Caller, id: &str) -> Result<serde_json::Value, ApiError> {
    let item = list(gw, caller).await?.into_iter().find(|i| i.id == id);
    match item {
        // At the output stage the approver sees the held output, fetched from the appliance.
        Some(i) if i.kind == ApprovalKind::Op && i.stage == ApprovalStage::Output => {
            let mut v = serde_json::to_value(&i).unwrap_or_default();
            v["output"] = gw.ops.preview(caller, id).await?;
            Ok(v)
        }
        Some(i) => Ok(serde_json::to_value(i).unwrap_or_default()),
        None => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("{id} is not waiting for approval"),
        )
        .hint("`postern approvals list` shows what waits for a decision")),
    }
}

pub async fn decide(
    gw: &std::sync::Arc<Gateway>,
    caller: &Caller,
    id: &str,
    approve: bool,
    message: Option<String>,
) -> Result<serde_json::Value, ApiError> {
    caller.require(
        &[Role::Approver],
        "approve or deny requests (approvals belong to the customer)",
    )?;
    if id.starts_with("gr_") {
        return Ok(
            serde_json::to_value(grants::decide(gw, caller, id, approve, message).await?)
                .unwrap_or_default(),
        );
    }
    if id.starts_with("ep_") {
        return Ok(serde_json::to_value(
            endpoints::decide(gw, caller, id, approve, message).await?,
        )
        .unwrap_or_default());
    }
    if id.starts_with("op_") {
        return Ok(
            serde_json::to_value(gw.ops.decide(caller, id, approve, message).await?)
                .unwrap_or_default(),
        );
    }
    Err(ApiError::new(
        ErrorCode::NotFound,
        format!("{id} is not waiting for approval"),
    )
    .hint("`postern approvals list` shows what waits for a decision"))
}

/// A refused move of a grant, op or endpoint (deciding something no longer pending, retiring
/// or revoking what already ended, losing a race to another request or replica): recorded in
/// the gateway's trail as `denied` with its reason, then handed back to the caller unchanged.
pub async fn refused(
    audit: &dyn crate::ports::AuditSink,
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
