//! The cluster's real API server, reached with credentials the appliance holds: a kubeconfig
//! (path in `agent.toml`) or, when none is named, the pod's in-cluster service account.
//! Connections are TLS and kept alive. Ordinary requests use HTTP/2 when the API server offers
//! it by ALPN (real ones do), multiplexed over one connection; upgrades (exec, attach,
//! port-forward) always go over a separate HTTP/1.1 connection, as kubectl's own do, since
//! neither WebSocket nor SPDY upgrades exist in HTTP/2.
//!
//! Both are loaded with the `kube` crate's config module (`Kubeconfig::read_from`,
//! `Config::from_custom_kubeconfig`, `Config::incluster`), so contexts, merged documents,
//! relative paths and `*-data` fields behave as in every other Kubernetes client. Only its
//! `config` feature is used: the connection must be our own to pass upgrades through, and the
//! TLS config is built by `certs` so the workspace keeps a single rustls provider (ring).

use super::exec_credential::{Credential, ExecError, ExecPlugin};
use bytes::Bytes;
use endpoint_types::secret::Secret;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    header::{HeaderValue, HOST},
    Request, Response, Uri,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kube::config::{Config, KubeConfigOptions, Kubeconfig};
use rustls_pki_types::ServerName;
use secrecy::ExposeSecret;
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const POOL_MAX: usize = 16;
/// Projected service-account tokens rotate; re-read the file this often.
const TOKEN_FILE_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kubeconfig {}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("in-cluster config: {0}")]
    InCluster(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("cannot connect to the API server {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("the API server did not answer: {0}")]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Exec(#[from] ExecError),
}

enum Auth {
    None,
    Token(Secret),
    TokenFile {
        path: PathBuf,
        cached: Mutex<Option<(Instant, Secret)>>,
    },
    /// A token and/or client certificate from an exec credential plugin.
    Exec(ExecPlugin),
}

/// One API server and a pool of kept-alive connections to it.
pub struct Upstream {
    /// `host:port` to dial.
    addr: String,
    /// `Host` header value.
    authority: HeaderValue,
    server_name: ServerName<'static>,
    /// ALPN `h2`, `http/1.1`: for ordinary requests.
    tls: tokio_rustls::TlsConnector,
    /// ALPN `http/1.1` only: for upgrades.
    tls_h1: tokio_rustls::TlsConnector,
    auth: Auth,
    /// For a client certificate an exec plugin returns: the CA to build connectors with, and
    /// the connectors (ALPN h2+http/1.1, http/1.1) for the credential they were built from.
    ca_pem: String,
    exec_tls: Mutex<Option<ExecTls>>,
    pool: Mutex<Pool>,
    /// Held while dialling for an ordinary request, so a burst of them (kubectl's parallel
    /// discovery) shares one new HTTP/2 connection instead of each opening its own.
    dialling: tokio::sync::Mutex<()>,
}

struct ExecTls {
    credential: Arc<Credential>,
    tls: tokio_rustls::TlsConnector,
    tls_h1: tokio_rustls::TlsConnector,
}

#[derive(Default)]
struct Pool {
    /// The shared HTTP/2 connection, when the server chose h2.
    h2: Option<http2::SendRequest<Full<Bytes>>>,
    /// Idle HTTP/1.1 connections.
    h1: Vec<http1::SendRequest<Full<Bytes>>>,
}

enum Conn {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn b64(s: &str) -> Option<String> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
}

fn read(path: &Path) -> Result<String, UpstreamError> {
    std::fs::read_to_string(path).map_err(|source| UpstreamError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// PEM for the DER certificates kube hands back, the form `certs::client_config` takes.
fn pem_certs(ders: &[Vec<u8>]) -> String {
    use base64::Engine;
    let mut out = String::new();
    for der in ders {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b = base64::engine::general_purpose::STANDARD.encode(der);
        for line in b.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

impl Upstream {
    /// From a kubeconfig file (its current context), or the in-cluster service account.
    pub async fn load(kubeconfig: Option<&Path>) -> Result<Upstream, UpstreamError> {
        match kubeconfig {
            Some(p) => Self::from_kubeconfig(p).await,
            None => Self::in_cluster(),
        }
    }

    async fn from_kubeconfig(path: &Path) -> Result<Upstream, UpstreamError> {
        let err = |message: String| UpstreamError::Config {
            path: path.to_path_buf(),
            message,
        };
        if !path.exists() {
            return Err(UpstreamError::Read {
                path: path.to_path_buf(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let kc = Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
        let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| err(e.to_string()))?;
        if cfg.accept_invalid_certs {
            return Err(err(
                "insecure-skip-tls-verify is not accepted: name the cluster's CA".into(),
            ));
        }
        let u = &cfg.auth_info;
        // Deprecated in-tree auth providers would need their own code per cloud; their
        // replacements are exec plugins.
        if u.auth_provider.is_some() {
            return Err(err("auth-provider users are not supported: use the cloud's exec plugin (e.g. gke-gcloud-auth-plugin, kubelogin), a token or a client certificate".into()));
        }
        let ca_pem = match &cfg.root_cert {
            Some(ders) if !ders.is_empty() => pem_certs(ders),
            _ => return Err(err("the cluster names no certificate-authority".into())),
        };
        let auth = match (&u.token, &u.token_file) {
            // The plugin and its arguments come from this file only; it runs when a request
            // first needs the credential (exec_credential.rs).
            (None, None) if u.exec.is_some() => match &u.exec {
                Some(exec) => Auth::Exec(ExecPlugin::new(exec).map_err(|e| err(e.to_string()))?),
                None => Auth::None,
            },
            (Some(t), _) => Auth::Token(Secret::new(t.expose_secret().to_string())),
            (None, Some(f)) => Auth::TokenFile {
                path: PathBuf::from(f),
                cached: Mutex::new(None),
            },
            _ => Auth::None,
        };
        // kube keeps the client identity crate-private; read it from the same fields.
        let cert = match (&u.client_certificate_data, &u.client_certificate) {
            (Some(d), _) => Some(
                b64(d).ok_or_else(|| err("client-certificate-data is not base64 PEM".into()))?,
            ),
            (None, Some(p)) => Some(read(Path::new(p))?),
            _ => None,
        };
        let key = match (&u.client_key_data, &u.client_key) {
            (Some(d), _) => {
                Some(Secret::new(b64(d.expose_secret()).ok_or_else(|| {
                    err("client-key-data is not base64 PEM".into())
                })?))
            }
            (None, Some(p)) => Some(Secret::new(read(Path::new(p))?)),
            _ => None,
        };
        let client = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(err(
                    "a client certificate needs both certificate and key".into()
                ))
            }
        };
        Self::build(
            &cfg.cluster_url.to_string(),
            cfg.tls_server_name.as_deref(),
            &ca_pem,
            client,
            auth,
        )
        .map_err(|e| match e {
            UpstreamError::Tls(m) => err(m),
            e => e,
        })
    }

    fn in_cluster() -> Result<Upstream, UpstreamError> {
        let cfg = Config::incluster().map_err(|e| {
            UpstreamError::InCluster(format!(
                "{e} (not in a pod?); set `kubeconfig` in agent.toml"
            ))
        })?;
        let ca = pem_certs(cfg.root_cert.as_deref().unwrap_or_default());
        let auth = match cfg.auth_info.token_file {
            Some(f) => Auth::TokenFile {
                path: PathBuf::from(f),
                cached: Mutex::new(None),
            },
            None => {
                return Err(UpstreamError::InCluster(
                    "no service-account token file".into(),
                ))
            }
        };
        Self::build(
            &cfg.cluster_url.to_string(),
            cfg.tls_server_name.as_deref(),
            &ca,
            None,
            auth,
        )
    }

    fn build(
        server: &str,
        tls_server_name: Option<&str>,
        ca_pem: &str,
        client: Option<(String, Secret)>,
        auth: Auth,
    ) -> Result<Upstream, UpstreamError> {
        let rest = server
            .strip_prefix("https://")
            .ok_or_else(|| UpstreamError::Tls(format!("server {server:?} is not https://")))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let (host, has_port) = match authority.rsplit_once(':') {
            Some((h, p))
                if !h.is_empty()
                    && p.parse::<u16>().is_ok()
                    && (!h.contains(':') || h.ends_with(']')) =>
            {
                (h, true)
            }
            _ => (authority, false),
        };
        let addr = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:443")
        };
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let name = tls_server_name.unwrap_or(bare_host);
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|e| UpstreamError::Tls(format!("server name {name:?}: {e}")))?;
        let client_ref = client.as_ref().map(|(c, k)| (c.as_str(), k));
        let tls = |alpn: Vec<Vec<u8>>| {
            certs::client_config(ca_pem, client_ref, alpn)
                .map(|c| tokio_rustls::TlsConnector::from(Arc::new(c)))
                .map_err(|e| UpstreamError::Tls(e.to_string()))
        };
        Ok(Upstream {
            ca_pem: ca_pem.to_string(),
            exec_tls: Mutex::new(None),
            addr,
            authority: HeaderValue::from_str(authority)
                .map_err(|e| UpstreamError::Tls(e.to_string()))?,
            server_name,
            tls: tls(vec![b"h2".to_vec(), b"http/1.1".to_vec()])?,
            tls_h1: tls(vec![b"http/1.1".to_vec()])?,
            auth,
            pool: Mutex::new(Pool::default()),
            dialling: tokio::sync::Mutex::new(()),
        })
    }

    pub fn authority(&self) -> HeaderValue {
        self.authority.clone()
    }

    /// `Authorization` for the API server, if the credential is a token (running the exec
    /// plugin when its cached credential is missing or about to expire).
    pub async fn authorization(&self) -> Result<Option<HeaderValue>, UpstreamError> {
        let token = match &self.auth {
            Auth::None => return Ok(None),
            Auth::Token(t) => t.clone(),
            Auth::Exec(plugin) => match &plugin.credential().await?.token {
                Some(t) => t.clone(),
                None => return Ok(None),
            },
            Auth::TokenFile { path, cached } => {
                let mut c = cached.lock().unwrap_or_else(|p| p.into_inner());
                match c.as_ref() {
                    Some((at, t)) if at.elapsed() < TOKEN_FILE_TTL => t.clone(),
                    _ => {
                        let t = Secret::new(read(path)?.trim().to_string());
                        *c = Some((Instant::now(), t.clone()));
                        t
                    }
                }
            }
        };
        let mut v = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| UpstreamError::Tls("the token is not a valid header value".into()))?;
        v.set_sensitive(true);
        Ok(Some(v))
    }

    /// The API server answered 401: an exec plugin's cached credential is dropped so the next
    /// request runs the plugin again (client-go does the same).
    pub async fn credential_refused(&self) {
        if let Auth::Exec(plugin) = &self.auth {
            plugin.forget().await;
        }
    }

    /// The TLS connector for a new connection: with the exec plugin's current client
    /// certificate when it returns one, else the fixed one.
    async fn connector(&self, upgrade: bool) -> Result<tokio_rustls::TlsConnector, UpstreamError> {
        let fixed = if upgrade { &self.tls_h1 } else { &self.tls };
        let Auth::Exec(plugin) = &self.auth else {
            return Ok(fixed.clone());
        };
        let credential = plugin.credential().await?;
        let Some((cert, key)) = &credential.client else {
            return Ok(fixed.clone());
        };
        let mut cache = self.exec_tls.lock().unwrap_or_else(|p| p.into_inner());
        let current = cache
            .as_ref()
            .filter(|c| Arc::ptr_eq(&c.credential, &credential));
        let built = match current {
            Some(c) => (c.tls.clone(), c.tls_h1.clone()),
            None => {
                let tls = |alpn: Vec<Vec<u8>>| {
                    certs::client_config(&self.ca_pem, Some((cert.as_str(), key)), alpn)
                        .map(|c| tokio_rustls::TlsConnector::from(Arc::new(c)))
                        .map_err(|e| {
                            UpstreamError::Tls(format!("the exec plugin's client certificate: {e}"))
                        })
                };
                let pair = (
                    tls(vec![b"h2".to_vec(), b"http/1.1".to_vec()])?,
                    tls(vec![b"http/1.1".to_vec()])?,
                );
                *cache = Some(ExecTls {
                    credential: credential.clone(),
                    tls: pair.0.clone(),
                    tls_h1: pair.1.clone(),
                });
                pair
            }
        };
        Ok(if upgrade { built.1 } else { built.0 })
    }

    /// Sends an ordinary request on the shared HTTP/2 connection or an idle HTTP/1.1 one (a
    /// new connection if there is neither); an upgrade on an idle HTTP/1.1 connection or a new
    /// one that offers only `http/1.1`. A connection that carried an upgrade is never pooled
    /// again (it carries the upgraded stream).
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
        upgrade: bool,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let conn = match self.idle(upgrade) {
            Some(c) => c,
            None if upgrade => self.connect(true).await?,
            None => {
                let _dialling = self.dialling.lock().await;
                match self.idle(false) {
                    Some(c) => c,
                    None => self.connect(false).await?,
                }
            }
        };
        match conn {
            Conn::H2(mut sender) => {
                sender.ready().await?;
                Ok(sender.send_request(self.for_h2(req)?).await?)
            }
            Conn::H1(mut sender) => {
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                if !upgrade {
                    let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                    if pool.h1.len() < POOL_MAX {
                        pool.h1.push(sender);
                    }
                }
                Ok(resp)
            }
        }
    }

    fn idle(&self, upgrade: bool) -> Option<Conn> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.h2.as_ref().is_some_and(|s| s.is_closed()) {
            pool.h2 = None;
        }
        pool.h1.retain(|s| !s.is_closed());
        match &pool.h2 {
            Some(s) if !upgrade => Some(Conn::H2(s.clone())),
            _ => pool
                .h1
                .iter()
                .position(|s| s.is_ready())
                .map(|i| Conn::H1(pool.h1.swap_remove(i))),
        }
    }

    /// HTTP/2 carries the target as `:scheme`/`:authority`/`:path`: an absolute URI, no `Host`.
    fn for_h2(&self, req: Request<Full<Bytes>>) -> Result<Request<Full<Bytes>>, UpstreamError> {
        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let authority = self
            .authority
            .to_str()
            .map_err(|e| UpstreamError::Tls(e.to_string()))?;
        parts.uri = Uri::builder()
            .scheme("https")
            .authority(authority)
            .path_and_query(pq)
            .build()
            .map_err(|e| UpstreamError::Tls(format!("request target: {e}")))?;
        parts.headers.remove(HOST);
        Ok(Request::from_parts(parts, body))
    }

    async fn connect(&self, upgrade: bool) -> Result<Conn, UpstreamError> {
        let fail = |message: String| UpstreamError::Connect {
            addr: self.addr.clone(),
            message,
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&self.addr))
            .await
            .map_err(|_| fail("timed out".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let connector = self.connector(upgrade).await?;
        let tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            connector.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| fail("TLS handshake timed out".into()))?
        .map_err(|e| fail(format!("TLS: {e}")))?;
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake::<_, Full<Bytes>>(TokioIo::new(tls))
                .await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            // Shared at once, before the dialling lock is released, so waiters reuse it.
            self.pool.lock().unwrap_or_else(|p| p.into_inner()).h2 = Some(sender.clone());
            return Ok(Conn::H2(sender));
        }
        let (sender, conn) = http1::Builder::new()
            .handshake::<_, Full<Bytes>>(TokioIo::new(tls))
            .await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(Conn::H1(sender))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn ca_pem() -> String {
        certs::Ca::generate("test", jiff::Timestamp::now())
            .unwrap()
            .cert_pem()
            .to_string()
    }

    fn write(dir: &Path, user: &str, cluster_extra: &str) -> PathBuf {
        let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem());
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority-data: {ca}\n{cluster_extra}users:\n- name: u\n  user:\n{user}contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n"
        );
        let p = dir.join("kubeconfig");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[tokio::test]
    async fn token_users() {
        let dir = tempfile::tempdir().unwrap();
        let up = Upstream::load(Some(&write(dir.path(), "    token: abc\n", "")))
            .await
            .unwrap();
        assert_eq!(up.addr, "127.0.0.1:6443");
        assert_eq!(up.authority(), "127.0.0.1:6443");
        assert_eq!(up.authorization().await.unwrap().unwrap(), "Bearer abc");

        std::fs::write(dir.path().join("tok"), "from-file\n").unwrap();
        let up = Upstream::load(Some(&write(dir.path(), "    tokenFile: tok\n", "")))
            .await
            .unwrap();
        assert_eq!(
            up.authorization().await.unwrap().unwrap(),
            "Bearer from-file"
        );
    }

    /// The credential the cached TLS connectors were built for.
    fn connectors_credential(up: &Upstream) -> Arc<Credential> {
        up.exec_tls
            .lock()
            .unwrap()
            .as_ref()
            .map(|t| t.credential.clone())
            .unwrap()
    }

    /// A plugin returning a client certificate: no bearer token, and new connections present
    /// the certificate (one connector pair per credential, rebuilt only when it changes).
    #[tokio::test]
    async fn exec_plugin_client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let id = certs::Ca::generate("client", jiff::Timestamp::now()).unwrap();
        let cred = serde_json::json!({
            "apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
            "status": {"clientCertificateData": id.cert_pem(), "clientKeyData": id.key_pem().expose()},
        });
        std::fs::write(dir.path().join("cred.json"), cred.to_string()).unwrap();
        let user = format!(
            "    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: cat\n      args: [\"{}\"]\n",
            dir.path().join("cred.json").display()
        );
        let up = Upstream::load(Some(&write(dir.path(), &user, "")))
            .await
            .unwrap();
        assert!(up.authorization().await.unwrap().is_none());
        up.connector(false).await.unwrap();
        up.connector(true).await.unwrap();
        let first = connectors_credential(&up);
        up.connector(false).await.unwrap();
        let again = connectors_credential(&up);
        assert!(Arc::ptr_eq(&first, &again));
        // Refused by the API server: the plugin runs again and the connectors follow.
        up.credential_refused().await;
        up.connector(false).await.unwrap();
        let next = connectors_credential(&up);
        assert!(!Arc::ptr_eq(&first, &next));
    }

    #[tokio::test]
    async fn refuses_what_it_cannot_honour() {
        let dir = tempfile::tempdir().unwrap();
        let exec = write(dir.path(), "    exec:\n      command: aws\n", "");
        assert!(Upstream::load(Some(&exec))
            .await
            .unwrap_err()
            .to_string()
            .contains("apiVersion"));
        let provider = write(dir.path(), "    auth-provider:\n      name: gcp\n", "");
        assert!(Upstream::load(Some(&provider))
            .await
            .unwrap_err()
            .to_string()
            .contains("auth-provider"));
        let insecure = write(
            dir.path(),
            "    token: a\n",
            "    insecure-skip-tls-verify: true\n",
        );
        assert!(Upstream::load(Some(&insecure))
            .await
            .unwrap_err()
            .to_string()
            .contains("insecure"));
        std::fs::write(dir.path().join("bad"), "clusters: []\ncontexts: []\n").unwrap();
        assert!(Upstream::load(Some(&dir.path().join("bad"))).await.is_err());
        assert!(Upstream::load(Some(&dir.path().join("missing")))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn client_certificate_files_are_relative_to_the_kubeconfig() {
        let dir = tempfile::tempdir().unwrap();
        let id = certs::Ca::generate("client", jiff::Timestamp::now()).unwrap();
        std::fs::write(dir.path().join("c.crt"), id.cert_pem()).unwrap();
        std::fs::write(dir.path().join("c.key"), id.key_pem().expose()).unwrap();
        let both = write(
            dir.path(),
            "    client-certificate: c.crt\n    client-key: c.key\n",
            "    tls-server-name: api.internal\n",
        );
        let up = Upstream::load(Some(&both)).await.unwrap();
        assert_eq!(
            up.server_name,
            ServerName::try_from("api.internal").unwrap()
        );
        assert!(up.authorization().await.unwrap().is_none());
        let half = write(dir.path(), "    client-certificate: c.crt\n", "");
        assert!(Upstream::load(Some(&half))
            .await
            .unwrap_err()
            .to_string()
            .contains("both"));
        let missing = write(
            dir.path(),
            "    client-certificate: nope.crt\n    client-key: c.key\n",
            "",
        );
        assert!(Upstream::load(Some(&missing)).await.is_err());
    }

    #[tokio::test]
    async fn server_without_port_is_443_and_tls_server_name_wins() {
        let up = Upstream::build(
            "https://kube.example",
            Some("api.internal"),
            &ca_pem(),
            None,
            Auth::None,
        )
        .unwrap();
        assert_eq!(up.addr, "kube.example:443");
        assert_eq!(
            up.server_name,
            ServerName::try_from("api.internal").unwrap()
        );
        assert!(up.authorization().await.unwrap().is_none());
        assert!(Upstream::build("http://kube.example", None, &ca_pem(), None, Auth::None).is_err());
    }
}
