//! End to end, real `postern server` and `postern-agent` processes: the customer trail holds
//! every request, decision and outcome concerning the appliance, also for ops that never ran
//! (denied, or expired before dispatch), and also for those decided while the agent was stopped:
//! once it is started again every record arrives, in the gateway's order, numbered without a
//! gap and none twice.

use anyhow::{anyhow, bail, Result};
use postern::testbed::{bin, id_of, wait_until, Agent, Gateway};
use serde_json::Value;
use std::{os::unix::fs::PermissionsExt, path::Path, process::Command, time::Duration};

const APP: &str = "trail-app";
const CUSTOMER: &str = "acme-corp";
const CLUSTER: &str = "aws_eks_cluster.main";

/// The kinds the gateway puts in the customer trail (endpoint_types::customer_trail).
const GATEWAY_KINDS: [&str; 18] = [
    "grant.requested",
    "grant.approved",
    "grant.denied",
    "grant.revoked",
    "grant.expired",
    "op.requested",
    "op.approved",
    "op.denied",
    "op.expired",
    "op.requeued",
    "output.approved",
    "output.denied",
    "endpoint.requested",
    "endpoint.created",
    "endpoint.denied",
    "endpoint.retired",
    "endpoint.expired",
    "appliance.revoked",
];

fn agent_body(dir: &Path) -> Result<String> {
    let kubectl = dir.join("kubectl");
    std::fs::write(&kubectl, "#!/bin/sh\necho \"args: $*\"\n")?;
    std::fs::set_permissions(&kubectl, std::fs::Permissions::from_mode(0o755))?;
    let kubeconfig = dir.join("cluster.kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n")?;
    Ok(format!(
        "[policy]\napproval = \"manual\"\n\n[tools]\nkubectl = \"{}\"\n\n\
         [[resource]]\nid = \"{CLUSTER}\"\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespaces = [\"prod\"]\n",
        kubectl.display(),
        kubeconfig.display()
    ))
}

fn request_grant(gw: &Gateway, who: &str) -> Result<String> {
    request_grant_for(gw, who, "30m")
}

fn request_grant_for(gw: &Gateway, who: &str, duration: &str) -> Result<String> {
    let g = gw
        .cli_as(
            who,
            &[
                "access",
                "request",
                "--app",
                APP,
                "--customer",
                CUSTOMER,
                "--level",
                "operate",
                "--duration",
                duration,
                "--reason",
                "INC-7",
            ],
        )?
        .ok()?;
    assert_eq!(g["state"], "pending-approval", "{g}");
    id_of(&g)
}

fn request_op(gw: &Gateway, who: &str) -> Result<String> {
    let o = gw
        .cli_as(
            who,
            &[
                "ops",
                "kubectl",
                "--app",
                APP,
                "--customer",
                CUSTOMER,
                "--origin-resource-id",
                CLUSTER,
                "--command",
                "kubectl get pods",
            ],
        )?
        .ok()?;
    assert_eq!(o["state"], "pending-approval", "{o}");
    id_of(&o)
}

fn op_state(gw: &Gateway, who: &str, op: &str) -> Result<String> {
    // `ops get` of an op that ended badly exits non-zero by design; the record is still printed.
    Ok(gw.cli_as(who, &["ops", "get", op])?.json["state"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// The vendor trail's records that concern the appliance and go to its customer trail, as
/// (seq, kind) in order.
fn vendor_events(gw: &Gateway, appliance: &str) -> Result<Vec<(i64, String)>> {
    let list = gw
        .cli(&["audit", "list", "--appliance", appliance, "--limit", "1000"])?
        .ok()?;
    Ok(list["records"]
        .as_array()
        .ok_or_else(|| anyhow!("no records in {list}"))?
        .iter()
        .filter(|r| GATEWAY_KINDS.contains(&r["kind"].as_str().unwrap_or_default()))
        .map(|r| {
            (
                r["seq"].as_i64().unwrap_or(-1),
                r["kind"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// The gateway's records in the customer trail as (number, gateway seq, kind), in trail order.
fn trail_events(trail: &[Value]) -> Vec<(u64, i64, String)> {
    trail
        .iter()
        .filter(|r| GATEWAY_KINDS.contains(&r["kind"].as_str().unwrap_or_default()))
        .map(|r| {
            (
                r["detail"]["gateway_number"].as_u64().unwrap_or(0),
                r["detail"]["gateway_seq"].as_i64().unwrap_or(-1),
                r["kind"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The customer trail holds exactly the vendor trail's events for the appliance, in order,
/// numbered 1, 2, 3 … once each.
fn assert_complete(gw: &Gateway, agent: &Agent) -> Result<Vec<Value>> {
    let vendor = vendor_events(gw, &agent.appliance_id)?;
    let trail = agent.trail_when(|t| trail_events(t).len() >= vendor.len())?;
    let got = trail_events(&trail);
    let want: Vec<(u64, i64, String)> = vendor
        .iter()
        .enumerate()
        .map(|(i, (seq, kind))| (i as u64 + 1, *seq, kind.clone()))
        .collect();
    assert_eq!(got, want, "the customer trail against the vendor trail");
    Ok(trail)
}

fn agent_cli(agent: &Agent, args: &[&str]) -> Result<Value> {
    let out = Command::new(bin("postern-agent")?)
        .args(["--output", "json"])
        .args(args)
        .arg("--config")
        .arg(&agent.config)
        .output()?;
    if !out.status.success() {
        bail!(
            "postern-agent {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn find<'a>(trail: &'a [Value], kind: &str, op: &str) -> Result<&'a Value> {
    trail
        .iter()
        .find(|r| r["kind"] == kind && r["op_id"] == op)
        .ok_or_else(|| anyhow!("no {kind} for {op} in the customer trail"))
}

/// A gateway, the appliance's agent online (manual policy), an operator and the customer's
/// approver.
struct Setup {
    gw: Gateway,
    agent: Agent,
    alice: String,
    bob: String,
}

fn set_up(dir: &Path) -> Result<Setup> {
    let gw = Gateway::start(&dir.join("gw"))?;
    let agent_dir = dir.join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let agent = Agent::online(&gw, &agent_dir, APP, CUSTOMER, &agent_body(&agent_dir)?)?;
    let alice = gw.mint_token("operator", "alice@vendor.example", None)?;
    let bob = gw.mint_token("approver", "bob@acme.example", Some(CUSTOMER))?;
    Ok(Setup {
        gw,
        agent,
        alice,
        bob,
    })
}

#[test]
fn the_customer_trail_holds_requests_and_denials_of_ops_that_never_ran_across_an_agent_restart(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Setup {
        gw,
        mut agent,
        alice,
        bob,
    } = set_up(dir.path())?;

    // Online: a grant approved by a person, an op denied, an op that expires before dispatch
    // (its grant is revoked before anyone approves it).
    let grant = request_grant(&gw, &alice)?;
    gw.cli_as(&bob, &["approvals", "approve", &grant])?.ok()?;
    let denied = request_op(&gw, &alice)?;
    gw.cli_as(
        &bob,
        &["approvals", "deny", &denied, "--message", "not now"],
    )?
    .ok()?;
    let late = request_op(&gw, &alice)?;
    gw.cli_as(&bob, &["access", "revoke", &grant])?.ok()?;
    gw.cli_as(&bob, &["approvals", "approve", &late])?.ok()?;
    assert!(wait_until(Duration::from_secs(30), || {
        op_state(&gw, &alice, &late).is_ok_and(|s| s == "expired")
    }));
    let trail = assert_complete(&gw, &agent)?;
    let d = find(&trail, "op.denied", &denied)?;
    assert_eq!(d["actor"], "bob@acme.example");
    assert_eq!(d["detail"]["detail"]["message"], "not now");
    find(&trail, "op.requested", &denied)?;
    find(&trail, "op.expired", &late)?;
    // None of them ran in the appliance.
    assert!(!trail
        .iter()
        .any(|r| r["kind"] == "op.started" || r["kind"] == "op.dispatched"));

    // Two more ops wait while the appliance is online (ops need it online to be requested);
    // the agent is then stopped, and they are decided while it is down.
    let grant2 = request_grant(&gw, &alice)?;
    gw.cli_as(&bob, &["approvals", "approve", &grant2])?.ok()?;
    let denied_offline = request_op(&gw, &alice)?;
    let late_offline = request_op(&gw, &alice)?;
    let before_stop = vendor_events(&gw, &agent.appliance_id)?.len();
    agent.trail_when(|t| trail_events(t).len() >= before_stop)?;
    agent.stop();
    assert!(wait_until(Duration::from_secs(30), || {
        gw.appliance(&agent.appliance_id)
            .is_ok_and(|a| a["online"] == false)
    }));
    gw.cli_as(
        &bob,
        &[
            "approvals",
            "deny",
            &denied_offline,
            "--message",
            "while you were away",
        ],
    )?
    .ok()?;
    gw.cli_as(&bob, &["access", "revoke", &grant2])?.ok()?;
    gw.cli_as(&bob, &["approvals", "approve", &late_offline])?
        .ok()?;
    assert!(wait_until(Duration::from_secs(30), || {
        op_state(&gw, &alice, &late_offline).is_ok_and(|s| s == "expired")
    }));
    let denied_grant = request_grant(&gw, &alice)?;
    gw.cli_as(&bob, &["approvals", "deny", &denied_grant])?
        .ok()?;
    let waiting_grant = request_grant(&gw, &alice)?;
    let while_down = vendor_events(&gw, &agent.appliance_id)?.len() - before_stop;
    assert!(
        while_down >= 6,
        "{while_down} records made while the agent was down"
    );

    // Started again: everything arrives, in order, without a gap or a repeat.
    agent.run()?;
    assert!(gw.wait_online(&agent.appliance_id, Duration::from_secs(30)));
    let trail = assert_complete(&gw, &agent)?;
    let d = find(&trail, "op.denied", &denied_offline)?;
    assert_eq!(d["detail"]["detail"]["message"], "while you were away");
    find(&trail, "op.expired", &late_offline)?;
    assert!(trail.iter().any(|r| r["kind"] == "grant.denied"
        && r["detail"]["detail"]["grant_id"] == denied_grant.as_str()));
    assert!(trail.iter().any(|r| r["kind"] == "grant.requested"
        && r["detail"]["detail"]["grant_id"] == waiting_grant.as_str()));

    // A second restart with nothing new records nothing twice; new records go on from there.
    agent.stop();
    agent.run()?;
    assert!(gw.wait_online(&agent.appliance_id, Duration::from_secs(30)));
    gw.cli_as(&bob, &["approvals", "deny", &waiting_grant])?
        .ok()?;
    assert_complete(&gw, &agent)?;

    // What the customer reads: typed kinds, the numbers complete; the chain still verifies.
    let listing = agent_cli(&agent, &["audit", "requests"])?;
    let n = vendor_events(&gw, &agent.appliance_id)?.len() as u64;
    assert_eq!(listing["last_number"], n, "{listing}");
    assert_eq!(listing["missing"], Value::Array(vec![]), "{listing}");
    assert_eq!(listing["repeated"], Value::Array(vec![]), "{listing}");
    let kinds: Vec<&str> = listing["records"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["kind"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        kinds.contains(&"op.denied") && kinds.contains(&"op.expired"),
        "{kinds:?}"
    );
    let verified = agent.verify_trail()?.ok()?;
    assert_eq!(verified["ok"], true, "{verified}");
    Ok(())
}

#[test]
fn a_grant_that_runs_out_while_the_agent_is_away_reaches_the_customer_trail_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Setup {
        gw,
        mut agent,
        alice,
        bob,
    } = set_up(dir.path())?;

    let grant = request_grant_for(&gw, &alice, "10s")?;
    gw.cli_as(&bob, &["approvals", "approve", &grant])?.ok()?;
    let before_stop = vendor_events(&gw, &agent.appliance_id)?.len();
    agent.trail_when(|t| trail_events(t).len() >= before_stop)?;
    agent.stop();

    // The gateway records the expiry once, by its own clock, while the agent is stopped.
    let appliance = agent.appliance_id.clone();
    let expired = |gw: &Gateway| -> Result<Vec<(i64, String)>> {
        Ok(vendor_events(gw, &appliance)?
            .into_iter()
            .filter(|(_, kind)| kind == "grant.expired")
            .collect())
    };
    assert!(wait_until(Duration::from_secs(40), || {
        expired(&gw).is_ok_and(|e| !e.is_empty())
    }));
    let listed = gw.cli_as(&alice, &["access", "list"])?.ok()?;
    let state = listed["grants"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["id"] == grant.as_str()))
        .map(|g| g["state"].clone());
    assert_eq!(state, Some(Value::from("expired")), "{listed}");

    // Started again, the customer trail gets it, numbered after what it held.
    agent.run()?;
    assert!(gw.wait_online(&agent.appliance_id, Duration::from_secs(30)));
    let trail = assert_complete(&gw, &agent)?;
    let records: Vec<&Value> = trail
        .iter()
        .filter(|r| r["kind"] == "grant.expired")
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["actor"], "system:gateway");
    assert_eq!(records[0]["detail"]["detail"]["grant_id"], grant.as_str());
    assert_eq!(expired(&gw)?.len(), 1, "recorded once");
    let verified = agent.verify_trail()?.ok()?;
    assert_eq!(verified["ok"], true, "{verified}");
    Ok(())
}
