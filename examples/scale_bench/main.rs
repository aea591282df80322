//! Scale benchmark: gateway memory per idle agent, how fast a whole fleet is back after the
//! gateway is killed and restarted, and one-off op latency and throughput end to end, on the
//! SQLite store and on the PostgreSQL store.
//!
//! ```sh
//! cargo build --release --workspace --bins --examples && cargo run --release --example scale_bench
//! ```
//!
//! Prints exactly one JSON line on stdout; progress goes to stderr.
//!
//! The gateway is a real `postern server` process. The agents are real agent code (the
//! `tunnel-client` library's `enroll` and `tunnel::run`, what `postern-agent` runs), each with
//! its own key, certificate and QUIC connection, all in this process on one tokio runtime:
//! a thousand `postern-agent` processes would not fit on a small machine next to the gateway.
//!
//! Per store (fields suffixed `_sqlite` / `_postgres`):
//! - `rss_idle_kib`: the gateway's VmRSS with no appliance and no agent; `rss_<N>_kib` with N
//!   connected idle agents (after a heartbeat interval of rest); `rss_per_agent_kib` the
//!   difference over N. `rss_restart_<N>_kib` / `rss_per_agent_restart_kib`: the same for the
//!   restarted gateway once every agent is back (no enrollment history in its heap).
//!   `agent_side_rss_per_agent_kib` (first store only): this process's growth per agent, i.e.
//!   what one agent's tunnel costs on the appliance side.
//! - `reconnect_all_s`: SIGKILL the gateway, start it again on the same data dir and addresses,
//!   and time until the appliance list (`GET /v1/appliances`, what `postern appliance list`
//!   shows) has all N online; `gateway_ready_s` is the start-up part of it,
//!   `reconnect_gateway_cpu_s` the restarted gateway's CPU time until then. `agents_exited`
//!   counts agents that gave up (must be 0). `connect_all_s`: the same for the fleet's first
//!   start, all N dialling at once.
//! - Ops, with the automatic policy and `[tools] kubectl = "/bin/echo"`: `op_p50_ms` /
//!   `op_p99_ms` from M sequential ops (`POST /v1/ops`, then `GET /v1/ops/ID` every
//!   `op_poll_ms` until the op is final, over one kept-alive HTTPS connection: `op_client` =
//!   "https"); `ops_per_s` with 8 such clients at once over 8 appliances (polling every
//!   `ops_poll_ms`; `ops_gateway_cpu_s` / `ops_bench_cpu_s`: CPU time of the gateway and of
//!   this process over that run). `op_cli_p50_ms` is what an operator sees with `postern ops
//!   kubectl --wait` (a process per op; the CLI polls every 250 ms).
//!   The throwaway PostgreSQL cluster runs with `fsync=off` (see `src/pg_cluster.rs`), so the
//!   `_postgres` op figures do not pay for durable commits; the SQLite ones do.
//! - Revocation fan-out (`revocation.rs`), on the restarted gateway with all N agents: each
//!   appliance gets an operate grant, then the N grants are revoked in a burst (`POST
//!   /v1/grants/ID/revoke`, what `postern access revoke` calls, from `SCALE_BENCH_REVOKE_CLIENTS`
//!   kept-alive clients). `revocation_fanout_ms`: from the first revoke call until every agent
//!   has applied its revocation, observed at the agents (the `grant.sync` each one records in its
//!   customer trail once the new grant set took effect; a watcher woken by inotify reads the
//!   trails written to, so it takes no core from what it measures); `revocation_api_ms`: until the last
//!   call answered; `revocation_p50_ms` / `revocation_p99_ms`: per grant, from its call to its
//!   agent applying it. Then the kill switch, on the same gateway and agents: every appliance
//!   is granted again and ONE `POST /v1/grants/revoke {"customer": …}` (what `postern access
//!   revoke --customer` calls) revokes them all: `revocation_bulk_ms` from the call until every
//!   agent has applied it (same trail watcher), `revocation_bulk_api_ms` until it answered.
//! - The first page of a long vendor trail (`audit_page.rs`), on a gateway of its own whose
//!   store is seeded with `SCALE_BENCH_AUDIT_RECORDS` records by one bulk insert:
//!   `audit_first_page_ms` (the first `GET /v1/audit` after the restart, a page of 1000, what
//!   `postern audit list --limit 1000` asks), `audit_first_page_p50_ms` (the same call again),
//!   `audit_last_page_ms` (the page at the far end, by `after_seq`), `audit_appliance_page_ms`
//!   (one appliance's first page), `audit_first_page_cli_ms` (the CLI process, start to exit),
//!   and the gateway's RSS before and after (`audit_rss_before_kib`, `audit_rss_after_kib`).
//!
//! Environment:
//! - `SCALE_BENCH_AGENTS`: N (default 1000).
//! - `SCALE_BENCH_OPS`: M, ops per measurement (default 200).
//! - `SCALE_BENCH_CLI_OPS`: sequential CLI ops (default 20; 0 skips).
//! - `SCALE_BENCH_CONCURRENCY`: clients in the throughput run (default 8).
//! - `SCALE_BENCH_POLL_MS`: poll interval of the latency run (default 2); the throughput run
//!   polls every `SCALE_BENCH_TPUT_POLL_MS` (default 10) so polling does not crowd out the work.
//! - `SCALE_BENCH_REVOKE_CLIENTS`: concurrent revoking clients (default 8).
//! - `SCALE_BENCH_AUDIT_RECORDS`: records in the long trail (default 1000000; 0 skips).
//! - `SCALE_BENCH_STORES`: `sqlite,postgres` (default) or either one.
//! - `SCALE_BENCH_AGENT_DIRS=disk`: keep the agents' directories (and the trails each syncs by
//!   group commit) on disk; by default they go to `/dev/shm` when it exists, since 1000 real
//!   appliances would not share one disk (`agent_dirs` in the JSON says which).
//! - `SCALE_BENCH_OP_SPAWN=fork`: the in-process agents start op tools by forking this
//!   process (a `pre_exec` hook) instead of through `postern-agent`'s launcher mode, which is
//!   what `postern-agent run` uses (`op_spawn` in the JSON says which).
//! - `SCALE_BENCH_LOG`: a tracing filter (e.g. `tunnel_client=info`) for the in-process agents'
//!   logs on stderr; off by default.

mod audit_page;
mod revocation;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use endpoint_types::control::{OpRecord, OpState};
use http_body_util::{BodyExt, Full};
use hyper::{client::conn::http1::SendRequest, Method, Request};
use hyper_util::rt::TokioIo;
use postern::testbed::Gateway;
use serde_json::{json, Map, Value};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};
use tokio::{runtime::Runtime, sync::Semaphore, task::JoinHandle};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tunnel_client::{config::AgentConfig, tunnel};

const CUSTOMER: &str = "bench";
const RESOURCE: &str = "aws_eks_cluster.bench";
const OP_COMMAND: &str = "kubectl get pods";
/// Bound on one HTTPS request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one op from creation to a final state.
const OP_LIMIT: Duration = Duration::from_secs(60);
/// Rest before reading RSS: one heartbeat interval (5 s) so every link is in steady state.
const SETTLE: Duration = Duration::from_secs(5);
const ENROLL_CONCURRENCY: usize = 8;
const ADD_CONCURRENCY: usize = 4;
const LATENCY_WARMUP: usize = 5;

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

struct Cfg {
    agents: usize,
    ops: usize,
    cli_ops: usize,
    concurrency: usize,
    poll: Duration,
    tput_poll: Duration,
    revoke_clients: usize,
    audit_records: u64,
    /// `postern-agent`, which starts op tools for the in-process agents as it does for itself;
    /// `None` (`SCALE_BENCH_OP_SPAWN=fork`): the agents fork this process instead.
    op_launcher: Option<PathBuf>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// VmRSS of a process, KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// CPU seconds (user + system, all threads) a process has used so far.
fn cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let f: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// Median of three VmRSS readings a second apart.
fn rss_settled(pid: u32) -> Result<u64> {
    let mut v = Vec::new();
    for i in 0..3 {
        if i > 0 {
            thread::sleep(Duration::from_secs(1));
        }
        v.push(rss_kib(pid)?);
    }
    v.sort();
    Ok(v[1])
}

/// A thousand agents hold a UDP socket and an audit file each.
fn raise_nofile() {
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The last 4 KiB of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut start = text.len().saturating_sub(4096);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

// ---------------------------------------------------------------------------------------------
// A small HTTPS client for the gateway API: one kept-alive HTTP/1.1 connection, reopened when
// it breaks. The CLI opens a connection per call and `--wait` polls every 250 ms, which would
// measure the CLI rather than the gateway.

#[derive(Clone)]
struct ApiTarget {
    addr: SocketAddr,
    token: String,
    tls: TlsConnector,
}

impl ApiTarget {
    fn of(gw: &Gateway) -> Result<ApiTarget> {
        let ca = std::fs::read_to_string(&gw.ca_file)
            .with_context(|| format!("reading {}", gw.ca_file.display()))?;
        let tls = certs::client_config(&ca, None, vec![b"http/1.1".to_vec()])?;
        Ok(ApiTarget {
            addr: gw.api,
            token: gw.admin_token.clone(),
            tls: TlsConnector::from(Arc::new(tls)),
        })
    }
}

struct Api {
    t: ApiTarget,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Api {
    fn new(t: &ApiTarget) -> Api {
        Api {
            t: t.clone(),
            conn: None,
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let tcp = tokio::net::TcpStream::connect(self.t.addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls_pki_types::ServerName::IpAddress(self.t.addr.ip().into());
        let tls = self.t.tls.connect(name, tcp).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn call(&mut self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.call_inner(method.clone(), path, body))
            .await
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e.context(format!("{method} {path}")))
            }
            Err(_) => {
                self.conn = None;
                bail!("{method} {path}: no answer within {REQUEST_TIMEOUT:?}")
            }
        }
    }

    async fn call_inner(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            self.conn = Some(self.connect().await?);
        }
        let sender = self.conn.as_mut().ok_or_else(|| anyhow!("no connection"))?;
        sender.ready().await?;
        let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.t.addr.to_string())
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.t.token),
            );
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let resp = sender.send_request(req.body(Full::new(payload))?).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "HTTP {status}: not JSON: {:?}",
                String::from_utf8_lossy(&bytes)
            )
        })?;
        if !status.is_success() {
            bail!("HTTP {status}: {v}");
        }
        Ok(v)
    }

    async fn get(&mut self, path: &str) -> Result<Value> {
        self.call(Method::GET, path, None).await
    }

    async fn post(&mut self, path: &str, body: Value) -> Result<Value> {
        self.call(Method::POST, path, Some(&body)).await
    }

    async fn online(&mut self) -> Result<usize> {
        let list = self.get("/v1/appliances").await?;
        let all = list["appliances"]
            .as_array()
            .ok_or_else(|| anyhow!("no appliances in {list}"))?;
        Ok(all.iter().filter(|a| a["online"] == true).count())
    }

    /// One op from creation to a final state; returns its latency.
    async fn op(&mut self, app: &str, poll: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        let body = json!({
            "tool": "kubectl", "app": app, "customer": CUSTOMER, "origin_resource_id": RESOURCE,
            "command": OP_COMMAND, "timeout_s": 30,
        });
        let mut rec: OpRecord = serde_json::from_value(self.post("/v1/ops", body).await?)?;
        let path = format!("/v1/ops/{}", rec.id);
        while !rec.state.is_final() {
            if t0.elapsed() > OP_LIMIT {
                bail!(
                    "op {} still {} after {OP_LIMIT:?}",
                    rec.id,
                    rec.state.as_str()
                );
            }
            tokio::time::sleep(poll).await;
            rec = serde_json::from_value(self.get(&path).await?)?;
        }
        let dt = t0.elapsed();
        if rec.state != OpState::Completed
            || !rec
                .stdout
                .as_deref()
                .unwrap_or_default()
                .contains("get pods")
        {
            bail!(
                "op {} ended {}: {}",
                rec.id,
                rec.state.as_str(),
                serde_json::to_string(&rec).unwrap_or_default()
            );
        }
        Ok(dt)
    }
}

// ---------------------------------------------------------------------------------------------
// The fleet: agents on one runtime, each with its own shutdown token.

struct Fleet {
    shutdown: CancellationToken,
    handles: Vec<JoinHandle<Result<(), tunnel::TunnelError>>>,
    ready: Arc<AtomicUsize>,
}

impl Fleet {
    fn start(rt: &Runtime, configs: &[PathBuf], launcher: Option<&Path>) -> Result<Fleet> {
        let shutdown = CancellationToken::new();
        let ready = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::with_capacity(configs.len());
        for path in configs {
            let mut config = AgentConfig::load(path).map_err(|e| anyhow!("{e}"))?;
            // What `postern-agent run` sets: ops start through its launcher mode.
            config.ops.launcher = launcher.map(Path::to_path_buf);
            let (tx, rx) = tokio::sync::oneshot::channel();
            handles.push(rt.spawn(tunnel::run(config, shutdown.child_token(), Some(tx))));
            let ready = ready.clone();
            rt.spawn(async move {
                if rx.await.is_ok() {
                    ready.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        Ok(Fleet {
            shutdown,
            handles,
            ready,
        })
    }

    /// Agents whose `run` returned on its own: they gave up.
    fn exited(&self) -> usize {
        self.handles.iter().filter(|h| h.is_finished()).count()
    }

    fn stop(self, rt: &Runtime) {
        self.shutdown.cancel();
        let handles = self.handles;
        let done = rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(30), async move {
                let mut errors = 0;
                for h in handles {
                    if !matches!(h.await, Ok(Ok(()))) {
                        errors += 1;
                    }
                }
                errors
            })
            .await
        });
        match done {
            Ok(0) => {}
            Ok(n) => eprintln!("scale_bench:   {n} agents ended with an error"),
            Err(_) => eprintln!("scale_bench:   agents did not all stop within 30 s"),
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// POSTs `request(i)` for every `i` in `0..n` from a few kept-alive API connections at once
/// (the registrations, the grants); `answer(i, response)` of each, in index order.
fn post_each(
    client: &Runtime,
    target: &ApiTarget,
    n: usize,
    request: impl Fn(usize) -> (&'static str, Value) + Send + Sync + 'static,
    answer: impl Fn(usize, Value) -> Result<String> + Send + Sync + 'static,
) -> Result<Vec<String>> {
    let (request, answer) = (Arc::new(request), Arc::new(answer));
    let answers: Vec<(usize, String)> = client.block_on(async {
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..ADD_CONCURRENCY.min(n.max(1)) {
            let (next, target) = (next.clone(), target.clone());
            let (request, answer) = (request.clone(), answer.clone());
            tasks.push(tokio::spawn(async move {
                let mut api = Api::new(&target);
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return anyhow::Ok(out);
                    }
                    let (path, body) = request(i);
                    let got = api.post(path, body).await?;
                    out.push((i, answer(i, got)?));
                }
            }));
        }
        let mut all = Vec::with_capacity(n);
        for t in tasks {
            all.extend(t.await??);
        }
        anyhow::Ok(all)
    })?;
    let mut ordered = vec![String::new(); n];
    for (i, a) in answers {
        ordered[i] = a;
    }
    Ok(ordered)
}

/// Registers `n` appliances and enrolls an agent for each (in-process, concurrently); returns
/// the config paths.
fn enroll_fleet(
    rt: &Runtime,
    client: &Runtime,
    gw: &Gateway,
    target: &ApiTarget,
    root: &Path,
    n: usize,
) -> Result<Vec<PathBuf>> {
    // Registration: a few kept-alive API connections at once.
    let tokens = post_each(
        client,
        target,
        n,
        |i| {
            let body = json!({ "app": format!("app-{i}"), "customer": CUSTOMER });
            ("/v1/appliances", body)
        },
        |_, added| {
            added["token"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("no token in {added}"))
        },
    )?;

    let relay = gw.relay.to_string();
    let configs: Vec<PathBuf> = (0..n)
        .map(|i| root.join(format!("agent-{i}")).join("agent.toml"))
        .collect();
    for (i, path) in configs.iter().enumerate() {
        let dir = path.parent().ok_or_else(|| anyhow!("no parent"))?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            path,
            format!(
                "audit_path = \"{}\"\n\n[policy]\napproval = \"automatic\"\n\n[tools]\nkubectl = \"/bin/echo\"\n\n\
                 [[resource]]\nid = \"{RESOURCE}\"\nkind = \"kubernetes\"\nnamespaces = [\"default\"]\n",
                dir.join("audit.jsonl").display()
            ),
        )
        .with_context(|| format!("writing the config of agent {i}"))?;
    }
    rt.block_on(async {
        let sem = Arc::new(Semaphore::new(ENROLL_CONCURRENCY));
        let mut tasks = Vec::with_capacity(n);
        for (i, (token, path)) in tokens.into_iter().zip(configs.iter().cloned()).enumerate() {
            let (sem, relay) = (sem.clone(), relay.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire_owned().await?;
                tunnel_client::enroll::enroll(&relay, &token, &path)
                    .await
                    .map_err(|e| anyhow!("agent {i}: {e}"))?;
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    })?;
    Ok(configs)
}

/// Polls the appliance list until `n` are online; returns how long it took.
fn wait_all_online(
    client: &Runtime,
    target: &ApiTarget,
    n: usize,
    limit: Duration,
    fleet: &Fleet,
) -> Result<Duration> {
    let t0 = Instant::now();
    client.block_on(async {
        let mut api = Api::new(target);
        let mut last = 0;
        let mut last_report = Instant::now();
        loop {
            match api.online().await {
                Ok(k) if k >= n => return Ok(t0.elapsed()),
                Ok(k) => last = k,
                Err(_) => {} // the gateway may still be starting
            }
            if t0.elapsed() > limit {
                bail!(
                    "only {last} of {n} agents online after {limit:?} ({} agents exited)",
                    fleet.exited()
                );
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "scale_bench:   {last}/{n} online after {:.1} s",
                    t0.elapsed().as_secs_f64()
                );
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Sequential ops on one appliance; latencies in ms, sorted.
fn op_latencies(
    client: &Runtime,
    target: &ApiTarget,
    count: usize,
    poll: Duration,
) -> Result<Vec<f64>> {
    client.block_on(async {
        let mut api = Api::new(target);
        let mut samples = Vec::with_capacity(count);
        for i in 0..LATENCY_WARMUP + count {
            let dt = api
                .op("app-0", poll)
                .await
                .with_context(|| format!("op {i}"))?;
            if i >= LATENCY_WARMUP {
                samples.push(dt.as_secs_f64() * 1000.0);
            }
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        anyhow::Ok(samples)
    })
}

/// `count` ops through `clients` concurrent clients, client w on appliance `app-{w mod apps}`;
/// returns (ops/s, latencies in ms sorted).
fn op_throughput(
    client: &Runtime,
    target: &ApiTarget,
    count: usize,
    clients: usize,
    apps: usize,
    poll: Duration,
) -> Result<(f64, Vec<f64>)> {
    client.block_on(async {
        let next = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..clients {
            let (next, target) = (next.clone(), target.clone());
            let app = format!("app-{}", w % apps);
            tasks.push(tokio::spawn(async move {
                let mut api = Api::new(&target);
                let mut samples = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    samples.push(api.op(&app, poll).await?.as_secs_f64() * 1000.0);
                }
                anyhow::Ok(samples)
            }));
        }
        let mut all = Vec::with_capacity(count);
        for t in tasks {
            all.extend(t.await??);
        }
        let secs = t0.elapsed().as_secs_f64();
        all.sort_by(|a, b| a.total_cmp(b));
        anyhow::Ok((all.len() as f64 / secs, all))
    })
}

/// The fleet's agents all dial from 127.0.0.1, where a real fleet comes from a thousand
/// addresses: the per-source cap on handshakes in flight (64 by default) would make them take
/// turns, so the bench lifts it to the global cap.
const FLEET_LIMITS: &str = "unauthenticated_max_per_source = 1024";

/// Sequential `postern ops kubectl --wait` calls; latencies in ms, sorted.
fn cli_latencies(gw: &Gateway, count: usize) -> Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let t0 = Instant::now();
        let out = gw.cli(&[
            "ops",
            "kubectl",
            "--app",
            "app-0",
            "--customer",
            CUSTOMER,
            "--origin-resource-id",
            RESOURCE,
            "--command",
            OP_COMMAND,
            "--timeout",
            "30s",
            "--wait",
        ])?;
        let dt = t0.elapsed();
        let v = out.ok().with_context(|| format!("CLI op {i}"))?;
        if v["state"] != "completed" {
            bail!("CLI op {i} ended {}", v);
        }
        samples.push(dt.as_secs_f64() * 1000.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples)
}

fn bench_store(
    rt: &Runtime,
    client: &Runtime,
    label: &str,
    store: Option<&str>,
    audit_store: Option<&str>,
    cfg: &Cfg,
    first: bool,
) -> Result<Map<String, Value>> {
    let n = cfg.agents;
    let mut out = Map::new();
    let mut put = |k: &str, v: Value| {
        out.insert(format!("{k}_{label}"), v);
    };
    let dir = tempfile::tempdir()?;
    let gw_dir = dir.path().join("gw");
    eprintln!("scale_bench: [{label}] starting the gateway");
    let store_args: Vec<&str> = store.map(|url| vec!["--store", url]).unwrap_or_default();
    let mut gw = Gateway::start_with_limits(&gw_dir, FLEET_LIMITS, &store_args)?;
    let target = ApiTarget::of(&gw)?;
    thread::sleep(Duration::from_secs(1));
    let rss_idle = rss_settled(gw.pid())?;
    eprintln!(
        "scale_bench: [{label}] gateway pid {}, idle RSS {rss_idle} KiB",
        gw.pid()
    );

    eprintln!("scale_bench: [{label}] registering and enrolling {n} agents");
    let t0 = Instant::now();
    // The 1000 simulated appliances would each sync its trail to a disk of its own; sharing
    // one disk's fsync among them measures that disk, not Postern. So their directories go to
    // a tmpfs when there is one (`SCALE_BENCH_AGENT_DIRS=disk` keeps them on disk).
    let on_disk = std::env::var("SCALE_BENCH_AGENT_DIRS").is_ok_and(|v| v == "disk");
    let shm = Path::new("/dev/shm");
    let agents_tmp = if !on_disk && shm.is_dir() {
        tempfile::tempdir_in(shm).ok()
    } else {
        None
    };
    put(
        "agent_dirs",
        json!(if agents_tmp.is_some() {
            "tmpfs"
        } else {
            "disk"
        }),
    );
    let agents_root = match &agents_tmp {
        Some(t) => t.path().to_path_buf(),
        None => dir.path().join("agents"),
    };
    let configs = enroll_fleet(rt, client, &gw, &target, &agents_root, n)
        .with_context(|| format!("enrolling; gateway log (tail):\n{}", tail(&gw.log)))?;
    let enroll_s = t0.elapsed().as_secs_f64();
    let rss_enrolled = rss_kib(gw.pid())?;
    eprintln!("scale_bench: [{label}]   {enroll_s:.1} s; gateway RSS {rss_enrolled} KiB");

    eprintln!("scale_bench: [{label}] starting {n} agents");
    let self_before = rss_kib(std::process::id())?;
    let fleet = Fleet::start(rt, &configs, cfg.op_launcher.as_deref())?;
    let limit = Duration::from_secs(60) + Duration::from_millis(60 * n as u64);
    let connect_all = wait_all_online(client, &target, n, limit, &fleet)
        .with_context(|| format!("first connection; gateway log (tail):\n{}", tail(&gw.log)))?;
    eprintln!(
        "scale_bench: [{label}]   all online in {:.2} s ({} first hellos seen by the agents)",
        connect_all.as_secs_f64(),
        fleet.ready.load(Ordering::Relaxed)
    );
    thread::sleep(SETTLE);
    let rss_n = rss_settled(gw.pid())?;
    let self_after = rss_kib(std::process::id())?;
    let per_agent = (rss_n as f64 - rss_idle as f64) / n as f64;
    eprintln!("scale_bench: [{label}]   gateway RSS {rss_n} KiB: {per_agent:.1} KiB per agent");

    // Kill and restart on the same data dir and addresses.
    eprintln!("scale_bench: [{label}] SIGKILL and restart");
    let (api_addr, relay) = (gw.api, gw.relay);
    gw.kill();
    let t0 = Instant::now();
    // The API address, CA and admin token stay those of the first start, so `gw` keeps
    // serving the CLI calls.
    let (api_arg, relay_arg) = (api_addr.to_string(), relay.to_string());
    let mut restart_args = vec!["--api", api_arg.as_str(), "--relay", relay_arg.as_str()];
    restart_args.extend(&store_args);
    let restarted = Gateway::start_with_limits(&gw_dir, FLEET_LIMITS, &restart_args)?;
    let ready_s = t0.elapsed().as_secs_f64();
    let back = wait_all_online(client, &target, n, Duration::from_secs(120), &fleet)
        .with_context(|| format!("after the restart; gateway log (tail):\n{}", tail(&gw.log)))?;
    let reconnect_s = ready_s + back.as_secs_f64();
    let reconnect_cpu = cpu_s(restarted.pid());
    let exited = fleet.exited();
    eprintln!("scale_bench: [{label}]   ready in {ready_s:.2} s, all {n} online {reconnect_s:.2} s after the kill; {exited} agents gave up");
    thread::sleep(SETTLE);
    let rss_restart = rss_settled(restarted.pid())?;
    let per_agent_restart = (rss_restart as f64 - rss_idle as f64) / n as f64;
    eprintln!("scale_bench: [{label}]   restarted gateway RSS {rss_restart} KiB: {per_agent_restart:.1} KiB per agent");

    // Ops, on the restarted gateway.
    let apps = cfg.concurrency.min(n).max(1);
    for i in 0..apps {
        let g = gw.request_operate(&format!("app-{i}"), CUSTOMER, "2h")?;
        if g["state"] != "active" {
            bail!("the operate grant for app-{i} is not active under the automatic policy: {g}");
        }
    }
    eprintln!(
        "scale_bench: [{label}] {} sequential ops (poll {:?})",
        cfg.ops, cfg.poll
    );
    let lat = op_latencies(client, &target, cfg.ops, cfg.poll)
        .with_context(|| format!("gateway log (tail):\n{}", tail(&gw.log)))?;
    let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
    eprintln!("scale_bench: [{label}]   p50 {p50:.1} ms, p99 {p99:.1} ms");
    eprintln!(
        "scale_bench: [{label}] {} ops by {} clients on {apps} appliances (poll {:?})",
        cfg.ops, cfg.concurrency, cfg.tput_poll
    );
    let (gw_cpu0, own_cpu0) = (cpu_s(restarted.pid()), cpu_s(std::process::id()));
    let (ops_s, tlat) = op_throughput(
        client,
        &target,
        cfg.ops,
        cfg.concurrency,
        apps,
        cfg.tput_poll,
    )
    .with_context(|| format!("gateway log (tail):\n{}", tail(&gw.log)))?;
    let ops_gw_cpu = gw_cpu0
        .zip(cpu_s(restarted.pid()))
        .map(|(a, b)| round(b - a, 2));
    let ops_own_cpu = own_cpu0
        .zip(cpu_s(std::process::id()))
        .map(|(a, b)| round(b - a, 2));
    eprintln!(
        "scale_bench: [{label}]   {ops_s:.1} ops/s, p50 {:.1} ms; CPU s: gateway {ops_gw_cpu:?}, agents + client {ops_own_cpu:?}",
        percentile(&tlat, 50.0)
    );
    let cli = if cfg.cli_ops > 0 {
        eprintln!("scale_bench: [{label}] {} CLI ops (--wait)", cfg.cli_ops);
        let c = cli_latencies(&gw, cfg.cli_ops)?;
        eprintln!(
            "scale_bench: [{label}]   p50 {:.1} ms",
            percentile(&c, 50.0)
        );
        Some(c)
    } else {
        None
    };
    eprintln!(
        "scale_bench: [{label}] revocation fan-out: {n} grants revoked by {} clients",
        cfg.revoke_clients
    );
    let trails: Vec<PathBuf> = configs
        .iter()
        .map(|c| c.with_file_name("audit.jsonl"))
        .collect();
    let fanout = revocation::measure(client, &target, &trails, cfg.revoke_clients)
        .with_context(|| format!("gateway log (tail):\n{}", tail(&gw.log)))?;
    eprintln!(
        "scale_bench: [{label}]   all {n} applied {:.1} ms after the first call (calls answered in {:.1} ms; per grant p50 {:.1} ms, p99 {:.1} ms)",
        fanout.total_ms,
        fanout.api_ms,
        percentile(&fanout.per_grant_ms, 50.0),
        percentile(&fanout.per_grant_ms, 99.0)
    );
    eprintln!("scale_bench: [{label}] kill switch: {n} grants revoked by one call");
    let bulk = revocation::measure_bulk(client, &target, &trails)
        .with_context(|| format!("gateway log (tail):\n{}", tail(&gw.log)))?;
    eprintln!(
        "scale_bench: [{label}]   all {n} applied {:.1} ms after the call (answered in {:.1} ms)",
        bulk.total_ms, bulk.api_ms
    );
    let exited_end = fleet.exited();

    eprintln!("scale_bench: [{label}] stopping");
    fleet.stop(rt);
    drop(restarted);
    drop(gw);

    let audit = if cfg.audit_records > 0 {
        eprintln!(
            "scale_bench: [{label}] first audit page over {} records",
            cfg.audit_records
        );
        let a = audit_page::measure(client, dir.path(), audit_store, cfg.audit_records)?;
        eprintln!("scale_bench: [{label}]   {}", a.summary());
        Some(a)
    } else {
        None
    };

    put("rss_idle_kib", json!(rss_idle));
    put("rss_enrolled_kib", json!(rss_enrolled));
    put(&format!("rss_{n}_kib"), json!(rss_n));
    put("rss_per_agent_kib", json!(round(per_agent, 1)));
    put(&format!("rss_restart_{n}_kib"), json!(rss_restart));
    put(
        "rss_per_agent_restart_kib",
        json!(round(per_agent_restart, 1)),
    );
    if first {
        // This process's growth is only clean for the first fleet: later ones reuse what the
        // allocator kept from the one before.
        put(
            "agent_side_rss_per_agent_kib",
            json!(round(
                (self_after as f64 - self_before as f64) / n as f64,
                1
            )),
        );
    }
    put("enroll_s", json!(round(enroll_s, 2)));
    put("connect_all_s", json!(round(connect_all.as_secs_f64(), 2)));
    put("gateway_ready_s", json!(round(ready_s, 2)));
    put("reconnect_all_s", json!(round(reconnect_s, 2)));
    put(
        "reconnect_gateway_cpu_s",
        json!(reconnect_cpu.map(|c| round(c, 2))),
    );
    put("agents_exited", json!(exited.max(exited_end)));
    put("op_p50_ms", json!(round(p50, 1)));
    put("op_p99_ms", json!(round(p99, 1)));
    put("op_max_ms", json!(round(*lat.last().unwrap_or(&0.0), 1)));
    put("ops_per_s", json!(round(ops_s, 1)));
    put(
        "ops_concurrent_p50_ms",
        json!(round(percentile(&tlat, 50.0), 1)),
    );
    put(
        "ops_concurrent_p99_ms",
        json!(round(percentile(&tlat, 99.0), 1)),
    );
    // CPU seconds over the throughput run: the gateway's, and this process's (agents + client).
    put("ops_gateway_cpu_s", json!(ops_gw_cpu));
    put("ops_bench_cpu_s", json!(ops_own_cpu));
    if let Some(c) = cli {
        put("op_cli_p50_ms", json!(round(percentile(&c, 50.0), 1)));
        put("op_cli_p99_ms", json!(round(percentile(&c, 99.0), 1)));
    }
    fanout.put(&mut put);
    bulk.put(&mut put);
    if let Some(a) = audit {
        a.put(&mut put);
    }
    Ok(out)
}

fn main() -> Result<()> {
    // What `postern-agent` does first: the agents' QUIC receive buffers stay lazily mapped.
    tunnel_client::malloc_policy::fix_mmap_threshold();
    let cfg = Cfg {
        agents: env_u64("SCALE_BENCH_AGENTS", 1000)? as usize,
        ops: env_u64("SCALE_BENCH_OPS", 200)? as usize,
        cli_ops: env_u64("SCALE_BENCH_CLI_OPS", 20)? as usize,
        concurrency: env_u64("SCALE_BENCH_CONCURRENCY", 8)? as usize,
        poll: Duration::from_millis(env_u64("SCALE_BENCH_POLL_MS", 2)?),
        tput_poll: Duration::from_millis(env_u64("SCALE_BENCH_TPUT_POLL_MS", 10)?),
        revoke_clients: env_u64("SCALE_BENCH_REVOKE_CLIENTS", 8)? as usize,
        audit_records: env_u64("SCALE_BENCH_AUDIT_RECORDS", 1_000_000)?,
        op_launcher: match std::env::var("SCALE_BENCH_OP_SPAWN").as_deref() {
            Ok("fork") => None,
            Ok("launcher") | Err(_) => Some(postern::testbed::bin("postern-agent")?),
            Ok(other) => bail!("SCALE_BENCH_OP_SPAWN={other:?}: launcher (default) or fork"),
        },
    };
    if cfg.agents == 0 || cfg.ops == 0 || cfg.concurrency == 0 {
        bail!("SCALE_BENCH_AGENTS, SCALE_BENCH_OPS and SCALE_BENCH_CONCURRENCY must be at least 1");
    }
    let stores = std::env::var("SCALE_BENCH_STORES").unwrap_or_else(|_| "sqlite,postgres".into());
    let stores: Vec<&str> = stores
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(bad) = stores
        .iter()
        .find(|s| !matches!(**s, "sqlite" | "postgres"))
    {
        bail!("SCALE_BENCH_STORES: unknown store {bad:?} (sqlite, postgres)");
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let cores = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    eprintln!(
        "scale_bench: {} agents, {} ops, {} clients, stores {stores:?}, {cores} cores, {profile} build",
        cfg.agents, cfg.ops, cfg.concurrency
    );
    if cfg!(debug_assertions) {
        eprintln!("scale_bench: warning: debug build; use --release for meaningful numbers");
    }
    raise_nofile();
    if let Ok(filter) = std::env::var("SCALE_BENCH_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init();
    }

    // The agents' runtime (what `postern-agent` runs, shared by the whole fleet) and the
    // measuring client's, apart so the client never waits behind a thousand agents' tasks.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let mut out = Map::new();
    out.insert("agents".into(), json!(cfg.agents));
    out.insert("ops".into(), json!(cfg.ops));
    out.insert("op_client".into(), json!("https"));
    out.insert(
        "op_spawn".into(),
        json!(if cfg.op_launcher.is_some() {
            "launcher"
        } else {
            "fork"
        }),
    );
    out.insert("op_poll_ms".into(), json!(cfg.poll.as_millis() as u64));
    out.insert("ops_clients".into(), json!(cfg.concurrency));
    out.insert("revoke_clients".into(), json!(cfg.revoke_clients));
    out.insert(
        "ops_poll_ms".into(),
        json!(cfg.tput_poll.as_millis() as u64),
    );
    let mut pg = None;
    for (i, store) in stores.iter().enumerate() {
        let (url, audit_url) = match *store {
            "postgres" => {
                eprintln!("scale_bench: starting a throwaway PostgreSQL cluster");
                let cluster = postern::pg_cluster::shared();
                let url = cluster.create_database("scale_bench");
                let audit_url = cluster.create_database("scale_bench_audit");
                pg = Some(cluster);
                (Some(url), Some(audit_url))
            }
            _ => (None, None),
        };
        out.extend(bench_store(
            &rt,
            &client,
            store,
            url.as_deref(),
            audit_url.as_deref(),
            &cfg,
            i == 0,
        )?);
    }
    drop(pg);
    rt.shutdown_timeout(Duration::from_secs(5));

    // Goals (issue 4): ≤ 128 KiB per idle agent, all back within 15 s, op p50 ≤ 50 ms.
    let mut goals = Map::new();
    for store in &stores {
        let f = |k: &str| out.get(&format!("{k}_{store}")).and_then(Value::as_f64);
        goals.insert(
            format!("rss_per_agent_{store}"),
            json!(f("rss_per_agent_kib").is_some_and(|v| v <= 128.0)),
        );
        goals.insert(
            format!("reconnect_{store}"),
            json!(
                f("reconnect_all_s").is_some_and(|v| v <= 15.0) && f("agents_exited") == Some(0.0)
            ),
        );
        goals.insert(
            format!("op_p50_{store}"),
            json!(f("op_p50_ms").is_some_and(|v| v <= 50.0)),
        );
        // Issue 15: every agent has applied a revocation within 1 s; the first page of a
        // 1,000,000-record trail within 50 ms, memory flat.
        goals.insert(
            format!("revocation_fanout_{store}"),
            json!(f("revocation_fanout_ms").is_some_and(|v| v <= 1000.0)),
        );
        goals.insert(
            format!("revocation_bulk_{store}"),
            json!(f("revocation_bulk_ms").is_some_and(|v| v <= 1000.0)),
        );
        if cfg.audit_records > 0 {
            goals.insert(
                format!("audit_first_page_{store}"),
                json!(f("audit_first_page_ms").is_some_and(|v| v <= 50.0)),
            );
            // Flat: serving pages grew the gateway by less than 8 MiB.
            goals.insert(
                format!("audit_memory_flat_{store}"),
                json!(f("audit_rss_after_kib")
                    .zip(f("audit_rss_before_kib"))
                    .is_some_and(|(after, before)| after - before <= 8192.0)),
            );
        }
    }
    out.insert("goals_met".into(), Value::Object(goals));
    out.insert("cores".into(), json!(cores));
    out.insert("profile".into(), json!(profile));
    println!("{}", Value::Object(out));
    Ok(())
}
