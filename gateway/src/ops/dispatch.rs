//! Approved ops on their way to the appliance, and ops the appliance can no longer finish.

use super::{subject, Ops, SYSTEM};
use crate::store::{ApplianceRow, OpRow};
use endpoint_types::{
    control::{ApprovalStage, OpState},
    frame::{OpDispatch, ToAgent},
    lifecycle::{access_request_hint, OpEvent},
    ApiError, ErrorCode,
};
use jiff::Timestamp;

impl Ops {
    /// Sends an approved op to its appliance, after checking at this moment that its grant is
    /// live and, for a window approval, that the window is still open.
    pub async fn dispatch(&self, id: &str) {
        let Ok(Some(row)) = self.store.get_op(id).await else {
            return;
        };
        if row.state != OpState::Approved {
            return;
        }
        let Ok(Some(appliance)) = self.store.get_appliance(&row.appliance_id).await else {
            return;
        };
        let now = self.now();
        if !self.grant_still_live(&row, &appliance, now).await {
            return;
        }
        if !self.approval_still_holds(&row, &appliance, now).await {
            return;
        }
        let policy = self.grants.policy_of(&appliance.id).await;
        // The output hold follows the op's phase's policy too.
        let hold_output = endpoint_types::phase_policy::policy_for(&policy, row.phase)
            .map(|p| p.needs_output_approval(now))
            .unwrap_or(true);
        let (Some(grant_id), Some(approved_by), Some(approved_at)) = (
            row.grant_id.clone(),
            row.command_approved_by.clone(),
            row.command_approved_at,
        ) else {
            return;
        };
        // A person's approval goes with the decision their key signed, as it was kept; the
        // appliance verifies it (a policy's approval is the appliance's own evaluation).
        let signed_decision = if approved_by.starts_with("policy:") {
            None
        } else {
            self.store
                .signed_decision(&row.id, ApprovalStage::Command)
                .await
                .ok()
                .flatten()
        };
        let frame = ToAgent::OpDispatch(OpDispatch {
            op_id: row.id.clone(),
            tool: row.tool,
            command: row.command.clone(),
            resource_id: row.origin_resource_id.clone(),
            timeout_s: row.timeout.as_secs(),
            operator: row.requested_by.clone(),
            grant_id,
            command_approved_by: approved_by,
            command_approved_at: approved_at,
            hold_output,
            signed_decision,
            phase: row.phase,
        });
        // Offline now: it goes out when the agent reconnects.
        if self.agents.send(&appliance.id, frame) {
            self.audit
                .record(
                    "op.dispatched",
                    SYSTEM,
                    subject(&row),
                    serde_json::json!({"hold_output": hold_output}),
                )
                .await;
        }
    }

    /// Whether the operate grant the op was approved under is still the live one; if not, the
    /// op expires (and is audited so).
    async fn grant_still_live(
        &self,
        row: &OpRow,
        appliance: &ApplianceRow,
        now: Timestamp,
    ) -> bool {
        let live = self.grants.require_phase(appliance, row.phase, now).await;
        if live
            .as_ref()
            .is_ok_and(|g| Some(&g.id) == row.grant_id.as_ref())
        {
            return true;
        }
        let error = ApiError::new(
            ErrorCode::OperateAccessExpired,
            format!(
                "the operate grant op {} was approved under has ended",
                row.id
            ),
        )
        .hint(access_request_hint(&appliance.app, &appliance.customer));
        let expired = self
            .transition(
                &row.id,
                |_| OpEvent::Expired,
                |o| {
                    o.finished_at = Some(now);
                    o.error = Some(error.clone());
                },
            )
            .await;
        if expired.is_ok() {
            self.audit
                .record(
                    "op.expired",
                    SYSTEM,
                    subject(row),
                    serde_json::json!({"reason": error.message}),
                )
                .await;
        }
        false
    }

    /// Whether the op's command approval still holds: a policy's approval only while the
    /// policy would still give it. An op approved inside a window that has closed since goes
    /// back to a person.
    async fn approval_still_holds(
        &self,
        row: &OpRow,
        appliance: &ApplianceRow,
        now: Timestamp,
    ) -> bool {
        let by_policy = row
            .command_approved_by
            .as_deref()
            .is_some_and(|b| b.starts_with("policy:"));
        if !by_policy
            || self
                .grants
                .automatic_decision(&appliance.id, row.phase, now)
                .await
                .is_some()
        {
            return true;
        }
        let requeued = self
            .transition(
                &row.id,
                |_| OpEvent::PolicyRecheckFailed,
                |o| {
                    o.command_approved_by = None;
                    o.command_approved_at = None;
                },
            )
            .await;
        if requeued.is_ok() {
            self.audit
                .record(
                    "op.requeued",
                    SYSTEM,
                    subject(row),
                    serde_json::json!({"reason": "the approval window closed before dispatch"}),
                )
                .await;
            self.notifier
                .waiting(&appliance.customer, "op", &row.id)
                .await;
        }
        false
    }

    /// Approved ops of an appliance that never reached it (it was offline): sent after its hello.
    pub async fn dispatch_pending(&self, appliance_id: &str) {
        if let Ok(rows) = self.store.ops_of(appliance_id).await {
            for r in rows.into_iter().filter(|r| r.state == OpState::Approved) {
                self.dispatch(&r.id).await;
            }
        }
    }

    /// The agent went away while ops ran: their results cannot arrive any more (held output is
    /// kept in the appliance and announced again on reconnect; running ops are not).
    pub async fn interrupted(&self, appliance_id: &str) {
        let Ok(rows) = self.store.ops_of(appliance_id).await else {
            return;
        };
        let now = self.now();
        for r in rows.into_iter().filter(|r| r.state == OpState::Running) {
            let error = ApiError::new(ErrorCode::ApplianceOffline, "the appliance disconnected while the op ran; its result was lost")
                .hint("check the appliance's own audit trail for the outcome, then run the op again if needed");
            let moved = self
                .transition(
                    &r.id,
                    |_| OpEvent::AgentLost,
                    |o| {
                        o.finished_at = Some(now);
                        o.error = Some(error.clone());
                    },
                )
                .await;
            if moved.is_ok() {
                self.audit
                    .record(
                        "op.interrupted",
                        SYSTEM,
                        subject(&r),
                        serde_json::json!({"reason": "agent disconnected"}),
                    )
                    .await;
            }
        }
    }
}
