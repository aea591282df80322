//! Held output on the customer's word: previewed for an approver, released, or destroyed.
//! Each moves the op through the op state machine first; a request the op's state does not
//! take is refused by the machine. (A child of `op_runner`: it shares the runner's private
//! state.)

use super::{
    report::{no_held_output, not_found},
    OpRunner, Outbox,
};
use crate::{
    approval_check::{denied_entry, verified_entry},
    audit::Entry,
    op_ledger::NotMoved,
};
use endpoint_types::{
    approval::{ApprovalInvalid, DecidedContent, SignedDecision},
    frame::{OpFinished, ToGateway},
    lifecycle::OpEvent,
};
use jiff::Timestamp;
use serde_json::json;

impl OpRunner {
    /// `OutputFetch`: the held output as a preview for an approver; it stays held.
    pub fn fetch(&self, op_id: &str, out: Outbox) {
        let frames = {
            let mut state = self.state();
            state
                .ops
                .apply(op_id, &OpEvent::OutputPreviewed)
                .and_then(|_| {
                    let held = state.held.get(op_id).ok_or(NotMoved::Unknown)?;
                    Ok(held.frames(true, true))
                })
        };
        let frames = match frames {
            Ok(frames) => frames,
            Err(e) => {
                let actor = self.inner.audit.agent_actor();
                self.refuse_output(op_id, &actor, "output.preview", e, out);
                return;
            }
        };
        self.record(
            Entry::new(
                "output.previewed",
                self.inner.audit.agent_actor(),
                json!({}),
            )
            .op(op_id),
        );
        self.send_all(frames, out);
    }

    /// `OutputRelease`: the customer let the output leave. Sent, then forgotten; kept if the
    /// connection is lost before it is all queued, so a later release can send it again. When
    /// `agent.toml` lists approvers, the release must be signed by one of them for exactly
    /// this output; one that is not destroys the output (see [`OpRunner::refuse_release`]).
    pub fn release(
        &self,
        op_id: String,
        approved_by: String,
        signed: Option<SignedDecision>,
        out: Outbox,
    ) {
        let digest = self.state().held.get(&op_id).map(|h| h.output_sha256());
        if let Some(output_sha256) = digest {
            let asked = DecidedContent::OpOutput { output_sha256 };
            match self
                .inner
                .approvals
                .verify(signed.as_ref(), &op_id, &asked, Timestamp::now())
            {
                Ok(Some(v)) => {
                    if let Some(s) = &signed {
                        self.record(
                            verified_entry(&approved_by, "output", &v, s).op(op_id.clone()),
                        );
                    }
                }
                Ok(None) => {}
                Err(why) => {
                    self.refuse_release(&op_id, &approved_by, signed.as_ref(), &why, out);
                    return;
                }
            }
        }
        // Approved (the op stays held) until every frame is queued; released after that.
        let approved = OpEvent::OutputApproved {
            by: approved_by.clone(),
        };
        let held = {
            let mut state = self.state();
            state
                .ops
                .apply(&op_id, &approved)
                .and_then(|_| state.held.remove(&op_id).ok_or(NotMoved::Unknown))
        };
        let held = match held {
            Ok(held) => held,
            Err(e) => {
                self.refuse_output(&op_id, &approved_by, "output.release", e, out);
                return;
            }
        };
        let detail = json!({
            "approved_by": approved_by,
            "stdout_bytes": held.outcome.stdout.len(),
            "stderr_bytes": held.outcome.stderr.len(),
        });
        self.record(Entry::new("output.released", approved_by.clone(), detail).op(op_id.clone()));
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            for frame in held.frames(false, false) {
                if out.send(frame).await.is_err() {
                    tracing::warn!(op = %op_id, "connection lost while releasing held output; it stays held");
                    this.state().held.entry(op_id).or_insert(held);
                    return;
                }
            }
            let released = held.released(approved_by);
            if let Err(e) = this.state().ops.apply(&op_id, &released) {
                tracing::error!(op = %op_id, error = ?e, "released output of an op the state machine does not let go");
            }
            held.wipe();
        });
    }

    /// A release the appliance could not verify: the output is destroyed (nothing a forged
    /// release named can leave later), the refusal is `denied` in the trail and
    /// `APPROVAL_INVALID` for the gateway.
    fn refuse_release(
        &self,
        op_id: &str,
        approved_by: &str,
        signed: Option<&SignedDecision>,
        why: &ApprovalInvalid,
        out: Outbox,
    ) {
        tracing::info!(op = %op_id, reason = why.reason(), "refused the release of held output: {why}");
        self.record(denied_entry(approved_by, "output", signed, why).op(op_id));
        let held = {
            let mut state = self.state();
            state
                .ops
                .apply(op_id, &OpEvent::AgentDenied)
                .ok()
                .and_then(|_| state.held.remove(op_id))
        };
        if let Some(held) = held {
            let detail = json!({
                "denied_by": self.inner.audit.agent_actor(),
                "reason": "APPROVAL_INVALID",
                "stdout_bytes": held.outcome.stdout.len(),
                "stderr_bytes": held.outcome.stderr.len(),
            });
            held.wipe();
            self.record(
                Entry::new("output.destroyed", self.inner.audit.agent_actor(), detail).op(op_id),
            );
        }
        let refused = ToGateway::OpRefused {
            op_id: op_id.to_string(),
            error: why.to_api_error(),
        };
        self.send_all(vec![refused], out);
    }

    /// `OutputDestroy`: the customer denied the output; it is overwritten and dropped.
    pub fn destroy(&self, op_id: String, denied_by: String, message: Option<String>, out: Outbox) {
        let denied = OpEvent::OutputDenied {
            by: denied_by.clone(),
            message: message.clone(),
        };
        let held = {
            let mut state = self.state();
            // The output must be here to be destroyed: with the machine willing but the output
            // gone (a release still sending it), it is not found and nothing moves.
            state.ops.check(&op_id, &denied).and_then(|_| {
                let held = state.held.remove(&op_id).ok_or(NotMoved::Unknown)?;
                state.ops.apply(&op_id, &denied)?;
                Ok(held)
            })
        };
        let held = match held {
            Ok(held) => held,
            Err(e) => {
                self.refuse_output(&op_id, &denied_by, "output.destroy", e, out);
                return;
            }
        };
        let detail = json!({
            "denied_by": denied_by,
            "message": message,
            "stdout_bytes": held.outcome.stdout.len(),
            "stderr_bytes": held.outcome.stderr.len(),
        });
        held.wipe();
        self.record(Entry::new("output.destroyed", denied_by, detail).op(op_id.clone()));
        let done = ToGateway::OpFinished(OpFinished {
            op_id,
            held: false,
            exit_code: None,
            truncated: false,
            timed_out: false,
            error: None,
            preview: false,
            destroyed: true,
        });
        self.send_all(vec![done], out);
    }

    /// A fetch, release or destroy the op's state does not take. The gateway gets the error it
    /// always got (no held output: `NOT_FOUND`), with the machine's refusal (`id`, `record`,
    /// `state`, `event`, `ended`) as its details; the customer's trail records the denial. An
    /// op this process does not know is simply not found.
    fn refuse_output(&self, op_id: &str, actor: &str, action: &str, why: NotMoved, out: Outbox) {
        let refusal = match why {
            NotMoved::Unknown => {
                self.send_all(vec![not_found(op_id)], out);
                return;
            }
            NotMoved::Refused(e) => e.to_api_error(op_id),
        };
        tracing::info!(op = %op_id, action, "refused: {}", refusal.message);
        let error = no_held_output(op_id).details(refusal.details.clone());
        self.record(
            Entry::new(
                "denied",
                actor,
                json!({
                    "action": action,
                    "reason": error.code.as_str(),
                    "message": refusal.message,
                    "state": refusal.details["state"],
                    "event": refusal.details["event"],
                }),
            )
            .op(op_id),
        );
        let refused = ToGateway::OpRefused {
            op_id: op_id.to_string(),
            error,
        };
        self.send_all(vec![refused], out);
    }
}
