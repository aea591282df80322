//! The grant state machine. Every change of a grant's state (a person's decision, a revocation,
//! the clock running out) goes through [`next`]; the gateway writes the result with a
//! compare-and-set on the state it read, so of two racing deciders exactly one moves it.
//!
//! ```text
//! pending-approval --approve--> active --revoke--> revoked
//!        |  \--deny--> denied          \--expire--> expired
//!        \--revoke--> revoked   (the requester withdraws it before anyone decided)
//! ```
//! `denied`, `expired` and `revoked` are end states: they take no event. Expiry is derived from
//! `expires_at` and the clock ([`super::grant_state`]), so callers pass the state *at now*.

use super::{transition, Machine, TableMachine};
use crate::control::GrantState;

/// What happens to a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrantEvent {
    /// A customer approver (or the customer's policy) approves the request.
    Approve,
    /// A customer approver denies it.
    Deny,
    /// Its requester, an admin or an approver ends it (before or after the decision).
    Revoke,
    /// Its duration (or the window that approved it) ran out.
    Expire,
}

impl GrantEvent {
    pub const ALL: [GrantEvent; 4] = [
        GrantEvent::Approve,
        GrantEvent::Deny,
        GrantEvent::Revoke,
        GrantEvent::Expire,
    ];

    /// A stable name for errors, logs and audit records.
    pub fn name(self) -> &'static str {
        match self {
            GrantEvent::Approve => "approve",
            GrantEvent::Deny => "deny",
            GrantEvent::Revoke => "revoke",
            GrantEvent::Expire => "expire",
        }
    }
}

pub const ALL_STATES: [GrantState; 5] = [
    GrantState::PendingApproval,
    GrantState::Active,
    GrantState::Denied,
    GrantState::Expired,
    GrantState::Revoked,
];

/// Whether a grant in `state` has ended for good.
pub fn is_final(state: GrantState) -> bool {
    GrantMachine::FINAL_STATES.contains(&state)
}

/// The grant machine, as its refusals describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantMachine;

impl Machine for GrantMachine {
    type State = GrantState;
    type Event = GrantEvent;
    const RECORD: &'static str = "grant";
    const ARTICLE: &'static str = "a";
    const ENDED_NOTE: &'static str = " (the grant has ended)";
    const AFTER_END: &'static str = "nothing to do for this grant; for access again, request a new one: postern access request --app APP --customer CUSTOMER --level operate --duration 30m --reason \"…\"";

    fn state_name(state: GrantState) -> &'static str {
        state.as_str()
    }
    fn event_name(event: GrantEvent) -> &'static str {
        event.name()
    }
    fn is_final(state: GrantState) -> bool {
        is_final(state)
    }
    fn otherwise_hint(id: &str) -> String {
        format!("`postern access list` shows grant {id}; `postern approvals list` shows what waits for a decision")
    }
}

impl TableMachine for GrantMachine {
    const TRANSITIONS: &'static [(GrantState, GrantEvent, GrantState)] = &[
        (
            GrantState::PendingApproval,
            GrantEvent::Approve,
            GrantState::Active,
        ),
        (
            GrantState::PendingApproval,
            GrantEvent::Deny,
            GrantState::Denied,
        ),
        (
            GrantState::PendingApproval,
            GrantEvent::Revoke,
            GrantState::Revoked,
        ),
        (GrantState::Active, GrantEvent::Revoke, GrantState::Revoked),
        (GrantState::Active, GrantEvent::Expire, GrantState::Expired),
    ];
    const FINAL_STATES: &'static [GrantState] =
        &[GrantState::Denied, GrantState::Expired, GrantState::Revoked];
}

/// An event the grant's state does not accept (an end state accepts none).
pub type TransitionError = transition::TransitionError<GrantMachine>;

/// The grant state machine (see the module docs).
pub fn next(state: GrantState, event: GrantEvent) -> Result<GrantState, TransitionError> {
    transition::step(state, event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use GrantEvent as E;
    use GrantState as S;

    #[test]
    fn every_state_and_event() {
        let legal = [
            (S::PendingApproval, E::Approve, S::Active),
            (S::PendingApproval, E::Deny, S::Denied),
            (S::PendingApproval, E::Revoke, S::Revoked),
            (S::Active, E::Revoke, S::Revoked),
            (S::Active, E::Expire, S::Expired),
        ];
        super::super::transition::check_every_state_and_event::<GrantMachine>(
            &ALL_STATES,
            &GrantEvent::ALL,
            &legal,
            next,
        );
    }

    #[test]
    fn ended_grants_take_nothing_and_say_so() {
        for state in ALL_STATES.into_iter().filter(|s| is_final(*s)) {
            for event in GrantEvent::ALL {
                let err = next(state, event).unwrap_err();
                assert!(err.to_string().contains("has ended"), "{err}");
                let api = err.to_api_error("gr_1");
                assert_eq!(api.code, ErrorCode::Conflict);
                assert_eq!(api.code.http_status(), 409);
                assert!(
                    api.message.contains("gr_1") && api.message.contains(state.as_str()),
                    "{}",
                    api.message
                );
                assert!(api.hint.contains("postern access request"), "{}", api.hint);
                assert_eq!(api.details["state"], state.as_str());
                assert_eq!(api.details["event"], event.name());
                assert_eq!(api.details["ended"], true);
            }
        }
        let api = next(S::Active, E::Approve)
            .unwrap_err()
            .to_api_error("gr_2");
        assert_eq!(
            api.message,
            "grant gr_2 is active, which does not take approve"
        );
        assert_eq!(api.details["ended"], false);
    }
}
