//! A test Kubernetes API server: HTTPS with its own throwaway CA, bearer-token auth, and the
//! parts of the protocol kubectl uses — discovery (legacy documents; aggregated discovery is
//! simply not offered, so kubectl takes the fallback), namespaced CRUD in memory, `Table`
//! responses, watch streams, `pods/log` with follow, `pods/exec` and `pods/attach` over
//! WebSocket (kubectl 1.30+) and SPDY/3.1 (kubectl up to 1.29), and `pods/portforward` over
//! SPDY/3.1, plain or tunnelled in WebSocket (the pod echoes what reaches its ports). It
//! records every request it receives so tests can assert what reached it (and what did not).
//!
//! Like a real API server it offers `h2` and `http/1.1` by ALPN: clients multiplex ordinary
//! requests over HTTP/2 and open a separate HTTP/1.1 connection for upgrades (exec, attach,
//! port-forward), as kubectl does. Each recorded request carries its HTTP version and the
//! number of the connection it came on, so tests can check both.

mod exec;
pub mod objects;
mod spdy;
mod spdy_dictionary;
mod spdy_exec;

use anyhow::{anyhow, Context, Result};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::{
    body::{Frame, Incoming},
    header::{HeaderValue, CONTENT_TYPE},
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context as TaskContext, Poll},
    time::Duration,
};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

type Body = BoxBody<Bytes, Infallible>;

/// Streams (watch, log follow) end by themselves after this, so nothing outlives a test.
const MAX_STREAM: Duration = Duration::from_secs(600);
const MAX_BODY: usize = 16 * 1024 * 1024;

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query, exactly as received.
    pub uri: String,
    pub headers: Vec<(String, String)>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Which TLS connection (numbered from 0 in accept order) carried the request.
    pub conn: u64,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }
}

#[derive(Clone, Debug)]
struct Event {
    group: String,
    resource: String,
    ns: String,
    kind: &'static str,
    object: Value,
    rv: u64,
}

/// (group, resource, namespace or "", name)
type Key = (String, String, String, String);

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    uid: u64,
}

struct Shared {
    token: String,
    server: String,
    log: Mutex<Vec<Recorded>>,
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    /// Recent events, so a watch from a resourceVersion sees what happened since (kubectl
    /// lists, then watches from the list's version).
    history: Mutex<Vec<Event>>,
    uploads: exec::Uploads,
    forwards: spdy_exec::Forwards,
}

impl Shared {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts or replaces an object, stamping resourceVersion, and tells watchers.
    fn put(
        &self,
        group: &str,
        resource: &str,
        ns: &str,
        name: &str,
        mut obj: Value,
        kind: &'static str,
    ) -> Value {
        let mut st = self.store();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.objects.insert(
            (group.into(), resource.into(), ns.into(), name.into()),
            obj.clone(),
        );
        drop(st);
        self.publish(Event {
            group: group.into(),
            resource: resource.into(),
            ns: ns.into(),
            kind,
            object: obj.clone(),
            rv,
        });
        obj
    }

    fn remove(&self, group: &str, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let mut st = self.store();
        let obj = st
            .objects
            .remove(&(group.into(), resource.into(), ns.into(), name.into()))?;
        st.rv += 1;
        let rv = st.rv;
        drop(st);
        self.publish(Event {
            group: group.into(),
            resource: resource.into(),
            ns: ns.into(),
            kind: "DELETED",
            object: obj.clone(),
            rv,
        });
        Some(obj)
    }

    fn publish(&self, ev: Event) {
        if let Ok(mut h) = self.history.lock() {
            if h.len() >= 1000 {
                h.remove(0);
            }
            h.push(ev.clone());
        }
        let _ = self.events.send(ev);
    }

    fn next_uid(&self) -> u64 {
        let mut st = self.store();
        st.uid += 1;
        st.uid
    }
}

/// The running server; stops (and its thread ends) on drop.
pub struct KubeApiServer {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub token: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KubeApiServer {
    /// Starts on 127.0.0.1:0, seeded with pods `web-1` and `web-2`, a deployment `web`, a
    /// service, a config map, a secret, a StatefulSet `db`, a Job `migrate`, a RoleBinding and a
    /// cert-manager Certificate `web-tls` in `my-app-prod`, a pod in `kube-system` and a node.
    pub fn start() -> Result<KubeApiServer> {
        let now = jiff::Timestamp::now();
        let ca = certs::Ca::generate("test kube-apiserver", now)?;
        let issued = ca.issue_server(
            &["localhost".into(), "127.0.0.1".into()],
            now,
            Duration::from_secs(7 * 86400),
        )?;
        let tls = certs::server_config(
            &issued.cert_pem,
            &issued.key_pem,
            None,
            certs::ClientAuth::None,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let token = format!("test-token-{}", std::process::id());
        let (events, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            token: token.clone(),
            server: addr.to_string(),
            log: Mutex::new(Vec::new()),
            store: Mutex::new(Store::default()),
            events,
            history: Mutex::new(Vec::new()),
            uploads: Default::default(),
            forwards: Default::default(),
        });
        seed(&shared);
        let stop = CancellationToken::new();
        let (s2, stop2) = (shared.clone(), stop.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let thread = std::thread::Builder::new()
            .name("kube-apiserver".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return eprintln!("test kube-apiserver: no runtime: {e}"),
                };
                rt.block_on(accept_loop(listener, acceptor, s2, stop2));
            })?;
        Ok(KubeApiServer {
            addr,
            ca_pem: ca.cert_pem().to_string(),
            token,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A kubeconfig with a bearer token that reaches this server directly.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\n    tls-server-name: localhost\nusers:\n- name: test\n  user:\n    token: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: {namespace}\ncurrent-context: test\n",
            self.url(),
            self.token
        )
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared
            .log
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    pub fn clear_requests(&self) {
        if let Ok(mut l) = self.shared.log.lock() {
            l.clear();
        }
    }

    /// Adds (or replaces) a running pod, as if the cluster had started it.
    pub fn add_pod(&self, ns: &str, name: &str) {
        let uid = self.shared.next_uid();
        self.shared
            .put("", "pods", ns, name, objects::pod(ns, name, uid), "ADDED");
    }

    /// Turns an existing pod's `Ready` condition (and its container's `ready`) on or off, as
    /// a failing readiness probe would; false if there is no such pod.
    pub fn set_pod_ready(&self, ns: &str, name: &str, ready: bool) -> bool {
        let key = (
            String::new(),
            "pods".to_string(),
            ns.to_string(),
            name.to_string(),
        );
        let Some(mut pod) = self.shared.store().objects.get(&key).cloned() else {
            return false;
        };
        let status = if ready { "True" } else { "False" };
        pod["status"]["conditions"] = json!([{"type": "Ready", "status": status}]);
        if let Some(c) = pod.pointer_mut("/status/containerStatuses/0") {
            c["ready"] = json!(ready);
        }
        self.shared.put("", "pods", ns, name, pod, "MODIFIED");
        true
    }

    /// Records a `Warning` event about a pod, seen now.
    pub fn add_warning(&self, ns: &str, pod: &str, reason: &str, message: &str) {
        let uid = self.shared.next_uid();
        let name = format!("{pod}.{uid}");
        let event = objects::object(
            "",
            "Event",
            Some(ns),
            &name,
            uid,
            json!({"type": "Warning", "reason": reason, "message": message, "count": 1,
                   "lastTimestamp": jiff::Timestamp::now().to_string(),
                   "involvedObject": {"kind": "Pod", "namespace": ns, "name": pod}}),
        );
        self.shared.put("", "events", ns, &name, event, "ADDED");
    }

    /// What `tar -x` in exec sessions received (one entry per session): `kubectl cp` uploads.
    pub fn uploads(&self) -> Vec<Vec<u8>> {
        self.shared
            .uploads
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default()
    }

    /// The pod ports port-forward sessions opened, in order.
    pub fn port_forwards(&self) -> Vec<u16> {
        self.shared
            .forwards
            .lock()
            .map(|f| f.clone())
            .unwrap_or_default()
    }

    pub fn has_object(&self, resource: &str, ns: &str, name: &str) -> bool {
        self.shared
            .store()
            .objects
            .keys()
            .any(|(_, r, n, m)| r == resource && n == ns && m == name)
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn seed(s: &Shared) {
    for (ns, name) in [
        ("my-app-prod", "web-1"),
        ("my-app-prod", "web-2"),
        ("kube-system", "coredns-1"),
    ] {
        let uid = s.next_uid();
        s.put("", "pods", ns, name, objects::pod(ns, name, uid), "ADDED");
    }
    let add =
        |group: &str, resource: &str, kind: &str, ns: Option<&str>, name: &str, extra: Value| {
            let uid = s.next_uid();
            let obj = objects::object(group, kind, ns, name, uid, extra);
            s.put(group, resource, ns.unwrap_or(""), name, obj, "ADDED");
        };
    add(
        "apps",
        "deployments",
        "Deployment",
        Some("my-app-prod"),
        "web",
        json!({"spec": {"replicas": 2}, "status": {"replicas": 2, "readyReplicas": 2}}),
    );
    add(
        "",
        "services",
        "Service",
        Some("my-app-prod"),
        "web",
        json!({"spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10"}}),
    );
    add(
        "",
        "configmaps",
        "ConfigMap",
        Some("my-app-prod"),
        "web-config",
        json!({"data": {"mode": "prod"}}),
    );
    add(
        "",
        "secrets",
        "Secret",
        Some("my-app-prod"),
        "web-secret",
        json!({"type": "Opaque", "data": {"password": "aHVudGVyMg=="}}),
    );
    add(
        "apps",
        "statefulsets",
        "StatefulSet",
        Some("my-app-prod"),
        "db",
        json!({"spec": {"replicas": 1}, "status": {"replicas": 1, "readyReplicas": 1}}),
    );
    add(
        "batch",
        "jobs",
        "Job",
        Some("my-app-prod"),
        "migrate",
        json!({"spec": {"completions": 1}, "status": {"succeeded": 1}}),
    );
    add(
        "cert-manager.io",
        "certificates",
        "Certificate",
        Some("my-app-prod"),
        "web-tls",
        json!({"spec": {"secretName": "web-tls", "dnsNames": ["web.example.com"]}}),
    );
    add(
        "cert-manager.io",
        "issuers",
        "Issuer",
        Some("my-app-prod"),
        "letsencrypt",
        json!({"spec": {"acme": {"server": "https://acme.example"}}}),
    );
    add(
        "rbac.authorization.k8s.io",
        "rolebindings",
        "RoleBinding",
        Some("my-app-prod"),
        "web-readers",
        json!({"roleRef": {"kind": "Role", "name": "reader"}}),
    );
    add(
        "",
        "nodes",
        "Node",
        None,
        "node-1",
        json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    for ns in ["my-app-prod", "kube-system", "default"] {
        add(
            "",
            "namespaces",
            "Namespace",
            None,
            ns,
            json!({"status": {"phase": "Active"}}),
        );
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return eprintln!("test kube-apiserver: {e}"),
    };
    let mut next_conn = 0u64;
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
        };
        let (acceptor, shared, stop) = (acceptor.clone(), shared.clone(), stop.clone());
        let conn_no = next_conn;
        next_conn += 1;
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let service =
                hyper::service::service_fn(move |req| handle(shared.clone(), conn_no, req));
            // The auto builder picks HTTP/2 from the client preface, HTTP/1.1 otherwise.
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    full(status, "application/json", v.to_string())
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// Decoded query pairs (Go's `ParseQuery` rules, lenient).
fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while let Some(&c) = b.get(i) {
            let hex = |j: usize| b.get(j).and_then(|h| (*h as char).to_digit(16));
            match (c, hex(i + 1), hex(i + 2)) {
                (b'%', Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                (b'+', _, _) => {
                    out.push(b' ');
                    i += 1;
                }
                _ => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
    }
    fn all(&self, k: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(a, _)| a == k)
            .map(|(_, v)| v.clone())
            .collect()
    }
    fn flag(&self, k: &str) -> bool {
        self.get(k)
            .is_some_and(|v| !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false")))
    }
    /// `metadata.name=X` from a field selector.
    fn name_selector(&self) -> Option<String> {
        self.get("fieldSelector")?
            .split(',')
            .find_map(|t| t.strip_prefix("metadata.name=").map(str::to_string))
    }
}

async fn handle(
    shared: Arc<Shared>,
    conn: u64,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    if let Ok(mut l) = shared.log.lock() {
        l.push(Recorded {
            method: req.method().to_string(),
            uri,
            headers,
            version: format!("{:?}", req.version()),
            conn,
        });
    }
    let authorized = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {}", shared.token));
    if !authorized {
        return Ok(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
        ));
    }
    Ok(route(shared, req).await)
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let get = req.method() == hyper::Method::GET;
    match (segs.as_slice(), get) {
        (["version"], true) => return json_response(StatusCode::OK, &objects::version()),
        (["api"], true) => {
            return json_response(StatusCode::OK, &objects::api_versions(&shared.server))
        }
        (["apis"], true) => return json_response(StatusCode::OK, &objects::api_group_list()),
        (["api", "v1"], true) => {
            return json_response(
                StatusCode::OK,
                &objects::resource_list("").unwrap_or_default(),
            )
        }
        (["apis", g], true) => {
            return objects::api_group(g).map_or_else(
                || status(StatusCode::NOT_FOUND, "NotFound", "no such group"),
                |v| json_response(StatusCode::OK, &v),
            )
        }
        (["apis", g, "v1"], true) => {
            return objects::resource_list(g).map_or_else(
                || status(StatusCode::NOT_FOUND, "NotFound", "no such group"),
                |v| json_response(StatusCode::OK, &v),
            )
        }
        _ => {}
    }
    let (group, rest): (&str, &[&str]) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", g, "v1", rest @ ..] => (g, rest),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("the server could not find the requested resource ({path})"),
            )
        }
    };
    // namespaces/<ns>/<resource>/... or <resource>/... (cluster-wide).
    let (ns, resource, tail): (&str, &str, &[&str]) = match rest {
        ["namespaces", ns, resource, tail @ ..]
            if *resource != "status" && *resource != "finalize" =>
        {
            (ns, resource, tail)
        }
        [resource, tail @ ..] => ("", resource, tail),
        [] => return status(StatusCode::NOT_FOUND, "NotFound", "no resource"),
    };
    let Some(kind) = objects::kind_of(group, resource) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        );
    };
    let params = Params(query_pairs(req.uri().query()));
    let accept = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let table = objects::wants_table(&accept);
    let r = Ctx {
        shared,
        group: group.to_string(),
        resource: resource.to_string(),
        ns: ns.to_string(),
        kind,
        table,
    };
    match tail {
        [] => collection(r, req, params).await,
        [name] => item(r, req, name).await,
        [name, sub] => subresource(r, req, params, name, sub).await,
        _ => status(StatusCode::NOT_FOUND, "NotFound", "no such subresource"),
    }
}

struct Ctx {
    shared: Arc<Shared>,
    group: String,
    resource: String,
    ns: String,
    kind: &'static objects::Kind,
    table: bool,
}

impl Ctx {
    fn not_found(&self, name: &str) -> Response<Body> {
        let mut r = status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} {name:?} not found", self.resource),
        );
        *r.body_mut() = Full::new(Bytes::from(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404,
                   "message": format!("{} \"{name}\" not found", self.resource),
                   "details": {"name": name, "group": self.group, "kind": self.resource}})
            .to_string(),
        ))
        .boxed();
        r
    }

    fn key(&self, name: &str) -> Key {
        (
            self.group.clone(),
            self.resource.clone(),
            self.ns.clone(),
            name.to_string(),
        )
    }

    fn matching(&self, name: Option<&str>) -> (u64, Vec<Value>) {
        let st = self.shared.store();
        let items = st
            .objects
            .iter()
            .filter(|((g, r, n, m), _)| {
                *g == self.group
                    && *r == self.resource
                    && (self.ns.is_empty() || *n == self.ns)
                    && name.is_none_or(|x| x == m)
            })
            .map(|(_, v)| v.clone())
            .collect();
        (st.rv, items)
    }

    fn render_one(&self, obj: &Value) -> Response<Body> {
        if self.table {
            let rv = obj["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return json_response(
                StatusCode::OK,
                &objects::table(&self.resource, rv, std::slice::from_ref(obj), true),
            );
        }
        json_response(StatusCode::OK, obj)
    }
}

/// A JSON object body whose `metadata`, if present, is an object (so stamping fields into it
/// cannot fail).
async fn read_json(req: Request<Incoming>) -> Option<Value> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .ok()?
        .to_bytes();
    let v: Value = serde_json::from_slice(&body).ok()?;
    (v.is_object() && (v["metadata"].is_object() || v["metadata"].is_null())).then_some(v)
}

async fn collection(r: Ctx, req: Request<Incoming>, params: Params) -> Response<Body> {
    let name = params.name_selector();
    match *req.method() {
        hyper::Method::GET if params.flag("watch") => {
            let since = params.get("resourceVersion").and_then(|v| v.parse().ok());
            watch(r, name, since)
        }
        hyper::Method::GET => {
            let (rv, items) = r.matching(name.as_deref());
            if r.table {
                return json_response(
                    StatusCode::OK,
                    &objects::table(&r.resource, rv, &items, true),
                );
            }
            json_response(
                StatusCode::OK,
                &objects::list(&r.group, r.kind.kind, rv, items),
            )
        }
        hyper::Method::POST if !r.ns.is_empty() || !r.kind.namespaced => {
            let Some(mut obj) = read_json(req).await else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the body is not a JSON object",
                );
            };
            let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name is required",
                );
            };
            if r.shared.store().objects.contains_key(&r.key(&name)) {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", r.resource),
                );
            }
            let uid = r.shared.next_uid();
            obj["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{uid:012}"));
            obj["metadata"]["creationTimestamp"] = json!(objects::CREATED);
            if r.kind.namespaced {
                obj["metadata"]["namespace"] = json!(r.ns);
            }
            let obj = r
                .shared
                .put(&r.group, &r.resource, &r.ns, &name, obj, "ADDED");
            json_response(StatusCode::CREATED, &obj)
        }
        hyper::Method::DELETE => {
            let (rv, items) = r.matching(None);
            for o in &items {
                if let Some(n) = o["metadata"]["name"].as_str() {
                    r.shared.remove(&r.group, &r.resource, &r.ns, n);
                }
            }
            json_response(
                StatusCode::OK,
                &objects::list(&r.group, r.kind.kind, rv, items),
            )
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method not allowed",
        ),
    }
}

async fn item(r: Ctx, req: Request<Incoming>, name: &str) -> Response<Body> {
    let current = r.shared.store().objects.get(&r.key(name)).cloned();
    match (req.method().clone(), current) {
        (_, None) => r.not_found(name),
        (hyper::Method::GET, Some(obj)) => r.render_one(&obj),
        (hyper::Method::DELETE, Some(_)) => {
            match r.shared.remove(&r.group, &r.resource, &r.ns, name) {
                Some(obj) => json_response(StatusCode::OK, &obj),
                None => r.not_found(name),
            }
        }
        (m @ (hyper::Method::PUT | hyper::Method::PATCH), Some(mut obj)) => {
            let Some(body) = read_json(req).await else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the body is not a JSON object",
                );
            };
            if m == hyper::Method::PUT {
                obj = body;
            } else {
                objects::merge_patch(&mut obj, &body);
            }
            if !(obj["metadata"].is_object() || obj["metadata"].is_null()) {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata must be an object",
                );
            }
            let obj = r
                .shared
                .put(&r.group, &r.resource, &r.ns, name, obj, "MODIFIED");
            json_response(StatusCode::OK, &obj)
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method not allowed",
        ),
    }
}

async fn subresource(
    r: Ctx,
    req: Request<Incoming>,
    params: Params,
    name: &str,
    sub: &str,
) -> Response<Body> {
    let Some(obj) = r.shared.store().objects.get(&r.key(name)).cloned() else {
        return r.not_found(name);
    };
    match (r.resource.as_str(), sub) {
        ("pods", "log") => log(name, params.flag("follow")),
        ("pods", "exec" | "attach") => {
            let wanted = spdy_exec::Wanted {
                stdin: params.flag("stdin"),
                stdout: params.flag("stdout"),
                stderr: params.flag("stderr"),
                tty: params.flag("tty"),
            };
            upgrade_exec(req, params.all("command"), r.shared.uploads.clone(), wanted)
        }
        ("pods", "portforward") => upgrade_portforward(req, r.shared.forwards.clone()),
        ("deployments", "scale") => {
            let mut obj = obj;
            if req.method() != hyper::Method::GET {
                let Some(body) = read_json(req).await else {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "the body is not a JSON object",
                    );
                };
                obj["spec"]["replicas"] = body["spec"]["replicas"].clone();
                obj = r
                    .shared
                    .put(&r.group, &r.resource, &r.ns, name, obj, "MODIFIED");
            }
            json_response(
                StatusCode::OK,
                &json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": name, "namespace": r.ns, "resourceVersion": obj["metadata"]["resourceVersion"]},
                "spec": {"replicas": obj["spec"]["replicas"]}, "status": {"replicas": obj["spec"]["replicas"]}}),
            )
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{}/{sub} is not served by the test server", r.resource),
        ),
    }
}

/// A body fed by a channel: streams end when the sender is dropped, and the sender sees the
/// client leave when hyper drops the body.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn streaming(content_type: &str) -> (mpsc::Sender<Bytes>, Response<Body>) {
    let (tx, rx) = mpsc::channel(64);
    let mut r = Response::new(ChannelBody(rx).boxed());
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    (tx, r)
}

fn watch(r: Ctx, name: Option<String>, since: Option<u64>) -> Response<Body> {
    let mut events = r.shared.events.subscribe();
    // Subscribed first, then the replay: nothing falls between; duplicates are skipped by rv.
    let mut replay: std::collections::VecDeque<Event> = match since {
        Some(rv) => r
            .shared
            .history
            .lock()
            .map(|h| h.iter().filter(|e| e.rv > rv).cloned().collect())
            .unwrap_or_default(),
        None => Default::default(),
    };
    let (tx, resp) = streaming("application/json");
    tokio::spawn(async move {
        let deadline = tokio::time::sleep(MAX_STREAM);
        tokio::pin!(deadline);
        let mut first = true;
        let mut last_rv = since.unwrap_or(0);
        loop {
            let ev = if let Some(ev) = replay.pop_front() {
                ev
            } else {
                tokio::select! {
                    _ = &mut deadline => return,
                    _ = tx.closed() => return,
                    ev = events.recv() => match ev {
                        Ok(ev) => ev,
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    },
                }
            };
            if ev.rv <= last_rv {
                continue;
            }
            last_rv = ev.rv;
            let wanted = ev.group == r.group
                && ev.resource == r.resource
                && (r.ns.is_empty() || ev.ns == r.ns)
                && name
                    .as_deref()
                    .is_none_or(|n| ev.object["metadata"]["name"] == n);
            if !wanted {
                continue;
            }
            let object = if r.table {
                objects::table(&r.resource, ev.rv, std::slice::from_ref(&ev.object), first)
            } else {
                ev.object
            };
            first = false;
            let line = format!("{}\n", json!({"type": ev.kind, "object": object}));
            if tx.send(Bytes::from(line)).await.is_err() {
                return;
            }
        }
    });
    resp
}

fn log(pod: &str, follow: bool) -> Response<Body> {
    if !follow {
        let text: String = (1..=3)
            .map(|i| format!("log line {i} of {pod}\n"))
            .collect();
        return full(StatusCode::OK, "text/plain", text);
    }
    let (tx, resp) = streaming("text/plain");
    let pod = pod.to_string();
    tokio::spawn(async move {
        // One line every 100 ms for at most MAX_STREAM.
        for i in 1..=(MAX_STREAM.as_millis() / 100) {
            if tx
                .send(Bytes::from(format!("log line {i} of {pod}\n")))
                .await
                .is_err()
            {
                return;
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    resp
}

fn upgrade_exec(
    mut req: Request<Incoming>,
    command: Vec<String>,
    uploads: exec::Uploads,
    wanted: spdy_exec::Wanted,
) -> Response<Body> {
    const V4: &str = "v4.channel.k8s.io";
    if spdy_exec::wants_spdy(req.headers(), V4) {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                spdy_exec::serve_exec(TokioIo::new(upgraded), command, uploads, wanted).await;
            }
        });
        return spdy_exec::spdy_response(V4);
    }
    let h = req.headers();
    let protocol = h
        .get(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(exec::choose_protocol);
    let accept = websocket_accept(h);
    let (Some(protocol), Some(accept)) = (protocol, accept) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "the test API server speaks exec over WebSocket (v5.channel.k8s.io, v4.channel.k8s.io) or SPDY/3.1 (v4.channel.k8s.io) only");
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            exec::serve(upgraded, command, uploads).await;
        }
    });
    websocket_accepted(protocol, &accept)
}

/// The `Sec-WebSocket-Accept` for a request upgrading to WebSocket with a key; `None` for any
/// other request.
fn websocket_accept(h: &hyper::HeaderMap) -> Option<String> {
    let is_ws = h
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    h.get(hyper::header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|_| is_ws)
        .map(exec::accept_key)
}

/// `101 Switching Protocols` to WebSocket, with the subprotocol chosen and the key's accept.
fn websocket_accepted(protocol: &'static str, accept: &str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = resp.headers_mut();
    hs.insert(
        hyper::header::UPGRADE,
        HeaderValue::from_static("websocket"),
    );
    hs.insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    hs.insert(
        hyper::header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(protocol),
    );
    if let Ok(v) = HeaderValue::from_str(accept) {
        hs.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

fn upgrade_portforward(
    mut req: Request<Incoming>,
    forwards: spdy_exec::Forwards,
) -> Response<Body> {
    const PF: &str = "portforward.k8s.io";
    const TUNNELLED: &str = "SPDY/3.1+portforward.k8s.io";
    if spdy_exec::wants_spdy(req.headers(), PF) {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                spdy_exec::serve_portforward(TokioIo::new(upgraded), forwards).await;
            }
        });
        return spdy_exec::spdy_response(PF);
    }
    let h = req.headers();
    let tunnelled = h
        .get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim() == TUNNELLED));
    let accept = websocket_accept(h);
    let (true, Some(accept)) = (tunnelled, accept) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "the test API server speaks port-forward over SPDY/3.1 (portforward.k8s.io), plain or tunnelled in WebSocket, only");
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            spdy_exec::serve_tunnelled_portforward(upgraded, forwards).await;
        }
    });
    websocket_accepted(TUNNELLED, &accept)
}

/// Runs `kubectl` with `kubeconfig` and returns (success, stdout, stderr); bounded by `limit`.
pub fn kubectl(
    kubeconfig: &std::path::Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<(bool, String, String)> {
    kubectl_bin(
        std::path::Path::new("kubectl"),
        kubeconfig,
        args,
        stdin,
        limit,
    )
}

/// Debian's kubectl 1.20 (SPDY for exec, attach and port-forward), when `scripts/test` found
/// or unpacked one: `POSTERN_KUBECTL_SPDY`, else `target/tools/kubectl-1.20`.
pub fn spdy_kubectl() -> Option<std::path::PathBuf> {
    let named = std::env::var_os("POSTERN_KUBECTL_SPDY").map(std::path::PathBuf::from);
    let unpacked = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/tools/kubectl-1.20/usr/bin/kubectl");
    named
        .into_iter()
        .chain(std::iter::once(unpacked))
        .find(|p| p.is_file())
}

/// [`kubectl`] with a given kubectl binary.
pub fn kubectl_bin(
    bin: &std::path::Path,
    kubeconfig: &std::path::Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<(bool, String, String)> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env(
            "HOME",
            kubeconfig.parent().unwrap_or(std::path::Path::new("/tmp")),
        )
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl (install Debian's kubernetes-client)")?;
    if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(data)?;
    }
    let deadline = std::time::Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            return Err(anyhow!(
                "kubectl {args:?} ran past {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
