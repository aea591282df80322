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

/// An SSH VM with a steady-state user: the probe logs in as that user (with the resource's
/// key and pinned host key, no other secret) and reports uptime, load and the disk use of the
/// configured paths; the operate user (one the VM does not know) is never used. Without the
/// table, only reachability and the banner, as before.
#[test]
fn an_ssh_vm_reports_uptime_load_and_disks_as_the_steady_state_user() -> Result<()> {
    use postern::sshd::Sshd;
    let dir = tempfile::tempdir()?;
    let sshd = Sshd::start()?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    let resource = |id: &str, table: &str| {
        format!(
            "[policy]\napproval = \"automatic\"\n\n[steady_state]\ninterval = \"1s\"\ndisk_paths = [\"/\", \"{}\"]\n\n\
             [[resource]]\nid = \"{id}\"\nkind = \"ssh\"\nhost = \"{}\"\nuser = \"no-such-operate-user\"\n\
             key = \"{}\"\nhost_key = \"{}\"\n\n{table}",
            dir.path().display(),
            sshd.addr,
            sshd.client_key.display(),
            sshd.host_key
        )
    };
    let status = |agent: &Agent, id: &str| -> Option<serde_json::Value> {
        let v = gw
            .cli(&["appliance", "status", &agent.appliance_id])
            .ok()?
            .ok()
            .ok()?;
        v["resources"]
            .as_array()?
            .iter()
            .find(|r| r["resource_id"] == id)
            .cloned()
    };

    let agent = Agent::online(
        &gw,
        &dir.path().join("agent"),
        "shop",
        "acme-corp",
        &resource(
            "vm",
            &format!("[resource.phases.steady-state]\nuser = \"{}\"\n", sshd.user),
        ),
    )?;
    let mut vm = serde_json::Value::Null;
    let seen = wait_until(SHOWS_UP, || {
        vm = status(&agent, "vm").unwrap_or_default();
        vm["detail"]["vm"].is_object()
    });
    assert!(
        seen,
        "{vm}\nagent log: {}\nsshd log: {}",
        std::fs::read_to_string(&agent.log).unwrap_or_default(),
        std::fs::read_to_string(&sshd.log).unwrap_or_default()
    );
    let facts = &vm["detail"]["vm"];
    assert!(facts["uptime_s"].as_u64().unwrap_or(0) > 0, "{vm}");
    assert!(facts["load_1m"].as_f64().is_some(), "{vm}");
    let disks = facts["disks"].as_array().cloned().unwrap_or_default();
    assert_eq!(disks.len(), 2, "{vm}");
    assert_eq!(disks[0]["path"], "/", "{vm}");
    assert_eq!(disks[1]["path"], dir.path().display().to_string(), "{vm}");
    for d in &disks {
        let size = d["size_bytes"].as_u64().unwrap_or(0);
        assert!(
            size > 0 && d["used_bytes"].as_u64().unwrap_or(u64::MAX) <= size,
            "{vm}"
        );
    }
    // Numbers only: nothing of the command's text is in the snapshot.
    assert!(!vm.to_string().contains("Filesystem"), "{vm}");
    assert!(vm["error"].is_null(), "{vm}");
    drop(agent);

    // Without a steady-state table: the banner only, no login.
    let agent = Agent::online(
        &gw,
        &dir.path().join("agent2"),
        "shop",
        "acme-corp-2",
        &resource("vm2", ""),
    )?;
    let mut vm = serde_json::Value::Null;
    assert!(wait_until(SHOWS_UP, || {
        vm = status(&agent, "vm2").unwrap_or_default();
        vm["reachable"] == true
    }));
    assert!(
        vm["detail"]["banner"]
            .as_str()
            .is_some_and(|b| b.starts_with("SSH-")),
        "{vm}"
    );
    assert!(vm["detail"].get("vm").is_none(), "{vm}");
    Ok(())
}
