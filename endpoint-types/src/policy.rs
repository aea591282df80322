//! The customer's approval policy, evaluated as a pure function of the policy and `now`.
//!
//! The policy is written by the customer in `agent.toml` (`[policy]`) and reported in the hello
//! as a [`PolicySummary`]; both the agent and the gateway turn it into a [`Policy`] with
//! [`Policy::parse`] so they agree on every instant. Nothing here reads a clock: the caller
//! passes `now`, which is what lets the tests pin windows across midnight and DST changes.
//!
//! Weekly windows (`Mon-Fri 09:00-17:00`) are wall-clock times in the policy's IANA time zone
//! (UTC when none is given). Each occurrence is resolved on its own dates with the zone's rules
//! at that date (`compatible` disambiguation: a time in a spring-forward gap moves forward by
//! the gap, a time in a fall-back fold takes the earlier instant), so a window keeps its
//! wall-clock edges on both sides of a DST change and is shorter or longer in real time on the
//! day of the change. Maintenance windows are absolute RFC 3339 instants. A window's start is
//! inside it, its end is not.

use crate::resource::{ApprovalMode, PolicySummary};
use jiff::{
    civil::{Date, Time, Weekday},
    tz::TimeZone,
    SignedDuration, Timestamp,
};
use std::{fmt, str::FromStr};

/// How far ahead [`Policy::evaluate`] follows a chain of overlapping windows. A union still
/// open at this horizon (e.g. `Mon-Sun 00:00-24:00`) reports `closes_at = now + horizon`:
/// nothing a window auto-approves (an endpoint, an op) may live longer than
/// [`crate::duration::TTL_MAX`] anyway, so the cap never shortens anything, and it keeps the
/// search finite.
pub const CLOSES_AT_HORIZON: SignedDuration = SignedDuration::from_secs(7 * 86_400);

/// How far ahead [`Policy::next_open`] looks for a weekly window. One week always contains
/// an occurrence of every window; the second week covers the rare occurrence swallowed by a
/// DST gap (a window lying wholly inside the skipped hour).
const NEXT_OPEN_HORIZON: SignedDuration = SignedDuration::from_secs(15 * 86_400);

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const MINUTES_PER_DAY: u16 = 24 * 60;

/// Why a weekly window did not parse. Messages are phrased to follow `windows: "<input>": `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("missing the time range")]
    MissingTimes,
    #[error("{0:?} is not a day (Mon, Tue, … Sun)")]
    NotADay(String),
    #[error("{0:?} is not a day range (write e.g. Mon-Fri, or Fri-Mon to wrap over the weekend)")]
    BadDayRange(String),
    #[error("the time range needs HH:MM-HH:MM")]
    MissingDash,
    #[error("{0:?} is not HH:MM (00:00 to 24:00)")]
    BadTime(String),
    #[error("24:00 can only end a window (start it at 00:00)")]
    StartsAtEndOfDay,
    #[error("the window is empty (start equals end)")]
    Empty,
}

/// Why a maintenance window did not parse. Messages follow `maintenance: "<input>": `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaintenanceError {
    #[error("missing '/' between start and end")]
    MissingSlash,
    #[error("start: {0}")]
    BadStart(String),
    #[error("end: {0}")]
    BadEnd(String),
    #[error("end is not after start")]
    EndNotAfterStart,
}

/// Why a policy did not parse. The messages name the `agent.toml` key and the offending entry,
/// since the customer fixes them there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("approval = \"windows\" needs at least one entry in `windows` or `maintenance`")]
    NoWindows,
    #[error("time_zone = {name:?} is not a known time zone: {reason}")]
    UnknownTimeZone { name: String, reason: String },
    #[error("windows: {input:?}: {error} (expected e.g. \"Mon-Fri 09:00-17:00\")")]
    Window { input: String, error: WindowError },
    #[error("maintenance: {input:?}: {error} (expected START/END in RFC 3339, e.g. \"2026-12-01T02:00:00Z/2026-12-01T04:00:00Z\")")]
    Maintenance {
        input: String,
        error: MaintenanceError,
    },
}

/// A half-open span of real time `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Interval {
    start: Timestamp,
    end: Timestamp,
}

/// A weekly window, `DAYS HH:MM-HH:MM`, in wall-clock time of the policy's zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// Bit `i` set = the window starts on the day `i` days after Monday. A bit set rather than
    /// an array so membership needs no indexing.
    days: u8,
    /// Minutes after midnight, `0..1440`.
    start: u16,
    /// Minutes after midnight, `1..=1440` (1440 is `24:00`, the next midnight; `00:00` as an
    /// end is stored as 1440). Before `start` means the window runs past midnight into the
    /// next day.
    end: u16,
}

impl Window {
    /// Whether an occurrence of the window starts on `day`. A window belongs to the day it
    /// starts on: `Fri 22:00-02:00` covers Saturday 01:00 but not Friday 01:00.
    pub fn starts_on(&self, day: Weekday) -> bool {
        let bit = day.to_monday_zero_offset();
        self.days & (1u8 << bit) != 0
    }

    /// The start, in minutes after midnight.
    pub fn start_minute(&self) -> u16 {
        self.start
    }

    /// The end, in minutes after midnight (1440 for `24:00`).
    pub fn end_minute(&self) -> u16 {
        self.end
    }

    /// Whether the window ends on the day after the one it starts on (at or past midnight).
    pub fn ends_next_day(&self) -> bool {
        self.end <= self.start || self.end == MINUTES_PER_DAY
    }

    /// The occurrence starting on `date`, resolved in `tz`; `None` when the window does not
    /// start that day, or when the DST change of that day swallows it (a window wholly inside
    /// a spring-forward gap resolves to an empty or inverted span, and is closed).
    fn occurrence(&self, date: Date, tz: &TimeZone) -> Option<Interval> {
        if !self.starts_on(date.weekday()) {
            return None;
        }
        let start = resolve(date, self.start, tz)?;
        let end_date = if self.end <= self.start {
            date.tomorrow().ok()?
        } else {
            date
        };
        let end = resolve(end_date, self.end, tz)?;
        (end > start).then_some(Interval { start, end })
    }
}

/// The instant of wall-clock `minute` (may be 1440, the next midnight) on `date` in `tz`.
/// `None` only at the edges of jiff's supported range, where no window can matter.
fn resolve(date: Date, minute: u16, tz: &TimeZone) -> Option<Timestamp> {
    let (date, minute) = if minute >= MINUTES_PER_DAY {
        (date.tomorrow().ok()?, minute - MINUTES_PER_DAY)
    } else {
        (date, minute)
    };
    let hour = i8::try_from(minute / 60).ok()?;
    let min = i8::try_from(minute % 60).ok()?;
    let time = Time::new(hour, min, 0, 0).ok()?;
    tz.to_ambiguous_timestamp(date.to_datetime(time))
        .compatible()
        .ok()
}

fn parse_day(s: &str) -> Result<u8, WindowError> {
    DAY_NAMES
        .iter()
        .zip(0u8..)
        .find(|(name, _)| name.eq_ignore_ascii_case(s))
        .map(|(_, i)| i)
        .ok_or_else(|| WindowError::NotADay(s.to_string()))
}

/// `Sat`, `Mon-Fri`, `Fri-Mon` (wraps over the weekend), `Mon,Wed`, `Mon,Wed-Fri`.
fn parse_days(s: &str) -> Result<u8, WindowError> {
    let mut mask = 0u8;
    for part in s.split(',') {
        let mut ends = part.split('-');
        let first = parse_day(ends.next().unwrap_or_default())?;
        match (ends.next(), ends.next()) {
            (None, _) => mask |= 1 << first,
            (Some(last), None) => {
                let last = parse_day(last)?;
                // `Mon-Mon` could mean one day or the whole week; refuse rather than guess.
                if last == first {
                    return Err(WindowError::BadDayRange(part.to_string()));
                }
                let mut d = first;
                loop {
                    mask |= 1 << d;
                    if d == last {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            (Some(_), Some(_)) => {
                // Name a bad day first: `Mon-Fry-Sun` is a typo before it is a bad range.
                for day in part.split('-') {
                    parse_day(day)?;
                }
                return Err(WindowError::BadDayRange(part.to_string()));
            }
        }
    }
    Ok(mask)
}

/// `HH:MM`, exactly two digits each, `00:00` to `24:00`.
fn parse_time(t: &str) -> Result<u16, WindowError> {
    let bad = || WindowError::BadTime(t.to_string());
    let (h, m) = t.split_once(':').ok_or_else(bad)?;
    let two_digits = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit());
    if !two_digits(h) || !two_digits(m) {
        return Err(bad());
    }
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl FromStr for Window {
    type Err = WindowError;

    fn from_str(w: &str) -> Result<Window, WindowError> {
        let (days, times) = w
            .trim()
            .split_once(char::is_whitespace)
            .ok_or(WindowError::MissingTimes)?;
        let days = parse_days(days)?;
        let times = times.trim();
        if times.is_empty() {
            return Err(WindowError::MissingTimes);
        }
        let (start, end) = times.split_once('-').ok_or(WindowError::MissingDash)?;
        let start = parse_time(start.trim())?;
        let end = parse_time(end.trim())?;
        if start == MINUTES_PER_DAY {
            return Err(WindowError::StartsAtEndOfDay);
        }
        // 00:00-24:00 is a whole day; 24:00 as an end is the same wall-clock point as 00:00
        // of the next day, so 00:00 start with 00:00 end stays "empty" rather than "24 h".
        if start == end {
            return Err(WindowError::Empty);
        }
        // `18:00-00:00` and `18:00-24:00` are the same window; one representation keeps
        // equality and display meaningful.
        let end = if end == 0 { MINUTES_PER_DAY } else { end };
        Ok(Window { days, start, end })
    }
}

impl fmt::Display for Window {
    /// Canonical form: the days as a comma list, then `HH:MM-HH:MM`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, i) in DAY_NAMES.iter().zip(0u8..) {
            if self.days & (1 << i) != 0 {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        write!(
            f,
            " {:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

/// A dated maintenance window, `START/END` in RFC 3339; start inclusive, end exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Maintenance {
    start: Timestamp,
    end: Timestamp,
}

impl Maintenance {
    pub fn start(&self) -> Timestamp {
        self.start
    }

    pub fn end(&self) -> Timestamp {
        self.end
    }

    pub fn contains(&self, now: Timestamp) -> bool {
        self.start <= now && now < self.end
    }
}

impl FromStr for Maintenance {
    type Err = MaintenanceError;

    fn from_str(m: &str) -> Result<Maintenance, MaintenanceError> {
        let (start, end) = m.split_once('/').ok_or(MaintenanceError::MissingSlash)?;
        let start: Timestamp = start
            .trim()
            .parse()
            .map_err(|e: jiff::Error| MaintenanceError::BadStart(e.to_string()))?;
        let end: Timestamp = end
            .trim()
            .parse()
            .map_err(|e: jiff::Error| MaintenanceError::BadEnd(e.to_string()))?;
        if end <= start {
            return Err(MaintenanceError::EndNotAfterStart);
        }
        Ok(Maintenance { start, end })
    }
}

impl fmt::Display for Maintenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.start, self.end)
    }
}

/// What the policy says about a request (a grant, a command, an endpoint, an op's output) at
/// one instant.
///
/// A window decision is only as good as the instant it was made at: the policy is checked
/// again when a command is dispatched, and an op a window approved that is dispatched after
/// the window closed goes back to approval. A person's approval is not re-checked this way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `approval = "automatic"`.
    Automatic,
    /// Inside a weekly or maintenance window; what it approves must not outlive `closes_at`
    /// (the end of the union of windows covering now, capped at now + [`CLOSES_AT_HORIZON`]).
    InWindow { closes_at: Timestamp },
    /// A customer approver has to decide.
    NeedsPerson,
}

impl Decision {
    /// Whether the policy approves without a person.
    pub fn is_auto(&self) -> bool {
        !matches!(self, Decision::NeedsPerson)
    }

    /// The principal recorded as the approver of an automatic decision (`decided_by` in
    /// grant and op records and in both audit trails); `None` when a person must decide.
    pub fn decided_by(&self) -> Option<&'static str> {
        match self {
            Decision::Automatic => Some("policy:automatic"),
            Decision::InWindow { .. } => Some("policy:window"),
            Decision::NeedsPerson => None,
        }
    }
}

/// A parsed, validated approval policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    approval: ApprovalMode,
    time_zone: TimeZone,
    windows: Vec<Window>,
    maintenance: Vec<Maintenance>,
    steady_state: bool,
}

impl Policy {
    /// Validates every entry, whatever the mode: a customer who writes windows under
    /// `approval = "manual"` is told about a typo now, not when they switch to `windows`.
    pub fn parse(summary: &PolicySummary) -> Result<Policy, PolicyError> {
        if summary.approval == ApprovalMode::Windows
            && summary.windows.is_empty()
            && summary.maintenance.is_empty()
        {
            return Err(PolicyError::NoWindows);
        }
        let time_zone = match &summary.time_zone {
            None => TimeZone::UTC,
            Some(name) => TimeZone::get(name).map_err(|e| PolicyError::UnknownTimeZone {
                name: name.clone(),
                reason: e.to_string(),
            })?,
        };
        let windows = summary
            .windows
            .iter()
            .map(|w| {
                w.parse().map_err(|error| PolicyError::Window {
                    input: w.clone(),
                    error,
                })
            })
            .collect::<Result<Vec<Window>, _>>()?;
        let maintenance = summary
            .maintenance
            .iter()
            .map(|m| {
                m.parse().map_err(|error| PolicyError::Maintenance {
                    input: m.clone(),
                    error,
                })
            })
            .collect::<Result<Vec<Maintenance>, _>>()?;
        Ok(Policy {
            approval: summary.approval,
            time_zone,
            windows,
            maintenance,
            steady_state: summary.steady_state,
        })
    }

    pub fn approval(&self) -> ApprovalMode {
        self.approval
    }

    pub fn time_zone(&self) -> &TimeZone {
        &self.time_zone
    }

    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    pub fn maintenance(&self) -> &[Maintenance] {
        &self.maintenance
    }

    pub fn steady_state(&self) -> bool {
        self.steady_state
    }

    /// Whether a request made (or a command dispatched) at `now` is approved by the policy.
    pub fn evaluate(&self, now: Timestamp) -> Decision {
        match self.approval {
            ApprovalMode::Automatic => Decision::Automatic,
            ApprovalMode::Manual | ApprovalMode::AlwaysRequire => Decision::NeedsPerson,
            ApprovalMode::Windows => match self.open_until(now) {
                Some(closes_at) => Decision::InWindow { closes_at },
                None => Decision::NeedsPerson,
            },
        }
    }

    /// Whether a finished command's output must wait for a person before it leaves the
    /// appliance: `manual` approves command and output separately, `always-require` always
    /// asks, `automatic` never does, and `windows` asks only outside a window.
    pub fn needs_output_approval(&self, now: Timestamp) -> bool {
        match self.approval {
            ApprovalMode::Manual | ApprovalMode::AlwaysRequire => true,
            ApprovalMode::Automatic => false,
            ApprovalMode::Windows => !self.evaluate(now).is_auto(),
        }
    }

    /// The earliest instant at or after `now` at which the policy approves on its own: `now`
    /// itself when it does already (`automatic`, or inside a window), the start of the next
    /// window otherwise, `None` when it never will (`manual`, `always-require`, or only past
    /// maintenance windows). For hints such as "the next window opens at …".
    pub fn next_open(&self, now: Timestamp) -> Option<Timestamp> {
        match self.approval {
            ApprovalMode::Automatic => Some(now),
            ApprovalMode::Manual | ApprovalMode::AlwaysRequire => None,
            ApprovalMode::Windows => {
                let horizon = now.checked_add(NEXT_OPEN_HORIZON).unwrap_or(Timestamp::MAX);
                let weekly = self.weekly_intervals(now, horizon);
                let dated = self
                    .maintenance
                    .iter()
                    .filter(|m| m.end > now)
                    .map(|m| Interval {
                        start: m.start,
                        end: m.end,
                    });
                weekly
                    .into_iter()
                    .chain(dated)
                    .map(|i| i.start.max(now))
                    .min()
            }
        }
    }

    /// The instant the union of windows covering `now` closes, or `None` outside every window.
    fn open_until(&self, now: Timestamp) -> Option<Timestamp> {
        let horizon = now.checked_add(CLOSES_AT_HORIZON).unwrap_or(Timestamp::MAX);
        let mut intervals = self.weekly_intervals(now, horizon);
        intervals.extend(
            self.maintenance
                .iter()
                .filter(|m| m.end > now && m.start < horizon)
                .map(|m| Interval {
                    start: m.start,
                    end: m.end,
                }),
        );
        intervals.sort_by_key(|i| i.start);
        // Every interval here ends after `now`; in start order, the first one starting after
        // the reach so far leaves a gap, and so does every later one.
        let mut close: Option<Timestamp> = None;
        for i in &intervals {
            if i.start > close.unwrap_or(now) {
                break;
            }
            close = Some(close.map_or(i.end, |c| c.max(i.end)));
        }
        close.map(|c| c.min(horizon))
    }

    /// Occurrences of the weekly windows that overlap `[from, to)`.
    fn weekly_intervals(&self, from: Timestamp, to: Timestamp) -> Vec<Interval> {
        let mut out = Vec::new();
        if self.windows.is_empty() {
            return out;
        }
        // An occurrence that started on an earlier day can still be open at `from`: one day
        // back covers windows running past midnight, the second covers zones whose civil
        // calendar skips a day (Pacific/Apia in 2011) or a long DST fold.
        let Some(mut day) = self
            .time_zone
            .to_datetime(from)
            .date()
            .yesterday()
            .and_then(|d| d.yesterday())
            .ok()
        else {
            return out;
        };
        let last = self.time_zone.to_datetime(to).date();
        while day <= last {
            for w in &self.windows {
                if let Some(i) = w.occurrence(day, &self.time_zone) {
                    if i.end > from && i.start < to {
                        out.push(i);
                    }
                }
            }
            match day.tomorrow() {
                Ok(next) => day = next,
                Err(_) => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn policy(
        approval: ApprovalMode,
        tz: Option<&str>,
        windows: &[&str],
        maintenance: &[&str],
    ) -> Policy {
        Policy::parse(&PolicySummary {
            approval,
            time_zone: tz.map(str::to_string),
            windows: windows.iter().map(|s| s.to_string()).collect(),
            maintenance: maintenance.iter().map(|s| s.to_string()).collect(),
            steady_state: true,
            approver_key_ids: Vec::new(),
            phases: Vec::new(),
        })
        .unwrap()
    }

    fn windows(tz: Option<&str>, windows: &[&str]) -> Policy {
        policy(ApprovalMode::Windows, tz, windows, &[])
    }

    fn in_window(closes_at: &str) -> Decision {
        Decision::InWindow {
            closes_at: ts(closes_at),
        }
    }

    fn w(s: &str) -> Window {
        s.parse().unwrap()
    }

    /// Asserts that `p` is open exactly on `[open, close)`, to the second (and the
    /// nanosecond at the end: the end is exclusive).
    #[track_caller]
    fn assert_open_exactly(p: &Policy, open: &str, close: &str) {
        let (open, close) = (ts(open), ts(close));
        let expect = Decision::InWindow { closes_at: close };
        assert_eq!(
            p.evaluate(open - SignedDuration::from_secs(1)),
            Decision::NeedsPerson,
            "a second before {open}"
        );
        assert_eq!(
            p.evaluate(open - SignedDuration::from_nanos(1)),
            Decision::NeedsPerson,
            "just before {open}"
        );
        assert_eq!(p.evaluate(open), expect, "at {open}");
        assert_eq!(
            p.evaluate(close - SignedDuration::from_secs(1)),
            expect,
            "a second before {close}"
        );
        assert_eq!(
            p.evaluate(close - SignedDuration::from_nanos(1)),
            expect,
            "just before {close}"
        );
        assert_eq!(p.evaluate(close), Decision::NeedsPerson, "at {close}");
        assert_eq!(
            p.next_open(open - SignedDuration::from_secs(60)),
            Some(open)
        );
    }

    // ---- syntax ----

    #[test]
    fn window_day_forms() {
        assert_eq!(w("Sat 10:00-12:00").to_string(), "Sat 10:00-12:00");
        assert_eq!(
            w("Mon-Fri 09:00-17:00").to_string(),
            "Mon,Tue,Wed,Thu,Fri 09:00-17:00"
        );
        assert_eq!(
            w("Fri-Mon 09:00-17:00").to_string(),
            "Mon,Fri,Sat,Sun 09:00-17:00"
        );
        assert_eq!(w("Mon,Wed 22:00-02:00").to_string(), "Mon,Wed 22:00-02:00");
        assert_eq!(w("Sat 18:00-00:00").to_string(), "Sat 18:00-24:00");
        assert_eq!(
            w("Mon,Wed-Fri 08:00-09:00").to_string(),
            "Mon,Wed,Thu,Fri 08:00-09:00"
        );
        assert_eq!(
            w("Mon-Sun 00:00-24:00").to_string(),
            "Mon,Tue,Wed,Thu,Fri,Sat,Sun 00:00-24:00"
        );
        assert_eq!(w("Sun-Mon 00:00-24:00").to_string(), "Mon,Sun 00:00-24:00");
        assert_eq!(w("mon-FRI 09:00-17:00"), w("Mon-Fri 09:00-17:00"));
        assert_eq!(w("  Sat   10:00 - 12:00 "), w("Sat 10:00-12:00"));
        assert_eq!(w("Mon,Mon 10:00-12:00"), w("Mon 10:00-12:00"));
    }

    #[test]
    fn window_times() {
        let x = w("Mon 09:30-17:45");
        assert_eq!(
            (x.start_minute(), x.end_minute(), x.ends_next_day()),
            (570, 1065, false)
        );
        let x = w("Mon 22:00-02:00");
        assert_eq!(
            (x.start_minute(), x.end_minute(), x.ends_next_day()),
            (1320, 120, true)
        );
        let x = w("Mon 00:00-24:00");
        assert_eq!(
            (x.start_minute(), x.end_minute(), x.ends_next_day()),
            (0, 1440, true)
        );
        let x = w("Mon 23:59-00:00");
        assert_eq!(
            (x.start_minute(), x.end_minute(), x.ends_next_day()),
            (1439, 1440, true)
        );
        assert_eq!(x, w("Mon 23:59-24:00"));
        assert!(!w("Mon 09:00-17:00").ends_next_day());
        assert!(x.starts_on(Weekday::Monday) && !x.starts_on(Weekday::Tuesday));
    }

    #[test]
    fn window_errors() {
        use WindowError::*;
        let cases: &[(&str, WindowError)] = &[
            ("", MissingTimes),
            ("Mon", MissingTimes),
            ("Mon ", MissingTimes),
            ("Mon-Fri 09:00", MissingDash),
            ("Mon-Fry 09:00-17:00", NotADay("Fry".into())),
            ("Monday 09:00-17:00", NotADay("Monday".into())),
            ("Mon,,Wed 09:00-17:00", NotADay("".into())),
            ("Mon, Wed 09:00-17:00", NotADay("".into())),
            ("-Fri 09:00-17:00", NotADay("".into())),
            ("Mon-Tue-Wed 09:00-10:00", BadDayRange("Mon-Tue-Wed".into())),
            ("Mon-Fry-Wed 09:00-10:00", NotADay("Fry".into())),
            ("Mon-Mon 09:00-10:00", BadDayRange("Mon-Mon".into())),
            ("Mon 9:00-17:00", BadTime("9:00".into())),
            ("Mon 09:00-17", BadTime("17".into())),
            ("Mon 25:00-26:00", BadTime("25:00".into())),
            ("Mon 09:60-10:00", BadTime("09:60".into())),
            ("Mon 24:01-02:00", BadTime("24:01".into())),
            ("Mon 09:00-24:30", BadTime("24:30".into())),
            ("Mon +9:00-10:00", BadTime("+9:00".into())),
            ("Mon 09:00-17:00 CET", BadTime("17:00 CET".into())),
            ("Mon 24:00-02:00", StartsAtEndOfDay),
            ("Mon 10:00-10:00", Empty),
            ("Mon 00:00-00:00", Empty),
        ];
        for (input, want) in cases {
            assert_eq!(&input.parse::<Window>().unwrap_err(), want, "{input:?}");
        }
    }

    #[test]
    fn maintenance_syntax() {
        let m: Maintenance = "2026-12-01T02:00:00Z/2026-12-01T04:00:00Z".parse().unwrap();
        assert_eq!(
            (m.start(), m.end()),
            (ts("2026-12-01T02:00:00Z"), ts("2026-12-01T04:00:00Z"))
        );
        assert_eq!(m.to_string(), "2026-12-01T02:00:00Z/2026-12-01T04:00:00Z");
        let m: Maintenance = "2026-12-01T03:00:00+01:00 / 2026-12-01T05:00:00+01:00"
            .parse()
            .unwrap();
        assert_eq!(
            (m.start(), m.end()),
            (ts("2026-12-01T02:00:00Z"), ts("2026-12-01T04:00:00Z"))
        );
        assert!(m.contains(ts("2026-12-01T02:00:00Z")) && !m.contains(ts("2026-12-01T04:00:00Z")));

        use MaintenanceError::*;
        let err = |s: &str| s.parse::<Maintenance>().unwrap_err();
        assert_eq!(err("2026-12-01T02:00:00Z"), MissingSlash);
        assert!(matches!(err("yesterday/2026-12-01T04:00:00Z"), BadStart(_)));
        assert!(matches!(err("2026-12-01T02:00:00Z/later"), BadEnd(_)));
        // A civil time without offset is not an instant: refuse rather than assume a zone.
        assert!(matches!(
            err("2026-12-01T02:00:00/2026-12-01T04:00:00Z"),
            BadStart(_)
        ));
        assert_eq!(
            err("2026-12-01T04:00:00Z/2026-12-01T02:00:00Z"),
            EndNotAfterStart
        );
        assert_eq!(
            err("2026-12-01T04:00:00Z/2026-12-01T04:00:00Z"),
            EndNotAfterStart
        );
    }

    #[test]
    fn policy_parse_errors_name_key_and_entry() {
        let parse = |approval, tz: Option<&str>, windows: &[&str], maintenance: &[&str]| {
            Policy::parse(&PolicySummary {
                approval,
                time_zone: tz.map(str::to_string),
                windows: windows.iter().map(|s| s.to_string()).collect(),
                maintenance: maintenance.iter().map(|s| s.to_string()).collect(),
                steady_state: true,
                approver_key_ids: Vec::new(),
                phases: Vec::new(),
            })
        };
        assert_eq!(
            parse(ApprovalMode::Windows, None, &[], &[]).unwrap_err(),
            PolicyError::NoWindows
        );
        let e = parse(ApprovalMode::Manual, Some("Europe/Berlinn"), &[], &[]).unwrap_err();
        assert!(
            matches!(&e, PolicyError::UnknownTimeZone { name, .. } if name == "Europe/Berlinn"),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("time_zone = \"Europe/Berlinn\" is not a known time zone"),
            "{e}"
        );
        // Entries are checked whatever the mode.
        let e = parse(ApprovalMode::Manual, None, &["Mon-Fry 09:00-17:00"], &[]).unwrap_err();
        assert_eq!(e.to_string(), "windows: \"Mon-Fry 09:00-17:00\": \"Fry\" is not a day (Mon, Tue, … Sun) (expected e.g. \"Mon-Fri 09:00-17:00\")");
        let e = parse(
            ApprovalMode::Windows,
            None,
            &[],
            &["2026-12-01T04:00:00Z/2026-12-01T02:00:00Z"],
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("maintenance: \"2026-12-01T04:00:00Z/2026-12-01T02:00:00Z\": end is not after start"), "{e}");
    }

    #[test]
    fn policy_parse_defaults_to_utc_and_keeps_fields() {
        let p = policy(
            ApprovalMode::Windows,
            None,
            &["Mon-Fri 09:00-17:00"],
            &["2026-12-01T02:00:00Z/2026-12-01T04:00:00Z"],
        );
        assert_eq!(p.time_zone(), &TimeZone::UTC);
        assert_eq!(p.windows(), &[w("Mon-Fri 09:00-17:00")]);
        assert_eq!(p.maintenance().len(), 1);
        assert_eq!(p.approval(), ApprovalMode::Windows);
        assert!(p.steady_state());
        let p = policy(
            ApprovalMode::Windows,
            Some("Europe/Berlin"),
            &["Sat 10:00-12:00"],
            &[],
        );
        assert_eq!(p.time_zone().iana_name(), Some("Europe/Berlin"));
    }

    // ---- modes ----

    #[test]
    fn fixed_modes_ignore_the_clock_and_any_windows() {
        let inside = ts("2026-03-02T10:00:00Z"); // a Monday
        for (mode, decision, output, next) in [
            (
                ApprovalMode::Automatic,
                Decision::Automatic,
                false,
                Some(inside),
            ),
            (ApprovalMode::Manual, Decision::NeedsPerson, true, None),
            (
                ApprovalMode::AlwaysRequire,
                Decision::NeedsPerson,
                true,
                None,
            ),
        ] {
            let p = policy(mode, None, &["Mon-Sun 00:00-24:00"], &[]);
            assert_eq!(p.evaluate(inside), decision, "{mode:?}");
            assert_eq!(p.needs_output_approval(inside), output, "{mode:?}");
            assert_eq!(p.next_open(inside), next, "{mode:?}");
        }
        let d = Decision::Automatic;
        assert_eq!(
            (d.is_auto(), d.decided_by()),
            (true, Some("policy:automatic"))
        );
        let d = in_window("2026-03-02T17:00:00Z");
        assert_eq!((d.is_auto(), d.decided_by()), (true, Some("policy:window")));
        let d = Decision::NeedsPerson;
        assert_eq!((d.is_auto(), d.decided_by()), (false, None));
    }

    #[test]
    fn office_hours_in_utc() {
        let p = windows(None, &["Mon-Fri 09:00-17:00"]);
        // 2026-03-02 is a Monday, 2026-03-06 a Friday.
        assert_open_exactly(&p, "2026-03-02T09:00:00Z", "2026-03-02T17:00:00Z");
        assert_open_exactly(&p, "2026-03-06T09:00:00Z", "2026-03-06T17:00:00Z");
        assert_eq!(
            p.evaluate(ts("2026-03-07T12:00:00Z")),
            Decision::NeedsPerson,
            "Saturday"
        );
        assert_eq!(
            p.evaluate(ts("2026-03-08T12:00:00Z")),
            Decision::NeedsPerson,
            "Sunday"
        );
        assert!(p.needs_output_approval(ts("2026-03-02T08:59:59Z")));
        assert!(!p.needs_output_approval(ts("2026-03-02T09:00:00Z")));
        assert!(p.needs_output_approval(ts("2026-03-02T17:00:00Z")));
        // From Friday evening the next window is Monday morning; inside one it is now.
        assert_eq!(
            p.next_open(ts("2026-03-06T17:00:00Z")),
            Some(ts("2026-03-09T09:00:00Z"))
        );
        assert_eq!(
            p.next_open(ts("2026-03-02T12:34:56Z")),
            Some(ts("2026-03-02T12:34:56Z"))
        );
    }

    #[test]
    fn window_across_midnight_belongs_to_its_start_day() {
        let p = windows(None, &["Fri 22:00-02:00"]);
        // Friday 2026-03-06 22:00 to Saturday 02:00.
        assert_open_exactly(&p, "2026-03-06T22:00:00Z", "2026-03-07T02:00:00Z");
        // Friday 01:00 is the tail of a Thursday window, which there is none of.
        assert_eq!(
            p.evaluate(ts("2026-03-06T01:00:00Z")),
            Decision::NeedsPerson
        );
        assert_eq!(
            p.evaluate(ts("2026-03-07T23:00:00Z")),
            Decision::NeedsPerson
        );

        // Sunday night runs into Monday, across the week's edge.
        let p = windows(None, &["Sun 23:00-01:30"]);
        assert_open_exactly(&p, "2026-03-08T23:00:00Z", "2026-03-09T01:30:00Z");

        // A range that wraps over the weekend.
        let p = windows(None, &["Fri-Mon 20:00-08:00"]);
        assert_eq!(
            p.evaluate(ts("2026-03-07T12:00:00Z")),
            Decision::NeedsPerson,
            "Saturday noon"
        );
        assert_eq!(
            p.evaluate(ts("2026-03-10T07:00:00Z")),
            in_window("2026-03-10T08:00:00Z"),
            "Tuesday morning: Monday's window"
        );
        assert_eq!(
            p.evaluate(ts("2026-03-10T21:00:00Z")),
            Decision::NeedsPerson,
            "Tuesday evening"
        );
        assert_eq!(
            p.evaluate(ts("2026-03-11T07:00:00Z")),
            Decision::NeedsPerson,
            "Wednesday morning"
        );

        // 24:00 ends at the next midnight; 00:00 as an end means the same.
        for text in ["Sat 18:00-24:00", "Sat 18:00-00:00"] {
            let p = windows(None, &[text]);
            assert_open_exactly(&p, "2026-03-07T18:00:00Z", "2026-03-08T00:00:00Z");
        }
    }

    #[test]
    fn overlapping_and_touching_windows_close_at_the_end_of_their_union() {
        let p = windows(None, &["Mon 09:00-12:00", "Mon 11:00-17:00"]);
        assert_eq!(
            p.evaluate(ts("2026-03-02T09:30:00Z")),
            in_window("2026-03-02T17:00:00Z")
        );
        let p = windows(
            None,
            &["Mon 09:00-12:00", "Mon 12:00-13:00", "Mon 13:30-14:00"],
        );
        assert_eq!(
            p.evaluate(ts("2026-03-02T09:30:00Z")),
            in_window("2026-03-02T13:00:00Z")
        );
        assert_eq!(
            p.evaluate(ts("2026-03-02T13:15:00Z")),
            Decision::NeedsPerson
        );
        // A long window containing a short one.
        let p = windows(None, &["Mon 08:00-18:00", "Mon 09:00-10:00"]);
        assert_eq!(
            p.evaluate(ts("2026-03-02T09:30:00Z")),
            in_window("2026-03-02T18:00:00Z")
        );
        // Whole days chained over midnight.
        let p = windows(None, &["Mon-Tue 00:00-24:00"]);
        assert_eq!(
            p.evaluate(ts("2026-03-02T09:30:00Z")),
            in_window("2026-03-04T00:00:00Z")
        );
        let p = windows(None, &["Mon 18:00-02:00", "Tue 01:00-09:00"]);
        assert_eq!(
            p.evaluate(ts("2026-03-02T20:00:00Z")),
            in_window("2026-03-03T09:00:00Z")
        );
    }

    #[test]
    fn a_window_that_never_closes_is_capped_at_the_horizon() {
        let p = windows(Some("Europe/Berlin"), &["Mon-Sun 00:00-24:00"]);
        let now = ts("2026-03-28T12:00:00Z");
        assert_eq!(
            p.evaluate(now),
            Decision::InWindow {
                closes_at: now + CLOSES_AT_HORIZON
            }
        );
        assert_eq!(p.next_open(now), Some(now));
        assert!(!p.needs_output_approval(now));
    }

    #[test]
    fn maintenance_windows() {
        let p = policy(
            ApprovalMode::Windows,
            None,
            &[],
            &["2026-12-01T02:00:00Z/2026-12-01T04:00:00Z"],
        );
        assert_open_exactly(&p, "2026-12-01T02:00:00Z", "2026-12-01T04:00:00Z");
        assert_eq!(
            p.next_open(ts("2026-11-01T00:00:00Z")),
            Some(ts("2026-12-01T02:00:00Z"))
        );
        assert_eq!(
            p.next_open(ts("2026-12-01T04:00:00Z")),
            None,
            "only a past maintenance window: never again"
        );

        // A maintenance window extends a weekly one it overlaps (2026-12-01 is a Tuesday),
        // and a weekly one extends a maintenance window it touches.
        let p = policy(
            ApprovalMode::Windows,
            Some("UTC"),
            &["Tue 00:00-03:00", "Tue 04:00-05:00"],
            &["2026-12-01T02:00:00Z/2026-12-01T04:00:00Z"],
        );
        assert_eq!(
            p.evaluate(ts("2026-12-01T00:30:00Z")),
            in_window("2026-12-01T05:00:00Z")
        );
        assert_eq!(
            p.evaluate(ts("2026-12-01T03:30:00Z")),
            in_window("2026-12-01T05:00:00Z")
        );
        // Overlapping maintenance windows.
        let p = policy(
            ApprovalMode::Windows,
            None,
            &[],
            &[
                "2026-12-01T02:00:00Z/2026-12-01T04:00:00Z",
                "2026-12-01T03:00:00Z/2026-12-02T00:00:00Z",
            ],
        );
        assert_eq!(
            p.evaluate(ts("2026-12-01T02:00:00Z")),
            in_window("2026-12-02T00:00:00Z")
        );
        // A long maintenance window is capped like a window that never closes.
        let p = policy(
            ApprovalMode::Windows,
            None,
            &[],
            &["2026-01-01T00:00:00Z/2027-01-01T00:00:00Z"],
        );
        let now = ts("2026-06-01T00:00:00Z");
        assert_eq!(
            p.evaluate(now),
            Decision::InWindow {
                closes_at: now + CLOSES_AT_HORIZON
            }
        );
    }

    #[test]
    fn weekday_is_taken_in_the_policy_zone() {
        // Monday 00:30 in Berlin is still Sunday in UTC.
        let p = windows(Some("Europe/Berlin"), &["Mon 00:00-01:00"]);
        assert_open_exactly(&p, "2026-03-01T23:00:00Z", "2026-03-02T00:00:00Z");
        // Monday 08:00 in Tokyo is Sunday 23:00 UTC.
        let p = windows(Some("Asia/Tokyo"), &["Mon 08:00-10:00"]);
        assert_open_exactly(&p, "2026-03-01T23:00:00Z", "2026-03-02T01:00:00Z");
    }

    // ---- DST: Europe/Berlin springs forward 2026-03-29 02:00 CET -> 03:00 CEST (01:00Z) and
    // falls back 2026-10-25 03:00 CEST -> 02:00 CET (01:00Z). ----

    #[test]
    fn berlin_spring_forward() {
        let p = windows(Some("Europe/Berlin"), &["Sun 01:00-03:00"]);
        // The week before: 01:00-03:00 CET, two real hours.
        assert_open_exactly(&p, "2026-03-22T00:00:00Z", "2026-03-22T02:00:00Z");
        // The day of the change: 01:00 CET to 03:00 CEST, one real hour.
        assert_open_exactly(&p, "2026-03-29T00:00:00Z", "2026-03-29T01:00:00Z");
        // The week after: 01:00-03:00 CEST.
        assert_open_exactly(&p, "2026-04-04T23:00:00Z", "2026-04-05T01:00:00Z");

        // A start inside the skipped hour moves forward by the gap (02:30 -> 03:30 CEST).
        let p = windows(Some("Europe/Berlin"), &["Sun 02:30-04:00"]);
        assert_open_exactly(&p, "2026-03-29T01:30:00Z", "2026-03-29T02:00:00Z");
        assert_open_exactly(&p, "2026-03-22T01:30:00Z", "2026-03-22T03:00:00Z");

        // A window wholly inside the skipped hour does not happen that day.
        let p = windows(Some("Europe/Berlin"), &["Sun 02:00-03:00"]);
        assert_eq!(
            p.evaluate(ts("2026-03-29T01:00:00Z")),
            Decision::NeedsPerson
        );
        assert_eq!(
            p.next_open(ts("2026-03-28T12:00:00Z")),
            Some(ts("2026-04-05T00:00:00Z"))
        );

        // Overnight across the change: Sat 22:00 CET to Sun 06:00 CEST, seven real hours.
        let p = windows(Some("Europe/Berlin"), &["Sat 22:00-06:00"]);
        assert_open_exactly(&p, "2026-03-28T21:00:00Z", "2026-03-29T04:00:00Z");

        // Office hours keep their wall-clock edges on both sides of the change.
        let p = windows(Some("Europe/Berlin"), &["Mon-Fri 09:00-17:00"]);
        assert_open_exactly(&p, "2026-03-27T08:00:00Z", "2026-03-27T16:00:00Z");
        assert_open_exactly(&p, "2026-03-30T07:00:00Z", "2026-03-30T15:00:00Z");
        assert_eq!(
            p.next_open(ts("2026-03-27T16:00:00Z")),
            Some(ts("2026-03-30T07:00:00Z"))
        );
    }

    #[test]
    fn berlin_fall_back() {
        let p = windows(Some("Europe/Berlin"), &["Sun 01:00-03:00"]);
        // 01:00 CEST (Sat 23:00Z) to 03:00 CET (02:00Z): three real hours, 02:xx twice.
        assert_open_exactly(&p, "2026-10-24T23:00:00Z", "2026-10-25T02:00:00Z");
        assert_eq!(
            p.evaluate(ts("2026-10-25T00:30:00Z")),
            in_window("2026-10-25T02:00:00Z"),
            "first 02:30"
        );
        assert_eq!(
            p.evaluate(ts("2026-10-25T01:30:00Z")),
            in_window("2026-10-25T02:00:00Z"),
            "second 02:30"
        );
        // The week after: 01:00-03:00 CET.
        assert_open_exactly(&p, "2026-11-01T00:00:00Z", "2026-11-01T02:00:00Z");

        // A start in the repeated hour takes its first occurrence (02:30 CEST = 00:30Z).
        let p = windows(Some("Europe/Berlin"), &["Sun 02:30-05:00"]);
        assert_open_exactly(&p, "2026-10-25T00:30:00Z", "2026-10-25T04:00:00Z");
        // An end in the repeated hour also takes the first: the window is not stretched.
        let p = windows(Some("Europe/Berlin"), &["Sat 22:00-02:30"]);
        assert_open_exactly(&p, "2026-10-24T20:00:00Z", "2026-10-25T00:30:00Z");

        let p = windows(Some("Europe/Berlin"), &["Mon-Fri 09:00-17:00"]);
        assert_open_exactly(&p, "2026-10-23T07:00:00Z", "2026-10-23T15:00:00Z");
        assert_open_exactly(&p, "2026-10-26T08:00:00Z", "2026-10-26T16:00:00Z");
    }

    // America/New_York springs forward 2026-03-08 02:00 EST -> 03:00 EDT (07:00Z) and falls
    // back 2026-11-01 02:00 EDT -> 01:00 EST (06:00Z).
    #[test]
    fn new_york_both_changes() {
        let p = windows(Some("America/New_York"), &["Mon-Fri 09:00-17:00"]);
        assert_open_exactly(&p, "2026-03-06T14:00:00Z", "2026-03-06T22:00:00Z");
        assert_open_exactly(&p, "2026-03-09T13:00:00Z", "2026-03-09T21:00:00Z");
        assert_open_exactly(&p, "2026-10-30T13:00:00Z", "2026-10-30T21:00:00Z");
        assert_open_exactly(&p, "2026-11-02T14:00:00Z", "2026-11-02T22:00:00Z");

        let p = windows(Some("America/New_York"), &["Sat 23:00-04:00"]);
        // Sat 23:00 EST to Sun 04:00 EDT: four real hours.
        assert_open_exactly(&p, "2026-03-08T04:00:00Z", "2026-03-08T08:00:00Z");
        // Sat 23:00 EDT to Sun 04:00 EST: six real hours.
        assert_open_exactly(&p, "2026-11-01T03:00:00Z", "2026-11-01T09:00:00Z");
        // Friday evening in New York is Saturday in UTC: closed.
        assert_eq!(
            p.evaluate(ts("2026-03-07T04:30:00Z")),
            Decision::NeedsPerson
        );
    }

    // ---- properties ----

    fn zone() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("UTC"),
            Just("Europe/Berlin"),
            Just("America/New_York"),
            Just("Australia/Lord_Howe")
        ]
    }

    fn window_text() -> impl Strategy<Value = String> {
        (0usize..7, 0usize..7, 0u16..1440, 1u16..=1440).prop_filter_map("empty", |(a, b, s, e)| {
            if s == e {
                return None;
            }
            let days = match (DAY_NAMES.get(a), DAY_NAMES.get(b)) {
                (Some(x), Some(_)) if a == b => x.to_string(),
                (Some(x), Some(y)) => format!("{x}-{y}"),
                _ => return None,
            };
            Some(format!(
                "{days} {:02}:{:02}-{:02}:{:02}",
                s / 60,
                s % 60,
                e / 60,
                e % 60
            ))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the windows and zone: a reported close is the first closed instant, and a
        /// reported next opening is the first open one.
        #[test]
        fn close_and_next_open_are_exact(
            tz in zone(),
            ws in proptest::collection::vec(window_text(), 1..4),
            // 2026 through 2027, to the second.
            secs in 1_767_225_600i64..1_830_297_600i64,
        ) {
            let refs: Vec<&str> = ws.iter().map(String::as_str).collect();
            let p = windows(Some(tz), &refs);
            let now = Timestamp::from_second(secs).unwrap();
            let one = SignedDuration::from_secs(1);
            match p.evaluate(now) {
                Decision::InWindow { closes_at } => {
                    prop_assert!(closes_at > now);
                    prop_assert_eq!(p.next_open(now), Some(now));
                    if closes_at < now + CLOSES_AT_HORIZON {
                        prop_assert_eq!(p.evaluate(closes_at), Decision::NeedsPerson);
                        prop_assert_eq!(p.evaluate(closes_at - one), Decision::InWindow { closes_at });
                    }
                }
                Decision::NeedsPerson => {
                    let next = p.next_open(now);
                    prop_assert!(next.is_some(), "weekly windows always reopen");
                    let next = next.unwrap();
                    prop_assert!(next > now);
                    prop_assert!(p.evaluate(next).is_auto());
                    prop_assert_eq!(p.evaluate(next - one), Decision::NeedsPerson);
                }
                Decision::Automatic => prop_assert!(false, "windows never say automatic"),
            }
        }

        #[test]
        fn window_display_round_trips(text in window_text()) {
            let x: Window = text.parse().unwrap();
            prop_assert_eq!(x.to_string().parse::<Window>().unwrap(), x);
        }
    }
}
