//! The demo appliances: one agent each, enrolled once and reused across restarts of the same
//! data dir, with an `agent.toml` rewritten at every start from the resources that came up.

use super::process::DemoProcess;
use crate::{agents::AgentRegistry, cli::client::ApiClient, store::Store};
use anyhow::{anyhow, bail, Context, Result};
use endpoint_types::api::ApplianceAdded;
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::process::Command;

pub const CUSTOMER: &str = "demo-customer";
pub const KUBE_RESOURCE: &str = "kubernetes_cluster.demo";
pub const PG_RESOURCE: &str = "postgresql_database.demo";
pub const SSH_RESOURCE: &str = "virtual_machine.demo";
pub const ECHO_RESOURCE: &str = "null_resource.echo";

/// The resources that came up, as the agent reaches them.
#[derive(Default)]
pub struct Resources {
    pub kubeconfig: Option<PathBuf>,
    pub postgres_admin_url: Option<String>,
    /// host:port, the VM's host key line, the private key the appliance logs in with.
    pub ssh: Option<(SocketAddr, String, PathBuf)>,
    pub echo: Option<SocketAddr>,
}

impl Resources {
    /// `[[resource]]` tables for every resource present; `with_all` false keeps the manual
    /// appliance to the cluster and the echo service (enough to try an approval).
    fn toml(&self, with_all: bool) -> String {
        let mut s = String::new();
        if let Some(k) = &self.kubeconfig {
            s += &format!(
                "\n[[resource]]\nid = \"{KUBE_RESOURCE}\"\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespaces = [\"my-app-prod\"]\n",
                k.display()
            );
        }
        if let (true, Some(url)) = (with_all, &self.postgres_admin_url) {
            s += &format!(
                "\n[[resource]]\nid = \"{PG_RESOURCE}\"\nkind = \"postgres\"\nadmin_url = \"{url}\"\nschemas = [\"app\"]\nprivileges = [\"SELECT\", \"INSERT\"]\n"
            );
        }
        if let (true, Some((addr, host_key, key))) = (with_all, &self.ssh) {
            s += &format!(
                "\n[[resource]]\nid = \"{SSH_RESOURCE}\"\nkind = \"ssh\"\nhost = \"{addr}\"\nuser = \"{}\"\nkey = \"{}\"\nhost_key = \"{host_key}\"\n",
                super::sshd::USER,
                key.display()
            );
        }
        if let Some(echo) = &self.echo {
            s += &format!(
                "\n[[resource]]\nid = \"{ECHO_RESOURCE}\"\nkind = \"tcp\"\ntarget = \"{echo}\"\n"
            );
        }
        s
    }
}

/// One demo appliance: its app name, policy and approvers.
pub struct Spec {
    pub app: &'static str,
    pub dir: PathBuf,
    /// The `[policy]` table's `approval`.
    pub approval: &'static str,
    /// `[[approver]]` public key lines (name, key).
    pub approvers: Vec<(String, String)>,
    pub all_resources: bool,
}

impl Spec {
    fn agent_toml(&self, resources: &Resources) -> String {
        let mut s = format!(
            "# Written by `postern dev` for the demo appliance {}; rewritten at every start.\n\
             audit_path = \"{}\"\n\n[policy]\napproval = \"{}\"\nsteady_state = true\n",
            self.app,
            self.trail().display(),
            self.approval,
        );
        for (name, key) in &self.approvers {
            s += &format!("\n[[approver]]\nname = \"{name}\"\npublic_key = \"{key}\"\n");
        }
        s + &resources.toml(self.all_resources)
    }

    pub fn trail(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }
}

/// A demo appliance's agent, online.
pub struct DemoAgent {
    pub app: &'static str,
    pub approval: &'static str,
    pub appliance_id: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub trail: PathBuf,
    pub process: DemoProcess,
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

/// What enrolling and watching a demo agent needs of the gateway.
pub struct GatewayParts<'a> {
    pub relay: SocketAddr,
    pub store: &'a Store,
    pub agents: &'a AgentRegistry,
}

/// Writes the appliance's `agent.toml` (enrolling it first if this data dir has no enrolled
/// agent for it), starts its agent and waits until it is online.
pub async fn bring_online(
    gateway: &GatewayParts<'_>,
    api: &ApiClient,
    agent_bin: &Path,
    spec: &Spec,
    resources: &Resources,
) -> Result<DemoAgent> {
    std::fs::create_dir_all(&spec.dir)
        .with_context(|| format!("creating {}", spec.dir.display()))?;
    let config = spec.dir.join("agent.toml");
    let body = spec.agent_toml(resources);
    let store = gateway.store;
    let existing = store.find_appliance(spec.app, CUSTOMER).await?;
    let reusable = existing
        .as_ref()
        .filter(|a| a.enrolled_at.is_some() && spec.dir.join("agent.crt").exists());
    let appliance_id = match reusable {
        Some(a) => {
            let keys = enrollment_keys(gateway.relay, &a.id, &spec.dir);
            certs::write_private(&config, format!("{keys}{body}").as_bytes())?;
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
                    serde_json::json!({"app": spec.app, "customer": CUSTOMER}),
                )
                .await
                .map_err(|e| anyhow!("{e}"))?;
            certs::write_private(&config, body.as_bytes())?;
            let relay = gateway.relay.to_string();
            let cfg = config.to_string_lossy().to_string();
            let args = [
                "enroll",
                "--gateway",
                &relay,
                "--token",
                added.token.expose(),
                "--config",
                &cfg,
            ];
            run_agent_cmd(agent_bin, &args, &spec.dir.join("enroll.log")).await?;
            added.appliance_id
        }
    };

    let log = spec.dir.join("agent.log");
    let mut cmd = Command::new(agent_bin);
    cmd.args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    let mut process = DemoProcess::spawn("postern-agent", &mut cmd, libc::SIGTERM)
        .with_context(|| format!("starting {}", agent_bin.display()))?;
    for _ in 0..300 {
        if gateway.agents.is_online(&appliance_id) {
            return Ok(DemoAgent {
                app: spec.app,
                approval: spec.approval,
                appliance_id,
                config,
                log,
                trail: spec.trail(),
                process,
            });
        }
        if let Some(status) = process.exited() {
            bail!(
                "the {} agent exited ({status}); see {}",
                spec.app,
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    process.stop(Duration::from_secs(5)).await;
    bail!(
        "the {} agent did not connect within 30 s; see {}",
        spec.app,
        log.display()
    )
}
