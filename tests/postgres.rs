//! Postgres endpoints end to end: a throwaway PostgreSQL cluster (SCRAM for application roles),
//! real `postern server` and `postern-agent` processes, and stock `psql` with
//! `sslmode=verify-full` through the connection string the CLI prints.

use anyhow::{anyhow, Result};
use postern::{
    pg_cluster::{Options, PgCluster},
    teardown_check,
    testbed::{wait_until, Agent, Gateway, TinyDisk},
};
use serde_json::Value;
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const RESOURCE: &str = "aws_db_instance.main";
/// The same database with CREATE in scope: what endpoints make goes to `app_owner` at teardown.
const OWNED: &str = "aws_db_instance.owned";

struct Setup {
    cluster: PgCluster,
    db_url: String,
    gw: Gateway,
    agent: Agent,
    home: PathBuf,
    _dir: tempfile::TempDir,
}

fn setup(app: &str) -> Result<Setup> {
    setup_with(app, None)
}

/// `sessions_per_endpoint`: a gateway limit other than the default 64.
fn setup_with(app: &str, sessions_per_endpoint: Option<u64>) -> Result<Setup> {
    let cluster = PgCluster::start_with(&Options {
        scram_for_others: true,
        ..Options::default()
    });
    setup_on(
        app,
        sessions_per_endpoint,
        cluster,
        tempfile::tempdir()?,
        |url| url.to_string(),
        None,
    )
}

/// `admin_url`: what the agent is given for the database's URL.
fn setup_on(
    app: &str,
    sessions_per_endpoint: Option<u64>,
    cluster: PgCluster,
    dir: tempfile::TempDir,
    admin_url: impl Fn(&str) -> String,
    store: Option<&str>,
) -> Result<Setup> {
    let db_url = cluster.create_database("pgep");
    cluster.psql(
        &db_url,
        "CREATE SCHEMA app; CREATE TABLE app.items (id serial PRIMARY KEY, name text); \
         INSERT INTO app.items (name) VALUES ('first'); \
         CREATE SCHEMA secret; CREATE TABLE secret.keys (k text); INSERT INTO secret.keys VALUES ('hidden'); \
         CREATE ROLE app_owner NOLOGIN; CREATE ROLE creator NOLOGIN CREATEROLE;",
    );
    let gw = match sessions_per_endpoint {
        None if store.is_some() => {
            Gateway::start_with_store(&dir.path().join("gw"), store.unwrap_or_default())?
        }
        None => Gateway::start(&dir.path().join("gw"))?,
        Some(n) => {
            let config = dir.path().join("gateway.toml");
            std::fs::write(&config, format!("data_dir = \"gw\"\napi = \"127.0.0.1:0\"\nrelay = \"127.0.0.1:0\"\n\n[limits]\nsessions_per_endpoint = {n}\n"))?;
            Gateway::start_with_config(&dir.path().join("gw"), &config)?
        }
    };
    let body = format!(
        "[policy]\napproval = \"automatic\"\n\n[[resource]]\nid = \"{RESOURCE}\"\nkind = \"postgres\"\nadmin_url = \"{}\"\n\
         schemas = [\"app\"]\nprivileges = [\"SELECT\", \"INSERT\", \"UPDATE\", \"DELETE\"]\n\n\
         [[resource]]\nid = \"{OWNED}\"\nkind = \"postgres\"\nadmin_url = \"{}\"\n\
         schemas = [\"app\"]\nprivileges = [\"SELECT\", \"CREATE\"]\nowner_role = \"app_owner\"\n",
        admin_url(&db_url),
        admin_url(&db_url)
    );
    let agent = Agent::online(&gw, &dir.path().join("agent"), app, "acme-corp", &body)?;
    let grant = gw.request_operate(app, "acme-corp", "1h")?;
    assert_eq!(grant["state"], "active", "{grant}");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home)?;
    Ok(Setup {
        cluster,
        db_url,
        gw,
        agent,
        home,
        _dir: dir,
    })
}

impl Setup {
    /// The CLI as the admin, with its own HOME (where it writes the CA file).
    fn cli(&self, args: &[&str]) -> Result<Value> {
        let out = self.gw.cli_home(&self.home, args)?;
        if !out.success {
            return Err(anyhow!("postern {args:?} failed: {}", out.json));
        }
        Ok(out.json)
    }

    fn create(&self, app: &str, ttl: &str) -> Result<(String, String)> {
        self.create_on(app, RESOURCE, ttl)
    }

    fn create_on(&self, app: &str, resource: &str, ttl: &str) -> Result<(String, String)> {
        let ep = self.cli(&[
            "ops",
            "endpoint",
            "create",
            "--type",
            "postgres",
            "--app",
            app,
            "--customer",
            "acme-corp",
            "--origin-resource-id",
            resource,
            "--ttl",
            ttl,
        ])?;
        assert_eq!(ep["state"], "active", "{ep}");
        let cs = ep["connection_string"]
            .as_str()
            .ok_or_else(|| anyhow!("no connection_string in {ep}"))?
            .to_string();
        Ok((ep["id"].as_str().unwrap_or_default().to_string(), cs))
    }

    /// One admin query straight at the cluster.
    fn admin(&self, sql: &str) -> String {
        self.cluster.psql(&self.db_url, sql).trim().to_string()
    }

    fn vendor_records(&self, kind: &str) -> Vec<Value> {
        let list = self
            .gw
            .cli(&["audit", "list"])
            .and_then(|o| o.ok())
            .unwrap_or_default();
        list["records"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r["kind"] == kind)
            .collect()
    }

    fn customer_records(&self, kind: &str) -> Vec<Value> {
        self.agent
            .trail()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r["kind"] == kind)
            .collect()
    }
}

struct Psql {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn psql_cmd(cs: &str, args: &[&str]) -> Command {
    let mut c = Command::new(PgCluster::bin_dir().join("psql"));
    c.arg(cs)
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            "VERBOSITY=verbose",
            "-At",
        ])
        .args(args)
        .env_remove("PGOPTIONS")
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null());
    c
}

fn psql(cs: &str, sql: &str) -> Psql {
    psql_with(psql_cmd(cs, &["-c", sql]))
}

fn psql_with(mut c: Command) -> Psql {
    match c.output() {
        Ok(o) => Psql {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).trim().to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        },
        Err(e) => Psql {
            ok: false,
            stdout: String::new(),
            stderr: format!("cannot run psql: {e}"),
        },
    }
}

fn replace_password(cs: &str, new: &str) -> String {
    // postgresql://user:password@host…
    let (scheme_user, rest) = cs
        .split_once(':')
        .and_then(|(s, r)| r.split_once(':').map(|(u, r)| (format!("{s}:{u}"), r)))
        .unwrap();
    let after = rest.split_once('@').map(|(_, a)| a).unwrap();
    format!("{scheme_user}:{new}@{after}")
}

#[test]
fn psql_reads_and_writes_in_scope_and_the_server_refuses_the_rest() -> Result<()> {
    let s = setup("pg-app")?;
    let (id, cs) = s.create("pg-app", "10m")?;
    assert!(
        cs.contains("sslmode=verify-full") && cs.contains("sslrootcert="),
        "{cs}"
    );
    let role = format!("postern_{id}");

    // Read and write in the granted schema, as the endpoint's role, over TLS.
    let r = psql(&cs, "SELECT name FROM items ORDER BY id");
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout, "first");
    let r = psql(
        &cs,
        "INSERT INTO items (name) VALUES ('it''s \"quoted\"; DROP TABLE x; --') RETURNING id",
    );
    assert!(r.ok, "{}", r.stderr);
    let r = psql(&cs, "SELECT current_user, ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE pid = pg_backend_pid()");
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.starts_with(&format!("{role}|")), "{}", r.stdout);
    // The client sees the gateway's cancel key, never the real backend's process id.
    let r = psql(&cs, "SELECT pg_backend_pid()");
    assert!(r.ok, "{}", r.stderr);
    let real_pid = r.stdout.clone();
    assert!(!real_pid.is_empty());

    // Each refusal comes from the server's own privileges.
    for (name, sql, expect) in [
        (
            "other schema",
            "SELECT * FROM secret.keys",
            "permission denied for schema secret",
        ),
        (
            "pg_authid",
            "SELECT * FROM pg_authid",
            "permission denied for table pg_authid",
        ),
        (
            "pg_read_file",
            "SELECT pg_read_file('postgresql.conf')",
            "permission denied for function pg_read_file",
        ),
        (
            "copy to program",
            "COPY (SELECT 1) TO PROGRAM 'true'",
            "42501",
        ),
        (
            "set role",
            "SET ROLE postern",
            "permission denied to set role",
        ),
        ("create extension", "CREATE EXTENSION pgcrypto", "42501"),
        ("alter system", "ALTER SYSTEM SET work_mem = '1MB'", "42501"),
    ] {
        let r = psql(&cs, sql);
        assert!(!r.ok, "{name}: {sql} succeeded: {}", r.stdout);
        assert!(
            r.stderr.contains("ERROR:  42501") && r.stderr.contains(expect),
            "{name}: {}",
            r.stderr
        );
    }

    // Identity and scope cannot be changed at connect time.
    let r = psql(&cs, "\\c postgres");
    assert!(
        !r.ok && r.stderr.contains("serves database"),
        "\\c postgres: {}",
        r.stderr
    );
    let mut c = psql_cmd(&cs, &["-c", "SELECT 1"]);
    c.env("PGOPTIONS", "-c role=postern");
    let r = psql_with(c);
    assert!(
        !r.ok && r.stderr.contains("not allowed"),
        "PGOPTIONS role: {}",
        r.stderr
    );

    // A wrong password is a clean FATAL 28P01.
    let r = psql(&replace_password(&cs, "not-the-password"), "SELECT 1");
    assert!(!r.ok);
    assert!(
        r.stderr.contains(&format!(
            "FATAL:  password authentication failed for user \"{id}\""
        )),
        "{}",
        r.stderr
    );
    // At the socket: GSSENCRequest gets 'N', SSLRequest 'S', and plaintext sent right after
    // SSLRequest (before the TLS handshake) ends the connection.
    {
        use std::io::{Read, Write};
        let port: u16 = cs
            .split_once("@127.0.0.1:")
            .and_then(|(_, r)| r.split_once('/'))
            .and_then(|(p, _)| p.parse().ok())
            .unwrap();
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", port))?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut one = [0u8; 1];
        sock.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])?;
        sock.read_exact(&mut one)?;
        assert_eq!(&one, b"N");
        sock.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])?;
        sock.read_exact(&mut one)?;
        assert_eq!(&one, b"S");
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", port))?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        sock.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f, b'Q', 0, 0, 0, 5, 0])?;
        let mut rest = Vec::new();
        let closed = sock.read_to_end(&mut rest);
        assert!(
            closed.is_ok() && rest.is_empty(),
            "answered {rest:?} ({closed:?}) to plaintext after SSLRequest"
        );
    }
    // Plaintext is refused.
    let r = psql(
        &cs.replace("sslmode=verify-full", "sslmode=disable"),
        "SELECT 1",
    );
    assert!(
        !r.ok && r.stderr.contains("encrypted connections only"),
        "{}",
        r.stderr
    );

    // Ctrl-C in psql cancels that session's query only.
    let mut sleeper = psql_cmd(&cs, &["-c", "SELECT pg_sleep(60)"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut bystander = psql_cmd(
        &cs,
        &["-c", "SELECT pg_sleep(4)", "-c", "SELECT 'survived'"],
    )
    .stdout(Stdio::piped())
    .spawn()?;
    assert!(wait_until(Duration::from_secs(20), || {
        s.admin(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}' AND query LIKE '%pg_sleep%' AND state = 'active'"
    )) == "2"
    }));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(sleeper.id() as libc::pid_t, libc::SIGINT) };
    let out = wait_output(&mut sleeper, Duration::from_secs(20))?;
    assert!(
        out.1.contains("canceling statement due to user request"),
        "{}",
        out.1
    );
    let out = wait_output(&mut bystander, Duration::from_secs(20))?;
    assert!(
        out.0.contains("survived"),
        "the other session's query was cut too: {out:?}"
    );

    // 50 clients at once on one endpoint.
    let clients: Vec<_> = (0..50)
        .map(|i| {
            psql_cmd(&cs, &["-c", &format!("SELECT count(*) + {i} FROM items")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    for (i, c) in clients.into_iter().enumerate() {
        let o = c.wait_with_output()?;
        assert!(
            o.status.success(),
            "client {i}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            (2 + i).to_string()
        );
    }

    // Both trails hold every statement as data, the cancel, and the sessions with reasons.
    let quoted = "it''s \"quoted\"; DROP TABLE x; --";
    let has_statement = |records: &[Value]| {
        records.iter().any(|r| {
            r["endpoint_id"] == id.as_str()
                && r["detail"]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains(quoted))
        })
    };
    assert!(wait_until(Duration::from_secs(10), || has_statement(
        &s.vendor_records("sql.statement")
    )));
    assert!(wait_until(Duration::from_secs(10), || has_statement(
        &s.customer_records("sql.statement")
    )));
    assert!(!s.vendor_records("sql.cancel").is_empty());
    assert!(wait_until(Duration::from_secs(10), || s
        .customer_records("sql.cancel")
        .iter()
        .any(|r| r["detail"]["matched"] == true)));
    // libpq binds SCRAM to the gateway's certificate (tls-server-end-point) when offered.
    assert!(s
        .vendor_records("session.opened")
        .iter()
        .any(|r| r["detail"]["auth"] == "SCRAM-SHA-256-PLUS"));
    let closed = s.vendor_records("session.closed");
    assert!(
        closed
            .iter()
            .any(|r| r["endpoint_id"] == id.as_str() && r["detail"]["reason"] == "client"),
        "{closed:?}"
    );
    assert!(s
        .vendor_records("denied")
        .iter()
        .any(|r| r["detail"]["sqlstate"] == "28P01"));
    assert_eq!(s.gw.cli(&["audit", "verify"])?.ok()?["ok"], true);
    assert_eq!(s.agent.verify_trail()?.ok()?["ok"], true);

    // The one-off `ops psql` path runs as a role of its own, scoped the same, dropped after.
    let op = |sql: &str| {
        s.gw.cli(&[
            "ops",
            "psql",
            "--app",
            "pg-app",
            "--customer",
            "acme-corp",
            "--origin-resource-id",
            RESOURCE,
            "--wait",
            "--command",
            &format!("psql -X -At -c \"{sql}\""),
        ])
    };
    let done = op("SELECT current_user, count(*) FROM items")?;
    assert!(done.success, "{}", done.json);
    let stdout = done.json["stdout"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string();
    let op_id = done.json["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(stdout, format!("postern_{op_id}|2"), "{}", done.json);
    let refused = op("SELECT * FROM secret.keys")?;
    assert!(!refused.success);
    assert!(
        refused.json["stderr"]
            .as_str()
            .unwrap_or_default()
            .contains("permission denied for schema secret"),
        "{}",
        refused.json
    );
    assert_eq!(
        s.admin("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'postern\\_op\\_%'"),
        "0"
    );

    // A psql op cannot leave its database: a meta-command that runs a program or touches the
    // appliance's files, an option that picks another server or file, and COPY … PROGRAM are
    // refused by the agent before psql starts, and recorded as denied in both trails.
    let psql_op = |command: &str| {
        s.gw.cli(&[
            "ops",
            "psql",
            "--app",
            "pg-app",
            "--customer",
            "acme-corp",
            "--origin-resource-id",
            RESOURCE,
            "--wait",
            "--command",
            command,
        ])
    };
    for (command, refused) in [
        (r"psql -c '\! id'", r"\!"),
        (r#"psql -c "\copy app.items to program 'id'""#, r"\copy"),
        (r"psql -c '\o |id'", r"\o"),
        (r"psql -At -c '\i /etc/passwd'", r"\i"),
        ("psql -h 127.0.0.1 -U postgres -c 'SELECT 1'", "-h"),
        ("psql -f /etc/passwd", "-f"),
        (
            "psql -c \"COPY (SELECT 1) TO PROGRAM 'id'\"",
            "COPY … PROGRAM",
        ),
    ] {
        let out = psql_op(command)?;
        assert!(!out.success, "{command}: {}", out.json);
        let error = &out.json["error"];
        assert_eq!(
            error["code"], "FORBIDDEN_BY_SCOPE",
            "{command}: {}",
            out.json
        );
        assert_eq!(
            error["details"]["refused"], refused,
            "{command}: {}",
            out.json
        );
        assert!(
            out.json["stdout"].as_str().unwrap_or_default().is_empty(),
            "{}",
            out.json
        );
        let op_id = out.json["id"].as_str().unwrap_or_default().to_string();
        let message = error["message"].as_str().unwrap_or_default().to_string();
        let denied_here = |records: Vec<Value>| {
            records.iter().any(|r| {
                r["op_id"] == op_id.as_str()
                    && [&r["detail"]["reason"], &r["detail"]["message"]]
                        .iter()
                        .any(|v| v.as_str() == Some(message.as_str()))
            })
        };
        assert!(
            wait_until(Duration::from_secs(10), || denied_here(
                s.vendor_records("denied")
            )),
            "{command}: no denied in the gateway's trail"
        );
        assert!(
            wait_until(Duration::from_secs(10), || denied_here(
                s.customer_records("denied")
            )),
            "{command}: no denied in the agent's trail"
        );
        assert!(
            !s.customer_records("op.started")
                .iter()
                .any(|r| r["op_id"] == op_id.as_str()),
            "{command} started"
        );
    }
    Ok(())
}

/// Waits for a child with piped output, killing it past `limit`; (stdout, stderr).
fn wait_output(child: &mut std::process::Child, limit: Duration) -> Result<(String, String)> {
    use std::io::Read;
    let done = wait_until(limit, || matches!(child.try_wait(), Ok(Some(_))));
    if !done {
        let _ = child.kill();
    }
    let _ = child.wait();
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(o) = child.stdout.as_mut() {
        o.read_to_string(&mut out)?;
    }
    if let Some(e) = child.stderr.as_mut() {
        e.read_to_string(&mut err)?;
    }
    if !done {
        return Err(anyhow!("psql did not finish in {limit:?}: {out} {err}"));
    }
    Ok((out, err))
}

#[test]
fn retire_cuts_a_long_query_drops_the_role_and_dead_credentials_fail() -> Result<()> {
    let s = setup("pg-life")?;
    let (id, cs) = s.create("pg-life", "10m")?;
    let role = format!("postern_{id}");
    let mut sleeper = psql_cmd(&cs, &["-c", "SELECT pg_sleep(3600)"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    assert!(wait_until(Duration::from_secs(20), || s.admin(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}' AND query LIKE '%pg_sleep%'"
    )) == "1"));

    let retired = s.cli(&["ops", "endpoint", "retire", &id])?;
    let t0 = Instant::now();
    assert_eq!(retired["sessions_cut"], 1, "{retired}");
    let (_, err) = wait_output(&mut sleeper, Duration::from_secs(30))?;
    eprintln!("psql ended {:?} after retire", t0.elapsed());
    assert!(
        err.contains("closed") || err.contains("terminat"),
        "psql said: {err}"
    );
    assert!(wait_until(Duration::from_secs(15), || s.admin(&format!(
        "SELECT count(*) FROM pg_roles WHERE rolname = '{role}'"
    )) == "0"));
    assert_eq!(
        s.admin(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}'"
        )),
        "0"
    );

    // The retired credential fails cleanly.
    let r = psql(&cs, "SELECT 1");
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains(&format!("FATAL:  endpoint \"{id}\" has been retired")),
        "{}",
        r.stderr
    );
    assert!(wait_until(Duration::from_secs(10), || s
        .vendor_records("session.closed")
        .iter()
        .any(
            |r| r["endpoint_id"] == id.as_str() && r["detail"]["reason"] == "retired"
        )));
    assert!(wait_until(Duration::from_secs(10), || s
        .customer_records("pg.role_dropped")
        .iter()
        .any(|r| r["endpoint_id"] == id.as_str())));
    assert!(wait_until(Duration::from_secs(10), || s
        .customer_records("session.closed")
        .iter()
        .any(
            |r| r["endpoint_id"] == id.as_str() && r["detail"]["reason"] == "retired"
        )));

    // An endpoint that expires: its credential fails the same way and its role goes too.
    let (id2, cs2) = s.create("pg-life", "10s")?;
    let role2 = format!("postern_{id2}");
    assert!(psql(&cs2, "SELECT 1").ok);
    assert!(wait_until(Duration::from_secs(30), || {
        let r = psql(&cs2, "SELECT 1");
        !r.ok && r.stderr.contains("expired")
    }));
    assert!(wait_until(Duration::from_secs(15), || s.admin(&format!(
        "SELECT count(*) FROM pg_roles WHERE rolname = '{role2}'"
    )) == "0"));

    // Both ends are proved by the appliance, signed with its key: the session cut, the role
    // gone from pg_roles with no backend left. `audit teardown` checks the signature and the
    // appliance certificate against the gateway CA.
    let v = teardown_check::verified(&s.gw, &id, PG_CHECKS, Duration::from_secs(30))?;
    assert_eq!(v["proof"]["reason"], "retired", "{v}");
    assert_eq!(v["proof"]["offline"], false, "{v}");
    assert_eq!(v["proof"]["appliance_id"], s.agent.appliance_id.as_str());
    let cut = &v["proof"]["checks"][0];
    assert!(
        cut["name"] == "sessions_cut"
            && cut["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("1 session(s) served")),
        "{v}"
    );
    let v2 = teardown_check::verified(&s.gw, &id2, PG_CHECKS, Duration::from_secs(30))?;
    assert_eq!(v2["proof"]["reason"], "expired", "{v2}");
    // The customer's trail holds the same signed record.
    assert!(wait_until(Duration::from_secs(10), || s
        .customer_records("endpoint.teardown")
        .iter()
        .any(
            |r| r["endpoint_id"] == id.as_str() && r["detail"]["signature"] == v["signature"]
        )));
    // An edited record (SQL on the gateway's store) fails, with a structured error.
    let edited = teardown_check::edit_and_verify(&s.gw, &id)?;
    teardown_check::assert_edit_refused(&edited, &id)?;
    let none = s.gw.cli(&["audit", "teardown", "ep_neverexisted"])?;
    assert_eq!(none.error_code(), Some("NOT_FOUND"), "{}", none.json);
    assert!(none.json["error"]["hint"]
        .as_str()
        .is_some_and(|h| h.contains("proved")));
    Ok(())
}

/// The checks every postgres teardown proof carries.
const PG_CHECKS: &[&str] = &[
    "sessions_cut",
    "new_sessions_refused",
    "pg_role_gone",
    "pg_backends_gone",
];

/// An endpoint retired while the agent is stopped keeps its role until the agent is back;
/// then the agent drops it and proves it (marked offline), and the proof reaches the gateway.
#[test]
fn retired_while_the_agent_is_stopped_it_is_torn_down_and_proved_when_the_agent_is_back(
) -> Result<()> {
    let mut s = setup("pg-offline")?;
    let (id, cs) = s.create("pg-offline", "10m")?;
    let role = format!("postern_{id}");
    assert!(psql(&cs, "SELECT 1").ok);
    s.agent.stop();
    s.cli(&["ops", "endpoint", "retire", &id])?;
    let count = format!("SELECT count(*) FROM pg_roles WHERE rolname = '{role}'");
    assert_eq!(s.admin(&count), "1", "nothing at the appliance acted yet");
    let none = s.gw.cli(&["audit", "teardown", &id])?;
    assert_eq!(none.error_code(), Some("NOT_FOUND"), "{}", none.json);

    s.agent.run()?;
    let v = teardown_check::verified(&s.gw, &id, PG_CHECKS, Duration::from_secs(60))?;
    assert_eq!(v["proof"]["offline"], true, "{v}");
    assert_eq!(v["proof"]["reason"], "retired", "{v}");
    assert_eq!(s.admin(&count), "0");
    assert!(s
        .customer_records("endpoint.teardown")
        .iter()
        .any(|r| r["endpoint_id"] == id.as_str()));
    Ok(())
}

/// The appliance revoked with a Postgres endpoint live: the gateway cuts the agent and will
/// not take its proofs any more, so the proof lives in the customer's trail alone. It holds
/// a signed `endpoint.teardown` with reason `revoked` that verifies with the appliance's own
/// certificate (and fails once edited), the role is gone, and the endpoint is refused.
#[test]
fn appliance_revoked_its_endpoint_is_torn_down_and_proved_in_the_customer_trail() -> Result<()> {
    revoked_appliance_proves_its_teardown("pg-revoked", false)
}

/// The same, revoked while the agent is stopped: the gateway refuses the agent's hello as
/// revoked, and the agent tears the endpoint down and proves it then (marked offline).
#[test]
fn appliance_revoked_while_the_agent_is_stopped_it_proves_the_teardown_when_refused() -> Result<()>
{
    revoked_appliance_proves_its_teardown("pg-revoked-off", true)
}

fn revoked_appliance_proves_its_teardown(app: &str, agent_stopped: bool) -> Result<()> {
    let mut s = setup(app)?;
    let (id, cs) = s.create(app, "10m")?;
    let role = format!("postern_{id}");
    assert!(psql(&cs, "SELECT 1").ok);
    let count = format!("SELECT count(*) FROM pg_roles WHERE rolname = '{role}'");
    assert_eq!(s.admin(&count), "1");

    if agent_stopped {
        s.agent.stop();
    }
    s.gw.cli(&["appliance", "revoke", &s.agent.appliance_id])?
        .ok()?;
    if agent_stopped {
        assert_eq!(s.admin(&count), "1", "nothing at the appliance acted yet");
        s.agent.run()?;
    }
    let mut proof = None;
    wait_until(Duration::from_secs(60), || {
        proof = s
            .customer_records("endpoint.teardown")
            .into_iter()
            .find(|r| r["endpoint_id"] == id.as_str());
        proof.is_some()
    });
    let record =
        proof.ok_or_else(|| anyhow!("no endpoint.teardown for {id} in the customer trail"))?;
    let signed: endpoint_types::teardown::SignedTeardown =
        serde_json::from_value(record["detail"].clone())?;
    assert_eq!(
        signed.proof.reason,
        endpoint_types::resource::CloseReason::Revoked,
        "{record}"
    );
    assert_eq!(signed.proof.endpoint_id, id);
    assert_eq!(signed.proof.appliance_id, s.agent.appliance_id);
    if agent_stopped {
        assert!(signed.proof.offline, "{record}");
    }
    for name in PG_CHECKS {
        let c = signed
            .proof
            .check(name)
            .ok_or_else(|| anyhow!("no {name} check in {record}"))?;
        assert!(c.passed, "check {name} did not pass: {record}");
    }
    let cert_pem = std::fs::read_to_string(s.agent.config.with_file_name("agent.crt"))?;
    let cert_der = pem_der(&cert_pem)?;
    certs::record_signature::verify_with_cert(
        &cert_der,
        signed.proof.canonical().as_bytes(),
        &signed.signature,
    )?;
    let mut edited = signed.clone();
    edited.proof.reason = endpoint_types::resource::CloseReason::Retired;
    assert!(
        certs::record_signature::verify_with_cert(
            &cert_der,
            edited.proof.canonical().as_bytes(),
            &edited.signature,
        )
        .is_err(),
        "an edited proof must not verify"
    );
    // The record sits in a chain that still verifies.
    let verified = s.agent.verify_trail()?.ok()?;
    assert_eq!(verified["ok"], true, "{verified}");

    assert_eq!(s.admin(&count), "0");
    let r = psql(&cs, "SELECT 1");
    assert!(
        !r.ok,
        "the endpoint of a revoked appliance still let psql in"
    );
    Ok(())
}

/// The DER of the first certificate in `pem`.
fn pem_der(pem: &str) -> Result<Vec<u8>> {
    use base64::Engine as _;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(body)?)
}

#[test]
fn past_the_session_limit_psql_gets_53300() -> Result<()> {
    let s = setup_with("pg-limit", Some(1))?;
    let (_id, cs) = s.create("pg-limit", "10m")?;
    let mut holder = psql_cmd(&cs, &["-c", "SELECT pg_sleep(30)"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    assert!(wait_until(Duration::from_secs(20), || {
        s.admin(
        "SELECT count(*) FROM pg_stat_activity WHERE usename LIKE 'postern\\_ep\\_%' AND query LIKE '%pg_sleep%'"
    ) == "1"
    }));
    let r = psql(&cs, "SELECT 1");
    assert!(!r.ok);
    assert!(
        r.stderr.contains("sorry, too many clients already"),
        "{}",
        r.stderr
    );
    assert!(s
        .vendor_records("denied")
        .iter()
        .any(|r| r["detail"]["sqlstate"] == "53300"));
    let _ = holder.kill();
    let _ = holder.wait();
    Ok(())
}

/// A database that takes encrypted logins only, as managed ones do (RDS with rds.force_ssl):
/// the agent reaches it with `sslmode=verify-full` and the CA file from `admin_url`, for the
/// role and for every session, and psql through the endpoint works as usual.
#[test]
fn sessions_reach_a_tls_only_database_with_verify_full() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let now = jiff::Timestamp::now();
    let ca = certs::Ca::generate("appliance db CA", now)?;
    let server = ca.issue_server(&["localhost".to_string()], now, Duration::from_secs(3600))?;
    let ca_file = dir.path().join("db-ca.pem");
    std::fs::write(&ca_file, ca.cert_pem())?;
    let cluster = PgCluster::start_with(&Options {
        scram_for_others: true,
        tls: Some((server.cert_pem.clone(), server.key_pem.expose().to_string())),
        tls_only: true,
    });
    let ca_path = ca_file.display().to_string();
    let s = setup_on(
        "pg-tls",
        None,
        cluster,
        dir,
        |url| {
            format!(
                "{}?sslmode=verify-full&sslrootcert={ca_path}",
                url.replace("127.0.0.1", "localhost")
            )
        },
        None,
    )?;
    let (_id, cs) = s.create("pg-tls", "1h")?;
    let r = psql(&cs, "SELECT name FROM items; SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid();");
    assert!(r.ok, "{}", r.stderr);
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("first"));
    let ssl = lines.next().unwrap_or_default();
    assert!(
        ssl.starts_with("t|TLSv1."),
        "the session's backend connection is encrypted: {ssl}"
    );
    // Plaintext is refused by this server, so nothing above went around TLS.
    let plain = s
        .cluster
        .try_psql(&format!("{}?sslmode=disable", s.db_url), "SELECT 1");
    assert!(
        plain.is_err_and(|e| e.contains("no encryption")),
        "the server forces TLS"
    );
    Ok(())
}

/// Records of one endpoint in a trail.
fn of<'a>(records: &'a [Value], endpoint: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    records.iter().filter(move |r| r["endpoint_id"] == endpoint)
}

/// Startup parameters and `options` outside the allow-list are refused with a FATAL that psql
/// prints, and the refusal is in both trails; allowed settings pass. Fastpath calls (psql's
/// `\lo_import` uses them through libpq) are audited in both trails like statements.
#[test]
fn startup_settings_are_allow_listed_and_fastpath_calls_are_audited() -> Result<()> {
    let s = setup("pg-guard")?;
    let (id, cs) = s.create("pg-guard", "10m")?;

    let mut refused_attempts = 0;
    for (how, pgoptions, url_options, expect) in [
        (
            "PGOPTIONS -c role",
            Some("-c role=postgres"),
            None,
            "setting \"role\" in options is not allowed",
        ),
        (
            "options=-crole",
            None,
            Some("-crole%3Dpostgres"),
            "setting \"role\" in options is not allowed",
        ),
        (
            "options=-ecrole",
            None,
            Some("-ecrole%3Dpostgres"),
            "\"-ecrole=postgres\" is not allowed",
        ),
        (
            "options=--role",
            None,
            Some("--role%3Dpostgres"),
            "setting \"role\" in options is not allowed",
        ),
        (
            "PGOPTIONS search_path",
            Some("-c search_path=secret"),
            None,
            "setting \"search_path\" in options is not allowed",
        ),
        (
            "PGOPTIONS session_authorization",
            Some("--session-authorization=postern"),
            None,
            "not allowed",
        ),
    ] {
        let target = match url_options {
            Some(o) => format!("{cs}&options={o}"),
            None => cs.clone(),
        };
        let mut c = psql_cmd(&target, &["-c", "SELECT current_user"]);
        if let Some(o) = pgoptions {
            c.env("PGOPTIONS", o);
        }
        let r = psql_with(c);
        assert!(!r.ok, "{how}: connected as {}", r.stdout);
        assert!(
            r.stderr.contains("FATAL:  ") && r.stderr.contains(expect),
            "{how}: {}",
            r.stderr
        );
        refused_attempts += 1;
    }
    // A harmless setting passes, as a parameter and in options.
    let mut c = psql_cmd(
        &cs,
        &[
            "-c",
            "SELECT current_setting('application_name'), current_setting('statement_timeout')",
        ],
    );
    c.env("PGOPTIONS", "-c statement_timeout=7s")
        .env("PGAPPNAME", "harmless-app");
    let r = psql_with(c);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout, "harmless-app|7s");

    // Both trails hold every refusal with its reason.
    let denied_with = |records: Vec<Value>| {
        of(&records, &id)
            .filter(|r| r["detail"]["action"] == "session")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(wait_until(Duration::from_secs(10), || denied_with(
        s.customer_records("denied")
    )
    .len()
        >= refused_attempts));
    for (trail, records) in [
        ("vendor", denied_with(s.vendor_records("denied"))),
        ("customer", denied_with(s.customer_records("denied"))),
    ] {
        assert_eq!(records.len(), refused_attempts, "{trail}: {records:?}");
        let reasons: Vec<&str> = records
            .iter()
            .filter_map(|r| r["detail"]["reason"].as_str())
            .collect();
        for want in [
            "\"role\"",
            "\"-ecrole=postgres\"",
            "\"search_path\"",
            "\"session-authorization\"",
        ] {
            assert!(
                reasons.iter().any(|r| r.contains(want)),
                "{trail} trail lacks {want}: {reasons:?}"
            );
        }
        assert!(
            records.iter().all(|r| r["detail"]["sqlstate"] == "42501"),
            "{trail}: {records:?}"
        );
    }
    // None of them reached the database.
    assert_eq!(
        of(&s.customer_records("session.opened"), &id).count(),
        1,
        "only the allowed session opened"
    );

    // Fastpath: \lo_import sends FunctionCall messages (lo_creat, lo_open, lowrite, lo_close).
    let file = s.home.join("upload.bin");
    std::fs::write(&file, b"large object payload, never in the audit")?;
    let r = psql(&cs, &format!("\\lo_import '{}'", file.display()));
    assert!(
        r.ok && r.stdout.starts_with("lo_import "),
        "{} {}",
        r.stdout,
        r.stderr
    );
    let lowrite: u64 = s.admin("SELECT 'lowrite'::regproc::oid").parse()?;
    let has_lowrite = |records: Vec<Value>| {
        of(&records, &id).any(|r| {
            r["detail"]["message"] == "function_call"
                && r["detail"]["protocol"] == "fastpath"
                && r["detail"]["function_oid"] == lowrite
                && r["detail"]["args"] == 2
        })
    };
    assert!(wait_until(Duration::from_secs(10), || has_lowrite(
        s.vendor_records("sql.statement")
    )));
    assert!(wait_until(Duration::from_secs(10), || has_lowrite(
        s.customer_records("sql.statement")
    )));
    let trail_text = std::fs::read_to_string(s.agent.config.with_file_name("audit.jsonl"))?;
    assert!(
        !trail_text.contains("large object payload"),
        "argument values are never recorded"
    );
    // The large object is the endpoint's role's; without owner_role it goes with the role, never to the admin.
    s.cli(&["ops", "endpoint", "retire", &id])?;
    assert!(wait_until(Duration::from_secs(15), || s.admin(&format!(
        "SELECT count(*) FROM pg_roles WHERE rolname = 'postern_{id}'"
    )) == "0"));
    assert_eq!(s.admin("SELECT count(*) FROM pg_largeobject_metadata"), "0");
    assert_eq!(s.gw.cli(&["audit", "verify"])?.ok()?["ok"], true);
    assert_eq!(s.agent.verify_trail()?.ok()?["ok"], true);
    Ok(())
}

/// The escalation: a SECURITY DEFINER function made through one endpoint must never run as
/// the admin once the endpoint is gone. Without `owner_role` nothing can be created (in scope
/// or in `public`, even when PUBLIC has CREATE on it as on clusters upgraded from 14 or older:
/// then the endpoint is refused); with it, what was made belongs to `owner_role`. An
/// `owner_role` with powers stops the agent at start-up.
#[test]
fn objects_made_through_an_endpoint_never_become_the_admins() -> Result<()> {
    let s = setup("pg-own")?;
    let definer = |schema: &str| {
        format!("CREATE FUNCTION {schema}.esc() RETURNS text LANGUAGE sql SECURITY DEFINER AS 'SELECT current_user::text'")
    };

    // No owner_role: no CREATE anywhere.
    let (plain, cs) = s.create("pg-own", "10m")?;
    for (sql, expect) in [
        (definer("public"), "permission denied for schema public"),
        (definer("app"), "permission denied for schema app"),
        (
            "CREATE VIEW app.peek AS SELECT name FROM app.items".to_string(),
            "permission denied for schema app",
        ),
        (
            "CREATE SCHEMA mine".to_string(),
            "permission denied for database",
        ),
    ] {
        let r = psql(&cs, &sql);
        assert!(
            !r.ok && r.stderr.contains("42501") && r.stderr.contains(expect),
            "{sql}: {}",
            r.stderr
        );
    }
    s.cli(&["ops", "endpoint", "retire", &plain])?;

    // A cluster where PUBLIC may create in public: the endpoint's role is refused, not made.
    s.admin("GRANT CREATE ON SCHEMA public TO PUBLIC");
    let (upgraded, cs) = s.create("pg-own", "10m")?;
    assert!(wait_until(Duration::from_secs(15), || of(
        &s.customer_records("pg.role_failed"),
        &upgraded
    )
    .any(|r| r["detail"]["error"].as_str().is_some_and(
        |e| e.contains("REVOKE CREATE ON SCHEMA \"public\" FROM PUBLIC")
    ))));
    let r = psql(&cs, &definer("public"));
    assert!(
        !r.ok && r.stderr.contains("FATAL") && r.stderr.contains("no database role"),
        "{}",
        r.stderr
    );
    assert_eq!(
        s.admin("SELECT count(*) FROM pg_proc WHERE proname = 'esc'"),
        "0"
    );
    s.admin("REVOKE CREATE ON SCHEMA public FROM PUBLIC");
    s.cli(&["ops", "endpoint", "retire", &upgraded])?;

    // CREATE in scope with owner_role: endpoint 1 makes a SECURITY DEFINER function and a view.
    let (first, cs) = s.create_on("pg-own", OWNED, "10m")?;
    let r = psql(
        &cs,
        &format!(
            "{}; CREATE VIEW app.peek AS SELECT name FROM app.items",
            definer("app")
        ),
    );
    assert!(r.ok, "{}", r.stderr);
    let r = psql(&cs, &definer("public"));
    assert!(
        !r.ok && r.stderr.contains("permission denied for schema public"),
        "{}",
        r.stderr
    );
    s.cli(&["ops", "endpoint", "retire", &first])?;
    assert!(wait_until(Duration::from_secs(15), || s.admin(&format!(
        "SELECT count(*) FROM pg_roles WHERE rolname = 'postern_{first}'"
    )) == "0"));
    // What it made belongs to owner_role: the admin calling it runs as app_owner, not as itself.
    assert_eq!(
        s.admin("SELECT proowner::regrole::text FROM pg_proc WHERE proname = 'esc' UNION ALL SELECT relowner::regrole::text FROM pg_class WHERE relname = 'peek'"),
        "app_owner\napp_owner"
    );
    assert_eq!(s.admin("SELECT app.esc()"), "app_owner");
    // Endpoint 2 calling it runs as app_owner too; the view reads with app_owner's privileges
    // (none on app.items), not the admin's.
    let (_second, cs) = s.create("pg-own", "10m")?;
    let r = psql(&cs, "SELECT app.esc()");
    assert!(r.ok && r.stdout == "app_owner", "{} {}", r.stdout, r.stderr);
    let r = psql(&cs, "SELECT * FROM app.peek");
    assert!(
        !r.ok && r.stderr.contains("permission denied for table items"),
        "{} {}",
        r.stdout,
        r.stderr
    );

    // An owner_role with powers stops an agent at start-up, with the reason.
    let dir = s.home.join("bad-agent");
    let (url, _) = s.db_url.split_once('?').unwrap_or((&s.db_url, ""));
    let body = format!(
        "[[resource]]\nid = \"{OWNED}\"\nkind = \"postgres\"\nadmin_url = \"{url}\"\nschemas = [\"app\"]\n\
         privileges = [\"SELECT\", \"CREATE\"]\nowner_role = \"creator\"\n"
    );
    let bad = Agent::enroll(&s.gw, &dir, "pg-own-bad", "acme-corp", &body)?;
    let mut run = Command::new(postern::testbed::bin("postern-agent")?)
        .args(["run", "--config"])
        .arg(&bad.config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (out, err) = wait_output(&mut run, Duration::from_secs(30))?;
    let status = run.wait()?;
    assert!(
        !status.success(),
        "the agent ran with a CREATEROLE owner_role: {out}"
    );
    assert!(
        err.contains("\"creator\" has CREATEROLE") && err.contains(OWNED),
        "{err}"
    );
    Ok(())
}

/// The gateway's store (its own PostgreSQL cluster) stops while psql runs a stream of
/// INSERTs: statements are pipelined (their records written by group commit), so the session
/// is cut the moment the trail cannot be written, psql is told why, and every row that reached
/// the database has its `sql.statement` record once the store is back. New sessions are
/// refused meanwhile and work again after the restart.
#[test]
fn a_store_outage_cuts_psql_and_no_statement_runs_unrecorded() -> Result<()> {
    let store = PgCluster::start_with(&Options::default());
    let store_url = store.create_database("pg_outage_store");
    let target = PgCluster::start_with(&Options {
        scram_for_others: true,
        ..Options::default()
    });
    let s = setup_on(
        "pg-outage",
        None,
        target,
        tempfile::tempdir()?,
        |url| url.to_string(),
        Some(&store_url),
    )?;
    let (id, cs) = s.create("pg-outage", "10m")?;
    let script = s.home.join("inserts.sql");
    std::fs::write(
        &script,
        "INSERT INTO app.items (name) SELECT 'outage' FROM pg_sleep(0.01);\n".repeat(3000),
    )?;
    let mut inserts = psql_cmd(&cs, &["-f", &script.display().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let count = || s.admin("SELECT count(*) FROM app.items WHERE name = 'outage'");
    assert!(wait_until(Duration::from_secs(20), || count()
        .parse::<u32>()
        .is_ok_and(|n| n >= 20)));

    store.stop();
    let stopped = Instant::now();
    let (_, err) = wait_output(&mut inserts, Duration::from_secs(20))?;
    eprintln!("psql cut {:?} after the store stopped", stopped.elapsed());
    assert!(
        err.contains("vendor audit trail cannot be written"),
        "psql said: {err}"
    );
    let ran: usize = count().parse()?;
    assert!(ran < 3000, "the session ran to its end");
    // New sessions are refused with the reason.
    let refused = psql(&cs, "SELECT 1");
    assert!(!refused.ok);
    assert!(
        refused
            .stderr
            .contains("vendor audit trail cannot be written"),
        "{}",
        refused.stderr
    );

    store.restart();
    assert!(
        wait_until(Duration::from_secs(30), || psql(&cs, "SELECT 1").ok),
        "sessions did not work again"
    );
    // Every statement that reached the database is in the vendor trail (held through the
    // outage, written on recovery), and the session's end says `error`.
    let mut recorded = 0;
    assert!(
        wait_until(Duration::from_secs(15), || {
            recorded = s
                .vendor_records("sql.statement")
                .iter()
                .filter(|r| {
                    r["endpoint_id"] == id.as_str() && r["detail"].to_string().contains("'outage'")
                })
                .count();
            recorded >= ran
        }),
        "{ran} rows inserted, {recorded} statements recorded"
    );
    assert!(s
        .vendor_records("session.closed")
        .iter()
        .any(|r| r["endpoint_id"] == id.as_str() && r["detail"]["reason"] == "error"));
    assert!(!s.vendor_records("audit.store_recovered").is_empty());
    assert!(
        s.gw.cli(&["audit", "verify"])?.success,
        "the chain verifies"
    );
    Ok(())
}

/// The customer's trail on a full disk: a live psql session is cut with a FATAL naming
/// `AUDIT_UNAVAILABLE`, new sessions are refused the same way before reaching the database,
/// the agent keeps running and says why; with space again psql works and the trail verifies.
#[test]
fn full_trail_disk_gives_psql_a_fatal_and_the_agent_recovers() -> Result<()> {
    let mut s = setup("pg-trail")?;
    let (id, cs) = s.create("pg-trail", "10m")?;
    let agent_dir = s._dir.path().join("agent");
    let Some(disk) = TinyDisk::mount(&agent_dir.join("trail"), "256k")? else {
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
    assert!(wait_until(Duration::from_secs(20), || psql(
        &cs, "SELECT 1"
    )
    .ok));
    let role = format!("postern_{id}");
    let mut sleeper = psql_cmd(&cs, &["-c", "SELECT pg_sleep(3600)"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    assert!(wait_until(Duration::from_secs(20), || s.admin(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}' AND query LIKE '%pg_sleep%'"
    )) == "1"));

    let filler = disk.fill()?;
    // The trail's last page may still take a few records; then a session is refused.
    let mut refusal = None;
    for i in 0..40 {
        let r = psql(
            &cs,
            &format!("INSERT INTO app.items (name) VALUES ('full-{i}')"),
        );
        if !r.ok {
            refusal = Some(r.stderr);
            break;
        }
    }
    let refusal = refusal.ok_or_else(|| anyhow!("psql kept working with the disk full"))?;
    assert!(
        refusal.contains("FATAL") && refusal.contains("AUDIT_UNAVAILABLE"),
        "psql said: {refusal}"
    );
    let (_, err) = wait_output(&mut sleeper, Duration::from_secs(30))?;
    assert!(
        err.contains("FATAL") && err.contains("AUDIT_UNAVAILABLE") && err.contains("audit_path"),
        "the live session was not told why: {err}\nagent log:\n{}\ngateway log:\n{}",
        std::fs::read_to_string(&s.agent.log).unwrap_or_default(),
        std::fs::read_to_string(&s.gw.log).unwrap_or_default()
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
        wait_until(Duration::from_secs(10), || psql(
            &cs,
            "INSERT INTO app.items (name) VALUES ('after')"
        )
        .ok),
        "psql did not work again once the disk had space"
    );
    let after = |r: &Value| {
        r["kind"] == "sql.statement"
            && r["detail"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("'after'"))
    };
    let trail = s.agent.trail_when(|t| t.iter().any(after))?;
    assert!(trail.iter().any(after), "no 'after' statement in {trail:?}");
    let verified = s.agent.verify_trail()?.ok()?;
    assert_eq!(verified["ok"], true, "{verified}");
    s.agent.stop();
    drop(disk);
    Ok(())
}
