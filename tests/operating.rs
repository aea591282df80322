//! Operating the gateway and the agent: `/metrics`, `/healthz` and `/readyz` scraped from
//! real `postern server` and `postern-agent run` processes with an HTTP client, and
//! `--log-format json` log lines parsed.

use anyhow::{anyhow, bail, Context, Result};
use postern::scrape::{healthy_and_ready, http_get, sample};
use postern::tcp_endpoint::{self, Forwarder};
use postern::testbed::{echo_round_trip, echo_server, wait_until, Agent, Gateway};
use serde_json::Value;
use std::{net::SocketAddr, os::unix::fs::PermissionsExt, path::Path, time::Duration};

const CLUSTER: &str = "aws_eks_cluster.main_cluster";

fn scrape(addr: SocketAddr) -> Result<String> {
    let (status, body) = http_get(addr, "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}: {body}");
    }
    Ok(body)
}

fn fake_kubectl(dir: &Path) -> Result<std::path::PathBuf> {
    let p = dir.join("kubectl");
    std::fs::write(
        &p,
        "#!/bin/sh\necho \"NAME READY STATUS\"\necho \"args: $*\"\n",
    )?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

fn agent_body(dir: &Path, echo: SocketAddr) -> Result<String> {
    let kubectl = fake_kubectl(dir)?;
    let kubeconfig = dir.join("cluster.kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n")?;
    Ok(format!(
        "[policy]\napproval = \"automatic\"\n\n\
         [tools]\nkubectl = \"{}\"\n\n\
         [[resource]]\nid = \"{CLUSTER}\"\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespaces = [\"my-app-prod\"]\n\n\
         [[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"{echo}\"\n",
        kubectl.display(),
        kubeconfig.display()
    ))
}

#[test]
fn gateway_metrics_health_and_json_logs_from_a_running_gateway() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gw = Gateway::start_with_limits(
        &dir.path().join("gw"),
        "",
        &["--metrics", "127.0.0.1:0", "--log-format", "json"],
    )?;
    let metrics = gw
        .metrics
        .ok_or_else(|| anyhow!("the ready line names no metrics address"))?;
    assert!(
        metrics.ip().is_loopback() && metrics.port() != 0,
        "{metrics}"
    );

    healthy_and_ready(metrics)?;

    let before = scrape(metrics)?;
    assert_eq!(
        sample(&before, "postern_agents_online"),
        Some(0.0),
        "{before}"
    );
    assert_eq!(sample(&before, "postern_store_up"), Some(1.0), "{before}");
    assert!(before.trim_end().ends_with("# EOF"), "{before}");

    // An agent connects, an op runs, a tcp session carries bytes and ends.
    let echo = echo_server()?;
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let body = agent_body(&agent_dir, echo)?;
    let _agent = Agent::online(&gw, &agent_dir, "my-app", "acme-corp", &body)?;
    let grant = gw.request_operate("my-app", "acme-corp", "1h")?;
    assert_eq!(grant["state"], "active", "{grant}");
    let op = gw
        .cli(&[
            "ops",
            "kubectl",
            "--app",
            "my-app",
            "--customer",
            "acme-corp",
            "--origin-resource-id",
            CLUSTER,
            "--command",
            "kubectl get pods",
            "--wait",
        ])?
        .ok()?;
    assert_eq!(op["state"], "completed", "{op}");

    let home = dir.path().join("home");
    let ep = tcp_endpoint::create(&gw, &home, "my-app", "acme-corp", "null_resource.echo")?;
    let ep_id = ep["id"].as_str().unwrap_or_default().to_string();
    let fwd = Forwarder::start(&gw, &gw.admin_token, &home, &ep_id)?;
    let payload = vec![0x5au8; 100_000];
    assert_eq!(echo_round_trip(fwd.listen, &payload)?.len(), payload.len());

    let mut last = String::new();
    let moved = wait_until(Duration::from_secs(20), || {
        last = scrape(metrics).unwrap_or_default();
        sample(
            &last,
            "postern_sessions_closed_total{type=\"tcp\",reason=\"client_closed\"}",
        )
        .or_else(|| {
            // Whatever the reason, one tcp session ended.
            last.lines()
                .find(|l| l.starts_with("postern_sessions_closed_total{type=\"tcp\""))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        })
        .is_some_and(|n| n >= 1.0)
    });
    assert!(moved, "no tcp session counted as closed: {last}");
    assert_eq!(sample(&last, "postern_agents_online"), Some(1.0), "{last}");
    assert_eq!(
        sample(&last, "postern_records{kind=\"op\",state=\"completed\"}"),
        Some(1.0),
        "{last}"
    );
    assert_eq!(
        sample(&last, "postern_records{kind=\"grant\",state=\"active\"}"),
        Some(1.0),
        "{last}"
    );
    assert_eq!(
        sample(&last, "postern_sessions_opened_total{type=\"tcp\"}"),
        Some(1.0),
        "{last}"
    );
    let up = sample(
        &last,
        "postern_session_bytes_total{type=\"tcp\",direction=\"up\"}",
    )
    .unwrap_or(0.0);
    assert!(up >= payload.len() as f64, "bytes up {up}: {last}");
    // Session and op records are written directly; only queued statements go through the
    // group-committing writer, so its histogram is present but may be empty here.
    assert!(
        sample(&last, "postern_audit_commit_seconds_count").is_some(),
        "{last}"
    );
    assert!(
        sample(&last, "postern_store_query_seconds_count").unwrap_or(0.0) >= 2.0,
        "{last}"
    );
    assert_eq!(
        sample(&last, "postern_approvals_pending"),
        Some(0.0),
        "{last}"
    );
    for door in ["relay", "api", "kube", "postgres", "ssh", "tcp"] {
        let series = format!("postern_handshakes_refused_total{{listener=\"{door}\"}}");
        assert_eq!(sample(&last, &series), Some(0.0), "{series}: {last}");
    }
    drop(fwd);

    // --log-format json: every line the gateway logged is one JSON object.
    let log = std::fs::read_to_string(&gw.log).context("reading the gateway log")?;
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "the gateway logged nothing");
    for line in &lines {
        let v: Value = serde_json::from_str(line).with_context(|| format!("log line {line:?}"))?;
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{v}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"fields\"") && l.contains("\"message\"")),
        "{log}"
    );
    Ok(())
}
