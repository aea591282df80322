//! Kubernetes API requests as the API server sees them, and the endpoint's scope decision.
//!
//! [`classify`] mirrors the API server's own `RequestInfoFactory` (k8s.io/apiserver
//! `pkg/endpoints/request/requestinfo.go`) after a strict path check: anything the API server
//! might read differently from us (encoded slashes, dot segments, doubled slashes, malformed
//! escapes, non-UTF-8) is refused, and the path that is authorised is the very bytes that are
//! forwarded (the classifier never rewrites it). [`decide`] is the RBAC-like scope check, a
//! pure function over a [`KubeScope`] compiled once per endpoint.

use std::borrow::Cow;
use std::fmt;

/// Why a request line cannot be classified (answered `400` without reaching the appliance).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("the path contains an empty segment (doubled or trailing slash)")]
    EmptySegment,
    #[error("the path contains a dot segment ('.' or '..')")]
    DotSegment,
    #[error("the path contains an encoded slash or backslash")]
    EncodedSlash,
    #[error("the path or query contains a malformed percent escape")]
    MalformedEscape,
    #[error("the path or query is not valid UTF-8 once decoded")]
    NotUtf8,
    #[error("the path or query contains a character that must be escaped")]
    BadCharacter,
    #[error("the query contains ';', which the API server does not accept as a separator")]
    Semicolon,
    #[error("a watch or proxy path names no resource")]
    MissingResource,
}

/// One path segment: the bytes as received and their percent-decoded text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment<'a> {
    pub raw: &'a str,
    pub text: Cow<'a, str>,
}

/// What the API server's RequestInfo would say about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo<'a> {
    /// The path exactly as received (and as it will be forwarded).
    pub path: &'a str,
    pub is_resource_request: bool,
    /// get, list, watch, create, update, patch, delete, deletecollection, proxy, or the
    /// lower-cased method for non-resource requests ("" for unknown methods on resources).
    pub verb: Cow<'a, str>,
    /// `api` or `apis` for resource requests.
    pub api_prefix: &'a str,
    pub api_group: Cow<'a, str>,
    pub api_version: Cow<'a, str>,
    /// `None` for cluster-wide requests (all namespaces, or cluster-scoped resources).
    pub namespace: Option<Cow<'a, str>>,
    pub resource: Cow<'a, str>,
    pub subresource: Cow<'a, str>,
    pub name: Cow<'a, str>,
}

const API_PREFIXES: [&str; 2] = ["api", "apis"];
const SPECIAL_VERBS: [&str; 2] = ["proxy", "watch"];
const NAMESPACE_SUBRESOURCES: [&str; 2] = ["status", "finalize"];

/// Checks the path strictly and returns its segments (an empty list for `/`).
pub fn split_path(path: &str) -> Result<Vec<Segment<'_>>, PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    rest.split('/').map(segment).collect()
}

fn segment(raw: &str) -> Result<Segment<'_>, PathError> {
    if raw.is_empty() {
        return Err(PathError::EmptySegment);
    }
    if raw.bytes().any(|b| !is_path_char(b)) {
        return Err(PathError::BadCharacter);
    }
    let text = percent_decode(raw, false)?;
    if text.contains(['/', '\\']) {
        return Err(PathError::EncodedSlash);
    }
    if text == "." || text == ".." {
        return Err(PathError::DotSegment);
    }
    Ok(Segment { raw, text })
}

/// RFC 3986 pchar plus '%' (checked by the decoder). Anything else (spaces, quotes, control
/// characters, '#', '?') has no business in a forwarded path.
fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@%".contains(&b)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes (and, in queries, turns '+' into ' ' as Go's `QueryUnescape` does).
/// Borrows when there is nothing to decode.
fn percent_decode(s: &str, plus_is_space: bool) -> Result<Cow<'_, str>, PathError> {
    if !s.bytes().any(|b| b == b'%' || (plus_is_space && b == b'+')) {
        return Ok(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hi = bytes
                    .get(i + 1)
                    .copied()
                    .and_then(hex)
                    .ok_or(PathError::MalformedEscape)?;
                let lo = bytes
                    .get(i + 2)
                    .copied()
                    .and_then(hex)
                    .ok_or(PathError::MalformedEscape)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| PathError::NotUtf8)
}

/// The first value of `key` in a query string, decoded as Go's `url.ParseQuery` would.
/// Malformed escapes and ';' separators are errors (Go would silently drop such pairs, which
/// would make us and the API server read different queries).
pub fn query_value<'q>(
    query: Option<&'q str>,
    key: &str,
) -> Result<Option<Cow<'q, str>>, PathError> {
    let Some(query) = query else { return Ok(None) };
    let mut found = None;
    for pair in query.split('&') {
        if pair.contains(';') {
            return Err(PathError::Semicolon);
        }
        if pair.bytes().any(|b| b <= b' ' || b >= 0x7f || b == b'#') {
            return Err(PathError::BadCharacter);
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k, true)?;
        let v = percent_decode(v, true)?;
        if found.is_none() && k == key {
            found = Some(v);
        }
    }
    Ok(found)
}

/// `Convert_Slice_string_To_bool` in apimachinery: only "", "0" and "false" (any case) are false.
fn query_bool(v: Option<&str>) -> bool {
    match v {
        None => false,
        Some(v) => !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false")),
    }
}

/// Classifies a request the way the API server's `RequestInfoFactory.NewRequestInfo` does.
/// `query` is the raw query string without '?'. Every query pair is validated, so a request
/// accepted here is read the same way upstream.
pub fn classify<'a>(
    method: &str,
    path: &'a str,
    query: Option<&'a str>,
) -> Result<RequestInfo<'a>, PathError> {
    let segments = split_path(path)?;
    let watch_param = query_value(query, "watch")?;
    let mut info = RequestInfo {
        path,
        is_resource_request: false,
        verb: Cow::Owned(method.to_ascii_lowercase()),
        api_prefix: "",
        api_group: Cow::Borrowed(""),
        api_version: Cow::Borrowed(""),
        namespace: None,
        resource: Cow::Borrowed(""),
        subresource: Cow::Borrowed(""),
        name: Cow::Borrowed(""),
    };
    let mut parts: &[Segment<'a>] = &segments;
    // At least /api/v1/<resource> or /apis/<group>/<version>/<resource>.
    let Some((prefix, rest)) = parts.split_first().filter(|_| parts.len() >= 3) else {
        return Ok(info);
    };
    let Some(api_prefix) = API_PREFIXES.iter().find(|p| **p == prefix.text) else {
        return Ok(info);
    };
    parts = rest;
    let mut group = Cow::Borrowed("");
    if *api_prefix == "apis" {
        if parts.len() < 3 {
            return Ok(info);
        }
        let Some((g, rest)) = parts.split_first() else {
            return Ok(info);
        };
        group = g.text.clone();
        parts = rest;
    }
    let Some((version, rest)) = parts.split_first() else {
        return Ok(info);
    };
    parts = rest;
    info.is_resource_request = true;
    info.api_prefix = api_prefix;
    info.api_group = group;
    info.api_version = version.text.clone();

    match parts.split_first() {
        Some((first, rest)) if SPECIAL_VERBS.contains(&first.text.as_ref()) => {
            if rest.is_empty() {
                return Err(PathError::MissingResource);
            }
            info.verb = first.text.clone();
            parts = rest;
        }
        _ => {
            info.verb = Cow::Borrowed(match method {
                "POST" => "create",
                "GET" | "HEAD" => "get",
                "PUT" => "update",
                "PATCH" => "patch",
                "DELETE" => "delete",
                _ => "",
            })
        }
    }

    if let Some((first, rest)) = parts.split_first() {
        if first.text == "namespaces" {
            if let Some(ns) = rest.first() {
                info.namespace = Some(ns.text.clone());
                if let Some(next) = rest.get(1) {
                    if !NAMESPACE_SUBRESOURCES.contains(&next.text.as_ref()) {
                        parts = rest.get(1..).unwrap_or_default();
                    }
                }
            }
        }
    }

    let no_subresources = info.verb == "proxy";
    if let Some(r) = parts.first() {
        info.resource = r.text.clone();
    }
    if let Some(n) = parts.get(1) {
        info.name = n.text.clone();
    }
    if let Some(s) = parts.get(2).filter(|_| !no_subresources) {
        info.subresource = s.text.clone();
    }

    if info.name.is_empty() && info.verb == "get" {
        info.verb = Cow::Borrowed(if query_bool(watch_param.as_deref()) {
            "watch"
        } else {
            "list"
        });
    }
    if info.name.is_empty() && info.verb == "delete" {
        info.verb = Cow::Borrowed("deletecollection");
    }
    Ok(info)
}

/// The verbs a scope may grant.
pub const VERBS: [&str; 8] = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
];

/// Subresources that open a stream into a container: RBAC authorises them as `create`
/// whichever method (POST for SPDY, GET for WebSocket) carries them.
const CONNECT_SUBRESOURCES: [&str; 3] = ["exec", "attach", "portforward"];

#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    group: String,
    resource: String,
    subresource: String,
}

/// Verbs that only read: what passes when the appliance has no identity to impersonate
/// (`pods/log` is a `get`).
pub const READ_VERBS: [&str; 3] = ["get", "list", "watch"];

/// Why a scope cannot be compiled (the customer's config is wrong).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("no namespaces: a kubernetes resource must list the namespaces it exposes")]
    NoNamespaces,
    #[error("namespace {0:?} is not a valid namespace name")]
    BadNamespace(String),
    #[error(transparent)]
    Resource(#[from] crate::kube_names::NameError),
    #[error("unknown verb {0:?}; known: get, list, watch, create, update, patch, delete, deletecollection")]
    UnknownVerb(String),
}

/// An endpoint's scope, compiled once: literal namespaces, granted (group, resource,
/// subresource) triples and a verb bit set. [`decide`] allocates nothing when it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeScope {
    namespaces: Vec<String>,
    grants: Vec<Grant>,
    verbs: u16,
    /// Set by [`KubeScope::reads_only`]: writes are refused whatever `verbs` grants.
    reads_only: bool,
}

impl KubeScope {
    pub fn compile<S: AsRef<str>>(
        namespaces: &[S],
        resources: &[S],
        verbs: &[S],
    ) -> Result<KubeScope, ScopeError> {
        if namespaces.is_empty() {
            return Err(ScopeError::NoNamespaces);
        }
        let mut scope = KubeScope {
            namespaces: Vec::new(),
            grants: Vec::new(),
            verbs: 0,
            reads_only: false,
        };
        for ns in namespaces {
            let ns = ns.as_ref();
            if !is_dns_label(ns) {
                return Err(ScopeError::BadNamespace(ns.to_string()));
            }
            scope.namespaces.push(ns.to_string());
        }
        for r in resources {
            let name = crate::kube_names::ResourceName::parse(r.as_ref())?;
            name.check_not_cluster_scoped()?;
            // A bare name is a built-in's group or core here: the agent resolves bare names
            // through discovery into group-qualified ones before it compiles or reports them.
            let g = Grant {
                group: name.group_or_builtin().to_string(),
                resource: name.resource,
                subresource: name.subresource,
            };
            if !scope.grants.contains(&g) {
                scope.grants.push(g);
            }
        }
        for v in verbs {
            let bit = verb_bit(v.as_ref())
                .ok_or_else(|| ScopeError::UnknownVerb(v.as_ref().to_string()))?;
            scope.verbs |= bit;
        }
        Ok(scope)
    }

    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Only reads pass (get, list, watch; `pods/log` is a get): for a resource the appliance
    /// reaches with no identity to impersonate, so that no write is ever made with the
    /// appliance's own credential.
    pub fn reads_only(mut self) -> KubeScope {
        self.reads_only = true;
        self
    }

    pub fn is_reads_only(&self) -> bool {
        self.reads_only
    }

    fn granted(&self, group: &str, resource: &str, subresource: &str) -> bool {
        self.grants
            .iter()
            .any(|g| g.group == group && g.resource == resource && g.subresource == subresource)
    }
}

fn verb_bit(v: &str) -> Option<u16> {
    VERBS.iter().position(|k| *k == v).map(|i| 1 << i)
}

/// RFC 1123 label, as Kubernetes requires of namespace names.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// What the front end does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A resource request inside the scope.
    Allow,
    /// A read of discovery or OpenAPI documents, which kubectl needs to work at all.
    Discovery,
    /// Refused with `403` and this message.
    Deny { reason: String },
}

/// Whether a non-resource path is discovery: `/api`, `/api/<v>`, `/apis`, `/apis/<g>`,
/// `/apis/<g>/<v>`, `/version`, `/openapi/v2`, `/openapi/v3` and below.
fn is_discovery(path: &str) -> bool {
    let Ok(segs) = split_path(path) else {
        return false;
    };
    let t: Vec<&str> = segs.iter().map(|s| s.raw).collect();
    matches!(
        t.as_slice(),
        ["api"]
            | ["api", _]
            | ["apis"]
            | ["apis", _]
            | ["apis", _, _]
            | ["version"]
            | ["openapi", "v2"]
            | ["openapi", "v3", ..]
    )
}

/// The scope decision. The effective verb of exec/attach/portforward is `create`, as the API
/// server authorises WebSocket (GET) and SPDY (POST) upgrades alike.
pub fn decide(info: &RequestInfo<'_>, scope: &KubeScope) -> Decision {
    if !info.is_resource_request {
        if (info.verb == "get" || info.verb == "head") && is_discovery(info.path) {
            return Decision::Discovery;
        }
        return deny(format!("{} {} is not a resource this endpoint exposes (only namespaced resources and discovery are)", info.verb.to_uppercase(), info.path));
    }
    let what = display_resource(info);
    let Some(ns) = info.namespace.as_deref() else {
        return deny(format!(
            "{} {what} across the whole cluster is outside this endpoint's scope: name a namespace (-n {})",
            info.verb,
            scope.namespaces.join(" or -n ")
        ));
    };
    if !scope.namespaces.iter().any(|n| n == ns) {
        return deny(format!(
            "namespace {ns:?} is outside this endpoint's scope (allowed: {})",
            scope.namespaces.join(", ")
        ));
    }
    if info.resource == "namespaces" || info.resource.is_empty() {
        return deny(format!(
            "{} on namespace {ns:?} itself is outside this endpoint's scope",
            info.verb
        ));
    }
    let connect = CONNECT_SUBRESOURCES.contains(&info.subresource.as_ref());
    let verb: &str = if connect && (info.verb == "get" || info.verb == "create") {
        "create"
    } else {
        &info.verb
    };
    if !scope.granted(&info.api_group, &info.resource, &info.subresource) {
        return deny(format!(
            "{what} is not among the resources this endpoint grants in namespace {ns:?}"
        ));
    }
    let Some(bit) = verb_bit(verb) else {
        return deny(format!(
            "the verb {:?} on {what} is not available through this endpoint",
            info.verb
        ));
    };
    if scope.verbs & bit == 0 {
        return deny(format!(
            "the verb {verb:?} on {what} is not granted by this endpoint"
        ));
    }
    if scope.reads_only && !READ_VERBS.contains(&verb) {
        return deny(format!(
            "the verb {verb:?} on {what} needs impersonation: this resource names no `impersonate` identity in agent.toml, so the appliance forwards reads only (get, list, watch, logs)"
        ));
    }
    Decision::Allow
}

fn deny(reason: String) -> Decision {
    Decision::Deny { reason }
}

/// `pods`, `pods/exec`, `deployments.apps/scale`: the RBAC name of what was asked for.
pub fn display_resource(info: &RequestInfo<'_>) -> String {
    let mut s = info.resource.to_string();
    if !info.api_group.is_empty() {
        s.push('.');
        s.push_str(&info.api_group);
    }
    if !info.subresource.is_empty() {
        s.push('/');
        s.push_str(&info.subresource);
    }
    s
}

/// Request headers that claim an identity and never cross a Postern proxy: the client's own
/// credentials, impersonation (`Impersonate-*`), and the authenticating-proxy headers an API
/// server's request-header authenticator trusts (`X-Remote-User`, `X-Remote-Group`,
/// `X-Remote-Extra-*`). Names as hyper gives them (lower case).
pub fn is_identity_header(name: &str) -> bool {
    name == "authorization"
        || name == "proxy-authorization"
        || name.starts_with("impersonate-")
        || name.starts_with("x-remote-")
}

/// Whether a request header crosses a Postern kube proxy (gateway to agent, agent to the API
/// server): never an identity claim ([`is_identity_header`]) nor a hop-by-hop header;
/// `Connection` and `Upgrade` only on an upgrade (exec, attach, port-forward).
/// `Content-Length` is dropped because the proxy re-frames the body it read. Names in lower
/// case, as hyper gives them.
pub fn forwardable_header(name: &str, upgrade: bool) -> bool {
    if is_identity_header(name) {
        return false;
    }
    match name {
        "keep-alive" | "te" | "trailer" | "transfer-encoding" | "proxy-connection"
        | "content-length" => false,
        "connection" | "upgrade" => upgrade,
        _ => true,
    }
}

/// Whether a request asks for an HTTP upgrade: it has an `Upgrade` header and one of its
/// `Connection` values (those that are text) lists the `upgrade` token.
pub fn asks_upgrade<'a>(
    has_upgrade_header: bool,
    connection_values: impl IntoIterator<Item = &'a str>,
) -> bool {
    has_upgrade_header
        && connection_values.into_iter().any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
}

/// What an exec or attach runs, for the audit records: the `command=` arguments in order
/// and the `container=` named (None when the request names none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamTarget {
    pub command: Vec<String>,
    pub container: Option<String>,
}

/// The [`StreamTarget`] of an exec or attach request (`None` for any other request). The
/// query was validated by [`classify`]; pairs that fail to decode are skipped.
pub fn stream_target(info: &RequestInfo<'_>, query: Option<&str>) -> Option<StreamTarget> {
    if !matches!(info.subresource.as_ref(), "exec" | "attach") || !info.is_resource_request {
        return None;
    }
    let mut t = StreamTarget::default();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Ok(k), Ok(v)) = (percent_decode(k, true), percent_decode(v, true)) else {
            continue;
        };
        match k.as_ref() {
            "command" => t.command.push(v.into_owned()),
            "container" if t.container.is_none() => t.container = Some(v.into_owned()),
            _ => {}
        }
    }
    Some(t)
}

/// A Kubernetes `Status` object, as the API server sends with errors; kubectl prints
/// `Error from server (<reason>): <message>`.
pub fn status_json(code: u16, reason: &str, message: &str) -> String {
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
    .to_string()
}

/// `403 Forbidden` with the scope's reason, prefixed so the user sees who refused.
pub fn forbidden_status(reason: &str) -> String {
    status_json(
        403,
        "Forbidden",
        &format!("postern endpoint scope: {reason}"),
    )
}

impl fmt::Display for RequestInfo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.is_resource_request {
            return write!(f, "{} {}", self.verb, self.path);
        }
        write!(f, "{} {}", self.verb, display_resource(self))?;
        if let Some(ns) = &self.namespace {
            write!(f, " in {ns}")?;
        }
        if !self.name.is_empty() {
            write!(f, " name {}", self.name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "kube_request_tests.rs"]
mod tests;
