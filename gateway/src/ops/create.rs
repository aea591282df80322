//! An operator's request for an op: checked, recorded, then approved by the policy and
//! dispatched, or left for a person.

use super::{internal, record, subject, Ops, DEFAULT_TIMEOUT};
use crate::{
    audit::Subject,
    identity::{random_hex, Caller},
    store::{ApplianceRow, OpRow},
};
use endpoint_types::{
    api::Role,
    control::{OpRecord, OpRequest, OpState},
    lifecycle::{self, OpEvent},
    ApiError, ErrorCode,
};
use std::time::Duration;

const TIMEOUT_MIN: Duration = Duration::from_secs(1);
const TIMEOUT_MAX: Duration = Duration::from_secs(86_400);
/// Ops appear in approvals and records with at most this much of their command.
const COMMAND_MAX: usize = 16 * 1024;

/// The request's command (trimmed) and timeout, or why they are not acceptable.
fn checked_command(req: &OpRequest) -> Result<(String, Duration), ApiError> {
    let tool = req.tool.as_str();
    let command = req.command.trim().to_string();
    if command.is_empty() || command.len() > COMMAND_MAX {
        return Err(ApiError::invalid("the command is empty or too long")
            .hint(format!("e.g. --command \"{tool} …\"")));
    }
    if command.split_whitespace().next() != Some(tool) {
        return Err(
            ApiError::invalid(format!("the command must start with `{tool}`")).hint(format!(
                "an `ops {tool}` command runs {tool} and nothing else, e.g. --command \"{tool} …\""
            )),
        );
    }
    let timeout = req
        .timeout_s
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    if !(TIMEOUT_MIN..=TIMEOUT_MAX).contains(&timeout) {
        return Err(ApiError::invalid("the timeout is outside 1s–24h").hint("e.g. --timeout 5m"));
    }
    Ok((command, timeout))
}

impl Ops {
    /// Records an operator's op. Under a policy that approves by itself it is approved and
    /// dispatched at once; otherwise it waits for a customer approver, who is notified.
    pub async fn create(&self, caller: &Caller, req: OpRequest) -> Result<OpRecord, ApiError> {
        caller.require(&[Role::Admin, Role::Operator], "run ops")?;
        let (command, timeout) = checked_command(&req)?;
        let found = self.store.find_appliance(&req.app, &req.customer).await;
        let appliance = crate::lookup::registered(found, &req.app, &req.customer)?;
        caller.require_customer(&appliance.customer)?;
        self.audit.room_for_request(&appliance.id).await?;
        let now = self.now();
        let phase = endpoint_types::phase::check_active(req.phase)?;
        let grant = self.grants.require_phase(&appliance, phase, now).await?;
        self.check_resource(caller, &appliance, &req, &command)
            .await?;
        let row = OpRow {
            id: format!("op_{}", random_hex(8)),
            appliance_id: appliance.id.clone(),
            tool: req.tool,
            command,
            origin_resource_id: req.origin_resource_id.clone(),
            timeout,
            state: OpState::PendingApproval,
            requested_by: caller.actor(),
            requested_by_id: Some(caller.token_id.clone()).filter(|id| !id.is_empty()),
            requested_at: now,
            grant_id: Some(grant.id),
            command_approved_by: None,
            command_approved_at: None,
            output_approved_by: None,
            output_approved_at: None,
            started_at: None,
            finished_at: None,
            exit_code: None,
            stdout: None,
            stderr: None,
            truncated: false,
            error: None,
            message: None,
            phase,
        };
        self.submit(caller, row, &appliance).await
    }

    /// Stores a new op, approved at once if the policy approves by itself (then dispatched),
    /// otherwise waiting for a person (who is notified).
    async fn submit(
        &self,
        caller: &Caller,
        mut row: OpRow,
        appliance: &ApplianceRow,
    ) -> Result<OpRecord, ApiError> {
        let now = row.requested_at;
        // The op's phase's policy decides (install: always a person).
        let ruling = self.grants.ruling(&appliance.id, row.phase, now).await;
        // Install is decided by a person for each use, whatever the policy (the gate says so
        // too; this holds whatever gate is plugged in).
        let auto = match endpoint_types::phase::always_needs_person(row.phase) {
            true => None,
            false => {
                self.grants
                    .automatic_decision(&appliance.id, row.phase, now)
                    .await
            }
        };
        if let Some((by, _)) = auto {
            row.state =
                lifecycle::next(row.state, &OpEvent::CommandApproved { by: by.to_string() })
                    .map_err(|e| e.to_api_error(&row.id))?;
            row.command_approved_by = Some(by.to_string());
            row.command_approved_at = Some(now);
        }
        self.store.insert_op(&row).await.map_err(internal)?;
        self.audit
            .record("op.requested", &caller.actor(), subject(&row), serde_json::json!({
                "tool": row.tool, "command": row.command, "origin_resource_id": row.origin_resource_id, "phase": row.phase.as_str(),
                "timeout_s": row.timeout.as_secs(), "grant_id": row.grant_id,
                "policy_table": ruling.table, "rule": ruling.rule(),
            }))
            .await;
        match auto {
            Some((by, _)) => {
                self.audit
                    .record(
                        "op.approved",
                        by,
                        subject(&row),
                        serde_json::json!({"stage": "command", "phase": row.phase.as_str(),
                            "policy_table": ruling.table, "rule": ruling.rule()}),
                    )
                    .await;
                self.dispatch(&row.id).await;
            }
            None => {
                self.notifier
                    .waiting(&appliance.customer, "op", &row.id)
                    .await
            }
        }
        let row = self
            .store
            .get_op(&row.id)
            .await
            .map_err(internal)?
            .unwrap_or(row);
        Ok(record(&row, appliance))
    }

    /// The appliance is connected, declares the op's resource, and the resource is of the
    /// tool's kind (the agent checks again). A mismatched tool is audited as `denied`.
    async fn check_resource(
        &self,
        caller: &Caller,
        appliance: &ApplianceRow,
        req: &OpRequest,
        command: &str,
    ) -> Result<(), ApiError> {
        let view = self.agents.view(&appliance.id).ok_or_else(|| {
            ApiError::new(
                ErrorCode::ApplianceOffline,
                format!(
                    "appliance {} ({}/{}) is offline",
                    appliance.id, appliance.app, appliance.customer
                ),
            )
            .hint("the agent in the appliance is not connected; check `postern appliance list`")
        })?;
        let Some(resource) = view.resource(&req.origin_resource_id) else {
            let known: Vec<&str> = view.resources.iter().map(|r| r.id.as_str()).collect();
            return Err(ApiError::new(
                ErrorCode::InvalidOriginResourceId,
                format!(
                    "appliance {} has no resource {:?}",
                    appliance.id, req.origin_resource_id
                ),
            )
            .hint(format!(
                "resources this appliance declares: {}",
                known.join(", ")
            )));
        };
        let Some((message, hint)) = resource
            .kind
            .op_tool_mismatch(req.tool.as_str(), &resource.id)
        else {
            return Ok(());
        };
        let error = ApiError::new(ErrorCode::InvalidOriginResourceId, message)
            .hint(hint)
            .details(serde_json::json!({"origin_resource_id": resource.id, "kind": resource.kind, "tool": req.tool, "tools": resource.kind.op_tools()}));
        self.audit
            .record(
                "denied",
                &caller.actor(),
                Subject::appliance(&appliance.id),
                serde_json::json!({
                    "action": "op", "code": error.code, "reason": error.message, "tool": req.tool,
                    "origin_resource_id": resource.id, "command": command,
                }),
            )
            .await;
        Err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_types::control::OpTool;

    fn request(command: &str, timeout_s: Option<u64>) -> OpRequest {
        OpRequest {
            phase: endpoint_types::phase::operate(),
            tool: OpTool::Kubectl,
            app: "shop".into(),
            customer: "acme".into(),
            origin_resource_id: "aws_eks_cluster.main".into(),
            command: command.into(),
            timeout_s,
        }
    }

    #[test]
    fn commands_start_with_their_tool_and_timeouts_stay_within_a_day() {
        assert_eq!(
            checked_command(&request("  kubectl get pods \n", None)).unwrap(),
            ("kubectl get pods".to_string(), DEFAULT_TIMEOUT)
        );
        assert_eq!(
            checked_command(&request("kubectl get pods", Some(86_400)))
                .unwrap()
                .1,
            TIMEOUT_MAX
        );
        for (command, timeout) in [
            ("", None),
            ("   ", None),
            ("kubectlx get pods", None),
            ("sh -c kubectl", None),
            ("kubectl get pods", Some(0)),
            ("kubectl get pods", Some(86_401)),
        ] {
            let e = checked_command(&request(command, timeout)).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{command:?} {timeout:?}");
            assert!(!e.hint.is_empty());
        }
        let long = format!("kubectl {}", "a".repeat(COMMAND_MAX));
        assert_eq!(
            checked_command(&request(&long, None)).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
    }
}
