//! Dispatch at the moment it happens (grant and approval checked again), dispatch after a
//! reconnect, and ops cut short by a disconnect.

use super::*;

#[tokio::test]
async fn an_approved_op_whose_grant_ended_by_the_clock_expires_instead_of_running() {
    let w = World::manual();
    let op = w.create().await;
    // The approver decides after the 30-minute grant has run out.
    w.clock.advance(Duration::from_secs(31 * 60));
    let decided = w
        .ops
        .decide(&approver("acme"), &op.id, true, None)
        .await
        .unwrap();

    assert_eq!(decided.state, OpState::Expired);
    let error = decided.error.unwrap();
    assert_eq!(error.code, ErrorCode::OperateAccessExpired);
    assert!(
        error
            .hint
            .contains("postern access request --app shop --customer acme"),
        "{}",
        error.hint
    );
    let row = w.op(&op.id);
    assert_eq!(row.finished_at, Some(t0() + minutes(31)));
    assert!(
        w.sent().is_empty(),
        "nothing reaches the agent without a live grant"
    );
    assert_eq!(w.kinds(), ["op.requested", "op.approved", "op.expired"]);
    assert_eq!(w.audit.of_kind("op.expired")[0].actor, "system:gateway");
}

#[tokio::test]
async fn an_op_approved_under_another_grant_than_the_live_one_expires() {
    let w = World::automatic();
    w.seed("op_old", OpState::Approved);
    w.grants.set_grant(Some(operate_grant("gr_2", ACME)));
    w.ops.dispatch("op_old").await;
    assert_eq!(w.state("op_old"), OpState::Expired);
    assert!(w.sent().is_empty());
}

#[tokio::test]
async fn a_window_approval_that_closed_before_dispatch_goes_back_to_a_person() {
    let w = World::new(window_policy());
    // 10:00, inside the window: approved by the policy, but the agent drops before dispatch.
    let mut row = w.seed("op_w", OpState::Approved);
    row.command_approved_by = Some("policy:window".into());
    w.store.put_op(row);
    w.agents.disconnect(ACME);
    w.ops.dispatch("op_w").await;
    assert_eq!(w.state("op_w"), OpState::Approved);
    assert!(w.kinds().is_empty(), "not sent, so not dispatched");

    // It reconnects at 11:05, after the window closed: a person decides again.
    w.clock.advance(Duration::from_secs(65 * 60));
    w.grants.set_grant(Some(GrantRow {
        expires_at: None,
        ..operate_grant("gr_1", ACME)
    }));
    w.agents.connect(ACME, agent_view());
    w.ops.dispatch_pending(ACME).await;

    let row = w.op("op_w");
    assert_eq!(row.state, OpState::PendingApproval);
    assert_eq!(row.command_approved_by, None);
    assert_eq!(row.command_approved_at, None);
    assert!(w.sent().is_empty());
    assert_eq!(w.kinds(), ["op.requeued"]);
    assert_eq!(
        w.notified(),
        [("acme".to_string(), "op".to_string(), "op_w".to_string())]
    );
}

#[tokio::test]
async fn inside_a_window_output_is_released_with_the_command_and_held_outside_it() {
    let w = World::new(window_policy());
    let op = w.create().await;
    assert_eq!(
        w.op(&op.id).command_approved_by.as_deref(),
        Some("policy:window")
    );
    let sent = w.sent();
    let [Frame::OpDispatch(d)] = sent.as_slice() else {
        panic!("one dispatch, got {sent:?}")
    };
    assert!(!d.hold_output);

    // A person's approval after the window: the output waits for a person too.
    let w2 = World::new(window_policy());
    w2.clock.advance(Duration::from_secs(70 * 60));
    w2.grants.set_grant(Some(GrantRow {
        expires_at: None,
        ..operate_grant("gr_1", ACME)
    }));
    let op = w2.create().await;
    assert_eq!(op.state, OpState::PendingApproval);
    w2.ops
        .decide(&approver("acme"), &op.id, true, None)
        .await
        .unwrap();
    let sent = w2.sent();
    let [Frame::OpDispatch(d)] = sent.as_slice() else {
        panic!("one dispatch, got {sent:?}")
    };
    assert!(d.hold_output);
}

#[tokio::test]
async fn approved_ops_of_an_offline_appliance_go_out_after_it_reconnects() {
    let w = World::manual();
    let op = w.create().await;
    let other = w.seed("op_running", OpState::Running);
    w.agents.disconnect(ACME);
    let decided = w
        .ops
        .decide(&approver("acme"), &op.id, true, None)
        .await
        .unwrap();
    assert_eq!(decided.state, OpState::Approved);
    assert!(w.audit.of_kind("op.dispatched").is_empty());

    w.agents.connect(ACME, agent_view());
    w.ops.dispatch_pending(ACME).await;
    let sent = w.sent();
    let [Frame::OpDispatch(d)] = sent.as_slice() else {
        panic!("only the approved op goes out, got {sent:?}");
    };
    assert_eq!(d.op_id, op.id);
    assert_eq!(d.command_approved_by, "ana@acme");
    assert_eq!(w.audit.of_kind("op.dispatched").len(), 1);
    assert_eq!(w.state(&other.id), OpState::Running);
}

#[tokio::test]
async fn interrupted_fails_the_running_ops_of_the_disconnected_agent_only() {
    let w = World::automatic();
    w.seed("op_run", OpState::Running);
    w.seed("op_held", OpState::OutputPendingApproval);
    w.seed("op_approved", OpState::Approved);
    let mut globex = w.seed("op_globex", OpState::Running);
    globex.appliance_id = GLOBEX.into();
    w.store.put_op(globex);
    w.clock.advance(Duration::from_secs(7));

    w.ops.interrupted(ACME).await;

    let row = w.op("op_run");
    assert_eq!(row.state, OpState::Failed);
    assert_eq!(row.finished_at, Some(t0() + SignedDuration::from_secs(7)));
    assert_eq!(row.error.unwrap().code, ErrorCode::ApplianceOffline);
    // Held output stays in the appliance and is announced again; approved ops wait.
    assert_eq!(w.state("op_held"), OpState::OutputPendingApproval);
    assert_eq!(w.state("op_approved"), OpState::Approved);
    assert_eq!(w.state("op_globex"), OpState::Running);
    assert_eq!(w.kinds(), ["op.interrupted"]);
    assert_eq!(
        w.audit.of_kind("op.interrupted")[0]
            .subject
            .op_id
            .as_deref(),
        Some("op_run")
    );

    // A second disconnect finds nothing left to interrupt.
    w.ops.interrupted(ACME).await;
    assert_eq!(w.kinds(), ["op.interrupted"]);
}
