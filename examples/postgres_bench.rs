//! Postgres endpoint benchmark: `pgbench -S` (select-only, 8 clients, 2 threads) straight at a
//! throwaway PostgreSQL and through a Postern postgres endpoint (real `postern server` +
//! `postern-agent`, SCRAM, TLS, every statement audited in both trails), in one run, with TLS
//! on both client paths (`ssl=on` at the server with a throwaway CA, `sslmode=require`).
//!
//! ```sh
//! cargo build --release --workspace --bins && cargo run --release --example postgres_bench
//! ```
//!
//! Prints exactly one JSON line on stdout; progress goes to stderr.
//! Measured on the 2-core dev machine (release): direct ≈ 16 700–17 000 tps, endpoint ≈ 8 700–9 000
//! tps, ratio 0.52–0.53 (every statement audited in both trails); 0.475 with PG_BENCH_AGENT_TLS=1.
//! Environment: `PG_BENCH_SECONDS` (default 15), `PG_BENCH_SCALE` (default 10),
//! `PG_BENCH_AGENT_TLS=1` (TLS on the agent's hop to the database too).

use anyhow::{anyhow, Context, Result};
use postern::{
    pg_cluster::{Options, PgCluster},
    testbed::{bin, Agent, Gateway},
};
use serde_json::json;
use std::{
    process::{Command, Stdio},
    time::Duration,
};

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

/// `(tps, average latency in ms)` from one pgbench run.
fn pgbench(url: &str, seconds: u64) -> Result<(f64, f64)> {
    let out = Command::new(PgCluster::bin_dir().join("pgbench"))
        .args([
            "-n",
            "-S",
            "-c",
            "8",
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            url,
        ])
        .stdin(Stdio::null())
        .output()
        .context("running pgbench")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(anyhow!(
            "pgbench failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let field = |prefix: &str| -> Result<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no {prefix:?} in pgbench output:\n{text}"))
    };
    Ok((field("tps = ")?, field("latency average = ")?))
}

fn main() -> Result<()> {
    let seconds = env_u64("PG_BENCH_SECONDS", 15)?;
    let scale = env_u64("PG_BENCH_SCALE", 10)?;
    let dir = tempfile::tempdir()?;

    // A throwaway CA for the server's TLS.
    let now = jiff::Timestamp::now();
    let ca = certs::Ca::generate("postgres_bench CA", now)?;
    let server = ca.issue_server(
        &["127.0.0.1".to_string(), "localhost".to_string()],
        now,
        Duration::from_secs(86_400),
    )?;
    let cluster = PgCluster::start_with(&Options {
        scram_for_others: true,
        tls: Some((server.cert_pem.clone(), server.key_pem.expose().to_string())),
        tls_only: false,
    });
    let url = cluster.create_database("bench");
    eprintln!("pgbench -i -s {scale} …");
    let init = Command::new(PgCluster::bin_dir().join("pgbench"))
        .args(["-i", "-q", "-s", &scale.to_string(), &url])
        .output()
        .context("pgbench -i")?;
    if !init.status.success() {
        return Err(anyhow!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        ));
    }

    let gw = Gateway::start(&dir.path().join("gw"))?;
    // The agent runs beside the database, so its hop is plaintext unless PG_BENCH_AGENT_TLS=1
    // (then `sslmode=require`, as a managed database forcing TLS would need).
    let agent_tls = std::env::var("PG_BENCH_AGENT_TLS").is_ok_and(|v| v == "1");
    let agent_sslmode = if agent_tls { "require" } else { "disable" };
    let body = format!(
        "[policy]\napproval = \"automatic\"\n\n[[resource]]\nid = \"aws_db_instance.main\"\nkind = \"postgres\"\n\
         admin_url = \"{url}?sslmode={agent_sslmode}\"\nschemas = [\"public\"]\nprivileges = [\"SELECT\"]\n"
    );
    let mut agent = Agent::enroll(&gw, &dir.path().join("agent"), "bench", "acme-corp", &body)?;
    agent.run()?;
    if !gw.wait_online(&agent.appliance_id, Duration::from_secs(30)) {
        return Err(anyhow!("agent never came online"));
    }
    gw.request_operate("bench", "acme-corp", "1h")?;
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home)?;
    let out = Command::new(bin("postern")?)
        .args([
            "--output",
            "json",
            "ops",
            "endpoint",
            "create",
            "--type",
            "postgres",
            "--app",
            "bench",
            "--customer",
            "acme-corp",
        ])
        .args([
            "--origin-resource-id",
            "aws_db_instance.main",
            "--ttl",
            "1h",
        ])
        .env("POSTERN_ADDR", gw.api.to_string())
        .env("POSTERN_TOKEN", &gw.admin_token)
        .env("POSTERN_CA_FILE", &gw.ca_file)
        .env("HOME", &home)
        .output()?;
    let ep: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("endpoint create output")?;
    let cs = ep["connection_string"]
        .as_str()
        .ok_or_else(|| anyhow!("no connection string: {ep}"))?;
    let through = cs.replace("sslmode=verify-full", "sslmode=require");

    let direct_url = format!("{url}?sslmode=require");
    eprintln!("direct: pgbench -S -c 8 -j 2 -T {seconds} …");
    let (direct_tps, direct_ms) = pgbench(&direct_url, seconds)?;
    eprintln!("direct: {direct_tps:.0} tps, {direct_ms:.3} ms; through the endpoint …");
    let (endpoint_tps, endpoint_ms) = pgbench(&through, seconds)?;
    eprintln!("endpoint: {endpoint_tps:.0} tps, {endpoint_ms:.3} ms");

    println!(
        "{}",
        json!({
            "bench": "postgres",
            "clients": 8,
            "threads": 2,
            "seconds": seconds,
            "scale": scale,
            "tls": "both paths (sslmode=require)",
            "agent_to_db": if agent_tls { "tls (sslmode=require)" } else { "plain (sslmode=disable)" },
            "direct_tps": direct_tps.round(),
            "endpoint_tps": endpoint_tps.round(),
            "ratio": (endpoint_tps / direct_tps * 1000.0).round() / 1000.0,
            "direct_latency_ms": direct_ms,
            "endpoint_latency_ms": endpoint_ms,
            "latency_ratio": (endpoint_ms / direct_ms * 1000.0).round() / 1000.0,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        })
    );
    drop(agent);
    drop(gw);
    drop(cluster);
    Ok(())
}
