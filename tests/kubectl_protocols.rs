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

/// One kubectl to try, and what it upgrades to: exec speaks WebSocket from 1.30, port-forward
/// (SPDY tunnelled in WebSocket) from 1.31; before that both speak SPDY/3.1.
struct Kubectl {
    /// "spdy" or "websocket" (after its exec protocol); also in the exec'd command, so the
    /// audit check can tell them apart.
    what: &'static str,
    bin: PathBuf,
    pf_ws: bool,
    minor: u32,
}

impl Kubectl {
    fn new(bin: PathBuf) -> Result<Kubectl> {
        let out = Command::new(&bin)
            .args(["version", "--client", "-o", "json"])
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{} version", bin.display()))?;
        let minor: u32 = v["clientVersion"]["minor"]
            .as_str()
            .map(|m| m.trim_end_matches('+'))
            .and_then(|m| m.parse().ok())
            .ok_or_else(|| anyhow!("no client minor version in {v}"))?;
        Ok(Kubectl {
            what: if minor >= 30 { "websocket" } else { "spdy" },
            bin,
            pf_ws: minor >= 31,
            minor,
        })
    }

    /// The `Upgrade` an exec or port-forward request from this kubectl carries.
    fn upgrade_for(&self, path: &str) -> &'static str {
        let ws = if path.ends_with("/portforward") {
            self.pf_ws
        } else {
            self.what == "websocket"
        };
        if ws {
            "websocket"
        } else {
            "spdy/3.1"
        }
    }
}

/// The kubectls to try: the one on PATH, and the SPDY one when present (once, if the one on
/// PATH is Debian's 1.20 itself, as on a fresh machine).
fn kubectls() -> Result<Vec<Kubectl>> {
    let mut v = vec![Kubectl::new(PathBuf::from("kubectl"))?];
    match spdy_kubectl() {
        Some(p) => {
            let k = Kubectl::new(p)?;
            if v.iter().all(|o| o.what != k.what) {
                v.push(k);
            }
        }
        None => eprintln!(
            "note: no kubectl 1.20 (run scripts/test, or set POSTERN_KUBECTL_SPDY): SPDY variants skipped"
        ),
    }
    Ok(v)
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
    for k in kubectls()? {
        let what = k.what;
        api.clear_requests();
        exercise(&k.bin, &cfg, &api, what)?;
        let reqs = api.requests();
        let upgrades: Vec<_> = reqs
            .iter()
            .filter(|r| r.path().ends_with("/exec") || r.path().ends_with("/portforward"))
            .collect();
        assert!(upgrades.len() >= 4, "{what}: {reqs:?}");
        for r in upgrades {
            let upgrade = r.header("upgrade").unwrap_or_default().to_ascii_lowercase();
            assert_eq!(upgrade, k.upgrade_for(r.path()), "{what}: {r:?}");
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
    let out = gw.create_endpoint(&home, "kubectl", APP, "acme-corp", CLUSTER, "10m")?;
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
    for k in kubectls()? {
        let what = k.what;
        api.clear_requests();
        exercise(&k.bin, &t.cfg, &api, what)?;
        // The upgrade reached the cluster as the client asked for it, under the appliance's
        // identity and the configured impersonation.
        let reqs = api.requests();
        let upgrades: Vec<_> = reqs
            .iter()
            .filter(|r| r.path().ends_with("/exec") || r.path().ends_with("/portforward"))
            .collect();
        assert!(upgrades.len() >= 4, "{what}: {reqs:?}");
        for r in upgrades {
            assert_eq!(
                r.header("upgrade").map(str::to_ascii_lowercase).as_deref(),
                Some(k.upgrade_for(r.path())),
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
        if spdy_seen
            && records
                .iter()
                .any(|r| r["detail"]["subresource"] == "portforward")
        {
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

// ---- exec credential plugins --------------------------------------------------------------

/// A client-go exec credential plugin: logs each run (time, then the expiry it issued) to
/// `$1/runs`, keeps the last `KUBERNETES_EXEC_INFO` in `$1/exec-info`, and prints the token
/// it was configured with, valid for `PLUGIN_TTL` seconds; fails while `$1/fail` exists.
const PLUGIN: &str = r#"#!/bin/sh
set -eu
if [ -e "$1/fail" ]; then echo "login required: run the cloud's login" >&2; exit 1; fi
now=$(date +%s)
exp=$((now + PLUGIN_TTL))
printf '%s' "$KUBERNETES_EXEC_INFO" > "$1/exec-info"
echo "$now $exp" >> "$1/runs"
printf '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"%s","expirationTimestamp":"%s"}}\n' \
  "$PLUGIN_TOKEN" "$(date -u -d "@$exp" +%Y-%m-%dT%H:%M:%SZ)"
"#;
const PLUGIN_TTL: u64 = 6;

/// (run time, expiry issued) per plugin run, in Unix seconds.
fn plugin_runs(dir: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(dir.join("runs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_once(' ')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}

/// No run came before the previous credential was due for refresh (a tenth of its life
/// early at most, rounded to the plugin's whole seconds).
fn assert_cached(runs: &[(u64, u64)]) {
    for w in runs.windows(2) {
        let ((_, exp), (next, _)) = (w[0], w[1]);
        assert!(
            next + 1 + PLUGIN_TTL / 10 >= exp,
            "the plugin ran again before its token was due: {runs:?}"
        );
    }
}

#[test]
fn an_exec_plugin_user_through_an_endpoint() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let api = KubeApiServer::start()?;
    let plugin_dir = dir.path().join("plugin");
    std::fs::create_dir_all(&plugin_dir)?;
    let script = dir.path().join("token-plugin.sh");
    std::fs::write(&script, PLUGIN)?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    // The appliance's kubeconfig names no token: only the plugin's gets in. The command is
    // relative to the kubeconfig, as client-go resolves it.
    let token_line = format!("    token: {}\n", api.token);
    let kubeconfig = api.kubeconfig("default");
    assert!(kubeconfig.contains(&token_line));
    let exec = format!(
        "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: ./token-plugin.sh\n      args: [\"{}\"]\n      env:\n      - name: PLUGIN_TOKEN\n        value: {}\n      - name: PLUGIN_TTL\n        value: \"{PLUGIN_TTL}\"\n      interactiveMode: Never\n      provideClusterInfo: true\n",
        plugin_dir.display(),
        api.token
    );
    let upstream = dir.path().join("upstream.kubeconfig");
    std::fs::write(&upstream, kubeconfig.replace(&token_line, &exec))?;

    // The plugin speaks the protocol as client-go expects it: stock kubectl accepts it
    // (ExecCredential v1 needs kubectl 1.22 or later).
    if Kubectl::new(PathBuf::from("kubectl"))?.minor >= 22 {
        let (ok, out, err) = kubectl_bin(
            Path::new("kubectl"),
            &upstream,
            &["get", "pods", "-n", "my-app-prod"],
            None,
            LIMIT,
        )?;
        assert!(
            ok && out.contains("web-1"),
            "direct with the plugin: {out} {err}"
        );
        std::fs::remove_file(plugin_dir.join("runs"))?;
    }

    let t = through(dir.path(), &upstream)?;
    api.clear_requests();
    let mut requests = 0;
    for _ in 0..3 {
        let (ok, out, err) =
            kubectl_bin(Path::new("kubectl"), &t.cfg, &["get", "pods"], None, LIMIT)?;
        assert!(ok && out.contains("web-1"), "{out} {err}");
    }
    let (ok, out, err) = kubectl_bin(
        Path::new("kubectl"),
        &t.cfg,
        &["exec", "web-1", "--", "echo", "with", "a", "plugin"],
        None,
        LIMIT,
    )?;
    assert!(ok && out == "with a plugin\n", "{out} {err}");
    let reqs = api.requests();
    requests += reqs.len();
    for r in &reqs {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {}", api.token).as_str()),
            "{r:?}"
        );
    }
    let runs = plugin_runs(&plugin_dir);
    assert!(!runs.is_empty(), "the plugin never ran");
    assert!(
        runs.len() < requests,
        "{} runs for {requests} requests: not cached",
        runs.len()
    );
    assert_cached(&runs);
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(plugin_dir.join("exec-info"))?)?;
    assert_eq!(info["kind"], "ExecCredential", "{info}");
    assert_eq!(
        info["apiVersion"], "client.authentication.k8s.io/v1",
        "{info}"
    );
    assert_eq!(info["spec"]["interactive"], false, "{info}");
    assert_eq!(info["spec"]["cluster"]["server"], api.url(), "{info}");

    // Past the token's expiry the next request runs the plugin again.
    let last_exp = runs.last().map(|r| r.1).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(PLUGIN_TTL + 10);
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        <= last_exp
    {
        if Instant::now() > deadline {
            bail!("the clock did not pass {last_exp}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = plugin_runs(&plugin_dir).len();
    let (ok, out, err) = kubectl_bin(Path::new("kubectl"), &t.cfg, &["get", "pods"], None, LIMIT)?;
    assert!(ok && out.contains("web-1"), "{out} {err}");
    let runs = plugin_runs(&plugin_dir);
    assert!(
        runs.len() > before,
        "the plugin did not run after expiry: {runs:?}"
    );
    assert_cached(&runs);

    // A plugin that fails (a login it cannot do without a terminal) is a clear error on the
    // request, quoting the plugin, once the cached token has lapsed.
    std::fs::write(plugin_dir.join("fail"), "")?;
    let last_exp = runs.last().map(|r| r.1).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(PLUGIN_TTL + 10);
    loop {
        let (ok, out, err) =
            kubectl_bin(Path::new("kubectl"), &t.cfg, &["get", "pods"], None, LIMIT)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        if !ok {
            assert!(
                err.contains("login required") && err.contains("token-plugin.sh"),
                "{err}"
            );
            // Never before the cached token was due.
            assert!(now + 1 + PLUGIN_TTL / 10 >= last_exp, "{now} {last_exp}");
            break;
        }
        assert!(out.contains("web-1"), "{out}");
        if Instant::now() > deadline {
            bail!("a failing plugin went unnoticed past the token's expiry");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// A credential the API server refuses (401) is dropped at once: the next request runs the
/// plugin again rather than keep a token that would have been cached for an hour.
#[test]
fn a_refused_exec_credential_is_fetched_again() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let api = KubeApiServer::start()?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "not-the-token")?;
    let script = dir.path().join("file-token-plugin.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nset -eu\nexp=$(date -u -d @$(( $(date +%s) + 3600 )) +%Y-%m-%dT%H:%M:%SZ)\n\
         printf '{\"apiVersion\":\"client.authentication.k8s.io/v1beta1\",\"kind\":\"ExecCredential\",\"status\":{\"token\":\"%s\",\"expirationTimestamp\":\"%s\"}}' \"$(cat \"$1\")\" \"$exp\"\n",
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let token_line = format!("    token: {}\n", api.token);
    let exec = format!(
        "    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: {}\n      args: [\"{}\"]\n      interactiveMode: IfAvailable\n",
        script.display(),
        token_file.display()
    );
    let upstream = dir.path().join("upstream.kubeconfig");
    std::fs::write(
        &upstream,
        api.kubeconfig("default").replace(&token_line, &exec),
    )?;
    let t = through(dir.path(), &upstream)?;
    let kubectl = Path::new("kubectl");
    let (ok, out, err) = kubectl_bin(kubectl, &t.cfg, &["get", "pods"], None, LIMIT)?;
    assert!(!ok, "a wrong token got through: {out}");
    assert!(
        err.contains("Unauthorized") || err.contains("logged in"),
        "{err}"
    );
    std::fs::write(&token_file, &api.token)?;
    let (ok, out, err) = kubectl_bin(kubectl, &t.cfg, &["get", "pods"], None, LIMIT)?;
    assert!(ok && out.contains("web-1"), "{out} {err}");
    Ok(())
}
