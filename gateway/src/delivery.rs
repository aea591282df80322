//! Acknowledged, sequenced delivery of the commands an agent must not miss.
//!
//! What the agent allows (its live grants and endpoints, the ops it runs, the held output it
//! keeps) is decided by the gateway and told to the agent on the control stream. Losing one of
//! those frames would leave the agent honouring a revoked grant or a retired endpoint, so they
//! are delivered like this:
//!
//! - Each such frame (see [`ToAgent::is_command`]) is wrapped in `ToAgent::Command { seq, .. }` when the
//!   connection's control loop writes it. `seq` counts from 1 per connection; the control stream
//!   is ordered, so the agent applies commands in `seq` order and answers `CommandAck { seq }`
//!   after applying each one. An ack covers every command up to its `seq`.
//! - The [`AckWindow`] holds the commands written but not yet acknowledged, each with a deadline
//!   (`agent_lost_after` from when it was written). An overdue command, an ack for a command never
//!   sent, or a command that cannot be queued (`AgentRegistry::send` finds the 256-slot queue full)
//!   all drop the connection. Nothing is retried on the old connection.
//! - On reconnect the gateway sends the full state first (`GrantSync`, then `EndpointSync`, as
//!   commands 1 and 2, read from the store after the new connection is registered) and the
//!   deltas after it. The store is the source of truth, so a dropped connection loses nothing:
//!   whatever was in flight is in the full state. The agent serves no data stream until it has
//!   applied that full state (tunnel-client/src/tunnel.rs), so a revocation made while it was
//!   away (or stopped) is the first thing it applies.
//!
//! The window is sans-IO: it takes the time as an argument and is unit-tested below.

use endpoint_types::frame::{AgentCommand, ToAgent};
use std::collections::VecDeque;

/// Why a connection's delivery failed; each one drops the connection so the agent resyncs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("the agent did not acknowledge command {seq} in time")]
    Overdue { seq: u64 },
    #[error("the agent acknowledged command {seq}, which was never sent (last sent: {last})")]
    UnknownAck { seq: u64, last: u64 },
}

/// The commands written on one connection and not yet acknowledged, oldest first.
/// `I` is the clock's instant (`tokio::time::Instant` in the relay, plain numbers in tests).
#[derive(Debug)]
pub struct AckWindow<I> {
    outstanding: VecDeque<(u64, I)>,
    last_sent: u64,
}

impl<I: Ord + Copy> Default for AckWindow<I> {
    fn default() -> Self {
        AckWindow {
            outstanding: VecDeque::new(),
            last_sent: 0,
        }
    }
}

impl<I: Ord + Copy> AckWindow<I> {
    /// Records command `seq` as written, due to be acknowledged by `deadline`. Sequence numbers
    /// are pushed in increasing order (the caller numbers them).
    pub fn push(&mut self, seq: u64, deadline: I) {
        debug_assert!(seq > self.last_sent, "commands are numbered in order");
        self.last_sent = seq;
        self.outstanding.push_back((seq, deadline));
    }

    /// The agent applied every command up to `seq`. An ack for a command already acknowledged
    /// is harmless; one for a command never sent is a protocol error.
    pub fn ack(&mut self, seq: u64) -> Result<(), DeliveryError> {
        if seq > self.last_sent {
            return Err(DeliveryError::UnknownAck {
                seq,
                last: self.last_sent,
            });
        }
        while self.outstanding.front().is_some_and(|(s, _)| *s <= seq) {
            self.outstanding.pop_front();
        }
        Ok(())
    }

    /// The oldest command whose deadline has passed, if any.
    pub fn expired(&self, now: I) -> Option<u64> {
        // Deadlines grow with seq (same bound, later write), so the oldest is due first.
        self.outstanding
            .front()
            .filter(|(_, deadline)| *deadline <= now)
            .map(|(seq, _)| *seq)
    }

    /// Commands written and not acknowledged yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    pub fn last_sent(&self) -> u64 {
        self.last_sent
    }
}

/// One connection's outgoing side: numbers commands and keeps the window.
#[derive(Debug)]
pub struct Delivery<I> {
    window: AckWindow<I>,
}

impl<I: Ord + Copy> Default for Delivery<I> {
    fn default() -> Self {
        Delivery {
            window: AckWindow::default(),
        }
    }
}

impl<I: Ord + Copy> Delivery<I> {
    /// The frame as it goes on the wire: a command is numbered and must be acknowledged by
    /// `deadline`; anything else passes unchanged.
    pub fn outgoing(&mut self, frame: ToAgent, deadline: I) -> ToAgent {
        let command = match AgentCommand::try_from(frame) {
            Ok(command) => command,
            Err(other) => return other,
        };
        let seq = self.window.last_sent() + 1;
        self.window.push(seq, deadline);
        ToAgent::Command { seq, command }
    }

    pub fn acked(&mut self, seq: u64) -> Result<(), DeliveryError> {
        self.window.ack(seq)
    }

    /// An error if a command is overdue at `now`.
    pub fn check(&self, now: I) -> Result<(), DeliveryError> {
        match self.window.expired(now) {
            Some(seq) => Err(DeliveryError::Overdue { seq }),
            None => Ok(()),
        }
    }

    pub fn outstanding(&self) -> usize {
        self.window.outstanding()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_types::resource::CloseReason;

    fn close(id: &str) -> ToAgent {
        ToAgent::EndpointClose {
            endpoint_id: id.into(),
            reason: CloseReason::Retired,
        }
    }

    #[test]
    fn acks_are_cumulative_and_clear_the_window() {
        let mut w = AckWindow::<u64>::default();
        w.push(1, 10);
        w.push(2, 11);
        w.push(3, 12);
        assert_eq!(w.outstanding(), 3);
        w.ack(2).unwrap();
        assert_eq!(w.outstanding(), 1);
        assert_eq!(w.expired(11), None, "1 and 2 are acknowledged");
        assert_eq!(w.expired(12), Some(3));
        w.ack(3).unwrap();
        assert_eq!(w.outstanding(), 0);
        assert_eq!(w.expired(u64::MAX), None);
        // A repeated ack is harmless.
        w.ack(1).unwrap();
    }

    #[test]
    fn the_oldest_unacknowledged_command_expires_first() {
        let mut w = AckWindow::<u64>::default();
        w.push(1, 100);
        w.push(2, 150);
        assert_eq!(w.expired(99), None);
        assert_eq!(w.expired(100), Some(1));
        assert_eq!(w.expired(200), Some(1));
        w.ack(1).unwrap();
        assert_eq!(w.expired(149), None);
        assert_eq!(w.expired(150), Some(2));
    }

    #[test]
    fn an_ack_for_a_command_never_sent_is_refused() {
        let mut w = AckWindow::<u64>::default();
        assert_eq!(w.ack(1), Err(DeliveryError::UnknownAck { seq: 1, last: 0 }));
        w.push(1, 5);
        assert_eq!(w.ack(2), Err(DeliveryError::UnknownAck { seq: 2, last: 1 }));
        assert_eq!(w.outstanding(), 1, "a bad ack clears nothing");
    }

    #[test]
    fn commands_are_numbered_in_order_and_other_frames_pass() {
        let mut d = Delivery::<u64>::default();
        let hb = d.outgoing(ToAgent::Heartbeat { seq: 7 }, 10);
        assert_eq!(hb, ToAgent::Heartbeat { seq: 7 });
        let fetch = ToAgent::OutputFetch { op_id: "o".into() };
        assert_eq!(d.outgoing(fetch.clone(), 10), fetch);
        assert_eq!(d.outstanding(), 0);
        let sync = ToAgent::GrantSync { grants: vec![] };
        assert_eq!(
            d.outgoing(sync.clone(), 10),
            ToAgent::Command {
                seq: 1,
                command: AgentCommand::GrantSync { grants: vec![] }
            }
        );
        assert_eq!(
            d.outgoing(close("e1"), 20),
            ToAgent::Command {
                seq: 2,
                command: AgentCommand::EndpointClose {
                    endpoint_id: "e1".into(),
                    reason: CloseReason::Retired,
                }
            }
        );
        assert_eq!(d.check(10), Err(DeliveryError::Overdue { seq: 1 }));
        d.acked(1).unwrap();
        assert_eq!(d.check(19), Ok(()));
        assert_eq!(d.check(20), Err(DeliveryError::Overdue { seq: 2 }));
        d.acked(2).unwrap();
        assert_eq!(d.check(u64::MAX), Ok(()));
    }

    #[test]
    fn every_command_that_changes_what_the_agent_allows_is_sequenced() {
        for f in [
            ToAgent::GrantSync { grants: vec![] },
            ToAgent::EndpointSync { endpoints: vec![] },
            close("e"),
            ToAgent::OutputRelease {
                op_id: "o".into(),
                approved_by: "a".into(),
                signed_decision: None,
            },
            ToAgent::OutputDestroy {
                op_id: "o".into(),
                denied_by: "a".into(),
                message: None,
            },
            ToAgent::TrailRecords {
                records: vec![],
                lost_through: None,
            },
        ] {
            let name = f.name();
            assert!(f.is_command(), "{name}");
            let mut d = Delivery::<u64>::default();
            assert!(
                matches!(d.outgoing(f, 0), ToAgent::Command { seq: 1, command } if command.name() == name),
                "{name}"
            );
        }
        for f in [
            ToAgent::Heartbeat { seq: 1 },
            ToAgent::HeartbeatAck { seq: 1 },
            ToAgent::OutputFetch { op_id: "o".into() },
        ] {
            assert!(!f.is_command(), "{}", f.name());
            let mut d = Delivery::<u64>::default();
            assert_eq!(d.outgoing(f.clone(), 0), f);
            assert_eq!(d.outstanding(), 0);
        }
    }
}
