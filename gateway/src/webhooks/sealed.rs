//! The webhook signing secrets at rest. The gateway signs with them, so unlike API tokens they
//! cannot be stored as hashes; they are sealed with AES-256-GCM under a key derived (HKDF-SHA256)
//! from the gateway CA's private key. A copy of the database (a PostgreSQL backup, a replica's
//! disk) alone does not give them away; whoever holds the CA key already holds the gateway.
//! Each sealed secret is bound to its customer (the AEAD's associated data), so swapping rows
//! between customers does not make one customer's secret sign for another.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use endpoint_types::secret::Secret;
use ring::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN},
    hkdf,
};

const VERSION: &str = "v1:";
const HKDF_SALT: &[u8] = b"postern webhook secrets";
const HKDF_INFO: &[u8] = b"aes-256-gcm v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("cannot seal the webhook secret")]
    Seal,
    #[error(
        "the stored webhook secret cannot be opened (sealed under another gateway CA key, or \
         corrupt); set the webhook again to make a new secret"
    )]
    Open,
}

/// Seals and opens webhook secrets. Debug shows nothing of the key.
pub struct SecretBox {
    key: LessSafeKey,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(<key redacted>)")
    }
}

struct KeyLen;

impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        32
    }
}

impl SecretBox {
    /// The box whose key is derived from `root_key` (the CA private key's PEM).
    pub fn derive(root_key: &Secret) -> Result<SecretBox, SealError> {
        let prk =
            hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(root_key.expose().as_bytes());
        let okm = prk
            .expand(&[HKDF_INFO], KeyLen)
            .map_err(|_| SealError::Seal)?;
        let mut key = [0u8; 32];
        okm.fill(&mut key).map_err(|_| SealError::Seal)?;
        let unbound = UnboundKey::new(&AES_256_GCM, &key).map_err(|_| SealError::Seal)?;
        Ok(SecretBox {
            key: LessSafeKey::new(unbound),
        })
    }

    /// `v1:` + base64(nonce ‖ ciphertext ‖ tag), bound to `customer`.
    pub fn seal(&self, customer: &str, secret: &Secret) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        let mut data = secret.expose().as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(customer.as_bytes()),
                &mut data,
            )
            .map_err(|_| SealError::Seal)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!("{VERSION}{}", B64.encode(out)))
    }

    pub fn open(&self, customer: &str, sealed: &str) -> Result<Secret, SealError> {
        let raw = sealed
            .strip_prefix(VERSION)
            .and_then(|b| B64.decode(b).ok())
            .ok_or(SealError::Open)?;
        if raw.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, ciphertext) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let mut data = ciphertext.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(customer.as_bytes()), &mut data)
            .map_err(|_| SealError::Open)?;
        String::from_utf8(plain.to_vec())
            .map(Secret::new)
            .map_err(|_| SealError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_the_same_key_and_customer() {
        let b = SecretBox::derive(&Secret::new("ca key one")).unwrap();
        let secret = Secret::new("whsec_abc");
        let sealed = b.seal("acme", &secret).unwrap();
        assert!(sealed.starts_with("v1:") && !sealed.contains("whsec_abc"));
        assert_eq!(b.open("acme", &sealed).unwrap(), secret);
        assert_ne!(b.seal("acme", &secret).unwrap(), sealed, "fresh nonce");
        assert_eq!(b.open("globex", &sealed), Err(SealError::Open));
        let other = SecretBox::derive(&Secret::new("ca key two")).unwrap();
        assert_eq!(other.open("acme", &sealed), Err(SealError::Open));
        for bad in ["", "v1:", "v1:!!", "v2:AAAA", "v1:AAAA"] {
            assert_eq!(b.open("acme", bad), Err(SealError::Open), "{bad:?}");
        }
        assert!(!format!("{b:?}").contains("key one"));
    }
}
