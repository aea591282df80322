//! End to end, API tokens: expiry, revocation (API and the endpoints a token made), unique and
//! non-system names, customer-bound operators, the admin token file and its recovery, CLI
//! profiles, `whoami`'s expiry, ops' requester token id, and an endpoint approved after its
//! creator's token expired. Real `postern server`, `postern-agent` and CLI processes.

use anyhow::{anyhow, Result};
use postern::tcp_endpoint::Forwarder;
use postern::testbed::{
    bin, echo_round_trip, echo_server, id_of, terminate, wait_until, Agent, CliOutput, Gateway,
};
use serde_json::Value;
use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const APP: &str = "tok-app";
const CUSTOMER: &str = "acme-corp";

/// Gateway + an online agent with an echo resource, automatic policy, and a live operate grant.
fn setup(dir: &Path) -> Result<(Gateway, Agent)> {
    let gw = Gateway::start(&dir.join("gw"))?;
    let echo = echo_server()?;
    let body = format!(
        "[policy]\napproval = \"automatic\"\n\n[[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"{echo}\"\n"
    );
    let agent = Agent::online(&gw, &dir.join("agent"), APP, CUSTOMER, &body)?;
    let grant = gw.request_operate(APP, CUSTOMER, "1h")?;
    assert_eq!(grant["state"], "active", "{grant}");
    Ok((gw, agent))
}

fn create(gw: &Gateway, args: &[&str]) -> Result<CliOutput> {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    gw.cli(&all)
}

fn secret(created: &Value) -> Result<String> {
    Ok(created["token"]
        .as_str()
        .ok_or_else(|| anyhow!("no token in {created}"))?
        .to_string())
}

fn tcp_endpoint_args(customer: &str) -> Vec<&str> {
    vec![
        "ops",
        "endpoint",
        "create",
        "--type",
        "tcp",
        "--app",
        APP,
        "--customer",
        customer,
        "--origin-resource-id",
        "null_resource.echo",
        "--ttl",
        "10m",
    ]
}

fn token_in_list<'a>(list: &'a Value, id: &str) -> Option<&'a Value> {
    list["tokens"].as_array()?.iter().find(|t| t["id"] == id)
}

#[test]
fn tokens_expire_are_revoked_at_once_have_unique_names_and_stay_in_their_customer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (gw, _agent) = setup(dir.path())?;

    // Names: unique among live tokens, never a system actor's.
    let alice = create(
        &gw,
        &["--role", "operator", "--name", "alice@vendor.example"],
    )?
    .ok()?;
    let expires: jiff::Timestamp = alice["expires_at"]
        .as_str()
        .ok_or_else(|| anyhow!("no expiry: {alice}"))?
        .parse()?;
    let in_90d = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(90 * 24);
    assert!(
        (in_90d - expires).abs() < jiff::SignedDuration::from_mins(10),
        "default lifetime is 90 days: {alice}"
    );
    let dup = create(
        &gw,
        &[
            "--role",
            "approver",
            "--name",
            "alice@vendor.example",
            "--customer",
            CUSTOMER,
        ],
    )?;
    assert_eq!(dup.error_code(), Some("CONFLICT"), "{:?}", dup.json);
    assert!(!dup.json["error"]["hint"].as_str().unwrap_or("").is_empty());
    for name in ["policy:x", "system:gateway", "agent:ap_1"] {
        let refused = create(&gw, &["--role", "operator", "--name", name])?;
        assert_eq!(
            refused.error_code(),
            Some("INVALID_REQUEST"),
            "{name}: {:?}",
            refused.json
        );
    }
    let forever = create(
        &gw,
        &["--role", "operator", "--name", "ci-bot", "--ttl", "never"],
    )?
    .ok()?;
    assert_eq!(forever["expires_at"], Value::Null, "{forever}");

    // Expiry: a 2-second token is UNAUTHENTICATED, with a hint, once its time is up.
    let short = create(
        &gw,
        &[
            "--role",
            "operator",
            "--name",
            "short@vendor.example",
            "--ttl",
            "2s",
        ],
    )?
    .ok()?;
    let short_token = secret(&short)?;
    let short_id = short["id"].as_str().unwrap_or_default().to_string();
    let mut last = None;
    let expired = wait_until(Duration::from_secs(60), || {
        let out = gw.cli_as(&short_token, &["whoami"]);
        let done = matches!(&out, Ok(o) if o.error_code() == Some("UNAUTHENTICATED"));
        last = out.ok().map(|o| o.json);
        done
    });
    assert!(expired, "the 2s token kept working: {last:?}");
    let err = &last.unwrap_or_default()["error"];
    assert!(
        err["message"].as_str().unwrap_or("").contains("expired"),
        "{err}"
    );
    assert!(
        err["hint"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("postern token revoke {short_id}")),
        "{err}"
    );
    for args in [
        &["appliance", "list"][..],
        &["audit", "list", "--limit", "1"],
    ] {
        assert_eq!(
            gw.cli_as(&short_token, args)?.error_code(),
            Some("UNAUTHENTICATED")
        );
    }

    // Revocation: bob's endpoint works, then bob's token is revoked — every API route refuses
    // it at once, its credentials cannot be fetched, and the endpoint it made is cut.
    let bob = create(&gw, &["--role", "operator", "--name", "bob@vendor.example"])?.ok()?;
    let (bob_token, bob_id) = (
        secret(&bob)?,
        bob["id"].as_str().unwrap_or_default().to_string(),
    );
    let home = dir.path().join("bob-home");
    let ep = gw
        .cli_home_as(&bob_token, &home, &tcp_endpoint_args(CUSTOMER))?
        .ok()?;
    let ep_id = ep["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(ep["state"], "active", "{ep}");
    let fwd = Forwarder::start(&gw, &bob_token, &home, &ep_id)?;
    assert_eq!(echo_round_trip(fwd.listen, b"before")?, b"before");
    let mut live = TcpStream::connect(fwd.listen)?;
    live.set_read_timeout(Some(Duration::from_secs(20)))?;
    live.write_all(b"tick")?;
    let mut buf = [0u8; 4];
    live.read_exact(&mut buf)?;
    assert_eq!(&buf, b"tick");
    let listed = gw.cli(&["token", "list"])?.ok()?;
    assert!(
        token_in_list(&listed, &bob_id).is_some_and(|t| !t["last_used_at"].is_null()),
        "bob's last use is shown: {listed}"
    );
    assert!(token_in_list(&listed, &bob_id)
        .is_some_and(|t| t.get("token").is_none() && t.get("secret_hash").is_none()));

    let revoked = gw.cli(&["token", "revoke", &bob_id])?.ok()?;
    assert!(!revoked["revoked_at"].is_null(), "{revoked}");
    for args in [
        &["whoami"][..],
        &["appliance", "list"],
        &["ops", "endpoint", "get", &ep_id],
        &["ops", "endpoint", "list"],
        &["access", "list"],
        &["token", "list"],
    ] {
        let out = gw.cli_home_as(&bob_token, &home, args)?;
        assert_eq!(
            out.error_code(),
            Some("UNAUTHENTICATED"),
            "{args:?}: {:?}",
            out.json
        );
        assert!(
            out.json["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("revoked")
                && !out.json["error"]["hint"].as_str().unwrap_or("").is_empty(),
            "{:?}",
            out.json
        );
    }
    // The live session was cut by the revocation, and the endpoint takes no new one.
    let mut rest = Vec::new();
    if let Err(e) = live.read_to_end(&mut rest) {
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the live session outlived the revocation: {e}"
        );
    }
    assert!(rest.is_empty(), "data after the revocation: {rest:?}");
    let after = echo_round_trip(fwd.listen, b"after").unwrap_or_default();
    assert!(after.is_empty(), "a new session went through: {after:?}");
    let ended = gw.cli(&["ops", "endpoint", "get", &ep_id])?.ok()?;
    assert_ne!(ended["state"], "active", "{ended}");
    assert!(Forwarder::start(&gw, &bob_token, &home, &ep_id).is_err());
    let again = gw.cli(&["token", "revoke", &bob_id])?;
    assert_eq!(again.error_code(), Some("CONFLICT"));
    // The name is free again for a new token (a new id: not the owner of bob's old records).
    let bob2 = create(&gw, &["--role", "operator", "--name", "bob@vendor.example"])?.ok()?;
    assert_ne!(bob2["id"], bob_id.as_str());

    // A customer-bound operator acts on its customer's appliances only.
    let globex = create(
        &gw,
        &[
            "--role",
            "operator",
            "--name",
            "gus@globex-ops",
            "--customer",
            "globex",
        ],
    )?
    .ok()?;
    let globex_token = secret(&globex)?;
    let gh = dir.path().join("gus-home");
    let refused = gw.cli_home_as(&globex_token, &gh, &tcp_endpoint_args(CUSTOMER))?;
    assert_eq!(
        refused.error_code(),
        Some("FORBIDDEN"),
        "{:?}",
        refused.json
    );
    let refused = gw.cli_as(
        &globex_token,
        &[
            "access",
            "request",
            "--app",
            APP,
            "--customer",
            CUSTOMER,
            "--level",
            "operate",
            "--duration",
            "10m",
            "--reason",
            "x",
        ],
    )?;
    assert_eq!(
        refused.error_code(),
        Some("FORBIDDEN"),
        "{:?}",
        refused.json
    );
    let seen = gw.cli_as(&globex_token, &["appliance", "list"])?.ok()?;
    assert_eq!(
        seen["appliances"].as_array().map(Vec::len),
        Some(0),
        "{seen}"
    );
    let acme = create(
        &gw,
        &[
            "--role",
            "operator",
            "--name",
            "ann@acme-ops",
            "--customer",
            CUSTOMER,
            "--ttl",
            "5m",
        ],
    )?
    .ok()?;
    let acme_token = secret(&acme)?;
    let ok = gw
        .cli_home_as(
            &acme_token,
            &dir.path().join("ann-home"),
            &tcp_endpoint_args(CUSTOMER),
        )?
        .ok()?;
    assert_eq!(ok["state"], "active", "{ok}");
    // An endpoint never outlives the token that made it (10m asked, the token has 5m).
    let ts = |v: &Value| -> Result<jiff::Timestamp> {
        Ok(v["expires_at"]
            .as_str()
            .ok_or_else(|| anyhow!("no expires_at in {v}"))?
            .parse()?)
    };
    assert!(ts(&ok)? <= ts(&acme)?, "{ok} outlives {acme}");
    // Non-admins see only their own token.
    let own = gw.cli_as(&acme_token, &["token", "list"])?.ok()?;
    assert_eq!(own["tokens"].as_array().map(Vec::len), Some(1), "{own}");

    let kinds: Vec<String> = gw.cli(&["audit", "list"])?.ok()?["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["kind"].as_str().map(str::to_string))
        .collect();
    assert!(kinds.iter().any(|k| k == "token.revoked"), "{kinds:?}");
    Ok(())
}

/// Runs `postern --output json server --data-dir DIR` expecting it to refuse to start; kills
/// it (by pid) if it comes up instead.
fn server_refuses(data_dir: &Path) -> Result<Value> {
    let mut child = Command::new(bin("postern")?)
        .args(["--output", "json", "server", "--data-dir"])
        .arg(data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let status = terminate_after(&mut child, Duration::from_secs(60));
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out)?;
    }
    assert!(
        status.is_some_and(|s| !s.success()),
        "the server started: {out}"
    );
    Ok(serde_json::from_str(
        out.trim().lines().next().unwrap_or(""),
    )?)
}

/// Waits (bounded) for the child to exit by itself; SIGTERMs it past the limit.
fn terminate_after(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    terminate(child, Duration::from_secs(5));
    None
}

#[test]
fn a_missing_admin_token_stops_start_up_and_admin_recover_mints_a_new_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("gw");
    let mut gw = Gateway::start(&data)?;
    let first_admin = gw.admin_token.clone();
    assert!(gw.stop().is_some());
    let file = data.join("admin.token");
    std::fs::remove_file(&file)?;

    let refused = server_refuses(&data)?;
    let hint = refused["error"]["hint"].as_str().unwrap_or("");
    assert!(
        hint.contains("postern token create --role admin"),
        "{refused}"
    );
    assert!(
        hint.contains("postern admin recover --data-dir"),
        "{refused}"
    );
    assert!(
        !file.exists(),
        "no admin was minted behind the operator's back"
    );

    let run = |args: &[&str]| -> Result<CliOutput> {
        let out = Command::new(bin("postern")?)
            .args(["--output", "json"])
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        Ok(CliOutput {
            success: out.status.success(),
            json: serde_json::from_slice(&out.stdout)?,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    };
    let data_arg = data.to_string_lossy().to_string();
    let recovered = run(&["admin", "recover", "--data-dir", &data_arg])?.ok()?;
    assert!(file.exists(), "{recovered}");
    let again = run(&["admin", "recover", "--data-dir", &data_arg])?;
    assert_eq!(again.error_code(), Some("CONFLICT"), "{:?}", again.json);

    let gw = Gateway::start(&data)?;
    let me = gw.cli(&["whoami"])?.ok()?;
    assert_eq!(me["role"], "admin");
    assert_eq!(me["id"], recovered["token_id"], "{me} {recovered}");
    // The first admin was not revoked by the recovery; both are in the trail's story.
    assert_eq!(gw.cli_as(&first_admin, &["whoami"])?.ok()?["role"], "admin");
    let records = gw.cli(&["audit", "list"])?.ok()?;
    assert!(
        records["records"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["kind"] == "token.recovered"
                && r["detail"]["token_id"] == recovered["token_id"]),
        "{records}"
    );
    assert_eq!(gw.cli(&["audit", "verify"])?.ok()?["ok"], true);
    Ok(())
}

/// `postern --output json ARGS` with only the environment given (no POSTERN_* inherited).
fn cli_env(env: &[(&str, &str)], args: &[&str]) -> Result<CliOutput> {
    let mut cmd = Command::new(bin("postern")?);
    cmd.args(["--output", "json"])
        .args(args)
        .stdin(Stdio::null());
    for k in [
        "POSTERN_ADDR",
        "POSTERN_TOKEN",
        "POSTERN_CA_FILE",
        "POSTERN_PROFILE",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output()?;
    Ok(CliOutput {
        success: out.status.success(),
        json: serde_json::from_slice(&out.stdout)
            .map_err(|e| anyhow!("{e}: {}", String::from_utf8_lossy(&out.stderr)))?,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

#[test]
fn profiles_name_a_gateway_and_environment_variables_win() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    let xdg = dir.path().join("xdg");
    let token_file = dir.path().join("admin.tok");
    std::fs::write(&token_file, format!("{}\n", gw.admin_token))?;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644))?;
    let xdg_s = xdg.to_string_lossy().to_string();
    let env = [("XDG_CONFIG_HOME", xdg_s.as_str())];
    let (api, ca, tf) = (
        gw.api.to_string(),
        gw.ca_file.to_string_lossy().to_string(),
        token_file.to_string_lossy().to_string(),
    );
    let add = [
        "profile",
        "add",
        "prod",
        "--addr",
        &api,
        "--ca-file",
        &ca,
        "--token-file",
        &tf,
    ];

    // A token file others can read is refused.
    let loose = cli_env(&env, &add)?;
    assert_eq!(
        loose.error_code(),
        Some("INVALID_REQUEST"),
        "{:?}",
        loose.json
    );
    assert!(loose.json["error"]["hint"]
        .as_str()
        .unwrap_or("")
        .contains("chmod 600"));
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
    let added = cli_env(&env, &add)?.ok()?;
    let config = xdg.join("postern/config.toml");
    assert_eq!(added["config"], config.to_string_lossy().as_ref());
    let text = std::fs::read_to_string(&config)?;
    assert!(
        text.contains("[profiles.prod]") && !text.contains(&gw.admin_token),
        "{text}"
    );

    // Without a profile or variables there is nothing to reach.
    assert_eq!(
        cli_env(&env, &["whoami"])?.error_code(),
        Some("INVALID_REQUEST")
    );
    let by_flag = cli_env(&env, &["--profile", "prod", "whoami"])?.ok()?;
    assert_eq!(by_flag["role"], "admin");
    let by_env = cli_env(&[env[0], ("POSTERN_PROFILE", "prod")], &["whoami"])?.ok()?;
    assert_eq!(by_env["id"], by_flag["id"]);

    // The environment wins over the profile, setting by setting.
    let op = gw
        .cli(&[
            "token",
            "create",
            "--role",
            "operator",
            "--name",
            "olga@vendor.example",
        ])?
        .ok()?;
    let op_token = secret(&op)?;
    let as_op = cli_env(
        &[
            env[0],
            ("POSTERN_PROFILE", "prod"),
            ("POSTERN_TOKEN", &op_token),
        ],
        &["whoami"],
    )?
    .ok()?;
    assert_eq!(as_op["name"], "olga@vendor.example");
    let elsewhere = cli_env(
        &[
            env[0],
            ("POSTERN_PROFILE", "prod"),
            ("POSTERN_ADDR", "127.0.0.1:1"),
        ],
        &["whoami"],
    )?;
    assert_eq!(
        elsewhere.error_code(),
        Some("GATEWAY_UNREACHABLE"),
        "{:?}",
        elsewhere.json
    );

    let unknown = cli_env(&env, &["--profile", "nope", "whoami"])?;
    assert_eq!(unknown.error_code(), Some("INVALID_REQUEST"));
    assert!(unknown.json["error"]["hint"]
        .as_str()
        .unwrap_or("")
        .contains("prod"));
    // A config with a key it does not know is an error naming it, not silently ignored.
    std::fs::write(&config, format!("{text}\ncolour = \"blue\"\n"))?;
    let typo = cli_env(&env, &["--profile", "prod", "whoami"])?;
    assert_eq!(typo.error_code(), Some("INVALID_REQUEST"));
    assert!(
        typo.json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("colour"),
        "{:?}",
        typo.json
    );
    Ok(())
}

/// The same rules on the PostgreSQL store (the migration's partial unique index, the
/// revocation's table lock).
#[test]
fn token_rules_hold_on_the_postgresql_store() -> Result<()> {
    let cluster = postern::pg_cluster::shared();
    let url = cluster.create_database("tokens_rules");
    let dir = tempfile::tempdir()?;
    let gw = Gateway::start_with_store(&dir.path().join("gw"), &url)?;
    let a = create(&gw, &["--role", "operator", "--name", "pat@vendor.example"])?.ok()?;
    let dup = create(&gw, &["--role", "operator", "--name", "pat@vendor.example"])?;
    assert_eq!(dup.error_code(), Some("CONFLICT"), "{:?}", dup.json);
    let id = a["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        gw.cli_as(&secret(&a)?, &["whoami"])?.ok()?["id"],
        id.as_str()
    );
    gw.cli(&["token", "revoke", &id])?.ok()?;
    assert_eq!(
        gw.cli_as(&secret(&a)?, &["whoami"])?.error_code(),
        Some("UNAUTHENTICATED")
    );
    create(&gw, &["--role", "operator", "--name", "pat@vendor.example"])?.ok()?;
    // The bootstrap admin is the only usable admin: it cannot revoke itself.
    let me = gw.cli(&["whoami"])?.ok()?;
    let last = gw.cli(&["token", "revoke", me["id"].as_str().unwrap_or_default()])?;
    assert_eq!(last.error_code(), Some("CONFLICT"), "{:?}", last.json);
    let list = gw.cli(&["token", "list"])?.ok()?;
    assert_eq!(list["tokens"].as_array().map(Vec::len), Some(3), "{list}");
    Ok(())
}

/// An agent with a manual policy (a person decides grants, ops and endpoints), an echo resource
/// and a cluster whose `kubectl` only prints its arguments; online.
fn manual_setup(dir: &Path) -> Result<(Gateway, Agent)> {
    let gw = Gateway::start(&dir.join("gw"))?;
    let echo = echo_server()?;
    let kubectl = dir.join("kubectl");
    std::fs::write(&kubectl, "#!/bin/sh\necho \"args: $*\"\n")?;
    std::fs::set_permissions(
        &kubectl,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let kubeconfig = dir.join("cluster.kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n")?;
    let body = format!(
        "[policy]\napproval = \"manual\"\n\n[tools]\nkubectl = \"{}\"\n\n\
         [[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"{echo}\"\n\n\
         [[resource]]\nid = \"kubernetes_cluster.main\"\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespaces = [\"prod\"]\n",
        kubectl.display(),
        kubeconfig.display()
    );
    let agent = Agent::online(&gw, &dir.join("agent"), APP, CUSTOMER, &body)?;
    Ok((gw, agent))
}

fn timestamp(v: &Value) -> Result<jiff::Timestamp> {
    Ok(v.as_str()
        .ok_or_else(|| anyhow!("not a time: {v}"))?
        .parse()?)
}

#[test]
fn ops_keep_the_requesters_token_id_whoami_shows_expiry_and_a_creator_token_that_expired_blocks_activation(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (gw, _agent) = manual_setup(dir.path())?;
    let carol = create(
        &gw,
        &[
            "--role",
            "approver",
            "--name",
            "carol@acme.example",
            "--customer",
            CUSTOMER,
        ],
    )?
    .ok()?;
    let carol_token = secret(&carol)?;
    let alice = create(
        &gw,
        &[
            "--role",
            "operator",
            "--name",
            "alice@vendor.example",
            "--ttl",
            "1h",
        ],
    )?
    .ok()?;
    let (alice_token, alice_id) = (secret(&alice)?, id_of(&alice)?);

    // whoami shows when the token stops working; the bootstrap admin's never does.
    let me = gw.cli_as(&alice_token, &["whoami"])?.ok()?;
    assert_eq!(me["id"], alice_id.as_str(), "{me}");
    assert_eq!(
        timestamp(&me["expires_at"])?,
        timestamp(&alice["expires_at"])?,
        "{me} / {alice}"
    );
    let admin = gw.cli(&["whoami"])?.ok()?;
    assert!(
        admin.get("expires_at").is_some_and(Value::is_null),
        "{admin}"
    );

    // The operate grant, decided by the customer.
    let grant = gw.request_operate(APP, CUSTOMER, "1h")?;
    assert_eq!(grant["state"], "pending-approval", "{grant}");
    let approved = gw
        .cli_as(&carol_token, &["approvals", "approve", &id_of(&grant)?])?
        .ok()?;
    assert_eq!(approved["state"], "active", "{approved}");

    // An op keeps the id of the token that asked, beside its display name.
    let op = gw
        .cli_as(
            &alice_token,
            &[
                "ops",
                "kubectl",
                "--app",
                APP,
                "--customer",
                CUSTOMER,
                "--origin-resource-id",
                "kubernetes_cluster.main",
                "--command",
                "kubectl get pods",
            ],
        )?
        .ok()?;
    assert_eq!(op["requested_by"], "alice@vendor.example", "{op}");
    assert_eq!(op["requested_by_id"], alice_id.as_str(), "{op}");
    let seen = gw.cli(&["ops", "get", &id_of(&op)?])?.ok()?;
    assert_eq!(seen["requested_by_id"], alice_id.as_str(), "{seen}");

    // Dave's short-lived token asks for an endpoint; the customer approves it only after the
    // token expired: the endpoint does not become active, and the approver is told why.
    let dave = create(
        &gw,
        &[
            "--role",
            "operator",
            "--name",
            "dave@vendor.example",
            "--ttl",
            "6s",
        ],
    )?
    .ok()?;
    let (dave_token, dave_id) = (secret(&dave)?, id_of(&dave)?);
    let pending = gw
        .cli_home_as(
            &dave_token,
            &dir.path().join("dave-home"),
            &tcp_endpoint_args(CUSTOMER),
        )?
        .ok()?;
    assert_eq!(pending["state"], "pending-approval", "{pending}");
    let ep_id = id_of(&pending)?;
    let dave_expired = wait_until(Duration::from_secs(60), || {
        gw.cli_as(&dave_token, &["whoami"])
            .is_ok_and(|o| o.error_code() == Some("UNAUTHENTICATED"))
    });
    assert!(dave_expired, "dave's 6s token kept working");
    let late = gw.cli_as(&carol_token, &["approvals", "approve", &ep_id])?;
    assert_eq!(
        late.error_code(),
        Some("UNAUTHENTICATED"),
        "{:?}",
        late.json
    );
    let err = &late.json["error"];
    assert!(!err["hint"].as_str().unwrap_or("").is_empty(), "{err}");
    assert_eq!(
        err["details"]["creator_token_id"],
        dave_id.as_str(),
        "{err}"
    );
    let ended = gw.cli(&["ops", "endpoint", "get", &ep_id])?.ok()?;
    assert_eq!(ended["state"], "expired", "{ended}");
    assert!(ended["address"].is_null(), "{ended}");
    // Nothing waits for a decision any more, and the trail says why it expired.
    let again = gw.cli_as(&carol_token, &["approvals", "approve", &ep_id])?;
    assert_ne!(again.error_code(), None, "{:?}", again.json);
    let records = gw.cli(&["audit", "list"])?.ok()?["records"].clone();
    let expired = records
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["kind"] == "endpoint.expired" && r["endpoint_id"] == ep_id.as_str())
        .ok_or_else(|| anyhow!("no endpoint.expired for {ep_id}: {records}"))?;
    assert_eq!(
        expired["detail"]["creator_token_id"],
        dave_id.as_str(),
        "{expired}"
    );
    assert!(
        !records
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["kind"] == "endpoint.created" && r["endpoint_id"] == ep_id.as_str()),
        "{records}"
    );
    Ok(())
}
