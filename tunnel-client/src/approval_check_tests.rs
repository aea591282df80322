//! Unit tests of `approval_check`: every reason an approver's decision is refused.
use super::*;
use certs::approver::ApproverKey;
use endpoint_types::{
    approval::{ApprovalStatement, Decision},
    control::OpTool,
};

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

const NOW: &str = "2026-12-07T03:10:00Z";

/// An enrolled appliance `ap_1` whose trail is in `dir`, listing `keys` as approvers.
fn approvals(dir: &Path, keys: &[&ApproverKey]) -> SignedApprovals {
    let mut text = format!(
        "audit_path = \"{}\"\nappliance_id = \"ap_1\"\n",
        dir.join("audit.jsonl").display()
    );
    for (i, k) in keys.iter().enumerate() {
        text.push_str(&format!(
            "[[approver]]\nname = \"approver{i}\"\npublic_key = \"{}\"\n",
            k.public().to_line("")
        ));
    }
    let config = AgentConfig::parse(&text, &dir.join("agent.toml")).unwrap();
    SignedApprovals::from_config(&config, at(NOW))
}

fn dispatch(op_id: &str, command: &str) -> OpDispatch {
    OpDispatch {
        phase: endpoint_types::phase::operate(),
        op_id: op_id.into(),
        tool: OpTool::Kubectl,
        command: command.into(),
        resource_id: "k8s.main".into(),
        timeout_s: 300,
        operator: "alice@vendor".into(),
        grant_id: "gr_1".into(),
        command_approved_by: "bob@customer".into(),
        command_approved_at: at(NOW),
        hold_output: false,
        signed_decision: None,
    }
}

/// What the gateway offers the approver for `d`, valid 03:00–04:00.
fn statement(d: &OpDispatch) -> ApprovalStatement {
    ApprovalStatement {
        record_id: d.op_id.clone(),
        appliance_id: "ap_1".into(),
        decision: Decision::Approve,
        content: DecidedContent::op_command(d.tool, &d.command, &d.resource_id, d.timeout_s)
            .unwrap(),
        issued_at: at("2026-12-07T03:00:00Z"),
        not_after: at("2026-12-07T04:00:00Z"),
        key_id: String::new(),
    }
}

fn signed(key: &ApproverKey, d: &OpDispatch) -> OpDispatch {
    OpDispatch {
        signed_decision: Some(key.sign(statement(d))),
        ..d.clone()
    }
}

fn reason(a: &SignedApprovals, d: &OpDispatch, now: &str) -> &'static str {
    match a.check_op(d, true, at(now)) {
        Ok(v) => panic!("accepted: {v:?}"),
        Err(e) => e.reason(),
    }
}

#[test]
fn a_signed_command_runs_once_and_every_forgery_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (bob, _) = ApproverKey::generate().unwrap();
    let a = approvals(dir.path(), &[&bob]);
    assert!(a.enforced());

    let d = signed(&bob, &dispatch("op_1", "kubectl get pods"));
    let v = a.check_op(&d, true, at(NOW)).unwrap().unwrap();
    assert_eq!(v.approver, "approver0");
    assert_eq!(v.key_id, bob.public().key_id());
    // The same op twice, and the same statement for another op.
    assert_eq!(reason(&a, &d, NOW), "replayed");
    let other = OpDispatch {
        op_id: "op_2".into(),
        ..d.clone()
    };
    assert_eq!(reason(&a, &other, NOW), "wrong_record");

    // Marked approved by a person, without a signature (a rogue gateway's store edit).
    assert_eq!(
        reason(&a, &dispatch("op_3", "kubectl get pods"), NOW),
        "missing"
    );
    // The argv tampered with after signing: what the agent would run differs.
    let approved = signed(&bob, &dispatch("op_4", "kubectl get pods"));
    let tampered = OpDispatch {
        command: "kubectl delete pods --all".into(),
        ..approved.clone()
    };
    assert_eq!(reason(&a, &tampered, NOW), "content_mismatch");
    // So are the resource and the timeout.
    let elsewhere = OpDispatch {
        resource_id: "k8s.other".into(),
        ..approved.clone()
    };
    assert_eq!(reason(&a, &elsewhere, NOW), "content_mismatch");
    let longer = OpDispatch {
        timeout_s: 3600,
        ..approved.clone()
    };
    assert_eq!(reason(&a, &longer, NOW), "content_mismatch");
    // Another appliance's statement.
    let d5 = dispatch("op_5", "kubectl get pods");
    let mut foreign = statement(&d5);
    foreign.appliance_id = "ap_2".into();
    let for_another = OpDispatch {
        signed_decision: Some(bob.sign(foreign)),
        ..d5.clone()
    };
    assert_eq!(reason(&a, &for_another, NOW), "wrong_appliance");
    // Past not-after.
    let d6 = signed(&bob, &dispatch("op_6", "kubectl get pods"));
    assert_eq!(reason(&a, &d6, "2026-12-07T04:00:01Z"), "expired");
    // A key the appliance does not list.
    let (eve, _) = ApproverKey::generate().unwrap();
    let d7 = signed(&eve, &dispatch("op_7", "kubectl get pods"));
    assert_eq!(reason(&a, &d7, NOW), "unknown_key");
    // Eve's signature under Bob's key id.
    let mut borrowed = d7.clone();
    if let Some(s) = borrowed.signed_decision.as_mut() {
        s.statement.key_id = bob.public().key_id();
    }
    assert_eq!(reason(&a, &borrowed, NOW), "bad_signature");
    // A denial signed by Bob is no approval.
    let d8 = dispatch("op_8", "kubectl get pods");
    let mut deny = statement(&d8);
    deny.decision = Decision::Deny;
    let denied = OpDispatch {
        signed_decision: Some(bob.sign(deny)),
        ..d8
    };
    assert_eq!(reason(&a, &denied, NOW), "not_approved");

    // None of the refusals used up a statement: the untouched op 4 still runs.
    assert!(a.check_op(&approved, true, at(NOW)).is_ok());
}

#[test]
fn used_statements_stay_used_across_a_restart_and_policy_decisions_need_none() {
    let dir = tempfile::tempdir().unwrap();
    let (bob, _) = ApproverKey::generate().unwrap();
    let d = signed(&bob, &dispatch("op_1", "kubectl get pods"));
    {
        let a = approvals(dir.path(), &[&bob]);
        assert!(a.check_op(&d, true, at(NOW)).is_ok());
    }
    let restarted = approvals(dir.path(), &[&bob]);
    assert_eq!(reason(&restarted, &d, NOW), "replayed");
    // Once past its not-after a used statement is dropped from the file (it is refused as
    // expired anyway).
    let used = dir.path().join("audit.jsonl.approvals-used");
    assert_eq!(std::fs::read_to_string(&used).unwrap().lines().count(), 1);
    let config = AgentConfig::parse(
        &format!(
            "audit_path = \"{}\"\nappliance_id = \"ap_1\"\n[[approver]]\nname = \"b\"\npublic_key = \"{}\"\n",
            dir.path().join("audit.jsonl").display(),
            bob.public().to_line("")
        ),
        &dir.path().join("agent.toml"),
    )
    .unwrap();
    let later = SignedApprovals::from_config(&config, at("2026-12-07T05:00:00Z"));
    assert_eq!(std::fs::read_to_string(&used).unwrap(), "");
    assert_eq!(reason(&later, &d, "2026-12-07T05:00:00Z"), "expired");
    // The policy approved by itself: the appliance's own evaluation, nothing to verify.
    let unsigned = dispatch("op_2", "kubectl get pods");
    assert_eq!(restarted.check_op(&unsigned, false, at(NOW)), Ok(None));

    // No keys listed: the old behaviour, nothing verified.
    let none = tempfile::tempdir().unwrap();
    let open = approvals(none.path(), &[]);
    assert!(!open.enforced());
    assert_eq!(open.check_op(&unsigned, true, at(NOW)), Ok(None));
}

#[test]
fn used_lines_round_trip_and_bad_ones_are_skipped() {
    let digest = [0xab; 32];
    let line = used_line(&digest, at(NOW));
    assert_eq!(parse_used(&line), Some((digest, at(NOW))));
    for bad in [
        "",
        "zz 2026-12-07T03:10:00Z",
        "abab",
        &line.replace(' ', ""),
    ] {
        assert_eq!(parse_used(bad), None, "{bad:?}");
    }
}
