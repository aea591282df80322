//! Request and response bodies of the gateway's HTTP API; the CLI prints the responses as-is
//! with `--output json`, so field names here are the contract of DESIGN.md.

use crate::{
    resource::{EndpointType, ResourceDescriptor},
    secret::Secret,
};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Operator,
    Approver,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Approver => "approver",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "operator" => Role::Operator,
            "approver" => Role::Approver,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreateRequest {
    pub role: Role,
    pub name: String,
    #[serde(default)]
    pub customer: Option<String>,
    /// Lifetime (`90d`, `2h`, …) or `never`; absent: 90 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// `token create`: the clear token is shown only here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    pub id: String,
    pub token: Secret,
    pub role: Role,
    pub name: String,
    pub customer: Option<String>,
    /// None: never expires.
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
}

/// One API token as `token list` shows it: never its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub role: Role,
    pub name: String,
    pub customer: Option<String>,
    pub created_at: Timestamp,
    /// None: never expires.
    pub expires_at: Option<Timestamp>,
    /// Written at most once a minute per token.
    pub last_used_at: Option<Timestamp>,
    #[serde(default)]
    pub revoked_at: Option<Timestamp>,
    /// Display name of who minted it.
    #[serde(default)]
    pub created_by: String,
}

/// `GET /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenRecord>,
}

/// `GET /v1/whoami`: the identity a token stands for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    pub id: String,
    pub role: Role,
    pub name: String,
    pub customer: Option<String>,
    /// When the token stops working; None: never (`--ttl never`, the bootstrap admin).
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplianceAddRequest {
    pub app: String,
    pub customer: String,
    /// Lifetime of the enrollment token in seconds (default 1 h).
    #[serde(default)]
    pub token_ttl_s: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplianceAdded {
    pub appliance_id: String,
    pub app: String,
    pub customer: String,
    pub token: Secret,
    pub expires_at: Timestamp,
    pub ca_fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplianceRecord {
    pub appliance_id: String,
    pub app: String,
    pub customer: String,
    pub online: bool,
    pub last_seen: Option<Timestamp>,
    pub agent_version: Option<String>,
    pub enrolled: bool,
    pub revoked: bool,
    #[serde(default)]
    pub resources: Vec<ResourceDescriptor>,
    /// When the appliance's current agent certificate expires (it renews itself two thirds
    /// into its lifetime); absent before enrollment.
    #[serde(default)]
    pub cert_expires_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplianceList {
    pub appliances: Vec<ApplianceRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointCreateRequest {
    #[serde(rename = "type")]
    pub endpoint_type: EndpointType,
    pub app: String,
    pub customer: String,
    pub origin_resource_id: String,
    /// Seconds; default 1 h; 10 s – 7 d.
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// The public half of the endpoint's client credential (kubectl, postgres, ssh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<ClientCredential>,
    /// `--phase`: operate (default), deploy or install.
    #[serde(default = "crate::phase::operate")]
    pub phase: crate::control::GrantLevel,
}

/// The public half of an endpoint's client credential. The CLI makes the key pair or password
/// on the operator's machine, so the secret half never reaches the gateway.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientCredential {
    /// A PKCS#10 CSR; the gateway signs it once the endpoint is active.
    Kubectl { csr_pem: String },
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64), as PostgreSQL stores it.
    Postgres { scram_verifier: String },
    /// An OpenSSH one-line public key.
    Ssh { public_key: String },
    /// A PKCS#10 CSR; the gateway signs it once the endpoint is active, and the tcp listener
    /// admits only TLS clients presenting that certificate.
    Tcp { csr_pem: String },
}

/// A SCRAM verifier is a password hash: like any secret-derived value it stays out of logs.
impl std::fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            ClientCredential::Kubectl { .. } => "Kubectl",
            ClientCredential::Postgres { .. } => "Postgres",
            ClientCredential::Ssh { .. } => "Ssh",
            ClientCredential::Tcp { .. } => "Tcp",
        };
        write!(f, "ClientCredential::{kind}(<redacted>)")
    }
}

/// What the endpoint's creator needs to write their client's files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EndpointAccess {
    Kubectl {
        /// `https://host:port`
        server: String,
        tls_server_name: String,
        ca_pem: String,
        cert_pem: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
        cluster: String,
    },
    Postgres {
        host: String,
        port: u16,
        database: String,
        user: String,
        tls_server_name: String,
        ca_pem: String,
    },
    Ssh {
        host: String,
        port: u16,
        user: String,
        /// The gateway's public host key, OpenSSH format.
        host_key: String,
        alias: String,
    },
    Tcp {
        /// `host:port` of the endpoint's TLS listener.
        address: String,
        tls_server_name: String,
        ca_pem: String,
        /// The operator's CSR, signed for exactly the endpoint's lifetime.
        cert_pem: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointState {
    PendingApproval,
    Active,
    Denied,
    Retired,
    Expired,
}

impl EndpointState {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::PendingApproval => "pending-approval",
            EndpointState::Active => "active",
            EndpointState::Denied => "denied",
            EndpointState::Retired => "retired",
            EndpointState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<EndpointState> {
        Some(match s {
            "pending-approval" => EndpointState::PendingApproval,
            "active" => EndpointState::Active,
            "denied" => EndpointState::Denied,
            "retired" => EndpointState::Retired,
            "expired" => EndpointState::Expired,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub id: String,
    #[serde(rename = "type")]
    pub endpoint_type: EndpointType,
    pub state: EndpointState,
    pub appliance_id: String,
    pub app: String,
    pub customer: String,
    pub origin_resource_id: String,
    pub created_by: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Timestamp>,
    /// Live sessions right now.
    pub sessions: u64,
    /// Sessions served since creation.
    #[serde(default)]
    pub sessions_total: u64,
    /// `host:port` clients connect to (tcp endpoints), once active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Set by `retire`: how many live sessions it cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions_cut: Option<u64>,
    /// For the endpoint's creator while it is active (kubectl, postgres, ssh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<EndpointAccess>,
    /// Written by the CLI: path of the kubeconfig file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<String>,
    /// Written by the CLI: the libpq connection string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_string: Option<String>,
    /// Written by the CLI: `ssh -F <config> <alias>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_command: Option<String>,
    /// Written by the CLI: path of the ssh config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_config: Option<String>,
    /// Written by the CLI (tcp): `postern ops endpoint connect <id>`, the local forwarder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_command: Option<String>,
    /// Written by the CLI (tcp): path of the client-certificate file the forwarder presents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_credential: Option<String>,
    /// Why the appliance refused the endpoint a person was said to approve
    /// (`APPROVAL_INVALID`, `details.reason`); the gateway then ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<crate::ApiError>,
    /// `--phase`: operate (default), deploy or install.
    #[serde(default = "crate::phase::operate")]
    pub phase: crate::control::GrantLevel,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointList {
    pub endpoints: Vec<EndpointRecord>,
}

/// Sent by `postern-agent enroll` over the relay's enrollment ALPN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The whole `pse1_…` token.
    pub token: Secret,
    /// PKCS#10 CSR (PEM) for a key generated in the appliance.
    pub csr_pem: String,
    pub agent_version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub appliance_id: String,
    pub app: String,
    pub customer: String,
    pub cert_pem: String,
    pub ca_pem: String,
    /// The gateway audit key's public half (base64), which the agent pins to check the
    /// gateway's signed trail heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: i64,
    pub time: Timestamp,
    pub kind: String,
    pub actor: String,
    pub appliance_id: Option<String>,
    pub endpoint_id: Option<String>,
    pub session_id: Option<String>,
    pub op_id: Option<String>,
    pub detail: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditList {
    pub records: Vec<AuditRecord>,
    /// Set when the page is full: pass it as `after_seq` for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after_seq: Option<i64>,
}

/// The page size of `GET /v1/audit` when the caller names none, and the largest it may ask.
pub const AUDIT_PAGE_DEFAULT: u32 = 1000;
pub const AUDIT_PAGE_MAX: u32 = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditVerified {
    pub ok: bool,
    pub records: u64,
    /// Own signed heads, the other side's anchors, the last head, and which heads kept outside
    /// the trail it was compared with (crate::trail_head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heads: Option<crate::trail_head::HeadSummary>,
}

impl AuditRecord {
    /// The bytes a record's `hash` is taken over: everything but `hash` itself, in a fixed
    /// order, as JSON. Both trails (gateway store and the appliance's JSON lines) chain with
    /// `hash = sha256_hex(chain_input)`, where `prev_hash` is the previous record's `hash`
    /// (64 zeros for the first).
    pub fn chain_input(&self) -> Vec<u8> {
        ChainFields {
            seq: self.seq,
            time: &self.time.to_string(),
            kind: &self.kind,
            actor: &self.actor,
            appliance_id: self.appliance_id.as_deref(),
            endpoint_id: self.endpoint_id.as_deref(),
            session_id: self.session_id.as_deref(),
            op_id: self.op_id.as_deref(),
            detail: &self.detail,
            prev_hash: &self.prev_hash,
        }
        .chain_input()
    }
}

/// A record's fields, borrowed, for writers that hold them apart (the detail already as JSON
/// text, say): [`ChainFields::chain_input`] gives the same bytes as
/// [`AuditRecord::chain_input`] of the same record.
pub struct ChainFields<'a, D: Serialize + ?Sized> {
    pub seq: i64,
    /// RFC 3339, as `Timestamp` displays.
    pub time: &'a str,
    pub kind: &'a str,
    pub actor: &'a str,
    pub appliance_id: Option<&'a str>,
    pub endpoint_id: Option<&'a str>,
    pub session_id: Option<&'a str>,
    pub op_id: Option<&'a str>,
    pub detail: &'a D,
    pub prev_hash: &'a str,
}

impl<D: Serialize + ?Sized> ChainFields<'_, D> {
    pub fn chain_input(&self) -> Vec<u8> {
        // A tuple is a JSON array: no copy of the detail is made to hash it.
        let fields = (
            self.seq,
            self.time,
            self.kind,
            self.actor,
            self.appliance_id,
            self.endpoint_id,
            self.session_id,
            self.op_id,
            self.detail,
            self.prev_hash,
        );
        serde_json::to_vec(&fields).unwrap_or_default()
    }
}

/// `prev_hash` of the first record of a trail.
pub const AUDIT_GENESIS_HASH: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// Checks a trail's hash chain: consecutive `seq` from 1, each `prev_hash` equal to the previous
/// record's `hash`, each `hash` equal to `sha256_hex(chain_input)`. Returns the number of records,
/// or the `seq` position of the first bad record (an edited, inserted, reordered or missing one).
/// The hash function is passed in so this crate stays free of crypto dependencies.
pub fn verify_chain<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
    sha256_hex: impl Fn(&[u8]) -> String,
) -> Result<u64, i64> {
    let mut chain = ChainVerifier::new();
    for r in records {
        chain.push(r, &sha256_hex)?;
    }
    Ok(chain.records())
}

/// [`verify_chain`] a record at a time, so a trail can be checked page by page without
/// holding it in memory.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    prev: String,
    expected_seq: i64,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainVerifier {
    pub fn new() -> ChainVerifier {
        ChainVerifier {
            prev: AUDIT_GENESIS_HASH.to_string(),
            expected_seq: 1,
        }
    }

    /// Checks the next record; the error is the seq of the first record that does not fit.
    pub fn push(
        &mut self,
        r: &AuditRecord,
        sha256_hex: impl Fn(&[u8]) -> String,
    ) -> Result<(), i64> {
        if r.seq != self.expected_seq
            || r.prev_hash != self.prev
            || sha256_hex(&r.chain_input()) != r.hash
        {
            return Err(self.expected_seq);
        }
        self.prev.clone_from(&r.hash);
        self.expected_seq += 1;
        Ok(())
    }

    /// How many records verified so far.
    pub fn records(&self) -> u64 {
        (self.expected_seq - 1) as u64
    }

    /// The seq the next record must have.
    pub fn next_seq(&self) -> i64 {
        self.expected_seq
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    // Not a real hash; enough to exercise the chain logic without a crypto dependency.
    fn fake_hash(b: &[u8]) -> String {
        let mut h: u64 = 1469598103934665603;
        for x in b {
            h = (h ^ *x as u64).wrapping_mul(1099511628211);
        }
        format!("{h:016x}")
    }

    fn chain(n: i64) -> Vec<AuditRecord> {
        let mut prev = AUDIT_GENESIS_HASH.to_string();
        (1..=n)
            .map(|seq| {
                let mut r = AuditRecord {
                    seq,
                    time: Timestamp::from_second(1_700_000_000 + seq).unwrap(),
                    kind: "endpoint.created".into(),
                    actor: "alice".into(),
                    appliance_id: Some("ap_1".into()),
                    endpoint_id: None,
                    session_id: None,
                    op_id: None,
                    detail: serde_json::json!({"n": seq}),
                    prev_hash: prev.clone(),
                    hash: String::new(),
                };
                r.hash = fake_hash(&r.chain_input());
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    /// The hashed bytes are the trails' format on disk: they must not drift.
    #[test]
    fn chain_input_is_the_json_array_of_the_fields() {
        let mut r = chain(1).remove(0);
        r.session_id = Some("ses_\"1\"".into());
        r.detail = serde_json::json!({ "text": "select '\u{1b}[2J'\n", "b": [1, null], "a": true });
        let expected = serde_json::json!([
            r.seq,
            r.time.to_string(),
            r.kind,
            r.actor,
            r.appliance_id,
            r.endpoint_id,
            r.session_id,
            r.op_id,
            r.detail,
            r.prev_hash,
        ]);
        assert_eq!(r.chain_input(), serde_json::to_vec(&expected).unwrap());
        let raw = serde_json::value::RawValue::from_string(r.detail.to_string()).unwrap();
        let time = r.time.to_string();
        let borrowed = ChainFields {
            seq: r.seq,
            time: &time,
            kind: &r.kind,
            actor: &r.actor,
            appliance_id: r.appliance_id.as_deref(),
            endpoint_id: None,
            session_id: r.session_id.as_deref(),
            op_id: None,
            detail: &*raw,
            prev_hash: &r.prev_hash,
        };
        assert_eq!(borrowed.chain_input(), r.chain_input());
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(verify_chain(&chain(5), fake_hash), Ok(5));
        assert_eq!(verify_chain(&[], fake_hash), Ok(0));
    }

    #[test]
    fn edits_deletions_and_reordering_are_found_at_the_right_seq() {
        let mut c = chain(5);
        c[2].detail = serde_json::json!({"n": 99});
        assert_eq!(verify_chain(&c, fake_hash), Err(3));

        let mut c = chain(5);
        c.remove(1);
        assert_eq!(verify_chain(&c, fake_hash), Err(2));

        let mut c = chain(5);
        c.swap(3, 4);
        assert_eq!(verify_chain(&c, fake_hash), Err(4));

        // Deleting the tail cannot be seen from the records alone; callers compare the count
        // with what they expect. Rehashing an edited record still breaks the next link.
        let mut c = chain(5);
        c[1].actor = "mallory".into();
        c[1].hash = fake_hash(&c[1].chain_input());
        assert_eq!(verify_chain(&c, fake_hash), Err(3));
    }
}

#[cfg(test)]
mod credential_tests {
    use super::ClientCredential;

    #[test]
    fn credentials_are_redacted_in_debug() {
        let c = ClientCredential::Postgres {
            scram_verifier: "SCRAM-SHA-256$4096:c2FsdA==$a2V5:c2VydmVy".into(),
        };
        let shown = format!("{c:?}");
        assert_eq!(shown, "ClientCredential::Postgres(<redacted>)");
        assert!(!shown.contains("SCRAM"));
    }
}
