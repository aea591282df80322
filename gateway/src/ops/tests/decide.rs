//! Customer approvers' decisions on commands and held output, and the held-output preview.

use super::*;

fn preview_output(op_id: &str, stream: OutputStream, data: &str) -> ToGateway {
    ToGateway::OpOutput {
        op_id: op_id.into(),
        stream,
        data: data.into(),
        preview: true,
    }
}

#[tokio::test]
async fn approving_the_command_dispatches_it_with_output_held_under_manual() {
    let w = World::manual();
    let op = w.create().await;
    w.clock.advance(Duration::from_secs(60));
    let decided = w
        .ops
        .decide(&approver("acme"), &op.id, true, None)
        .await
        .unwrap();
    assert_eq!(decided.state, OpState::Approved);
    let row = w.op(&op.id);
    assert_eq!(row.command_approved_by.as_deref(), Some("ana@acme"));
    assert_eq!(row.command_approved_at, Some(t0() + minutes(1)));

    let sent = w.sent();
    let [ToAgent::OpDispatch(d)] = sent.as_slice() else {
        panic!("one dispatch, got {sent:?}");
    };
    assert_eq!(d.command_approved_by, "ana@acme");
    assert!(d.hold_output, "manual approves the output separately");
    assert_eq!(w.kinds(), ["op.requested", "op.approved", "op.dispatched"]);
    let approved = &w.audit.of_kind("op.approved")[0];
    assert_eq!(approved.actor, "ana@acme");
    assert_eq!(approved.detail["command"], "kubectl get pods -n shop");
}

#[tokio::test]
async fn denying_the_command_ends_the_op_with_the_customers_message() {
    let w = World::manual();
    let op = w.create().await;
    let decided = w
        .ops
        .decide(
            &approver("acme"),
            &op.id,
            false,
            Some("not during the freeze".into()),
        )
        .await
        .unwrap();
    assert_eq!(decided.state, OpState::Denied);
    let error = decided.error.unwrap();
    assert_eq!(error.code, ErrorCode::ApprovalDenied);
    assert_eq!(error.message, "not during the freeze");
    assert_eq!(w.op(&op.id).finished_at, Some(t0()));
    assert!(w.sent().is_empty());
    let denied = &w.audit.of_kind("op.denied")[0];
    assert_eq!(denied.detail["stage"], "command");
    assert_eq!(denied.detail["message"], "not during the freeze");
}

#[tokio::test]
async fn deciding_an_op_that_waits_for_nothing_is_a_conflict_audited_as_denied() {
    let w = World::manual();
    let op = w.create().await;
    w.ops
        .decide(&approver("acme"), &op.id, false, None)
        .await
        .unwrap();
    w.seed("op_running", OpState::Running);

    for (id, approve, state, ended) in [
        (op.id.as_str(), true, "denied", true),
        ("op_running", false, "running", false),
    ] {
        let before = w.op(id);
        let e = w
            .ops
            .decide(&approver("acme"), id, approve, None)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Conflict, "{id}");
        assert_eq!(e.details["state"], state);
        assert_eq!(e.details["ended"], ended);
        assert_eq!(w.op(id), before, "{id} did not change");
        let denied = w.audit.of_kind("denied");
        let last = denied.last().unwrap();
        assert_eq!(last.actor, "ana@acme");
        assert_eq!(last.subject.op_id.as_deref(), Some(id));
        assert_eq!(
            last.detail["action"],
            if approve { "approve" } else { "deny" }
        );
        assert_eq!(last.detail["code"], "CONFLICT");
    }
    assert_eq!(w.audit.of_kind("denied").len(), 2);
    assert!(w.sent().is_empty());
}

#[tokio::test]
async fn a_decision_that_keeps_losing_races_is_a_conflict_and_one_lost_race_is_retried() {
    let w = World::manual();
    let op = w.create().await;
    w.store
        .lost_races
        .store(3, std::sync::atomic::Ordering::SeqCst);
    let e = w
        .ops
        .decide(&approver("acme"), &op.id, true, None)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(e.message.contains("kept changing"), "{}", e.message);
    assert_eq!(w.state(&op.id), OpState::PendingApproval);
    assert_eq!(w.audit.of_kind("denied").len(), 1);

    w.store
        .lost_races
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let decided = w
        .ops
        .decide(&approver("acme"), &op.id, true, None)
        .await
        .unwrap();
    assert_eq!(decided.state, OpState::Approved);
}

#[tokio::test]
async fn only_the_customers_own_approver_decides() {
    let w = World::manual();
    let op = w.create().await;
    let e = w
        .ops
        .decide(&approver("globex"), &op.id, true, None)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(w.state(&op.id), OpState::PendingApproval);
}

#[tokio::test]
async fn released_output_goes_out_and_its_result_completes_the_op() {
    let w = World::manual();
    w.seed("op_held", OpState::OutputPendingApproval);
    w.clock.advance(Duration::from_secs(60));
    let decided = w
        .ops
        .decide(&approver("acme"), "op_held", true, None)
        .await
        .unwrap();
    assert_eq!(decided.state, OpState::OutputPendingApproval);
    let row = w.op("op_held");
    assert_eq!(row.output_approved_by.as_deref(), Some("ana@acme"));
    assert_eq!(row.output_approved_at, Some(t0() + minutes(1)));
    assert_eq!(
        w.sent(),
        [ToAgent::OutputRelease {
            op_id: "op_held".into(),
            approved_by: "ana@acme".into(),
            signed_decision: None,
        }]
    );

    // Released once: a second approval is a conflict.
    let e = w
        .ops
        .decide(&approver("acme"), "op_held", true, None)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(
        e.message.contains("already released by ana@acme"),
        "{}",
        e.message
    );

    // The appliance sends the released output and its end.
    w.agent_says([
        output("op_held", OutputStream::Stdout, "pods\n"),
        ToGateway::OpFinished(finished("op_held", Some(0))),
    ])
    .await;
    let record = w.ops.get(&operator(), "op_held").await.unwrap();
    assert_eq!(record.state, OpState::Completed);
    assert_eq!(record.stdout.as_deref(), Some("pods\n"));
    assert_eq!(w.kinds(), ["output.approved", "denied", "output.released"]);
}

#[tokio::test]
async fn held_output_is_released_only_while_the_appliance_is_online() {
    let w = World::manual();
    w.seed("op_held", OpState::OutputPendingApproval);
    w.agents.disconnect(ACME);
    let e = w
        .ops
        .decide(&approver("acme"), "op_held", true, None)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ApplianceOffline);
    assert_eq!(w.op("op_held").output_approved_by, None);
    assert!(w.kinds().is_empty());
}

#[tokio::test]
async fn denied_output_is_destroyed_in_the_appliance() {
    let w = World::manual();
    w.seed("op_held", OpState::OutputPendingApproval);
    let decided = w
        .ops
        .decide(
            &approver("acme"),
            "op_held",
            false,
            Some("contains PII".into()),
        )
        .await
        .unwrap();
    assert_eq!(decided.state, OpState::Denied);
    assert_eq!(decided.error.unwrap().message, "contains PII");
    assert_eq!(
        w.sent(),
        [ToAgent::OutputDestroy {
            op_id: "op_held".into(),
            denied_by: "ana@acme".into(),
            message: Some("contains PII".into())
        }]
    );
    assert_eq!(w.kinds(), ["output.denied"]);

    w.agent_says([ToGateway::OpFinished(OpFinished {
        destroyed: true,
        ..finished("op_held", None)
    })])
    .await;
    assert_eq!(w.kinds(), ["output.denied", "output.destroyed"]);
    assert_eq!(w.state("op_held"), OpState::Denied);
}

#[tokio::test]
async fn a_preview_passes_held_output_through_without_storing_it() {
    let w = World::manual();
    w.seed("op_held", OpState::OutputPendingApproval);
    let agent = async {
        while !w.sent().contains(&ToAgent::OutputFetch {
            op_id: "op_held".into(),
        }) {
            tokio::task::yield_now().await;
        }
        w.agent_says([
            preview_output("op_held", OutputStream::Stdout, "secret rows\n"),
            preview_output("op_held", OutputStream::Stderr, "warn\n"),
            ToGateway::OpFinished(OpFinished {
                held: true,
                preview: true,
                ..finished("op_held", Some(0))
            }),
        ])
        .await;
    };
    let ana = approver("acme");
    let (shown, ()) = tokio::join!(w.ops.preview(&ana, "op_held"), agent);
    let shown = shown.unwrap();
    assert_eq!(shown["stdout"], "secret rows\n");
    assert_eq!(shown["stderr"], "warn\n");
    assert_eq!(shown["exit_code"], 0);

    let row = w.op("op_held");
    assert_eq!(row.state, OpState::OutputPendingApproval);
    assert_eq!((row.stdout, row.stderr), (None, None), "never stored");
    assert!(w.kinds().is_empty(), "never logged");
}

#[tokio::test]
async fn a_preview_is_for_approvers_of_held_output_and_gives_up_on_a_silent_appliance() {
    let w = World::manual();
    w.seed("op_held", OpState::OutputPendingApproval);
    w.seed("op_running", OpState::Running);
    let ops = w.ops.with_preview_wait(Duration::from_millis(20));

    let e = ops.preview(&operator(), "op_held").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    let e = ops
        .preview(&approver("acme"), "op_running")
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);

    let e = ops.preview(&approver("acme"), "op_held").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::ApplianceOffline);
    assert!(e.message.contains("in time"), "{}", e.message);

    w.agents.disconnect(ACME);
    let e = ops.preview(&approver("acme"), "op_held").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::ApplianceOffline);
    assert!(e.message.contains("offline"), "{}", e.message);
}
