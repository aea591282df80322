//! What an agent reports about its ops, and what the service makes of it.

use super::*;
use crate::store::OP_OUTPUT_CAP;

fn started(op_id: &str) -> Frame {
    Frame::OpStarted {
        op_id: op_id.into(),
    }
}

#[tokio::test]
async fn started_output_and_finished_complete_the_op_with_its_output() {
    let w = World::automatic();
    let op = w.create().await;
    w.clock.advance(Duration::from_secs(2));
    w.agent_says([started(&op.id)]).await;
    assert_eq!(w.state(&op.id), OpState::Running);
    assert_eq!(
        w.op(&op.id).started_at,
        Some(t0() + SignedDuration::from_secs(2))
    );

    w.clock.advance(Duration::from_secs(3));
    w.agent_says([
        output(&op.id, OutputStream::Stdout, "NAME  READY\n"),
        output(&op.id, OutputStream::Stderr, "warning\n"),
        output(&op.id, OutputStream::Stdout, "web-1 1/1\n"),
        Frame::OpFinished(finished(&op.id, Some(0))),
    ])
    .await;

    let record = w.ops.get(&operator(), &op.id).await.unwrap();
    assert_eq!(record.state, OpState::Completed);
    assert_eq!(record.exit_code, Some(0));
    assert_eq!(record.stdout.as_deref(), Some("NAME  READY\nweb-1 1/1\n"));
    assert_eq!(record.stderr.as_deref(), Some("warning\n"));
    assert!(!record.truncated);
    assert!(record.error.is_none());
    assert_eq!(
        record.finished_at,
        Some(t0() + SignedDuration::from_secs(5))
    );
    assert_eq!(
        w.kinds(),
        [
            "op.requested",
            "op.approved",
            "op.dispatched",
            "op.started",
            "op.finished"
        ]
    );
    let fin = &w.audit.of_kind("op.finished")[0];
    assert_eq!(fin.actor, format!("agent:{ACME}"));
    assert_eq!(fin.detail["state"], "completed");
}

#[tokio::test]
async fn a_failing_command_fails_and_one_past_its_timeout_times_out() {
    let w = World::automatic();
    w.seed("op_fail", OpState::Running);
    w.seed("op_slow", OpState::Running);
    let error = ApiError::new(ErrorCode::CommandFailed, "the command exited with code 2");
    w.agent_says([
        output("op_fail", OutputStream::Stderr, "not found\n"),
        Frame::OpFinished(OpFinished {
            error: Some(error.clone()),
            ..finished("op_fail", Some(2))
        }),
        Frame::OpFinished(OpFinished {
            timed_out: true,
            ..finished("op_slow", None)
        }),
    ])
    .await;

    let failed = w.ops.get(&operator(), "op_fail").await.unwrap();
    assert_eq!(failed.state, OpState::Failed);
    assert_eq!(failed.exit_code, Some(2));
    assert_eq!(failed.error, Some(error));
    let slow = w.ops.get(&operator(), "op_slow").await.unwrap();
    assert_eq!(slow.state, OpState::TimedOut);
    assert_eq!(slow.error.unwrap().code, ErrorCode::CommandTimeout);
}

#[tokio::test]
async fn output_is_capped_and_the_op_stays_truncated_after_its_end() {
    let w = World::automatic();
    w.seed("op_big", OpState::Running);
    let chunk = "x".repeat(OP_OUTPUT_CAP / 2 + 1);
    w.agent_says([
        output("op_big", OutputStream::Stdout, &chunk),
        output("op_big", OutputStream::Stdout, &chunk),
        output("op_big", OutputStream::Stdout, "more"),
    ])
    .await;
    let row = w.op("op_big");
    assert_eq!(row.stdout.as_ref().map(String::len), Some(OP_OUTPUT_CAP));
    assert!(row.truncated);

    // The agent's own end report does not know the gateway cut the output: still truncated.
    w.agent_says([Frame::OpFinished(finished("op_big", Some(0)))])
        .await;
    let record = w.ops.get(&operator(), "op_big").await.unwrap();
    assert_eq!(record.state, OpState::Completed);
    assert!(record.truncated);
}

#[tokio::test]
async fn output_for_an_op_that_is_not_producing_output_is_dropped() {
    let w = World::automatic();
    w.seed("op_approved", OpState::Approved);
    w.seed("op_done", OpState::Running);
    w.agent_says([Frame::OpFinished(finished("op_done", Some(0)))])
        .await;
    w.agent_says([
        output("op_approved", OutputStream::Stdout, "early"),
        output("op_done", OutputStream::Stdout, "late"),
        output("op_unknown", OutputStream::Stdout, "forged"),
    ])
    .await;
    assert_eq!(w.op("op_approved").stdout, None);
    assert_eq!(w.op("op_done").stdout, None);
    assert_eq!(w.store.all_ops().len(), 2);
}

#[tokio::test]
async fn an_agent_cannot_touch_another_appliances_op() {
    let w = World::automatic();
    let mut globex = w.seed("op_globex", OpState::Running);
    globex.appliance_id = GLOBEX.into();
    w.store.put_op(globex.clone());
    w.agent_says([
        output("op_globex", OutputStream::Stdout, "injected"),
        Frame::OpFinished(finished("op_globex", Some(0))),
        Frame::OpRefused {
            op_id: "op_globex".into(),
            error: ApiError::new(ErrorCode::CommandFailed, "no"),
        },
    ])
    .await;
    assert_eq!(w.op("op_globex"), globex);
    assert!(w.kinds().is_empty());
}

#[tokio::test]
async fn an_ended_op_takes_no_further_report() {
    let w = World::automatic();
    w.seed("op_1", OpState::Running);
    w.agent_says([Frame::OpFinished(finished("op_1", Some(0)))])
        .await;
    let ended = w.op("op_1");
    w.clock.advance(Duration::from_secs(60));
    w.agent_says([
        started("op_1"),
        Frame::OpFinished(finished("op_1", Some(1))),
        Frame::OpFinished(OpFinished {
            held: true,
            ..finished("op_1", Some(0))
        }),
        Frame::OpRefused {
            op_id: "op_1".into(),
            error: ApiError::new(ErrorCode::CommandFailed, "no"),
        },
    ])
    .await;
    assert_eq!(w.op("op_1"), ended);
    assert_eq!(w.kinds(), ["op.finished"]);
}

#[tokio::test]
async fn the_agent_refusing_fails_the_op_and_a_policy_denial_denies_it() {
    let w = World::automatic();
    w.seed("op_refused", OpState::Approved);
    w.seed("op_denied", OpState::Approved);
    w.agent_says([
        Frame::OpRefused {
            op_id: "op_refused".into(),
            error: ApiError::new(
                ErrorCode::OperateAccessRequired,
                "no live grant at the agent",
            ),
        },
        Frame::OpRefused {
            op_id: "op_denied".into(),
            error: ApiError::new(ErrorCode::ApprovalDenied, "a person must approve"),
        },
    ])
    .await;
    let refused = w.op("op_refused");
    assert_eq!(refused.state, OpState::Failed);
    assert_eq!(
        refused.error.unwrap().code,
        ErrorCode::OperateAccessRequired
    );
    assert_eq!(w.state("op_denied"), OpState::Denied);
    let denied = w.audit.of_kind("denied");
    assert_eq!(denied.len(), 2);
    assert_eq!(denied[0].actor, format!("agent:{ACME}"));
    assert_eq!(denied[0].detail["action"], "op");
}

#[tokio::test]
async fn held_output_waits_for_a_person_and_a_repeat_announcement_changes_nothing() {
    let w = World::manual();
    w.seed("op_held", OpState::Running);
    let held = Frame::OpFinished(OpFinished {
        held: true,
        ..finished("op_held", Some(0))
    });
    w.agent_says([held.clone()]).await;
    let row = w.op("op_held");
    assert_eq!(row.state, OpState::OutputPendingApproval);
    assert_eq!(row.finished_at, Some(t0()));
    assert_eq!(
        row.exit_code, None,
        "held with the output, in the appliance"
    );
    assert_eq!(
        w.notified(),
        [("acme".to_string(), "op".to_string(), "op_held".to_string())]
    );

    // Announced again after a reconnect.
    w.clock.advance(Duration::from_secs(60));
    w.agent_says([held]).await;
    assert_eq!(w.op("op_held"), row);
    assert_eq!(w.notified().len(), 1);
    assert_eq!(w.kinds(), ["op.finished"]);
}
