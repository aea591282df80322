//! Grant and op state transitions as pure functions taking `now`.
//!
//! The gateway's store and the agent both move records through these functions, so the
//! rules (what expires when, which event is legal in which state, which error an operator
//! sees) live in one place and are tested with fixed instants instead of a clock.

use crate::{
    control::{GrantLevel, GrantRecord, GrantState, OpState},
    error::{ApiError, ErrorCode},
};
use jiff::Timestamp;
use serde_json::json;

pub mod endpoint;
pub mod grant;
pub mod transition;

pub use transition::{Machine, TableMachine};

/// The command that gets operate access back, for hints. The reason is left for the operator
/// to write: a hint must not invent one.
pub fn access_request_hint(app: &str, customer: &str) -> String {
    format!("request it: postern access request --app {app} --customer {customer} --level operate --duration 30m --reason \"…\"")
}

/// A grant's state at `now`. Expiry is derived, never stored as a decision: an active grant
/// whose `expires_at` is at or before `now` is expired (a 30 m grant approved at 10:00:00 is
/// live at 10:29:59.999 and gone at 10:30:00).
pub fn grant_state(
    stored: GrantState,
    expires_at: Option<Timestamp>,
    now: Timestamp,
) -> GrantState {
    match (stored, expires_at) {
        (GrantState::Active, Some(at)) if at <= now => GrantState::Expired,
        _ => stored,
    }
}

/// Only a live `operate` grant authorises ops and endpoints; install and deploy grants never
/// do, and steady-state is read-only observability.
pub fn grant_authorises_ops(level: GrantLevel, state_at_now: GrantState) -> bool {
    level == GrantLevel::Operate && state_at_now == GrantState::Active
}

/// The live operate grant among `grants` (those of the target appliance), the one lasting
/// longest when several are; otherwise the refusal the operator sees before anything reaches
/// the appliance: `OPERATE_ACCESS_EXPIRED` when an operate grant existed and ran out,
/// `OPERATE_ACCESS_REQUIRED` when there never was one (or it was denied, revoked or is still
/// waiting), each with the `access request` command as the hint.
pub fn live_operate_grant<'a>(
    app: &str,
    customer: &str,
    grants: impl IntoIterator<Item = &'a GrantRecord>,
    now: Timestamp,
) -> Result<&'a GrantRecord, ApiError> {
    let mut live: Option<&GrantRecord> = None;
    let mut expired: Option<&GrantRecord> = None;
    for g in grants
        .into_iter()
        .filter(|g| g.level == GrantLevel::Operate)
    {
        match grant_state(g.state, g.expires_at, now) {
            GrantState::Active => {
                // No expiry sorts last: it outlives any dated grant.
                let longer = live.is_none_or(|l| match (l.expires_at, g.expires_at) {
                    (_, None) => true,
                    (None, Some(_)) => false,
                    (Some(a), Some(b)) => b > a,
                });
                if longer {
                    live = Some(g);
                }
            }
            GrantState::Expired => {
                if expired.is_none_or(|e| g.expires_at > e.expires_at) {
                    expired = Some(g);
                }
            }
            GrantState::PendingApproval | GrantState::Denied | GrantState::Revoked => {}
        }
    }
    if let Some(g) = live {
        return Ok(g);
    }
    let hint = access_request_hint(app, customer);
    Err(match expired {
        Some(g) => {
            let at = g.expires_at.map(|t| t.to_string()).unwrap_or_default();
            ApiError::new(
                ErrorCode::OperateAccessExpired,
                format!("operate access to {app} at {customer} expired at {at}"),
            )
            .hint(hint)
            .details(json!({ "grant_id": g.id, "expired_at": g.expires_at }))
        }
        None => ApiError::new(
            ErrorCode::OperateAccessRequired,
            format!("there is no live operate access to {app} at {customer}"),
        )
        .hint(hint),
    })
}

/// What happens to an op. `by` is the deciding principal (a person, or `policy:…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpEvent {
    CommandApproved {
        by: String,
    },
    CommandDenied {
        by: String,
        message: Option<String>,
    },
    /// The dispatch-time policy check failed (the window that approved it has closed): the op
    /// goes back to approval rather than running on a stale decision.
    PolicyRecheckFailed,
    /// Sent to the agent; the op stays `approved` until the agent reports it started.
    Dispatched,
    Started,
    /// The command exited; `output_held` when the policy keeps its output in the appliance
    /// until a person releases it.
    Finished {
        exit_code: i64,
        output_held: bool,
    },
    TimedOut,
    /// Held output released; the exit code is the one held with it, which decides between
    /// completed and failed.
    OutputReleased {
        by: String,
        exit_code: i64,
    },
    OutputDenied {
        by: String,
        message: Option<String>,
    },
    /// The agent refused to run it (its own policy or grants do not allow it).
    AgentRefused,
    /// The op's operate access or its approval ran out before it finished.
    Expired,
    /// The agent refused it because the customer's policy there wants a person's approval the
    /// op does not carry: a denial, not a failure.
    AgentDenied,
    /// The agent went away while the op ran: its result can no longer arrive.
    AgentLost,
    /// A person released held output; the op stays `output-pending-approval` until the agent
    /// sends the released result ([`OpEvent::OutputReleased`]).
    OutputApproved {
        by: String,
    },
    /// An approver looked at held output (the agent sends a preview); it stays held. Only the
    /// agent moves ops by it: the gateway's previews do not change the op.
    OutputPreviewed,
}

impl OpEvent {
    /// A stable name for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            OpEvent::CommandApproved { .. } => "command-approved",
            OpEvent::CommandDenied { .. } => "command-denied",
            OpEvent::PolicyRecheckFailed => "policy-recheck-failed",
            OpEvent::Dispatched => "dispatched",
            OpEvent::Started => "started",
            OpEvent::Finished { .. } => "finished",
            OpEvent::TimedOut => "timed-out",
            OpEvent::OutputReleased { .. } => "output-released",
            OpEvent::OutputDenied { .. } => "output-denied",
            OpEvent::AgentRefused => "agent-refused",
            OpEvent::Expired => "expired",
            OpEvent::AgentDenied => "agent-denied",
            OpEvent::AgentLost => "agent-lost",
            OpEvent::OutputApproved { .. } => "output-approved",
            OpEvent::OutputPreviewed => "output-previewed",
        }
    }
}

/// The op machine, as its refusals describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpMachine;

impl Machine for OpMachine {
    type State = OpState;
    type Event = &'static str;
    const RECORD: &'static str = "op";
    const ARTICLE: &'static str = "an";
    const ENDED_NOTE: &'static str = " (the op is finished)";
    const AFTER_END: &'static str =
        "to run the command again, request a new op (`postern ops TOOL … --command …`)";

    fn state_name(state: OpState) -> &'static str {
        state.as_str()
    }
    fn event_name(event: &'static str) -> &'static str {
        event
    }
    fn is_final(state: OpState) -> bool {
        state.is_final()
    }
    fn otherwise_hint(id: &str) -> String {
        format!("`postern ops get {id}` shows the op; `postern approvals list` shows what waits for a decision")
    }
}

/// An event the op's state does not accept (a final state accepts none); `event` is the
/// event's [`OpEvent::name`].
pub type TransitionError = transition::TransitionError<OpMachine>;

/// `CONFLICT` (HTTP 409) for an event a record's state does not take: an ended record never
/// changes again, and a live one only takes the events its state allows. It names the record,
/// its state and the event; the hint says what to do instead.
pub fn refusal(
    record: &str,
    id: &str,
    state: &str,
    is_final: bool,
    event: &str,
    after_end: &str,
    otherwise: String,
) -> ApiError {
    let (message, hint) = if is_final {
        (format!("{record} {id} has ended as {state}; nothing changes it any more (refused: {event})"), after_end.to_string())
    } else {
        (
            format!("{record} {id} is {state}, which does not take {event}"),
            otherwise,
        )
    };
    ApiError::new(ErrorCode::Conflict, message)
        .hint(hint)
        .details(json!({ "id": id, "record": record, "state": state, "event": event, "ended": is_final }))
}

/// The op state machine:
///
/// ```text
/// pending-approval --command-approved--> approved --started--> running
///        |  \--command-denied--> denied      |  \--policy-recheck-failed--> pending-approval
///        \--expired--> expired               |--agent-refused--> failed
///                                            |--agent-denied--> denied
///                                            |--finished / timed-out: as from running
///                                            \--expired--> expired
/// running --finished(0, not held)--> completed      output-pending-approval
///         --finished(≠0, not held)--> failed           --output-approved--> (itself)
///         --finished(held)--> output-pending-approval  --output-released(0)--> completed
///         --timed-out--> timed-out                     --output-released(≠0)--> failed
///         --agent-refused / agent-lost--> failed       --timed-out--> timed-out (released
///         --agent-denied--> denied                        output of a command that ran out of time)
///                                                      --output-denied--> denied
///                                                      --expired--> expired
/// ```
/// `dispatched` keeps an approved op approved, `output-previewed` (the agent's) a held one held. An approved op may report its end without a
/// start: the agent's `started` can be lost with a connection, its result (or held output,
/// announced again on reconnect) is not. Final states accept nothing.
pub fn next(state: OpState, event: &OpEvent) -> Result<OpState, TransitionError> {
    use OpEvent as E;
    use OpState as S;
    let to = match (state, event) {
        (S::PendingApproval, E::CommandApproved { .. }) => S::Approved,
        (S::PendingApproval, E::CommandDenied { .. }) => S::Denied,
        (S::PendingApproval, E::Expired) => S::Expired,

        (S::Approved, E::Dispatched) => S::Approved,
        (S::Approved, E::Started) => S::Running,
        (S::Approved, E::PolicyRecheckFailed) => S::PendingApproval,
        (S::Approved, E::Expired) => S::Expired,

        (
            S::Approved | S::Running,
            E::Finished {
                output_held: true, ..
            },
        ) => S::OutputPendingApproval,
        (
            S::Approved | S::Running,
            E::Finished {
                exit_code: 0,
                output_held: false,
            },
        ) => S::Completed,
        (
            S::Approved | S::Running,
            E::Finished {
                output_held: false, ..
            },
        ) => S::Failed,
        (S::Approved | S::Running, E::TimedOut) => S::TimedOut,
        (S::Approved | S::Running, E::AgentRefused) => S::Failed,
        (S::Approved | S::Running, E::AgentDenied) => S::Denied,
        (S::Running, E::AgentLost) => S::Failed,

        (S::OutputPendingApproval, E::OutputApproved { .. }) => S::OutputPendingApproval,
        (S::OutputPendingApproval, E::OutputPreviewed) => S::OutputPendingApproval,
        (S::OutputPendingApproval, E::OutputReleased { exit_code: 0, .. }) => S::Completed,
        (S::OutputPendingApproval, E::OutputReleased { .. }) => S::Failed,
        (S::OutputPendingApproval, E::TimedOut) => S::TimedOut,
        (S::OutputPendingApproval, E::OutputDenied { .. }) => S::Denied,
        // A release the appliance could not verify: the held output is destroyed.
        (S::OutputPendingApproval, E::AgentDenied) => S::Denied,
        (S::OutputPendingApproval, E::Expired) => S::Expired,

        _ => {
            return Err(TransitionError {
                state,
                event: event.name(),
            })
        }
    };
    Ok(to)
}

/// Whether an op in `state` takes streamed output: while it runs, and while the output it
/// held is released. Output for an op in any other state (not started, ended) is a late or
/// forged frame and is dropped.
pub fn op_takes_output(state: OpState) -> bool {
    matches!(state, OpState::Running | OpState::OutputPendingApproval)
}

/// The structured error an op in `state` reports, `None` for states that are not failures.
///
/// `exit_code` and `stderr_tail` come from the command when it ran; `message` is the
/// customer's message for a denial, or the agent's reason when it refused (failed with no exit
/// code), or why it expired.
pub fn op_error(
    state: OpState,
    exit_code: Option<i64>,
    stderr_tail: Option<&str>,
    message: Option<&str>,
) -> Option<ApiError> {
    let message = message.map(str::trim).filter(|m| !m.is_empty());
    let err = match state {
        OpState::Failed => match exit_code {
            Some(code) => ApiError::new(ErrorCode::CommandFailed, format!("the command exited with code {code}"))
                .hint("it ran inside the appliance and failed: its stderr is in details.stderr and in `postern ops get ID`")
                .details(json!({ "exit_code": code, "stderr": stderr_tail.unwrap_or_default() })),
            // Without an exit code the command never ran: the agent refused it.
            None => ApiError::new(
                ErrorCode::CommandFailed,
                format!(
                    "the appliance's agent refused to run the command: {}",
                    message.unwrap_or("its own policy or grants do not allow it")
                ),
            )
            .hint("the agent enforces the customer's policy and grants itself; ask the customer's approver, or request operate access again")
            .details(json!({ "exit_code": null, "refused_by_agent": true })),
        },
        OpState::Denied => ApiError::new(
            ErrorCode::ApprovalDenied,
            message.map_or_else(|| "the customer's approver denied the op".to_string(), str::to_string),
        )
        .hint("the message is the customer's; talk to them before asking again")
        .details(json!({ "message": message })),
        OpState::TimedOut => ApiError::new(
            ErrorCode::CommandTimeout,
            "the command ran past its timeout and was killed with its whole process group",
        )
        .hint("raise --timeout (default 5m) or narrow the command")
        .details(json!({ "exit_code": exit_code, "stderr": stderr_tail.unwrap_or_default() })),
        OpState::Expired => ApiError::new(
            ErrorCode::OperateAccessExpired,
            format!(
                "the op expired before it finished: {}",
                message.unwrap_or("the operate access or the approval it needed ran out")
            ),
        )
        .hint(format!("{}, then run the op again", access_request_hint("APP", "CUSTOMER"))),
        OpState::PendingApproval
        | OpState::Approved
        | OpState::Running
        | OpState::OutputPendingApproval
        | OpState::Completed => return None,
    };
    Some(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use OpState as S;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const ALL_STATES: [OpState; 9] = [
        S::PendingApproval,
        S::Approved,
        S::Running,
        S::OutputPendingApproval,
        S::Completed,
        S::Failed,
        S::Denied,
        S::TimedOut,
        S::Expired,
    ];

    /// One of each event, with the payloads that choose between outcomes.
    fn all_events() -> Vec<OpEvent> {
        let by = || "ana@customer".to_string();
        vec![
            OpEvent::CommandApproved { by: by() },
            OpEvent::CommandDenied {
                by: by(),
                message: Some("not during the freeze".into()),
            },
            OpEvent::PolicyRecheckFailed,
            OpEvent::Dispatched,
            OpEvent::Started,
            OpEvent::Finished {
                exit_code: 0,
                output_held: false,
            },
            OpEvent::Finished {
                exit_code: 2,
                output_held: false,
            },
            OpEvent::Finished {
                exit_code: -9,
                output_held: false,
            },
            OpEvent::Finished {
                exit_code: 0,
                output_held: true,
            },
            OpEvent::Finished {
                exit_code: 2,
                output_held: true,
            },
            OpEvent::TimedOut,
            OpEvent::OutputReleased {
                by: by(),
                exit_code: 0,
            },
            OpEvent::OutputReleased {
                by: by(),
                exit_code: 3,
            },
            OpEvent::OutputDenied {
                by: by(),
                message: None,
            },
            OpEvent::AgentRefused,
            OpEvent::Expired,
            OpEvent::AgentDenied,
            OpEvent::AgentLost,
            OpEvent::OutputApproved { by: by() },
            OpEvent::OutputPreviewed,
        ]
    }

    /// Fails to compile when a variant is added, so the table below has to grow with it.
    #[allow(dead_code)]
    fn every_variant_is_in_the_table(e: &OpEvent) {
        match e {
            OpEvent::CommandApproved { .. }
            | OpEvent::CommandDenied { .. }
            | OpEvent::PolicyRecheckFailed
            | OpEvent::Dispatched
            | OpEvent::Started
            | OpEvent::Finished { .. }
            | OpEvent::TimedOut
            | OpEvent::OutputReleased { .. }
            | OpEvent::OutputDenied { .. }
            | OpEvent::AgentRefused
            | OpEvent::Expired
            | OpEvent::AgentDenied
            | OpEvent::AgentLost
            | OpEvent::OutputApproved { .. }
            | OpEvent::OutputPreviewed => {}
        }
    }

    /// The legal transitions, written out: (state, event, new state). Everything else is an error.
    fn legal(state: OpState, e: &OpEvent) -> Option<OpState> {
        let table: &[(OpState, OpEvent, OpState)] = &[
            (
                S::PendingApproval,
                OpEvent::CommandApproved {
                    by: "ana@customer".into(),
                },
                S::Approved,
            ),
            (
                S::PendingApproval,
                OpEvent::CommandDenied {
                    by: "ana@customer".into(),
                    message: Some("not during the freeze".into()),
                },
                S::Denied,
            ),
            (S::PendingApproval, OpEvent::Expired, S::Expired),
            (S::Approved, OpEvent::Dispatched, S::Approved),
            (S::Approved, OpEvent::Started, S::Running),
            (
                S::Approved,
                OpEvent::PolicyRecheckFailed,
                S::PendingApproval,
            ),
            (S::Approved, OpEvent::AgentRefused, S::Failed),
            (S::Approved, OpEvent::AgentDenied, S::Denied),
            (S::Approved, OpEvent::Expired, S::Expired),
            // A lost `started`: the end still counts.
            (
                S::Approved,
                OpEvent::Finished {
                    exit_code: 0,
                    output_held: false,
                },
                S::Completed,
            ),
            (
                S::Approved,
                OpEvent::Finished {
                    exit_code: 2,
                    output_held: false,
                },
                S::Failed,
            ),
            (
                S::Approved,
                OpEvent::Finished {
                    exit_code: -9,
                    output_held: false,
                },
                S::Failed,
            ),
            (
                S::Approved,
                OpEvent::Finished {
                    exit_code: 0,
                    output_held: true,
                },
                S::OutputPendingApproval,
            ),
            (
                S::Approved,
                OpEvent::Finished {
                    exit_code: 2,
                    output_held: true,
                },
                S::OutputPendingApproval,
            ),
            (S::Approved, OpEvent::TimedOut, S::TimedOut),
            (S::Running, OpEvent::AgentRefused, S::Failed),
            (S::Running, OpEvent::AgentDenied, S::Denied),
            (S::Running, OpEvent::AgentLost, S::Failed),
            (
                S::OutputPendingApproval,
                OpEvent::OutputApproved {
                    by: "ana@customer".into(),
                },
                S::OutputPendingApproval,
            ),
            (S::OutputPendingApproval, OpEvent::TimedOut, S::TimedOut),
            (
                S::OutputPendingApproval,
                OpEvent::OutputPreviewed,
                S::OutputPendingApproval,
            ),
            (
                S::Running,
                OpEvent::Finished {
                    exit_code: 0,
                    output_held: false,
                },
                S::Completed,
            ),
            (
                S::Running,
                OpEvent::Finished {
                    exit_code: 2,
                    output_held: false,
                },
                S::Failed,
            ),
            (
                S::Running,
                OpEvent::Finished {
                    exit_code: -9,
                    output_held: false,
                },
                S::Failed,
            ),
            (
                S::Running,
                OpEvent::Finished {
                    exit_code: 0,
                    output_held: true,
                },
                S::OutputPendingApproval,
            ),
            (
                S::Running,
                OpEvent::Finished {
                    exit_code: 2,
                    output_held: true,
                },
                S::OutputPendingApproval,
            ),
            (S::Running, OpEvent::TimedOut, S::TimedOut),
            (
                S::OutputPendingApproval,
                OpEvent::OutputReleased {
                    by: "ana@customer".into(),
                    exit_code: 0,
                },
                S::Completed,
            ),
            (
                S::OutputPendingApproval,
                OpEvent::OutputReleased {
                    by: "ana@customer".into(),
                    exit_code: 3,
                },
                S::Failed,
            ),
            (
                S::OutputPendingApproval,
                OpEvent::OutputDenied {
                    by: "ana@customer".into(),
                    message: None,
                },
                S::Denied,
            ),
            (S::OutputPendingApproval, OpEvent::Expired, S::Expired),
            (S::OutputPendingApproval, OpEvent::AgentDenied, S::Denied),
        ];
        table
            .iter()
            .find(|(s, ev, _)| *s == state && ev == e)
            .map(|(_, _, to)| *to)
    }

    #[test]
    fn every_state_and_event() {
        let events = all_events();
        let mut legal_count = 0;
        for state in ALL_STATES {
            for e in &events {
                let got = next(state, e);
                match legal(state, e) {
                    Some(to) => {
                        legal_count += 1;
                        assert_eq!(got, Ok(to), "{} + {}", state.as_str(), e.name());
                    }
                    None => {
                        assert_eq!(
                            got,
                            Err(TransitionError {
                                state,
                                event: e.name()
                            }),
                            "{} + {}",
                            state.as_str(),
                            e.name()
                        );
                    }
                }
            }
        }
        assert_eq!(legal_count, 32, "every row of the table was reached");
    }

    #[test]
    fn final_states_accept_nothing() {
        for state in ALL_STATES.into_iter().filter(|s| s.is_final()) {
            for e in all_events() {
                let err = next(state, &e).unwrap_err();
                let text = err.to_string();
                assert!(
                    text.contains(state.as_str())
                        && text.contains(e.name())
                        && text.contains("finished"),
                    "{text}"
                );
            }
        }
        let err = next(S::Running, &OpEvent::CommandApproved { by: "x".into() }).unwrap_err();
        assert_eq!(
            err.to_string(),
            "an op in state running cannot take the event command-approved"
        );
    }

    #[test]
    fn only_running_or_releasing_ops_take_output() {
        for state in ALL_STATES {
            assert_eq!(
                op_takes_output(state),
                state == S::Running || state == S::OutputPendingApproval,
                "{}",
                state.as_str()
            );
        }
    }

    #[test]
    fn refusals_are_conflicts_that_name_the_op_its_state_and_what_to_do() {
        let e = next(S::Denied, &OpEvent::CommandApproved { by: "bob".into() })
            .unwrap_err()
            .to_api_error("op_1");
        assert_eq!(e.code, ErrorCode::Conflict);
        assert_eq!(
            e.message,
            "op op_1 has ended as denied; nothing changes it any more (refused: command-approved)"
        );
        assert!(e.hint.contains("new op"), "{}", e.hint);
        assert_eq!(e.details["state"], "denied");
        assert_eq!(e.details["ended"], true);
        let e = next(
            S::Running,
            &OpEvent::CommandDenied {
                by: "bob".into(),
                message: None,
            },
        )
        .unwrap_err()
        .to_api_error("op_2");
        assert_eq!(
            e.message,
            "op op_2 is running, which does not take command-denied"
        );
        assert!(e.hint.contains("postern ops get op_2"), "{}", e.hint);
    }

    #[test]
    fn happy_paths_end_to_end() {
        let run = |events: &[OpEvent]| events.iter().try_fold(S::PendingApproval, next);
        let by = || "ana@customer".to_string();
        // Automatic policy: approve, dispatch, run, finish, output streamed.
        assert_eq!(
            run(&[
                OpEvent::CommandApproved {
                    by: "policy:automatic".into()
                },
                OpEvent::Dispatched,
                OpEvent::Started,
                OpEvent::Finished {
                    exit_code: 0,
                    output_held: false
                }
            ]),
            Ok(S::Completed)
        );
        // Manual: command approval, then output approval of a failing command.
        assert_eq!(
            run(&[
                OpEvent::CommandApproved { by: by() },
                OpEvent::Dispatched,
                OpEvent::Started,
                OpEvent::Finished {
                    exit_code: 1,
                    output_held: true
                },
                OpEvent::OutputReleased {
                    by: by(),
                    exit_code: 1
                },
            ]),
            Ok(S::Failed)
        );
        // Approved in a window, dispatched after it closed: back to approval, then a person.
        assert_eq!(
            run(&[
                OpEvent::CommandApproved {
                    by: "policy:window".into()
                },
                OpEvent::PolicyRecheckFailed,
                OpEvent::CommandApproved { by: by() },
                OpEvent::Started,
                OpEvent::TimedOut,
            ]),
            Ok(S::TimedOut)
        );
    }

    #[test]
    fn event_names_are_distinct() {
        let mut names: Vec<&str> = all_events().iter().map(OpEvent::name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 15);
    }

    // ---- grants ----

    #[test]
    fn grant_expires_at_the_exact_second() {
        let at = ts("2026-03-02T10:30:00Z");
        let before = ts("2026-03-02T10:29:59.999999999Z");
        assert_eq!(
            grant_state(GrantState::Active, Some(at), before),
            GrantState::Active
        );
        assert_eq!(
            grant_state(GrantState::Active, Some(at), at),
            GrantState::Expired
        );
        assert_eq!(
            grant_state(GrantState::Active, Some(at), ts("2026-03-03T00:00:00Z")),
            GrantState::Expired
        );
        assert_eq!(
            grant_state(GrantState::Active, None, ts("2099-01-01T00:00:00Z")),
            GrantState::Active
        );
        // Only active grants expire: the others keep their decision.
        for s in [
            GrantState::PendingApproval,
            GrantState::Denied,
            GrantState::Revoked,
            GrantState::Expired,
        ] {
            assert_eq!(grant_state(s, Some(at), ts("2026-03-03T00:00:00Z")), s);
            assert_eq!(grant_state(s, None, before), s);
        }
    }

    #[test]
    fn only_live_operate_grants_authorise_ops() {
        use GrantLevel::*;
        for level in [Install, SteadyState, Deploy, Operate] {
            for state in [
                GrantState::PendingApproval,
                GrantState::Active,
                GrantState::Denied,
                GrantState::Expired,
                GrantState::Revoked,
            ] {
                assert_eq!(
                    grant_authorises_ops(level, state),
                    level == Operate && state == GrantState::Active,
                    "{} {}",
                    level.as_str(),
                    state.as_str()
                );
            }
        }
    }

    fn grant(
        id: &str,
        level: GrantLevel,
        state: GrantState,
        expires_at: Option<&str>,
    ) -> GrantRecord {
        GrantRecord {
            id: id.into(),
            level,
            state,
            appliance_id: "app_1".into(),
            app: "shop".into(),
            customer: "acme".into(),
            requested_by: "dev@vendor".into(),
            reason: "debug".into(),
            duration_s: 1800,
            requested_at: ts("2026-03-02T09:55:00Z"),
            approved_at: Some(ts("2026-03-02T10:00:00Z")),
            expires_at: expires_at.map(ts),
            decided_by: Some("ana@customer".into()),
            message: None,
            refused: None,
        }
    }

    #[test]
    fn live_operate_grant_or_the_right_refusal() {
        let now = ts("2026-03-02T10:30:00Z");
        let deploy = grant(
            "g_deploy",
            GrantLevel::Deploy,
            GrantState::Active,
            Some("2026-03-02T12:00:00Z"),
        );
        let pending = grant(
            "g_pending",
            GrantLevel::Operate,
            GrantState::PendingApproval,
            None,
        );

        let e = live_operate_grant("shop", "acme", [&deploy, &pending], now).unwrap_err();
        assert_eq!(e.code, ErrorCode::OperateAccessRequired);
        assert!(
            e.hint
                .contains("postern access request --app shop --customer acme --level operate"),
            "{}",
            e.hint
        );

        // Expiring at exactly `now` is expired, and says so.
        let ran_out = grant(
            "g_old",
            GrantLevel::Operate,
            GrantState::Active,
            Some("2026-03-02T10:30:00Z"),
        );
        let e = live_operate_grant("shop", "acme", [&deploy, &ran_out, &pending], now).unwrap_err();
        assert_eq!(e.code, ErrorCode::OperateAccessExpired);
        assert!(e.message.contains("2026-03-02T10:30:00Z"), "{}", e.message);
        assert_eq!(e.details["grant_id"], "g_old");
        assert!(e.hint.contains("postern access request"), "{}", e.hint);
        assert_eq!(
            live_operate_grant("shop", "acme", [&ran_out], ts("2026-03-02T10:29:59Z"))
                .unwrap()
                .id,
            "g_old"
        );

        // With several live grants, the longest lasting one.
        let short = grant(
            "g_short",
            GrantLevel::Operate,
            GrantState::Active,
            Some("2026-03-02T10:45:00Z"),
        );
        let long = grant(
            "g_long",
            GrantLevel::Operate,
            GrantState::Active,
            Some("2026-03-02T11:45:00Z"),
        );
        assert_eq!(
            live_operate_grant("shop", "acme", [&short, &ran_out, &long], now)
                .unwrap()
                .id,
            "g_long"
        );
        assert_eq!(
            live_operate_grant("shop", "acme", [&long, &short], now)
                .unwrap()
                .id,
            "g_long"
        );

        // Denied and revoked grants are not "expired": there is simply no access.
        let revoked = grant(
            "g_rev",
            GrantLevel::Operate,
            GrantState::Revoked,
            Some("2026-03-02T11:00:00Z"),
        );
        let denied = grant("g_den", GrantLevel::Operate, GrantState::Denied, None);
        let e = live_operate_grant("shop", "acme", [&revoked, &denied], now).unwrap_err();
        assert_eq!(e.code, ErrorCode::OperateAccessRequired);
    }

    // ---- op errors ----

    #[test]
    fn op_errors() {
        for s in [
            S::PendingApproval,
            S::Approved,
            S::Running,
            S::OutputPendingApproval,
            S::Completed,
        ] {
            assert_eq!(op_error(s, Some(0), None, None), None, "{}", s.as_str());
        }

        let e = op_error(
            S::Failed,
            Some(2),
            Some("error: pods \"x\" not found\n"),
            None,
        )
        .unwrap();
        assert_eq!(e.code, ErrorCode::CommandFailed);
        assert!(e.message.contains("code 2"), "{}", e.message);
        assert_eq!(e.details["exit_code"], 2);
        assert_eq!(e.details["stderr"], "error: pods \"x\" not found\n");
        assert!(!e.hint.is_empty());

        let e = op_error(
            S::Failed,
            None,
            None,
            Some("no live operate grant at the agent"),
        )
        .unwrap();
        assert_eq!(e.code, ErrorCode::CommandFailed);
        assert!(
            e.message.contains("refused") && e.message.contains("no live operate grant"),
            "{}",
            e.message
        );

        let e = op_error(S::Denied, None, None, Some("not during the freeze")).unwrap();
        assert_eq!(e.code, ErrorCode::ApprovalDenied);
        assert_eq!(e.message, "not during the freeze");
        assert_eq!(e.details["message"], "not during the freeze");
        let e = op_error(S::Denied, None, None, Some("  ")).unwrap();
        assert_eq!(e.message, "the customer's approver denied the op");
        assert!(e.details["message"].is_null());

        let e = op_error(S::TimedOut, None, Some("partial"), None).unwrap();
        assert_eq!(e.code, ErrorCode::CommandTimeout);
        assert!(e.hint.contains("--timeout"), "{}", e.hint);

        let e = op_error(S::Expired, None, None, None).unwrap();
        assert_eq!(e.code, ErrorCode::OperateAccessExpired);
        assert!(e.hint.contains("postern access request"), "{}", e.hint);
    }
}
