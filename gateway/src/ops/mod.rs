//! One-off ops: request, customer approval of command and output, dispatch to the agent,
//! results. The op's record survives restarts; held output never reaches the gateway's store
//! or log (an approver's preview is fetched from the appliance and passed through).
//!
//! [`Ops`] is the service. It takes what it needs as ports: an [`OpStore`], an audit sink, a
//! clock, the connected agents, the approval notifier and the grants gate. Every move of an op
//! goes through the op state machine ([`endpoint_types::lifecycle::next`]).

mod agent_frames;
mod create;
mod decide;
mod dispatch;
pub mod list_filter;
#[cfg(test)]
mod memory_store;
mod previews;
mod store;
#[cfg(test)]
mod tests;

pub use previews::Previews;
pub use store::OpStore;

use crate::{
    audit::Subject,
    identity::Caller,
    lookup,
    ports::{AgentPort, AuditSink, Clock, GrantGate, Notifier},
    store::{ApplianceRow, OpRow, StoreError},
};
use endpoint_types::{
    control::{ApprovalItem, ApprovalKind, ApprovalStage, OpRecord, OpState},
    lifecycle::{self, op_error, OpEvent, TransitionError},
    ApiError, ErrorCode,
};
use jiff::Timestamp;
use std::{sync::Arc, time::Duration};

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an approver waits for the appliance to send held output.
pub const PREVIEW_WAIT: Duration = Duration::from_secs(30);
/// The actor of what the gateway does by itself.
const SYSTEM: &str = "system:gateway";

/// The ops service.
pub struct Ops {
    store: Arc<dyn OpStore>,
    audit: Arc<dyn AuditSink>,
    clock: Arc<dyn Clock>,
    agents: Arc<dyn AgentPort>,
    notifier: Arc<dyn Notifier>,
    grants: Arc<dyn GrantGate>,
    /// Held output on its way to an approver's screen.
    previews: Previews,
    preview_wait: Duration,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops")
            .field("previews", &self.previews)
            .field("preview_wait", &self.preview_wait)
            .finish_non_exhaustive()
    }
}

impl Ops {
    pub fn new(
        store: Arc<dyn OpStore>,
        audit: Arc<dyn AuditSink>,
        clock: Arc<dyn Clock>,
        agents: Arc<dyn AgentPort>,
        notifier: Arc<dyn Notifier>,
        grants: Arc<dyn GrantGate>,
    ) -> Ops {
        Ops {
            store,
            audit,
            clock,
            agents,
            notifier,
            grants,
            previews: Previews::default(),
            preview_wait: PREVIEW_WAIT,
        }
    }

    /// How long [`Ops::preview`] waits for the appliance (tests shorten it).
    pub fn with_preview_wait(mut self, wait: Duration) -> Ops {
        self.preview_wait = wait;
        self
    }

    /// Now, at the store's precision (see [`Clock::stored_now`]).
    fn now(&self) -> Timestamp {
        self.clock.stored_now()
    }

    /// The op and its appliance, if the caller may see them; NOT_FOUND otherwise (an op of a
    /// customer the caller does not see does not exist for it).
    pub(crate) async fn load(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(OpRow, ApplianceRow), ApiError> {
        let nf = || {
            ApiError::new(ErrorCode::NotFound, format!("no op {id}"))
                .hint("ops are named op_…; `postern approvals list` shows waiting ones")
        };
        let row = lookup::found(self.store.get_op(id).await, nf)?;
        let appliance = self.store.get_appliance(&row.appliance_id).await;
        Ok((row, lookup::seen_by(caller, appliance, nf)?))
    }

    pub async fn get(&self, caller: &Caller, id: &str) -> Result<OpRecord, ApiError> {
        let (row, appliance) = self.load(caller, id).await?;
        Ok(record(&row, &appliance))
    }

    /// The ops the caller may see with their appliances, oldest first, in one store query.
    pub async fn list_rows(&self, caller: &Caller) -> Result<Vec<(OpRow, ApplianceRow)>, ApiError> {
        self.store
            .ops_with_appliance(caller.customer_scope())
            .await
            .map_err(internal)
    }

    /// The records of the ops the caller may see, oldest first.
    pub async fn list(&self, caller: &Caller) -> Result<Vec<OpRecord>, ApiError> {
        Ok(self
            .list_rows(caller)
            .await?
            .iter()
            .map(|(r, a)| record(r, a))
            .collect())
    }

    /// Moves op `id` by the event `event_for` picks for its current state, through the op state
    /// machine, and writes it with a compare-and-set on the state it read (re-reading first so
    /// streamed output is kept). `change` sets the fields that go with the move; the new state
    /// is the machine's. A lost race re-reads and asks the machine again.
    async fn transition(
        &self,
        id: &str,
        event_for: impl Fn(&OpRow) -> OpEvent,
        change: impl Fn(&mut OpRow),
    ) -> Result<OpRow, NotMoved> {
        for _ in 0..3 {
            let row = match self.store.get_op(id).await {
                Ok(Some(row)) => row,
                Ok(None) => return Err(NotMoved::Unavailable),
                Err(e) => {
                    tracing::error!(op = %id, error = %e, "cannot read op");
                    return Err(NotMoved::Unavailable);
                }
            };
            let to = lifecycle::next(row.state, &event_for(&row)).map_err(NotMoved::Refused)?;
            let expected = row.state;
            let mut next = row;
            change(&mut next);
            next.state = to;
            match self.store.update_op(&next, expected).await {
                Ok(true) => return Ok(next),
                Ok(false) => continue,
                Err(e) => {
                    tracing::error!(op = %id, error = %e, "cannot update op");
                    return Err(NotMoved::Unavailable);
                }
            }
        }
        Err(NotMoved::Unavailable)
    }
}

/// Why an op did not move.
#[derive(Debug)]
enum NotMoved {
    /// The op state machine does not take the event in the op's state (as read just now).
    Refused(TransitionError),
    /// The op is gone, the store failed, or other writers kept winning the compare-and-set.
    Unavailable,
}

fn internal(e: StoreError) -> ApiError {
    ApiError::internal(e.to_string())
}

fn subject(row: &OpRow) -> Subject {
    Subject {
        appliance_id: Some(row.appliance_id.clone()),
        op_id: Some(row.id.clone()),
        ..Default::default()
    }
}

/// The op as the API shows it. Held output is never in it (the store never has it).
pub fn record(row: &OpRow, appliance: &ApplianceRow) -> OpRecord {
    let error = row.error.clone().or_else(|| {
        op_error(
            row.state,
            row.exit_code,
            row.stderr.as_deref(),
            row.message.as_deref(),
        )
    });
    OpRecord {
        id: row.id.clone(),
        state: row.state,
        tool: row.tool,
        command: row.command.clone(),
        timeout_s: row.timeout.as_secs(),
        exit_code: row.exit_code,
        stdout: row.stdout.clone(),
        stderr: row.stderr.clone(),
        truncated: row.truncated,
        appliance_id: row.appliance_id.clone(),
        app: appliance.app.clone(),
        customer: appliance.customer.clone(),
        origin_resource_id: row.origin_resource_id.clone(),
        requested_by: row.requested_by.clone(),
        requested_at: row.requested_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
        error: if row.state.is_final() { error } else { None },
        requested_by_id: row.requested_by_id.clone(),
        phase: row.phase,
    }
}

/// The approver's view of a waiting op; `None` for an op that waits for no decision.
pub fn approval_item(row: &OpRow, appliance: &ApplianceRow) -> Option<ApprovalItem> {
    let stage = match row.state {
        OpState::PendingApproval => ApprovalStage::Command,
        OpState::OutputPendingApproval => ApprovalStage::Output,
        _ => return None,
    };
    Some(ApprovalItem {
        id: row.id.clone(),
        kind: ApprovalKind::Op,
        stage,
        appliance_id: row.appliance_id.clone(),
        app: appliance.app.clone(),
        customer: appliance.customer.clone(),
        requested_by: row.requested_by.clone(),
        requested_at: row.requested_at,
        summary: match stage {
            ApprovalStage::Command => {
                format!("run `{}` on {}", row.command, row.origin_resource_id)
            }
            ApprovalStage::Output => format!("release the output of `{}`", row.command),
        },
        request: serde_json::json!({
            "tool": row.tool, "command": row.command, "origin_resource_id": row.origin_resource_id,
            "timeout_s": row.timeout.as_secs(), "appliance_id": row.appliance_id, "requested_by": row.requested_by,
            "requested_at": row.requested_at, "grant_id": row.grant_id, "phase": row.phase.as_str(),
        }),
    })
}
