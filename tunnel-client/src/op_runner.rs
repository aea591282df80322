//! One-off ops as the gateway dispatches them: the agent's own checks, the run, the output
//! (streamed, or held in the appliance until the customer releases or destroys it), and the
//! customer's trail.
//!
//! The agent is the customer's enforcement point: whatever the gateway says it approved, an op
//! runs only under a live `operate` grant (by this appliance's clock), against a resource
//! `agent.toml` declares, when the customer's own policy allows it now, and with the executable
//! the customer's `[tools]` names. Output leaves without a person's approval only when neither
//! the dispatch nor the appliance's policy wants one.
//!
//! [`authorize`] is the decision, a pure function of the dispatch, what the agent knows and
//! `now`; [`OpRunner`] is the thin shell around it: one task per op, frames out through the
//! control loop's outbox, and the in-memory store of held output (lost with the process: a
//! fetch after a restart is `NOT_FOUND`).
//!
//! Output frames carry at most [`MAX_OUTPUT_FRAME_DATA`] bytes of JSON-escaped text each, so
//! any frame stays far below the 1 MiB frame limit whatever the bytes are. Output is sent as
//! lossy UTF-8; a multi-byte character split across two reads is kept whole.

pub use crate::op_output::{split_for_frames, Utf8Stream};
use crate::{
    audit::{AuditLog, Entry},
    config::AgentConfig,
    grants::LiveEndpoints,
    op_ledger::{OpLedger, Remembered},
    op_output::Forwarder,
    op_sandbox::{Confinement, OpDir},
    ops::{self, OpOutcome, OpSpec, Stream},
};
use bytes::Bytes;
use endpoint_types::{
    control::{GrantLevel, OpTool},
    frame::{LiveGrant, OpDispatch, ToGateway},
    lifecycle::OpEvent,
    policy::{Decision, Policy, PolicyError},
    resource::{ApprovalMode, ResourceKind},
    ApiError, ErrorCode,
};
use jiff::Timestamp;
use serde_json::json;
use std::{
    collections::{HashMap, HashSet},
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// JSON-escaped text per `OpOutput` frame (the frame limit is 1 MiB).
pub const MAX_OUTPUT_FRAME_DATA: usize = 256 * 1024;
/// The longest op id the agent accepts (ids are echoed in every frame about the op).
pub const MAX_OP_ID_LEN: usize = 128;
/// The op timeout range the agent accepts (DESIGN: 1 s–24 h).
pub const TIMEOUT_RANGE_S: std::ops::RangeInclusive<u64> = 1..=24 * 3600;
/// How many op ids (to refuse a replayed dispatch) and grants (to tell an expired grant from
/// an unknown one) are remembered.
const REMEMBERED: usize = 4096;
/// Chunks between the executor and the frame writer of one op.
const CHUNK_QUEUE: usize = 16;

/// Frames from ops to the connection's control stream.
pub type Outbox = mpsc::Sender<ToGateway>;

/// What the agent's own checks concluded for a dispatch.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub argv: Vec<String>,
    pub exe: PathBuf,
    /// Output stays in the appliance until released.
    pub hold: bool,
    /// The policy's verdict at dispatch (a person's approval was needed when `NeedsPerson`).
    pub decision: Decision,
    /// An ssh op: the remote command the agent's own SSH client runs (`exe` is then empty:
    /// no local program runs).
    pub remote_command: Option<String>,
}

/// A refused dispatch. `denial`: a permission refusal (grant, resource, policy, scope),
/// recorded in the trail as `denied` as well as `op.refused`.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub error: ApiError,
    pub denial: bool,
}

impl Refusal {
    fn denied(error: ApiError) -> Refusal {
        Refusal {
            error,
            denial: true,
        }
    }

    fn invalid(error: ApiError) -> Refusal {
        Refusal {
            error,
            denial: false,
        }
    }
}

/// What [`authorize`] looks at besides the dispatch and the clock.
pub struct Checks<'a> {
    pub config: &'a AgentConfig,
    pub policy: &'a Policy,
    /// `LiveEndpoints::operate_grant_live(grant_id, now)`: the authority on the grant.
    pub grant_live: bool,
    /// The grant as last announced, if ever: only picks the error code and message.
    pub grant_seen: Option<&'a LiveGrant>,
    /// The agent's `PATH`, for tools `[tools]` does not name.
    pub path_env: Option<&'a OsStr>,
    /// The `postern access request …` command to suggest when the grant is missing.
    pub access_hint: &'a str,
}

/// A person approved the command (not `policy:automatic` / `policy:window`, not nobody).
pub fn approved_by_person(approved_by: &str) -> bool {
    let who = approved_by.trim();
    !who.is_empty() && !who.starts_with("policy:")
}

fn mode_name(mode: ApprovalMode) -> &'static str {
    match mode {
        ApprovalMode::Automatic => "automatic",
        ApprovalMode::Manual => "manual",
        ApprovalMode::Windows => "windows",
        ApprovalMode::AlwaysRequire => "always-require",
    }
}

/// The agent's decision on a dispatch, in order: op id, grant, resource, policy, timeout,
/// command, tool. The first failing check is the refusal.
pub fn authorize(d: &OpDispatch, c: &Checks<'_>, now: Timestamp) -> Result<Authorized, Refusal> {
    if d.op_id.is_empty() || d.op_id.len() > MAX_OP_ID_LEN || d.op_id.chars().any(char::is_control)
    {
        return Err(Refusal::invalid(ApiError::invalid(format!(
            "the op id must be 1 to {MAX_OP_ID_LEN} printable characters"
        ))));
    }
    if !c.grant_live {
        let id = &d.grant_id;
        let (code, message) = match c.grant_seen {
            Some(g) if g.level != GrantLevel::Operate && d.phase == GrantLevel::Operate => (
                ErrorCode::OperateAccessRequired,
                format!("grant {id} is a {} grant; only an operate grant authorises an op", g.level.as_str()),
            ),
            Some(g) if g.level != d.phase => (
                ErrorCode::OperateAccessRequired,
                format!("grant {id} is a {} grant; only a {} grant authorises a {} op", g.level.as_str(), d.phase.as_str(), d.phase.as_str()),
            ),
            Some(g) if now >= g.expires_at => (
                ErrorCode::OperateAccessExpired,
                format!("operate grant {id} expired at {} by this appliance's clock", g.expires_at),
            ),
            Some(g) if now < g.approved_at => (
                ErrorCode::OperateAccessRequired,
                format!("operate grant {id} is not in force yet by this appliance's clock (approved at {})", g.approved_at),
            ),
            Some(_) => (
                ErrorCode::OperateAccessExpired,
                format!("operate grant {id} is no longer among this appliance's live grants (revoked)"),
            ),
            None => (ErrorCode::OperateAccessRequired, format!("this appliance holds no operate grant {id}")),
        };
        return Err(Refusal::denied(
            ApiError::new(code, message)
                .hint(c.access_hint.to_string())
                .details(json!({ "grant_id": id })),
        ));
    }
    let Some(resource) = c.config.resource(&d.resource_id) else {
        return Err(Refusal::denied(
            ApiError::new(
                ErrorCode::InvalidOriginResourceId,
                format!("resource {:?} is not declared in this appliance's agent.toml", d.resource_id),
            )
            .hint("the customer declares resources as [[resource]] entries in agent.toml; `postern appliance list` shows the appliance"),
        ));
    };
    let resource = &crate::phases::for_phase(resource, d.phase).map_err(Refusal::denied)?;
    if let Some((message, hint)) = resource
        .kind
        .op_tool_mismatch(d.tool.as_str(), &resource.id)
    {
        return Err(Refusal::denied(
            ApiError::new(ErrorCode::InvalidOriginResourceId, message)
                .hint(hint)
                .details(json!({
                    "origin_resource_id": resource.id,
                    "kind": resource.kind,
                    "tool": d.tool.as_str(),
                    "tools": resource.kind.op_tools(),
                })),
        ));
    }
    if endpoint_types::phase::always_needs_person(d.phase)
        && !approved_by_person(&d.command_approved_by)
    {
        return Err(Refusal::denied(
            ApiError::new(
                ErrorCode::ApprovalDenied,
                format!(
                    "an {} op is approved by a person for each use, whatever the policy; this command was approved by {:?}",
                    d.phase.as_str(),
                    d.command_approved_by
                ),
            )
            .hint(format!("an approver runs `postern approvals approve {}`", d.op_id))
            .details(json!({ "phase": d.phase.as_str(), "command_approved_by": d.command_approved_by })),
        ));
    }
    let decision = c.policy.evaluate(now);
    if !decision.is_auto() && !approved_by_person(&d.command_approved_by) {
        let mode = c.policy.approval();
        let when = match mode {
            ApprovalMode::Windows => "outside its approval windows",
            ApprovalMode::AlwaysRequire => "for every command (always-require)",
            _ => "for every command (manual)",
        };
        let next_window = c.policy.next_open(now).map(|t| t.to_string());
        return Err(Refusal::denied(
            ApiError::new(
                ErrorCode::ApprovalDenied,
                format!(
                    "the appliance's policy ({}) requires a person's approval {when}; this command was approved by {:?}",
                    mode_name(mode),
                    d.command_approved_by
                ),
            )
            .hint(format!("an approver runs `postern approvals approve {}`", d.op_id))
            .details(json!({
                "policy": mode_name(mode),
                "command_approved_by": d.command_approved_by,
                "next_window": next_window,
            })),
        ));
    }
    if !TIMEOUT_RANGE_S.contains(&d.timeout_s) {
        return Err(Refusal::invalid(
            ApiError::invalid(format!("a timeout of {}s is outside 1s–24h", d.timeout_s))
                .hint("give --timeout between 1s and 24h (default 5m)"),
        ));
    }
    let argv = ops::parse_command(d.tool, &d.command).map_err(|e| {
        let denial = matches!(
            e,
            ops::OpError::Command(endpoint_types::op_command::CommandError::WrongTool { .. })
        );
        Refusal {
            error: e.to_api_error(),
            denial,
        }
    })?;
    // What each tool may say beyond "no shell": psql only SQL against the agent's connection,
    // ssh only a remote command through the agent's own client.
    let (argv, remote_command) = match d.tool {
        OpTool::Psql => (
            crate::op_psql::check(&argv).map_err(|e| Refusal::denied(e.to_api_error()))?,
            None,
        ),
        OpTool::Ssh => {
            let remote = crate::op_ssh::remote_command(&argv)
                .map_err(|e| Refusal::denied(e.to_api_error()))?;
            (argv, Some(remote))
        }
        _ => (argv, None),
    };
    let exe = match d.tool {
        OpTool::Ssh => PathBuf::new(),
        tool => ops::resolve_tool(tool, &c.config.tools, c.path_env)
            .map_err(|e| Refusal::invalid(e.to_api_error()))?,
    };
    Ok(Authorized {
        argv,
        exe,
        hold: d.hold_output || c.policy.needs_output_approval(now),
        decision,
        remote_command,
    })
}

/// A running op, for cancelling it when its grant ends.
struct Running {
    grant_id: String,
    cancel: CancellationToken,
}

struct State {
    held: HashMap<String, Held>,
    running: HashMap<String, Running>,
    /// Every op this process admitted, in its state: a replay is refused, and every move of
    /// an op goes through the op state machine.
    ops: OpLedger,
    /// Every grant announced, to name why an op's grant is not live.
    grants: Remembered<LiveGrant>,
    /// (app, customer) from the last hello, for hints.
    gateway: Option<(String, String)>,
}

impl Default for State {
    fn default() -> Self {
        State {
            held: HashMap::new(),
            running: HashMap::new(),
            ops: OpLedger::new(REMEMBERED),
            grants: Remembered::new(REMEMBERED),
            gateway: None,
        }
    }
}

struct Inner {
    config: Arc<AgentConfig>,
    /// `[policy]` and its `[policy.<phase>]` tables: a dispatch is checked by its phase's.
    policies: crate::policy_phases::PhasePolicies,
    live: Arc<Mutex<LiveEndpoints>>,
    audit: AuditLog,
    path_env: Option<OsString>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    state: Mutex<State>,
    /// Who op tools run as and how their processes are ended.
    confinement: Confinement,
    /// The customer's approvers: a person's approval is taken only as one of them signed it.
    approvals: crate::approval_check::SignedApprovals,
    /// The agent's clusters, which `kubectl` ops reach through a proxy of their own.
    kube: crate::kube::Clusters,
}

/// Runs dispatched ops and keeps held output; cheap to clone, shared by all connections.
#[derive(Clone)]
pub struct OpRunner {
    inner: Arc<Inner>,
}

impl OpRunner {
    /// `shutdown` stops running ops (their process groups are killed); their tasks run on
    /// `tracker`.
    pub fn new(
        config: Arc<AgentConfig>,
        live: Arc<Mutex<LiveEndpoints>>,
        audit: AuditLog,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<OpRunner, PolicyError> {
        OpRunner::new_confined(
            config,
            live,
            audit,
            shutdown,
            tracker,
            Confinement::default(),
            Default::default(),
        )
    }

    /// [`OpRunner::new`] with op tools confined as `confinement` says (`Confinement::detect`),
    /// reaching the agent's `kube` clusters (the ones its sessions use).
    pub fn new_confined(
        config: Arc<AgentConfig>,
        live: Arc<Mutex<LiveEndpoints>>,
        audit: AuditLog,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        confinement: Confinement,
        kube: crate::kube::Clusters,
    ) -> Result<OpRunner, PolicyError> {
        let policies = crate::policy_phases::PhasePolicies::parse(&config.policy_summary())?;
        let inner = Inner {
            approvals: crate::approval_check::SignedApprovals::from_config(
                &config,
                Timestamp::now(),
            ),
            confinement,
            kube,
            config,
            policies,
            live,
            audit,
            path_env: std::env::var_os("PATH"),
            shutdown,
            tracker,
            state: Mutex::new(State::default()),
        };
        Ok(OpRunner {
            inner: Arc::new(inner),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection's hello was accepted. Held output outlives connections, so the gateway is
    /// told again which ops have output waiting (an `OpFinished { held: true }` each): one
    /// that finished while no connection was up is not left waiting for ever.
    pub fn connected(&self, app: &str, customer: &str, out: &Outbox) {
        let waiting: Vec<ToGateway> = {
            let mut state = self.state();
            state.gateway = Some((app.to_string(), customer.to_string()));
            state.held.keys().map(|id| held_notice(id)).collect()
        };
        if !waiting.is_empty() {
            self.send_all(waiting, out.clone());
        }
    }

    /// The customer's approvers and the statements used, shared with the check of grants and
    /// endpoints (crate::record_approval).
    pub fn signed_approvals(&self) -> &crate::approval_check::SignedApprovals {
        &self.inner.approvals
    }

    /// The gateway announced the appliance's grant set. Ops running under a grant that is no
    /// longer live are stopped.
    pub fn grants_synced(&self, grants: &[LiveGrant], now: Timestamp) {
        let mut state = self.state();
        for g in grants {
            state.grants.insert(g.grant_id.clone(), g.clone());
        }
        let live: HashSet<&str> = grants
            .iter()
            .filter(|g| crate::grants::grant_in_force_for(g, g.level, now))
            .map(|g| g.grant_id.as_str())
            .collect();
        for (op_id, r) in &state.running {
            if !live.contains(r.grant_id.as_str()) && !r.cancel.is_cancelled() {
                tracing::info!(op = %op_id, grant = %r.grant_id, "stopping an op whose operate grant is no longer live");
                r.cancel.cancel();
            }
        }
    }

    /// How many ops have output held in the appliance.
    pub fn held_count(&self) -> usize {
        self.state().held.len()
    }

    /// Checks and runs one dispatched op on its own task.
    pub fn dispatch(&self, d: OpDispatch, out: Outbox) {
        let this = self.clone();
        self.inner
            .tracker
            .spawn(async move { this.run_op(d, out).await });
    }

    /// An admitted op that ends before it runs (its directory, role, proxy or credentials
    /// could not be made): failed, or denied when the refusal is a permission one.
    fn abandon(&self, op_id: &str, denial: bool) {
        let event = if denial {
            OpEvent::AgentDenied
        } else {
            OpEvent::AgentRefused
        };
        if let Err(e) = self.state().ops.apply(op_id, &event) {
            tracing::error!(op = %op_id, error = ?e, "an op the state machine does not let end before it ran");
        }
    }

    fn send_all(&self, frames: Vec<ToGateway>, out: Outbox) {
        self.inner.tracker.spawn(async move {
            for frame in frames {
                if out.send(frame).await.is_err() {
                    return;
                }
            }
        });
    }

    fn record(&self, entry: Entry) {
        self.inner.audit.record_or_log(entry);
    }

    fn access_hint(&self) -> String {
        let (app, customer) = self
            .state()
            .gateway
            .clone()
            .unwrap_or_else(|| ("A".into(), "C".into()));
        format!("request operate access: postern access request --app {app} --customer {customer} --level operate --duration 30m --reason \"…\"")
    }

    /// Runs the authorized op: an ssh op through the agent's own SSH client, any other tool as
    /// a confined local process.
    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &self,
        d: &OpDispatch,
        auth: &Authorized,
        spec: &OpSpec,
        env: &[(&str, &OsStr)],
        cwd: &Path,
        cancel: &CancellationToken,
        tx: Option<mpsc::Sender<(Stream, Bytes)>>,
    ) -> Result<OpOutcome, ApiError> {
        if let Some(remote) = &auth.remote_command {
            let Some(resource) = self.inner.config.resource(&d.resource_id) else {
                return Err(ApiError::internal(
                    "the op's resource vanished from the agent's config",
                ));
            };
            let resource = &crate::phases::for_phase(resource, d.phase)?;
            return crate::op_ssh::run(spec, resource, remote, cancel, tx)
                .await
                .map_err(|e| e.to_api_error());
        }
        ops::run_confined(
            spec,
            &auth.exe,
            &auth.argv,
            env,
            cwd,
            &self.inner.confinement,
            cancel,
            tx,
        )
        .await
        .map_err(|e| e.to_api_error())
    }

    async fn refuse(&self, d: &OpDispatch, r: Refusal, out: &Outbox) {
        let e = &r.error;
        tracing::info!(op = %d.op_id, code = %e.code, "refused an op: {}", e.message);
        if r.denial {
            self.record(
                Entry::new(
                    "denied",
                    d.operator.clone(),
                    json!({ "reason": e.code.as_str(), "message": e.message }),
                )
                .op(d.op_id.clone()),
            );
        }
        self.record(
            Entry::new(
                "op.refused",
                d.operator.clone(),
                json!({ "code": e.code.as_str(), "reason": e.message }),
            )
            .op(d.op_id.clone()),
        );
        let op_id: String = d.op_id.chars().take(MAX_OP_ID_LEN).collect();
        let _ = out
            .send(ToGateway::OpRefused {
                op_id,
                error: r.error,
            })
            .await;
    }

    /// A command the appliance's policy reserved for a person runs only with a decision one of
    /// the customer's approvers signed for exactly it (when `agent.toml` lists approvers); a
    /// refusal is `denied` in the trail and `APPROVAL_INVALID` for the operator.
    async fn approval_verified(
        &self,
        d: &OpDispatch,
        auth: &Authorized,
        now: Timestamp,
        out: &Outbox,
    ) -> bool {
        use crate::approval_check::{denied_entry, verified_entry};
        let signed = d.signed_decision.as_ref();
        match self
            .inner
            .approvals
            .check_op(d, !auth.decision.is_auto(), now)
        {
            Ok(verified) => {
                if let (Some(v), Some(s)) = (verified, signed) {
                    self.record(verified_entry(&d.operator, "command", &v, s).op(d.op_id.clone()));
                }
                true
            }
            Err(why) => {
                self.record(denied_entry(&d.operator, "command", signed, &why).op(d.op_id.clone()));
                self.refuse(d, Refusal::invalid(why.to_api_error()), out)
                    .await;
                false
            }
        }
    }

    async fn run_op(self, d: OpDispatch, out: Outbox) {
        let now = Timestamp::now();
        let dispatched = Entry::new(
            "op.dispatched",
            d.operator.clone(),
            json!({
                "command": d.command,
                "tool": d.tool.as_str(),
                "resource_id": d.resource_id,
                "grant_id": d.grant_id,
                "command_approved_by": d.command_approved_by,
                "command_approved_at": d.command_approved_at.to_string(),
                "hold_output": d.hold_output,
                "timeout_s": d.timeout_s,
            }),
        )
        .op(d.op_id.clone());
        if let Err(e) = self.inner.audit.write(dispatched).await {
            // No trail, no op: the customer must be able to see everything that ran.
            tracing::error!(error = %e, "cannot write the customer's audit trail; refusing the op");
            let error = crate::sessions::trail_refusal();
            let _ = out
                .send(ToGateway::OpRefused {
                    op_id: d.op_id.clone(),
                    error,
                })
                .await;
            return;
        }
        let access_hint = self.access_hint();
        let grant_seen = self.state().grants.map.get(&d.grant_id).cloned();
        let grant_live = self
            .inner
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .grant_live_for(Some(&d.grant_id), d.phase, now);
        let checks = Checks {
            config: &self.inner.config,
            policy: self.inner.policies.of(d.phase),
            grant_live,
            grant_seen: grant_seen.as_ref(),
            path_env: self.inner.path_env.as_deref(),
            access_hint: &access_hint,
        };
        let ruling = self.inner.policies.ruling(d.phase, now);
        let auth = match authorize(&d, &checks, now) {
            Ok(a) => a,
            Err(r) => {
                self.refuse(&d, r, &out).await;
                return;
            }
        };
        if !self.approval_verified(&d, &auth, now, &out).await {
            return;
        }
        // A refused dispatch may come again (say, once a person approved it); one that ran may not.
        if !self.state().ops.admit(&d.op_id) {
            let e = ApiError::new(
                ErrorCode::Conflict,
                format!("op {} already ran in this appliance", d.op_id),
            )
            .hint("each approval is used once; request the op again to run it again");
            self.refuse(&d, Refusal::denied(e), &out).await;
            return;
        }
        let dir = match OpDir::create(&d.op_id, self.inner.confinement.user.as_ref()) {
            Ok(dir) => dir,
            Err(e) => {
                tracing::error!(op = %d.op_id, error = %e, "cannot create the op's working directory");
                let e = ApiError::new(
                    ErrorCode::Internal,
                    "the appliance cannot create a working directory for the op",
                )
                .hint(
                    "check the agent's temporary directory (TMPDIR); the agent's log has the cause",
                );
                self.abandon(&d.op_id, false);
                self.refuse(&d, Refusal::invalid(e), &out).await;
                return;
            }
        };

        // `psql` against a postgres resource runs as a role made for this op alone, scoped
        // like an endpoint's role and dropped when the op ends.
        let resource = self
            .inner
            .config
            .resource(&d.resource_id)
            .and_then(|r| crate::phases::for_phase(r, d.phase).ok());
        let op_role = match resource
            .filter(|r| d.tool == OpTool::Psql && r.kind == ResourceKind::Postgres)
        {
            None => None,
            Some(r) => {
                let until = now
                    + jiff::SignedDuration::from_secs(
                        d.timeout_s.saturating_add(60).min(i64::MAX as u64) as i64,
                    );
                match crate::postgres::op_role(&r, &d.op_id, until, dir.path()).await {
                    Ok(role) => Some(role),
                    Err(e) => {
                        tracing::warn!(op = %d.op_id, error = %e, "cannot create the op's postgres role");
                        let e = ApiError::new(
                            ErrorCode::TargetUnreachable,
                            "the appliance cannot prepare a database role for the op",
                        )
                        .hint("the database may be down; the appliance's agent log has the cause");
                        self.abandon(&d.op_id, false);
                        self.refuse(&d, Refusal::invalid(e), &out).await;
                        return;
                    }
                }
            }
        };

        // `kubectl` against a kubernetes resource reaches the cluster only through a proxy made
        // for this op (the resource's scope and impersonation; a credential that dies with it).
        let kube = self
            .inner
            .config
            .resource(&d.resource_id)
            .and_then(|r| crate::phases::for_phase(r, d.phase).ok())
            .filter(|r| d.tool == OpTool::Kubectl && r.kind == ResourceKind::Kubernetes);
        let op_kube = match kube {
            None => None,
            Some(r) => {
                let sink = crate::kube::op_proxy::records(
                    self.inner.audit.clone(),
                    out.clone(),
                    &d.op_id,
                    &d.operator,
                );
                match crate::kube::op_proxy::start(
                    &self.inner.kube,
                    &r,
                    &auth.argv,
                    dir.path(),
                    sink,
                )
                .await
                {
                    Ok(k) => Some(k),
                    Err(e) => {
                        self.abandon(&d.op_id, e.is_denial());
                        self.refuse(
                            &d,
                            Refusal {
                                error: e.to_api_error(),
                                denial: e.is_denial(),
                            },
                            &out,
                        )
                        .await;
                        return;
                    }
                }
            }
        };

        let cancel = self.inner.shutdown.child_token();
        self.state().running.insert(
            d.op_id.clone(),
            Running {
                grant_id: d.grant_id.clone(),
                cancel: cancel.clone(),
            },
        );
        // Stop the op when its grant expires by our clock (revocation arrives as a grant sync).
        let grant_end = grant_seen.as_ref().map(|g| g.expires_at);
        let watch_done = CancellationToken::new();
        if let Some(end) = grant_end {
            let (cancel, done) = (cancel.clone(), watch_done.clone());
            self.inner.tracker.spawn(async move {
                let wait = Duration::try_from(end.duration_since(Timestamp::now()))
                    .unwrap_or(Duration::ZERO);
                tokio::select! {
                    () = tokio::time::sleep(wait) => cancel.cancel(),
                    () = done.cancelled() => {}
                }
            });
        }

        let spec = OpSpec {
            op_id: d.op_id.clone(),
            tool: d.tool,
            command: d.command.clone(),
            timeout: Duration::from_secs(d.timeout_s),
            output_cap: ops::DEFAULT_OUTPUT_CAP,
        };
        let mut env: Vec<(&str, &OsStr)> = vec![
            ("POSTERN_OP_ID", OsStr::new(&d.op_id)),
            ("POSTERN_RESOURCE_ID", OsStr::new(&d.resource_id)),
        ];
        if let Some(k) = &op_kube {
            env.push(("KUBECONFIG", k.kubeconfig.as_os_str()));
        }
        if let Some(role) = &op_role {
            env.extend(role.env.iter().map(|(k, v)| (*k, v.as_os_str())));
        }
        let credentials = match self.credentials(&d, &dir) {
            Ok(c) => c,
            Err(e) => {
                self.state().running.remove(&d.op_id);
                watch_done.cancel();
                if let Some(role) = op_role {
                    role.drop_role().await;
                }
                self.abandon(&d.op_id, false);
                self.refuse(&d, Refusal::invalid(e), &out).await;
                return;
            }
        };
        env.extend(credentials.iter().map(|(k, v)| (*k, v.as_os_str())));
        self.record(
            Entry::new(
                "op.started",
                d.operator.clone(),
                json!({
                    "executable": if auth.remote_command.is_some() { json!("the agent's ssh client") } else { json!(auth.exe) },
                    "remote_command": auth.remote_command,
                    "run_as": self.inner.confinement.user.as_ref().map(|u| u.name.as_str()),
                    "cwd": dir.path(),
                    "hold_output": auth.hold,
                    "command_approved_by": d.command_approved_by,
                    // What the appliance's policy said at dispatch; null: a person's approval was needed (and given).
                    "policy_decision": auth.decision.decided_by(),
                    // The phase, its policy table and the rule that decided (or left it to a person).
                    "phase": d.phase.as_str(),
                    "policy_table": ruling.table,
                    "rule": ruling.rule(),
                }),
            )
            .op(d.op_id.clone()),
        );
        if let Err(e) = self.state().ops.apply(&d.op_id, &OpEvent::Started) {
            tracing::error!(op = %d.op_id, error = ?e, "an op the state machine does not let start");
        }
        let _ = out
            .send(ToGateway::OpStarted {
                op_id: d.op_id.clone(),
            })
            .await;
        tracing::info!(op = %d.op_id, tool = d.tool.as_str(), resource = %d.resource_id, held = auth.hold, "op started");

        let mut fwd = Forwarder::new(&d.op_id, out.clone());
        let result = if auth.hold {
            self.execute(&d, &auth, &spec, &env, dir.path(), &cancel, None)
                .await
        } else {
            let (tx, mut rx) = mpsc::channel::<(Stream, Bytes)>(CHUNK_QUEUE);
            let run = self.execute(&d, &auth, &spec, &env, dir.path(), &cancel, Some(tx));
            let forward = async {
                while let Some((stream, bytes)) = rx.recv().await {
                    fwd.push(stream, &bytes).await;
                }
            };
            tokio::join!(run, forward).0
        };
        watch_done.cancel();
        self.state().running.remove(&d.op_id);
        drop(op_kube);
        drop(dir);
        if let Some(role) = op_role {
            role.drop_role().await;
        }

        self.report(&d, &auth, spec, result, fwd, &out).await;
    }
}

#[path = "op_report.rs"]
mod report;
use report::{held_notice, Held};
#[path = "op_held.rs"]
mod held;

#[cfg(test)]
#[path = "op_runner_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "op_runner_output_tests.rs"]
mod output_tests;
