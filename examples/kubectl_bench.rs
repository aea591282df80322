//! kubectl endpoint benchmark on loopback: latency of sequential `GET
//! /api/v1/namespaces/<ns>/pods` on one kept-alive connection, straight to the test API
//! server and through a Postern kubectl endpoint (real `postern server` + `postern-agent`
//! processes), and the wall time of `kubectl get pods` both ways.
//!
//! ```sh
//! cargo build --release --workspace --bins && cargo run --release --example kubectl_bench
//! ```
//!
//! Prints exactly one JSON line on stdout; progress goes to stderr.
//! `KUBECTL_BENCH_REQUESTS` sets the number of measured requests per path (default 500).

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use postern::{
    kube_apiserver::{kubectl, KubeApiServer},
    testbed::{bin, Agent, Gateway},
};
use serde_json::{json, Value};
use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

const NS: &str = "my-app-prod";
const WARMUP: usize = 50;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0)
}

struct Target {
    addr: SocketAddr,
    server_name: String,
    ca_pem: String,
    client: Option<(String, certs::Secret)>,
    bearer: Option<String>,
}

/// Sequential GETs on one kept-alive HTTP/1.1 connection; microseconds per request.
async fn latencies(t: &Target, path: &str, n: usize) -> Result<Vec<u64>> {
    let client = t.client.as_ref().map(|(c, k)| (c.as_str(), k));
    let tls = certs::client_config(&t.ca_pem, client, vec![b"http/1.1".to_vec()])?;
    let tcp = tokio::net::TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from(t.server_name.clone())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut out = Vec::with_capacity(n);
    for i in 0..n + WARMUP {
        let mut req = hyper::Request::get(path)
            .header("host", t.server_name.as_str())
            .header("accept", "application/json");
        if let Some(b) = &t.bearer {
            req = req.header("authorization", format!("Bearer {b}"));
        }
        let req = req.body(Empty::new())?;
        let start = Instant::now();
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let us = start.elapsed().as_micros() as u64;
        if !status.is_success() {
            bail!("GET {path}: {status} {}", String::from_utf8_lossy(&body));
        }
        if i >= WARMUP {
            out.push(us);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Median wall time of `kubectl get pods` (after one warm-up run that fills the discovery cache).
fn kubectl_ms(cfg: &Path) -> Result<f64> {
    let mut runs = Vec::new();
    for i in 0..6 {
        let t = Instant::now();
        let (ok, out, err) = kubectl(cfg, &["get", "pods"], None, Duration::from_secs(60))?;
        if !ok || !out.contains("web-1") {
            bail!("kubectl get pods failed: {err}");
        }
        if i > 0 {
            runs.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs.get(runs.len() / 2).copied().unwrap_or(0.0))
}

/// The value of `key: <base64>` in a kubeconfig, decoded.
fn field(text: &str, key: &str) -> Result<String> {
    let v = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .ok_or_else(|| anyhow!("kubeconfig has no {key}"))?
        .trim()
        .trim_matches('"');
    Ok(v.to_string())
}

fn b64(s: &str) -> Result<String> {
    Ok(String::from_utf8(
        base64::engine::general_purpose::STANDARD.decode(s)?,
    )?)
}

fn main() -> Result<()> {
    let n: usize = std::env::var("KUBECTL_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    if cfg!(debug_assertions) {
        eprintln!("kubectl_bench: warning: debug build; use --release for meaningful numbers");
    }
    let dir = tempfile::tempdir()?;
    let api = KubeApiServer::start()?;
    let upstream = dir.path().join("upstream.kubeconfig");
    std::fs::write(&upstream, api.kubeconfig(NS))?;
    eprintln!(
        "kubectl_bench: test API server on {}; starting gateway and agent",
        api.addr
    );
    let gw = Gateway::start(&dir.path().join("gw"))?;
    let body = format!(
        "[policy]\napproval = \"automatic\"\n\n[[resource]]\nid = \"aws_eks_cluster.main_cluster\"\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespaces = [\"{NS}\"]\n",
        upstream.display()
    );
    let mut agent = Agent::enroll(
        &gw,
        &dir.path().join("agent"),
        "bench-app",
        "acme-corp",
        &body,
    )?;
    agent.run()?;
    if !gw.wait_online(&agent.appliance_id, Duration::from_secs(30)) {
        bail!("agent never came online");
    }
    gw.request_operate("bench-app", "acme-corp", "1h")?;
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
            "kubectl",
            "--app",
            "bench-app",
            "--customer",
            "acme-corp",
        ])
        .args([
            "--origin-resource-id",
            "aws_eks_cluster.main_cluster",
            "--ttl",
            "1h",
        ])
        .env("POSTERN_ADDR", gw.api.to_string())
        .env("POSTERN_TOKEN", &gw.admin_token)
        .env("POSTERN_CA_FILE", &gw.ca_file)
        .env("HOME", &home)
        .stdin(Stdio::null())
        .output()?;
    let ep: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    let cfg_path = ep["kubeconfig"]
        .as_str()
        .ok_or_else(|| anyhow!("no kubeconfig in {ep}"))?
        .to_string();
    let text = std::fs::read_to_string(&cfg_path)?;
    let server = field(&text, "server")?;
    let through = Target {
        addr: server.trim_start_matches("https://").parse()?,
        server_name: field(&text, "tls-server-name")?,
        ca_pem: b64(&field(&text, "certificate-authority-data")?)?,
        client: Some((
            b64(&field(&text, "client-certificate-data")?)?,
            certs::Secret::new(b64(&field(&text, "client-key-data")?)?),
        )),
        bearer: None,
    };
    let direct = Target {
        addr: api.addr,
        server_name: "localhost".into(),
        ca_pem: api.ca_pem.clone(),
        client: None,
        bearer: Some(api.token.clone()),
    };
    let path = format!("/api/v1/namespaces/{NS}/pods");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    eprintln!("kubectl_bench: {n} sequential GET {path}, direct");
    let d = rt.block_on(latencies(&direct, &path, n))?;
    eprintln!("kubectl_bench: {n} sequential GET {path}, through the endpoint");
    let e = rt.block_on(latencies(&through, &path, n))?;

    let direct_cfg = dir.path().join("direct-home").join("direct.yaml");
    std::fs::create_dir_all(direct_cfg.parent().unwrap_or(dir.path()))?;
    std::fs::write(&direct_cfg, api.kubeconfig(NS))?;
    eprintln!("kubectl_bench: kubectl get pods, both ways");
    let direct_kubectl_ms = kubectl_ms(&direct_cfg)?;
    let endpoint_kubectl_ms = kubectl_ms(Path::new(&cfg_path))?;

    let (dp50, ep50, ep99) = (
        percentile(&d, 0.5),
        percentile(&e, 0.5),
        percentile(&e, 0.99),
    );
    let line = json!({
        "bench": "kubectl",
        "requests": n,
        "direct_p50_us": dp50,
        "direct_p99_us": percentile(&d, 0.99),
        "endpoint_p50_us": ep50,
        "endpoint_p99_us": ep99,
        "added_p50_us": ep50.saturating_sub(dp50),
        "ratio": if dp50 > 0 { (ep50 as f64 / dp50 as f64 * 100.0).round() / 100.0 } else { 0.0 },
        "direct_kubectl_ms": (direct_kubectl_ms * 10.0).round() / 10.0,
        "endpoint_kubectl_ms": (endpoint_kubectl_ms * 10.0).round() / 10.0,
        "cores": cores,
    });
    println!("{line}");
    drop(agent);
    drop(gw);
    Ok(())
}
