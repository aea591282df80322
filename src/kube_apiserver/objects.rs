//! The test API server's documents: discovery, seeded objects, lists and `Table` renderings.

use serde_json::{json, Value};

/// A resource the test server serves: where it lives and how discovery describes it.
pub struct Kind {
    pub group: &'static str,
    pub resource: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short: &'static [&'static str],
}

pub const KINDS: &[Kind] = &[
    Kind {
        group: "",
        resource: "pods",
        kind: "Pod",
        namespaced: true,
        short: &["po"],
    },
    Kind {
        group: "",
        resource: "services",
        kind: "Service",
        namespaced: true,
        short: &["svc"],
    },
    Kind {
        group: "",
        resource: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
        short: &["cm"],
    },
    Kind {
        group: "",
        resource: "secrets",
        kind: "Secret",
        namespaced: true,
        short: &[],
    },
    Kind {
        group: "",
        resource: "events",
        kind: "Event",
        namespaced: true,
        short: &["ev"],
    },
    Kind {
        group: "",
        resource: "nodes",
        kind: "Node",
        namespaced: false,
        short: &["no"],
    },
    Kind {
        group: "",
        resource: "namespaces",
        kind: "Namespace",
        namespaced: false,
        short: &["ns"],
    },
    Kind {
        group: "apps",
        resource: "deployments",
        kind: "Deployment",
        namespaced: true,
        short: &["deploy"],
    },
    Kind {
        group: "apps",
        resource: "replicasets",
        kind: "ReplicaSet",
        namespaced: true,
        short: &["rs"],
    },
    Kind {
        group: "apps",
        resource: "statefulsets",
        kind: "StatefulSet",
        namespaced: true,
        short: &["sts"],
    },
    Kind {
        group: "batch",
        resource: "jobs",
        kind: "Job",
        namespaced: true,
        short: &[],
    },
    Kind {
        group: "rbac.authorization.k8s.io",
        resource: "rolebindings",
        kind: "RoleBinding",
        namespaced: true,
        short: &[],
    },
    // A custom resource, and a second group serving the same plural (so the bare name
    // `certificates` is ambiguous in this cluster, as it can be in a real one).
    Kind {
        group: "cert-manager.io",
        resource: "certificates",
        kind: "Certificate",
        namespaced: true,
        short: &["cert"],
    },
    Kind {
        group: "acme.example.com",
        resource: "certificates",
        kind: "Certificate",
        namespaced: true,
        short: &[],
    },
    Kind {
        group: "cert-manager.io",
        resource: "issuers",
        kind: "Issuer",
        namespaced: true,
        short: &[],
    },
];

/// The API groups the server serves (besides core), in discovery order.
fn groups() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for k in KINDS.iter().filter(|k| !k.group.is_empty()) {
        if !out.contains(&k.group) {
            out.push(k.group);
        }
    }
    out
}

pub fn kind_of(group: &str, resource: &str) -> Option<&'static Kind> {
    KINDS
        .iter()
        .find(|k| k.group == group && k.resource == resource)
}

pub fn api_version(group: &str) -> String {
    if group.is_empty() {
        "v1".into()
    } else {
        format!("{group}/v1")
    }
}

pub fn version() -> Value {
    json!({
        "major": "1", "minor": "32", "gitVersion": "v1.32.0-postern-test", "gitCommit": "0000000",
        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23",
        "compiler": "gc", "platform": "linux/amd64",
    })
}

pub fn api_versions(server: &str) -> Value {
    json!({
        "kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}],
    })
}

pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups().into_iter().filter_map(api_group).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(group: &str) -> Option<Value> {
    let name = groups().into_iter().find(|g| *g == group)?;
    let gv = json!({"groupVersion": format!("{name}/v1"), "version": "v1"});
    Some(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": [gv.clone()], "preferredVersion": gv}),
    )
}

/// `APIResourceList` of a group version, subresources included, as `/api/v1` serves it.
pub fn resource_list(group: &str) -> Option<Value> {
    if !group.is_empty() && !groups().contains(&group) {
        return None;
    }
    let all = [
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ];
    let mut resources = Vec::new();
    for k in KINDS.iter().filter(|k| k.group == group) {
        resources.push(json!({
            "name": k.resource, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced, "kind": k.kind,
            "verbs": all, "shortNames": k.short,
        }));
    }
    let subs: &[(&str, &str, &[&str])] = if group.is_empty() {
        &[
            ("pods/log", "Pod", &["get"]),
            ("pods/exec", "PodExecOptions", &["create", "get"]),
            ("pods/attach", "PodAttachOptions", &["create", "get"]),
            (
                "pods/portforward",
                "PodPortForwardOptions",
                &["create", "get"],
            ),
            ("pods/status", "Pod", &["get", "patch", "update"]),
        ]
    } else if group == "apps" {
        &[
            ("deployments/scale", "Scale", &["get", "patch", "update"]),
            ("statefulsets/scale", "Scale", &["get", "patch", "update"]),
        ]
    } else if group == "cert-manager.io" {
        &[(
            "certificates/status",
            "Certificate",
            &["get", "patch", "update"],
        )]
    } else {
        &[]
    };
    for (name, kind, verbs) in subs {
        resources.push(json!({"name": name, "singularName": "", "namespaced": true, "kind": kind, "verbs": verbs}));
    }
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": api_version(group), "resources": resources}),
    )
}

pub const CREATED: &str = "2026-01-01T00:00:00Z";

pub fn pod(ns: &str, name: &str, uid: u64) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("00000000-0000-0000-0000-{uid:012}"),
                     "creationTimestamp": CREATED, "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}], "nodeName": "node-1", "restartPolicy": "Always"},
        "status": {"phase": "Running", "podIP": "10.0.0.5", "startTime": CREATED,
                   "conditions": [{"type": "Ready", "status": "True"}],
                   "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "nginx:1.27",
                                          "imageID": "", "started": true, "state": {"running": {"startedAt": CREATED}}}]},
    })
}

pub fn object(
    group: &str,
    kind: &str,
    ns: Option<&str>,
    name: &str,
    uid: u64,
    extra: Value,
) -> Value {
    let mut v = json!({
        "apiVersion": api_version(group), "kind": kind,
        "metadata": {"name": name, "uid": format!("00000000-0000-0000-0000-{uid:012}"), "creationTimestamp": CREATED},
    });
    if let Some(ns) = ns {
        v["metadata"]["namespace"] = json!(ns);
    }
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    v
}

pub fn list(group: &str, kind: &str, rv: u64, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version(group), "kind": format!("{kind}List"), "metadata": {"resourceVersion": rv.to_string()}, "items": items})
}

/// Whether the client asked for the server-side `Table` rendering kubectl uses for `get`.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table") && first.contains("g=meta.k8s.io"))
}

fn columns(resource: &str) -> Value {
    let col = |name: &str, ty: &str| json!({"name": name, "type": ty, "format": if name == "Name" { "name" } else { "" }, "description": "", "priority": 0});
    match resource {
        "pods" => json!([
            col("Name", "string"),
            col("Ready", "string"),
            col("Status", "string"),
            col("Restarts", "integer"),
            col("Age", "string")
        ]),
        _ => json!([col("Name", "string"), col("Age", "string")]),
    }
}

fn row(resource: &str, obj: &Value) -> Value {
    let name = obj["metadata"]["name"].clone();
    let cells = match resource {
        "pods" => json!([
            name,
            "1/1",
            obj["status"]["phase"].as_str().unwrap_or("Unknown"),
            0,
            "5m"
        ]),
        _ => json!([name, "5m"]),
    };
    json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}})
}

/// A `meta.k8s.io/v1` Table; `headers` false for watch events after the first, so kubectl
/// prints its header once.
pub fn table(resource: &str, rv: u64, objs: &[Value], headers: bool) -> Value {
    let rows: Vec<Value> = objs.iter().map(|o| row(resource, o)).collect();
    let mut t = json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()}, "rows": rows});
    if headers {
        t["columnDefinitions"] = columns(resource);
    }
    t
}

/// JSON merge patch (RFC 7386), enough for `kubectl patch --type merge` and `kubectl scale`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}
