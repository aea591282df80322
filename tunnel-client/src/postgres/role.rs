//! The ephemeral login role an endpoint gets in the customer's database.
//!
//! Scope is enforced by PostgreSQL's own privileges: the role is an ordinary unprivileged
//! login with exactly the configured grants, so whatever SQL comes through, the server decides.
//! The statements are built by pure functions (unit-tested); [`Admin`] runs them.
//!
//! Objects the role creates never become the admin's: at teardown they are reassigned to the
//! resource's `owner_role` (an ordinary role the customer names and the agent checks), and
//! without one the role may create nothing at all: it gets no `CREATE`, and an endpoint whose
//! role could still create somewhere (PUBLIC's `CREATE` on `public`, as clusters made by
//! PostgreSQL 14 and older have) is refused rather than the customer's grants changed.

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
/// The schema privilege `privileges` may add: `CREATE` on the schemas in scope.
pub const CREATE: &str = "CREATE";
/// Predefined roles whose privileges reach the server's files or programs: code an endpoint
/// left behind must not run with them, so an `owner_role` may not have them.
const SERVER_ACCESS_ROLES: &[&str] = &[
    "pg_execute_server_program",
    "pg_read_server_files",
    "pg_write_server_files",
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
    /// The role would reach beyond its scope; it is not made (or not handed out).
    #[error("{0}")]
    Unsafe(String),
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
    /// Where the role's objects go at teardown (`owner_role`); `None`: it may own nothing.
    pub owner_role: Option<String>,
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
            owner_role: resource.owner_role.clone(),
        }
    }

    /// `CREATE` on the schemas in scope is granted.
    pub fn creates(&self) -> bool {
        self.privileges.iter().any(|p| p == CREATE)
    }

    /// The table privileges granted (everything but `CREATE`).
    pub fn table_privileges(&self) -> Vec<&str> {
        self.privileges
            .iter()
            .map(String::as_str)
            .filter(|p| *p != CREATE)
            .collect()
    }

    /// Schemas the role may create objects in: the scope's with `CREATE`, else none.
    pub fn create_schemas(&self) -> Vec<String> {
        if self.creates() {
            self.schemas.clone()
        } else {
            Vec::new()
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
            .find(|p| !PRIVILEGES.contains(&p.as_str()) && p.as_str() != CREATE)
        {
            return Err(format!(
                "`privileges`: {p:?} is not a table privilege (use {}) or CREATE",
                PRIVILEGES.join(", ")
            ));
        }
        if self.privileges.is_empty() {
            return Err("`privileges` is empty".into());
        }
        if let Some(owner) = &self.owner_role {
            let lower = owner.to_ascii_lowercase();
            if owner.trim().is_empty()
                || lower.starts_with("pg_")
                || lower.starts_with("postern_")
                || lower == "public"
            {
                return Err(format!(
                    "`owner_role` {owner:?} cannot be used: name an ordinary role of yours (not empty, not PUBLIC, not pg_… or postern_…)"
                ));
            }
        } else if self.creates() {
            return Err("`privileges` has CREATE, which needs `owner_role`: the role that objects made through an endpoint \
                        are reassigned to when it ends (never the admin)"
                .into());
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
    let privs = scope.table_privileges().join(", ");
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
        if scope.creates() {
            out.push(format!("GRANT CREATE ON SCHEMA {s} TO {r}"));
        }
        if !privs.is_empty() {
            out.push(format!("GRANT {privs} ON ALL TABLES IN SCHEMA {s} TO {r}"));
        }
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

/// What the database says of an `owner_role`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerAttributes {
    pub superuser: bool,
    pub createrole: bool,
    pub createdb: bool,
    pub bypassrls: bool,
    pub replication: bool,
    /// Of [`SERVER_ACCESS_ROLES`], those whose privileges it has.
    pub server_access: Vec<String>,
}

/// Why `owner` may not receive an endpoint's objects, if it may not: code an operator left
/// behind (a `SECURITY DEFINER` function, a view) runs with its owner's powers.
pub fn owner_refusal(owner: &str, attributes: Option<&OwnerAttributes>) -> Option<String> {
    let Some(a) = attributes else {
        return Some(format!("`owner_role` \"{owner}\" does not exist in the database; create it (NOLOGIN is enough) or fix the name"));
    };
    let mut powers: Vec<&str> = [
        (a.superuser, "SUPERUSER"),
        (a.createrole, "CREATEROLE"),
        (a.createdb, "CREATEDB"),
        (a.bypassrls, "BYPASSRLS"),
        (a.replication, "REPLICATION"),
    ]
    .into_iter()
    .filter_map(|(has, name)| has.then_some(name))
    .collect();
    powers.extend(a.server_access.iter().map(String::as_str));
    (!powers.is_empty()).then(|| {
        format!(
            "`owner_role` \"{owner}\" has {}: objects made through an endpoint are reassigned to it and would run with \
             that power; name an ordinary role without SUPERUSER, CREATEROLE, CREATEDB, BYPASSRLS, REPLICATION or {}",
            powers.join(", "),
            SERVER_ACCESS_ROLES.join("/")
        )
    })
}

/// Why a freshly made role may not be handed out, if it may not: it could create objects
/// outside `allowed` (schemas), or schemas of its own (`database_create`).
pub fn outside_scope_refusal(
    role: &str,
    creatable: &[String],
    allowed: &[String],
    database_create: bool,
) -> Option<String> {
    let outside: Vec<&String> = creatable.iter().filter(|s| !allowed.contains(s)).collect();
    if let Some(first) = outside.first() {
        let list: Vec<String> = outside.iter().map(|s| format!("\"{s}\"")).collect();
        return Some(format!(
            "the endpoint's role {role} could create objects in schema {} outside its scope (a CREATE granted to PUBLIC, \
             as `public` has on clusters made by PostgreSQL 14 or older); run `REVOKE CREATE ON SCHEMA {} FROM PUBLIC` \
             as the admin, or put the schema in `schemas` with CREATE in `privileges` and an `owner_role`",
            list.join(", "),
            quote_ident(first)
        ));
    }
    database_create.then(|| {
        format!(
            "the endpoint's role {role} could create schemas in the database (CREATE on it is granted to PUBLIC); \
             run `REVOKE CREATE ON DATABASE … FROM PUBLIC` as the admin"
        )
    })
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

    /// Creates the role (all or nothing): refused if the `owner_role` is not a safe owner, or
    /// if the role could create objects anywhere its scope does not say.
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
        self.check_owner(&tx).await?;
        for s in &statements {
            // Logged without the PASSWORD clause.
            let what = s.split(" PASSWORD ").next().unwrap_or_default().to_string();
            tx.batch_execute(s).await.map_err(sql_err(what))?;
        }
        // PUBLIC's grants apply to every role, this one included; they are checked, not
        // changed (the customer's other roles may rely on them).
        let creatable: Vec<String> = tx
            .query(
                "SELECT nspname::text FROM pg_namespace WHERE has_schema_privilege($1::name, oid, 'CREATE') ORDER BY 1",
                &[&role],
            )
            .await
            .map_err(sql_err("has_schema_privilege"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let database_create: bool = tx
            .query_one(
                "SELECT has_database_privilege($1::name, current_database(), 'CREATE')",
                &[&role],
            )
            .await
            .map_err(sql_err("has_database_privilege"))?
            .get(0);
        if let Some(why) = outside_scope_refusal(
            role,
            &creatable,
            &self.scope.create_schemas(),
            database_create,
        ) {
            return Err(RoleError::Unsafe(why));
        }
        tx.commit().await.map_err(sql_err("COMMIT"))
    }

    /// Checks the resource's `owner_role` (if any) is a role objects may safely go to.
    pub async fn check_owner(
        &self,
        client: &impl tokio_postgres::GenericClient,
    ) -> Result<(), RoleError> {
        let Some(owner) = &self.scope.owner_role else {
            return Ok(());
        };
        let server_access: Vec<String> =
            SERVER_ACCESS_ROLES.iter().map(|s| s.to_string()).collect();
        let row = client
            .query_opt(
                "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication, \
                 ARRAY(SELECT s FROM unnest($2::text[]) s WHERE pg_has_role(r.oid, s::name, 'USAGE'))::text[] \
                 FROM pg_roles r WHERE rolname = $1::name",
                &[owner, &server_access],
            )
            .await
            .map_err(sql_err("checking owner_role"))?;
        let attributes = row.map(|r| OwnerAttributes {
            superuser: r.get(0),
            createrole: r.get(1),
            createdb: r.get(2),
            bypassrls: r.get(3),
            replication: r.get(4),
            server_access: r.get(5),
        });
        match owner_refusal(owner, attributes.as_ref()) {
            Some(why) => Err(RoleError::Unsafe(why)),
            None => Ok(()),
        }
    }

    /// The start-up check of `owner_role`: a bad one is an error; a database that cannot be
    /// reached now is not (it is checked again whenever a role is made).
    pub async fn check_owner_now(&self) -> Result<(), RoleError> {
        let client = self.connect().await?;
        self.check_owner(&client).await
    }

    /// Ends the role: no new logins, its backends terminated, what it owns reassigned to the
    /// `owner_role` (checked again: it may have changed since) or, without one, dropped with
    /// its privileges, then the role dropped. Never reassigned to the admin. A role already
    /// gone is fine.
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
        let reassign = match &self.scope.owner_role {
            Some(owner) => {
                if let Err(RoleError::Unsafe(why)) = self.check_owner(&client).await {
                    return Err(RoleError::Unsafe(format!(
                        "{why}; the role {role} is left NOLOGIN with what it owns, to be reassigned or dropped by hand"
                    )));
                }
                format!("REASSIGN OWNED BY {r} TO {}; ", quote_ident(owner))
            }
            None => String::new(),
        };
        client
            .batch_execute(&format!("{reassign}DROP OWNED BY {r}; DROP ROLE {r}"))
            .await
            .map_err(sql_err("DROP ROLE"))
    }

    /// Whether `role` is in `pg_roles`, and how many backends it has in `pg_stat_activity`:
    /// what a teardown proof checks after the role was dropped.
    pub async fn role_presence(&self, role: &str) -> Result<(bool, i64), RoleError> {
        let client = self.connect().await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM pg_roles WHERE rolname = $1), \
                 (SELECT count(*) FROM pg_stat_activity WHERE usename = $1)",
                &[&role],
            )
            .await
            .map_err(sql_err("checking pg_roles and pg_stat_activity"))?;
        let roles: i64 = row.get(0);
        Ok((roles > 0, row.get(1)))
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
#[path = "role_tests.rs"]
mod tests;
