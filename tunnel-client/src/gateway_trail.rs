//! The gateway's records in the customer trail: every request, decision and outcome
//! concerning this appliance (`endpoint_types::customer_trail`), also those that never reached
//! it, each recorded exactly once and in the gateway's order.
//!
//! The gateway numbers them per appliance from 1. The trail itself says how far it got: at
//! start-up the highest number in it is found on the pass that opens the trail, and the hello
//! tells the gateway, which sends what follows. A record numbered past the next one (a gap) is
//! not recorded, nor anything after it in its batch; the agent reports the last number it holds
//! (`TrailRecorded`), which makes the gateway send again from there. A record already held is
//! skipped. A batch is written in one group commit, so it is durable whole or not at all, and
//! only then reported.

use crate::audit::{AuditError, AuditLog, Entry};
use endpoint_types::{
    api::AuditRecord,
    customer_trail::{GatewayEvent, GatewayRecord, NUMBER_KEY},
};
use std::sync::Mutex;

/// Where the trail stands against the gateway's numbering, sans IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrailCursor {
    last: u64,
}

/// What to do with one received number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The next one: record it.
    Record,
    /// Already in the trail: skip it.
    Duplicate,
    /// Numbers `from..=to` are missing before it: ask for them.
    Gap { from: u64, to: u64 },
}

/// A received batch, sorted out: what to record (in order), how many were already held, and
/// the gap that stopped it, if one did.
#[derive(Debug, Default, PartialEq)]
pub struct Sorted {
    pub record: Vec<GatewayRecord>,
    pub duplicates: usize,
    pub gap: Option<(u64, u64)>,
}

impl TrailCursor {
    /// `last`: the highest number the trail holds (0: none).
    pub fn new(last: u64) -> TrailCursor {
        TrailCursor { last }
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    pub fn check(&self, number: u64) -> Verdict {
        // A trail edited to hold the largest number takes nothing more (and does not overflow).
        let Some(next) = self.last.checked_add(1) else {
            return Verdict::Duplicate;
        };
        match number {
            n if n < next => Verdict::Duplicate,
            n if n == next => Verdict::Record,
            n => Verdict::Gap {
                from: next,
                to: n - 1,
            },
        }
    }

    /// Sorts a batch against the cursor, as if each record to keep were already recorded; the
    /// cursor itself moves only once they are durable ([`TrailCursor::recorded`]).
    pub fn sort(&self, records: Vec<GatewayRecord>) -> Sorted {
        let mut ahead = *self;
        let mut sorted = Sorted::default();
        for r in records {
            match ahead.check(r.number) {
                Verdict::Record => {
                    ahead.last = r.number;
                    sorted.record.push(r);
                }
                Verdict::Duplicate => sorted.duplicates += 1,
                Verdict::Gap { from, to } => {
                    sorted.gap = Some((from, to));
                    break;
                }
            }
        }
        sorted
    }

    /// The records up to `number` are durable in the trail.
    pub fn recorded(&mut self, number: u64) {
        self.last = self.last.max(number);
    }
}

/// The trail record of a gateway record: the event's name as its kind, who as its actor, and
/// the gateway's number, its own record's seq, hash and time beside what it recorded.
pub fn entry_of(r: &GatewayRecord) -> Entry {
    let mut entry = Entry::new(
        r.event.as_str(),
        r.actor.clone(),
        serde_json::json!({
            NUMBER_KEY: r.number,
            "gateway_seq": r.gateway_seq,
            "gateway_hash": r.gateway_hash,
            "gateway_time": r.time.to_string(),
            "detail": r.detail,
        }),
    );
    entry.endpoint_id = r.endpoint_id.clone();
    entry.op_id = r.op_id.clone();
    entry
}

/// The kind of the record that says which numbers the gateway could not send any more.
pub const LOST_KIND: &str = "gateway_records.lost";

/// The record of numbers `from..=to` lost: the trail held them once (the gateway was told so
/// and pruned them), but holds them no more. It carries `to` as its number, so a restart goes
/// on after it.
fn lost_entry(from: u64, to: u64) -> Entry {
    Entry::new(
        LOST_KIND,
        "system:gateway",
        serde_json::json!({
            NUMBER_KEY: to,
            "from": from,
            "to": to,
            "reason": "the gateway no longer holds these records: this trail reported them recorded before, and has since lost them (replaced by an older copy?)",
        }),
    )
}

/// The gateway number a trail line holds, if it is one of the gateway's records.
pub fn number_in(line: &[u8]) -> Option<u64> {
    let needle = format!("\"{NUMBER_KEY}\":");
    // Most lines are statements: a substring test spares parsing them.
    line.windows(needle.len())
        .any(|w| w == needle.as_bytes())
        .then_some(())?;
    let record: AuditRecord = serde_json::from_slice(line).ok()?;
    number_of(&record)
}

/// The gateway number of a trail record, if it is one of the gateway's records.
pub fn number_of(record: &AuditRecord) -> Option<u64> {
    if GatewayEvent::parse(&record.kind).is_none() && record.kind != LOST_KIND {
        return None;
    }
    record.detail.get(NUMBER_KEY)?.as_u64()
}

/// One of the gateway's records as `postern-agent audit requests` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Listed {
    pub number: u64,
    pub kind: GatewayEvent,
    /// Its record in this trail.
    pub seq: i64,
    pub time: jiff::Timestamp,
    pub actor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_id: Option<String>,
    pub detail: serde_json::Value,
}

/// The gateway's records in a trail, in trail order, and whether their numbers run 1, 2, 3 …
/// without a gap or a repeat.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Listing {
    pub records: Vec<Listed>,
    pub last_number: u64,
    /// Numbers missing below `last_number` (none in a complete trail).
    pub missing: Vec<u64>,
    /// Numbers found more than once (none in a complete trail).
    pub repeated: Vec<u64>,
}

/// Reads the gateway's records out of the trail at `path` (a missing file is an empty trail).
pub fn list_file(path: &std::path::Path) -> Result<Listing, AuditError> {
    use std::io::BufRead;
    let io = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut records = Vec::new();
    match std::fs::File::open(path) {
        Ok(f) => {
            for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
                let line = line.map_err(io)?;
                if line.trim().is_empty() {
                    continue;
                }
                let r: AuditRecord =
                    serde_json::from_str(&line).map_err(|e| AuditError::Broken {
                        path: path.to_path_buf(),
                        seq: i as i64 + 1,
                        reason: format!("line {} is not a record: {e}", i + 1),
                    })?;
                let (Some(kind), Some(number)) = (GatewayEvent::parse(&r.kind), number_of(&r))
                else {
                    continue;
                };
                records.push(Listed {
                    number,
                    kind,
                    seq: r.seq,
                    time: r.time,
                    actor: r.actor,
                    op_id: r.op_id,
                    endpoint_id: r.endpoint_id,
                    detail: r.detail,
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let last_number = records.iter().map(|r| r.number).max().unwrap_or(0);
    let mut seen = std::collections::BTreeMap::<u64, usize>::new();
    for r in &records {
        *seen.entry(r.number).or_default() += 1;
    }
    Ok(Listing {
        missing: (1..=last_number)
            .filter(|n| !seen.contains_key(n))
            .take(1000)
            .collect(),
        repeated: seen
            .iter()
            .filter(|(_, c)| **c > 1)
            .map(|(n, _)| *n)
            .collect(),
        records,
        last_number,
    })
}

/// The agent's side: the cursor, and the trail it writes to.
pub struct GatewayTrail {
    cursor: Mutex<TrailCursor>,
    audit: AuditLog,
}

impl GatewayTrail {
    pub fn new(audit: AuditLog, last: u64) -> GatewayTrail {
        GatewayTrail {
            cursor: Mutex::new(TrailCursor::new(last)),
            audit,
        }
    }

    fn cursor(&self) -> std::sync::MutexGuard<'_, TrailCursor> {
        self.cursor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The highest number the trail holds durably.
    pub fn last(&self) -> u64 {
        self.cursor().last()
    }

    /// Records what is new in `records` and returns the number to report: the highest the
    /// trail now holds. `lost_through`: the gateway no longer holds the numbers up to it, so
    /// their loss is recorded instead (once), and numbering goes on after it. The caller
    /// handles one batch at a time (the control loop).
    pub async fn take(
        &self,
        records: Vec<GatewayRecord>,
        lost_through: Option<u64>,
    ) -> Result<u64, AuditError> {
        let held = self.last();
        let mut entries = Vec::new();
        let mut from = TrailCursor::new(held);
        if let Some(lost) = lost_through.filter(|l| *l > held) {
            tracing::warn!(
                from = held + 1,
                to = lost,
                "the gateway no longer holds records this trail once held; recording their loss"
            );
            entries.push(lost_entry(held + 1, lost));
            from = TrailCursor::new(lost);
        }
        let sorted = from.sort(records);
        if let Some((from, to)) = sorted.gap {
            tracing::warn!(
                from,
                to,
                "gateway records are missing from what the gateway sent; asking for them again"
            );
        }
        if sorted.duplicates > 0 {
            tracing::debug!(
                duplicates = sorted.duplicates,
                "skipped gateway records the trail already holds"
            );
        }
        let last = sorted.record.last().map_or(from.last(), |r| r.number);
        entries.extend(sorted.record.iter().map(entry_of));
        if entries.is_empty() {
            return Ok(held);
        }
        self.audit.write_group(entries).await?;
        let mut cursor = self.cursor();
        cursor.recorded(last);
        Ok(cursor.last())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(number: u64) -> GatewayRecord {
        GatewayRecord {
            number,
            event: GatewayEvent::OpDenied,
            time: "2026-12-07T03:00:00Z".parse().unwrap(),
            actor: "bob@customer".into(),
            endpoint_id: None,
            op_id: Some(format!("op_{number}")),
            detail: serde_json::json!({"stage": "command", "message": "no"}),
            gateway_seq: 100 + number as i64,
            gateway_hash: "ab".repeat(32),
        }
    }

    fn numbers(records: &[GatewayRecord]) -> Vec<u64> {
        records.iter().map(|r| r.number).collect()
    }

    #[test]
    fn the_next_number_is_recorded_older_ones_skipped_later_ones_are_a_gap() {
        let c = TrailCursor::new(4);
        assert_eq!(c.check(5), Verdict::Record);
        assert_eq!(c.check(4), Verdict::Duplicate);
        assert_eq!(c.check(1), Verdict::Duplicate);
        assert_eq!(c.check(8), Verdict::Gap { from: 5, to: 7 });
        assert_eq!(TrailCursor::new(0).check(1), Verdict::Record);
        assert_eq!(
            TrailCursor::new(0).check(2),
            Verdict::Gap { from: 1, to: 1 }
        );
        assert_eq!(
            TrailCursor::new(u64::MAX).check(u64::MAX),
            Verdict::Duplicate
        );
    }

    #[test]
    fn a_batch_is_recorded_up_to_its_first_gap() {
        let c = TrailCursor::new(2);
        let sorted = c.sort([1, 2, 3, 4, 6, 7].map(rec).to_vec());
        assert_eq!(numbers(&sorted.record), vec![3, 4]);
        assert_eq!(sorted.duplicates, 2);
        assert_eq!(sorted.gap, Some((5, 5)));
        // Sorting does not move the cursor; recording does, and never backwards.
        assert_eq!(c.last(), 2);
        let mut c = c;
        c.recorded(4);
        c.recorded(3);
        assert_eq!(c.last(), 4);
        // The resend after the gap: 5 onwards, 3 and 4 again are skipped.
        let again = c.sort([3, 4, 5, 6, 7].map(rec).to_vec());
        assert_eq!(numbers(&again.record), vec![5, 6, 7]);
        assert_eq!((again.duplicates, again.gap), (2, None));
    }

    #[test]
    fn a_batch_of_duplicates_records_nothing() {
        let sorted = TrailCursor::new(9).sort([7, 8, 9].map(rec).to_vec());
        assert!(sorted.record.is_empty());
        assert_eq!((sorted.duplicates, sorted.gap), (3, None));
    }

    /// A received record lands in the trail once; its number is found again when the trail is
    /// opened next (the agent's restart), so a resend after it is skipped.
    #[tokio::test]
    async fn recorded_numbers_survive_a_reopen_and_are_not_recorded_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = AuditLog::open(&path, Some("app_1".into())).unwrap();
        audit
            .write(Entry::new(
                "agent.connected",
                "agent:app_1",
                serde_json::json!({}),
            ))
            .await
            .unwrap();
        // A line that mentions the key in a string is not a gateway record.
        audit
            .write(Entry::new(
                "sql.statement",
                "alice",
                serde_json::json!({"text": "select '\"gateway_number\":99'", "gateway_number": 98}),
            ))
            .await
            .unwrap();
        let trail = GatewayTrail::new(audit.clone(), 0);
        assert_eq!(
            trail.take([1, 2, 4].map(rec).to_vec(), None).await.unwrap(),
            2
        );
        assert_eq!(
            trail.take([2, 3, 4].map(rec).to_vec(), None).await.unwrap(),
            4
        );
        audit.flush().await;
        drop((trail, audit));

        let mut found = Vec::new();
        let reopened = AuditLog::open_scanning(&path, Some("app_1".into()), &mut |line| {
            found.extend(number_in(line))
        })
        .unwrap();
        assert_eq!(found, vec![1, 2, 3, 4], "each number once, in order");
        let trail = GatewayTrail::new(reopened.clone(), 4);
        assert_eq!(
            trail.take([3, 4, 5].map(rec).to_vec(), None).await.unwrap(),
            5
        );
        reopened.flush().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let records: Vec<AuditRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let numbers: Vec<u64> = records.iter().filter_map(number_of).collect();
        assert_eq!(numbers, vec![1, 2, 3, 4, 5]);
        let listing = list_file(&path).unwrap();
        assert_eq!(listing.last_number, 5);
        assert!(listing.missing.is_empty() && listing.repeated.is_empty());
        assert_eq!(listing.records[4].kind, GatewayEvent::OpDenied);
        let five = records.iter().find(|r| number_of(r) == Some(5)).unwrap();
        assert_eq!(five.kind, "op.denied");
        assert_eq!(five.actor, "bob@customer");
        assert_eq!(five.op_id.as_deref(), Some("op_5"));
        assert_eq!(five.detail["detail"]["message"], "no");
        assert_eq!(five.detail["gateway_seq"], 105);
        assert_eq!(crate::audit::verify_file(&path).unwrap(), 7);
    }

    /// Numbers the gateway pruned (this trail reported them once, then lost them) are recorded
    /// as lost, once; numbering goes on after them, also across a reopen.
    #[tokio::test]
    async fn numbers_the_gateway_no_longer_holds_are_recorded_as_lost_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = AuditLog::open(&path, Some("app_1".into())).unwrap();
        let trail = GatewayTrail::new(audit.clone(), 2);
        assert_eq!(trail.take(vec![], Some(6)).await.unwrap(), 6);
        assert_eq!(
            trail.take([7, 8].map(rec).to_vec(), Some(6)).await.unwrap(),
            8
        );
        audit.flush().await;
        drop((trail, audit));
        let mut found = Vec::new();
        AuditLog::open_scanning(&path, None, &mut |l| found.extend(number_in(l))).unwrap();
        assert_eq!(found, vec![6, 7, 8]);
        let listing = list_file(&path).unwrap();
        assert_eq!(listing.last_number, 8);
        assert_eq!(listing.missing, (1..=6).collect::<Vec<u64>>());
        let text = std::fs::read_to_string(&path).unwrap();
        let lost: Vec<AuditRecord> = text
            .lines()
            .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap())
            .filter(|r| r.kind == LOST_KIND)
            .collect();
        assert_eq!(lost.len(), 1);
        assert_eq!(
            (
                lost[0].detail["from"].as_u64(),
                lost[0].detail["to"].as_u64()
            ),
            (Some(3), Some(6))
        );
    }
}
