use std::fmt;
use std::time::Duration;

use jiff::Timestamp;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
    PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::{pem::PemObject, CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509CertificationRequest};

use crate::{fingerprint::fingerprint, CertError, Secret};

const CA_VALIDITY: time::Duration = time::Duration::days(3653);

/// A freshly minted certificate and its private key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: Secret,
}

/// The gateway's certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// New self-signed CA ("Postern CA <common_name>"), valid from now-1h for 10 years, key ECDSA P-256.
    pub fn generate(common_name: &str, now: Timestamp) -> Result<Ca, CertError> {
        let now = to_time(now)?;
        let mut params = cert_params(&format!("Postern CA {common_name}"))?;
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + CA_VALIDITY;
        // Path length 0: this CA signs leaves only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, CertError> {
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::Pem(e.to_string()))?;
        let [cert_der] = <[_; 1]>::try_from(certs).map_err(|certs| {
            CertError::Pem(format!(
                "CA PEM must hold exactly one certificate, found {}",
                certs.len()
            ))
        })?;
        let key = KeyPair::from_pem(key_pem)?;
        // A CA key that does not belong to the certificate would mint leaves nobody can verify.
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| CertError::Pem(format!("CA certificate: {e}")))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertError::KeyMismatch);
        }
        Ok(Ca {
            issuer: Issuer::from_ca_cert_der(&cert_der, key)?,
            cert_pem: cert_pem.to_owned(),
            cert_der,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> Secret {
        Secret::new(self.issuer.key().serialize_pem())
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// Server cert for the gateway; each SAN is an IP address if it parses as one, else a DNS
    /// name. Valid from now-5min to now+`validity`, EKU serverAuth. `cert_pem` is the leaf
    /// followed by the CA certificate, so clients pinning the CA by fingerprint find it.
    pub fn issue_server(
        &self,
        sans: &[String],
        now: Timestamp,
        validity: Duration,
    ) -> Result<Issued, CertError> {
        let cn = sans.first().map_or("Postern gateway", String::as_str);
        let mut params = leaf_params(cn, now, time::Duration::minutes(5), validity)?;
        params.subject_alt_names = CertificateParams::new(sans.to_vec())?.subject_alt_names;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: format!("{}{}", leaf.pem(), self.cert_pem),
            key_pem: Secret::new(key.serialize_pem()),
        })
    }

    /// Signs an agent's CSR. Only the public key is taken from the CSR: the agent chooses
    /// its key, the gateway alone decides who the certificate names and what it may do.
    /// CN = `appliance_id`, URI SAN `postern:appliance:<appliance_id>`, EKU clientAuth,
    /// valid now-min(5min, validity/10) .. now+`validity`. Returns the leaf certificate PEM.
    pub fn sign_agent_csr(
        &self,
        csr_pem: &str,
        appliance_id: &str,
        now: Timestamp,
        validity: Duration,
    ) -> Result<String, CertError> {
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| CertError::InvalidCsr(e.to_string()))?;
        let (_, csr) = X509CertificationRequest::from_der(&der)
            .map_err(|e| CertError::InvalidCsr(e.to_string()))?;
        // Proof of possession: the requester holds the private key it asks us to certify.
        csr.verify_signature()
            .map_err(|e| CertError::InvalidCsr(format!("signature does not verify: {e}")))?;
        let public_key =
            SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)?;

        // Backdated for clock skew, but never by more than a tenth of the lifetime: a lifetime
        // of seconds (tests) must not be mostly in the past, or renewal would come too late.
        let backdate = time::Duration::try_from(validity / 10)
            .unwrap_or(time::Duration::minutes(5))
            .min(time::Duration::minutes(5));
        let mut params = leaf_params(appliance_id, now, backdate, validity)?;
        params.subject_alt_names = vec![SanType::URI(
            format!("postern:appliance:{appliance_id}").try_into()?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok(params.signed_by(&public_key, &self.issuer)?.pem())
    }

    /// Short-lived client certificate (new ECDSA P-256 key) for an endpoint credential,
    /// CN = `common_name`, EKU clientAuth, valid now-1min .. `not_after`. `cert_pem` is the leaf.
    pub fn issue_client(
        &self,
        common_name: &str,
        now: Timestamp,
        not_after: Timestamp,
    ) -> Result<Issued, CertError> {
        let mut params = leaf_params(common_name, now, time::Duration::minutes(1), Duration::ZERO)?;
        params.not_after = to_time(not_after)?;
        if params.not_after <= params.not_before {
            return Err(CertError::Validity(format!(
                "not_after {not_after} is not after not_before"
            )));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        Ok(Issued {
            cert_pem: params.signed_by(&key, &self.issuer)?.pem(),
            key_pem: Secret::new(key.serialize_pem()),
        })
    }
}

impl Ca {
    /// Signs an endpoint client's CSR (kubectl): only its public key is taken, after proof of
    /// possession. CN = `common_name`, EKU clientAuth, valid now-1min .. `not_after` (the
    /// endpoint's expiry), so the certificate dies with the endpoint.
    pub fn sign_client_csr(
        &self,
        csr_pem: &str,
        common_name: &str,
        now: Timestamp,
        not_after: Timestamp,
    ) -> Result<String, CertError> {
        let public_key = SubjectPublicKeyInfo::from_der(&verified_csr_spki(csr_pem)?)?;
        let mut params = leaf_params(common_name, now, time::Duration::minutes(1), Duration::ZERO)?;
        params.not_after = to_time(not_after)?;
        if params.not_after <= params.not_before {
            return Err(CertError::Validity(format!(
                "not_after {not_after} is not after not_before"
            )));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok(params.signed_by(&public_key, &self.issuer)?.pem())
    }
}

/// The DER SubjectPublicKeyInfo of a CSR whose signature verifies.
pub fn verified_csr_spki(csr_pem: &str) -> Result<Vec<u8>, CertError> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| CertError::InvalidCsr(e.to_string()))?;
    let (_, csr) = X509CertificationRequest::from_der(&der)
        .map_err(|e| CertError::InvalidCsr(e.to_string()))?;
    csr.verify_signature()
        .map_err(|e| CertError::InvalidCsr(format!("signature does not verify: {e}")))?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// The DER SubjectPublicKeyInfo of a CSR, unverified (matching a presented certificate
/// against CSRs that were verified when they were accepted).
pub fn csr_spki(csr_pem: &str) -> Result<Vec<u8>, CertError> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| CertError::InvalidCsr(e.to_string()))?;
    let (_, csr) = X509CertificationRequest::from_der(&der)
        .map_err(|e| CertError::InvalidCsr(e.to_string()))?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// The DER SubjectPublicKeyInfo of a DER certificate.
pub fn cert_spki(cert_der: &[u8]) -> Result<Vec<u8>, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CertError::Pem(format!("certificate: {e}")))?;
    Ok(cert.tbs_certificate.subject_pki.raw.to_vec())
}

/// The subject common name of a DER certificate (only meaningful once its chain verified).
pub fn cert_common_name(cert_der: &[u8]) -> Result<String, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CertError::Pem(format!("certificate: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| CertError::Pem("certificate has no common name".into()))?;
    cn.as_str()
        .map(str::to_string)
        .map_err(|e| CertError::Pem(format!("common name: {e}")))
}

/// Generates the agent's key in the appliance and a CSR for it (CN = `common_name`).
/// Returns (key_pem, csr_pem).
pub fn generate_key_and_csr(common_name: &str) -> Result<(Secret, String), CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = subject(common_name).serialize_request(&key)?;
    Ok((Secret::new(key.serialize_pem()), csr.pem()?))
}

fn subject(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
}

/// Parameters for a certificate we sign, with a random serial: rcgen would otherwise derive
/// the serial from the public key, so re-signing the same agent key would repeat a serial.
fn cert_params(common_name: &str) -> Result<CertificateParams, CertError> {
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    serial[0] &= 0x7f;
    let mut params = subject(common_name);
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(params)
}

/// Leaf parameters valid from `now - backdate` (tolerates clock skew) to `now + validity`.
fn leaf_params(
    common_name: &str,
    now: Timestamp,
    backdate: time::Duration,
    validity: Duration,
) -> Result<CertificateParams, CertError> {
    let now = to_time(now)?;
    let mut params = cert_params(common_name)?;
    params.not_before = now - backdate;
    params.not_after = time::Duration::try_from(validity)
        .ok()
        .and_then(|v| now.checked_add(v))
        .ok_or_else(|| CertError::Validity(format!("validity {validity:?} is out of range")))?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn to_time(ts: Timestamp) -> Result<OffsetDateTime, CertError> {
    OffsetDateTime::from_unix_timestamp(ts.as_second())
        .map_err(|e| CertError::Validity(format!("{ts}: {e}")))
}
