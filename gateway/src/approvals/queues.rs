//! The grants, endpoints and ops services as approval [`Queue`]s.

use super::Queue;
use crate::{endpoints::Endpoints, grants::Grants, identity::Caller, ops::Ops};
use async_trait::async_trait;
use endpoint_types::{
    api::EndpointState,
    approval::DecidedContent,
    control::{ApprovalItem, ApprovalKind, ApprovalStage, GrantRecord, GrantState},
    duration::format_duration,
    ApiError,
};
use std::{sync::Arc, time::Duration};

fn to_value<T: serde::Serialize>(v: T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

#[async_trait]
impl Queue for Grants {
    fn owns(&self, id: &str) -> bool {
        id.starts_with("gr_")
    }

    async fn waiting(&self, caller: &Caller) -> Result<Vec<ApprovalItem>, ApiError> {
        Ok(self
            .list(caller)
            .await?
            .into_iter()
            .filter(|g| g.state == GrantState::PendingApproval)
            .map(|g| ApprovalItem {
                summary: format!(
                    "{} access for {} — {}",
                    g.level.as_str(),
                    format_duration(Duration::from_secs(g.duration_s)),
                    g.reason
                ),
                request: to_value(&g),
                id: g.id,
                kind: ApprovalKind::Grant,
                stage: ApprovalStage::Command,
                appliance_id: g.appliance_id,
                app: g.app,
                customer: g.customer,
                requested_by: g.requested_by,
                requested_at: g.requested_at,
            })
            .collect())
    }

    /// A grant binds its level and duration (the appliance checks the grant's lifetime
    /// against it, from the statement's issue).
    async fn content(
        &self,
        _caller: &Caller,
        item: &ApprovalItem,
    ) -> Result<Option<DecidedContent>, ApiError> {
        let grant: GrantRecord = serde_json::from_value(item.request.clone())
            .map_err(|e| ApiError::internal(format!("grant {}: {e}", item.id)))?;
        Ok(Some(DecidedContent::Grant {
            level: grant.level,
            duration_s: grant.duration_s,
        }))
    }

    async fn decide(
        &self,
        caller: &Caller,
        id: &str,
        approve: bool,
        message: Option<String>,
    ) -> Result<serde_json::Value, ApiError> {
        Ok(to_value(
            Grants::decide(self, caller, id, approve, message).await?,
        ))
    }
}

/// The endpoints service as a queue (its decisions start timers that hold the service).
pub struct EndpointQueue(pub Arc<Endpoints>);

#[async_trait]
impl Queue for EndpointQueue {
    fn owns(&self, id: &str) -> bool {
        id.starts_with("ep_")
    }

    async fn waiting(&self, caller: &Caller) -> Result<Vec<ApprovalItem>, ApiError> {
        Ok(self
            .0
            .list(caller)
            .await?
            .into_iter()
            .filter(|e| e.state == EndpointState::PendingApproval)
            .map(|e| {
                let ttl_s = e.expires_at.duration_since(e.created_at).as_secs().max(0) as u64;
                ApprovalItem {
                    summary: endpoint_types::control::endpoint_summary(
                        e.endpoint_type,
                        &e.origin_resource_id,
                        ttl_s,
                    ),
                    request: serde_json::json!({
                        "type": e.endpoint_type, "origin_resource_id": e.origin_resource_id, "ttl_s": ttl_s,
                        "appliance_id": e.appliance_id, "requested_by": e.created_by, "phase": e.phase.as_str(),
                    }),
                    id: e.id,
                    kind: ApprovalKind::Endpoint,
                    stage: ApprovalStage::Command,
                    appliance_id: e.appliance_id,
                    app: e.app,
                    customer: e.customer,
                    requested_by: e.created_by,
                    requested_at: e.created_at,
                }
            })
            .collect())
    }

    /// An endpoint binds its type, resource and TTL (from the approval, as the request
    /// stands: never past the creator's token).
    async fn content(
        &self,
        _caller: &Caller,
        item: &ApprovalItem,
    ) -> Result<Option<DecidedContent>, ApiError> {
        let r = &item.request;
        let endpoint_type = serde_json::from_value(r["type"].clone())
            .map_err(|e| ApiError::internal(format!("endpoint {}: {e}", item.id)))?;
        Ok(Some(DecidedContent::Endpoint {
            endpoint_type,
            resource_id: r["origin_resource_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            ttl_s: r["ttl_s"].as_u64().unwrap_or_default(),
        }))
    }

    async fn decide(
        &self,
        caller: &Caller,
        id: &str,
        approve: bool,
        message: Option<String>,
    ) -> Result<serde_json::Value, ApiError> {
        Ok(to_value(self.0.decide(caller, id, approve, message).await?))
    }
}

#[async_trait]
impl Queue for Ops {
    fn owns(&self, id: &str) -> bool {
        id.starts_with("op_")
    }

    async fn waiting(&self, caller: &Caller) -> Result<Vec<ApprovalItem>, ApiError> {
        Ok(self
            .list_rows(caller)
            .await?
            .iter()
            .filter_map(|(row, appliance)| crate::ops::approval_item(row, appliance))
            .collect())
    }

    /// The command stage binds the tool, the argv the appliance will split the command into,
    /// the resource and the timeout.
    async fn content(
        &self,
        caller: &Caller,
        item: &ApprovalItem,
    ) -> Result<Option<DecidedContent>, ApiError> {
        if item.stage == ApprovalStage::Output {
            // What the approver saw is what the release binds.
            let output = self.preview(caller, &item.id).await?;
            let text = |k: &str| output[k].as_str().unwrap_or_default().to_string();
            return Ok(Some(DecidedContent::OpOutput {
                output_sha256: certs::approver::output_sha256(&text("stdout"), &text("stderr")),
            }));
        }
        let (row, _) = self.load(caller, &item.id).await?;
        DecidedContent::op_command(
            row.tool,
            &row.command,
            &row.origin_resource_id,
            row.timeout.as_secs(),
        )
        .map(Some)
        .map_err(|e| ApiError::invalid(format!("op {}: {e}", item.id)))
    }

    /// At the output stage the approver sees the held output, fetched from the appliance.
    async fn detail(
        &self,
        caller: &Caller,
        item: &ApprovalItem,
    ) -> Result<Option<(&'static str, serde_json::Value)>, ApiError> {
        if item.stage != ApprovalStage::Output {
            return Ok(None);
        }
        Ok(Some(("output", self.preview(caller, &item.id).await?)))
    }

    async fn decide(
        &self,
        caller: &Caller,
        id: &str,
        approve: bool,
        message: Option<String>,
    ) -> Result<serde_json::Value, ApiError> {
        Ok(to_value(
            Ops::decide(self, caller, id, approve, message).await?,
        ))
    }
}
