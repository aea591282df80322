//! End to end: real `postern server` and `postern-agent` processes, real TCP clients.

use anyhow::{anyhow, Result};
use postern::testbed::{echo_round_trip, echo_server, pattern, wait_until, Agent, Gateway};
use serde_json::Value;
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

fn tcp_resource(target: SocketAddr) -> String {
    format!("[policy]\napproval = \"automatic\"\n\n[[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"{target}\"\n")
}

/// Gateway + one enrolled, running, online agent with an echo resource.
fn setup(dir: &std::path::Path, app: &str) -> Result<(Gateway, Agent)> {
    let gw = Gateway::start(&dir.join("gw"))?;
    let echo = echo_server()?;
    let mut agent = Agent::enroll(
        &gw,
        &dir.join("agent"),
        app,
        "acme-corp",
        &tcp_resource(echo),
    )?;
    agent.run()?;
    if !gw.wait_online(&agent.appliance_id, Duration::from_secs(30)) {
        return Err(anyhow!(
            "agent never came online; log: {}",
            std::fs::read_to_string(&agent.log).unwrap_or_default()
        ));
    }
    // The appliance's policy is automatic: the operate grant is live at once.
    let grant = gw.request_operate(app, "acme-corp", "1h")?;
    assert_eq!(grant["state"], "active", "{grant}");
    Ok((gw, agent))
}

fn create_tcp_endpoint(gw: &Gateway, app: &str) -> Result<Value> {
    gw.cli(&[
        "ops",
        "endpoint",
        "create",
        "--type",
        "tcp",
        "--app",
        app,
        "--customer",
        "acme-corp",
        "--origin-resource-id",
        "null_resource.echo",
        "--ttl",
        "10m",
    ])?
    .ok()
}

fn address(ep: &Value) -> Result<SocketAddr> {
    Ok(ep["address"]
        .as_str()
        .ok_or_else(|| anyhow!("no address in {ep}"))?
        .parse()?)
}

fn audit_kinds(gw: &Gateway) -> Result<Vec<Value>> {
    Ok(gw.cli(&["audit", "list"])?.ok()?["records"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

#[test]
fn tcp_endpoint_carries_64_mib_and_retire_cuts_live_connection() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (gw, agent) = setup(dir.path(), "my-app")?;

    let ep = create_tcp_endpoint(&gw, "my-app")?;
    assert_eq!(ep["state"], "active");
    assert_eq!(ep["type"], "tcp");
    let id = ep["id"].as_str().unwrap().to_string();
    let addr = address(&ep)?;

    let data = pattern(64 * 1024 * 1024, 0x5eed);
    let back = echo_round_trip(addr, &data)?;
    assert_eq!(back.len(), data.len(), "echoed length");
    assert!(back == data, "64 MiB came back altered");

    // A live connection, then retire: the client must see it closed promptly.
    let mut live = TcpStream::connect(addr)?;
    live.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    live.set_read_timeout(Some(Duration::from_secs(10)))?;
    live.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping");
    assert!(wait_until(Duration::from_secs(5), || gw
        .cli(&["ops", "endpoint", "get", &id])
        .ok()
        .and_then(|o| o.ok().ok())
        .is_some_and(|e| e["sessions"] == 1)));

    let retired = gw.cli(&["ops", "endpoint", "retire", &id])?.ok()?;
    let t0 = Instant::now();
    assert_eq!(retired["state"], "retired");
    assert_eq!(retired["sessions_cut"], 1);
    let mut rest = Vec::new();
    let r = live.read_to_end(&mut rest);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the connection stayed open {:?} after retire",
        t0.elapsed()
    );
    assert!(r.is_ok() || r.is_err(), "read ended");
    assert!(rest.is_empty());

    // New connections are refused: the listener is gone.
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let _ = s.write_all(b"x");
            let mut b = [0u8; 1];
            matches!(s.read(&mut b), Ok(0) | Err(_))
        })
        .unwrap_or(true));

    // Retiring again is a clear error; the list shows the final state.
    let again = gw.cli(&["ops", "endpoint", "retire", &id])?;
    assert!(!again.success);
    assert_eq!(again.error_code(), Some("ENDPOINT_RETIRED"));
    let list = gw.cli(&["ops", "endpoint", "list"])?.ok()?;
    assert!(list["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["id"] == id.as_str() && e["state"] == "retired"));

    // Both trails: the vendor's records the sessions with reasons; the customer's verifies.
    // Session records are written as each session winds down, just after its client saw the close.
    let mut records = Vec::new();
    wait_until(Duration::from_secs(5), || {
        records = audit_kinds(&gw).unwrap_or_default();
        records
            .iter()
            .filter(|r| r["kind"] == "session.closed" && r["endpoint_id"] == id.as_str())
            .count()
            >= 2
    });
    let closed: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "session.closed" && r["endpoint_id"] == id.as_str())
        .collect();
    assert_eq!(closed.len(), 2, "{closed:?}");
    assert!(closed
        .iter()
        .any(|r| r["detail"]["reason"] == "client" && r["detail"]["bytes_up"] == 64 * 1024 * 1024));
    assert!(closed.iter().any(|r| r["detail"]["reason"] == "retired"));
    assert!(records.iter().any(|r| r["kind"] == "endpoint.retired"));
    let verified = gw.cli(&["audit", "verify"])?.ok()?;
    assert_eq!(verified["ok"], true);
    assert!(verified["records"].as_u64().unwrap() >= records.len() as u64);

    // The trail pages: following next_after_seq with --limit 3 walks the same records, in order.
    let mut paged: Vec<i64> = Vec::new();
    let mut after = 0;
    for _ in 0..records.len() {
        let page = gw
            .cli(&[
                "audit",
                "list",
                "--limit",
                "3",
                "--after-seq",
                &after.to_string(),
            ])?
            .ok()?;
        let seqs: Vec<i64> = page["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_i64().unwrap())
            .collect();
        assert!(seqs.len() <= 3, "{page}");
        paged.extend(seqs);
        match page["next_after_seq"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
    }
    let all: Vec<i64> = records.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert_eq!(paged[..all.len()], all[..]);
    let e = gw.cli(&["audit", "list", "--limit", "0"])?;
    assert_eq!(e.error_code(), Some("INVALID_REQUEST"));

    assert!(wait_until(Duration::from_secs(5), || agent
        .trail()
        .map(|t| t
            .iter()
            .any(|r| r["kind"] == "session.closed" && r["endpoint_id"] == id.as_str()))
        .unwrap_or(false)));
    assert_eq!(agent.verify_trail()?.ok()?["ok"], true);
    Ok(())
}

/// Socket inodes of a process, from its fd table.
fn socket_inodes(pid: u32) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        if let Ok(target) = std::fs::read_link(fd?.path()) {
            let t = target.to_string_lossy();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                out.push(inode.to_string());
            }
        }
    }
    Ok(out)
}

/// Listening sockets among `inodes`: TCP in LISTEN (0A), UDP not connected (07), as `ss -l` shows them.
fn listening(pid: u32, inodes: &[String]) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for (table, listen_state) in [("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 && cols[3] == listen_state && inodes.iter().any(|i| i == cols[9]) {
                found.push(format!("{table} {} inode {}", cols[1], cols[9]));
            }
        }
    }
    Ok(found)
}

#[test]
fn agent_has_no_listening_socket() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (gw, agent) = setup(dir.path(), "listen-check")?;
    // A session in flight too, so data-path sockets are included.
    let ep = create_tcp_endpoint(&gw, "listen-check")?;
    let back = echo_round_trip(address(&ep)?, b"hello")?;
    assert_eq!(back, b"hello");
    let pid = agent.pid().unwrap();
    let inodes = socket_inodes(pid)?;
    assert!(
        !inodes.is_empty(),
        "the agent should hold its tunnel socket"
    );
    let l = listening(pid, &inodes)?;
    assert!(l.is_empty(), "agent has listening sockets: {l:?}");
    // The check itself can see a listener: the gateway has several.
    let gw_l = listening(gw.pid(), &socket_inodes(gw.pid())?)?;
    assert!(gw_l.len() >= 2, "{gw_l:?}");
    Ok(())
}

#[test]
fn gateway_restart_agent_reconnects_and_endpoint_state_survives() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut gw, agent) = setup(dir.path(), "restart-app")?;
    let ep = create_tcp_endpoint(&gw, "restart-app")?;
    let id = ep["id"].as_str().unwrap().to_string();
    let retired = create_tcp_endpoint(&gw, "restart-app")?;
    let retired_id = retired["id"].as_str().unwrap().to_string();
    gw.cli(&["ops", "endpoint", "retire", &retired_id])?.ok()?;

    let (api, relay) = (gw.api, gw.relay);
    gw.kill();
    drop(gw);

    let gw = Gateway::start_on(&dir.path().join("gw"), api, relay)?;
    let restarted = Instant::now();
    assert!(
        gw.wait_online(&agent.appliance_id, Duration::from_secs(40)),
        "agent did not reconnect; log: {}",
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    eprintln!(
        "agent back online {:?} after the restart",
        restarted.elapsed()
    );
    let old = gw.cli(&["ops", "endpoint", "get", &id])?.ok()?;
    assert_eq!(old["state"], "active");
    assert_eq!(old["expires_at"], ep["expires_at"]);
    assert_eq!(
        gw.cli(&["ops", "endpoint", "get", &retired_id])?.ok()?["state"],
        "retired"
    );
    // The surviving endpoint serves again, and a new one works.
    assert_eq!(
        echo_round_trip(address(&old)?, b"after restart")?,
        b"after restart"
    );
    let fresh = create_tcp_endpoint(&gw, "restart-app")?;
    assert_eq!(
        echo_round_trip(address(&fresh)?, b"new endpoint")?,
        b"new endpoint"
    );
    Ok(())
}

#[test]
fn unknown_resource_offline_appliance_and_bad_ttl_are_structured_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (gw, mut agent) = setup(dir.path(), "errs-app")?;
    let bad = gw.cli(&[
        "ops",
        "endpoint",
        "create",
        "--type",
        "tcp",
        "--app",
        "errs-app",
        "--customer",
        "acme-corp",
        "--origin-resource-id",
        "aws_instance.nope",
    ])?;
    assert!(!bad.success);
    assert_eq!(bad.error_code(), Some("INVALID_ORIGIN_RESOURCE_ID"));
    assert!(bad.json["error"]["hint"]
        .as_str()
        .unwrap()
        .contains("null_resource.echo"));

    let ttl = gw.cli(&[
        "ops",
        "endpoint",
        "create",
        "--type",
        "tcp",
        "--app",
        "errs-app",
        "--customer",
        "acme-corp",
        "--origin-resource-id",
        "null_resource.echo",
        "--ttl",
        "8d",
    ])?;
    assert_eq!(ttl.error_code(), Some("INVALID_REQUEST"));

    // An operator token works; an approver of another customer sees nothing of this one.
    let op = gw
        .cli(&[
            "token",
            "create",
            "--role",
            "operator",
            "--name",
            "alice@vendor.example",
        ])?
        .ok()?;
    let op_token = op["token"].as_str().unwrap();
    assert_eq!(
        gw.cli_as(op_token, &["whoami"])?.ok()?["name"],
        "alice@vendor.example"
    );
    let denied = gw.cli_as(
        op_token,
        &["token", "create", "--role", "admin", "--name", "x"],
    )?;
    assert_eq!(denied.error_code(), Some("FORBIDDEN"));
    let other = gw
        .cli(&[
            "token",
            "create",
            "--role",
            "approver",
            "--name",
            "eve@globex",
            "--customer",
            "globex",
        ])?
        .ok()?;
    let seen = gw
        .cli_as(other["token"].as_str().unwrap(), &["appliance", "list"])?
        .ok()?;
    assert_eq!(seen["appliances"].as_array().unwrap().len(), 0);
    let garbage = gw.cli_as("pst_0000_notatokenatallreally", &["appliance", "list"])?;
    assert_eq!(garbage.error_code(), Some("UNAUTHENTICATED"));

    agent.stop();
    assert!(wait_until(Duration::from_secs(20), || gw
        .appliance(&agent.appliance_id)
        .map(|a| a["online"] == false)
        .unwrap_or(false)));
    let offline = gw.cli_as(
        op_token,
        &[
            "ops",
            "endpoint",
            "create",
            "--type",
            "tcp",
            "--app",
            "errs-app",
            "--customer",
            "acme-corp",
            "--origin-resource-id",
            "null_resource.echo",
        ],
    )?;
    assert_eq!(offline.error_code(), Some("APPLIANCE_OFFLINE"));

    let mut gw = gw;
    let status = gw.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "gateway did not shut down cleanly on SIGTERM: {status:?}"
    );
    Ok(())
}

#[test]
fn expiry_cuts_live_connection_and_refuses_new_ones() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (gw, agent) = setup(dir.path(), "expiry-app")?;
    let ep = gw
        .cli(&[
            "ops",
            "endpoint",
            "create",
            "--type",
            "tcp",
            "--app",
            "expiry-app",
            "--customer",
            "acme-corp",
            "--origin-resource-id",
            "null_resource.echo",
            "--ttl",
            "10s",
        ])?
        .ok()?;
    let id = ep["id"].as_str().unwrap().to_string();
    let expires: jiff::Timestamp = ep["expires_at"].as_str().unwrap().parse()?;
    let addr = address(&ep)?;
    let mut live = TcpStream::connect(addr)?;
    live.write_all(b"tick")?;
    let mut buf = [0u8; 4];
    live.set_read_timeout(Some(Duration::from_secs(15)))?;
    live.read_exact(&mut buf)?;

    // Block until the connection ends; it must end within 2 s after the expiry time.
    let mut rest = Vec::new();
    let _ = live.read_to_end(&mut rest);
    let ended = jiff::Timestamp::now();
    let late = ended.duration_since(expires);
    assert!(late.as_secs_f64() > -0.5, "cut {late:?} before expiry");
    assert!(late.as_secs_f64() < 2.0, "cut {late:?} after expiry");

    let rec = gw.cli(&["ops", "endpoint", "get", &id])?.ok()?;
    assert_eq!(rec["state"], "expired");
    assert!(rec.get("address").is_none() || rec["address"].is_null());
    // The gateway audits right after the cut; give it a moment.
    let mut records = Vec::new();
    let audited = wait_until(Duration::from_secs(5), || {
        records = audit_kinds(&gw).unwrap_or_default();
        records
            .iter()
            .any(|r| r["kind"] == "session.closed" && r["endpoint_id"] == id.as_str())
            && records
                .iter()
                .any(|r| r["kind"] == "endpoint.expired" && r["endpoint_id"] == id.as_str())
    });
    assert!(audited, "{records:?}");
    assert!(
        records.iter().any(|r| r["kind"] == "session.closed"
            && r["endpoint_id"] == id.as_str()
            && r["detail"]["reason"] == "expired"),
        "{records:?}"
    );
    assert!(records
        .iter()
        .any(|r| r["kind"] == "endpoint.expired" && r["endpoint_id"] == id.as_str()));
    // The customer's trail saw the cut from its side too.
    assert!(wait_until(Duration::from_secs(5), || agent
        .trail()
        .map(|t| t
            .iter()
            .any(|r| r["kind"] == "session.closed" && r["endpoint_id"] == id.as_str()))
        .unwrap_or(false)));
    Ok(())
}
