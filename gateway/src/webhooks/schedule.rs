//! A delivery's life: pending until a 2xx answer (delivered) or until the next retry would
//! fall past 24 hours after it was queued (failed). Retries back off exponentially from
//! [`FIRST_RETRY`], doubling, capped at [`MAX_RETRY_DELAY`]. Pure: the caller passes `now`.

use jiff::{SignedDuration, Timestamp};
use std::time::Duration;

/// The wait after the first failed attempt.
pub const FIRST_RETRY: Duration = Duration::from_secs(2);
/// The longest wait between two attempts.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);
/// How long after it was queued a delivery is still tried.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    Pending,
    Delivered,
    /// Given up: 24 hours of retries passed, the queue overflowed, or the webhook changed.
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryState> {
        Some(match s {
            "pending" => DeliveryState::Pending,
            "delivered" => DeliveryState::Delivered,
            "failed" => DeliveryState::Failed,
            _ => return None,
        })
    }
}

/// How one attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered with this status.
    Answered(u16),
    /// No answer: refused target, DNS, connect, TLS or timeout.
    NoAnswer(String),
}

/// What to write after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfterAttempt {
    pub state: DeliveryState,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<Timestamp>,
    pub delivered_at: Option<Timestamp>,
}

/// The wait after `attempts` failed attempts (1 → [`FIRST_RETRY`], doubling, capped).
pub fn retry_delay(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(20);
    FIRST_RETRY
        .saturating_mul(1u32 << doublings)
        .min(MAX_RETRY_DELAY)
}

/// The state a pending delivery queued at `created_at` moves to after its attempt number
/// `attempts` (counting this one) ended with `outcome` at `now`. Only 2xx delivers: a redirect
/// is not followed (it could point anywhere) and counts as a failure like any other status.
pub fn after_attempt(
    created_at: Timestamp,
    attempts: u32,
    outcome: Outcome,
    now: Timestamp,
) -> AfterAttempt {
    let (last_status, last_error) = match outcome {
        Outcome::Answered(s) if (200..300).contains(&s) => {
            return AfterAttempt {
                state: DeliveryState::Delivered,
                attempts,
                last_status: Some(s),
                last_error: None,
                next_attempt_at: None,
                delivered_at: Some(now),
            }
        }
        Outcome::Answered(s) => (Some(s), Some(format!("the receiver answered {s}"))),
        Outcome::NoAnswer(e) => (None, Some(e)),
    };
    let next = SignedDuration::try_from(retry_delay(attempts))
        .ok()
        .and_then(|d| now.checked_add(d).ok());
    let deadline = SignedDuration::try_from(GIVE_UP_AFTER)
        .ok()
        .and_then(|d| created_at.checked_add(d).ok());
    match (next, deadline) {
        (Some(next), Some(deadline)) if next <= deadline => AfterAttempt {
            state: DeliveryState::Pending,
            attempts,
            last_status,
            last_error,
            next_attempt_at: Some(next),
            delivered_at: None,
        },
        _ => AfterAttempt {
            state: DeliveryState::Failed,
            attempts,
            last_status,
            last_error: last_error.map(|e| format!("{e}; given up after 24 h of retries")),
            next_attempt_at: None,
            delivered_at: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn delays_double_from_two_seconds_and_cap_at_an_hour() {
        let secs: Vec<u64> = (1..=14).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(
            secs,
            [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600, 3600, 3600]
        );
        assert_eq!(retry_delay(0), FIRST_RETRY);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY_DELAY);
    }

    #[test]
    fn a_2xx_delivers_and_anything_else_retries() {
        let d = after_attempt(t(0), 1, Outcome::Answered(204), t(1));
        assert_eq!(d.state, DeliveryState::Delivered);
        assert_eq!(d.delivered_at, Some(t(1)));
        assert_eq!(d.next_attempt_at, None);

        for outcome in [
            Outcome::Answered(503),
            Outcome::Answered(302),
            Outcome::Answered(404),
            Outcome::NoAnswer("connection refused".into()),
        ] {
            let d = after_attempt(t(0), 3, outcome.clone(), t(10));
            assert_eq!(d.state, DeliveryState::Pending, "{outcome:?}");
            assert_eq!(d.next_attempt_at, Some(t(18)), "{outcome:?}");
            assert!(d.last_error.is_some());
        }
        assert_eq!(
            after_attempt(t(0), 1, Outcome::Answered(503), t(0)).last_status,
            Some(503)
        );
    }

    #[test]
    fn retries_stop_once_the_next_would_fall_past_24_hours() {
        let day = GIVE_UP_AFTER.as_secs() as i64;
        let d = after_attempt(t(0), 30, Outcome::Answered(500), t(day - 3600));
        assert_eq!(d.state, DeliveryState::Pending);
        assert_eq!(d.next_attempt_at, Some(t(day)));
        let d = after_attempt(t(0), 31, Outcome::Answered(500), t(day - 10));
        assert_eq!(d.state, DeliveryState::Failed);
        assert_eq!(d.next_attempt_at, None);
        assert!(d.last_error.unwrap().contains("given up"));
    }

    #[test]
    fn the_whole_schedule_spans_a_day_in_a_few_dozen_attempts() {
        let (created, mut now, mut attempts) = (t(0), t(0), 0u32);
        loop {
            attempts += 1;
            let d = after_attempt(created, attempts, Outcome::Answered(503), now);
            match d.next_attempt_at {
                Some(next) => now = next,
                None => break,
            }
            assert!(attempts < 100);
        }
        assert!((30..=40).contains(&attempts), "{attempts}");
        assert!(now.duration_since(created).as_secs() > 23 * 3600);
    }

    #[test]
    fn states_round_trip() {
        for s in [
            DeliveryState::Pending,
            DeliveryState::Delivered,
            DeliveryState::Failed,
        ] {
            assert_eq!(DeliveryState::parse(s.as_str()), Some(s));
        }
        assert_eq!(DeliveryState::parse("nope"), None);
    }
}
