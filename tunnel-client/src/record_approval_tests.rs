//! Unit tests of `record_approval`: grants and endpoints a person approved, accepted once and
//! honoured again when announced again, every forgery refused.
use super::*;
use certs::approver::ApproverKey;
use endpoint_types::{
    approval::{ApprovalStatement, Decision as Signed},
    control::GrantLevel,
    resource::EndpointType,
};

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

const NOW: &str = "2026-12-07T03:10:00Z";

/// Appliance `ap_1`, trail in `dir`, approvers `keys`, and `policy` as `[policy]` lines.
fn config(dir: &Path, keys: &[&ApproverKey], policy: &str) -> AgentConfig {
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
    text.push_str(&format!("[policy]\n{policy}\n"));
    AgentConfig::parse(&text, &dir.join("agent.toml")).unwrap()
}

/// The agent's two checkers, as after a start at `now`.
fn start(
    dir: &Path,
    keys: &[&ApproverKey],
    policy: &str,
    now: &str,
) -> (SignedApprovals, RecordApprovals) {
    let c = config(dir, keys, policy);
    (
        SignedApprovals::from_config(&c, at(now)),
        RecordApprovals::from_config(&c, at(now)),
    )
}

const MANUAL: &str = "approval = \"manual\"";

/// A 30 h operate grant approved at 03:00 (longer than any statement may be valid).
fn grant(id: &str) -> LiveGrant {
    LiveGrant {
        grant_id: id.into(),
        level: GrantLevel::Operate,
        approved_by: "bob@customer".into(),
        approved_at: at("2026-12-07T03:00:01Z"),
        expires_at: at("2026-12-08T09:00:01Z"),
        signed_decision: None,
    }
}

/// The statement for `id` as `approvals approve` makes it at 03:00, valid 24 h.
fn grant_statement(id: &str, level: GrantLevel, duration_s: u64) -> ApprovalStatement {
    ApprovalStatement {
        record_id: id.into(),
        appliance_id: "ap_1".into(),
        decision: Signed::Approve,
        content: DecidedContent::Grant { level, duration_s },
        issued_at: at("2026-12-07T03:00:00Z"),
        not_after: at("2026-12-08T03:00:00Z"),
        key_id: String::new(),
    }
}

fn signed_grant(key: &ApproverKey, g: &LiveGrant) -> LiveGrant {
    LiveGrant {
        signed_decision: Some(key.sign(grant_statement(&g.grant_id, g.level, 30 * 3600))),
        ..g.clone()
    }
}

fn reason<T: Approvable>(
    (a, r): &(SignedApprovals, RecordApprovals),
    item: &T,
    now: &str,
) -> &'static str {
    match r.check(a, item, at(now)) {
        Ok(v) => panic!("accepted: {v:?}"),
        Err(e) => e.reason(),
    }
}

fn accepted<T: Approvable>(
    (a, r): &(SignedApprovals, RecordApprovals),
    item: &T,
    now: &str,
) -> bool {
    match r.check(a, item, at(now)) {
        Ok(Some((_, first))) => first,
        other => panic!("not accepted: {other:?}"),
    }
}

#[test]
fn a_signed_grant_is_accepted_once_and_honoured_when_sent_again_past_the_statement() {
    let dir = tempfile::tempdir().unwrap();
    let (bob, _) = ApproverKey::generate().unwrap();
    let agent = start(dir.path(), &[&bob], MANUAL, NOW);
    let g = signed_grant(&bob, &grant("gr_1"));
    assert!(accepted(&agent, &g, NOW), "accepted for the first time");
    // The set is sent again after every change: not a replay.
    assert!(!accepted(&agent, &g, "2026-12-07T03:11:00Z"));
    // 30 h grant, 24 h statement: still honoured after the statement's not-after.
    assert!(!accepted(&agent, &g, "2026-12-08T08:00:00Z"));
    // The agent restarts (and reconnects): the acceptance is read back from disk.
    drop(agent);
    let restarted = start(dir.path(), &[&bob], MANUAL, "2026-12-08T08:00:00Z");
    assert!(!accepted(&restarted, &g, "2026-12-08T08:00:00Z"));
    // A level changed after acceptance needs a new decision.
    let raised = LiveGrant {
        level: GrantLevel::Deploy,
        ..g.clone()
    };
    assert_eq!(
        reason(&restarted, &raised, "2026-12-08T08:00:00Z"),
        "content_mismatch"
    );
    // So does a longer duration (the expiry moved out by the gateway).
    let longer = LiveGrant {
        expires_at: at("2026-12-09T09:00:01Z"),
        ..g.clone()
    };
    assert_eq!(
        reason(&restarted, &longer, "2026-12-08T08:00:00Z"),
        "content_mismatch"
    );
    // An acceptance forgotten (its file lost) on another appliance's disk: the same
    // statement is then used up.
    let other = tempfile::tempdir().unwrap();
    assert!(accepted(
        &start(other.path(), &[&bob], MANUAL, NOW),
        &g,
        NOW
    ));
    std::fs::remove_file(accepted_path(&other.path().join("audit.jsonl"))).unwrap();
    let forgotten = start(other.path(), &[&bob], MANUAL, NOW);
    assert_eq!(reason(&forgotten, &g, NOW), "replayed");
    let file = accepted_path(&dir.path().join("audit.jsonl"));
    // Once a grant ended its acceptance is dropped from the file at start.
    let ended = Accepted {
        digest: [1; 32],
        at: at(NOW),
        until: at("2026-12-07T03:30:00Z"),
    };
    let live = Accepted {
        until: at("2026-12-07T05:00:00Z"),
        ..ended
    };
    std::fs::write(
        &file,
        accepted_line("gr_old", &ended) + "garbage\n" + &accepted_line("gr_live", &live),
    )
    .unwrap();
    drop(start(dir.path(), &[&bob], MANUAL, "2026-12-07T04:00:00Z"));
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        accepted_line("gr_live", &live)
    );
}

#[test]
fn every_forged_grant_decision_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (bob, _) = ApproverKey::generate().unwrap();
    let agent = start(dir.path(), &[&bob], MANUAL, NOW);
    // Marked approved by a person, with no signature.
    assert_eq!(reason(&agent, &grant("gr_1"), NOW), "missing");
    // Bob's decision on gr_2 replayed for gr_3.
    let gr2 = signed_grant(&bob, &grant("gr_2"));
    assert!(accepted(&agent, &gr2, NOW));
    let replayed = LiveGrant {
        grant_id: "gr_3".into(),
        ..gr2.clone()
    };
    assert_eq!(reason(&agent, &replayed, NOW), "wrong_record");
    // The duration altered in the gateway's store: the grant lasts longer than signed.
    let mut short = grant("gr_4");
    short.signed_decision = Some(bob.sign(grant_statement("gr_4", GrantLevel::Operate, 600)));
    assert_eq!(reason(&agent, &short, NOW), "content_mismatch");
    // Within the clock allowance the signed duration holds (the gateway decided a moment
    // after the approver signed).
    let on_time = LiveGrant {
        expires_at: at("2026-12-07T03:10:30Z"),
        ..short.clone()
    };
    assert!(accepted(&agent, &on_time, NOW));
    // Signed for an expiry, first sent after it.
    let late = signed_grant(&bob, &grant("gr_5"));
    assert_eq!(reason(&agent, &late, "2026-12-08T03:00:01Z"), "expired");
    // Another appliance's decision; an unknown key; a borrowed key id.
    let mut foreign = grant_statement("gr_6", GrantLevel::Operate, 30 * 3600);
    foreign.appliance_id = "ap_2".into();
    let for_another = LiveGrant {
        signed_decision: Some(bob.sign(foreign)),
        ..grant("gr_6")
    };
    assert_eq!(reason(&agent, &for_another, NOW), "wrong_appliance");
    let (eve, _) = ApproverKey::generate().unwrap();
    let by_eve = signed_grant(&eve, &grant("gr_7"));
    assert_eq!(reason(&agent, &by_eve, NOW), "unknown_key");
    let mut borrowed = by_eve.clone();
    if let Some(s) = borrowed.signed_decision.as_mut() {
        s.statement.key_id = bob.public().key_id();
    }
    assert_eq!(reason(&agent, &borrowed, NOW), "bad_signature");
    // An accepted statement under a forged signature: the re-check verifies the signature too.
    let mut swapped = gr2.clone();
    if let Some(s) = swapped.signed_decision.as_mut() {
        s.signature = by_eve.signed_decision.clone().unwrap().signature;
    }
    assert_eq!(reason(&agent, &swapped, NOW), "bad_signature");
    // An id that cannot be remembered on one line.
    let mut odd = signed_grant(&bob, &grant("gr 8"));
    odd.grant_id = "gr 8".into();
    assert_eq!(reason(&agent, &odd, NOW), "malformed");
}

#[test]
fn screening_keeps_the_valid_records_the_refusals_and_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let (bob, _) = ApproverKey::generate().unwrap();
    let (a, r) = start(dir.path(), &[&bob], MANUAL, NOW);
    let good = signed_grant(&bob, &grant("gr_1"));
    let s = r.screen(&a, vec![good.clone(), grant("gr_2")], "gateway", at(NOW));
    assert_eq!(s.kept, vec![good.clone()]);
    let kinds: Vec<_> = s.records.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, vec!["approval.verified", "denied"]);
    assert_eq!(s.records[1].detail["grant_id"], "gr_2");
    assert_eq!(s.records[1].detail["approval"], "missing");
    assert_eq!(s.refused.len(), 1);
    assert_eq!(s.refused[0].0, "gr_2");
    assert_eq!(s.refused[0].1.code.as_str(), "APPROVAL_INVALID");
    assert_eq!(s.refused[0].1.details["reason"], "missing");
    // Sent again: the good one honoured, the refused one reported again; nothing is recorded
    // a second time.
    let again = r.screen(&a, vec![good.clone(), grant("gr_2")], "gateway", at(NOW));
    assert_eq!(again.kept, vec![good.clone()]);
    assert!(again.records.is_empty());
    assert_eq!(again.refused.len(), 1);
}

#[test]
fn the_policys_own_decisions_and_unlisted_keys_need_no_signature() {
    let dir = tempfile::tempdir().unwrap();
    let (bob, _) = ApproverKey::generate().unwrap();
    let automatic = start(dir.path(), &[&bob], "approval = \"automatic\"", NOW);
    assert_eq!(
        automatic.1.check(&automatic.0, &grant("gr_1"), at(NOW)),
        Ok(None)
    );
    // A window approves what ends while it is open, not what outlives it.
    let windows = start(
        dir.path(),
        &[&bob],
        "approval = \"windows\"\nwindows = [\"Mon-Sun 03:00-04:00\"]",
        NOW,
    );
    let inside = LiveGrant {
        expires_at: at("2026-12-07T03:59:00Z"),
        ..grant("gr_2")
    };
    assert_eq!(windows.1.check(&windows.0, &inside, at(NOW)), Ok(None));
    assert_eq!(reason(&windows, &grant("gr_3"), NOW), "missing");
    // No keys listed: the old behaviour.
    let none = tempfile::tempdir().unwrap();
    let open = start(none.path(), &[], MANUAL, NOW);
    assert_eq!(open.1.check(&open.0, &grant("gr_4"), at(NOW)), Ok(None));
    assert!(!accepted_path(&none.path().join("audit.jsonl")).exists());
}

fn endpoint(id: &str, expires_at: &str) -> EndpointGrant {
    EndpointGrant {
        phase: endpoint_types::phase::operate(),
        endpoint_id: id.into(),
        endpoint_type: EndpointType::Tcp,
        resource_id: "null_resource.echo".into(),
        expires_at: at(expires_at),
        grant_id: Some("gr_1".into()),
        signed_decision: None,
    }
}

fn signed_endpoint(key: &ApproverKey, e: &EndpointGrant, ttl_s: u64) -> EndpointGrant {
    let statement = ApprovalStatement {
        record_id: e.endpoint_id.clone(),
        appliance_id: "ap_1".into(),
        decision: Signed::Approve,
        content: DecidedContent::Endpoint {
            endpoint_type: EndpointType::Tcp,
            resource_id: "null_resource.echo".into(),
            ttl_s,
        },
        issued_at: at("2026-12-07T03:00:00Z"),
        not_after: at("2026-12-07T04:00:00Z"),
        key_id: String::new(),
    };
    EndpointGrant {
        signed_decision: Some(key.sign(statement)),
        ..e.clone()
    }
}

#[test]
fn endpoints_bind_type_resource_and_ttl_and_are_honoured_when_announced_again() {
    let dir = tempfile::tempdir().unwrap();
    let (bob, _) = ApproverKey::generate().unwrap();
    let agent = start(dir.path(), &[&bob], MANUAL, NOW);
    let e = signed_endpoint(&bob, &endpoint("ep_1", "2026-12-07T05:00:01Z"), 7200);
    assert!(accepted(&agent, &e, NOW));
    // Re-announced on reconnect after the statement's not-after.
    assert!(!accepted(&agent, &e, "2026-12-07T04:30:00Z"));
    assert_eq!(
        reason(&agent, &endpoint("ep_2", "2026-12-07T05:00:00Z"), NOW),
        "missing"
    );
    // TTL stretched by the gateway: the endpoint lives longer than signed.
    let stretched = signed_endpoint(&bob, &endpoint("ep_3", "2026-12-08T03:00:00Z"), 7200);
    assert_eq!(reason(&agent, &stretched, NOW), "content_mismatch");
    // Another resource, another type.
    let elsewhere = EndpointGrant {
        resource_id: "null_resource.other".into(),
        ..signed_endpoint(&bob, &endpoint("ep_4", "2026-12-07T05:00:00Z"), 7200)
    };
    assert_eq!(reason(&agent, &elsewhere, NOW), "content_mismatch");
    let as_ssh = EndpointGrant {
        endpoint_type: EndpointType::Ssh,
        ..signed_endpoint(&bob, &endpoint("ep_5", "2026-12-07T05:00:00Z"), 7200)
    };
    assert_eq!(reason(&agent, &as_ssh, NOW), "content_mismatch");
    // A grant's decision is no endpoint's.
    let grant_decision = EndpointGrant {
        endpoint_id: "gr_1".into(),
        signed_decision: signed_grant(&bob, &grant("gr_1")).signed_decision,
        ..endpoint("gr_1", "2026-12-07T05:00:00Z")
    };
    assert_eq!(reason(&agent, &grant_decision, NOW), "content_mismatch");
}

#[test]
fn lifetimes_round_up_and_accepted_lines_round_trip() {
    let (bob, _) = ApproverKey::generate().unwrap();
    let s = bob.sign(grant_statement("gr_1", GrantLevel::Operate, 60));
    let issued = at("2026-12-07T03:00:00Z");
    let plus = |secs: i64, ms: i64| {
        issued + SignedDuration::from_secs(secs) + SignedDuration::from_millis(ms)
    };
    assert_eq!(asked_lifetime_s(Some(&s), plus(60, 0)), 60);
    assert_eq!(asked_lifetime_s(Some(&s), plus(360, 0)), 60);
    assert_eq!(asked_lifetime_s(Some(&s), plus(360, 1)), 361);
    assert_eq!(asked_lifetime_s(None, plus(60, 0)), 0);
    let a = Accepted {
        digest: [7; 32],
        at: at(NOW),
        until: at("2026-12-08T00:00:00Z"),
    };
    let line = accepted_line("gr_1", &a);
    assert_eq!(parse_accepted(&line), Some(("gr_1".to_string(), a)));
    for bad in ["", "gr_1", "gr_1 07 x y", &format!("{} extra", line.trim())] {
        assert_eq!(parse_accepted(bad), None, "{bad:?}");
    }
}

/// A rogue or confused gateway cannot borrow one phase's policy for another: each grant and
/// endpoint is judged by its own phase's `[policy.<phase>]` table (else `[policy]`), and
/// install by a person whatever the tables say.
#[test]
fn each_record_is_judged_by_its_own_phases_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (bob, _) = ApproverKey::generate().unwrap();
    let x = start(
        dir.path(),
        &[&bob],
        "approval = \"manual\"\n[policy.deploy]\napproval = \"automatic\"",
        NOW,
    );
    let deploy = LiveGrant {
        level: GrantLevel::Deploy,
        ..grant("gr_d")
    };
    assert_eq!(x.1.check(&x.0, &deploy, at(NOW)), Ok(None));
    assert_eq!(reason(&x, &grant("gr_o"), NOW), "missing");
    let deploy_ep = EndpointGrant {
        phase: GrantLevel::Deploy,
        ..endpoint("ep_d", "2026-12-07T04:00:00Z")
    };
    assert_eq!(x.1.check(&x.0, &deploy_ep, at(NOW)), Ok(None));
    let operate_ep = endpoint("ep_o", "2026-12-07T04:00:00Z");
    assert!(x.1.check(&x.0, &operate_ep, at(NOW)).is_err());

    // Automatic everywhere, yet install still needs a person's signed decision.
    let dir = tempfile::tempdir().unwrap();
    let auto = start(dir.path(), &[&bob], "approval = \"automatic\"", NOW);
    assert_eq!(auto.1.check(&auto.0, &grant("gr_o"), at(NOW)), Ok(None));
    let install = LiveGrant {
        level: GrantLevel::Install,
        ..grant("gr_i")
    };
    assert_eq!(reason(&auto, &install, NOW), "missing");
}
