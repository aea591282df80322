//! The ephemeral role against a real throwaway PostgreSQL: it reads and writes its granted
//! schema, and the server itself refuses everything else; teardown leaves nothing behind.

use postern::pg_cluster;
use std::time::Duration;
use tunnel_client::{config::AgentConfig, postgres};

fn resource(url: &str) -> tunnel_client::config::ResourceConfig {
    resource_with(url, "privileges = [\"SELECT\", \"INSERT\"]\n")
}

/// A resource on `url`'s database, schema `app`, with `extra` keys (privileges, owner_role).
fn resource_with(url: &str, extra: &str) -> tunnel_client::config::ResourceConfig {
    config_with(url, extra).resources[0].clone()
}

fn config_with(url: &str, extra: &str) -> AgentConfig {
    let text = format!(
        "audit_path = \"a\"\n[[resource]]\nid = \"aws_db_instance.main\"\nkind = \"postgres\"\nadmin_url = \"{url}\"\n\
         schemas = [\"app\"]\n{extra}"
    );
    AgentConfig::parse(&text, std::path::Path::new("/etc/postern/agent.toml")).unwrap()
}

async fn connect(url: &str, user: &str, password: &str) -> tokio_postgres::Client {
    let mut c: tokio_postgres::Config = url.parse().unwrap();
    c.user(user).password(password);
    let (client, conn) = c.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn sqlstate(r: Result<impl Sized, tokio_postgres::Error>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e
            .code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_is_scoped_by_the_server_and_dropped_with_its_backends() {
    let roles = postgres::PgState::default();
    let cluster = pg_cluster::shared();
    let url = cluster.create_database("role");
    cluster.psql(
        &url,
        "CREATE SCHEMA app; CREATE TABLE app.items (id serial primary key, name text); \
         INSERT INTO app.items (name) VALUES ('a'); CREATE SCHEMA secret; CREATE TABLE secret.keys (k text); \
         INSERT INTO secret.keys VALUES ('s');",
    );
    let res = resource(&url);
    postgres::validate_config(&res).unwrap();
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600);
    roles
        .prepare_role(&res, "ep_roletest1", expires)
        .await
        .unwrap();
    // Announced again (agent reconnect): nothing changes.
    roles
        .prepare_role(&res, "ep_roletest1", expires)
        .await
        .unwrap();
    let role = roles.ready_role("ep_roletest1").await.unwrap();
    assert_eq!(role.name, "postern_ep_roletest1");

    let attrs = cluster.psql(
        &url,
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolinherit, rolreplication, rolbypassrls, rolconnlimit, \
         rolvaliduntil IS NOT NULL, rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'postern_ep_roletest1'",
    );
    assert_eq!(attrs.trim(), "f|f|f|f|f|f|64|t|t");

    let c = connect(&url, &role.name, role.password.expose()).await;
    // search_path is the granted schema.
    let n: i64 = c
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    c.batch_execute("INSERT INTO items (name) VALUES ('b')")
        .await
        .unwrap();
    let refusals = [
        ("other schema", "SELECT * FROM secret.keys"),
        ("update not granted", "UPDATE app.items SET name = 'x'"),
        ("pg_authid", "SELECT * FROM pg_authid"),
        ("pg_read_file", "SELECT pg_read_file('postgresql.conf')"),
        ("copy to program", "COPY (SELECT 1) TO PROGRAM 'true'"),
        ("set role", "SET ROLE postern"),
        (
            "set session authorization",
            "SET SESSION AUTHORIZATION postern",
        ),
        ("create extension", "CREATE EXTENSION pgcrypto"),
        ("alter system", "ALTER SYSTEM SET work_mem = '1MB'"),
        ("create table in public", "CREATE TABLE public.t (x int)"),
        ("create schema", "CREATE SCHEMA mine"),
    ];
    for (name, sql) in refusals {
        assert_eq!(
            sqlstate(c.batch_execute(sql).await),
            "42501",
            "{name}: {sql}"
        );
    }

    // A long query is cut by teardown; the role and its backends are gone.
    let sleeper = connect(&url, &role.name, role.password.expose()).await;
    let sleeping =
        tokio::spawn(async move { sqlstate(sleeper.batch_execute("SELECT pg_sleep(3600)").await) });
    let gate = connect(&url, "postern", "").await;
    for _ in 0..200 {
        let active: i64 = gate
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND query LIKE '%pg_sleep%'", &[&role.name])
            .await
            .unwrap()
            .get(0);
        if active > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    roles.teardown_role("ep_roletest1").await.unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .unwrap()
        .unwrap();
    assert!(
        cut == "57P01" || cut.contains("closed"),
        "the sleeping query ended with {cut}"
    );
    let left: i64 = gate
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
            &[&role.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let exists: i64 = gate
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = $1",
            &[&role.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(exists, 0);
    assert!(roles.ready_role("ep_roletest1").await.is_err());
    // Tearing down twice is harmless.
    roles.teardown_role("ep_roletest1").await.unwrap();
}

#[tokio::test]
async fn a_role_left_by_a_crashed_agent_is_replaced() {
    let roles = postgres::PgState::default();
    let cluster = pg_cluster::shared();
    let url = cluster.create_database("leftover");
    cluster.psql(
        &url,
        "CREATE SCHEMA app; CREATE ROLE postern_ep_leftover1 LOGIN PASSWORD 'old'",
    );
    let res = resource(&url);
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60);
    roles
        .prepare_role(&res, "ep_leftover1", expires)
        .await
        .unwrap();
    let role = roles.ready_role("ep_leftover1").await.unwrap();
    let valid = cluster.psql(
        &url,
        "SELECT rolvaliduntil IS NOT NULL FROM pg_roles WHERE rolname = 'postern_ep_leftover1'",
    );
    assert_eq!(valid.trim(), "t");
    drop(role);
    roles.teardown_role("ep_leftover1").await.unwrap();
}

#[test]
fn our_verifiers_match_the_ones_postgres_makes() {
    let cluster = pg_cluster::shared();
    let url = cluster.create_database("verifier");
    cluster.psql(&url, "SET password_encryption = 'scram-sha-256'; CREATE ROLE verifier_check PASSWORD 'correct horse'");
    let stored = cluster.psql(
        &url,
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'verifier_check'",
    );
    let v = certs::scram::Verifier::parse(stored.trim()).unwrap();
    assert_eq!(v.to_string(), stored.trim());
    assert!(v.matches("correct horse"));
    assert!(!v.matches("correct horse "));
    cluster.psql(&url, "DROP ROLE verifier_check");
}

#[test]
fn bad_postgres_resources_are_config_errors() {
    for (extra, want) in [
        ("privileges = [\"ALL\"]\n", "privileges"),
        ("schemas = []\n", "schemas"),
        (
            "privileges = [\"SELECT\", \"CREATE\"]\n",
            "needs `owner_role`",
        ),
        (
            "privileges = [\"SELECT\"]\nowner_role = \"pg_write_server_files\"\n",
            "owner_role",
        ),
        (
            "admin_url = \"postgres://x@h/db?sslmode=verify-full\"\n",
            "sslrootcert",
        ),
        (
            "admin_url = \"postgres://x@h/db?sslmode=allow\"\n",
            "sslmode",
        ),
        (
            "admin_url = \"postgres://x@h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem\"\n",
            "sslrootcert",
        ),
    ] {
        let text = format!(
            "audit_path = \"a\"\n[[resource]]\nid = \"db\"\nkind = \"postgres\"\n{}{extra}",
            if extra.starts_with("admin_url") {
                ""
            } else {
                "admin_url = \"postgres://x@127.0.0.1/db\"\n"
            }
        );
        // agent.toml is refused as a whole, naming the resource and the key.
        let e = AgentConfig::parse(&text, std::path::Path::new("/a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("resource \"db\"") && e.contains(want), "{e}");
    }
}

/// A database that forces TLS, as managed ones do: the admin connection and the role's
/// sessions go over TLS as `admin_url`'s sslmode/sslrootcert say, and a certificate that does
/// not check out is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_as_admin_url_asks_against_a_tls_only_database() {
    let roles = postgres::PgState::default();
    let now = jiff::Timestamp::now();
    let ca = certs::Ca::generate("appliance db CA", now).unwrap();
    let other_ca = certs::Ca::generate("someone else's CA", now).unwrap();
    // Named for localhost only: 127.0.0.1 passes verify-ca but not verify-full.
    let server = ca
        .issue_server(&["localhost".to_string()], now, Duration::from_secs(3600))
        .unwrap();
    let cluster = pg_cluster::PgCluster::start_with(&pg_cluster::Options {
        scram_for_others: true,
        tls: Some((server.cert_pem.clone(), server.key_pem.expose().to_string())),
        tls_only: true,
    });
    let url = cluster.create_database("tls");
    cluster.psql(&url, "CREATE SCHEMA app; CREATE TABLE app.items (name text); INSERT INTO app.items VALUES ('a');");
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (dir.path().join("ca.pem"), dir.path().join("other.pem"));
    std::fs::write(&good, ca.cert_pem()).unwrap();
    std::fs::write(&bad, other_ca.cert_pem()).unwrap();
    let by_name = url.replace("127.0.0.1", "localhost");
    let expires = now + jiff::SignedDuration::from_secs(3600);
    let attempt = |n: usize, url: String| {
        let (res, roles) = (resource(&url), roles.clone());
        async move {
            postgres::validate_config(&res).map_err(|e| format!("config: {e}"))?;
            roles
                .prepare_role(&res, &format!("ep_tls{n}"), expires)
                .await
                .map_err(|e| e.to_string())
        }
    };
    let cases = [
        (
            format!(
                "{by_name}?sslmode=verify-full&sslrootcert={}",
                good.display()
            ),
            None,
        ),
        (
            format!("{url}?sslmode=verify-ca&sslrootcert={}", good.display()),
            None,
        ),
        (format!("{url}?sslmode=require"), None),
        (
            format!("{url}?sslmode=verify-full&sslrootcert={}", good.display()),
            Some("not valid for name"),
        ),
        (
            format!(
                "{by_name}?sslmode=verify-full&sslrootcert={}",
                bad.display()
            ),
            Some("UnknownIssuer"),
        ),
        (format!("{url}?sslmode=disable"), Some("no encryption")),
    ];
    for (n, (url, refused)) in cases.into_iter().enumerate() {
        let got = attempt(n, url.clone()).await;
        match refused {
            None => assert_eq!(got, Ok(()), "{url}"),
            Some(why) => {
                let e = got.expect_err(&url);
                assert!(e.contains(why), "{url}: {e}");
            }
        }
    }
    // The server takes encrypted logins only (sslmode=disable was refused), so the roles
    // made above were made over TLS.
    let role = roles.ready_role("ep_tls0").await.unwrap();
    assert_eq!(role.admin.tls.mode, postgres::tls::SslMode::VerifyFull);
    for n in 0..3 {
        roles.teardown_role(&format!("ep_tls{n}")).await.unwrap();
    }
}

/// What an endpoint's role creates goes to `owner_role` at teardown, never to the admin: a
/// `SECURITY DEFINER` function made through endpoint 1 runs as `owner_role` afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_an_endpoint_made_go_to_owner_role_never_to_the_admin() {
    let roles = postgres::PgState::default();
    let cluster = pg_cluster::shared();
    let url = cluster.create_database("owner");
    cluster.psql(
        &url,
        "CREATE SCHEMA app; CREATE TABLE app.items (name text); CREATE ROLE app_owner_t NOLOGIN;",
    );
    let res = resource_with(
        &url,
        "privileges = [\"SELECT\", \"CREATE\"]\nowner_role = \"app_owner_t\"\n",
    );
    postgres::validate_config(&res).unwrap();
    postgres::check_owner_roles(&config_with(
        &url,
        "privileges = [\"SELECT\", \"CREATE\"]\nowner_role = \"app_owner_t\"\n",
    ))
    .await
    .unwrap();
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600);
    roles
        .prepare_role(&res, "ep_owner1", expires)
        .await
        .unwrap();
    let role = roles.ready_role("ep_owner1").await.unwrap();
    let c = connect(&url, &role.name, role.password.expose()).await;
    c.batch_execute(
        "CREATE FUNCTION app.whoami() RETURNS text LANGUAGE sql SECURITY DEFINER AS 'SELECT current_user::text'; \
         CREATE VIEW app.peek AS SELECT current_user::text AS who",
    )
    .await
    .unwrap();
    // Only in scope: not in public, no schema of its own.
    assert_eq!(
        sqlstate(c.batch_execute("CREATE TABLE public.t (x int)").await),
        "42501"
    );
    assert_eq!(
        sqlstate(c.batch_execute("CREATE SCHEMA mine").await),
        "42501"
    );
    drop(c);
    roles.teardown_role("ep_owner1").await.unwrap();
    let owners = cluster.psql(
        &url,
        "SELECT (SELECT proowner::regrole::text FROM pg_proc WHERE proname = 'whoami'), \
         (SELECT relowner::regrole::text FROM pg_class WHERE relname = 'peek'), app.whoami()",
    );
    assert_eq!(
        owners.trim(),
        "app_owner_t|app_owner_t|app_owner_t",
        "the admin runs it as owner_role, not as itself"
    );
}

/// Without `owner_role` the role can create nothing: PUBLIC's CREATE on `public` (clusters
/// made by PostgreSQL 14 or older) refuses the endpoint rather than let it; an owner_role
/// with powers is refused at start-up and when a role is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_outside_scope_and_powerful_owners_are_refused() {
    let roles = postgres::PgState::default();
    let cluster = pg_cluster::shared();
    let url = cluster.create_database("pubcreate");
    cluster.psql(&url, "CREATE SCHEMA app; GRANT CREATE ON SCHEMA public TO PUBLIC; CREATE ROLE creator_t NOLOGIN CREATEROLE;");
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600);
    let e = roles
        .prepare_role(&resource(&url), "ep_pub1", expires)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"public\"") && e.contains("REVOKE CREATE ON SCHEMA \"public\" FROM PUBLIC"),
        "{e}"
    );
    let none = cluster.psql(
        &url,
        "SELECT count(*) FROM pg_roles WHERE rolname = 'postern_ep_pub1'",
    );
    assert_eq!(none.trim(), "0", "the refused role is not left behind");
    cluster.psql(&url, "REVOKE CREATE ON SCHEMA public FROM PUBLIC");
    roles
        .prepare_role(&resource(&url), "ep_pub2", expires)
        .await
        .unwrap();
    roles.teardown_role("ep_pub2").await.unwrap();

    let bad = "privileges = [\"SELECT\", \"CREATE\"]\nowner_role = \"creator_t\"\n";
    let e = postgres::check_owner_roles(&config_with(&url, bad))
        .await
        .unwrap_err();
    assert!(e.message.contains("\"creator_t\" has CREATEROLE"), "{e:?}");
    let e = roles
        .prepare_role(&resource_with(&url, bad), "ep_pub3", expires)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("CREATEROLE"), "{e}");
    let missing = "privileges = [\"SELECT\"]\nowner_role = \"nobody_t\"\n";
    let e = postgres::check_owner_roles(&config_with(&url, missing))
        .await
        .unwrap_err();
    assert!(e.message.contains("does not exist"), "{e:?}");
}
