//! Operating the agent, and the gateway as shipped: `postern-agent run --metrics … --log-format
//! json` scraped with an HTTP client through connect, sessions, a lost gateway and the
//! reconnect; `postern server` started from deploy/gateway.toml (so the example stays valid);
//! and the gateway's `/readyz` answering 503 while its PostgreSQL store is down.

use anyhow::{anyhow, bail, Context, Result};
use postern::scrape::{healthy_and_ready, http_get, sample};
use postern::tcp_endpoint::{self, Forwarder};
use postern::testbed::{bin, echo_server, first_line, terminate, wait_until, Agent, Gateway};
use serde_json::Value;
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

fn scrape(addr: SocketAddr) -> String {
    match http_get(addr, "/metrics") {
        Ok((200, body)) => body,
        _ => String::new(),
    }
}

/// Polls the metrics (20 s at most) until `series` satisfies `ok`; the last scrape on failure.
fn until_sample(addr: SocketAddr, series: &str, ok: impl Fn(f64) -> bool) -> Result<String> {
    let mut last = String::new();
    if wait_until(Duration::from_secs(20), || {
        last = scrape(addr);
        sample(&last, series).is_some_and(&ok)
    }) {
        Ok(last)
    } else {
        bail!("{series} never got there: {last}")
    }
}

/// `postern-agent --output json run --metrics 127.0.0.1:0 --log-format json`; returns the
/// process and the `connected` line it printed once the gateway accepted it.
fn run_agent(agent: &Agent) -> Result<(Child, Value)> {
    let mut child = Command::new(bin("postern-agent")?)
        .args([
            "--output",
            "json",
            "run",
            "--metrics",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--config",
        ])
        .arg(&agent.config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&agent.log)?)
        .spawn()
        .context("starting postern-agent run")?;
    match first_line(&mut child, Duration::from_secs(30))? {
        line if !line.trim().is_empty() => Ok((child, serde_json::from_str(line.trim())?)),
        _ => {
            terminate(&mut child, Duration::from_secs(5));
            bail!(
                "the agent never said it connected; log: {}",
                std::fs::read_to_string(&agent.log).unwrap_or_default()
            )
        }
    }
}

#[test]
fn agent_metrics_health_and_json_logs_through_sessions_and_a_reconnect() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gw_dir = dir.path().join("gw");
    let mut gw = Gateway::start(&gw_dir)?;
    let echo = echo_server()?;
    let agent = Agent::enroll(
        &gw,
        &dir.path().join("agent"),
        "shop",
        "acme",
        &format!("[policy]\napproval = \"automatic\"\n\n[[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"{echo}\"\n"),
    )?;
    let (mut child, connected) = run_agent(&agent)?;
    let metrics: SocketAddr = connected["metrics"]
        .as_str()
        .ok_or_else(|| anyhow!("the connected line names no metrics address: {connected}"))?
        .parse()?;
    assert!(
        metrics.ip().is_loopback() && metrics.port() != 0,
        "{metrics}"
    );

    healthy_and_ready(metrics)?;
    let first = until_sample(metrics, "postern_agent_gateway_connected", |v| v == 1.0)?;
    assert!(first.trim_end().ends_with("# EOF"), "{first}");
    let reconnects_before = sample(&first, "postern_agent_reconnects_total")
        .ok_or_else(|| anyhow!("no reconnects series: {first}"))?;

    // A tcp endpoint (a command to the agent), and a session held open through it.
    assert_eq!(gw.request_operate("shop", "acme", "1h")?["state"], "active");
    let home = dir.path().join("home");
    let ep = tcp_endpoint::create(&gw, &home, "shop", "acme", "null_resource.echo")?;
    let ep_id = ep["id"].as_str().unwrap_or_default().to_string();
    let fwd = Forwarder::start(&gw, &gw.admin_token, &home, &ep_id)?;
    let mut session = TcpStream::connect(fwd.listen)?;
    session.set_read_timeout(Some(Duration::from_secs(20)))?;
    session.write_all(b"ping")?;
    let mut back = [0u8; 4];
    session.read_exact(&mut back)?;
    assert_eq!(&back, b"ping");
    let open = until_sample(metrics, "postern_agent_sessions_open{type=\"tcp\"}", |v| {
        v == 1.0
    })?;
    assert!(
        sample(&open, "postern_agent_commands_applied_total").is_some_and(|n| n >= 1.0),
        "{open}"
    );
    assert!(
        sample(
            &open,
            "postern_agent_trail_records_total{kind=\"session.opened\"}"
        ) == Some(1.0),
        "{open}"
    );
    assert!(
        sample(&open, "postern_agent_trail_write_seconds_count").is_some_and(|n| n >= 1.0),
        "{open}"
    );
    drop(session);
    until_sample(metrics, "postern_agent_sessions_open{type=\"tcp\"}", |v| {
        v == 0.0
    })?;
    until_sample(
        metrics,
        "postern_agent_trail_records_total{kind=\"session.closed\"}",
        |v| v == 1.0,
    )?;
    drop(fwd);

    // The gateway goes away: not ready, disconnected; it comes back: a reconnect, ready again.
    let (api, relay) = (gw.api, gw.relay);
    gw.stop();
    until_sample(metrics, "postern_agent_gateway_connected", |v| v == 0.0)?;
    let (status, why) = http_get(metrics, "/readyz")?;
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("tunnel"), "{why}");
    assert_eq!(http_get(metrics, "/healthz")?.0, 200);
    let _gw = Gateway::start_on(&gw_dir, api, relay)?;
    let back = until_sample(metrics, "postern_agent_gateway_connected", |v| v == 1.0)?;
    assert!(
        sample(&back, "postern_agent_reconnects_total").is_some_and(|n| n > reconnects_before),
        "{back}"
    );
    assert_eq!(http_get(metrics, "/readyz")?.0, 200);

    terminate(&mut child, Duration::from_secs(10));
    // --log-format json: every line the agent logged is one JSON object.
    let log = std::fs::read_to_string(&agent.log)?;
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "the agent logged nothing");
    for line in &lines {
        let v: Value = serde_json::from_str(line).with_context(|| format!("log line {line:?}"))?;
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{v}");
    }
    assert!(log.contains("serving /metrics"), "{log}");
    Ok(())
}

/// deploy/gateway.toml with its paths and addresses moved to a temp dir and loopback port 0;
/// every key replaced must be in the example.
fn example_config(data_dir: &std::path::Path) -> Result<String> {
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/gateway.toml"),
    )?;
    let dir = data_dir
        .to_str()
        .ok_or_else(|| anyhow!("temp dir is not UTF-8"))?;
    let mut replaced = Vec::new();
    let lines: Vec<String> = example
        .lines()
        .map(|l| {
            let key = l.split('=').next().unwrap_or_default().trim();
            let value = match key {
                "data_dir" => serde_json::to_string(dir).unwrap_or_default(),
                "api" | "relay" | "metrics" => "\"127.0.0.1:0\"".to_string(),
                "endpoint_host" => "\"127.0.0.1\"".to_string(),
                _ => return l.to_string(),
            };
            if l.starts_with(key) {
                replaced.push(key.to_string());
                format!("{key} = {value}")
            } else {
                l.to_string()
            }
        })
        .collect();
    for key in ["data_dir", "api", "relay", "metrics", "endpoint_host"] {
        if !replaced.iter().any(|k| k == key) {
            bail!("deploy/gateway.toml no longer sets {key}");
        }
    }
    Ok(lines.join("\n") + "\n")
}

#[test]
fn the_example_gateway_config_starts_a_gateway() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("state");
    std::fs::create_dir_all(&data_dir)?;
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, example_config(&data_dir)?)?;
    let gw = Gateway::start_with_config(&data_dir, &config)?;
    let metrics = gw
        .metrics
        .ok_or_else(|| anyhow!("the example config's metrics listener is not in the ready line"))?;
    assert_eq!(http_get(metrics, "/healthz")?.0, 200);
    let (status, why) = http_get(metrics, "/readyz")?;
    assert_eq!(status, 200, "{why}");
    assert!(
        gw.ca_file.starts_with(&data_dir),
        "{}",
        gw.ca_file.display()
    );
    let me = gw.cli(&["whoami"])?.ok()?;
    assert_eq!(me["role"], "admin", "{me}");
    Ok(())
}

#[test]
fn gateway_readyz_is_503_while_its_store_is_down() -> Result<()> {
    let cluster = postern::pg_cluster::PgCluster::start_with(&Default::default());
    let url = cluster.create_database("readyz_outage");
    let dir = tempfile::tempdir()?;
    let gw_dir = dir.path().join("gw");
    let gw =
        Gateway::start_with_limits(&gw_dir, "", &["--store", &url, "--metrics", "127.0.0.1:0"])?;
    let metrics = gw.metrics.ok_or_else(|| anyhow!("no metrics address"))?;
    assert_eq!(http_get(metrics, "/readyz")?.0, 200);

    cluster.stop();
    let mut last = (0, String::new());
    assert!(
        wait_until(Duration::from_secs(30), || {
            last = http_get(metrics, "/readyz").unwrap_or_default();
            last.0 == 503
        }),
        "{last:?}"
    );
    assert!(last.1.contains("store"), "{last:?}");
    // The process is up all the same, and says the store is down.
    assert_eq!(http_get(metrics, "/healthz")?.0, 200);
    assert_eq!(sample(&scrape(metrics), "postern_store_up"), Some(0.0));

    cluster.restart();
    assert!(
        wait_until(Duration::from_secs(30), || {
            http_get(metrics, "/readyz").is_ok_and(|(s, _)| s == 200)
        }),
        "not ready again after the store came back"
    );
    Ok(())
}
