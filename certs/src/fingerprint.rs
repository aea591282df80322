use rustls_pki_types::{pem::PemObject, CertificateDer};

use crate::CertError;

/// "sha256:<64 lowercase hex>" of the DER bytes.
pub fn fingerprint(der: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
    )
}

/// Fingerprint of the first certificate in a PEM string.
pub fn fingerprint_pem(cert_pem: &str) -> Result<String, CertError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| CertError::Pem(e.to_string()))?;
    Ok(fingerprint(&der))
}

/// Canonical (lowercase) form of a user-supplied fingerprint, so pins compare byte for byte.
pub(crate) fn normalize(fp: &str) -> Result<String, CertError> {
    let fp = fp.trim().to_ascii_lowercase();
    match fp.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(fp),
        _ => Err(CertError::Fingerprint(format!(
            "expected \"sha256:\" followed by 64 hex digits, got {fp:?}"
        ))),
    }
}
