//! One delivery attempt on the wire: resolve the name once, judge every address it gave,
//! connect to an address that passed (never to the name again, so a second DNS answer cannot
//! swap in another), TLS with the name as SNI and for the certificate check, one HTTP/1.1
//! POST. Redirects are not followed. Bounded in time as a whole.

use super::{
    address::refused,
    schedule::Outcome,
    target::{Host, Target},
};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, OnceLock},
    time::Duration,
};

/// One attempt, from resolution to the response's status line.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Addresses of one name tried in turn before the attempt fails.
const MAX_ADDRESSES_TRIED: usize = 4;

/// What goes out: the body and the headers beside Host, Content-Type and User-Agent.
#[derive(Debug)]
pub struct Post<'a> {
    pub target: &'a Target,
    pub allow_private: bool,
    pub tls: Arc<rustls::ClientConfig>,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

pub async fn attempt(post: Post<'_>) -> Outcome {
    match tokio::time::timeout(ATTEMPT_TIMEOUT, send(post)).await {
        Ok(Ok(status)) => Outcome::Answered(status),
        Ok(Err(e)) => Outcome::NoAnswer(e),
        Err(_) => Outcome::NoAnswer(format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs())),
    }
}

/// The addresses the target may be reached at now, or why none.
async fn checked_addresses(target: &Target, allow_private: bool) -> Result<Vec<IpAddr>, String> {
    let (shown, resolved): (String, Vec<IpAddr>) = match &target.host {
        Host::Ip(ip) => (ip.to_string(), vec![*ip]),
        Host::Name(name) => {
            let found = tokio::net::lookup_host((name.as_str(), target.port))
                .await
                .map_err(|e| format!("cannot resolve {name}: {e}"))?;
            (name.clone(), found.map(|a| a.ip()).collect())
        }
    };
    let mut allowed = Vec::new();
    let mut refusals = Vec::new();
    for ip in resolved {
        match refused(ip, allow_private) {
            None if !allowed.contains(&ip) => allowed.push(ip),
            None => {}
            Some(class) => refusals.push(format!("{ip} ({})", class.as_str())),
        }
    }
    if allowed.is_empty() {
        let hint = if refusals.is_empty() {
            String::new()
        } else {
            "; a receiver inside your own network needs the webhook set with --allow-private"
                .to_string()
        };
        return Err(format!(
            "refused target: {shown} resolves to no address a webhook may reach [{}]{hint}",
            refusals.join(", ")
        ));
    }
    Ok(allowed)
}

async fn send(post: Post<'_>) -> Result<u16, String> {
    let target = post.target;
    let addresses = checked_addresses(target, post.allow_private).await?;
    let mut last = String::new();
    let mut tcp = None;
    for ip in addresses.into_iter().take(MAX_ADDRESSES_TRIED) {
        let addr = SocketAddr::new(ip, target.port);
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last = format!("cannot connect to {addr}: {e}"),
            Err(_) => last = format!("cannot connect to {addr}: timed out"),
        }
    }
    let tcp = tcp.ok_or(last)?;
    let server_name = match &target.host {
        Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
        Host::Name(n) => ServerName::try_from(n.clone()).map_err(|e| e.to_string())?,
    };
    let tls = tokio_rustls::TlsConnector::from(post.tls)
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("TLS with {}: {e}", target.authority))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    let mut req = hyper::Request::post(target.path_and_query.as_str())
        .header(hyper::header::HOST, target.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("postern-webhook/", env!("CARGO_PKG_VERSION")),
        );
    for (name, value) in &post.headers {
        req = req.header(*name, value.as_str());
    }
    let req = req.body(Full::new(post.body)).map_err(|e| e.to_string())?;
    // The connection is driven here, not spawned: it ends with this attempt.
    let exchange = async move {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("POST {}: {e}", target.authority))?;
        Ok::<u16, String>(resp.status().as_u16())
    };
    tokio::pin!(conn);
    tokio::pin!(exchange);
    tokio::select! {
        r = &mut exchange => r,
        c = &mut conn => match c {
            Err(e) => Err(format!("POST {}: {e}", target.authority)),
            Ok(()) => exchange.await,
        },
    }
}

/// TLS client settings for a webhook: its own CA bundle, or the system roots.
pub fn tls_config(ca_pem: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut config = match ca_pem {
        Some(pem) => {
            certs::upstream_client_config(certs::ServerCheck::ChainAndName { ca_pem: pem })
                .map_err(|e| format!("the webhook's CA file: {e}"))?
        }
        None => rustls::ClientConfig::builder_with_provider(certs::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(system_roots().clone())
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The host's CA bundle (`certs::system_roots`); where none is found, the Mozilla roots
/// compiled in (webpki-roots), so a minimal container still works. A process-wide static on
/// purpose (the house rule's one kind of exception): the host's trust store is a fact of the
/// host, the same for every gateway a process runs, and parsing it costs; it is read once per
/// process and holds no state of any gateway.
fn system_roots() -> &'static Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        if let Some((store, file)) = certs::system_roots() {
            tracing::info!(file = %file.display(), roots = store.len(), "webhook TLS roots");
            return Arc::new(store);
        }
        let mut store = rustls::RootCertStore::empty();
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        tracing::info!("webhook TLS roots: the compiled-in Mozilla roots (no system bundle found)");
        Arc::new(store)
    })
}
