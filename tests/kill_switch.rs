//! The customer's kill switch, end to end with real `postern server`, `postern-agent` and CLI
//! processes: `postern access revoke --customer C [--app A]` ends every live grant on the
//! customer's appliances at once, cuts their sessions, tells each agent, and leaves other
//! customers alone; only an admin or the customer's own approver may pull it.

use anyhow::{anyhow, bail, Result};
use postern::tcp_endpoint::Forwarder;
use postern::testbed::{bin, echo_server, id_of, wait_until, Agent, Gateway};
use serde_json::Value;
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

const RESOURCE: &str = "null_resource.echo";

fn agent_body(echo: SocketAddr) -> String {
    format!(
        "[policy]\napproval = \"automatic\"\n\n\
         [[resource]]\nid = \"{RESOURCE}\"\nkind = \"tcp\"\ntarget = \"{echo}\"\n"
    )
}

/// An operate grant `who` asked for (active at once: the agents' policy is automatic).
fn operate(gw: &Gateway, who: &str, app: &str, customer: &str) -> Result<String> {
    let g = gw
        .cli_as(
            who,
            &[
                "access",
                "request",
                "--app",
                app,
                "--customer",
                customer,
                "--level",
                "operate",
                "--duration",
                "1h",
                "--reason",
                "INC-7: checkout errors",
            ],
        )?
        .ok()?;
    if g["state"] != "active" {
        bail!("the grant on {app}/{customer} is not active: {g}");
    }
    id_of(&g)
}

fn grant_ids(entry: &Value) -> Vec<String> {
    entry["detail"]["grants"]
        .as_array()
        .map(|g| {
            g.iter()
                .filter_map(|x| x["grant_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The agent's last applied grant set (its last `grant.sync`) satisfies `holds` (10 s at most).
fn agent_applies(agent: &Agent, holds: impl Fn(&[String]) -> bool) -> Result<bool> {
    let last_set_holds = |trail: &[Value]| {
        trail
            .iter()
            .rev()
            .find(|e| e["kind"] == "grant.sync")
            .is_some_and(|e| holds(&grant_ids(e)))
    };
    let trail = agent.trail_when(last_set_holds)?;
    Ok(last_set_holds(&trail))
}

fn state_of(gw: &Gateway, grant_id: &str) -> Result<String> {
    let list = gw.cli(&["access", "list"])?.ok()?;
    list["grants"]
        .as_array()
        .and_then(|a| a.iter().find(|g| g["id"] == grant_id))
        .and_then(|g| g["state"].as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("grant {grant_id} not in {list}"))
}

fn ids_of(answer: &Value) -> Vec<String> {
    let mut ids: Vec<String> = answer["grants"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|g| g["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// A live session through the endpoint's forwarder, proven by one echoed ping.
fn live_session(fwd: &Forwarder) -> Result<TcpStream> {
    let mut s = TcpStream::connect(fwd.listen)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)?;
    if &buf != b"ping" {
        bail!("the echo answered {buf:?}");
    }
    Ok(s)
}

/// Whether the session was ended by the other side (EOF or reset) rather than the read timing
/// out.
fn was_cut(s: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

/// The vendor trail's records (the first thousand are plenty here).
fn vendor_records(gw: &Gateway) -> Result<Vec<Value>> {
    let list = gw.cli(&["audit", "list", "--limit", "1000"])?.ok()?;
    Ok(list["records"].as_array().cloned().unwrap_or_default())
}

/// `postern ARGS` as `token`, human output: (exit success, stdout).
fn cli_text(gw: &Gateway, token: &str, args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(bin("postern")?)
        .args(args)
        .env("POSTERN_ADDR", gw.api.to_string())
        .env("POSTERN_TOKEN", token)
        .env("POSTERN_CA_FILE", &gw.ca_file)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

fn tcp_endpoint(gw: &Gateway, who: &str, home: &Path, app: &str, customer: &str) -> Result<String> {
    let ep = gw
        .cli_home_as(
            who,
            home,
            &[
                "ops",
                "endpoint",
                "create",
                "--type",
                "tcp",
                "--app",
                app,
                "--customer",
                customer,
                "--origin-resource-id",
                RESOURCE,
                "--ttl",
                "10m",
            ],
        )?
        .ok()?;
    if ep["state"] != "active" {
        bail!("the endpoint is not active: {ep}");
    }
    id_of(&ep)
}

#[test]
fn a_customer_pulls_the_kill_switch_on_every_vendor_grant() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    let echo = echo_server()?;
    let body = agent_body(echo);
    let shop = Agent::online(&gw, &dir.path().join("shop"), "shop", "acme", &body)?;
    let crm = Agent::online(&gw, &dir.path().join("crm"), "crm", "acme", &body)?;
    let globex = Agent::online(&gw, &dir.path().join("globex"), "shop", "globex", &body)?;
    let alice = gw.mint_token("operator", "alice@vendor.example", None)?;
    let bob = gw.mint_token("approver", "bob@acme.example", Some("acme"))?;

    let g_shop = operate(&gw, &alice, "shop", "acme")?;
    let g_crm = operate(&gw, &alice, "crm", "acme")?;
    let g_globex = operate(&gw, &alice, "shop", "globex")?;
    for (agent, g) in [(&shop, &g_shop), (&crm, &g_crm), (&globex, &g_globex)] {
        assert!(
            agent_applies(agent, |set| set.contains(g))?,
            "{} never applied grant {g}",
            agent.appliance_id
        );
    }
    // A live session on acme's shop, under alice's grant.
    let home = dir.path().join("alice");
    let ep = tcp_endpoint(&gw, &alice, &home, "shop", "acme")?;
    let fwd = Forwarder::start(&gw, &alice, &home, &ep)?;
    let mut session = live_session(&fwd)?;

    // Who may not: an operator (they revoke their own grants one by one) and acme's approver
    // for another customer.
    let refused = gw.cli_as(&alice, &["access", "revoke", "--customer", "acme"])?;
    assert_eq!(refused.error_code(), Some("FORBIDDEN"), "{}", refused.json);
    let refused = gw.cli_as(&bob, &["access", "revoke", "--customer", "globex"])?;
    assert_eq!(refused.error_code(), Some("FORBIDDEN"), "{}", refused.json);
    assert!(!refused.json["error"]["hint"]
        .as_str()
        .unwrap_or_default()
        .is_empty());
    // Exactly one of an id and --customer, refused as structured usage errors.
    for bad in [
        vec!["access", "revoke", &g_shop, "--customer", "acme"],
        vec!["access", "revoke"],
        vec!["access", "revoke", "--app", "shop"],
    ] {
        let out = gw.cli_as(&bob, &bad)?;
        assert_eq!(
            out.error_code(),
            Some("INVALID_REQUEST"),
            "{bad:?}: {}",
            out.json
        );
        assert!(!out.success);
    }
    let unknown = gw.cli(&["access", "revoke", "--customer", "initech"])?;
    assert_eq!(unknown.error_code(), Some("NOT_FOUND"), "{}", unknown.json);
    let unknown = gw.cli_as(
        &bob,
        &["access", "revoke", "--customer", "acme", "--app", "billing"],
    )?;
    assert_eq!(unknown.error_code(), Some("NOT_FOUND"), "{}", unknown.json);
    for g in [&g_shop, &g_crm, &g_globex] {
        assert_eq!(state_of(&gw, g)?, "active");
    }

    // acme's approver pulls it.
    let done = gw
        .cli_as(
            &bob,
            &[
                "access",
                "revoke",
                "--customer",
                "acme",
                "--reason",
                "INC-9: vendor laptop stolen",
            ],
        )?
        .ok()?;
    assert_eq!(done["revoked"], 2, "{done}");
    let mut both = vec![g_shop.clone(), g_crm.clone()];
    both.sort();
    assert_eq!(ids_of(&done), both);
    for g in done["grants"].as_array().into_iter().flatten() {
        assert_eq!(g["state"], "revoked", "{g}");
        assert_eq!(g["customer"], "acme", "{g}");
    }
    assert_eq!(state_of(&gw, &g_shop)?, "revoked");
    assert_eq!(state_of(&gw, &g_crm)?, "revoked");
    assert_eq!(state_of(&gw, &g_globex)?, "active");

    // The session is cut, and its endpoint ended with the grant.
    assert!(
        was_cut(&mut session),
        "the session outlived the kill switch"
    );
    let ended = gw.cli_as(&alice, &["ops", "endpoint", "get", &ep])?.ok()?;
    assert_eq!(ended["state"], "retired", "{ended}");

    // Each acme agent applied a set without its grant; globex's still holds its own.
    assert!(
        agent_applies(&shop, |set| !set.contains(&g_shop))?,
        "shop never applied the revocation"
    );
    assert!(
        agent_applies(&crm, |set| !set.contains(&g_crm))?,
        "crm never applied the revocation"
    );
    assert!(agent_applies(&globex, |set| set.contains(&g_globex))?);

    // The vendor trail: one grant.revoked per grant, marked bulk, with the reason and who.
    let mut records = Vec::new();
    let revoked_bulk = |records: &[Value]| -> Vec<Value> {
        records
            .iter()
            .filter(|r| r["kind"] == "grant.revoked" && r["detail"]["bulk"] == true)
            .cloned()
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || {
            records = vendor_records(&gw).unwrap_or_default();
            revoked_bulk(&records).len() >= 2
        }),
        "no bulk grant.revoked records: {records:#?}"
    );
    let bulk = revoked_bulk(&records);
    assert_eq!(bulk.len(), 2, "{bulk:#?}");
    for (g, agent) in [(&g_shop, &shop), (&g_crm, &crm)] {
        let r = bulk
            .iter()
            .find(|r| r["detail"]["grant_id"] == g.as_str())
            .ok_or_else(|| anyhow!("no grant.revoked for {g}: {bulk:#?}"))?;
        assert_eq!(r["actor"], "bob@acme.example", "{r}");
        assert_eq!(r["appliance_id"], agent.appliance_id.as_str(), "{r}");
        assert_eq!(r["detail"]["was"], "active", "{r}");
        assert_eq!(r["detail"]["reason"], "INC-9: vendor laptop stolen", "{r}");
        // ...and it reached the appliance's customer trail, like every gateway event.
        let seq = r["seq"].as_i64().unwrap_or(-1);
        let in_trail = |t: &[Value]| {
            t.iter().any(|e| {
                e["kind"] == "grant.revoked" && e["detail"]["gateway_seq"].as_i64() == Some(seq)
            })
        };
        assert!(
            in_trail(&agent.trail_when(in_trail)?),
            "{}'s customer trail lacks the grant.revoked of seq {seq}",
            agent.appliance_id
        );
    }
    let session_closed = records.iter().any(|r| {
        r["kind"] == "session.closed"
            && r["endpoint_id"] == ep.as_str()
            && r["detail"]["reason"] == "revoked"
    });
    assert!(
        session_closed,
        "no session.closed (revoked) for {ep}: {records:#?}"
    );

    // Nothing live is left: a second pull revokes nothing, and says so.
    let again = gw
        .cli_as(&bob, &["access", "revoke", "--customer", "acme"])?
        .ok()?;
    assert_eq!(again["revoked"], 0, "{again}");
    assert_eq!(again["grants"], serde_json::json!([]));
    let (ok, text) = cli_text(&gw, &bob, &["access", "revoke", "--customer", "acme"])?;
    assert!(ok, "{text}");
    assert!(text.contains("no live grants of customer acme"), "{text}");

    // --app narrows it to one appliance.
    let g_shop2 = operate(&gw, &alice, "shop", "acme")?;
    let g_crm2 = operate(&gw, &alice, "crm", "acme")?;
    let narrowed = gw
        .cli_as(
            &bob,
            &["access", "revoke", "--customer", "acme", "--app", "crm"],
        )?
        .ok()?;
    assert_eq!(narrowed["revoked"], 1, "{narrowed}");
    assert_eq!(ids_of(&narrowed), vec![g_crm2.clone()]);
    assert_eq!(state_of(&gw, &g_crm2)?, "revoked");
    assert_eq!(state_of(&gw, &g_shop2)?, "active");
    assert!(agent_applies(&crm, |set| !set.contains(&g_crm2))?);
    assert!(agent_applies(&shop, |set| set.contains(&g_shop2))?);

    // The admin may pull it for any customer.
    let all = gw
        .cli(&["access", "revoke", "--customer", "globex"])?
        .ok()?;
    assert_eq!(ids_of(&all), vec![g_globex.clone()]);
    assert!(agent_applies(&globex, |set| !set.contains(&g_globex))?);
    assert_eq!(gw.cli(&["audit", "verify"])?.ok()?["ok"], true);
    Ok(())
}

/// A revocation and its record commit together: while the vendor trail refuses records (its
/// store full), `access revoke` answers an error and the grant stays active; the revocation
/// is not held to happen later either. Once the store takes records again the same revoke
/// goes through, reaches the agent, and is recorded once.
#[test]
fn a_revocation_the_trail_cannot_record_does_not_happen() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    let echo = echo_server()?;
    let shop = Agent::online(
        &gw,
        &dir.path().join("shop"),
        "shop",
        "acme",
        &agent_body(echo),
    )?;
    let alice = gw.mint_token("operator", "alice@vendor.example", None)?;
    let g = operate(&gw, &alice, "shop", "acme")?;
    assert!(agent_applies(&shop, |set| set.contains(&g))?);

    gw.store_sql(
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log \
         BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
    )?;
    let refused = gw.cli_as(&alice, &["access", "revoke", &g])?;
    assert_eq!(refused.error_code(), Some("INTERNAL"), "{:?}", refused.json);
    assert!(
        refused.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("vendor audit trail cannot be written")),
        "{:?}",
        refused.json
    );
    assert_eq!(state_of(&gw, &g)?, "active", "not revoked unrecorded");

    gw.store_sql("DROP TRIGGER refuse_audit")?;
    // The trail is back within its probe (every second); nothing was held meanwhile.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(state_of(&gw, &g)?, "active", "not revoked later unasked");
    let mut answer = Value::Null;
    assert!(wait_until(Duration::from_secs(20), || {
        match gw
            .cli_as(&alice, &["access", "revoke", &g])
            .and_then(|o| o.ok())
        {
            Ok(v) => {
                answer = v;
                true
            }
            Err(_) => false,
        }
    }));
    assert_eq!(answer["state"], "revoked", "{answer}");
    assert!(agent_applies(&shop, |set| !set.contains(&g))?);
    let records = vendor_records(&gw)?;
    let revoked = records
        .iter()
        .filter(|r| r["kind"] == "grant.revoked" && r["detail"]["grant_id"] == g.as_str())
        .count();
    assert_eq!(revoked, 1, "{records:?}");
    assert!(gw.cli(&["audit", "verify"])?.success, "the chain verifies");
    Ok(())
}
