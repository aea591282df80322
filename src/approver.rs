//! A customer approver on their own machine, as the signed-approval tests need one: a key made
//! with `postern approvals key create`, an approver token for the customer, and a home with no
//! default approver key (so every signing names its key file).

use crate::testbed::{CliOutput, Gateway};
use anyhow::{anyhow, Result};
use certs::approver::ApproverKey;
use serde_json::Value;
use std::path::{Path, PathBuf};

pub struct Approver {
    /// The approver's API token.
    pub token: String,
    /// Their machine's home.
    pub home: PathBuf,
    pub key_path: PathBuf,
    pub key: ApproverKey,
    /// The public key as agent.toml's `[[approver]] public_key` lists it.
    pub public_key: String,
}

/// `postern approvals key create --path P` on the approver's machine: the public key line and
/// the key.
pub fn make_key(gw: &Gateway, path: &Path) -> Result<(String, ApproverKey)> {
    let out = gw
        .cli(&[
            "approvals",
            "key",
            "create",
            "--path",
            &path.display().to_string(),
        ])?
        .ok()?;
    let line = out["public_key"]
        .as_str()
        .ok_or_else(|| anyhow!("no public key in {out}"))?
        .to_string();
    let key = ApproverKey::from_pem(&std::fs::read_to_string(path)?)?;
    Ok((line, key))
}

impl Approver {
    /// Approver `name` of `customer`: the key at `dir/NAME/approver.key`, the home `dir/NAME-home`.
    pub fn create(gw: &Gateway, dir: &Path, name: &str, customer: &str) -> Result<Approver> {
        let home = dir.join(format!("{name}-home"));
        std::fs::create_dir_all(&home)?;
        let key_path = dir.join(name).join("approver.key");
        let (public_key, key) = make_key(gw, &key_path)?;
        let token = gw.mint_token("approver", name, Some(customer))?;
        Ok(Approver {
            token,
            home,
            key_path,
            key,
            public_key,
        })
    }

    /// The CLI as this approver on their machine.
    pub fn cli(&self, gw: &Gateway, args: &[&str]) -> Result<CliOutput> {
        gw.cli_home_as(&self.token, &self.home, args)
    }

    /// `postern approvals approve ID --key KEY`: approves `id` with a signed decision.
    pub fn approve(&self, gw: &Gateway, id: &str) -> Result<Value> {
        let key = self.key_path.display().to_string();
        self.cli(gw, &["approvals", "approve", id, "--key", &key])?
            .ok()
    }
}
