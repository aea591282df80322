//! Terminal session recordings in asciicast v2, and their replay schedule. Pure: the caller
//! passes the time since the recording started, and sleeps and writes itself.
//!
//! A recording is one header line (a JSON object) followed by one JSON array per event:
//! `[seconds, "o" | "i" | "r" | "m", data]`. Terminal bytes are stored as JSON *string data*:
//! serde escapes every control character (ESC becomes `\u001b`, newline `\n`), so whatever a
//! session prints stays inside its string and can neither start a new event line nor forge an
//! audit record. Bytes are decoded as UTF-8 with a carry-over of a sequence split across two
//! reads (invalid bytes become U+FFFD).
//!
//! Each recording has a size cap; the event that would cross it is replaced by a marker
//! (`"m"`, "truncated …") and nothing more is recorded.

use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, time::Duration};

/// Default cap on one recording's size in bytes (header and events).
pub const DEFAULT_CAP: usize = 4 * 1024 * 1024;
/// Room kept under the cap for the truncation marker.
const MARKER_ROOM: usize = 128;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub version: u8,
    pub width: u32,
    pub height: u32,
    /// Unix seconds of the start.
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Output,
    Input,
    Resize,
    Marker,
}

impl EventKind {
    pub fn code(self) -> &'static str {
        match self {
            EventKind::Output => "o",
            EventKind::Input => "i",
            EventKind::Resize => "r",
            EventKind::Marker => "m",
        }
    }

    pub fn from_code(s: &str) -> Option<EventKind> {
        Some(match s {
            "o" => EventKind::Output,
            "i" => EventKind::Input,
            "r" => EventKind::Resize,
            "m" => EventKind::Marker,
            _ => return None,
        })
    }
}

/// Decodes a byte stream as UTF-8 across chunk boundaries.
#[derive(Debug, Default)]
struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    fn push(&mut self, data: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.pending);
        bytes.extend_from_slice(data);
        let mut out = String::with_capacity(bytes.len());
        let mut rest: &[u8] = &bytes;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` is valid UTF-8 by construction.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = after.get(n..).unwrap_or_default();
                        }
                        // An incomplete sequence at the end: keep it for the next chunk.
                        None => {
                            self.pending = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    fn flush(&mut self) -> String {
        if self.pending.is_empty() {
            return String::new();
        }
        self.pending.clear();
        char::REPLACEMENT_CHARACTER.to_string()
    }
}

/// Builds one recording. Feed it what the session shows (and, if configured, what is typed).
#[derive(Debug)]
pub struct Recorder {
    text: String,
    cap: usize,
    truncated: bool,
    last_at: Duration,
    out: Utf8Carry,
    inp: Utf8Carry,
    output_bytes: u64,
    input_bytes: u64,
}

/// A finished recording.
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    /// The asciicast v2 file: header line, then one line per event.
    pub cast: String,
    pub truncated: bool,
    pub output_bytes: u64,
    pub input_bytes: u64,
}

impl Recorder {
    pub fn new(header: &Header, cap: usize) -> Recorder {
        // Serialising a struct of strings and numbers cannot fail.
        let mut text = serde_json::to_string(header).unwrap_or_default();
        text.push('\n');
        Recorder {
            text,
            cap: cap.max(MARKER_ROOM * 2),
            truncated: false,
            last_at: Duration::ZERO,
            out: Utf8Carry::default(),
            inp: Utf8Carry::default(),
            output_bytes: 0,
            input_bytes: 0,
        }
    }

    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    pub fn len(&self) -> usize {
        self.text.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Terminal output at `at` (time since the session started).
    pub fn output(&mut self, at: Duration, data: &[u8]) {
        self.output_bytes += data.len() as u64;
        if self.truncated {
            return;
        }
        let s = self.out.push(data);
        self.event(at, EventKind::Output, &s);
    }

    /// Terminal input at `at`.
    pub fn input(&mut self, at: Duration, data: &[u8]) {
        self.input_bytes += data.len() as u64;
        if self.truncated {
            return;
        }
        let s = self.inp.push(data);
        self.event(at, EventKind::Input, &s);
    }

    /// The terminal was resized to `cols`×`rows`.
    pub fn resize(&mut self, at: Duration, cols: u32, rows: u32) {
        self.event(at, EventKind::Resize, &format!("{cols}x{rows}"));
    }

    fn event(&mut self, at: Duration, kind: EventKind, data: &str) {
        if self.truncated || (data.is_empty() && kind != EventKind::Marker) {
            return;
        }
        // Events are in order even if the caller's clock readings are not.
        let at = at.max(self.last_at);
        self.last_at = at;
        let line = event_line(at, kind, data);
        if self.text.len() + line.len() + MARKER_ROOM > self.cap && kind != EventKind::Marker {
            self.truncated = true;
            let marker = event_line(
                at,
                EventKind::Marker,
                &format!("truncated: recording cap of {} bytes reached", self.cap),
            );
            self.text.push_str(&marker);
            return;
        }
        self.text.push_str(&line);
    }

    pub fn finish(mut self, at: Duration) -> Recording {
        let o = self.out.flush();
        self.event(at, EventKind::Output, &o);
        let i = self.inp.flush();
        self.event(at, EventKind::Input, &i);
        Recording {
            cast: self.text,
            truncated: self.truncated,
            output_bytes: self.output_bytes,
            input_bytes: self.input_bytes,
        }
    }
}

fn event_line(at: Duration, kind: EventKind, data: &str) -> String {
    // Microsecond precision, as asciinema writes.
    let secs = (at.as_micros() as f64) / 1e6;
    let v = serde_json::json!([secs, kind.code(), data]);
    let mut s = v.to_string();
    s.push('\n');
    s
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub at: Duration,
    pub kind: EventKind,
    pub data: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CastError {
    #[error("the recording has no header line")]
    NoHeader,
    #[error("bad header: {0}")]
    Header(String),
    #[error("unsupported asciicast version {0}")]
    Version(u8),
    #[error("bad event on line {line}: {reason}")]
    Event { line: usize, reason: String },
}

/// Parses an asciicast v2 file. Unknown event kinds are skipped, as players do.
pub fn parse(cast: &str) -> Result<(Header, Vec<Event>), CastError> {
    let mut lines = cast
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, first) = lines.next().ok_or(CastError::NoHeader)?;
    let header: Header =
        serde_json::from_str(first).map_err(|e| CastError::Header(e.to_string()))?;
    if header.version != 2 {
        return Err(CastError::Version(header.version));
    }
    let mut events = Vec::new();
    for (i, line) in lines {
        let bad = |reason: &str| CastError::Event {
            line: i + 1,
            reason: reason.to_string(),
        };
        let (t, code, data): (f64, String, String) =
            serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        if !t.is_finite() || t < 0.0 {
            return Err(bad("time is not a non-negative number"));
        }
        let Some(kind) = EventKind::from_code(&code) else {
            continue;
        };
        events.push(Event {
            at: Duration::from_secs_f64(t.min(1e9)),
            kind,
            data,
        });
    }
    Ok((header, events))
}

/// One step of a replay: wait `delay`, then write `data` to the terminal.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub delay: Duration,
    pub data: String,
}

/// The replay schedule of the output events, with every pause shortened to `idle_limit`
/// (as `asciinema play -i`) and the whole divided by `speed`.
pub fn schedule(events: &[Event], idle_limit: Option<Duration>, speed: f64) -> Vec<Step> {
    let speed = if speed.is_finite() && speed > 0.0 {
        speed
    } else {
        1.0
    };
    let mut last = Duration::ZERO;
    let mut steps = Vec::new();
    for e in events.iter().filter(|e| e.kind == EventKind::Output) {
        let mut gap = e.at.saturating_sub(last);
        last = e.at;
        if let Some(limit) = idle_limit {
            gap = gap.min(limit);
        }
        steps.push(Step {
            delay: gap.div_f64(speed),
            data: e.data.clone(),
        });
    }
    steps
}

/// All the data of one kind, concatenated (what was shown, or what was typed).
pub fn transcript(events: &[Event], kind: EventKind) -> String {
    events
        .iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.data.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            version: 2,
            width: 80,
            height: 24,
            timestamp: 1_700_000_000,
            env: BTreeMap::from([("TERM".to_string(), "xterm-256color".to_string())]),
            title: None,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn records_and_parses_back_with_timing() {
        let mut r = Recorder::new(&header(), DEFAULT_CAP);
        r.output(ms(0), b"$ ");
        r.input(ms(500), b"ls\r");
        r.output(ms(510), b"a  b\r\n");
        r.resize(ms(900), 100, 30);
        let rec = r.finish(ms(1000));
        assert!(!rec.truncated);
        assert_eq!((rec.output_bytes, rec.input_bytes), (8, 3));
        let (h, ev) = parse(&rec.cast).unwrap();
        assert_eq!(h, header());
        let kinds: Vec<_> = ev.iter().map(|e| (e.at, e.kind, e.data.as_str())).collect();
        assert_eq!(
            kinds,
            vec![
                (ms(0), EventKind::Output, "$ "),
                (ms(500), EventKind::Input, "ls\r"),
                (ms(510), EventKind::Output, "a  b\r\n"),
                (ms(900), EventKind::Resize, "100x30"),
            ]
        );
        assert_eq!(transcript(&ev, EventKind::Output), "$ a  b\r\n");
    }

    #[test]
    fn escape_sequences_and_newlines_stay_inside_one_line() {
        // A hostile program prints a fake event line and a fake audit record.
        let evil = b"\x1b[2J\n[0.0, \"o\", \"forged\"]\n{\"kind\":\"session.closed\"}\r\n\x07";
        let mut r = Recorder::new(&header(), DEFAULT_CAP);
        r.output(ms(1), evil);
        let rec = r.finish(ms(2));
        assert_eq!(rec.cast.lines().count(), 2, "{}", rec.cast);
        assert!(rec.cast.contains("\\u001b[2J"));
        let (_, ev) = parse(&rec.cast).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].data.as_bytes(), evil);
    }

    #[test]
    fn utf8_split_across_reads_is_kept_whole_and_invalid_bytes_replaced() {
        let mut r = Recorder::new(&header(), DEFAULT_CAP);
        let snow = "☃".as_bytes();
        r.output(ms(1), &snow[..1]);
        r.output(ms(2), &snow[1..]);
        r.output(ms(3), b"a\xffb");
        r.output(ms(4), &snow[..2]);
        let rec = r.finish(ms(5));
        let (_, ev) = parse(&rec.cast).unwrap();
        assert_eq!(transcript(&ev, EventKind::Output), "☃a\u{fffd}b\u{fffd}");
    }

    #[test]
    fn cap_truncates_with_a_marker_and_counts_on() {
        let mut r = Recorder::new(&header(), 1024);
        for i in 0..100u64 {
            r.output(ms(i), b"0123456789abcdef0123456789abcdef");
        }
        assert!(r.is_truncated());
        let rec = r.finish(ms(200));
        assert!(rec.truncated);
        assert!(rec.cast.len() <= 1024, "{}", rec.cast.len());
        assert_eq!(rec.output_bytes, 3200);
        let (_, ev) = parse(&rec.cast).unwrap();
        let last = ev.last().unwrap();
        assert_eq!(last.kind, EventKind::Marker);
        assert!(last.data.starts_with("truncated"));
        assert_eq!(ev.iter().filter(|e| e.kind == EventKind::Marker).count(), 1);
    }

    #[test]
    fn clock_going_backwards_keeps_events_ordered() {
        let mut r = Recorder::new(&header(), DEFAULT_CAP);
        r.output(ms(100), b"a");
        r.output(ms(50), b"b");
        let (_, ev) = parse(&r.finish(ms(0)).cast).unwrap();
        assert_eq!(ev[1].at, ms(100));
    }

    #[test]
    fn schedule_keeps_gaps_limits_idle_and_scales() {
        let ev = vec![
            Event {
                at: ms(0),
                kind: EventKind::Output,
                data: "a".into(),
            },
            Event {
                at: ms(300),
                kind: EventKind::Input,
                data: "x".into(),
            },
            Event {
                at: ms(500),
                kind: EventKind::Output,
                data: "b".into(),
            },
            Event {
                at: ms(10_500),
                kind: EventKind::Output,
                data: "c".into(),
            },
        ];
        let steps = schedule(&ev, None, 1.0);
        assert_eq!(
            steps.iter().map(|s| s.delay).collect::<Vec<_>>(),
            vec![ms(0), ms(500), ms(10_000)]
        );
        let steps = schedule(&ev, Some(ms(2000)), 2.0);
        assert_eq!(
            steps.iter().map(|s| s.delay).collect::<Vec<_>>(),
            vec![ms(0), ms(250), ms(1000)]
        );
        assert_eq!(
            steps.iter().map(|s| s.data.as_str()).collect::<String>(),
            "abc"
        );
    }

    #[test]
    fn parse_errors() {
        let table: &[(&str, CastError)] = &[
            ("", CastError::NoHeader),
            (
                "{\"version\":1,\"width\":1,\"height\":1,\"timestamp\":0}",
                CastError::Version(1),
            ),
            (
                "{\"version\":2,\"width\":1,\"height\":1,\"timestamp\":0}\n[-1,\"o\",\"x\"]",
                CastError::Event {
                    line: 2,
                    reason: "time is not a non-negative number".into(),
                },
            ),
        ];
        for (input, want) in table {
            assert_eq!(&parse(input).unwrap_err(), want, "{input:?}");
        }
        assert!(matches!(parse("nope"), Err(CastError::Header(_))));
        assert!(matches!(
            parse("{\"version\":2,\"width\":1,\"height\":1,\"timestamp\":0}\n[1,2]"),
            Err(CastError::Event { line: 2, .. })
        ));
        // Unknown kinds are skipped.
        let (_, ev) =
            parse("{\"version\":2,\"width\":1,\"height\":1,\"timestamp\":0}\n[1,\"x\",\"y\"]")
                .unwrap();
        assert!(ev.is_empty());
    }

    proptest! {
        #[test]
        fn any_bytes_round_trip_as_lossy_text_in_one_line_per_event(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..20)) {
            let mut r = Recorder::new(&header(), DEFAULT_CAP);
            let mut all = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                r.output(ms(i as u64), c);
                all.extend_from_slice(c);
            }
            let rec = r.finish(ms(100));
            let (_, ev) = parse(&rec.cast).unwrap();
            prop_assert_eq!(rec.cast.lines().count(), ev.len() + 1);
            let shown = transcript(&ev, EventKind::Output);
            // Split points never change the decoding, except that a trailing incomplete
            // sequence becomes one replacement character.
            let whole = String::from_utf8_lossy(&all).into_owned();
            prop_assert_eq!(shown.replace('\u{fffd}', ""), whole.replace('\u{fffd}', ""));
        }

        #[test]
        fn parse_never_panics(s in ".{0,300}") {
            let _ = parse(&s);
        }
    }
}
