//! The endpoint state machine. Every change of an endpoint's state goes through [`next`]; the
//! gateway writes the result with a compare-and-set on the state it read, so a retire racing
//! an approval (or two gateway replicas) cannot both move it.
//!
//! ```text
//! pending-approval --approve--> active --retire--> retired   (also: grant revoked, appliance revoked)
//!        |  \--deny--> denied          \--expire--> expired
//!        |--retire--> retired   (withdrawn before anyone decided)
//!        \--expire--> expired   (its operate grant ended before anyone decided)
//! ```
//! `denied`, `retired` and `expired` are end states: they take no event, so a retired request
//! can never be approved into an active endpoint.

use super::{transition, Machine, TableMachine};
use crate::api::EndpointState;

/// What happens to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndpointEvent {
    /// A customer approver (or the customer's policy) approves it: it starts listening.
    Approve,
    /// A customer approver denies it.
    Deny,
    /// Retired by a person, or ended because its grant or appliance was revoked.
    Retire,
    /// Its TTL, its grant or the window that approved it ran out.
    Expire,
}

impl EndpointEvent {
    pub const ALL: [EndpointEvent; 4] = [
        EndpointEvent::Approve,
        EndpointEvent::Deny,
        EndpointEvent::Retire,
        EndpointEvent::Expire,
    ];

    /// A stable name for errors, logs and audit records.
    pub fn name(self) -> &'static str {
        match self {
            EndpointEvent::Approve => "approve",
            EndpointEvent::Deny => "deny",
            EndpointEvent::Retire => "retire",
            EndpointEvent::Expire => "expire",
        }
    }
}

pub const ALL_STATES: [EndpointState; 5] = [
    EndpointState::PendingApproval,
    EndpointState::Active,
    EndpointState::Denied,
    EndpointState::Retired,
    EndpointState::Expired,
];

/// Whether an endpoint in `state` has ended for good.
pub fn is_final(state: EndpointState) -> bool {
    EndpointMachine::FINAL_STATES.contains(&state)
}

/// The endpoint machine, as its refusals describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointMachine;

impl Machine for EndpointMachine {
    type State = EndpointState;
    type Event = EndpointEvent;
    const RECORD: &'static str = "endpoint";
    const ARTICLE: &'static str = "an";
    const ENDED_NOTE: &'static str = " (the endpoint has ended)";
    const AFTER_END: &'static str = "its credentials are dead for good; for access again, the operator creates a new endpoint: postern ops endpoint create …";

    fn state_name(state: EndpointState) -> &'static str {
        state.as_str()
    }
    fn event_name(event: EndpointEvent) -> &'static str {
        event.name()
    }
    fn is_final(state: EndpointState) -> bool {
        is_final(state)
    }
    fn otherwise_hint(id: &str) -> String {
        format!("`postern ops endpoint get {id}` shows the endpoint; `postern approvals list` shows what waits for a decision")
    }
}

impl TableMachine for EndpointMachine {
    const TRANSITIONS: &'static [(EndpointState, EndpointEvent, EndpointState)] = &[
        (
            EndpointState::PendingApproval,
            EndpointEvent::Approve,
            EndpointState::Active,
        ),
        (
            EndpointState::PendingApproval,
            EndpointEvent::Deny,
            EndpointState::Denied,
        ),
        (
            EndpointState::PendingApproval,
            EndpointEvent::Retire,
            EndpointState::Retired,
        ),
        (
            EndpointState::Active,
            EndpointEvent::Retire,
            EndpointState::Retired,
        ),
        (
            EndpointState::PendingApproval,
            EndpointEvent::Expire,
            EndpointState::Expired,
        ),
        (
            EndpointState::Active,
            EndpointEvent::Expire,
            EndpointState::Expired,
        ),
    ];
    const FINAL_STATES: &'static [EndpointState] = &[
        EndpointState::Denied,
        EndpointState::Retired,
        EndpointState::Expired,
    ];
}

/// An event the endpoint's state does not accept (an end state accepts none).
pub type TransitionError = transition::TransitionError<EndpointMachine>;

/// The endpoint state machine (see the module docs).
pub fn next(state: EndpointState, event: EndpointEvent) -> Result<EndpointState, TransitionError> {
    transition::step(state, event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use EndpointEvent as E;
    use EndpointState as S;

    #[test]
    fn every_state_and_event() {
        let legal = [
            (S::PendingApproval, E::Approve, S::Active),
            (S::PendingApproval, E::Deny, S::Denied),
            (S::PendingApproval, E::Retire, S::Retired),
            (S::PendingApproval, E::Expire, S::Expired),
            (S::Active, E::Retire, S::Retired),
            (S::Active, E::Expire, S::Expired),
        ];
        super::super::transition::check_every_state_and_event::<EndpointMachine>(
            &ALL_STATES,
            &EndpointEvent::ALL,
            &legal,
            next,
        );
    }

    #[test]
    fn a_retired_request_is_never_approved() {
        let retired = next(S::PendingApproval, E::Retire).unwrap();
        let api = next(retired, E::Approve).unwrap_err().to_api_error("ep_1");
        assert_eq!(api.code, ErrorCode::Conflict);
        assert_eq!(
            api.message,
            "endpoint ep_1 has ended as retired; nothing changes it any more (refused: approve)"
        );
        assert!(
            api.hint.contains("postern ops endpoint create"),
            "{}",
            api.hint
        );
        assert_eq!(api.details["ended"], true);
        for state in ALL_STATES.into_iter().filter(|s| is_final(*s)) {
            for event in EndpointEvent::ALL {
                assert!(next(state, event)
                    .unwrap_err()
                    .to_string()
                    .contains("has ended"));
            }
        }
    }
}
