//! `postern dev`: a gateway with the embedded store, a local agent for a demo appliance
//! (`demo-app` / `demo-customer`) with a demo echo service, and a guide to what to try next.

use super::{client::ApiClient, OutputFormat};
use crate::{config::GatewayConfig, server};
use anyhow::{bail, Context, Result};
use endpoint_types::api::ApplianceAdded;
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::{io::AsyncWriteExt, net::TcpListener, process::Command};

const APP: &str = "demo-app";
const CUSTOMER: &str = "demo-customer";
const ECHO_RESOURCE: &str = "null_resource.echo";

fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("postern").join("dev")
}

/// The agent binary: next to this one (cargo puts both in target/<profile>), or on PATH.
fn agent_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("POSTERN_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().context("locating the postern binary")?;
    let beside = me.with_file_name("postern-agent");
    if beside.exists() {
        return Ok(beside);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("postern-agent");
            if p.exists() {
                return Ok(p);
            }
        }
    }
    bail!("postern-agent was not found next to {} or on PATH; build it with `cargo build --workspace`", me.display())
}

/// The demo appliance's service: echoes every byte back.
async fn start_echo() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

fn agent_toml(dir: &Path, echo: SocketAddr) -> String {
    format!(
        "# Written by `postern dev` for the demo appliance; rewritten at every start.\n\
         audit_path = \"{audit}\"\n\n\
         [policy]\napproval = \"automatic\"\nsteady_state = true\n\n\
         [[resource]]\nid = \"{ECHO_RESOURCE}\"\nkind = \"tcp\"\ntarget = \"{echo}\"\n",
        audit = dir.join("audit.jsonl").display(),
    )
}

fn enrollment_keys(relay: SocketAddr, appliance_id: &str, dir: &Path) -> String {
    format!(
        "gateway = \"{relay}\"\nappliance_id = \"{appliance_id}\"\nkey_file = \"{}\"\ncert_file = \"{}\"\nca_file = \"{}\"\n",
        dir.join("agent.key").display(),
        dir.join("agent.crt").display(),
        dir.join("ca.crt").display(),
    )
}

async fn run_agent_cmd(bin: &Path, args: &[&str], log: &Path) -> Result<()> {
    let logf = std::fs::File::create(log)?;
    let status = Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(logf)
        .status()
        .await?;
    if !status.success() {
        bail!(
            "`postern-agent {}` failed; see {}",
            args.first().unwrap_or(&""),
            log.display()
        );
    }
    Ok(())
}

pub async fn run(data_dir: Option<PathBuf>, out: OutputFormat) -> Result<()> {
    let data_dir = server::absolute(&data_dir.unwrap_or_else(default_data_dir));
    let agent_dir = data_dir.join("agent");
    std::fs::create_dir_all(&agent_dir)
        .with_context(|| format!("creating {}", agent_dir.display()))?;
    let agent_bin = agent_binary()?;
    let echo = start_echo().await?;

    let running = server::start(GatewayConfig::new(data_dir.join("gateway"))).await?;
    let token = std::fs::read_to_string(&running.admin_token_file)?;
    let api = ApiClient::new(
        Some(running.api.to_string()),
        Some(token),
        Some(running.ca_file.clone()),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;

    let config = agent_dir.join("agent.toml");
    let store = &running.gateway.store;
    let existing = store.find_appliance(APP, CUSTOMER).await?;
    let reusable = existing
        .as_ref()
        .filter(|a| a.enrolled_at.is_some() && agent_dir.join("agent.crt").exists());
    let appliance_id = match reusable {
        Some(a) => {
            std::fs::write(
                &config,
                format!(
                    "{}{}",
                    enrollment_keys(running.relay, &a.id, &agent_dir),
                    agent_toml(&agent_dir, echo)
                ),
            )?;
            a.id.clone()
        }
        None => {
            if let Some(stale) = existing {
                store
                    .revoke_appliance(&stale.id, jiff::Timestamp::now())
                    .await?;
            }
            let added: ApplianceAdded = api
                .post(
                    "/v1/appliances",
                    serde_json::json!({"app": APP, "customer": CUSTOMER}),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            std::fs::write(&config, agent_toml(&agent_dir, echo))?;
            let relay = running.relay.to_string();
            let cfg = config.to_string_lossy().to_string();
            run_agent_cmd(
                &agent_bin,
                &[
                    "enroll",
                    "--gateway",
                    &relay,
                    "--token",
                    added.token.expose(),
                    "--config",
                    &cfg,
                ],
                &agent_dir.join("enroll.log"),
            )
            .await?;
            added.appliance_id
        }
    };

    let agent_log = agent_dir.join("agent.log");
    let mut agent = Command::new(&agent_bin)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log)?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", agent_bin.display()))?;
    let mut online = false;
    for _ in 0..300 {
        if running.gateway.agents.is_online(&appliance_id) {
            online = true;
            break;
        }
        if let Ok(Some(status)) = agent.try_wait() {
            bail!(
                "the demo agent exited ({status}); see {}",
                agent_log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !online {
        bail!(
            "the demo agent did not connect within 30 s; see {}",
            agent_log.display()
        );
    }

    let mut ready = running.ready_json();
    ready["appliance_id"] = appliance_id.clone().into();
    ready["agent_config"] = config.display().to_string().into();
    ready["agent_log"] = agent_log.display().to_string().into();
    let me = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "postern".into());
    let guide = format!(
        "\nPostern dev is up: gateway, embedded store, and the demo appliance {APP} / {CUSTOMER} ({appliance_id}) online.\n\
         \n  API    https://{api}\n  relay  udp {relay}\n  CA     {fp}\n  agent  {config} (log: {log})\n\
         \nTry, in another shell:\n\
         \n  export POSTERN_ADDR={api} POSTERN_CA_FILE={ca} POSTERN_TOKEN=$(cat {tok})\
         \n  {me} appliance list\
         \n  {me} access request --app {APP} --customer {CUSTOMER} --level operate --duration 1h --reason \"trying Postern\"\
         \n  {me} ops endpoint create --type tcp --app {APP} --customer {CUSTOMER} --origin-resource-id {ECHO_RESOURCE} --ttl 10m\
         \n  # the endpoint admits only TLS with its client certificate; forward a local port to it:\
         \n  {me} ops endpoint connect <endpoint id> --listen 127.0.0.1:7001 &\
         \n  # the demo echo service answers through the tunnel on that port:\
         \n  echo hello | nc -q1 127.0.0.1 7001\
         \n  {me} ops endpoint list\
         \n  {me} ops endpoint retire <endpoint id>\
         \n  {me} audit list\
         \n\nCtrl-C stops everything.\n",
        api = running.api,
        relay = running.relay,
        fp = running.ca_fingerprint,
        config = config.display(),
        log = agent_log.display(),
        ca = running.ca_file.display(),
        tok = running.admin_token_file.display(),
    );
    match out {
        OutputFormat::Json => {
            println!("{ready}");
            eprintln!("{guide}");
        }
        OutputFormat::Text => println!("{guide}"),
    }

    tokio::select! {
        _ = server::shutdown_signal() => {}
        status = agent.wait() => {
            tracing::error!(?status, log = %agent_log.display(), "the demo agent exited");
            server::shutdown_signal().await;
        }
    }
    eprintln!("stopping the demo agent and the gateway");
    if let Some(pid) = agent.id() {
        // SIGTERM lets the agent close its tunnel and audit trail cleanly.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        if tokio::time::timeout(Duration::from_secs(5), agent.wait())
            .await
            .is_err()
        {
            let _ = agent.kill().await;
        }
    }
    running.shutdown().await;
    Ok(())
}
