//! End to end: permission phases, customer approvals (command and output), policies, one-off
//! ops with real processes in the appliance, and both audit trails.

use anyhow::{anyhow, Result};
use postern::tcp_endpoint::Forwarder;
use postern::testbed::{echo_round_trip, echo_server, wait_until, Agent, CliOutput, Gateway};
use postern::webhook_receiver::WebhookReceiver;
use serde_json::Value;
use std::{net::SocketAddr, os::unix::fs::PermissionsExt, path::Path, time::Duration};

const CLUSTER: &str = "aws_eks_cluster.main_cluster";

/// A stand-in `kubectl` the appliance's config points at: prints what it was asked, can fail,
/// and can hang with a child process (for timeouts).
fn fake_kubectl(dir: &Path) -> Result<std::path::PathBuf> {
    let p = dir.join("kubectl");
    std::fs::write(
        &p,
        "#!/bin/sh\n\
         case \"$1\" in\n\
           fail) echo \"about to fail\"; echo \"boom: $2\" >&2; exit 3 ;;\n\
           hang) sleep 300 & echo $! > \"$2\"; wait ;;\n\
           escape) setsid sleep 300 & echo $! > \"$2.setsid\"; \
             setsid sh -c 'sleep 300 & echo $! > \"$1.double\"' sh \"$2\" & \
             nohup sleep 300 > /dev/null 2>&1 & echo $! > \"$2.nohup\"; \
             sh -c 'trap \"\" TERM HUP INT; echo $$ > \"$1.trap\"; while :; do sleep 1; done' sh \"$2\" & \
             sleep 300 ;;\n\
           *) echo \"NAME READY STATUS\"; echo \"args: $*\"; echo \"kubeconfig: $KUBECONFIG\" ;;\n\
         esac\n",
    )?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

fn agent_body(dir: &Path, approval: &str, extra_policy: &str, echo: SocketAddr) -> Result<String> {
    let kubectl = fake_kubectl(dir)?;
    let kubeconfig = dir.join("cluster.kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n")?;
    Ok(format!(
        "[policy]\napproval = \"{approval}\"\n{extra_policy}\n\
         [tools]\nkubectl = \"{}\"\n\n\
         [[resource]]\nid = \"{CLUSTER}\"\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespaces = [\"my-app-prod\"]\n\n\
         [[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"{echo}\"\n",
        kubectl.display(),
        kubeconfig.display()
    ))
}

fn start(dir: &Path, app: &str, approval: &str, extra_policy: &str) -> Result<(Gateway, Agent)> {
    start_on(None, dir, app, approval, extra_policy)
}

fn start_on(
    store: Option<&str>,
    dir: &Path,
    app: &str,
    approval: &str,
    extra_policy: &str,
) -> Result<(Gateway, Agent)> {
    let gw = match store {
        Some(url) => Gateway::start_with_store(&dir.join("gw"), url)?,
        None => Gateway::start(&dir.join("gw"))?,
    };
    let echo = echo_server()?;
    let agent_dir = dir.join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let body = agent_body(&agent_dir, approval, extra_policy, echo)?;
    let mut agent = Agent::enroll(&gw, &agent_dir, app, "acme-corp", &body)?;
    agent.run()?;
    if !gw.wait_online(&agent.appliance_id, Duration::from_secs(30)) {
        return Err(anyhow!(
            "agent never came online: {}",
            std::fs::read_to_string(&agent.log).unwrap_or_default()
        ));
    }
    Ok((gw, agent))
}

fn token(gw: &Gateway, role: &str, name: &str, customer: Option<&str>) -> Result<String> {
    let mut args = vec!["token", "create", "--role", role, "--name", name];
    if let Some(c) = customer {
        args.extend(["--customer", c]);
    }
    Ok(gw.cli(&args)?.ok()?["token"]
        .as_str()
        .ok_or_else(|| anyhow!("no token"))?
        .to_string())
}

fn op(gw: &Gateway, who: &str, app: &str, command: &str, extra: &[&str]) -> Result<CliOutput> {
    let mut args = vec![
        "ops",
        "kubectl",
        "--app",
        app,
        "--customer",
        "acme-corp",
        "--origin-resource-id",
        CLUSTER,
        "--command",
        command,
    ];
    args.extend_from_slice(extra);
    gw.cli_as(who, &args)
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_string()
}

fn wait_state(gw: &Gateway, who: &str, op_id: &str, state: &str) -> Result<Value> {
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(30), || {
        last = gw
            .cli_as(who, &["ops", "get", op_id])
            .ok()
            .map(|o| o.json)
            .unwrap_or(Value::Null);
        last["state"] == state
    });
    if ok {
        Ok(last)
    } else {
        Err(anyhow!("op {op_id} never reached {state}: {last}"))
    }
}

#[test]
fn manual_policy_puts_the_customer_in_charge_of_grants_endpoints_commands_and_output() -> Result<()>
{
    manual_flow(None).map(|_| ())
}

#[test]
fn the_same_flow_on_the_postgresql_store() -> Result<()> {
    let cluster = postern::pg_cluster::shared();
    let url = cluster.create_database("control_plane_e2e");
    let (gw, _agent, _dir) = manual_flow(Some(&url))?;
    // Tampering with a stored record (as someone with database access could) is found, and
    // the first bad record is named.
    cluster.psql(
        &url,
        "UPDATE audit_log SET detail = '{\"forged\": true}' WHERE seq = 3",
    );
    let v = gw.cli(&["audit", "verify"])?;
    assert!(!v.success);
    assert_eq!(v.error_code(), Some("AUDIT_CHAIN_BROKEN"));
    assert_eq!(v.json["error"]["details"]["seq"], 3);
    Ok(())
}

fn manual_flow(store: Option<&str>) -> Result<(Gateway, Agent, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let (gw, agent) = start_on(store, dir.path(), "my-app", "manual", "")?;
    let alice = token(&gw, "operator", "alice@vendor.example", None)?;
    let bob = token(&gw, "approver", "bob@acme.example", Some("acme-corp"))?;
    let eve = token(&gw, "approver", "eve@globex.example", Some("globex"))?;

    // The customer's approvers are told about waiting requests (https, signed; the receiver
    // is on loopback, which takes an admin's --allow-private; tests/webhooks.rs covers the rest).
    let hook = WebhookReceiver::start(0)?;
    let hook_ca = dir.path().join("hook-ca.pem");
    std::fs::write(&hook_ca, &hook.ca_pem)?;
    gw.cli(&[
        "approvals",
        "webhook",
        "--customer",
        "acme-corp",
        "--url",
        &format!("https://{}/postern", hook.addr),
        "--receiver-ca-file",
        hook_ca.to_str().unwrap(),
        "--allow-private",
    ])?
    .ok()?;

    // No grant: refused before anything reaches the appliance, with the command to fix it.
    let refused = op(&gw, &alice, "my-app", "kubectl get pods", &[])?;
    assert_eq!(
        refused.error_code(),
        Some("OPERATE_ACCESS_REQUIRED"),
        "{refused:?}"
    );
    assert!(refused.json["error"]["hint"]
        .as_str()
        .unwrap()
        .contains("access request"));

    // The grant waits for the customer.
    let grant = gw
        .cli_as(
            &alice,
            &[
                "access",
                "request",
                "--app",
                "my-app",
                "--customer",
                "acme-corp",
                "--level",
                "operate",
                "--duration",
                "30m",
                "--reason",
                "INC-42 pods crash-looping",
            ],
        )?
        .ok()?;
    assert_eq!(grant["state"], "pending-approval");
    let gid = id(&grant);
    let posted = hook
        .recv(Duration::from_secs(20))
        .ok_or_else(|| anyhow!("no webhook delivery"))?;
    let body = String::from_utf8_lossy(&posted.body);
    assert_eq!(
        (posted.method.as_str(), posted.path.as_str()),
        ("POST", "/postern")
    );
    assert!(
        body.contains("approval.waiting") && body.contains(&gid) && posted.signature.is_some(),
        "{posted:?}"
    );
    assert_eq!(
        gw.cli_as(&alice, &["approvals", "approve", &gid])?
            .error_code(),
        Some("FORBIDDEN")
    );
    assert_eq!(
        gw.cli_as(&eve, &["approvals", "list"])?.ok()?["approvals"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert!(!gw.cli_as(&eve, &["approvals", "approve", &gid])?.success);
    let waiting = gw.cli_as(&bob, &["approvals", "list"])?.ok()?;
    let item = waiting["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == gid.as_str())
        .cloned()
        .unwrap();
    assert_eq!(item["kind"], "grant");
    assert_eq!(item["stage"], "command");
    let approved = gw.cli_as(&bob, &["approvals", "approve", &gid])?.ok()?;
    assert_eq!(approved["state"], "active");
    let from: jiff::Timestamp = approved["approved_at"].as_str().unwrap().parse()?;
    let until: jiff::Timestamp = approved["expires_at"].as_str().unwrap().parse()?;
    assert_eq!(
        until.duration_since(from).as_secs(),
        1800,
        "duration counts from approval"
    );

    // An endpoint is an approval request too; approved, it works.
    // Alice's key stays on her machine until the endpoint is approved; her forwarder presents it.
    let alice_home = dir.path().join("alice-home");
    let ep = gw
        .cli_home_as(
            &alice,
            &alice_home,
            &[
                "ops",
                "endpoint",
                "create",
                "--type",
                "tcp",
                "--app",
                "my-app",
                "--customer",
                "acme-corp",
                "--origin-resource-id",
                "null_resource.echo",
                "--ttl",
                "10m",
            ],
        )?
        .ok()?;
    assert_eq!(ep["state"], "pending-approval");
    assert!(ep.get("address").is_none() || ep["address"].is_null());
    let ep = gw.cli_as(&bob, &["approvals", "approve", &id(&ep)])?.ok()?;
    assert_eq!(ep["state"], "active");
    let forwarder = Forwarder::start(&gw, &alice, &alice_home, &id(&ep))?;
    assert_eq!(echo_round_trip(forwarder.listen, b"approved")?, b"approved");
    drop(forwarder);

    // A command: approved by the customer, run in the appliance, output held until released.
    let o = op(
        &gw,
        &alice,
        "my-app",
        "kubectl get pods -n my-app-prod",
        &[],
    )?
    .ok()?;
    assert_eq!(o["state"], "pending-approval");
    let oid = id(&o);
    let shown = gw.cli_as(&bob, &["approvals", "show", &oid])?.ok()?;
    assert_eq!(
        shown["request"]["command"],
        "kubectl get pods -n my-app-prod"
    );
    assert_eq!(shown["requested_by"], "alice@vendor.example");
    gw.cli_as(&bob, &["approvals", "approve", &oid])?.ok()?;
    let held = wait_state(&gw, &alice, &oid, "output-pending-approval")?;
    assert!(
        held["stdout"].is_null() || held["stdout"] == "",
        "held output leaked: {held}"
    );
    let preview = gw.cli_as(&bob, &["approvals", "show", &oid])?.ok()?;
    assert_eq!(preview["stage"], "output");
    let out = preview["output"]["stdout"].as_str().unwrap();
    assert!(out.contains("args: get pods -n my-app-prod"), "{preview}");
    // The tool got a kubeconfig made for the op (the agent's scoped proxy), never the appliance's.
    assert!(
        out.contains("kubeconfig: /") && !out.contains("cluster.kubeconfig"),
        "the tool ran with the appliance's kubeconfig: {out}"
    );
    // Still held after the preview.
    assert!(gw.cli_as(&alice, &["ops", "get", &oid])?.ok()?["stdout"]
        .as_str()
        .unwrap_or("")
        .is_empty());
    gw.cli_as(&bob, &["approvals", "approve", &oid])?.ok()?;
    let done = wait_state(&gw, &alice, &oid, "completed")?;
    assert_eq!(done["exit_code"], 0);
    assert!(done["stdout"]
        .as_str()
        .unwrap()
        .contains("NAME READY STATUS"));

    // Denied command: the operator gets the customer's message, wait exits non-zero.
    let o = op(&gw, &alice, "my-app", "kubectl delete pod web-1", &[])?.ok()?;
    gw.cli_as(
        &bob,
        &[
            "approvals",
            "deny",
            &id(&o),
            "--message",
            "not during the sale",
        ],
    )?
    .ok()?;
    let w = gw.cli_as(&alice, &["ops", "wait", &id(&o)])?;
    assert!(!w.success);
    assert_eq!(w.json["state"], "denied");
    assert_eq!(w.json["error"]["code"], "APPROVAL_DENIED");
    assert!(
        w.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not during the sale"),
        "{}",
        w.json
    );

    // Denied output is destroyed in the appliance and never shown.
    let o = op(&gw, &alice, "my-app", "kubectl get secrets", &[])?.ok()?;
    gw.cli_as(&bob, &["approvals", "approve", &id(&o)])?.ok()?;
    wait_state(&gw, &alice, &id(&o), "output-pending-approval")?;
    gw.cli_as(
        &bob,
        &[
            "approvals",
            "deny",
            &id(&o),
            "--message",
            "contains secrets",
        ],
    )?
    .ok()?;
    let d = wait_state(&gw, &alice, &id(&o), "denied")?;
    assert!(d["stdout"].is_null() || d["stdout"] == "");

    // A failing command: COMMAND_FAILED with exit code and stderr.
    let o = op(&gw, &alice, "my-app", "kubectl fail now", &[])?.ok()?;
    gw.cli_as(&bob, &["approvals", "approve", &id(&o)])?.ok()?;
    wait_state(&gw, &alice, &id(&o), "output-pending-approval")?;
    gw.cli_as(&bob, &["approvals", "approve", &id(&o)])?.ok()?;
    let f = wait_state(&gw, &alice, &id(&o), "failed")?;
    assert_eq!(f["exit_code"], 3);
    assert_eq!(f["error"]["code"], "COMMAND_FAILED");
    assert!(f["stderr"].as_str().unwrap().contains("boom: now"));

    // Revoking the grant cuts the endpoint and refuses further ops.
    gw.cli_as(&bob, &["access", "revoke", &gid])?.ok()?;
    assert_eq!(
        gw.cli_as(&alice, &["ops", "endpoint", "get", &id(&ep)])?
            .ok()?["state"],
        "retired"
    );
    assert_eq!(
        op(&gw, &alice, "my-app", "kubectl get pods", &[])?.error_code(),
        Some("OPERATE_ACCESS_EXPIRED")
    );

    // Both trails: intact, and they tell the story.
    assert_eq!(gw.cli(&["audit", "verify"])?.ok()?["ok"], true);
    let wanted = [
        "grant.requested",
        "grant.approved",
        "grant.revoked",
        "op.requested",
        "op.approved",
        "op.denied",
        "op.started",
        "op.finished",
        "output.approved",
        "output.released",
        "output.denied",
        "endpoint.created",
    ];
    let mut kinds: Vec<String> = Vec::new();
    wait_until(Duration::from_secs(5), || {
        kinds = gw
            .cli(&["audit", "list", "--appliance", &agent.appliance_id])
            .ok()
            .and_then(|o| o.ok().ok())
            .and_then(|v| {
                v["records"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|r| r["kind"].as_str().map(str::to_string))
                        .collect()
                })
            })
            .unwrap_or_default();
        wanted.iter().all(|k| kinds.iter().any(|x| x == k))
    });
    for k in wanted {
        assert!(
            kinds.iter().any(|x| x == k),
            "vendor trail lacks {k}: {kinds:?}"
        );
    }
    let customer_has = |kind: &str| {
        agent
            .trail()
            .map(|t| t.iter().any(|r| r["kind"] == kind))
            .unwrap_or(false)
    };
    assert!(
        wait_until(Duration::from_secs(5), || customer_has("op.finished")
            && customer_has("output.destroyed")),
        "customer trail lacks op.finished or output.destroyed"
    );
    assert_eq!(agent.verify_trail()?.ok()?["ok"], true);
    Ok((gw, agent, dir))
}

#[test]
fn automatic_policy_runs_at_once_and_timeout_kills_the_process_group() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (gw, _agent) = start(dir.path(), "auto-app", "automatic", "")?;
    let grant = gw.request_operate("auto-app", "acme-corp", "1h")?;
    assert_eq!(grant["state"], "active");
    assert_eq!(grant["decided_by"], "policy:automatic");

    let done = op(
        &gw,
        &gw.admin_token,
        "auto-app",
        "kubectl get pods",
        &["--wait"],
    )?
    .ok()?;
    assert_eq!(done["state"], "completed", "{done}");
    assert!(done["stdout"].as_str().unwrap().contains("args: get pods"));

    let pidfile = dir.path().join("hang.pid");
    let t = op(
        &gw,
        &gw.admin_token,
        "auto-app",
        &format!("kubectl hang {}", pidfile.display()),
        &["--timeout", "2s", "--wait"],
    )?;
    assert!(!t.success);
    assert_eq!(t.json["state"], "timed-out", "{}", t.json);
    assert_eq!(t.json["error"]["code"], "COMMAND_TIMEOUT");
    let child: i32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    assert!(
        wait_until(Duration::from_secs(5), || !Path::new(&format!(
            "/proc/{child}"
        ))
        .exists()),
        "child {child} survived the timeout"
    );

    // Bad commands are refused with a clear error, never run through a shell.
    let bad = op(
        &gw,
        &gw.admin_token,
        "auto-app",
        "kubectl get pods; rm -rf /",
        &["--wait"],
    )?;
    assert!(!bad.success);
    assert_eq!(bad.json["state"], "failed", "{}", bad.json);
    let wrong = op(&gw, &gw.admin_token, "auto-app", "psql -c 'select 1'", &[])?;
    assert_eq!(wrong.error_code(), Some("INVALID_REQUEST"));

    // Whatever an op starts ends with it: a setsid child, a double fork, a nohup'ed child and a
    // shell that ignores SIGTERM all die on the timeout (checked by PID).
    let escape = dir.path().join("escape");
    let t = op(
        &gw,
        &gw.admin_token,
        "auto-app",
        &format!("kubectl escape {}", escape.display()),
        &["--timeout", "3s", "--wait"],
    )?;
    assert_eq!(t.json["state"], "timed-out", "{}", t.json);
    for how in ["setsid", "double", "nohup", "trap"] {
        let file = escape.with_extension(how);
        let pid: i32 = std::fs::read_to_string(&file)
            .map_err(|e| anyhow!("{}: {e}", file.display()))?
            .trim()
            .parse()?;
        let dead = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    s.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
                })
                .unwrap_or(true)
        };
        assert!(
            wait_until(Duration::from_secs(10), dead),
            "the {how} process {pid} survived the op's timeout"
        );
    }

    // A tool runs only against a resource of its kind: kubectl on the tcp resource is refused
    // by the gateway, naming the resource's kind and the tools it takes, and recorded as denied.
    let mismatch = gw.cli(&[
        "ops",
        "kubectl",
        "--app",
        "auto-app",
        "--customer",
        "acme-corp",
        "--origin-resource-id",
        "null_resource.echo",
        "--command",
        "kubectl get pods",
    ])?;
    assert_eq!(
        mismatch.error_code(),
        Some("INVALID_ORIGIN_RESOURCE_ID"),
        "{}",
        mismatch.json
    );
    let e = &mismatch.json["error"];
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("is a tcp resource"),
        "{e}"
    );
    assert!(
        e["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("takes no one-off ops"),
        "{e}"
    );
    assert_eq!(e["details"]["kind"], "tcp");
    let records = gw.cli(&["audit", "list"])?.ok()?;
    assert!(
        records["records"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["kind"] == "denied"
                && r["detail"]["code"] == "INVALID_ORIGIN_RESOURCE_ID"
                && r["detail"]["origin_resource_id"] == "null_resource.echo"
                && r["detail"]["reason"] == e["message"]),
        "{records}"
    );
    let t = op(
        &gw,
        &gw.admin_token,
        "auto-app",
        "kubectl get pods",
        &["--timeout", "25h"],
    )?;
    assert_eq!(t.error_code(), Some("INVALID_REQUEST"));
    Ok(())
}

#[test]
fn grant_expiry_refuses_ops_and_deploy_grants_never_authorise_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (gw, _agent) = start(dir.path(), "expiry-app", "automatic", "")?;
    // Steady-state is on by default, and the customer can turn it off.
    let ss = gw
        .cli(&[
            "access",
            "request",
            "--app",
            "expiry-app",
            "--customer",
            "acme-corp",
            "--level",
            "steady-state",
            "--duration",
            "1h",
            "--reason",
            "dashboards",
        ])?
        .ok()?;
    assert_eq!(ss["state"], "active");
    let bob = token(&gw, "approver", "bob@acme.example", Some("acme-corp"))?;
    gw.cli_as(
        &bob,
        &[
            "access",
            "steady-state",
            "--app",
            "expiry-app",
            "--customer",
            "acme-corp",
            "--disable",
        ],
    )?
    .ok()?;
    let off = gw.cli(&[
        "access",
        "request",
        "--app",
        "expiry-app",
        "--customer",
        "acme-corp",
        "--level",
        "steady-state",
        "--duration",
        "1h",
        "--reason",
        "dashboards",
    ])?;
    assert_eq!(off.error_code(), Some("FORBIDDEN"));
    assert_eq!(
        op(&gw, &gw.admin_token, "expiry-app", "kubectl get pods", &[])?.error_code(),
        Some("OPERATE_ACCESS_REQUIRED")
    );

    let deploy = gw
        .cli(&[
            "access",
            "request",
            "--app",
            "expiry-app",
            "--customer",
            "acme-corp",
            "--level",
            "deploy",
            "--duration",
            "1h",
            "--reason",
            "release 2.3",
        ])?
        .ok()?;
    assert_eq!(deploy["state"], "active");
    assert_eq!(
        op(&gw, &gw.admin_token, "expiry-app", "kubectl get pods", &[])?.error_code(),
        Some("OPERATE_ACCESS_REQUIRED")
    );

    let short = gw.request_operate("expiry-app", "acme-corp", "10s")?;
    let until: jiff::Timestamp = short["expires_at"].as_str().unwrap().parse()?;
    assert_eq!(
        op(
            &gw,
            &gw.admin_token,
            "expiry-app",
            "kubectl get pods",
            &["--wait"]
        )?
        .json["state"],
        "completed"
    );
    let left = until
        .duration_since(jiff::Timestamp::now())
        .as_secs_f64()
        .max(0.0);
    std::thread::sleep(Duration::from_secs_f64(left.min(11.0) + 0.2));
    let late = op(&gw, &gw.admin_token, "expiry-app", "kubectl get pods", &[])?;
    assert_eq!(
        late.error_code(),
        Some("OPERATE_ACCESS_EXPIRED"),
        "{late:?}"
    );
    let grants = gw.cli(&["access", "list"])?.ok()?;
    assert!(grants["grants"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["id"] == short["id"] && g["state"] == "expired"));
    Ok(())
}

#[test]
fn window_policy_approves_inside_the_window_and_asks_a_person_outside() -> Result<()> {
    // Inside: a window covering every minute of the week.
    let dir = tempfile::tempdir()?;
    let (gw, _a) = start(
        dir.path(),
        "win-app",
        "windows",
        "time_zone = \"Europe/Berlin\"\nwindows = [\"Mon-Sun 00:00-24:00\"]\n",
    )?;
    let g = gw.request_operate("win-app", "acme-corp", "1h")?;
    assert_eq!(g["state"], "active");
    assert_eq!(g["decided_by"], "policy:window");
    let done = op(
        &gw,
        &gw.admin_token,
        "win-app",
        "kubectl get pods",
        &["--wait"],
    )?
    .ok()?;
    assert_eq!(
        done["state"], "completed",
        "inside a window output is released at once: {done}"
    );
    drop(gw);

    // Outside: only a maintenance window long past.
    let dir = tempfile::tempdir()?;
    let (gw, _a) = start(
        dir.path(),
        "win-app",
        "windows",
        "maintenance = [\"2020-01-01T00:00:00Z/2020-01-01T01:00:00Z\"]\n",
    )?;
    let g = gw.request_operate("win-app", "acme-corp", "1h")?;
    assert_eq!(g["state"], "pending-approval", "{g}");
    Ok(())
}

/// Nothing that ended comes back: deciding a grant, op or endpoint that is no longer pending,
/// retiring or revoking what already ended, is refused with `CONFLICT` (or the endpoint's own
/// `ENDPOINT_RETIRED`), changes nothing, and is in the gateway's trail as `denied` with the reason.
#[test]
fn nothing_that_ended_comes_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (gw, agent) = start(dir.path(), "ended-app", "manual", "")?;
    let alice = token(&gw, "operator", "alice@vendor.example", None)?;
    let bob = token(&gw, "approver", "bob@acme.example", Some("acme-corp"))?;
    let request = |duration: &str| -> Result<Value> {
        gw.cli_as(
            &alice,
            &[
                "access",
                "request",
                "--app",
                "ended-app",
                "--customer",
                "acme-corp",
                "--level",
                "operate",
                "--duration",
                duration,
                "--reason",
                "INC-7",
            ],
        )?
        .ok()
    };
    // A refusal: CONFLICT (unless `code` says otherwise) naming the record and its state, with a hint.
    let refused = |out: CliOutput, code: &str, id: &str, state: &str| -> Result<()> {
        assert!(!out.success, "{id} was moved: {}", out.json);
        assert_eq!(out.error_code(), Some(code), "{}", out.json);
        let e = &out.json["error"];
        assert!(e["message"].as_str().unwrap_or("").contains(id), "{e}");
        assert!(e["message"].as_str().unwrap_or("").contains(state), "{e}");
        assert!(!e["hint"].as_str().unwrap_or("").is_empty(), "{e}");
        assert_eq!(e["details"]["state"], state, "{e}");
        Ok(())
    };

    // A short grant that will have expired by the end, and the one the rest runs under.
    let short = id(&request("10s")?);
    gw.cli_as(&bob, &["approvals", "approve", &short])?.ok()?;
    let gid = id(&request("30m")?);
    gw.cli_as(&bob, &["approvals", "approve", &gid])?.ok()?;
    refused(
        gw.cli_as(&bob, &["approvals", "approve", &gid])?,
        "CONFLICT",
        &gid,
        "active",
    )?;

    // A denied grant stays denied; a withdrawn request cannot be approved.
    let denied = id(&request("30m")?);
    gw.cli_as(&bob, &["approvals", "deny", &denied, "--message", "no"])?
        .ok()?;
    refused(
        gw.cli_as(&bob, &["approvals", "approve", &denied])?,
        "CONFLICT",
        &denied,
        "denied",
    )?;
    refused(
        gw.cli_as(&bob, &["approvals", "deny", &denied])?,
        "CONFLICT",
        &denied,
        "denied",
    )?;
    let withdrawn = id(&request("30m")?);
    assert_eq!(
        gw.cli_as(&alice, &["access", "revoke", &withdrawn])?.ok()?["state"],
        "revoked"
    );
    refused(
        gw.cli_as(&bob, &["approvals", "approve", &withdrawn])?,
        "CONFLICT",
        &withdrawn,
        "revoked",
    )?;

    // The endpoint of the issue: retired while pending, then approved. It stays retired, and
    // no credential or address ever appears.
    let create = || -> Result<Value> {
        gw.cli_as(
            &alice,
            &[
                "ops",
                "endpoint",
                "create",
                "--type",
                "tcp",
                "--app",
                "ended-app",
                "--customer",
                "acme-corp",
                "--origin-resource-id",
                "null_resource.echo",
                "--ttl",
                "10m",
            ],
        )?
        .ok()
    };
    let ep = id(&create()?);
    let retired = gw
        .cli_as(&alice, &["ops", "endpoint", "retire", &ep])?
        .ok()?;
    assert_eq!(
        (retired["state"].as_str(), retired["sessions_cut"].as_u64()),
        (Some("retired"), Some(0))
    );
    assert!(!gw.cli_as(&bob, &["approvals", "list"])?.ok()?["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["id"] == ep.as_str()));
    refused(
        gw.cli_as(&bob, &["approvals", "approve", &ep])?,
        "CONFLICT",
        &ep,
        "retired",
    )?;
    refused(
        gw.cli_as(&bob, &["approvals", "deny", &ep])?,
        "CONFLICT",
        &ep,
        "retired",
    )?;
    refused(
        gw.cli_as(&alice, &["ops", "endpoint", "retire", &ep])?,
        "ENDPOINT_RETIRED",
        &ep,
        "retired",
    )?;
    let got = gw.cli_as(&alice, &["ops", "endpoint", "get", &ep])?.ok()?;
    assert_eq!(got["state"], "retired");
    for key in [
        "address",
        "kubeconfig",
        "connection_string",
        "ssh_command",
        "ssh_config",
        "access",
    ] {
        assert!(
            got.get(key).is_none_or(Value::is_null),
            "{key} appeared on a retired endpoint: {got}"
        );
    }
    // A denied endpoint stays denied; an active one is not approved twice.
    let ep_denied = id(&create()?);
    gw.cli_as(&bob, &["approvals", "deny", &ep_denied])?.ok()?;
    refused(
        gw.cli_as(&bob, &["approvals", "approve", &ep_denied])?,
        "CONFLICT",
        &ep_denied,
        "denied",
    )?;
    let ep_live = id(&create()?);
    assert_eq!(
        gw.cli_as(&bob, &["approvals", "approve", &ep_live])?.ok()?["state"],
        "active"
    );
    refused(
        gw.cli_as(&bob, &["approvals", "approve", &ep_live])?,
        "CONFLICT",
        &ep_live,
        "active",
    )?;
    // A retire racing an approval: whichever wins, a retired endpoint never ends up active.
    for _ in 0..4 {
        let racing = id(&create()?);
        let (retire, approve) = std::thread::scope(|sc| {
            let r = sc.spawn(|| gw.cli_as(&alice, &["ops", "endpoint", "retire", &racing]));
            let a = sc.spawn(|| gw.cli_as(&bob, &["approvals", "approve", &racing]));
            (
                r.join().map_err(|_| anyhow!("retire thread")),
                a.join().map_err(|_| anyhow!("approve thread")),
            )
        });
        let (retire, approve) = (retire??, approve??);
        assert!(
            retire.success,
            "retire of a pending or active endpoint succeeds: {}",
            retire.json
        );
        assert!(
            approve.success || approve.error_code() == Some("CONFLICT"),
            "{}",
            approve.json
        );
        let got = gw
            .cli_as(&alice, &["ops", "endpoint", "get", &racing])?
            .ok()?;
        assert_eq!(got["state"], "retired", "{got}");
        assert!(got.get("address").is_none_or(Value::is_null), "{got}");
    }

    // Ops: a denied one stays denied.
    let op_denied = id(&op(&gw, &alice, "ended-app", "kubectl get pods", &[])?.ok()?);
    gw.cli_as(
        &bob,
        &["approvals", "deny", &op_denied, "--message", "not now"],
    )?
    .ok()?;
    refused(
        gw.cli_as(&bob, &["approvals", "approve", &op_denied])?,
        "CONFLICT",
        &op_denied,
        "denied",
    )?;
    refused(
        gw.cli_as(&bob, &["approvals", "deny", &op_denied])?,
        "CONFLICT",
        &op_denied,
        "denied",
    )?;
    // (`ops get` of an op that ended badly exits non-zero by design; the record is still printed.)
    assert_eq!(
        gw.cli_as(&alice, &["ops", "get", &op_denied])?.json["state"],
        "denied"
    );

    // An op whose grant ended before it was approved expires at dispatch, and stays expired.
    let op_late = id(&op(&gw, &alice, "ended-app", "kubectl get pods", &[])?.ok()?);
    gw.cli_as(&bob, &["access", "revoke", &gid])?.ok()?;
    gw.cli_as(&bob, &["approvals", "approve", &op_late])?.ok()?;
    wait_state(&gw, &alice, &op_late, "expired")?;
    refused(
        gw.cli_as(&bob, &["approvals", "approve", &op_late])?,
        "CONFLICT",
        &op_late,
        "expired",
    )?;
    refused(
        gw.cli_as(&bob, &["approvals", "deny", &op_late])?,
        "CONFLICT",
        &op_late,
        "expired",
    )?;
    // Revoking a revoked grant is an error too (not a silent success): it was over already.
    refused(
        gw.cli_as(&bob, &["access", "revoke", &gid])?,
        "CONFLICT",
        &gid,
        "revoked",
    )?;
    assert_eq!(
        gw.cli_as(&alice, &["ops", "endpoint", "get", &ep_live])?
            .ok()?["state"],
        "retired",
        "the revoke cut it"
    );

    // The short grant has run out by now (or does shortly): approving, denying or revoking it changes nothing.
    let expired = wait_until(Duration::from_secs(15), || {
        gw.cli_as(&alice, &["access", "list"])
            .ok()
            .and_then(|o| o.ok().ok())
            .is_some_and(|v| {
                v["grants"].as_array().is_some_and(|g| {
                    g.iter()
                        .any(|g| g["id"] == short.as_str() && g["state"] == "expired")
                })
            })
    });
    assert!(expired, "grant {short} never expired");
    refused(
        gw.cli_as(&bob, &["approvals", "approve", &short])?,
        "CONFLICT",
        &short,
        "expired",
    )?;
    refused(
        gw.cli_as(&bob, &["approvals", "deny", &short])?,
        "CONFLICT",
        &short,
        "expired",
    )?;
    refused(
        gw.cli_as(&bob, &["access", "revoke", &short])?,
        "CONFLICT",
        &short,
        "expired",
    )?;

    // Every refusal is in the gateway's trail as `denied`, with the action and the reason.
    let records = gw
        .cli(&["audit", "list", "--appliance", &agent.appliance_id])?
        .ok()?;
    let denials: Vec<&Value> = records["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "denied")
        .collect();
    let denied_for = |id: &str, action: &str| {
        denials.iter().any(|r| {
            r["detail"]["id"] == id
                && r["detail"]["action"] == action
                && r["detail"]["reason"]
                    .as_str()
                    .is_some_and(|m| m.contains(id))
        })
    };
    for (rid, action) in [
        (&gid, "approve"),
        (&denied, "approve"),
        (&denied, "deny"),
        (&withdrawn, "approve"),
        (&ep, "approve"),
        (&ep, "deny"),
        (&ep, "retire"),
        (&ep_denied, "approve"),
        (&ep_live, "approve"),
        (&op_denied, "approve"),
        (&op_denied, "deny"),
        (&op_late, "approve"),
        (&op_late, "deny"),
        (&gid, "revoke"),
        (&short, "approve"),
        (&short, "deny"),
        (&short, "revoke"),
    ] {
        assert!(
            denied_for(rid, action),
            "no `denied` record for {action} {rid}: {denials:?}"
        );
    }
    assert_eq!(gw.cli(&["audit", "verify"])?.ok()?["ok"], true);
    Ok(())
}
