//! The postgres client's files for an endpoint: a random password made here (only its SCRAM
//! verifier goes to the gateway), the gateway's CA file for `sslmode=verify-full`, and the
//! libpq connection string that names both.

use endpoint_types::{
    api::{ClientCredential, EndpointAccess, EndpointRecord},
    secret::Secret,
    ApiError,
};
use std::path::Path;

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
    let dir = home.join(".postern").join("postgres");
    super::create_private_dir(&dir)?;
    let ca_file = dir.join(format!("{}-ca.crt", rec.id));
    // A CA certificate is public; libpq only needs to read it.
    std::fs::write(&ca_file, ca_pem)
        .map_err(|e| ApiError::internal(format!("cannot write {}: {e}", ca_file.display())))?;
    rec.connection_string = connection_string(access, secret.expose(), &ca_file);
    Ok(())
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
