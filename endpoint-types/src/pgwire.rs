//! The PostgreSQL v3 wire protocol, sans-IO: framing both ways, what the audit needs from
//! frontend messages, and the policy on startup parameters.
//!
//! Used by the gateway (front end: startup, SCRAM, audit of the client's messages) and by the
//! agent (audit in the customer's trail, startup towards the real server). Every parser takes
//! bytes as they came off the network and returns `Ok(None)` while a message is incomplete,
//! like `postgres_protocol::message::backend::Message::parse`; a declared length is checked
//! against the caller's limit *before* anything is buffered for it, so a peer cannot make us
//! hold more than the limit by announcing a huge message.

use bytes::{BufMut, BytesMut};
use std::{borrow::Cow, fmt};

/// `StartupMessage` protocol 3.0 (major 3 in the high 16 bits).
pub const PROTOCOL_V3: i32 = 3 << 16;
pub const SSL_REQUEST_CODE: i32 = 80877103;
pub const GSSENC_REQUEST_CODE: i32 = 80877104;
pub const CANCEL_REQUEST_CODE: i32 = 80877102;
/// PostgreSQL's own cap on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Cap on one SASL/password message during authentication.
pub const MAX_AUTH_MESSAGE_LEN: usize = 8 * 1024;
/// Default cap on one audited frontend message (Query, Parse, Bind): the whole message is
/// held to be audited, so this bounds memory per session. Other messages stream through.
pub const MAX_AUDITED_MESSAGE_LEN: usize = 16 * 1024 * 1024;
/// Startup parameter the gateway adds for the agent (never accepted from a client): the
/// cancel key the gateway minted for the session, `<process id>.<secret>`.
pub const CANCEL_KEY_PARAM: &str = "postern.cancel_key";
/// Startup parameter the gateway adds when its startup policy refused the client: the reason.
/// The agent then records the refusal in the customer's trail (applying its own policy to the
/// client's parameters, which come with it) and answers with a FATAL, never reaching the database.
pub const REFUSED_PARAM: &str = "postern.refused";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message of {len} bytes is over the {limit}-byte limit")]
    TooLarge { len: usize, limit: usize },
    #[error("invalid message length {0}")]
    BadLength(i32),
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("unsupported frontend protocol {major}.{minor}: this server supports 3.0")]
    Version { major: u16, minor: u16 },
}

/// The key a client sends in a `CancelRequest`. The secret never appears in `Debug`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub process_id: i32,
    pub secret: i32,
}

impl fmt::Debug for CancelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CancelKey {{ process_id: {}, secret: <redacted> }}",
            self.process_id
        )
    }
}

impl CancelKey {
    /// The form carried in [`CANCEL_KEY_PARAM`].
    pub fn to_param(&self) -> String {
        format!("{}.{}", self.process_id, self.secret)
    }

    pub fn from_param(s: &str) -> Option<CancelKey> {
        let (p, k) = s.split_once('.')?;
        Some(CancelKey {
            process_id: p.parse().ok()?,
            secret: k.parse().ok()?,
        })
    }
}

/// The first packet of a connection (no type byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel(CancelKey),
    /// `StartupMessage`: the requested minor version (answered with NegotiateProtocolVersion
    /// when above 0) and the parameters in the order sent.
    Params {
        minor: u16,
        params: Vec<(String, String)>,
    },
}

impl Startup {
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Startup::Params { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

fn be_i32(b: &[u8], at: usize) -> Option<i32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Length field as a byte count, checked against `min` and `limit` before buffering.
fn checked_len(raw: i32, min: usize, limit: usize) -> Result<usize, WireError> {
    let len = usize::try_from(raw).map_err(|_| WireError::BadLength(raw))?;
    if len < min {
        return Err(WireError::BadLength(raw));
    }
    if len > limit {
        return Err(WireError::TooLarge { len, limit });
    }
    Ok(len)
}

/// Splits a NUL-terminated string off the front of `b`.
fn cstr<'a>(b: &mut &'a [u8], what: &'static str) -> Result<&'a str, WireError> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or(WireError::Malformed(what))?;
    let (s, rest) = b.split_at(end);
    *b = rest.get(1..).unwrap_or_default();
    std::str::from_utf8(s).map_err(|_| WireError::Malformed(what))
}

fn take_i16(b: &mut &[u8], what: &'static str) -> Result<i16, WireError> {
    let s = b.get(..2).ok_or(WireError::Malformed(what))?;
    let v = i16::from_be_bytes([s[0], s[1]]);
    *b = b.get(2..).unwrap_or_default();
    Ok(v)
}

fn take_i32(b: &mut &[u8], what: &'static str) -> Result<i32, WireError> {
    let v = be_i32(b, 0).ok_or(WireError::Malformed(what))?;
    *b = b.get(4..).unwrap_or_default();
    Ok(v)
}

/// Parses the first packet of a connection. `Ok(Some((packet, consumed)))` once complete.
pub fn parse_startup(buf: &[u8]) -> Result<Option<(Startup, usize)>, WireError> {
    let Some(raw) = be_i32(buf, 0) else {
        return Ok(None);
    };
    let len = checked_len(raw, 8, MAX_STARTUP_LEN)?;
    let Some(packet) = buf.get(..len) else {
        return Ok(None);
    };
    let code = be_i32(packet, 4).ok_or(WireError::BadLength(raw))?;
    let fixed = |want: usize, what| {
        if len == want {
            Ok(())
        } else {
            Err(WireError::Malformed(what))
        }
    };
    let startup = match code {
        SSL_REQUEST_CODE => {
            fixed(8, "SSLRequest")?;
            Startup::Ssl
        }
        GSSENC_REQUEST_CODE => {
            fixed(8, "GSSENCRequest")?;
            Startup::GssEnc
        }
        CANCEL_REQUEST_CODE => {
            fixed(16, "CancelRequest")?;
            let process_id = be_i32(packet, 8).ok_or(WireError::Malformed("CancelRequest"))?;
            let secret = be_i32(packet, 12).ok_or(WireError::Malformed("CancelRequest"))?;
            Startup::Cancel(CancelKey { process_id, secret })
        }
        v => {
            let (major, minor) = ((v >> 16) as u16, (v & 0xffff) as u16);
            if major != 3 {
                return Err(WireError::Version { major, minor });
            }
            let mut rest = packet.get(8..).unwrap_or_default();
            let mut params = Vec::new();
            loop {
                let name = cstr(&mut rest, "StartupMessage")?;
                if name.is_empty() {
                    break;
                }
                let value = cstr(&mut rest, "StartupMessage")?;
                params.push((name.to_string(), value.to_string()));
            }
            if !rest.is_empty() {
                return Err(WireError::Malformed("StartupMessage"));
            }
            Startup::Params { minor, params }
        }
    };
    Ok(Some((startup, len)))
}

/// A complete typed message in a buffer: `(tag, body, bytes consumed)`.
pub type Message<'a> = (u8, &'a [u8], usize);

/// One typed message (1-byte tag, i32 length that counts itself).
pub fn parse_message(buf: &[u8], limit: usize) -> Result<Option<Message<'_>>, WireError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    let Some(raw) = be_i32(buf, 1) else {
        return Ok(None);
    };
    let len = checked_len(raw, 4, limit.saturating_add(4))?;
    let total = len + 1;
    match buf.get(5..total) {
        Some(body) => Ok(Some((tag, body, total))),
        None => Ok(None),
    }
}

/// The SASL messages a client sends during authentication (both tagged `p`).
pub fn parse_sasl_initial(body: &[u8]) -> Result<(&str, &[u8]), WireError> {
    let mut b = body;
    let mechanism = cstr(&mut b, "SASLInitialResponse")?;
    let n = take_i32(&mut b, "SASLInitialResponse")?;
    let data = if n < 0 {
        &[][..]
    } else {
        b.get(..n as usize)
            .ok_or(WireError::Malformed("SASLInitialResponse"))?
    };
    if n >= 0 && b.len() != n as usize {
        return Err(WireError::Malformed("SASLInitialResponse"));
    }
    Ok((mechanism, data))
}

/// What the audit records of one frontend message. Borrowed from the read buffer: nothing is
/// copied on the message path except the text that goes into the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend<'a> {
    /// Simple protocol `Q`.
    Query { text: Cow<'a, str> },
    /// Extended protocol `P`: statement name (empty = unnamed), SQL text, declared parameter types.
    Parse {
        statement: Cow<'a, str>,
        text: Cow<'a, str>,
        param_types: usize,
    },
    /// `B`: values are not recorded, only how many.
    Bind {
        portal: Cow<'a, str>,
        statement: Cow<'a, str>,
        params: usize,
    },
    /// `E`.
    Execute { portal: Cow<'a, str>, max_rows: i32 },
    /// `F`: a fastpath function call (libpq's `PQfn`, which its large-object functions use,
    /// and so psql's `\lo_import`/`\lo_export`). Audited like a statement: which function (by
    /// OID: `SELECT <oid>::regprocedure` names it) and how many arguments, never their values.
    FunctionCall { function_oid: u32, args: usize },
    /// `X`: the client says goodbye.
    Terminate,
}

/// Text in the client's encoding, which need not be UTF-8: recorded lossily rather than refused.
fn text<'a>(b: &mut &'a [u8], what: &'static str) -> Result<Cow<'a, str>, WireError> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or(WireError::Malformed(what))?;
    let (s, rest) = b.split_at(end);
    *b = rest.get(1..).unwrap_or_default();
    Ok(String::from_utf8_lossy(s))
}

/// The audit view of a complete message, `None` for messages the audit does not look into.
pub fn frontend_view(tag: u8, body: &[u8]) -> Result<Option<Frontend<'_>>, WireError> {
    let mut b = body;
    Ok(Some(match tag {
        b'Q' => Frontend::Query {
            text: text(&mut b, "Query")?,
        },
        b'P' => {
            let statement = text(&mut b, "Parse")?;
            let text = text(&mut b, "Parse")?;
            let n = take_i16(&mut b, "Parse")?;
            if n < 0 || b.len() != n as usize * 4 {
                return Err(WireError::Malformed("Parse"));
            }
            Frontend::Parse {
                statement,
                text,
                param_types: n as usize,
            }
        }
        b'B' => {
            let portal = text(&mut b, "Bind")?;
            let statement = text(&mut b, "Bind")?;
            let formats = take_i16(&mut b, "Bind")?;
            if formats < 0 {
                return Err(WireError::Malformed("Bind"));
            }
            b = b
                .get(formats as usize * 2..)
                .ok_or(WireError::Malformed("Bind"))?;
            let n = take_i16(&mut b, "Bind")?;
            if n < 0 {
                return Err(WireError::Malformed("Bind"));
            }
            // Walk the values only to check the message is well formed.
            for _ in 0..n {
                let len = take_i32(&mut b, "Bind")?;
                if len > 0 {
                    b = b.get(len as usize..).ok_or(WireError::Malformed("Bind"))?;
                } else if len < -1 {
                    return Err(WireError::Malformed("Bind"));
                }
            }
            Frontend::Bind {
                portal,
                statement,
                params: n as usize,
            }
        }
        b'E' => {
            let portal = text(&mut b, "Execute")?;
            let max_rows = take_i32(&mut b, "Execute")?;
            Frontend::Execute { portal, max_rows }
        }
        b'F' => {
            let function_oid = take_i32(&mut b, "FunctionCall")? as u32;
            let formats = take_i16(&mut b, "FunctionCall")?;
            if formats < 0 {
                return Err(WireError::Malformed("FunctionCall"));
            }
            b = b
                .get(formats as usize * 2..)
                .ok_or(WireError::Malformed("FunctionCall"))?;
            let n = take_i16(&mut b, "FunctionCall")?;
            if n < 0 {
                return Err(WireError::Malformed("FunctionCall"));
            }
            for _ in 0..n {
                let len = take_i32(&mut b, "FunctionCall")?;
                if len > 0 {
                    b = b
                        .get(len as usize..)
                        .ok_or(WireError::Malformed("FunctionCall"))?;
                } else if len < -1 {
                    return Err(WireError::Malformed("FunctionCall"));
                }
            }
            take_i16(&mut b, "FunctionCall")?;
            if !b.is_empty() {
                return Err(WireError::Malformed("FunctionCall"));
            }
            Frontend::FunctionCall {
                function_oid,
                args: n as usize,
            }
        }
        b'X' => Frontend::Terminate,
        _ => return Ok(None),
    }))
}

/// Longest SQL text kept in one audit record; longer text is cut and marked `truncated`.
pub const MAX_AUDITED_TEXT: usize = 64 * 1024;

fn capped(text: &str) -> (&str, bool) {
    if text.len() <= MAX_AUDITED_TEXT {
        return (text, false);
    }
    let mut end = MAX_AUDITED_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (text.get(..end).unwrap_or_default(), true)
}

/// The `detail` of a `sql.statement` record, the same in both trails, written straight to JSON
/// text with no `Value` tree on the message path. Fields are in the order a `Value` map
/// serialises them (sorted), so the text is what the trails store and re-read: its chain hash
/// verifies either way.
mod detail_json {
    use serde::Serialize;

    #[derive(Serialize)]
    pub(super) struct Query<'a> {
        pub message: &'static str,
        pub protocol: &'static str,
        pub text: &'a str,
        pub truncated: bool,
    }

    #[derive(Serialize)]
    pub(super) struct Parse<'a> {
        pub message: &'static str,
        pub param_types: usize,
        pub protocol: &'static str,
        pub statement: &'a str,
        pub text: &'a str,
        pub truncated: bool,
    }

    #[derive(Serialize)]
    pub(super) struct Bind<'a> {
        pub message: &'static str,
        pub params: usize,
        pub portal: &'a str,
        pub protocol: &'static str,
        pub statement: &'a str,
    }

    #[derive(Serialize)]
    pub(super) struct FunctionCall {
        pub args: usize,
        pub function_oid: u32,
        pub message: &'static str,
        pub protocol: &'static str,
    }

    #[derive(Serialize)]
    pub(super) struct Execute<'a> {
        pub max_rows: i32,
        pub message: &'static str,
        pub portal: &'a str,
        pub protocol: &'static str,
    }
}

impl Frontend<'_> {
    /// The statement's audit detail as JSON text. Text is carried as a JSON string (escaped as
    /// data); parameter values are never recorded, only counted. `None` for `Terminate`.
    pub fn audit_detail_json(&self) -> Option<Box<serde_json::value::RawValue>> {
        use detail_json::*;
        let text = match self {
            Frontend::Query { text } => {
                let (text, truncated) = capped(text);
                serde_json::to_string(&Query {
                    message: "query",
                    protocol: "simple",
                    text,
                    truncated,
                })
            }
            Frontend::Parse {
                statement,
                text,
                param_types,
            } => {
                let (text, truncated) = capped(text);
                serde_json::to_string(&Parse {
                    message: "parse",
                    param_types: *param_types,
                    protocol: "extended",
                    statement,
                    text,
                    truncated,
                })
            }
            Frontend::Bind {
                portal,
                statement,
                params,
            } => serde_json::to_string(&Bind {
                message: "bind",
                params: *params,
                portal,
                protocol: "extended",
                statement,
            }),
            Frontend::Execute { portal, max_rows } => serde_json::to_string(&Execute {
                max_rows: *max_rows,
                message: "execute",
                portal,
                protocol: "extended",
            }),
            Frontend::FunctionCall { function_oid, args } => serde_json::to_string(&FunctionCall {
                args: *args,
                function_oid: *function_oid,
                message: "function_call",
                protocol: "fastpath",
            }),
            Frontend::Terminate => return None,
        };
        text.ok()
            .and_then(|t| serde_json::value::RawValue::from_string(t).ok())
    }
}

/// Does the audit need the whole message of this tag?
fn audited(tag: u8) -> bool {
    matches!(tag, b'Q' | b'P' | b'B' | b'E' | b'F' | b'X')
}

/// Walks the client's byte stream after startup, message by message, across reads.
/// Messages the audit needs are handed out whole (borrowed from the buffer); all others,
/// COPY data included, pass through in whatever pieces they arrive, never buffered.
#[derive(Debug, Clone)]
pub struct FrontendScan {
    /// Bytes of a pass-through message not yet seen.
    skip: usize,
    limit: usize,
}

impl FrontendScan {
    pub fn new(limit: usize) -> FrontendScan {
        FrontendScan { skip: 0, limit }
    }

    /// Scans `buf` (the bytes received and not yet forwarded) and returns how many leading
    /// bytes may be forwarded now; audited messages wholly inside them are pushed to `out`.
    /// The rest of `buf` is an incomplete message: keep it and append the next read.
    pub fn scan<'a>(
        &mut self,
        buf: &'a [u8],
        out: &mut Vec<Frontend<'a>>,
    ) -> Result<usize, WireError> {
        let mut at = 0;
        loop {
            if self.skip > 0 {
                let take = self.skip.min(buf.len() - at);
                self.skip -= take;
                at += take;
                if self.skip > 0 {
                    return Ok(at);
                }
            }
            let rest = buf.get(at..).unwrap_or_default();
            let Some(&tag) = rest.first() else {
                return Ok(at);
            };
            if !audited(tag) {
                let Some(raw) = be_i32(rest, 1) else {
                    return Ok(at);
                };
                // Pass-through messages are bounded by the protocol's own 1 GB cap only;
                // they are never held, so the audit limit does not apply.
                let len = checked_len(raw, 4, i32::MAX as usize)?;
                self.skip = len + 1;
                continue;
            }
            match parse_message(rest, self.limit)? {
                None => return Ok(at),
                Some((tag, body, total)) => {
                    if let Some(v) = frontend_view(tag, body)? {
                        out.push(v);
                    }
                    at += total;
                }
            }
        }
    }
}

// ---- backend messages the gateway writes itself ----

fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    if let Some(slot) = out.get_mut(at..at + 4) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    // A NUL inside would end the field early; nothing we write contains one.
    out.put_slice(s.replace('\0', " ").as_bytes());
    out.put_u8(0);
}

pub fn auth_ok(out: &mut BytesMut) {
    message(out, b'R', |b| b.put_i32(0));
}

pub fn auth_sasl(out: &mut BytesMut, mechanisms: &[&str]) {
    message(out, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn auth_sasl_continue(out: &mut BytesMut, data: &[u8]) {
    message(out, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn auth_sasl_final(out: &mut BytesMut, data: &[u8]) {
    message(out, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

pub fn backend_key_data(out: &mut BytesMut, key: CancelKey) {
    message(out, b'K', |b| {
        b.put_i32(key.process_id);
        b.put_i32(key.secret);
    });
}

/// NegotiateProtocolVersion: we speak 3.0 and none of the `_pq_.` options asked for.
pub fn negotiate_protocol_version(out: &mut BytesMut, unrecognized: &[&str]) {
    message(out, b'v', |b| {
        b.put_i32(PROTOCOL_V3);
        b.put_i32(unrecognized.len() as i32);
        for o in unrecognized {
            put_cstr(b, o);
        }
    });
}

/// An `ErrorResponse` as PostgreSQL writes it (psql shows `FATAL:  message` + `HINT:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: &'static str,
    pub sqlstate: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

impl PgError {
    pub fn fatal(sqlstate: &'static str, message: impl Into<String>) -> PgError {
        PgError {
            severity: "FATAL",
            sqlstate,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> PgError {
        self.hint = Some(hint.into());
        self
    }

    pub fn write(&self, out: &mut BytesMut) {
        message(out, b'E', |b| {
            for (field, value) in [
                (b'S', self.severity),
                (b'V', self.severity),
                (b'C', self.sqlstate),
            ] {
                b.put_u8(field);
                put_cstr(b, value);
            }
            b.put_u8(b'M');
            put_cstr(b, &self.message);
            if let Some(h) = &self.hint {
                b.put_u8(b'H');
                put_cstr(b, h);
            }
            b.put_u8(0);
        });
    }
}

/// SQLSTATEs the gateway answers with.
pub mod sqlstate {
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
}

/// Fields of a backend `ErrorResponse` body (after the tag and length): `(sqlstate, message)`.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut msg) = (String::new(), String::new());
    let mut b = body;
    while let Some((&field, rest)) = b.split_first() {
        if field == 0 {
            break;
        }
        b = rest;
        let Ok(v) = cstr(&mut b, "ErrorResponse") else {
            break;
        };
        match field {
            b'C' => code = v.to_string(),
            b'M' => msg = v.to_string(),
            _ => {}
        }
    }
    (code, msg)
}

// ---- startup parameter policy: in its own module, re-exported for the callers ----

pub use crate::pg_startup::{sanitize, split_options, Sanitized};

/// A `StartupMessage` (3.0) with `params`, as the agent receives it from the gateway.
pub fn startup_message(out: &mut BytesMut, params: &[(String, String)]) {
    let at = out.len();
    out.put_i32(0);
    out.put_i32(PROTOCOL_V3);
    for (k, v) in params {
        put_cstr(out, k);
        put_cstr(out, v);
    }
    out.put_u8(0);
    let len = (out.len() - at) as i32;
    if let Some(slot) = out.get_mut(at..at + 4) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
}

/// A `CancelRequest` packet.
pub fn cancel_request(out: &mut BytesMut, key: CancelKey) {
    out.put_i32(16);
    out.put_i32(CANCEL_REQUEST_CODE);
    out.put_i32(key.process_id);
    out.put_i32(key.secret);
}

#[cfg(test)]
#[path = "pgwire_tests.rs"]
mod tests;
