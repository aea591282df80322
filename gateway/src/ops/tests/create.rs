//! Creating ops: policy approval and dispatch, waiting for a person, and every refusal.

use super::*;

#[tokio::test]
async fn create_under_automatic_policy_dispatches_to_the_connected_agent() {
    let w = World::automatic();
    let op = w.create().await;

    assert_eq!(op.state, OpState::Approved);
    assert_eq!(op.command, "kubectl get pods -n shop");
    assert_eq!((op.app.as_str(), op.customer.as_str()), ("shop", "acme"));
    assert_eq!(op.requested_at, t0());
    let row = w.op(&op.id);
    assert_eq!(row.command_approved_by.as_deref(), Some("policy:automatic"));
    assert_eq!(row.command_approved_at, Some(t0()));
    assert_eq!(row.grant_id.as_deref(), Some("gr_1"));

    let sent = w.sent();
    let [Frame::OpDispatch(d)] = sent.as_slice() else {
        panic!("one dispatch, got {sent:?}");
    };
    assert_eq!(d.op_id, op.id);
    assert_eq!(d.command, "kubectl get pods -n shop");
    assert_eq!(d.resource_id, CLUSTER);
    assert_eq!(d.grant_id, "gr_1");
    assert_eq!(d.operator, "alice@vendor");
    assert_eq!(d.command_approved_by, "policy:automatic");
    assert_eq!(d.timeout_s, 300);
    // Automatic approves the output too.
    assert!(!d.hold_output);

    assert_eq!(w.kinds(), ["op.requested", "op.approved", "op.dispatched"]);
    let approved = &w.audit.of_kind("op.approved")[0];
    assert_eq!(approved.actor, "policy:automatic");
    assert_eq!(approved.subject.op_id.as_deref(), Some(op.id.as_str()));
    assert_eq!(approved.subject.appliance_id.as_deref(), Some(ACME));
    let requested = &w.audit.of_kind("op.requested")[0];
    assert_eq!(requested.actor, "alice@vendor");
    assert_eq!(requested.detail["grant_id"], "gr_1");
    assert!(w.notified().is_empty(), "nobody needs to decide");
}

#[tokio::test]
async fn create_under_manual_policy_waits_and_notifies_the_customer() {
    let w = World::manual();
    let op = w.create().await;

    assert_eq!(op.state, OpState::PendingApproval);
    assert!(op.error.is_none());
    assert_eq!(w.op(&op.id).command_approved_by, None);
    assert!(w.sent().is_empty(), "nothing reaches the agent unapproved");
    assert_eq!(
        w.notified(),
        [("acme".to_string(), "op".to_string(), op.id.clone())]
    );
    assert_eq!(w.kinds(), ["op.requested"]);

    let item = super::super::approval_item(&w.op(&op.id), &appliance(ACME, "acme")).unwrap();
    assert_eq!(item.id, op.id);
    assert_eq!(item.stage, endpoint_types::control::ApprovalStage::Command);
    assert_eq!(
        item.summary,
        format!("run `kubectl get pods -n shop` on {CLUSTER}")
    );
}

#[tokio::test]
async fn create_asks_the_grants_gate_at_the_services_clock() {
    let w = World::manual();
    w.clock.advance(Duration::from_secs(90));
    let op = w.create().await;
    let at = t0() + SignedDuration::from_secs(90);
    assert_eq!(op.requested_at, at);
    let asked = w.grants.asked_at.lock().unwrap().clone();
    assert!(
        !asked.is_empty() && asked.iter().all(|t| *t == at),
        "{asked:?}"
    );
}

#[tokio::test]
async fn create_without_a_live_operate_grant_is_refused_before_anything_is_stored() {
    let w = World::automatic();
    w.grants.set_grant(None);
    let e = w
        .ops
        .create(&operator(), kubectl("kubectl get pods"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::OperateAccessRequired);

    // The grant ran out by the clock: expired, not "required".
    w.grants.set_grant(Some(operate_grant("gr_1", ACME)));
    w.clock.advance(Duration::from_secs(30 * 60));
    let e = w
        .ops
        .create(&operator(), kubectl("kubectl get pods"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::OperateAccessExpired);

    assert!(w.store.all_ops().is_empty());
    assert!(w.sent().is_empty());
    assert!(w.kinds().is_empty());
    assert!(w.notified().is_empty());
}

#[tokio::test]
async fn create_refuses_bad_requests_offline_appliances_and_unknown_resources() {
    let w = World::automatic();
    let refused = |req: OpRequest, who: Caller| {
        let ops = &w.ops;
        async move { ops.create(&who, req).await.unwrap_err() }
    };

    let e = refused(kubectl("kubectl get pods"), approver("acme")).await;
    assert_eq!(e.code, ErrorCode::Forbidden);

    let e = refused(kubectl("rm -rf /"), operator()).await;
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    assert!(
        e.message.contains("must start with `kubectl`"),
        "{}",
        e.message
    );

    let mut other = kubectl("kubectl get pods");
    other.customer = "initech".into();
    let e = refused(other, operator()).await;
    assert_eq!(e.code, ErrorCode::NotFound);

    let mut unknown = kubectl("kubectl get pods");
    unknown.origin_resource_id = "aws_instance.nope".into();
    let e = refused(unknown, operator()).await;
    assert_eq!(e.code, ErrorCode::InvalidOriginResourceId);
    assert!(
        e.hint.contains(CLUSTER) && e.hint.contains(DATABASE),
        "{}",
        e.hint
    );

    w.agents.disconnect(ACME);
    let e = refused(kubectl("kubectl get pods"), operator()).await;
    assert_eq!(e.code, ErrorCode::ApplianceOffline);

    assert!(w.store.all_ops().is_empty());
    assert!(w.kinds().is_empty());
}

#[tokio::test]
async fn a_tool_against_a_resource_of_another_kind_is_refused_and_audited_as_denied() {
    let w = World::automatic();
    let mut req = kubectl("kubectl get pods");
    req.origin_resource_id = DATABASE.into();
    let e = w.ops.create(&operator(), req).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidOriginResourceId);
    assert_eq!(e.details["kind"], "postgres");

    assert_eq!(w.kinds(), ["denied"]);
    let denied = &w.audit.of_kind("denied")[0];
    assert_eq!(denied.actor, "alice@vendor");
    assert_eq!(denied.subject.appliance_id.as_deref(), Some(ACME));
    assert_eq!(denied.detail["action"], "op");
    assert_eq!(denied.detail["origin_resource_id"], DATABASE);
    assert_eq!(denied.detail["command"], "kubectl get pods");
    assert!(w.store.all_ops().is_empty());
    assert!(w.sent().is_empty());
}

#[tokio::test]
async fn list_and_get_are_scoped_by_the_callers_customer() {
    let w = World::manual();
    let acme_op = w.create().await;
    let mut globex = w.seed("op_globex", OpState::Running);
    globex.appliance_id = GLOBEX.into();
    globex.requested_at = t0() + minutes(1);
    w.store.put_op(globex);

    let all: Vec<String> = w
        .ops
        .list(&operator())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(all, [acme_op.id.clone(), "op_globex".to_string()]);

    let acme = w.ops.list(&approver("acme")).await.unwrap();
    assert_eq!(acme.len(), 1);
    assert_eq!(acme[0].id, acme_op.id);
    assert_eq!(acme[0].customer, "acme");
    let rows = w.ops.list_rows(&approver("globex")).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].0.id.as_str(), rows[0].1.id.as_str()),
        ("op_globex", GLOBEX)
    );

    // Another customer's op does not exist for an approver.
    let e = w
        .ops
        .get(&approver("globex"), &acme_op.id)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(
        w.ops.get(&approver("acme"), &acme_op.id).await.unwrap().id,
        acme_op.id
    );
    let e = w.ops.get(&operator(), "op_nope").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
}
