//! A `kubectl` op's own way to the cluster: a loopback HTTPS proxy started for the op alone,
//! enforcing the resource's scope and impersonation exactly as a kubectl endpoint does (the
//! same [`Proxy`]), and a kubeconfig naming it with a per-op bearer token and a per-op CA.
//! The tool never sees the appliance's kubeconfig or service-account token; when the op ends
//! the [`OpKube`] guard stops the proxy (live streams included) and deletes the kubeconfig,
//! so the credential dies with the op. Every request is a `kube.request` record in the
//! customer's trail and, through an `OpRecord` frame, in the vendor's.

use super::proxy::{self, AuditSink, Proxy};
use crate::{audit::AuditLog, audit::Entry, config::ResourceConfig};
use base64::Engine;
use endpoint_types::{
    frame::ToGateway,
    kube_request::{status_json, KubeScope},
    ApiError, ErrorCode,
};
use hyper::{body::Incoming, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// kubectl flags that would pick another credential or API server than the op's own.
const REFUSED_FLAGS: [&str; 9] = [
    "--kubeconfig",
    "--token",
    "--server",
    "-s",
    "--client-certificate",
    "--client-key",
    "--username",
    "--password",
    "--insecure-skip-tls-verify",
];

#[derive(Debug, thiserror::Error)]
pub enum OpProxyError {
    #[error("resource {id:?}: {problem}")]
    Scope { id: String, problem: String },
    #[error("the kubectl flag {0} is not accepted in an op: the op reaches the cluster only through its own scoped kubeconfig")]
    Flag(String),
    #[error("cannot make the op's credential: {0}")]
    Credential(String),
    #[error("cannot start the op's proxy: {0}")]
    Io(#[from] std::io::Error),
}

impl OpProxyError {
    /// A refused flag or scope is the requester's or the config's; the rest is the appliance's.
    pub fn to_api_error(&self) -> ApiError {
        match self {
            OpProxyError::Flag(_) => ApiError::new(ErrorCode::ForbiddenByScope, self.to_string())
                .hint("drop the flag: the op's KUBECONFIG already names the cluster, with the resource's scope"),
            OpProxyError::Scope { .. } => ApiError::new(ErrorCode::ForbiddenByScope, self.to_string())
                .hint("a kubectl op reaches what an endpoint to the resource would: the customer lists `namespaces` (and `resources`, `verbs`) for it in agent.toml"),
            _ => ApiError::new(ErrorCode::Internal, self.to_string()).hint("the appliance's agent log has the cause"),
        }
    }

    /// Whether the trail records this as a denial (a permission refusal).
    pub fn is_denial(&self) -> bool {
        matches!(self, OpProxyError::Flag(_) | OpProxyError::Scope { .. })
    }
}

/// The op's kubeconfig; dropping it stops the proxy and deletes the file.
pub struct OpKube {
    pub kubeconfig: PathBuf,
    stop: CancellationToken,
}

impl Drop for OpKube {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// Refuses kubectl flags that choose another kubeconfig, credential or server.
pub fn check_args(argv: &[String]) -> Result<(), OpProxyError> {
    for a in argv.iter().skip(1) {
        if a == "--" {
            break;
        }
        let flag = a.split_once('=').map(|(f, _)| f).unwrap_or(a);
        let short_s = a.starts_with("-s") && !a.starts_with("--") && a.len() > 2;
        if REFUSED_FLAGS.contains(&flag) || short_s {
            return Err(OpProxyError::Flag(flag.to_string()));
        }
    }
    Ok(())
}

/// Where an op's records go: the customer's trail (with the op id) and the vendor's (an
/// `OpRecord` frame on the control stream).
pub fn records(
    audit: AuditLog,
    outbox: mpsc::Sender<ToGateway>,
    op_id: &str,
    operator: &str,
) -> Arc<dyn Fn(&'static str, serde_json::Value) + Send + Sync> {
    let (op_id, operator) = (op_id.to_string(), operator.to_string());
    Arc::new(move |kind, mut detail| {
        detail["operator"] = serde_json::json!(operator);
        audit.record_or_log(Entry::new(kind, operator.clone(), detail.clone()).op(op_id.clone()));
        let frame = ToGateway::OpRecord {
            op_id: op_id.clone(),
            kind: kind.to_string(),
            detail,
        };
        let outbox = outbox.clone();
        tokio::spawn(async move {
            let _ = outbox.send(frame).await;
        });
    })
}

fn token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts the op's proxy for `resource` and writes its kubeconfig (0600) into `dir`.
pub async fn start(
    clusters: &super::Clusters,
    resource: &ResourceConfig,
    argv: &[String],
    dir: &Path,
    sink: Arc<dyn Fn(&'static str, serde_json::Value) + Send + Sync>,
) -> Result<OpKube, OpProxyError> {
    check_args(argv)?;
    clusters.retry(resource).await;
    let scope = super::scope_of(clusters, resource).map_err(|problem| OpProxyError::Scope {
        id: resource.id.clone(),
        problem,
    })?;
    let now = jiff::Timestamp::now();
    let cred = |e: certs::CertError| OpProxyError::Credential(e.to_string());
    let ca = certs::Ca::generate("postern op proxy", now).map_err(cred)?;
    let issued = ca
        .issue_server(
            &["localhost".into(), "127.0.0.1".into()],
            now,
            Duration::from_secs(25 * 3600),
        )
        .map_err(cred)?;
    let tls = certs::server_config(
        &issued.cert_pem,
        &issued.key_pem,
        None,
        certs::ClientAuth::None,
        vec![b"http/1.1".to_vec()],
    )
    .map_err(cred)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let token = token();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let namespace = scope.namespaces().first().cloned().unwrap_or_default();
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: postern-op\n  cluster:\n    server: https://{addr}\n    certificate-authority-data: {}\n    tls-server-name: localhost\n\
         users:\n- name: postern-op\n  user:\n    token: {token}\ncontexts:\n- name: postern-op\n  context:\n    cluster: postern-op\n    user: postern-op\n    namespace: {namespace}\n\
         current-context: postern-op\n",
        b64(ca.cert_pem())
    );
    let path = dir.join("kubeconfig");
    write_private(&path, &text)?;
    let stop = CancellationToken::new();
    let served = Served {
        clusters: clusters.clone(),
        resource: resource.clone(),
        scope,
        token,
        sink,
        stop: stop.clone(),
    };
    tokio::spawn(accept_loop(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        Arc::new(served),
    ));
    Ok(OpKube {
        kubeconfig: path,
        stop,
    })
}

/// Writes the kubeconfig readable by its owner only: the owner of the op's directory, so an
/// op that runs as another (unprivileged) user than the agent can read it and no one else.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    if let Some(dir) = path.parent() {
        let (owner, mine) = (std::fs::metadata(dir)?, f.metadata()?);
        if (owner.uid(), owner.gid()) != (mine.uid(), mine.gid()) {
            std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid()))?;
        }
    }
    Ok(())
}

struct Served {
    clusters: super::Clusters,
    resource: ResourceConfig,
    scope: KubeScope,
    token: String,
    sink: Arc<dyn Fn(&'static str, serde_json::Value) + Send + Sync>,
    stop: CancellationToken,
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    served: Arc<Served>,
) {
    loop {
        let tcp = tokio::select! {
            () = served.stop.cancelled() => return,
            r = listener.accept() => match r { Ok((tcp, _)) => tcp, Err(_) => continue },
        };
        tokio::spawn(connection(tcp, tls.clone(), served.clone()));
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    tls: tokio_rustls::TlsAcceptor,
    served: Arc<Served>,
) {
    let _ = tcp.set_nodelay(true);
    let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await else {
        return;
    };
    let upstream = served.clusters.upstream_for(&served.resource).await;
    let sink: AuditSink = {
        let s = served.sink.clone();
        Box::new(move |kind, detail| s(kind, detail))
    };
    let proxy = upstream.map(|u| {
        Proxy::new(
            served.scope.clone(),
            u,
            proxy::impersonation_headers(&served.resource),
            served.stop.clone(),
            sink,
        )
    });
    let proxy = Arc::new(proxy.map_err(|e| e.to_string()));
    let (p, s) = (proxy.clone(), served.clone());
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (p, s) = (p.clone(), s.clone());
        async move {
            let presented = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            let valid =
                presented.is_some_and(|t| bool::from(t.as_bytes().ct_eq(s.token.as_bytes())));
            if !valid || s.stop.is_cancelled() {
                return Ok::<_, Infallible>(proxy::local(
                    StatusCode::UNAUTHORIZED,
                    status_json(
                        401,
                        "Unauthorized",
                        "postern: this op's credential is not valid (or the op has ended)",
                    ),
                ));
            }
            Ok(match p.as_ref() {
                Ok(proxy) => proxy.handle(req).await,
                Err(e) => proxy::local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    status_json(503, "ServiceUnavailable", &format!("postern agent: {e}")),
                ),
            })
        }
    });
    let http = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    let serve = async {
        let _ = http.await;
        if let Some(pipe) = proxy.as_ref().as_ref().ok().and_then(|p| p.take_upgraded()) {
            let _ = pipe.await;
        }
    };
    tokio::select! {
        () = serve => {}
        () = served.stop.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// `(status line, body)` of one HTTPS request to the op's proxy, as the kubeconfig says.
    async fn request(kubeconfig: &str, token: &str) -> std::io::Result<String> {
        let field = |k: &str| {
            kubeconfig
                .lines()
                .find_map(|l| l.trim().strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let addr = field("server:").trim_start_matches("https://").to_string();
        let ca = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(field("certificate-authority-data:"))
                .unwrap(),
        )
        .unwrap();
        let tls = certs::client_config(&ca, None, vec![b"http/1.1".to_vec()]).unwrap();
        let tcp = tokio::net::TcpStream::connect(&addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut s = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await?;
        s.write_all(format!("GET /api/v1/namespaces/a/pods HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn the_credential_lives_and_dies_with_the_op() {
        let text = "audit_path = \"a\"\n[[resource]]\nid = \"k\"\nkind = \"kubernetes\"\nkubeconfig = \"/nonexistent/kc\"\nnamespaces = [\"a\"]\n";
        let config = AgentConfig::parse(text, Path::new("/etc/postern/agent.toml")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sink: Arc<dyn Fn(&'static str, serde_json::Value) + Send + Sync> = Arc::new(|_, _| {});
        let argv = vec!["kubectl".to_string(), "get".into(), "pods".into()];
        let op = start(
            &Default::default(),
            &config.resources[0],
            &argv,
            dir.path(),
            sink,
        )
        .await
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&op.kubeconfig)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let kc = std::fs::read_to_string(&op.kubeconfig).unwrap();
        let token = kc
            .lines()
            .find_map(|l| l.trim().strip_prefix("token: "))
            .unwrap()
            .to_string();
        assert_eq!(token.len(), 64);
        assert!(
            kc.contains("namespace: a") && !kc.contains("/nonexistent/kc"),
            "{kc}"
        );

        let wrong = request(&kc, "not-the-token").await.unwrap();
        assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
        // The right token is let in; the cluster is unreachable here (no kubeconfig file).
        let right = request(&kc, &token).await.unwrap();
        assert!(right.starts_with("HTTP/1.1 503"), "{right}");

        let path = op.kubeconfig.clone();
        drop(op);
        assert!(!path.exists(), "the op's kubeconfig outlived it");
        let mut refused = false;
        for _ in 0..50 {
            if request(&kc, &token).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "the op's proxy still answers after the op");
    }

    #[tokio::test]
    async fn a_resource_without_namespaces_has_no_op_proxy() {
        let text = "audit_path = \"a\"\n[[resource]]\nid = \"k\"\nkind = \"kubernetes\"\nkubeconfig = \"/nonexistent/kc\"\n";
        let config = AgentConfig::parse(text, Path::new("/etc/postern/agent.toml")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sink: Arc<dyn Fn(&'static str, serde_json::Value) + Send + Sync> = Arc::new(|_, _| {});
        let e = start(
            &Default::default(),
            &config.resources[0],
            &["kubectl".into()],
            dir.path(),
            sink,
        )
        .await
        .err()
        .unwrap();
        assert!(
            e.is_denial() && e.to_api_error().code == ErrorCode::ForbiddenByScope,
            "{e}"
        );
    }

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn flags_that_pick_another_credential_are_refused() {
        for bad in [
            "kubectl --kubeconfig /etc/postern/k get pods",
            "kubectl get pods --kubeconfig=/etc/k",
            "kubectl --token abc get pods",
            "kubectl -s https://10.0.0.1 get pods",
            "kubectl -shttps://10.0.0.1 get pods",
            "kubectl --server=https://x get pods",
            "kubectl --client-key /k get pods",
            "kubectl --insecure-skip-tls-verify get pods",
        ] {
            assert!(
                matches!(check_args(&argv(bad)), Err(OpProxyError::Flag(_))),
                "{bad}"
            );
        }
        for good in [
            "kubectl get pods -n a",
            "kubectl exec p -- kubectl --kubeconfig x",
            "kubectl logs p --since=1h",
            "kubectl get pods -o wide",
        ] {
            assert!(check_args(&argv(good)).is_ok(), "{good}");
        }
        assert!(OpProxyError::Flag("--token".into()).is_denial());
    }
}
