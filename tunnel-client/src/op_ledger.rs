//! The ops this agent ran, each moved through the op state machine shared with the gateway
//! ([`endpoint_types::lifecycle::next`]): approved when its checks let a dispatch through,
//! running once started, then finished, failed, timed out or holding output; held output ends
//! released or destroyed. A release, destroy or preview of an op in the wrong state is the
//! machine's refusal, never a second look at a map.

use endpoint_types::{
    control::OpState,
    lifecycle::{self, OpEvent, TransitionError},
};
use std::collections::{HashMap, VecDeque};

/// A bounded map that forgets its oldest entries.
pub(crate) struct Remembered<V> {
    pub(crate) map: HashMap<String, V>,
    order: VecDeque<String>,
    limit: usize,
}

impl<V> Remembered<V> {
    pub(crate) fn new(limit: usize) -> Self {
        Remembered {
            map: HashMap::new(),
            order: VecDeque::new(),
            limit,
        }
    }

    /// True when `key` is new.
    pub(crate) fn insert(&mut self, key: String, value: V) -> bool {
        let new = self.map.insert(key.clone(), value).is_none();
        if new {
            self.order.push_back(key);
        }
        while self.order.len() > self.limit {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        new
    }
}

/// Why an op did not move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotMoved {
    /// This process never ran it, or has forgotten it (ended long ago, or the agent restarted).
    Unknown,
    /// The machine refuses the event in the op's state.
    Refused(TransitionError),
}

/// Every op id this process admitted and its state. Ops that have not ended are kept until
/// they do (held output can wait for days); ended ones are remembered up to a bound, so a
/// replayed dispatch is refused and a late release is told the op has ended.
pub struct OpLedger {
    live: HashMap<String, OpState>,
    ended: Remembered<OpState>,
}

impl OpLedger {
    /// Remembers up to `ended_limit` ended ops.
    pub fn new(ended_limit: usize) -> OpLedger {
        OpLedger {
            live: HashMap::new(),
            ended: Remembered::new(ended_limit),
        }
    }

    /// A dispatch the agent's checks let through enters as `approved`; false (and nothing
    /// changes) when this op id was admitted before: each approval runs once.
    pub fn admit(&mut self, op_id: &str) -> bool {
        if self.state(op_id).is_some() {
            return false;
        }
        self.live.insert(op_id.to_string(), OpState::Approved);
        true
    }

    pub fn state(&self, op_id: &str) -> Option<OpState> {
        self.live
            .get(op_id)
            .or_else(|| self.ended.map.get(op_id))
            .copied()
    }

    /// The state op `op_id` would move to by `event`, without moving it.
    pub fn check(&self, op_id: &str, event: &OpEvent) -> Result<OpState, NotMoved> {
        let from = self.state(op_id).ok_or(NotMoved::Unknown)?;
        lifecycle::next(from, event).map_err(NotMoved::Refused)
    }

    /// Moves op `op_id` by `event`; the new state, or why it did not move.
    pub fn apply(&mut self, op_id: &str, event: &OpEvent) -> Result<OpState, NotMoved> {
        let to = self.check(op_id, event)?;
        if to.is_final() {
            self.live.remove(op_id);
            self.ended.insert(op_id.to_string(), to);
        } else {
            self.live.insert(op_id.to_string(), to);
        }
        Ok(to)
    }
}

/// The exit code an op's end counts with, as the gateway reads it from `OpFinished`: a run
/// without one (killed by a signal, or that did not run) or one that failed with 0 counts -1.
pub fn counted_exit_code(exit_code: Option<i64>, failed: bool) -> i64 {
    match (exit_code, failed) {
        (Some(0), true) | (None, _) => -1,
        (Some(code), _) => code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OpState as S;

    fn finished(exit_code: i64, output_held: bool) -> OpEvent {
        OpEvent::Finished {
            exit_code,
            output_held,
        }
    }

    fn released() -> OpEvent {
        OpEvent::OutputReleased {
            by: "ana@customer".into(),
            exit_code: 0,
        }
    }

    fn destroyed() -> OpEvent {
        OpEvent::OutputDenied {
            by: "ana@customer".into(),
            message: None,
        }
    }

    fn refused(state: OpState, event: &OpEvent) -> Result<OpState, NotMoved> {
        Err(NotMoved::Refused(TransitionError {
            state,
            event: event.name(),
        }))
    }

    /// An op that ran and now holds its output.
    fn holding(ledger: &mut OpLedger, op_id: &str) {
        assert!(ledger.admit(op_id));
        assert_eq!(ledger.apply(op_id, &OpEvent::Started), Ok(S::Running));
        assert_eq!(
            ledger.apply(op_id, &finished(2, true)),
            Ok(S::OutputPendingApproval)
        );
    }

    #[test]
    fn a_replayed_dispatch_is_not_admitted_and_changes_nothing() {
        let mut ledger = OpLedger::new(8);
        assert!(ledger.admit("op_1"));
        assert_eq!(ledger.apply("op_1", &OpEvent::Started), Ok(S::Running));
        assert!(!ledger.admit("op_1"));
        assert_eq!(ledger.state("op_1"), Some(S::Running));
        assert_eq!(ledger.apply("op_1", &finished(0, false)), Ok(S::Completed));
        assert!(!ledger.admit("op_1"), "an ended op is remembered too");
    }

    #[test]
    fn a_second_finish_is_refused() {
        let mut ledger = OpLedger::new(8);
        assert!(ledger.admit("op_1"));
        assert_eq!(ledger.apply("op_1", &OpEvent::Started), Ok(S::Running));
        assert_eq!(ledger.apply("op_1", &finished(1, false)), Ok(S::Failed));
        assert_eq!(
            ledger.apply("op_1", &finished(0, false)),
            refused(S::Failed, &finished(0, false))
        );
        assert_eq!(
            ledger.apply("op_1", &OpEvent::TimedOut),
            refused(S::Failed, &OpEvent::TimedOut)
        );
        assert_eq!(ledger.state("op_1"), Some(S::Failed));
    }

    #[test]
    fn output_is_released_or_destroyed_only_while_held() {
        let mut ledger = OpLedger::new(8);
        // Not holding output: still running, or finished with its output streamed.
        assert!(ledger.admit("op_run"));
        assert_eq!(ledger.apply("op_run", &OpEvent::Started), Ok(S::Running));
        for event in [released(), destroyed(), OpEvent::OutputPreviewed] {
            assert_eq!(ledger.apply("op_run", &event), refused(S::Running, &event));
        }
        assert_eq!(
            ledger.apply("op_run", &finished(0, false)),
            Ok(S::Completed)
        );
        assert_eq!(
            ledger.apply("op_run", &released()),
            refused(S::Completed, &released())
        );

        // Held: previewed any number of times, then released once; nothing after that.
        holding(&mut ledger, "op_held");
        for _ in 0..2 {
            assert_eq!(
                ledger.apply("op_held", &OpEvent::OutputPreviewed),
                Ok(S::OutputPendingApproval)
            );
        }
        assert_eq!(ledger.apply("op_held", &released()), Ok(S::Completed));
        for event in [released(), destroyed(), OpEvent::OutputPreviewed] {
            assert_eq!(
                ledger.apply("op_held", &event),
                refused(S::Completed, &event)
            );
        }

        // Destroyed: a release after it is refused, and says the op has ended.
        holding(&mut ledger, "op_gone");
        assert_eq!(ledger.apply("op_gone", &destroyed()), Ok(S::Denied));
        let Err(NotMoved::Refused(e)) = ledger.apply("op_gone", &released()) else {
            panic!("a release after destroy moved the op");
        };
        assert_eq!(
            e.to_api_error("op_gone").message,
            "op op_gone has ended as denied; nothing changes it any more (refused: output-released)"
        );

        // An op this process never ran.
        assert_eq!(
            ledger.apply("op_other", &released()),
            Err(NotMoved::Unknown)
        );
    }

    #[test]
    fn live_ops_are_never_forgotten_ended_ones_are_bounded() {
        let mut ledger = OpLedger::new(2);
        holding(&mut ledger, "op_held");
        for i in 0..5 {
            let id = format!("op_{i}");
            assert!(ledger.admit(&id));
            assert_eq!(ledger.apply(&id, &OpEvent::AgentRefused), Ok(S::Failed));
        }
        assert_eq!(ledger.state("op_held"), Some(S::OutputPendingApproval));
        assert_eq!(ledger.state("op_0"), None);
        assert_eq!(ledger.state("op_4"), Some(S::Failed));
    }

    #[test]
    fn exit_codes_count_as_the_gateway_reads_them() {
        assert_eq!(counted_exit_code(Some(0), false), 0);
        assert_eq!(counted_exit_code(Some(3), true), 3);
        assert_eq!(counted_exit_code(Some(0), true), -1);
        assert_eq!(counted_exit_code(None, true), -1);
    }
}
