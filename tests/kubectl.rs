//! kubectl ops endpoints end to end: the real `kubectl` against the test API server, first
//! directly (so the test server speaks what kubectl expects), then through Postern.

use anyhow::Result;
use postern::kube_apiserver::{kubectl, KubeApiServer};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn direct_kubectl_speaks_with_the_test_apiserver() -> Result<()> {
    let api = KubeApiServer::start()?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("direct.yaml");
    std::fs::write(&cfg, api.kubeconfig("my-app-prod"))?;

    let (ok, out, err) = kubectl(&cfg, &["get", "pods"], None, LIMIT)?;
    assert!(ok, "{err}");
    assert!(
        out.contains("NAME") && out.contains("web-1") && out.contains("Running"),
        "{out}"
    );
    assert!(!out.contains("coredns"), "{out}");

    let (ok, out, err) = kubectl(&cfg, &["describe", "pod", "web-1"], None, LIMIT)?;
    assert!(ok, "{err}");
    assert!(out.contains("nginx:1.27"), "{out}");

    let (ok, out, err) = kubectl(&cfg, &["logs", "web-1"], None, LIMIT)?;
    assert!(ok, "{err}");
    assert!(out.contains("log line 1 of web-1"), "{out}");

    let (ok, out, err) = kubectl(
        &cfg,
        &["exec", "web-1", "--", "echo", "hello", "there"],
        None,
        LIMIT,
    )?;
    assert!(ok, "{err}");
    assert_eq!(out, "hello there\n");

    let (ok, out, err) = kubectl(
        &cfg,
        &["exec", "-i", "web-1", "--", "cat"],
        Some(b"from stdin\n"),
        LIMIT,
    )?;
    assert!(ok, "{err}");
    assert_eq!(out, "from stdin\n");

    let (ok, _, err) = kubectl(
        &cfg,
        &["exec", "web-1", "--", "sh", "-c", "exit 3"],
        None,
        LIMIT,
    )?;
    assert!(!ok);
    assert!(err.contains("exit code 3"), "{err}");

    let (ok, out, err) = kubectl(&cfg, &["get", "deployments"], None, LIMIT)?;
    assert!(ok, "{err}");
    assert!(out.contains("web"), "{out}");

    let (ok, out, err) = kubectl(&cfg, &["delete", "pod", "web-2"], None, LIMIT)?;
    assert!(ok, "{err}");
    assert!(out.contains("deleted"), "{out}");
    assert!(!api.has_object("pods", "my-app-prod", "web-2"));
    // kubectl's typed create sends protobuf, which this server does not speak; a manifest
    // goes as JSON.
    let manifest = dir.path().join("cm.json");
    std::fs::write(
        &manifest,
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"made-here"},"data":{"mode":"debug"}}"#,
    )?;
    let manifest = manifest.display().to_string();
    let (ok, out, err) = kubectl(
        &cfg,
        &["create", "--validate=false", "-f", &manifest],
        None,
        LIMIT,
    )?;
    assert!(ok, "{out} {err} {:?}", api.requests().last());
    assert!(api.has_object("configmaps", "my-app-prod", "made-here"));

    let mut watch = Streaming::start(&cfg, &["get", "pods", "-w"], false)?;
    watch.expect("web-1")?;
    api.add_pod("my-app-prod", "web-9");
    watch.expect("web-9")?;

    let reqs = api.requests();
    assert!(reqs.iter().all(|r| r.header("authorization").is_some()));
    assert!(reqs
        .iter()
        .any(|r| r.path() == "/api/v1/namespaces/my-app-prod/pods/web-1/exec"));
    // Stock kubectl takes the h2 the server offers, and HTTP/1.1 for its exec upgrades.
    assert!(
        reqs.iter()
            .filter(|r| !r.path().ends_with("/exec"))
            .all(|r| r.version == "HTTP/2.0"),
        "{reqs:?}"
    );
    assert!(
        reqs.iter()
            .filter(|r| r.path().ends_with("/exec"))
            .all(|r| r.version == "HTTP/1.1"),
        "{reqs:?}"
    );
    Ok(())
}

// ---- through Postern ----------------------------------------------------------------------

use anyhow::{anyhow, bail};
use postern::{
    teardown_check,
    testbed::{wait_until, Agent, Gateway},
};
use serde_json::Value;
use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Instant,
};

const APP: &str = "my-app";
const CLUSTER: &str = "aws_eks_cluster.main_cluster";
const READONLY: &str = "aws_eks_cluster.readonly";
/// Grants writes and exec in `verbs` but names no identity to impersonate.
const NO_IDENTITY: &str = "aws_eks_cluster.no_identity";

struct Setup {
    api: KubeApiServer,
    gw: Gateway,
    agent: Agent,
    home: PathBuf,
    _dir: tempfile::TempDir,
}

fn agent_toml(upstream: &Path) -> String {
    let u = upstream.display();
    format!(
        "[policy]\napproval = \"automatic\"\n\n\
         [[resource]]\nid = \"{CLUSTER}\"\nkind = \"kubernetes\"\nkubeconfig = \"{u}\"\nnamespaces = [\"my-app-prod\"]\n\
         resources = [\"pods\", \"pods/log\", \"pods/exec\", \"deployments\", \"replicasets\", \"services\", \"configmaps\", \"events\", \
         \"statefulsets\", \"jobs.batch\", \"certificates.cert-manager.io\", \"issuers\", \"rolebindings.rbac.authorization.k8s.io\"]\n\
         verbs = [\"get\", \"list\", \"watch\", \"create\", \"delete\"]\n\
         impersonate = {{ user = \"postern:my-app\", groups = [\"postern-ops\"] }}\n\n\
         [[resource]]\nid = \"{READONLY}\"\nkind = \"kubernetes\"\nkubeconfig = \"{u}\"\nnamespaces = [\"my-app-prod\"]\n\n\
         [[resource]]\nid = \"{NO_IDENTITY}\"\nkind = \"kubernetes\"\nkubeconfig = \"{u}\"\nnamespaces = [\"my-app-prod\"]\n\
         resources = [\"pods\", \"pods/exec\", \"pods/log\", \"configmaps\"]\nverbs = [\"get\", \"list\", \"watch\", \"create\", \"delete\"]\n"
    )
}

fn setup() -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let api = KubeApiServer::start()?;
    let upstream = dir.path().join("upstream.kubeconfig");
    std::fs::write(&upstream, api.kubeconfig("default"))?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    let agent = Agent::online(
        &gw,
        &dir.path().join("agent"),
        APP,
        "acme-corp",
        &agent_toml(&upstream),
    )?;
    let grant = gw.request_operate(APP, "acme-corp", "1h")?;
    assert_eq!(grant["state"], "active", "{grant}");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home)?;
    Ok(Setup {
        api,
        gw,
        agent,
        home,
        _dir: dir,
    })
}

/// `postern --output json ARGS` as the admin, with the operator's HOME (where the CLI keeps
/// the endpoint's key and writes the kubeconfig).
fn cli(s: &Setup, args: &[&str]) -> Result<(bool, Value)> {
    let out = s.gw.cli_home(&s.home, args)?;
    Ok((out.success, out.json))
}

fn create_endpoint(s: &Setup, resource: &str) -> Result<(String, PathBuf)> {
    let out =
        s.gw.create_endpoint(&s.home, "kubectl", APP, "acme-corp", resource, "10m")?;
    let (ok, ep) = (out.success, out.json);
    assert!(ok, "{ep}");
    assert_eq!(ep["state"], "active", "{ep}");
    let id = ep["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no id in {ep}"))?
        .to_string();
    let path = PathBuf::from(
        ep["kubeconfig"]
            .as_str()
            .ok_or_else(|| anyhow!("no kubeconfig in {ep}"))?,
    );
    Ok((id, path))
}

fn forbidden(cfg: &Path, args: &[&str], expect: &str) -> Result<()> {
    let (ok, out, err) = kubectl(cfg, args, None, LIMIT)?;
    assert!(!ok, "kubectl {args:?} should be refused; stdout {out}");
    assert!(
        err.contains("Forbidden") && err.contains(expect),
        "kubectl {args:?}: {err}"
    );
    Ok(())
}

fn audit(s: &Setup) -> Result<Vec<Value>> {
    let (ok, v) = cli(s, &["audit", "list"])?;
    assert!(ok, "{v}");
    Ok(v["records"].as_array().cloned().unwrap_or_default())
}

#[test]
fn kubectl_through_an_endpoint_within_its_scope_only() -> Result<()> {
    let s = setup()?;
    let (id, cfg) = create_endpoint(&s, CLUSTER)?;

    // The kubeconfig: named for the resource and endpoint, private, self-contained.
    let name = cfg
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        name,
        format!("kubectl-ops-main-cluster-{id}.localhost.yaml")
    );
    assert_eq!(cfg.parent(), Some(s.home.join(".kube").as_path()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&cfg)?.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&cfg)?;
    assert!(
        text.contains("client-certificate-data")
            && text.contains("client-key-data")
            && !text.contains("exec"),
        "{text}"
    );
    assert!(text.contains("namespace: \"my-app-prod\""), "{text}");
    s.api.clear_requests();

    let (ok, out, err) = kubectl(&cfg, &["get", "pods"], None, LIMIT)?;
    assert!(ok, "{err}");
    assert!(
        out.contains("web-1") && out.contains("Running") && !out.contains("coredns"),
        "{out}"
    );
    let (ok, out, err) = kubectl(
        &cfg,
        &["get", "pods", "-n", "my-app-prod", "-o", "json"],
        None,
        LIMIT,
    )?;
    assert!(ok, "{err}");
    assert!(out.contains("\"kind\": \"Pod\""), "{out}");
    let (ok, out, err) = kubectl(&cfg, &["describe", "pod", "web-1"], None, LIMIT)?;
    assert!(ok, "{err}");
    assert!(out.contains("nginx:1.27"), "{out}");
    let (ok, out, err) = kubectl(&cfg, &["logs", "web-1"], None, LIMIT)?;
    assert!(ok, "{err}");
    assert!(out.contains("log line 3 of web-1"), "{out}");
    let (ok, out, err) = kubectl(
        &cfg,
        &["exec", "web-1", "--", "echo", "through", "postern"],
        None,
        LIMIT,
    )?;
    assert!(ok, "{err}");
    assert_eq!(out, "through postern\n");
    let (ok, out, err) = kubectl(
        &cfg,
        &["exec", "-i", "web-1", "--", "sh"],
        Some(b"echo one\necho two\nexit 0\n"),
        LIMIT,
    )?;
    assert!(ok, "{err}");
    assert_eq!(out, "one\ntwo\n");
    let (ok, _, err) = kubectl(
        &cfg,
        &["exec", "web-1", "--", "sh", "-c", "exit 3"],
        None,
        LIMIT,
    )?;
    assert!(!ok && err.contains("exit code 3"), "{err}");
    let (ok, out, err) = kubectl(&cfg, &["get", "deployments"], None, LIMIT)?;
    assert!(ok && out.contains("web"), "{out} {err}");
    let manifest = s.home.join("cm.json");
    std::fs::write(
        &manifest,
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"made-here"},"data":{"mode":"debug"}}"#,
    )?;
    let manifest = manifest.display().to_string();
    let (ok, out, err) = kubectl(
        &cfg,
        &["create", "--validate=false", "-f", &manifest],
        None,
        LIMIT,
    )?;
    assert!(ok, "{out} {err}");
    assert!(s.api.has_object("configmaps", "my-app-prod", "made-here"));
    let (ok, out, err) = kubectl(
        &cfg,
        &[
            "get",
            "configmap",
            "made-here",
            "-o",
            "jsonpath={.data.mode}",
        ],
        None,
        LIMIT,
    )?;
    assert!(ok && out == "debug", "{out} {err}");
    let local = s.home.join("notes.txt");
    std::fs::write(&local, "copied through postern\n")?;
    let local_arg = local.display().to_string();
    let (ok, out, err) = kubectl(
        &cfg,
        &["cp", &local_arg, "web-1:/tmp/notes.txt"],
        None,
        LIMIT,
    )?;
    assert!(ok, "{out} {err}");
    let needle = b"copied through postern";
    assert!(
        s.api
            .uploads()
            .iter()
            .any(|u| u.windows(needle.len()).any(|w| w == needle)),
        "kubectl cp did not carry the file"
    );
    let (ok, out, err) = kubectl(&cfg, &["delete", "pod", "web-2"], None, LIMIT)?;
    assert!(ok && out.contains("deleted"), "{out} {err}");
    assert!(!s.api.has_object("pods", "my-app-prod", "web-2"));

    // Client identity never crosses: the appliance authenticates with its own token and
    // impersonates the configured user.
    let (ok, out, err) = kubectl(
        &cfg,
        &[
            "--as",
            "evil",
            "--as-group",
            "system:masters",
            "get",
            "pods",
        ],
        None,
        LIMIT,
    )?;
    assert!(ok, "{out} {err}");
    let reqs = s.api.requests();
    assert!(!reqs.is_empty());
    for r in &reqs {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {}", s.api.token).as_str()),
            "{r:?}"
        );
        assert_eq!(
            r.header("impersonate-user"),
            Some("postern:my-app"),
            "{r:?}"
        );
        assert_eq!(r.header("impersonate-group"), Some("postern-ops"), "{r:?}");
        assert!(
            !r.headers
                .iter()
                .any(|(_, v)| v.contains("evil") || v.contains("system:masters")),
            "{r:?}"
        );
    }

    // The agent multiplexes ordinary requests over one HTTP/2 connection (the server offers
    // h2 by ALPN) and takes each upgrade (exec, cp) over its own HTTP/1.1 connection.
    let (upgrades, plain): (Vec<_>, Vec<_>) =
        reqs.iter().partition(|r| r.path().ends_with("/exec"));
    assert!(upgrades.len() >= 4 && plain.len() >= 10, "{reqs:?}");
    assert!(plain.iter().all(|r| r.version == "HTTP/2.0"), "{plain:?}");
    let h2_conns: std::collections::BTreeSet<u64> = plain.iter().map(|r| r.conn).collect();
    assert_eq!(h2_conns.len(), 1, "{plain:?}");
    assert!(
        upgrades
            .iter()
            .all(|r| r.version == "HTTP/1.1" && !h2_conns.contains(&r.conn)),
        "{upgrades:?}"
    );
    let up_conns: std::collections::BTreeSet<u64> = upgrades.iter().map(|r| r.conn).collect();
    assert_eq!(up_conns.len(), upgrades.len(), "{upgrades:?}");

    // Out of scope: refused with a Status kubectl prints, and never reaching the cluster.
    s.api.clear_requests();
    forbidden(
        &cfg,
        &["get", "pods", "-n", "kube-system"],
        "namespace \"kube-system\" is outside",
    )?;
    forbidden(&cfg, &["get", "pods", "--all-namespaces"], "whole cluster")?;
    forbidden(&cfg, &["get", "nodes"], "whole cluster")?;
    forbidden(&cfg, &["get", "secrets"], "secrets is not among")?;
    forbidden(&cfg, &["get", "namespaces"], "whole cluster")?;
    forbidden(
        &cfg,
        &["scale", "deployment", "web", "--replicas", "5"],
        "deployments.apps/scale is not among",
    )?;
    for r in s.api.requests() {
        let p = r.path();
        assert!(
            !(p.contains("kube-system")
                || p == "/api/v1/pods"
                || p.contains("nodes")
                || p.contains("secrets")
                || p == "/api/v1/namespaces"
                || p.ends_with("/scale")),
            "out-of-scope request reached the cluster: {} {}",
            r.method,
            r.uri
        );
    }

    // A read-only resource: exec and delete are refused before the cluster sees them.
    let (ro_id, ro) = create_endpoint(&s, READONLY)?;
    assert_ne!(ro_id, id);
    let (ok, out, err) = kubectl(&ro, &["get", "pods"], None, LIMIT)?;
    assert!(ok && out.contains("web-1"), "{err}");
    s.api.clear_requests();
    forbidden(&ro, &["exec", "web-1", "--", "echo", "no"], "pods/exec")?;
    forbidden(&ro, &["delete", "pod", "web-1"], "\"delete\"")?;
    assert!(
        s.api
            .requests()
            .iter()
            .all(|r| !r.path().ends_with("/exec") && r.method != "DELETE"),
        "{:?}",
        s.api.requests()
    );
    assert!(s.api.has_object("pods", "my-app-prod", "web-1"));

    // Both trails hold each request: verb, resource, namespace, code, endpoint, session, operator.
    let mut records = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        records = audit(&s).unwrap_or_default();
        records.iter().any(|r| {
            r["kind"] == "kube.request"
                && r["detail"]["code"] == 403
                && r["detail"]["namespace"] == "kube-system"
        })
    }));
    let ok_list = records
        .iter()
        .find(|r| {
            r["kind"] == "kube.request"
                && r["detail"]["verb"] == "list"
                && r["detail"]["resource"] == "pods"
                && r["detail"]["code"] == 200
        })
        .ok_or_else(|| anyhow!("no kube.request for list pods"))?;
    assert_eq!(ok_list["detail"]["namespace"], "my-app-prod");
    assert_eq!(ok_list["detail"]["endpoint"], id.as_str());
    assert!(ok_list["detail"]["session"]
        .as_str()
        .is_some_and(|s| s.starts_with("ses_")));
    assert!(ok_list["detail"]["operator"]
        .as_str()
        .is_some_and(|o| !o.is_empty()));
    assert!(records.iter().any(|r| r["kind"] == "kube.request"
        && r["detail"]["subresource"] == "exec"
        && r["detail"]["code"] == 101));
    assert!(records
        .iter()
        .any(|r| r["kind"] == "denied" && r["detail"]["action"] == "kube.request"));
    assert!(wait_until(Duration::from_secs(10), || s
        .agent
        .trail()
        .is_ok_and(|t| t.iter().any(|r| r["kind"] == "kube.request"
            && r["detail"]["verb"] == "delete"
            && r["detail"]["name"] == "web-2"))));
    assert_eq!(s.agent.verify_trail()?.ok()?["ok"], true);
    assert_eq!(cli(&s, &["audit", "verify"])?.1["ok"], true);
    Ok(())
}

/// A kubectl process whose stdout lines arrive on a channel.
struct Streaming {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Streaming {
    fn start(cfg: &Path, args: &[&str], stdin: bool) -> Result<Streaming> {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", cfg)
            .env("HOME", cfg.parent().unwrap_or(Path::new("/tmp")))
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Streaming {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Waits (bounded) for a line containing `needle`.
    fn expect(&mut self, needle: &str) -> Result<()> {
        let deadline = Instant::now() + LIMIT;
        while Instant::now() < deadline {
            if self.seen.iter().any(|l| l.contains(needle)) {
                return Ok(());
            }
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(l);
            }
        }
        bail!("no line with {needle:?}; saw {:?}", self.seen)
    }

    fn exited_within(&mut self, limit: Duration) -> bool {
        wait_until(limit, || matches!(self.child.try_wait(), Ok(Some(_))))
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn retire_cuts_live_streams_and_the_old_kubeconfig_is_refused() -> Result<()> {
    let s = setup()?;
    let (id, cfg) = create_endpoint(&s, CLUSTER)?;

    let mut logs = Streaming::start(&cfg, &["logs", "-f", "web-1"], false)?;
    logs.expect("log line 2 of web-1")?;
    let mut watch = Streaming::start(&cfg, &["get", "pods", "-w"], false)?;
    watch.expect("web-1")?;
    s.api.add_pod("my-app-prod", "web-3");
    watch.expect("web-3")?;
    let mut shell = Streaming::start(&cfg, &["exec", "-i", "web-1", "--", "cat"], true)?;
    if let Some(stdin) = shell.child.stdin.as_mut() {
        stdin.write_all(b"ping\n")?;
        stdin.flush()?;
    }
    shell.expect("ping")?;

    let (ok, retired) = cli(&s, &["ops", "endpoint", "retire", &id])?;
    let t0 = Instant::now();
    assert!(ok, "{retired}");
    assert_eq!(retired["state"], "retired");
    for (what, p) in [
        ("logs -f", &mut logs),
        ("get -w", &mut watch),
        ("exec", &mut shell),
    ] {
        assert!(
            p.exited_within(Duration::from_secs(2).saturating_sub(t0.elapsed())),
            "kubectl {what} still running {:?} after retire",
            t0.elapsed()
        );
    }
    eprintln!("all three streams ended {:?} after retire", t0.elapsed());

    // The same kubeconfig no longer authenticates, and nothing reaches the cluster.
    s.api.clear_requests();
    let (ok, out, err) = kubectl(&cfg, &["get", "pods"], None, LIMIT)?;
    assert!(!ok, "{out}");
    assert!(
        err.contains("Unauthorized") || err.contains("logged in"),
        "{err}"
    );
    assert!(s.api.requests().is_empty(), "{:?}", s.api.requests());

    // The appliance proved it: the streams cut and ended, a request under the endpoint's
    // certificate refused by its own proxy; signed, and checked against the gateway CA.
    let v = teardown_check::verified(&s.gw, &id, KUBE_CHECKS, Duration::from_secs(30))?;
    assert_eq!(v["proof"]["reason"], "retired", "{v}");
    assert_eq!(v["proof"]["endpoint_type"], "kubectl", "{v}");
    let edited = teardown_check::edit_and_verify(&s.gw, &id)?;
    teardown_check::assert_edit_refused(&edited, &id)?;
    Ok(())
}

/// The checks every kubernetes teardown proof carries.
const KUBE_CHECKS: &[&str] = &["sessions_cut", "kube_certificate_refused"];

/// A raw HTTPS client holding the kubeconfig's certificate, for what kubectl will not send.
struct Raw {
    tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
}

impl Raw {
    fn connect(cfg: &Path) -> Result<Raw> {
        let text = std::fs::read_to_string(cfg)?;
        let field = |key: &str| -> Result<String> {
            let v = text
                .lines()
                .find_map(|l| l.trim().strip_prefix(key).and_then(|r| r.strip_prefix(':')))
                .ok_or_else(|| anyhow!("kubeconfig has no {key}"))?;
            Ok(v.trim().trim_matches('"').to_string())
        };
        use base64::Engine;
        let b64 = |s: String| -> Result<String> {
            Ok(String::from_utf8(
                base64::engine::general_purpose::STANDARD.decode(s)?,
            )?)
        };
        let key = certs::Secret::new(b64(field("client-key-data")?)?);
        let cert = b64(field("client-certificate-data")?)?;
        let config = certs::client_config(
            &b64(field("certificate-authority-data")?)?,
            Some((&cert, &key)),
            vec![b"http/1.1".to_vec()],
        )?;
        let addr = field("server")?.trim_start_matches("https://").to_string();
        let tcp = std::net::TcpStream::connect(&addr)?;
        tcp.set_read_timeout(Some(LIMIT))?;
        let name = rustls_pki_types::ServerName::try_from(field("tls-server-name")?)?;
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
        let mut tcp = tcp;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(Raw {
            tls: rustls::StreamOwned::new(conn, tcp),
        })
    }

    /// Sends `head` (request line and headers, without the blank line) and reads the
    /// response head and a Content-Length body. Returns (status, head, body).
    fn send(&mut self, head: &str) -> Result<(u16, String, String)> {
        use std::io::Read;
        self.tls.write_all(format!("{head}\r\n\r\n").as_bytes())?;
        self.tls.flush()?;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if self.tls.read(&mut byte)? == 0 {
                bail!(
                    "connection closed before a response; got {:?}",
                    String::from_utf8_lossy(&buf)
                );
            }
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).to_lowercase();
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0usize);
        let mut body = vec![0u8; len];
        self.tls.read_exact(&mut body)?;
        Ok((code, head, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Whether the server closed the connection (EOF or reset) within the read timeout.
    fn closed(&mut self) -> bool {
        use std::io::Read;
        let mut b = [0u8; 1];
        !matches!(self.tls.read(&mut b), Ok(n) if n > 0)
    }
}

#[test]
fn limits_strict_paths_and_refused_upgrades() -> Result<()> {
    let s = setup()?;
    let (_, cfg) = create_endpoint(&s, CLUSTER)?;
    let host = "Host: localhost";
    s.api.clear_requests();

    // Paths the API server could read differently are refused before anything is forwarded.
    for path in [
        "/api/v1/namespaces/my-app-prod/pods/x%2F..%2F..%2Fkube-system",
        "/api/v1/namespaces/my-app-prod/./pods",
        "/api/v1/namespaces/my-app-prod/pods/%zz",
        "/api//v1/namespaces/my-app-prod/pods",
        "/api/v1/namespaces/my-app-prod/pods/",
    ] {
        let mut raw = Raw::connect(&cfg)?;
        let (code, _, body) = raw.send(&format!("GET {path} HTTP/1.1\r\n{host}"))?;
        assert!(code == 400, "{path}: {code} {body}");
    }
    assert!(s.api.requests().is_empty(), "{:?}", s.api.requests());

    // The client's Authorization and Impersonate-* never reach the cluster.
    let mut raw = Raw::connect(&cfg)?;
    let (code, _, body) = raw.send(&format!(
        "GET /api/v1/namespaces/my-app-prod/pods/web-1 HTTP/1.1\r\n{host}\r\nAuthorization: Bearer stolen\r\nImpersonate-User: admin\r\nImpersonate-Extra-Scopes: all"
    ))?;
    assert_eq!(code, 200, "{body}");
    let seen = s.api.requests();
    let r = seen
        .last()
        .ok_or_else(|| anyhow!("nothing reached the cluster"))?;
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {}", s.api.token).as_str())
    );
    assert_eq!(r.header("impersonate-user"), Some("postern:my-app"));
    assert_eq!(r.header("impersonate-extra-scopes"), None);

    // Bodies over 10 MiB: 413, without forwarding.
    s.api.clear_requests();
    let (code, _, body) = raw.send(&format!(
        "POST /api/v1/namespaces/my-app-prod/configmaps HTTP/1.1\r\n{host}\r\nContent-Type: application/json\r\nContent-Length: {}",
        11 * 1024 * 1024
    ))?;
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("RequestEntityTooLarge"), "{body}");
    assert!(s.api.requests().is_empty());

    // An upgrade the cluster answers with something other than 101 ends the connection (the
    // test server speaks SPDY's v4 stream protocol, not the original `channel.k8s.io`).
    let mut raw = Raw::connect(&cfg)?;
    let (code, head, _) = raw.send(&format!(
        "POST /api/v1/namespaces/my-app-prod/pods/web-1/exec?command=echo&stdout=true HTTP/1.1\r\n{host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: channel.k8s.io\r\nContent-Length: 0"
    ))?;
    assert_eq!(code, 400);
    assert!(head.contains("connection: close"), "{head}");
    assert!(
        raw.closed(),
        "the connection stayed open after a refused upgrade"
    );

    // 64 sessions per endpoint; the 65th connection is told 429 in a Status.
    let mut held = Vec::new();
    for _ in 0..64 {
        let mut r = Raw::connect(&cfg)?;
        // An out-of-scope request is answered by the gateway itself: the slot is held.
        let (code, _, _) = r.send(&format!("GET /api/v1/nodes HTTP/1.1\r\n{host}"))?;
        assert_eq!(code, 403);
        held.push(r);
    }
    let mut extra = Raw::connect(&cfg)?;
    let (code, _, body) = extra.send(&format!(
        "GET /api/v1/namespaces/my-app-prod/pods HTTP/1.1\r\n{host}"
    ))?;
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("TooManyRequests"), "{body}");
    drop(held);
    // Slots come back once clients leave.
    assert!(wait_until(Duration::from_secs(10), || {
        Raw::connect(&cfg)
            .and_then(|mut r| r.send(&format!("GET /version HTTP/1.1\r\n{host}")))
            .is_ok_and(|(c, _, _)| c == 200)
    }));
    Ok(())
}

#[test]
fn expiry_cuts_a_live_stream_and_the_certificate_dies_with_the_endpoint() -> Result<()> {
    let s = setup()?;
    let out =
        s.gw.create_endpoint(&s.home, "kubectl", APP, "acme-corp", CLUSTER, "10s")?;
    let (ok, ep) = (out.success, out.json);
    assert!(ok && ep["state"] == "active", "{ep}");
    let id = ep["id"].as_str().unwrap_or_default().to_string();
    let cfg = PathBuf::from(
        ep["kubeconfig"]
            .as_str()
            .ok_or_else(|| anyhow!("no kubeconfig in {ep}"))?,
    );
    let mut logs = Streaming::start(&cfg, &["logs", "-f", "web-1"], false)?;
    logs.expect("log line 1 of web-1")?;
    // Bounded: the endpoint lives 10 s.
    assert!(
        logs.exited_within(Duration::from_secs(30)),
        "logs -f outlived the endpoint"
    );
    assert!(wait_until(Duration::from_secs(10), || audit(&s).is_ok_and(
        |r| r
            .iter()
            .any(|x| x["kind"] == "endpoint.expired" && x["endpoint_id"] == id.as_str())
    )));

    s.api.clear_requests();
    let (ok, out, err) = kubectl(&cfg, &["get", "pods"], None, LIMIT)?;
    assert!(!ok, "{out}");
    // Refused by the gateway either way: the certificate expired with the endpoint, or (within
    // clock slack) it maps to no live endpoint.
    assert!(
        err.contains("Unauthorized")
            || err.contains("logged in")
            || err.contains("expired")
            || err.contains("certificate"),
        "{err}"
    );
    assert!(s.api.requests().is_empty(), "{:?}", s.api.requests());
    let v = teardown_check::verified(&s.gw, &id, KUBE_CHECKS, Duration::from_secs(30))?;
    assert_eq!(v["proof"]["reason"], "expired", "{v}");
    Ok(())
}

/// Waits (bounded) for a record of each trail matching `pred`; returns (gateway's, agent's).
fn in_both_trails(s: &Setup, what: &str, pred: impl Fn(&Value) -> bool) -> Result<(Value, Value)> {
    let (mut gw, mut agent) = (None, None);
    wait_until(Duration::from_secs(15), || {
        gw = gw
            .take()
            .or_else(|| audit(s).ok().and_then(|r| r.into_iter().find(&pred)));
        agent = agent
            .take()
            .or_else(|| s.agent.trail().ok().and_then(|r| r.into_iter().find(&pred)));
        gw.is_some() && agent.is_some()
    });
    match (gw, agent) {
        (Some(g), Some(a)) => Ok((g, a)),
        (g, a) => bail!("{what}: gateway trail {g:?}, agent trail {a:?}"),
    }
}

#[test]
fn scope_names_any_rbac_resource_and_writes_need_impersonation() -> Result<()> {
    let s = setup()?;
    let (_, cfg) = create_endpoint(&s, CLUSTER)?;

    // Group-qualified names, a bare built-in (`statefulsets`) and a bare custom resource
    // (`issuers`, which only the cluster's discovery can place in cert-manager.io).
    for (args, want) in [
        (&["get", "statefulsets"][..], "db"),
        (
            &["get", "statefulsets.apps", "db", "-o", "json"][..],
            "\"kind\": \"StatefulSet\"",
        ),
        (&["get", "jobs"][..], "migrate"),
        (&["get", "certificates.cert-manager.io"][..], "web-tls"),
        (&["get", "issuers"][..], "letsencrypt"),
        (&["get", "rolebindings"][..], "web-readers"),
    ] {
        let (ok, out, err) = kubectl(&cfg, args, None, LIMIT)?;
        assert!(ok && out.contains(want), "kubectl {args:?}: {out} {err}");
    }
    // Same plural, another group: not granted.
    s.api.clear_requests();
    forbidden(
        &cfg,
        &["get", "certificates.acme.example.com"],
        "certificates.acme.example.com is not among",
    )?;
    forbidden(
        &cfg,
        &["scale", "statefulset", "db", "--replicas", "3"],
        "statefulsets.apps/scale is not among",
    )?;
    assert!(
        s.api
            .requests()
            .iter()
            .all(|r| !r.path().contains("acme.example.com/v1/namespaces")
                && !r.path().ends_with("/scale")),
        "{:?}",
        s.api.requests()
    );

    // An exec's command and container are in both trails.
    let (ok, out, err) = kubectl(
        &cfg,
        &["exec", "web-1", "--", "sh", "-c", "echo hi"],
        None,
        LIMIT,
    )?;
    assert!(ok && out == "hi\n", "{out} {err}");
    let is_exec = |r: &Value| {
        r["kind"] == "kube.request"
            && r["detail"]["subresource"] == "exec"
            && r["detail"]["command"] == serde_json::json!(["sh", "-c", "echo hi"])
    };
    let (g, a) = in_both_trails(&s, "exec with its command", is_exec)?;
    for r in [&g, &a] {
        assert_eq!(r["detail"]["container"], "app", "{r}");
        assert_eq!(r["detail"]["code"], 101, "{r}");
    }
    let (g, _) = in_both_trails(&s, "statefulsets list", |r| {
        r["kind"] == "kube.request" && r["detail"]["resource"] == "statefulsets"
    })?;
    assert_eq!(g["detail"]["api_group"], "apps", "{g}");

    // With an identity, writes go upstream as it.
    s.api.clear_requests();
    let (ok, out, err) = kubectl(&cfg, &["delete", "job", "migrate"], None, LIMIT)?;
    assert!(ok && out.contains("deleted"), "{out} {err}");
    let del = s
        .api
        .requests()
        .into_iter()
        .find(|r| r.method == "DELETE")
        .ok_or_else(|| anyhow!("the delete never reached the cluster"))?;
    assert_eq!(
        del.header("impersonate-user"),
        Some("postern:my-app"),
        "{del:?}"
    );
    assert_eq!(
        del.header("impersonate-group"),
        Some("postern-ops"),
        "{del:?}"
    );

    // Authenticating-proxy headers never reach the cluster.
    let mut raw = Raw::connect(&cfg)?;
    s.api.clear_requests();
    let (code, _, body) = raw.send(
        "GET /api/v1/namespaces/my-app-prod/pods/web-1 HTTP/1.1\r\nHost: localhost\r\nX-Remote-User: admin\r\nX-Remote-Group: system:masters\r\nX-Remote-Extra-Scopes: all",
    )?;
    assert_eq!(code, 200, "{body}");
    let seen = s.api.requests();
    assert!(!seen.is_empty());
    for r in &seen {
        assert!(
            !r.headers.iter().any(|(k, _)| k.starts_with("x-remote-")),
            "{r:?}"
        );
        assert!(
            !r.headers.iter().any(|(_, v)| v.contains("system:masters")),
            "{r:?}"
        );
    }

    // Without an identity to impersonate, only reads pass, whatever `verbs` says; the agent
    // said so at start-up and refuses writes with its reason, in both trails.
    let log = std::fs::read_to_string(&s.agent.log)?;
    assert!(
        log.contains(NO_IDENTITY) && log.contains("read verbs only"),
        "{log}"
    );
    let (_, plain) = create_endpoint(&s, NO_IDENTITY)?;
    let (ok, out, err) = kubectl(&plain, &["get", "pods"], None, LIMIT)?;
    assert!(ok && out.contains("web-1"), "{err}");
    let (ok, out, err) = kubectl(&plain, &["logs", "web-1"], None, LIMIT)?;
    assert!(ok && out.contains("log line 1 of web-1"), "{err}");
    s.api.clear_requests();
    forbidden(&plain, &["delete", "pod", "web-1"], "needs impersonation")?;
    forbidden(
        &plain,
        &["exec", "web-1", "--", "echo", "no"],
        "needs impersonation",
    )?;
    assert!(
        s.api
            .requests()
            .iter()
            .all(|r| r.method != "DELETE" && !r.path().ends_with("/exec")),
        "{:?}",
        s.api.requests()
    );
    assert!(s.api.has_object("pods", "my-app-prod", "web-1"));
    for verb in ["delete", "create"] {
        let (g, a) = in_both_trails(&s, verb, |r| {
            r["kind"] == "denied"
                && r["detail"]["action"] == "kube.request"
                && r["detail"]["reason"].as_str().is_some_and(|x| {
                    x.contains("needs impersonation") && x.contains(&format!("\"{verb}\""))
                })
        })?;
        assert!(
            g["detail"]["reason"]
                .as_str()
                .is_some_and(|x| x.contains("(appliance)")),
            "{g}"
        );
        assert_eq!(a["detail"]["code"], 403, "{a}");
    }

    // A bare name the cluster serves in two groups is a config error at start-up.
    let dir = tempfile::tempdir()?;
    let upstream = dir.path().join("upstream.kubeconfig");
    std::fs::write(&upstream, s.api.kubeconfig("default"))?;
    let body = format!(
        "[[resource]]\nid = \"k\"\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespaces = [\"my-app-prod\"]\nresources = [\"pods\", \"certificates\"]\n",
        upstream.display()
    );
    let mut ambiguous = Agent::enroll(
        &s.gw,
        &dir.path().join("agent"),
        "other-app",
        "acme-corp",
        &body,
    )?;
    ambiguous.run()?;
    assert!(
        wait_until(LIMIT, || std::fs::read_to_string(&ambiguous.log)
            .is_ok_and(|l| l.contains("ambiguous"))),
        "{}",
        std::fs::read_to_string(&ambiguous.log).unwrap_or_default()
    );
    let log = std::fs::read_to_string(&ambiguous.log)?;
    assert!(
        log.contains("certificates")
            && log.contains("cert-manager.io")
            && log.contains("acme.example.com"),
        "{log}"
    );
    assert!(
        ambiguous.stop().is_some_and(|st| !st.success()),
        "the agent ran with an ambiguous name"
    );
    Ok(())
}

/// `postern ops kubectl … --wait` as the admin; (success, op record).
fn kubectl_op(s: &Setup, resource: &str, command: &str) -> Result<(bool, Value)> {
    cli(
        s,
        &[
            "ops",
            "kubectl",
            "--app",
            APP,
            "--customer",
            "acme-corp",
            "--origin-resource-id",
            resource,
            "--command",
            command,
            "--wait",
        ],
    )
}

#[test]
fn kubectl_ops_go_through_a_per_op_scoped_proxy() -> Result<()> {
    let s = setup()?;
    s.api.clear_requests();
    let (ok, op) = kubectl_op(&s, CLUSTER, "kubectl get pods -n my-app-prod")?;
    assert!(ok && op["state"] == "completed", "{op}");
    assert!(
        op["stdout"]
            .as_str()
            .is_some_and(|o| o.contains("web-1") && !o.contains("coredns")),
        "{op}"
    );
    let op_id = op["id"].as_str().unwrap_or_default().to_string();
    // Upstream: the appliance's token, as the resource's impersonated identity.
    let reqs = s.api.requests();
    let list = reqs
        .iter()
        .find(|r| r.path() == "/api/v1/namespaces/my-app-prod/pods")
        .ok_or_else(|| anyhow!("{reqs:?}"))?;
    assert_eq!(
        list.header("impersonate-user"),
        Some("postern:my-app"),
        "{list:?}"
    );
    let (g, a) = in_both_trails(&s, "the op's list", |r| {
        r["kind"] == "kube.request"
            && r["op_id"] == op_id.as_str()
            && r["detail"]["resource"] == "pods"
            && r["detail"]["verb"] == "list"
    })?;
    assert_eq!(g["detail"]["code"], 200, "{g}");
    assert_eq!(a["detail"]["namespace"], "my-app-prod", "{a}");

    // Out of the resource's scope: refused by the op's proxy, in both trails.
    s.api.clear_requests();
    let (ok, op) = kubectl_op(&s, CLUSTER, "kubectl get secrets -n my-app-prod")?;
    assert!(!ok && op["state"] == "failed", "{op}");
    assert!(
        op["stderr"]
            .as_str()
            .is_some_and(|e| e.contains("Forbidden") && e.contains("secrets is not among")),
        "{op}"
    );
    let denied_op = op["id"].as_str().unwrap_or_default().to_string();
    in_both_trails(&s, "the op's refused request", |r| {
        r["kind"] == "denied"
            && r["op_id"] == denied_op.as_str()
            && r["detail"]["reason"]
                .as_str()
                .is_some_and(|x| x.contains("secrets"))
    })?;
    let (ok, op) = kubectl_op(&s, CLUSTER, "kubectl get pods -n kube-system")?;
    assert!(
        !ok && op["stderr"]
            .as_str()
            .is_some_and(|e| e.contains("kube-system")),
        "{op}"
    );
    assert!(
        s.api
            .requests()
            .iter()
            .all(|r| !r.path().contains("secrets") && !r.path().contains("kube-system")),
        "{:?}",
        s.api.requests()
    );

    // Another kubeconfig or server cannot be named.
    let upstream = s
        ._dir
        .path()
        .join("upstream.kubeconfig")
        .display()
        .to_string();
    let (ok, op) = kubectl_op(
        &s,
        CLUSTER,
        &format!("kubectl --kubeconfig {upstream} get pods"),
    )?;
    assert!(!ok && op["error"]["code"] == "FORBIDDEN_BY_SCOPE", "{op}");

    // The op sees only its own credential, and that dies with the op.
    let (ok, op) = kubectl_op(&s, CLUSTER, "kubectl config view --raw")?;
    assert!(ok, "{op}");
    let raw = op["stdout"].as_str().unwrap_or_default().to_string();
    assert!(
        raw.contains("server: https://127.0.0.1:") && raw.contains("token: "),
        "{raw}"
    );
    assert!(
        !raw.contains(&s.api.token) && !raw.contains(&s.api.addr.to_string()),
        "the appliance's credential leaked: {raw}"
    );
    assert_eq!(raw.matches("server:").count(), 1, "{raw}");
    let after = s.home.join("op.kubeconfig");
    std::fs::write(&after, &raw)?;
    s.api.clear_requests();
    let (ok, out, err) = kubectl(
        &after,
        &["get", "pods", "--request-timeout", "5s"],
        None,
        LIMIT,
    )?;
    assert!(!ok, "the op's credential still works after the op: {out}");
    assert!(!err.is_empty());
    assert!(s.api.requests().is_empty(), "{:?}", s.api.requests());
    Ok(())
}

/// The customer's trail on a full disk: kubectl gets a 503 Status saying the appliance cannot
/// write its audit trail, the agent keeps running and says why; with space again kubectl works
/// and the trail verifies.
#[test]
fn full_trail_disk_gives_kubectl_a_503_and_the_agent_recovers() -> Result<()> {
    let mut s = setup()?;
    let (_id, cfg) = create_endpoint(&s, CLUSTER)?;
    let agent_dir = s._dir.path().join("agent");
    let Some(disk) = postern::testbed::TinyDisk::mount(&agent_dir.join("trail"), "256k")? else {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); the full-disk test did not run"
        );
        return Ok(());
    };
    s.agent.stop();
    disk.hold_trail(&s.agent)?;
    s.agent.run()?;
    assert!(s
        .gw
        .wait_online(&s.agent.appliance_id, Duration::from_secs(30)));
    let works = || {
        kubectl(&cfg, &["get", "pods", "-n", "my-app-prod"], None, LIMIT)
            .is_ok_and(|(ok, out, _)| ok && out.contains("web-1"))
    };
    assert!(wait_until(Duration::from_secs(20), works));

    let filler = disk.fill()?;
    // The trail's last page may still take a few records; then a session is refused.
    let mut refusal = None;
    for _ in 0..40 {
        let (ok, _, err) = kubectl(&cfg, &["get", "pods", "-n", "my-app-prod"], None, LIMIT)?;
        if !ok {
            refusal = Some(err);
            break;
        }
    }
    let refusal = refusal.ok_or_else(|| anyhow!("kubectl kept working with the disk full"))?;
    assert!(
        refusal.contains("ServiceUnavailable") && refusal.contains("cannot write its audit trail"),
        "kubectl said: {refusal}"
    );
    let pid = s.agent.pid().ok_or_else(|| anyhow!("agent not running"))?;
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the agent exited"
    );
    let log = std::fs::read_to_string(&s.agent.log)?;
    assert!(
        log.contains("cannot write the customer's audit trail"),
        "the agent did not say why: {log}"
    );

    std::fs::remove_file(&filler)?;
    assert!(
        wait_until(Duration::from_secs(10), works),
        "kubectl did not work again once the disk had space"
    );
    assert_eq!(s.agent.verify_trail()?.ok()?["ok"], true);
    s.agent.stop();
    drop(disk);
    Ok(())
}
