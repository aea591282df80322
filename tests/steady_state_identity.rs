//! The steady-state probes reach a cluster as the steady-state phase's identity
//! (`[resource.phases.steady-state] impersonate`), and as the kubeconfig's own credential,
//! impersonating nobody, when no such table is configured. Real gateway, agent and the test
//! API server, with a 1 s collection interval.

use anyhow::Result;
use postern::{
    kube_apiserver::KubeApiServer,
    testbed::{wait_until, Agent, Gateway},
};
use std::time::Duration;

/// Comfortably more than two 1 s intervals on a loaded machine; a bound, not a speed goal.
const SHOWS_UP: Duration = Duration::from_secs(30);

fn body(kubeconfig: &std::path::Path, id: &str, steady_state_table: &str) -> String {
    format!(
        "[policy]\napproval = \"automatic\"\n\n[steady_state]\ninterval = \"1s\"\n\n\
         [[resource]]\nid = \"{id}\"\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespaces = [\"my-app-prod\"]\n\
         impersonate = {{ user = \"vendor-operate\", groups = [\"vendor-troubleshooters\"] }}\n\n\
         {steady_state_table}",
        kubeconfig.display()
    )
}

/// The (user, groups) of the snapshot's pod lists the API server has seen, once there are any.
fn probe_identities(api: &KubeApiServer) -> Vec<(Option<String>, Vec<String>)> {
    api.requests()
        .iter()
        .filter(|r| r.path() == "/api/v1/namespaces/my-app-prod/pods")
        .map(|r| {
            (
                r.header("impersonate-user").map(str::to_string),
                r.header("impersonate-group")
                    .map(|g| vec![g.to_string()])
                    .unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn probes_use_the_steady_state_identity_when_one_is_configured() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = KubeApiServer::start()?;
    let kubeconfig = dir.path().join("upstream.kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig("default"))?;
    let gw = Gateway::start(&dir.path().join("gw"))?;

    // With a steady-state table: every probe GET impersonates the read-only identity.
    let agent = Agent::online(
        &gw,
        &dir.path().join("agent"),
        "shop",
        "acme-corp",
        &body(
            &kubeconfig,
            "cluster",
            "[resource.phases.steady-state]\nimpersonate = { user = \"vendor-observe\", groups = [\"vendor-readonly\"] }\n",
        ),
    )?;
    let mut seen = Vec::new();
    assert!(
        wait_until(SHOWS_UP, || {
            seen = probe_identities(&api);
            !seen.is_empty()
        }),
        "no probe reached the API server; agent log: {}",
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    for (user, groups) in &seen {
        assert_eq!(user.as_deref(), Some("vendor-observe"), "{seen:?}");
        assert_eq!(groups, &["vendor-readonly".to_string()], "{seen:?}");
    }
    // Every request of a probe round carries it, and nothing but GETs went out.
    for r in api
        .requests()
        .iter()
        .filter(|r| r.path().contains("/namespaces/"))
    {
        assert_eq!(r.method, "GET", "{}", r.uri);
        assert_eq!(
            r.header("impersonate-user"),
            Some("vendor-observe"),
            "{}",
            r.uri
        );
    }
    drop(agent);

    // Without one: the kubeconfig's credential alone, never the operate identity.
    api.clear_requests();
    let agent = Agent::online(
        &gw,
        &dir.path().join("agent2"),
        "shop",
        "acme-corp-2",
        &body(&kubeconfig, "cluster2", ""),
    )?;
    assert!(
        wait_until(SHOWS_UP, || {
            seen = probe_identities(&api);
            !seen.is_empty()
        }),
        "no probe reached the API server; agent log: {}",
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    for (user, groups) in &seen {
        assert_eq!(user, &None, "{seen:?}");
        assert!(groups.is_empty(), "{seen:?}");
    }
    Ok(())
}
