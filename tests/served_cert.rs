//! The API serving a certificate the vendor supplies (`tls_cert` / `tls_key`), reloaded when
//! the files change, against a real `postern server`. A CA made here plays the public CA: the
//! system roots cannot be changed in a test, so the client trusts exactly that CA.

use anyhow::{anyhow, Result};
use postern::testbed::{wait_until, Agent, Gateway};
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
    let sock = TcpStream::connect(api)?;
    leaf_over(sock, ca_pem, b"http/1.1")
}

/// The same with a Postgres front end: SSLRequest, `S`, then TLS.
fn served_leaf_postgres(addr: SocketAddr, ca_pem: &str) -> Result<String> {
    let mut sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    sock.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])?;
    let mut answer = [0u8; 1];
    std::io::Read::read_exact(&mut sock, &mut answer)?;
    anyhow::ensure!(answer[0] == b'S', "no TLS offered: {answer:?}");
    leaf_over(sock, ca_pem, b"postgresql")
}

/// The server's leaf, once the server's side of the handshake verified against `ca_pem`. The
/// kube front end wants a client certificate and refuses us after that, which is fine here.
fn leaf_over(mut sock: TcpStream, ca_pem: &str, alpn: &[u8]) -> Result<String> {
    let config = certs::client_config(ca_pem, None, vec![alpn.to_vec()])?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut failed = None;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            failed = Some(e);
            break;
        }
    }
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow!("no certificate verified: {failed:?}"))?;
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
    let mut gw = Gateway::start_with_config(&data, &config)?;
    let public_pem = public.cert_pem().to_string();

    // (a) The supplied certificate is what a client trusting only its CA sees...
    let fp1 = certs::fingerprint_pem(&one.cert_pem)?;
    assert_eq!(served_leaf(gw.api, &public_pem)?, fp1);
    // The endpoint front ends serve it too.
    let front: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("front_ends.json"))?)?;
    let kube: SocketAddr = front["kube"].as_str().unwrap_or_default().parse()?;
    let pg: SocketAddr = front["postgres"].as_str().unwrap_or_default().parse()?;
    assert_eq!(served_leaf(kube, &public_pem)?, fp1);
    assert_eq!(served_leaf_postgres(pg, &public_pem)?, fp1);
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
    // Without a CA file the CLI verifies against the host's roots: with the public CA in the
    // host's bundle (SSL_CERT_FILE, as a public CA would be) it gets through; with the gateway
    // CA as the host's bundle it is refused at the handshake, with a hint naming the CA file.
    let host_cli = |bundle: &Path| -> Result<std::process::Output> {
        Ok(
            std::process::Command::new(postern::testbed::bin("postern")?)
                .args(["--output", "json", "appliance", "list"])
                .env("POSTERN_ADDR", gw.api.to_string())
                .env("POSTERN_TOKEN", &gw.admin_token)
                .env_remove("POSTERN_CA_FILE")
                .env("SSL_CERT_FILE", bundle)
                .env("HOME", dir.path())
                .output()?,
        )
    };
    let out = host_cli(&data.join("public-ca.crt"))?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = host_cli(&gw.ca_file)?;
    assert!(!out.status.success());
    let refused: serde_json::Value =
        serde_json::from_slice(&out.stderr).or_else(|_| serde_json::from_slice(&out.stdout))?;
    assert_eq!(refused["error"]["code"], "GATEWAY_UNREACHABLE", "{refused}");
    assert!(
        refused["error"]["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("POSTERN_CA_FILE"),
        "{refused}"
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
    assert!(wait_until(Duration::from_secs(15), || served_leaf(
        kube,
        &public_pem
    )
    .is_ok_and(|fp| fp == fp2)));
    assert!(wait_until(Duration::from_secs(15), || {
        served_leaf_postgres(pg, &public_pem).is_ok_and(|fp| fp == fp2)
    }));

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
    assert_eq!(served_leaf(kube, &public_pem)?, fp2);
    // Both the reload and the refusals are in the vendor trail.
    gw.ca_file = data.join("public-ca.crt");
    let mut records = serde_json::Value::Null;
    assert!(wait_until(Duration::from_secs(10), || {
        records = gw
            .cli(&["audit", "list", "--limit", "1000"])
            .and_then(|o| o.ok())
            .unwrap_or_default();
        let kinds: Vec<&str> = records["records"]
            .as_array()
            .map(|r| r.iter().filter_map(|r| r["kind"].as_str()).collect())
            .unwrap_or_default();
        kinds.contains(&"tls.cert_reloaded") && kinds.contains(&"tls.cert_refused")
    }));
    let refused = records["records"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["kind"] == "tls.cert_refused"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        refused["detail"]["serving_fingerprint"],
        fp2.as_str(),
        "{refused}"
    );

    // (d) Connection strings then verify against the system roots, not the gateway CA: the
    // CLI (trusting the public CA, as the system roots would) writes no gateway CA file.
    let body = "[policy]\napproval = \"automatic\"\n\n[[resource]]\nid = \"aws_db_instance.main\"\n\
                kind = \"postgres\"\nadmin_url = \"postgres://admin@127.0.0.1:1/app\"\nschemas = [\"app\"]\n";
    let mut agent = Agent::enroll(&gw, &dir.path().join("agent"), "pgapp", "acme-corp", body)?;
    agent.run()?;
    assert!(gw.wait_online(&agent.appliance_id, Duration::from_secs(30)));
    gw.request_operate("pgapp", "acme-corp", "1h")?;
    let home = dir.path().join("operator-home");
    let ep = gw
        .cli_home(
            &home,
            &[
                "ops",
                "endpoint",
                "create",
                "--type",
                "postgres",
                "--app",
                "pgapp",
                "--customer",
                "acme-corp",
                "--origin-resource-id",
                "aws_db_instance.main",
            ],
        )?
        .ok()?;
    let cs = ep["connection_string"].as_str().unwrap_or_default();
    assert!(cs.contains("sslmode=verify-full&sslrootcert="), "{ep}");
    let roots = cs.rsplit("sslrootcert=").next().unwrap_or_default();
    assert!(
        roots == "system" || roots.starts_with("/etc/"),
        "not the system roots: {cs}"
    );
    assert!(!home.join(".postern").join("postgres").exists());
    agent.stop();
    Ok(())
}
