//! What agents report about ops: started, output, finished (or holding output), refused.
//! An agent can only ever affect its own appliance's ops, and only as the op machine allows.

use super::{subject, Ops};
use crate::store::OpRow;
use endpoint_types::{
    control::OpState,
    frame::{OpFinished, OutputStream, ToGateway},
    lifecycle::OpEvent,
    ApiError, ErrorCode,
};

/// The exit code an agent's end report stands for in the op machine: the command's own, or
/// non-zero when it reported an error or no code (then it did not succeed).
fn finished_exit_code(f: &OpFinished) -> i64 {
    match (f.exit_code, &f.error) {
        (Some(0), Some(_)) | (None, _) => -1,
        (Some(code), _) => code,
    }
}

impl Ops {
    /// Frames about ops from the agent of `appliance_id`; other frames are ignored.
    pub async fn on_agent_frame(&self, appliance_id: &str, frame: ToGateway) {
        let op_id = match &frame {
            ToGateway::OpStarted { op_id }
            | ToGateway::OpOutput { op_id, .. }
            | ToGateway::OpRefused { op_id, .. } => op_id.clone(),
            ToGateway::OpFinished(f) => f.op_id.clone(),
            _ => return,
        };
        let Ok(Some(row)) = self.store.get_op(&op_id).await else {
            return tracing::warn!(appliance = %appliance_id, op = %op_id, "agent reported on an unknown op");
        };
        if row.appliance_id != appliance_id {
            return tracing::warn!(appliance = %appliance_id, op = %op_id, "agent reported on another appliance's op; ignored");
        }
        let actor = format!("agent:{appliance_id}");
        match frame {
            ToGateway::OpStarted { .. } => self.started(&row, &actor).await,
            ToGateway::OpOutput {
                stream,
                data,
                preview: true,
                ..
            } => self.previews.push(&op_id, stream, &data),
            ToGateway::OpOutput {
                stream,
                data,
                preview: false,
                ..
            } => self.output(&row, stream, &data).await,
            ToGateway::OpFinished(f) if f.preview => {
                self.previews.finish(&op_id, Ok(&f));
            }
            ToGateway::OpFinished(f) if f.destroyed => {
                self.audit
                    .record(
                        "output.destroyed",
                        &actor,
                        subject(&row),
                        serde_json::json!({}),
                    )
                    .await;
            }
            ToGateway::OpFinished(f) if f.held => self.held(&row, &actor, &f).await,
            ToGateway::OpFinished(f) => self.finished(&row, &actor, &f).await,
            ToGateway::OpRefused { error, .. } => self.refused(&row, &actor, error).await,
            _ => {}
        }
    }

    async fn started(&self, row: &OpRow, actor: &str) {
        let now = self.now();
        let moved = self
            .transition(&row.id, |_| OpEvent::Started, |o| o.started_at = Some(now))
            .await;
        if moved.is_ok() {
            self.audit
                .record("op.started", actor, subject(row), serde_json::json!({}))
                .await;
        }
    }

    /// Streamed output, stored up to the cap; the store takes it only while the op produces
    /// output ([`endpoint_types::lifecycle::op_takes_output`]), checked with the append.
    async fn output(&self, row: &OpRow, stream: OutputStream, data: &str) {
        let (out, err) = match stream {
            OutputStream::Stdout => (data, ""),
            OutputStream::Stderr => ("", data),
        };
        match self.store.append_op_output(&row.id, out, err).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(op = %row.id, "output for an op that is not producing output: dropped")
            }
            Err(e) => tracing::error!(op = %row.id, error = %e, "cannot store op output"),
        }
    }

    /// The command ended and the policy keeps its output in the appliance until a person
    /// releases it. The agent announces held output again after every reconnect; the machine
    /// refuses a repeat (the op already holds output), so it is a no-op.
    async fn held(&self, row: &OpRow, actor: &str, f: &OpFinished) {
        let now = self.now();
        let held = OpEvent::Finished {
            exit_code: finished_exit_code(f),
            output_held: true,
        };
        let moved = self
            .transition(&row.id, |_| held.clone(), |o| o.finished_at = Some(now))
            .await;
        if moved.is_err() {
            return;
        }
        self.audit
            .record(
                "op.finished",
                actor,
                subject(row),
                serde_json::json!({"held": true}),
            )
            .await;
        if let Ok(Some(a)) = self.store.get_appliance(&row.appliance_id).await {
            self.notifier.waiting(&a.customer, "op", &row.id).await;
        }
    }

    /// The end of a run, or (for an op holding output) the released result.
    async fn finished(&self, row: &OpRow, actor: &str, f: &OpFinished) {
        let now = self.now();
        let exit_code = finished_exit_code(f);
        let event = |o: &OpRow| match (o.state, f.timed_out) {
            (_, true) => OpEvent::TimedOut,
            (OpState::OutputPendingApproval, false) => OpEvent::OutputReleased {
                by: o
                    .output_approved_by
                    .clone()
                    .unwrap_or_else(|| actor.to_string()),
                exit_code,
            },
            _ => OpEvent::Finished {
                exit_code,
                output_held: false,
            },
        };
        let moved = self
            .transition(&row.id, event, |o| {
                o.exit_code = f.exit_code;
                // The store may have cut the output at its cap already.
                o.truncated = o.truncated || f.truncated;
                o.error = f.error.clone();
                o.finished_at.get_or_insert(now);
            })
            .await;
        let Ok(moved) = moved else {
            return;
        };
        let kind = if moved.output_approved_at.is_some() {
            "output.released"
        } else {
            "op.finished"
        };
        self.audit
            .record(kind, actor, subject(row), serde_json::json!({
                "state": moved.state.as_str(), "exit_code": f.exit_code, "truncated": f.truncated, "timed_out": f.timed_out,
            }))
            .await;
    }

    /// The agent refused the op (or an approver's preview of it).
    async fn refused(&self, row: &OpRow, actor: &str, error: ApiError) {
        if self.previews.finish(&row.id, Err(error.clone())) {
            return;
        }
        let now = self.now();
        // An approval the appliance could not verify is a denial too.
        let event = if matches!(
            error.code,
            ErrorCode::ApprovalDenied | ErrorCode::ApprovalInvalid
        ) {
            OpEvent::AgentDenied
        } else {
            OpEvent::AgentRefused
        };
        let moved = self
            .transition(
                &row.id,
                |_| event.clone(),
                |o| {
                    o.finished_at = Some(now);
                    o.error = Some(error.clone());
                },
            )
            .await;
        if moved.is_ok() {
            self.audit
                .record("denied", actor, subject(row), serde_json::json!({"action": "op", "code": error.code, "reason": error.message}))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(exit_code: Option<i64>, error: Option<ApiError>) -> OpFinished {
        OpFinished {
            op_id: "op_1".into(),
            held: false,
            exit_code,
            truncated: false,
            timed_out: false,
            error,
            preview: false,
            destroyed: false,
        }
    }

    #[test]
    fn an_end_without_a_code_or_with_an_error_is_not_a_success() {
        assert_eq!(finished_exit_code(&finished(Some(0), None)), 0);
        assert_eq!(finished_exit_code(&finished(Some(3), None)), 3);
        assert_eq!(finished_exit_code(&finished(None, None)), -1);
        let error = ApiError::new(ErrorCode::CommandFailed, "x");
        assert_eq!(
            finished_exit_code(&finished(Some(0), Some(error.clone()))),
            -1
        );
        assert_eq!(finished_exit_code(&finished(Some(2), Some(error))), 2);
    }
}
