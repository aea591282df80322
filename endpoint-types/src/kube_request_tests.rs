use super::*;
use proptest::prelude::*;

fn scope() -> KubeScope {
    KubeScope::compile(
        &["my-app-prod", "my-app-jobs"],
        &[
            "pods",
            "pods/log",
            "pods/exec",
            "deployments",
            "deployments/scale",
            "replicasets",
            "services",
            "configmaps",
            "events",
        ],
        &["get", "list", "watch", "create", "delete", "patch"],
    )
    .unwrap()
}

struct Case {
    method: &'static str,
    uri: &'static str,
    verb: &'static str,
    group: &'static str,
    ns: Option<&'static str>,
    resource: &'static str,
    sub: &'static str,
    name: &'static str,
}

fn split(uri: &str) -> (&str, Option<&str>) {
    match uri.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (uri, None),
    }
}

#[test]
fn classifies_like_the_api_server() {
    let c = |method, uri, verb, group, ns, resource, sub, name| Case {
        method,
        uri,
        verb,
        group,
        ns,
        resource,
        sub,
        name,
    };
    let cases = [
        c(
            "GET",
            "/api/v1/namespaces/a/pods",
            "list",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a/pods?limit=500",
            "list",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a/pods?watch=true&resourceVersion=1",
            "watch",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a/pods?watch=1",
            "watch",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a/pods?watch=yes",
            "watch",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a/pods?watch=false",
            "list",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a/pods?watch=FALSE",
            "list",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a/pods?watch=0",
            "list",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a/pods?watch",
            "list",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a/pods?w%61tch=t",
            "watch",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a/pods?watch=0&watch=1",
            "list",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a/pods/p",
            "get",
            "",
            Some("a"),
            "pods",
            "",
            "p",
        ),
        c(
            "HEAD",
            "/api/v1/namespaces/a/pods/p",
            "get",
            "",
            Some("a"),
            "pods",
            "",
            "p",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a/pods/p/log?follow=true",
            "get",
            "",
            Some("a"),
            "pods",
            "log",
            "p",
        ),
        c(
            "POST",
            "/api/v1/namespaces/a/pods/p/exec?command=sh",
            "create",
            "",
            Some("a"),
            "pods",
            "exec",
            "p",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a/pods/p/exec?command=sh",
            "get",
            "",
            Some("a"),
            "pods",
            "exec",
            "p",
        ),
        c(
            "POST",
            "/api/v1/namespaces/a/pods",
            "create",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c(
            "PUT",
            "/api/v1/namespaces/a/pods/p",
            "update",
            "",
            Some("a"),
            "pods",
            "",
            "p",
        ),
        c(
            "PATCH",
            "/apis/apps/v1/namespaces/a/deployments/d/scale",
            "patch",
            "apps",
            Some("a"),
            "deployments",
            "scale",
            "d",
        ),
        c(
            "DELETE",
            "/api/v1/namespaces/a/pods/p",
            "delete",
            "",
            Some("a"),
            "pods",
            "",
            "p",
        ),
        c(
            "DELETE",
            "/api/v1/namespaces/a/pods",
            "deletecollection",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c("GET", "/api/v1/pods", "list", "", None, "pods", "", ""),
        c(
            "GET",
            "/api/v1/nodes/n1",
            "get",
            "",
            None,
            "nodes",
            "",
            "n1",
        ),
        c(
            "GET",
            "/api/v1/namespaces",
            "list",
            "",
            None,
            "namespaces",
            "",
            "",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a",
            "get",
            "",
            Some("a"),
            "namespaces",
            "",
            "a",
        ),
        c(
            "PUT",
            "/api/v1/namespaces/a/finalize",
            "update",
            "",
            Some("a"),
            "namespaces",
            "finalize",
            "a",
        ),
        c(
            "GET",
            "/api/v1/watch/namespaces/a/pods",
            "watch",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c(
            "GET",
            "/api/v1/watch/namespaces/a/pods/p",
            "watch",
            "",
            Some("a"),
            "pods",
            "",
            "p",
        ),
        c(
            "GET",
            "/api/v1/proxy/namespaces/a/pods/p/x/y",
            "proxy",
            "",
            Some("a"),
            "pods",
            "",
            "p",
        ),
        c(
            "GET",
            "/apis/apps/v1/namespaces/a/deployments",
            "list",
            "apps",
            Some("a"),
            "deployments",
            "",
            "",
        ),
        c(
            "OPTIONS",
            "/api/v1/namespaces/a/pods",
            "",
            "",
            Some("a"),
            "pods",
            "",
            "",
        ),
        c(
            "GET",
            "/api/v1/namespaces/a/pods/p%2Dx",
            "get",
            "",
            Some("a"),
            "pods",
            "",
            "p-x",
        ),
    ];
    for case in cases {
        let (path, query) = split(case.uri);
        let info =
            classify(case.method, path, query).unwrap_or_else(|e| panic!("{}: {e}", case.uri));
        assert!(info.is_resource_request, "{}", case.uri);
        assert_eq!(info.path, path);
        assert_eq!(info.verb, case.verb, "{} {}", case.method, case.uri);
        assert_eq!(info.api_group, case.group, "{}", case.uri);
        assert_eq!(info.namespace.as_deref(), case.ns, "{}", case.uri);
        assert_eq!(info.resource, case.resource, "{}", case.uri);
        assert_eq!(info.subresource, case.sub, "{}", case.uri);
        assert_eq!(info.name, case.name, "{}", case.uri);
    }
}

#[test]
fn non_resource_paths() {
    for p in [
        "/",
        "/api",
        "/api/v1",
        "/apis",
        "/apis/apps",
        "/apis/apps/v1",
        "/version",
        "/openapi/v2",
        "/healthz",
        "/foo/bar/baz/qux",
    ] {
        let info = classify("GET", p, None).unwrap();
        assert!(!info.is_resource_request, "{p}");
        assert_eq!(info.verb, "get");
    }
}

#[test]
fn strict_paths() {
    let bad = [
        ("api/v1", PathError::NotAbsolute),
        ("", PathError::NotAbsolute),
        ("/api//v1/namespaces/a/pods", PathError::EmptySegment),
        ("/api/v1/namespaces/a/pods/", PathError::EmptySegment),
        ("/api/v1/namespaces/./pods", PathError::DotSegment),
        ("/api/v1/namespaces/a/../b/pods", PathError::DotSegment),
        ("/api/v1/namespaces/%2e%2E/pods", PathError::DotSegment),
        ("/api/v1/namespaces/a%2Fb/pods", PathError::EncodedSlash),
        ("/api/v1/namespaces/a%2fb/pods", PathError::EncodedSlash),
        ("/api/v1/namespaces/a%5Cb/pods", PathError::EncodedSlash),
        ("/api/v1/namespaces/a%5cb/pods", PathError::EncodedSlash),
        ("/api/v1/namespaces/a%zz/pods", PathError::MalformedEscape),
        ("/api/v1/namespaces/a%2/pods", PathError::MalformedEscape),
        ("/api/v1/namespaces/a%/pods", PathError::MalformedEscape),
        ("/api/v1/namespaces/a%ff/pods", PathError::NotUtf8),
        ("/api/v1/namespaces/a b/pods", PathError::BadCharacter),
        ("/api/v1/namespaces/a\\b/pods", PathError::BadCharacter),
        ("/api/v1/watch", PathError::MissingResource),
    ];
    for (p, want) in bad {
        assert_eq!(classify("GET", p, None).unwrap_err(), want, "{p:?}");
    }
    assert_eq!(
        classify("GET", "/api/v1/namespaces/a/pods", Some("a=1;watch=1")).unwrap_err(),
        PathError::Semicolon
    );
    assert_eq!(
        classify("GET", "/api/v1/namespaces/a/pods", Some("watch=%zz")).unwrap_err(),
        PathError::MalformedEscape
    );
}

#[test]
fn decisions() {
    let s = scope();
    let allow = [
        ("GET", "/api/v1/namespaces/my-app-prod/pods"),
        ("GET", "/api/v1/namespaces/my-app-jobs/pods?watch=true"),
        ("GET", "/api/v1/namespaces/my-app-prod/pods/p"),
        (
            "GET",
            "/api/v1/namespaces/my-app-prod/pods/p/log?follow=true",
        ),
        (
            "GET",
            "/api/v1/namespaces/my-app-prod/pods/p/exec?command=ls",
        ),
        (
            "POST",
            "/api/v1/namespaces/my-app-prod/pods/p/exec?command=ls",
        ),
        ("DELETE", "/api/v1/namespaces/my-app-prod/pods/p"),
        ("GET", "/apis/apps/v1/namespaces/my-app-prod/deployments"),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/my-app-prod/deployments/d/scale",
        ),
        (
            "GET",
            "/api/v1/namespaces/my-app-prod/events?fieldSelector=involvedObject.name%3Dp",
        ),
        ("GET", "/api/v1/watch/namespaces/my-app-prod/pods"),
    ];
    for (m, uri) in allow {
        let (p, q) = split(uri);
        assert_eq!(
            decide(&classify(m, p, q).unwrap(), &s),
            Decision::Allow,
            "{m} {uri}"
        );
    }
    for uri in [
        "/api",
        "/api/v1",
        "/apis",
        "/apis/apps/v1",
        "/version",
        "/openapi/v2",
        "/openapi/v3",
        "/openapi/v3/api/v1",
    ] {
        assert_eq!(
            decide(&classify("GET", uri, None).unwrap(), &s),
            Decision::Discovery,
            "{uri}"
        );
    }
    let denied = [
        (
            "GET",
            "/api/v1/namespaces/kube-system/pods",
            "namespace \"kube-system\"",
        ),
        ("GET", "/api/v1/pods", "whole cluster"),
        ("GET", "/api/v1/watch/pods", "whole cluster"),
        ("GET", "/api/v1/nodes", "whole cluster"),
        ("GET", "/api/v1/nodes/n1", "whole cluster"),
        ("GET", "/api/v1/namespaces", "whole cluster"),
        (
            "GET",
            "/api/v1/namespaces/my-app-prod",
            "namespace \"my-app-prod\" itself",
        ),
        ("DELETE", "/api/v1/namespaces/my-app-prod", "itself"),
        (
            "GET",
            "/api/v1/namespaces/my-app-prod/secrets",
            "secrets is not among",
        ),
        (
            "GET",
            "/api/v1/namespaces/my-app-prod/pods/p/attach",
            "pods/attach is not among",
        ),
        (
            "POST",
            "/api/v1/namespaces/my-app-prod/pods/p/portforward",
            "pods/portforward",
        ),
        (
            "GET",
            "/api/v1/namespaces/my-app-prod/pods/p/status",
            "pods/status",
        ),
        (
            "GET",
            "/api/v1/namespaces/my-app-prod/pods/p/proxy",
            "pods/proxy",
        ),
        (
            "GET",
            "/api/v1/proxy/namespaces/my-app-prod/pods/p",
            "\"proxy\"",
        ),
        ("PUT", "/api/v1/namespaces/my-app-prod/pods/p", "\"update\""),
        (
            "DELETE",
            "/api/v1/namespaces/my-app-prod/pods",
            "\"deletecollection\"",
        ),
        ("OPTIONS", "/api/v1/namespaces/my-app-prod/pods", "verb"),
        (
            "GET",
            "/apis/extensions/v1beta1/namespaces/my-app-prod/deployments",
            "deployments.extensions",
        ),
        (
            "GET",
            "/apis/events.k8s.io/v1/namespaces/my-app-prod/events",
            "events.events.k8s.io",
        ),
        (
            "GET",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            "whole cluster",
        ),
        ("GET", "/healthz", "not a resource"),
        ("GET", "/logs/", "not a resource"),
        ("POST", "/api", "not a resource"),
        ("GET", "/metrics", "not a resource"),
    ];
    for (m, uri, want) in denied {
        let (p, q) = split(uri);
        match classify(m, p, q).map(|i| decide(&i, &s)) {
            Ok(Decision::Deny { reason }) => assert!(reason.contains(want), "{m} {uri}: {reason}"),
            Err(_) => {}
            other => panic!("{m} {uri}: {other:?}"),
        }
    }
}

#[test]
fn exec_needs_create_and_its_subresource() {
    let read_only = KubeScope::compile(&["ns"], &["pods", "pods/exec"], &["get", "list"]).unwrap();
    let info = classify(
        "GET",
        "/api/v1/namespaces/ns/pods/p/exec",
        Some("command=sh"),
    )
    .unwrap();
    assert!(
        matches!(decide(&info, &read_only), Decision::Deny { reason } if reason.contains("\"create\""))
    );
    let no_sub = KubeScope::compile(&["ns"], &["pods"], &["get", "create"]).unwrap();
    assert!(matches!(decide(&info, &no_sub), Decision::Deny { .. }));
}

#[test]
fn compiles_rbac_names() {
    let any = KubeScope::compile(
        &["a"],
        &[
            "deployments.apps",
            "deployments.apps/scale",
            "events.events.k8s.io",
            "statefulsets.apps",
            "jobs.batch",
            "cronjobs.batch",
            "ingresses.networking.k8s.io",
            "persistentvolumeclaims",
            "rolebindings.rbac.authorization.k8s.io",
            "certificates.cert-manager.io",
            "certificates.cert-manager.io/status",
        ],
        &["get", "list", "patch"],
    )
    .unwrap();
    let d = |m: &str, p: &str| decide(&classify(m, p, None).unwrap(), &any);
    for p in [
        "/apis/apps/v1/namespaces/a/statefulsets/db",
        "/apis/batch/v1/namespaces/a/jobs",
        "/apis/batch/v1/namespaces/a/cronjobs/nightly",
        "/apis/networking.k8s.io/v1/namespaces/a/ingresses",
        "/api/v1/namespaces/a/persistentvolumeclaims/data",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/a/rolebindings",
        "/apis/cert-manager.io/v1/namespaces/a/certificates/web-tls",
        "/apis/cert-manager.io/v1/namespaces/a/certificates/web-tls/status",
        "/apis/events.k8s.io/v1/namespaces/a/events",
    ] {
        assert_eq!(d("GET", p), Decision::Allow, "{p}");
    }
    // The group is part of the grant, and a subresource is its own grant.
    assert!(
        matches!(d("GET", "/apis/example.com/v1/namespaces/a/certificates"), Decision::Deny { reason } if reason.contains("certificates.example.com"))
    );
    assert!(
        matches!(d("GET", "/apis/apps/v1/namespaces/a/statefulsets/db/scale"), Decision::Deny { reason } if reason.contains("statefulsets.apps/scale"))
    );
    assert!(matches!(
        d("GET", "/api/v1/namespaces/a/statefulsets"),
        Decision::Deny { .. }
    ));
    assert!(
        matches!(d("GET", "/apis/apps/v1/statefulsets"), Decision::Deny { reason } if reason.contains("whole cluster"))
    );

    let bad = |r: &str| KubeScope::compile(&["a"], &[r], &["get"]).unwrap_err();
    use crate::kube_names::NameError;
    assert_eq!(
        bad("nodes"),
        ScopeError::Resource(NameError::ClusterScoped("nodes".into()))
    );
    assert_eq!(
        bad("clusterroles.rbac.authorization.k8s.io"),
        ScopeError::Resource(NameError::ClusterScoped(
            "clusterroles.rbac.authorization.k8s.io".into()
        ))
    );
    assert_eq!(
        bad("pods."),
        ScopeError::Resource(NameError::Malformed("pods.".into()))
    );
    assert_eq!(
        bad("*"),
        ScopeError::Resource(NameError::Malformed("*".into()))
    );
    assert!(bad("nodes").to_string().contains("nodes"));
    assert_eq!(
        KubeScope::compile(&["a"], &["pods"], &["escalate"]).unwrap_err(),
        ScopeError::UnknownVerb("escalate".into())
    );
    assert_eq!(
        KubeScope::compile::<&str>(&[], &["pods"], &["get"]).unwrap_err(),
        ScopeError::NoNamespaces
    );
    assert!(matches!(
        KubeScope::compile(&["A"], &["pods"], &["get"]),
        Err(ScopeError::BadNamespace(_))
    ));
    assert!(matches!(
        KubeScope::compile(&["*"], &["pods"], &["get"]),
        Err(ScopeError::BadNamespace(_))
    ));
    // The two events are distinct grants.
    let core_only = KubeScope::compile(&["a"], &["events"], &["list"]).unwrap();
    let info = classify("GET", "/apis/events.k8s.io/v1/namespaces/a/events", None).unwrap();
    assert!(matches!(decide(&info, &core_only), Decision::Deny { .. }));
}

#[test]
fn without_impersonation_only_reads_pass() {
    let s = KubeScope::compile(
        &["a"],
        &["pods", "pods/log", "pods/exec", "pods/attach", "configmaps"],
        &[
            "get",
            "list",
            "watch",
            "create",
            "delete",
            "patch",
            "update",
            "deletecollection",
        ],
    )
    .unwrap()
    .reads_only();
    assert!(s.is_reads_only());
    let d = |m: &str, p: &str, q: Option<&str>| decide(&classify(m, p, q).unwrap(), &s);
    for (m, p, q) in [
        ("GET", "/api/v1/namespaces/a/pods", None),
        ("GET", "/api/v1/namespaces/a/pods", Some("watch=true")),
        ("GET", "/api/v1/namespaces/a/pods/p", None),
        (
            "GET",
            "/api/v1/namespaces/a/pods/p/log",
            Some("follow=true"),
        ),
    ] {
        assert_eq!(d(m, p, q), Decision::Allow, "{m} {p}");
    }
    for (m, p) in [
        ("DELETE", "/api/v1/namespaces/a/pods/p"),
        ("DELETE", "/api/v1/namespaces/a/pods"),
        ("POST", "/api/v1/namespaces/a/configmaps"),
        ("PUT", "/api/v1/namespaces/a/configmaps/c"),
        ("PATCH", "/api/v1/namespaces/a/configmaps/c"),
        ("GET", "/api/v1/namespaces/a/pods/p/exec"),
        ("POST", "/api/v1/namespaces/a/pods/p/exec"),
        ("GET", "/api/v1/namespaces/a/pods/p/attach"),
    ] {
        assert!(
            matches!(d(m, p, Some("command=sh")), Decision::Deny { reason } if reason.contains("needs impersonation")),
            "{m} {p}"
        );
    }
}

#[test]
fn identity_headers_and_stream_targets() {
    for h in [
        "authorization",
        "proxy-authorization",
        "impersonate-user",
        "impersonate-extra-scopes",
        "x-remote-user",
        "x-remote-group",
        "x-remote-extra-scopes",
    ] {
        assert!(is_identity_header(h), "{h}");
    }
    for h in [
        "accept",
        "content-type",
        "x-stream-protocol-version",
        "user-agent",
        "x-remote",
    ] {
        assert!(!is_identity_header(h), "{h}");
    }
    let q = "command=sh&command=-c&command=echo+hi%3B+id&container=app&stdout=true&container=other";
    let info = classify("GET", "/api/v1/namespaces/a/pods/p/exec", Some(q)).unwrap();
    let t = stream_target(&info, Some(q)).unwrap();
    assert_eq!(t.command, ["sh", "-c", "echo hi; id"]);
    assert_eq!(t.container.as_deref(), Some("app"));
    let info = classify(
        "POST",
        "/api/v1/namespaces/a/pods/p/attach",
        Some("stdin=true"),
    )
    .unwrap();
    assert_eq!(
        stream_target(&info, Some("stdin=true")),
        Some(StreamTarget::default())
    );
    let info = classify(
        "GET",
        "/api/v1/namespaces/a/pods/p/log",
        Some("container=app"),
    )
    .unwrap();
    assert_eq!(stream_target(&info, Some("container=app")), None);
}

#[test]
fn status_is_a_kubernetes_status() {
    let v: serde_json::Value =
        serde_json::from_str(&forbidden_status("namespace \"x\" is outside")).unwrap();
    assert_eq!(v["kind"], "Status");
    assert_eq!(v["apiVersion"], "v1");
    assert_eq!(v["status"], "Failure");
    assert_eq!(v["reason"], "Forbidden");
    assert_eq!(v["code"], 403);
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("namespace \"x\" is outside"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes never panic; an accepted path is exactly its segments rejoined, and
    /// each segment's decoded text contains no separator and is no dot segment.
    #[test]
    fn arbitrary_paths(path in "(/([a-z0-9.%~:@!$&'()*+,;=_-]|%2[fFeE]|%5[cC]|%[0-9a-fA-F]{2}){0,6}){0,6}[/]?", query in proptest::option::of("[a-z=&%0-9;+]{0,16}")) {
        for method in ["GET", "POST", "DELETE", "PATCH", "PUT", "HEAD", "OPTIONS"] {
            if let Ok(info) = classify(method, &path, query.as_deref()) {
                prop_assert_eq!(info.path, path.as_str());
                let segs = split_path(&path).unwrap();
                let rejoined: String = segs.iter().map(|s| format!("/{}", s.raw)).collect();
                prop_assert_eq!(if rejoined.is_empty() { "/".to_string() } else { rejoined }, path.clone());
                for s in &segs {
                    prop_assert!(!s.text.contains('/') && !s.text.contains('\\'));
                    prop_assert!(s.text != "." && s.text != ".." && !s.text.is_empty());
                }
                let _ = decide(&info, &scope());
                let _ = info.to_string();
            }
        }
    }

    #[test]
    fn any_string_never_panics(path in any::<String>(), query in any::<Option<String>>()) {
        if let Ok(info) = classify("GET", &path, query.as_deref()) {
            prop_assert_eq!(info.path, path.as_str());
            let _ = decide(&info, &scope());
        }
    }

    /// Namespaces outside the scope are never allowed, whatever the rest of the path.
    #[test]
    fn other_namespaces_never_allowed(ns in "[a-z0-9-]{1,12}", rest in "(/[a-z0-9]{1,6}){0,4}", q in "(watch=[a-z0-9]{0,3})?") {
        prop_assume!(ns != "my-app-prod" && ns != "my-app-jobs");
        let path = format!("/api/v1/namespaces/{ns}{rest}");
        for method in ["GET", "POST", "DELETE", "PATCH", "PUT"] {
            if let Ok(info) = classify(method, &path, Some(&q)) {
                prop_assert!(decide(&info, &scope()) != Decision::Allow, "{} {}", method, path);
            }
        }
    }
}

#[test]
fn only_end_to_end_headers_cross_and_upgrades_are_recognised() {
    for h in [
        "authorization",
        "impersonate-user",
        "x-remote-group",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "proxy-connection",
        "content-length",
    ] {
        assert!(!forwardable_header(h, false), "{h}");
        assert!(!forwardable_header(h, true), "{h}");
    }
    for h in ["connection", "upgrade"] {
        assert!(!forwardable_header(h, false), "{h}");
        assert!(forwardable_header(h, true), "{h}");
    }
    for h in [
        "accept",
        "content-type",
        "host",
        "x-stream-protocol-version",
    ] {
        assert!(forwardable_header(h, false), "{h}");
    }
    assert!(asks_upgrade(true, ["keep-alive, Upgrade"]));
    assert!(asks_upgrade(true, ["close", " upgrade "]));
    assert!(!asks_upgrade(false, ["Upgrade"]));
    assert!(!asks_upgrade(true, ["keep-alive", "upgrade-insecure"]));
    assert!(!asks_upgrade(true, []));
}
