//! `postern approvals key create`: an approver's Ed25519 signing key, made on their machine.
//! The private half stays in a 0600 file and is never sent; the public half is printed for
//! the customer's `agent.toml` (`[[approver]] public_key = "…"`).

use super::OutputFormat;
use certs::approver::ApproverKey;
use endpoint_types::{ApiError, ErrorCode};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Subcommand)]
pub enum KeyCmd {
    /// Make a new signing key (refuses to replace an existing one).
    Create {
        /// Where to keep the private key (default: the approver's config dir).
        #[arg(long)]
        path: Option<PathBuf>,
    },
}

/// `$XDG_CONFIG_HOME/postern/approver.key`, else `~/.config/postern/approver.key`.
pub fn default_key_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("postern").join("approver.key"))
}

fn key_path(path: Option<PathBuf>) -> Result<PathBuf, ApiError> {
    path.or_else(default_key_path).ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            "no HOME or XDG_CONFIG_HOME to keep the approver key in",
        )
        .hint("pass --path FILE")
    })
}

/// Reads the approver's key for signing.
pub fn load(path: Option<PathBuf>) -> Result<ApproverKey, ApiError> {
    let path = key_path(path)?;
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("cannot read the approver key {}: {e}", path.display()),
        )
        .hint("make one with `postern approvals key create`, or pass --key FILE")
    })?;
    ApproverKey::from_pem(&text).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("{}: {e}", path.display()),
        )
    })
}

fn create(path: &Path) -> Result<serde_json::Value, ApiError> {
    let io = |what: &str, e: std::io::Error| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("cannot {what} {}: {e}", path.display()),
        )
    };
    if path.exists() {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("{} already holds a key", path.display()),
        )
        .hint("an approver key is not replaced silently: remove the file yourself (and its [[approver]] entries) or pass --path for another"));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("create the directory for", e))?;
    }
    let (key, pem) =
        ApproverKey::generate().map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    certs::write_private(path, pem.expose().as_bytes()).map_err(|e| io("write", e))?;
    Ok(serde_json::json!({
        "public_key": key.public().to_line(""),
        "key_id": key.public().key_id(),
        "path": path.display().to_string(),
    }))
}

pub fn run(cmd: KeyCmd, out: OutputFormat) -> Result<(), ApiError> {
    match cmd {
        KeyCmd::Create { path } => {
            let path = key_path(path)?;
            let v = create(&path)?;
            match out {
                OutputFormat::Json => super::print_json(&v),
                OutputFormat::Text => {
                    println!(
                        "approver key written to {} (0600; it never leaves this machine)",
                        path.display()
                    );
                    println!("add it to the appliance's agent.toml:\n");
                    println!(
                        "[[approver]]\nname = \"you@customer.example\"\npublic_key = \"{}\"",
                        v["public_key"].as_str().unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_is_made_0600_loads_back_and_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("approver.key");
        let v = create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let key = load(Some(path.clone())).unwrap();
        assert_eq!(v["public_key"], key.public().to_line(""));
        assert_eq!(v["key_id"], key.public().key_id());
        let again = create(&path).unwrap_err();
        assert_eq!(again.code, ErrorCode::Conflict);
        assert_eq!(load(Some(path)).unwrap().public(), key.public());
        let missing = load(Some(dir.path().join("none"))).unwrap_err();
        assert!(missing.hint.contains("approvals key create"));
    }
}
