//! Signing and checking teardown proofs ([`endpoint_types::teardown`]): the agent signs with
//! its tunnel key; a verifier needs only the gateway CA's certificate and the appliance
//! certificate the proof came with. The certificate must chain to that CA (at the time the
//! proof was made: agent certificates expire, proofs are kept) and name the appliance the
//! proof is about, and the signature must hold over the proof's canonical bytes.

use crate::record_signature::{verify_with_cert, RecordSignatureError, RecordSigner};
use endpoint_types::teardown::{SignedTeardown, TeardownProof};
use rustls_pki_types::{pem::PemObject, CertificateDer, UnixTime};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TeardownVerifyError {
    #[error("the gateway CA certificate is unusable: {0}")]
    BadCa(String),
    #[error("the appliance certificate is unusable: {0}")]
    BadCertificate(String),
    #[error("the appliance certificate was not issued by the gateway CA (or was not valid when the proof was made): {0}")]
    Untrusted(String),
    #[error("the certificate names {found:?}, not appliance {want:?}")]
    WrongAppliance { want: String, found: String },
    #[error("the record is a proof for endpoint {found:?}, not {want:?}")]
    WrongEndpoint { want: String, found: String },
    #[error("the signature does not verify over the proof's bytes: the record was edited or not signed by the appliance")]
    Signature(RecordSignatureError),
}

impl TeardownVerifyError {
    /// Which part failed, for a structured error's details.
    pub fn part(&self) -> &'static str {
        match self {
            TeardownVerifyError::BadCa(_) => "ca",
            TeardownVerifyError::BadCertificate(_) | TeardownVerifyError::Untrusted(_) => {
                "certificate"
            }
            TeardownVerifyError::WrongAppliance { .. } => "appliance",
            TeardownVerifyError::WrongEndpoint { .. } => "endpoint",
            TeardownVerifyError::Signature(_) => "signature",
        }
    }
}

/// Signs `proof` with the appliance key.
pub fn sign_teardown(
    signer: &RecordSigner,
    proof: TeardownProof,
) -> Result<SignedTeardown, RecordSignatureError> {
    let signature = signer.sign(proof.canonical().as_bytes())?;
    Ok(SignedTeardown { proof, signature })
}

/// Checks a stored proof for `endpoint_id` against the gateway CA (`ca_pem`) and the
/// appliance certificate it came with (`cert_pem`). Returns the certificate's fingerprint.
pub fn verify_teardown(
    ca_pem: &str,
    cert_pem: &str,
    endpoint_id: &str,
    signed: &SignedTeardown,
) -> Result<String, TeardownVerifyError> {
    let proof = &signed.proof;
    if proof.endpoint_id != endpoint_id {
        return Err(TeardownVerifyError::WrongEndpoint {
            want: endpoint_id.to_string(),
            found: proof.endpoint_id.clone(),
        });
    }
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| TeardownVerifyError::BadCertificate(e.to_string()))?;
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(proof.proved_at.as_second()).unwrap_or(0),
    ));
    check_appliance_cert(ca_pem, &cert, &proof.appliance_id, at)?;
    verify_with_cert(&cert, proof.canonical().as_bytes(), &signed.signature)
        .map_err(TeardownVerifyError::Signature)?;
    Ok(crate::fingerprint(&cert))
}

/// `cert` chains to the CA in `ca_pem` as a client certificate at `at`, and names
/// `appliance_id` (common name and `postern:appliance:` URI, as [`crate::Ca::sign_agent_csr`]
/// makes them).
fn check_appliance_cert(
    ca_pem: &str,
    cert: &CertificateDer<'_>,
    appliance_id: &str,
    at: UnixTime,
) -> Result<(), TeardownVerifyError> {
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| TeardownVerifyError::BadCa(e.to_string()))?;
    let anchor = webpki::anchor_from_trusted_cert(&ca)
        .map_err(|e| TeardownVerifyError::BadCa(e.to_string()))?;
    let leaf = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| TeardownVerifyError::BadCertificate(e.to_string()))?;
    leaf.verify_for_usage(
        &[webpki::ring::ECDSA_P256_SHA256],
        &[anchor],
        &[],
        at,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| TeardownVerifyError::Untrusted(e.to_string()))?;
    let wrong = |found: String| TeardownVerifyError::WrongAppliance {
        want: appliance_id.to_string(),
        found,
    };
    let cn = crate::cert_common_name(cert)
        .map_err(|e| TeardownVerifyError::BadCertificate(e.to_string()))?;
    if cn != appliance_id {
        return Err(wrong(cn));
    }
    let uri = format!("postern:appliance:{appliance_id}");
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TeardownVerifyError::BadCertificate(e.to_string()))?;
    let names_it = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value
                .general_names
                .iter()
                .any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == uri))
        });
    if !names_it {
        return Err(wrong(format!("{cn} (without the URI {uri})")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Ca;
    use endpoint_types::{
        resource::{CloseReason, EndpointType},
        teardown::{check, TeardownCheck},
    };
    use jiff::Timestamp;
    use std::time::Duration;

    struct Fixture {
        ca: Ca,
        cert_pem: String,
        signer: RecordSigner,
    }

    fn enrolled(ca: &Ca, appliance_id: &str) -> (String, RecordSigner) {
        let (key_pem, csr) = crate::generate_key_and_csr(appliance_id).unwrap();
        let cert_pem = ca
            .sign_agent_csr(
                &csr,
                appliance_id,
                Timestamp::now(),
                Duration::from_secs(3600),
            )
            .unwrap();
        (cert_pem, RecordSigner::from_pem(key_pem.expose()).unwrap())
    }

    fn fixture() -> Fixture {
        let ca = Ca::generate("gateway ca", Timestamp::now()).unwrap();
        let (cert_pem, signer) = enrolled(&ca, "apl_1");
        Fixture {
            ca,
            cert_pem,
            signer,
        }
    }

    fn proof() -> TeardownProof {
        TeardownProof {
            endpoint_id: "ep_1".into(),
            appliance_id: "apl_1".into(),
            endpoint_type: EndpointType::Kubectl,
            resource_id: "aws_eks_cluster.main".into(),
            reason: CloseReason::Expired,
            ended_at: Timestamp::now(),
            proved_at: Timestamp::now(),
            offline: false,
            checks: vec![TeardownCheck {
                name: check::KUBE_CERTIFICATE_REFUSED.into(),
                passed: true,
                took_ms: 0,
                detail: "ENDPOINT_EXPIRED".into(),
            }],
        }
    }

    #[test]
    fn a_signed_proof_verifies_and_an_edited_one_does_not() {
        let f = fixture();
        let signed = sign_teardown(&f.signer, proof()).unwrap();
        let fp = verify_teardown(f.ca.cert_pem(), &f.cert_pem, "ep_1", &signed).unwrap();
        assert_eq!(fp, crate::fingerprint_pem(&f.cert_pem).unwrap());

        let mut edited = signed.clone();
        edited.proof.checks[0].passed = false;
        assert!(matches!(
            verify_teardown(f.ca.cert_pem(), &f.cert_pem, "ep_1", &edited),
            Err(TeardownVerifyError::Signature(
                RecordSignatureError::Mismatch
            ))
        ));
        let mut edited = signed.clone();
        edited.proof.reason = CloseReason::Retired;
        let e = verify_teardown(f.ca.cert_pem(), &f.cert_pem, "ep_1", &edited).unwrap_err();
        assert_eq!(e.part(), "signature");
        // A proof of another endpoint is not this endpoint's proof.
        assert!(matches!(
            verify_teardown(f.ca.cert_pem(), &f.cert_pem, "ep_2", &signed),
            Err(TeardownVerifyError::WrongEndpoint { .. })
        ));
    }

    #[test]
    fn the_certificate_must_come_from_the_gateway_ca_and_name_the_appliance() {
        let f = fixture();
        let signed = sign_teardown(&f.signer, proof()).unwrap();
        // Another CA's word is not the gateway's.
        let other_ca = Ca::generate("other ca", Timestamp::now()).unwrap();
        assert!(matches!(
            verify_teardown(other_ca.cert_pem(), &f.cert_pem, "ep_1", &signed),
            Err(TeardownVerifyError::Untrusted(_))
        ));
        // Another appliance's certificate (and key) cannot speak for apl_1.
        let (other_cert, other_signer) = enrolled(&f.ca, "apl_2");
        let forged = sign_teardown(&other_signer, proof()).unwrap();
        assert!(matches!(
            verify_teardown(f.ca.cert_pem(), &other_cert, "ep_1", &forged),
            Err(TeardownVerifyError::WrongAppliance { .. })
        ));
        // Nor can apl_1's certificate vouch for a signature by another key.
        assert!(matches!(
            verify_teardown(f.ca.cert_pem(), &f.cert_pem, "ep_1", &forged),
            Err(TeardownVerifyError::Signature(_))
        ));
        assert!(matches!(
            verify_teardown(f.ca.cert_pem(), "not a certificate", "ep_1", &signed),
            Err(TeardownVerifyError::BadCertificate(_))
        ));
        // A proof claiming a time the certificate was not valid at is refused.
        let mut late = proof();
        late.proved_at = Timestamp::now() + jiff::SignedDuration::from_hours(48);
        let late = sign_teardown(&f.signer, late).unwrap();
        assert!(matches!(
            verify_teardown(f.ca.cert_pem(), &f.cert_pem, "ep_1", &late),
            Err(TeardownVerifyError::Untrusted(_))
        ));
    }
}
