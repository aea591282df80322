//! `pods/exec`, `pods/attach` (`v4.channel.k8s.io`) and `pods/portforward`
//! (`portforward.k8s.io`) over SPDY/3.1, as kubectl up to 1.29 speaks them and as kubelet
//! answers: one SPDY stream per channel, named by its `streamtype` header.
//!
//! Exec: the client opens `error`, then `stdin`/`stdout`/`stderr` (or `resize` with a tty) as
//! the request's query asked; the command runs once all have arrived, and the end is the v4
//! status document on `error` followed by FIN on every stream. Port-forward: per local
//! connection an `error` and a `data` stream carrying `port` and `requestid`; the test pod
//! echoes whatever reaches any port back on the `data` stream.

use super::exec::{self, Channels, Uploads, STDERR, STDOUT};
use super::spdy::{self, Event, Writer};
use std::{collections::HashMap, sync::Arc, time::Duration};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// How long the client has to open the streams its request announced (kubelet allows 30 s).
const STREAMS_WAIT: Duration = Duration::from_secs(10);
/// A session never outlives this, so a forgotten test client cannot pin a task forever.
const MAX_SESSION: Duration = Duration::from_secs(600);

/// Which streams an exec request announced in its query.
#[derive(Clone, Copy, Debug)]
pub struct Wanted {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

struct Session<S> {
    w: Arc<Writer<S>>,
    events: mpsc::Receiver<Event>,
    /// streamtype -> stream id
    streams: HashMap<String, u32>,
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Channels for Session<S> {
    async fn send(&mut self, channel: u8, data: &[u8]) -> bool {
        // With a tty kubectl opens no stderr stream: the terminal carries both.
        let name = match channel {
            STDERR if self.streams.contains_key("stderr") => "stderr",
            STDOUT | STDERR => "stdout",
            _ => return false,
        };
        match self.streams.get(name) {
            Some(&id) => self.w.data(id, data, false).await.is_ok(),
            None => true,
        }
    }

    async fn stdin(&mut self) -> Option<Vec<u8>> {
        let stdin = *self.streams.get("stdin")?;
        loop {
            match self.events.recv().await? {
                Event::Data { id, data, fin } if id == stdin => {
                    if !data.is_empty() {
                        return Some(data);
                    }
                    if fin {
                        return None;
                    }
                }
                Event::Reset { id } if id == stdin => return None,
                _ => continue,
            }
        }
    }
}

pub async fn serve_exec<S>(io: S, command: Vec<String>, uploads: Uploads, wanted: Wanted)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let Ok((w, mut events)) = spdy::start(io) else {
        return;
    };
    let mut need: Vec<&str> = vec!["error"];
    for (on, name) in [
        (wanted.stdin, "stdin"),
        (wanted.stdout, "stdout"),
        (wanted.stderr && !wanted.tty, "stderr"),
        (wanted.tty, "resize"),
    ] {
        if on {
            need.push(name);
        }
    }
    let mut streams = HashMap::new();
    let arrived = tokio::time::timeout(STREAMS_WAIT, async {
        while need.iter().any(|n| !streams.contains_key(*n)) {
            match events.recv().await {
                Some(Event::Open { id, headers }) => {
                    if let Some(t) = Event::header(&headers, "streamtype") {
                        streams.insert(t.to_string(), id);
                    }
                }
                Some(_) => {}
                None => return false,
            }
        }
        true
    })
    .await;
    if !matches!(arrived, Ok(true)) {
        return;
    }
    let mut s = Session {
        w: w.clone(),
        events,
        streams,
    };
    let Ok(Some(code)) =
        tokio::time::timeout(MAX_SESSION, exec::run(&mut s, &command, &uploads)).await
    else {
        return;
    };
    let status = exec::exit_status(code, &command);
    for name in ["stdout", "stderr"] {
        if let Some(&id) = s.streams.get(name) {
            let _ = w.data(id, &[], true).await;
        }
    }
    if let Some(&id) = s.streams.get("error") {
        let _ = w.data(id, status.as_bytes(), true).await;
    }
    // The client closes the connection once it has read the status; wait for that (bounded).
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while s.events.recv().await.is_some() {}
    })
    .await;
    let _ = w.goaway().await;
}

/// Ports the client opened, in order (so tests can check what reached the pod).
pub type Forwards = Arc<std::sync::Mutex<Vec<u16>>>;

pub async fn serve_portforward<S>(io: S, forwards: Forwards)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let Ok((w, mut events)) = spdy::start(io) else {
        return;
    };
    // requestid -> error stream, and data stream id -> its error stream
    let mut errors: HashMap<String, u32> = HashMap::new();
    let mut data_of: HashMap<u32, Option<u32>> = HashMap::new();
    let _ = tokio::time::timeout(MAX_SESSION, async {
        while let Some(ev) = events.recv().await {
            match ev {
                Event::Open { id, headers } => {
                    let request = Event::header(&headers, "requestid")
                        .unwrap_or_default()
                        .to_string();
                    match Event::header(&headers, "streamtype") {
                        Some("error") => {
                            errors.insert(request, id);
                        }
                        Some("data") => {
                            if let Some(port) =
                                Event::header(&headers, "port").and_then(|p| p.parse().ok())
                            {
                                if let Ok(mut f) = forwards.lock() {
                                    f.push(port);
                                }
                            }
                            data_of.insert(id, errors.get(&request).copied());
                        }
                        _ => {}
                    }
                }
                Event::Data { id, data, fin } => {
                    let Some(err_stream) = data_of.get(&id).copied() else {
                        continue;
                    };
                    if !data.is_empty() && w.data(id, &data, false).await.is_err() {
                        return;
                    }
                    if fin {
                        // The local connection closed: close ours, and the error stream
                        // (empty: no error), which kubectl reads to its end.
                        let _ = w.data(id, &[], true).await;
                        if let Some(e) = err_stream {
                            let _ = w.data(e, &[], true).await;
                        }
                    }
                }
                Event::Reset { .. } => {}
            }
        }
    })
    .await;
}

/// Every value of a header that may repeat (kubectl sends one `X-Stream-Protocol-Version` per
/// protocol it speaks).
fn offered(h: &hyper::HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .collect()
}

/// Whether the request is an `Upgrade: SPDY/3.1` offering `protocol`.
pub fn wants_spdy(h: &hyper::HeaderMap, protocol: &str) -> bool {
    let spdy = h
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("SPDY/3.1"));
    spdy && offered(h, "x-stream-protocol-version")
        .iter()
        .any(|p| p == protocol)
}

/// `101 Switching Protocols` to SPDY/3.1 with the chosen stream protocol.
pub fn spdy_response(protocol: &'static str) -> hyper::Response<super::Body> {
    use hyper::header::{HeaderValue, CONNECTION, UPGRADE};
    let mut resp = hyper::Response::new(http_body_util::BodyExt::boxed(http_body_util::Full::new(
        bytes::Bytes::new(),
    )));
    *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let hs = resp.headers_mut();
    hs.insert(UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    hs.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    hs.insert(
        "x-stream-protocol-version",
        HeaderValue::from_static(protocol),
    );
    resp
}

/// Port-forward tunnelled in WebSocket (kubectl 1.30+: subprotocol
/// `SPDY/3.1+portforward.k8s.io`): the same SPDY bytes, carried in binary messages.
pub async fn serve_tunnelled_portforward(upgraded: hyper::upgrade::Upgraded, forwards: Forwards) {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::{
        tungstenite::{protocol::Role, Message},
        WebSocketStream,
    };
    let ws = WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        Role::Server,
        None,
    )
    .await;
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    tokio::spawn(serve_portforward(theirs, forwards));
    let (mut from_spdy, mut to_spdy) = tokio::io::split(ours);
    let (mut sink, mut stream) = ws.split();
    let mut buf = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(MAX_SESSION, async {
        loop {
            tokio::select! {
                m = stream.next() => match m {
                    Some(Ok(Message::Binary(b))) => {
                        if to_spdy.write_all(&b).await.is_err() { return; }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => {}
                },
                n = from_spdy.read(&mut buf) => match n {
                    Ok(0) | Err(_) => { let _ = sink.close().await; return; }
                    Ok(n) => {
                        let msg = Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]));
                        if sink.send(msg).await.is_err() { return; }
                    }
                },
            }
        }
    })
    .await;
}
