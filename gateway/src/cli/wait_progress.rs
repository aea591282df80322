//! `--wait` and `ops wait`: poll until an op or endpoint is settled, with progress on stderr
//! and a deadline of the CLI's own (`--wait-timeout`).
//!
//! Progress is written to stderr always (not only on a terminal), so a CI log shows what a
//! long wait was waiting for: nothing for the first [`QUIET_START`] (quick ops stay silent),
//! then a line when the state changes and otherwise every [`HEARTBEAT`], never two lines
//! within [`MIN_GAP`]. With `--output json` each line is one JSON object
//! (`{"waiting":{"kind","id","state","waiting_for","elapsed_s"}}`); stdout keeps its one
//! document.

use super::{client::ApiClient, OutputFormat};
use endpoint_types::{
    api::{EndpointRecord, EndpointState},
    control::{OpRecord, OpState},
    ApiError, ErrorCode,
};
use std::time::Duration;
use tokio::time::Instant;

pub const QUIET_START: Duration = Duration::from_secs(2);
pub const MIN_GAP: Duration = Duration::from_secs(2);
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// `--wait-timeout`'s default.
pub const DEFAULT_WAIT: &str = "48h";

/// Decides when a progress line is due (sans-IO: given the time waited so far).
#[derive(Debug, Default)]
pub struct Pacing {
    last_line: Option<Duration>,
    last_state: Option<String>,
}

impl Pacing {
    /// Whether a line for `state` is due after `elapsed`; when it is, it counts as written.
    pub fn due(&mut self, elapsed: Duration, state: &str) -> bool {
        if elapsed < QUIET_START {
            return false;
        }
        let due = match self.last_line {
            None => true,
            Some(at) => {
                let since = elapsed.saturating_sub(at);
                since >= HEARTBEAT
                    || (since >= MIN_GAP && self.last_state.as_deref() != Some(state))
            }
        };
        if due {
            self.last_line = Some(elapsed);
            self.last_state = Some(state.to_string());
        }
        due
    }
}

/// What one wait reports about the record it polls.
pub struct Waited {
    pub kind: &'static str,
    pub id: String,
    pub state: &'static str,
    /// Who or what must act next.
    pub waiting_for: String,
    pub settled: bool,
}

pub fn op_status(op: &OpRecord) -> Waited {
    let (c, app) = (&op.customer, &op.app);
    let waiting_for = match op.state {
        OpState::PendingApproval => format!(
            "an approver of customer {c} to approve the command (postern approvals approve {})",
            op.id
        ),
        OpState::Approved => format!("the appliance of {app}/{c} to start it"),
        OpState::Running => format!(
            "the appliance of {app}/{c} to finish it (op timeout {}s)",
            op.timeout_s
        ),
        OpState::OutputPendingApproval => format!(
            "an approver of customer {c} to release the output (postern approvals approve {})",
            op.id
        ),
        _ => "nothing: it has ended".to_string(),
    };
    Waited {
        kind: "op",
        id: op.id.clone(),
        state: op.state.as_str(),
        waiting_for,
        settled: op.state.is_final(),
    }
}

pub fn endpoint_status(e: &EndpointRecord) -> Waited {
    let pending = e.state == EndpointState::PendingApproval;
    Waited {
        kind: "endpoint",
        id: e.id.clone(),
        state: e.state.as_str(),
        waiting_for: if pending {
            format!(
                "an approver of customer {} to approve the endpoint (postern approvals approve {})",
                e.customer, e.id
            )
        } else {
            "nothing: it is decided".to_string()
        },
        settled: !pending,
    }
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// One progress line as written to stderr.
pub fn line(w: &Waited, elapsed: Duration, out: OutputFormat) -> String {
    match out {
        OutputFormat::Json => serde_json::json!({ "waiting": {
            "kind": w.kind, "id": w.id, "state": w.state, "waiting_for": w.waiting_for,
            "elapsed_s": elapsed.as_secs(),
        }})
        .to_string(),
        OutputFormat::Text => format!(
            "waiting for {} {}: {}, for {} ({} so far)",
            w.kind,
            w.id,
            w.state,
            w.waiting_for,
            clock(elapsed)
        ),
    }
}

/// Polls `fetch` until the record is settled, or fails with WAIT_TIMEOUT once `limit` has
/// passed (after one last look).
pub async fn wait<T>(
    limit: Duration,
    out: OutputFormat,
    mut fetch: impl AsyncFnMut() -> Result<T, ApiError>,
    status: impl Fn(&T) -> Waited,
) -> Result<T, ApiError> {
    let started = Instant::now();
    let deadline = started + limit;
    let mut pacing = Pacing::default();
    // Quick ops finish in milliseconds; long ones are polled more gently.
    let mut pause = Duration::from_millis(10);
    loop {
        let record = fetch().await?;
        let w = status(&record);
        if w.settled {
            return Ok(record);
        }
        let now = Instant::now();
        let elapsed = now - started;
        if now >= deadline {
            return Err(ApiError::new(
                ErrorCode::WaitTimeout,
                format!(
                    "gave up waiting for {} {} after {}: it is still {}, waiting for {}",
                    w.kind,
                    w.id,
                    clock(elapsed),
                    w.state,
                    w.waiting_for
                ),
            )
            .hint(format!(
                "it goes on without this CLI; look again with `postern {} {}`, or wait longer with --wait-timeout",
                if w.kind == "op" { "ops wait" } else { "ops endpoint get" },
                w.id
            ))
            .details(serde_json::json!({
                "kind": w.kind, "id": w.id, "state": w.state, "waiting_for": w.waiting_for,
                "waited_s": elapsed.as_secs(),
            })));
        }
        if pacing.due(elapsed, w.state) {
            eprintln!("{}", line(&w, elapsed, out));
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 3 / 2).min(Duration::from_millis(500));
    }
}

/// `ops wait` and `ops <tool> --wait`.
pub async fn op(
    c: &ApiClient,
    id: &str,
    limit: Duration,
    out: OutputFormat,
) -> Result<OpRecord, ApiError> {
    let path = format!("/v1/ops/{id}");
    wait(limit, out, async || c.get(&path).await, op_status).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn quiet_at_first_then_on_change_or_heartbeat_never_too_often() {
        let mut p = Pacing::default();
        assert!(!p.due(Duration::from_millis(500), "running"));
        assert!(!p.due(Duration::from_millis(1900), "running"));
        assert!(p.due(secs(2), "running"));
        // Same state: nothing until the heartbeat.
        assert!(!p.due(secs(3), "running"));
        assert!(!p.due(secs(11), "running"));
        assert!(p.due(secs(12), "running"));
        // A change within the minimum gap waits for it; then it is told.
        assert!(!p.due(Duration::from_millis(13_000), "output-pending-approval"));
        assert!(p.due(secs(14), "output-pending-approval"));
        assert!(!p.due(secs(15), "completed"));
    }

    #[test]
    fn a_line_says_state_who_and_how_long() {
        let w = Waited {
            kind: "op",
            id: "op_1".into(),
            state: "pending-approval",
            waiting_for: "an approver of customer acme".into(),
            settled: false,
        };
        assert_eq!(
            line(&w, secs(125), OutputFormat::Text),
            "waiting for op op_1: pending-approval, for an approver of customer acme (2m05s so far)"
        );
        let v: serde_json::Value =
            serde_json::from_str(&line(&w, secs(3), OutputFormat::Json)).unwrap();
        assert_eq!(v["waiting"]["state"], "pending-approval");
        assert_eq!(v["waiting"]["elapsed_s"], 3);
    }

    #[tokio::test]
    async fn the_deadline_is_a_wait_timeout_error_naming_the_state() {
        let mut polls = 0u32;
        let e = wait(
            Duration::from_millis(300),
            OutputFormat::Json,
            async || {
                polls += 1;
                Ok::<_, ApiError>(())
            },
            |_| Waited {
                kind: "op",
                id: "op_9".into(),
                state: "running",
                waiting_for: "the appliance".into(),
                settled: false,
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::WaitTimeout);
        assert!(e.message.contains("still running"), "{e}");
        assert_eq!(e.details["state"], "running");
        assert!(!e.hint.is_empty());
        // The first look and the last one, past the deadline.
        assert!(polls >= 2, "{polls}");
    }
}
