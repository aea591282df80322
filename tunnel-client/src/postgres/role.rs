//! The ephemeral login role an endpoint gets in the customer's database.
//!
//! Scope is enforced by PostgreSQL's own privileges: the role is an ordinary unprivileged
//! login with exactly the configured grants, so whatever SQL comes through, the server decides.
//! The statements are built by pure functions (unit-tested); [`Admin`] runs them.

use super::tls::{split_tls_options, DbTls};
use crate::config::ResourceConfig;
use jiff::Timestamp;
use std::time::Duration;
use tokio_postgres::{Client, Config};

/// Most sessions an endpoint can hold at once at the database (the gateway's own limit is
/// the same; this one holds even if the gateway were wrong).
pub const CONNECTION_LIMIT: u32 = 64;
const ADMIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long teardown waits for terminated backends to be gone before dropping the role.
const BACKENDS_GONE_WAIT: Duration = Duration::from_secs(5);

/// Table privileges a resource may grant (`privileges` in agent.toml).
pub const PRIVILEGES: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "TRUNCATE",
    "REFERENCES",
    "TRIGGER",
];

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("admin_url: {0}")]
    Config(String),
    #[error("cannot read admin_password_file: {0}")]
    PasswordFile(std::io::Error),
    #[error("cannot connect to the database as admin: {0}")]
    Connect(String),
    #[error("database refused {what}: {error}")]
    Sql { what: String, error: String },
}

/// `"ident"` with embedded quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `'literal'` with embedded quotes doubled. Only for values we make ourselves (timestamps,
/// verifiers); a backslash is refused so the result is the same whatever
/// `standard_conforming_strings` says.
pub fn quote_literal(s: &str) -> Option<String> {
    (!s.contains('\\') && !s.contains('\0')).then(|| format!("'{}'", s.replace('\'', "''")))
}

/// The role name for an endpoint: `postern_<endpoint id>`, letters, digits and `_` only.
pub fn role_name(endpoint_id: &str) -> String {
    let clean: String = endpoint_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let mut name = format!("postern_{clean}");
    name.truncate(63);
    name
}

/// What the role may do, from the resource's config (DESIGN defaults applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub database: String,
    pub schemas: Vec<String>,
    pub privileges: Vec<String>,
}

impl Scope {
    /// The same defaults the hello reports to the gateway ([`ResourceConfig::scope`]).
    pub fn of(resource: &ResourceConfig, admin: &Config) -> Scope {
        Scope {
            database: resource
                .database
                .clone()
                .or_else(|| admin.get_dbname().map(str::to_string))
                .unwrap_or_else(|| resource.pg_database()),
            schemas: resource.pg_schemas(),
            privileges: resource
                .pg_privileges()
                .iter()
                .map(|p| p.trim().to_ascii_uppercase())
                .collect(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.database.trim().is_empty() {
            return Err("`database` is empty".into());
        }
        if self.schemas.is_empty() || self.schemas.iter().any(|s| s.trim().is_empty()) {
            return Err("`schemas` must name at least one schema, none empty".into());
        }
        if let Some(p) = self
            .privileges
            .iter()
            .find(|p| !PRIVILEGES.contains(&p.as_str()))
        {
            return Err(format!(
                "`privileges`: {p:?} is not a table privilege (use {})",
                PRIVILEGES.join(", ")
            ));
        }
        if self.privileges.is_empty() {
            return Err("`privileges` is empty".into());
        }
        Ok(())
    }
}

/// The statements that create the role, run in one transaction in the scope's database.
/// `verifier` is the SCRAM verifier of the role's password (the clear password is never sent).
pub fn create_statements(
    role: &str,
    scope: &Scope,
    valid_until: Timestamp,
    verifier: &str,
) -> Option<Vec<String>> {
    let r = quote_ident(role);
    let privs = scope.privileges.join(", ");
    let mut out = vec![format!(
        "CREATE ROLE {r} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS \
         CONNECTION LIMIT {CONNECTION_LIMIT} VALID UNTIL {} PASSWORD {}",
        quote_literal(&valid_until.to_string())?,
        quote_literal(verifier)?
    )];
    out.push(format!(
        "GRANT CONNECT ON DATABASE {} TO {r}",
        quote_ident(&scope.database)
    ));
    for s in &scope.schemas {
        let s = quote_ident(s);
        out.push(format!("GRANT USAGE ON SCHEMA {s} TO {r}"));
        out.push(format!("GRANT {privs} ON ALL TABLES IN SCHEMA {s} TO {r}"));
        // Inserting into a serial column needs its sequence.
        if scope.privileges.iter().any(|p| p == "INSERT") {
            out.push(format!("GRANT USAGE ON ALL SEQUENCES IN SCHEMA {s} TO {r}"));
        }
    }
    let path: Vec<String> = scope.schemas.iter().map(|s| quote_ident(s)).collect();
    out.push(format!(
        "ALTER ROLE {r} SET search_path = {}",
        path.join(", ")
    ));
    Some(out)
}

/// The admin connection of one resource.
pub struct Admin {
    config: Config,
    pub tls: DbTls,
    pub scope: Scope,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config may hold the admin password.
        f.debug_struct("Admin")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// Parses `admin_url` (and reads `admin_password_file`) into a connection config and the
/// TLS it asks for.
pub fn admin_config(resource: &ResourceConfig) -> Result<(Config, DbTls), RoleError> {
    let url = resource
        .admin_url
        .as_ref()
        .ok_or_else(|| RoleError::Config("missing".into()))?;
    let options = split_tls_options(url.expose());
    let tls = DbTls::new(options.sslmode.as_deref(), options.sslrootcert.as_deref())
        .map_err(RoleError::Config)?;
    let mut config: Config = options
        .rest
        .parse()
        .map_err(|e: tokio_postgres::Error| RoleError::Config(e.to_string()))?;
    if let Some(f) = &resource.admin_password_file {
        let pw = std::fs::read_to_string(f).map_err(RoleError::PasswordFile)?;
        config.password(pw.trim_end_matches(['\r', '\n']));
    }
    if config.get_hosts().is_empty() {
        return Err(RoleError::Config("names no host".into()));
    }
    config.ssl_mode(tls.mode.for_tokio_postgres());
    config.connect_timeout(ADMIN_CONNECT_TIMEOUT);
    config.application_name("postern-agent");
    Ok((config, tls))
}

/// tokio-postgres says "error performing TLS handshake"; the why (a certificate's name or
/// issuer) is in its sources.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    for _ in 0..8 {
        let Some(s) = source else { break };
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

fn sql_err(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> RoleError {
    let what = what.into();
    move |e| RoleError::Sql {
        what,
        error: e
            .as_db_error()
            .map(|d| format!("{} ({})", d.message(), d.code().code()))
            .unwrap_or_else(|| e.to_string()),
    }
}

fn is_undefined_role(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT)
}

impl Admin {
    pub fn new(resource: &ResourceConfig) -> Result<Admin, RoleError> {
        let (config, tls) = admin_config(resource)?;
        let scope = Scope::of(resource, &config);
        scope.validate().map_err(RoleError::Config)?;
        Ok(Admin { config, tls, scope })
    }

    /// Where sessions connect: the admin URL's server, the scope's database.
    pub fn server(&self) -> &Config {
        &self.config
    }

    async fn connect(&self) -> Result<Client, RoleError> {
        let mut c = self.config.clone();
        c.dbname(&self.scope.database);
        let (client, conn) = c
            .connect(self.tls.make_connect())
            .await
            .map_err(|e| RoleError::Connect(with_causes(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
        Ok(client)
    }

    /// Creates the role (all or nothing).
    pub async fn create_role(
        &self,
        role: &str,
        valid_until: Timestamp,
        verifier: &str,
    ) -> Result<(), RoleError> {
        let statements = create_statements(role, &self.scope, valid_until, verifier)
            .ok_or_else(|| RoleError::Config("unquotable role attributes".into()))?;
        let mut client = self.connect().await?;
        let tx = client.transaction().await.map_err(sql_err("BEGIN"))?;
        for s in &statements {
            // Logged without the PASSWORD clause.
            let what = s.split(" PASSWORD ").next().unwrap_or_default().to_string();
            tx.batch_execute(s).await.map_err(sql_err(what))?;
        }
        tx.commit().await.map_err(sql_err("COMMIT"))
    }

    /// Ends the role: no new logins, its backends terminated, what it owns reassigned to the
    /// admin and its privileges revoked, then the role dropped. A role already gone is fine.
    pub async fn drop_role(&self, role: &str) -> Result<(), RoleError> {
        let client = self.connect().await?;
        let r = quote_ident(role);
        match client
            .batch_execute(&format!("ALTER ROLE {r} NOLOGIN"))
            .await
        {
            Err(e) if is_undefined_role(&e) => return Ok(()),
            other => other.map_err(sql_err("ALTER ROLE … NOLOGIN"))?,
        }
        let terminate =
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1";
        client
            .query_one(terminate, &[&role])
            .await
            .map_err(sql_err("pg_terminate_backend"))?;
        let started = std::time::Instant::now();
        loop {
            let left: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                    &[&role],
                )
                .await
                .map_err(sql_err("pg_stat_activity"))?
                .get(0);
            if left == 0 || started.elapsed() > BACKENDS_GONE_WAIT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client
            .batch_execute(&format!(
                "REASSIGN OWNED BY {r} TO CURRENT_USER; DROP OWNED BY {r}; DROP ROLE {r}"
            ))
            .await
            .map_err(sql_err("DROP ROLE"))
    }

    /// Roles this agent made that are still there (e.g. after a crash): `postern_ep_…`.
    pub async fn leftover_roles(&self) -> Result<Vec<String>, RoleError> {
        let client = self.connect().await?;
        let rows = client
            .query(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE 'postern\\_ep\\_%'",
                &[],
            )
            .await
            .map_err(sql_err("listing roles"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(privs: &[&str]) -> Scope {
        Scope {
            database: "app db".into(),
            schemas: vec!["app".into(), "we\"ird".into()],
            privileges: privs.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's").as_deref(), Some("'it''s'"));
        assert_eq!(quote_literal("a\\b"), None);
        assert_eq!(role_name("ep_7F3A-x"), "postern_ep_7f3a_x");
        assert_eq!(role_name(&"x".repeat(100)).len(), 63);
    }

    #[test]
    fn statements_grant_exactly_the_scope() {
        let at: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let s = create_statements(
            "postern_ep_1",
            &scope(&["SELECT", "INSERT"]),
            at,
            "SCRAM-SHA-256$4096:x$y:z",
        )
        .unwrap();
        assert_eq!(
            s,
            [
                "CREATE ROLE \"postern_ep_1\" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS \
                 CONNECTION LIMIT 64 VALID UNTIL '2026-01-01T00:00:00Z' PASSWORD 'SCRAM-SHA-256$4096:x$y:z'",
                "GRANT CONNECT ON DATABASE \"app db\" TO \"postern_ep_1\"",
                "GRANT USAGE ON SCHEMA \"app\" TO \"postern_ep_1\"",
                "GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA \"app\" TO \"postern_ep_1\"",
                "GRANT USAGE ON ALL SEQUENCES IN SCHEMA \"app\" TO \"postern_ep_1\"",
                "GRANT USAGE ON SCHEMA \"we\"\"ird\" TO \"postern_ep_1\"",
                "GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA \"we\"\"ird\" TO \"postern_ep_1\"",
                "GRANT USAGE ON ALL SEQUENCES IN SCHEMA \"we\"\"ird\" TO \"postern_ep_1\"",
                "ALTER ROLE \"postern_ep_1\" SET search_path = \"app\", \"we\"\"ird\"",
            ]
        );
        let read_only = create_statements("r", &scope(&["SELECT"]), at, "v").unwrap();
        assert!(!read_only.iter().any(|s| s.contains("SEQUENCES")));
    }

    #[test]
    fn scope_validation() {
        let cases: Vec<(Scope, bool)> = vec![
            (scope(&["SELECT"]), true),
            (scope(&["SELECT", "DELETE"]), true),
            (scope(&["ALL"]), false),
            (scope(&["SELECT; DROP TABLE x"]), false),
            (scope(&[]), false),
            (
                Scope {
                    schemas: vec![],
                    ..scope(&["SELECT"])
                },
                false,
            ),
            (
                Scope {
                    database: " ".into(),
                    ..scope(&["SELECT"])
                },
                false,
            ),
        ];
        for (s, ok) in cases {
            assert_eq!(s.validate().is_ok(), ok, "{s:?}");
        }
    }
}
