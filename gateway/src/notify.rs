//! The approval webhook: a JSON POST to the customer's configured URL for each request that
//! waits for a person. Best effort, bounded in time, never blocks the request itself.

use crate::{ports::Notifier, store::Store};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tokio_util::task::TaskTracker;

const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// The real [`Notifier`]: posts to the webhook the customer configured, off the caller's path.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub store: Store,
    pub tasks: TaskTracker,
}

#[async_trait::async_trait]
impl Notifier for Webhook {
    async fn waiting(&self, customer: &str, kind: &str, id: &str) {
        let url = match self.store.webhook(customer).await {
            Ok(Some(url)) => url,
            Ok(None) => return,
            Err(e) => return tracing::warn!(error = %e, "cannot read the customer's webhook"),
        };
        let body = serde_json::json!({
            "event": "approval.waiting", "customer": customer, "kind": kind, "id": id,
            "hint": format!("postern approvals show {id}"),
        });
        let customer = customer.to_string();
        self.tasks.spawn(async move {
            match tokio::time::timeout(WEBHOOK_TIMEOUT, post(&url, body)).await {
                Ok(Ok(status)) => tracing::info!(%customer, status, "approval webhook delivered"),
                Ok(Err(e)) => tracing::warn!(%customer, error = %e, "approval webhook failed"),
                Err(_) => tracing::warn!(%customer, "approval webhook timed out"),
            }
        });
    }
}

/// Plain-HTTP POST (webhooks into the customer's network usually terminate at an internal
/// relay); `https://` is refused with a clear error until a root store is configured.
async fn post(url: &str, body: serde_json::Value) -> Result<u16, String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("bad webhook URL {url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("webhook URL {url:?}: only http:// is supported"));
    }
    let host = uri.host().ok_or("webhook URL has no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}
