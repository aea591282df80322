use std::sync::Arc;
use std::time::Duration;

use certs::*;
use jiff::{SignedDuration, Timestamp};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use x509_parser::prelude::*;

const DAY: Duration = Duration::from_secs(86_400);

fn now() -> Timestamp {
    Timestamp::now()
}

fn server(ca: &Ca) -> Issued {
    ca.issue_server(&["127.0.0.1".into(), "localhost".into()], now(), DAY)
        .unwrap()
}

fn agent_cert(ca: &Ca) -> (String, Secret) {
    let (key, csr) = generate_key_and_csr("agent").unwrap();
    (ca.sign_agent_csr(&csr, "app-1", now(), DAY).unwrap(), key)
}

fn parse(pem: &str, f: impl FnOnce(&X509Certificate)) {
    let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
    f(&pem.parse_x509().unwrap());
}

/// Runs a handshake plus one round trip; returns the server's view of the client
/// certificate (fingerprint) or the first error from either side.
async fn handshake(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
    name: &str,
) -> Result<Option<String>, String> {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let connector = TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let srv = async move {
        let mut tls = acceptor
            .accept(s)
            .await
            .map_err(|e| format!("server: {e}"))?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| fingerprint(&c[0]));
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| format!("server: {e}"))?;
        tls.write_all(b"pong")
            .await
            .map_err(|e| format!("server: {e}"))?;
        tls.flush().await.map_err(|e| format!("server: {e}"))?;
        Ok::<_, String>(peer)
    };
    let cli = async move {
        let mut tls = connector
            .connect(name, c)
            .await
            .map_err(|e| format!("client: {e}"))?;
        tls.write_all(b"ping")
            .await
            .map_err(|e| format!("client: {e}"))?;
        tls.flush().await.map_err(|e| format!("client: {e}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| format!("client: {e}"))?;
        assert_eq!(&buf, b"pong");
        Ok::<_, String>(())
    };
    match tokio::join!(srv, cli) {
        (Ok(peer), Ok(())) => Ok(peer),
        (s, c) => Err(format!("{:?} {:?}", s.err(), c.err())),
    }
}

#[test]
fn ca_pem_round_trip() {
    let ca = Ca::generate("test", now()).unwrap();
    let again = Ca::from_pem(ca.cert_pem(), ca.key_pem().expose()).unwrap();
    assert_eq!(again.fingerprint(), ca.fingerprint());
    assert_eq!(fingerprint_pem(again.cert_pem()).unwrap(), ca.fingerprint());
    let issued = again
        .issue_client("c", now(), now() + SignedDuration::from_hours(1))
        .unwrap();
    parse(&issued.cert_pem, |c| {
        assert_eq!(c.issuer().to_string(), "CN=Postern CA test");
    });

    let other = Ca::generate("other", now()).unwrap();
    assert!(matches!(
        Ca::from_pem(ca.cert_pem(), other.key_pem().expose()),
        Err(CertError::KeyMismatch)
    ));
}

#[tokio::test]
async fn mtls_handshake_with_agent_cert() {
    let ca = Ca::generate("test", now()).unwrap();
    let srv = server(&ca);
    let (cert, key) = agent_cert(&ca);
    let scfg = server_config(
        &srv.cert_pem,
        &srv.key_pem,
        Some(ca.cert_pem()),
        ClientAuth::Required,
        vec![b"postern/1".to_vec()],
    )
    .unwrap();
    let ccfg = client_config(
        ca.cert_pem(),
        Some((&cert, &key)),
        vec![b"postern/1".to_vec()],
    )
    .unwrap();
    let peer = handshake(scfg, ccfg, "localhost").await.unwrap();
    assert_eq!(peer, Some(fingerprint_pem(&cert).unwrap()));
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() {
    let ca = Ca::generate("test", now()).unwrap();
    let rogue = Ca::generate("rogue", now()).unwrap();
    let srv = server(&ca);
    let (cert, key) = agent_cert(&rogue);
    let scfg = server_config(
        &srv.cert_pem,
        &srv.key_pem,
        Some(ca.cert_pem()),
        ClientAuth::Required,
        vec![],
    )
    .unwrap();
    let ccfg = client_config(ca.cert_pem(), Some((&cert, &key)), vec![]).unwrap();
    let err = handshake(scfg, ccfg, "localhost").await.unwrap_err();
    assert!(err.contains("server:"), "{err}");
}

#[tokio::test]
async fn missing_client_cert_required_vs_optional() {
    let ca = Ca::generate("test", now()).unwrap();
    let srv = server(&ca);
    let ccfg = || client_config(ca.cert_pem(), None, vec![]).unwrap();
    let scfg = |mode| {
        server_config(
            &srv.cert_pem,
            &srv.key_pem,
            Some(ca.cert_pem()),
            mode,
            vec![],
        )
        .unwrap()
    };
    assert!(handshake(scfg(ClientAuth::Required), ccfg(), "127.0.0.1")
        .await
        .is_err());
    assert_eq!(
        handshake(scfg(ClientAuth::Optional), ccfg(), "127.0.0.1").await,
        Ok(None)
    );
    assert_eq!(
        handshake(
            server_config(&srv.cert_pem, &srv.key_pem, None, ClientAuth::None, vec![]).unwrap(),
            ccfg(),
            "localhost"
        )
        .await,
        Ok(None)
    );
}

#[tokio::test]
async fn pinned_ca_fingerprint() {
    let ca = Ca::generate("test", now()).unwrap();
    let srv = server(&ca);
    let scfg =
        || server_config(&srv.cert_pem, &srv.key_pem, None, ClientAuth::None, vec![]).unwrap();

    let pin = ca
        .fingerprint()
        .to_uppercase()
        .replace("SHA256:", "sha256:");
    let ok = handshake(
        scfg(),
        pinned_client_config(&pin, vec![]).unwrap(),
        "localhost",
    )
    .await;
    assert_eq!(ok, Ok(None));

    // Right pin, wrong name: the leaf is still verified against the pinned CA.
    assert!(handshake(
        scfg(),
        pinned_client_config(&pin, vec![]).unwrap(),
        "example.com"
    )
    .await
    .is_err());

    let wrong = Ca::generate("other", now()).unwrap().fingerprint();
    let err = handshake(
        scfg(),
        pinned_client_config(&wrong, vec![]).unwrap(),
        "localhost",
    )
    .await
    .unwrap_err();
    assert!(
        err.contains(&wrong) && err.contains(&ca.fingerprint()),
        "{err}"
    );

    assert!(matches!(
        pinned_client_config("sha256:abc", vec![]),
        Err(CertError::Fingerprint(_))
    ));
}

/// libpq's modes against a server that is not Postern's: `require` takes any certificate,
/// `verify-ca` any name under the CA, `verify-full` only the name dialled; none takes another
/// CA's chain when it checks the chain.
#[tokio::test]
async fn upstream_server_checks() {
    let ca = Ca::generate("db", now()).unwrap();
    let srv = server(&ca);
    let scfg =
        || server_config(&srv.cert_pem, &srv.key_pem, None, ClientAuth::None, vec![]).unwrap();
    let other = Ca::generate("other", now()).unwrap();
    let cfg = |check| upstream_client_config(check).unwrap();
    let chain = ServerCheck::Chain {
        ca_pem: ca.cert_pem(),
    };
    let full = ServerCheck::ChainAndName {
        ca_pem: ca.cert_pem(),
    };
    let wrong_ca = ServerCheck::Chain {
        ca_pem: other.cert_pem(),
    };

    for name in ["localhost", "db.example.com"] {
        assert_eq!(
            handshake(scfg(), cfg(ServerCheck::EncryptOnly), name).await,
            Ok(None),
            "{name}"
        );
        assert_eq!(
            handshake(scfg(), cfg(chain), name).await,
            Ok(None),
            "{name}"
        );
        assert!(
            handshake(scfg(), cfg(wrong_ca), name).await.is_err(),
            "{name}"
        );
    }
    assert_eq!(handshake(scfg(), cfg(full), "localhost").await, Ok(None));
    assert!(handshake(scfg(), cfg(full), "db.example.com")
        .await
        .is_err());
}

#[test]
fn agent_csr_subject_and_extensions_are_ignored() {
    let ca = Ca::generate("test", now()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();

    let cert = ca.sign_agent_csr(&csr, "app-7", now(), DAY).unwrap();
    parse(&cert, |c| {
        let cn = c
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "app-7");
        let san = c.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("postern:appliance:app-7")]
        );
        assert!(!c.is_ca());
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert_eq!(
            c.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
    });
}

#[test]
fn tampered_csr_is_refused() {
    let ca = Ca::generate("test", now()).unwrap();
    let (_, csr) = generate_key_and_csr("agent").unwrap();
    let mut lines: Vec<String> = csr.lines().map(str::to_owned).collect();
    let line = &mut lines[2];
    let i = line.len() / 2;
    let flipped = if &line[i..=i] == "A" { "B" } else { "A" };
    line.replace_range(i..=i, flipped);
    let tampered = lines.join("\n");
    assert!(matches!(
        ca.sign_agent_csr(&tampered, "app-1", now(), DAY),
        Err(CertError::InvalidCsr(e)) if e.contains("signature")
    ));
}

#[test]
fn issue_client_honours_not_after() {
    let ca = Ca::generate("test", now()).unwrap();
    let t = now();
    let not_after = t + SignedDuration::from_mins(30);
    let issued = ca.issue_client("ep-1", t, not_after).unwrap();
    parse(&issued.cert_pem, |c| {
        assert_eq!(c.validity().not_after.timestamp(), not_after.as_second());
        assert_eq!(c.validity().not_before.timestamp(), t.as_second() - 60);
        assert_eq!(
            c.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "ep-1"
        );
        assert!(c.extended_key_usage().unwrap().unwrap().value.client_auth);
    });
    assert!(matches!(
        ca.issue_client("ep-1", t, t - SignedDuration::from_mins(5)),
        Err(CertError::Validity(_))
    ));
}

#[test]
fn server_cert_is_leaf_then_ca() {
    let ca = Ca::generate("test", now()).unwrap();
    let issued = server(&ca);
    let blocks: Vec<_> = Pem::iter_from_buffer(issued.cert_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    assert_eq!(blocks.len(), 2);
    assert_eq!(fingerprint(&blocks[1].contents), ca.fingerprint());
    let leaf = blocks[0].parse_x509().unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san
        .value
        .general_names
        .contains(&GeneralName::DNSName("localhost")));
    assert!(san
        .value
        .general_names
        .contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
}

#[test]
fn write_private_is_0600() {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::temp_dir().join(format!("certs-test-{}.key", std::process::id()));
    std::fs::write(&path, b"old").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    write_private(&path, b"secret").unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(std::fs::read(&path).unwrap(), b"secret");
    std::fs::remove_file(&path).unwrap();
    assert_eq!(mode, 0o600);
}

#[test]
fn fingerprint_format() {
    let fp = fingerprint(b"hello");
    let hex = fp.strip_prefix("sha256:").unwrap();
    assert_eq!(hex.len(), 64);
    assert!(hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
}

#[test]
fn debug_does_not_leak_keys() {
    let ca = Ca::generate("test", now()).unwrap();
    let issued = server(&ca);
    assert!(ca.key_pem().expose().contains("PRIVATE KEY"));
    for dbg in [format!("{ca:?}"), format!("{issued:?}")] {
        assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
    }
}
