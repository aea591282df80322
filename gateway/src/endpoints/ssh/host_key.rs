//! The gateway's SSH host key: made once, kept in the data dir (0600), so the known_hosts
//! entries the CLI writes stay valid across restarts and `StrictHostKeyChecking=yes` works.

use russh::keys::{
    ssh_key::{private::Ed25519Keypair, LineEnding},
    PrivateKey,
};
use std::{io::Write, os::unix::fs::OpenOptionsExt, path::Path};

pub const FILE: &str = "ssh_host_ed25519_key";

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("cannot read or write the SSH host key {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the SSH host key {path} is not a valid OpenSSH private key: {reason}")]
    Invalid { path: String, reason: String },
    #[error("no randomness for a new SSH host key")]
    Random,
}

/// Loads `<data_dir>/ssh_host_ed25519_key`, making it first if there is none. Two processes
/// racing to make it both end up with the one that was written first.
pub fn load_or_create(data_dir: &Path) -> Result<PrivateKey, HostKeyError> {
    let path = data_dir.join(FILE);
    let io = |source| HostKeyError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(pem) => return parse(&path, &pem),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        Err(_) => {}
    }
    let key = generate("postern-gateway")?;
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| HostKeyError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    let tmp = data_dir.join(format!("{FILE}.{}.tmp", std::process::id()));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(pem.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    // A hard link fails if the file appeared meanwhile: then the other writer's key wins.
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            parse(&path, &std::fs::read_to_string(&path).map_err(io)?)
        }
        Err(e) => Err(io(e)),
    }
}

fn parse(path: &Path, pem: &str) -> Result<PrivateKey, HostKeyError> {
    PrivateKey::from_openssh(pem).map_err(|e| HostKeyError::Invalid {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// A fresh ed25519 key from the system's randomness.
pub fn generate(comment: &str) -> Result<PrivateKey, HostKeyError> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| HostKeyError::Random)?;
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment);
    Ok(key)
}

/// The public half as one OpenSSH line (`ssh-ed25519 AAAA… comment`).
pub fn public_line(key: &PrivateKey) -> String {
    key.public_key().to_openssh().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn stable_across_loads_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(public_line(&a), public_line(&b));
        assert!(public_line(&a).starts_with("ssh-ed25519 "));
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        // A different data dir gets a different key.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            public_line(&a),
            public_line(&load_or_create(other.path()).unwrap())
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "not a key").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(HostKeyError::Invalid { .. })
        ));
    }
}
