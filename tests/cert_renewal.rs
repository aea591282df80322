//! Agent certificates renewed over the tunnel, against real `postern server` and
//! `postern-agent` processes with a certificate lifetime of seconds.

use anyhow::{anyhow, Result};
use endpoint_types::ALPN_TUNNEL;
use postern::tcp_endpoint::Forwarder;
use postern::testbed::{echo_round_trip, echo_server, wait_until, Agent, Gateway};
use serde_json::Value;
use std::{net::SocketAddr, path::Path, process::Command, sync::Arc, time::Duration};

fn body(echo: SocketAddr) -> String {
    format!("[policy]\napproval = \"automatic\"\n\n[[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"{echo}\"\n")
}

/// A gateway whose agent certificates live `lifetime`; `extra` is more of its config.
fn gateway(dir: &Path, lifetime: &str, extra: &str) -> Result<Gateway> {
    let data = dir.join("gw");
    std::fs::create_dir_all(&data)?;
    let config = data.join("gateway.toml");
    std::fs::write(
        &config,
        format!("data_dir = \".\"\nagent_cert_lifetime = \"{lifetime}\"\n{extra}"),
    )?;
    Gateway::start_with_config(&data, &config)
}

fn of_kind<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["kind"] == kind).collect()
}

fn vendor_trail(gw: &Gateway, appliance: &str) -> Result<Vec<Value>> {
    let out = gw
        .cli(&["audit", "list", "--appliance", appliance, "--limit", "1000"])?
        .ok()?;
    out["records"]
        .as_array()
        .cloned()
        .ok_or_else(|| anyhow!("no records in {out}"))
}

fn cert_info(path: &Path) -> Result<certs::CertInfo> {
    Ok(certs::CertInfo::from_pem(&std::fs::read_to_string(path)?)?)
}

/// Consecutive renewals chain: each one's old certificate is the previous one's new.
fn assert_chained(renewals: &[&Value], first_serial: &str) {
    let mut expected_old = first_serial.to_string();
    for r in renewals {
        let d = &r["detail"];
        assert_eq!(d["old"]["serial"], expected_old.as_str(), "{r}");
        assert_ne!(d["new"]["serial"], d["old"]["serial"], "{r}");
        assert!(d["new"]["fingerprint"]
            .as_str()
            .is_some_and(|f| f.starts_with("sha256:")));
        assert!(d["new"]["not_after"].as_str().is_some(), "{r}");
        expected_old = d["new"]["serial"].as_str().unwrap_or_default().to_string();
    }
}

#[test]
fn agent_certificates_renew_over_the_tunnel_while_the_agent_stays_online() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut gw = gateway(dir.path(), "30s", "")?;
    let echo = echo_server()?;
    let agent_dir = dir.path().join("agent");
    let mut agent = Agent::enroll(&gw, &agent_dir, "renewing", "acme-corp", &body(echo))?;
    let (key_file, cert_file) = (agent_dir.join("agent.key"), agent_dir.join("agent.crt"));
    let first = cert_info(&cert_file)?;
    let listed = gw.appliance(&agent.appliance_id)?;
    assert_eq!(
        listed["cert_expires_at"]
            .as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok()),
        Some(first.not_after),
        "{listed}"
    );
    agent.run()?;
    assert!(gw.wait_online(&agent.appliance_id, Duration::from_secs(30)));

    // Two renewals (each two thirds into a 30 s lifetime, long enough that a slow stop or restart never outlives the certificate), in the customer's trail.
    let trail = agent_trail_when(&agent, |t| of_kind(t, "agent.cert_renewed").len() >= 2, 90)?;
    let renewed = of_kind(&trail, "agent.cert_renewed");
    assert!(renewed.len() >= 2, "{trail:?}");
    for r in &renewed {
        eprintln!("renewed at {}: {}", r["time"], r["detail"]);
    }
    assert_chained(&renewed, &first.serial);
    // One connection throughout: the renewals did not cost the agent its tunnel.
    assert_eq!(of_kind(&trail, "agent.connected").len(), 1, "{trail:?}");
    assert!(
        of_kind(&trail, "agent.disconnected").is_empty(),
        "{trail:?}"
    );
    // The key on disk is the one the latest certificate certifies, private to the agent.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_file)?.permissions().mode() & 0o777,
        0o600
    );
    assert!(certs::key_matches_cert(
        &std::fs::read_to_string(&key_file)?,
        &std::fs::read_to_string(&cert_file)?
    )?);

    // And in the vendor's, with the same certificates.
    let mut vendor = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        vendor = vendor_trail(&gw, &agent.appliance_id).unwrap_or_default();
        of_kind(&vendor, "agent.cert_renewed").len() >= 2
    }));
    let vendor_renewed = of_kind(&vendor, "agent.cert_renewed");
    assert_chained(&vendor_renewed, &first.serial);
    for (v, c) in vendor_renewed.iter().zip(&renewed) {
        assert_eq!(v["detail"]["new"]["serial"], c["detail"]["new"]["serial"]);
    }

    // After the second renewal the tunnel still carries traffic: a tcp endpoint works. The
    // certificate it was opened with (the first) has expired by now.
    assert!(jiff::Timestamp::now() > first.not_after);
    gw.request_operate("renewing", "acme-corp", "1h")?;
    let home = dir.path().join("operator-home");
    let ep = gw
        .cli_home(
            &home,
            &[
                "ops",
                "endpoint",
                "create",
                "--type",
                "tcp",
                "--app",
                "renewing",
                "--customer",
                "acme-corp",
                "--origin-resource-id",
                "null_resource.echo",
            ],
        )?
        .ok()?;
    let ep_id = ep["id"].as_str().unwrap_or_default().to_string();
    let forwarder = Forwarder::start(&gw, &gw.admin_token, &home, &ep_id)?;
    assert_eq!(echo_round_trip(forwarder.listen, b"renewed")?, b"renewed");
    drop(forwarder);

    // A reconnect of the running agent (the gateway restarts on the same addresses) dials with
    // the renewed certificate, which the gateway then takes as current.
    let (api, relay) = (gw.api, gw.relay);
    gw.stop();
    drop(gw);
    gw = gateway(
        dir.path(),
        "30s",
        &format!("api = \"{api}\"\nrelay = \"{relay}\"\n"),
    )?;
    let trail = agent_trail_when(&agent, |t| of_kind(t, "agent.connected").len() >= 2, 30)?;
    assert_eq!(of_kind(&trail, "agent.connected").len(), 2, "{trail:?}");
    assert!(gw.wait_online(&agent.appliance_id, Duration::from_secs(30)));
    let forwarder = Forwarder::start(&gw, &gw.admin_token, &home, &ep_id)?;
    assert_eq!(
        echo_round_trip(forwarder.listen, b"reconnected")?,
        b"reconnected"
    );
    drop(forwarder);
    let vendor = vendor_trail(&gw, &agent.appliance_id)?;
    assert!(
        !vendor
            .iter()
            .any(|r| r["kind"] == "denied" && r["detail"]["action"] == "connect"),
        "the renewed certificate was refused: {vendor:?}"
    );

    // A restart dials with the certificate on disk too.
    agent.stop();
    let on_disk = cert_info(&cert_file)?;
    assert_ne!(on_disk.serial, first.serial);
    agent.run()?;
    let trail = agent_trail_when(&agent, |t| of_kind(t, "agent.connected").len() >= 3, 30)?;
    assert_eq!(of_kind(&trail, "agent.connected").len(), 3, "{trail:?}");
    assert!(gw.wait_online(&agent.appliance_id, Duration::from_secs(30)));
    let listed = gw.appliance(&agent.appliance_id)?;
    let expires: jiff::Timestamp = listed["cert_expires_at"]
        .as_str()
        .ok_or_else(|| anyhow!("no cert_expires_at in {listed}"))?
        .parse()?;
    assert!(expires >= on_disk.not_after, "{listed} vs {on_disk:?}");
    let forwarder = Forwarder::start(&gw, &gw.admin_token, &home, &ep_id)?;
    assert_eq!(
        echo_round_trip(forwarder.listen, b"restarted")?,
        b"restarted"
    );
    drop(forwarder);

    // The customer's trail still verifies: heads signed with an earlier key are checked with
    // the certificate kept beside the current one.
    agent.stop();
    let verified = agent.verify_trail()?.ok()?;
    assert_eq!(verified["ok"], true, "{verified}");
    assert!(
        verified["heads"]["heads"].as_u64().unwrap_or(0) >= 1,
        "{verified}"
    );

    // Revoked: the agent's certificate on disk (whichever the gateway issued last) opens
    // nothing, and there is no renewal for it.
    gw.cli(&["appliance", "revoke", &agent.appliance_id])?
        .ok()?;
    agent.run()?;
    let mut vendor = Vec::new();
    assert!(wait_until(Duration::from_secs(20), || {
        vendor = vendor_trail(&gw, &agent.appliance_id).unwrap_or_default();
        vendor.iter().any(|r| {
            r["kind"] == "denied"
                && r["detail"]["action"] == "connect"
                && r["detail"]["code"] == "APPLIANCE_REVOKED"
        })
    }));
    agent.stop();
    Ok(())
}

fn agent_trail_when(
    agent: &Agent,
    ready: impl Fn(&[Value]) -> bool,
    limit_s: u64,
) -> Result<Vec<Value>> {
    let mut trail = Vec::new();
    wait_until(Duration::from_secs(limit_s), || {
        trail = agent.trail().unwrap_or_default();
        ready(&trail)
    });
    Ok(trail)
}

#[test]
fn an_expired_agent_certificate_is_refused_with_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gw = gateway(dir.path(), "5s", "")?;
    let echo = echo_server()?;
    let agent_dir = dir.path().join("agent");
    let agent = Agent::enroll(&gw, &agent_dir, "sleepy", "acme-corp", &body(echo))?;
    let cert_file = agent_dir.join("agent.crt");
    let info = cert_info(&cert_file)?;
    // The agent was not running during its certificate's life: nothing renewed it.
    assert!(wait_until(
        Duration::from_secs(15),
        || jiff::Timestamp::now() > info.not_after
    ));
    std::thread::sleep(Duration::from_secs(1));

    let out = Command::new(postern::testbed::bin("postern-agent")?)
        .args(["--output", "json", "run", "--config"])
        .arg(&agent.config)
        .output()?;
    assert!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stdout)?;
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("expired"), "{err}");
    assert!(
        err["error"]["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("enroll"),
        "{err}"
    );

    // The gateway refuses it too, whatever the agent would do: TLS rejects the expired chain.
    let rt = tokio::runtime::Runtime::new()?;
    let refused = rt.block_on(async {
        let ca_pem = std::fs::read_to_string(&gw.ca_file)?;
        let cert = std::fs::read_to_string(&cert_file)?;
        let key = certs::Secret::new(std::fs::read_to_string(agent_dir.join("agent.key"))?);
        let tls = certs::client_config(&ca_pem, Some((&cert, &key)), vec![ALPN_TUNNEL.to_vec()])?;
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))?;
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let attempt = async {
            let conn = ep.connect(gw.relay, "127.0.0.1")?.await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(b"x").await?;
            recv.read_to_end(1024).await?;
            anyhow::Ok(())
        };
        let r = tokio::time::timeout(Duration::from_secs(10), attempt).await;
        anyhow::Ok(r)
    })?;
    match refused {
        Ok(Err(e)) => {
            let text = format!("{e:#}");
            // TLS alert 45: certificate_expired.
            assert!(text.contains("45") || text.contains("xpired"), "{text}");
        }
        other => panic!("an expired certificate got through: {other:?}"),
    }
    Ok(())
}
