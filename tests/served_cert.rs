//! The API serving a certificate the vendor supplies (`tls_cert` / `tls_key`), reloaded when
//! the files change, against a real `postern server`. A CA made here plays the public CA: the
//! system roots cannot be changed in a test, so the client trusts exactly that CA.

use anyhow::{anyhow, Result};
use postern::testbed::{wait_until, Gateway};
use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

fn issue(ca: &certs::Ca) -> Result<certs::Issued> {
    Ok(ca.issue_server(
        &["127.0.0.1".to_string()],
        jiff::Timestamp::now(),
        Duration::from_secs(3600),
    )?)
}

/// Writes the pair and moves both modification times past anything seen before.
fn put(dir: &Path, cert_pem: &str, key_pem: &str, bump_s: u64) -> Result<()> {
    for (name, text) in [("tls.crt", cert_pem), ("tls.key", key_pem)] {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        std::fs::File::options()
            .write(true)
            .open(&path)?
            .set_modified(SystemTime::now() + Duration::from_secs(bump_s))?;
    }
    Ok(())
}

/// A TLS handshake with the API trusting only `ca_pem`; the fingerprint of the leaf served.
fn served_leaf(api: SocketAddr, ca_pem: &str) -> Result<String> {
    let config = certs::client_config(ca_pem, None, vec![b"http/1.1".to_vec()])?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut sock = TcpStream::connect(api)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow!("no certificate served"))?;
    let fp = certs::fingerprint(leaf);
    let _ = sock.flush();
    Ok(fp)
}

#[test]
fn the_api_serves_the_supplied_certificate_and_picks_up_a_replacement_without_restart() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("gw");
    std::fs::create_dir_all(&data)?;
    let public = certs::Ca::generate("public test", jiff::Timestamp::now())?;
    let (one, two) = (issue(&public)?, issue(&public)?);
    put(&data, &one.cert_pem, one.key_pem.expose(), 0)?;
    let config = data.join("gateway.toml");
    std::fs::write(
        &config,
        "data_dir = \".\"\ntls_cert = \"tls.crt\"\ntls_key = \"tls.key\"\n",
    )?;
    let gw = Gateway::start_with_config(&data, &config)?;
    let public_pem = public.cert_pem().to_string();

    // (a) The supplied certificate is what a client trusting only its CA sees...
    let fp1 = certs::fingerprint_pem(&one.cert_pem)?;
    assert_eq!(served_leaf(gw.api, &public_pem)?, fp1);
    // ...and a client trusting only the gateway CA no longer gets through.
    let gateway_ca = std::fs::read_to_string(&gw.ca_file)?;
    assert!(served_leaf(gw.api, &gateway_ca).is_err());
    // The CLI works with the public CA as its trust anchor.
    std::fs::write(data.join("public-ca.crt"), &public_pem)?;
    let out = std::process::Command::new(postern::testbed::bin("postern")?)
        .args(["--output", "json", "appliance", "list"])
        .env("POSTERN_ADDR", gw.api.to_string())
        .env("POSTERN_TOKEN", &gw.admin_token)
        .env("POSTERN_CA_FILE", data.join("public-ca.crt"))
        .env("HOME", dir.path())
        .output()?;
    assert!(
        out.status.success(),
        "{} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // (b) Replaced on disk: new connections see the new one, no restart.
    let pid = gw.pid();
    put(&data, &two.cert_pem, two.key_pem.expose(), 10)?;
    let fp2 = certs::fingerprint_pem(&two.cert_pem)?;
    assert!(wait_until(Duration::from_secs(15), || served_leaf(
        gw.api,
        &public_pem
    )
    .is_ok_and(|fp| fp == fp2)));
    assert_eq!(gw.pid(), pid);

    // (c) An unusable replacement (the key is not the certificate's; then garbage): the served
    // certificate stays, and the log says why.
    put(&data, &one.cert_pem, two.key_pem.expose(), 20)?;
    let logged = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("the replaced TLS certificate is unusable")
            .count()
    };
    assert!(wait_until(Duration::from_secs(15), || {
        let _ = served_leaf(gw.api, &public_pem);
        logged(&gw.log) >= 1
    }));
    assert_eq!(served_leaf(gw.api, &public_pem)?, fp2);
    put(&data, "not a certificate", "nor a key", 30)?;
    assert!(wait_until(Duration::from_secs(15), || {
        let _ = served_leaf(gw.api, &public_pem);
        logged(&gw.log) >= 2
    }));
    assert_eq!(served_leaf(gw.api, &public_pem)?, fp2);
    Ok(())
}
