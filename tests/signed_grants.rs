//! End to end: grants and endpoints that the customer's policy reserves for a person are
//! honoured by the appliance only with a decision one of its own approver keys signed for
//! exactly them. A gateway whose store is edited (a rogue or compromised vendor gateway) to
//! mark a grant or endpoint approved without a signature, with a forged, replayed, altered or
//! expired statement gets nothing honoured: a `denied` record with the reason in the customer
//! trail, the grant revoked / the endpoint ended with `APPROVAL_INVALID` for the operator. A
//! real approval is honoured, once accepted also across the agent's restart (the grant set and
//! the endpoints are sent again then: not a replay).

use anyhow::{anyhow, bail, Context, Result};
use endpoint_types::approval::{ApprovalStatement, DecidedContent, SignedDecision};
use postern::approver::{self, Approver};
use postern::tcp_endpoint::Forwarder;
use postern::testbed::*;
use serde_json::Value;
use std::{path::Path, path::PathBuf, time::Duration};

const CUSTOMER: &str = "acme-corp";
const APP: &str = "my-app";
const ECHO: &str = "null_resource.echo";

struct Setup {
    gw: Gateway,
    agent: Agent,
    /// Bob, the customer's one approver.
    bob: Approver,
    /// The operator's machine (endpoint keys stay there).
    home: PathBuf,
}

/// A gateway, Bob's key listed as the appliance's one approver under a manual policy, and an
/// agent with a TCP echo resource, online.
fn start(dir: &Path) -> Result<Setup> {
    let gw = Gateway::start(&dir.join("gw"))?;
    let bob = Approver::create(&gw, dir, "bob", CUSTOMER)?;
    let bob_line = &bob.public_key;
    let echo = echo_server()?;
    let body = format!(
        "[policy]\napproval = \"manual\"\n\n\
         [[approver]]\nname = \"bob@acme-corp.example\"\npublic_key = \"{bob_line}\"\n\n\
         [[resource]]\nid = \"{ECHO}\"\nkind = \"tcp\"\ntarget = \"{echo}\"\n"
    );
    let agent = Agent::online(&gw, &dir.join("agent"), APP, CUSTOMER, &body)?;
    Ok(Setup {
        gw,
        agent,
        bob,
        home: dir.join("operator-home"),
    })
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_string()
}

impl Setup {
    fn bob(&self, args: &[&str]) -> Result<CliOutput> {
        self.bob.cli(&self.gw, args)
    }

    /// `approvals approve ID --key` with Bob's key.
    fn approve(&self, id: &str) -> Result<Value> {
        self.bob.approve(&self.gw, id)
    }

    /// An operate grant request waiting for a person; its id.
    fn request_grant(&self, duration: &str) -> Result<String> {
        let g = self.gw.request_operate(APP, CUSTOMER, duration)?;
        if g["state"] != "pending-approval" {
            bail!("grant not waiting for approval: {g}");
        }
        Ok(id_of(&g))
    }

    /// A tcp endpoint request (10 min) waiting for a person; its id.
    fn request_endpoint(&self) -> Result<String> {
        let ep = self
            .gw
            .cli_home(
                &self.home,
                &[
                    "ops",
                    "endpoint",
                    "create",
                    "--type",
                    "tcp",
                    "--app",
                    APP,
                    "--customer",
                    CUSTOMER,
                    "--origin-resource-id",
                    ECHO,
                    "--ttl",
                    "10m",
                ],
            )?
            .ok()?;
        if ep["state"] != "pending-approval" {
            bail!("endpoint not waiting for approval: {ep}");
        }
        Ok(id_of(&ep))
    }

    fn grant(&self, id: &str) -> Result<Value> {
        let v = self.gw.cli(&["access", "list"])?.ok()?;
        v["grants"]
            .as_array()
            .and_then(|gs| gs.iter().find(|g| g["id"] == id).cloned())
            .ok_or_else(|| anyhow!("no grant {id} in {v}"))
    }

    fn endpoint(&self, id: &str) -> Result<Value> {
        self.gw
            .cli_home(&self.home, &["ops", "endpoint", "get", id])?
            .ok()
    }

    /// The statement the gateway offers Bob for `id`.
    fn offered(&self, id: &str) -> Result<ApprovalStatement> {
        let v = self.bob(&["approvals", "show", id])?.ok()?;
        serde_json::from_value(v["statement"].clone())
            .with_context(|| format!("no statement in {v}"))
    }

    /// SQL on the gateway's own store, as someone with write access to it would run it.
    fn sql(&self, statement: &str) -> Result<()> {
        self.gw.store_sql(statement).map(drop)
    }

    /// Marks grant `id` approved by Bob `ago_ms` ago, as the grants service would.
    fn mark_active(&self, id: &str, ago_ms: i64) -> Result<()> {
        let at = jiff::Timestamp::now().as_millisecond() - ago_ms;
        self.sql(&format!(
            "UPDATE grants SET state = 'active', decided_by = 'token:bob', decided_at = {at}, \
             expires_at = {at} + duration_ms WHERE id = '{id}';"
        ))
    }

    /// Puts `signed` in the store as the decision on `id`, as the gateway keeps one.
    fn store_signed(&self, id: &str, signed: &SignedDecision) -> Result<()> {
        let text = serde_json::to_string(signed)?.replace('\'', "''");
        self.sql(&format!(
            "INSERT OR REPLACE INTO signed_decisions (record_id, stage, signed, stored_at) \
             VALUES ('{id}', 'command', '{text}', 0);"
        ))
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

    fn stop_agent(&mut self) -> Result<()> {
        self.agent.stop();
        self.wait_offline()
    }

    fn start_agent(&mut self) -> Result<()> {
        self.agent.run()?;
        if !self
            .gw
            .wait_online(&self.agent.appliance_id, Duration::from_secs(30))
        {
            bail!("agent did not come back");
        }
        Ok(())
    }

    /// The customer trail holds a `denied` record for `key` = `id` with `reason`.
    fn assert_denied_in_trail(&self, key: &str, id: &str, reason: &str) -> Result<Vec<Value>> {
        let denied = |t: &[Value]| {
            t.iter().any(|r| {
                r["kind"] == "denied"
                    && (r[key] == id || r["detail"][key] == id)
                    && r["detail"]["reason"] == "APPROVAL_INVALID"
                    && r["detail"]["approval"] == reason
            })
        };
        let trail = self.agent.trail_when(denied)?;
        assert!(
            denied(&trail),
            "no denial of {id} ({reason}) in the customer trail"
        );
        Ok(trail)
    }

    /// The appliance refused grant `id`: denied with `reason` in the customer trail, and the
    /// gateway revoked it, showing the operator APPROVAL_INVALID with the reason and a hint.
    fn assert_grant_refused(&self, id: &str, reason: &str) -> Result<()> {
        self.assert_denied_in_trail("grant_id", id, reason)?;
        let mut last = Value::Null;
        let done = wait_until(Duration::from_secs(30), || {
            last = self.grant(id).unwrap_or(Value::Null);
            last["state"] == "revoked" && !last["refused"].is_null()
        });
        assert!(done, "grant {id} not revoked with the refusal: {last}");
        assert_eq!(last["refused"]["code"], "APPROVAL_INVALID", "{last}");
        assert_eq!(last["refused"]["details"]["reason"], reason, "{last}");
        assert!(
            last["refused"]["hint"]
                .as_str()
                .unwrap_or_default()
                .contains("--key"),
            "{last}"
        );
        Ok(())
    }

    /// The appliance refused endpoint `id`: denied with `reason` in the customer trail, never
    /// opened there, and the gateway ended it with APPROVAL_INVALID for the operator.
    fn assert_endpoint_refused(&self, id: &str, reason: &str) -> Result<()> {
        let trail = self.assert_denied_in_trail("endpoint_id", id, reason)?;
        assert!(
            !trail
                .iter()
                .any(|r| r["endpoint_id"] == id && r["kind"] == "endpoint.opened"),
            "endpoint {id} was opened in the appliance"
        );
        let mut last = Value::Null;
        let done = wait_until(Duration::from_secs(30), || {
            last = self.endpoint(id).unwrap_or(Value::Null);
            last["state"] == "retired" && !last["refused"].is_null()
        });
        assert!(done, "endpoint {id} not ended with the refusal: {last}");
        assert_eq!(last["refused"]["code"], "APPROVAL_INVALID", "{last}");
        assert_eq!(last["refused"]["details"]["reason"], reason, "{last}");
        Ok(())
    }

    fn verified_count(&self, key: &str, id: &str, stage: &str) -> Result<usize> {
        Ok(self
            .agent
            .trail()?
            .iter()
            .filter(|r| {
                r["kind"] == "approval.verified"
                    && (r[key] == id || r["detail"][key] == id)
                    && r["detail"]["stage"] == stage
            })
            .count())
    }
}

/// Sends bytes through the endpoint until they come back (the agent may still be syncing).
fn round_trip(fwd: &Forwarder, data: &[u8]) -> bool {
    wait_until(Duration::from_secs(20), || {
        echo_round_trip(fwd.listen, data).is_ok_and(|back| back == data)
    })
}

#[test]
fn a_signed_grant_and_endpoint_are_honoured_also_after_the_agent_restarts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = start(dir.path())?;

    // A grant longer than any statement may be valid (24 h).
    let g = s.request_grant("30h")?;
    let shown = s.bob(&["approvals", "show", &g])?.ok()?;
    assert_eq!(shown["signature_required"], true, "{shown}");
    assert_eq!(shown["statement"]["content"]["kind"], "grant", "{shown}");
    assert_eq!(shown["statement"]["content"]["level"], "operate", "{shown}");
    assert_eq!(
        shown["statement"]["content"]["duration_s"],
        30 * 3600,
        "{shown}"
    );
    // Unsigned, the gateway refuses at once.
    let unsigned = s.bob(&["approvals", "approve", &g])?;
    assert_eq!(
        unsigned.error_code(),
        Some("APPROVAL_INVALID"),
        "{}",
        unsigned.json
    );
    s.approve(&g)?;
    let verified = |t: &[Value]| {
        t.iter().any(|r| {
            r["kind"] == "approval.verified"
                && r["detail"]["grant_id"] == g.as_str()
                && r["detail"]["approver"] == "bob@acme-corp.example"
        })
    };
    assert!(verified(&s.agent.trail_when(verified)?));
    assert_eq!(s.grant(&g)?["state"], "active");

    let ep = s.request_endpoint()?;
    let shown = s.bob(&["approvals", "show", &ep])?.ok()?;
    assert_eq!(
        shown["statement"]["content"],
        serde_json::json!({ "kind": "endpoint", "endpoint_type": "tcp", "resource_id": ECHO, "ttl_s": 600 }),
        "{shown}"
    );
    s.approve(&ep)?;
    let active = s.endpoint(&ep)?;
    assert_eq!(active["state"], "active", "{active}");
    let fwd = Forwarder::start(&s.gw, &s.gw.admin_token, &s.home, &ep)?;
    assert!(
        round_trip(&fwd, b"signed and served"),
        "the endpoint serves nothing"
    );
    assert_eq!(s.verified_count("endpoint_id", &ep, "endpoint")?, 1);

    // The agent restarts: the grant set and the endpoint are sent again and honoured from the
    // acceptance it remembered, not refused as replays.
    s.stop_agent()?;
    s.start_agent()?;
    assert!(
        round_trip(&fwd, b"after the restart"),
        "not served after the restart"
    );
    let trail = s.agent.trail()?;
    assert!(
        !trail.iter().any(|r| r["kind"] == "denied"),
        "something was refused: {:?}",
        trail
            .iter()
            .filter(|r| r["kind"] == "denied")
            .collect::<Vec<_>>()
    );
    assert_eq!(
        s.verified_count("grant_id", &g, "grant")?,
        1,
        "accepted once"
    );
    assert_eq!(s.verified_count("endpoint_id", &ep, "endpoint")?, 1);
    let accepted = std::fs::read_to_string(
        s.agent
            .trail_path()
            .with_file_name("audit.jsonl.approvals-accepted"),
    )?;
    assert!(
        accepted.contains(&g) && accepted.contains(&ep),
        "{accepted}"
    );
    let grant = s.grant(&g)?;
    assert_eq!(grant["state"], "active", "{grant}");
    assert!(grant["refused"].is_null(), "{grant}");
    assert!(s.agent.verify_trail()?.success);
    Ok(())
}

#[test]
fn a_rogue_gateway_cannot_grant_access_the_customer_reserved_for_a_person() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = start(dir.path())?;
    let (_, eve) = approver::make_key(&s.gw, &dir.path().join("eve").join("approver.key"))?;

    let good = s.request_grant("1h")?;
    s.approve(&good)?;
    let unsigned = s.request_grant("1h")?;
    let forged = s.request_grant("1h")?;
    let replayed = s.request_grant("1h")?;
    let altered = s.request_grant("1h")?;
    let expired = s.request_grant("4h")?;
    let forged_statement = s.offered(&forged)?;
    let expired_statement = s.offered(&expired)?;

    s.stop_agent()?;
    // Marked approved by a person with no signature.
    s.mark_active(&unsigned, 0)?;
    // Signed by Eve, under Bob's key id.
    let mut by_eve = eve.sign(forged_statement);
    by_eve.statement.key_id = s.bob.key.public().key_id();
    s.store_signed(&forged, &by_eve)?;
    s.mark_active(&forged, 0)?;
    // Bob's decision on another grant.
    s.sql(&format!(
        "INSERT INTO signed_decisions (record_id, stage, signed, stored_at) \
         SELECT '{replayed}', stage, signed, stored_at FROM signed_decisions WHERE record_id = '{good}';"
    ))?;
    s.mark_active(&replayed, 0)?;
    // Bob approves 1 h; the store then makes it a day longer.
    s.approve(&altered)?;
    s.sql(&format!(
        "UPDATE grants SET duration_ms = duration_ms + 86400000, expires_at = expires_at + 86400000 \
         WHERE id = '{altered}';"
    ))?;
    // Bob's decision for 4 h issued two hours ago, valid for one: expired before it arrives.
    let mut old = expired_statement;
    old.issued_at = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(2);
    old.not_after = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    s.store_signed(&expired, &s.bob.key.sign(old))?;
    s.mark_active(&expired, 2 * 3600 * 1000)?;
    s.start_agent()?;

    s.assert_grant_refused(&unsigned, "missing")?;
    s.assert_grant_refused(&forged, "bad_signature")?;
    s.assert_grant_refused(&replayed, "wrong_record")?;
    s.assert_grant_refused(&altered, "content_mismatch")?;
    s.assert_grant_refused(&expired, "expired")?;
    // Bob's real grant is untouched, and honoured again after the reconnect.
    let g = s.grant(&good)?;
    assert_eq!(g["state"], "active", "{g}");
    assert!(g["refused"].is_null(), "{g}");
    assert_eq!(s.verified_count("grant_id", &good, "grant")?, 1);
    assert!(s.agent.verify_trail()?.success);
    Ok(())
}

#[test]
fn a_rogue_gateway_cannot_open_an_endpoint_the_customer_reserved_for_a_person() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = start(dir.path())?;
    let g = s.request_grant("1h")?;
    s.approve(&g)?;
    let unsigned = s.request_endpoint()?;
    let longer = s.request_endpoint()?;
    let elsewhere = s.request_endpoint()?;
    let statements: Vec<ApprovalStatement> = [&longer, &elsewhere]
        .iter()
        .map(|id| s.offered(id))
        .collect::<Result<_>>()?;

    // Bob approves all three while the appliance is away; then the store is edited.
    s.stop_agent()?;
    for id in [&unsigned, &longer, &elsewhere] {
        s.approve(id)?;
    }
    s.sql(&format!(
        "DELETE FROM signed_decisions WHERE record_id = '{unsigned}';"
    ))?;
    // What Bob signed was a 1-minute endpoint (the gateway opened it for 10), and one to
    // another resource.
    let mut short = statements[0].clone();
    if let DecidedContent::Endpoint { ttl_s, .. } = &mut short.content {
        *ttl_s = 60;
    }
    s.store_signed(&longer, &s.bob.key.sign(short))?;
    let mut other = statements[1].clone();
    if let DecidedContent::Endpoint { resource_id, .. } = &mut other.content {
        *resource_id = "null_resource.other".into();
    }
    s.store_signed(&elsewhere, &s.bob.key.sign(other))?;
    s.start_agent()?;

    s.assert_endpoint_refused(&unsigned, "missing")?;
    s.assert_endpoint_refused(&longer, "content_mismatch")?;
    s.assert_endpoint_refused(&elsewhere, "content_mismatch")?;
    // The grant itself was Bob's and stays.
    assert_eq!(s.grant(&g)?["state"], "active");
    assert!(s.agent.verify_trail()?.success);
    Ok(())
}
