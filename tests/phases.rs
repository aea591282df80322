//! Phases at the target (issue 16): an endpoint or op of a phase needs a live grant of that
//! phase, and the appliance reaches the target with that phase's identity
//! (`[resource.phases.<phase>]`). Real gateway, agent, CLI, kubectl and the test API server.

use anyhow::{anyhow, Result};
use postern::{
    kube_apiserver::{kubectl, KubeApiServer},
    testbed::{Agent, Gateway},
};
use serde_json::Value;
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

const LIMIT: Duration = Duration::from_secs(60);
const APP: &str = "my-app";
const CUSTOMER: &str = "acme-corp";
const CLUSTER: &str = "aws_eks_cluster.main_cluster";

fn agent_toml(upstream: &Path) -> String {
    let u = upstream.display();
    format!(
        "[policy]\napproval = \"automatic\"\n\n\
         [[resource]]\nid = \"{CLUSTER}\"\nkind = \"kubernetes\"\nkubeconfig = \"{u}\"\nnamespaces = [\"my-app-prod\"]\n\
         verbs = [\"get\", \"list\", \"watch\", \"create\", \"delete\"]\n\
         impersonate = {{ user = \"vendor-operate\", groups = [\"vendor-troubleshooters\"] }}\n\n\
         [resource.phases.deploy]\n\
         impersonate = {{ user = \"vendor-deploy\", groups = [\"vendor-deployers\"] }}\n"
    )
}

fn cli(gw: &Gateway, home: &Path, args: &[&str]) -> Result<(bool, Value)> {
    let out = gw.cli_home(home, args)?;
    Ok((out.success, out.json))
}

fn request(gw: &Gateway, level: &str) -> Result<Value> {
    gw.request_access(APP, CUSTOMER, level, "1h")
}

fn create_endpoint(gw: &Gateway, home: &Path, phase: &str) -> Result<(bool, Value)> {
    cli(
        gw,
        home,
        &[
            "ops",
            "endpoint",
            "create",
            "--type",
            "kubectl",
            "--app",
            APP,
            "--customer",
            CUSTOMER,
            "--origin-resource-id",
            CLUSTER,
            "--ttl",
            "10m",
            "--phase",
            phase,
        ],
    )
}

fn kubectl_op(gw: &Gateway, home: &Path, phase: &str) -> Result<(bool, Value)> {
    cli(
        gw,
        home,
        &[
            "ops",
            "kubectl",
            "--app",
            APP,
            "--customer",
            CUSTOMER,
            "--origin-resource-id",
            CLUSTER,
            "--command",
            "kubectl get pods -n my-app-prod",
            "--phase",
            phase,
            "--wait",
        ],
    )
}

/// The identity the test API server saw on its pod list requests since the last clear.
fn seen_identity(api: &KubeApiServer) -> Result<(String, String)> {
    let reqs = api.requests();
    let list = reqs
        .iter()
        .find(|r| r.path() == "/api/v1/namespaces/my-app-prod/pods")
        .ok_or_else(|| anyhow!("no pod list reached the API server: {reqs:?}"))?;
    for r in &reqs {
        // Every request of the same session carries the same identity.
        assert_eq!(
            r.header("impersonate-user"),
            list.header("impersonate-user"),
            "{r:?}"
        );
    }
    Ok((
        list.header("impersonate-user")
            .unwrap_or_default()
            .to_string(),
        list.header("impersonate-group")
            .unwrap_or_default()
            .to_string(),
    ))
}

fn refused_for_want_of(v: &Value, phase: &str) {
    assert_eq!(v["error"]["code"], "OPERATE_ACCESS_REQUIRED", "{v}");
    assert!(
        v["error"]["hint"]
            .as_str()
            .is_some_and(|h| h.contains(&format!("--level {phase}"))),
        "{v}"
    );
}

#[test]
fn each_phase_reaches_the_cluster_as_its_own_identity_and_needs_its_own_grant() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = KubeApiServer::start()?;
    let upstream = dir.path().join("upstream.kubeconfig");
    std::fs::write(&upstream, api.kubeconfig("default"))?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    let _agent = Agent::online(
        &gw,
        &dir.path().join("agent"),
        APP,
        CUSTOMER,
        &agent_toml(&upstream),
    )?;
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home)?;

    // A steady-state-only appliance opens no endpoint and runs no op, in any phase.
    let ss = request(&gw, "steady-state")?;
    assert_eq!(ss["state"], "active", "{ss}");
    for phase in ["operate", "deploy"] {
        let (ok, v) = create_endpoint(&gw, &home, phase)?;
        assert!(!ok, "{v}");
        refused_for_want_of(&v, phase);
        let (ok, v) = kubectl_op(&gw, &home, phase)?;
        assert!(!ok, "{v}");
        refused_for_want_of(&v, phase);
    }
    // Nothing reached the namespace as a vendor identity (the agent's own discovery and its
    // steady-state snapshots, which impersonate nobody, aside).
    let reqs = api.requests();
    assert!(
        !reqs
            .iter()
            .any(|r| r.path().contains("/namespaces/") && r.header("impersonate-user").is_some()),
        "{reqs:?}"
    );

    // Operate: the resource's own impersonation.
    let op = request(&gw, "operate")?;
    assert_eq!(op["state"], "active", "{op}");
    let (ok, ep) = create_endpoint(&gw, &home, "operate")?;
    assert!(ok && ep["state"] == "active", "{ep}");
    assert_eq!(ep["phase"], "operate", "{ep}");
    let cfg = PathBuf::from(ep["kubeconfig"].as_str().ok_or_else(|| anyhow!("{ep}"))?);
    api.clear_requests();
    let (ok, out, err) = kubectl(&cfg, &["get", "pods"], None, LIMIT)?;
    assert!(ok && out.contains("web-1"), "{out} {err}");
    assert_eq!(
        seen_identity(&api)?,
        ("vendor-operate".into(), "vendor-troubleshooters".into())
    );

    // Without a deploy grant, --phase deploy is refused with a structured error, before
    // anything reaches the appliance; an operate grant does not stand in for it.
    let (ok, v) = create_endpoint(&gw, &home, "deploy")?;
    assert!(!ok, "{v}");
    refused_for_want_of(&v, "deploy");
    assert_eq!(v["error"]["details"]["phase"], "deploy", "{v}");
    // steady-state is not a phase an endpoint can ask for.
    let (ok, v) = create_endpoint(&gw, &home, "steady-state")?;
    assert!(!ok, "{v}");
    assert_eq!(v["error"]["code"], "INVALID_REQUEST", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("opens no endpoint")),
        "{v}"
    );

    // Deploy: the same resource, reached as the deploy identity.
    let dg = request(&gw, "deploy")?;
    assert_eq!(dg["state"], "active", "{dg}");
    let (ok, ep) = create_endpoint(&gw, &home, "deploy")?;
    assert!(ok && ep["state"] == "active", "{ep}");
    assert_eq!(ep["phase"], "deploy", "{ep}");
    let deploy_cfg = PathBuf::from(ep["kubeconfig"].as_str().ok_or_else(|| anyhow!("{ep}"))?);
    api.clear_requests();
    let (ok, out, err) = kubectl(&deploy_cfg, &["get", "pods"], None, LIMIT)?;
    assert!(ok && out.contains("web-1"), "{out} {err}");
    assert_eq!(
        seen_identity(&api)?,
        ("vendor-deploy".into(), "vendor-deployers".into())
    );
    // The operate endpoint, still live beside it, keeps the operate identity.
    api.clear_requests();
    let (ok, out, err) = kubectl(&cfg, &["get", "pods"], None, LIMIT)?;
    assert!(ok, "{out} {err}");
    assert_eq!(seen_identity(&api)?.0, "vendor-operate");

    // An op under deploy runs as the deploy identity too.
    api.clear_requests();
    let (ok, op) = kubectl_op(&gw, &home, "deploy")?;
    assert!(ok && op["state"] == "completed", "{op}");
    assert_eq!(op["phase"], "deploy", "{op}");
    assert_eq!(seen_identity(&api)?.0, "vendor-deploy");
    Ok(())
}

// ---- postgres: the deploy identity may change the schema, the operate one may not ---------

use postern::{
    pg_cluster::{Options, PgCluster},
    testbed::wait_until,
};
use std::process::{Command, Stdio};

const DB: &str = "aws_db_instance.main";

/// psql with ON_ERROR_STOP: (success, stdout, stderr).
fn psql(cs: &str, sql: &str) -> (bool, String, String) {
    let out = Command::new(PgCluster::bin_dir().join("psql"))
        .arg(cs)
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
        .env_remove("PGOPTIONS")
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (false, String::new(), format!("cannot run psql: {e}")),
    }
}

fn pg_endpoint(gw: &Gateway, home: &Path, phase: &str) -> Result<(String, String)> {
    let (ok, ep) = cli(
        gw,
        home,
        &[
            "ops",
            "endpoint",
            "create",
            "--type",
            "postgres",
            "--app",
            APP,
            "--customer",
            CUSTOMER,
            "--origin-resource-id",
            DB,
            "--ttl",
            "10m",
            "--phase",
            phase,
        ],
    )?;
    assert!(ok && ep["state"] == "active", "{ep}");
    assert_eq!(ep["phase"], phase, "{ep}");
    let cs = ep["connection_string"]
        .as_str()
        .ok_or_else(|| anyhow!("no connection_string in {ep}"))?;
    Ok((
        ep["id"].as_str().unwrap_or_default().to_string(),
        cs.to_string(),
    ))
}

#[test]
fn postgres_under_deploy_may_create_tables_and_under_operate_may_not() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = PgCluster::start_with(&Options {
        scram_for_others: true,
        ..Options::default()
    });
    let db_url = cluster.create_database("phases");
    cluster.psql(
        &db_url,
        "CREATE SCHEMA app; CREATE TABLE app.items (id serial PRIMARY KEY, name text); \
         CREATE ROLE app_owner NOLOGIN;",
    );
    let gw = Gateway::start(&dir.path().join("gw"))?;
    let body = format!(
        "[policy]\napproval = \"automatic\"\n\n[[resource]]\nid = \"{DB}\"\nkind = \"postgres\"\nadmin_url = \"{db_url}\"\n\
         schemas = [\"app\"]\nprivileges = [\"SELECT\", \"INSERT\", \"UPDATE\", \"DELETE\"]\nowner_role = \"app_owner\"\n\n\
         [resource.phases.deploy]\nprivileges = [\"SELECT\", \"CREATE\"]\n"
    );
    let _agent = Agent::online(&gw, &dir.path().join("agent"), APP, CUSTOMER, &body)?;
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home)?;
    for level in ["operate", "deploy"] {
        let g = request(&gw, level)?;
        assert_eq!(g["state"], "active", "{g}");
    }

    let (operate, op_cs) = pg_endpoint(&gw, &home, "operate")?;
    let (deploy, deploy_cs) = pg_endpoint(&gw, &home, "deploy")?;
    // The roles are made as the endpoints go live; the first statement may race them (one CI
    // run beside the whole suite took over 15 s).
    let mut made = (false, String::new(), String::new());
    assert!(wait_until(Duration::from_secs(60), || {
        made = psql(&deploy_cs, "CREATE TABLE app.released (id int)");
        made.0 || !made.2.contains("no database role")
    }));
    assert!(made.0, "deploy could not CREATE TABLE: {}", made.2);
    let (ok, _, err) = psql(&op_cs, "CREATE TABLE app.hotfix (id int)");
    assert!(
        !ok && err.contains("permission denied for schema app"),
        "operate created a table: {err}"
    );
    // Operate keeps its DML; deploy has no INSERT.
    let (ok, _, err) = psql(&op_cs, "INSERT INTO app.items (name) VALUES ('x')");
    assert!(ok, "{err}");
    let (ok, _, err) = psql(&deploy_cs, "INSERT INTO app.items (name) VALUES ('y')");
    assert!(!ok && err.contains("permission denied"), "{err}");
    assert_eq!(
        cluster
            .psql(&db_url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'app' AND tablename IN ('released', 'hotfix')")
            .trim(),
        "1"
    );

    // Both roles are dropped at the end.
    for id in [&operate, &deploy] {
        let (ok, v) = cli(&gw, &home, &["ops", "endpoint", "retire", id])?;
        assert!(ok, "{v}");
    }
    assert!(wait_until(Duration::from_secs(20), || {
        cluster
        .psql(
            &db_url,
            &format!(
                "SELECT count(*) FROM pg_roles WHERE rolname IN ('postern_{operate}', 'postern_{deploy}')"
            )
        )
        .trim()
        == "0"
    }));
    Ok(())
}
