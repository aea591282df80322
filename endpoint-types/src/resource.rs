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
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResourceKind::Kubernetes => "kubernetes",
            ResourceKind::Postgres => "postgres",
            ResourceKind::Ssh => "ssh",
            ResourceKind::Tcp => "tcp",
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
