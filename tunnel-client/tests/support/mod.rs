//! The minimal in-process gateway the agent's integration tests run against: a QUIC endpoint
//! with its own CA that enrolls an agent, acknowledges its hello, answers heartbeats and passes
//! frames both ways; plus the config edits and bounded waits on the agent's trail they share.

// Each test binary compiles its own copy of this module and uses only part of it.
#![allow(dead_code)]

use bytes::BytesMut;
use endpoint_types::{
    api::{AuditRecord, EnrollResponse},
    control::GrantLevel,
    frame::{
        encode_to_vec, Enrollment, EnrollmentAnswer, FrameDecoder, Handshake, HandshakeAnswer,
        Hello, HelloAck, LiveGrant, SentByAgent, SentByGateway, ToAgent, ToGateway, MAX_FRAME_LEN,
    },
    secret::Secret,
    token::EnrollmentToken,
    ApiError, ALPN_ENROLL, ALPN_TUNNEL,
};
use jiff::{SignedDuration, Timestamp};
use std::{path::Path, sync::Arc, time::Duration};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
    time::Instant,
};
use tunnel_client::enroll;

/// The gateway's side of the frame I/O: writes what the gateway sends. (The agent's side,
/// `tunnel_client::wire`, is typed the other way round.)
pub async fn write_frame<W: AsyncWrite + Unpin, F: SentByGateway>(
    w: &mut W,
    frame: &F,
) -> std::io::Result<()> {
    w.write_all(&encode_to_vec(frame)).await
}

/// Reads exactly one frame the agent sent and not a byte more (raw bytes follow a data
/// stream's answer).
pub async fn read_one_frame<R: AsyncRead + Unpin, F: SentByAgent>(
    r: &mut R,
    max_len: usize,
) -> Result<F, String> {
    let dec = FrameDecoder::new(max_len);
    let mut buf = BytesMut::new();
    loop {
        let need = dec.bytes_needed(&buf).map_err(|e| e.to_string())?;
        if need == 0 {
            return dec
                .decode(&mut buf)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "no frame".to_string());
        }
        let start = buf.len();
        buf.resize(start + need, 0);
        r.read_exact(&mut buf[start..])
            .await
            .map_err(|e| e.to_string())?;
    }
}

/// Reads the frames the agent sends on its control stream: the hello, then the rest.
pub struct AgentFrames<R> {
    inner: R,
    buf: BytesMut,
    dec: FrameDecoder,
}

impl<R: AsyncRead + Unpin> AgentFrames<R> {
    pub fn new(inner: R) -> Self {
        AgentFrames {
            inner,
            buf: BytesMut::new(),
            dec: FrameDecoder::new(MAX_FRAME_LEN),
        }
    }

    /// The next frame, `Ok(None)` at a clean end of stream.
    pub async fn next<F: SentByAgent>(&mut self) -> Result<Option<F>, String> {
        loop {
            if let Some(f) = self.dec.decode(&mut self.buf).map_err(|e| e.to_string())? {
                return Ok(Some(f));
            }
            match self.inner.read_buf(&mut self.buf).await {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Err("the agent closed the stream in a frame".into()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

pub struct Gateway {
    pub endpoint: quinn::Endpoint,
    pub ca: certs::Ca,
    /// Upper bound for anything the harness awaits, so a bug fails the test instead of hanging it.
    bound: Duration,
}

/// How the gateway plays a tunnel connection.
#[derive(Clone, Copy)]
pub struct Control {
    /// The test's checks on the agent's hello, before it is acknowledged.
    pub check_hello: fn(&Hello),
    /// The `lost_after_ms` the hello ack tells the agent.
    pub lost_after_ms: u64,
    /// `false` plays a gateway that has hung: it reads but never says anything again.
    pub answer_heartbeats: bool,
}

impl Gateway {
    /// A gateway on a free local port; `bound` limits each of its waits.
    pub fn start(bound: Duration) -> Gateway {
        let ca = certs::Ca::generate("test gateway CA", Timestamp::now()).unwrap();
        let server = ca
            .issue_server(
                &["127.0.0.1".to_string()],
                Timestamp::now(),
                Duration::from_secs(3600),
            )
            .unwrap();
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
        Gateway {
            endpoint,
            ca,
            bound,
        }
    }

    pub fn addr(&self) -> String {
        self.endpoint.local_addr().unwrap().to_string()
    }

    pub async fn accept(&self) -> quinn::Connection {
        let incoming = tokio::time::timeout(self.bound, self.endpoint.accept())
            .await
            .unwrap()
            .unwrap();
        incoming.await.unwrap()
    }

    /// The enrollment token for this gateway's CA.
    pub fn token(&self) -> String {
        EnrollmentToken {
            id: "tok_1".into(),
            secret: Secret::new("s3cret"),
            ca: self.ca.fingerprint(),
        }
        .encode()
    }

    /// Enrolls an agent at `config_path` with `token()` while serving its enrollment.
    pub async fn enroll(
        &self,
        config_path: &Path,
    ) -> Result<enroll::Enrolled, enroll::EnrollError> {
        let token = self.token();
        let addr = self.addr();
        let (done, ()) = tokio::join!(
            enroll::enroll(&addr, &token, config_path),
            self.serve_enrollment()
        );
        done
    }

    pub async fn serve_enrollment(&self) {
        let conn = self.accept().await;
        assert_eq!(alpn(&conn), ALPN_ENROLL);
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let Enrollment::EnrollRequest(req) =
            read_one_frame(&mut recv, MAX_FRAME_LEN).await.unwrap();
        let token = EnrollmentToken::parse(req.token.expose()).unwrap();
        assert_eq!(token.secret.expose(), "s3cret");
        let cert_pem = self
            .ca
            .sign_agent_csr(
                &req.csr_pem,
                "app_1",
                Timestamp::now(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let resp = EnrollResponse {
            appliance_id: "app_1".into(),
            app: "shop".into(),
            customer: "acme".into(),
            cert_pem,
            ca_pem: self.ca.cert_pem().to_string(),
            audit_key: None,
        };
        write_frame(&mut send, &EnrollmentAnswer::EnrollResponse(resp))
            .await
            .unwrap();
        send.finish().unwrap();
        let _ = tokio::time::timeout(self.bound, conn.closed()).await;
    }

    /// The agent's next connection, played as `control` says.
    pub async fn link(&self, control: Control) -> Link {
        let conn = self.accept().await;
        self.serve_tunnel(conn, control)
    }

    /// Accepts the control stream of `conn`, checks the hello, and then answers heartbeats (if
    /// `control` says so) and passes frames: the test sends with `to_agent` and sees every frame
    /// but heartbeats, with its arrival time, on `from_agent`. Frames go out as the test wrote
    /// them: commands bare (applied, not acknowledged) unless the test numbers them.
    pub fn serve_tunnel(&self, conn: quinn::Connection, control: Control) -> Link {
        let (to_agent, mut cmds) = mpsc::channel::<ToAgent>(64);
        let (out, from_agent) = mpsc::channel::<(Instant, ToGateway)>(4096);
        let proofs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = proofs.clone();
        let c = conn.clone();
        tokio::spawn(async move {
            let Ok((mut send, recv)) = c.accept_bi().await else {
                return;
            };
            let mut reader = AgentFrames::new(recv);
            let Ok(Some(Handshake::Hello(hello))) = reader.next().await else {
                panic!("expected a hello")
            };
            (control.check_hello)(&hello);
            let ack = HelloAck {
                appliance_id: "app_1".into(),
                app: "shop".into(),
                customer: "acme".into(),
                heartbeat_interval_ms: 100,
                lost_after_ms: control.lost_after_ms,
                audit_key: None,
                approval_refusals: true,
                cert_renewal: false,
            };
            write_frame(&mut send, &HandshakeAnswer::HelloAck(ack))
                .await
                .unwrap();
            loop {
                tokio::select! {
                    f = reader.next::<ToGateway>() => match f {
                        Ok(Some(ToGateway::Heartbeat { seq })) => {
                            if control.answer_heartbeats && write_frame(&mut send, &ToAgent::HeartbeatAck { seq }).await.is_err() { return; }
                        }
                        Ok(Some(ToGateway::HeartbeatAck { .. })) => {}
                        // As a gateway does: kept and acknowledged, so the agent stops resending.
                        Ok(Some(ToGateway::TeardownProof(p))) => {
                            let endpoint_id = p.proof.endpoint_id.clone();
                            kept.lock().unwrap_or_else(|e| e.into_inner()).push(p);
                            if write_frame(&mut send, &ToAgent::TeardownAck { endpoint_id, refused: None }).await.is_err() { return; }
                        }
                        // The trail's signed heads come at their own pace; no test here plays them.
                        Ok(Some(ToGateway::TrailHead(_))) => {}
                        Ok(Some(f)) => { let _ = out.send((Instant::now(), f)).await; }
                        _ => return,
                    },
                    cmd = cmds.recv() => match cmd {
                        Some(f) => { let _ = write_frame(&mut send, &f).await; }
                        None => return,
                    },
                }
            }
        });
        Link {
            conn,
            to_agent,
            from_agent,
            proofs,
            bound: self.bound,
        }
    }
}

pub fn alpn(conn: &quinn::Connection) -> Vec<u8> {
    conn.handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .unwrap_or_default()
}

/// A tunnel connection the gateway plays; dropping it (or `to_agent`) ends the play.
pub struct Link {
    pub conn: quinn::Connection,
    pub to_agent: mpsc::Sender<ToAgent>,
    pub from_agent: mpsc::Receiver<(Instant, ToGateway)>,
    /// Teardown proofs the agent sent (acknowledged; not passed on `from_agent`).
    pub proofs: Arc<std::sync::Mutex<Vec<endpoint_types::teardown::SignedTeardown>>>,
    bound: Duration,
}

impl Link {
    pub async fn send(&self, f: ToAgent) {
        self.to_agent.send(f).await.unwrap();
    }

    pub async fn next(&mut self) -> (Instant, ToGateway) {
        tokio::time::timeout(self.bound, self.from_agent.recv())
            .await
            .expect("a frame in time")
            .expect("the link is up")
    }

    /// Frames about `op_id` up to and including the first `OpFinished` or `OpRefused`.
    pub async fn until_end(&mut self, op_id: &str) -> Vec<(Instant, ToGateway)> {
        let mut got = Vec::new();
        loop {
            let (at, f) = self.next().await;
            if frame_op(&f) != Some(op_id) {
                panic!("unexpected frame while waiting for {op_id}: {f:?}");
            }
            let end = matches!(f, ToGateway::OpFinished(_) | ToGateway::OpRefused { .. });
            got.push((at, f));
            if end {
                return got;
            }
        }
    }

    pub async fn refusal(&mut self, op_id: &str) -> ApiError {
        let frames = self.until_end(op_id).await;
        match &frames[..] {
            [(_, ToGateway::OpRefused { error, .. })] => error.clone(),
            other => panic!("expected only a refusal for {op_id}, got {other:?}"),
        }
    }

    /// Nothing arrives for a while.
    pub async fn quiet(&mut self) {
        if let Ok(Some((_, f))) =
            tokio::time::timeout(Duration::from_millis(300), self.from_agent.recv()).await
        {
            panic!("unexpected frame: {f:?}");
        }
    }
}

pub fn frame_op(f: &ToGateway) -> Option<&str> {
    match f {
        ToGateway::OpRefused { op_id, .. }
        | ToGateway::OpStarted { op_id }
        | ToGateway::OpOutput { op_id, .. } => Some(op_id),
        ToGateway::OpFinished(f) => Some(&f.op_id),
        _ => None,
    }
}

pub fn live_grant(id: &str, level: GrantLevel, from_s: i64, to_s: i64) -> LiveGrant {
    LiveGrant {
        grant_id: id.into(),
        level,
        approved_by: "bob@acme.example".into(),
        approved_at: Timestamp::now() + SignedDuration::from_secs(from_s),
        expires_at: Timestamp::now() + SignedDuration::from_secs(to_s),
        signed_decision: None,
    }
}

/// Rewrites the agent's config file at `path` through `edit`.
pub fn edit_config(path: &Path, edit: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, edit(text)).unwrap();
}

/// The agent's trail at `path` once `cond` holds (or `bound` passes).
pub async fn trail_until(
    path: &Path,
    bound: Duration,
    cond: impl Fn(&[AuditRecord]) -> bool,
) -> Vec<AuditRecord> {
    let deadline = Instant::now() + bound;
    loop {
        let records: Vec<AuditRecord> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if cond(&records) || Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The unprivileged user ops run as in these tests, created once per machine (serialised
/// across test processes with a lock file, as the harness does for its sshd user).
pub fn ensure_ops_user() -> tunnel_client::op_sandbox::OpsUser {
    use tunnel_client::op_sandbox::OpsUser;
    const NAME: &str = "postern-ops-test";
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/postern-ops-test-user.lock")
        .unwrap();
    // SAFETY: flock on a descriptor we own; released when `lock` closes.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
        0
    );
    if OpsUser::lookup(NAME).is_err() {
        let status = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                NAME,
            ])
            .status()
            .unwrap();
        assert!(status.success(), "useradd {NAME}");
    }
    OpsUser::lookup(NAME).unwrap()
}
