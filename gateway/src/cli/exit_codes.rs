//! The exit status of `postern`: what a script can tell apart without parsing the output.

use endpoint_types::{control::OpState, ApiError, ErrorCode};
use std::process::ExitCode;

/// Done; for `--wait`, the op or endpoint ended well.
pub const OK: u8 = 0;
/// An error (printed), or a waited-for op that failed or expired.
pub const ERROR: u8 = 1;
/// The command line is wrong (clap's usage errors).
pub const USAGE: u8 = 2;
/// The op or endpoint was denied by the customer (or the appliance).
pub const DENIED: u8 = 3;
/// The op ran past its own `--timeout` in the appliance.
pub const TIMED_OUT: u8 = 4;
/// `--wait-timeout` passed before the op or endpoint was decided or ended (it goes on).
pub const WAIT_TIMEOUT: u8 = 5;

/// The after-help of `postern --help`; the README repeats it.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  ok (with --wait: the op completed, the endpoint is active)
  1  error, or a waited-for op that failed or expired
  2  usage error (with --output json: {\"error\":{\"code\":\"INVALID_REQUEST\",…}} on stdout)
  3  the op or endpoint was denied
  4  the op timed out in the appliance (its --timeout)
  5  --wait-timeout passed first: error WAIT_TIMEOUT, the op goes on (`postern ops wait ID`)";

/// How a command that did its work ends: one that printed an op or an endpoint says how that
/// ended, without an error of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Failed or expired.
    EndedBadly,
    Denied,
    TimedOut,
}

impl Outcome {
    /// How an op in `state` ends the command that printed it.
    pub fn of_op(state: OpState) -> Outcome {
        match state {
            OpState::Failed | OpState::Expired => Outcome::EndedBadly,
            OpState::Denied => Outcome::Denied,
            OpState::TimedOut => Outcome::TimedOut,
            OpState::PendingApproval
            | OpState::Approved
            | OpState::Running
            | OpState::OutputPendingApproval
            | OpState::Completed => Outcome::Done,
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Outcome::Done => OK,
            Outcome::EndedBadly => ERROR,
            Outcome::Denied => DENIED,
            Outcome::TimedOut => TIMED_OUT,
        }
    }
}

/// The exit status of a command that ended in `e`.
pub fn of_error(e: &ApiError) -> ExitCode {
    ExitCode::from(match e.code {
        ErrorCode::WaitTimeout => WAIT_TIMEOUT,
        _ => ERROR,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_codes_are_distinct_and_documented() {
        let codes = [OK, ERROR, USAGE, DENIED, TIMED_OUT, WAIT_TIMEOUT];
        let mut sorted = codes.to_vec();
        sorted.dedup();
        assert_eq!(sorted.len(), codes.len());
        for c in codes {
            assert!(
                EXIT_CODES_HELP.contains(&format!("\n  {c}  ")),
                "exit code {c} is not in the help"
            );
        }
        assert_eq!(Outcome::of_op(OpState::Denied).code(), DENIED);
        assert_eq!(Outcome::of_op(OpState::TimedOut).code(), TIMED_OUT);
        assert_eq!(Outcome::of_op(OpState::Failed).code(), ERROR);
        assert_eq!(Outcome::of_op(OpState::Completed).code(), OK);
    }
}
