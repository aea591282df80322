//! One client session at the appliance: the gateway hands over the client's (already
//! sanitised) startup parameters; the agent checks them again, logs in to the real server as
//! the endpoint's role, relays the server's greeting without its `BackendKeyData` (the client
//! has the gateway's key), and then relays raw messages, auditing the client's statements in
//! the customer's trail. A stream that starts with a `CancelRequest` carries the gateway's
//! key of a session here; the agent sends the real key to the server.

use super::{
    tls::{Db, DbTls},
    ReadyRole,
};
use crate::{
    config::ResourceConfig,
    grants::Cut,
    sessions::{accept, cut_quic, entry, refuse, Sessions},
};
use bytes::{Bytes, BytesMut};
use endpoint_types::{
    frame::StreamOpen,
    pgwire::{self, CancelKey, FrontendScan, PgError, Startup, CANCEL_KEY_PARAM},
    resource::CloseReason,
    ApiError, ErrorCode,
};
use postgres_protocol::{
    authentication::sasl::{ChannelBinding, ScramSha256},
    message::frontend,
};
use quinn::{RecvStream, SendStream};
use serde_json::json;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::Host;

const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
const READ_BUF: usize = 64 * 1024;
/// Largest server message accepted before the session is relayed raw.
const MAX_SERVER_SETUP_MESSAGE: usize = 1 << 20;

/// Where the server is, from the resource's `admin_url`.
#[derive(Debug, Clone)]
enum Server {
    Tcp(String, u16),
    Unix(std::path::PathBuf),
}

fn server_of(cfg: &tokio_postgres::Config) -> Option<Server> {
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    Some(match cfg.get_hosts().first()? {
        Host::Tcp(h) => Server::Tcp(h.clone(), port),
        Host::Unix(dir) => Server::Unix(dir.join(format!(".s.PGSQL.{port}"))),
    })
}

/// Real cancel keys by (endpoint, the gateway's key for the session).
struct RealCancel {
    server: Server,
    key: CancelKey,
}

/// The real cancel keys of one agent's live sessions (part of [`super::PgState`]).
#[derive(Clone, Default)]
pub(super) struct Cancels(Arc<Mutex<HashMap<(String, CancelKey), RealCancel>>>);

impl Cancels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, CancelKey), RealCancel>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Drops the session's cancel entry however the session ends.
struct CancelEntry(Cancels, Option<(String, CancelKey)>);

impl Drop for CancelEntry {
    fn drop(&mut self) {
        if let Some(k) = self.1.take() {
            self.0.lock().remove(&k);
        }
    }
}

pub async fn serve_stream(
    ctx: &Sessions,
    open: StreamOpen,
    _resource: ResourceConfig,
    cut: Cut,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let role = match ctx.postgres.ready_role(&open.endpoint_id).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(endpoint = %open.endpoint_id, error = %e, "postgres session without a role");
            let e = ApiError::new(ErrorCode::TargetUnreachable, format!("the appliance has no database role for endpoint {}", open.endpoint_id))
                .hint("the agent could not prepare the endpoint's role; the appliance's agent log has the cause");
            return refuse(&mut send, e).await;
        }
    };
    if accept(&mut send).await.is_err() {
        return;
    }
    let mut buf = BytesMut::with_capacity(1024);
    let first = tokio::select! {
        r = tokio::time::timeout(SETUP_TIMEOUT, read_startup(&mut recv, &mut buf)) => r.ok().flatten(),
        () = cut.cancelled() => None,
    };
    match first {
        Some(Startup::Cancel(key)) => {
            cancel(ctx, &open, key).await;
            let _ = send.finish();
        }
        Some(Startup::Params { params, .. }) => {
            let Some(server) = server_of(role.admin.server()) else {
                return cut_quic(&mut send, &mut recv, CloseReason::Error);
            };
            let session = Session {
                ctx,
                open: &open,
                role: &role,
                cut: &cut,
                server,
            };
            session.run(params, send, recv).await;
        }
        _ => cut_quic(&mut send, &mut recv, CloseReason::Error),
    }
}

async fn read_startup(recv: &mut RecvStream, buf: &mut BytesMut) -> Option<Startup> {
    loop {
        match pgwire::parse_startup(buf) {
            Ok(Some((s, n))) => {
                let _ = buf.split_to(n);
                return Some(s);
            }
            Ok(None) => {}
            Err(_) => return None,
        }
        let chunk = recv
            .read_chunk(pgwire::MAX_STARTUP_LEN, true)
            .await
            .ok()??;
        buf.extend_from_slice(&chunk.bytes);
    }
}

async fn cancel(ctx: &Sessions, open: &StreamOpen, gw_key: CancelKey) {
    let target = ctx
        .postgres
        .cancels
        .lock()
        .get(&(open.endpoint_id.clone(), gw_key))
        .map(|c| (c.server.clone(), c.key));
    ctx.audit.record_or_log(entry(
        "sql.cancel",
        open,
        json!({ "matched": target.is_some() }),
    ));
    let Some((server, key)) = target else { return };
    let mut packet = BytesMut::with_capacity(16);
    frontend::cancel_request(key.process_id, key.secret, &mut packet);
    let sent = match server {
        Server::Tcp(h, p) => match tokio::net::TcpStream::connect((h.as_str(), p)).await {
            Ok(mut s) => s.write_all(&packet).await,
            Err(e) => Err(e),
        },
        Server::Unix(path) => match tokio::net::UnixStream::connect(path).await {
            Ok(mut s) => s.write_all(&packet).await,
            Err(e) => Err(e),
        },
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "could not send a cancel request to the database");
    }
}

struct Session<'a> {
    ctx: &'a Sessions,
    open: &'a StreamOpen,
    role: &'a ReadyRole,
    cut: &'a Cut,
    server: Server,
}

/// How the relay ended.
#[derive(Debug)]
enum End {
    Client,
    Cut(CloseReason),
    Error(String),
    /// A batch of the customer's trail failed while the session was live.
    Trail,
}

const TRAIL_CUT: &str = "the customer's audit trail cannot be written";

fn end_is_trail(error: &Option<String>) -> bool {
    error.as_deref() == Some(TRAIL_CUT)
}

/// What the client gets when the appliance cannot record its statements: PostgreSQL's own
/// `io_error` class, the reason and what the customer must do.
fn trail_fatal() -> PgError {
    PgError::fatal(
        "58030",
        "AUDIT_UNAVAILABLE: the appliance cannot write its audit trail; the session is refused so that no statement runs unrecorded",
    )
    .hint("the customer must free space on (or repair) the disk holding audit_path; sessions are accepted again once it is writable")
}

/// Where the relayed server stream stands in its message framing (tag, 4-byte length,
/// body), so the agent can add its own FATAL only between two server messages.
#[derive(Default)]
struct ServerBoundary {
    header: [u8; 5],
    have: usize,
    remaining: u64,
    /// A chunk was being handed to the tunnel when the relay stopped: where it got to is unknown.
    in_flight: bool,
}

impl ServerBoundary {
    fn advance(&mut self, chunk: &[u8]) {
        let mut bytes = chunk.iter();
        loop {
            if self.remaining > 0 {
                // Skips the rest of the body (or as much of it as this chunk holds).
                let n = self.remaining.min(bytes.len() as u64);
                if n == 0 {
                    return;
                }
                self.remaining -= n;
                bytes.nth(n as usize - 1);
                continue;
            }
            let Some(&b) = bytes.next() else { return };
            if let Some(slot) = self.header.get_mut(self.have) {
                *slot = b;
            }
            self.have += 1;
            if self.have == self.header.len() {
                let [_, a, b, c, d] = self.header;
                self.remaining = u64::from(u32::from_be_bytes([a, b, c, d])).saturating_sub(4);
                self.have = 0;
            }
        }
    }

    fn at_boundary(&self) -> bool {
        !self.in_flight && self.have == 0 && self.remaining == 0
    }
}

impl Session<'_> {
    async fn run(&self, params: Vec<(String, String)>, mut send: SendStream, mut recv: RecvStream) {
        let started = Instant::now();
        let gw_key = params
            .iter()
            .find(|(k, _)| k == CANCEL_KEY_PARAM)
            .and_then(|(_, v)| CancelKey::from_param(v));
        // The agent is the customer's enforcement point: the policy is applied again here,
        // and a startup the gateway refused never reaches the database either.
        let refused_by_gateway = params
            .iter()
            .find(|(k, _)| k == pgwire::REFUSED_PARAM)
            .map(|(_, v)| v.clone());
        let checked = pgwire::sanitize(&params, &self.role.admin.scope.database);
        let refusal = match (checked, refused_by_gateway) {
            (Ok(s), None) => Ok(s.forward),
            (Err(e), _) => Err((e, "agent")),
            (Ok(_), Some(why)) => Err((
                PgError::fatal(pgwire::sqlstate::INSUFFICIENT_PRIVILEGE, why),
                "gateway",
            )),
        };
        let forward = match refusal {
            Ok(f) => f,
            Err((e, by)) => {
                let detail = json!({ "action": "session", "sqlstate": e.sqlstate, "reason": e.message, "refused_by": by });
                self.ctx
                    .audit
                    .record_or_log(entry("denied", self.open, detail));
                return self.fail(&mut send, e).await;
            }
        };
        let server = self.server.clone();
        let connected = tokio::select! {
            r = tokio::time::timeout(SETUP_TIMEOUT, connect(&server, &self.role.admin.tls)) => r.map_err(|_| std::io::ErrorKind::TimedOut.into()).and_then(|r| r),
            () = self.cut.cancelled() => return cut_quic(&mut send, &mut recv, self.cut.reason().unwrap_or(CloseReason::Interrupted)),
        };
        match connected {
            Ok(Db::Tcp(s)) => self.relay(s, forward, gw_key, send, recv, started).await,
            Ok(Db::Tls(s)) => self.relay(s, forward, gw_key, send, recv, started).await,
            Ok(Db::Unix(s)) => self.relay(s, forward, gw_key, send, recv, started).await,
            Err(e) => {
                tracing::warn!(resource = %self.open.resource_id, error = %e, "cannot connect to the database");
                let e = PgError::fatal(pgwire::sqlstate::CONNECTION_FAILURE, "the appliance cannot connect to the database")
                    .hint("the database behind this endpoint may be down; the appliance's agent log has the cause");
                self.fail(&mut send, e).await
            }
        }
    }

    async fn fail(&self, send: &mut SendStream, e: PgError) {
        let mut b = BytesMut::new();
        e.write(&mut b);
        let _ = send.write_all(&b).await;
        let _ = send.finish();
    }

    async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut db: S,
        forward: Vec<(String, String)>,
        gw_key: Option<CancelKey>,
        mut send: SendStream,
        mut recv: RecvStream,
        started: Instant,
    ) {
        let mut greeting = BytesMut::new();
        let setup = tokio::select! {
            r = tokio::time::timeout(SETUP_TIMEOUT, self.login(&mut db, &forward, &mut greeting)) => r.unwrap_or_else(|_| Err(Login::Failed("the database did not answer in time".into()))),
            () = self.cut.cancelled() => return cut_quic(&mut send, &mut recv, self.cut.reason().unwrap_or(CloseReason::Interrupted)),
        };
        let real_key = match setup {
            Ok(k) => k,
            Err(Login::Refused(raw)) => {
                // The server's own error (e.g. too many connections) goes to the client as is.
                let (code, message) = pgwire::error_fields(raw.get(5..).unwrap_or_default());
                self.ctx.audit.record_or_log(entry(
                    "denied",
                    self.open,
                    json!({ "action": "session", "sqlstate": code, "reason": message }),
                ));
                let _ = send.write_all(&raw).await;
                let _ = send.finish();
                return;
            }
            Err(Login::Failed(why)) => {
                tracing::warn!(endpoint = %self.open.endpoint_id, error = %why, "login to the database as the endpoint's role failed");
                let e = PgError::fatal(
                    pgwire::sqlstate::CONNECTION_FAILURE,
                    "the appliance could not log in to the database",
                )
                .hint("the appliance's agent log has the cause");
                return self.fail(&mut send, e).await;
            }
        };
        let opened = entry(
            "session.opened",
            self.open,
            json!({
                "resource_id": self.open.resource_id, "client_addr": self.open.client_addr, "kind": "postgres",
                "role": self.role.name, "database": self.role.admin.scope.database,
            }),
        );
        // Watched from before the opening record: a batch failing from here on cuts the session.
        let mut failures = self.ctx.audit.failures();
        failures.borrow_and_update();
        if let Err(e) = self.ctx.audit.write(opened).await {
            tracing::error!(error = %e, "cannot write the customer's audit trail; refusing the session");
            return self.fail(&mut send, trail_fatal()).await;
        }
        let cancels = self.ctx.postgres.cancels.clone();
        let _entry = CancelEntry(
            cancels.clone(),
            match (gw_key, real_key) {
                (Some(gk), Some(rk)) => {
                    let k = (self.open.endpoint_id.clone(), gk);
                    cancels.lock().insert(
                        k.clone(),
                        RealCancel {
                            server: self.server.clone(),
                            key: rk,
                        },
                    );
                    Some(k)
                }
                _ => None,
            },
        );
        let (mut up, mut down, mut statements) = (0u64, greeting.len() as u64, 0u64);
        let mut boundary = ServerBoundary::default();
        let end = match send.write_chunk(greeting.freeze()).await {
            Err(e) => End::Error(e.to_string()),
            Ok(()) => tokio::select! {
                // Checked first: once a batch failed, nothing more is forwarded.
                biased;
                _ = failures.changed() => End::Trail,
                r = self.pump(&mut db, &mut send, &mut recv, (&mut up, &mut down, &mut statements), &mut boundary) => r,
                () = self.cut.cancelled() => End::Cut(self.cut.reason().unwrap_or(CloseReason::Interrupted)),
            },
        };
        // A cut or an error that raced a failed batch still ends the session for the trail's
        // sake: the client is told why whenever the stream allows it.
        let end = match end {
            End::Cut(_) | End::Error(_) if failures.has_changed().unwrap_or(false) => End::Trail,
            other => other,
        };
        if !matches!(end, End::Client) {
            tracing::info!(session = %self.open.session_id, end = ?end, at_boundary = boundary.at_boundary(), "postgres session cut");
        }
        let (reason, error) = match end {
            End::Client => (CloseReason::Client, None),
            End::Cut(r) => (r, None),
            End::Error(e) => (self.cut.reason().unwrap_or(CloseReason::Error), Some(e)),
            End::Trail => {
                tracing::error!(session = %self.open.session_id, "cutting a postgres session: the customer's audit trail cannot be written");
                (CloseReason::Error, Some(TRAIL_CUT.to_string()))
            }
        };
        if end_is_trail(&error) && boundary.at_boundary() {
            // Between server messages the client can be told why, as PostgreSQL would.
            let mut b = BytesMut::new();
            trail_fatal().write(&mut b);
            let _ = send.write_all(&b).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        } else if reason != CloseReason::Client {
            cut_quic(&mut send, &mut recv, reason);
        } else {
            let _ = send.finish();
        }
        let _ = db.shutdown().await;
        let mut detail = json!({
            "reason": reason.as_str(), "bytes_up": up, "bytes_down": down, "statements": statements,
            "duration_ms": started.elapsed().as_millis() as u64, "resource_id": self.open.resource_id,
        });
        if let Some(e) = error {
            detail["error"] = json!(e);
        }
        self.ctx
            .audit
            .record_or_log(entry("session.closed", self.open, detail));
    }

    /// Startup and authentication as the endpoint's role. On success `greeting` holds what
    /// the client gets (AuthenticationOk … ReadyForQuery, without BackendKeyData) and the
    /// server's real cancel key is returned.
    async fn login<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        db: &mut S,
        forward: &[(String, String)],
        greeting: &mut BytesMut,
    ) -> Result<Option<CancelKey>, Login> {
        let failed = |e: &dyn std::fmt::Display| Login::Failed(e.to_string());
        let database = self.role.admin.scope.database.as_str();
        let mut out = BytesMut::new();
        let params = [("user", self.role.name.as_str()), ("database", database)]
            .into_iter()
            .chain(forward.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        frontend::startup_message(params, &mut out).map_err(|e| failed(&e))?;
        db.write_all(&out).await.map_err(|e| failed(&e))?;
        let password = self.role.password.expose().as_bytes();
        let mut scram: Option<ScramSha256> = None;
        let mut key = None;
        let mut authenticated = false;
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            let Some((tag, body, n)) =
                pgwire::parse_message(&buf, MAX_SERVER_SETUP_MESSAGE).map_err(|e| failed(&e))?
            else {
                if db.read_buf(&mut buf).await.map_err(|e| failed(&e))? == 0 {
                    return Err(Login::Failed(
                        "the database closed the connection during login".into(),
                    ));
                }
                continue;
            };
            out.clear();
            let code = body
                .get(..4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]));
            let data = body.get(4..).unwrap_or_default();
            match (tag, code) {
                (b'E', _) => return Err(Login::Refused(buf.split_to(n).freeze())),
                (b'R', Some(0)) => {
                    authenticated = true;
                    greeting.extend_from_slice(buf.get(..n).unwrap_or_default());
                }
                (b'R', Some(3)) => {
                    frontend::password_message(password, &mut out).map_err(|e| failed(&e))?
                }
                (b'R', Some(5)) => {
                    let salt: [u8; 4] = data
                        .try_into()
                        .map_err(|_| Login::Failed("bad MD5 salt".into()))?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        self.role.name.as_bytes(),
                        password,
                        salt,
                    );
                    frontend::password_message(hash.as_bytes(), &mut out)
                        .map_err(|e| failed(&e))?;
                }
                (b'R', Some(10)) => {
                    let offered = data
                        .split(|&b| b == 0)
                        .any(|m| m == certs::scram::MECHANISM.as_bytes());
                    if !offered {
                        return Err(Login::Failed(
                            "the database offers no SASL mechanism we speak".into(),
                        ));
                    }
                    let s = ScramSha256::new(password, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(certs::scram::MECHANISM, s.message(), &mut out)
                        .map_err(|e| failed(&e))?;
                    scram = Some(s);
                }
                (b'R', Some(11)) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| Login::Failed("SASL continue out of order".into()))?;
                    s.update(data).map_err(|e| failed(&e))?;
                    frontend::sasl_response(s.message(), &mut out).map_err(|e| failed(&e))?;
                }
                (b'R', Some(12)) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| Login::Failed("SASL final out of order".into()))?;
                    s.finish(data).map_err(|e| failed(&e))?;
                }
                (b'R', _) => {
                    return Err(Login::Failed(
                        "the database asks for an authentication method we do not speak".into(),
                    ))
                }
                (b'K', _) if authenticated => {
                    key = body.get(..8).map(|k| CancelKey {
                        process_id: i32::from_be_bytes([k[0], k[1], k[2], k[3]]),
                        secret: i32::from_be_bytes([k[4], k[5], k[6], k[7]]),
                    });
                }
                (b'Z', _) if authenticated => {
                    greeting.extend_from_slice(buf.get(..n).unwrap_or_default());
                    let _ = buf.split_to(n);
                    // Nothing should follow ReadyForQuery before the client speaks; if it
                    // did, it belongs to the client too.
                    greeting.extend_from_slice(&buf);
                    return Ok(key);
                }
                (_, _) if authenticated => {
                    greeting.extend_from_slice(buf.get(..n).unwrap_or_default())
                }
                _ => {}
            }
            let _ = buf.split_to(n);
            if !out.is_empty() {
                db.write_all(&out).await.map_err(|e| failed(&e))?;
            }
        }
    }

    /// Raw relay both ways; the client's statements are audited on the way through.
    async fn pump<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        db: &mut S,
        send: &mut SendStream,
        recv: &mut RecvStream,
        (up, down, statements): (&mut u64, &mut u64, &mut u64),
        boundary: &mut ServerBoundary,
    ) -> End {
        let (mut db_r, mut db_w) = tokio::io::split(db);
        let mut client_quit = false;
        let mut gateway_reason: Option<CloseReason> = None;
        let gateway_reason_ref = &mut gateway_reason;
        let to_db = async {
            let gateway_reason = gateway_reason_ref;
            let mut scan = FrontendScan::new(pgwire::MAX_AUDITED_MESSAGE_LEN);
            let mut pending = BytesMut::new();
            loop {
                let chunk = match recv.read_chunk(usize::MAX, true).await {
                    Ok(Some(c)) => c.bytes,
                    Ok(None) => return Ok::<(), String>(()),
                    // The gateway's reset code says why it cut (it may learn of a retire first).
                    Err(quinn::ReadError::Reset(code)) => {
                        *gateway_reason = CloseReason::from_stream_code(code.into_inner());
                        return Err(format!("the gateway cut the session ({code})"));
                    }
                    Err(e) => return Err(e.to_string()),
                };
                *up += chunk.len() as u64;
                let mut seen = Vec::new();
                let forward: Bytes = if pending.is_empty() {
                    let n = scan.scan(&chunk, &mut seen).map_err(|e| e.to_string())?;
                    self.audit(&mut seen, statements, &mut client_quit)?;
                    pending.extend_from_slice(chunk.get(n..).unwrap_or_default());
                    chunk.slice(..n)
                } else {
                    pending.extend_from_slice(&chunk);
                    let n = scan.scan(&pending, &mut seen).map_err(|e| e.to_string())?;
                    self.audit(&mut seen, statements, &mut client_quit)?;
                    pending.split_to(n).freeze()
                };
                if !forward.is_empty() {
                    db_w.write_all(&forward).await.map_err(|e| e.to_string())?;
                }
            }
        };
        let to_client = async {
            let mut buf = BytesMut::with_capacity(READ_BUF);
            loop {
                if buf.capacity() < READ_BUF / 4 {
                    buf.reserve(READ_BUF);
                }
                let n = db_r.read_buf(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    let _ = send.finish();
                    return Ok::<(), String>(());
                }
                *down += n as u64;
                let chunk = buf.split().freeze();
                boundary.in_flight = true;
                send.write_chunk(chunk.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                boundary.advance(&chunk);
                boundary.in_flight = false;
            }
        };
        let r = tokio::try_join!(to_db, to_client);
        match r {
            Ok(_) => End::Client,
            Err(_) if client_quit => End::Client,
            Err(e) => match gateway_reason {
                Some(reason) if reason != CloseReason::Client => End::Cut(reason),
                _ => End::Error(e),
            },
        }
    }

    fn audit(
        &self,
        seen: &mut Vec<pgwire::Frontend<'_>>,
        statements: &mut u64,
        client_quit: &mut bool,
    ) -> Result<(), String> {
        for f in seen.drain(..) {
            match f.audit_detail_json() {
                Some(detail) => {
                    *statements += 1;
                    let o = self.open;
                    // Queued in order before the statement is forwarded; the session is
                    // cut the moment a batch fails (see `End::Trail`).
                    self.ctx
                        .audit
                        .queue_statement(
                            "sql.statement",
                            &o.operator,
                            &o.endpoint_id,
                            &o.session_id,
                            &detail,
                        )
                        .map_err(|e| e.to_string())?;
                }
                None => *client_quit = true,
            }
        }
        Ok(())
    }
}

enum Login {
    /// The server's ErrorResponse, whole.
    Refused(Bytes),
    Failed(String),
}

/// A session's connection, over TLS as `admin_url` asks (never over a Unix socket, as libpq).
async fn connect(server: &Server, tls: &DbTls) -> std::io::Result<Db> {
    Ok(match server {
        Server::Tcp(h, p) => {
            let tcp = tokio::net::TcpStream::connect((h.as_str(), *p)).await?;
            let _ = tcp.set_nodelay(true);
            tls.negotiate(tcp, h).await?
        }
        Server::Unix(path) => Db::Unix(tokio::net::UnixStream::connect(path).await?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// The relay may add its FATAL only between two whole server messages, however the
    /// server's bytes were split into chunks.
    #[test]
    fn boundary_is_known_across_any_chunking() {
        let mut stream = message(b'T', b"row description");
        stream.extend(message(b'D', &[7u8; 300]));
        stream.extend(message(b'Z', b"I"));
        let ends = [
            message(b'T', b"row description").len(),
            stream.len() - message(b'Z', b"I").len(),
            stream.len(),
        ];
        for split in 1..stream.len() {
            let mut b = ServerBoundary::default();
            let (head, tail) = stream.split_at(split);
            b.advance(head);
            assert_eq!(b.at_boundary(), ends.contains(&split), "split at {split}");
            b.advance(tail);
            assert!(b.at_boundary(), "split at {split}");
        }
        // Byte by byte: only ends of messages are boundaries.
        let mut b = ServerBoundary::default();
        for (i, byte) in stream.iter().enumerate() {
            b.advance(std::slice::from_ref(byte));
            assert_eq!(b.at_boundary(), ends.contains(&(i + 1)), "after byte {i}");
        }
        // A chunk still on its way to the tunnel is never a boundary.
        b.in_flight = true;
        assert!(!b.at_boundary());
    }
}
