//! End to end: a private OpenSSH sshd as the appliance's VM, real `postern server` and
//! `postern-agent` processes, and stock OpenSSH `ssh` through the config the CLI writes.

use anyhow::{anyhow, bail, Result};
use postern::{
    sshd::{keygen, Sshd},
    teardown_check,
    testbed::{bin, pattern, terminate, wait_until, Agent, CliOutput, Gateway},
};
use serde_json::Value;
use std::{
    io::{Read, Write},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

const APP: &str = "my-app";
const CUSTOMER: &str = "acme-corp";
const RESOURCE: &str = "aws_instance.worker";

struct World {
    dir: tempfile::TempDir,
    sshd: Sshd,
    gw: Gateway,
    agent: Agent,
    home: PathBuf,
}

fn ssh_resource(sshd: &Sshd, host_key: &str, extra: &str) -> String {
    format!(
        "[policy]\napproval = \"automatic\"\n\n[[resource]]\nid = \"{RESOURCE}\"\nkind = \"ssh\"\nhost = \"{}\"\nuser = \"{}\"\n\
         key = \"{}\"\nhost_key = \"{}\"\n{extra}",
        sshd.addr,
        sshd.user,
        sshd.client_key.display(),
        host_key
    )
}

/// sshd + gateway + an online agent whose ssh resource pins `host_key` (the real one unless
/// given), under a live operate grant.
fn world(host_key: Option<String>) -> Result<World> {
    world_with(host_key, "record_input = true\n")
}

fn world_with(host_key: Option<String>, extra: &str) -> Result<World> {
    let dir = tempfile::tempdir()?;
    let sshd = Sshd::start()?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    let host_key = host_key.unwrap_or_else(|| sshd.host_key.clone());
    let agent = Agent::online(
        &gw,
        &dir.path().join("agent"),
        APP,
        CUSTOMER,
        &ssh_resource(&sshd, &host_key, extra),
    )?;
    let grant = gw.request_operate(APP, CUSTOMER, "2h")?;
    assert_eq!(grant["state"], "active", "{grant}");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home)?;
    Ok(World {
        dir,
        sshd,
        gw,
        agent,
        home,
    })
}

impl World {
    /// The CLI as the engineer, with HOME pointing at the test's home dir.
    fn cli(&self, args: &[&str]) -> Result<CliOutput> {
        self.gw.cli_home(&self.home, args)
    }

    fn create_endpoint(&self) -> Result<Endpoint> {
        let rec = self
            .cli(&[
                "ops",
                "endpoint",
                "create",
                "--type",
                "ssh",
                "--app",
                APP,
                "--customer",
                CUSTOMER,
                "--origin-resource-id",
                RESOURCE,
                "--ttl",
                "2h",
                "--wait",
            ])?
            .ok()?;
        assert_eq!(rec["state"], "active", "{rec}");
        let command = rec["ssh_command"]
            .as_str()
            .ok_or_else(|| anyhow!("no ssh_command in {rec}"))?;
        let config = PathBuf::from(
            rec["ssh_config"]
                .as_str()
                .ok_or_else(|| anyhow!("no ssh_config in {rec}"))?,
        );
        let alias = command.rsplit(' ').next().unwrap_or_default().to_string();
        assert_eq!(command, format!("ssh -F {} {alias}", config.display()));
        Ok(Endpoint {
            id: rec["id"].as_str().unwrap_or_default().to_string(),
            config,
            alias,
        })
    }

    fn audit(&self) -> Result<Vec<Value>> {
        Ok(self.gw.cli(&["audit", "list"])?.ok()?["records"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    fn log(&self) -> String {
        format!(
            "gateway log:\n{}\nagent log:\n{}\nsshd log:\n{}",
            std::fs::read_to_string(&self.gw.log).unwrap_or_default(),
            std::fs::read_to_string(&self.agent.log).unwrap_or_default(),
            std::fs::read_to_string(&self.sshd.log).unwrap_or_default()
        )
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log());
        }
    }
}

struct Endpoint {
    id: String,
    config: PathBuf,
    alias: String,
}

impl Endpoint {
    /// Stock ssh with the written config: `ssh -F config [opts] alias [command]`.
    fn ssh(&self, opts: &[&str], command: Option<&str>) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg(&self.config)
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=20"])
            .args(opts)
            .arg(&self.alias);
        if let Some(cmd) = command {
            c.arg("--").arg(cmd);
        }
        // Programs under a pty (top) need a terminal type.
        c.stdin(Stdio::null()).env("TERM", "xterm");
        c
    }
}

fn run(c: &mut Command) -> Result<(Option<i32>, String, String)> {
    let out = c.output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn exec_exit_codes_large_output_user_and_refusals() -> Result<()> {
    let w = world(None)?;
    let ep = w.create_endpoint()?;
    let key = std::fs::metadata(w.home.join(".ssh/postern").join(format!("{}.key", ep.id)))?;
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );

    // Exec and exit codes; the login upstream is the configured user whatever was typed.
    let (code, out, err) = run(&mut ep.ssh(&[], Some("whoami; exit 3")))?;
    assert_eq!(code, Some(3), "stderr: {err}\n{}", w.log());
    assert_eq!(out.trim(), w.sshd.user);
    let (code, out, err) = run(&mut ep.ssh(&["-l", "root"], Some("whoami")))?;
    assert_eq!((code, out.trim()), (Some(0), w.sshd.user.as_str()), "{err}");
    let (code, _, err) = run(&mut ep.ssh(&[], Some("echo to-stderr >&2; false")))?;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("to-stderr"), "{err}");

    // Strict key exchange is negotiated (OpenSSH logs it at -vvv).
    let (code, _, err) = run(&mut ep.ssh(&["-vvv"], Some("true")))?;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("strict KEX"),
        "no strict kex in the client's debug log"
    );

    // 64 MiB of output, byte for byte; and 8 MiB of input through stdin.
    let data = pattern(64 * 1024 * 1024, 0x55aa);
    let file = w.dir.path().join("big.bin");
    std::fs::write(&file, &data)?;
    std::fs::set_permissions(
        w.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let out = ep
        .ssh(&[], Some(&format!("cat {}", file.display())))
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "64 MiB came back altered");
    let input = pattern(8 * 1024 * 1024, 7);
    let mut child = ep
        .ssh(&[], Some("sha256sum"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    feeder.join().map_err(|_| anyhow!("feeder panicked"))??;
    let want = hex(ring_sha256(&pattern(8 * 1024 * 1024, 7)));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&want),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Environment beyond TERM/LANG is refused (the private sshd would accept FOO and LANG).
    let (code, out, err) = run(&mut ep.ssh(
        &["-o", "SetEnv=FOO=bar LANG=C.UTF-8"],
        Some("echo ${FOO:-unset} ${LANG:-unset}"),
    ))?;
    assert_eq!(
        out.trim(),
        "unset C.UTF-8",
        "exit {code:?}, stderr {err}\n{}",
        w.log()
    );

    // Forwarding of every kind is refused with OpenSSH's usual messages.
    let (code, _, err) = run(&mut ep.ssh(&["-W", "127.0.0.1:22"], None))?;
    assert_eq!(code, Some(255));
    assert!(err.contains("administratively prohibited"), "-W: {err}");
    let (code, _, err) = run(&mut ep.ssh(
        &[
            "-o",
            "ExitOnForwardFailure=yes",
            "-N",
            "-R",
            "127.0.0.1:0:127.0.0.1:22",
        ],
        None,
    ))?;
    assert_eq!(code, Some(255));
    assert!(err.contains("remote port forwarding failed"), "-R: {err}");
    // -A asks only when there is a local agent to forward: run one for this test.
    let sock = w.dir.path().join("agent.sock");
    let mut ssh_agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "ssh-agent did not start"
    );
    let (_, out, _) = run(ep
        .ssh(&["-A"], Some("echo ${SSH_AUTH_SOCK:-no-agent}"))
        .env("SSH_AUTH_SOCK", &sock))?;
    terminate(&mut ssh_agent, Duration::from_secs(2));
    assert_eq!(out.trim(), "no-agent");
    let (_, out, err) = run(ep
        .ssh(
            &["-X", "-o", "ForwardX11Trusted=yes"],
            Some("echo ${DISPLAY:-no-display}"),
        )
        .env("DISPLAY", "127.0.0.1:7"))?;
    assert_eq!(out.trim(), "no-display");
    assert!(err.contains("X11 forwarding request failed"), "-X: {err}");
    // -L and -D open their listener locally; a connection through it is refused by the gateway.
    for flag in ["-L", "-D"] {
        let port = free_port()?;
        let spec = if flag == "-L" {
            format!("127.0.0.1:{port}:{}", w.sshd.addr)
        } else {
            format!("127.0.0.1:{port}")
        };
        let mut child = ep
            .ssh(&["-N", flag, &spec], None)
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = drain(child.stderr.take());
        let listening = wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if listening {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            if flag == "-D" {
                // SOCKS5: no auth, then CONNECT to the sshd.
                s.write_all(&[5, 1, 0])?;
                let mut r = [0u8; 2];
                s.read_exact(&mut r)?;
                let p = w.sshd.port().to_be_bytes();
                s.write_all(&[5, 1, 0, 1, 127, 0, 0, 1, p[0], p[1]])?;
            }
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            assert!(
                !buf.starts_with(b"SSH-2.0-"),
                "{flag}: the forwarded connection reached sshd"
            );
        }
        assert!(
            wait_until(Duration::from_secs(10), || stderr
                .lock()
                .map(|s| s.contains("administratively prohibited"))
                .unwrap_or(false)),
            "{flag}: {:?}",
            stderr.lock().map(|s| s.clone())
        );
        terminate(&mut child, Duration::from_secs(2));
    }
    // File transfer is off unless the resource allows sftp: sftp-based and legacy scp fail.
    for legacy in [false, true] {
        let mut scp = Command::new("scp");
        scp.arg("-F").arg(&ep.config).args(["-o", "BatchMode=yes"]);
        if legacy {
            scp.arg("-O");
        }
        let out = scp
            .arg(&file)
            .arg(format!(
                "{}:/tmp/postern-scp-{}",
                ep.alias,
                std::process::id()
            ))
            .stdin(Stdio::null())
            .output()?;
        assert!(!out.status.success(), "scp (legacy: {legacy}) went through");
    }
    // The server ends of rsync and sftp, asked for by hand, are file transfer too.
    for (cmd, why) in [
        (
            "rsync --server -vlogDtpre.iLsfxCIvu . /tmp/postern-rsync",
            "rsync is not allowed on this resource",
        ),
        (
            "/usr/lib/openssh/sftp-server",
            "running an sftp server is not allowed on this resource",
        ),
    ] {
        let (code, _, err) = run(&mut ep.ssh(&[], Some(cmd)))?;
        assert_ne!(code, Some(0), "{cmd} ran: {err}");
        assert!(
            w.audit()?
                .iter()
                .any(|r| r["kind"] == "denied" && r["detail"]["reason"] == why),
            "no denial of {cmd}"
        );
    }
    let denied: Vec<Value> = w
        .audit()?
        .into_iter()
        .filter(|r| r["kind"] == "denied")
        .collect();
    for action in [
        "port-forwarding",
        "remote-forwarding",
        "x11-forwarding",
        "agent-forwarding",
        "env",
        "subsystem",
        "exec",
    ] {
        assert!(
            denied.iter().any(|r| r["detail"]["action"] == action),
            "no denied {action} in {denied:?}"
        );
    }

    // Exec audited with its command line and exit status, in both trails.
    let records = w.audit()?;
    assert!(records.iter().any(|r| r["kind"] == "ssh.exec"
        && r["detail"]["command"] == "whoami; exit 3"
        && r["detail"]["exit_status"] == 3));
    let trail = w.agent.trail_when(|t| {
        t.iter()
            .any(|r| r["kind"] == "ssh.exec" && r["detail"]["command"] == "whoami; exit 3")
    })?;
    assert!(trail.iter().any(|r| r["kind"] == "ssh.exec"
        && r["detail"]["command"] == "whoami; exit 3"
        && r["detail"]["exit_status"] == 3));
    assert_eq!(w.gw.cli(&["audit", "verify"])?.ok()?["ok"], true);
    assert_eq!(w.agent.verify_trail()?.ok()?["ok"], true);
    ssh_ops_go_through_the_agents_client_and_take_no_openssh_options(&w)?;
    Ok(())
}

/// `postern ops ssh`: the agent's own SSH client runs the remote command on the VM as the
/// resource's user (no local `ssh` runs: the agent has no [tools] ssh and needs none); an
/// OpenSSH option in the command is refused and recorded as denied in both trails.
fn ssh_ops_go_through_the_agents_client_and_take_no_openssh_options(w: &World) -> Result<()> {
    let op = |command: &str| {
        w.cli(&[
            "ops",
            "ssh",
            "--app",
            APP,
            "--customer",
            CUSTOMER,
            "--origin-resource-id",
            RESOURCE,
            "--wait",
            "--timeout",
            "30s",
            "--command",
            command,
        ])
    };
    let done = op("ssh sh -c 'whoami; echo \"$1\"' sh 'two words'")?;
    assert!(done.success, "{}\n{}", done.json, w.log());
    assert_eq!(
        done.json["stdout"].as_str().unwrap_or_default(),
        format!("{}\ntwo words\n", w.sshd.user),
        "{}",
        done.json
    );
    let failed = op("ssh sh -c 'echo oops >&2; exit 4'")?;
    assert!(!failed.success);
    assert_eq!(
        (
            failed.json["exit_code"].as_i64(),
            failed.json["stderr"].as_str()
        ),
        (Some(4), Some("oops\n")),
        "{}",
        failed.json
    );

    for (command, refused) in [
        ("ssh -oProxyCommand='sh -c id' x", "-oProxyCommand=sh -c id"),
        ("ssh -o ProxyCommand=id x", "-o"),
        ("ssh -J jump x uptime", "-J"),
        ("ssh -L 9999:127.0.0.1:22 x", "-L"),
        ("ssh -D 1080 x", "-D"),
    ] {
        let out = op(command)?;
        assert!(!out.success, "{command}: {}", out.json);
        assert_eq!(
            out.json["error"]["code"], "FORBIDDEN_BY_SCOPE",
            "{command}: {}",
            out.json
        );
        assert_eq!(
            out.json["error"]["details"]["refused"], refused,
            "{command}: {}",
            out.json
        );
        let op_id = out.json["id"].as_str().unwrap_or_default().to_string();
        let message = out.json["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let denied = |records: Vec<Value>| {
            records.iter().any(|r| {
                r["kind"] == "denied"
                    && r["op_id"] == op_id.as_str()
                    && [&r["detail"]["reason"], &r["detail"]["message"]]
                        .iter()
                        .any(|v| v.as_str() == Some(message.as_str()))
            })
        };
        assert!(
            wait_until(Duration::from_secs(10), || denied(
                w.audit().unwrap_or_default()
            )),
            "{command}: not denied in the gateway's trail"
        );
        assert!(
            wait_until(Duration::from_secs(10), || denied(
                w.agent.trail().unwrap_or_default()
            )),
            "{command}: not denied in the agent's trail"
        );
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn drain(r: Option<impl Read + Send + 'static>) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    if let Some(mut r) = r {
        let o = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = o.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
    }
    out
}

fn ring_sha256(b: &[u8]) -> Vec<u8> {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            if let Some(mut i) = c.stdin.take() {
                i.write_all(b)?;
            }
            c.wait_with_output()
        });
    out.map(|o| o.stdout).unwrap_or_default()
}

fn hex(sha256sum_output: Vec<u8>) -> String {
    String::from_utf8_lossy(&sha256sum_output)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// An interactive session under a pty, fed from stdin; then the recording replays it.
#[test]
fn interactive_session_is_recorded_and_plays_back() -> Result<()> {
    let w = world(None)?;
    let ep = w.create_endpoint()?;
    let mut child = ep
        .ssh(&["-tt"], None)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = drain(child.stdout.take());
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    // Wait for a prompt-ish first output, then type.
    assert!(
        wait_until(Duration::from_secs(20), || out
            .lock()
            .map(|s| !s.is_empty())
            .unwrap_or(false)),
        "no shell output\n{}",
        w.log()
    );
    stdin.write_all(b"echo marker-$((6*7)); whoami; stty size\n")?;
    assert!(
        wait_until(Duration::from_secs(20), || out
            .lock()
            .map(|s| s.contains("marker-42"))
            .unwrap_or(false)),
        "{:?}",
        out.lock().map(|s| s.clone())
    );
    stdin.write_all(b"exit\n")?;
    let status = wait_exit(&mut child, Duration::from_secs(20))?;
    assert_eq!(status, Some(0));
    let shown = out.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(shown.contains(&w.sshd.user), "{shown}");

    // The recording is in both trails and `audit play` shows what was typed and shown.
    let session = {
        let mut sid = None;
        wait_until(Duration::from_secs(10), || {
            sid = w.audit().ok().and_then(|rs| {
                rs.into_iter()
                    .find(|r| r["kind"] == "ssh.recording")
                    .and_then(|r| r["session_id"].as_str().map(String::from))
            });
            sid.is_some()
        });
        sid.ok_or_else(|| anyhow!("no ssh.recording in the vendor trail"))?
    };
    let played = w.gw.cli(&["audit", "play", &session])?.ok()?;
    let output = played["output"].as_str().unwrap_or_default();
    let input = played["input"].as_str().unwrap_or_default();
    assert!(
        output.contains("marker-42") && output.contains(&w.sshd.user),
        "{output}"
    );
    assert!(input.contains("echo marker-$((6*7))"), "{input}");
    assert_eq!(
        played["operator"].as_str().map(|s| !s.is_empty()),
        Some(true),
        "{played}"
    );
    // Replayed in a terminal (text mode): the same bytes reach stdout.
    let replay = Command::new(bin("postern")?)
        .args(["audit", "play", &session, "--idle-limit", "0s"])
        .env("POSTERN_ADDR", w.gw.api.to_string())
        .env("POSTERN_TOKEN", &w.gw.admin_token)
        .env("POSTERN_CA_FILE", &w.gw.ca_file)
        .output()?;
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&replay.stdout), output);
    let trail = w
        .agent
        .trail_when(|t| t.iter().any(|r| r["kind"] == "ssh.recording"))?;
    let rec = trail
        .iter()
        .find(|r| r["kind"] == "ssh.recording")
        .ok_or_else(|| anyhow!("no ssh.recording in the customer trail"))?;
    assert!(rec["detail"]["cast"]
        .as_str()
        .unwrap_or_default()
        .contains("marker-42"));
    assert_eq!(rec["session_id"].as_str(), Some(session.as_str()));
    Ok(())
}

fn wait_exit(child: &mut Child, limit: Duration) -> Result<Option<i32>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s.code());
        }
        if Instant::now() > deadline {
            terminate(child, Duration::from_secs(1));
            bail!("ssh did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn retire_cuts_a_live_top_and_the_key_stops_working() -> Result<()> {
    let w = world(None)?;
    let ep = w.create_endpoint()?;
    let mut child = ep
        .ssh(&["-tt"], Some("top"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let _stdin = child.stdin.take();
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    assert!(
        wait_until(Duration::from_secs(20), || out
            .lock()
            .map(|s| s.contains("load average"))
            .unwrap_or(false)),
        "top never drew\n{}",
        w.log()
    );
    let retired = w.gw.cli(&["ops", "endpoint", "retire", &ep.id])?.ok()?;
    let t0 = Instant::now();
    assert_eq!(retired["state"], "retired");
    let status = wait_exit(&mut child, Duration::from_secs(10))?;
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the session stayed up {took:?} after retire"
    );
    assert_eq!(status, Some(255), "{:?}", err.lock().map(|s| s.clone()));
    // The agent ended the upstream session too.
    assert!(
        wait_until(Duration::from_secs(10), || w
            .agent
            .trail()
            .map(|t| t
                .iter()
                .any(|r| r["kind"] == "session.closed" && r["detail"]["reason"] == "retired"))
            .unwrap_or(false)),
        "no session.closed(retired) in the customer trail"
    );
    // The old key no longer authenticates.
    let (code, _, err) = run(&mut ep.ssh(&[], Some("true")))?;
    assert_eq!(code, Some(255));
    assert!(err.contains("Permission denied"), "{err}");
    Ok(())
}

#[test]
fn a_changed_vm_host_key_is_refused_and_audited() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let wrong = keygen(&scratch.path().join("wrong"), "not-the-vm")?;
    let w = world(Some(wrong))?;
    let ep = w.create_endpoint()?;
    let (code, out, err) = run(&mut ep.ssh(&[], Some("echo reached")))?;
    assert_ne!(code, Some(0));
    assert!(!out.contains("reached"));
    assert!(err.contains("host key"), "{err}");
    let trail = w.agent.trail_when(|t| {
        t.iter()
            .any(|r| r["kind"] == "denied" && r["detail"]["reason"] == "host key mismatch")
    })?;
    assert!(
        trail
            .iter()
            .any(|r| r["kind"] == "denied" && r["detail"]["reason"] == "host key mismatch"),
        "{trail:?}"
    );

    // A client that connects and never authenticates is dropped after the grace time (10 s).
    let config = std::fs::read_to_string(&ep.config)?;
    let port: u16 = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("Port "))
        .ok_or_else(|| anyhow!("no Port in {config}"))?
        .trim()
        .parse()?;
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", port))?;
    idle.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut banner = [0u8; 8];
    idle.read_exact(&mut banner)?;
    assert_eq!(&banner, b"SSH-2.0-");
    let mut rest = Vec::new();
    let ended = idle.read_to_end(&mut rest);
    assert!(
        ended.is_ok()
            || ended
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{ended:?}"
    );
    Ok(())
}

/// The gateway's host key and the endpoint survive a restart: the files the CLI wrote keep
/// working with StrictHostKeyChecking=yes.
#[test]
fn gateway_restart_keeps_the_host_key_and_the_endpoint() -> Result<()> {
    let mut w = world(None)?;
    let ep = w.create_endpoint()?;
    let (code, out, err) = run(&mut ep.ssh(&[], Some("echo before-restart")))?;
    assert_eq!((code, out.trim()), (Some(0), "before-restart"), "{err}");
    let (api, relay) = (w.gw.api, w.gw.relay);
    w.gw.stop();
    w.gw = Gateway::start_on(&w.dir.path().join("gw"), api, relay)?;
    assert!(
        w.gw.wait_online(&w.agent.appliance_id, Duration::from_secs(40)),
        "agent did not reconnect\n{}",
        w.log()
    );
    let (code, out, err) = run(&mut ep.ssh(&[], Some("echo after-restart")))?;
    assert_eq!(
        (code, out.trim()),
        (Some(0), "after-restart"),
        "{err}\n{}",
        w.log()
    );
    Ok(())
}

/// With `sftp = true` on the resource, file transfer works (scp over sftp), as the configured user.
#[test]
fn sftp_works_where_the_resource_allows_it() -> Result<()> {
    let w = world_with(None, "sftp = true\nrecord_input = true\n")?;
    let ep = w.create_endpoint()?;
    let data = pattern(1024 * 1024, 99);
    let local = w.dir.path().join("up.bin");
    std::fs::write(&local, &data)?;
    let remote = format!("/tmp/postern-sftp-{}", std::process::id());
    let out = Command::new("scp")
        .arg("-F")
        .arg(&ep.config)
        .args(["-o", "BatchMode=yes"])
        .arg(&local)
        .arg(format!("{}:{remote}", ep.alias))
        .stdin(Stdio::null())
        .output()?;
    assert!(
        out.status.success(),
        "scp: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.log()
    );
    let back = ep
        .ssh(
            &[],
            Some(&format!(
                "cat {remote}; stat -c %U {remote} >&2; rm -f {remote}"
            )),
        )
        .output()?;
    assert!(back.stdout == data, "the uploaded file differs");
    assert_eq!(String::from_utf8_lossy(&back.stderr).trim(), w.sshd.user);
    Ok(())
}

/// The pty's size reaches the VM, and so does a window change (ssh on a real pty, resized).
#[test]
fn pty_size_and_window_changes_reach_the_vm() -> Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let w = world(None)?;
    let ep = w.create_endpoint()?;
    let (mut master, mut slave) = (0, 0);
    let mut size = libc::winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds we then own; the pointers are valid for the call.
    if unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    } != 0
    {
        bail!("openpty: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds from openpty, owned here only.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let script = "stty size; i=0; while [ \"$(stty size)\" = '24 80' ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; stty size";
    let mut child = ep
        .ssh(&["-tt"], Some(script))
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave))
        .spawn()?;
    let out = drain(Some(std::fs::File::from(master.try_clone()?)));
    assert!(
        wait_until(Duration::from_secs(20), || out
            .lock()
            .map(|s| s.contains("24 80"))
            .unwrap_or(false)),
        "{:?}\n{}",
        out.lock().map(|s| s.clone()),
        w.log()
    );
    size.ws_row = 40;
    size.ws_col = 120;
    // SAFETY: TIOCSWINSZ on our pty master with a valid winsize.
    unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&master),
            libc::TIOCSWINSZ,
            &size,
        )
    };
    // ssh has no controlling terminal here, so tell it the way the kernel would.
    let changed = wait_until(Duration::from_secs(20), || {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGWINCH) };
        out.lock().map(|s| s.contains("40 120")).unwrap_or(false)
    });
    let status = wait_exit(&mut child, Duration::from_secs(30))?;
    assert!(
        changed,
        "the window change never reached the VM: {:?}",
        out.lock().map(|s| s.clone())
    );
    assert_eq!(status, Some(0));
    // The recording keeps the resize.
    let resized = wait_until(Duration::from_secs(10), || {
        w.audit()
            .map(|rs| {
                rs.iter().any(|r| {
                    r["kind"] == "ssh.recording"
                        && r["detail"]["cast"]
                            .as_str()
                            .unwrap_or_default()
                            .contains("\"r\",\"120x40\"")
                })
            })
            .unwrap_or(false)
    });
    assert!(resized, "no resize event in the recording");
    Ok(())
}

/// The session id of the newest `ssh.recording` of `command` in the vendor trail, once there.
fn recording_of(w: &World, command: Option<&str>) -> Result<String> {
    let mut sid = None;
    wait_until(Duration::from_secs(15), || {
        sid = w.audit().ok().and_then(|rs| {
            rs.into_iter()
                .rfind(|r| {
                    r["kind"] == "ssh.recording" && r["detail"]["command"].as_str() == command
                })
                .and_then(|r| r["session_id"].as_str().map(String::from))
        });
        sid.is_some()
    });
    sid.ok_or_else(|| {
        anyhow!(
            "no ssh.recording of {command:?} in the vendor trail\n{}",
            w.log()
        )
    })
}

/// `ssh vm bash -s < script.sh`: the script is in the recording (input events) in both trails,
/// though the resource does not ask for keystrokes; typed keystrokes under a pty are not.
#[test]
fn an_execs_stdin_is_recorded_and_keystrokes_only_where_asked() -> Result<()> {
    let w = world_with(None, "")?;
    let ep = w.create_endpoint()?;
    let script = w.dir.path().join("script.sh");
    std::fs::write(
        &script,
        "echo from-script-$((6*7))\nrm -rf /tmp/postern-nothing-here\n",
    )?;
    let out = ep
        .ssh(&[], Some("bash -s"))
        .stdin(std::fs::File::open(&script)?)
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "from-script-42"
    );

    let session = recording_of(&w, Some("bash -s"))?;
    let played = w.gw.cli(&["audit", "play", &session])?.ok()?;
    let input = played["input"].as_str().unwrap_or_default();
    assert!(
        input.contains("echo from-script-$((6*7))")
            && input.contains("rm -rf /tmp/postern-nothing-here"),
        "{played}"
    );
    let vendor = w.audit()?;
    let rec = vendor
        .iter()
        .find(|r| r["kind"] == "ssh.recording" && r["session_id"] == session.as_str())
        .ok_or_else(|| anyhow!("no recording"))?;
    assert_eq!(rec["detail"]["input_recorded"], true);
    let trail = w.agent.trail_when(|t| {
        t.iter()
            .any(|r| r["kind"] == "ssh.recording" && r["session_id"] == session.as_str())
    })?;
    let rec = trail
        .iter()
        .find(|r| r["kind"] == "ssh.recording" && r["session_id"] == session.as_str())
        .ok_or_else(|| anyhow!("no recording in the customer trail"))?;
    assert_eq!(rec["detail"]["input_recorded"], true);
    let cast = rec["detail"]["cast"].as_str().unwrap_or_default();
    assert!(
        cast.contains(r#""i","echo from-script-$((6*7))\nrm -rf"#),
        "{cast}"
    );

    // Under a pty, what is typed stays out of the recording (record_input is off here).
    let mut child = ep
        .ssh(&["-tt"], None)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let shown = drain(child.stdout.take());
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    assert!(
        wait_until(Duration::from_secs(20), || shown
            .lock()
            .map(|s| !s.is_empty())
            .unwrap_or(false)),
        "no shell output\n{}",
        w.log()
    );
    stdin.write_all(b"echo typed-$((2*3))\n")?;
    assert!(wait_until(Duration::from_secs(20), || shown
        .lock()
        .map(|s| s.contains("typed-6"))
        .unwrap_or(false)));
    stdin.write_all(b"exit\n")?;
    assert_eq!(wait_exit(&mut child, Duration::from_secs(20))?, Some(0));
    let session = recording_of(&w, None)?;
    let played = w.gw.cli(&["audit", "play", &session])?.ok()?;
    assert_eq!(played["input"], "", "{played}");
    assert!(
        played["output"]
            .as_str()
            .unwrap_or_default()
            .contains("typed-6"),
        "{played}"
    );
    let trail = w.agent.trail_when(|t| {
        t.iter()
            .any(|r| r["kind"] == "ssh.recording" && r["session_id"] == session.as_str())
    })?;
    let rec = trail
        .iter()
        .find(|r| r["kind"] == "ssh.recording" && r["session_id"] == session.as_str())
        .ok_or_else(|| anyhow!("no recording in the customer trail"))?;
    assert_eq!(rec["detail"]["input_recorded"], false);
    assert!(!rec["detail"]["cast"]
        .as_str()
        .unwrap_or_default()
        .contains(r#""i","#));
    Ok(())
}

/// Whether `pid` runs. A killed process may linger as a zombie until reaped: that counts as dead.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

fn teardown_record(records: &[Value], endpoint: &str) -> Option<Value> {
    records
        .iter()
        .find(|r| r["kind"] == "ssh.teardown" && r["endpoint_id"] == endpoint)
        .cloned()
}

/// What an engineer leaves on the VM (nohup, setsid, tmux, screen, a crontab entry) ends with
/// the endpoint: the agent logs in as the user, kills it and removes it, and both trails list
/// what it ended. While another endpoint on the same resource is live, it waits for that one.
#[test]
fn the_endpoints_end_tears_down_what_its_user_left_on_the_vm() -> Result<()> {
    let w = world(None)?;
    let ep = w.create_endpoint()?;
    let other = w.create_endpoint()?;
    let mut leave = String::from(
        "nohup sleep 600 >/dev/null 2>&1 & echo nohup=$!\n\
         setsid sleep 601 >/dev/null 2>&1 </dev/null & echo setsid=$!\n",
    );
    // Optional tools, each tested where installed (scripts/test installs them).
    let has = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has("tmux") {
        leave.push_str("tmux new-session -d -s left 'sleep 602' && echo tmux=$(tmux list-panes -t left -F '#{pane_pid}')\n");
    } else {
        eprintln!("note: tmux is not installed; its leftover is not tested here");
    }
    if has("screen") {
        // A killed screen leaves its socket behind (listed as dead): wipe those first.
        leave.push_str("screen -wipe >/dev/null 2>&1; screen -dmS left sleep 603; sleep 0.3; echo screen=$(screen -ls | grep -v Dead | grep -o '[0-9]*\\.left' | cut -d. -f1)\n");
    } else {
        eprintln!("note: screen is not installed; its leftover is not tested here");
    }
    let cron = has("crontab");
    if cron {
        leave.push_str("echo '*/5 * * * * /bin/true postern-leftover' | crontab - && echo cron=$(crontab -l | grep -c postern-leftover)\n");
    } else {
        eprintln!("note: crontab (Debian: cron) is not installed; the crontab leftover is not tested here");
    }
    // systemd-run --user needs a running user manager (systemd as PID 1 and logind); where
    // there is none the default teardown skips units, and this test cannot leave one.
    let out = ep
        .ssh(&[], Some("bash -s"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            if let Some(mut i) = c.stdin.take() {
                i.write_all(leave.as_bytes())?;
            }
            c.wait_with_output()
        })?;
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{printed}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.log()
    );
    let pids: Vec<(String, u32)> = printed
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| *k != "cron")
        .map(|(k, v)| {
            Ok((
                k.to_string(),
                v.trim()
                    .parse::<u32>()
                    .map_err(|e| anyhow!("{k}={v}: {e}"))?,
            ))
        })
        .collect::<Result<_>>()?;
    assert!(pids.len() >= 2, "{printed}");
    for (what, pid) in &pids {
        assert!(
            alive(*pid),
            "{what} ({pid}) is not running before the teardown"
        );
    }
    if cron {
        assert!(printed.contains("cron=1"), "{printed}");
    }
    // A process of another user (this test's own) is not the teardown's business.
    let mut bystander = Command::new("sleep").arg("600").spawn()?;

    // The other endpoint is live with a session: retiring the first leaves the user alone.
    let mut busy = other
        .ssh(&[], Some("sleep 300"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // The session is at the appliance before anything ends (the proof below counts it).
    assert!(
        wait_until(Duration::from_secs(20), || w.agent.trail().is_ok_and(|t| t
            .iter()
            .any(
                |r| r["kind"] == "session.opened" && r["detail"]["command"] == "sleep 300"
            ))),
        "the other endpoint's session never reached the appliance\n{}",
        w.log()
    );
    w.gw.cli(&["ops", "endpoint", "retire", &ep.id])?.ok()?;
    let mut td = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            td = w.audit().ok().and_then(|r| teardown_record(&r, &ep.id));
            td.is_some()
        }),
        "no ssh.teardown for {} in the vendor trail\n{}",
        ep.id,
        w.log()
    );
    let td = td.unwrap_or_default();
    assert!(
        td["detail"]["skipped"]
            .as_str()
            .is_some_and(|s| s.contains(&other.id)),
        "{td}"
    );
    assert!(
        pids.iter().all(|(_, pid)| alive(*pid)),
        "the teardown ran while another endpoint used the user"
    );
    assert!(
        busy.try_wait()?.is_none(),
        "the other endpoint's session was cut"
    );

    // The last endpoint's end sweeps: every leftover is gone, by PID, and listed in both trails.
    w.gw.cli(&["ops", "endpoint", "retire", &other.id])?.ok()?;
    let mut td = None;
    assert!(
        wait_until(Duration::from_secs(60), || {
            td = w.audit().ok().and_then(|r| teardown_record(&r, &other.id));
            td.is_some()
        }),
        "no ssh.teardown for {} in the vendor trail\n{}",
        other.id,
        w.log()
    );
    let td = td.unwrap_or_default();
    assert_eq!(
        td["actor"],
        format!("agent:{}", w.agent.appliance_id),
        "{td}"
    );
    let mut customer = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            customer = w
                .agent
                .trail()
                .ok()
                .and_then(|r| teardown_record(&r, &other.id));
            customer.is_some()
        }),
        "no ssh.teardown in the customer trail"
    );
    let customer = customer.unwrap_or_default();
    for record in [&td, &customer] {
        let d = &record["detail"];
        assert_eq!(d["error"], Value::Null, "{record}");
        assert_eq!(d["user"], w.sshd.user.as_str());
        assert_eq!(d["reason"], "retired");
        let killed: Vec<u64> = d["killed"]
            .as_array()
            .map(|k| k.iter().filter_map(|k| k["pid"].as_u64()).collect())
            .unwrap_or_default();
        for (what, pid) in &pids {
            assert!(
                killed.contains(&u64::from(*pid)),
                "{what} ({pid}) is not in the teardown's list: {record}"
            );
        }
        if cron {
            assert!(
                d["crontab"].as_array().is_some_and(|c| c
                    .iter()
                    .any(|l| l.as_str().unwrap_or_default().contains("postern-leftover"))),
                "{record}"
            );
        }
    }
    // SIGKILL takes effect when a process is next scheduled: moments, on a busy machine.
    wait_until(Duration::from_secs(5), || {
        pids.iter().all(|(_, pid)| !alive(*pid))
    });
    for (what, pid) in &pids {
        assert!(!alive(*pid), "{what} ({pid}) survived the teardown");
    }
    if cron {
        let out = Command::new("crontab")
            .args(["-l", "-u", &w.sshd.user])
            .output()?;
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no crontab"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(
        bystander.try_wait()?.is_none(),
        "the teardown killed another user's process"
    );
    terminate(&mut bystander, Duration::from_secs(2));
    let _ = wait_exit(&mut busy, Duration::from_secs(10));
    assert_eq!(w.gw.cli(&["audit", "verify"])?.ok()?["ok"], true);
    assert_eq!(w.agent.verify_trail()?.ok()?["ok"], true);

    // Both ends are proved, signed by the appliance: the last one's live session (one
    // upstream SSH connection) was cut and has ended, and the VM sweep ran to its end.
    let checks = ["sessions_cut", "new_sessions_refused", "ssh_vm_cleanup"];
    let v = teardown_check::verified(&w.gw, &other.id, &checks, Duration::from_secs(30))?;
    let detail = |name: &str| {
        v["proof"]["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name))
            .map(|c| c["detail"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert!(
        detail("sessions_cut").starts_with("1 session(s) served"),
        "{v}"
    );
    assert!(
        detail("ssh_vm_cleanup").contains("process(es) ended"),
        "{v}"
    );
    let first = teardown_check::verified(&w.gw, &ep.id, &checks, Duration::from_secs(30))?;
    assert_eq!(first["proof"]["reason"], "retired");
    let edited = teardown_check::edit_and_verify(&w.gw, &other.id)?;
    teardown_check::assert_edit_refused(&edited, &other.id)?;
    Ok(())
}

/// The customer's trail on a full disk: an ssh session is refused before anything runs on
/// the VM, with the reason; a live interactive session is cut; the agent keeps running and says
/// why; with space again ssh works and the trail verifies.
#[test]
fn full_trail_disk_refuses_ssh_and_the_agent_recovers() -> Result<()> {
    let mut w = world(None)?;
    let ep = w.create_endpoint()?;
    let agent_dir = w.dir.path().join("agent");
    let Some(disk) = postern::testbed::TinyDisk::mount(&agent_dir.join("trail"), "256k")? else {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); the full-disk test did not run"
        );
        return Ok(());
    };
    w.agent.stop();
    disk.hold_trail(&w.agent)?;
    w.agent.run()?;
    assert!(w
        .gw
        .wait_online(&w.agent.appliance_id, Duration::from_secs(30)));
    let works = || {
        run(&mut ep.ssh(&[], Some("echo reached")))
            .is_ok_and(|(code, out, _)| code == Some(0) && out.contains("reached"))
    };
    assert!(wait_until(Duration::from_secs(20), works));
    let mut live = ep
        .ssh(&[], Some("sleep 600"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    assert!(wait_until(Duration::from_secs(20), || w
        .agent
        .trail()
        .is_ok_and(|t| t.iter().any(
            |r| r["kind"] == "session.opened" && r["detail"]["command"] == "sleep 600"
        ))));
    // Where the VM's user leaves a mark for each command that ran.
    let marks = tempfile::tempdir()?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(marks.path(), std::fs::Permissions::from_mode(0o777))?;
    let filler = disk.fill()?;
    let mut refusal = None;
    for i in 0..40 {
        let marker = marks.path().join(format!("ran-{i}"));
        let (code, _, err) = run(&mut ep.ssh(&[], Some(&format!("touch {}", marker.display()))))?;
        if code != Some(0) {
            assert!(!marker.exists(), "the refused command ran on the VM");
            refusal = Some(err);
            break;
        }
    }
    let refusal = refusal.ok_or_else(|| anyhow!("ssh kept working with the disk full"))?;
    assert!(refusal.contains("audit trail"), "ssh said: {refusal}");
    // Bails if the live session was not cut.
    wait_exit(&mut live, Duration::from_secs(20))?;
    let pid = w.agent.pid().ok_or_else(|| anyhow!("agent not running"))?;
    assert!(alive(pid), "the agent exited");
    let log = std::fs::read_to_string(&w.agent.log)?;
    assert!(
        log.contains("cannot write the customer's audit trail"),
        "the agent did not say why: {log}"
    );

    std::fs::remove_file(&filler)?;
    assert!(
        wait_until(Duration::from_secs(10), works),
        "ssh did not work again once the disk had space"
    );
    assert_eq!(w.agent.verify_trail()?.ok()?["ok"], true);
    w.agent.stop();
    drop(disk);
    Ok(())
}
