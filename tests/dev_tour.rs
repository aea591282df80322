//! End to end: `postern dev` as a newcomer runs it — one process that brings up a gateway and
//! two demo appliances with one real resource of every kind — and the tour it prints, walked
//! with the real clients: kubectl through the generated kubeconfig, psql through the
//! connection string, OpenSSH through the generated config, the tcp forwarder, a one-off op,
//! a signed approval, both trails and their verification. SIGTERM then ends everything it
//! started. Needs what `scripts/test` installs (PostgreSQL, OpenSSH server, kubectl) and root
//! (the private sshd switches to its login user).

use anyhow::{anyhow, bail, Context, Result};
use postern::testbed::{bin, id_of, terminate, wait_until};
use serde_json::Value;
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

const CUSTOMER: &str = "demo-customer";

struct Dev {
    child: Child,
    ready: Value,
    home: PathBuf,
    stderr: PathBuf,
}

impl Dev {
    fn start(dir: &Path, env: &[(&str, &str)]) -> Result<Dev> {
        let home = dir.join("home");
        std::fs::create_dir_all(&home)?;
        let stderr = dir.join("dev.stderr");
        let mut child = Command::new(bin("postern")?)
            .args(["--output", "json", "dev", "--data-dir"])
            .arg(dir.join("data"))
            .env("HOME", &home)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .context("starting postern dev")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(90)).unwrap_or_default();
        let ready: Value = match serde_json::from_str(line.trim()) {
            Ok(v) => v,
            Err(_) => {
                terminate(&mut child, Duration::from_secs(10));
                bail!(
                    "postern dev printed no ready line ({line:?}); stderr:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
        };
        Ok(Dev {
            child,
            ready,
            home,
            stderr,
        })
    }

    fn demo(&self, key: &str) -> Result<String> {
        self.ready["demo"][key]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no demo.{key} in {}", self.ready))
    }

    fn resource(&self, kind: &str) -> Result<String> {
        self.ready["demo"]["resources"][kind]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| {
                anyhow!(
                    "postern dev did not bring up its {kind} resource (skipped: {}); the tests need what scripts/test installs",
                    self.ready["demo"]["skipped"]
                )
            })
    }

    fn appliance(&self, app: &str) -> Result<&Value> {
        self.ready["demo"]["appliances"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["app"] == app))
            .ok_or_else(|| anyhow!("no appliance {app} in {}", self.ready))
    }

    /// `postern --output json ARGS` with `token` (a file's contents), from the tour's shell.
    fn cli_with(&self, token_file: &str, args: &[&str]) -> Result<(bool, Value)> {
        let token = std::fs::read_to_string(token_file)?;
        let out = Command::new(bin("postern")?)
            .args(["--output", "json"])
            .args(args)
            .env("HOME", &self.home)
            .env(
                "POSTERN_ADDR",
                self.ready["api"].as_str().unwrap_or_default(),
            )
            .env(
                "POSTERN_CA_FILE",
                self.ready["ca_file"].as_str().unwrap_or_default(),
            )
            .env("POSTERN_TOKEN", token.trim())
            .stdin(Stdio::null())
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "postern {args:?}: stdout {stdout:?}, stderr {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((out.status.success(), json))
    }

    fn cli(&self, args: &[&str]) -> Result<Value> {
        let admin = self.ready["admin_token_file"].as_str().unwrap_or_default();
        match self.cli_with(admin, args)? {
            (true, v) => Ok(v),
            (false, v) => bail!("postern {args:?} failed: {v}"),
        }
    }

    fn endpoint(&self, kind: &str, resource: &str) -> Result<Value> {
        let ep = self.cli(&[
            "ops",
            "endpoint",
            "create",
            "--type",
            kind,
            "--app",
            "demo-app",
            "--customer",
            CUSTOMER,
            "--origin-resource-id",
            resource,
            "--ttl",
            "10m",
        ])?;
        if ep["state"] != "active" {
            bail!("{kind} endpoint not active: {ep}");
        }
        Ok(ep)
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn field(v: &Value, key: &str) -> Result<String> {
    v[key]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no {key} in {v}"))
}

/// The tcp endpoint through `postern ops endpoint connect`: the echo service answers.
fn echo_through_forwarder(dev: &Dev, ep: &str) -> Result<()> {
    let admin =
        std::fs::read_to_string(dev.ready["admin_token_file"].as_str().unwrap_or_default())?;
    let mut fwd = Command::new(bin("postern")?)
        .args([
            "--output",
            "json",
            "ops",
            "endpoint",
            "connect",
            ep,
            "--listen",
            "127.0.0.1:0",
        ])
        .env("HOME", &dev.home)
        .env(
            "POSTERN_ADDR",
            dev.ready["api"].as_str().unwrap_or_default(),
        )
        .env(
            "POSTERN_CA_FILE",
            dev.ready["ca_file"].as_str().unwrap_or_default(),
        )
        .env("POSTERN_TOKEN", admin.trim())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> Result<()> {
        let stdout = fwd.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let bound: Value = serde_json::from_str(line.trim())?;
        let listen = field(&bound, "listen")?;
        let mut s = TcpStream::connect(&listen)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(b"hello through postern")?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        if back != b"hello through postern" {
            bail!(
                "the echo service answered {:?}",
                String::from_utf8_lossy(&back)
            );
        }
        Ok(())
    })();
    terminate(&mut fwd, Duration::from_secs(5));
    result
}

fn walk_the_tour(dev: &Dev) -> Result<()> {
    let kube = dev.resource("kubernetes")?;
    let pg = dev.resource("postgres")?;
    let ssh = dev.resource("ssh")?;
    let tcp = dev.resource("tcp")?;

    let grant = dev.cli(&[
        "access",
        "request",
        "--app",
        "demo-app",
        "--customer",
        CUSTOMER,
        "--level",
        "operate",
        "--duration",
        "1h",
        "--reason",
        "trying Postern",
    ])?;
    assert_eq!(grant["state"], "active", "automatic policy: {grant}");

    // kubectl through the generated kubeconfig.
    let ep = dev.endpoint("kubectl", &kube)?;
    let pods = run(Command::new("kubectl")
        .args(["get", "pods"])
        .env("KUBECONFIG", field(&ep, "kubeconfig")?))?;
    assert!(pods.contains("web-1") && pods.contains("web-2"), "{pods}");

    // psql through the connection string, inside the endpoint's scope and not beyond it.
    let ep = dev.endpoint("postgres", &pg)?;
    let cs = field(&ep, "connection_string")?;
    let items = run(Command::new("psql").args([
        &cs,
        "-X",
        "-A",
        "-t",
        "-c",
        "select name from app.items order by id",
    ]))?;
    assert_eq!(items.trim(), "first\nsecond");
    let secret = run(Command::new("psql").args([&cs, "-X", "-c", "select * from secret.keys"]));
    let err = format!(
        "{:#}",
        secret
            .err()
            .ok_or_else(|| anyhow!("secret.keys was readable"))?
    );
    assert!(err.contains("permission denied"), "{err}");

    // ssh through the generated config, as the demo VM's user.
    let ep = dev.endpoint("ssh", &ssh)?;
    let line = field(&ep, "ssh_command")?;
    let mut words = line.split_whitespace();
    let program = words.next().ok_or_else(|| anyhow!("empty ssh_command"))?;
    let who =
        run(Command::new(program)
            .args(words)
            .args(["-o", "BatchMode=yes", "--", "id", "-un"]))?;
    assert_eq!(who.trim(), "postern-demo");

    // The echo service through the local forwarder.
    let ep = dev.endpoint("tcp", &tcp)?;
    echo_through_forwarder(dev, &id_of(&ep)?)?;

    // A one-off op, run in the appliance.
    let op = dev.cli(&[
        "ops",
        "kubectl",
        "--app",
        "demo-app",
        "--customer",
        CUSTOMER,
        "--origin-resource-id",
        &kube,
        "--command",
        "kubectl get pods",
        "--wait",
    ])?;
    assert_eq!(op["state"], "completed", "{op}");
    assert!(
        op["stdout"].as_str().unwrap_or_default().contains("web-1"),
        "{op}"
    );

    // An approval on demo-manual: the approver's token alone is not enough (its agent.toml
    // lists an approver key); a decision signed with that key is.
    let approver = dev.demo("approver_token_file")?;
    let key = dev.demo("approver_key")?;
    let grant = dev.cli(&[
        "access",
        "request",
        "--app",
        "demo-manual",
        "--customer",
        CUSTOMER,
        "--level",
        "operate",
        "--duration",
        "1h",
        "--reason",
        "trying approvals",
    ])?;
    assert_eq!(grant["state"], "pending-approval", "manual policy: {grant}");
    let gid = id_of(&grant)?;
    let (_, list) = dev.cli_with(&approver, &["approvals", "list"])?;
    assert!(
        list["approvals"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["id"] == gid.as_str())),
        "{list}"
    );
    let (ok, unsigned) = dev.cli_with(&approver, &["approvals", "approve", &gid])?;
    assert!(
        !ok && unsigned["error"]["code"] == "APPROVAL_INVALID",
        "{unsigned}"
    );
    let (ok, signed) = dev.cli_with(
        &approver,
        &[
            "approvals",
            "approve",
            &gid,
            "--key",
            &key,
            "--message",
            "go ahead",
        ],
    )?;
    assert!(ok && signed["state"] == "active", "{signed}");

    // Both trails, and their verification.
    let records = dev.cli(&["audit", "list", "--limit", "1000"])?;
    let kinds: Vec<&str> = records["records"]
        .as_array()
        .map(|r| r.iter().filter_map(|x| x["kind"].as_str()).collect())
        .unwrap_or_default();
    for kind in [
        "kube.request",
        "sql.statement",
        "ssh.exec",
        "session.opened",
        "grant.approved",
    ] {
        assert!(
            kinds.contains(&kind),
            "no {kind} in the vendor trail: {kinds:?}"
        );
    }
    let verified = dev.cli(&["audit", "verify"])?;
    assert_eq!(verified["ok"], true, "{verified}");
    let auto = dev.appliance("demo-app")?;
    let trail = std::fs::read_to_string(field(auto, "trail")?)?;
    for kind in [
        "\"kind\":\"kube.request\"",
        "\"kind\":\"sql.statement\"",
        "\"kind\":\"op.finished\"",
    ] {
        assert!(trail.contains(kind), "no {kind} in the customer trail");
    }
    let manual = dev.appliance("demo-manual")?;
    let manual_trail = std::fs::read_to_string(field(manual, "trail")?)?;
    assert!(
        manual_trail.contains("\"kind\":\"approval.verified\""),
        "{manual_trail}"
    );
    for app in [auto, manual] {
        let out = run(Command::new(bin("postern-agent")?)
            .args(["--output", "json", "audit", "verify", "--config"])
            .arg(field(app, "agent_config")?))?;
        let v: Value = serde_json::from_str(out.trim())?;
        assert_eq!(v["ok"], true, "{v}");
    }
    Ok(())
}

fn alive(pid: u64) -> bool {
    // A zombie is not running; only a live process has a stat line with another state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or_default()
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[test]
fn postern_dev_brings_up_every_resource_and_its_tour_works_with_the_real_clients() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut dev = Dev::start(dir.path(), &[])?;
    let toured = walk_the_tour(&dev);
    let pids: Vec<u64> = dev.ready["demo"]["pids"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let run_dir = dev.demo("run_dir");
    // SIGTERM: everything it started ends, and so does it, by itself.
    let status = terminate(&mut dev.child, Duration::from_secs(30));
    if let Err(e) = toured {
        bail!(
            "{e:#}\npostern dev stderr:\n{}",
            std::fs::read_to_string(&dev.stderr).unwrap_or_default()
        );
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "postern dev did not exit cleanly on SIGTERM: {status:?}"
    );
    // agents (2), the API server, postgres and sshd
    assert_eq!(pids.len(), 5, "{}", dev.ready);
    assert!(
        wait_until(Duration::from_secs(10), || !pids.iter().any(|p| alive(*p))),
        "still running after postern dev ended: {:?}",
        pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
    );
    let run_dir = run_dir?;
    assert!(!Path::new(&run_dir).exists(), "{run_dir} left behind");
    Ok(())
}

/// Without PostgreSQL's server binaries the rest still comes up: the database is skipped with
/// a note saying what to install, and neither the agent nor the tour mentions it.
#[test]
fn postern_dev_skips_a_missing_piece_with_a_note() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let empty = dir.path().join("no-postgres-here");
    std::fs::create_dir_all(&empty)?;
    let mut dev = Dev::start(dir.path(), &[("POSTERN_PG_BIN", &empty.to_string_lossy())])?;
    let ready = dev.ready.clone();
    let status = terminate(&mut dev.child, Duration::from_secs(30));
    let stderr = std::fs::read_to_string(&dev.stderr)?;
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {stderr}");
    assert!(ready["demo"]["resources"]["postgres"].is_null(), "{ready}");
    assert_eq!(
        ready["demo"]["resources"]["tcp"], "null_resource.echo",
        "{ready}"
    );
    let skipped = ready["demo"]["skipped"]
        .as_array()
        .ok_or_else(|| anyhow!("no skipped list in {ready}"))?;
    let note = skipped
        .iter()
        .find(|s| s["resource"] == "PostgreSQL")
        .ok_or_else(|| anyhow!("PostgreSQL not among the skipped: {ready}"))?;
    assert!(
        note["note"]
            .as_str()
            .unwrap_or_default()
            .contains("apt-get install postgresql"),
        "{note}"
    );
    assert_eq!(
        ready["demo"]["appliances"].as_array().map(Vec::len),
        Some(2),
        "{ready}"
    );
    let config = std::fs::read_to_string(field(&ready, "agent_config")?)?;
    assert!(!config.contains("kind = \"postgres\""), "{config}");
    assert!(stderr.contains("skipped PostgreSQL"), "{stderr}");
    assert!(!stderr.contains("--type postgres"), "{stderr}");
    Ok(())
}
