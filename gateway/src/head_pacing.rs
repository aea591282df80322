//! How often one agent connection is sent the vendor trail's latest signed head
//! (crate::audit_heads), sans IO.
//!
//! The gateway signs a head every hundred records. Sending each one to every connected agent
//! made every hundred vendor records cost a frame, a signature check and a trail record on
//! each of a thousand appliances. An anchor has to be recent, not every head: a connection is
//! sent the latest head when it connects, and then, as heads are signed, at most one per
//! interval (the first at once if none went out within the interval), always the latest: it
//! signs the chain the heads in between are part of.

use std::{ops::Add, time::Duration};

/// One connection's pacing of heads. `I` is the clock's instant (`tokio::time::Instant` in the
/// relay, plain numbers in tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadPacer<I> {
    every: Duration,
    last_sent: Option<I>,
    /// A head newer than the last one sent is waiting.
    waiting: bool,
}

impl<I: Copy + Ord + Add<Duration, Output = I>> HeadPacer<I> {
    pub fn new(every: Duration) -> Self {
        HeadPacer {
            every,
            last_sent: None,
            waiting: false,
        }
    }

    /// A newer head was signed; true if it goes now (otherwise at [`HeadPacer::next_at`]).
    pub fn changed(&mut self, now: I) -> bool {
        self.waiting = true;
        self.next_at(now).is_some_and(|at| at <= now)
    }

    /// When the waiting head goes (`now` at the earliest); `None` while nothing waits.
    pub fn next_at(&self, now: I) -> Option<I> {
        self.waiting
            .then(|| self.last_sent.map_or(now, |t| (t + self.every).max(now)))
    }

    /// The latest head was written to the connection.
    pub fn sent(&mut self, now: I) {
        self.last_sent = Some(now);
        self.waiting = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Milliseconds, as the clock.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    struct Ms(u64);

    impl Add<Duration> for Ms {
        type Output = Ms;
        fn add(self, d: Duration) -> Ms {
            Ms(self.0 + d.as_millis() as u64)
        }
    }

    const EVERY: Duration = Duration::from_secs(60);

    #[test]
    fn the_first_head_goes_at_once_then_at_most_one_per_interval() {
        let mut p = HeadPacer::new(EVERY);
        assert_eq!(p.next_at(Ms(0)), None, "nothing waits");
        assert!(
            p.changed(Ms(5)),
            "the first head of a connection goes at once"
        );
        p.sent(Ms(5));
        assert_eq!(p.next_at(Ms(6)), None);
        // A burst of heads within the interval: none goes now, the latest goes when it ends.
        for t in [10, 20_000, 59_000] {
            assert!(!p.changed(Ms(t)));
            assert_eq!(p.next_at(Ms(t)), Some(Ms(60_005)));
        }
        assert_eq!(p.next_at(Ms(61_000)), Some(Ms(61_000)), "overdue: now");
        p.sent(Ms(60_005));
        // Quiet for longer than the interval: the next head goes at once again.
        assert!(p.changed(Ms(200_000)));
        p.sent(Ms(200_000));
        assert!(!p.changed(Ms(200_001)));
    }

    #[test]
    fn a_head_sent_on_connect_starts_the_interval() {
        let mut p = HeadPacer::new(EVERY);
        // The latest head, sent as the connection starts.
        p.sent(Ms(1_000));
        assert!(!p.changed(Ms(2_000)));
        assert_eq!(p.next_at(Ms(2_000)), Some(Ms(61_000)));
    }

    #[test]
    fn a_zero_interval_sends_every_head() {
        let mut p = HeadPacer::new(Duration::ZERO);
        for t in 0..5 {
            assert!(p.changed(Ms(t)));
            p.sent(Ms(t));
        }
    }
}
