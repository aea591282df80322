//! The payloads the frames carry.

use crate::{
    error::ApiError,
    resource::{EndpointType, PolicySummary, ResourceDescriptor},
};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    pub agent_version: String,
    pub resources: Vec<ResourceDescriptor>,
    pub policy: PolicySummary,
    /// The last gateway number in the agent's customer trail (0: none yet), so the gateway
    /// sends what follows; absent from agents that do not keep those records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trail_number: Option<u64>,
    /// The agent takes `ToAgent::TrailHead` (crate::trail_head); the gateway sends the frame
    /// to no other agent, so an older agent is never sent a frame it cannot read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trail_heads: bool,
    /// The agent takes `ToAgent::SteadyState` and collects snapshots (crate::steady_state);
    /// an older agent is never sent the frame.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub steady_state: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloAck {
    pub appliance_id: String,
    pub app: String,
    pub customer: String,
    pub heartbeat_interval_ms: u64,
    pub lost_after_ms: u64,
    /// The gateway audit key's public half (base64). The agent compares it with the key it
    /// pinned at enrollment; it pins it here only when it has none (an older enrollment), and
    /// says so in its trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_key: Option<String>,
    /// The gateway takes `ToGateway::ApprovalRefused`; the agent sends it to no other gateway
    /// (an older one would take the frame for a protocol error and drop the connection).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approval_refusals: bool,
    /// The gateway renews agent certificates over the control stream
    /// ([`crate::cert_renewal`]); an older gateway leaves it out and is never asked.
    #[serde(default)]
    pub cert_renewal: bool,
}

/// An endpoint the agent may serve sessions for, until `expires_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointGrant {
    pub endpoint_id: String,
    pub endpoint_type: EndpointType,
    pub resource_id: String,
    pub expires_at: Timestamp,
    /// The operate grant the endpoint was created under; it must be live for every session.
    #[serde(default)]
    pub grant_id: Option<String>,
    /// The approver's signed decision on this endpoint (type, resource, TTL), as the approver's
    /// key made it. An appliance that lists `[[approver]]` keys opens an endpoint its policy
    /// reserves for a person only with a valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_decision: Option<crate::approval::SignedDecision>,
    /// The phase it runs under: the grant it needs and the identity it uses at the target.
    #[serde(
        default = "crate::phase::operate",
        skip_serializing_if = "crate::phase::is_operate"
    )]
    pub phase: crate::control::GrantLevel,
}

/// A grant as the agent needs it to enforce: what, until when, approved by whom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveGrant {
    pub grant_id: String,
    pub level: crate::control::GrantLevel,
    pub approved_by: String,
    pub approved_at: Timestamp,
    pub expires_at: Timestamp,
    /// The approver's signed decision on this grant (level, duration), as the approver's key
    /// made it; sent with the grant every time the set is sent. An appliance that lists
    /// `[[approver]]` keys honours a grant its policy reserves for a person only with a valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_decision: Option<crate::approval::SignedDecision>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// An op as dispatched to the agent, with the approvals it was given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpDispatch {
    pub op_id: String,
    pub tool: crate::control::OpTool,
    /// The exact command the approver saw; the agent splits it itself.
    pub command: String,
    pub resource_id: String,
    pub timeout_s: u64,
    pub operator: String,
    pub grant_id: String,
    /// Who approved the command: a person, or `policy:automatic` / `policy:window`.
    pub command_approved_by: String,
    pub command_approved_at: Timestamp,
    /// Whether output must be held for the customer's approval.
    pub hold_output: bool,
    /// The approver's signed decision on this command, as the approver's key made it (the
    /// gateway stores and forwards it untouched). An appliance that lists `[[approver]]` keys
    /// runs a command its policy reserves for a person only with a valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_decision: Option<crate::approval::SignedDecision>,
    /// The phase it runs under: the grant it needs and the identity it uses at the target.
    #[serde(
        default = "crate::phase::operate",
        skip_serializing_if = "crate::phase::is_operate"
    )]
    pub phase: crate::control::GrantLevel,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpFinished {
    pub op_id: String,
    pub held: bool,
    #[serde(default)]
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub truncated: bool,
    #[serde(default)]
    pub timed_out: bool,
    /// COMMAND_FAILED / COMMAND_TIMEOUT with details; absent while held.
    #[serde(default)]
    pub error: Option<ApiError>,
    /// For a preview (approver view) rather than the op's real end.
    #[serde(default)]
    pub preview: bool,
    /// The held output was destroyed (denied).
    #[serde(default)]
    pub destroyed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamOpen {
    pub endpoint_id: String,
    pub session_id: String,
    pub resource_id: String,
    /// Who is on the other end (the endpoint's operator), for the customer's trail.
    pub operator: String,
    /// The client's address as the gateway saw it.
    pub client_addr: String,
}
