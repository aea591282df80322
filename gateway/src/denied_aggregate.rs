//! Refusals anyone can cause without credentials (a failed enrollment, a tunnel attempt
//! without a client certificate) go into the vendor trail aggregated: one `denied` record per
//! source address and window (a minute by default) with a count, so a flood neither buries the
//! real records nor grows the store without bound. The aggregator's memory is bounded too: at
//! most `max_sources` distinct sources per window; refusals of further sources are counted in
//! one overflow record of the window.
//!
//! [`DeniedAggregate`] is sans-IO (it takes `now`); [`DeniedTrail`] shares it with the relay
//! and [`run`] flushes closed windows into the trail from a tracked task.

use crate::{audit::Subject, ports::AuditSink};
use endpoint_types::{ApiError, ErrorCode};
use jiff::Timestamp;
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio_util::sync::CancellationToken;

/// Windows held at once. Normally one (the current) or two (the last is being flushed); more
/// only while the trail cannot be written. Past this, refusals of a window that is not yet held
/// count as overflow of the newest.
const MAX_WINDOWS: usize = 4;
/// The reason kept per source: the first one of the window, cut to this many characters.
const REASON_CHARS: usize = 200;

/// One refusal, as the relay reports it.
#[derive(Debug, Clone, Copy)]
pub struct Denial<'a> {
    pub source: IpAddr,
    /// `enroll` or `connect`.
    pub action: &'static str,
    pub error: &'a ApiError,
}

#[derive(Debug, Default)]
struct Tally {
    count: u64,
    actions: BTreeMap<&'static str, u64>,
    codes: HashMap<ErrorCode, u64>,
    first_action: &'static str,
    first_code: Option<ErrorCode>,
    first_reason: String,
    first_at: Option<Timestamp>,
    last_at: Option<Timestamp>,
}

impl Tally {
    fn add(&mut self, now: Timestamp, action: &'static str, error: &ApiError) {
        if self.count == 0 {
            self.first_action = action;
            self.first_code = Some(error.code);
            self.first_reason = error.message.chars().take(REASON_CHARS).collect();
            self.first_at = Some(now);
        }
        self.count += 1;
        self.last_at = Some(now);
        *self.actions.entry(action).or_default() += 1;
        *self.codes.entry(error.code).or_default() += 1;
    }
}

#[derive(Debug, Default)]
struct Window {
    sources: HashMap<IpAddr, Tally>,
    /// Refusals of sources past `max_sources`.
    overflow: Tally,
}

/// A `denied` record ready for the trail.
#[derive(Debug, Clone, PartialEq)]
pub struct DeniedRecord {
    pub actor: String,
    pub detail: serde_json::Value,
}

/// The refusals of the open windows, by window start (seconds since the epoch) and source.
#[derive(Debug)]
pub struct DeniedAggregate {
    window_secs: i64,
    max_sources: usize,
    windows: BTreeMap<i64, Window>,
}

impl DeniedAggregate {
    pub fn new(window: Duration, max_sources: usize) -> DeniedAggregate {
        DeniedAggregate {
            window_secs: i64::try_from(window.as_secs()).unwrap_or(i64::MAX).max(1),
            max_sources: max_sources.max(1),
            windows: BTreeMap::new(),
        }
    }

    fn window_of(&self, now: Timestamp) -> i64 {
        now.as_second().div_euclid(self.window_secs) * self.window_secs
    }

    /// Counts one refusal at `now`.
    pub fn note(&mut self, now: Timestamp, denial: Denial<'_>) {
        let mut start = self.window_of(now);
        if !self.windows.contains_key(&start) && self.windows.len() >= MAX_WINDOWS {
            // The trail is behind: count into the newest held window instead of opening one.
            start = self.windows.keys().next_back().copied().unwrap_or(start);
        }
        let max_sources = self.max_sources;
        let window = self.windows.entry(start).or_default();
        let source = crate::admission::source_of(denial.source);
        let tally = if window.sources.contains_key(&source) || window.sources.len() < max_sources {
            window.sources.entry(source).or_default()
        } else {
            &mut window.overflow
        };
        tally.add(now, denial.action, denial.error);
    }

    /// Takes the records of the windows that ended by `now`.
    pub fn take_closed(&mut self, now: Timestamp) -> Vec<DeniedRecord> {
        let current = self.window_of(now);
        let open = self.windows.split_off(&current);
        let closed = std::mem::replace(&mut self.windows, open);
        self.records_of(closed)
    }

    /// Takes every record, the current window's too (at shutdown).
    pub fn take_all(&mut self) -> Vec<DeniedRecord> {
        let all = std::mem::take(&mut self.windows);
        self.records_of(all)
    }

    /// Sources held in all windows (for tests: bounded by `max_sources` per window).
    pub fn held_sources(&self) -> usize {
        self.windows.values().map(|w| w.sources.len()).sum()
    }

    fn records_of(&self, windows: BTreeMap<i64, Window>) -> Vec<DeniedRecord> {
        let mut out = Vec::new();
        for (start, window) in windows {
            let mut sources: Vec<_> = window.sources.into_iter().collect();
            sources.sort_by_key(|(ip, _)| *ip);
            for (ip, tally) in sources {
                out.push(self.record(format!("agent@{ip}"), start, &tally, None));
            }
            if window.overflow.count > 0 {
                out.push(self.record(
                    "system:gateway".into(),
                    start,
                    &window.overflow,
                    Some(self.max_sources),
                ));
            }
        }
        out
    }

    fn record(
        &self,
        actor: String,
        start: i64,
        tally: &Tally,
        overflow_after: Option<usize>,
    ) -> DeniedRecord {
        let at = |s: i64| Timestamp::from_second(s).map(|t| t.to_string()).ok();
        let mut detail = serde_json::json!({
            "action": tally.first_action,
            "code": tally.first_code,
            "reason": tally.first_reason,
            "aggregated": true,
            "count": tally.count,
            "actions": tally.actions,
            "codes": tally.codes.iter().map(|(c, n)| (c.to_string(), *n)).collect::<BTreeMap<_, _>>(),
            "window_start": at(start),
            "window_secs": self.window_secs,
            "first_at": tally.first_at.map(|t| t.to_string()),
            "last_at": tally.last_at.map(|t| t.to_string()),
        });
        if let (Some(after), Some(obj)) = (overflow_after, detail.as_object_mut()) {
            obj.insert("overflow".into(), true.into());
            obj.insert(
                "reason".into(),
                format!("refusals of sources past the first {after} of the window").into(),
            );
        }
        DeniedRecord { actor, detail }
    }
}

/// The aggregate as the relay shares it.
#[derive(Debug)]
pub struct DeniedTrail {
    aggregate: Mutex<DeniedAggregate>,
    window: Duration,
}

impl DeniedTrail {
    pub fn new(window: Duration, max_sources: usize) -> Arc<DeniedTrail> {
        Arc::new(DeniedTrail {
            aggregate: Mutex::new(DeniedAggregate::new(window, max_sources)),
            window,
        })
    }

    fn aggregate(&self) -> std::sync::MutexGuard<'_, DeniedAggregate> {
        self.aggregate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a refusal now; it reaches the trail when its window closes.
    pub fn note(&self, source: IpAddr, action: &'static str, error: &ApiError) {
        tracing::info!(%source, action, code = %error.code, "refused: {}", error.message);
        self.aggregate().note(
            Timestamp::now(),
            Denial {
                source,
                action,
                error,
            },
        );
    }
}

/// Writes closed windows into the trail until shutdown, then everything still held.
pub async fn run(denied: Arc<DeniedTrail>, audit: Arc<dyn AuditSink>, shutdown: CancellationToken) {
    // Often enough that a window is in the trail soon after it closes.
    let tick = (denied.window / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = interval.tick() => false,
        };
        let records = if stopping {
            denied.aggregate().take_all()
        } else {
            denied.aggregate().take_closed(Timestamp::now())
        };
        for r in records {
            audit
                .record("denied", &r.actor, Subject::default(), r.detail)
                .await;
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn invalid() -> ApiError {
        ApiError::new(ErrorCode::EnrollmentTokenInvalid, "not known")
    }

    fn deny(agg: &mut DeniedAggregate, s: i64, source: &str, action: &'static str) {
        let e = invalid();
        agg.note(
            at(s),
            Denial {
                source: ip(source),
                action,
                error: &e,
            },
        );
    }

    #[test]
    fn one_record_per_source_and_window_with_the_count() {
        let mut agg = DeniedAggregate::new(Duration::from_secs(60), 100);
        for _ in 0..500 {
            deny(&mut agg, 0, "192.0.2.1", "enroll");
        }
        deny(&mut agg, 1, "192.0.2.1", "connect");
        deny(&mut agg, 2, "192.0.2.2", "enroll");
        assert!(
            agg.take_closed(at(59)).is_empty(),
            "the window is still open"
        );
        let records = agg.take_closed(at(60));
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].actor, "agent@192.0.2.1");
        let d = &records[0].detail;
        assert_eq!(d["count"], 501);
        assert_eq!(d["action"], "enroll");
        assert_eq!(d["actions"]["connect"], 1);
        assert_eq!(d["code"], "ENROLLMENT_TOKEN_INVALID");
        assert_eq!(d["codes"]["ENROLLMENT_TOKEN_INVALID"], 501);
        assert_eq!(d["reason"], "not known");
        assert_eq!(records[1].detail["count"], 1);
        assert!(agg.take_closed(at(600)).is_empty(), "taken once");
    }

    #[test]
    fn a_later_window_gets_its_own_record_and_shutdown_takes_the_open_one() {
        let mut agg = DeniedAggregate::new(Duration::from_secs(60), 100);
        deny(&mut agg, 10, "192.0.2.1", "enroll");
        deny(&mut agg, 70, "192.0.2.1", "enroll");
        let closed = agg.take_closed(at(70));
        assert_eq!(closed.len(), 1);
        let open = agg.take_all();
        assert_eq!(open.len(), 1);
        assert_ne!(
            closed[0].detail["window_start"],
            open[0].detail["window_start"]
        );
    }

    #[test]
    fn sources_past_the_cap_are_counted_in_one_overflow_record() {
        let mut agg = DeniedAggregate::new(Duration::from_secs(60), 3);
        for i in 0..1000u32 {
            let source = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            deny(&mut agg, 0, &source, "connect");
        }
        assert_eq!(agg.held_sources(), 3, "memory is bounded by the cap");
        let records = agg.take_all();
        assert_eq!(records.len(), 4);
        let overflow = &records[3];
        assert_eq!(overflow.actor, "system:gateway");
        assert_eq!(overflow.detail["overflow"], true);
        assert_eq!(overflow.detail["count"], 997);
    }

    #[test]
    fn windows_do_not_pile_up_while_the_trail_is_behind() {
        let mut agg = DeniedAggregate::new(Duration::from_secs(60), 2);
        for minute in 0..100 {
            deny(&mut agg, minute * 60, "192.0.2.1", "enroll");
        }
        let records = agg.take_all();
        assert_eq!(records.len(), MAX_WINDOWS);
        let total: u64 = records
            .iter()
            .map(|r| r.detail["count"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 100, "nothing is lost, only merged");
    }

    #[test]
    fn ipv6_sources_count_by_64() {
        let mut agg = DeniedAggregate::new(Duration::from_secs(60), 10);
        deny(&mut agg, 0, "2001:db8::1", "enroll");
        deny(&mut agg, 0, "2001:db8::2", "enroll");
        let records = agg.take_all();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].actor, "agent@2001:db8::");
    }
}
