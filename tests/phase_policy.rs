//! Policy per phase (issue 16): `[policy.<phase>]` decides the endpoints, ops and grants of its
//! phase, `[policy]` the rest, and install waits for a person whatever the policy. The gateway
//! (what it approves by itself) and the agent (what it accepts) read the same table; `approvals
//! show` and both trails name the phase and the rule that decided. Real gateway, agent, CLI,
//! kubectl and the test API server.

use anyhow::{anyhow, Result};
use jiff::{tz::TimeZone, Timestamp, ToSpan};
use postern::{
    kube_apiserver::KubeApiServer,
    testbed::{Agent, Gateway},
};
use serde_json::Value;
use std::path::Path;

const APP: &str = "my-app";
const CUSTOMER: &str = "acme-corp";
const CLUSTER: &str = "aws_eks_cluster.main_cluster";

/// A release window that covers now: today and tomorrow (UTC) whole, so the test cannot
/// straddle its edge; the weekday is computed, not assumed.
fn window_covering_now() -> String {
    let now = Timestamp::now().to_zoned_datetime(TimeZone::UTC);
    let day = |d: jiff::civil::Weekday| match d {
        jiff::civil::Weekday::Monday => "Mon",
        jiff::civil::Weekday::Tuesday => "Tue",
        jiff::civil::Weekday::Wednesday => "Wed",
        jiff::civil::Weekday::Thursday => "Thu",
        jiff::civil::Weekday::Friday => "Fri",
        jiff::civil::Weekday::Saturday => "Sat",
        jiff::civil::Weekday::Sunday => "Sun",
    };
    let tomorrow = now
        .checked_add(1.day())
        .map(|t| t.weekday())
        .unwrap_or(now.weekday());
    format!("{},{} 00:00-24:00", day(now.weekday()), day(tomorrow))
}

fn agent_toml(upstream: &Path, policy: &str) -> String {
    let u = upstream.display();
    format!(
        "{policy}\n\
         [[resource]]\nid = \"{CLUSTER}\"\nkind = \"kubernetes\"\nkubeconfig = \"{u}\"\nnamespaces = [\"my-app-prod\"]\n\
         verbs = [\"get\", \"list\", \"watch\"]\n\
         impersonate = {{ user = \"vendor-operate\", groups = [\"vendor-troubleshooters\"] }}\n\n\
         [resource.phases.deploy]\n\
         impersonate = {{ user = \"vendor-deploy\", groups = [\"vendor-deployers\"] }}\n\n\
         [resource.phases.install]\n\
         impersonate = {{ user = \"vendor-install\", groups = [\"vendor-installers\"] }}\n"
    )
}

struct World {
    _dir: tempfile::TempDir,
    _api: KubeApiServer,
    gw: Gateway,
    agent: Agent,
    /// A customer approver.
    bob: String,
}

fn start(policy: &str) -> Result<World> {
    let dir = tempfile::tempdir()?;
    let api = KubeApiServer::start()?;
    let upstream = dir.path().join("upstream.kubeconfig");
    std::fs::write(&upstream, api.kubeconfig("default"))?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    let agent = Agent::online(
        &gw,
        &dir.path().join("agent"),
        APP,
        CUSTOMER,
        &agent_toml(&upstream, policy),
    )?;
    let bob = gw.mint_token("approver", "bob@acme.example", Some(CUSTOMER))?;
    Ok(World {
        _dir: dir,
        _api: api,
        gw,
        agent,
        bob,
    })
}

fn request(gw: &Gateway, level: &str) -> Result<Value> {
    gw.request_access(APP, CUSTOMER, level, "1h")
}

fn kubectl_op(gw: &Gateway, phase: &str, wait: bool) -> Result<Value> {
    let mut args = vec![
        "ops",
        "kubectl",
        "--app",
        APP,
        "--customer",
        CUSTOMER,
        "--origin-resource-id",
        CLUSTER,
        "--command",
        "kubectl get pods -n my-app-prod",
        "--phase",
        phase,
    ];
    if wait {
        args.push("--wait");
    }
    gw.cli(&args)?.ok()
}

fn audit(gw: &Gateway, appliance: &str) -> Result<Vec<Value>> {
    let out = gw
        .cli(&["audit", "list", "--appliance", appliance, "--limit", "1000"])?
        .ok()?;
    out["records"]
        .as_array()
        .cloned()
        .ok_or_else(|| anyhow!("no records in {out}"))
}

fn record_of<'a>(records: &'a [Value], kind: &str, op: &str) -> Option<&'a Value> {
    records
        .iter()
        .find(|r| r["kind"] == kind && r.to_string().contains(op))
}

#[test]
fn a_deploy_op_inside_its_release_window_runs_and_an_operate_op_waits_for_a_person() -> Result<()> {
    let policy = format!(
        "[policy]\napproval = \"manual\"\n\n[policy.deploy]\napproval = \"windows\"\nwindows = [\"{}\"]\n",
        window_covering_now()
    );
    let w = start(&policy)?;

    // The deploy grant is the window's decision; the operate grant waits for bob.
    let dg = request(&w.gw, "deploy")?;
    assert_eq!(dg["state"], "active", "{dg}");
    assert_eq!(dg["decided_by"], "policy:window", "{dg}");
    let og = request(&w.gw, "operate")?;
    assert_eq!(og["state"], "pending-approval", "{og}");
    let og = w.gw.cli_as(
        &w.bob,
        &[
            "approvals",
            "approve",
            og["id"].as_str().unwrap_or_default(),
        ],
    )?;
    assert!(og.success, "{:?}", og.json);

    // At the same moment: the deploy op runs on the window's approval (and its output is not
    // held: the deploy table's window is open) ...
    let deploy = kubectl_op(&w.gw, "deploy", true)?;
    assert_eq!(deploy["state"], "completed", "{deploy}");
    assert!(
        deploy["stdout"]
            .as_str()
            .is_some_and(|o| o.contains("web-1")),
        "{deploy}"
    );
    // ... and the operate op waits for a person.
    let operate = kubectl_op(&w.gw, "operate", false)?;
    assert_eq!(operate["state"], "pending-approval", "{operate}");
    let op_id = operate["id"].as_str().ok_or_else(|| anyhow!("{operate}"))?;

    // `approvals show` names the phase and the rule that left it to a person.
    let shown = w.gw.cli_as(&w.bob, &["approvals", "show", op_id])?.ok()?;
    assert_eq!(shown["phase"], "operate", "{shown}");
    assert_eq!(shown["policy_table"], "[policy]", "{shown}");
    assert_eq!(
        shown["rule"], "a person: [policy] approval = \"manual\"",
        "{shown}"
    );
    // Existing fields are kept.
    assert_eq!(shown["id"], op_id, "{shown}");
    assert_eq!(shown["kind"], "op", "{shown}");

    // The vendor trail: the deploy op approved by the window under [policy.deploy].
    let deploy_id = deploy["id"].as_str().ok_or_else(|| anyhow!("{deploy}"))?;
    let records = audit(&w.gw, &w.agent.appliance_id)?;
    let approved =
        record_of(&records, "op.approved", deploy_id).ok_or_else(|| anyhow!("{records:?}"))?;
    assert_eq!(approved["actor"], "policy:window", "{approved}");
    assert_eq!(approved["detail"]["phase"], "deploy", "{approved}");
    assert_eq!(
        approved["detail"]["rule"], "policy:window under [policy.deploy]",
        "{approved}"
    );
    let requested =
        record_of(&records, "op.requested", op_id).ok_or_else(|| anyhow!("{records:?}"))?;
    assert_eq!(
        requested["detail"]["rule"], "a person: [policy] approval = \"manual\"",
        "{requested}"
    );

    // The customer's trail: the agent ran the deploy op by its own [policy.deploy] window.
    let trail = w.agent.trail_when(|t| {
        t.iter()
            .any(|e| e["kind"] == "op.started" && e.to_string().contains(deploy_id))
    })?;
    let started = trail
        .iter()
        .find(|e| e["kind"] == "op.started" && e.to_string().contains(deploy_id))
        .ok_or_else(|| anyhow!("no op.started for {deploy_id}"))?;
    assert_eq!(started["detail"]["phase"], "deploy", "{started}");
    assert_eq!(
        started["detail"]["policy_table"], "[policy.deploy]",
        "{started}"
    );
    assert_eq!(
        started["detail"]["rule"], "policy:window under [policy.deploy]",
        "{started}"
    );

    // Bob approves the operate op: it runs, and both trails say a person decided.
    let decided = w.gw.cli_as(&w.bob, &["approvals", "approve", op_id])?;
    assert!(decided.success, "{:?}", decided.json);
    let trail = w.agent.trail_when(|t| {
        t.iter()
            .any(|e| e["kind"] == "op.started" && e.to_string().contains(op_id))
    })?;
    let started = trail
        .iter()
        .find(|e| e["kind"] == "op.started" && e.to_string().contains(op_id))
        .ok_or_else(|| anyhow!("no op.started for {op_id}"))?;
    assert_eq!(started["detail"]["phase"], "operate", "{started}");
    assert_eq!(
        started["detail"]["command_approved_by"], "bob@acme.example",
        "{started}"
    );
    assert_eq!(
        started["detail"]["rule"], "a person: [policy] approval = \"manual\"",
        "{started}"
    );
    let records = audit(&w.gw, &w.agent.appliance_id)?;
    let approved = records
        .iter()
        .find(|r| {
            r["kind"] == "op.approved"
                && r.to_string().contains(op_id)
                && r["detail"]["stage"] == "command"
        })
        .ok_or_else(|| anyhow!("{records:?}"))?;
    assert_eq!(
        approved["detail"]["rule"], "a person (bob@acme.example)",
        "{approved}"
    );
    Ok(())
}

#[test]
fn install_waits_for_a_person_even_under_an_automatic_policy() -> Result<()> {
    let w = start("[policy]\napproval = \"automatic\"\n")?;

    // Operate is automatic here, the install grant is not.
    let og = request(&w.gw, "operate")?;
    assert_eq!(og["state"], "active", "{og}");
    let ig = request(&w.gw, "install")?;
    assert_eq!(ig["state"], "pending-approval", "{ig}");
    let ig_id = ig["id"].as_str().ok_or_else(|| anyhow!("{ig}"))?;
    let shown = w.gw.cli_as(&w.bob, &["approvals", "show", ig_id])?.ok()?;
    assert_eq!(shown["phase"], "install", "{shown}");
    assert!(
        shown["rule"]
            .as_str()
            .is_some_and(|r| r.contains("install")),
        "{shown}"
    );
    let ig =
        w.gw.cli_as(&w.bob, &["approvals", "approve", ig_id])?
            .ok()?;
    assert_eq!(ig["state"], "active", "{ig}");

    // An install op waits too, under a live install grant and an automatic policy.
    let op = kubectl_op(&w.gw, "install", false)?;
    assert_eq!(op["state"], "pending-approval", "{op}");
    let op_id = op["id"].as_str().ok_or_else(|| anyhow!("{op}"))?;
    let shown = w.gw.cli_as(&w.bob, &["approvals", "show", op_id])?.ok()?;
    assert_eq!(shown["phase"], "install", "{shown}");
    assert_eq!(
        shown["rule"],
        "a person: install is approved by a person for each use, whatever the policy",
        "{shown}"
    );
    // An operate op at the same moment runs on the automatic policy.
    let operate = kubectl_op(&w.gw, "operate", true)?;
    assert_eq!(operate["state"], "completed", "{operate}");
    let operate_id = operate["id"].as_str().ok_or_else(|| anyhow!("{operate}"))?;
    let records = audit(&w.gw, &w.agent.appliance_id)?;
    let approved =
        record_of(&records, "op.approved", operate_id).ok_or_else(|| anyhow!("{records:?}"))?;
    assert_eq!(approved["actor"], "policy:automatic", "{approved}");
    assert_eq!(
        approved["detail"]["rule"], "policy:automatic under [policy]",
        "{approved}"
    );

    // Once bob approves, the install op runs, and the agent's trail names phase and rule.
    let decided = w.gw.cli_as(&w.bob, &["approvals", "approve", op_id])?;
    assert!(decided.success, "{:?}", decided.json);
    let trail = w.agent.trail_when(|t| {
        t.iter()
            .any(|e| e["kind"] == "op.started" && e.to_string().contains(op_id))
    })?;
    let started = trail
        .iter()
        .find(|e| e["kind"] == "op.started" && e.to_string().contains(op_id))
        .ok_or_else(|| anyhow!("no op.started for {op_id}: {trail:?}"))?;
    assert_eq!(started["detail"]["phase"], "install", "{started}");
    assert!(
        started["detail"]["rule"]
            .as_str()
            .is_some_and(|r| r.contains("install is approved by a person")),
        "{started}"
    );
    Ok(())
}

#[test]
fn a_policy_table_for_no_phase_or_an_automatic_install_is_refused_clearly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    for (policy_no, policy, says) in [
        (
            "[policy]\napproval = \"manual\"\n[policy.deplyo]\napproval = \"automatic\"\n",
            "deplyo",
        ),
        (
            "[policy]\napproval = \"manual\"\n[policy.steady-state]\napproval = \"automatic\"\n",
            "[policy.steady-state] is not a policy table",
        ),
        (
            "[policy]\napproval = \"manual\"\n[policy.install]\napproval = \"automatic\"\n",
            "install is approved by a person for each use",
        ),
        (
            "[policy]\napproval = \"manual\"\n[policy.deploy]\napproval = \"windows\"\nwindows = [\"Sat 2:00-06:00\"]\n",
            "[policy.deploy] windows",
        ),
        (
            "[policy]\napproval = \"manual\"\n[policy.deploy]\napprovl = \"windows\"\n",
            "approvl",
        ),
    ]
    .iter()
    .enumerate()
    .map(|(i, (p, s))| (i, *p, *s))
    .collect::<Vec<_>>()
    {
        // Enrolling reads the config the way `run` does, and refuses it before anything else.
        let agent_dir = dir.path().join(format!("agent-{policy_no}"));
        let customer = format!("customer-{policy_no}");
        let err = match Agent::enroll(&gw, &agent_dir, APP, &customer, policy) {
            Ok(_) => return Err(anyhow!("the agent took {policy:?}")),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(says), "{policy:?}: {err}");
    }
    Ok(())
}
