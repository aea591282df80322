//! tcp endpoints on the operator's machine. `create` makes a P-256 key here and sends only its
//! CSR; once the endpoint is active the CLI writes `~/.postern/tcp/<endpoint>.json` (0600: the
//! key, the signed client certificate, the gateway CA and the endpoint's address), and
//! `postern ops endpoint connect <endpoint>` runs a local forwarder: plain TCP on a loopback
//! port, TLS with that client certificate to the endpoint's listener. Stock clients (a
//! database driver, `nc`, a browser) then talk to the local port as if it were the target.

use crate::cli::{client::ApiClient, OutputFormat};
use endpoint_types::{
    api::{ClientCredential, EndpointAccess, EndpointRecord, EndpointState},
    resource::EndpointType,
    secret::Secret,
    ApiError, ErrorCode,
};
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};
use tokio::net::{TcpListener, TcpStream};

/// How long the forwarder waits for the gateway's TCP accept and TLS handshake.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const COPY_BUF: usize = 256 * 1024;

pub fn prepare() -> Result<(ClientCredential, Secret), ApiError> {
    let (key, csr_pem) = certs::generate_key_and_csr("postern tcp endpoint")
        .map_err(|e| ApiError::internal(format!("cannot make a key: {e}")))?;
    Ok((ClientCredential::Tcp { csr_pem }, key))
}

/// The file the forwarder reads: everything needed to reach the endpoint, and the key.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialFile {
    pub endpoint_id: String,
    pub address: String,
    pub tls_server_name: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: Secret,
}

impl std::fmt::Debug for CredentialFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialFile")
            .field("endpoint_id", &self.endpoint_id)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

pub fn credential_path(home: &Path, endpoint_id: &str) -> Result<PathBuf, ApiError> {
    if endpoint_id.is_empty()
        || !endpoint_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(ApiError::invalid(format!(
            "unexpected endpoint id {endpoint_id:?}"
        )));
    }
    Ok(home
        .join(".postern")
        .join("tcp")
        .join(format!("{endpoint_id}.json")))
}

pub fn connect_command(endpoint_id: &str) -> String {
    format!("postern ops endpoint connect {endpoint_id}")
}

pub fn write(
    rec: &mut EndpointRecord,
    access: &EndpointAccess,
    secret: &Secret,
    home: &Path,
) -> Result<(), ApiError> {
    let EndpointAccess::Tcp {
        address,
        tls_server_name,
        ca_pem,
        cert_pem,
    } = access
    else {
        return Err(ApiError::internal("not tcp access details"));
    };
    let file = CredentialFile {
        endpoint_id: rec.id.clone(),
        address: address.clone(),
        tls_server_name: tls_server_name.clone(),
        ca_pem: ca_pem.clone(),
        cert_pem: cert_pem.clone(),
        key_pem: secret.clone(),
    };
    let path = credential_path(home, &rec.id)?;
    let json = serde_json::to_vec_pretty(&file)
        .map_err(|e| ApiError::internal(format!("cannot encode the credential: {e}")))?;
    super::write_private(&path, &json)?;
    rec.tcp_credential = Some(path.display().to_string());
    rec.connect_command = Some(connect_command(&rec.id));
    Ok(())
}

pub fn load(path: &Path) -> Result<CredentialFile, ApiError> {
    let bytes = std::fs::read(path).map_err(|e| {
        ApiError::invalid(format!("cannot read the endpoint's credential {}: {e}", path.display()))
            .hint("only the operator who created the endpoint, on the machine they created it from, can connect")
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::invalid(format!(
            "{} is not a postern tcp credential: {e}",
            path.display()
        ))
        .hint("`postern ops endpoint get <id>` writes it again")
    })
}

/// Refuses to forward for an endpoint that cannot be connected to, with the reason.
fn require_connectable(rec: &EndpointRecord) -> Result<(), ApiError> {
    if rec.endpoint_type != EndpointType::Tcp {
        return Err(ApiError::invalid(format!("endpoint {} is a {} endpoint; `connect` forwards tcp endpoints", rec.id, rec.endpoint_type))
            .hint("kubectl, postgres and ssh endpoints are used with their own clients; see `postern ops endpoint get`"));
    }
    match rec.state {
        EndpointState::Active => Ok(()),
        EndpointState::Retired => Err(ApiError::new(
            ErrorCode::EndpointRetired,
            format!("endpoint {} is retired", rec.id),
        )
        .hint("create a new endpoint with `postern ops endpoint create --type tcp …`")),
        EndpointState::Expired => Err(ApiError::new(
            ErrorCode::EndpointExpired,
            format!("endpoint {} has expired", rec.id),
        )
        .hint("create a new endpoint with `postern ops endpoint create --type tcp …`")),
        EndpointState::Denied => Err(ApiError::new(
            ErrorCode::ApprovalDenied,
            format!("endpoint {} was denied", rec.id),
        )),
        EndpointState::PendingApproval => Err(ApiError::invalid(format!(
            "endpoint {} is waiting for the customer's approval",
            rec.id
        ))
        .hint("connect once `postern ops endpoint get` shows it active")),
    }
}

/// Whoever reaches the local port uses the endpoint's certificate, so it stays on this machine.
fn require_loopback(listen: SocketAddr) -> Result<(), ApiError> {
    if listen.ip().is_loopback() {
        return Ok(());
    }
    Err(ApiError::invalid(format!("--listen {listen} is not a loopback address"))
        .hint("anyone who reaches the forwarder's port uses the endpoint's credential; listen on 127.0.0.1 or ::1"))
}

/// A TLS dialer for the endpoint, built from its credential file.
struct Dialer {
    address: String,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
}

impl Dialer {
    fn new(cred: &CredentialFile) -> Result<Dialer, ApiError> {
        let config = certs::client_config(
            &cred.ca_pem,
            Some((&cred.cert_pem, &cred.key_pem)),
            Vec::new(),
        )
        .map_err(|e| {
            ApiError::invalid(format!("the endpoint's credential is unusable: {e}"))
                .hint("`postern ops endpoint get <id>` writes it again")
        })?;
        let server_name = ServerName::try_from(cred.tls_server_name.clone()).map_err(|e| {
            ApiError::invalid(format!(
                "bad TLS server name {:?}: {e}",
                cred.tls_server_name
            ))
        })?;
        Ok(Dialer {
            address: cred.address.clone(),
            server_name,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// Moves one local connection's bytes to the endpoint and back, half-closes included.
    async fn forward(&self, mut local: TcpStream) -> Result<(u64, u64), String> {
        let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&self.address))
            .await
            .map_err(|_| format!("connecting to {} timed out", self.address))?
            .map_err(|e| {
                format!(
                    "cannot reach the endpoint at {}: {e} (retired or expired?)",
                    self.address
                )
            })?;
        let _ = tcp.set_nodelay(true);
        let _ = local.set_nodelay(true);
        let mut tls = tokio::time::timeout(
            DIAL_TIMEOUT,
            self.tls.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| "TLS handshake with the endpoint timed out".to_string())?
        .map_err(|e| format!("TLS handshake with the endpoint failed: {e}"))?;
        tokio::io::copy_bidirectional_with_sizes(&mut local, &mut tls, COPY_BUF, COPY_BUF)
            .await
            .map_err(|e| format!("the endpoint refused or cut the connection: {e}"))
    }
}

/// `postern ops endpoint connect ID [--listen ADDR]`: fetch the endpoint (which rewrites its
/// credential file), bind the local port, report it, then forward until SIGINT/SIGTERM.
pub async fn connect(
    c: &ApiClient,
    id: &str,
    listen: SocketAddr,
    out: OutputFormat,
) -> Result<(), ApiError> {
    require_loopback(listen)?;
    let mut rec: EndpointRecord = c.get(&format!("/v1/endpoints/{id}")).await?;
    require_connectable(&rec)?;
    super::complete(&mut rec)?;
    let Some(path) = rec.tcp_credential.clone() else {
        return Err(
            ApiError::invalid(format!("the gateway gave no credential for endpoint {id}"))
                .hint("only the operator who created the endpoint can connect to it"),
        );
    };
    let dialer = Arc::new(Dialer::new(&load(Path::new(&path))?)?);
    let listener = TcpListener::bind(listen).await.map_err(|e| {
        ApiError::invalid(format!("cannot listen on {listen}: {e}"))
            .hint("pick a free port, e.g. --listen 127.0.0.1:0")
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    match out {
        OutputFormat::Json => {
            crate::cli::print_json(&serde_json::json!({
                "listen": bound.to_string(), "endpoint_id": rec.id, "address": rec.address, "expires_at": rec.expires_at,
            }));
        }
        OutputFormat::Text => println!("{bound}"),
    }
    eprintln!(
        "forwarding {bound} to endpoint {} ({}) until {}; Ctrl-C stops",
        rec.id, rec.origin_resource_id, rec.expires_at
    );
    serve(listener, dialer, rec.expires_at).await
}

/// How long live connections may outlast expiry before the forwarder exits anyway.
const EXPIRY_GRACE: Duration = Duration::from_secs(5);

async fn serve(
    listener: TcpListener,
    dialer: Arc<Dialer>,
    expires_at: jiff::Timestamp,
) -> Result<(), ApiError> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |k: SignalKind| {
        signal(k).map_err(|e| ApiError::internal(format!("cannot watch signals: {e}")))
    };
    let (mut int, mut term) = (sig(SignalKind::interrupt())?, sig(SignalKind::terminate())?);
    let left = expires_at.duration_since(jiff::Timestamp::now());
    let until_expiry = if left.is_negative() {
        Duration::ZERO
    } else {
        left.unsigned_abs()
    };
    let expiry = tokio::time::sleep(until_expiry);
    tokio::pin!(expiry);
    let forwards = tokio_util::task::TaskTracker::new();
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = &mut expiry => {
                eprintln!("the endpoint has expired; its certificate no longer opens anything");
                // The gateway cuts live sessions at expiry (with reason `expired` in the trail);
                // leave that to it rather than racing it by closing them here first.
                drop(listener);
                forwards.close();
                let _ = tokio::time::timeout(EXPIRY_GRACE, forwards.wait()).await;
                break;
            }
            r = listener.accept() => match r {
                Ok((local, peer)) => {
                    let dialer = dialer.clone();
                    forwards.spawn(async move {
                        match dialer.forward(local).await {
                            Ok((up, down)) => eprintln!("{peer}: closed ({up} bytes up, {down} down)"),
                            Err(e) => eprintln!("{peer}: {e}"),
                        }
                    });
                }
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_file_round_trips_and_hides_the_key() {
        let (cred, key) = prepare().unwrap();
        let ClientCredential::Tcp { csr_pem } = cred else {
            panic!("not a tcp credential")
        };
        assert!(certs::verified_csr_spki(&csr_pem).is_ok());
        let file = CredentialFile {
            endpoint_id: "ep_1".into(),
            address: "127.0.0.1:1".into(),
            tls_server_name: "localhost".into(),
            ca_pem: "CA".into(),
            cert_pem: "CERT".into(),
            key_pem: key.clone(),
        };
        assert!(!format!("{file:?}").contains("PRIVATE"));
        let back: CredentialFile =
            serde_json::from_slice(&serde_json::to_vec(&file).unwrap()).unwrap();
        assert_eq!(back.key_pem, key);
        assert!(credential_path(Path::new("/h"), "../x").is_err());
        assert_eq!(
            credential_path(Path::new("/h"), "ep_1").unwrap(),
            Path::new("/h/.postern/tcp/ep_1.json")
        );
    }

    #[test]
    fn only_active_tcp_endpoints_connect() {
        let rec: EndpointRecord = serde_json::from_value(serde_json::json!({
            "id": "ep_1", "type": "tcp", "state": "retired", "appliance_id": "a", "app": "x", "customer": "c",
            "origin_resource_id": "r", "created_by": "o", "created_at": "2026-01-01T00:00:00Z",
            "expires_at": "2026-01-01T01:00:00Z", "sessions": 0,
        }))
        .unwrap();
        assert_eq!(
            require_connectable(&rec).unwrap_err().code,
            ErrorCode::EndpointRetired
        );
        let active = EndpointRecord {
            state: EndpointState::Active,
            ..rec.clone()
        };
        assert!(require_connectable(&active).is_ok());
        let kube = EndpointRecord {
            endpoint_type: EndpointType::Kubectl,
            ..active
        };
        assert_eq!(
            require_connectable(&kube).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        assert!(require_loopback("127.0.0.1:0".parse().unwrap()).is_ok());
        assert!(require_loopback("[::1]:7000".parse().unwrap()).is_ok());
        assert!(require_loopback("0.0.0.0:7000".parse().unwrap()).is_err());
    }
}
