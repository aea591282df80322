//! kubectl ops endpoints end to end: the real `kubectl` against the test API server, first
//! directly (so the test server speaks what kubectl expects), then through Postern.

use anyhow::Result;
use postern::kube_apiserver::{kubectl, KubeApiServer};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn direct_kubectl_speaks_with_the_test_apiserver() -> Result<()> {
    let api = KubeApiServer::start()?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("direct.yaml");
    std::fs::write(&cfg, api.kubeconfig("my-app-prod"))?;

    let (ok, out, err) = kubectl(&cfg, &["get", "pods"], None, LIMIT)?;
    assert!(ok, "{err}");
    assert!(out.contains("NAME") && out.contains("web-1") && out.contains("Running"), "{out}");
    assert!(!out.contains("coredns"), "{out}");

    let (ok, out, err) = kubectl(&cfg, &["describe", "pod", "web-1"], None, LIMIT)?;
    assert!(ok, "{err}");
    assert!(out.contains("nginx:1.27"), "{out}");

    let (ok, out, err) = kubectl(&cfg, &["logs", "web-1"], None, LIMIT)?;
    assert!(ok, "{err}");
    assert!(out.contains("log line 1 of web-1"), "{out}");

    let (ok, out, err) = kubectl(&cfg, &["exec", "web-1", "--", "echo", "hello", "there"], None, LIMIT)?;
    assert!(ok, "{err}");
    assert_eq!(out, "hello there\n");

    let (ok, out, err) = kubectl(&cfg, &["exec", "-i", "web-1", "--", "cat"], Some(b"from stdin\n"), LIMIT)?;
    assert!(ok, "{err}");
    assert_eq!(out, "from stdin\n");

    let (ok, _, err) = kubectl(&cfg, &["exec", "web-1", "--", "sh", "-c", "exit 3"], None, LIMIT)?;
    assert!(!ok);
    assert!(err.contains("exit code 3"), "{err}");

    let (ok, out, err) = kubectl(&cfg, &["get", "deployments"], None, LIMIT)?;
    assert!(ok, "{err}");
    assert!(out.contains("web"), "{out}");

    let (ok, out, err) = kubectl(&cfg, &["delete", "pod", "web-2"], None, LIMIT)?;
    assert!(ok, "{err}");
    assert!(out.contains("deleted"), "{out}");
    assert!(!api.has_object("pods", "my-app-prod", "web-2"));

    let reqs = api.requests();
    assert!(reqs.iter().all(|r| r.header("authorization").is_some()));
    assert!(reqs.iter().any(|r| r.path() == "/api/v1/namespaces/my-app-prod/pods/web-1/exec"));
    Ok(())
}
