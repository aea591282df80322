//! `pods/exec` over WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`), the way kubectl
//! 1.30+ speaks it: binary messages whose first byte is the channel (0 stdin, 1 stdout,
//! 2 stderr, 3 error/status, 4 resize, 255 close-a-channel in v5). Commands are a tiny
//! built-in set so tests are deterministic: `echo …`, `cat`, `sh -c SCRIPT` and an
//! interactive `sh` that reads lines (`echo …`, `exit N`).

use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::{
    tungstenite::{
        protocol::{frame::coding::CloseCode, CloseFrame, Role},
        Message,
    },
    WebSocketStream,
};

pub const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];
const STDIN: u8 = 0;
pub(super) const STDOUT: u8 = 1;
pub(super) const STDERR: u8 = 2;
const ERROR: u8 = 3;
const CLOSE: u8 = 255;
/// A session never outlives this, so a forgotten test client cannot pin a task forever.
const MAX_SESSION: Duration = Duration::from_secs(600);

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.trim().as_bytes());
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// The first protocol the client offers that we speak.
pub fn choose_protocol(offered: &str) -> Option<&'static str> {
    offered
        .split(',')
        .map(str::trim)
        .find_map(|p| PROTOCOLS.iter().copied().find(|k| *k == p))
}

type Ws = WebSocketStream<TokioIo<Upgraded>>;

struct Session {
    ws: Ws,
}

/// The channels a command runs on, whichever protocol carries them (WebSocket here, SPDY
/// streams in `spdy_exec`).
pub(super) trait Channels {
    /// Output on `STDOUT` or `STDERR`; false once the client is gone.
    async fn send(&mut self, channel: u8, data: &[u8]) -> bool;
    /// Next stdin chunk; `None` once stdin is closed or the client is gone.
    async fn stdin(&mut self) -> Option<Vec<u8>>;
}

impl Channels for Session {
    async fn send(&mut self, channel: u8, data: &[u8]) -> bool {
        let mut msg = Vec::with_capacity(data.len() + 1);
        msg.push(channel);
        msg.extend_from_slice(data);
        self.ws
            .send(Message::Binary(Bytes::from(msg)))
            .await
            .is_ok()
    }

    async fn stdin(&mut self) -> Option<Vec<u8>> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Binary(b)) => match b.split_first() {
                    Some((&STDIN, data)) => return Some(data.to_vec()),
                    Some((&CLOSE, [STDIN])) => return None,
                    _ => continue,
                },
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }
}

/// What `tar -x…` received on stdin (so tests can check `kubectl cp` carried the file).
pub type Uploads = std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// Runs one exec session on an upgraded connection.
pub async fn serve(upgraded: Upgraded, command: Vec<String>, uploads: Uploads) {
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    let mut s = Session { ws };
    // kubectl registers its stream handlers just after the upgrade; output arriving in the
    // same instant is discarded ("Unknown stream id"). A real container takes far longer than
    // this to start a process.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let code = match tokio::time::timeout(MAX_SESSION, run(&mut s, &command, &uploads)).await {
        Ok(Some(code)) => code,
        _ => return,
    };
    if s.send(ERROR, exit_status(code, &command).as_bytes()).await {
        // Gorilla (kubectl) reads a close without a status code as an error, not as EOF.
        let _ =
            s.ws.close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
    }
}

/// The v4 status document the error channel carries when the command ends.
pub(super) fn exit_status(code: i32, command: &[String]) -> String {
    let status = if code == 0 {
        json!({"metadata": {}, "status": "Success"})
    } else {
        json!({
            "metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        })
    };
    status.to_string()
}

/// Runs the command; `None` when the client went away.
pub(super) async fn run(
    s: &mut impl Channels,
    command: &[String],
    uploads: &Uploads,
) -> Option<i32> {
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    match args.as_slice() {
        // `kubectl cp` probes the destination first; "not a directory" is a fine answer.
        ["test", ..] => Some(1),
        ["tar", flags @ ..] if flags.iter().any(|f| f.starts_with('-') && f.contains('x')) => {
            let mut data = Vec::new();
            while let Some(chunk) = s.stdin().await {
                data.extend_from_slice(&chunk);
            }
            if let Ok(mut u) = uploads.lock() {
                u.push(data);
            }
            Some(0)
        }
        ["echo", rest @ ..] => {
            let line = format!("{}\n", rest.join(" "));
            s.send(STDOUT, line.as_bytes()).await.then_some(0)
        }
        ["cat"] => {
            while let Some(data) = s.stdin().await {
                if !s.send(STDOUT, &data).await {
                    return None;
                }
            }
            Some(0)
        }
        ["sh", "-c", script] => {
            let mut code = 0;
            for line in script.split([';', '\n']) {
                match interpret(s, line.trim()).await? {
                    Step::Exit(c) => return Some(c),
                    Step::Continue(c) => code = c,
                }
            }
            Some(code)
        }
        ["sh"] | ["/bin/sh"] => {
            let mut pending = Vec::new();
            while let Some(data) = s.stdin().await {
                pending.extend_from_slice(&data);
                while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=pos).collect();
                    let line = String::from_utf8_lossy(&line).trim().to_string();
                    if let Step::Exit(c) = interpret(s, &line).await? {
                        return Some(c);
                    }
                }
            }
            Some(0)
        }
        _ => {
            let msg = format!(
                "exec: {:?}: executable file not found in $PATH\n",
                command.first().map(String::as_str).unwrap_or("")
            );
            s.send(STDERR, msg.as_bytes()).await.then_some(127)
        }
    }
}

enum Step {
    Continue(i32),
    Exit(i32),
}

async fn interpret(s: &mut impl Channels, line: &str) -> Option<Step> {
    let mut words = line.split_whitespace();
    match words.next() {
        None => Some(Step::Continue(0)),
        Some("exit") => Some(Step::Exit(
            words.next().and_then(|c| c.parse().ok()).unwrap_or(0),
        )),
        Some("echo") => {
            let out = format!("{}\n", words.collect::<Vec<_>>().join(" "));
            s.send(STDOUT, out.as_bytes())
                .await
                .then_some(Step::Continue(0))
        }
        Some(cmd) => s
            .send(STDERR, format!("sh: {cmd}: not found\n").as_bytes())
            .await
            .then_some(Step::Continue(127)),
    }
}
