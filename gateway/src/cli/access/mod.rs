//! The operator's side of an endpoint's credential. The CLI makes the key pair or password
//! here, sends only the public half with `create`, and keeps the secret half in
//! `$HOME/.postern/pending/<endpoint>` (0600) until the endpoint is active; then each type
//! writes the files its stock client reads (kubeconfig, connection string, ssh config).

pub mod kubectl;
pub mod postgres;
pub mod ssh;
pub mod tcp;

use endpoint_types::{
    api::{ClientCredential, EndpointAccess, EndpointRecord, EndpointState},
    resource::EndpointType,
    secret::Secret,
    ApiError,
};
use std::path::{Path, PathBuf};

/// The operator's home, where the clients' files go (`~/.kube`, `~/.ssh`, `~/.postern`).
pub fn home() -> Result<PathBuf, ApiError> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| {
            ApiError::invalid("HOME is not set")
                .hint("the CLI writes the endpoint's client files under $HOME")
        })
}

/// A fresh credential for an endpoint of type `t`.
pub fn prepare(t: EndpointType) -> Result<Option<(ClientCredential, Secret)>, ApiError> {
    Ok(Some(match t {
        EndpointType::Tcp => tcp::prepare()?,
        EndpointType::Kubectl => kubectl::prepare()?,
        EndpointType::Postgres => postgres::prepare()?,
        EndpointType::Ssh => ssh::prepare()?,
    }))
}

fn pending_path(home: &Path, endpoint_id: &str) -> Result<PathBuf, ApiError> {
    // Ids come from the gateway; refuse anything that could name another path.
    if endpoint_id.is_empty()
        || !endpoint_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(ApiError::invalid(format!(
            "unexpected endpoint id {endpoint_id:?}"
        )));
    }
    Ok(home.join(".postern").join("pending").join(endpoint_id))
}

pub fn save_pending(home: &Path, endpoint_id: &str, secret: &Secret) -> Result<(), ApiError> {
    let path = pending_path(home, endpoint_id)?;
    write_private(&path, secret.expose().as_bytes())
}

/// Writes a file only its owner can read, creating its directory (0700).
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), ApiError> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    certs::write_private(path, data)
        .map_err(|e| ApiError::internal(format!("cannot write {}: {e}", path.display())))
}

pub fn create_private_dir(dir: &Path) -> Result<(), ApiError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", dir.display())))
}

/// Once the endpoint is active, writes its client files from the kept secret and fills in
/// the record's `kubeconfig` / `connection_string` / `ssh_command` + `ssh_config` /
/// `connect_command` + `tcp_credential`. Once it has ended, forgets the secret.
pub fn complete(rec: &mut EndpointRecord) -> Result<(), ApiError> {
    let home = home()?;
    let path = pending_path(&home, &rec.id)?;
    match rec.state {
        EndpointState::Active => {}
        EndpointState::PendingApproval => return Ok(()),
        _ => {
            let _ = std::fs::remove_file(&path);
            if rec.endpoint_type == EndpointType::Tcp {
                let _ = tcp::credential_path(&home, &rec.id).map(std::fs::remove_file);
            }
            return Ok(());
        }
    }
    let Some(access) = rec.access.clone() else {
        return Ok(());
    };
    let secret = match std::fs::read_to_string(&path) {
        Ok(s) => Secret::new(s),
        Err(_) => {
            return Err(ApiError::invalid(format!("the credential for endpoint {} is not on this machine", rec.id))
                .hint("only the operator who created the endpoint, on the machine they created it from, can connect; create a new endpoint"))
        }
    };
    match (&access, rec.endpoint_type) {
        (EndpointAccess::Kubectl { .. }, EndpointType::Kubectl) => {
            kubectl::write(rec, &access, &secret, &home)
        }
        (EndpointAccess::Postgres { .. }, EndpointType::Postgres) => {
            postgres::write(rec, &access, &secret, &home)
        }
        (EndpointAccess::Ssh { .. }, EndpointType::Ssh) => ssh::write(rec, &access, &secret, &home),
        (EndpointAccess::Tcp { .. }, EndpointType::Tcp) => tcp::write(rec, &access, &secret, &home),
        _ => Err(ApiError::internal(
            "the gateway sent access details of another endpoint type",
        )),
    }
}
