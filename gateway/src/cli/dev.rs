//! `postern dev`: a gateway with the embedded store and two demo appliances of
//! `demo-customer` — `demo-app` (automatic policy) and `demo-manual` (manual, with a demo
//! approver) — whose agents reach one resource of every kind, each real: a throwaway
//! PostgreSQL cluster, a private sshd, the test Kubernetes API server and an echo service.
//! A piece whose software is missing is skipped with a note of what to install. It prints a
//! tour, and on SIGINT/SIGTERM ends every process it started, by PID.

mod appliance;
mod approver;
mod kube;
mod postgres;
mod process;
mod sshd;
mod tour;

use super::{client::ApiClient, OutputFormat};
use crate::{config::GatewayConfig, server};
use anyhow::{bail, Context, Result};
use appliance::{DemoAgent, Resources, Spec};
use process::DemoProcess;
use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};
use tokio::{io::AsyncWriteExt, net::TcpListener};

const RUN_DIR_PREFIX: &str = "postern-dev-";

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

/// The demo appliance's tcp service: echoes every byte back.
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

/// A fresh directory for everything the demo resources keep (cluster, sshd files, the API
/// server's kubeconfig), removed at exit. Outside the data dir because the postgres and demo
/// users must reach it (a home directory such as /root is closed to them). Run dirs left by a
/// killed `postern dev` are removed here.
fn make_run_dir() -> Result<PathBuf> {
    let tmp = std::env::temp_dir();
    for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = e.file_name();
        let stale_pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(RUN_DIR_PREFIX))
            .and_then(|p| p.parse::<u32>().ok());
        if stale_pid.is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let dir = tmp.join(format!("{RUN_DIR_PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// What came up, and the processes behind it.
#[derive(Default)]
struct DemoWorld {
    resources: Resources,
    processes: Vec<DemoProcess>,
    skipped: Vec<(&'static str, String)>,
}

async fn start_resources(run_dir: &Path) -> Result<DemoWorld> {
    let mut w = DemoWorld::default();
    w.resources.echo = Some(start_echo().await?);
    match kube::available() {
        Err(note) => w.skipped.push(("Kubernetes", note)),
        Ok(bin) => match kube::start(&bin, &run_dir.join("kube")).await {
            Ok(k) => {
                w.resources.kubeconfig = Some(k.kubeconfig);
                w.processes.push(k.process);
            }
            Err(e) => w.skipped.push(("Kubernetes", format!("{e:#}"))),
        },
    }
    match postgres::available() {
        Err(note) => w.skipped.push(("PostgreSQL", note)),
        Ok((bin, ids)) => match postgres::start(&bin, ids, &run_dir.join("postgres")).await {
            Ok(pg) => {
                w.resources.postgres_admin_url = Some(pg.admin_url);
                w.processes.push(pg.process);
            }
            Err(e) => w.skipped.push(("PostgreSQL", format!("{e:#}"))),
        },
    }
    match sshd::available() {
        Err(note) => w.skipped.push(("SSH", note)),
        Ok((bin, keygen)) => match sshd::start(&bin, &keygen, &run_dir.join("sshd")).await {
            Ok(s) => {
                w.resources.ssh = Some((s.addr, s.host_key, s.client_key));
                w.processes.push(s.process);
            }
            Err(e) => w.skipped.push(("SSH", format!("{e:#}"))),
        },
    }
    Ok(w)
}

/// Ends agents first (they close their tunnels and trails), then the resources.
async fn stop_all(agents: Vec<DemoAgent>, processes: Vec<DemoProcess>) {
    for a in agents {
        a.process.stop(Duration::from_secs(5)).await;
    }
    for p in processes.into_iter().rev() {
        p.stop(Duration::from_secs(5)).await;
    }
}

pub async fn run(data_dir: Option<PathBuf>, out: OutputFormat) -> Result<()> {
    let data_dir = server::absolute(&data_dir.unwrap_or_else(default_data_dir));
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let agent_bin = agent_binary()?;
    let run_dir = make_run_dir()?;
    let world = start_resources(&run_dir).await?;
    let result = run_with(&data_dir, &run_dir, &agent_bin, world, out).await;
    let _ = std::fs::remove_dir_all(&run_dir);
    result
}

async fn run_with(
    data_dir: &Path,
    run_dir: &Path,
    agent_bin: &Path,
    world: DemoWorld,
    out: OutputFormat,
) -> Result<()> {
    let DemoWorld {
        resources,
        processes,
        skipped,
    } = world;
    let running = match server::start(GatewayConfig::new(data_dir.join("gateway"))).await {
        Ok(r) => r,
        Err(e) => {
            stop_all(Vec::new(), processes).await;
            return Err(e);
        }
    };
    let mut agents = Vec::new();
    let started = start_agents(&running, data_dir, agent_bin, &resources, &mut agents).await;
    let approver = match started {
        Ok(a) => a,
        Err(e) => {
            stop_all(agents, processes).await;
            running.shutdown().await;
            return Err(e);
        }
    };
    let [auto, manual] = agents.as_slice() else {
        stop_all(agents, processes).await;
        running.shutdown().await;
        bail!("expected the two demo agents");
    };
    let me = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "postern".into());
    let guide = tour::text(&tour::TourInput {
        postern: &me,
        agent_bin: &agent_bin.display().to_string(),
        api: running.api.to_string(),
        relay: running.relay.to_string(),
        ca_fingerprint: &running.ca_fingerprint,
        ca_file: running.ca_file.display().to_string(),
        admin_token_file: running.admin_token_file.display().to_string(),
        approver_token_file: approver.token_file.display().to_string(),
        approver_key: approver.key_file.display().to_string(),
        run_dir: run_dir.display().to_string(),
        auto,
        manual,
        kube: resources.kubeconfig.is_some(),
        postgres: resources.postgres_admin_url.is_some(),
        ssh: resources.ssh.is_some(),
        skipped: &skipped,
    });
    // Listening for the stop signals before the ready line goes out: a SIGTERM sent as soon as
    // it is read must end the demo cleanly, not kill it before a handler exists.
    let stop = stop_signals()?;
    match out {
        OutputFormat::Json => {
            let ready = ready_json(
                &running, &agents, &processes, &resources, &skipped, run_dir, &approver,
            );
            println!("{ready}");
            eprintln!("{guide}");
        }
        OutputFormat::Text => println!("{guide}"),
    }

    let mut agents = agents;
    tokio::pin!(stop);
    tokio::select! {
        () = &mut stop => {}
        (status, app) = first_exit(&mut agents) => {
            tracing::error!(?status, app, "a demo agent exited; stop with Ctrl-C");
            stop.await;
        }
    }
    eprintln!("stopping the demo agents, resources and the gateway");
    stop_all(agents, processes).await;
    running.shutdown().await;
    Ok(())
}

/// SIGINT or SIGTERM, registered now (not when first awaited).
fn stop_signals() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// The first demo agent to exit, with its app.
async fn first_exit(agents: &mut [DemoAgent]) -> (Option<std::process::ExitStatus>, &'static str) {
    let waits = agents.iter_mut().map(|a| {
        let app = a.app;
        Box::pin(async move { (a.process.wait().await.ok(), app) })
    });
    futures_util::future::select_all(waits).await.0
}

async fn start_agents(
    running: &server::RunningGateway,
    data_dir: &Path,
    agent_bin: &Path,
    resources: &Resources,
    agents: &mut Vec<DemoAgent>,
) -> Result<approver::DemoApprover> {
    let token = std::fs::read_to_string(&running.admin_token_file)?;
    let api = ApiClient::new(
        Some(running.api.to_string()),
        Some(token),
        Some(running.ca_file.clone()),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let approver = approver::prepare(&api, data_dir).await?;
    let specs = [
        Spec {
            app: "demo-app",
            dir: data_dir.join("agent"),
            approval: "automatic",
            approvers: Vec::new(),
            all_resources: true,
        },
        Spec {
            app: "demo-manual",
            dir: data_dir.join("agent-manual"),
            approval: "manual",
            approvers: vec![(approver::APPROVER_NAME.into(), approver.public_key.clone())],
            all_resources: false,
        },
    ];
    let parts = appliance::GatewayParts {
        relay: running.relay,
        store: &running.gateway.store,
        agents: &running.gateway.agents,
    };
    for spec in &specs {
        agents.push(appliance::bring_online(&parts, &api, agent_bin, spec, resources).await?);
    }
    Ok(approver)
}

fn ready_json(
    running: &server::RunningGateway,
    agents: &[DemoAgent],
    processes: &[DemoProcess],
    resources: &Resources,
    skipped: &[(&'static str, String)],
    run_dir: &Path,
    approver: &approver::DemoApprover,
) -> serde_json::Value {
    let mut ready = running.ready_json();
    if let Some(auto) = agents.first() {
        ready["appliance_id"] = auto.appliance_id.clone().into();
        ready["agent_config"] = auto.config.display().to_string().into();
        ready["agent_log"] = auto.log.display().to_string().into();
    }
    let present = |yes: bool, id: &str| {
        if yes {
            serde_json::json!(id)
        } else {
            serde_json::Value::Null
        }
    };
    let pids: Vec<u32> = agents
        .iter()
        .filter_map(|a| a.process.pid())
        .chain(processes.iter().filter_map(DemoProcess::pid))
        .collect();
    ready["demo"] = serde_json::json!({
        "customer": appliance::CUSTOMER,
        "appliances": agents.iter().map(|a| serde_json::json!({
            "app": a.app,
            "approval": a.approval,
            "appliance_id": a.appliance_id,
            "agent_config": a.config.display().to_string(),
            "agent_log": a.log.display().to_string(),
            "trail": a.trail.display().to_string(),
        })).collect::<Vec<_>>(),
        "resources": {
            "kubernetes": present(resources.kubeconfig.is_some(), appliance::KUBE_RESOURCE),
            "postgres": present(resources.postgres_admin_url.is_some(), appliance::PG_RESOURCE),
            "ssh": present(resources.ssh.is_some(), appliance::SSH_RESOURCE),
            "tcp": present(resources.echo.is_some(), appliance::ECHO_RESOURCE),
        },
        "skipped": skipped.iter().map(|(what, note)| serde_json::json!({"resource": what, "note": note})).collect::<Vec<_>>(),
        "approver_token_file": approver.token_file.display().to_string(),
        "approver_key": approver.key_file.display().to_string(),
        "run_dir": run_dir.display().to_string(),
        "pids": pids,
    });
    ready
}
