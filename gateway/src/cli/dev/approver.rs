//! The demo customer's approver: an API token (role approver, customer `demo-customer`) and an
//! Ed25519 approver key listed in the manual appliance's `[[approver]]`, so an approval in the
//! tour is a signed decision the appliance verifies, as a real customer's would be.

use super::appliance::CUSTOMER;
use crate::cli::client::ApiClient;
use anyhow::{anyhow, Context, Result};
use certs::approver::ApproverKey;
use endpoint_types::api::{TokenCreated, TokenList, TokenRecord};
use std::path::{Path, PathBuf};

const TOKEN_NAME: &str = "demo-approver";
pub const APPROVER_NAME: &str = "approver@demo-customer";

pub struct DemoApprover {
    pub token_file: PathBuf,
    pub key_file: PathBuf,
    /// The public key line for `[[approver]]`.
    pub public_key: String,
}

/// The key is kept across restarts (the appliance lists it); a fresh token replaces the one
/// a previous run minted, which is revoked.
pub async fn prepare(api: &ApiClient, dir: &Path) -> Result<DemoApprover> {
    let key_file = dir.join("approver.key");
    let key = match std::fs::read_to_string(&key_file) {
        Ok(pem) => {
            ApproverKey::from_pem(&pem).map_err(|e| anyhow!("{}: {e}", key_file.display()))?
        }
        Err(_) => {
            let (key, pem) = ApproverKey::generate().map_err(|e| anyhow!("{e}"))?;
            certs::write_private(&key_file, pem.expose().as_bytes())
                .with_context(|| format!("writing {}", key_file.display()))?;
            key
        }
    };
    let list: TokenList = api.get("/v1/tokens").await.map_err(|e| anyhow!("{e}"))?;
    for old in list
        .tokens
        .iter()
        .filter(|t| t.name.starts_with(TOKEN_NAME) && t.revoked_at.is_none())
    {
        let _: TokenRecord = api
            .post(
                &format!("/v1/tokens/{}/revoke", old.id),
                serde_json::json!({}),
            )
            .await
            .map_err(|e| anyhow!("{e}"))?;
    }
    // Names are unique, also among revoked tokens: one per run.
    let name = format!("{TOKEN_NAME}-{}", jiff::Timestamp::now().as_second());
    let created: TokenCreated = api
        .post(
            "/v1/tokens",
            serde_json::json!({"role": "approver", "name": name, "customer": CUSTOMER, "ttl": "never"}),
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let token_file = dir.join("approver.token");
    certs::write_private(&token_file, created.token.expose().as_bytes())?;
    Ok(DemoApprover {
        token_file,
        key_file,
        public_key: key.public().to_line(""),
    })
}
