//! The appliance key the agent signs with (trail heads, teardown proofs), shared by everything
//! that signs, so a renewed key (crate::cert_renewal) takes over everywhere at once: when the
//! agent dials with the renewed certificate, since the gateway checks what a connection
//! carries against the certificate that connection was authenticated with.

use certs::record_signature::{RecordSignatureError, RecordSigner};
use std::sync::{Arc, RwLock};

#[derive(Debug, Clone)]
pub struct ApplianceKey(Arc<RwLock<Current>>);

#[derive(Debug)]
struct Current {
    signer: RecordSigner,
    /// Fingerprint of the certificate of this key: the `key` of every head.
    fingerprint: String,
}

impl ApplianceKey {
    pub fn new(signer: RecordSigner, fingerprint: String) -> ApplianceKey {
        ApplianceKey(Arc::new(RwLock::new(Current {
            signer,
            fingerprint,
        })))
    }

    /// From the PEM of the key and of its certificate.
    pub fn from_pem(key_pem: &str, cert_pem: &str) -> Result<ApplianceKey, String> {
        let signer = RecordSigner::from_pem(key_pem).map_err(|e| e.to_string())?;
        let fingerprint = certs::fingerprint_pem(cert_pem).map_err(|e| e.to_string())?;
        Ok(ApplianceKey::new(signer, fingerprint))
    }

    /// Signs with the current key; the signature and the fingerprint of its certificate.
    pub fn sign(&self, bytes: &[u8]) -> Result<(String, String), RecordSignatureError> {
        self.with(|signer, fingerprint| Ok((signer.sign(bytes)?, fingerprint.to_string())))
    }

    pub fn with<R>(&self, f: impl FnOnce(&RecordSigner, &str) -> R) -> R {
        let current = self.0.read().unwrap_or_else(|p| p.into_inner());
        f(&current.signer, &current.fingerprint)
    }

    pub fn fingerprint(&self) -> String {
        self.with(|_, fp| fp.to_string())
    }

    /// From now on, sign with the key in `key_pem`, certified by `cert_pem`.
    pub fn replace(&self, key_pem: &str, cert_pem: &str) -> Result<(), String> {
        let signer = RecordSigner::from_pem(key_pem).map_err(|e| e.to_string())?;
        let fingerprint = certs::fingerprint_pem(cert_pem).map_err(|e| e.to_string())?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Current {
            signer,
            fingerprint,
        };
        Ok(())
    }
}
