//! The control stream: the agent's hello and the gateway's answer, then frames both ways for the
//! connection's life.

use super::payload::{
    EndpointGrant, Hello, HelloAck, LiveGrant, OpDispatch, OpFinished, OutputStream,
};
use crate::{customer_trail::GatewayRecord, error::ApiError, resource::CloseReason};
use serde::{Deserialize, Serialize};

/// Agent → gateway: the first frame on the control stream, and the only one before the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Handshake {
    Hello(Hello),
}

/// Gateway → agent: the answer to the hello. After `HelloAck` the stream carries [`ToAgent`];
/// after `Error` the gateway closes the connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HandshakeAnswer {
    HelloAck(HelloAck),
    Error(ApiError),
}

/// Gateway → agent on the control stream, after the hello was answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToAgent {
    /// The agent answers with `HeartbeatAck` carrying the same `seq`.
    Heartbeat {
        seq: u64,
    },
    HeartbeatAck {
        seq: u64,
    },
    /// The full set of live endpoints of this appliance (sent after the hello).
    EndpointSync {
        endpoints: Vec<EndpointGrant>,
    },
    /// An endpoint became live.
    EndpointOpen(EndpointGrant),
    /// An endpoint ended; the agent cuts its sessions and refuses new ones.
    EndpointClose {
        endpoint_id: String,
        reason: CloseReason,
    },
    /// The appliance's live grants (the full set, after every change). The agent serves
    /// endpoint sessions and runs ops only under a live `operate` grant by its own clock.
    GrantSync {
        grants: Vec<LiveGrant>,
    },
    /// Run a one-off op. The agent checks its own policy and grants first.
    OpDispatch(OpDispatch),
    /// Send the held output of an op as preview (an approver is looking).
    OutputFetch {
        op_id: String,
    },
    /// The customer released the held output.
    OutputRelease {
        op_id: String,
        approved_by: String,
        /// The approver's signed release, bound to the held output's digest (see `OpDispatch`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signed_decision: Option<crate::approval::SignedDecision>,
    },
    /// The customer denied the held output; destroy it.
    OutputDestroy {
        op_id: String,
        denied_by: String,
        message: Option<String>,
    },
    /// A protocol error, sent before the gateway closes.
    Error(ApiError),
    /// A command the agent must not miss, numbered per connection from 1. The agent applies
    /// `command` and then answers `CommandAck` with the same `seq`.
    Command {
        seq: u64,
        command: AgentCommand,
    },
    /// Records for the customer trail, numbered per appliance, in order (see
    /// [`crate::customer_trail`]). The agent answers `TrailRecorded` once they are durable.
    TrailRecords {
        records: Vec<GatewayRecord>,
        /// Numbers up to this one the gateway no longer holds: the agent reported them recorded
        /// before (its trail was since replaced by an older copy). The agent records the loss.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lost_through: Option<u64>,
    },
    /// The gateway stored the agent's teardown proof for `endpoint_id` (or, with `refused`,
    /// will never store it: it names no ended endpoint of this appliance, or does not verify).
    /// Until this arrives the agent keeps the proof and sends it again.
    TeardownAck {
        endpoint_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refused: Option<ApiError>,
    },
    /// The gateway's latest signed head of its own trail, for the agent to record as an anchor
    /// in the customer trail (crate::trail_head). Latest wins: a lost one is superseded by the
    /// next, and the latest is sent again after every hello.
    TrailHead(crate::trail_head::SignedHead),
    /// The answer to the agent's [`ToGateway::CertRenew`] (crate::cert_renewal). A request and
    /// its answer, not a command: a lost answer is asked for again with a new key.
    CertRenewal(crate::cert_renewal::CertRenewAnswer),
    /// Whether the agent collects steady-state snapshots (the customer approver's switch,
    /// sent after every hello and on every change). Until it arrives the agent collects
    /// nothing.
    SteadyState {
        enabled: bool,
    },
}

/// The gateway → agent frames that change what the agent allows, and so are sent as a numbered,
/// acknowledged [`ToAgent::Command`]. Same names and fields as the [`ToAgent`] variants they
/// stand for (see the conversions below); a command cannot hold another command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentCommand {
    EndpointSync {
        endpoints: Vec<EndpointGrant>,
    },
    EndpointOpen(EndpointGrant),
    EndpointClose {
        endpoint_id: String,
        reason: CloseReason,
    },
    GrantSync {
        grants: Vec<LiveGrant>,
    },
    OpDispatch(OpDispatch),
    OutputRelease {
        op_id: String,
        approved_by: String,
        /// The approver's signed release, bound to the held output's digest (see `OpDispatch`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signed_decision: Option<crate::approval::SignedDecision>,
    },
    OutputDestroy {
        op_id: String,
        denied_by: String,
        message: Option<String>,
    },
    TrailRecords {
        records: Vec<GatewayRecord>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lost_through: Option<u64>,
    },
    SteadyState {
        enabled: bool,
    },
}

/// Agent → gateway on the control stream, after the hello was answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToGateway {
    /// The gateway answers with `HeartbeatAck` carrying the same `seq`.
    Heartbeat {
        seq: u64,
    },
    HeartbeatAck {
        seq: u64,
    },
    /// Every command up to and including `seq` has been applied.
    CommandAck {
        seq: u64,
    },
    /// The op was refused in the appliance (policy, grant, tool, command).
    OpRefused {
        op_id: String,
        error: ApiError,
    },
    /// The op's process started.
    OpStarted {
        op_id: String,
    },
    /// Output. `preview` output is for an approver's eyes only and must not be stored or
    /// logged by the gateway.
    OpOutput {
        op_id: String,
        stream: OutputStream,
        data: String,
        preview: bool,
    },
    /// The op ended. With `held`, output, exit code and error stay in the appliance until
    /// released (then they follow as `OpOutput` + a final `OpFinished`).
    OpFinished(OpFinished),
    /// A record about a running op for the vendor trail too: what a `kubectl` op's per-op proxy
    /// forwarded or refused (`kind` is `kube.request` or `denied`; the gateway records no other
    /// kind from it).
    OpRecord {
        op_id: String,
        kind: String,
        detail: serde_json::Value,
    },
    /// What an ended SSH endpoint's teardown did on the VM.
    SshTeardown(crate::ssh_scope::SshTeardown),
    /// A protocol error, sent before the agent closes.
    Error(ApiError),
    /// The last gateway number the customer trail holds (durably). The gateway sends what
    /// follows it: after a gap the agent reports the number before the gap, so the missing
    /// records come again.
    TrailRecorded {
        number: u64,
    },
    /// The signed proof that an ended endpoint is gone at the appliance; answered with
    /// [`ToAgent::TeardownAck`].
    TeardownProof(crate::teardown::SignedTeardown),
    /// The agent's latest signed head of the customer trail, for the gateway to record as an
    /// anchor in the vendor trail. Latest wins; the latest is sent again after every hello.
    TrailHead(crate::trail_head::SignedHead),
    /// The appliance refused a grant or endpoint (`record_id`) a person was said to approve:
    /// its signed decision is missing or invalid (`APPROVAL_INVALID`, `details.reason`). The
    /// appliance honours nothing of it; sent again whenever the gateway announces it again.
    ApprovalRefused {
        record_id: String,
        error: ApiError,
    },
    /// A fresh key's CSR, to renew the appliance certificate (crate::cert_renewal); sent only
    /// to a gateway whose hello answer has `cert_renewal`. Answered with [`ToAgent::CertRenewal`].
    CertRenew(crate::cert_renewal::CertRenewRequest),
    /// A steady-state health snapshot of the appliance's resources. Latest wins: not
    /// acknowledged; one lost is replaced by the next an interval later.
    SteadyStateSnapshot(crate::steady_state::ApplianceSnapshot),
}

impl Handshake {
    pub fn name(&self) -> &'static str {
        match self {
            Handshake::Hello(_) => "hello",
        }
    }
}

impl HandshakeAnswer {
    pub fn name(&self) -> &'static str {
        match self {
            HandshakeAnswer::HelloAck(_) => "hello_ack",
            HandshakeAnswer::Error(_) => "error",
        }
    }
}

impl ToAgent {
    /// The frame's wire name (its `type`), for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            ToAgent::Heartbeat { .. } => "heartbeat",
            ToAgent::HeartbeatAck { .. } => "heartbeat_ack",
            ToAgent::EndpointSync { .. } => "endpoint_sync",
            ToAgent::EndpointOpen(_) => "endpoint_open",
            ToAgent::EndpointClose { .. } => "endpoint_close",
            ToAgent::GrantSync { .. } => "grant_sync",
            ToAgent::OpDispatch(_) => "op_dispatch",
            ToAgent::OutputFetch { .. } => "output_fetch",
            ToAgent::OutputRelease { .. } => "output_release",
            ToAgent::OutputDestroy { .. } => "output_destroy",
            ToAgent::Error(_) => "error",
            ToAgent::Command { .. } => "command",
            ToAgent::TrailRecords { .. } => "trail_records",
            ToAgent::TeardownAck { .. } => "teardown_ack",
            ToAgent::TrailHead(_) => "trail_head",
            ToAgent::CertRenewal(_) => "cert_renewal",
            ToAgent::SteadyState { .. } => "steady_state",
        }
    }

    /// Whether this frame changes what the agent allows, and so must be sent as a numbered,
    /// acknowledged command. Heartbeats, previews and errors are not.
    pub fn is_command(&self) -> bool {
        matches!(
            self,
            ToAgent::EndpointSync { .. }
                | ToAgent::EndpointOpen(_)
                | ToAgent::EndpointClose { .. }
                | ToAgent::GrantSync { .. }
                | ToAgent::OpDispatch(_)
                | ToAgent::OutputRelease { .. }
                | ToAgent::OutputDestroy { .. }
                | ToAgent::TrailRecords { .. }
                | ToAgent::SteadyState { .. }
        )
    }
}

impl AgentCommand {
    /// The wire name of the frame the command stands for.
    pub fn name(&self) -> &'static str {
        match self {
            AgentCommand::EndpointSync { .. } => "endpoint_sync",
            AgentCommand::EndpointOpen(_) => "endpoint_open",
            AgentCommand::EndpointClose { .. } => "endpoint_close",
            AgentCommand::GrantSync { .. } => "grant_sync",
            AgentCommand::OpDispatch(_) => "op_dispatch",
            AgentCommand::OutputRelease { .. } => "output_release",
            AgentCommand::OutputDestroy { .. } => "output_destroy",
            AgentCommand::TrailRecords { .. } => "trail_records",
            AgentCommand::SteadyState { .. } => "steady_state",
        }
    }
}

impl From<AgentCommand> for ToAgent {
    fn from(command: AgentCommand) -> Self {
        match command {
            AgentCommand::EndpointSync { endpoints } => ToAgent::EndpointSync { endpoints },
            AgentCommand::EndpointOpen(grant) => ToAgent::EndpointOpen(grant),
            AgentCommand::EndpointClose {
                endpoint_id,
                reason,
            } => ToAgent::EndpointClose {
                endpoint_id,
                reason,
            },
            AgentCommand::GrantSync { grants } => ToAgent::GrantSync { grants },
            AgentCommand::OpDispatch(d) => ToAgent::OpDispatch(d),
            AgentCommand::OutputRelease {
                op_id,
                approved_by,
                signed_decision,
            } => ToAgent::OutputRelease {
                op_id,
                approved_by,
                signed_decision,
            },
            AgentCommand::OutputDestroy {
                op_id,
                denied_by,
                message,
            } => ToAgent::OutputDestroy {
                op_id,
                denied_by,
                message,
            },
            AgentCommand::TrailRecords {
                records,
                lost_through,
            } => ToAgent::TrailRecords {
                records,
                lost_through,
            },
            AgentCommand::SteadyState { enabled } => ToAgent::SteadyState { enabled },
        }
    }
}

/// The command a frame stands for; a frame that is not a command (see [`ToAgent::is_command`])
/// comes back unchanged as the error.
impl TryFrom<ToAgent> for AgentCommand {
    type Error = ToAgent;

    fn try_from(frame: ToAgent) -> Result<Self, ToAgent> {
        match frame {
            ToAgent::EndpointSync { endpoints } => Ok(AgentCommand::EndpointSync { endpoints }),
            ToAgent::EndpointOpen(grant) => Ok(AgentCommand::EndpointOpen(grant)),
            ToAgent::EndpointClose {
                endpoint_id,
                reason,
            } => Ok(AgentCommand::EndpointClose {
                endpoint_id,
                reason,
            }),
            ToAgent::GrantSync { grants } => Ok(AgentCommand::GrantSync { grants }),
            ToAgent::OpDispatch(d) => Ok(AgentCommand::OpDispatch(d)),
            ToAgent::OutputRelease {
                op_id,
                approved_by,
                signed_decision,
            } => Ok(AgentCommand::OutputRelease {
                op_id,
                approved_by,
                signed_decision,
            }),
            ToAgent::OutputDestroy {
                op_id,
                denied_by,
                message,
            } => Ok(AgentCommand::OutputDestroy {
                op_id,
                denied_by,
                message,
            }),
            ToAgent::TrailRecords {
                records,
                lost_through,
            } => Ok(AgentCommand::TrailRecords {
                records,
                lost_through,
            }),
            ToAgent::SteadyState { enabled } => Ok(AgentCommand::SteadyState { enabled }),
            other @ (ToAgent::Heartbeat { .. }
            | ToAgent::HeartbeatAck { .. }
            | ToAgent::OutputFetch { .. }
            | ToAgent::Error(_)
            | ToAgent::Command { .. }
            | ToAgent::TeardownAck { .. }
            | ToAgent::TrailHead(_)
            | ToAgent::CertRenewal(_)) => Err(other),
        }
    }
}

impl ToGateway {
    /// The frame's wire name (its `type`), for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            ToGateway::Heartbeat { .. } => "heartbeat",
            ToGateway::HeartbeatAck { .. } => "heartbeat_ack",
            ToGateway::CommandAck { .. } => "command_ack",
            ToGateway::OpRefused { .. } => "op_refused",
            ToGateway::OpStarted { .. } => "op_started",
            ToGateway::OpOutput { .. } => "op_output",
            ToGateway::OpFinished(_) => "op_finished",
            ToGateway::OpRecord { .. } => "op_record",
            ToGateway::SshTeardown(_) => "ssh_teardown",
            ToGateway::Error(_) => "error",
            ToGateway::TrailRecorded { .. } => "trail_recorded",
            ToGateway::TeardownProof(_) => "teardown_proof",
            ToGateway::TrailHead(_) => "trail_head",
            ToGateway::ApprovalRefused { .. } => "approval_refused",
            ToGateway::CertRenew(_) => "cert_renew",
            ToGateway::SteadyStateSnapshot(_) => "steady_state_snapshot",
        }
    }
}
