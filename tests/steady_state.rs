//! Steady-state observability end to end: real `postern server` and `postern-agent`
//! processes, the test Kubernetes API server, a throwaway PostgreSQL and a counting TCP
//! listener. With a 1 s interval, a pod turned not-ready and a long transaction show up in
//! `postern appliance status`; the customer's approver turning steady-state off stops every
//! probe (counted at the API server, at PostgreSQL's session counter and at the listener) and
//! the status says STEADY_STATE_DISABLED; turning it on resumes collection.

use anyhow::{anyhow, Result};
use postern::{
    kube_apiserver::KubeApiServer,
    pg_cluster::{self, PgCluster},
    testbed::{wait_until, Agent, Gateway},
};
use serde_json::Value;
use std::{
    io::Write,
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

const APP: &str = "shop";
const CUSTOMER: &str = "acme-corp";
/// Comfortably more than two 1 s intervals on a loaded machine; a bound, not a speed goal.
const SHOWS_UP: Duration = Duration::from_secs(30);

/// A TCP listener that counts the connections it accepts (the agent's tcp probes).
struct CountingListener {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl CountingListener {
    fn start() -> Result<CountingListener> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            // Bounded by the test: it sets `stop` when it drops the listener.
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok(_) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(CountingListener {
            addr,
            accepted,
            stop,
        })
    }

    fn count(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CountingListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A psql session holding a transaction open until dropped.
struct OpenTransaction(Child);

impl OpenTransaction {
    fn begin(url: &str) -> Result<OpenTransaction> {
        let mut child = Command::new(PgCluster::bin_dir().join("psql"))
            .args([url, "-q"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = child.stdin.as_mut().ok_or_else(|| anyhow!("no stdin"))?;
        stdin.write_all(b"BEGIN; SELECT txid_current();\n")?;
        stdin.flush()?;
        Ok(OpenTransaction(child))
    }
}

impl Drop for OpenTransaction {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status(gw: &Gateway, agent: &Agent) -> Result<postern::testbed::CliOutput> {
    gw.cli(&["appliance", "status", &agent.appliance_id])
}

fn resource<'a>(report: &'a Value, id: &str) -> Option<&'a Value> {
    report["resources"]
        .as_array()?
        .iter()
        .find(|r| r["resource_id"] == id)
}

/// Sessions ever opened to the database (PostgreSQL 14+), read from another database.
fn sessions_of(cluster: &PgCluster, database: &str) -> Result<i64> {
    let out = cluster.psql(
        &cluster.url("postgres"),
        &format!("SELECT sessions FROM pg_stat_database WHERE datname = '{database}'"),
    );
    out.trim()
        .parse()
        .map_err(|e| anyhow!("sessions {out:?}: {e}"))
}

#[test]
fn snapshots_show_the_cluster_and_the_database_and_stop_when_the_customer_disables_them(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = pg_cluster::shared();
    let db_url = cluster.create_database("steady");
    let database = db_url.rsplit('/').next().unwrap_or_default().to_string();
    let api = KubeApiServer::start()?;
    let kubeconfig = dir.path().join("upstream.kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig("default"))?;
    let tcp = CountingListener::start()?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    let body = format!(
        "[policy]\napproval = \"automatic\"\n\n[steady_state]\ninterval = \"1s\"\n\n\
         [[resource]]\nid = \"cluster\"\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespaces = [\"my-app-prod\"]\n\n\
         [[resource]]\nid = \"db\"\nkind = \"postgres\"\nadmin_url = \"{db_url}\"\n\n\
         [[resource]]\nid = \"cache\"\nkind = \"tcp\"\ntarget = \"{}\"\n",
        kubeconfig.display(),
        tcp.addr
    );
    let agent = Agent::online(&gw, &dir.path().join("agent"), APP, CUSTOMER, &body)?;

    // Enabled by default: every resource reports, healthy.
    let mut report = Value::Null;
    let all_there = wait_until(SHOWS_UP, || {
        report = status(&gw, &agent)
            .and_then(|o| o.ok())
            .unwrap_or(Value::Null);
        ["cluster", "db", "cache"]
            .iter()
            .all(|id| resource(&report, id).is_some_and(|r| r["reachable"] == true))
    });
    assert!(
        all_there,
        "{report}\nagent log: {}",
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    let kube = resource(&report, "cluster").ok_or_else(|| anyhow!("no cluster"))?;
    assert_eq!(kube["detail"]["pods_by_phase"]["Running"], 2, "{kube}");
    assert_eq!(
        kube["detail"]["not_ready_pods"],
        serde_json::json!([]),
        "{kube}"
    );
    let db = resource(&report, "db").ok_or_else(|| anyhow!("no db"))?;
    assert!(
        db["detail"]["version"]
            .as_str()
            .unwrap_or("")
            .starts_with("PostgreSQL"),
        "{db}"
    );
    assert!(
        db["detail"]["max_connections"].as_i64().unwrap_or(0) > 0,
        "{db}"
    );
    // Only GETs reached the cluster, and no ConfigMap or Secret was read.
    for r in api.requests() {
        assert_eq!(r.method, "GET", "{}", r.uri);
        assert!(
            !r.uri.contains("configmaps") && !r.uri.contains("secrets"),
            "{}",
            r.uri
        );
    }

    // A pod turns not-ready, a warning is recorded and a transaction stays open.
    assert!(api.set_pod_ready("my-app-prod", "web-2", false));
    api.add_warning(
        "my-app-prod",
        "web-2",
        "Unhealthy",
        "Readiness probe failed",
    );
    let open = OpenTransaction::begin(&db_url)?;
    let seen = wait_until(SHOWS_UP, || {
        report = status(&gw, &agent)
            .and_then(|o| o.ok())
            .unwrap_or(Value::Null);
        let kube_sees = resource(&report, "cluster").is_some_and(|r| {
            r["detail"]["not_ready_pods"] == serde_json::json!(["my-app-prod/web-2"])
                && r["detail"]["warnings"][0]["reason"] == "Unhealthy"
        });
        let pg_sees = resource(&report, "db").is_some_and(|r| {
            r["detail"]["longest_transaction_s"]
                .as_f64()
                .is_some_and(|s| s >= 1.0)
        });
        kube_sees && pg_sees
    });
    assert!(seen, "{report}");
    // The text table shows them too.
    let text = Command::new(postern::testbed::bin("postern")?)
        .args([
            "--output",
            "text",
            "appliance",
            "status",
            "--app",
            APP,
            "--customer",
            CUSTOMER,
        ])
        .env("POSTERN_ADDR", gw.api.to_string())
        .env("POSTERN_TOKEN", &gw.admin_token)
        .env("POSTERN_CA_FILE", &gw.ca_file)
        .output()?;
    let table = String::from_utf8_lossy(&text.stdout);
    assert!(
        table.contains("not ready: my-app-prod/web-2"),
        "{table} {}",
        String::from_utf8_lossy(&text.stderr)
    );
    assert!(table.contains("oldest transaction"), "{table}");
    drop(open);

    // The customer's approver turns it off: the agent stops, nothing reaches the resources.
    let bob = gw.mint_token("approver", "bob@acme.example", Some(CUSTOMER))?;
    gw.cli_as(
        &bob,
        &[
            "access",
            "steady-state",
            "--app",
            APP,
            "--customer",
            CUSTOMER,
            "--disable",
        ],
    )?
    .ok()?;
    agent.trail_when(|t| t.iter().any(|e| e["kind"] == "steady_state.disabled"))?;
    // A round already under way when the command arrived is cut; let its packets land.
    std::thread::sleep(Duration::from_secs(1));
    let (kube_before, pg_before, tcp_before) = (
        api.requests().len(),
        sessions_of(&cluster, &database)?,
        tcp.count(),
    );
    // Three intervals without a single probe.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        api.requests().len(),
        kube_before,
        "the cluster was probed while disabled"
    );
    assert_eq!(
        sessions_of(&cluster, &database)?,
        pg_before,
        "the database was probed while disabled"
    );
    assert_eq!(
        tcp.count(),
        tcp_before,
        "the tcp target was probed while disabled"
    );
    let off = status(&gw, &agent)?;
    assert!(!off.success);
    assert_eq!(
        off.error_code(),
        Some("STEADY_STATE_DISABLED"),
        "{}",
        off.json
    );
    let hint = off.json["error"]["hint"].as_str().unwrap_or_default();
    assert!(
        hint.contains("postern access steady-state --enable"),
        "{hint}"
    );
    // The switch is in the vendor trail.
    let audit = gw
        .cli(&["audit", "list", "--appliance", &agent.appliance_id])?
        .ok()?;
    assert!(
        audit.to_string().contains("steady_state.disabled"),
        "{audit}"
    );

    // On again: collection resumes.
    gw.cli_as(
        &bob,
        &[
            "access",
            "steady-state",
            "--app",
            APP,
            "--customer",
            CUSTOMER,
            "--enable",
        ],
    )?
    .ok()?;
    let resumed = wait_until(SHOWS_UP, || {
        api.requests().len() > kube_before
            && tcp.count() > tcp_before
            && status(&gw, &agent).is_ok_and(|o| o.success)
    });
    assert!(resumed, "collection did not resume");
    agent.trail_when(|t| t.iter().any(|e| e["kind"] == "steady_state.enabled"))?;
    Ok(())
}
