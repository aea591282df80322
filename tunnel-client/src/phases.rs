//! `[resource.phases.<phase>]`: the identity a resource is reached with in each phase the
//! customer allows (kubernetes `impersonate`, postgres `privileges`, ssh `user`). An endpoint
//! or op of a phase runs with that phase's view of its resource ([`for_phase`]), so every path
//! that reaches the target (sessions, op runners, role setup, teardown) uses that phase's
//! identity and nothing else.
//!
//! The resource's own keys stay the operate identity, so an agent.toml without phase tables
//! behaves as before. A phase the resource does not list is refused for that resource.

use crate::config::{Impersonate, ResourceConfig};
use endpoint_types::{control::GrantLevel, resource::ResourceKind, ApiError, ErrorCode};
use serde::Deserialize;

/// The `phases` table of one `[[resource]]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhasesConfig {
    pub install: Option<PhaseIdentity>,
    #[serde(rename = "steady-state")]
    pub steady_state: Option<PhaseIdentity>,
    pub deploy: Option<PhaseIdentity>,
    pub operate: Option<PhaseIdentity>,
}

/// One `[resource.phases.<phase>]`: the keys of the resource's kind that make its identity.
/// Kinds without an identity at the target (tcp, docker, cloud) take an empty table, which
/// allows the phase with the resource's own settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseIdentity {
    /// kubernetes: who the agent impersonates at the API server.
    pub impersonate: Option<Impersonate>,
    /// postgres: what the endpoint's or op's role may do (same values as the resource key).
    pub privileges: Option<Vec<String>>,
    /// ssh: the VM user.
    pub user: Option<String>,
    /// cloud: the credential the op tools use in this phase (the resource's other cloud keys,
    /// e.g. `aws_config_file` or `gcp_project`, stay shared by every phase).
    pub aws_profile: Option<String>,
    pub aws_role_arn: Option<String>,
    pub gcp_service_account: Option<String>,
    pub azure_config_dir: Option<std::path::PathBuf>,
    pub digitalocean_token_file: Option<std::path::PathBuf>,
}

impl PhaseIdentity {
    /// Each identity key and whether this table sets it.
    fn keys(&self) -> [(&'static str, bool); 8] {
        [
            ("impersonate", self.impersonate.is_some()),
            ("privileges", self.privileges.is_some()),
            ("user", self.user.is_some()),
            ("aws_profile", self.aws_profile.is_some()),
            ("aws_role_arn", self.aws_role_arn.is_some()),
            ("gcp_service_account", self.gcp_service_account.is_some()),
            ("azure_config_dir", self.azure_config_dir.is_some()),
            (
                "digitalocean_token_file",
                self.digitalocean_token_file.is_some(),
            ),
        ]
    }
}

impl PhasesConfig {
    fn get(&self, phase: GrantLevel) -> Option<&PhaseIdentity> {
        match phase {
            GrantLevel::Install => self.install.as_ref(),
            GrantLevel::SteadyState => self.steady_state.as_ref(),
            GrantLevel::Deploy => self.deploy.as_ref(),
            GrantLevel::Operate => self.operate.as_ref(),
        }
    }

    fn listed(&self) -> impl Iterator<Item = (GrantLevel, &PhaseIdentity)> {
        [
            GrantLevel::Install,
            GrantLevel::SteadyState,
            GrantLevel::Deploy,
            GrantLevel::Operate,
        ]
        .into_iter()
        .filter_map(|p| self.get(p).map(|i| (p, i)))
    }
}

/// The identity keys a kind takes in its phase tables (at least one is needed), none for kinds
/// without an identity at the target.
fn identity_keys(kind: ResourceKind) -> &'static [&'static str] {
    match kind {
        ResourceKind::Kubernetes => &["impersonate"],
        ResourceKind::Postgres => &["privileges"],
        ResourceKind::Ssh => &["user"],
        ResourceKind::Cloud => &[
            "aws_profile",
            "aws_role_arn",
            "gcp_service_account",
            "azure_config_dir",
            "digitalocean_token_file",
        ],
        _ => &[],
    }
}

fn overlay(resource: &ResourceConfig, identity: &PhaseIdentity) -> ResourceConfig {
    let mut r = resource.clone();
    if let Some(i) = &identity.impersonate {
        r.impersonate = Some(i.clone());
    }
    if let Some(p) = &identity.privileges {
        r.privileges = Some(p.clone());
    }
    if let Some(u) = &identity.user {
        r.user = Some(u.clone());
    }
    // A cloud phase names its whole credential: what it does not set is not inherited from
    // the resource (an operate role must not leak into deploy by omission).
    if resource.kind == ResourceKind::Cloud {
        r.aws_profile = identity.aws_profile.clone();
        r.aws_role_arn = identity.aws_role_arn.clone();
        r.gcp_service_account = identity.gcp_service_account.clone();
        r.azure_config_dir = identity.azure_config_dir.clone();
        r.digitalocean_token_file = identity.digitalocean_token_file.clone();
    }
    r
}

/// Checks each phase table of `resource`: it sets the identity key of the resource's kind and
/// no other, and the resource with that identity is as valid as the resource itself.
pub fn validate(resource: &ResourceConfig) -> Result<(), String> {
    let Some(phases) = &resource.phases else {
        return Ok(());
    };
    for (phase, identity) in phases.listed() {
        let at = format!("[resource.phases.{}]", phase.as_str());
        let set = identity.keys();
        let wanted = identity_keys(resource.kind);
        if let Some((key, _)) = set.iter().find(|(k, s)| *s && !wanted.contains(k)) {
            return Err(match wanted {
                [] => format!(
                    "{at}: a {} resource has no identity at the target; leave the table empty",
                    resource.kind
                ),
                [w] => format!(
                    "{at}: `{key}` is not an identity of a {} resource (it takes `{w}`)",
                    resource.kind
                ),
                many => format!(
                    "{at}: `{key}` is not an identity of a {} resource (it takes {})",
                    resource.kind,
                    many.join(" / ")
                ),
            });
        }
        if !wanted.is_empty() && !set.iter().any(|(k, s)| *s && wanted.contains(k)) {
            return Err(format!(
                "{at} needs `{}`: the identity of this phase",
                wanted.join("` or `")
            ));
        }
        if identity
            .user
            .as_deref()
            .is_some_and(|u| u.trim().is_empty())
        {
            return Err(format!("{at}: `user` is empty"));
        }
        overlay(resource, identity)
            .validate()
            .map_err(|e| format!("{at}: {e}"))?;
    }
    Ok(())
}

/// `resource` as an endpoint or op of `phase` reaches it: with that phase's identity. Operate
/// without a table of its own uses the resource's keys (today's behaviour); any other phase
/// the resource does not list is refused.
pub fn for_phase(resource: &ResourceConfig, phase: GrantLevel) -> Result<ResourceConfig, ApiError> {
    match resource.phases.as_ref().and_then(|p| p.get(phase)) {
        Some(identity) => Ok(overlay(resource, identity)),
        None if phase == GrantLevel::Operate => Ok(resource.clone()),
        None => Err(ApiError::new(
            ErrorCode::ForbiddenByScope,
            format!(
                "resource {:?} has no {} identity at this appliance",
                resource.id,
                phase.as_str()
            ),
        )
        .hint(format!(
            "the customer allows the phase by adding [resource.phases.{}] after this resource's [[resource]] in agent.toml",
            phase.as_str()
        ))
        .details(serde_json::json!({ "resource_id": resource.id, "phase": phase.as_str() }))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AgentConfig, ConfigError};
    use std::path::Path;

    const PHASED: &str = r#"
audit_path = "/var/lib/postern/audit.jsonl"

[[resource]]
id = "k8s.main"
kind = "kubernetes"
kubeconfig = "/etc/postern/main.kubeconfig"
namespaces = ["shop"]
impersonate = { user = "vendor-operate", groups = ["vendor-troubleshooters"] }

[resource.phases.deploy]
impersonate = { user = "vendor-deploy", groups = ["vendor-deployers"] }

[resource.phases.steady-state]
impersonate = { user = "vendor-observe", groups = ["vendor-readonly"] }

[[resource]]
id = "db.main"
kind = "postgres"
admin_url = "postgres://postern_admin@127.0.0.1:5432/shop"
schemas = ["app"]
privileges = ["SELECT", "INSERT", "UPDATE", "DELETE"]
owner_role = "app_owner"

[resource.phases.deploy]
privileges = ["SELECT", "CREATE"]

[[resource]]
id = "vm.web"
kind = "ssh"
host = "127.0.0.1:22"
user = "support"
key = "/etc/postern/vm.key"
host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"

[resource.phases.install]
user = "installer"
"#;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(text, Path::new("/etc/postern/agent.toml"))
    }

    fn res<'a>(c: &'a AgentConfig, id: &str) -> &'a ResourceConfig {
        c.resource(id).expect("declared")
    }

    #[test]
    fn each_phase_gets_its_own_identity_and_operate_keeps_the_resource_keys() {
        let c = parse(PHASED).expect("valid");
        let k8s = res(&c, "k8s.main");
        let who = |p| {
            let i = for_phase(k8s, p).unwrap().impersonate.unwrap();
            (i.user.unwrap(), i.groups)
        };
        assert_eq!(
            who(GrantLevel::Operate),
            (
                "vendor-operate".into(),
                vec!["vendor-troubleshooters".into()]
            )
        );
        assert_eq!(
            who(GrantLevel::Deploy),
            ("vendor-deploy".into(), vec!["vendor-deployers".into()])
        );
        assert_eq!(
            who(GrantLevel::SteadyState),
            ("vendor-observe".into(), vec!["vendor-readonly".into()])
        );
        let db = res(&c, "db.main");
        assert_eq!(
            for_phase(db, GrantLevel::Deploy)
                .unwrap()
                .privileges
                .unwrap(),
            ["SELECT", "CREATE"]
        );
        assert_eq!(
            for_phase(db, GrantLevel::Operate)
                .unwrap()
                .privileges
                .unwrap(),
            ["SELECT", "INSERT", "UPDATE", "DELETE"]
        );
        let vm = res(&c, "vm.web");
        assert_eq!(
            for_phase(vm, GrantLevel::Install).unwrap().user.unwrap(),
            "installer"
        );
        assert_eq!(
            for_phase(vm, GrantLevel::Operate).unwrap().user.unwrap(),
            "support"
        );
    }

    #[test]
    fn a_phase_the_resource_does_not_list_is_refused() {
        let c = parse(PHASED).expect("valid");
        for (id, phase) in [
            ("k8s.main", GrantLevel::Install),
            ("db.main", GrantLevel::Install),
            ("db.main", GrantLevel::SteadyState),
            ("vm.web", GrantLevel::Deploy),
        ] {
            let e = for_phase(res(&c, id), phase).unwrap_err();
            assert_eq!(
                e.code,
                ErrorCode::ForbiddenByScope,
                "{id} {}",
                phase.as_str()
            );
            assert!(e.message.contains(phase.as_str()), "{}", e.message);
            let hint = e.hint;
            assert!(
                hint.contains(&format!("[resource.phases.{}]", phase.as_str())),
                "{hint}"
            );
        }
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("refused").to_string()
    }

    const K8S: &str = r#"
audit_path = "/a.jsonl"
[[resource]]
id = "k8s"
kind = "kubernetes"
kubeconfig = "/k"
"#;

    #[test]
    fn phase_tables_are_checked_against_the_kind() {
        // An unknown key in a phase table, with deny_unknown_fields.
        let e = err(&format!(
            "{K8S}[resource.phases.deploy]\nimpersonat = {{ user = \"x\" }}\n"
        ));
        assert!(e.contains("impersonat"), "{e}");
        // An unknown phase.
        let e = err(&format!(
            "{K8S}[resource.phases.admin]\nimpersonate = {{ user = \"x\" }}\n"
        ));
        assert!(e.contains("admin"), "{e}");
        // Another kind's identity key.
        let e = err(&format!("{K8S}[resource.phases.deploy]\nuser = \"root\"\n"));
        assert!(
            e.contains("not an identity of a kubernetes resource"),
            "{e}"
        );
        // A phase table without the identity.
        let e = err(&format!("{K8S}[resource.phases.deploy]\n"));
        assert!(e.contains("needs `impersonate`"), "{e}");
        // A postgres phase's privileges are checked like the resource's own.
        let pg = r#"
audit_path = "/a.jsonl"
[[resource]]
id = "db"
kind = "postgres"
admin_url = "postgres://a@127.0.0.1/db"
schemas = ["app"]
[resource.phases.deploy]
privileges = ["SELECT", "CREATE"]
"#;
        let e = err(pg);
        assert!(e.contains("[resource.phases.deploy]"), "{e}");
        let e = err(&pg.replace("\"CREATE\"", "\"SUPERUSER\""));
        assert!(e.contains("[resource.phases.deploy]"), "{e}");
        // A tcp resource has no identity: an empty table allows the phase, a key is refused.
        let tcp = "audit_path = \"/a.jsonl\"\n[[resource]]\nid = \"t\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:1\"\n[resource.phases.deploy]\n";
        let c = parse(tcp).expect("valid");
        assert_eq!(
            for_phase(res(&c, "t"), GrantLevel::Deploy)
                .unwrap()
                .target
                .as_deref(),
            Some("127.0.0.1:1")
        );
        let e = err(&format!("{tcp}user = \"x\"\n"));
        assert!(e.contains("no identity at the target"), "{e}");
    }

    #[test]
    fn a_cloud_phase_names_its_whole_credential() {
        let cloud = r#"
audit_path = "/a.jsonl"
[[resource]]
id = "aws.prod"
kind = "cloud"
aws_profile = "vendor-ops"
aws_role_arn = "arn:aws:iam::123456789012:role/vendor-operate"
aws_region = "eu-west-1"
gcp_service_account = "operate@shop.iam.gserviceaccount.com"

[resource.phases.deploy]
aws_role_arn = "arn:aws:iam::123456789012:role/vendor-deploy"
"#;
        let c = parse(cloud).expect("valid");
        let r = res(&c, "aws.prod");
        let deploy = for_phase(r, GrantLevel::Deploy).unwrap();
        assert_eq!(
            deploy.aws_role_arn.as_deref(),
            Some("arn:aws:iam::123456789012:role/vendor-deploy")
        );
        // Not inherited from operate: neither the profile nor another provider's identity.
        assert_eq!(deploy.aws_profile, None);
        assert_eq!(deploy.gcp_service_account, None);
        // Shared settings stay.
        assert_eq!(deploy.aws_region.as_deref(), Some("eu-west-1"));
        let operate = for_phase(r, GrantLevel::Operate).unwrap();
        assert_eq!(
            operate.aws_role_arn.as_deref(),
            Some("arn:aws:iam::123456789012:role/vendor-operate")
        );
        // What the aws tool of a deploy op is handed: the deploy role, from the default profile.
        let dir = tempfile::tempdir().unwrap();
        let env = crate::op_credentials::prepare(&deploy, "aws", dir.path()).unwrap();
        assert!(
            env.iter()
                .any(|(k, v)| *k == "AWS_PROFILE" && v == "postern-op"),
            "{env:?}"
        );
        let config = std::fs::read_to_string(dir.path().join("aws-config")).unwrap();
        assert!(config.contains("role/vendor-deploy"), "{config}");
        assert!(
            !config.contains("vendor-operate") && config.contains("source_profile = default"),
            "{config}"
        );

        // A cloud phase table needs a credential, and only cloud keys.
        let e = err(&cloud.replace(
            "aws_role_arn = \"arn:aws:iam::123456789012:role/vendor-deploy\"",
            "",
        ));
        assert!(e.contains("needs `aws_profile` or"), "{e}");
        let e = err(&format!("{cloud}user = \"root\"\n"));
        assert!(e.contains("not an identity of a cloud resource"), "{e}");
        let e = err(&format!(
            "{K8S}[resource.phases.deploy]\naws_profile = \"x\"\n"
        ));
        assert!(e.contains("it takes `impersonate`"), "{e}");
    }
}
