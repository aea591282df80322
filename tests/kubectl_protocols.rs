//! Every kubectl: exec and port-forward with Debian's kubectl 1.20 (SPDY/3.1) as well as the
//! newest installed kubectl (WebSocket; port-forward tunnels SPDY in WebSocket), directly
//! against the test API server and through a Postern endpoint. Only the upgrade paths and
//! one `get` run twice; tests/kubectl.rs covers the rest with the kubectl on PATH.
//!
//! The SPDY kubectl comes from `scripts/test` (`POSTERN_KUBECTL_SPDY`, or unpacked into
//! `target/tools/kubectl-1.20`); without it the SPDY halves are skipped with a note.

use anyhow::{anyhow, bail, Context, Result};
use postern::{
    kube_apiserver::{kubectl_bin, spdy_kubectl, KubeApiServer},
    testbed::{Agent, Gateway},
};
use serde_json::Value;
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

const LIMIT: Duration = Duration::from_secs(60);

/// The kubectls to try: the newest on PATH, and the SPDY one when present.
fn kubectls() -> Vec<(&'static str, PathBuf)> {
    let mut v = vec![("websocket", PathBuf::from("kubectl"))];
    match spdy_kubectl() {
        Some(p) => v.push(("spdy", p)),
        None => eprintln!(
            "note: no kubectl 1.20 (run scripts/test, or set POSTERN_KUBECTL_SPDY): SPDY variants skipped"
        ),
    }
    v
}

/// `kubectl port-forward pod/POD :PORT`, running until dropped.
struct PortForward {
    child: Child,
    local: u16,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl PortForward {
    fn start(bin: &Path, cfg: &Path, pod: &str, port: u16) -> Result<PortForward> {
        let mut child = Command::new(bin)
            .args(["port-forward", &format!("pod/{pod}"), &format!(":{port}")])
            .env("KUBECONFIG", cfg)
            .env("HOME", cfg.parent().unwrap_or(Path::new("/tmp")))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl port-forward")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end even after the address is known: kubectl prints a line per
            // connection, and a closed pipe would kill it (SIGPIPE).
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(e) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(e).lines().map_while(Result::ok) {
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&line);
                        s.push('\n');
                    }
                }
            });
        }
        let mut pf = PortForward {
            child,
            local: 0,
            stderr,
        };
        // "Forwarding from 127.0.0.1:NNNNN -> PORT"
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("kubectl port-forward printed no address; {}", pf.stderr()))?;
        pf.local = line
            .strip_prefix("Forwarding from 127.0.0.1:")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("unexpected port-forward output: {line}"))?;
        Ok(pf)
    }

    fn stderr(&self) -> String {
        let text = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        format!("kubectl port-forward stderr: {text}")
    }

    /// Sends `msg` over a new local connection and reads what the pod echoes.
    fn round_trip(&self, msg: &[u8]) -> Result<Vec<u8>> {
        let go = || -> Result<Vec<u8>> {
            let mut c = TcpStream::connect(("127.0.0.1", self.local))?;
            c.set_read_timeout(Some(Duration::from_secs(20)))?;
            c.write_all(msg)?;
            let mut got = vec![0u8; msg.len()];
            c.read_exact(&mut got)?;
            Ok(got)
        };
        go().map_err(|e| {
            // kubectl logs the far side's answer a moment after the connection fails.
            std::thread::sleep(Duration::from_millis(500));
            anyhow!("{e}; {}", self.stderr())
        })
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// exec (with and without stdin, a failing command), port-forward and a get with one kubectl.
fn exercise(bin: &Path, cfg: &Path, api: &KubeApiServer, what: &str) -> Result<()> {
    let (ok, out, err) = kubectl_bin(bin, cfg, &["get", "pods"], None, LIMIT)?;
    assert!(ok && out.contains("web-1"), "{what}: {out} {err}");
    let (ok, out, err) = kubectl_bin(
        bin,
        cfg,
        &["exec", "web-1", "--", "echo", "over", what],
        None,
        LIMIT,
    )?;
    assert!(ok, "{what}: {err}");
    assert_eq!(out, format!("over {what}\n"));
    let (ok, out, err) = kubectl_bin(
        bin,
        cfg,
        &["exec", "-i", "web-1", "--", "cat"],
        Some(b"from stdin\n"),
        LIMIT,
    )?;
    assert!(ok, "{what}: {err}");
    assert_eq!(out, "from stdin\n", "{what}");
    let (ok, _, err) = kubectl_bin(
        bin,
        cfg,
        &["exec", "web-1", "--", "sh", "-c", "exit 3"],
        None,
        LIMIT,
    )?;
    assert!(!ok && err.contains("exit code 3"), "{what}: {err}");

    let before = api.port_forwards().len();
    let pf = PortForward::start(bin, cfg, "web-1", 8080).context(what.to_string())?;
    let msg = format!("hello over {what}\n");
    let got = pf.round_trip(msg.as_bytes()).context(what.to_string())?;
    assert_eq!(got, msg.as_bytes(), "{what}");
    // A second connection through the same forward is a second pair of streams.
    let got = pf.round_trip(b"again").context(format!("{what}, again"))?;
    assert_eq!(got, b"again", "{what}");
    drop(pf);
    assert_eq!(
        api.port_forwards().get(before..),
        Some(&[8080u16, 8080][..]),
        "{what}"
    );
    Ok(())
}

#[test]
fn every_kubectl_speaks_with_the_test_apiserver() -> Result<()> {
    let api = KubeApiServer::start()?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("direct.yaml");
    std::fs::write(&cfg, api.kubeconfig("my-app-prod"))?;
    for (what, bin) in kubectls() {
        api.clear_requests();
        exercise(&bin, &cfg, &api, what)?;
        let reqs = api.requests();
        let upgrades: Vec<_> = reqs
            .iter()
            .filter(|r| r.path().ends_with("/exec") || r.path().ends_with("/portforward"))
            .collect();
        assert!(upgrades.len() >= 4, "{what}: {reqs:?}");
        for r in upgrades {
            let upgrade = r.header("upgrade").unwrap_or_default().to_ascii_lowercase();
            let want = if what == "spdy" { "spdy/3.1" } else { "websocket" };
            assert_eq!(upgrade, want, "{what}: {r:?}");
        }
    }
    Ok(())
}

// ---- through Postern ----------------------------------------------------------------------

const APP: &str = "my-app";
const CLUSTER: &str = "aws_eks_cluster.main_cluster";

fn agent_toml(upstream: &Path) -> String {
    let u = upstream.display();
    format!(
        "[policy]\napproval = \"automatic\"\n\n\
         [[resource]]\nid = \"{CLUSTER}\"\nkind = \"kubernetes\"\nkubeconfig = \"{u}\"\nnamespaces = [\"my-app-prod\"]\n\
         resources = [\"pods\", \"pods/exec\", \"pods/portforward\"]\n\
         verbs = [\"get\", \"list\", \"watch\", \"create\"]\n\
         impersonate = {{ user = \"postern:my-app\", groups = [\"postern-ops\"] }}\n"
    )
}

/// A gateway, an agent whose cluster is reached with `upstream` (a kubeconfig), an active
/// grant, and a kubectl endpoint's kubeconfig.
struct Through {
    gw: Gateway,
    _agent: Agent,
    home: PathBuf,
    cfg: PathBuf,
}

fn through(dir: &Path, upstream: &Path) -> Result<Through> {
    let gw = Gateway::start(&dir.join("gw"))?;
    let agent = Agent::online(
        &gw,
        &dir.join("agent"),
        APP,
        "acme-corp",
        &agent_toml(upstream),
    )?;
    let grant = gw.request_operate(APP, "acme-corp", "1h")?;
    assert_eq!(grant["state"], "active", "{grant}");
    let home = dir.join("home");
    std::fs::create_dir_all(&home)?;
    let out = gw.cli_home(
        &home,
        &[
            "ops",
            "endpoint",
            "create",
            "--type",
            "kubectl",
            "--app",
            APP,
            "--customer",
            "acme-corp",
            "--origin-resource-id",
            CLUSTER,
            "--ttl",
            "10m",
        ],
    )?;
    let ep = out.json;
    assert!(out.success, "{ep}");
    let cfg = PathBuf::from(
        ep["kubeconfig"]
            .as_str()
            .ok_or_else(|| anyhow!("no kubeconfig in {ep}"))?,
    );
    Ok(Through {
        gw,
        _agent: agent,
        home,
        cfg,
    })
}

fn audit(t: &Through) -> Result<Vec<Value>> {
    let out = t.gw.cli_home(&t.home, &["audit", "list"])?;
    if !out.success {
        bail!("audit list: {}", out.json);
    }
    Ok(out.json["records"].as_array().cloned().unwrap_or_default())
}

#[test]
fn every_kubectl_through_an_endpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = KubeApiServer::start()?;
    let upstream = dir.path().join("upstream.kubeconfig");
    std::fs::write(&upstream, api.kubeconfig("default"))?;
    let t = through(dir.path(), &upstream)?;
    for (what, bin) in kubectls() {
        api.clear_requests();
        exercise(&bin, &t.cfg, &api, what)?;
        // The upgrade reached the cluster as the client asked for it, under the appliance's
        // identity and the configured impersonation.
        let reqs = api.requests();
        let want = if what == "spdy" { "spdy/3.1" } else { "websocket" };
        let upgrades: Vec<_> = reqs
            .iter()
            .filter(|r| r.path().ends_with("/exec") || r.path().ends_with("/portforward"))
            .collect();
        assert!(upgrades.len() >= 4, "{what}: {reqs:?}");
        for r in upgrades {
            assert_eq!(
                r.header("upgrade").map(str::to_ascii_lowercase).as_deref(),
                Some(want),
                "{r:?}"
            );
            assert_eq!(
                r.header("impersonate-user"),
                Some("postern:my-app"),
                "{r:?}"
            );
        }
    }
    // Policy still applies to an SPDY upgrade: the command is audited from the URL, and a
    // pod outside the scope's namespace is refused before the cluster sees it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = audit(&t)?;
        let execs: Vec<_> = records
            .iter()
            .filter(|r| r["kind"] == "kube.request" && r["detail"]["subresource"] == "exec")
            .collect();
        let commands: Vec<String> = execs
            .iter()
            .map(|r| r["detail"]["command"].to_string())
            .collect();
        let spdy_seen = spdy_kubectl().is_none() || commands.iter().any(|c| c.contains("spdy"));
        if spdy_seen && records.iter().any(|r| r["detail"]["subresource"] == "portforward") {
            break;
        }
        if Instant::now() > deadline {
            bail!("exec/port-forward not audited: {commands:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Some(bin) = spdy_kubectl() {
        api.clear_requests();
        let (ok, _, err) = kubectl_bin(
            &bin,
            &t.cfg,
            &["exec", "-n", "kube-system", "coredns-1", "--", "echo", "no"],
            None,
            LIMIT,
        )?;
        assert!(!ok && err.contains("Forbidden"), "{err}");
        assert!(
            api.requests().iter().all(|r| !r.path().ends_with("/exec")),
            "{:?}",
            api.requests()
        );
    }
    Ok(())
}

#[test]
#[ignore]
fn debug_server() -> Result<()> {
    let api = KubeApiServer::start()?;
    std::fs::write("/tmp/kube17/direct.yaml", api.kubeconfig("my-app-prod"))?;
    std::thread::sleep(Duration::from_secs(120));
    Ok(())
}
