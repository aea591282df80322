//! Tunnel benchmark on loopback: bulk throughput and small-message round trips, straight to a
//! local server, through a Postern tcp endpoint (real `postern server` + `postern-agent`
//! processes, reached the way an operator reaches it: plain TCP to the real `postern ops
//! endpoint connect` forwarder, which speaks TLS with the endpoint's client certificate to the
//! gateway, so the figures include that hop), and, as a ceiling, quinn alone in this process with the same TLS suite and
//! windows as the gateway's relay.
//!
//! ```sh
//! cargo build --release --workspace --bins && cargo run --release --example tunnel_bench
//! ```
//!
//! Prints exactly one JSON line on stdout; progress goes to stderr.
//!
//! Environment:
//! - `TUNNEL_BENCH_MIB`: bulk size in MiB (default 1024).
//! - `TUNNEL_BENCH_RTTS`: measured round trips per path (default 10000, after 1000 warm-up).
//! - `TUNNEL_BENCH_PERF=<dir>`: run `perf record -g` on the gateway and the agent during the
//!   tunnel bulk transfer, writing `<dir>/gateway.perf.data` and `<dir>/agent.perf.data`.
//!   The tunnel figures of such a run include the profiler's overhead.
//!   `TUNNEL_BENCH_PERF_CALLGRAPH` picks perf's `--call-graph` mode (default `fp`; `dwarf`
//!   gives usable stacks for binaries built without frame pointers).

use anyhow::{anyhow, bail, Context, Result};
use postern::tcp_endpoint::Forwarder;
use postern::testbed::{echo_server, pattern, Agent, Gateway};
use serde_json::json;
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

const MIB: u64 = 1024 * 1024;
const SEND_CHUNK: usize = 1024 * 1024;
const SINK_BUF: usize = 256 * 1024;
const RTT_MSG: usize = 64;
const RTT_WARMUP: usize = 1_000;
/// Generous bound on a whole bulk transfer, so a stuck path fails instead of hanging.
const BULK_TIMEOUT: Duration = Duration::from_secs(600);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

// ---------------------------------------------------------------------------------------------
// Sink server: a thread per connection. The stream starts with the u64 LE payload size; the
// sink reads exactly that many bytes more and answers with one ack byte.

fn sink_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(s) = conn else { break };
            thread::spawn(move || {
                if let Err(e) = sink_one(s) {
                    eprintln!("sink: {e:#}");
                }
            });
        }
    });
    Ok(addr)
}

fn sink_one(mut s: TcpStream) -> Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut header = [0u8; 8];
    s.read_exact(&mut header)
        .context("reading the size header")?;
    let expected = u64::from_le_bytes(header);
    let mut buf = vec![0u8; SINK_BUF];
    let mut got = 0u64;
    while got < expected {
        let want = (expected - got).min(SINK_BUF as u64) as usize;
        match s.read(&mut buf[..want]) {
            Ok(0) => bail!("sender closed after {got} of {expected} bytes"),
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("after {got} of {expected} bytes")),
        }
    }
    s.write_all(&[0xAC])?;
    s.flush()?;
    Ok(())
}

/// Sends `bytes` (after the size header) from a writer thread and stops the clock when the ack
/// arrives. The clock starts once the TCP connection is up. Returns seconds.
fn bulk_tcp(addr: SocketAddr, bytes: u64, payload: &Arc<Vec<u8>>) -> Result<f64> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(BULK_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut w = s.try_clone()?;
    let payload = payload.clone();
    let t0 = Instant::now();
    let writer = thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&bytes.to_le_bytes())?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(payload.len() as u64) as usize;
            w.write_all(&payload[..n])?;
            left -= n as u64;
        }
        w.flush()
    });
    let mut r = s;
    let mut ack = [0u8; 1];
    let read = r.read_exact(&mut ack);
    let elapsed = t0.elapsed().as_secs_f64();
    writer
        .join()
        .map_err(|_| anyhow!("bulk writer panicked"))?
        .context("bulk writer")?;
    read.context("waiting for the sink's ack")?;
    if ack[0] != 0xAC {
        bail!("unexpected ack byte {:#x}", ack[0]);
    }
    Ok(elapsed)
}

// ---------------------------------------------------------------------------------------------
// Round trips: 64-byte request, 64-byte echo, TCP_NODELAY, one at a time.

struct Rtt {
    p50: f64,
    p99: f64,
    mean: f64,
    max: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn rtts(addr: SocketAddr, measured: usize) -> Result<Rtt> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let msg = pattern(RTT_MSG, 0xB0B);
    let mut back = [0u8; RTT_MSG];
    let mut samples = Vec::with_capacity(measured);
    for i in 0..RTT_WARMUP + measured {
        let t0 = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)
            .with_context(|| format!("round trip {i}"))?;
        let dt = t0.elapsed();
        if back[..] != msg[..] {
            bail!("round trip {i}: echo came back altered");
        }
        if i >= RTT_WARMUP {
            samples.push(dt.as_nanos() as f64 / 1000.0);
        }
    }
    if samples.is_empty() {
        bail!("no round trips measured");
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(Rtt {
        p50: percentile(&samples, 50.0),
        p99: percentile(&samples, 99.0),
        mean: samples.iter().sum::<f64>() / samples.len() as f64,
        max: *samples.last().unwrap_or(&0.0),
    })
}

// ---------------------------------------------------------------------------------------------
// QUIC ceiling: quinn server and client in this process, one bidi stream, same windows as the
// gateway's relay (gateway/src/relay.rs `transport_config`).

fn quic_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    t.send_window(64 * 1024 * 1024);
    t.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(30)).ok());
    t
}

fn quic_ceiling(bytes: u64, payload: &Arc<Vec<u8>>) -> Result<f64> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let payload = bytes::Bytes::from(payload.as_ref().clone());
    rt.block_on(async move {
        tokio::time::timeout(BULK_TIMEOUT, quic_ceiling_async(bytes, payload))
            .await
            .map_err(|_| anyhow!("quic ceiling timed out after {BULK_TIMEOUT:?}"))?
    })
}

async fn quic_ceiling_async(bytes: u64, payload: bytes::Bytes) -> Result<f64> {
    let alpn = vec![b"bench".to_vec()];
    let now = jiff::Timestamp::now();
    let ca = certs::Ca::generate("bench", now)?;
    let issued = ca.issue_server(&["127.0.0.1".into()], now, Duration::from_secs(86_400))?;
    let server_tls = certs::server_config(
        &issued.cert_pem,
        &issued.key_pem,
        None,
        certs::ClientAuth::None,
        alpn.clone(),
    )?;
    let client_tls = certs::client_config(ca.cert_pem(), None, alpn)?;

    let transport = Arc::new(quic_transport());
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(server_tls))?,
    ));
    server_cfg.transport_config(transport.clone());
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(client_tls))?,
    ));
    client_cfg.transport_config(transport);

    let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse()?)?;
    let server_addr = server.local_addr()?;
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    client.set_default_client_config(client_cfg);

    // Server: accept one connection and one stream; read the header and that many bytes; ack.
    let srv = server.clone();
    let server_task = tokio::spawn(async move {
        let incoming = srv
            .accept()
            .await
            .ok_or_else(|| anyhow!("server endpoint closed"))?;
        let conn = incoming.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut header = [0u8; 8];
        recv.read_exact(&mut header).await?;
        let expected = u64::from_le_bytes(header);
        let mut got = 0u64;
        while got < expected {
            match recv.read_chunk(SINK_BUF, true).await? {
                Some(c) => got += c.bytes.len() as u64,
                None => bail!("stream finished after {got} of {expected} bytes"),
            }
        }
        send.write_all(&[0xAC]).await?;
        send.finish()?;
        // Keep the connection until the client has read the ack and closes.
        let _ = conn.closed().await;
        anyhow::Ok(())
    });

    let conn = client.connect(server_addr, "127.0.0.1")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let t0 = Instant::now();
    send.write_all(&bytes.to_le_bytes()).await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(payload.len() as u64) as usize;
        send.write_chunk(payload.slice(..n)).await?;
        left -= n as u64;
    }
    let mut ack = [0u8; 1];
    recv.read_exact(&mut ack).await?;
    let elapsed = t0.elapsed().as_secs_f64();
    if ack[0] != 0xAC {
        bail!("unexpected ack byte {:#x}", ack[0]);
    }
    let _ = send.finish();
    conn.close(0u32.into(), b"done");
    server_task
        .await
        .map_err(|e| anyhow!("quic server task: {e}"))??;
    client.wait_idle().await;
    server.close(0u32.into(), b"done");
    Ok(elapsed)
}

/// CPU seconds (user + system, all threads) this process has used so far.
fn own_cpu_seconds() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds (user + system, all threads) a process has used so far and its minor page
/// faults, from /proc.
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let minflt: u64 = f.get(7)?.parse().ok()?;
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| (ticks / hz as f64, minflt))
}

// ---------------------------------------------------------------------------------------------
// Optional profiling of the gateway and agent during the tunnel bulk transfer.

struct Perf(Vec<Child>);

impl Perf {
    fn start(dir: &Path, targets: &[(&str, u32)]) -> Result<Perf> {
        std::fs::create_dir_all(dir)?;
        let call_graph =
            std::env::var("TUNNEL_BENCH_PERF_CALLGRAPH").unwrap_or_else(|_| "fp".into());
        let mut children = Vec::new();
        for (name, pid) in targets {
            let out = dir.join(format!("{name}.perf.data"));
            let child = Command::new("perf")
                .args(["record", "--call-graph", &call_graph, "-F", "999", "-o"])
                .arg(&out)
                .args(["-p", &pid.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("{name}.perf.log")))?)
                .spawn()
                .context("starting perf record")?;
            children.push(child);
        }
        // perf needs a moment to attach before the transfer starts.
        thread::sleep(Duration::from_millis(500));
        Ok(Perf(children))
    }

    fn stop(mut self) {
        for c in &mut self.0 {
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
        }
        for c in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        self.0.clear();
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------

fn resource_body(sink: SocketAddr, echo: SocketAddr) -> String {
    format!(
        "[policy]\napproval = \"automatic\"\n\n\
         [[resource]]\nid = \"null_resource.sink\"\nkind = \"tcp\"\ntarget = \"{sink}\"\n\n\
         [[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"{echo}\"\n"
    )
}

/// Creates a tcp endpoint on the operator's machine whose home is `home` and starts its
/// forwarder; clients connect to the forwarder's `listen` address.
fn create_endpoint(gw: &Gateway, home: &Path, resource: &str) -> Result<Forwarder> {
    let ep = gw
        .cli_home(
            home,
            &[
                "ops",
                "endpoint",
                "create",
                "--type",
                "tcp",
                "--app",
                "bench-app",
                "--customer",
                "bench-customer",
                "--origin-resource-id",
                resource,
                "--ttl",
                "1h",
            ],
        )?
        .ok()?;
    let id = ep["id"].as_str().ok_or_else(|| anyhow!("no id in {ep}"))?;
    Forwarder::start(gw, &gw.admin_token, home, id)
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

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn main() -> Result<()> {
    let mib = env_u64("TUNNEL_BENCH_MIB", 1024)?;
    if mib == 0 {
        bail!("TUNNEL_BENCH_MIB must be at least 1");
    }
    let measured = env_u64("TUNNEL_BENCH_RTTS", 10_000)? as usize;
    if measured == 0 {
        bail!("TUNNEL_BENCH_RTTS must be at least 1");
    }
    let perf_dir = std::env::var_os("TUNNEL_BENCH_PERF").map(PathBuf::from);
    let bytes = mib * MIB;
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let cores = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    eprintln!(
        "tunnel_bench: {mib} MiB bulk, {measured} round trips, {cores} cores, {profile} build"
    );
    if cfg!(debug_assertions) {
        eprintln!("tunnel_bench: warning: debug build; use --release for meaningful numbers");
    }

    let payload = Arc::new(pattern(SEND_CHUNK, 0x7e57));
    let sink = sink_server()?;
    let echo = echo_server()?;

    // Gateway + agent first, so their start-up is not interleaved with any measurement.
    let dir = tempfile::tempdir()?;
    eprintln!("tunnel_bench: starting gateway and agent");
    let mut gw = Gateway::start(&dir.path().join("gw"))?;
    let mut agent = Agent::enroll(
        &gw,
        &dir.path().join("agent"),
        "bench-app",
        "bench-customer",
        &resource_body(sink, echo),
    )?;
    agent.run()?;
    if !gw.wait_online(&agent.appliance_id, Duration::from_secs(30)) {
        bail!(
            "agent never came online; agent log (tail):\n{}",
            tail(&agent.log)
        );
    }
    gw.request_operate("bench-app", "bench-customer", "2h")?;
    let home = dir.path().join("operator-home");
    let sink_fwd = create_endpoint(&gw, &home, "null_resource.sink")?;
    let echo_fwd = create_endpoint(&gw, &home, "null_resource.echo")?;
    let (sink_ep, echo_ep) = (sink_fwd.listen, echo_fwd.listen);
    let agent_pid = agent.pid().ok_or_else(|| anyhow!("agent not running"))?;
    eprintln!("tunnel_bench: gateway pid {}, agent pid {agent_pid}; endpoints sink {sink_ep}, echo {echo_ep}", gw.pid());

    // Bulk.
    eprintln!("tunnel_bench: direct bulk to {sink}");
    let direct_s = bulk_tcp(sink, bytes, &payload)?;
    let direct = mib_s(bytes, direct_s);
    eprintln!("tunnel_bench:   {direct:.1} MiB/s ({direct_s:.2} s)");

    eprintln!("tunnel_bench: quinn ceiling (in process)");
    let cpu0 = own_cpu_seconds();
    let quic_s = quic_ceiling(bytes, &payload)?;
    let quic_cpu = round(own_cpu_seconds() - cpu0, 2);
    let quic = mib_s(bytes, quic_s);
    eprintln!(
        "tunnel_bench:   {quic:.1} MiB/s ({quic_s:.2} s); CPU s (client + server): {quic_cpu}"
    );

    eprintln!("tunnel_bench: tunnel bulk via {sink_ep}");
    let perf = match &perf_dir {
        Some(d) => {
            eprintln!("tunnel_bench:   profiling into {}", d.display());
            Some(Perf::start(
                d,
                &[("gateway", gw.pid()), ("agent", agent_pid)],
            )?)
        }
        None => None,
    };
    let before = (proc_usage(gw.pid()), proc_usage(agent_pid));
    let tunnel_res = bulk_tcp(sink_ep, bytes, &payload);
    let after = (proc_usage(gw.pid()), proc_usage(agent_pid));
    if let Some(p) = perf {
        p.stop();
    }
    // The logs live in the temporary directory, which is gone once main returns.
    let tunnel_s = tunnel_res.with_context(|| {
        format!(
            "tunnel bulk\n--- gateway log (tail):\n{}\n--- agent log (tail):\n{}",
            tail(&gw.log),
            tail(&agent.log)
        )
    })?;
    let tunnel = mib_s(bytes, tunnel_s);
    // CPU seconds and minor page faults of each process during the transfer.
    let usage = |a: Option<(f64, u64)>, b: Option<(f64, u64)>| {
        a.zip(b)
            .map(|(a, b)| (round(b.0 - a.0, 2), b.1.saturating_sub(a.1)))
    };
    let (gw_use, agent_use) = (usage(before.0, after.0), usage(before.1, after.1));
    let show = |u: Option<(f64, u64)>| {
        u.map_or("n/a".to_string(), |(cpu, faults)| {
            format!("{cpu} CPU s, {faults} minor faults")
        })
    };
    eprintln!(
        "tunnel_bench:   {tunnel:.1} MiB/s ({tunnel_s:.2} s); gateway {}; agent {}",
        show(gw_use),
        show(agent_use)
    );

    // Round trips.
    eprintln!("tunnel_bench: direct round trips to {echo}");
    let d_rtt = rtts(echo, measured)?;
    eprintln!(
        "tunnel_bench:   p50 {:.1} us, p99 {:.1} us",
        d_rtt.p50, d_rtt.p99
    );
    eprintln!("tunnel_bench: tunnel round trips via {echo_ep}");
    let t_rtt = rtts(echo_ep, measured)?;
    eprintln!(
        "tunnel_bench:   p50 {:.1} us, p99 {:.1} us",
        t_rtt.p50, t_rtt.p99
    );

    agent.stop();
    gw.stop();

    let out = json!({
        "tunnel_path": "client -> postern ops endpoint connect (TLS, client certificate) -> gateway -> QUIC -> agent -> server",
        "direct_mib_s": round(direct, 1),
        "tunnel_mib_s": round(tunnel, 1),
        "quic_ceiling_mib_s": round(quic, 1),
        "throughput_ratio": round(tunnel / direct, 4),
        "ceiling_ratio": round(tunnel / quic, 4),
        "direct_rtt_p50_us": round(d_rtt.p50, 1),
        "direct_rtt_p99_us": round(d_rtt.p99, 1),
        "tunnel_rtt_p50_us": round(t_rtt.p50, 1),
        "tunnel_rtt_p99_us": round(t_rtt.p99, 1),
        "added_rtt_p50_us": round(t_rtt.p50 - d_rtt.p50, 1),
        "direct_rtt_mean_us": round(d_rtt.mean, 1),
        "tunnel_rtt_mean_us": round(t_rtt.mean, 1),
        "direct_rtt_max_us": round(d_rtt.max, 1),
        "tunnel_rtt_max_us": round(t_rtt.max, 1),
        "quic_ceiling_cpu_s": quic_cpu,
        "tunnel_gateway_cpu_s": gw_use.map(|u| u.0),
        "tunnel_agent_cpu_s": agent_use.map(|u| u.0),
        "rtt_samples": measured,
        "bytes": bytes,
        "cores": cores,
        "profile": profile,
        "profiled": perf_dir.is_some(),
    });
    println!("{out}");
    Ok(())
}
