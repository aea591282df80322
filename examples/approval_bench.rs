//! What a signed approval adds to an op at the agent: the appliance's check of an approver's
//! decision (binding, Ed25519 signature, single use, the used-statement record on disk) beside
//! the unsigned path, in the same run and on the same dispatches.
//!
//! `cargo run --release --example approval_bench` prints one JSON line; the goal is at most
//! 1 ms added per op (`added_us_p99`).

use anyhow::{anyhow, Result};
use certs::approver::ApproverKey;
use endpoint_types::{
    approval::{ApprovalStatement, DecidedContent, Decision},
    control::OpTool,
    frame::OpDispatch,
};
use jiff::{SignedDuration, Timestamp};
use std::time::Instant;
use tunnel_client::{approval_check::SignedApprovals, config::AgentConfig};

const OPS: usize = 2000;

fn config(dir: &std::path::Path, approver: Option<&ApproverKey>) -> Result<AgentConfig> {
    let mut text = format!(
        "audit_path = \"{}\"\nappliance_id = \"ap_bench\"\n",
        dir.join("audit.jsonl").display()
    );
    if let Some(k) = approver {
        text.push_str(&format!(
            "[[approver]]\nname = \"bob@customer.example\"\npublic_key = \"{}\"\n",
            k.public().to_line("")
        ));
    }
    AgentConfig::parse(&text, &dir.join("agent.toml")).map_err(|e| anyhow!("{e}"))
}

fn dispatch(i: usize) -> OpDispatch {
    OpDispatch {
        phase: endpoint_types::phase::operate(),
        op_id: format!("op_{i:06}"),
        tool: OpTool::Kubectl,
        command: format!("kubectl get pods -n my-app-prod -l run={i} -o wide"),
        resource_id: "aws_eks_cluster.main".into(),
        timeout_s: 300,
        operator: "alice@vendor.example".into(),
        grant_id: "gr_1".into(),
        command_approved_by: "token:bob".into(),
        command_approved_at: Timestamp::now(),
        hold_output: false,
        signed_decision: None,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0.0)
}

/// Times `check` over every dispatch, in microseconds, sorted.
fn timed(ds: &[OpDispatch], check: impl Fn(&OpDispatch) -> bool) -> Result<Vec<f64>> {
    let mut us = Vec::with_capacity(ds.len());
    for d in ds {
        let t = Instant::now();
        if !check(d) {
            return Err(anyhow!("{} was refused", d.op_id));
        }
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    us.sort_by(f64::total_cmp);
    Ok(us)
}

fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (bob, _) = ApproverKey::generate()?;
    let now = Timestamp::now();
    // The approver signs ahead (on their machine): not the agent's cost.
    let signed: Vec<OpDispatch> = (0..OPS)
        .map(|i| {
            let d = dispatch(i);
            let content =
                DecidedContent::op_command(d.tool, &d.command, &d.resource_id, d.timeout_s)?;
            let statement = ApprovalStatement {
                record_id: d.op_id.clone(),
                appliance_id: "ap_bench".into(),
                decision: Decision::Approve,
                content,
                issued_at: now,
                not_after: now + SignedDuration::from_hours(1),
                key_id: String::new(),
            };
            Ok(OpDispatch {
                signed_decision: Some(bob.sign(statement)),
                ..d
            })
        })
        .collect::<Result<_>>()?;
    let unsigned: Vec<OpDispatch> = (0..OPS).map(dispatch).collect();

    let with_keys = SignedApprovals::from_config(&config(dir.path(), Some(&bob))?, now);
    let open_dir = tempfile::tempdir()?;
    let without = SignedApprovals::from_config(&config(open_dir.path(), None)?, now);
    let unsigned_us = timed(&unsigned, |d| {
        without.check_op(d, true, Timestamp::now()).is_ok()
    })?;
    let signed_us = timed(&signed, |d| {
        with_keys.check_op(d, true, Timestamp::now()).is_ok()
    })?;
    // Every statement is now used: a second pass is all refusals (the replay path's cost).
    let replay = Instant::now();
    let refused = signed
        .iter()
        .filter(|d| with_keys.check_op(d, true, Timestamp::now()).is_err())
        .count();
    let replay_us = replay.elapsed().as_secs_f64() * 1e6 / OPS as f64;
    if refused != OPS {
        return Err(anyhow!("only {refused} of {OPS} replays were refused"));
    }

    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let added_p50 = percentile(&signed_us, 0.5) - percentile(&unsigned_us, 0.5);
    let added_p99 = percentile(&signed_us, 0.99) - percentile(&unsigned_us, 0.99);
    println!(
        "{}",
        serde_json::json!({
            "bench": "approval",
            "ops": OPS,
            "unsigned_us_p50": percentile(&unsigned_us, 0.5),
            "unsigned_us_p99": percentile(&unsigned_us, 0.99),
            "signed_us_p50": percentile(&signed_us, 0.5),
            "signed_us_p99": percentile(&signed_us, 0.99),
            "signed_us_mean": mean(&signed_us),
            "replay_refusal_us_mean": replay_us,
            "added_us_p50": added_p50,
            "added_us_p99": added_p99,
            "goal_us": 1000,
            "within_goal": added_p99 <= 1000.0,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        })
    );
    Ok(())
}
