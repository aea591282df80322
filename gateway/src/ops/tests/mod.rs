//! Unit tests of the ops service: an in-memory store, a fake clock, recording agents, audit and
//! notifier, and a grants gate the test sets up. No SQLite, no processes.

mod create;
mod decide;
mod dispatch;
mod frames;

use super::{memory_store::MemoryOpStore, Ops};
use crate::{
    identity::Caller,
    ports::{
        fakes::{FakeClock, MemoryAudit, RecordingAgents, RecordingNotifier},
        AgentView, GrantGate,
    },
    store::{ApplianceRow, GrantRow, OpRow},
};
use async_trait::async_trait;
use endpoint_types::{
    api::Role,
    control::{GrantLevel, GrantState, OpRecord, OpRequest, OpState, OpTool},
    frame::{OpFinished, OutputStream, ToAgent, ToGateway},
    policy::Decision,
    resource::{ApprovalMode, PolicySummary, ResourceDescriptor, ResourceKind},
    ApiError, ErrorCode,
};
use jiff::{SignedDuration, Timestamp};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

const ACME: &str = "ap_acme";
const GLOBEX: &str = "ap_globex";
const CLUSTER: &str = "aws_eks_cluster.main";
const DATABASE: &str = "aws_db_instance.main";

fn t0() -> Timestamp {
    "2026-03-02T10:00:00Z".parse().unwrap()
}

fn minutes(m: i64) -> SignedDuration {
    SignedDuration::from_mins(m)
}

/// A grants gate the test sets: one operate grant (or none) and the customer's policy, both
/// judged at the instant the service passes in.
#[derive(Debug)]
struct FakeGrants {
    grant: Mutex<Option<GrantRow>>,
    policy: Mutex<PolicySummary>,
    /// Every instant the service asked about, to see it asks by its clock.
    asked_at: Mutex<Vec<Timestamp>>,
}

impl FakeGrants {
    fn set_grant(&self, grant: Option<GrantRow>) {
        *self.grant.lock().unwrap() = grant;
    }
}

#[async_trait]
impl GrantGate for FakeGrants {
    async fn require_operate(
        &self,
        appliance: &ApplianceRow,
        now: Timestamp,
    ) -> Result<GrantRow, ApiError> {
        self.asked_at.lock().unwrap().push(now);
        match self.grant.lock().unwrap().clone() {
            Some(g) if g.expires_at.is_none_or(|at| at > now) => Ok(g),
            Some(_) => Err(ApiError::new(
                ErrorCode::OperateAccessExpired,
                format!("operate access to {} expired", appliance.app),
            )),
            None => Err(ApiError::new(
                ErrorCode::OperateAccessRequired,
                format!("there is no live operate access to {}", appliance.app),
            )),
        }
    }

    async fn automatic_decision(
        &self,
        _appliance_id: &str,
        phase: endpoint_types::control::GrantLevel,
        now: Timestamp,
    ) -> Option<(&'static str, Option<Timestamp>)> {
        self.asked_at.lock().unwrap().push(now);
        let policy = self.policy.lock().unwrap().clone();
        match endpoint_types::phase_policy::ruling(&policy, phase, now).decision {
            Decision::Automatic => Some(("policy:automatic", None)),
            Decision::InWindow { closes_at } => Some(("policy:window", Some(closes_at))),
            Decision::NeedsPerson => None,
        }
    }

    async fn policy_of(&self, _appliance_id: &str) -> PolicySummary {
        self.policy.lock().unwrap().clone()
    }
}

fn policy(approval: ApprovalMode) -> PolicySummary {
    PolicySummary {
        approval,
        steady_state: true,
        ..Default::default()
    }
}

/// Open 10:00–11:00 UTC every day.
fn window_policy() -> PolicySummary {
    PolicySummary {
        approval: ApprovalMode::Windows,
        windows: vec!["Mon-Sun 10:00-11:00".into()],
        steady_state: true,
        ..Default::default()
    }
}

fn appliance(id: &str, customer: &str) -> ApplianceRow {
    ApplianceRow {
        id: id.into(),
        app: "shop".into(),
        customer: customer.into(),
        created_at: t0() - minutes(600),
        created_by: "admin".into(),
        cert_fingerprint: None,
        enrolled_at: None,
        revoked_at: None,
        last_seen: None,
        agent_version: None,
        resources: "[]".into(),
    }
}

/// A live operate grant for `appliance_id`, ending 30 minutes after t0.
fn operate_grant(id: &str, appliance_id: &str) -> GrantRow {
    GrantRow {
        id: id.into(),
        appliance_id: appliance_id.into(),
        level: GrantLevel::Operate,
        state: GrantState::Active,
        requested_by: "alice@vendor".into(),
        requested_by_id: None,
        reason: "debug".into(),
        duration_ms: 30 * 60 * 1000,
        requested_at: t0() - minutes(5),
        decided_by: Some("ana@acme".into()),
        decided_at: Some(t0() - minutes(1)),
        message: None,
        expires_at: Some(t0() + minutes(30)),
    }
}

fn agent_view() -> AgentView {
    let resource = |id: &str, kind| ResourceDescriptor {
        id: id.into(),
        kind,
        scope: None,
    };
    AgentView {
        policy: PolicySummary::default(),
        resources: vec![
            resource(CLUSTER, ResourceKind::Kubernetes),
            resource(DATABASE, ResourceKind::Postgres),
        ],
    }
}

fn caller(name: &str, role: Role, customer: Option<&str>) -> Caller {
    Caller {
        token_id: format!("tok_{name}"),
        name: name.into(),
        role,
        customer: customer.map(Into::into),
    }
}

fn operator() -> Caller {
    caller("alice@vendor", Role::Operator, None)
}

fn approver(customer: &str) -> Caller {
    caller(&format!("ana@{customer}"), Role::Approver, Some(customer))
}

fn kubectl(command: &str) -> OpRequest {
    OpRequest {
        phase: endpoint_types::phase::operate(),
        tool: OpTool::Kubectl,
        app: "shop".into(),
        customer: "acme".into(),
        origin_resource_id: CLUSTER.into(),
        command: command.into(),
        timeout_s: None,
    }
}

/// An op's end as an agent reports it.
fn finished(op_id: &str, exit_code: Option<i64>) -> OpFinished {
    OpFinished {
        op_id: op_id.into(),
        held: false,
        exit_code,
        truncated: false,
        timed_out: false,
        error: None,
        preview: false,
        destroyed: false,
    }
}

fn output(op_id: &str, stream: OutputStream, data: &str) -> ToGateway {
    ToGateway::OpOutput {
        op_id: op_id.into(),
        stream,
        data: data.into(),
        preview: false,
    }
}

/// The service with every port a fake: appliances of acme and globex, acme's agent connected
/// with a cluster and a database, a live operate grant, and the policy given.
struct World {
    ops: Ops,
    store: Arc<MemoryOpStore>,
    audit: Arc<MemoryAudit>,
    clock: Arc<FakeClock>,
    agents: Arc<RecordingAgents>,
    notifier: Arc<RecordingNotifier>,
    grants: Arc<FakeGrants>,
}

impl World {
    fn new(policy: PolicySummary) -> World {
        let store = Arc::new(MemoryOpStore::default());
        store.add_appliance(appliance(ACME, "acme"));
        store.add_appliance(appliance(GLOBEX, "globex"));
        let audit = Arc::new(MemoryAudit::default());
        let clock = Arc::new(FakeClock::at(t0()));
        let agents = Arc::new(RecordingAgents::default());
        agents.connect(ACME, agent_view());
        let notifier = Arc::new(RecordingNotifier::default());
        let grants = Arc::new(FakeGrants {
            grant: Mutex::new(Some(operate_grant("gr_1", ACME))),
            policy: Mutex::new(policy),
            asked_at: Mutex::new(Vec::new()),
        });
        let ops = Ops::new(
            store.clone(),
            audit.clone(),
            clock.clone(),
            agents.clone(),
            notifier.clone(),
            grants.clone(),
        );
        World {
            ops,
            store,
            audit,
            clock,
            agents,
            notifier,
            grants,
        }
    }

    fn automatic() -> World {
        World::new(policy(ApprovalMode::Automatic))
    }

    fn manual() -> World {
        World::new(policy(ApprovalMode::Manual))
    }

    async fn create(&self) -> OpRecord {
        self.ops
            .create(&operator(), kubectl("kubectl get pods -n shop"))
            .await
            .unwrap()
    }

    fn op(&self, id: &str) -> OpRow {
        self.store.op(id).unwrap()
    }

    fn state(&self, id: &str) -> OpState {
        self.op(id).state
    }

    /// Frames sent to acme's agent.
    fn sent(&self) -> Vec<ToAgent> {
        self.agents.sent_to(ACME)
    }

    fn notified(&self) -> Vec<(String, String, String)> {
        self.notifier.0.lock().unwrap().clone()
    }

    fn kinds(&self) -> Vec<String> {
        self.audit.kinds()
    }

    /// Puts an op in `state` for acme's agent, as if it got there through the machine.
    fn seed(&self, id: &str, state: OpState) -> OpRow {
        let approved = state != OpState::PendingApproval;
        let row = OpRow {
            phase: endpoint_types::phase::operate(),
            id: id.into(),
            appliance_id: ACME.into(),
            tool: OpTool::Kubectl,
            command: "kubectl get pods".into(),
            origin_resource_id: CLUSTER.into(),
            timeout: Duration::from_secs(300),
            state,
            requested_by: "alice@vendor".into(),
            requested_at: t0() - minutes(1),
            grant_id: Some("gr_1".into()),
            command_approved_by: approved.then(|| "ana@acme".into()),
            command_approved_at: approved.then(|| t0() - minutes(1)),
            output_approved_by: None,
            output_approved_at: None,
            started_at: None,
            finished_at: None,
            exit_code: None,
            stdout: None,
            stderr: None,
            truncated: false,
            error: None,
            message: None,
            requested_by_id: None,
        };
        self.store.put_op(row.clone());
        row
    }

    /// Runs acme's agent's frames through the service, in order.
    async fn agent_says(&self, frames: impl IntoIterator<Item = ToGateway>) {
        for f in frames {
            self.ops.on_agent_frame(ACME, f).await;
        }
    }
}
