//! A customer approver's decision on an op's command or, once it ran, on its held output.

use super::{subject, NotMoved, Ops};
use crate::{approvals::refused, identity::Caller, store::OpRow};
use endpoint_types::{
    control::{ApprovalStage, OpRecord, OpState},
    frame::ToAgent,
    lifecycle::OpEvent,
    ApiError, ErrorCode,
};

/// One decision: who, which way, with what message.
struct Decision<'a> {
    id: &'a str,
    who: String,
    approve: bool,
    message: Option<String>,
}

impl Decision<'_> {
    fn action(&self) -> &'static str {
        if self.approve {
            "approve"
        } else {
            "deny"
        }
    }

    /// Which decision this is depends on the op's stage, read again on every attempt.
    fn event(&self, o: &OpRow) -> OpEvent {
        let (by, message) = (self.who.clone(), self.message.clone());
        match (o.state, self.approve) {
            (OpState::OutputPendingApproval, true) => OpEvent::OutputApproved { by },
            (OpState::OutputPendingApproval, false) => OpEvent::OutputDenied { by, message },
            (_, true) => OpEvent::CommandApproved { by },
            (_, false) => OpEvent::CommandDenied { by, message },
        }
    }
}

impl Ops {
    /// A customer approver's decision on the command or, once it ran, on its held output. An
    /// op that waits for neither (running, ended) is not changed: CONFLICT, audited as `denied`.
    pub async fn decide(
        &self,
        caller: &Caller,
        id: &str,
        approve: bool,
        message: Option<String>,
    ) -> Result<OpRecord, ApiError> {
        let (row, appliance) = self.load(caller, id).await?;
        caller.require_customer(&appliance.customer)?;
        let d = Decision {
            id,
            who: caller.actor(),
            approve,
            message,
        };
        if row.state == OpState::OutputPendingApproval && approve {
            self.check_release(caller, &row).await?;
        }
        let now = self.now();
        let moved = self
            .transition(
                id,
                |o| d.event(o),
                |o| match d.event(o) {
                    OpEvent::CommandApproved { .. } => {
                        o.command_approved_by = Some(d.who.clone());
                        o.command_approved_at = Some(now);
                    }
                    OpEvent::OutputApproved { .. } => {
                        o.output_approved_by = Some(d.who.clone());
                        o.output_approved_at = Some(now);
                    }
                    OpEvent::CommandDenied { .. } => {
                        o.message = d.message.clone();
                        o.finished_at = Some(now);
                    }
                    _ => o.message = d.message.clone(),
                },
            )
            .await;
        let moved = match moved {
            Ok(moved) => moved,
            Err(e) => return Err(self.not_decided(caller, &row, &d, e).await),
        };
        self.after_decision(&row, &moved, d).await;
        self.get(caller, id).await
    }

    /// Held output can be released once, and only while the appliance that holds it is here.
    async fn check_release(&self, caller: &Caller, row: &OpRow) -> Result<(), ApiError> {
        let id = &row.id;
        if let Some(by) = &row.output_approved_by {
            let err = ApiError::new(ErrorCode::Conflict, format!("the output of op {id} was already released by {by}"))
                .hint(format!("the appliance sends it; `postern ops wait {id}` shows it once there"))
                .details(serde_json::json!({"id": id, "record": "op", "state": row.state.as_str(), "event": "output-approved", "ended": false}));
            return Err(refused(&*self.audit, caller, subject(row), "approve", err).await);
        }
        if !self.agents.is_online(&row.appliance_id) {
            return Err(ApiError::new(
                ErrorCode::ApplianceOffline,
                "the held output is in the appliance, which is offline",
            )
            .hint("approve again once the appliance is online"));
        }
        Ok(())
    }

    /// The refusal of a decision the op did not take, recorded as `denied`.
    async fn not_decided(
        &self,
        caller: &Caller,
        row: &OpRow,
        d: &Decision<'_>,
        why: NotMoved,
    ) -> ApiError {
        let id = d.id;
        let err = match why {
            NotMoved::Refused(e) => e.to_api_error(id),
            NotMoved::Unavailable => ApiError::new(
                ErrorCode::Conflict,
                format!("op {id} kept changing while this request was deciding it"),
            )
            .hint(format!(
                "look at it again (`postern ops get {id}`) and repeat if it still applies"
            ))
            .details(
                serde_json::json!({"id": id, "record": "op", "event": d.action(), "ended": false}),
            ),
        };
        refused(&*self.audit, caller, subject(row), d.action(), err).await
    }

    /// Records the decision and carries it out: dispatch an approved command, release or
    /// destroy held output in the appliance.
    async fn after_decision(&self, row: &OpRow, moved: &OpRow, d: Decision<'_>) {
        let (id, who) = (d.id, d.who.as_str());
        match moved.state {
            OpState::Approved => {
                self.audit
                    .record(
                        "op.approved",
                        who,
                        subject(row),
                        serde_json::json!({"stage": "command", "command": row.command,
                            "phase": row.phase.as_str(), "rule": format!("a person ({who})")}),
                    )
                    .await;
                self.dispatch(id).await;
            }
            OpState::OutputPendingApproval => {
                self.audit
                    .record("output.approved", who, subject(row), serde_json::json!({}))
                    .await;
                // With the release the approver's key signed, as kept; the appliance verifies it.
                let signed_decision = self
                    .store
                    .signed_decision(id, ApprovalStage::Output)
                    .await
                    .ok()
                    .flatten();
                self.agents.send(
                    &row.appliance_id,
                    ToAgent::OutputRelease {
                        op_id: id.to_string(),
                        approved_by: who.to_string(),
                        signed_decision,
                    },
                );
            }
            // Denied at the output stage: the held output is destroyed in the appliance.
            OpState::Denied if moved.command_approved_at.is_some() => {
                self.audit
                    .record(
                        "output.denied",
                        who,
                        subject(row),
                        serde_json::json!({"message": d.message}),
                    )
                    .await;
                self.agents.send(
                    &row.appliance_id,
                    ToAgent::OutputDestroy {
                        op_id: id.to_string(),
                        denied_by: who.to_string(),
                        message: d.message,
                    },
                );
            }
            _ => {
                self.audit
                    .record(
                        "op.denied",
                        who,
                        subject(row),
                        serde_json::json!({"stage": "command", "message": d.message}),
                    )
                    .await;
            }
        }
    }
}
