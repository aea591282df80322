//! The agent against a minimal in-process gateway: enrollment, hello, heartbeats, endpoint
//! announcements, data streams (accept, refuse, cut) and reconnect after a lost connection.

use endpoint_types::{
    api::{AuditRecord, EnrollResponse},
    frame::{EndpointGrant, Frame, HelloAck, StreamOpen, MAX_FRAME_LEN, MAX_STREAM_HEADER_LEN},
    resource::{CloseReason, EndpointType, ResourceKind},
    secret::Secret,
    token::EnrollmentToken,
    ErrorCode, ALPN_ENROLL, ALPN_TUNNEL,
};
use jiff::{SignedDuration, Timestamp};
use std::{sync::Arc, time::Duration};
use tokio::{
    io::AsyncWriteExt,
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tunnel_client::{
    audit,
    config::AgentConfig,
    enroll, tunnel,
    wire::{read_one_frame, write_frame, FrameReader},
};

const T: Duration = Duration::from_secs(10);

struct Gateway {
    endpoint: quinn::Endpoint,
    ca: certs::Ca,
}

impl Gateway {
    fn start() -> Gateway {
        let ca = certs::Ca::generate("test gateway CA", Timestamp::now()).unwrap();
        let server = ca.issue_server(&["127.0.0.1".to_string()], Timestamp::now(), Duration::from_secs(3600)).unwrap();
        let tls = certs::server_config(
            &server.cert_pem,
            &server.key_pem,
            Some(ca.cert_pem()),
            certs::ClientAuth::Optional,
            vec![ALPN_TUNNEL.to_vec(), ALPN_ENROLL.to_vec()],
        )
        .unwrap();
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).unwrap();
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        Gateway { endpoint, ca }
    }

    fn addr(&self) -> String {
        self.endpoint.local_addr().unwrap().to_string()
    }

    async fn accept(&self) -> quinn::Connection {
        let incoming = tokio::time::timeout(T, self.endpoint.accept()).await.unwrap().unwrap();
        incoming.await.unwrap()
    }

    async fn serve_enrollment(&self) {
        let conn = self.accept().await;
        assert_eq!(alpn(&conn), ALPN_ENROLL);
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let Frame::EnrollRequest(req) = read_one_frame(&mut recv, MAX_FRAME_LEN).await.unwrap() else {
            panic!("expected an enroll request");
        };
        let token = EnrollmentToken::parse(req.token.expose()).unwrap();
        assert_eq!(token.secret.expose(), "s3cret");
        let cert_pem = self.ca.sign_agent_csr(&req.csr_pem, "app_1", Timestamp::now(), Duration::from_secs(3600)).unwrap();
        let resp = EnrollResponse {
            appliance_id: "app_1".into(),
            app: "shop".into(),
            customer: "acme".into(),
            cert_pem,
            ca_pem: self.ca.cert_pem().to_string(),
        };
        write_frame(&mut send, &Frame::EnrollResponse(resp)).await.unwrap();
        send.finish().unwrap();
        let _ = tokio::time::timeout(T, conn.closed()).await;
    }
}

fn alpn(conn: &quinn::Connection) -> Vec<u8> {
    conn.handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .unwrap_or_default()
}

/// Accepts the control stream, checks the hello, and then answers heartbeats and forwards
/// the frames the test sends through `cmds`.
async fn control(conn: quinn::Connection, cmds: mpsc::Receiver<Frame>) {
    control_with(conn, cmds, true).await
}

/// `answer: false` plays a gateway that has hung: it reads but never says anything again.
async fn control_with(conn: quinn::Connection, mut cmds: mpsc::Receiver<Frame>, answer: bool) {
    let (mut send, recv) = conn.accept_bi().await.unwrap();
    let mut reader = FrameReader::new(recv, MAX_FRAME_LEN);
    let Some(Frame::Hello(hello)) = reader.next().await.unwrap() else { panic!("expected a hello") };
    assert_eq!(hello.protocol_version, endpoint_types::PROTOCOL_VERSION);
    assert_eq!(hello.resources.len(), 1);
    assert_eq!(hello.resources[0].kind, ResourceKind::Tcp);
    let ack = HelloAck {
        appliance_id: "app_1".into(),
        app: "shop".into(),
        customer: "acme".into(),
        heartbeat_interval_ms: 100,
        lost_after_ms: 1000,
    };
    write_frame(&mut send, &Frame::HelloAck(ack)).await.unwrap();
    loop {
        tokio::select! {
            f = reader.next() => match f {
                Ok(Some(Frame::Heartbeat { seq })) if answer => {
                    if write_frame(&mut send, &Frame::HeartbeatAck { seq }).await.is_err() { return; }
                }
                Ok(Some(_)) => {}
                _ => return,
            },
            cmd = cmds.recv() => match cmd {
                Some(f) => { let _ = write_frame(&mut send, &f).await; }
                None => return,
            },
        }
    }
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
        endpoint_id: id.into(),
        endpoint_type: EndpointType::Tcp,
        resource_id: "null_resource.echo".into(),
        expires_at: Timestamp::now() + SignedDuration::from_secs(secs),
        grant_id: Some("gr_1".into()),
    }
}

fn operate_grant() -> endpoint_types::frame::LiveGrant {
    endpoint_types::frame::LiveGrant {
        grant_id: "gr_1".into(),
        level: endpoint_types::control::GrantLevel::Operate,
        approved_by: "bob@acme.example".into(),
        approved_at: Timestamp::now() - SignedDuration::from_secs(1),
        expires_at: Timestamp::now() + SignedDuration::from_secs(3600),
    }
}

async fn open_session(conn: &quinn::Connection, endpoint_id: &str, session: &str) -> (quinn::SendStream, quinn::RecvStream, Frame) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let open = StreamOpen {
        endpoint_id: endpoint_id.into(),
        session_id: session.into(),
        resource_id: "null_resource.echo".into(),
        operator: "alice@vendor".into(),
        client_addr: "127.0.0.1:5000".into(),
    };
    write_frame(&mut send, &Frame::StreamOpen(open)).await.unwrap();
    let answer = tokio::time::timeout(T, read_one_frame(&mut recv, MAX_STREAM_HEADER_LEN)).await.unwrap().unwrap();
    (send, recv, answer)
}

async fn wait_for<F: Fn(&[AuditRecord]) -> bool>(path: &std::path::Path, cond: F) -> Vec<AuditRecord> {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let records: Vec<AuditRecord> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if cond(&records) || tokio::time::Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    let gw = Gateway::start();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("agent.toml");
    let token = EnrollmentToken { id: "tok_1".into(), secret: Secret::new("s3cret"), ca: gw.ca.fingerprint() }.encode();

    // Enrollment creates the config and the credentials next to it.
    let addr = gw.addr();
    let (done, ()) = tokio::join!(enroll::enroll(&addr, &token, &config_path), gw.serve_enrollment());
    let done = done.unwrap();
    assert_eq!((done.appliance_id.as_str(), done.app.as_str(), done.customer.as_str()), ("app_1", "shop", "acme"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("agent.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let echo = echo_server().await;
    let mut text = std::fs::read_to_string(&config_path).unwrap();
    text.push_str(&format!("\n[[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"{echo}\"\n"));
    std::fs::write(&config_path, text).unwrap();
    let config = AgentConfig::load(&config_path).unwrap();
    assert_eq!(config.appliance_id.as_deref(), Some("app_1"));
    let audit_path = config.audit_path.clone();

    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let agent = tokio::spawn(tunnel::run(config, shutdown.clone(), Some(ready_tx)));

    let conn = gw.accept().await;
    assert_eq!(alpn(&conn), ALPN_TUNNEL);
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let ctl = tokio::spawn(control(conn.clone(), cmd_rx));
    let ack = tokio::time::timeout(T, ready_rx).await.unwrap().unwrap();
    assert_eq!(ack.appliance_id, "app_1");

    // Unknown endpoint: refused, nothing dialled.
    let (_s, _r, answer) = open_session(&conn, "ep_unknown", "ses_0").await;
    let Frame::StreamRefuse(e) = answer else { panic!("expected a refusal, got {answer:?}") };
    assert_eq!(e.code, ErrorCode::ForbiddenByScope);

    cmd_tx.send(Frame::GrantSync { grants: vec![operate_grant()] }).await.unwrap();
    cmd_tx.send(Frame::EndpointSync { endpoints: vec![grant("ep_1", 60)] }).await.unwrap();
    wait_for(&audit_path, |r| r.iter().any(|r| r.kind == "endpoint.opened")).await;

    // A live endpoint: bytes flow both ways and half-close is preserved.
    let (mut send, mut recv, answer) = open_session(&conn, "ep_1", "ses_1").await;
    assert_eq!(answer, Frame::StreamAccept);
    send.write_all(b"ping through postern").await.unwrap();
    send.finish().unwrap();
    let back = tokio::time::timeout(T, recv.read_to_end(1024)).await.unwrap().unwrap();
    assert_eq!(back, b"ping through postern");
    let records = wait_for(&audit_path, |r| closed_reasons(r).len() == 1).await;
    let closed = records.iter().find(|r| r.kind == "session.closed").unwrap();
    assert_eq!(closed.detail["reason"], "client");
    assert_eq!(closed.detail["bytes_up"], 20);
    assert_eq!(closed.detail["bytes_down"], 20);
    assert_eq!(closed.actor, "alice@vendor");

    // Retiring the endpoint cuts a live session and refuses new ones.
    let (mut send, mut recv, answer) = open_session(&conn, "ep_1", "ses_2").await;
    assert_eq!(answer, Frame::StreamAccept);
    send.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    recv.read_exact(&mut one).await.unwrap();
    cmd_tx.send(Frame::EndpointClose { endpoint_id: "ep_1".into(), reason: CloseReason::Retired }).await.unwrap();
    assert!(tokio::time::timeout(T, recv.read_to_end(1024)).await.unwrap().is_err(), "the stream must be reset");
    let (_s, _r, answer) = open_session(&conn, "ep_1", "ses_3").await;
    let Frame::StreamRefuse(e) = answer else { panic!("expected a refusal, got {answer:?}") };
    assert_eq!(e.code, ErrorCode::EndpointRetired);
    let records = wait_for(&audit_path, |r| closed_reasons(r).len() == 2).await;
    assert_eq!(closed_reasons(&records), vec!["client", "retired"]);

    // An endpoint that expires by the agent's clock is cut as expired.
    cmd_tx.send(Frame::EndpointOpen(grant("ep_2", 2))).await.unwrap();
    wait_for(&audit_path, |r| r.iter().filter(|r| r.kind == "endpoint.opened").count() == 2).await;
    let (_s2, mut recv2, answer) = open_session(&conn, "ep_2", "ses_4").await;
    assert_eq!(answer, Frame::StreamAccept);
    assert!(tokio::time::timeout(T, recv2.read_to_end(1024)).await.unwrap().is_err());
    let records = wait_for(&audit_path, |r| closed_reasons(r).len() == 3).await;
    assert_eq!(closed_reasons(&records).last().map(String::as_str), Some("expired"));

    // Losing the connection interrupts sessions; the agent redials and says hello again.
    cmd_tx.send(Frame::EndpointOpen(grant("ep_3", 60))).await.unwrap();
    wait_for(&audit_path, |r| r.iter().filter(|r| r.kind == "endpoint.opened").count() == 3).await;
    let (_s3, _r3, answer) = open_session(&conn, "ep_3", "ses_5").await;
    assert_eq!(answer, Frame::StreamAccept);
    conn.close(0u32.into(), b"gateway restarting");
    ctl.abort();
    let conn2 = gw.accept().await;
    let (cmd_tx2, cmd_rx2) = mpsc::channel(8);
    let _ctl2 = tokio::spawn(control(conn2.clone(), cmd_rx2));
    let records = wait_for(&audit_path, |r| r.iter().filter(|r| r.kind == "agent.connected").count() == 2).await;
    assert!(closed_reasons(&records).contains(&"interrupted".to_string()), "{:?}", closed_reasons(&records));
    // The live set was forgotten with the old connection.
    let (_s, _r, answer) = open_session(&conn2, "ep_3", "ses_6").await;
    assert!(matches!(answer, Frame::StreamRefuse(_)), "{answer:?}");
    drop(cmd_tx2);

    shutdown.cancel();
    tokio::time::timeout(T, agent).await.unwrap().unwrap().unwrap();
    let records = wait_for(&audit_path, |r| r.iter().filter(|r| r.kind == "agent.disconnected").count() == 2).await;
    let kinds: Vec<&str> = records.iter().map(|r| r.kind.as_str()).collect();
    for k in ["agent.connected", "endpoint.opened", "session.opened", "session.closed", "denied", "endpoint.closed", "agent.disconnected"] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    assert_eq!(audit::verify_file(&audit_path).unwrap(), records.len() as u64);
}

#[tokio::test]
async fn enrollment_against_a_gateway_with_another_ca_is_refused() {
    let gw = Gateway::start();
    let other = certs::Ca::generate("someone else", Timestamp::now()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = EnrollmentToken { id: "tok_1".into(), secret: Secret::new("s3cret"), ca: other.fingerprint() }.encode();
    let server = gw.endpoint.clone();
    tokio::spawn(async move {
        if let Some(incoming) = server.accept().await {
            let _ = incoming.await;
        }
    });
    let e = enroll::enroll(&gw.addr(), &token, &dir.path().join("agent.toml")).await.unwrap_err();
    assert_eq!(e.to_api_error().code, ErrorCode::CaMismatch, "{e}");
    assert!(!dir.path().join("agent.toml").exists());
}

/// The binary: no listening socket, one JSON line once connected, clean exit on SIGTERM.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_connects_without_listening_and_stops_on_sigterm() {
    use tokio::io::AsyncBufReadExt;
    let gw = Gateway::start();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("agent.toml");
    let token = EnrollmentToken { id: "tok_1".into(), secret: Secret::new("s3cret"), ca: gw.ca.fingerprint() }.encode();
    let addr = gw.addr();
    let (done, ()) = tokio::join!(enroll::enroll(&addr, &token, &config_path), gw.serve_enrollment());
    done.unwrap();
    let echo = echo_server().await;
    let mut text = std::fs::read_to_string(&config_path).unwrap();
    text.push_str(&format!("\n[[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"{echo}\"\n"));
    std::fs::write(&config_path, text).unwrap();

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_postern-agent"))
        .args(["run", "--output", "json", "--config"])
        .arg(&config_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let conn = gw.accept().await;
    let (_cmd_tx, cmd_rx) = mpsc::channel(8);
    tokio::spawn(control(conn.clone(), cmd_rx));
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(T, stdout.next_line()).await.unwrap().unwrap().unwrap();
    let doc: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(doc["connected"], true);
    assert_eq!(doc["appliance_id"], "app_1");

    // The agent's UDP socket is connected (state 01), never an open (07) listening one.
    let port = format!(":{:04X} ", conn.remote_address().port());
    let udp = std::fs::read_to_string("/proc/net/udp").unwrap();
    let entry = udp.lines().find(|l| l.split_whitespace().nth(1).is_some_and(|local| format!("{local} ").ends_with(&port))).unwrap();
    assert_eq!(entry.split_whitespace().nth(3), Some("01"), "{entry}");

    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = tokio::time::timeout(T, child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
    match tokio::time::timeout(T, conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(&c.reason[..], b"agent shutting down"),
        other => panic!("unexpected close: {other:?}"),
    }
    assert_eq!(stdout.next_line().await.unwrap(), None, "exactly one JSON document");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_gateway_counts_as_lost_and_the_agent_redials() {
    let gw = Gateway::start();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("agent.toml");
    let token = EnrollmentToken { id: "tok_1".into(), secret: Secret::new("s3cret"), ca: gw.ca.fingerprint() }.encode();
    let addr = gw.addr();
    let (done, ()) = tokio::join!(enroll::enroll(&addr, &token, &config_path), gw.serve_enrollment());
    done.unwrap();
    let mut text = std::fs::read_to_string(&config_path).unwrap();
    text.push_str("\n[[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:9\"\n");
    std::fs::write(&config_path, text).unwrap();
    let config = AgentConfig::load(&config_path).unwrap();
    let audit_path = config.audit_path.clone();
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(tunnel::run(config, shutdown.clone(), None));

    let conn = gw.accept().await;
    let (_tx, rx) = mpsc::channel(1);
    tokio::spawn(control_with(conn.clone(), rx, false));
    let started = tokio::time::Instant::now();
    let conn2 = gw.accept().await;
    // lost_after is 1 s; the redial follows within the first backoff step.
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    let (_tx2, rx2) = mpsc::channel(1);
    tokio::spawn(control(conn2, rx2));
    let records = wait_for(&audit_path, |r| r.iter().filter(|r| r.kind == "agent.connected").count() == 2).await;
    let lost = records.iter().find(|r| r.kind == "agent.disconnected").unwrap();
    assert!(lost.detail["reason"].as_str().unwrap().contains("no frame"), "{}", lost.detail);
    shutdown.cancel();
    tokio::time::timeout(T, agent).await.unwrap().unwrap().unwrap();
}
