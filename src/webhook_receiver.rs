//! A webhook receiver for the tests: HTTPS on 127.0.0.1 (port 0) with a certificate from its
//! own test CA (for `--receiver-ca-file`), answering 503 to the first N deliveries and 204
//! after, and handing every request it got (headers and exact body) to the test.

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    time::Duration,
};
use tokio_util::sync::CancellationToken;

/// One request as the receiver got it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub host: String,
    pub signature: Option<String>,
    pub delivery: Option<String>,
    pub body: Vec<u8>,
    /// What the receiver answered.
    pub status: u16,
}

pub struct WebhookReceiver {
    pub addr: SocketAddr,
    /// The CA the receiver's certificate (SANs localhost, 127.0.0.1) chains to.
    pub ca_pem: String,
    rx: Mutex<mpsc::Receiver<Received>>,
    connections: Arc<AtomicUsize>,
    /// How many more requests get 503.
    failures_left: Arc<AtomicUsize>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WebhookReceiver {
    /// Starts; the first `fail_first` requests get 503.
    pub fn start(fail_first: usize) -> Result<WebhookReceiver> {
        let now = jiff::Timestamp::now();
        let ca = certs::Ca::generate("test webhook receiver", now)?;
        let issued = ca.issue_server(
            &["localhost".into(), "127.0.0.1".into()],
            now,
            Duration::from_secs(86400),
        )?;
        let tls = certs::server_config(
            &issued.cert_pem,
            &issued.key_pem,
            None,
            certs::ClientAuth::None,
            vec![b"http/1.1".to_vec()],
        )?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel();
        let stop = CancellationToken::new();
        let connections = Arc::new(AtomicUsize::new(0));
        let failures_left = Arc::new(AtomicUsize::new(fail_first));
        let served = failures_left.clone();
        let (stop2, conns2) = (stop.clone(), connections.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let thread = std::thread::Builder::new()
            .name("webhook-receiver".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return eprintln!("webhook receiver: no runtime: {e}"),
                };
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    loop {
                        let (tcp, _) = tokio::select! {
                            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                            _ = stop2.cancelled() => return,
                        };
                        conns2.fetch_add(1, Ordering::SeqCst);
                        let (acceptor, tx, served) = (acceptor.clone(), tx.clone(), served.clone());
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let svc = hyper::service::service_fn(move |req| {
                                handle(req, served.clone(), tx.clone())
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), svc)
                                .await;
                        });
                    }
                });
            })?;
        Ok(WebhookReceiver {
            addr,
            ca_pem: ca.cert_pem().to_string(),
            rx: Mutex::new(rx),
            connections,
            failures_left,
            stop,
            thread: Some(thread),
        })
    }

    /// The next request received within `limit`.
    pub fn recv(&self, limit: Duration) -> Option<Received> {
        self.rx.lock().ok()?.recv_timeout(limit).ok()
    }

    /// From now on the next `n` requests get 503.
    pub fn fail_next(&self, n: usize) {
        self.failures_left.store(n, Ordering::SeqCst);
    }

    /// TCP connections accepted so far (a refused target must never get one).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
    failures_left: Arc<AtomicUsize>,
    tx: mpsc::Sender<Received>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let (host, signature, delivery) = (
        header("host").unwrap_or_default(),
        header("postern-signature"),
        header("postern-delivery"),
    );
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let failing = failures_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if failing { 503 } else { 204 };
    let _ = tx.send(Received {
        method,
        path,
        host,
        signature,
        delivery,
        body,
        status,
    });
    let mut resp = hyper::Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    Ok(resp)
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
