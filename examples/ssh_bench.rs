//! SSH endpoint benchmark: connection setup (median of 20 `ssh … true`) and bulk throughput
//! (`head -c 512M /dev/zero` through exec), direct to a private sshd and through a Postern
//! endpoint, in the same run with the same cipher (chacha20-poly1305@openssh.com). Prints one
//! JSON line.
//!
//! `cargo build --release --workspace --bins && cargo run --release --example ssh_bench`

use anyhow::{anyhow, bail, Context, Result};
use postern::{
    sshd::Sshd,
    testbed::{bin, Agent, Gateway},
};
use std::{
    io::Read,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const CIPHER: &str = "chacha20-poly1305@openssh.com";
/// Both paths negotiate the same key exchange too (OpenSSH alone would pick sntrup761x25519,
/// which the gateway does not offer); the direct figure with OpenSSH's default is reported
/// beside it.
const KEX: &str = "curve25519-sha256";
const SETUPS: usize = 20;
const BULK_MIB: u64 = 512;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn setup_ms(mut make: impl FnMut() -> Result<Command>) -> Result<f64> {
    let mut times = Vec::with_capacity(SETUPS);
    for _ in 0..SETUPS {
        let mut c = make()?;
        c.arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let t = Instant::now();
        let out = c.output()?;
        if !out.status.success() {
            bail!("ssh failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(times))
}

fn throughput(mut c: Command) -> Result<f64> {
    c.arg(format!("head -c {BULK_MIB}M /dev/zero"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let t = Instant::now();
    let mut child = c.spawn()?;
    let mut out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = out.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    let status = child.wait()?;
    let secs = t.elapsed().as_secs_f64();
    if !status.success() || n != BULK_MIB << 20 {
        bail!("bulk transfer got {n} bytes, status {status}");
    }
    Ok(BULK_MIB as f64 / secs)
}

fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sshd = Sshd::start()?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    let body = format!(
        "[policy]\napproval = \"automatic\"\n\n[[resource]]\nid = \"aws_instance.worker\"\nkind = \"ssh\"\nhost = \"{}\"\nuser = \"{}\"\nkey = \"{}\"\nhost_key = \"{}\"\n",
        sshd.addr,
        sshd.user,
        sshd.client_key.display(),
        sshd.host_key
    );
    let mut agent = Agent::enroll(&gw, &dir.path().join("agent"), "bench", "acme-corp", &body)?;
    agent.run()?;
    if !gw.wait_online(&agent.appliance_id, Duration::from_secs(30)) {
        bail!("agent never came online");
    }
    gw.request_operate("bench", "acme-corp", "2h")?;
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
            "ssh",
            "--app",
            "bench",
            "--customer",
            "acme-corp",
        ])
        .args([
            "--origin-resource-id",
            "aws_instance.worker",
            "--ttl",
            "2h",
            "--wait",
        ])
        .env("POSTERN_ADDR", gw.api.to_string())
        .env("POSTERN_TOKEN", &gw.admin_token)
        .env("POSTERN_CA_FILE", &gw.ca_file)
        .env("HOME", &home)
        .output()?;
    let rec: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("endpoint create output")?;
    let config = PathBuf::from(
        rec["ssh_config"]
            .as_str()
            .ok_or_else(|| anyhow!("no ssh_config: {rec}"))?,
    );
    let alias = rec["ssh_command"]
        .as_str()
        .and_then(|c| c.rsplit(' ').next())
        .ok_or_else(|| anyhow!("no ssh_command"))?
        .to_string();

    let direct = || -> Result<Command> {
        let mut c = sshd.ssh_direct()?;
        c.args(["-c", CIPHER, "-o", &format!("KexAlgorithms={KEX}")]);
        Ok(c)
    };
    let direct_default_kex = || -> Result<Command> {
        let mut c = sshd.ssh_direct()?;
        c.args(["-c", CIPHER]);
        Ok(c)
    };
    let endpoint = || -> Result<Command> {
        let mut c = Command::new("ssh");
        c.arg("-F").arg(&config).args([
            "-o",
            "BatchMode=yes",
            "-c",
            CIPHER,
            "-o",
            &format!("KexAlgorithms={KEX}"),
            &alias,
        ]);
        Ok(c)
    };
    // Warm both paths once (first connection pays for caches and the agent's key load).
    setup_ms(direct)?;
    let direct_setup_ms = setup_ms(direct)?;
    let endpoint_setup_ms = setup_ms(endpoint)?;
    let direct_default_kex_setup_ms = setup_ms(direct_default_kex)?;
    let direct_mib_s = throughput(direct()?)?;
    let endpoint_mib_s = throughput(endpoint()?)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "{}",
        serde_json::json!({
            "bench": "ssh",
            "cipher": CIPHER,
            "kex": KEX,
            "direct_default_kex_setup_ms": (direct_default_kex_setup_ms * 10.0).round() / 10.0,
            "direct_setup_ms": (direct_setup_ms * 10.0).round() / 10.0,
            "endpoint_setup_ms": (endpoint_setup_ms * 10.0).round() / 10.0,
            "setup_ratio": ((endpoint_setup_ms / direct_setup_ms) * 100.0).round() / 100.0,
            "direct_mib_s": direct_mib_s.round(),
            "endpoint_mib_s": endpoint_mib_s.round(),
            "throughput_ratio": ((endpoint_mib_s / direct_mib_s) * 100.0).round() / 100.0,
            "cores": cores,
        })
    );
    Ok(())
}
