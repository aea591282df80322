//! Resources an appliance declares, endpoint types, and the customer's policy as reported in the hello.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The kind of an appliance resource (`kind` in `agent.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    Kubernetes,
    Postgres,
    Ssh,
    Tcp,
    /// A Docker daemon the `docker` op tool reaches (`docker_host`).
    Docker,
    /// A cloud account the `aws`, `gcloud`, `az` and `doctl` op tools reach.
    Cloud,
}

impl ResourceKind {
    /// The one-off op tools that run against a resource of this kind (none for tcp).
    pub fn op_tools(self) -> &'static [&'static str] {
        match self {
            ResourceKind::Kubernetes => &["kubectl"],
            ResourceKind::Postgres => &["psql"],
            ResourceKind::Ssh => &["ssh"],
            ResourceKind::Tcp => &[],
            ResourceKind::Docker => &["docker"],
            ResourceKind::Cloud => &["aws", "gcloud", "az", "doctl"],
        }
    }

    /// The resource kind an op tool runs against (`kubectl` → kubernetes, `aws` → cloud, …).
    pub fn of_op_tool(tool: &str) -> Option<ResourceKind> {
        [
            ResourceKind::Kubernetes,
            ResourceKind::Postgres,
            ResourceKind::Ssh,
            ResourceKind::Tcp,
            ResourceKind::Docker,
            ResourceKind::Cloud,
        ]
        .into_iter()
        .find(|k| k.op_tools().contains(&tool))
    }

    /// Why `tool` may not run against `resource_id` (of this kind), or `None` when it may:
    /// (message, hint) for an `INVALID_ORIGIN_RESOURCE_ID`. The gateway and the agent both ask.
    pub fn op_tool_mismatch(self, tool: &str, resource_id: &str) -> Option<(String, String)> {
        if self.op_tools().contains(&tool) {
            return None;
        }
        let wanted =
            ResourceKind::of_op_tool(tool).map_or_else(|| "no".to_string(), |k| format!("a {k}"));
        let message = format!("resource {resource_id:?} is a {self} resource; a `{tool}` op runs only against {wanted} resource");
        let hint = match self.op_tools() {
            [] => format!("a {self} resource takes no one-off ops; use an endpoint (`postern ops endpoint create --type {self}`)"),
            tools => format!(
                "a {self} resource takes {}; name a resource of kind {} for `{tool}`",
                tools.iter().map(|t| format!("`postern ops {t}`")).collect::<Vec<_>>().join(", "),
                ResourceKind::of_op_tool(tool).map_or_else(|| "?".to_string(), |k| k.to_string())
            ),
        };
        Some((message, hint))
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResourceKind::Kubernetes => "kubernetes",
            ResourceKind::Postgres => "postgres",
            ResourceKind::Ssh => "ssh",
            ResourceKind::Tcp => "tcp",
            ResourceKind::Docker => "docker",
            ResourceKind::Cloud => "cloud",
        })
    }
}

/// One entry of the inventory the agent reports: the origin resource id and its kind.
/// Targets (addresses, credentials) stay in the appliance and are never sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceDescriptor {
    pub id: String,
    pub kind: ResourceKind,
    /// The customer's scope for the resource, so the gateway can refuse what is out of scope
    /// before it reaches the appliance. The agent enforces the same scope again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<ResourceScope>,
}

/// What a resource's endpoints may do, from `agent.toml` with DESIGN.md's defaults applied.
/// Names only: no targets, addresses or credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ResourceScope {
    Kubernetes {
        namespaces: Vec<String>,
        resources: Vec<String>,
        verbs: Vec<String>,
        /// The agent impersonates a per-app user upstream, so the cluster's RBAC applies too.
        #[serde(default)]
        impersonate: bool,
    },
    Postgres {
        database: String,
        schemas: Vec<String>,
        privileges: Vec<String>,
    },
    Ssh {
        user: String,
        #[serde(default)]
        sftp: bool,
    },
}

/// The type of an ops endpoint (`--type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointType {
    Kubectl,
    Postgres,
    Ssh,
    Tcp,
}

impl EndpointType {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointType::Kubectl => "kubectl",
            EndpointType::Postgres => "postgres",
            EndpointType::Ssh => "ssh",
            EndpointType::Tcp => "tcp",
        }
    }

    pub fn parse(s: &str) -> Option<EndpointType> {
        Some(match s {
            "kubectl" => EndpointType::Kubectl,
            "postgres" => EndpointType::Postgres,
            "ssh" => EndpointType::Ssh,
            "tcp" => EndpointType::Tcp,
            _ => return None,
        })
    }

    /// The resource kind an endpoint of this type reaches.
    pub fn resource_kind(self) -> ResourceKind {
        match self {
            EndpointType::Kubectl => ResourceKind::Kubernetes,
            EndpointType::Postgres => ResourceKind::Postgres,
            EndpointType::Ssh => ResourceKind::Ssh,
            EndpointType::Tcp => ResourceKind::Tcp,
        }
    }
}

impl fmt::Display for EndpointType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ApprovalMode {
    Automatic,
    #[default]
    Manual,
    Windows,
    AlwaysRequire,
}

/// The customer's approval policy as the agent reports it in its hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PolicySummary {
    pub approval: ApprovalMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    #[serde(default)]
    pub windows: Vec<String>,
    #[serde(default)]
    pub maintenance: Vec<String>,
    #[serde(default = "default_true")]
    pub steady_state: bool,
    /// The key ids (`SHA256:…`) of the appliance's `[[approver]]` keys. Informational for the
    /// gateway: it refuses an unsigned approval the appliance would refuse anyway, with a hint;
    /// the appliance itself trusts only its own `agent.toml`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approver_key_ids: Vec<String>,
    /// The `[policy.<phase>]` tables, each resolved against `[policy]`
    /// (see [`crate::phase_policy`]); a phase not listed follows `[policy]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<crate::phase_policy::PhasePolicySummary>,
}

fn default_true() -> bool {
    true
}

/// Why a session or an endpoint ended (`reason` in `session.closed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloseReason {
    Client,
    Retired,
    Expired,
    Revoked,
    Interrupted,
    Error,
}

impl CloseReason {
    /// The QUIC stream reset / stop code that tells the other side why a data stream was cut,
    /// so both trails record the same reason whichever side's clock fired first.
    pub fn stream_code(self) -> u32 {
        match self {
            CloseReason::Error => 1,
            CloseReason::Client => 2,
            CloseReason::Retired => 3,
            CloseReason::Expired => 4,
            CloseReason::Revoked => 5,
            CloseReason::Interrupted => 6,
        }
    }

    pub fn from_stream_code(code: u64) -> Option<CloseReason> {
        Some(match code {
            1 => CloseReason::Error,
            2 => CloseReason::Client,
            3 => CloseReason::Retired,
            4 => CloseReason::Expired,
            5 => CloseReason::Revoked,
            6 => CloseReason::Interrupted,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Retired => "retired",
            CloseReason::Expired => "expired",
            CloseReason::Revoked => "revoked",
            CloseReason::Interrupted => "interrupted",
            CloseReason::Error => "error",
        }
    }
}

#[cfg(test)]
mod op_tool_tests {
    use super::ResourceKind;

    #[test]
    fn each_tool_has_one_kind_and_mismatches_name_both() {
        for (tool, kind) in [
            ("kubectl", ResourceKind::Kubernetes),
            ("psql", ResourceKind::Postgres),
            ("ssh", ResourceKind::Ssh),
            ("docker", ResourceKind::Docker),
            ("aws", ResourceKind::Cloud),
            ("gcloud", ResourceKind::Cloud),
            ("az", ResourceKind::Cloud),
            ("doctl", ResourceKind::Cloud),
        ] {
            assert_eq!(ResourceKind::of_op_tool(tool), Some(kind));
            assert_eq!(kind.op_tool_mismatch(tool, "r"), None);
        }
        let (message, hint) = ResourceKind::Tcp
            .op_tool_mismatch("kubectl", "null_resource.echo")
            .unwrap();
        assert!(
            message.contains("null_resource.echo")
                && message.contains("tcp")
                && message.contains("kubernetes"),
            "{message}"
        );
        assert!(hint.contains("takes no one-off ops"), "{hint}");
        let (message, hint) = ResourceKind::Cloud
            .op_tool_mismatch("psql", "aws_account.main")
            .unwrap();
        assert!(
            message.contains("cloud resource") && message.contains("postgres"),
            "{message}"
        );
        assert!(
            hint.contains("`postern ops aws`")
                && hint.contains("`postern ops doctl`")
                && hint.contains("kind postgres"),
            "{hint}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::CloseReason::{self, *};

    #[test]
    fn stream_codes_round_trip() {
        for r in [Error, Client, Retired, Expired, Revoked, Interrupted] {
            assert_eq!(
                CloseReason::from_stream_code(r.stream_code() as u64),
                Some(r)
            );
        }
        assert_eq!(CloseReason::from_stream_code(0), None);
        assert_eq!(CloseReason::from_stream_code(99), None);
    }
}
