//! A small HTTP/1.1 server for `/metrics` (OpenMetrics text from a `prometheus-client`
//! registry), `/healthz` (the process answers) and `/readyz` (the [`Probe`] says it can do its
//! work). It binds nothing: the caller binds the listener, so it can report the address and
//! fail at start-up on a bad one.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Request, Response, StatusCode};
use prometheus_client::{encoding::text::encode, registry::Registry};
use std::{future::Future, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// Scrapers and probes are few; more connections than this wait to be accepted.
const MAX_CONNECTIONS: usize = 64;
/// A client that sends no complete request head in this long is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// What a binary tells the server at scrape and probe time.
pub trait Probe: Send + Sync + 'static {
    /// Brings the gauges that are read rather than counted up to date, just before
    /// `/metrics` is encoded.
    fn refresh(&self) -> impl Future<Output = ()> + Send;
    /// `Ok` when the process can do its work; otherwise why not (`/readyz` answers 503).
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send;
}

struct Served<P> {
    registry: Registry,
    probe: P,
    /// One scrape or probe at a time: each refreshes the gauges it then encodes.
    one_at_a_time: tokio::sync::Mutex<()>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`; any other
/// path is 404.
pub async fn serve<P: Probe>(
    listener: tokio::net::TcpListener,
    registry: Registry,
    probe: P,
    shutdown: CancellationToken,
) {
    let served = Arc::new(Served {
        registry,
        probe,
        one_at_a_time: tokio::sync::Mutex::new(()),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => return,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let tcp = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let served = served.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let served = served.clone();
            async move { Ok::<_, std::convert::Infallible>(answer(&served, req.uri().path()).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                () = stop.cancelled() => {}
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "metrics connection ended");
                },
            }
        });
    }
}

async fn answer<P: Probe>(served: &Served<P>, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => {
            let _one = served.one_at_a_time.lock().await;
            served.probe.refresh().await;
            let mut body = String::new();
            match encode(&mut body, &served.registry) {
                Ok(()) => respond(StatusCode::OK, OPENMETRICS, body),
                Err(_) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    "cannot encode the metrics\n".into(),
                ),
            }
        }
        "/healthz" => respond(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => {
            let _one = served.one_at_a_time.lock().await;
            match served.probe.ready().await {
                Ok(()) => respond(StatusCode::OK, TEXT, "ready\n".into()),
                Err(why) => respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready: {why}\n"),
                ),
            }
        }
        _ => respond(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Switch {
        ready: AtomicBool,
        refreshed: AtomicU64,
    }

    impl Probe for Arc<Switch> {
        async fn refresh(&self) {
            self.refreshed.fetch_add(1, Ordering::Relaxed);
        }
        async fn ready(&self) -> Result<(), String> {
            if self.ready.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("switched off".into())
            }
        }
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, body.to_string())
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness_from_the_probe() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut registry = Registry::with_prefix("t");
        let hits: Counter = Counter::default();
        registry.register("hits", "Hits", hits.clone());
        hits.inc_by(3);
        let switch = Arc::new(Switch {
            ready: AtomicBool::new(false),
            refreshed: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, registry, switch.clone(), stop.clone()));

        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("t_hits_total 3"), "{body}");
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
        assert_eq!(switch.refreshed.load(Ordering::Relaxed), 1);
        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (503, "not ready: switched off\n"));
        switch.ready.store(true, Ordering::Relaxed);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        assert_eq!(get(addr, "/metricsx").await.0, 404);

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
