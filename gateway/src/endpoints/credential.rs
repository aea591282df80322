//! Client credentials as the front ends look them up: parsed once when an endpoint goes live
//! (created, approved or restored at start-up), so a handshake only hashes what the client
//! presented and finds its endpoint with one map lookup.

use endpoint_types::{api::ClientCredential, resource::EndpointType};
use russh::keys::{HashAlg, PublicKey};
use std::fmt;

/// What a front end finds an endpoint by. The variant is the endpoint type, so a key made for
/// one type never opens an endpoint of another.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum CredentialKey {
    /// SHA-256 of the DER SubjectPublicKeyInfo of the client certificate's key.
    Kubectl([u8; 32]),
    /// SHA-256 of the DER SubjectPublicKeyInfo of the client certificate's key.
    Tcp([u8; 32]),
    /// The SHA-256 fingerprint of the engineer's public key (what `ssh-keygen -l` shows).
    Ssh([u8; 32]),
    /// The user name in the startup message: the endpoint id.
    Postgres(String),
}

impl fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialKey::Kubectl(h) => write!(f, "Kubectl(sha256:{})", hex::encode(h)),
            CredentialKey::Tcp(h) => write!(f, "Tcp(sha256:{})", hex::encode(h)),
            CredentialKey::Ssh(h) => write!(f, "Ssh(sha256:{})", hex::encode(h)),
            CredentialKey::Postgres(user) => write!(f, "Postgres({user:?})"),
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

impl CredentialKey {
    /// The key of the certificate a client presented to the front end of type `t` (the chain
    /// was verified in the handshake); None for a type without client certificates or a
    /// certificate that does not parse.
    pub fn of_certificate(t: EndpointType, cert_der: &[u8]) -> Option<CredentialKey> {
        let spki = certs::cert_spki(cert_der).ok()?;
        Self::of_spki(t, &spki)
    }

    fn of_spki(t: EndpointType, spki_der: &[u8]) -> Option<CredentialKey> {
        match t {
            EndpointType::Kubectl => Some(CredentialKey::Kubectl(sha256(spki_der))),
            EndpointType::Tcp => Some(CredentialKey::Tcp(sha256(spki_der))),
            EndpointType::Postgres | EndpointType::Ssh => None,
        }
    }

    /// The key of an SSH public key a client offered (its comment does not count).
    pub fn of_ssh_key(key: &PublicKey) -> Option<CredentialKey> {
        key.fingerprint(HashAlg::Sha256)
            .sha256()
            .map(CredentialKey::Ssh)
    }

    /// The key of a postgres startup message's user name.
    pub fn of_postgres_user(user: &str) -> CredentialKey {
        CredentialKey::Postgres(user.to_string())
    }
}

/// An endpoint's client credential, parsed once.
#[derive(Clone)]
pub struct ParsedCredential {
    /// What the endpoint's front end finds it by.
    pub key: CredentialKey,
    /// postgres: the SCRAM verifier, ready for the exchange (the verifier redacts itself in Debug).
    pub scram: Option<certs::scram::Verifier>,
}

impl fmt::Debug for ParsedCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedCredential")
            .field("key", &self.key)
            .field("scram", &self.scram)
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("a {endpoint_type} endpoint cannot use a {credential} credential")]
    WrongType {
        endpoint_type: EndpointType,
        credential: &'static str,
    },
    #[error("the certificate request does not parse: {0}")]
    Csr(String),
    #[error("the OpenSSH public key does not parse: {0}")]
    SshKey(String),
    #[error("the SCRAM verifier does not parse: {0}")]
    Scram(String),
}

fn credential_name(c: &ClientCredential) -> &'static str {
    match c {
        ClientCredential::Kubectl { .. } => "kubectl",
        ClientCredential::Tcp { .. } => "tcp",
        ClientCredential::Postgres { .. } => "postgres",
        ClientCredential::Ssh { .. } => "ssh",
    }
}

impl ParsedCredential {
    /// Parses the credential of endpoint `endpoint_id` of type `t`. The create request checked
    /// it already (signatures, key algorithm); this only derives what lookups need.
    pub fn parse(
        endpoint_id: &str,
        t: EndpointType,
        credential: &ClientCredential,
    ) -> Result<ParsedCredential, CredentialError> {
        let wrong = || CredentialError::WrongType {
            endpoint_type: t,
            credential: credential_name(credential),
        };
        match (t, credential) {
            (EndpointType::Kubectl, ClientCredential::Kubectl { csr_pem })
            | (EndpointType::Tcp, ClientCredential::Tcp { csr_pem }) => {
                let spki =
                    certs::csr_spki(csr_pem).map_err(|e| CredentialError::Csr(e.to_string()))?;
                let key = CredentialKey::of_spki(t, &spki).ok_or_else(wrong)?;
                Ok(ParsedCredential { key, scram: None })
            }
            (EndpointType::Ssh, ClientCredential::Ssh { public_key }) => {
                let parsed = PublicKey::from_openssh(public_key.trim())
                    .map_err(|e| CredentialError::SshKey(e.to_string()))?;
                let key = CredentialKey::of_ssh_key(&parsed)
                    .ok_or_else(|| CredentialError::SshKey("no SHA-256 fingerprint".into()))?;
                Ok(ParsedCredential { key, scram: None })
            }
            (EndpointType::Postgres, ClientCredential::Postgres { scram_verifier }) => {
                let verifier = certs::scram::Verifier::parse(scram_verifier)
                    .map_err(|e| CredentialError::Scram(e.to_string()))?;
                Ok(ParsedCredential {
                    key: CredentialKey::of_postgres_user(endpoint_id),
                    scram: Some(verifier),
                })
            }
            _ => Err(wrong()),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_credentials {
    //! Real credentials as the CLI makes them, for the index tests.

    use super::*;

    pub fn csr(t: EndpointType) -> (ClientCredential, String) {
        let (_key, csr_pem) = certs::generate_key_and_csr("postern test endpoint").unwrap();
        let cred = match t {
            EndpointType::Tcp => ClientCredential::Tcp {
                csr_pem: csr_pem.clone(),
            },
            _ => ClientCredential::Kubectl {
                csr_pem: csr_pem.clone(),
            },
        };
        (cred, csr_pem)
    }

    pub fn ssh() -> (ClientCredential, russh::keys::PrivateKey) {
        let key = crate::endpoints::ssh::host_key::generate("postern-endpoint").unwrap();
        let line = crate::endpoints::ssh::host_key::public_line(&key);
        (ClientCredential::Ssh { public_key: line }, key)
    }

    pub fn postgres() -> ClientCredential {
        let v = certs::scram::Verifier::from_password("correct horse", b"salt-salt", 4096);
        ClientCredential::Postgres {
            scram_verifier: v.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{test_credentials::*, *};

    /// A DER certificate for `csr_pem`, signed by a fresh CA as the gateway would.
    fn signed(csr_pem: &str) -> Vec<u8> {
        use rustls_pki_types::{pem::PemObject, CertificateDer};
        let now = jiff::Timestamp::now();
        let ca = certs::Ca::generate("test ca", now).unwrap();
        let until = now
            .checked_add(jiff::SignedDuration::from_hours(1))
            .unwrap();
        let pem = ca
            .sign_client_csr(csr_pem, "postern:endpoint:ep_x", now, until)
            .unwrap();
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    #[test]
    fn a_signed_certificate_has_the_key_of_its_csr_for_its_type_only() {
        let (cred, csr_pem) = csr(EndpointType::Kubectl);
        let parsed = ParsedCredential::parse("ep_x", EndpointType::Kubectl, &cred).unwrap();
        let cert = signed(&csr_pem);
        assert_eq!(
            CredentialKey::of_certificate(EndpointType::Kubectl, &cert),
            Some(parsed.key.clone())
        );
        // The same key presented to the tcp front end is another key altogether.
        assert_ne!(
            CredentialKey::of_certificate(EndpointType::Tcp, &cert),
            Some(parsed.key)
        );
        assert_eq!(
            CredentialKey::of_certificate(EndpointType::Postgres, &cert),
            None
        );
        assert_eq!(
            CredentialKey::of_certificate(EndpointType::Kubectl, b"not der"),
            None
        );
        let (other, _) = csr(EndpointType::Kubectl);
        let other = ParsedCredential::parse("ep_y", EndpointType::Kubectl, &other).unwrap();
        assert_ne!(
            CredentialKey::of_certificate(EndpointType::Kubectl, &cert),
            Some(other.key)
        );
    }

    #[test]
    fn an_ssh_key_is_found_by_its_fingerprint_whatever_its_comment() {
        let (cred, key) = ssh();
        let parsed = ParsedCredential::parse("ep_x", EndpointType::Ssh, &cred).unwrap();
        let mut offered = key.public_key().clone();
        offered.set_comment("someone@laptop");
        assert_eq!(CredentialKey::of_ssh_key(&offered), Some(parsed.key));
        let (_, other) = ssh();
        assert_ne!(
            CredentialKey::of_ssh_key(other.public_key()),
            CredentialKey::of_ssh_key(&offered)
        );
    }

    #[test]
    fn a_postgres_endpoint_is_found_by_its_id_and_keeps_its_verifier() {
        let parsed = ParsedCredential::parse("ep_pg", EndpointType::Postgres, &postgres()).unwrap();
        assert_eq!(parsed.key, CredentialKey::of_postgres_user("ep_pg"));
        assert!(parsed.scram.is_some());
        assert!(!format!("{parsed:?}").contains("SCRAM-SHA-256$"));
    }

    #[test]
    fn credentials_of_another_type_or_malformed_are_refused() {
        let (kube, _) = csr(EndpointType::Kubectl);
        assert_eq!(
            ParsedCredential::parse("ep_x", EndpointType::Tcp, &kube).unwrap_err(),
            CredentialError::WrongType {
                endpoint_type: EndpointType::Tcp,
                credential: "kubectl"
            }
        );
        assert!(matches!(
            ParsedCredential::parse("ep_x", EndpointType::Ssh, &postgres()),
            Err(CredentialError::WrongType { .. })
        ));
        assert!(matches!(
            ParsedCredential::parse(
                "ep_x",
                EndpointType::Kubectl,
                &ClientCredential::Kubectl {
                    csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into()
                }
            ),
            Err(CredentialError::Csr(_))
        ));
        assert!(matches!(
            ParsedCredential::parse(
                "ep_x",
                EndpointType::Ssh,
                &ClientCredential::Ssh {
                    public_key: "ssh-ed25519 AAAA".into()
                }
            ),
            Err(CredentialError::SshKey(_))
        ));
        assert!(matches!(
            ParsedCredential::parse(
                "ep_x",
                EndpointType::Postgres,
                &ClientCredential::Postgres {
                    scram_verifier: "md5abc".into()
                }
            ),
            Err(CredentialError::Scram(_))
        ));
    }
}
