//! SSH endpoints on the engineer's machine: an ed25519 key pair made locally (only the public
//! half goes to the gateway), then `~/.ssh/postern/<endpoint>.key` (0600), a known_hosts entry
//! pinning the gateway's host key, and a `Host` block in `~/.ssh/postern/config`, so plain
//! `ssh -F ~/.ssh/postern/config <alias>` works with `StrictHostKeyChecking yes`.

use endpoint_types::{
    api::{ClientCredential, EndpointAccess, EndpointRecord},
    secret::Secret,
    ApiError,
};
use russh::keys::{
    ssh_key::{private::Ed25519Keypair, LineEnding},
    PrivateKey,
};
use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// The key pair; the private half stays on this machine.
pub fn prepare() -> Result<(ClientCredential, Secret), ApiError> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| ApiError::internal("no randomness for a key"))?;
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment("postern-endpoint");
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| ApiError::internal(format!("cannot encode the key: {e}")))?;
    let public_key = key
        .public_key()
        .to_openssh()
        .map_err(|e| ApiError::internal(format!("cannot encode the key: {e}")))?;
    Ok((
        ClientCredential::Ssh { public_key },
        Secret::new(pem.as_str()),
    ))
}

fn io(path: &Path, e: std::io::Error) -> ApiError {
    ApiError::internal(format!("cannot write {}: {e}", path.display()))
        .hint("check that your home directory is writable")
}

fn write_private(path: &Path, text: &str) -> Result<(), ApiError> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| io(path, e))
}

/// `text` with every block/line for which `is_ours` holds removed, then `add` appended.
fn replace_lines(text: &str, is_ours: impl Fn(&str) -> bool, add: &str) -> String {
    let mut out: String = text
        .lines()
        .filter(|l| !is_ours(l))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(add);
    out
}

/// Removes the `Host <alias>` block (up to the next `Host` line) and appends the new one.
fn replace_host_block(text: &str, alias: &str, block: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("Host ") {
            skipping = rest.trim() == alias;
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !out.is_empty() && !out.ends_with("\n\n") {
        out.push('\n');
    }
    out.push_str(block);
    out
}

fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.contains(' ') {
        format!("\"{s}\"")
    } else {
        s
    }
}

pub fn write(
    rec: &mut EndpointRecord,
    access: &EndpointAccess,
    secret: &Secret,
    home: &Path,
) -> Result<(), ApiError> {
    let EndpointAccess::Ssh {
        host,
        port,
        user,
        host_key,
        alias,
    } = access
    else {
        return Err(ApiError::internal(
            "the gateway sent access details of another endpoint type",
        ));
    };
    let dir: PathBuf = home.join(".ssh").join("postern");
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let _ = std::fs::set_permissions(home.join(".ssh"), std::fs::Permissions::from_mode(0o700));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io(&dir, e))?;

    let key_path = dir.join(format!("{}.key", rec.id));
    write_private(&key_path, secret.expose())?;

    let known_hosts = dir.join("known_hosts");
    let host_pattern = if *port == 22 {
        host.clone()
    } else {
        format!("[{host}]:{port}")
    };
    let entry = format!("{host_pattern} {}\n", host_key.trim());
    let old = std::fs::read_to_string(&known_hosts).unwrap_or_default();
    let text = replace_lines(
        &old,
        |l| l.split_whitespace().next() == Some(host_pattern.as_str()),
        &entry,
    );
    std::fs::write(&known_hosts, text).map_err(|e| io(&known_hosts, e))?;

    let config = dir.join("config");
    let block = format!(
        "Host {alias}\n  HostName {host}\n  Port {port}\n  User {user}\n  IdentityFile {key}\n  IdentitiesOnly yes\n  \
         UserKnownHostsFile {kh}\n  StrictHostKeyChecking yes\n  PasswordAuthentication no\n  KbdInteractiveAuthentication no\n",
        key = quote(&key_path),
        kh = quote(&known_hosts),
    );
    let old = std::fs::read_to_string(&config).unwrap_or_default();
    std::fs::write(&config, replace_host_block(&old, alias, &block)).map_err(|e| io(&config, e))?;
    let _ = std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600));

    rec.ssh_config = Some(config.display().to_string());
    rec.ssh_command = Some(format!("ssh -F {} {alias}", quote(&config)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_pair_is_ed25519_and_matches() {
        let (cred, secret) = prepare().unwrap();
        let ClientCredential::Ssh { public_key } = cred else {
            panic!()
        };
        assert!(public_key.starts_with("ssh-ed25519 "));
        let key = PrivateKey::from_openssh(secret.expose()).unwrap();
        assert_eq!(key.public_key().to_openssh().unwrap(), public_key);
        assert!(!format!("{secret:?}").contains("PRIVATE"));
    }

    #[test]
    fn host_blocks_are_replaced_not_duplicated() {
        let text = "Host a\n  Port 1\n\nHost b\n  Port 2\n";
        let out = replace_host_block(text, "a", "Host a\n  Port 9\n");
        assert_eq!(out.matches("Host a").count(), 1);
        assert!(out.contains("Host b\n  Port 2\n"));
        assert!(out.contains("Port 9"));
        assert!(!out.contains("Port 1"));
        let kh = replace_lines(
            "[h]:1 old\nother k\n",
            |l| l.starts_with("[h]:1 "),
            "[h]:1 new\n",
        );
        assert_eq!(kh, "other k\n[h]:1 new\n");
    }
}
