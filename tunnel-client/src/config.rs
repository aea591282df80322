//! `agent.toml`: the customer's file. It declares what the appliance exposes and how the
//! customer approves; the agent trusts nothing about resources that is not written here.

use crate::dial::split_host_port;
use endpoint_types::{
    duration::HumanDuration,
    policy::Policy,
    resource::{ApprovalMode, PolicySummary, ResourceDescriptor, ResourceKind, ResourceScope},
    secret::Secret,
};
use serde::Deserialize;
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Duration,
};

pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(5);
pub const DEFAULT_KUBE_RESOURCES: &[&str] = &[
    "pods",
    "pods/log",
    "deployments",
    "replicasets",
    "services",
    "configmaps",
    "events",
];
pub const DEFAULT_KUBE_VERBS: &[&str] = &["get", "list", "watch"];
pub const DEFAULT_PG_PRIVILEGES: &[&str] = &["SELECT"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: resource {id:?}: {problem}", path.display())]
    Resource {
        path: PathBuf,
        id: String,
        problem: String,
    },
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
    #[error("{} is not enrolled: it has no `{missing}` (run `postern-agent enroll` first)", path.display())]
    NotEnrolled {
        path: PathBuf,
        missing: &'static str,
    },
}

impl ConfigError {
    pub fn to_api_error(&self) -> endpoint_types::ApiError {
        let e = endpoint_types::ApiError::invalid(self.to_string());
        match self {
            ConfigError::Read { .. } => e.hint("pass the agent's config with --config FILE"),
            ConfigError::NotEnrolled { .. } => {
                e.hint("run `postern-agent enroll --gateway HOST:PORT --token T --config FILE` with a token from `postern appliance add`")
            }
            _ => e.hint("fix agent.toml; its keys are described in the Postern design (agent.toml)"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Where the file was read from; relative paths in it were resolved against its directory.
    #[serde(skip)]
    pub path: PathBuf,
    pub audit_path: PathBuf,
    pub gateway: Option<String>,
    pub appliance_id: Option<String>,
    pub key_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub reconnect_max: Option<HumanDuration>,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default, rename = "resource")]
    pub resources: Vec<ResourceConfig>,
    #[serde(default)]
    pub tools: ToolsConfig,
    #[serde(default)]
    pub ops: OpsConfig,
    /// `[[approver]]`: the only keys that can approve, for this appliance, what the policy
    /// reserves for a person. None listed: the gateway's word is taken (the old behaviour).
    #[serde(default, rename = "approver")]
    pub approvers: Vec<ApproverConfig>,
    /// `[steady_state]`: how often health snapshots are collected (whether they are is
    /// `[policy] steady_state` and the customer approver's switch).
    #[serde(default)]
    pub steady_state: crate::steady_state::SteadyStateConfig,
    /// Where the agent counts what it does (`postern-agent run --metrics`): set by the
    /// program that runs it, never read from agent.toml.
    #[serde(skip)]
    pub metrics: Option<crate::metrics::AgentMetrics>,
}

/// One `[[approver]]` of `agent.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverConfig {
    pub name: String,
    /// `ssh-ed25519 AAAA…` (what `postern approvals key create` prints) or `webauthn-es256 …`.
    pub public_key: String,
}

/// `[ops]`: how one-off op tools run in the appliance (see `op_sandbox`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    /// The unprivileged user op tools run as; absent: the agent's own user.
    pub user: Option<String>,
    /// The op launcher ([`crate::op_sandbox::Confinement::launcher`]): set by the program that
    /// runs the agent (`postern-agent` names itself), never read from agent.toml.
    #[serde(skip)]
    pub launcher: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    // Manual is the default because a policy the customer never wrote must not auto-approve.
    #[serde(default)]
    pub approval: ApprovalMode,
    pub time_zone: Option<String>,
    #[serde(default)]
    pub windows: Vec<String>,
    #[serde(default)]
    pub maintenance: Vec<String>,
    #[serde(default = "default_true")]
    pub steady_state: bool,
    /// `[policy.deploy]`, `[policy.operate]`, `[policy.install]` (see `policy_phases`).
    pub deploy: Option<crate::policy_phases::PhasePolicyConfig>,
    pub operate: Option<crate::policy_phases::PhasePolicyConfig>,
    pub install: Option<crate::policy_phases::PhasePolicyConfig>,
    /// `[policy.steady-state]`, read only to be refused in words of its own.
    #[serde(rename = "steady-state")]
    pub steady_state_table: Option<toml::Value>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            approval: ApprovalMode::Manual,
            time_zone: None,
            windows: Vec::new(),
            maintenance: Vec::new(),
            steady_state: true,
            deploy: None,
            operate: None,
            install: None,
            steady_state_table: None,
        }
    }
}

fn default_true() -> bool {
    true
}

/// One `[[resource]]`: every kind's keys side by side, so that `deny_unknown_fields` still
/// reports typos with their line; [`AgentConfig::validate`] then refuses keys of another kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    pub id: String,
    pub kind: ResourceKind,
    // tcp
    pub target: Option<String>,
    // kubernetes
    pub kubeconfig: Option<PathBuf>,
    pub namespaces: Option<Vec<String>>,
    pub resources: Option<Vec<String>>,
    pub verbs: Option<Vec<String>>,
    pub impersonate: Option<Impersonate>,
    // postgres
    pub admin_url: Option<Secret>,
    pub admin_password_file: Option<PathBuf>,
    pub database: Option<String>,
    pub schemas: Option<Vec<String>>,
    pub privileges: Option<Vec<String>>,
    /// The role that objects an endpoint's role created are reassigned to at teardown; needed
    /// for `CREATE` in `privileges`. Never superuser, createrole, createdb or bypassrls.
    pub owner_role: Option<String>,
    // ssh
    pub host: Option<String>,
    pub user: Option<String>,
    pub key: Option<PathBuf>,
    pub host_key: Option<String>,
    pub sftp: Option<bool>,
    /// Record what the engineer types too, not only what the terminal shows (default false).
    pub record_input: Option<bool>,
    // docker (the `docker` op tool): the daemon, and its TLS client files (ca/cert/key.pem)
    pub docker_host: Option<String>,
    pub docker_cert_path: Option<PathBuf>,
    // cloud (the `aws`, `gcloud`, `az`, `doctl` op tools): credentials the agent hands the tool
    pub aws_profile: Option<String>,
    pub aws_region: Option<String>,
    pub aws_role_arn: Option<String>,
    pub aws_config_file: Option<PathBuf>,
    pub aws_credentials_file: Option<PathBuf>,
    pub gcloud_config: Option<PathBuf>,
    pub gcp_service_account: Option<String>,
    pub gcp_project: Option<String>,
    pub azure_config_dir: Option<PathBuf>,
    pub digitalocean_token_file: Option<PathBuf>,
    /// What the agent runs on the VM, as `user`, when an endpoint ends (default: the script in
    /// `crate::ssh_teardown`, which ends every process of the user and removes its crontab,
    /// `at` jobs and running user units).
    pub teardown_command: Option<String>,
    /// `[resource.phases.<phase>]`: the identity of each phase (see `crate::phases`).
    pub phases: Option<crate::phases::PhasesConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Impersonate {
    pub user: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// `[tools]`: a struct rather than a map so an unknown tool name is reported with its line.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolsConfig {
    pub kubectl: Option<PathBuf>,
    pub psql: Option<PathBuf>,
    pub ssh: Option<PathBuf>,
    pub docker: Option<PathBuf>,
    pub aws: Option<PathBuf>,
    pub gcloud: Option<PathBuf>,
    pub az: Option<PathBuf>,
    pub doctl: Option<PathBuf>,
}

impl ToolsConfig {
    /// The executable for an op tool: the configured path, or the bare name for a `PATH` lookup.
    pub fn executable(&self, tool: &str) -> Option<PathBuf> {
        self.entries()
            .into_iter()
            .find(|(name, _)| *name == tool)
            .map(|(name, p)| p.cloned().unwrap_or_else(|| PathBuf::from(name)))
    }

    fn entries(&self) -> [(&'static str, Option<&PathBuf>); 8] {
        [
            ("kubectl", self.kubectl.as_ref()),
            ("psql", self.psql.as_ref()),
            ("ssh", self.ssh.as_ref()),
            ("docker", self.docker.as_ref()),
            ("aws", self.aws.as_ref()),
            ("gcloud", self.gcloud.as_ref()),
            ("az", self.az.as_ref()),
            ("doctl", self.doctl.as_ref()),
        ]
    }

    fn paths_mut(&mut self) -> [&mut Option<PathBuf>; 8] {
        [
            &mut self.kubectl,
            &mut self.psql,
            &mut self.ssh,
            &mut self.docker,
            &mut self.aws,
            &mut self.gcloud,
            &mut self.az,
            &mut self.doctl,
        ]
    }
}

/// What `enroll` wrote: everything `run` needs to dial the gateway.
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub gateway: String,
    pub appliance_id: String,
    pub key_file: PathBuf,
    pub cert_file: PathBuf,
    pub ca_file: PathBuf,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        AgentConfig::parse(&text, path)
    }

    /// Parses and validates `text` as if read from `path` (which anchors relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<AgentConfig, ConfigError> {
        let mut config: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.path = path.to_path_buf();
        config.resolve_paths();
        config.validate()?;
        Ok(config)
    }

    fn base_dir(&self) -> PathBuf {
        let dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        std::path::absolute(&dir).unwrap_or(dir)
    }

    fn resolve_paths(&mut self) {
        let base = self.base_dir();
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.audit_path);
        for p in [&mut self.key_file, &mut self.cert_file, &mut self.ca_file]
            .into_iter()
            .flatten()
        {
            resolve(p);
        }
        for r in &mut self.resources {
            for p in [&mut r.kubeconfig, &mut r.admin_password_file, &mut r.key]
                .into_iter()
                .flatten()
            {
                resolve(p);
            }
            for p in [
                &mut r.docker_cert_path,
                &mut r.aws_config_file,
                &mut r.aws_credentials_file,
                &mut r.gcloud_config,
                &mut r.azure_config_dir,
                &mut r.digitalocean_token_file,
            ]
            .into_iter()
            .flatten()
            {
                resolve(p);
            }
        }
        for p in self.tools.paths_mut().into_iter().flatten() {
            // A bare name (`kubectl = "kubectl"`) means "from PATH", not "next to agent.toml".
            if p.components().count() > 1 {
                resolve(p);
            }
        }
    }

    /// The `[[approver]]` keys, parsed; names and keys must be unique.
    pub fn approvers(&self) -> Result<Vec<certs::approver::Approver>, String> {
        let mut names = HashSet::new();
        let mut ids = HashSet::new();
        self.approvers
            .iter()
            .map(|a| {
                if a.name.trim().is_empty() {
                    return Err("[[approver]] needs a name".to_string());
                }
                let key = certs::approver::ApproverPublicKey::parse(&a.public_key)
                    .map_err(|e| format!("[[approver]] {:?}: {e}", a.name))?;
                if !names.insert(a.name.clone()) {
                    return Err(format!("[[approver]] {:?} is listed twice", a.name));
                }
                if !ids.insert(key.key_id()) {
                    return Err(format!(
                        "[[approver]] {:?}: key {} is listed twice",
                        a.name,
                        key.key_id()
                    ));
                }
                Ok(certs::approver::Approver {
                    name: a.name.clone(),
                    key,
                })
            })
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |problem: String| ConfigError::Invalid {
            path: self.path.clone(),
            problem,
        };
        if let Some(g) = &self.gateway {
            split_host_port(g).map_err(|e| invalid(format!("gateway: {e}")))?;
        }
        if let Some(user) = &self.ops.user {
            if user.trim().is_empty()
                || user == "root"
                || user.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(format!(
                    "[ops] user = {user:?} must name an unprivileged user, never root"
                )));
            }
        }
        if let Some(d) = self.reconnect_max {
            if d.0 < Duration::from_millis(200) {
                return Err(invalid(format!(
                    "reconnect_max = {d:?} is below the 200ms base backoff"
                )));
            }
        }
        validate_policy(&self.policy).map_err(invalid)?;
        self.steady_state.validate().map_err(invalid)?;
        self.approvers().map_err(invalid)?;
        let mut seen = HashSet::new();
        for r in &self.resources {
            let problem = |problem: String| ConfigError::Resource {
                path: self.path.clone(),
                id: r.id.clone(),
                problem,
            };
            if r.id.trim().is_empty() {
                return Err(invalid("a [[resource]] has an empty id".into()));
            }
            if !seen.insert(r.id.as_str()) {
                return Err(problem("the id is declared more than once".into()));
            }
            r.validate().map_err(problem)?;
            crate::phases::validate(r).map_err(problem)?;
        }
        Ok(())
    }

    pub fn reconnect_max(&self) -> Duration {
        self.reconnect_max
            .map(|d| d.0)
            .unwrap_or(DEFAULT_RECONNECT_MAX)
    }

    pub fn resource(&self, id: &str) -> Option<&ResourceConfig> {
        self.resources.iter().find(|r| r.id == id)
    }

    /// The inventory reported in the hello: ids and kinds only, never targets or credentials.
    /// Kubernetes names are the ones `clusters` resolved through discovery, once it has.
    pub fn descriptors(&self, clusters: &crate::kube::Clusters) -> Vec<ResourceDescriptor> {
        self.resources
            .iter()
            .map(|r| ResourceDescriptor {
                id: r.id.clone(),
                kind: r.kind,
                scope: r.scope(clusters),
            })
            .collect()
    }

    pub fn policy_summary(&self) -> PolicySummary {
        let p = &self.policy;
        PolicySummary {
            approval: p.approval,
            time_zone: p.time_zone.clone(),
            windows: p.windows.clone(),
            maintenance: p.maintenance.clone(),
            steady_state: p.steady_state,
            approver_key_ids: self
                .approvers()
                .map(|a| a.iter().map(|a| a.key.key_id()).collect())
                .unwrap_or_default(),
            phases: crate::policy_phases::summaries(p),
        }
    }

    pub fn enrollment(&self) -> Result<Enrollment, ConfigError> {
        let missing = |missing| ConfigError::NotEnrolled {
            path: self.path.clone(),
            missing,
        };
        Ok(Enrollment {
            gateway: self.gateway.clone().ok_or_else(|| missing("gateway"))?,
            appliance_id: self
                .appliance_id
                .clone()
                .ok_or_else(|| missing("appliance_id"))?,
            key_file: self.key_file.clone().ok_or_else(|| missing("key_file"))?,
            cert_file: self.cert_file.clone().ok_or_else(|| missing("cert_file"))?,
            ca_file: self.ca_file.clone().ok_or_else(|| missing("ca_file"))?,
        })
    }
}

impl ResourceConfig {
    /// The keys that are set, with the kind each belongs to.
    fn set_keys(&self) -> Vec<(&'static str, ResourceKind)> {
        use ResourceKind::*;
        let keys = [
            ("target", Tcp, self.target.is_some()),
            ("kubeconfig", Kubernetes, self.kubeconfig.is_some()),
            ("namespaces", Kubernetes, self.namespaces.is_some()),
            ("resources", Kubernetes, self.resources.is_some()),
            ("verbs", Kubernetes, self.verbs.is_some()),
            ("impersonate", Kubernetes, self.impersonate.is_some()),
            ("admin_url", Postgres, self.admin_url.is_some()),
            (
                "admin_password_file",
                Postgres,
                self.admin_password_file.is_some(),
            ),
            ("database", Postgres, self.database.is_some()),
            ("schemas", Postgres, self.schemas.is_some()),
            ("privileges", Postgres, self.privileges.is_some()),
            ("owner_role", Postgres, self.owner_role.is_some()),
            ("host", Ssh, self.host.is_some()),
            ("user", Ssh, self.user.is_some()),
            ("key", Ssh, self.key.is_some()),
            ("host_key", Ssh, self.host_key.is_some()),
            ("sftp", Ssh, self.sftp.is_some()),
            ("record_input", Ssh, self.record_input.is_some()),
            ("docker_host", Docker, self.docker_host.is_some()),
            ("docker_cert_path", Docker, self.docker_cert_path.is_some()),
            ("aws_profile", Cloud, self.aws_profile.is_some()),
            ("aws_region", Cloud, self.aws_region.is_some()),
            ("aws_role_arn", Cloud, self.aws_role_arn.is_some()),
            ("aws_config_file", Cloud, self.aws_config_file.is_some()),
            (
                "aws_credentials_file",
                Cloud,
                self.aws_credentials_file.is_some(),
            ),
            ("gcloud_config", Cloud, self.gcloud_config.is_some()),
            (
                "gcp_service_account",
                Cloud,
                self.gcp_service_account.is_some(),
            ),
            ("gcp_project", Cloud, self.gcp_project.is_some()),
            ("azure_config_dir", Cloud, self.azure_config_dir.is_some()),
            (
                "digitalocean_token_file",
                Cloud,
                self.digitalocean_token_file.is_some(),
            ),
            ("teardown_command", Ssh, self.teardown_command.is_some()),
        ];
        keys.into_iter()
            .filter(|(_, _, set)| *set)
            .map(|(k, kind, _)| (k, kind))
            .collect()
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        for (key, kind) in self.set_keys() {
            if kind != self.kind {
                return Err(format!(
                    "`{key}` is a {kind} key but this resource is kind = \"{}\"",
                    self.kind
                ));
            }
        }
        let require = |key: &str, set: bool| {
            if set {
                Ok(())
            } else {
                Err(format!("kind = \"{}\" needs `{key}`", self.kind))
            }
        };
        match self.kind {
            ResourceKind::Tcp => {
                require("target", self.target.is_some())?;
                let target = self.target.as_deref().unwrap_or_default();
                split_host_port(target).map_err(|e| format!("target: {e}"))?;
            }
            ResourceKind::Kubernetes => {
                for (key, list) in [
                    ("namespaces", &self.namespaces),
                    ("resources", &self.resources),
                    ("verbs", &self.verbs),
                ] {
                    if list
                        .as_ref()
                        .is_some_and(|l| l.iter().any(|s| s.trim().is_empty()))
                    {
                        return Err(format!("`{key}` has an empty entry"));
                    }
                }
            }
            ResourceKind::Postgres => {
                require("admin_url", self.admin_url.is_some())?;
            }
            ResourceKind::Ssh => {
                require("host", self.host.is_some())?;
                require("user", self.user.is_some())?;
                require("key", self.key.is_some())?;
                require("host_key", self.host_key.is_some())?;
                split_host_port(self.host.as_deref().unwrap_or_default())
                    .map_err(|e| format!("host: {e}"))?;
                let user = self.user.as_deref().unwrap_or_default();
                if user.trim().is_empty() {
                    return Err("`user` is empty".into());
                }
                if user == "root" {
                    return Err(
                        "`user` may not be root: give the vendor a dedicated, unprivileged login"
                            .into(),
                    );
                }
            }
            ResourceKind::Docker | ResourceKind::Cloud => {
                crate::op_credentials::validate_config(self)?
            }
        }
        match self.kind {
            ResourceKind::Tcp => Ok(()),
            ResourceKind::Kubernetes => crate::kube::validate_config(self),
            ResourceKind::Postgres => crate::postgres::validate_config(self),
            ResourceKind::Ssh => crate::ssh::validate_config(self),
            ResourceKind::Docker | ResourceKind::Cloud => Ok(()),
        }
    }

    pub fn kube_resources(&self) -> Vec<String> {
        self.resources.clone().unwrap_or_else(|| {
            DEFAULT_KUBE_RESOURCES
                .iter()
                .map(|s| s.to_string())
                .collect()
        })
    }

    pub fn kube_verbs(&self) -> Vec<String> {
        self.verbs
            .clone()
            .unwrap_or_else(|| DEFAULT_KUBE_VERBS.iter().map(|s| s.to_string()).collect())
    }

    pub fn pg_privileges(&self) -> Vec<String> {
        self.privileges.clone().unwrap_or_else(|| {
            DEFAULT_PG_PRIVILEGES
                .iter()
                .map(|s| s.to_string())
                .collect()
        })
    }

    /// The schemas endpoints may use: `schemas`, else `public`.
    pub fn pg_schemas(&self) -> Vec<String> {
        self.schemas
            .clone()
            .unwrap_or_else(|| vec!["public".to_string()])
    }

    /// The database endpoints may use: `database`, else the one `admin_url` names, else `postgres`.
    pub fn pg_database(&self) -> String {
        if let Some(d) = &self.database {
            return d.clone();
        }
        let url = self
            .admin_url
            .as_ref()
            .map(|u| u.expose().to_string())
            .unwrap_or_default();
        let rest = url.split_once("://").map(|(_, r)| r).unwrap_or("");
        let path = rest.split(['?', '#']).next().unwrap_or("");
        match path.split_once('/') {
            Some((_, db)) if !db.is_empty() => db.to_string(),
            _ => "postgres".to_string(),
        }
    }

    /// The scope the gateway enforces before anything reaches the appliance (and the agent again).
    pub fn scope(&self, clusters: &crate::kube::Clusters) -> Option<ResourceScope> {
        match self.kind {
            ResourceKind::Tcp | ResourceKind::Docker | ResourceKind::Cloud => None,
            ResourceKind::Kubernetes => Some(ResourceScope::Kubernetes {
                namespaces: self.namespaces.clone().unwrap_or_default(),
                // Resolved through discovery (group-qualified) once the agent has read it.
                resources: clusters.scope_resources(self),
                verbs: self.kube_verbs(),
                impersonate: self.impersonate.is_some(),
            }),
            ResourceKind::Postgres => Some(ResourceScope::Postgres {
                database: self.pg_database(),
                schemas: self.pg_schemas(),
                privileges: self.pg_privileges(),
            }),
            ResourceKind::Ssh => Some(ResourceScope::Ssh {
                user: self.user.clone().unwrap_or_default(),
                sftp: self.sftp.unwrap_or(false),
            }),
        }
    }
}

/// The agent and the gateway must read the policy alike, so the agent validates it with the
/// same parser the gateway evaluates it with; its errors already name the key and the entry.
fn validate_policy(p: &PolicyConfig) -> Result<(), String> {
    Policy::parse(&PolicySummary {
        approval: p.approval,
        time_zone: p.time_zone.clone(),
        windows: p.windows.clone(),
        maintenance: p.maintenance.clone(),
        steady_state: p.steady_state,
        approver_key_ids: Vec::new(),
        phases: Vec::new(),
    })
    .map_err(|e| format!("[policy] {e}"))?;
    crate::policy_phases::validate(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN_EXAMPLE: &str = r#"
audit_path = "/var/lib/postern/audit.jsonl"   # the customer's own trail
# `enroll` adds: gateway address, paths of the agent key, certificate and pinned CA

[policy]                        # the customer's approval policy, authoritative at the agent
approval = "windows"            # automatic | manual | windows | always-require
time_zone = "Europe/Berlin"
windows = ["Mon-Fri 09:00-17:00"]
maintenance = ["2026-12-01T02:00:00Z/2026-12-01T04:00:00Z"]
steady_state = true

[[resource]]
id = "aws_eks_cluster.main_cluster"     # origin resource id
kind = "kubernetes"                      # kubernetes | postgres | ssh | tcp
kubeconfig = "/etc/postern/main-cluster.kubeconfig"
namespaces = ["my-app-prod"]

[[resource]]
id = "null_resource.echo"
kind = "tcp"
target = "127.0.0.1:7000"
"#;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(text, Path::new("/etc/postern/agent.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn approvers_are_parsed_and_bad_ones_are_config_errors() {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHPakkw44GnrnYvhqjlyT91AXrZzqGYHLSxyKs4mEnq4";
        let c = parse(&format!(
            "audit_path = \"a\"\n[[approver]]\nname = \"bob@customer.example\"\npublic_key = \"{key} bob\"\n"
        ))
        .unwrap();
        let approvers = c.approvers().unwrap();
        assert_eq!(approvers.len(), 1);
        assert_eq!(
            approvers[0].key.key_id(),
            "SHA256:amQXdR5gSZt9jtPhDCOPcDoKEvGzO4cyK3mHNQAV7pk"
        );
        assert!(parse("audit_path = \"a\"\n")
            .unwrap()
            .approvers()
            .unwrap()
            .is_empty());
        let e = err(
            "audit_path = \"a\"\n[[approver]]\nname = \"bob\"\npublic_key = \"ssh-rsa AAAA\"\n",
        );
        assert!(e.contains("[[approver]] \"bob\""), "{e}");
        let twice = format!(
            "audit_path = \"a\"\n[[approver]]\nname = \"bob\"\npublic_key = \"{key}\"\n[[approver]]\nname = \"eve\"\npublic_key = \"{key}\"\n"
        );
        assert!(err(&twice).contains("listed twice"));
        let e = err("audit_path = \"a\"\n[[approver]]\nname = \"bob\"\npublic_key = \"x\"\nrole = \"admin\"\n");
        assert!(e.contains("role"), "{e}");
    }

    #[test]
    fn design_example_parses() {
        let c = parse(DESIGN_EXAMPLE).unwrap();
        assert_eq!(c.audit_path, PathBuf::from("/var/lib/postern/audit.jsonl"));
        assert_eq!(c.resources.len(), 2);
        assert_eq!(c.resources[0].kind, ResourceKind::Kubernetes);
        assert_eq!(c.resources[0].kube_verbs(), vec!["get", "list", "watch"]);
        assert_eq!(
            c.resource("null_resource.echo").unwrap().target.as_deref(),
            Some("127.0.0.1:7000")
        );
        let p = c.policy_summary();
        assert_eq!(p.approval, ApprovalMode::Windows);
        assert_eq!(p.time_zone.as_deref(), Some("Europe/Berlin"));
        assert!(p.steady_state);
        assert_eq!(c.reconnect_max(), DEFAULT_RECONNECT_MAX);
        assert_eq!(
            c.descriptors(&Default::default())[1],
            ResourceDescriptor {
                id: "null_resource.echo".into(),
                kind: ResourceKind::Tcp,
                scope: None
            }
        );
        assert!(matches!(
            c.enrollment(),
            Err(ConfigError::NotEnrolled {
                missing: "gateway",
                ..
            })
        ));
    }

    #[test]
    fn unknown_key_names_key_line_and_file() {
        let e = err("audit_path = \"a\"\n\n[policy]\napproval = \"manual\"\nsteady = true\n");
        assert!(e.contains("/etc/postern/agent.toml"), "{e}");
        assert!(e.contains("steady"), "{e}");
        assert!(e.contains("line 5"), "{e}");
        let e = err("audit_path = \"a\"\nheartbeat = \"5s\"\n");
        assert!(e.contains("heartbeat") && e.contains("line 2"), "{e}");
        let e = err("audit_path = \"a\"\n[[resource]]\nid = \"x\"\nkind = \"tcp\"\ntarget = \"h:1\"\ntargte = \"h:2\"\n");
        assert!(e.contains("targte") && e.contains("line 6"), "{e}");
        let e = err(
            "audit_path = \"a\"\n[tools]\nkubectl = \"/usr/bin/kubectl\"\nvim = \"/usr/bin/vim\"\n",
        );
        assert!(e.contains("vim") && e.contains("line 4"), "{e}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_dir() {
        let c = parse(
            "audit_path = \"audit.jsonl\"\nkey_file = \"agent.key\"\n[tools]\nkubectl = \"bin/kubectl\"\npsql = \"psql\"\n\
             [[resource]]\nid = \"s\"\nkind = \"ssh\"\nhost = \"10.0.0.5:22\"\nuser = \"ops\"\nkey = \"keys/vm\"\nhost_key = \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHvNC2Rpugiiw1pOjJYmMBaGVsELXpfLPjkH7LZq6NMY\"\n",
        )
        .unwrap();
        assert_eq!(c.audit_path, PathBuf::from("/etc/postern/audit.jsonl"));
        assert_eq!(c.key_file, Some(PathBuf::from("/etc/postern/agent.key")));
        assert_eq!(
            c.tools.executable("kubectl"),
            Some(PathBuf::from("/etc/postern/bin/kubectl"))
        );
        assert_eq!(c.tools.executable("psql"), Some(PathBuf::from("psql")));
        assert_eq!(c.tools.executable("docker"), Some(PathBuf::from("docker")));
        assert_eq!(
            c.resources[0].key,
            Some(PathBuf::from("/etc/postern/keys/vm"))
        );
    }

    #[test]
    fn key_of_another_kind_is_refused_naming_the_resource() {
        let e = err("audit_path = \"a\"\n[[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"h:1\"\nnamespaces = [\"x\"]\n");
        assert!(
            e.contains("null_resource.echo")
                && e.contains("namespaces")
                && e.contains("kubernetes"),
            "{e}"
        );
        let e = err("audit_path = \"a\"\n[[resource]]\nid = \"db\"\nkind = \"postgres\"\nadmin_url = \"postgres://x\"\nuser = \"x\"\n");
        assert!(e.contains("\"db\"") && e.contains("`user`"), "{e}");
    }

    #[test]
    fn missing_required_keys_are_refused() {
        let e = err("audit_path = \"a\"\n[[resource]]\nid = \"echo\"\nkind = \"tcp\"\n");
        assert!(e.contains("\"echo\"") && e.contains("target"), "{e}");
        let e = err("audit_path = \"a\"\n[[resource]]\nid = \"echo\"\nkind = \"tcp\"\ntarget = \"nohost\"\n");
        assert!(e.contains("\"echo\"") && e.contains("target"), "{e}");
        let e = err("audit_path = \"a\"\n[[resource]]\nid = \"db\"\nkind = \"postgres\"\n");
        assert!(e.contains("admin_url"), "{e}");
        let e = err("[policy]\napproval = \"manual\"\n");
        assert!(e.contains("audit_path"), "{e}");
        // Kubernetes needs nothing: no kubeconfig means the in-cluster service account.
        parse("audit_path = \"a\"\n[[resource]]\nid = \"k\"\nkind = \"kubernetes\"\n").unwrap();
    }

    #[test]
    fn ssh_root_is_refused() {
        let e = err("audit_path = \"a\"\n[[resource]]\nid = \"aws_instance.worker\"\nkind = \"ssh\"\nhost = \"10.0.0.5:22\"\nuser = \"root\"\nkey = \"/k\"\nhost_key = \"ssh-ed25519 AAAA\"\n");
        assert!(
            e.contains("aws_instance.worker") && e.contains("root"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let r = "[[resource]]\nid = \"echo\"\nkind = \"tcp\"\ntarget = \"h:1\"\n";
        let e = err(&format!("audit_path = \"a\"\n{r}{r}"));
        assert!(
            e.contains("\"echo\"") && e.contains("more than once"),
            "{e}"
        );
    }

    #[test]
    fn unknown_kind_and_bad_policy_are_refused() {
        let e = err("audit_path = \"a\"\n[[resource]]\nid = \"x\"\nkind = \"redis\"\n");
        assert!(e.contains("redis") && e.contains("line 4"), "{e}");
        assert!(
            err("audit_path = \"a\"\n[policy]\napproval = \"sometimes\"\n").contains("sometimes")
        );
        assert!(err("audit_path = \"a\"\n[policy]\napproval = \"windows\"\n").contains("windows"));
        assert!(
            err("audit_path = \"a\"\n[policy]\nwindows = [\"Mon-Fry 09:00-17:00\"]\n")
                .contains("Fry")
        );
        assert!(
            err("audit_path = \"a\"\n[policy]\nwindows = [\"Mon 9:00-17:00\"]\n").contains("HH:MM")
        );
        assert!(err("audit_path = \"a\"\n[policy]\nmaintenance = [\"2026-12-01T04:00:00Z/2026-12-01T02:00:00Z\"]\n")
            .contains("not after"));
        assert!(err("audit_path = \"a\"\nreconnect_max = \"fast\"\n").contains("fast"));
    }

    #[test]
    fn windows_syntax() {
        let policy = |w: &str| {
            format!("audit_path = \"a\"\n[policy]\napproval = \"windows\"\nwindows = [\"{w}\"]\n")
        };
        for ok in [
            "Sat 10:00-12:00",
            "Mon-Fri 09:00-17:00",
            "Mon,Wed 22:00-02:00",
            "Mon-Sun 00:00-24:00",
        ] {
            parse(&policy(ok)).unwrap();
        }
        for bad in [
            "Mon",
            "Mon-Fri 09:00",
            "Mon-Tue-Wed 09:00-10:00",
            "Mon 25:00-26:00",
            "Mon 10:00-10:00",
        ] {
            let e = err(&policy(bad));
            assert!(e.contains("[policy] windows") && e.contains(bad), "{e}");
        }
        let e = err("audit_path = \"a\"\n[policy]\ntime_zone = \"Mars/Olympus\"\n");
        assert!(e.contains("time_zone") && e.contains("Mars/Olympus"), "{e}");
    }

    #[test]
    fn reconnect_max_and_defaults() {
        let c = parse("audit_path = \"a\"\nreconnect_max = \"30s\"\n").unwrap();
        assert_eq!(c.reconnect_max(), Duration::from_secs(30));
        assert_eq!(c.policy.approval, ApprovalMode::Manual);
        assert!(c.policy.steady_state);
        assert!(err("audit_path = \"a\"\nreconnect_max = \"10ms\"\n").contains("reconnect_max"));
    }

    #[test]
    fn enrolled_config_yields_enrollment() {
        let c = parse(
            "audit_path = \"a\"\ngateway = \"relay.example.com:4433\"\nappliance_id = \"app_1\"\n\
             key_file = \"agent.key\"\ncert_file = \"agent.crt\"\nca_file = \"ca.crt\"\n",
        )
        .unwrap();
        let e = c.enrollment().unwrap();
        assert_eq!(e.gateway, "relay.example.com:4433");
        assert_eq!(e.ca_file, PathBuf::from("/etc/postern/ca.crt"));
        assert!(err("audit_path = \"a\"\ngateway = \"nope\"\n").contains("gateway"));
    }
}
