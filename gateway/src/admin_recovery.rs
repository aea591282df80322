//! The admin token file of the data dir: minted once for a new store, and re-minted on
//! purpose only — by `postern admin recover`, run on the gateway host against the store —
//! never silently at start-up.

use crate::{
    api_tokens::{mint, NewToken},
    audit::{AuditLog, Subject},
    store::{Store, TokenRow},
};
use anyhow::{bail, Context, Result};
use endpoint_types::api::Role;
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

/// The start-up error when the store holds an admin but the data dir has no admin token file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the store already holds an admin token but {} is missing; the gateway does not mint a new admin on its own", path.display())]
pub struct MissingAdminToken {
    pub path: PathBuf,
    pub data_dir: PathBuf,
}

impl MissingAdminToken {
    pub fn hint(&self) -> String {
        format!(
            "mint one from an existing admin (`postern token create --role admin --name NAME`) and keep it safe, \
             or on this host run `postern admin recover --data-dir {}` (or `--config FILE` of the server; add its --store URL if it uses one): \
             it writes a new admin token to {} and records it in the audit trail",
            self.data_dir.display(),
            self.path.display()
        )
    }
}

/// Mints an admin token and writes it (0600) to `path`.
pub async fn mint_admin_file(
    store: &Store,
    path: &Path,
    name: &str,
    ttl: Option<Duration>,
    created_by: &str,
) -> Result<TokenRow> {
    let (row, token) = mint(
        store,
        &NewToken {
            role: Role::Admin,
            name,
            customer: None,
            created_by,
            created_by_id: None,
            ttl,
        },
        crate::store::now(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("minting the admin token: {}", e.message))?;
    certs::write_private(path, format!("{}\n", token.expose()).as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(row)
}

/// What `postern admin recover` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recovered {
    pub token_id: String,
    pub name: String,
    pub admin_token_file: PathBuf,
}

/// Mints a new admin token straight in the store and writes it to the data dir's
/// `admin.token`. Safe while the gateway runs: the store serialises writers (SQLite's write
/// lock, PostgreSQL's), and the audit chain is appended in the store, not from a copy of its
/// head. Refuses to overwrite an existing token file.
pub async fn recover(store: &Store, data_dir: &Path, ttl: Option<Duration>) -> Result<Recovered> {
    let path = data_dir.join("admin.token");
    if path.exists() {
        bail!(
            "{} exists; recovery writes a new admin token only where there is none. \
             hint: if the token in it no longer works, move the file away and run this again",
            path.display()
        );
    }
    let name = format!("recovery-admin-{}", crate::identity::random_hex(4));
    let row = mint_admin_file(store, &path, &name, ttl, "system:recovery").await?;
    let audit = AuditLog::open(store.clone())
        .await
        .context("opening the audit trail")?;
    audit
        .append(
            "token.recovered",
            "system:recovery",
            Subject::default(),
            serde_json::json!({
                "token_id": row.id, "role": "admin", "name": row.name, "expires_at": row.expires_at,
                "admin_token_file": path,
            }),
            jiff::Timestamp::now(),
        )
        .await
        .with_context(|| {
            format!(
                "recording the recovery in the audit trail (token {} was minted; revoke it if this is not resolved)",
                row.id
            )
        })?;
    Ok(Recovered {
        token_id: row.id,
        name: row.name,
        admin_token_file: std::path::absolute(&path).unwrap_or(path),
    })
}
