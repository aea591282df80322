//! Start real gateway and agent processes, drive the CLI, and clean up by PID.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

/// Where cargo put the binaries: `target/<profile>`, found from the running test or example
/// (`target/<profile>/deps/…` or `target/<profile>/examples/…`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("POSTERN_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!("{} not found; build the binaries first: cargo build --workspace --bins (for --release: cargo build --release --workspace --bins)", p.display());
    }
    Ok(p)
}

/// Polls `f` every 50 ms until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL. Only ever our own children.
/// The `id` of a record the CLI printed.
pub fn id_of(record: &Value) -> Result<String> {
    record["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no id in {record}"))
}

/// `path` opened for appending (created if missing): a started process's stderr, which keeps
/// what earlier runs of it wrote.
pub fn append_log(path: &Path) -> Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?)
}

/// The first line `child` prints on its piped stdout (its ready report), or "" when it prints
/// none within `limit`. The line is read on a thread, so a silent child cannot hang the test.
pub fn first_line(child: &mut Child, limit: Duration) -> Result<String> {
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    Ok(rx.recv_timeout(limit).unwrap_or_default())
}

pub fn terminate(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    if let Ok(Some(s)) = child.try_wait() {
        return Some(s);
    }
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok();
    None
}

/// Result of one CLI call with `--output json`.
#[derive(Debug)]
pub struct CliOutput {
    pub success: bool,
    pub json: Value,
    pub stderr: String,
}

impl CliOutput {
    pub fn ok(self) -> Result<Value> {
        if self.success {
            Ok(self.json)
        } else {
            Err(anyhow!("command failed: {} {}", self.json, self.stderr))
        }
    }

    pub fn error_code(&self) -> Option<&str> {
        self.json["error"]["code"].as_str()
    }
}

fn run_json(mut cmd: Command) -> Result<CliOutput> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("running the CLI")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "stdout is not one JSON document: {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok(CliOutput {
        success: out.status.success(),
        json,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A `postern server` process.
pub struct Gateway {
    child: Child,
    pub data_dir: PathBuf,
    pub api: SocketAddr,
    pub relay: SocketAddr,
    pub ca_file: PathBuf,
    pub ca_fingerprint: String,
    pub admin_token: String,
    pub log: PathBuf,
    /// The metrics listener, when started with `--metrics`.
    pub metrics: Option<SocketAddr>,
}

impl Gateway {
    pub fn start(data_dir: &Path) -> Result<Gateway> {
        Self::start_with(data_dir, &[])
    }

    /// Restarts on the same addresses (agents know the relay address from enrollment).
    pub fn start_on(data_dir: &Path, api: SocketAddr, relay: SocketAddr) -> Result<Gateway> {
        Self::start_with(
            data_dir,
            &["--api", &api.to_string(), "--relay", &relay.to_string()],
        )
    }

    /// Restarts on the same addresses with a store URL (`postgres://…`).
    pub fn start_on_with_store(
        data_dir: &Path,
        api: SocketAddr,
        relay: SocketAddr,
        store: &str,
    ) -> Result<Gateway> {
        Self::start_with(
            data_dir,
            &[
                "--api",
                &api.to_string(),
                "--relay",
                &relay.to_string(),
                "--store",
                store,
            ],
        )
    }

    /// With a store URL (`postgres://…`) instead of the embedded SQLite store.
    pub fn start_with_store(data_dir: &Path, store: &str) -> Result<Gateway> {
        Self::start_with(data_dir, &["--store", store])
    }

    /// From a config file (e.g. with `[limits]`) whose `data_dir` is `data_dir`.
    pub fn start_with_config(data_dir: &Path, config: &Path) -> Result<Gateway> {
        Self::launch(
            data_dir,
            &[std::ffi::OsStr::new("--config"), config.as_os_str()],
        )
    }

    /// With a `[limits]` table (TOML body) and further flags, which win over the file.
    pub fn start_with_limits(data_dir: &Path, limits: &str, extra: &[&str]) -> Result<Gateway> {
        std::fs::create_dir_all(data_dir)?;
        let config = data_dir.join("limits.toml");
        let dir = data_dir
            .to_str()
            .ok_or_else(|| anyhow!("data dir is not UTF-8"))?;
        std::fs::write(
            &config,
            // A JSON string is a valid TOML basic string.
            format!(
                "data_dir = {}\n[limits]\n{limits}\n",
                serde_json::to_string(dir)?
            ),
        )?;
        let mut args = vec![std::ffi::OsStr::new("--config"), config.as_os_str()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        Self::launch(data_dir, &args)
    }

    fn start_with(data_dir: &Path, extra: &[&str]) -> Result<Gateway> {
        let mut args = vec![std::ffi::OsStr::new("--data-dir"), data_dir.as_os_str()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        Self::launch(data_dir, &args)
    }

    fn launch(data_dir: &Path, args: &[&std::ffi::OsStr]) -> Result<Gateway> {
        std::fs::create_dir_all(data_dir)?;
        let log = data_dir.join(format!("gateway-{}.log", std::process::id()));
        let mut child = Command::new(bin("postern")?)
            .args(["--output", "json", "server"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(append_log(&log)?)
            .spawn()
            .context("starting postern server")?;
        let line = first_line(&mut child, Duration::from_secs(60))?;
        if line.trim().is_empty() {
            terminate(&mut child, Duration::from_secs(2));
            bail!(
                "postern server did not report ready; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let v: Value =
            serde_json::from_str(line.trim()).with_context(|| format!("ready line {line:?}"))?;
        let field = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("ready line lacks {k}: {v}"))
        };
        let admin_token_file = PathBuf::from(field("admin_token_file")?);
        Ok(Gateway {
            child,
            data_dir: data_dir.to_path_buf(),
            api: field("api")?.parse()?,
            relay: field("relay")?.parse()?,
            ca_file: PathBuf::from(field("ca_file")?),
            ca_fingerprint: field("ca_fingerprint")?,
            admin_token: std::fs::read_to_string(&admin_token_file)?
                .trim()
                .to_string(),
            log,
            metrics: v["metrics"].as_str().map(str::parse).transpose()?,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `postern --output json ARGS` as the admin.
    pub fn cli(&self, args: &[&str]) -> Result<CliOutput> {
        self.cli_as(&self.admin_token, args)
    }

    pub fn cli_as(&self, token: &str, args: &[&str]) -> Result<CliOutput> {
        run_json(self.cli_command(token, args)?)
    }

    /// `postern --output json ARGS` as the admin on an operator's machine whose home is
    /// `home`: where the CLI keeps an endpoint's secret half and writes the client's files.
    pub fn cli_home(&self, home: &Path, args: &[&str]) -> Result<CliOutput> {
        let mut cmd = self.cli_command(&self.admin_token, args)?;
        cmd.env("HOME", home);
        run_json(cmd)
    }

    /// `cli_home` with another principal's token.
    pub fn cli_home_as(&self, token: &str, home: &Path, args: &[&str]) -> Result<CliOutput> {
        let mut cmd = self.cli_command(token, args)?;
        cmd.env("HOME", home);
        run_json(cmd)
    }

    fn cli_command(&self, token: &str, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(bin("postern")?);
        cmd.args(["--output", "json"])
            .args(args)
            .env("POSTERN_ADDR", self.api.to_string())
            .env("POSTERN_TOKEN", token)
            .env("POSTERN_CA_FILE", &self.ca_file);
        Ok(cmd)
    }

    /// Stops with SIGTERM; returns whether it exited by itself within the grace time.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        terminate(&mut self.child, Duration::from_secs(10))
    }

    /// `postern token create --role ROLE --name NAME [--customer C]` as the admin; the secret.
    pub fn mint_token(&self, role: &str, name: &str, customer: Option<&str>) -> Result<String> {
        let mut args = vec!["token", "create", "--role", role, "--name", name];
        if let Some(c) = customer {
            args.extend(["--customer", c]);
        }
        let created = self.cli(&args)?.ok()?;
        created["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no token in {created}"))
    }

    /// Runs `sql` on the gateway's SQLite store file with the `sqlite3` shell (stopping at the
    /// first failing statement), as anyone with write access to the file could; its output.
    pub fn store_sql(&self, sql: &str) -> Result<String> {
        let db = self.data_dir.join("postern.db");
        let out = Command::new("sqlite3")
            .args(["-bail", "-cmd", ".timeout 10000"])
            .arg(&db)
            .arg(sql)
            .output()
            .context("running sqlite3 (Debian: apt-get install sqlite3)")?;
        if !out.status.success() {
            bail!(
                "sqlite3 {sql:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `postern ops endpoint create --type KIND` for `resource` of `app` at `customer`, lasting
    /// `ttl`, as the admin on the operator's machine whose home is `home` (the endpoint's key
    /// stays there).
    pub fn create_endpoint(
        &self,
        home: &Path,
        kind: &str,
        app: &str,
        customer: &str,
        resource: &str,
        ttl: &str,
    ) -> Result<CliOutput> {
        self.cli_home(
            home,
            &[
                "ops",
                "endpoint",
                "create",
                "--type",
                kind,
                "--app",
                app,
                "--customer",
                customer,
                "--origin-resource-id",
                resource,
                "--ttl",
                ttl,
            ],
        )
    }

    /// `postern access request --level operate` as the admin; returns the grant.
    pub fn request_operate(&self, app: &str, customer: &str, duration: &str) -> Result<Value> {
        self.request_access(app, customer, "operate", duration)
    }

    /// `postern access request --level LEVEL` as the admin; returns the grant.
    pub fn request_access(
        &self,
        app: &str,
        customer: &str,
        level: &str,
        duration: &str,
    ) -> Result<Value> {
        self.cli(&[
            "access",
            "request",
            "--app",
            app,
            "--customer",
            customer,
            "--level",
            level,
            "--duration",
            duration,
            "--reason",
            "end-to-end test",
        ])?
        .ok()
    }

    /// SIGKILL: no chance to say goodbye to agents or flush anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn appliance(&self, id: &str) -> Result<Value> {
        let list = self.cli(&["appliance", "list"])?.ok()?;
        list["appliances"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["appliance_id"] == id).cloned())
            .ok_or_else(|| anyhow!("appliance {id} not listed"))
    }

    pub fn wait_online(&self, appliance_id: &str, limit: Duration) -> bool {
        wait_until(limit, || {
            self.appliance(appliance_id)
                .map(|a| a["online"] == true)
                .unwrap_or(false)
        })
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// An enrolled `postern-agent` (not yet necessarily running).
pub struct Agent {
    pub config: PathBuf,
    pub appliance_id: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    /// Writes `agent.toml` (audit path + `body`), registers the appliance and enrolls it.
    pub fn enroll(
        gw: &Gateway,
        dir: &Path,
        app: &str,
        customer: &str,
        body: &str,
    ) -> Result<Agent> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "audit_path = \"{}\"\n\n{body}",
                dir.join("audit.jsonl").display()
            ),
        )?;
        let added = gw
            .cli(&["appliance", "add", "--app", app, "--customer", customer])?
            .ok()?;
        let token = added["token"]
            .as_str()
            .ok_or_else(|| anyhow!("no token in {added}"))?;
        let out = Self::enroll_with(&gw.relay.to_string(), token, &config)?;
        if !out.success {
            bail!("enroll failed: {} {}", out.json, out.stderr);
        }
        Ok(Agent {
            config,
            appliance_id: added["appliance_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            child: None,
            log: dir.join("agent.log"),
        })
    }

    /// [`Agent::enroll`], then runs it and waits (30 s at most) until the gateway sees it
    /// online; the agent's log is in the error if it never is.
    pub fn online(
        gw: &Gateway,
        dir: &Path,
        app: &str,
        customer: &str,
        body: &str,
    ) -> Result<Agent> {
        let mut agent = Agent::enroll(gw, dir, app, customer, body)?;
        agent.run()?;
        if !gw.wait_online(&agent.appliance_id, Duration::from_secs(30)) {
            bail!(
                "agent never came online; log: {}",
                std::fs::read_to_string(&agent.log).unwrap_or_default()
            );
        }
        Ok(agent)
    }

    pub fn enroll_with(gateway: &str, token: &str, config: &Path) -> Result<CliOutput> {
        let mut cmd = Command::new(bin("postern-agent")?);
        cmd.args([
            "--output",
            "json",
            "enroll",
            "--gateway",
            gateway,
            "--token",
            token,
            "--config",
        ])
        .arg(config);
        run_json(cmd)
    }

    pub fn run(&mut self) -> Result<()> {
        let child = Command::new(bin("postern-agent")?)
            .args(["run", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(append_log(&self.log)?)
            .spawn()
            .context("starting postern-agent run")?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| terminate(c, Duration::from_secs(10)))
    }

    pub fn verify_trail(&self) -> Result<CliOutput> {
        self.verify_trail_with(&[])
    }

    /// `postern-agent audit verify` with more arguments (`--anchor FILE`).
    pub fn verify_trail_with(&self, args: &[&str]) -> Result<CliOutput> {
        let mut cmd = Command::new(bin("postern-agent")?);
        cmd.args(["--output", "json", "audit", "verify", "--config"])
            .arg(&self.config)
            .args(args);
        run_json(cmd)
    }

    /// The customer trail's file.
    pub fn trail_path(&self) -> PathBuf {
        self.config.with_file_name("audit.jsonl")
    }

    /// The customer trail once `ready` holds for it (polled for up to 10 s; the trail is
    /// written by group commit, so a record lands a few milliseconds after what it records).
    /// Returns the last read either way: the caller asserts.
    pub fn trail_when(&self, ready: impl Fn(&[Value]) -> bool) -> Result<Vec<Value>> {
        let mut trail = self.trail()?;
        for _ in 0..200 {
            if ready(&trail) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            trail = self.trail()?;
        }
        Ok(trail)
    }

    pub fn trail(&self) -> Result<Vec<Value>> {
        let dir = self
            .config
            .parent()
            .ok_or_else(|| anyhow!("config has no dir"))?;
        let text = std::fs::read_to_string(dir.join("audit.jsonl"))?;
        text.lines()
            .map(|l| serde_json::from_str(l).map_err(Into::into))
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            terminate(c, Duration::from_secs(5));
        }
    }
}

/// A TCP echo server on 127.0.0.1:0, served by a thread per connection.
pub fn echo_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { break };
            thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

/// Deterministic pseudo-random bytes (xorshift), so a transfer can be checked byte for byte.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Sends `data` through `addr` and reads the echo back concurrently; returns what came back.
pub fn echo_round_trip(addr: SocketAddr, data: &[u8]) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = s.try_clone()?;
    let payload = data.to_vec();
    let writer = thread::spawn(move || -> std::io::Result<()> {
        for chunk in payload.chunks(256 * 1024) {
            w.write_all(chunk)?;
        }
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut back = Vec::with_capacity(data.len());
    s.read_to_end(&mut back)?;
    writer.join().map_err(|_| anyhow!("writer panicked"))??;
    Ok(back)
}

/// A tmpfs mounted for one test, unmounted (lazily, in case something still holds it) on drop.
pub struct TinyDisk(pub PathBuf);

impl TinyDisk {
    /// `None` when this machine does not let us mount (not root, no CAP_SYS_ADMIN).
    pub fn mount(at: &Path, size: &str) -> Result<Option<TinyDisk>> {
        std::fs::create_dir_all(at)?;
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()?;
        Ok(out.status.success().then(|| TinyDisk(at.to_path_buf())))
    }

    /// Moves the agent's trail (`audit.jsonl` next to its config) onto this disk and links it
    /// back, so `Agent::trail` and `audit verify` read it; the agent must not be running.
    pub fn hold_trail(&self, agent: &Agent) -> Result<()> {
        let dir = agent
            .config
            .parent()
            .ok_or_else(|| anyhow!("config has no dir"))?;
        let trail = dir.join("audit.jsonl");
        let on_disk = self.0.join("audit.jsonl");
        if trail.exists() {
            std::fs::copy(&trail, &on_disk)?;
            std::fs::remove_file(&trail)?;
        }
        std::os::unix::fs::symlink(&on_disk, &trail)?;
        Ok(())
    }

    /// Writes a filler file until the disk is full.
    pub fn fill(&self) -> Result<PathBuf> {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path)?;
        let block = vec![0u8; 4096];
        for _ in 0..100_000 {
            if std::io::Write::write_all(&mut f, &block).is_err() {
                return Ok(path);
            }
        }
        Err(anyhow!("the tmpfs never filled up"))
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
