//! The agent against a minimal in-process gateway: enrollment, hello, heartbeats, endpoint
//! announcements, data streams (accept, refuse, cut) and reconnect after a lost connection.

mod support;

use endpoint_types::{
    api::AuditRecord,
    control::GrantLevel,
    frame::{
        AgentCommand, EndpointGrant, Hello, StreamAnswer, StreamHeader, StreamOpen, ToAgent,
        ToGateway, MAX_STREAM_HEADER_LEN,
    },
    resource::{CloseReason, EndpointType, ResourceKind},
    secret::Secret,
    token::EnrollmentToken,
    ErrorCode, ALPN_TUNNEL,
};
use jiff::{SignedDuration, Timestamp};
use std::time::Duration;
use support::{
    alpn, edit_config, live_grant, read_one_frame, trail_until, write_frame, Control, Gateway,
};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tunnel_client::{audit, config::AgentConfig, enroll, tunnel};

const T: Duration = Duration::from_secs(10);

/// A gateway that acknowledges the hello with a one-second `lost_after` and answers heartbeats.
const CONTROL: Control = Control {
    check_hello,
    lost_after_ms: 1000,
    answer_heartbeats: true,
};

fn check_hello(hello: &Hello) {
    assert_eq!(hello.protocol_version, endpoint_types::PROTOCOL_VERSION);
    assert_eq!(hello.resources.len(), 1);
    assert_eq!(hello.resources[0].kind, ResourceKind::Tcp);
}

/// The config section for the one TCP resource, forwarding to `target`.
fn tcp_resource(target: &str) -> String {
    format!("\n[[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"{target}\"\n")
}

async fn echo_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

fn grant(id: &str, secs: i64) -> EndpointGrant {
    EndpointGrant {
        phase: endpoint_types::phase::operate(),
        endpoint_id: id.into(),
        endpoint_type: EndpointType::Tcp,
        resource_id: "null_resource.echo".into(),
        expires_at: Timestamp::now() + SignedDuration::from_secs(secs),
        grant_id: Some("gr_1".into()),
        signed_decision: None,
    }
}

async fn open_session(
    conn: &quinn::Connection,
    endpoint_id: &str,
    session: &str,
) -> (quinn::SendStream, quinn::RecvStream, StreamAnswer) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let open = StreamOpen {
        endpoint_id: endpoint_id.into(),
        session_id: session.into(),
        resource_id: "null_resource.echo".into(),
        operator: "alice@vendor".into(),
        client_addr: "127.0.0.1:5000".into(),
    };
    write_frame(&mut send, &StreamHeader::StreamOpen(open))
        .await
        .unwrap();
    let answer: StreamAnswer =
        tokio::time::timeout(T, read_one_frame(&mut recv, MAX_STREAM_HEADER_LEN))
            .await
            .unwrap()
            .unwrap();
    (send, recv, answer)
}

async fn wait_for<F: Fn(&[AuditRecord]) -> bool>(
    path: &std::path::Path,
    cond: F,
) -> Vec<AuditRecord> {
    trail_until(path, T, cond).await
}

fn closed_reasons(records: &[AuditRecord]) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.kind == "session.closed")
        .map(|r| r.detail["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_run_serve_cut_and_reconnect() {
    let gw = Gateway::start(T);
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("agent.toml");

    // Enrollment creates the config and the credentials next to it.
    let done = gw.enroll(&config_path).await.unwrap();
    assert_eq!(
        (
            done.appliance_id.as_str(),
            done.app.as_str(),
            done.customer.as_str()
        ),
        ("app_1", "shop", "acme")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("agent.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let echo = echo_server().await;
    edit_config(&config_path, |text| text + &tcp_resource(&echo));
    let config = AgentConfig::load(&config_path).unwrap();
    assert_eq!(config.appliance_id.as_deref(), Some("app_1"));
    let audit_path = config.audit_path.clone();

    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let agent = tokio::spawn(tunnel::run(config, shutdown.clone(), Some(ready_tx)));

    let conn = gw.accept().await;
    assert_eq!(alpn(&conn), ALPN_TUNNEL);
    let mut link = gw.serve_tunnel(conn.clone(), CONTROL);
    let ack = tokio::time::timeout(T, ready_rx).await.unwrap().unwrap();
    assert_eq!(ack.appliance_id, "app_1");

    // The full state as the real gateway sends it: numbered commands, each acknowledged once
    // applied.
    link.send(ToAgent::Command {
        seq: 1,
        command: AgentCommand::GrantSync {
            grants: vec![live_grant("gr_1", GrantLevel::Operate, -1, 3600)],
        },
    })
    .await;
    link.send(ToAgent::Command {
        seq: 2,
        command: AgentCommand::EndpointSync {
            endpoints: vec![grant("ep_1", 60)],
        },
    })
    .await;
    assert_eq!(link.next().await.1, ToGateway::CommandAck { seq: 1 });
    assert_eq!(link.next().await.1, ToGateway::CommandAck { seq: 2 });
    wait_for(&audit_path, |r| {
        r.iter().any(|r| r.kind == "endpoint.opened")
    })
    .await;

    // The agent serves data streams only once it holds the full state (as the real gateway
    // sends it first). Unknown endpoint: refused, nothing dialled.
    let (_s, _r, answer) = open_session(&conn, "ep_unknown", "ses_0").await;
    let StreamAnswer::StreamRefuse(e) = answer else {
        panic!("expected a refusal, got {answer:?}")
    };
    assert_eq!(e.code, ErrorCode::ForbiddenByScope);

    // A live endpoint: bytes flow both ways and half-close is preserved.
    let (mut send, mut recv, answer) = open_session(&conn, "ep_1", "ses_1").await;
    assert_eq!(answer, StreamAnswer::StreamAccept);
    send.write_all(b"ping through postern").await.unwrap();
    send.finish().unwrap();
    let back = tokio::time::timeout(T, recv.read_to_end(1024))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"ping through postern");
    let records = wait_for(&audit_path, |r| closed_reasons(r).len() == 1).await;
    let closed = records.iter().find(|r| r.kind == "session.closed").unwrap();
    assert_eq!(closed.detail["reason"], "client");
    assert_eq!(closed.detail["bytes_up"], 20);
    assert_eq!(closed.detail["bytes_down"], 20);
    assert_eq!(closed.actor, "alice@vendor");

    // Retiring the endpoint cuts a live session and refuses new ones.
    let (mut send, mut recv, answer) = open_session(&conn, "ep_1", "ses_2").await;
    assert_eq!(answer, StreamAnswer::StreamAccept);
    send.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    recv.read_exact(&mut one).await.unwrap();
    link.send(ToAgent::EndpointClose {
        endpoint_id: "ep_1".into(),
        reason: CloseReason::Retired,
    })
    .await;
    assert!(
        tokio::time::timeout(T, recv.read_to_end(1024))
            .await
            .unwrap()
            .is_err(),
        "the stream must be reset"
    );
    let (_s, _r, answer) = open_session(&conn, "ep_1", "ses_3").await;
    let StreamAnswer::StreamRefuse(e) = answer else {
        panic!("expected a refusal, got {answer:?}")
    };
    assert_eq!(e.code, ErrorCode::EndpointRetired);
    let records = wait_for(&audit_path, |r| closed_reasons(r).len() == 2).await;
    assert_eq!(closed_reasons(&records), vec!["client", "retired"]);

    // An endpoint that expires by the agent's clock is cut as expired.
    link.send(ToAgent::EndpointOpen(grant("ep_2", 2))).await;
    wait_for(&audit_path, |r| {
        r.iter().filter(|r| r.kind == "endpoint.opened").count() == 2
    })
    .await;
    let (_s2, mut recv2, answer) = open_session(&conn, "ep_2", "ses_4").await;
    assert_eq!(answer, StreamAnswer::StreamAccept);
    assert!(tokio::time::timeout(T, recv2.read_to_end(1024))
        .await
        .unwrap()
        .is_err());
    let records = wait_for(&audit_path, |r| closed_reasons(r).len() == 3).await;
    assert_eq!(
        closed_reasons(&records).last().map(String::as_str),
        Some("expired")
    );

    // Losing the connection interrupts sessions; the agent redials and says hello again.
    link.send(ToAgent::EndpointOpen(grant("ep_3", 60))).await;
    wait_for(&audit_path, |r| {
        r.iter().filter(|r| r.kind == "endpoint.opened").count() == 3
    })
    .await;
    let (_s3, _r3, answer) = open_session(&conn, "ep_3", "ses_5").await;
    assert_eq!(answer, StreamAnswer::StreamAccept);
    conn.close(0u32.into(), b"gateway restarting");
    drop(link);
    let conn2 = gw.accept().await;
    let link2 = gw.serve_tunnel(conn2.clone(), CONTROL);
    let records = wait_for(&audit_path, |r| {
        r.iter().filter(|r| r.kind == "agent.connected").count() == 2
    })
    .await;
    assert!(
        closed_reasons(&records).contains(&"interrupted".to_string()),
        "{:?}",
        closed_reasons(&records)
    );
    // The live set was forgotten with the old connection: after the new connection's full
    // state (which no longer names ep_3), ep_3 is refused.
    link2
        .send(ToAgent::GrantSync {
            grants: vec![live_grant("gr_1", GrantLevel::Operate, -1, 3600)],
        })
        .await;
    link2
        .send(ToAgent::EndpointSync { endpoints: vec![] })
        .await;
    let (_s, _r, answer) = open_session(&conn2, "ep_3", "ses_6").await;
    assert!(
        matches!(answer, StreamAnswer::StreamRefuse(_)),
        "{answer:?}"
    );
    drop(link2);

    shutdown.cancel();
    tokio::time::timeout(T, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let records = wait_for(&audit_path, |r| {
        r.iter().filter(|r| r.kind == "agent.disconnected").count() == 2
    })
    .await;
    let kinds: Vec<&str> = records.iter().map(|r| r.kind.as_str()).collect();
    for k in [
        "agent.connected",
        "endpoint.opened",
        "session.opened",
        "session.closed",
        "denied",
        "endpoint.closed",
        "agent.disconnected",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    assert_eq!(
        audit::verify_file(&audit_path).unwrap(),
        records.len() as u64
    );
}

#[tokio::test]
async fn enrollment_against_a_gateway_with_another_ca_is_refused() {
    let gw = Gateway::start(T);
    let other = certs::Ca::generate("someone else", Timestamp::now()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = EnrollmentToken {
        id: "tok_1".into(),
        secret: Secret::new("s3cret"),
        ca: other.fingerprint(),
    }
    .encode();
    let server = gw.endpoint.clone();
    tokio::spawn(async move {
        if let Some(incoming) = server.accept().await {
            let _ = incoming.await;
        }
    });
    let e = enroll::enroll(&gw.addr(), &token, &dir.path().join("agent.toml"))
        .await
        .unwrap_err();
    assert_eq!(e.to_api_error().code, ErrorCode::CaMismatch, "{e}");
    assert!(!dir.path().join("agent.toml").exists());
}

/// The binary: no listening socket, one JSON line once connected, clean exit on SIGTERM.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_connects_without_listening_and_stops_on_sigterm() {
    use tokio::io::AsyncBufReadExt;
    let gw = Gateway::start(T);
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("agent.toml");
    gw.enroll(&config_path).await.unwrap();
    let echo = echo_server().await;
    edit_config(&config_path, |text| text + &tcp_resource(&echo));

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_postern-agent"))
        .args(["run", "--output", "json", "--config"])
        .arg(&config_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let conn = gw.accept().await;
    let _link = gw.serve_tunnel(conn.clone(), CONTROL);
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(T, stdout.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(doc["connected"], true);
    assert_eq!(doc["appliance_id"], "app_1");

    // The agent's UDP socket is connected (state 01), never an open (07) listening one.
    let port = format!(":{:04X} ", conn.remote_address().port());
    let udp = std::fs::read_to_string("/proc/net/udp").unwrap();
    let entry = udp
        .lines()
        .find(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|local| format!("{local} ").ends_with(&port))
        })
        .unwrap();
    assert_eq!(entry.split_whitespace().nth(3), Some("01"), "{entry}");

    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(T, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    match tokio::time::timeout(T, conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(&c.reason[..], b"agent shutting down")
        }
        other => panic!("unexpected close: {other:?}"),
    }
    assert_eq!(
        stdout.next_line().await.unwrap(),
        None,
        "exactly one JSON document"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_gateway_counts_as_lost_and_the_agent_redials() {
    let gw = Gateway::start(T);
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("agent.toml");
    gw.enroll(&config_path).await.unwrap();
    edit_config(&config_path, |text| text + &tcp_resource("127.0.0.1:9"));
    let config = AgentConfig::load(&config_path).unwrap();
    let audit_path = config.audit_path.clone();
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(tunnel::run(config, shutdown.clone(), None));

    let _link = gw
        .link(Control {
            answer_heartbeats: false,
            ..CONTROL
        })
        .await;
    let started = tokio::time::Instant::now();
    let conn2 = gw.accept().await;
    // lost_after is 1 s; the redial follows within the first backoff step.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let _link2 = gw.serve_tunnel(conn2, CONTROL);
    let records = wait_for(&audit_path, |r| {
        r.iter().filter(|r| r.kind == "agent.connected").count() == 2
    })
    .await;
    let lost = records
        .iter()
        .find(|r| r.kind == "agent.disconnected")
        .unwrap();
    assert!(
        lost.detail["reason"].as_str().unwrap().contains("no frame"),
        "{}",
        lost.detail
    );
    shutdown.cancel();
    tokio::time::timeout(T, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
