//! Control-plane records: grants (permission phases), approvals and one-off ops. Data only;
//! the policy and state-transition logic lives in [`crate::policy`] and [`crate::lifecycle`].

use crate::{error::ApiError, resource::EndpointType};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The four permission phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GrantLevel {
    Install,
    SteadyState,
    Deploy,
    Operate,
}

impl GrantLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantLevel::Install => "install",
            GrantLevel::SteadyState => "steady-state",
            GrantLevel::Deploy => "deploy",
            GrantLevel::Operate => "operate",
        }
    }

    pub fn parse(s: &str) -> Option<GrantLevel> {
        Some(match s {
            "install" => GrantLevel::Install,
            "steady-state" => GrantLevel::SteadyState,
            "deploy" => GrantLevel::Deploy,
            "operate" => GrantLevel::Operate,
            _ => return None,
        })
    }
}

/// Grant states. `expired` is derived from `expires_at` and the clock, never stored as a
/// decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GrantState {
    PendingApproval,
    Active,
    Denied,
    Expired,
    Revoked,
}

impl GrantState {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantState::PendingApproval => "pending-approval",
            GrantState::Active => "active",
            GrantState::Denied => "denied",
            GrantState::Expired => "expired",
            GrantState::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<GrantState> {
        Some(match s {
            "pending-approval" => GrantState::PendingApproval,
            "active" => GrantState::Active,
            "denied" => GrantState::Denied,
            "expired" => GrantState::Expired,
            "revoked" => GrantState::Revoked,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub id: String,
    pub level: GrantLevel,
    pub state: GrantState,
    pub appliance_id: String,
    pub app: String,
    pub customer: String,
    pub requested_by: String,
    pub reason: String,
    pub duration_s: u64,
    pub requested_at: Timestamp,
    pub approved_at: Option<Timestamp>,
    pub expires_at: Option<Timestamp>,
    /// Who decided: a person, or `policy:automatic` / `policy:window`.
    #[serde(default)]
    pub decided_by: Option<String>,
    /// The customer's message with a denial.
    #[serde(default)]
    pub message: Option<String>,
    /// Why the appliance refused the grant a person was said to approve (`APPROVAL_INVALID`,
    /// `details.reason`); the gateway then revoked it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<ApiError>,
}

/// One-off op tools (`postern ops <tool>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpTool {
    Kubectl,
    Psql,
    Ssh,
    Docker,
    Aws,
    Gcloud,
    Az,
    Doctl,
}

impl OpTool {
    pub const ALL: [OpTool; 8] = [
        OpTool::Kubectl,
        OpTool::Psql,
        OpTool::Ssh,
        OpTool::Docker,
        OpTool::Aws,
        OpTool::Gcloud,
        OpTool::Az,
        OpTool::Doctl,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OpTool::Kubectl => "kubectl",
            OpTool::Psql => "psql",
            OpTool::Ssh => "ssh",
            OpTool::Docker => "docker",
            OpTool::Aws => "aws",
            OpTool::Gcloud => "gcloud",
            OpTool::Az => "az",
            OpTool::Doctl => "doctl",
        }
    }

    pub fn parse(s: &str) -> Option<OpTool> {
        OpTool::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpState {
    PendingApproval,
    Approved,
    Running,
    OutputPendingApproval,
    Completed,
    Failed,
    Denied,
    TimedOut,
    Expired,
}

impl OpState {
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::PendingApproval => "pending-approval",
            OpState::Approved => "approved",
            OpState::Running => "running",
            OpState::OutputPendingApproval => "output-pending-approval",
            OpState::Completed => "completed",
            OpState::Failed => "failed",
            OpState::Denied => "denied",
            OpState::TimedOut => "timed-out",
            OpState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<OpState> {
        [
            OpState::PendingApproval,
            OpState::Approved,
            OpState::Running,
            OpState::OutputPendingApproval,
            OpState::Completed,
            OpState::Failed,
            OpState::Denied,
            OpState::TimedOut,
            OpState::Expired,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            OpState::Completed
                | OpState::Failed
                | OpState::Denied
                | OpState::TimedOut
                | OpState::Expired
        )
    }
}

/// An op as the API and `ops get|wait` show it. Held output is never in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpRecord {
    pub id: String,
    pub state: OpState,
    pub tool: OpTool,
    pub command: String,
    pub timeout_s: u64,
    pub exit_code: Option<i64>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    pub truncated: bool,
    pub appliance_id: String,
    pub app: String,
    pub customer: String,
    pub origin_resource_id: String,
    pub requested_by: String,
    pub requested_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    /// Token id of who asked (names are display only); absent for ops the gateway asked for
    /// and ops from before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by_id: Option<String>,
    /// `--phase`: operate (default), deploy or install.
    #[serde(default = "crate::phase::operate")]
    pub phase: crate::control::GrantLevel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalKind {
    Grant,
    Op,
    Endpoint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalStage {
    Command,
    Output,
}

/// One item waiting for a customer approver (`approvals list`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalItem {
    /// The id of what it decides: a grant, an op or an endpoint.
    pub id: String,
    pub kind: ApprovalKind,
    pub stage: ApprovalStage,
    pub appliance_id: String,
    pub app: String,
    pub customer: String,
    pub requested_by: String,
    pub requested_at: Timestamp,
    pub summary: String,
    /// The full request (grant level/duration/reason, op command/resource/timeout, endpoint
    /// type/resource/TTL).
    pub request: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantRequest {
    pub app: String,
    pub customer: String,
    pub level: GrantLevel,
    pub duration_s: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpRequest {
    pub tool: OpTool,
    pub app: String,
    pub customer: String,
    pub origin_resource_id: String,
    pub command: String,
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// `--phase`: operate (default), deploy or install.
    #[serde(default = "crate::phase::operate")]
    pub phase: crate::control::GrantLevel,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Decision {
    #[serde(default)]
    pub message: Option<String>,
    /// The decision signed by the approver's key (`approvals approve|deny --key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<crate::approval::SignedDecision>,
}

/// What an approval needs to be bound to: used once, for exactly this.
pub fn endpoint_summary(t: EndpointType, resource: &str, ttl_s: u64) -> String {
    format!(
        "{t} endpoint to {resource} for {}",
        crate::duration::format_duration(std::time::Duration::from_secs(ttl_s))
    )
}
