//! The postgres client's files for an endpoint: a random password made here (only its SCRAM
//! verifier goes to the gateway), the gateway's CA file for `sslmode=verify-full`, and the
//! libpq connection string that names both.

use endpoint_types::{
    api::{ClientCredential, EndpointAccess, EndpointRecord},
    secret::Secret,
    ApiError,
};
use std::path::{Path, PathBuf};

pub fn prepare() -> Result<(ClientCredential, Secret), ApiError> {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
    let mut b = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| ApiError::internal("no randomness for the endpoint password"))?;
    // URL-safe base64: printable ASCII (SASLprep leaves it alone) that needs no escaping in a URI.
    let password = URL_SAFE_NO_PAD.encode(b);
    let verifier = certs::scram::Verifier::generate(&password)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((
        ClientCredential::Postgres {
            scram_verifier: verifier.to_string(),
        },
        Secret::new(password),
    ))
}

/// Percent-encodes everything but RFC 3986's unreserved characters (and `/` in paths).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn connection_string(
    access: &EndpointAccess,
    password: &str,
    ca_file: &Path,
) -> Option<String> {
    let EndpointAccess::Postgres {
        host,
        port,
        database,
        user,
        ..
    } = access
    else {
        return None;
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    Some(format!(
        "postgresql://{}:{}@{host}:{port}/{}?sslmode=verify-full&sslrootcert={}",
        encode(user, false),
        encode(password, false),
        encode(database, false),
        encode(&ca_file.to_string_lossy(), true),
    ))
}

pub fn write(
    rec: &mut EndpointRecord,
    access: &EndpointAccess,
    secret: &Secret,
    home: &Path,
) -> Result<(), ApiError> {
    let EndpointAccess::Postgres { ca_pem, .. } = access else {
        return Err(ApiError::internal(
            "the gateway sent access details of another endpoint type",
        ));
    };
    let ca_file = if ca_pem.is_empty() {
        system_roots()
    } else {
        let dir = home.join(".postern").join("postgres");
        super::create_private_dir(&dir)?;
        let ca_file = dir.join(format!("{}-ca.crt", rec.id));
        // A CA certificate is public; libpq only needs to read it.
        std::fs::write(&ca_file, ca_pem)
            .map_err(|e| ApiError::internal(format!("cannot write {}: {e}", ca_file.display())))?;
        ca_file
    };
    rec.connection_string = connection_string(access, secret.expose(), &ca_file);
    Ok(())
}

/// The gateway serves a certificate from a public CA (no gateway CA in the access details):
/// the client verifies it against the system roots. libpq 16+ reads `sslrootcert=system`;
/// older libpq (Debian 12's psql is 15) only takes a file, so the system bundle is named
/// when one of the usual ones exists, and `system` otherwise.
pub fn system_roots() -> PathBuf {
    const BUNDLES: [&str; 4] = [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/ca-bundle.pem",
        "/etc/ssl/cert.pem",
    ];
    BUNDLES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("system"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_string_escapes_and_names_the_ca() {
        let access = EndpointAccess::Postgres {
            host: "127.0.0.1".into(),
            port: 6432,
            database: "app db".into(),
            user: "ep_1".into(),
            tls_server_name: "127.0.0.1".into(),
            ca_pem: String::new(),
        };
        let s =
            connection_string(&access, "pa-ss_w", Path::new("/home/a b/.postern/ca.crt")).unwrap();
        assert_eq!(s, "postgresql://ep_1:pa-ss_w@127.0.0.1:6432/app%20db?sslmode=verify-full&sslrootcert=/home/a%20b/.postern/ca.crt");
        let EndpointAccess::Postgres {
            port,
            database,
            user,
            tls_server_name,
            ca_pem,
            ..
        } = access
        else {
            unreachable!()
        };
        let v6 = EndpointAccess::Postgres {
            host: "::1".into(),
            port,
            database,
            user,
            tls_server_name,
            ca_pem,
        };
        assert!(connection_string(&v6, "p", Path::new("/c"))
            .unwrap()
            .contains("@[::1]:6432/"));
    }

    #[test]
    fn a_gateway_with_a_supplied_certificate_gets_the_system_roots() {
        let dir = tempfile::tempdir().unwrap();
        let access = EndpointAccess::Postgres {
            host: "gw.example.com".into(),
            port: 5432,
            database: "app".into(),
            user: "ep_1".into(),
            tls_server_name: "gw.example.com".into(),
            ca_pem: String::new(),
        };
        let mut rec: EndpointRecord = serde_json::from_value(serde_json::json!({
            "id": "ep_1", "type": "postgres", "state": "active", "appliance_id": "ap_1",
            "app": "shop", "customer": "acme", "origin_resource_id": "aws_db_instance.main",
            "created_by": "alice", "created_at": "2029-01-01T00:00:00Z",
            "expires_at": "2030-01-01T00:00:00Z", "sessions": 0,
        }))
        .unwrap();
        write(&mut rec, &access, &Secret::new("pw"), dir.path()).unwrap();
        let s = rec.connection_string.unwrap();
        let roots = system_roots();
        assert!(
            s.ends_with(&format!(
                "sslmode=verify-full&sslrootcert={}",
                roots.display()
            )),
            "{s}"
        );
        // No gateway CA file was written.
        assert!(!dir.path().join(".postern").exists());
    }

    #[test]
    fn prepared_password_matches_its_verifier() {
        let (cred, secret) = prepare().unwrap();
        let ClientCredential::Postgres { scram_verifier } = cred else {
            panic!("not a postgres credential")
        };
        assert!(certs::scram::Verifier::parse(&scram_verifier)
            .unwrap()
            .matches(secret.expose()));
        assert_eq!(secret.expose().len(), 32);
    }
}
