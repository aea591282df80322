//! One-off ops: request, customer approval of command and output, dispatch to the agent,
//! results. The op's record survives restarts; held output never reaches the gateway's store
//! or log (an approver's preview is fetched from the appliance and passed through).

use crate::{
    audit::Subject,
    grants,
    identity::{random_hex, Caller},
    server::Gateway,
    store::{ApplianceRow, OpRow, StoreError},
};
use endpoint_types::{
    api::Role,
    control::{OpRecord, OpRequest, OpState},
    frame::{OpDispatch, OpFinished, OutputStream, ToAgent, ToGateway},
    lifecycle::{self, op_error, OpEvent, TransitionError},
    policy::Policy,
    ApiError, ErrorCode,
};
use std::{sync::Arc, time::Duration};

#[path = "ops_previews.rs"]
mod previews;
pub use previews::{preview, Previews};

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
const TIMEOUT_MIN: Duration = Duration::from_secs(1);
const TIMEOUT_MAX: Duration = Duration::from_secs(86_400);
/// Ops appear in approvals and records with at most this much of their command.
const COMMAND_MAX: usize = 16 * 1024;

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
    }
}

async fn load(gw: &Gateway, caller: &Caller, id: &str) -> Result<(OpRow, ApplianceRow), ApiError> {
    let nf = || {
        ApiError::new(ErrorCode::NotFound, format!("no op {id}"))
            .hint("ops are named op_…; `postern approvals list` shows waiting ones")
    };
    let row = gw
        .store
        .get_op(id)
        .await
        .map_err(internal)?
        .ok_or_else(nf)?;
    let appliance = gw
        .store
        .get_appliance(&row.appliance_id)
        .await
        .map_err(internal)?
        .ok_or_else(nf)?;
    if !caller.sees_customer(&appliance.customer) {
        return Err(nf());
    }
    Ok((row, appliance))
}

pub async fn get(gw: &Gateway, caller: &Caller, id: &str) -> Result<OpRecord, ApiError> {
    let (row, appliance) = load(gw, caller, id).await?;
    Ok(record(&row, &appliance))
}

pub async fn list_rows(
    gw: &Gateway,
    caller: &Caller,
) -> Result<Vec<(OpRow, ApplianceRow)>, ApiError> {
    let mut out = Vec::new();
    for row in gw.store.list_ops().await.map_err(internal)? {
        if let Some(a) = gw
            .store
            .get_appliance(&row.appliance_id)
            .await
            .map_err(internal)?
        {
            if caller.sees_customer(&a.customer) {
                out.push((row, a));
            }
        }
    }
    Ok(out)
}

pub async fn create(
    gw: &Arc<Gateway>,
    caller: &Caller,
    req: OpRequest,
) -> Result<OpRecord, ApiError> {
    caller.require(&[Role::Admin, Role::Operator], "run ops")?;
    let command = req.command.trim().to_string();
    if command.is_empty() || command.len() > COMMAND_MAX {
        return Err(ApiError::invalid("the command is empty or too long")
            .hint(format!("e.g. --command \"{} …\"", req.tool.as_str())));
    }
    if command.split_whitespace().next() != Some(req.tool.as_str()) {
        return Err(ApiError::invalid(format!(
            "the command must start with `{}`",
            req.tool.as_str()
        ))
        .hint(format!(
            "an `ops {}` command runs {} and nothing else, e.g. --command \"{} …\"",
            req.tool.as_str(),
            req.tool.as_str(),
            req.tool.as_str()
        )));
    }
    let timeout = req
        .timeout_s
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    if timeout < TIMEOUT_MIN || timeout > TIMEOUT_MAX {
        return Err(ApiError::invalid("the timeout is outside 1s–24h").hint("e.g. --timeout 5m"));
    }
    let appliance = gw
        .store
        .find_appliance(&req.app, &req.customer)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!(
                    "no appliance for app {} and customer {}",
                    req.app, req.customer
                ),
            )
            .hint("`postern appliance list` shows the registered appliances")
        })?;
    caller.require_customer(&appliance.customer)?;
    let now = crate::store::now();
    let grant = grants::require_operate(gw, &appliance, now).await?;
    let link = gw.agents.get(&appliance.id).ok_or_else(|| {
        ApiError::new(
            ErrorCode::ApplianceOffline,
            format!(
                "appliance {} ({}/{}) is offline",
                appliance.id, appliance.app, appliance.customer
            ),
        )
        .hint("the agent in the appliance is not connected; check `postern appliance list`")
    })?;
    let Some(resource) = link.resource(&req.origin_resource_id) else {
        let known: Vec<&str> = link.resources.iter().map(|r| r.id.as_str()).collect();
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
    // A tool runs only against a resource of its kind (the agent checks again).
    if let Some((message, hint)) = resource
        .kind
        .op_tool_mismatch(req.tool.as_str(), &resource.id)
    {
        let error = ApiError::new(ErrorCode::InvalidOriginResourceId, message)
            .hint(hint)
            .details(serde_json::json!({"origin_resource_id": resource.id, "kind": resource.kind, "tool": req.tool, "tools": resource.kind.op_tools()}));
        let subject = Subject {
            appliance_id: Some(appliance.id.clone()),
            ..Default::default()
        };
        gw.audit
            .record(
                "denied",
                &caller.actor(),
                subject,
                serde_json::json!({
                    "action": "op", "code": error.code, "reason": error.message, "tool": req.tool,
                    "origin_resource_id": resource.id, "command": command,
                }),
            )
            .await;
        return Err(error);
    }
    let mut row = OpRow {
        id: format!("op_{}", random_hex(8)),
        appliance_id: appliance.id.clone(),
        tool: req.tool,
        command,
        origin_resource_id: req.origin_resource_id.clone(),
        timeout,
        state: OpState::PendingApproval,
        requested_by: caller.actor(),
        requested_at: now,
        grant_id: Some(grant.id.clone()),
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
    };
    let auto = grants::automatic_decision(gw, &appliance.id, now).await;
    if let Some((by, _)) = auto {
        row.state = lifecycle::next(row.state, &OpEvent::CommandApproved { by: by.to_string() })
            .map_err(|e| e.to_api_error(&row.id))?;
        row.command_approved_by = Some(by.to_string());
        row.command_approved_at = Some(now);
    }
    gw.store.insert_op(&row).await.map_err(internal)?;
    gw.audit
        .record("op.requested", &caller.actor(), subject(&row), serde_json::json!({
            "tool": row.tool, "command": row.command, "origin_resource_id": row.origin_resource_id,
            "timeout_s": timeout.as_secs(), "grant_id": grant.id,
        }))
        .await;
    match auto {
        Some((by, _)) => {
            gw.audit
                .record(
                    "op.approved",
                    by,
                    subject(&row),
                    serde_json::json!({"stage": "command"}),
                )
                .await;
            dispatch(gw, &row.id).await;
        }
        None => crate::notify::waiting(gw, &appliance.customer, "op", &row.id).await,
    }
    let row = gw
        .store
        .get_op(&row.id)
        .await
        .map_err(internal)?
        .unwrap_or(row);
    Ok(record(&row, &appliance))
}

/// Why an op did not move.
#[derive(Debug)]
enum NotMoved {
    /// The op state machine does not take the event in the op's state (as read just now).
    Refused(TransitionError),
    /// The op is gone, the store failed, or other writers kept winning the compare-and-set.
    Unavailable,
}

/// Moves op `id` by the event `event_for` picks for its current state, through the op state
/// machine, and writes it with a compare-and-set on the state it read (re-reading first so
/// streamed output is kept). `change` sets the fields that go with the move; the new state is
/// the machine's. A lost race re-reads and asks the machine again.
async fn transition(
    gw: &Gateway,
    id: &str,
    event_for: impl Fn(&OpRow) -> OpEvent,
    change: impl Fn(&mut OpRow),
) -> Result<OpRow, NotMoved> {
    for _ in 0..3 {
        let row = match gw.store.get_op(id).await {
            Ok(Some(row)) => row,
            Ok(None) => return Err(NotMoved::Unavailable),
            Err(e) => {
                tracing::error!(op = %id, error = %e, "cannot read op");
                return Err(NotMoved::Unavailable);
            }
        };
        let to = lifecycle::next(row.state, &event_for(&row)).map_err(NotMoved::Refused)?;
        let expected = row.state;
        let mut next = row.clone();
        change(&mut next);
        next.state = to;
        match gw.store.update_op(&next, expected).await {
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

/// Sends an approved op to its appliance, after checking at this moment that its grant is
/// live and, for a window approval, that the window is still open.
pub async fn dispatch(gw: &Gateway, id: &str) {
    let Ok(Some(row)) = gw.store.get_op(id).await else {
        return;
    };
    if row.state != OpState::Approved {
        return;
    }
    let Ok(Some(appliance)) = gw.store.get_appliance(&row.appliance_id).await else {
        return;
    };
    let now = crate::store::now();
    let live = grants::require_operate(gw, &appliance, now).await;
    if live
        .as_ref()
        .map(|g| Some(&g.id) != row.grant_id.as_ref())
        .unwrap_or(true)
    {
        let error = ApiError::new(
            ErrorCode::OperateAccessExpired,
            format!("the operate grant op {id} was approved under has ended"),
        )
        .hint(grants::access_hint(&appliance.app, &appliance.customer));
        if transition(
            gw,
            id,
            |_| OpEvent::Expired,
            |o| {
                o.finished_at = Some(now);
                o.error = Some(error.clone());
            },
        )
        .await
        .is_ok()
        {
            gw.audit
                .record(
                    "op.expired",
                    "system:gateway",
                    subject(&row),
                    serde_json::json!({"reason": error.message}),
                )
                .await;
        }
        return;
    }
    let by_policy = row
        .command_approved_by
        .as_deref()
        .is_some_and(|b| b.starts_with("policy:"));
    if by_policy
        && grants::automatic_decision(gw, &appliance.id, now)
            .await
            .is_none()
    {
        // Approved inside a window that has closed since: back to a person.
        if transition(
            gw,
            id,
            |_| OpEvent::PolicyRecheckFailed,
            |o| {
                o.command_approved_by = None;
                o.command_approved_at = None;
            },
        )
        .await
        .is_ok()
        {
            gw.audit
                .record(
                    "op.requeued",
                    "system:gateway",
                    subject(&row),
                    serde_json::json!({"reason": "the approval window closed before dispatch"}),
                )
                .await;
            crate::notify::waiting(gw, &appliance.customer, "op", id).await;
        }
        return;
    }
    let policy = grants::policy_of(gw, &appliance.id).await;
    let hold_output = Policy::parse(&policy)
        .map(|p| p.needs_output_approval(now))
        .unwrap_or(true);
    let (Some(grant_id), Some(approved_by), Some(approved_at)) = (
        row.grant_id.clone(),
        row.command_approved_by.clone(),
        row.command_approved_at,
    ) else {
        return;
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
    });
    // Offline now: it goes out when the agent reconnects.
    if gw.agents.send(&appliance.id, frame) {
        gw.audit
            .record(
                "op.dispatched",
                "system:gateway",
                subject(&row),
                serde_json::json!({"hold_output": hold_output}),
            )
            .await;
    }
}

/// Approved ops of an appliance that never reached it (it was offline): sent after its hello.
pub async fn dispatch_pending(gw: &Gateway, appliance_id: &str) {
    if let Ok(rows) = gw.store.ops_of(appliance_id).await {
        for r in rows.into_iter().filter(|r| r.state == OpState::Approved) {
            dispatch(gw, &r.id).await;
        }
    }
}

/// The agent went away while ops ran: their results cannot arrive any more (held output is
/// kept in the appliance and announced again on reconnect; running ops are not).
pub async fn interrupted(gw: &Gateway, appliance_id: &str) {
    let Ok(rows) = gw.store.ops_of(appliance_id).await else {
        return;
    };
    let now = crate::store::now();
    for r in rows.into_iter().filter(|r| r.state == OpState::Running) {
        let error = ApiError::new(ErrorCode::ApplianceOffline, "the appliance disconnected while the op ran; its result was lost")
            .hint("check the appliance's own audit trail for the outcome, then run the op again if needed");
        let moved = transition(
            gw,
            &r.id,
            |_| OpEvent::AgentLost,
            |o| {
                o.finished_at = Some(now);
                o.error = Some(error.clone());
            },
        )
        .await;
        if moved.is_ok() {
            gw.audit
                .record(
                    "op.interrupted",
                    "system:gateway",
                    subject(&r),
                    serde_json::json!({"reason": "agent disconnected"}),
                )
                .await;
        }
    }
}

/// Frames about ops from an agent. An agent can only ever affect its own appliance's ops.
pub async fn on_agent_frame(gw: &Gateway, appliance_id: &str, frame: ToGateway) {
    let op_id = match &frame {
        ToGateway::OpStarted { op_id }
        | ToGateway::OpOutput { op_id, .. }
        | ToGateway::OpRefused { op_id, .. } => op_id.clone(),
        ToGateway::OpFinished(f) => f.op_id.clone(),
        _ => return,
    };
    let Ok(Some(row)) = gw.store.get_op(&op_id).await else {
        return tracing::warn!(appliance = %appliance_id, op = %op_id, "agent reported on an unknown op");
    };
    if row.appliance_id != appliance_id {
        return tracing::warn!(appliance = %appliance_id, op = %op_id, "agent reported on another appliance's op; ignored");
    }
    let actor = format!("agent:{appliance_id}");
    let now = crate::store::now();
    match frame {
        ToGateway::OpStarted { .. } => {
            let moved = transition(
                gw,
                &op_id,
                |_| OpEvent::Started,
                |o| o.started_at = Some(now),
            )
            .await;
            if moved.is_ok() {
                gw.audit
                    .record("op.started", &actor, subject(&row), serde_json::json!({}))
                    .await;
            }
        }
        ToGateway::OpOutput {
            stream,
            data,
            preview: true,
            ..
        } => gw.previews.push(&op_id, stream, &data),
        ToGateway::OpOutput {
            stream,
            data,
            preview: false,
            ..
        } => {
            let (out, err) = match stream {
                OutputStream::Stdout => (data.as_str(), ""),
                OutputStream::Stderr => ("", data.as_str()),
            };
            match gw.store.append_op_output(&op_id, out, err).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(op = %op_id, "output for an op that is not producing output: dropped")
                }
                Err(e) => tracing::error!(op = %op_id, error = %e, "cannot store op output"),
            }
        }
        ToGateway::OpFinished(f) if f.preview => {
            gw.previews.finish(&op_id, Ok(&f));
        }
        ToGateway::OpFinished(f) if f.destroyed => {
            gw.audit
                .record(
                    "output.destroyed",
                    &actor,
                    subject(&row),
                    serde_json::json!({}),
                )
                .await;
        }
        ToGateway::OpFinished(f) if f.held => {
            // The agent announces held output again after every reconnect; the machine refuses
            // a repeat (the op already holds output), so it is a no-op.
            let held = OpEvent::Finished {
                exit_code: finished_exit_code(&f),
                output_held: true,
            };
            let moved =
                transition(gw, &op_id, |_| held.clone(), |o| o.finished_at = Some(now)).await;
            if moved.is_ok() {
                gw.audit
                    .record(
                        "op.finished",
                        &actor,
                        subject(&row),
                        serde_json::json!({"held": true}),
                    )
                    .await;
                if let Ok(Some(a)) = gw.store.get_appliance(appliance_id).await {
                    crate::notify::waiting(gw, &a.customer, "op", &op_id).await;
                }
            }
        }
        ToGateway::OpFinished(f) => {
            let exit_code = finished_exit_code(&f);
            // The end of a run, or (for an op holding output) the released result.
            let event = |o: &OpRow| match (o.state, f.timed_out) {
                (_, true) => OpEvent::TimedOut,
                (OpState::OutputPendingApproval, false) => OpEvent::OutputReleased {
                    by: o
                        .output_approved_by
                        .clone()
                        .unwrap_or_else(|| actor.clone()),
                    exit_code,
                },
                _ => OpEvent::Finished {
                    exit_code,
                    output_held: false,
                },
            };
            let moved = transition(gw, &op_id, event, |o| {
                o.exit_code = f.exit_code;
                // The store may have cut the output at its cap already.
                o.truncated = o.truncated || f.truncated;
                o.error = f.error.clone();
                o.finished_at.get_or_insert(now);
            })
            .await;
            if let Ok(moved) = moved {
                let state = moved.state;
                let released = moved.output_approved_at.is_some();
                let kind = if released {
                    "output.released"
                } else {
                    "op.finished"
                };
                gw.audit
                    .record(kind, &actor, subject(&row), serde_json::json!({
                        "state": state.as_str(), "exit_code": f.exit_code, "truncated": f.truncated, "timed_out": f.timed_out,
                    }))
                    .await;
            }
        }
        ToGateway::OpRefused { error, .. } => {
            if gw.previews.finish(&op_id, Err(error.clone())) {
                return;
            }
            let event = if error.code == ErrorCode::ApprovalDenied {
                OpEvent::AgentDenied
            } else {
                OpEvent::AgentRefused
            };
            if transition(
                gw,
                &op_id,
                |_| event.clone(),
                |o| {
                    o.finished_at = Some(now);
                    o.error = Some(error.clone());
                },
            )
            .await
            .is_ok()
            {
                gw.audit
                    .record("denied", &actor, subject(&row), serde_json::json!({"action": "op", "code": error.code, "reason": error.message}))
                    .await;
            }
        }
        _ => {}
    }
}

/// The exit code an agent's end report stands for in the op machine: the command's own, or
/// non-zero when it reported an error or no code (then it did not succeed).
fn finished_exit_code(f: &OpFinished) -> i64 {
    match (f.exit_code, &f.error) {
        (Some(0), Some(_)) | (None, _) => -1,
        (Some(code), _) => code,
    }
}

/// A customer approver's decision on the command or, once it ran, on its held output. An op
/// that waits for neither (running, ended) is not changed: CONFLICT, audited as `denied`.
pub async fn decide(
    gw: &Gateway,
    caller: &Caller,
    id: &str,
    approve: bool,
    message: Option<String>,
) -> Result<OpRecord, ApiError> {
    let (row, appliance) = load(gw, caller, id).await?;
    caller.require_customer(&appliance.customer)?;
    let now = crate::store::now();
    let who = caller.actor();
    let action = if approve { "approve" } else { "deny" };
    // Which decision this is depends on the op's stage, read again on every attempt.
    let event = |o: &OpRow| match (o.state, approve) {
        (OpState::OutputPendingApproval, true) => OpEvent::OutputApproved { by: who.clone() },
        (OpState::OutputPendingApproval, false) => OpEvent::OutputDenied {
            by: who.clone(),
            message: message.clone(),
        },
        (_, true) => OpEvent::CommandApproved { by: who.clone() },
        (_, false) => OpEvent::CommandDenied {
            by: who.clone(),
            message: message.clone(),
        },
    };
    if row.state == OpState::OutputPendingApproval && approve {
        if let Some(by) = &row.output_approved_by {
            let err = ApiError::new(ErrorCode::Conflict, format!("the output of op {id} was already released by {by}"))
                .hint(format!("the appliance sends it; `postern ops wait {id}` shows it once there"))
                .details(serde_json::json!({"id": id, "record": "op", "state": row.state.as_str(), "event": "output-approved", "ended": false}));
            return Err(
                crate::approvals::refused(&gw.audit, caller, subject(&row), action, err).await,
            );
        }
        if !gw.agents.is_online(&row.appliance_id) {
            return Err(ApiError::new(
                ErrorCode::ApplianceOffline,
                "the held output is in the appliance, which is offline",
            )
            .hint("approve again once the appliance is online"));
        }
    }
    let moved = transition(gw, id, &event, |o| match event(o) {
        OpEvent::CommandApproved { .. } => {
            o.command_approved_by = Some(who.clone());
            o.command_approved_at = Some(now);
        }
        OpEvent::OutputApproved { .. } => {
            o.output_approved_by = Some(who.clone());
            o.output_approved_at = Some(now);
        }
        OpEvent::CommandDenied { .. } => {
            o.message = message.clone();
            o.finished_at = Some(now);
        }
        _ => o.message = message.clone(),
    })
    .await;
    let moved = match moved {
        Ok(moved) => moved,
        Err(NotMoved::Refused(e)) => {
            return Err(crate::approvals::refused(
                &gw.audit,
                caller,
                subject(&row),
                action,
                e.to_api_error(id),
            )
            .await)
        }
        Err(NotMoved::Unavailable) => {
            let err = ApiError::new(
                ErrorCode::Conflict,
                format!("op {id} kept changing while this request was deciding it"),
            )
            .hint(format!(
                "look at it again (`postern ops get {id}`) and repeat if it still applies"
            ))
            .details(
                serde_json::json!({"id": id, "record": "op", "event": action, "ended": false}),
            );
            return Err(
                crate::approvals::refused(&gw.audit, caller, subject(&row), action, err).await,
            );
        }
    };
    match moved.state {
        OpState::Approved => {
            gw.audit
                .record(
                    "op.approved",
                    &who,
                    subject(&row),
                    serde_json::json!({"stage": "command", "command": row.command}),
                )
                .await;
            dispatch(gw, id).await;
        }
        OpState::OutputPendingApproval => {
            gw.audit
                .record(
                    "output.approved",
                    &who,
                    subject(&row),
                    serde_json::json!({}),
                )
                .await;
            gw.agents.send(
                &row.appliance_id,
                ToAgent::OutputRelease {
                    op_id: id.to_string(),
                    approved_by: who.clone(),
                },
            );
        }
        // Denied at the output stage: the held output is destroyed in the appliance.
        OpState::Denied if moved.command_approved_at.is_some() => {
            gw.audit
                .record(
                    "output.denied",
                    &who,
                    subject(&row),
                    serde_json::json!({"message": message}),
                )
                .await;
            gw.agents.send(
                &row.appliance_id,
                ToAgent::OutputDestroy {
                    op_id: id.to_string(),
                    denied_by: who.clone(),
                    message,
                },
            );
        }
        _ => {
            gw.audit
                .record(
                    "op.denied",
                    &who,
                    subject(&row),
                    serde_json::json!({"stage": "command", "message": message}),
                )
                .await;
        }
    }
    get(gw, caller, id).await
}

/// The approver's view of a waiting op.
pub fn approval_item(
    row: &OpRow,
    appliance: &ApplianceRow,
) -> Option<endpoint_types::control::ApprovalItem> {
    use endpoint_types::control::{ApprovalItem, ApprovalKind, ApprovalStage};
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
            "requested_at": row.requested_at, "grant_id": row.grant_id,
        }),
    })
}
