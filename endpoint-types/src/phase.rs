//! The phase an endpoint or op runs under (`--phase operate|deploy|install`): which grant it
//! needs and, at the appliance, which identity it uses at the target. Steady-state is the
//! appliance's own read-only observability: it opens no endpoint and runs no op.

use crate::{
    control::{GrantLevel, GrantState},
    ApiError, ErrorCode,
};

/// The phase of a request, record or frame that does not say (older peers): operate.
pub fn operate() -> GrantLevel {
    GrantLevel::Operate
}

/// Frames leave an operate phase out, so an older peer reads the frame it always did.
pub fn is_operate(phase: &GrantLevel) -> bool {
    *phase == GrantLevel::Operate
}

/// The phases an endpoint or op may ask for.
pub const ACTIVE_PHASES: [GrantLevel; 3] =
    [GrantLevel::Operate, GrantLevel::Deploy, GrantLevel::Install];

/// Refuses a phase that can open no endpoint and run no op (steady-state).
pub fn check_active(phase: GrantLevel) -> Result<GrantLevel, ApiError> {
    if ACTIVE_PHASES.contains(&phase) {
        return Ok(phase);
    }
    Err(ApiError::invalid(format!(
        "the {} phase opens no endpoint and runs no op: it is the appliance's own read-only observability",
        phase.as_str()
    ))
    .hint("use --phase operate, deploy or install"))
}

/// Parses `--phase`.
pub fn parse_active(s: &str) -> Result<GrantLevel, ApiError> {
    let phase = GrantLevel::parse(s).ok_or_else(|| {
        ApiError::invalid(format!("unknown phase {s:?}"))
            .hint("use --phase operate, deploy or install")
    })?;
    check_active(phase)
}

/// Whether a grant of `level`, in `state_at_now`, authorises an endpoint or op of `phase`:
/// only a live grant of that very phase does (an operate grant unlocks no deploy identity, and
/// a deploy grant no operate one).
pub fn grant_authorises(level: GrantLevel, phase: GrantLevel, state_at_now: GrantState) -> bool {
    level == phase && ACTIVE_PHASES.contains(&phase) && state_at_now == GrantState::Active
}

/// Install is decided by a person for each use, whatever the policy says.
pub fn always_needs_person(phase: GrantLevel) -> bool {
    phase == GrantLevel::Install
}

/// The refusal when there is no live grant of `phase` (the operate case keeps its own words,
/// built where the expired grant is known).
pub fn grant_required(phase: GrantLevel, app: &str, customer: &str) -> ApiError {
    ApiError::new(
        ErrorCode::OperateAccessRequired,
        format!(
            "no live {} grant on {app}/{customer}: a {} endpoint or op needs one",
            phase.as_str(),
            phase.as_str()
        ),
    )
    .hint(format!(
        "request it: postern access request --app {app} --customer {customer} --level {} --duration 30m --reason \"…\"",
        phase.as_str()
    ))
    .details(serde_json::json!({ "phase": phase.as_str() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use GrantLevel::*;

    #[test]
    fn only_a_live_grant_of_the_same_phase_authorises() {
        let states = [
            GrantState::PendingApproval,
            GrantState::Active,
            GrantState::Denied,
            GrantState::Expired,
            GrantState::Revoked,
        ];
        for level in [Install, SteadyState, Deploy, Operate] {
            for phase in [Install, SteadyState, Deploy, Operate] {
                for state in states {
                    assert_eq!(
                        grant_authorises(level, phase, state),
                        level == phase && phase != SteadyState && state == GrantState::Active,
                        "{} {} {}",
                        level.as_str(),
                        phase.as_str(),
                        state.as_str()
                    );
                }
            }
        }
    }

    #[test]
    fn steady_state_and_unknown_phases_are_refused() {
        assert_eq!(parse_active("deploy").unwrap(), Deploy);
        assert_eq!(parse_active("install").unwrap(), Install);
        assert_eq!(parse_active("operate").unwrap(), Operate);
        let e = parse_active("steady-state").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("opens no endpoint"), "{}", e.message);
        assert_eq!(
            parse_active("root").unwrap_err().code,
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn only_install_always_needs_a_person() {
        assert!(always_needs_person(Install));
        for p in [SteadyState, Deploy, Operate] {
            assert!(!always_needs_person(p));
        }
    }
}
