//! End to end: the customer's approver keys are the root of trust for what its policy reserves
//! for a person. A gateway whose store is edited (a rogue or compromised vendor gateway), a
//! replayed approval, a tampered argv, a statement for another appliance, an expired statement
//! and an unknown key each get nothing run in the appliance, a `denied` record with the reason
//! in the customer trail, and `APPROVAL_INVALID` for the operator.

use anyhow::{anyhow, bail, Context, Result};
use endpoint_types::approval::ApprovalStatement;
use postern::approver::{self, Approver};
use postern::testbed::*;
use serde_json::Value;
use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

const CLUSTER: &str = "aws_eks_cluster.main";
const CUSTOMER: &str = "acme-corp";

/// A `kubectl` that only notes each run (its arguments) in `runs`.
fn recording_kubectl(dir: &Path) -> Result<std::path::PathBuf> {
    let p = dir.join("kubectl");
    let runs = dir.join("runs.log");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\necho \"$*\" >> \"{}\"\necho \"NAME READY STATUS\"\n",
            runs.display()
        ),
    )?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

fn runs(agent_dir: &Path) -> String {
    std::fs::read_to_string(agent_dir.join("runs.log")).unwrap_or_default()
}

struct Setup {
    gw: Gateway,
    agent: Agent,
    agent_dir: std::path::PathBuf,
    /// Bob, the customer's one approver.
    bob: Approver,
}

fn start(dir: &Path) -> Result<Setup> {
    let gw = Gateway::start(&dir.join("gw"))?;
    let bob = Approver::create(&gw, dir, "bob", CUSTOMER)?;
    let bob_line = &bob.public_key;
    let agent_dir = dir.join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let kubectl = recording_kubectl(&agent_dir)?;
    let kubeconfig = agent_dir.join("cluster.kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n")?;
    let body = format!(
        "[policy]\napproval = \"manual\"\n\n[tools]\nkubectl = \"{}\"\n\n\
         [[approver]]\nname = \"bob@acme-corp.example\"\npublic_key = \"{bob_line}\"\n\n\
         [[resource]]\nid = \"{CLUSTER}\"\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespaces = [\"my-app-prod\"]\n",
        kubectl.display(),
        kubeconfig.display()
    );
    let agent = Agent::online(&gw, &agent_dir, "my-app", CUSTOMER, &body)?;
    // Operate access, approved by Bob with his key (the appliance honours the grant only so).
    let grant = gw.request_operate("my-app", CUSTOMER, "1h")?;
    let gid = grant["id"].as_str().unwrap_or_default().to_string();
    bob.approve(&gw, &gid)?;
    Ok(Setup {
        gw,
        agent,
        agent_dir,
        bob,
    })
}

impl Setup {
    fn op(&self, command: &str) -> Result<String> {
        let v = self
            .gw
            .cli(&[
                "ops",
                "kubectl",
                "--app",
                "my-app",
                "--customer",
                CUSTOMER,
                "--origin-resource-id",
                CLUSTER,
                "--command",
                command,
            ])?
            .ok()?;
        if v["state"] != "pending-approval" {
            bail!("op not waiting for approval: {v}");
        }
        Ok(v["id"].as_str().unwrap_or_default().to_string())
    }

    fn bob(&self, args: &[&str]) -> Result<CliOutput> {
        self.bob.cli(&self.gw, args)
    }

    fn wait_state(&self, op_id: &str, state: &str) -> Result<Value> {
        let mut last = Value::Null;
        let ok = wait_until(Duration::from_secs(30), || {
            last = self
                .gw
                .cli(&["ops", "get", op_id])
                .map(|o| o.json)
                .unwrap_or(Value::Null);
            last["state"] == state
        });
        if ok {
            Ok(last)
        } else {
            Err(anyhow!("op {op_id} never reached {state}: {last}"))
        }
    }

    /// SQL on the gateway's own store, as someone with write access to it would run it.
    fn sql(&self, statement: &str) -> Result<()> {
        self.gw.store_sql(statement).map(drop)
    }

    /// Marks an op approved by Bob in the store, as the approvals service would.
    fn mark_approved(&self, op_id: &str) -> Result<()> {
        let now = jiff::Timestamp::now().as_millisecond();
        self.sql(&format!(
            "UPDATE ops SET state = 'approved', command_approved_by = 'token:bob', command_approved_at = {now}, \
             finished_at = NULL, started_at = NULL, exit_code = NULL, error = NULL WHERE id = '{op_id}';"
        ))
    }

    /// Puts a signed decision in the store for `op_id`, as the gateway keeps one.
    fn store_signed(
        &self,
        op_id: &str,
        signed: &endpoint_types::approval::SignedDecision,
    ) -> Result<()> {
        let text = serde_json::to_string(signed)?.replace('\'', "''");
        self.sql(&format!(
            "INSERT OR REPLACE INTO signed_decisions (record_id, stage, signed, stored_at) VALUES ('{op_id}', 'command', '{text}', 0);"
        ))
    }

    /// The statement the gateway offers for `op_id`.
    fn offered(&self, op_id: &str) -> Result<ApprovalStatement> {
        let v = self.bob(&["approvals", "show", op_id])?.ok()?;
        serde_json::from_value(v["statement"].clone())
            .with_context(|| format!("no statement in {v}"))
    }

    /// Restarts the agent: the gateway sends it the approved ops that wait for it.
    fn restart_agent(&mut self) -> Result<()> {
        self.agent.stop();
        self.wait_offline()?;
        self.agent.run()?;
        if !self
            .gw
            .wait_online(&self.agent.appliance_id, Duration::from_secs(30))
        {
            bail!("agent did not come back");
        }
        Ok(())
    }

    fn wait_offline(&self) -> Result<()> {
        let id = self.agent.appliance_id.clone();
        if !wait_until(Duration::from_secs(30), || {
            self.gw
                .appliance(&id)
                .map(|a| a["online"] == false)
                .unwrap_or(false)
        }) {
            bail!("the gateway still sees the agent online");
        }
        Ok(())
    }

    /// The op was refused in the appliance: denied, APPROVAL_INVALID with `reason` for the
    /// operator, and a `denied` record with the reason in the customer trail; it started in the
    /// appliance no more than the `ran_before` times it had.
    fn assert_refused(&self, op_id: &str, reason: &str, ran_before: usize) -> Result<()> {
        let op = self.wait_state(op_id, "denied")?;
        assert_eq!(op["error"]["code"], "APPROVAL_INVALID", "{op}");
        assert_eq!(op["error"]["details"]["reason"], reason, "{op}");
        assert!(
            op["error"]["hint"]
                .as_str()
                .unwrap_or_default()
                .contains("--key"),
            "{op}"
        );
        let denied = |t: &[Value]| {
            t.iter().any(|r| {
                r["kind"] == "denied"
                    && r["op_id"] == op_id
                    && r["detail"]["reason"] == "APPROVAL_INVALID"
                    && r["detail"]["approval"] == reason
            })
        };
        let trail = self.agent.trail_when(denied)?;
        assert!(
            denied(&trail),
            "no denial of {op_id} ({reason}) in the customer trail"
        );
        let started = trail
            .iter()
            .filter(|r| r["op_id"] == op_id && r["kind"] == "op.started")
            .count();
        assert_eq!(started, ran_before, "{op_id} started in the appliance");
        Ok(())
    }
}

#[test]
fn a_rogue_gateway_cannot_run_what_the_customer_reserved_for_a_person() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = start(dir.path())?;

    // The statement Bob signs names the argv the appliance will run.
    let good = s.op("kubectl get pods -n my-app-prod")?;
    let shown = s.bob(&["approvals", "show", &good])?.ok()?;
    assert_eq!(shown["signature_required"], true, "{shown}");
    assert_eq!(
        shown["statement"]["content"]["argv"],
        serde_json::json!(["kubectl", "get", "pods", "-n", "my-app-prod"])
    );
    assert!(shown["canonical"]
        .as_str()
        .unwrap_or_default()
        .starts_with("postern-approval-v1\n"));
    // Unsigned, the gateway refuses at once with the way to sign.
    let unsigned = s.bob(&["approvals", "approve", &good])?;
    assert_eq!(
        unsigned.error_code(),
        Some("APPROVAL_INVALID"),
        "{}",
        unsigned.json
    );
    assert!(unsigned.json["error"]["hint"]
        .as_str()
        .unwrap_or_default()
        .contains("approvals key create"));
    // Signed with Bob's key, it runs, and the trail names Bob as the signer.
    let key = s.bob.key_path.display().to_string();
    s.bob(&["approvals", "approve", &good, "--key", &key])?
        .ok()?;
    // The manual policy holds the output: its release binds the digest of what Bob sees.
    s.wait_state(&good, "output-pending-approval")?;
    assert!(runs(&s.agent_dir).contains("get pods -n my-app-prod"));
    let held = s.bob(&["approvals", "show", &good])?.ok()?;
    assert_eq!(held["stage"], "output", "{held}");
    assert_eq!(held["statement"]["content"]["kind"], "op_output", "{held}");
    let digest = held["statement"]["content"]["output_sha256"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        digest,
        certs::approver::output_sha256(
            held["output"]["stdout"].as_str().unwrap_or_default(),
            held["output"]["stderr"].as_str().unwrap_or_default()
        )
    );
    let unsigned = s.bob(&["approvals", "approve", &good])?;
    assert_eq!(
        unsigned.error_code(),
        Some("APPROVAL_INVALID"),
        "{}",
        unsigned.json
    );
    s.bob(&["approvals", "approve", &good, "--key", &key])?
        .ok()?;
    let done = s.wait_state(&good, "completed")?;
    assert!(done["stdout"]
        .as_str()
        .unwrap_or_default()
        .contains("NAME READY STATUS"));
    let released = |t: &[Value]| {
        t.iter().any(|r| {
            r["kind"] == "approval.verified"
                && r["op_id"] == good.as_str()
                && r["detail"]["stage"] == "output"
        })
    };
    assert!(released(&s.agent.trail_when(released)?));
    let verified = |t: &[Value]| {
        t.iter().any(|r| {
            r["kind"] == "approval.verified"
                && r["op_id"] == good.as_str()
                && r["detail"]["approver"] == "bob@acme-corp.example"
        })
    };
    assert!(verified(&s.agent.trail_when(verified)?));

    // The rogue edits: ops marked approved by a person with no signature, with the signature
    // of another op, and the op that already ran sent again with its own signature.
    let unsigned_op = s.op("kubectl delete pods --all")?;
    let borrowed = s.op("kubectl delete deployments --all")?;
    s.agent.stop();
    s.wait_offline()?;
    s.mark_approved(&unsigned_op)?;
    s.sql(&format!(
        "INSERT INTO signed_decisions (record_id, stage, signed, stored_at) \
         SELECT '{borrowed}', stage, signed, stored_at FROM signed_decisions WHERE record_id = '{good}';"
    ))?;
    s.mark_approved(&borrowed)?;
    s.mark_approved(&good)?;
    s.restart_agent()?;

    s.assert_refused(&unsigned_op, "missing", 0)?;
    s.assert_refused(&borrowed, "wrong_record", 0)?;
    s.assert_refused(&good, "replayed", 1)?;
    let ran = runs(&s.agent_dir);
    assert!(!ran.contains("delete"), "a refused op ran: {ran}");
    assert_eq!(ran.lines().count(), 1, "{ran}");
    assert!(s.agent.verify_trail()?.success);
    Ok(())
}

#[test]
fn a_tampered_argv_another_appliance_an_expired_statement_and_an_unknown_key_are_refused(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = start(dir.path())?;
    let (_, eve) = approver::make_key(&s.gw, &dir.path().join("eve").join("approver.key"))?;
    let key = s.bob.key_path.display().to_string();

    let tampered = s.op("kubectl get pods")?;
    let foreign = s.op("kubectl get pods")?;
    let expired = s.op("kubectl get pods")?;
    let unknown = s.op("kubectl get pods")?;
    let statements: Vec<ApprovalStatement> = [&foreign, &expired, &unknown]
        .iter()
        .map(|id| s.offered(id))
        .collect::<Result<_>>()?;

    // The gateway itself refuses a decision signed by a key the appliance does not list.
    let eve_path = dir.path().join("eve").join("approver.key");
    let refused = s.bob(&[
        "approvals",
        "approve",
        &unknown,
        "--key",
        &eve_path.display().to_string(),
    ])?;
    assert_eq!(
        refused.error_code(),
        Some("APPROVAL_INVALID"),
        "{}",
        refused.json
    );
    assert_eq!(refused.json["error"]["details"]["reason"], "unknown_key");

    s.agent.stop();
    s.wait_offline()?;
    // Bob approves `get pods` (the appliance is offline: it waits); then the store's command
    // is changed to something else.
    s.bob(&["approvals", "approve", &tampered, "--key", &key])?
        .ok()?;
    s.sql(&format!(
        "UPDATE ops SET command = 'kubectl delete pods --all' WHERE id = '{tampered}';"
    ))?;
    // A statement Bob signed for another appliance.
    let mut other = statements[0].clone();
    other.appliance_id = "ap_elsewhere".into();
    s.store_signed(&foreign, &s.bob.key.sign(other))?;
    s.mark_approved(&foreign)?;
    // One that expired an hour ago.
    let mut old = statements[1].clone();
    old.issued_at = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(2);
    old.not_after = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    s.store_signed(&expired, &s.bob.key.sign(old))?;
    s.mark_approved(&expired)?;
    // One signed by a key the appliance does not list.
    s.store_signed(&unknown, &eve.sign(statements[2].clone()))?;
    s.mark_approved(&unknown)?;
    s.restart_agent()?;

    s.assert_refused(&tampered, "content_mismatch", 0)?;
    s.assert_refused(&foreign, "wrong_appliance", 0)?;
    s.assert_refused(&expired, "expired", 0)?;
    s.assert_refused(&unknown, "unknown_key", 0)?;
    assert_eq!(runs(&s.agent_dir), "", "a refused op ran");
    Ok(())
}
