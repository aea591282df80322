//! Enrollment and relay hardening against real processes: token reuse (also concurrent),
//! expiry, foreign tokens and certificates, oversized and garbage frames.

use anyhow::{anyhow, Result};
use bytes::{BufMut, BytesMut};
use endpoint_types::{
    frame::{
        encode, Enrollment, EnrollmentAnswer, FrameDecoder, Handshake, HandshakeAnswer, Hello,
        WireFrame,
    },
    resource::PolicySummary,
    secret::Secret,
    token::EnrollmentToken,
    ALPN_ENROLL, ALPN_TUNNEL,
};
use postern::tcp_endpoint::Forwarder;
use postern::testbed::{echo_round_trip, echo_server, wait_until, Agent, Gateway};
use serde_json::Value;
use std::{net::SocketAddr, sync::Arc, time::Duration};

fn body(echo: SocketAddr) -> String {
    format!("[policy]\napproval = \"automatic\"\n\n[[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"{echo}\"\n")
}

fn fresh_config(dir: &std::path::Path, name: &str, echo: SocketAddr) -> Result<std::path::PathBuf> {
    let d = dir.join(name);
    std::fs::create_dir_all(&d)?;
    let p = d.join("agent.toml");
    std::fs::write(
        &p,
        format!(
            "audit_path = \"{}\"\n{}",
            d.join("audit.jsonl").display(),
            body(echo)
        ),
    )?;
    Ok(p)
}

#[test]
fn enrollment_tokens_are_single_use_expire_and_belong_to_one_gateway() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Denied records are aggregated per window; a short one lets the test read them soon.
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "data_dir = \"gw\"\napi = \"127.0.0.1:0\"\nrelay = \"127.0.0.1:0\"\n\n[limits]\ndenied_window = \"2s\"\n",
    )?;
    let gw = Gateway::start_with_config(&dir.path().join("gw"), &config)?;
    let echo = echo_server()?;
    let relay = gw.relay.to_string();

    // A short-lived token, left to expire while the rest runs.
    let short = gw
        .cli(&[
            "appliance",
            "add",
            "--app",
            "short",
            "--customer",
            "acme-corp",
            "--token-ttl",
            "10s",
        ])?
        .ok()?;
    let short_expires: jiff::Timestamp = short["expires_at"].as_str().unwrap().parse()?;

    // Concurrent reuse: four agents race with one token; exactly one wins.
    let added = gw
        .cli(&[
            "appliance",
            "add",
            "--app",
            "race",
            "--customer",
            "acme-corp",
        ])?
        .ok()?;
    assert!(added["token"].as_str().unwrap().starts_with("pse1_"));
    let token = added["token"].as_str().unwrap().to_string();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let cfg = fresh_config(dir.path(), &format!("race{i}"), echo).unwrap();
            let (relay, token) = (relay.clone(), token.clone());
            std::thread::spawn(move || Agent::enroll_with(&relay, &token, &cfg))
        })
        .collect();
    let outcomes: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect::<Result<_>>()?;
    let winners = outcomes.iter().filter(|o| o.success).count();
    assert_eq!(winners, 1, "{outcomes:?}");
    for o in outcomes.iter().filter(|o| !o.success) {
        assert_eq!(o.error_code(), Some("ENROLLMENT_TOKEN_USED"), "{o:?}");
        assert!(!o.json["error"]["hint"].as_str().unwrap_or("").is_empty());
    }

    // Reuse after the fact.
    let again = Agent::enroll_with(&relay, &token, &fresh_config(dir.path(), "again", echo)?)?;
    assert_eq!(again.error_code(), Some("ENROLLMENT_TOKEN_USED"));

    // A well-formed token the gateway never issued (right CA, unknown id).
    let forged = EnrollmentToken {
        id: "00ff00ff".into(),
        secret: Secret::new("x".repeat(43)),
        ca: gw.ca_fingerprint.clone(),
    };
    let f = Agent::enroll_with(
        &relay,
        &forged.encode(),
        &fresh_config(dir.path(), "forged", echo)?,
    )?;
    assert_eq!(f.error_code(), Some("ENROLLMENT_TOKEN_INVALID"));

    // A token pinning another CA: the agent refuses the gateway before sending anything.
    let foreign = EnrollmentToken {
        id: "1".into(),
        secret: Secret::new("y".repeat(43)),
        ca: format!("sha256:{}", "ab".repeat(32)),
    };
    let f = Agent::enroll_with(
        &relay,
        &foreign.encode(),
        &fresh_config(dir.path(), "foreign", echo)?,
    )?;
    assert!(!f.success, "{f:?}");
    assert!(f.json["error"]["message"].as_str().is_some());

    // Garbage instead of a token.
    let g = Agent::enroll_with(
        &relay,
        "not-a-token",
        &fresh_config(dir.path(), "garbage", echo)?,
    )?;
    assert!(!g.success);
    assert!(g.json["error"]["code"].as_str().is_some());

    // Expiry: wait (bounded) until the short token's expiry has passed, then try it.
    let wait = short_expires
        .duration_since(jiff::Timestamp::now())
        .as_secs_f64()
        .max(0.0)
        + 0.5;
    std::thread::sleep(Duration::from_secs_f64(wait.min(11.0)));
    let e = Agent::enroll_with(
        &relay,
        short["token"].as_str().unwrap(),
        &fresh_config(dir.path(), "late", echo)?,
    )?;
    assert_eq!(e.error_code(), Some("ENROLLMENT_TOKEN_EXPIRED"), "{e:?}");

    // Refusals are audited on the vendor side, aggregated per source and window
    // (crate::denied_aggregate): the counts add up once the window has closed.
    let mut records = Value::Null;
    let counted = wait_until(Duration::from_secs(15), || {
        records = gw
            .cli(&["audit", "list"])
            .and_then(|o| o.ok())
            .unwrap_or_default();
        let denied: u64 = records["records"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["kind"] == "denied" && r["detail"]["action"] == "enroll")
            .filter_map(|r| r["detail"]["count"].as_u64())
            .sum();
        denied >= 4
    });
    assert!(counted, "{records}");
    Ok(())
}

fn quic_client(tls: rustls::ClientConfig) -> Result<quinn::Endpoint> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    Ok(ep)
}

/// The one frame the gateway answered with, as the stream's answer type `F`.
async fn read_answer<F: WireFrame>(recv: &mut quinn::RecvStream) -> Result<Option<F>> {
    let bytes = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20)).await??;
    let mut buf = BytesMut::from(&bytes[..]);
    Ok(FrameDecoder::default().decode(&mut buf)?)
}

async fn read_enrollment_error(recv: &mut quinn::RecvStream) -> Result<endpoint_types::ApiError> {
    match read_answer(recv).await? {
        Some(EnrollmentAnswer::Error(e)) => Ok(e),
        other => Err(anyhow!("expected an error frame, got {other:?}")),
    }
}

async fn read_hello_error(recv: &mut quinn::RecvStream) -> Result<endpoint_types::ApiError> {
    match read_answer(recv).await? {
        Some(HandshakeAnswer::Error(e)) => Ok(e),
        other => Err(anyhow!("expected an error frame, got {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_refuses_foreign_certificates_and_bad_frames_and_keeps_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gw = tokio::task::block_in_place(|| Gateway::start(&dir.path().join("gw")))?;
    let echo = echo_server()?;
    let mut agent = tokio::task::block_in_place(|| {
        Agent::enroll(
            &gw,
            &dir.path().join("agent"),
            "steady",
            "acme-corp",
            &body(echo),
        )
    })?;
    agent.run()?;
    assert!(tokio::task::block_in_place(
        || gw.wait_online(&agent.appliance_id, Duration::from_secs(30))
    ));
    let ca_pem = std::fs::read_to_string(&gw.ca_file)?;

    // 1. A client certificate from another CA on the tunnel ALPN: the handshake fails.
    let other_ca = certs::Ca::generate("intruder", jiff::Timestamp::now())?;
    let (key, csr) = certs::generate_key_and_csr("postern-agent")?;
    let cert = other_ca.sign_agent_csr(
        &csr,
        &agent.appliance_id,
        jiff::Timestamp::now(),
        Duration::from_secs(3600),
    )?;
    let tls = certs::client_config(&ca_pem, Some((&cert, &key)), vec![ALPN_TUNNEL.to_vec()])?;
    let client = quic_client(tls)?;
    let attempt = async {
        let conn = client.connect(gw.relay, "127.0.0.1")?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"x").await?;
        recv.read_to_end(1024).await?;
        anyhow::Ok(())
    };
    let r = tokio::time::timeout(Duration::from_secs(10), attempt).await;
    assert!(
        matches!(r, Ok(Err(_))),
        "a foreign certificate got through: {r:?}"
    );

    // 2. Enrollment ALPN, oversized length prefix: FRAME_TOO_LARGE, nothing buffered.
    let pinned = certs::pinned_client_config(&gw.ca_fingerprint, vec![ALPN_ENROLL.to_vec()])?;
    let client = quic_client(pinned.clone())?;
    let conn = client.connect(gw.relay, "127.0.0.1")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut b = BytesMut::new();
    b.put_u32(u32::MAX);
    b.put_slice(&[1, b'{']);
    send.write_all(&b).await?;
    let _ = send.finish();
    let e = read_enrollment_error(&mut recv).await?;
    assert_eq!(e.code, endpoint_types::ErrorCode::FrameTooLarge, "{e:?}");

    // 3. Garbage that is not a frame at all.
    let conn = client.connect(gw.relay, "127.0.0.1")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&[0, 0, 0, 9, 1, 0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3])
        .await?;
    let _ = send.finish();
    let e = read_enrollment_error(&mut recv).await?;
    assert_eq!(e.code, endpoint_types::ErrorCode::MalformedFrame, "{e:?}");

    // 3b. A well-formed frame of another stream (a control stream's hello) instead of an
    // enrollment request: refused as malformed, not mistaken for anything.
    let conn = client.connect(gw.relay, "127.0.0.1")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut b = BytesMut::new();
    encode(
        &Handshake::Hello(Hello {
            protocol_version: endpoint_types::PROTOCOL_VERSION,
            agent_version: "x".into(),
            resources: vec![],
            policy: PolicySummary::default(),
            trail_number: None,
            trail_heads: false,
            steady_state: false,
        }),
        &mut b,
    );
    send.write_all(&b).await?;
    let _ = send.finish();
    let e = read_enrollment_error(&mut recv).await?;
    assert_eq!(e.code, endpoint_types::ErrorCode::MalformedFrame, "{e:?}");

    // 4. A genuinely enrolled certificate that speaks garbage on the control stream.
    let added = tokio::task::block_in_place(|| {
        gw.cli(&[
            "appliance",
            "add",
            "--app",
            "rogue",
            "--customer",
            "acme-corp",
        ])
    })?
    .ok()?;
    let (key, csr) = certs::generate_key_and_csr("postern-agent")?;
    let conn = client.connect(gw.relay, "127.0.0.1")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut b = BytesMut::new();
    encode(
        &Enrollment::EnrollRequest(endpoint_types::api::EnrollRequest {
            token: Secret::new(added["token"].as_str().unwrap()),
            csr_pem: csr,
            agent_version: "test".into(),
        }),
        &mut b,
    );
    send.write_all(&b).await?;
    let _ = send.finish();
    let bytes = recv.read_to_end(1 << 20).await?;
    let Some(EnrollmentAnswer::EnrollResponse(resp)) =
        FrameDecoder::default().decode(&mut BytesMut::from(&bytes[..]))?
    else {
        return Err(anyhow!("enrollment failed"));
    };
    let tls = certs::client_config(
        &ca_pem,
        Some((&resp.cert_pem, &key)),
        vec![ALPN_TUNNEL.to_vec()],
    )?;
    let rogue = quic_client(tls)?;
    let conn = rogue.connect(gw.relay, "127.0.0.1")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut b = BytesMut::new();
    b.put_u32(64 * 1024 * 1024);
    send.write_all(&b).await?;
    let e = read_hello_error(&mut recv).await?;
    assert_eq!(e.code, endpoint_types::ErrorCode::FrameTooLarge);
    // A wrong protocol version in an otherwise good hello.
    let conn = rogue.connect(gw.relay, "127.0.0.1")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut b = BytesMut::new();
    encode(
        &Handshake::Hello(Hello {
            protocol_version: 99,
            agent_version: "x".into(),
            resources: vec![],
            policy: PolicySummary::default(),
            trail_number: None,
            trail_heads: false,
            steady_state: false,
        }),
        &mut b,
    );
    send.write_all(&b).await?;
    let e = read_hello_error(&mut recv).await?;
    assert_eq!(e.code, endpoint_types::ErrorCode::ProtocolVersion);

    // The gateway kept serving the well-behaved agent throughout.
    tokio::task::block_in_place(|| gw.request_operate("steady", "acme-corp", "1h"))?;
    let home = dir.path().join("operator-home");
    let ep = tokio::task::block_in_place(|| {
        gw.cli_home(
            &home,
            &[
                "ops",
                "endpoint",
                "create",
                "--type",
                "tcp",
                "--app",
                "steady",
                "--customer",
                "acme-corp",
                "--origin-resource-id",
                "null_resource.echo",
            ],
        )
    })?
    .ok()?;
    let ep_id = ep["id"].as_str().unwrap_or_default().to_string();
    let back = tokio::task::block_in_place(|| -> Result<Vec<u8>> {
        let forwarder = Forwarder::start(&gw, &gw.admin_token, &home, &ep_id)?;
        echo_round_trip(forwarder.listen, b"still here")
    })?;
    assert_eq!(back, b"still here");

    // Revocation: the agent is cut and its certificate refused from then on.
    let revoked =
        tokio::task::block_in_place(|| gw.cli(&["appliance", "revoke", &agent.appliance_id]))?
            .ok()?;
    assert_eq!(revoked["revoked"], true);
    assert!(tokio::task::block_in_place(
        || postern::testbed::wait_until(Duration::from_secs(10), || {
            gw.appliance(&agent.appliance_id)
                .map(|a| a["online"] == false)
                .unwrap_or(false)
        })
    ));
    let gone = tokio::task::block_in_place(|| {
        gw.cli(&["ops", "endpoint", "get", ep["id"].as_str().unwrap()])
    })?
    .ok()?;
    assert_eq!(gone["state"], "retired");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !tokio::task::block_in_place(|| gw.appliance(&agent.appliance_id))?["online"]
            .as_bool()
            .unwrap_or(true)
    );
    Ok(())
}
