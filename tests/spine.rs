//! End to end: real `postern server` and `postern-agent` processes, real TCP clients.

use anyhow::{anyhow, Result};
use postern::tcp_endpoint::{Forwarder, TcpCredential};
use postern::testbed::{
    echo_round_trip, echo_server, pattern, wait_until, Agent, Gateway, TinyDisk,
};
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
    let agent = Agent::online(
        &gw,
        &dir.join("agent"),
        app,
        "acme-corp",
        &tcp_resource(echo),
    )?;
    // The appliance's policy is automatic: the operate grant is live at once.
    let grant = gw.request_operate(app, "acme-corp", "1h")?;
    assert_eq!(grant["state"], "active", "{grant}");
    Ok((gw, agent))
}

/// `create` on the operator's machine whose home is `home` (the key stays there).
fn create_tcp_endpoint(gw: &Gateway, home: &std::path::Path, app: &str) -> Result<Value> {
    postern::tcp_endpoint::create(gw, home, app, "acme-corp", "null_resource.echo")
}

fn id_of(ep: &Value) -> String {
    ep["id"].as_str().unwrap_or_default().to_string()
}

/// `postern ops endpoint connect` for the endpoint, as the admin who created it.
fn forwarder(gw: &Gateway, home: &std::path::Path, ep: &Value) -> Result<Forwarder> {
    Forwarder::start(gw, &gw.admin_token, home, &id_of(ep))
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
    let home = dir.path().join("home");

    let ep = create_tcp_endpoint(&gw, &home, "my-app")?;
    assert_eq!(ep["state"], "active");
    assert_eq!(ep["type"], "tcp");
    let id = ep["id"].as_str().unwrap().to_string();
    let addr = address(&ep)?;
    assert_eq!(
        ep["connect_command"],
        format!("postern ops endpoint connect {id}"),
        "{ep}"
    );
    let cred_file = std::path::PathBuf::from(ep["tcp_credential"].as_str().unwrap());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cred_file)?.permissions().mode() & 0o777,
        0o600
    );
    assert!(
        ep.get("access").is_none(),
        "the key and certificate stay in the file: {ep}"
    );
    let fwd = forwarder(&gw, &home, &ep)?;
    assert!(fwd.listen.ip().is_loopback());

    let data = pattern(64 * 1024 * 1024, 0x5eed);
    let back = echo_round_trip(fwd.listen, &data)?;
    assert_eq!(back.len(), data.len(), "echoed length");
    assert!(back == data, "64 MiB came back altered");

    // A live connection, then retire: the client must see it closed promptly.
    let mut live = TcpStream::connect(fwd.listen)?;
    live.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    live.set_read_timeout(Some(Duration::from_secs(10)))?;
    live.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping");
    assert!(wait_until(Duration::from_secs(5), || gw
        .cli_home(&home, &["ops", "endpoint", "get", &id])
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

    // New connections are refused: the listener is gone, and the forwarder's connections fail.
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let _ = s.write_all(b"x");
            let mut b = [0u8; 1];
            matches!(s.read(&mut b), Ok(0) | Err(_))
        })
        .unwrap_or(true));
    let after = echo_round_trip(fwd.listen, b"after retire");
    assert!(
        after.as_ref().map(|b| b.is_empty()).unwrap_or(true),
        "{after:?}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || fwd
            .log_text()
            .contains("cannot reach the endpoint")),
        "{}",
        fwd.log_text()
    );

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
    let home = dir.path().join("home");
    let ep = create_tcp_endpoint(&gw, &home, "listen-check")?;
    let fwd = forwarder(&gw, &home, &ep)?;
    let back = echo_round_trip(fwd.listen, b"hello")?;
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
    let home = dir.path().join("home");
    let ep = create_tcp_endpoint(&gw, &home, "restart-app")?;
    let id = ep["id"].as_str().unwrap().to_string();
    let retired = create_tcp_endpoint(&gw, &home, "restart-app")?;
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
    let old = gw.cli_home(&home, &["ops", "endpoint", "get", &id])?.ok()?;
    assert_eq!(old["state"], "active");
    assert_eq!(old["expires_at"], ep["expires_at"]);
    assert_eq!(
        gw.cli(&["ops", "endpoint", "get", &retired_id])?.ok()?["state"],
        "retired"
    );
    // The surviving endpoint serves again, and a new one works.
    // The surviving endpoint's key on the operator's machine still opens it.
    assert_eq!(address(&old)?, address(&ep)?);
    let fwd = forwarder(&gw, &home, &old)?;
    assert_eq!(
        echo_round_trip(fwd.listen, b"after restart")?,
        b"after restart"
    );
    let fresh = create_tcp_endpoint(&gw, &home, "restart-app")?;
    let fwd = forwarder(&gw, &home, &fresh)?;
    assert_eq!(
        echo_round_trip(fwd.listen, b"new endpoint")?,
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
    let home = dir.path().join("home");
    let ep = gw
        .cli_home(
            &home,
            &[
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
            ],
        )?
        .ok()?;
    let id = ep["id"].as_str().unwrap().to_string();
    let expires: jiff::Timestamp = ep["expires_at"].as_str().unwrap().parse()?;
    let mut fwd = forwarder(&gw, &home, &ep)?;
    let expiring_cred = TcpCredential::of_record(&ep)?;
    let other = create_tcp_endpoint(&gw, &home, "expiry-app")?;
    let mut live = TcpStream::connect(fwd.listen)?;
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

    // The expired certificate opens nothing anywhere: at another live endpoint it is refused
    // in the handshake, as expired; and the forwarder has stopped by itself.
    let refused = expiring_cred.round_trip(address(&other)?, b"expired certificate");
    assert!(
        refused.as_ref().map(|back| back.is_empty()).unwrap_or(true),
        "{refused:?}"
    );
    wait_denial(&gw, &id_of(&other), "ENDPOINT_EXPIRED", "expired")?;
    assert!(
        wait_until(Duration::from_secs(5), || fwd.exited()),
        "the forwarder kept running past expiry"
    );
    Ok(())
}

/// The gateway's `denied` records for an endpoint.
fn denials(gw: &Gateway, endpoint_id: &str) -> Vec<Value> {
    audit_kinds(gw)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r["kind"] == "denied" && r["endpoint_id"] == endpoint_id)
        .collect()
}

fn wait_denial(gw: &Gateway, endpoint_id: &str, code: &str, reason_part: &str) -> Result<Value> {
    let mut found = None;
    wait_until(Duration::from_secs(5), || {
        found = denials(gw, endpoint_id).into_iter().find(|r| {
            r["detail"]["code"] == code
                && r["detail"]["reason"]
                    .as_str()
                    .is_some_and(|m| m.contains(reason_part))
        });
        found.is_some()
    });
    found.ok_or_else(|| {
        anyhow!(
            "no denial {code} {reason_part:?} for {endpoint_id}: {:?}",
            denials(gw, endpoint_id)
        )
    })
}

/// Plain TCP, sent to `addr`, gets no echo: the connection ends with nothing of it back.
fn plain_tcp_gets_nothing(addr: SocketAddr, payload: &[u8]) -> Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.write_all(payload)?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    assert!(
        !back.windows(payload.len()).any(|w| w == payload),
        "plain TCP got its bytes echoed: {back:?}"
    );
    assert!(back.len() < 64, "plain TCP got {} bytes back", back.len());
    Ok(())
}

#[test]
fn tcp_endpoint_admits_only_its_own_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (gw, agent) = setup(dir.path(), "cred-app")?;
    let home = dir.path().join("home");
    let a = create_tcp_endpoint(&gw, &home, "cred-app")?;
    let b = create_tcp_endpoint(&gw, &home, "cred-app")?;
    let (a_id, b_id) = (id_of(&a), id_of(&b));
    let a_addr = address(&a)?;

    // A client that connects and never speaks TLS is cut after the 10 s handshake grace.
    let mut silent = TcpStream::connect(a_addr)?;
    let silent_since = Instant::now();

    // The real forwarder, the way an operator connects: the echo round trip works.
    let fwd_a = forwarder(&gw, &home, &a)?;
    assert_eq!(
        echo_round_trip(fwd_a.listen, b"through the forwarder")?,
        b"through the forwarder"
    );
    let fwd_b = forwarder(&gw, &home, &b)?;
    assert_eq!(
        echo_round_trip(fwd_b.listen, b"b works too")?,
        b"b works too"
    );

    // Plain TCP to the endpoint's listener: nothing comes back, the agent never hears of it.
    plain_tcp_gets_nothing(a_addr, b"GET / HTTP/1.0\r\n\r\nplain bytes to the echo")?;
    wait_denial(&gw, &a_id, "UNAUTHENTICATED", "TLS")?;

    // Endpoint B's certificate (valid, same CA) against endpoint A: refused.
    let b_cred = TcpCredential::of_record(&b)?;
    assert_eq!(b_cred.endpoint_id, b_id);
    let crossed = b_cred.round_trip(a_addr, b"b's certificate at a");
    assert!(
        crossed.as_ref().map(|back| back.is_empty()).unwrap_or(true),
        "{crossed:?}"
    );
    wait_denial(
        &gw,
        &a_id,
        "UNAUTHENTICATED",
        &format!("certificate of endpoint {b_id}, not of endpoint {a_id}"),
    )?;
    // While B's own listener takes it.
    assert_eq!(b_cred.round_trip(address(&b)?, b"at home")?, b"at home");

    // Retired: B's forwarder gets nothing through, and B's certificate is refused at A as retired.
    gw.cli(&["ops", "endpoint", "retire", &b_id])?.ok()?;
    let after = echo_round_trip(fwd_b.listen, b"after retire");
    assert!(
        after.as_ref().map(|back| back.is_empty()).unwrap_or(true),
        "{after:?}"
    );
    let retired = b_cred.round_trip(a_addr, b"retired certificate");
    assert!(
        retired.as_ref().map(|back| back.is_empty()).unwrap_or(true),
        "{retired:?}"
    );
    wait_denial(
        &gw,
        &a_id,
        "ENDPOINT_RETIRED",
        &format!("certificate of endpoint {b_id}, which is retired"),
    )?;
    // A is untouched by all of it.
    assert_eq!(
        echo_round_trip(fwd_a.listen, b"a still works")?,
        b"a still works"
    );

    // The silent client: cut once the grace time is over, not before, and audited.
    silent.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut sink = Vec::new();
    let _ = silent.read_to_end(&mut sink);
    let waited = silent_since.elapsed();
    assert!(sink.is_empty(), "{sink:?}");
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(16),
        "cut after {waited:?}"
    );
    wait_denial(&gw, &a_id, "UNAUTHENTICATED", "no TLS handshake within 10s")?;

    // None of the refused sessions reached the agent: its trail knows only the admitted ones.
    let refused: Vec<String> = denials(&gw, &a_id)
        .iter()
        .filter_map(|r| r["session_id"].as_str().map(str::to_string))
        .collect();
    assert!(refused.len() >= 4, "{refused:?}");
    let trail = agent.trail_when(|t| {
        t.iter()
            .any(|r| r["endpoint_id"] == a_id.as_str() && r["kind"] == "session.opened")
    })?;
    assert!(trail
        .iter()
        .any(|r| r["endpoint_id"] == a_id.as_str() && r["kind"] == "session.opened"));
    for s in &refused {
        assert!(
            !trail.iter().any(|r| r["session_id"] == s.as_str()),
            "the agent saw refused session {s}"
        );
    }
    assert_eq!(gw.cli(&["audit", "verify"])?.ok()?["ok"], true);
    Ok(())
}

/// The vendor trail's store (PostgreSQL) stops while a tcp session is live: the session is
/// cut with reason `error`, new sessions are refused with the trail's error, the agent stays
/// connected, and once the cluster is back new sessions work and the trail holds everything
/// (the cut and the refusal were held and written on recovery, with the outage itself).
#[test]
fn store_outage_cuts_live_sessions_refuses_new_ones_and_recovers() -> Result<()> {
    let cluster = postern::pg_cluster::PgCluster::start_with(&Default::default());
    let url = cluster.create_database("vendor_trail_outage");
    let dir = tempfile::tempdir()?;
    let gw = Gateway::start_with_store(&dir.path().join("gw"), &url)?;
    let echo = echo_server()?;
    let mut agent = Agent::enroll(
        &gw,
        &dir.path().join("agent"),
        "outage-app",
        "acme-corp",
        &tcp_resource(echo),
    )?;
    agent.run()?;
    assert!(gw.wait_online(&agent.appliance_id, Duration::from_secs(30)));
    let grant = gw.request_operate("outage-app", "acme-corp", "1h")?;
    assert_eq!(grant["state"], "active", "{grant}");
    let home = dir.path().join("home");
    let ep = create_tcp_endpoint(&gw, &home, "outage-app")?;
    let id = id_of(&ep);
    let fwd = forwarder(&gw, &home, &ep)?;
    let mut live = TcpStream::connect(fwd.listen)?;
    live.set_read_timeout(Some(Duration::from_secs(20)))?;
    live.write_all(b"tick")?;
    let mut buf = [0u8; 4];
    live.read_exact(&mut buf)?;
    assert_eq!(&buf, b"tick");

    // The store goes away: the live session, writing nothing, is cut all the same.
    cluster.stop();
    let stopped = Instant::now();
    let mut rest = Vec::new();
    let _ = live.read_to_end(&mut rest);
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "the live session outlived the store by {:?}",
        stopped.elapsed()
    );
    // New sessions are refused, not relayed unrecorded.
    let refused = echo_round_trip(fwd.listen, b"while down").unwrap_or_default();
    assert!(refused.is_empty(), "a session went ahead: {refused:?}");
    // The agent stays up through the outage.
    assert!(agent
        .pid()
        .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists()));

    eprintln!("outage: cut and refused after {:?}", stopped.elapsed());
    cluster.restart();
    let restarted = Instant::now();
    let mut back = Vec::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            back = echo_round_trip(fwd.listen, b"after").unwrap_or_default();
            back == b"after"
        }),
        "new sessions did not work again: {back:?}; forwarder: {}",
        fwd.log_text()
    );
    eprintln!(
        "outage: sessions again {:?} after the restart",
        restarted.elapsed()
    );
    let mut records = Vec::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            records = audit_kinds(&gw).unwrap_or_default();
            records.iter().any(|r| r["kind"] == "audit.store_recovered")
        }),
        "{records:?}"
    );
    let mine = |kind: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["kind"] == kind && r["endpoint_id"] == id.as_str())
            .collect()
    };
    let closed = mine("session.closed");
    assert!(
        closed.iter().any(|r| r["detail"]["reason"] == "error"),
        "the cut session's end, held through the outage: {records:?}"
    );
    assert!(
        mine("denied")
            .iter()
            .any(|r| r["detail"]["code"] == "INTERNAL"
                && r["detail"]["reason"]
                    .as_str()
                    .is_some_and(|m| m.contains("vendor audit trail cannot be written"))),
        "the refusal, with its reason: {records:?}"
    );
    assert!(gw.cli(&["audit", "verify"])?.success, "the chain verifies");
    Ok(())
}

/// One echo over a fresh forwarded connection: `Some(bytes)` back, or `None` if it was refused.
fn one_echo(listen: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(listen).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(payload).ok()?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).ok().map(|()| back)
}

/// The customer's trail on a full disk: a live session is cut, a new one is refused with
/// `AUDIT_UNAVAILABLE`, the agent keeps running and says why; with space again, sessions work
/// and the trail verifies (nothing half-written was left in it).
#[test]
fn full_trail_disk_cuts_and_refuses_sessions_and_the_agent_recovers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    let echo = echo_server()?;
    let app = "full-disk-app";
    let agent_dir = dir.path().join("agent");
    let mut agent = Agent::enroll(&gw, &agent_dir, app, "acme-corp", &tcp_resource(echo))?;
    let Some(disk) = TinyDisk::mount(&agent_dir.join("trail"), "256k")? else {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); the full-disk test did not run"
        );
        return Ok(());
    };
    disk.hold_trail(&agent)?;
    agent.run()?;
    assert!(
        gw.wait_online(&agent.appliance_id, Duration::from_secs(30)),
        "{}",
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    let grant = gw.request_operate(app, "acme-corp", "1h")?;
    assert_eq!(grant["state"], "active", "{grant}");
    let home = dir.path().join("home");
    let ep = create_tcp_endpoint(&gw, &home, app)?;
    let fwd = forwarder(&gw, &home, &ep)?;
    assert_eq!(
        one_echo(fwd.listen, b"before").as_deref(),
        Some(&b"before"[..])
    );
    let mut live = TcpStream::connect(fwd.listen)?;
    live.set_read_timeout(Some(Duration::from_secs(15)))?;
    live.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    live.read_exact(&mut buf)?;

    let filler = disk.fill()?;
    // The trail's last page may still hold a few records; once it is full, a new session's
    // opening record cannot be written: refused, and the live one is cut.
    let refused = (0..40).find(|_| one_echo(fwd.listen, b"while full").is_none());
    assert!(
        refused.is_some(),
        "sessions kept being served with the disk full"
    );
    let mut rest = Vec::new();
    let _ = live.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the live session went on: {rest:?}");
    let pid = agent.pid().ok_or_else(|| anyhow!("agent not running"))?;
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the agent exited"
    );
    let log = std::fs::read_to_string(&agent.log)?;
    assert!(
        log.contains("cannot write the customer's audit trail"),
        "the agent did not say why: {log}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || denials(&gw, &id_of(&ep))
            .iter()
            .any(|r| r.to_string().contains("AUDIT_UNAVAILABLE"))),
        "the vendor trail does not show the refusal: {:?}",
        denials(&gw, &id_of(&ep))
    );

    std::fs::remove_file(&filler)?;
    assert!(
        wait_until(Duration::from_secs(10), || one_echo(fwd.listen, b"after")
            .is_some_and(|b| b == b"after")),
        "sessions did not work again once the disk had space"
    );
    let verified = agent.verify_trail()?.ok()?;
    assert_eq!(verified["ok"], true, "{verified}");
    assert!(agent.trail()?.iter().any(|r| r["kind"] == "session.opened"));
    drop(agent);
    drop(disk);
    Ok(())
}

/// The vendor trail's store is the gateway's SQLite file, on a disk that fills up while a tcp
/// session is live: the next record that cannot be written stops what it records (the new
/// session is refused, not relayed) and takes the trail down, which cuts the live session; the
/// gateway keeps answering what only reads the store and refuses what must write with a
/// structured error; the agent stays connected. With space again the held records are written
/// (the cut with reason `error`, the refusals, `audit.store_recovered`), sessions work and the
/// chain verifies.
#[test]
fn full_sqlite_store_cuts_live_sessions_keeps_serving_and_recovers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("gw");
    // Room for the database and its WAL; the filler takes the rest.
    let Some(disk) = TinyDisk::mount(&data, "32m")? else {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); the full-store test did not run"
        );
        return Ok(());
    };
    let gw = Gateway::start(&data)?;
    let echo = echo_server()?;
    let app = "full-store-app";
    let mut agent = Agent::enroll(
        &gw,
        &dir.path().join("agent"),
        app,
        "acme-corp",
        &tcp_resource(echo),
    )?;
    agent.run()?;
    assert!(gw.wait_online(&agent.appliance_id, Duration::from_secs(30)));
    let grant = gw.request_operate(app, "acme-corp", "1h")?;
    assert_eq!(grant["state"], "active", "{grant}");
    let home = dir.path().join("home");
    let ep = create_tcp_endpoint(&gw, &home, app)?;
    let id = id_of(&ep);
    let fwd = forwarder(&gw, &home, &ep)?;
    let mut live = TcpStream::connect(fwd.listen)?;
    live.set_read_timeout(Some(Duration::from_secs(20)))?;
    live.write_all(b"tick")?;
    let mut buf = [0u8; 4];
    live.read_exact(&mut buf)?;
    assert_eq!(&buf, b"tick");

    let filler = disk.fill()?;
    // A session's start is recorded before it is relayed: with the disk full that record
    // fails and the session is refused. (A write that fits in space SQLite already holds, the
    // WAL's tail, may still go through first: the loop is bounded by the WAL's size.)
    let mut relayed_while_full = 0;
    let mut refused = false;
    for _ in 0..200 {
        match one_echo(fwd.listen, b"while full") {
            Some(back) => {
                assert_eq!(back, b"while full");
                relayed_while_full += 1;
            }
            None => {
                refused = true;
                break;
            }
        }
    }
    assert!(
        refused,
        "{relayed_while_full} sessions went ahead on a full disk and none was refused"
    );
    let down = Instant::now();
    // The trail is down: the live session, writing nothing itself, is cut all the same.
    let mut rest = Vec::new();
    let _ = live.read_to_end(&mut rest);
    assert!(
        down.elapsed() < Duration::from_secs(10),
        "the live session outlived the trail by {:?}",
        down.elapsed()
    );
    // Still refused while the disk is full: nothing is relayed unrecorded.
    assert_eq!(
        one_echo(fwd.listen, b"still full"),
        None,
        "a session went ahead with the trail down"
    );
    // What only reads the store is still served; what must write is refused, structured.
    let listed = gw.cli(&["appliance", "list"])?.ok()?;
    assert!(
        listed["appliances"].as_array().is_some_and(|a| a
            .iter()
            .any(|x| x["appliance_id"] == agent.appliance_id.as_str() && x["online"] == true)),
        "{listed}"
    );
    let write = gw.cli(&[
        "access",
        "request",
        "--app",
        app,
        "--customer",
        "acme-corp",
        "--level",
        "operate",
        "--duration",
        "1h",
        "--reason",
        "while full",
    ])?;
    assert!(
        !write.success,
        "a grant was stored on a full disk: {}",
        write.json
    );
    assert!(
        write.error_code().is_some(),
        "not a structured error: {} {}",
        write.json,
        write.stderr
    );
    assert!(
        agent
            .pid()
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists()),
        "the agent exited"
    );
    eprintln!(
        "full store: {relayed_while_full} sessions fit before the refusal; cut after {:?}",
        down.elapsed()
    );

    std::fs::remove_file(&filler)?;
    let freed = Instant::now();
    let mut back = Vec::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            back = echo_round_trip(fwd.listen, b"after").unwrap_or_default();
            back == b"after"
        }),
        "new sessions did not work again: {back:?}; forwarder: {}\ngateway log: {}",
        fwd.log_text(),
        std::fs::read_to_string(&gw.log).unwrap_or_default()
    );
    eprintln!(
        "full store: sessions again {:?} after space came back",
        freed.elapsed()
    );
    let mut records = Vec::new();
    assert!(
        wait_until(Duration::from_secs(15), || {
            records = audit_kinds(&gw).unwrap_or_default();
            records.iter().any(|r| r["kind"] == "audit.store_recovered")
        }),
        "{records:#?}"
    );
    let mine = |kind: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["kind"] == kind && r["endpoint_id"] == id.as_str())
            .collect()
    };
    assert!(
        mine("session.closed")
            .iter()
            .any(|r| r["detail"]["reason"] == "error"),
        "the cut session's end, held through the outage: {records:#?}"
    );
    assert!(
        mine("denied").iter().any(|r| r["detail"]["reason"]
            .as_str()
            .is_some_and(|m| m.contains("vendor audit trail cannot be written"))),
        "the refusal, with its reason: {records:#?}"
    );
    // Every session that was relayed is recorded as opened and as closed: nothing unrecorded.
    let opened: Vec<&str> = mine("session.opened")
        .iter()
        .filter_map(|r| r["session_id"].as_str())
        .collect();
    let closed: Vec<&str> = mine("session.closed")
        .iter()
        .filter_map(|r| r["session_id"].as_str())
        .collect();
    assert!(
        opened.len() >= relayed_while_full + 2,
        "{} sessions opened in the trail",
        opened.len()
    );
    for s in &opened {
        assert!(
            wait_until(Duration::from_secs(10), || closed.contains(s) || {
                audit_kinds(&gw)
                    .unwrap_or_default()
                    .iter()
                    .any(|r| r["kind"] == "session.closed" && r["session_id"] == *s)
            }),
            "session {s} has no end in the trail"
        );
    }
    let verified = gw.cli(&["audit", "verify"])?.ok()?;
    assert_eq!(verified["ok"], true, "{verified}");
    Ok(())
}
