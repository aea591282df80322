//! The host's trust store: the CA bundle the operating system keeps (`SSL_CERT_FILE`, else the
//! usual Debian, RHEL and Alpine paths). Used where Postern talks to a server whose certificate
//! comes from a public CA: webhook receivers, and the gateway's API when the vendor serves its
//! own certificate (`tls_cert`) and the CLI is given no `--ca-file`.

use rustls::RootCertStore;
use rustls_pki_types::{pem::PemObject, CertificateDer};
use std::path::PathBuf;

const BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The first bundle that holds at least one usable certificate, and where it was found; `None`
/// when the host has none (a minimal container).
pub fn system_roots() -> Option<(RootCertStore, PathBuf)> {
    let files = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(BUNDLES.map(PathBuf::from));
    for file in files {
        let Ok(pem) = std::fs::read(&file) else {
            continue;
        };
        let mut store = RootCertStore::empty();
        let certs = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok);
        let (added, _) = store.add_parsable_certificates(certs);
        if added > 0 {
            return Some((store, file));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_bundle_is_read_whole() {
        // This host's own bundle, when it has one, through the same reader.
        let Some(bundle) = BUNDLES.iter().map(PathBuf::from).find(|p| p.exists()) else {
            return;
        };
        let pem = std::fs::read(&bundle).unwrap();
        let n = CertificateDer::pem_slice_iter(&pem)
            .filter_map(Result::ok)
            .count();
        let (store, _) = system_roots().unwrap();
        assert!(n > 0);
        assert_eq!(store.len(), n, "every certificate of the bundle is a root");
    }
}
