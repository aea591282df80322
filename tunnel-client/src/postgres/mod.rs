//! Postgres resources at the appliance: an ephemeral role per endpoint (see [`role`]) and the
//! sessions that log in as it.
//!
//! When an endpoint becomes live the agent creates its role with a random password that never
//! leaves the appliance; every session of the endpoint is a new backend connection as that
//! role; when the endpoint ends the agent terminates the role's backends and drops it.

pub mod role;
mod session;
pub mod tls;

pub use session::serve_stream;

use crate::{config::ResourceConfig, grants::Removed, sessions::Sessions};
use endpoint_types::{frame::EndpointGrant, secret::Secret};
use jiff::Timestamp;
use role::{role_name, Admin, RoleError};
use serde_json::json;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::watch;

/// How long a session waits for its endpoint's role to be ready (it is made when the
/// endpoint opens, which may be a moment before the first client arrives).
const ROLE_READY_WAIT: Duration = Duration::from_secs(15);

/// `agent.toml` checks for a postgres resource, beyond the keys being present.
pub fn validate_config(resource: &ResourceConfig) -> Result<(), String> {
    let (config, tls) = role::admin_config(resource).map_err(|e| e.to_string())?;
    if tls.mode == tls::SslMode::Require
        && config
            .get_hosts()
            .iter()
            .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(_)))
    {
        tracing::warn!(resource = %resource.id, "admin_url: the database's certificate is not checked (sslmode={:?}); set sslmode=verify-full and sslrootcert", tls.mode);
    }
    role::Scope::of(resource, &config).validate()
}

/// At start-up: every postgres resource's `owner_role` is a role objects may safely go to.
/// A bad one stops the agent with the reason; a database that cannot be reached now only
/// warns (the check runs again whenever an endpoint's role is made).
pub async fn check_owner_roles(
    config: &crate::config::AgentConfig,
) -> Result<(), endpoint_types::ApiError> {
    for resource in config.resources.iter().filter(|r| r.owner_role.is_some()) {
        let admin = Admin::new(resource).map_err(|e| {
            endpoint_types::ApiError::invalid(format!("resource {}: {e}", resource.id))
        })?;
        match admin.check_owner_now().await {
            Ok(()) => {}
            Err(RoleError::Unsafe(why)) => {
                return Err(endpoint_types::ApiError::invalid(format!("resource {}: {why}", resource.id))
                    .hint("fix owner_role in agent.toml (or the role's attributes in the database) and start the agent again"));
            }
            Err(e) => {
                tracing::warn!(resource = %resource.id, error = %e, "could not check owner_role now; it is checked again when an endpoint's role is made")
            }
        }
    }
    Ok(())
}

/// A role that exists in the database and the password to log in with.
#[derive(Debug)]
pub struct ReadyRole {
    pub name: String,
    pub password: Secret,
    pub admin: Admin,
}

#[derive(Debug, Clone)]
enum RoleState {
    Preparing,
    Ready(Arc<ReadyRole>),
    Failed(String),
}

/// What one agent's postgres resources keep while it runs: the roles of its live endpoints and
/// its sessions' real cancel keys. Owned by the agent run (one process may run many agents,
/// whose endpoint ids may coincide); cheap to clone.
#[derive(Clone, Default)]
pub struct PgState {
    /// Roles of the endpoints live at this agent, by endpoint id.
    roles: Arc<Mutex<HashMap<String, watch::Sender<RoleState>>>>,
    cancels: session::Cancels,
}

fn random_password() -> Result<Secret, RoleError> {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
    let mut b = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| RoleError::Config("no randomness for the role password".into()))?;
    Ok(Secret::new(URL_SAFE_NO_PAD.encode(b)))
}

async fn create(
    resource: &ResourceConfig,
    endpoint_id: &str,
    expires_at: Timestamp,
) -> Result<ReadyRole, RoleError> {
    let admin = Admin::new(resource)?;
    let name = role_name(endpoint_id);
    let password = random_password()?;
    let verifier = certs::scram::Verifier::generate(password.expose())
        .map_err(|e| RoleError::Config(e.to_string()))?
        .to_string();
    match admin.create_role(&name, expires_at, &verifier).await {
        Ok(()) => {}
        // Left over from before a restart of this agent (its password is lost with it):
        // nothing can be using it that should, so it is replaced.
        Err(RoleError::Sql { error, .. }) if error.contains("(42710)") => {
            admin.drop_role(&name).await?;
            admin.create_role(&name, expires_at, &verifier).await?;
        }
        Err(e) => return Err(e),
    }
    Ok(ReadyRole {
        name,
        password,
        admin,
    })
}

/// An endpoint became live: its role is made on a task of its own (the control loop goes on).
pub fn prepare(ctx: &Sessions, grant: &EndpointGrant) {
    // The endpoint's role gets the privileges of the endpoint's phase; a phase the resource
    // does not list makes no role (its sessions are refused at admission).
    let Some(resource) = ctx
        .config
        .resource(&grant.resource_id)
        .and_then(|r| crate::phases::for_phase(r, grant.phase).ok())
    else {
        return;
    };
    let Some(tx) = ctx.postgres.claim(&grant.endpoint_id) else {
        return;
    };
    let (audit, endpoint_id, expires_at) = (
        ctx.audit.clone(),
        grant.endpoint_id.clone(),
        grant.expires_at,
    );
    tokio::spawn(async move {
        let r = create_into(tx, &resource, &endpoint_id, expires_at).await;
        let detail = match &r {
            Ok(()) => {
                json!({ "role": role_name(&endpoint_id), "resource_id": resource.id, "valid_until": expires_at })
            }
            Err(e) => {
                json!({ "role": role_name(&endpoint_id), "resource_id": resource.id, "error": e.to_string() })
            }
        };
        let kind = if r.is_ok() {
            "pg.role_created"
        } else {
            "pg.role_failed"
        };
        audit.record_or_log(
            crate::audit::Entry::new(kind, audit.agent_actor(), detail).endpoint(endpoint_id),
        );
    });
}

/// An endpoint ended: its backends are terminated and its role dropped, on a task of its own
/// (awaited by the endpoint's teardown proof).
pub fn teardown(ctx: &Sessions, removed: &Removed) -> tokio::task::JoinHandle<()> {
    let (audit, endpoint_id, reason) = (
        ctx.audit.clone(),
        removed.endpoint_id.clone(),
        removed.reason,
    );
    let resource = ctx.config.resource(&removed.grant.resource_id).cloned();
    let pg = ctx.postgres.clone();
    tokio::spawn(async move {
        let r = pg.drop_endpoint_role(resource.as_ref(), &endpoint_id).await;
        let mut detail = json!({ "role": role_name(&endpoint_id), "reason": reason.as_str() });
        if let Err(e) = &r {
            detail["error"] = json!(e.to_string());
        }
        audit.record_or_log(
            crate::audit::Entry::new("pg.role_dropped", audit.agent_actor(), detail)
                .endpoint(endpoint_id),
        );
    })
}

impl PgState {
    fn roles(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<RoleState>>> {
        self.roles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the endpoint's role: the one this agent made, or (the agent restarted since the
    /// endpoint opened, and the endpoint ended meanwhile) the role of that name left in the
    /// database.
    async fn drop_endpoint_role(
        &self,
        resource: Option<&ResourceConfig>,
        endpoint_id: &str,
    ) -> Result<(), RoleError> {
        if self.roles().contains_key(endpoint_id) {
            return self.teardown_role(endpoint_id).await;
        }
        match resource {
            Some(r) => Admin::new(r)?.drop_role(&role_name(endpoint_id)).await,
            None => Ok(()),
        }
    }

    /// Registers the endpoint as preparing, unless it already is (announced again on reconnect).
    fn claim(&self, endpoint_id: &str) -> Option<watch::Sender<RoleState>> {
        let mut map = self.roles();
        if map.contains_key(endpoint_id) {
            return None;
        }
        let (tx, _) = watch::channel(RoleState::Preparing);
        map.insert(endpoint_id.to_string(), tx.clone());
        Some(tx)
    }

    /// Creates the endpoint's role; idempotent for an endpoint announced again after a reconnect.
    pub async fn prepare_role(
        &self,
        resource: &ResourceConfig,
        endpoint_id: &str,
        expires_at: Timestamp,
    ) -> Result<(), RoleError> {
        let Some(tx) = self.claim(endpoint_id) else {
            return Ok(());
        };
        create_into(tx, resource, endpoint_id, expires_at).await
    }

    /// Drops the endpoint's role (terminating its backends); waits for a prepare under way.
    pub async fn teardown_role(&self, endpoint_id: &str) -> Result<(), RoleError> {
        let Some(tx) = self.roles().remove(endpoint_id) else {
            return Ok(());
        };
        let mut rx = tx.subscribe();
        let state = {
            let settled = tokio::time::timeout(
                ROLE_READY_WAIT,
                rx.wait_for(|s| !matches!(s, RoleState::Preparing)),
            )
            .await;
            match settled {
                Ok(Ok(s)) => s.clone(),
                _ => return Ok(()),
            }
        };
        if let RoleState::Ready(r) = state {
            r.admin.drop_role(&r.name).await?;
            tracing::info!(endpoint = %endpoint_id, role = %r.name, "postgres role dropped");
        }
        Ok(())
    }

    /// The endpoint's role once it is ready, for a session.
    pub async fn ready_role(&self, endpoint_id: &str) -> Result<Arc<ReadyRole>, String> {
        let Some(mut rx) = self.roles().get(endpoint_id).map(|tx| tx.subscribe()) else {
            return Err("the endpoint has no database role at this appliance".into());
        };
        let settled = tokio::time::timeout(
            ROLE_READY_WAIT,
            rx.wait_for(|s| !matches!(s, RoleState::Preparing)),
        )
        .await;
        match settled {
            Ok(Ok(s)) => match &*s {
                RoleState::Ready(r) => Ok(r.clone()),
                RoleState::Failed(e) => Err(e.clone()),
                RoleState::Preparing => Err("the database role is not ready".into()),
            },
            Ok(Err(_)) => Err("the endpoint ended".into()),
            Err(_) => Err("the database role was not ready in time".into()),
        }
    }
}

async fn create_into(
    tx: watch::Sender<RoleState>,
    resource: &ResourceConfig,
    endpoint_id: &str,
    expires_at: Timestamp,
) -> Result<(), RoleError> {
    let result = create(resource, endpoint_id, expires_at).await;
    let (state, out) = match result {
        Ok(r) => {
            tracing::info!(endpoint = %endpoint_id, role = %r.name, "postgres role created");
            (RoleState::Ready(Arc::new(r)), Ok(()))
        }
        Err(e) => {
            tracing::warn!(endpoint = %endpoint_id, error = %e, "could not create the endpoint's postgres role");
            (RoleState::Failed(e.to_string()), Err(e))
        }
    };
    tx.send_replace(state);
    out
}

/// A role for one `postern ops psql` op, scoped like an endpoint's, living as long as the op.
/// `env` points the op's `psql` at the resource's database as that role (a passfile in the
/// op's private directory carries the password; it is never on a command line).
pub struct OpRole {
    admin: Admin,
    name: String,
    pub env: Vec<(&'static str, std::ffi::OsString)>,
}

impl std::fmt::Debug for OpRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpRole")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Creates the op's role and its client environment in `dir` (the op's 0700 working dir).
pub async fn op_role(
    resource: &ResourceConfig,
    op_id: &str,
    valid_until: Timestamp,
    dir: &std::path::Path,
) -> Result<OpRole, RoleError> {
    use tokio_postgres::config::Host;
    let admin = Admin::new(resource)?;
    let name = role_name(op_id);
    let password = random_password()?;
    let verifier = certs::scram::Verifier::generate(password.expose())
        .map_err(|e| RoleError::Config(e.to_string()))?
        .to_string();
    admin.create_role(&name, valid_until, &verifier).await?;
    let port = admin.server().get_ports().first().copied().unwrap_or(5432);
    let host = match admin.server().get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => "localhost".into(),
    };
    // libpq's passfile format escapes ':' and '\'.
    let esc = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
    let passfile = dir.join(".pgpass");
    let line = format!("*:*:*:{}:{}\n", esc(&name), esc(password.expose()));
    certs::write_private(&passfile, line.as_bytes())
        .map_err(|e| RoleError::Config(format!("cannot write the op's passfile: {e}")))?;
    let env = vec![
        ("PGHOST", host.into()),
        ("PGPORT", port.to_string().into()),
        ("PGDATABASE", admin.scope.database.clone().into()),
        ("PGUSER", name.clone().into()),
        ("PGPASSFILE", passfile.into_os_string()),
        ("PGAPPNAME", format!("postern op {op_id}").into()),
    ];
    Ok(OpRole { admin, name, env })
}

impl OpRole {
    /// Ends the op's role (its backends terminated, the role dropped).
    pub async fn drop_role(self) {
        if let Err(e) = self.admin.drop_role(&self.name).await {
            tracing::warn!(role = %self.name, error = %e, "could not drop the op's postgres role");
        }
    }
}
