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

use crate::{
    audit::{AuditLog, Entry},
    config::AgentConfig,
    grants::LiveEndpoints,
    ops::{self, OpOutcome, OpSpec, Stream},
};
use bytes::Bytes;
use endpoint_types::{
    control::{GrantLevel, OpTool},
    frame::{Frame, LiveGrant, OpDispatch, OpFinished, OutputStream},
    policy::{Decision, Policy, PolicyError},
    resource::{ApprovalMode, ResourceKind},
    ApiError, ErrorCode,
};
use jiff::Timestamp;
use serde_json::json;
use std::{
    collections::{HashMap, HashSet, VecDeque},
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
pub type Outbox = mpsc::Sender<Frame>;

/// What the agent's own checks concluded for a dispatch.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub argv: Vec<String>,
    pub exe: PathBuf,
    /// Output stays in the appliance until released.
    pub hold: bool,
    /// The policy's verdict at dispatch (a person's approval was needed when `NeedsPerson`).
    pub decision: Decision,
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
            Some(g) if g.level != GrantLevel::Operate => (
                ErrorCode::OperateAccessRequired,
                format!("grant {id} is a {} grant; only an operate grant authorises an op", g.level.as_str()),
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
    let Some(_resource) = c.config.resource(&d.resource_id) else {
        return Err(Refusal::denied(
            ApiError::new(
                ErrorCode::InvalidOriginResourceId,
                format!("resource {:?} is not declared in this appliance's agent.toml", d.resource_id),
            )
            .hint("the customer declares resources as [[resource]] entries in agent.toml; `postern appliance list` shows the appliance"),
        ));
    };
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
        let denial = matches!(e, ops::OpError::WrongTool { .. });
        Refusal {
            error: e.to_api_error(),
            denial,
        }
    })?;
    let exe = ops::resolve_tool(d.tool, &c.config.tools, c.path_env)
        .map_err(|e| Refusal::invalid(e.to_api_error()))?;
    Ok(Authorized {
        argv,
        exe,
        hold: d.hold_output || c.policy.needs_output_approval(now),
        decision,
    })
}

/// Lossy UTF-8 decoding of a byte stream that arrives in pieces: a character split between
/// two pieces is decoded whole; invalid bytes become U+FFFD as in `String::from_utf8_lossy`.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Decodes what can be decoded; keeps an incomplete trailing sequence for the next call.
    pub fn push(&mut self, input: &[u8]) -> String {
        self.pending.extend_from_slice(input);
        let mut out = String::with_capacity(self.pending.len());
        let mut at = 0;
        while at < self.pending.len() {
            match std::str::from_utf8(&self.pending[at..]) {
                Ok(s) => {
                    out.push_str(s);
                    at = self.pending.len();
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[at..at + valid]));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            at += valid + bad;
                        }
                        None => {
                            at += valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..at);
        out
    }

    /// The end of the stream: whatever is left, lossily.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

/// How many bytes `c` takes in a JSON string (serde_json's escaping).
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{08}' | '\u{0c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// Splits `text` at character boundaries into pieces of at most `budget` JSON-escaped bytes.
pub fn split_for_frames(text: &str, budget: usize) -> Vec<&str> {
    let budget = budget.max(6);
    let mut pieces = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, c) in text.char_indices() {
        let n = json_len(c);
        if size + n > budget {
            pieces.push(&text[start..i]);
            start = i;
            size = 0;
        }
        size += n;
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

fn output_stream(s: Stream) -> OutputStream {
    match s {
        Stream::Stdout => OutputStream::Stdout,
        Stream::Stderr => OutputStream::Stderr,
    }
}

fn output_frames<'a>(
    op_id: &str,
    stream: Stream,
    text: &'a str,
    preview: bool,
) -> impl Iterator<Item = Frame> + 'a {
    let op_id = op_id.to_string();
    split_for_frames(text, MAX_OUTPUT_FRAME_DATA)
        .into_iter()
        .map(move |data| Frame::OpOutput {
            op_id: op_id.clone(),
            stream: output_stream(stream),
            data: data.to_string(),
            preview,
        })
}

fn not_found(op_id: &str) -> Frame {
    Frame::OpRefused {
        op_id: op_id.to_string(),
        error: ApiError::new(
            ErrorCode::NotFound,
            format!("no held output for op {op_id} in this appliance (released, destroyed, or the agent restarted)"),
        )
        .hint("`postern ops get ID` shows the op's state"),
    }
}

/// A finished op's output kept in the appliance until the customer decides.
struct Held {
    spec: OpSpec,
    outcome: OpOutcome,
}

impl Held {
    fn finished(&self, held: bool, preview: bool) -> Frame {
        debug_assert!(
            !held || preview,
            "a held op's end says nothing outside a preview; see held_notice"
        );
        Frame::OpFinished(OpFinished {
            op_id: self.spec.op_id.clone(),
            held,
            exit_code: self.outcome.exit_code,
            truncated: self.outcome.truncated(),
            timed_out: self.outcome.timed_out,
            error: self.outcome.error(&self.spec, true),
            preview,
            destroyed: false,
        })
    }

    /// The whole output (stdout, then stderr) and the op's end, as frames.
    fn frames(&self, preview: bool, held_after: bool) -> Vec<Frame> {
        let id = &self.spec.op_id;
        let out = String::from_utf8_lossy(&self.outcome.stdout);
        let err = String::from_utf8_lossy(&self.outcome.stderr);
        let mut frames: Vec<Frame> = output_frames(id, Stream::Stdout, &out, preview).collect();
        frames.extend(output_frames(id, Stream::Stderr, &err, preview));
        frames.push(self.finished(held_after, preview));
        frames
    }

    /// Overwrites the output before the memory is freed.
    fn wipe(mut self) {
        for buf in [&mut self.outcome.stdout, &mut self.outcome.stderr] {
            buf.fill(0);
            std::hint::black_box(&buf);
        }
    }
}

/// A bounded map that forgets its oldest entries.
struct Remembered<V> {
    map: HashMap<String, V>,
    order: VecDeque<String>,
}

impl<V> Default for Remembered<V> {
    fn default() -> Self {
        Remembered {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<V> Remembered<V> {
    fn insert(&mut self, key: String, value: V) -> bool {
        let new = self.map.insert(key.clone(), value).is_none();
        if new {
            self.order.push_back(key);
        }
        while self.order.len() > REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        new
    }
}

/// A running op, for cancelling it when its grant ends.
struct Running {
    grant_id: String,
    cancel: CancellationToken,
}

#[derive(Default)]
struct State {
    held: HashMap<String, Held>,
    running: HashMap<String, Running>,
    /// Every op id this process started: a replay is refused.
    dispatched: Remembered<()>,
    /// Every grant announced, to name why an op's grant is not live.
    grants: Remembered<LiveGrant>,
    /// (app, customer) from the last hello, for hints.
    gateway: Option<(String, String)>,
}

struct Inner {
    config: Arc<AgentConfig>,
    policy: Policy,
    live: Arc<Mutex<LiveEndpoints>>,
    audit: AuditLog,
    path_env: Option<OsString>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    state: Mutex<State>,
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
        let policy = Policy::parse(&config.policy_summary())?;
        let inner = Inner {
            config,
            policy,
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
        let waiting: Vec<Frame> = {
            let mut state = self.state();
            state.gateway = Some((app.to_string(), customer.to_string()));
            state.held.keys().map(|id| held_notice(id)).collect()
        };
        if !waiting.is_empty() {
            self.send_all(waiting, out.clone());
        }
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
            .filter(|g| {
                g.level == GrantLevel::Operate && g.approved_at <= now && now < g.expires_at
            })
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

    /// `OutputFetch`: the held output as a preview for an approver; it stays held.
    pub fn fetch(&self, op_id: &str, out: Outbox) {
        let frames = self.state().held.get(op_id).map(|h| h.frames(true, true));
        let Some(frames) = frames else {
            self.send_all(vec![not_found(op_id)], out);
            return;
        };
        self.record(
            Entry::new(
                "output.previewed",
                self.inner.audit.agent_actor(),
                json!({}),
            )
            .op(op_id),
        );
        self.send_all(frames, out);
    }

    /// `OutputRelease`: the customer let the output leave. Sent, then forgotten; kept if the
    /// connection is lost before it is all queued, so a later release can send it again.
    pub fn release(&self, op_id: String, approved_by: String, out: Outbox) {
        let Some(held) = self.state().held.remove(&op_id) else {
            self.send_all(vec![not_found(&op_id)], out);
            return;
        };
        let detail = json!({
            "approved_by": approved_by,
            "stdout_bytes": held.outcome.stdout.len(),
            "stderr_bytes": held.outcome.stderr.len(),
        });
        self.record(Entry::new("output.released", approved_by, detail).op(op_id.clone()));
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            for frame in held.frames(false, false) {
                if out.send(frame).await.is_err() {
                    tracing::warn!(op = %op_id, "connection lost while releasing held output; it stays held");
                    this.state().held.entry(op_id).or_insert(held);
                    return;
                }
            }
            held.wipe();
        });
    }

    /// `OutputDestroy`: the customer denied the output; it is overwritten and dropped.
    pub fn destroy(&self, op_id: String, denied_by: String, message: Option<String>, out: Outbox) {
        let Some(held) = self.state().held.remove(&op_id) else {
            self.send_all(vec![not_found(&op_id)], out);
            return;
        };
        let detail = json!({
            "denied_by": denied_by,
            "message": message,
            "stdout_bytes": held.outcome.stdout.len(),
            "stderr_bytes": held.outcome.stderr.len(),
        });
        held.wipe();
        self.record(Entry::new("output.destroyed", denied_by, detail).op(op_id.clone()));
        let done = Frame::OpFinished(OpFinished {
            op_id,
            held: false,
            exit_code: None,
            truncated: false,
            timed_out: false,
            error: None,
            preview: false,
            destroyed: true,
        });
        self.send_all(vec![done], out);
    }

    fn send_all(&self, frames: Vec<Frame>, out: Outbox) {
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
            .send(Frame::OpRefused {
                op_id,
                error: r.error,
            })
            .await;
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
        if let Err(e) = self.inner.audit.record(dispatched) {
            // No trail, no op: the customer must be able to see everything that ran.
            tracing::error!(error = %e, "cannot write the customer's audit trail; refusing the op");
            let error = ApiError::new(ErrorCode::Internal, "the appliance cannot write its audit trail")
                .hint("the customer must fix audit_path in the appliance; ops run again once it is writable");
            let _ = out
                .send(Frame::OpRefused {
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
            .operate_grant_live(Some(&d.grant_id), now);
        let checks = Checks {
            config: &self.inner.config,
            policy: &self.inner.policy,
            grant_live,
            grant_seen: grant_seen.as_ref(),
            path_env: self.inner.path_env.as_deref(),
            access_hint: &access_hint,
        };
        let auth = match authorize(&d, &checks, now) {
            Ok(a) => a,
            Err(r) => {
                self.refuse(&d, r, &out).await;
                return;
            }
        };
        // A refused dispatch may come again (say, once a person approved it); one that ran may not.
        if !self.state().dispatched.insert(d.op_id.clone(), ()) {
            let e = ApiError::new(
                ErrorCode::Conflict,
                format!("op {} already ran in this appliance", d.op_id),
            )
            .hint("each approval is used once; request the op again to run it again");
            self.refuse(&d, Refusal::denied(e), &out).await;
            return;
        }
        let dir = match OpDir::create(&d.op_id) {
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
                self.refuse(&d, Refusal::invalid(e), &out).await;
                return;
            }
        };

        // `psql` against a postgres resource runs as a role made for this op alone, scoped
        // like an endpoint's role and dropped when the op ends.
        let resource = self.inner.config.resource(&d.resource_id).cloned();
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
                match crate::kube::op_proxy::start(r, &auth.argv, dir.path(), sink).await {
                    Ok(k) => Some(k),
                    Err(e) => {
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
        self.record(
            Entry::new(
                "op.started",
                d.operator.clone(),
                json!({
                    "executable": auth.exe,
                    "cwd": dir.path(),
                    "hold_output": auth.hold,
                    "command_approved_by": d.command_approved_by,
                    // What the appliance's policy said at dispatch; null: a person's approval was needed (and given).
                    "policy_decision": auth.decision.decided_by(),
                }),
            )
            .op(d.op_id.clone()),
        );
        let _ = out
            .send(Frame::OpStarted {
                op_id: d.op_id.clone(),
            })
            .await;
        tracing::info!(op = %d.op_id, tool = d.tool.as_str(), resource = %d.resource_id, held = auth.hold, "op started");

        let mut fwd = Forwarder::new(&d.op_id, out.clone());
        let result = if auth.hold {
            ops::run_streaming(
                &spec,
                &auth.exe,
                &auth.argv,
                &env,
                dir.path(),
                &cancel,
                None,
            )
            .await
        } else {
            let (tx, mut rx) = mpsc::channel::<(Stream, Bytes)>(CHUNK_QUEUE);
            let run = ops::run_streaming(
                &spec,
                &auth.exe,
                &auth.argv,
                &env,
                dir.path(),
                &cancel,
                Some(tx),
            );
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

        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(op = %d.op_id, error = %e, "op did not run");
                let error = e.to_api_error();
                self.record(
                    Entry::new("op.finished", d.operator.clone(), json!({ "held": false, "error": error.code.as_str(), "reason": error.message }))
                        .op(d.op_id.clone()),
                );
                let _ = out.send(finished_frame(&d.op_id, None, Some(error))).await;
                return;
            }
        };
        let cancel_reason = outcome.cancelled.then(|| {
            if self.inner.shutdown.is_cancelled() {
                "agent shutting down"
            } else {
                "operate grant ended"
            }
        });
        let error = outcome.error(&spec, !auth.hold);
        let delivered = if auth.hold {
            true
        } else {
            fwd.finish(&outcome).await;
            fwd.delivered
        };
        let duration_ms = outcome
            .finished_at
            .duration_since(outcome.started_at)
            .as_millis()
            .max(0);
        self.record(
            Entry::new(
                "op.finished",
                d.operator.clone(),
                json!({
                    "exit_code": outcome.exit_code,
                    "signal": outcome.signal,
                    "timed_out": outcome.timed_out,
                    "cancelled": outcome.cancelled,
                    "cancel_reason": cancel_reason,
                    "truncated": outcome.truncated(),
                    "duration_ms": duration_ms as u64,
                    "held": auth.hold,
                    "delivered": delivered,
                    "error": error.as_ref().map(|e| e.code.as_str()),
                    "stdout_bytes": outcome.stdout.len(),
                    "stderr_bytes": outcome.stderr.len(),
                    "stdout_sha256": crate::audit::sha256_hex(&outcome.stdout),
                    "stderr_sha256": crate::audit::sha256_hex(&outcome.stderr),
                }),
            )
            .op(d.op_id.clone()),
        );
        tracing::info!(op = %d.op_id, exit_code = ?outcome.exit_code, timed_out = outcome.timed_out, held = auth.hold, "op finished");
        if auth.hold {
            let held = Held { spec, outcome };
            self.state().held.insert(d.op_id.clone(), held);
            let _ = out.send(held_notice(&d.op_id)).await;
        } else {
            let frame = Frame::OpFinished(OpFinished {
                op_id: d.op_id.clone(),
                held: false,
                exit_code: outcome.exit_code,
                truncated: outcome.truncated(),
                timed_out: outcome.timed_out,
                error,
                preview: false,
                destroyed: false,
            });
            if out.send(frame).await.is_err() {
                tracing::warn!(op = %d.op_id, "the connection the op came on is gone; its result was not delivered (the customer's trail has it)");
            }
        }
    }
}

/// `OpFinished { held: true }`: says nothing about the output, not even the exit code.
fn held_notice(op_id: &str) -> Frame {
    Frame::OpFinished(OpFinished {
        op_id: op_id.to_string(),
        held: true,
        exit_code: None,
        truncated: false,
        timed_out: false,
        error: None,
        preview: false,
        destroyed: false,
    })
}

fn finished_frame(op_id: &str, exit_code: Option<i64>, error: Option<ApiError>) -> Frame {
    Frame::OpFinished(OpFinished {
        op_id: op_id.to_string(),
        held: false,
        exit_code,
        truncated: false,
        timed_out: false,
        error,
        preview: false,
        destroyed: false,
    })
}

/// Streams one op's output as `OpOutput` frames while it runs.
struct Forwarder {
    op_id: String,
    out: Outbox,
    /// Per stream (stdout, stderr): decoder and bytes taken from the executor.
    decoders: [Utf8Stream; 2],
    taken: [usize; 2],
    /// False once a frame could not be queued (the connection is gone).
    delivered: bool,
}

impl Forwarder {
    fn new(op_id: &str, out: Outbox) -> Forwarder {
        Forwarder {
            op_id: op_id.to_string(),
            out,
            decoders: Default::default(),
            taken: [0, 0],
            delivered: true,
        }
    }

    fn index(stream: Stream) -> usize {
        match stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }

    async fn push(&mut self, stream: Stream, bytes: &[u8]) {
        let i = Self::index(stream);
        self.taken[i] += bytes.len();
        let text = self.decoders[i].push(bytes);
        self.emit(stream, &text).await;
    }

    /// After the run: what the executor kept but did not stream (it stops streaming to a
    /// stalled reader once the process is gone), then each decoder's tail.
    async fn finish(&mut self, outcome: &OpOutcome) {
        for (stream, kept) in [
            (Stream::Stdout, &outcome.stdout),
            (Stream::Stderr, &outcome.stderr),
        ] {
            let i = Self::index(stream);
            if let Some(rest) = kept.get(self.taken[i]..).filter(|r| !r.is_empty()) {
                self.push(stream, rest).await;
            }
            let tail = self.decoders[i].finish();
            self.emit(stream, &tail).await;
        }
    }

    async fn emit(&mut self, stream: Stream, text: &str) {
        if !self.delivered || text.is_empty() {
            return;
        }
        for frame in output_frames(&self.op_id, stream, text, false) {
            if self.out.send(frame).await.is_err() {
                self.delivered = false;
                return;
            }
        }
    }
}

/// The op's working directory: private, fresh, under the system temp dir, removed after.
struct OpDir(PathBuf);

impl OpDir {
    fn create(op_id: &str) -> std::io::Result<OpDir> {
        use std::os::unix::fs::DirBuilderExt;
        let safe: String = op_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
            .take(64)
            .collect();
        let base = std::env::temp_dir();
        let mut last = None;
        for _ in 0..8 {
            let path = base.join(format!("postern-op-{safe}-{:016x}", rand::random::<u64>()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(OpDir(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for OpDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the op's working directory");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_types::control::OpTool;
    use jiff::SignedDuration;

    // 2026-01-05 is a Monday.
    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn config(policy: &str) -> AgentConfig {
        let text = format!(
            "audit_path = \"a\"\n[policy]\n{policy}\n[tools]\nkubectl = \"/bin/sh\"\n\
             [[resource]]\nid = \"aws_eks_cluster.main\"\nkind = \"kubernetes\"\nkubeconfig = \"/etc/kc\"\n\
             [[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:7\"\n"
        );
        AgentConfig::parse(&text, Path::new("/etc/postern/agent.toml")).unwrap()
    }

    fn dispatch(approved_by: &str) -> OpDispatch {
        OpDispatch {
            op_id: "op_1".into(),
            tool: OpTool::Kubectl,
            command: "kubectl get pods".into(),
            resource_id: "aws_eks_cluster.main".into(),
            timeout_s: 300,
            operator: "alice@vendor".into(),
            grant_id: "gr_1".into(),
            command_approved_by: approved_by.into(),
            command_approved_at: at("2026-01-05T08:00:00Z"),
            hold_output: false,
        }
    }

    fn grant(level: GrantLevel, from: &str, to: &str) -> LiveGrant {
        LiveGrant {
            grant_id: "gr_1".into(),
            level,
            approved_by: "bob".into(),
            approved_at: at(from),
            expires_at: at(to),
        }
    }

    fn check(
        config: &AgentConfig,
        d: &OpDispatch,
        grant_live: bool,
        seen: Option<&LiveGrant>,
        now: &str,
    ) -> Result<Authorized, Refusal> {
        let policy = Policy::parse(&config.policy_summary()).unwrap();
        let c = Checks {
            config,
            policy: &policy,
            grant_live,
            grant_seen: seen,
            path_env: None,
            access_hint: "postern access request --level operate",
        };
        authorize(d, &c, at(now))
    }

    fn code(r: Result<Authorized, Refusal>) -> (ErrorCode, bool) {
        let r = r.expect_err("refused");
        (r.error.code, r.denial)
    }

    #[test]
    fn automatic_runs_and_streams() {
        let c = config("approval = \"automatic\"");
        let a = check(
            &c,
            &dispatch("policy:automatic"),
            true,
            None,
            "2026-01-05T12:00:00Z",
        )
        .unwrap();
        assert_eq!(a.argv, ["kubectl", "get", "pods"]);
        assert_eq!(a.exe, Path::new("/bin/sh"));
        assert!(!a.hold);
        assert_eq!(a.decision, Decision::Automatic);
        // The gateway may still ask to hold.
        let d = OpDispatch {
            hold_output: true,
            ..dispatch("policy:automatic")
        };
        assert!(
            check(&c, &d, true, None, "2026-01-05T12:00:00Z")
                .unwrap()
                .hold
        );
    }

    #[test]
    fn manual_and_always_require_need_a_person_and_hold_output() {
        for mode in ["manual", "always-require"] {
            let c = config(&format!("approval = \"{mode}\""));
            for by in ["policy:automatic", "policy:window", "", "  "] {
                let r = check(&c, &dispatch(by), true, None, "2026-01-05T12:00:00Z").expect_err(by);
                assert_eq!(r.error.code, ErrorCode::ApprovalDenied);
                assert!(r.denial);
                assert!(
                    r.error.message.contains("requires a person's approval")
                        && r.error.message.contains(mode),
                    "{}",
                    r.error
                );
                assert_eq!(
                    r.error.hint,
                    "an approver runs `postern approvals approve op_1`"
                );
            }
            let a = check(
                &c,
                &dispatch("carol@acme"),
                true,
                None,
                "2026-01-05T12:00:00Z",
            )
            .unwrap();
            assert!(a.hold, "{mode}: output needs approval");
        }
    }

    #[test]
    fn windows_by_the_agents_clock() {
        let c = config("approval = \"windows\"\ntime_zone = \"Europe/Berlin\"\nwindows = [\"Mon-Fri 09:00-17:00\"]");
        // Inside (12:00 Berlin): approved by the window, output not held.
        let a = check(
            &c,
            &dispatch("policy:window"),
            true,
            None,
            "2026-01-05T11:00:00Z",
        )
        .unwrap();
        assert!(matches!(a.decision, Decision::InWindow { .. }) && !a.hold);
        // The window closed before dispatch: the window's approval no longer counts.
        let r = check(
            &c,
            &dispatch("policy:window"),
            true,
            None,
            "2026-01-05T16:00:00Z",
        )
        .expect_err("outside");
        assert_eq!(r.error.code, ErrorCode::ApprovalDenied);
        assert!(
            r.error.message.contains("outside its approval windows"),
            "{}",
            r.error
        );
        assert_eq!(r.error.details["next_window"], "2026-01-06T08:00:00Z");
        // A person's approval runs it, and its output is held outside the window.
        let a = check(
            &c,
            &dispatch("carol@acme"),
            true,
            None,
            "2026-01-05T16:00:00Z",
        )
        .unwrap();
        assert!(a.hold);
    }

    #[test]
    fn grants_by_the_agents_clock() {
        let c = config("approval = \"automatic\"");
        let d = dispatch("policy:automatic");
        let now = "2026-01-05T12:00:00Z";
        assert_eq!(
            code(check(&c, &d, false, None, now)),
            (ErrorCode::OperateAccessRequired, true)
        );
        let old = grant(
            GrantLevel::Operate,
            "2026-01-05T10:00:00Z",
            "2026-01-05T11:00:00Z",
        );
        let r = check(&c, &d, false, Some(&old), now).expect_err("expired");
        assert_eq!(r.error.code, ErrorCode::OperateAccessExpired);
        assert!(r.error.hint.contains("--level operate"), "{}", r.error);
        let deploy = grant(
            GrantLevel::Deploy,
            "2026-01-05T10:00:00Z",
            "2026-01-05T14:00:00Z",
        );
        assert_eq!(
            code(check(&c, &d, false, Some(&deploy), now)),
            (ErrorCode::OperateAccessRequired, true)
        );
        let revoked = grant(
            GrantLevel::Operate,
            "2026-01-05T10:00:00Z",
            "2026-01-05T14:00:00Z",
        );
        assert_eq!(
            code(check(&c, &d, false, Some(&revoked), now)),
            (ErrorCode::OperateAccessExpired, true)
        );
        // The grant is checked before anything else.
        let bad = OpDispatch {
            resource_id: "nope".into(),
            command: "rm -rf /".into(),
            ..d.clone()
        };
        assert_eq!(
            code(check(&c, &bad, false, None, now)).0,
            ErrorCode::OperateAccessRequired
        );
    }

    #[test]
    fn resource_command_tool_and_timeout() {
        let c = config("approval = \"automatic\"");
        let now = "2026-01-05T12:00:00Z";
        let d = dispatch("policy:automatic");
        let with = |f: &dyn Fn(&mut OpDispatch)| {
            let mut d = d.clone();
            f(&mut d);
            code(check(&c, &d, true, None, now))
        };
        assert_eq!(
            with(&|d| d.resource_id = "aws_db_instance.other".into()),
            (ErrorCode::InvalidOriginResourceId, true)
        );
        assert_eq!(
            with(&|d| d.command = "rm -rf /".into()),
            (ErrorCode::ForbiddenByScope, true)
        );
        assert_eq!(
            with(&|d| d.command = "/usr/bin/kubectl get pods".into()),
            (ErrorCode::ForbiddenByScope, true)
        );
        assert_eq!(
            with(&|d| d.command = "kubectl get pods; rm -rf /".into()),
            (ErrorCode::InvalidRequest, false)
        );
        assert_eq!(
            with(&|d| d.timeout_s = 0),
            (ErrorCode::InvalidRequest, false)
        );
        assert_eq!(
            with(&|d| d.timeout_s = 86_401),
            (ErrorCode::InvalidRequest, false)
        );
        assert_eq!(
            with(&|d| d.op_id = String::new()),
            (ErrorCode::InvalidRequest, false)
        );
        assert_eq!(
            with(&|d| d.op_id = "x".repeat(MAX_OP_ID_LEN + 1)),
            (ErrorCode::InvalidRequest, false)
        );
        // A tool with no [tools] entry and nothing on PATH.
        assert_eq!(
            with(&|d| {
                d.tool = OpTool::Psql;
                d.command = "psql -c 'select 1'".into();
            }),
            (ErrorCode::Internal, false)
        );
    }

    #[test]
    fn approved_by_person_is_anyone_but_the_policy() {
        assert!(approved_by_person("carol@acme"));
        assert!(!approved_by_person("policy:automatic"));
        assert!(!approved_by_person("policy:window"));
        assert!(!approved_by_person(""));
    }

    #[test]
    fn utf8_stream_keeps_split_characters_whole() {
        let text = "a€b😀c";
        let bytes = text.as_bytes();
        // Every split point, including inside both multi-byte characters.
        for cut in 0..=bytes.len() {
            let mut s = Utf8Stream::default();
            let mut got = s.push(&bytes[..cut]);
            got.push_str(&s.push(&bytes[cut..]));
            got.push_str(&s.finish());
            assert_eq!(got, text, "cut at {cut}");
        }
        // Byte by byte.
        let mut s = Utf8Stream::default();
        let got: String = bytes.iter().map(|b| s.push(&[*b])).collect();
        assert_eq!(got + &s.finish(), text);
        // Invalid bytes are replaced as from_utf8_lossy does; a truncated tail at the end too.
        let bad = b"x\xffy\xe2\x82";
        let mut s = Utf8Stream::default();
        let got = s.push(bad) + &s.finish();
        assert_eq!(got, String::from_utf8_lossy(bad));
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(b"\xe2\x82z"), "\u{FFFD}z");
    }

    #[test]
    fn frames_stay_under_the_limit_whatever_the_bytes() {
        for text in [
            "x".repeat(600_000),
            "\u{1}".repeat(300_000),
            "€".repeat(200_000),
            "\"".repeat(300_000),
            String::new(),
        ] {
            let pieces = split_for_frames(&text, MAX_OUTPUT_FRAME_DATA);
            assert_eq!(pieces.concat(), text);
            for p in &pieces {
                assert!(!p.is_empty());
                let frame = Frame::OpOutput {
                    op_id: "op_1".repeat(32),
                    stream: OutputStream::Stdout,
                    data: p.to_string(),
                    preview: false,
                };
                let encoded = endpoint_types::frame::encode_to_vec(&frame);
                assert!(
                    encoded.len() <= MAX_OUTPUT_FRAME_DATA + 1024,
                    "{}",
                    encoded.len()
                );
            }
        }
    }

    #[test]
    fn held_finished_frame_says_nothing_about_the_output() {
        let spec = OpSpec::new("op_1", OpTool::Kubectl, "kubectl get pods");
        let now = at("2026-01-05T12:00:00Z");
        let outcome = OpOutcome {
            exit_code: Some(3),
            signal: None,
            stdout: b"secret".to_vec(),
            stderr: b"boom".to_vec(),
            stdout_truncated: true,
            stderr_truncated: false,
            timed_out: false,
            cancelled: false,
            started_at: now,
            finished_at: now + SignedDuration::from_secs(1),
        };
        let held = Held { spec, outcome };
        let Frame::OpFinished(f) = held_notice("op_1") else {
            panic!()
        };
        assert_eq!(
            (f.held, f.exit_code, f.truncated, f.error.is_none()),
            (true, None, false, true)
        );
        let frames = held.frames(true, true);
        assert_eq!(frames.len(), 3);
        let Some(Frame::OpFinished(f)) = frames.last() else {
            panic!()
        };
        assert_eq!(
            (f.preview, f.held, f.exit_code, f.truncated),
            (true, true, Some(3), true)
        );
        assert_eq!(
            f.error.as_ref().map(|e| e.code),
            Some(ErrorCode::CommandFailed)
        );
        assert_eq!(f.error.as_ref().unwrap().details["stderr"], "boom");
    }
}
