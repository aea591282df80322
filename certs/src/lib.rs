//! Postern's CA and credential minting: the rcgen CA, server/agent/client certificates, CSR
//! signing, rustls configurations (TLS 1.3, ring) and certificate fingerprints.

pub mod approver;
mod ca;
mod cert_info;
mod fingerprint;
mod private_file;
pub mod record_signature;
pub mod scram;
pub mod served_cert;
mod system_roots;
pub mod teardown_proof;
mod tls;

use std::sync::Arc;

pub use ca::{
    cert_common_name, cert_spki, csr_spki, generate_key_and_csr, verified_csr_spki, Ca, Issued,
};
pub use cert_info::{cert_spki_pem, csr_common_name, key_matches_cert, renewed_detail, CertInfo};
pub use endpoint_types::secret::Secret;
pub use fingerprint::{fingerprint, fingerprint_pem};
pub use private_file::write_private;
pub use system_roots::system_roots;
pub use tls::{
    client_config, client_config_with_roots, pinned_client_config, server_config,
    server_config_with_resolver, upstream_client_config, ClientAuth, ServerCheck,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("pem: {0}")]
    Pem(String),
    #[error("invalid csr: {0}")]
    InvalidCsr(String),
    #[error("verifier: {0}")]
    Verifier(String),
    #[error("fingerprint: {0}")]
    Fingerprint(String),
    #[error("CA private key does not match the CA certificate")]
    KeyMismatch,
    #[error("validity: {0}")]
    Validity(String),
}

/// The workspace's single crypto provider. Passed explicitly everywhere so that nothing
/// depends on which provider some other crate may have installed as the process default.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
