//! The CLI in daily use, with real gateway and agent processes: `ops list` and its filters
//! (scoped by the caller's token), `--wait` / `ops wait` progress, their deadline and exit
//! codes, `--output json` for usage errors, completions and man pages.

use anyhow::{anyhow, bail, Result};
use postern::testbed::{bin, wait_until, Agent, Gateway};
use serde_json::Value;
use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

const CLUSTER: &str = "aws_eks_cluster.main_cluster";

/// A stand-in `kubectl`: prints what it was asked; `hang` sleeps past any op timeout.
fn agent_body(dir: &Path, approval: &str) -> Result<String> {
    let kubectl = dir.join("kubectl");
    std::fs::write(
        &kubectl,
        "#!/bin/sh\ncase \"$1\" in\n  hang) exec sleep 60 ;;\n  *) echo \"NAME READY STATUS\"; echo \"args: $*\" ;;\nesac\n",
    )?;
    std::fs::set_permissions(&kubectl, std::fs::Permissions::from_mode(0o755))?;
    let kubeconfig = dir.join("cluster.kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n")?;
    Ok(format!(
        "[policy]\napproval = \"{approval}\"\n\n\
         [tools]\nkubectl = \"{}\"\n\n\
         [[resource]]\nid = \"{CLUSTER}\"\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespaces = [\"shop-prod\"]\n",
        kubectl.display(),
        kubeconfig.display()
    ))
}

/// `postern ARGS` with `token`, not waited for.
fn postern(gw: &Gateway, token: &str, args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(bin("postern")?);
    cmd.args(args)
        .env("POSTERN_ADDR", gw.api.to_string())
        .env("POSTERN_TOKEN", token)
        .env("POSTERN_CA_FILE", &gw.ca_file)
        .stdin(Stdio::null());
    Ok(cmd)
}

/// Runs `postern ARGS`; (exit code, stdout, stderr).
fn run(gw: &Gateway, token: &str, args: &[&str]) -> Result<(i32, String, String)> {
    let Output {
        status,
        stdout,
        stderr,
    } = postern(gw, token, args)?.output()?;
    Ok((
        status.code().ok_or_else(|| anyhow!("killed by a signal"))?,
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    ))
}

fn json(stdout: &str) -> Result<Value> {
    serde_json::from_str(stdout.trim()).map_err(|e| anyhow!("{e}: {stdout:?}"))
}

/// Ids of the ops `ops list ARGS` shows `token`, sorted.
fn listed(gw: &Gateway, token: &str, args: &[&str]) -> Result<Vec<String>> {
    let mut all = vec!["--output", "json", "ops", "list"];
    all.extend_from_slice(args);
    let (code, out, err) = run(gw, token, &all)?;
    if code != 0 {
        bail!("ops list {args:?} exited {code}: {out} {err}");
    }
    let v = json(&out)?;
    let mut ids: Vec<String> = v["ops"]
        .as_array()
        .ok_or_else(|| anyhow!("no ops array in {v}"))?
        .iter()
        .filter_map(|o| o["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    Ok(ids)
}

fn sorted(ids: &[&String]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn kubectl_op(customer: &str, command: &str, extra: &[&'static str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--output",
        "json",
        "ops",
        "kubectl",
        "--app",
        "shop",
        "--customer",
        customer,
        "--origin-resource-id",
        CLUSTER,
        "--command",
        command,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Waits (bounded) for a child to exit; kills it if it does not.
fn exit_code_of(child: &mut Child, limit: Duration) -> Result<i32> {
    let mut status = None;
    wait_until(limit, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    match status {
        Some(s) => s.code().ok_or_else(|| anyhow!("killed by a signal")),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running after {limit:?}")
        }
    }
}

#[test]
fn ops_list_filters_within_the_tokens_scope_and_waits_end_with_distinct_exit_codes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    let acme_dir = dir.path().join("acme");
    let globex_dir = dir.path().join("globex");
    std::fs::create_dir_all(&acme_dir)?;
    std::fs::create_dir_all(&globex_dir)?;
    let _acme = Agent::online(
        &gw,
        &acme_dir,
        "shop",
        "acme",
        &agent_body(&acme_dir, "automatic")?,
    )?;
    let _globex = Agent::online(
        &gw,
        &globex_dir,
        "shop",
        "globex",
        &agent_body(&globex_dir, "manual")?,
    )?;
    let alice = gw.mint_token("operator", "alice@vendor.example", None)?;
    // An operator token minted for one customer sees that customer's ops only.
    let carol = gw.mint_token("operator", "carol@vendor.example", Some("globex"))?;
    let bob = gw.mint_token("approver", "bob@globex.example", Some("globex"))?;

    assert_eq!(gw.request_operate("shop", "acme", "1h")?["state"], "active");
    let grant = gw
        .cli_as(
            &alice,
            &[
                "access",
                "request",
                "--app",
                "shop",
                "--customer",
                "globex",
                "--level",
                "operate",
                "--duration",
                "1h",
                "--reason",
                "cli test",
            ],
        )?
        .ok()?;
    let gid = grant["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        gw.cli_as(&bob, &["approvals", "approve", &gid])?.ok()?["state"],
        "active"
    );

    // Ops: alice's completed one on acme, alice's and carol's waiting ones on globex.
    let (code, out, err) = run(
        &gw,
        &alice,
        &strs(&kubectl_op("acme", "kubectl get pods", &["--wait"])),
    )?;
    assert_eq!(code, 0, "{out} {err}");
    let done = json(&out)?;
    assert_eq!(done["state"], "completed", "{done}");
    let done_id = done["id"].as_str().unwrap_or_default().to_string();
    let (code, out, err) = run(
        &gw,
        &alice,
        &strs(&kubectl_op("globex", "kubectl get pods", &[])),
    )?;
    assert_eq!(code, 0, "{out} {err}");
    let alice_waiting = json(&out)?["id"].as_str().unwrap_or_default().to_string();
    let (code, out, err) = run(
        &gw,
        &carol,
        &strs(&kubectl_op("globex", "kubectl get svc", &[])),
    )?;
    assert_eq!(code, 0, "{out} {err}");
    let carol_waiting = json(&out)?["id"].as_str().unwrap_or_default().to_string();

    assert_eq!(
        listed(&gw, &alice, &[])?,
        sorted(&[&done_id, &alice_waiting, &carol_waiting])
    );
    assert_eq!(
        listed(&gw, &alice, &["--state", "completed"])?,
        vec![done_id.clone()]
    );
    assert_eq!(
        listed(&gw, &alice, &["--state", "pending-approval"])?,
        sorted(&[&alice_waiting, &carol_waiting])
    );
    assert_eq!(
        listed(&gw, &alice, &["--app", "shop", "--customer", "globex"])?,
        sorted(&[&alice_waiting, &carol_waiting])
    );
    assert_eq!(
        listed(&gw, &alice, &["--customer", "acme"])?,
        vec![done_id.clone()]
    );
    assert_eq!(
        listed(&gw, &alice, &["--mine"])?,
        sorted(&[&done_id, &alice_waiting])
    );
    assert_eq!(
        listed(&gw, &carol, &["--mine"])?,
        vec![carol_waiting.clone()]
    );
    // Scope: carol sees globex's ops only, and may not ask for acme's.
    assert_eq!(
        listed(&gw, &carol, &[])?,
        sorted(&[&alice_waiting, &carol_waiting])
    );
    let (code, out, _) = run(
        &gw,
        &carol,
        &["--output", "json", "ops", "list", "--customer", "acme"],
    )?;
    assert_eq!(code, 1);
    assert_eq!(json(&out)?["error"]["code"], "FORBIDDEN", "{out}");
    // A state the gateway does not know: a structured error with the states to pick from.
    let (code, out, _) = run(
        &gw,
        &alice,
        &["--output", "json", "ops", "list", "--state", "runnin"],
    )?;
    assert_eq!(code, 1);
    let e = json(&out)?;
    assert_eq!(e["error"]["code"], "INVALID_REQUEST", "{e}");
    assert!(
        e["error"]["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("timed-out"),
        "{e}"
    );
    // --app without --customer is a usage error (exit 2), JSON when asked for.
    let (code, out, _) = run(
        &gw,
        &alice,
        &["ops", "list", "--app", "shop", "--output", "json"],
    )?;
    assert_eq!(code, 2, "{out}");
    assert_eq!(json(&out)?["error"]["code"], "INVALID_REQUEST", "{out}");
    // Text: a table with a header and one row per op.
    let (code, out, err) = run(&gw, &alice, &["ops", "list", "--customer", "globex"])?;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("OP") && lines[0].contains("STATE"),
        "{out}"
    );
    assert!(
        out.contains(&alice_waiting)
            && out.contains("pending-approval")
            && out.contains("shop/globex"),
        "{out}"
    );

    // --wait whose own deadline passes first: WAIT_TIMEOUT, exit 5, progress on stderr
    // saying the state and who it waits for.
    let (code, out, err) = run(
        &gw,
        &alice,
        &strs(&kubectl_op(
            "globex",
            "kubectl get nodes",
            &["--wait", "--wait-timeout", "4s"],
        )),
    )?;
    assert_eq!(code, 5, "{out} {err}");
    let e = json(&out)?;
    assert_eq!(e["error"]["code"], "WAIT_TIMEOUT", "{e}");
    assert_eq!(e["error"]["details"]["state"], "pending-approval", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("still pending-approval"),
        "{e}"
    );
    let progress: Vec<Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["waiting"].is_object())
        .collect();
    assert!(!progress.is_empty(), "no progress on stderr: {err}");
    assert!(progress.len() <= 3, "too chatty: {err}");
    let p = &progress[0]["waiting"];
    assert_eq!(p["state"], "pending-approval", "{p}");
    assert!(
        p["waiting_for"]
            .as_str()
            .unwrap_or_default()
            .contains("approver of customer globex"),
        "{p}"
    );
    assert!(p["elapsed_s"].as_u64().is_some_and(|s| s >= 2), "{p}");

    // `ops wait` in text: the same, as lines.
    let (code, out, err) = run(
        &gw,
        &alice,
        &["ops", "wait", &alice_waiting, "--wait-timeout", "3s"],
    )?;
    assert_eq!(code, 5, "{out} {err}");
    assert!(
        err.contains(&format!(
            "waiting for op {alice_waiting}: pending-approval, for an approver of customer globex"
        )),
        "{err}"
    );
    assert!(
        err.contains("error: gave up waiting") && err.contains("hint:"),
        "{err}"
    );

    // Denied while waited for: exit 3.
    let mut waiting = postern(
        &gw,
        &alice,
        &["--output", "json", "ops", "wait", &alice_waiting],
    )?
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()?;
    let denied = gw
        .cli_as(
            &bob,
            &["approvals", "deny", &alice_waiting, "--message", "not now"],
        )?
        .ok()?;
    assert_eq!(denied["state"], "denied", "{denied}");
    assert_eq!(exit_code_of(&mut waiting, Duration::from_secs(30))?, 3);
    // Timed out in the appliance: exit 4.
    let (code, out, err) = run(
        &gw,
        &alice,
        &strs(&kubectl_op(
            "acme",
            "kubectl hang",
            &["--timeout", "2s", "--wait"],
        )),
    )?;
    assert_eq!(code, 4, "{out} {err}");
    assert_eq!(json(&out)?["state"], "timed-out", "{out}");
    assert_eq!(
        listed(&gw, &alice, &["--state", "denied"])?,
        vec![alice_waiting.clone()]
    );
    Ok(())
}

/// Usage errors, completions and man pages need no gateway.
fn offline(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(bin("postern")?)
        .args(args)
        .env_remove("POSTERN_ADDR")
        .env_remove("POSTERN_TOKEN")
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status
            .code()
            .ok_or_else(|| anyhow!("killed by a signal"))?,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn usage_errors_are_json_when_asked_for_and_exit_2() -> Result<()> {
    for args in [
        vec!["--output", "json", "ops", "list", "--bogus"],
        vec!["ops", "kubectl", "--output=json"],
        vec!["--output", "json", "nosuchcommand"],
        vec!["--output", "json", "ops", "wait"],
        vec!["--output", "json", "completions", "tcsh"],
    ] {
        let (code, out, err) = offline(&args)?;
        assert_eq!(code, 2, "{args:?}: {out} {err}");
        let v = json(&out)?;
        assert_eq!(v["error"]["code"], "INVALID_REQUEST", "{args:?}: {v}");
        assert!(
            !v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "{v}"
        );
        assert!(
            v["error"]["hint"]
                .as_str()
                .unwrap_or_default()
                .contains("--help"),
            "{v}"
        );
        assert!(
            v["error"]["details"]["usage"]
                .as_str()
                .unwrap_or_default()
                .contains("--help"),
            "{v}"
        );
        assert!(
            v["error"]["details"]["kind"]
                .as_str()
                .is_some_and(|k| !k.contains(' ')),
            "{v}"
        );
    }
    // Text: clap's own message on stderr, exit 2.
    let (code, out, err) = offline(&["ops", "list", "--bogus"])?;
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(err.contains("--bogus"), "{err}");
    // Help is not an error, and documents the exit codes.
    let (code, out, _) = offline(&["--output", "json", "--help"])?;
    assert_eq!(code, 0);
    assert!(
        out.contains("Exit codes:") && out.contains("WAIT_TIMEOUT"),
        "{out}"
    );
    Ok(())
}

#[test]
fn completions_and_man_pages_come_from_the_commands() -> Result<()> {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef postern"),
        ("fish", "complete -c postern"),
    ] {
        let (code, out, err) = offline(&["completions", shell])?;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(marker), "{shell}: {out}");
        assert!(
            out.contains("wait-timeout") && out.contains("completions"),
            "{shell}"
        );
    }
    let dir = tempfile::tempdir()?;
    let man = dir.path().join("man1");
    let (code, out, err) = offline(&["--output", "json", "man", man.to_str().unwrap_or_default()])?;
    assert_eq!(code, 0, "{out} {err}");
    let v = json(&out)?;
    let pages: Vec<String> = v["pages"]
        .as_array()
        .ok_or_else(|| anyhow!("{v}"))?
        .iter()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    assert!(pages.len() > 20, "{pages:?}");
    let ops_list = std::fs::read_to_string(man.join("postern-ops-list.1"))?;
    assert!(
        ops_list.starts_with(".ie") || ops_list.contains(".TH"),
        "{ops_list}"
    );
    assert!(ops_list.contains("mine"), "{ops_list}");
    Ok(())
}
