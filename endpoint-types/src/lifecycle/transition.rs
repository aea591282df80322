//! The one refusal the three state machines (op, grant, endpoint) give for an event a state
//! does not take. Each machine describes itself once ([`Machine`]); the error, its text and the
//! API error it becomes are the same code for all three.

use super::refusal;
use crate::error::ApiError;
use std::fmt;

/// What a state machine tells its refusals: what its records are called, how its states and
/// events are named, which states are final and what to do instead.
pub trait Machine {
    type State: Copy + fmt::Debug + PartialEq + Eq + 'static;
    /// What a refusal keeps of the event (its name for ops, whose events carry data).
    type Event: Copy + fmt::Debug + PartialEq + Eq + 'static;
    /// The record's name in API errors: `op`, `grant`, `endpoint`.
    const RECORD: &'static str;
    /// "a" or "an", for the error's text.
    const ARTICLE: &'static str;
    /// What the error's text adds when the record is in a final state.
    const ENDED_NOTE: &'static str;
    /// The hint for an event on a record that has ended.
    const AFTER_END: &'static str;

    fn state_name(state: Self::State) -> &'static str;
    fn event_name(event: Self::Event) -> &'static str;
    fn is_final(state: Self::State) -> bool;
    /// The hint for an event a live record's state does not take.
    fn otherwise_hint(id: &str) -> String;
}

/// A machine whose events carry no data (grant, endpoint): all it does is in its table, and
/// [`step`] runs every such machine the same way. The op machine's events carry exit codes and
/// holds, so it keeps its own `match`.
pub trait TableMachine: Machine {
    /// Every (state, event) the machine takes, with the state it goes to; any other pair is
    /// refused.
    const TRANSITIONS: &'static [(Self::State, Self::Event, Self::State)];
    /// The end states: they take no event.
    const FINAL_STATES: &'static [Self::State];
}

/// The state `event` moves a record of machine `M` from `state` to, or the refusal.
pub fn step<M: TableMachine>(
    state: M::State,
    event: M::Event,
) -> Result<M::State, TransitionError<M>> {
    M::TRANSITIONS
        .iter()
        .find(|(from, on, _)| *from == state && *on == event)
        .map(|(_, _, to)| *to)
        .ok_or(TransitionError { state, event })
}

/// An event the record's state does not accept (a final state accepts none).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TransitionError<M: Machine> {
    pub state: M::State,
    pub event: M::Event,
}

impl<M: Machine> TransitionError<M> {
    /// The refusal the caller sees for this event on record `id`: `CONFLICT` naming the record,
    /// its state and the event (see [`refusal`]).
    pub fn to_api_error(&self, id: &str) -> ApiError {
        refusal(
            M::RECORD,
            id,
            M::state_name(self.state),
            M::is_final(self.state),
            M::event_name(self.event),
            M::AFTER_END,
            M::otherwise_hint(id),
        )
    }
}

impl<M: Machine> fmt::Debug for TransitionError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransitionError")
            .field("record", &M::RECORD)
            .field("state", &self.state)
            .field("event", &self.event)
            .finish()
    }
}

impl<M: Machine> fmt::Display for TransitionError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} in state {} cannot take the event {}{}",
            M::ARTICLE,
            M::RECORD,
            M::state_name(self.state),
            M::event_name(self.event),
            if M::is_final(self.state) {
                M::ENDED_NOTE
            } else {
                ""
            }
        )
    }
}

impl<M: Machine> std::error::Error for TransitionError<M> {}

/// Checks a machine against its whole table: every (state, event) pair in `legal` goes to its
/// state, and every other pair is refused with that state and event.
#[cfg(test)]
pub(crate) fn check_every_state_and_event<M: Machine>(
    states: &[M::State],
    events: &[M::Event],
    legal: &[(M::State, M::Event, M::State)],
    next: impl Fn(M::State, M::Event) -> Result<M::State, TransitionError<M>>,
) {
    for &state in states {
        for &event in events {
            let want = legal
                .iter()
                .find(|(s, e, _)| *s == state && *e == event)
                .map(|(_, _, to)| *to);
            let got = next(state, event);
            let label = format!("{} + {}", M::state_name(state), M::event_name(event));
            // TransitionError's derived PartialEq would ask the machine type itself to be one.
            match (want, &got) {
                (Some(to), Ok(at)) => assert_eq!(*at, to, "{label}"),
                (None, Err(e)) => assert!(e.state == state && e.event == event, "{label}: {e:?}"),
                _ => panic!("{label}: want {want:?}, got {got:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{
        api::EndpointState,
        control::{GrantState, OpState},
        error::ErrorCode,
        lifecycle::{self, endpoint, grant},
    };

    /// The three machines' refusals read as they did when each had its own error type.
    #[test]
    fn every_machine_refuses_in_the_same_shape() {
        let op = lifecycle::TransitionError {
            state: OpState::Completed,
            event: "output-released",
        };
        assert_eq!(
            op.to_string(),
            "an op in state completed cannot take the event output-released (the op is finished)"
        );
        let gr = grant::TransitionError {
            state: GrantState::Active,
            event: grant::GrantEvent::Approve,
        };
        assert_eq!(
            gr.to_string(),
            "a grant in state active cannot take the event approve"
        );
        let ep = endpoint::TransitionError {
            state: EndpointState::Retired,
            event: endpoint::EndpointEvent::Approve,
        };
        assert_eq!(
            ep.to_string(),
            "an endpoint in state retired cannot take the event approve (the endpoint has ended)"
        );
        for (api, record, state, event, ended) in [
            (
                op.to_api_error("op_1"),
                "op",
                "completed",
                "output-released",
                true,
            ),
            (gr.to_api_error("gr_1"), "grant", "active", "approve", false),
            (
                ep.to_api_error("ep_1"),
                "endpoint",
                "retired",
                "approve",
                true,
            ),
        ] {
            assert_eq!(api.code, ErrorCode::Conflict);
            let id = api.details["id"].as_str().unwrap().to_string();
            assert_eq!(
                api.details,
                serde_json::json!({ "id": id, "record": record, "state": state, "event": event, "ended": ended })
            );
        }
        assert_eq!(
            gr.to_api_error("gr_1").hint,
            "`postern access list` shows grant gr_1; `postern approvals list` shows what waits for a decision"
        );
        assert_eq!(
            ep.to_api_error("ep_1").hint,
            "its credentials are dead for good; for access again, the operator creates a new endpoint: postern ops endpoint create …"
        );
    }
}
