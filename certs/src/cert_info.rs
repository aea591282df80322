//! What an agent certificate's renewal needs to know about a certificate or CSR: its serial,
//! validity and fingerprint, and the name a CSR asks for.

use jiff::Timestamp;
use rustls_pki_types::{pem::PemObject, CertificateDer, CertificateSigningRequestDer};
use x509_parser::prelude::{FromDer, X509CertificationRequest};

use crate::{fingerprint::fingerprint, CertError};

/// Serial (lowercase hex), validity and fingerprint of one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub serial: String,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    /// `sha256:…` of the DER, as the gateway indexes appliances by it.
    pub fingerprint: String,
}

impl CertInfo {
    /// Of the first certificate in `cert_pem`.
    pub fn from_pem(cert_pem: &str) -> Result<CertInfo, CertError> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CertError::Pem(e.to_string()))?;
        CertInfo::from_der(&der)
    }

    pub fn from_der(der: &[u8]) -> Result<CertInfo, CertError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| CertError::Pem(format!("certificate: {e}")))?;
        let ts = |t: x509_parser::time::ASN1Time| {
            Timestamp::from_second(t.timestamp())
                .map_err(|e| CertError::Validity(format!("certificate time: {e}")))
        };
        Ok(CertInfo {
            serial: hex::encode(cert.tbs_certificate.raw_serial()),
            not_before: ts(cert.validity().not_before)?,
            not_after: ts(cert.validity().not_after)?,
            fingerprint: fingerprint(der),
        })
    }
}

/// The subject common name a CSR asks for (unverified: only to compare with who is asking).
pub fn csr_common_name(csr_pem: &str) -> Result<Option<String>, CertError> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| CertError::InvalidCsr(e.to_string()))?;
    let (_, csr) = X509CertificationRequest::from_der(&der)
        .map_err(|e| CertError::InvalidCsr(e.to_string()))?;
    let name = csr
        .certification_request_info
        .subject
        .iter_common_name()
        .next();
    name.map(|cn| {
        cn.as_str()
            .map(str::to_string)
            .map_err(|e| CertError::InvalidCsr(format!("common name: {e}")))
    })
    .transpose()
}

/// Whether the private key `key_pem` is the one certified by `cert_pem` (same public key).
pub fn key_matches_cert(key_pem: &str, cert_pem: &str) -> Result<bool, CertError> {
    let key = rcgen::KeyPair::from_pem(key_pem)?;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| CertError::Pem(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| CertError::Pem(format!("certificate: {e}")))?;
    Ok(cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

/// The DER SubjectPublicKeyInfo of the first certificate in `cert_pem`.
pub fn cert_spki_pem(cert_pem: &str) -> Result<Vec<u8>, CertError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| CertError::Pem(e.to_string()))?;
    crate::ca::cert_spki(&der)
}

/// The detail of an `agent.cert_renewed` record, the same in both trails: old and new serial,
/// fingerprint and not_after.
pub fn renewed_detail(old: Option<&CertInfo>, new: &CertInfo) -> serde_json::Value {
    let side = |i: &CertInfo| {
        serde_json::json!({
            "serial": i.serial, "fingerprint": i.fingerprint, "not_after": i.not_after,
        })
    };
    serde_json::json!({ "old": old.map(side), "new": side(new) })
}
