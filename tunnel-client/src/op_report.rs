//! The end of an op: what the customer's trail records, what the gateway is told, and the
//! output kept in the appliance when it is held. Also the per-op credentials the agent hands
//! the tool. (A child of `op_runner`: it shares the runner's private state.)

use super::{Authorized, OpRunner};
use crate::{
    audit::Entry,
    op_ledger::counted_exit_code,
    op_output::{output_frames, Forwarder},
    op_runner::Outbox,
    op_sandbox::OpDir,
    ops::{OpOutcome, OpSpec, Stream},
};
use endpoint_types::{
    frame::{OpDispatch, OpFinished, ToGateway},
    lifecycle::OpEvent,
    ApiError, ErrorCode,
};
use serde_json::json;
use std::ffi::OsString;

impl OpRunner {
    /// The environment that carries the resource's credentials for this tool (docker, cloud),
    /// copied into the op's directory, which then becomes the op user's with all it holds
    /// (a psql op's passfile too).
    pub(super) fn credentials(
        &self,
        d: &OpDispatch,
        dir: &OpDir,
    ) -> Result<Vec<(&'static str, OsString)>, ApiError> {
        // The op's phase picks the credential (`[resource.phases.<phase>]`); the dispatch
        // check already refused a phase the resource does not allow.
        let credentials = match self.inner.config.resource(&d.resource_id) {
            Some(r) => {
                let r = crate::phases::for_phase(r, d.phase)?;
                crate::op_credentials::prepare(&r, d.tool.as_str(), dir.path())
            }
            None => Ok(Vec::new()),
        };
        credentials.and_then(|c| dir.give_to(self.inner.confinement.user.as_ref()).map(|()| c)).map_err(|e| {
            tracing::error!(op = %d.op_id, error = %e, "cannot prepare the op's credentials");
            ApiError::new(ErrorCode::Internal, "the appliance cannot prepare the resource's credentials for the op")
                .hint("check the credential files the resource names in agent.toml; the agent's log has the cause")
        })
    }

    /// Records the op's end in the customer's trail and tells the gateway (or holds the output).
    pub(super) async fn report(
        &self,
        d: &OpDispatch,
        auth: &Authorized,
        spec: OpSpec,
        result: Result<OpOutcome, ApiError>,
        mut fwd: Forwarder,
        out: &Outbox,
    ) {
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(error) => {
                tracing::warn!(op = %d.op_id, error = %error, "op did not run");
                if !self.end(&d.op_id, &OpEvent::AgentRefused) {
                    return;
                }
                self.record(
                    Entry::new("op.finished", d.operator.clone(), json!({ "held": false, "error": error.code.as_str(), "reason": error.message }))
                        .op(d.op_id.clone()),
                );
                let _ = out.send(finished_frame(&d.op_id, None, Some(error))).await;
                return;
            }
        };
        let cancel_reason = outcome.cancelled.then(|| {
            if self.inner.shutdown.is_cancelled() {
                "agent shutting down"
            } else {
                "operate grant ended"
            }
        });
        let error = outcome.error(&spec, !auth.hold);
        let ended = match (auth.hold, outcome.timed_out) {
            (false, true) => OpEvent::TimedOut,
            (output_held, _) => OpEvent::Finished {
                exit_code: counted_exit_code(outcome.exit_code, error.is_some()),
                output_held,
            },
        };
        if !self.end(&d.op_id, &ended) {
            return;
        }
        let delivered = if auth.hold {
            true
        } else {
            fwd.finish(&outcome).await;
            fwd.delivered
        };
        let duration_ms = outcome
            .finished_at
            .duration_since(outcome.started_at)
            .as_millis()
            .max(0);
        self.record(
            Entry::new(
                "op.finished",
                d.operator.clone(),
                json!({
                    "exit_code": outcome.exit_code,
                    "signal": outcome.signal,
                    "timed_out": outcome.timed_out,
                    "cancelled": outcome.cancelled,
                    "cancel_reason": cancel_reason,
                    "truncated": outcome.truncated(),
                    "duration_ms": duration_ms as u64,
                    "held": auth.hold,
                    "delivered": delivered,
                    "error": error.as_ref().map(|e| e.code.as_str()),
                    "stdout_bytes": outcome.stdout.len(),
                    "stderr_bytes": outcome.stderr.len(),
                    "stdout_sha256": crate::audit::sha256_hex(&outcome.stdout),
                    "stderr_sha256": crate::audit::sha256_hex(&outcome.stderr),
                }),
            )
            .op(d.op_id.clone()),
        );
        tracing::info!(op = %d.op_id, exit_code = ?outcome.exit_code, timed_out = outcome.timed_out, held = auth.hold, "op finished");
        if auth.hold {
            let held = Held { spec, outcome };
            self.state().held.insert(d.op_id.clone(), held);
            let _ = out.send(held_notice(&d.op_id)).await;
        } else {
            let frame = ToGateway::OpFinished(OpFinished {
                op_id: d.op_id.clone(),
                held: false,
                exit_code: outcome.exit_code,
                truncated: outcome.truncated(),
                timed_out: outcome.timed_out,
                error,
                preview: false,
                destroyed: false,
            });
            if out.send(frame).await.is_err() {
                tracing::warn!(op = %d.op_id, "the connection the op came on is gone; its result was not delivered (the customer's trail has it)");
            }
        }
    }

    /// Moves a run's end through the op machine; false (and logged) when the machine refuses
    /// it: the op has already ended, and its end is not reported twice.
    fn end(&self, op_id: &str, event: &OpEvent) -> bool {
        match self.state().ops.apply(op_id, event) {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(op = %op_id, event = event.name(), error = ?e, "not reporting an end the op state machine refuses");
                false
            }
        }
    }
}

pub(super) fn not_found(op_id: &str) -> ToGateway {
    ToGateway::OpRefused {
        op_id: op_id.to_string(),
        error: no_held_output(op_id),
    }
}

/// The error for a preview, release or destroy of output this appliance does not hold.
pub(super) fn no_held_output(op_id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no held output for op {op_id} in this appliance (released, destroyed, or the agent restarted)"),
    )
    .hint("`postern ops get ID` shows the op's state")
}

/// A finished op's output kept in the appliance until the customer decides.
pub(super) struct Held {
    pub(super) spec: OpSpec,
    pub(super) outcome: OpOutcome,
}

impl Held {
    pub(super) fn finished(&self, held: bool, preview: bool) -> ToGateway {
        debug_assert!(
            !held || preview,
            "a held op's end says nothing outside a preview; see held_notice"
        );
        ToGateway::OpFinished(OpFinished {
            op_id: self.spec.op_id.clone(),
            held,
            exit_code: self.outcome.exit_code,
            truncated: self.outcome.truncated(),
            timed_out: self.outcome.timed_out,
            error: self.outcome.error(&self.spec, true),
            preview,
            destroyed: false,
        })
    }

    /// The digest an approver's signed release binds: of the output as [`Held::frames`] sends it.
    pub(super) fn output_sha256(&self) -> String {
        certs::approver::output_sha256(
            &String::from_utf8_lossy(&self.outcome.stdout),
            &String::from_utf8_lossy(&self.outcome.stderr),
        )
    }

    /// The whole output (stdout, then stderr) and the op's end, as frames.
    pub(super) fn frames(&self, preview: bool, held_after: bool) -> Vec<ToGateway> {
        let id = &self.spec.op_id;
        let out = String::from_utf8_lossy(&self.outcome.stdout);
        let err = String::from_utf8_lossy(&self.outcome.stderr);
        let mut frames: Vec<ToGateway> = output_frames(id, Stream::Stdout, &out, preview).collect();
        frames.extend(output_frames(id, Stream::Stderr, &err, preview));
        frames.push(self.finished(held_after, preview));
        frames
    }

    /// The event that ends the op once its released output is all sent: as the gateway
    /// counts it, timed out when the command ran out of time, otherwise released with its
    /// exit code.
    pub(super) fn released(&self, by: String) -> OpEvent {
        if self.outcome.timed_out {
            return OpEvent::TimedOut;
        }
        let failed = self.outcome.error(&self.spec, false).is_some();
        OpEvent::OutputReleased {
            by,
            exit_code: counted_exit_code(self.outcome.exit_code, failed),
        }
    }

    /// Overwrites the output before the memory is freed.
    pub(super) fn wipe(mut self) {
        for buf in [&mut self.outcome.stdout, &mut self.outcome.stderr] {
            buf.fill(0);
            std::hint::black_box(&buf);
        }
    }
}

/// `OpFinished { held: true }`: says nothing about the output, not even the exit code.
pub(super) fn held_notice(op_id: &str) -> ToGateway {
    ToGateway::OpFinished(OpFinished {
        op_id: op_id.to_string(),
        held: true,
        exit_code: None,
        truncated: false,
        timed_out: false,
        error: None,
        preview: false,
        destroyed: false,
    })
}

pub(super) fn finished_frame(
    op_id: &str,
    exit_code: Option<i64>,
    error: Option<ApiError>,
) -> ToGateway {
    ToGateway::OpFinished(OpFinished {
        op_id: op_id.to_string(),
        held: false,
        exit_code,
        truncated: false,
        timed_out: false,
        error,
        preview: false,
        destroyed: false,
    })
}
