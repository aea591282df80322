//! Signatures over audit records that must be provable to a third party: trail heads and
//! teardown proofs. An appliance signs with its tunnel key (ECDSA P-256, the key its agent
//! certificate certifies), so anyone holding that certificate can check the record; the
//! gateway signs with an audit key of its own (same algorithm), published as a public key.
//!
//! Signatures are ASN.1 DER ECDSA P-256 / SHA-256, standard base64. What is signed is the
//! caller's canonical bytes; this module does not interpret them.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use ring::{
    rand::SystemRandom,
    signature::{
        EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
        ECDSA_P256_SHA256_ASN1_SIGNING,
    },
};
use rustls_pki_types::{pem::PemObject, PrivatePkcs8KeyDer};

/// The OID of an elliptic-curve public key (id-ecPublicKey) and of the P-256 curve.
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordSignatureError {
    #[error("signing key: {0}")]
    BadKey(String),
    #[error("signer certificate: {0}")]
    BadCertificate(String),
    #[error("public key: {0}")]
    BadPublicKey(String),
    #[error("signature is not valid base64")]
    BadEncoding,
    #[error("signature does not verify")]
    Mismatch,
    #[error("signing failed")]
    Sign,
}

/// A private key that signs records. Its private half never leaves the process and is never
/// printed.
pub struct RecordSigner {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for RecordSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RecordSigner({}, private half redacted)",
            self.public_key_b64()
        )
    }
}

impl RecordSigner {
    /// Loads a PKCS#8 PEM ECDSA P-256 key (the agent's tunnel key is one).
    pub fn from_pem(key_pem: &str) -> Result<RecordSigner, RecordSignatureError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| RecordSignatureError::BadKey(e.to_string()))?;
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            der.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| RecordSignatureError::BadKey(e.to_string()))?;
        Ok(RecordSigner { pair, rng })
    }

    /// A new key and its PKCS#8 PEM, to be stored 0600 by the caller (see `write_private`).
    pub fn generate() -> Result<(RecordSigner, crate::Secret), RecordSignatureError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| RecordSignatureError::BadKey(e.to_string()))?;
        let pem = crate::Secret::new(key.serialize_pem());
        Ok((RecordSigner::from_pem(pem.expose())?, pem))
    }

    /// Signs `bytes`; standard base64 of the DER signature.
    pub fn sign(&self, bytes: &[u8]) -> Result<String, RecordSignatureError> {
        let sig = self
            .pair
            .sign(&self.rng, bytes)
            .map_err(|_| RecordSignatureError::Sign)?;
        Ok(STANDARD.encode(sig.as_ref()))
    }

    /// The public key (uncompressed SEC1 point), standard base64: what a verifier is given
    /// when there is no certificate (the gateway's audit key).
    pub fn public_key_b64(&self) -> String {
        STANDARD.encode(self.pair.public_key().as_ref())
    }
}

/// Checks a signature made by [`RecordSigner::sign`] against a public key as
/// [`RecordSigner::public_key_b64`] prints it.
pub fn verify_with_public_key(
    public_key_b64: &str,
    bytes: &[u8],
    signature_b64: &str,
) -> Result<(), RecordSignatureError> {
    let point = STANDARD
        .decode(public_key_b64.trim())
        .map_err(|e| RecordSignatureError::BadPublicKey(e.to_string()))?;
    verify_point(&point, bytes, signature_b64)
}

/// Checks a signature made with the key that `cert_der` certifies (an agent certificate).
/// Only the key is taken from the certificate: whether the certificate itself is trusted
/// (issued by the gateway CA, for this appliance) is the caller's check.
pub fn verify_with_cert(
    cert_der: &[u8],
    bytes: &[u8],
    signature_b64: &str,
) -> Result<(), RecordSignatureError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| RecordSignatureError::BadCertificate(e.to_string()))?;
    let spki = &cert.tbs_certificate.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|oid| oid.to_id_string());
    if spki.algorithm.algorithm.to_id_string() != OID_EC_PUBLIC_KEY
        || curve.as_deref() != Some(OID_P256)
    {
        return Err(RecordSignatureError::BadCertificate(
            "the certified key is not ECDSA P-256".into(),
        ));
    }
    verify_point(&spki.subject_public_key.data, bytes, signature_b64)
}

fn verify_point(
    point: &[u8],
    bytes: &[u8],
    signature_b64: &str,
) -> Result<(), RecordSignatureError> {
    let sig = STANDARD
        .decode(signature_b64.trim())
        .map_err(|_| RecordSignatureError::BadEncoding)?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
        .verify(bytes, &sig)
        .map_err(|_| RecordSignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    #[test]
    fn a_signature_verifies_with_the_public_key_and_not_for_other_bytes() {
        let (signer, pem) = RecordSigner::generate().unwrap();
        let sig = signer.sign(b"head 100").unwrap();
        let public = signer.public_key_b64();
        assert_eq!(verify_with_public_key(&public, b"head 100", &sig), Ok(()));
        assert_eq!(
            verify_with_public_key(&public, b"head 101", &sig),
            Err(RecordSignatureError::Mismatch)
        );
        let (other, _) = RecordSigner::generate().unwrap();
        assert_eq!(
            verify_with_public_key(&other.public_key_b64(), b"head 100", &sig),
            Err(RecordSignatureError::Mismatch)
        );
        assert_eq!(
            verify_with_public_key(&public, b"head 100", "not base64!"),
            Err(RecordSignatureError::BadEncoding)
        );
        assert!(!format!("{signer:?}").contains(pem.expose()));
    }

    #[test]
    fn an_agent_signs_with_its_tunnel_key_and_its_certificate_verifies_it() {
        let now = Timestamp::now();
        let ca = crate::Ca::generate("test ca", now).unwrap();
        let (key_pem, csr) = crate::generate_key_and_csr("apl_1").unwrap();
        let cert_pem = ca
            .sign_agent_csr(&csr, "apl_1", now, std::time::Duration::from_secs(3600))
            .unwrap();
        let cert_der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .unwrap()
            .to_vec();
        let signer = RecordSigner::from_pem(key_pem.expose()).unwrap();
        let sig = signer.sign(b"endpoint.teardown ep_1").unwrap();
        assert_eq!(
            verify_with_cert(&cert_der, b"endpoint.teardown ep_1", &sig),
            Ok(())
        );
        assert_eq!(
            verify_with_cert(&cert_der, b"endpoint.teardown ep_2", &sig),
            Err(RecordSignatureError::Mismatch)
        );
        // A certificate of another key does not verify it.
        let (other_pem, other_csr) = crate::generate_key_and_csr("apl_2").unwrap();
        let _ = other_pem;
        let other_cert = ca
            .sign_agent_csr(
                &other_csr,
                "apl_2",
                now,
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        let other_der = rustls_pki_types::CertificateDer::from_pem_slice(other_cert.as_bytes())
            .unwrap()
            .to_vec();
        assert_eq!(
            verify_with_cert(&other_der, b"endpoint.teardown ep_1", &sig),
            Err(RecordSignatureError::Mismatch)
        );
    }
}
