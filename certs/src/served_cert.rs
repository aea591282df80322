//! A server certificate the vendor supplies (e.g. from a public CA) as a PEM chain and key.

use std::sync::Arc;

use rustls::sign::CertifiedKey;

use crate::{provider, tls, CertError, Secret};

/// Parses `chain_pem` (leaf first) and `key_pem` into what rustls serves, refusing a key that
/// does not belong to the leaf.
pub fn certified_key(chain_pem: &str, key_pem: &Secret) -> Result<Arc<CertifiedKey>, CertError> {
    let chain = tls::certs(chain_pem)?;
    if chain.is_empty() {
        return Err(CertError::Pem("no certificate in the chain file".into()));
    }
    let key = tls::private_key(key_pem)?;
    let signing = provider().key_provider.load_private_key(key)?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match()?;
    Ok(Arc::new(certified))
}
