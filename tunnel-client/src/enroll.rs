//! `postern-agent enroll`: trade a one-time token and a CSR for the agent's certificate.
//!
//! The key is generated here and never leaves the appliance. The gateway is trusted only
//! through the CA fingerprint inside the token, checked twice: during the TLS handshake
//! (pinned verifier) and again on the CA certificate the gateway hands back, which is what
//! `run` will trust from then on.

use crate::{
    config::{AgentConfig, ConfigError},
    dial::{self, split_host_port, DialError},
    wire::{read_one_frame, write_frame, WireError},
    AGENT_VERSION,
};
use endpoint_types::{
    api::{EnrollRequest, EnrollResponse},
    frame::{Enrollment, EnrollmentAnswer, MAX_FRAME_LEN},
    secret::Secret,
    token::{EnrollmentToken, TokenFormatError},
    ApiError, ErrorCode, ALPN_ENROLL,
};
use std::{
    path::{Path, PathBuf},
    time::Duration,
};
use toml_edit::{DocumentMut, Item, Table, Value};

const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);
const CLOSE_DRAIN: Duration = Duration::from_secs(1);
pub const AGENT_COMMON_NAME: &str = "postern-agent";

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("the enrollment token is not usable: {0}")]
    Token(#[from] TokenFormatError),
    #[error("--gateway: {0}")]
    Gateway(DialError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{}: {message}", path.display())]
    ConfigToml { path: PathBuf, message: String },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot prepare the agent's key or TLS settings: {0}")]
    Crypto(String),
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("the gateway did not complete the enrollment within {0:?}")]
    Timeout(Duration),
    #[error("enrollment exchange failed: {0}")]
    Wire(#[from] WireError),
    #[error("the gateway refused the enrollment: {0}")]
    Refused(ApiError),
    #[error(
        "the gateway sent a CA certificate ({got}) other than the one the token pins ({want})"
    )]
    CaMismatch { want: String, got: String },
}

impl EnrollError {
    pub fn to_api_error(&self) -> ApiError {
        let msg = self.to_string();
        match self {
            EnrollError::Token(_) => ApiError::new(ErrorCode::EnrollmentTokenInvalid, msg)
                .hint("pass the whole pse1_… token printed by `postern appliance add`"),
            EnrollError::Gateway(_) => ApiError::invalid(msg).hint("--gateway is the relay address, HOST:PORT"),
            EnrollError::Config(e) => e.to_api_error(),
            EnrollError::ConfigToml { .. } => ApiError::invalid(msg).hint("fix the file and run enroll again"),
            EnrollError::Write { .. } | EnrollError::Crypto(_) => ApiError::new(ErrorCode::Internal, msg)
                .hint("check that the agent may write next to its config file"),
            EnrollError::Dial(e) if e.is_certificate_rejection() => ApiError::new(ErrorCode::CaMismatch, msg)
                .hint("the server at --gateway does not hold the CA this token pins; check the address"),
            EnrollError::Dial(_) | EnrollError::Timeout(_) => ApiError::new(ErrorCode::GatewayUnreachable, msg)
                .hint("check --gateway (the relay address, HOST:PORT) and that outbound UDP to it is allowed"),
            EnrollError::Wire(WireError::Frame(e)) => e.to_api_error(),
            EnrollError::Wire(_) => ApiError::new(ErrorCode::GatewayUnreachable, msg)
                .hint("the gateway closed the enrollment early; its log has the cause"),
            EnrollError::Refused(e) => e.clone(),
            EnrollError::CaMismatch { want, got } => ApiError::new(ErrorCode::CaMismatch, msg)
                .hint("do not enroll against this gateway; ask the vendor for a new token")
                .details(serde_json::json!({ "pinned": want, "received": got })),
        }
    }
}

/// What `enroll` reports; the JSON output's field names are the CLI contract.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Enrolled {
    pub appliance_id: String,
    pub app: String,
    pub customer: String,
    pub config: PathBuf,
}

pub async fn enroll(
    gateway: &str,
    token: &str,
    config_path: &Path,
) -> Result<Enrolled, EnrollError> {
    let parsed = EnrollmentToken::parse(token)?;
    split_host_port(gateway).map_err(EnrollError::Gateway)?;
    let config_path = std::path::absolute(config_path).map_err(|source| EnrollError::Write {
        path: config_path.to_path_buf(),
        source,
    })?;
    let dir = config_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    // Read and check the customer's file before spending the one-time token on it.
    let mut doc = load_or_new(&config_path, &dir)?;

    let (key, csr_pem) = certs::generate_key_and_csr(AGENT_COMMON_NAME)
        .map_err(|e| EnrollError::Crypto(e.to_string()))?;
    let tls = certs::pinned_client_config(&parsed.ca, vec![ALPN_ENROLL.to_vec()])
        .map_err(|e| EnrollError::Crypto(e.to_string()))?;
    let quic = dial::quic_client_config(tls)?;
    tracing::debug!(%gateway, "connecting for enrollment");
    let (endpoint, conn) = dial::connect(gateway, &quic, EXCHANGE_TIMEOUT).await?;
    let request = EnrollRequest {
        token: Secret::new(token.trim()),
        csr_pem,
        agent_version: AGENT_VERSION.to_string(),
    };
    let exchanged = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(&conn, request)).await;
    conn.close(0u32.into(), b"enrollment done");
    let _ = tokio::time::timeout(CLOSE_DRAIN, endpoint.wait_idle()).await;
    let response = exchanged.map_err(|_| EnrollError::Timeout(EXCHANGE_TIMEOUT))??;

    let got =
        certs::fingerprint_pem(&response.ca_pem).map_err(|e| EnrollError::Crypto(e.to_string()))?;
    if got != parsed.ca {
        return Err(EnrollError::CaMismatch {
            want: parsed.ca,
            got,
        });
    }
    let key_file = dir.join("agent.key");
    let cert_file = dir.join("agent.crt");
    let ca_file = dir.join("ca.crt");
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EnrollError::Write { path, source }
    };
    certs::write_private(&key_file, key.expose().as_bytes()).map_err(write_err(&key_file))?;
    std::fs::write(&cert_file, &response.cert_pem).map_err(write_err(&cert_file))?;
    std::fs::write(&ca_file, &response.ca_pem).map_err(write_err(&ca_file))?;
    // Pinned now, over the same exchange that pinned the CA: the gateway's signed trail heads
    // are checked against it (crate::trail_heads).
    if let Some(key) = &response.audit_key {
        let key_file = crate::trail_heads::gateway_key_file(&ca_file);
        certs::write_private(&key_file, format!("{key}\n").as_bytes())
            .map_err(write_err(&key_file))?;
    }

    for (k, v) in [
        ("gateway", gateway.to_string()),
        ("appliance_id", response.appliance_id.clone()),
        ("key_file", key_file.to_string_lossy().into_owned()),
        ("cert_file", cert_file.to_string_lossy().into_owned()),
        ("ca_file", ca_file.to_string_lossy().into_owned()),
    ] {
        set_root_key(&mut doc, k, &v);
    }
    let text = doc.to_string();
    // Never leave behind a config that `run` would refuse.
    AgentConfig::parse(&text, &config_path)?;
    std::fs::write(&config_path, text).map_err(write_err(&config_path))?;
    Ok(Enrolled {
        appliance_id: response.appliance_id,
        app: response.app,
        customer: response.customer,
        config: config_path,
    })
}

async fn exchange(
    conn: &quinn::Connection,
    request: EnrollRequest,
) -> Result<EnrollResponse, EnrollError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| WireError::Io(e.into()))?;
    write_frame(&mut send, &Enrollment::EnrollRequest(request)).await?;
    // The gateway may already have stopped reading; what matters is its answer.
    let _ = send.finish();
    match read_one_frame(&mut recv, MAX_FRAME_LEN).await? {
        EnrollmentAnswer::EnrollResponse(r) => Ok(r),
        EnrollmentAnswer::Error(e) => Err(EnrollError::Refused(e)),
    }
}

fn load_or_new(path: &Path, dir: &Path) -> Result<DocumentMut, EnrollError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            AgentConfig::parse(&text, path)?;
            text.parse::<DocumentMut>()
                .map_err(|e| EnrollError::ConfigToml {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|source| EnrollError::Write {
                path: dir.to_path_buf(),
                source,
            })?;
            Ok(new_config(dir))
        }
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }
        .into()),
    }
}

/// The smallest useful config: a trail next to it and the strictest workable policy.
fn new_config(dir: &Path) -> DocumentMut {
    let mut doc = DocumentMut::new();
    doc["audit_path"] = toml_edit::value(dir.join("audit.jsonl").to_string_lossy().into_owned());
    let mut policy = Table::new();
    policy["approval"] = toml_edit::value("manual");
    doc["policy"] = Item::Table(policy);
    doc
}

/// Sets a top-level key. An existing value keeps its surrounding whitespace and trailing
/// comment; a new key lands among the root keys, which TOML renders before any table.
fn set_root_key(doc: &mut DocumentMut, key: &str, v: &str) {
    let root = doc.as_table_mut();
    let mut value = Value::from(v);
    if let Some(old) = root.get(key).and_then(Item::as_value) {
        *value.decor_mut() = old.decor().clone();
    }
    root.insert(key, Item::Value(value));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_config_is_valid_and_manual() {
        let dir = Path::new("/var/lib/postern");
        let doc = new_config(dir);
        let c = AgentConfig::parse(&doc.to_string(), &dir.join("agent.toml")).unwrap();
        assert_eq!(c.audit_path, dir.join("audit.jsonl"));
        assert_eq!(
            c.policy.approval,
            endpoint_types::resource::ApprovalMode::Manual
        );
    }

    #[test]
    fn keys_land_at_the_root_and_comments_survive() {
        let text = "# the customer's header comment\naudit_path = \"/a.jsonl\"   # trail\n\
                    gateway = \"old:1\" # where we dial\n\
                    # `enroll` adds: gateway address\n\n[policy]  # policy comment\napproval = \"manual\"\n\n\
                    [[resource]]\nid = \"echo\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:7\"\n";
        let mut doc: DocumentMut = text.parse().unwrap();
        set_root_key(&mut doc, "gateway", "relay:4433");
        set_root_key(&mut doc, "appliance_id", "app_1");
        set_root_key(&mut doc, "ca_file", "/etc/postern/ca.crt");
        let out = doc.to_string();
        assert!(out.contains("# the customer's header comment"), "{out}");
        assert!(
            out.contains("gateway = \"relay:4433\" # where we dial"),
            "{out}"
        );
        assert!(out.contains("[policy]  # policy comment"), "{out}");
        assert!(out.contains("# `enroll` adds: gateway address"), "{out}");
        let first_table = out.find("[policy]").unwrap();
        assert!(
            out.find("appliance_id = \"app_1\"").unwrap() < first_table,
            "{out}"
        );
        assert!(out.find("ca_file").unwrap() < first_table, "{out}");
        let c = AgentConfig::parse(&out, Path::new("/etc/postern/agent.toml")).unwrap();
        assert_eq!(c.gateway.as_deref(), Some("relay:4433"));
        assert_eq!(c.appliance_id.as_deref(), Some("app_1"));
        assert_eq!(c.resources.len(), 1);
    }

    #[test]
    fn bad_token_is_enrollment_token_invalid() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = rt
            .block_on(enroll(
                "127.0.0.1:1",
                "pse1_garbage",
                &dir.path().join("agent.toml"),
            ))
            .unwrap_err();
        assert_eq!(e.to_api_error().code, ErrorCode::EnrollmentTokenInvalid);
        // Nothing was written for a token that could not even be parsed.
        assert!(!dir.path().join("agent.toml").exists());
    }

    #[test]
    fn unreachable_gateway_maps_to_gateway_unreachable() {
        let e = EnrollError::Dial(DialError::Timeout {
            addr: "h:1".into(),
            after: EXCHANGE_TIMEOUT,
        });
        assert_eq!(e.to_api_error().code, ErrorCode::GatewayUnreachable);
        let e = EnrollError::Dial(DialError::Connect {
            addr: "h:1".into(),
            reason: "invalid peer certificate: UnknownIssuer".into(),
        });
        assert_eq!(e.to_api_error().code, ErrorCode::CaMismatch);
    }

    #[test]
    fn broken_existing_config_is_refused_before_the_token_is_spent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "audit_path = \"a\"\nbogus = 1\n").unwrap();
        let e = load_or_new(&path, dir.path()).unwrap_err();
        assert_eq!(e.to_api_error().code, ErrorCode::InvalidRequest);
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
