//! Signed trail heads: how each trail proves its own length, and how the two trails (the
//! appliance's file, the gateway's store) anchor each other so that cutting records off the end
//! of either is caught.
//!
//! Each side writes an `audit.head` record into its own trail at least every
//! [`HEAD_EVERY_RECORDS`] records or [`HEAD_EVERY`], and on shutdown. The head record signs its
//! own position: `seq` is the head record's own seq and `prev_hash` the hash of the record before
//! it, so the head record cannot be cut off while a copy of it survives elsewhere. Each side sends
//! its latest head to the other, which records it as an `audit.anchor` record. A verifier then
//! checks every head and anchor signature in the trail, and compares the trail with heads kept
//! OUTSIDE it (the side's own head file, the other side's anchor): a trail that ends before such
//! a head, or holds another record at its seq, has lost its end.
//!
//! Pure logic: signatures are checked through [`HeadKeys`], which the caller implements with its
//! crypto provider.

use crate::api::AuditRecord;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The kind of a side's own signed head record.
pub const HEAD_KIND: &str = "audit.head";
/// The kind of the record holding the other side's signed head.
pub const ANCHOR_KIND: &str = "audit.anchor";
/// A head at least this often (records of the trail since the previous head).
pub const HEAD_EVERY_RECORDS: i64 = 100;
/// …and at least this often while anything but heads and anchors was recorded.
pub const HEAD_EVERY: Duration = Duration::from_secs(60);

/// Whose trail a head is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrailSide {
    /// The customer's trail, written by the agent, signed with the appliance key.
    Appliance,
    /// The vendor's trail in the gateway's store, signed with the gateway audit key.
    Gateway,
}

impl TrailSide {
    pub fn as_str(self) -> &'static str {
        match self {
            TrailSide::Appliance => "appliance",
            TrailSide::Gateway => "gateway",
        }
    }
}

/// A trail's head, signed by its writer. What is signed is [`SignedHead::signed_bytes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHead {
    pub trail: TrailSide,
    /// The appliance whose trail this is (appliance heads only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appliance_id: Option<String>,
    /// The seq of the head record itself in its trail.
    pub seq: i64,
    /// The hash of the record before the head record.
    pub prev_hash: String,
    pub time: Timestamp,
    /// Standard base64 DER ECDSA P-256 / SHA-256 (certs::record_signature).
    pub signature: String,
    /// Which key signed: the gateway audit key's public key (base64), or the SHA-256
    /// fingerprint of the appliance certificate. Not signed; verifiers check it against the key
    /// they trust.
    #[serde(default)]
    pub key: String,
}

impl SignedHead {
    /// The bytes the signature is over: a versioned JSON array of what the head states.
    pub fn signed_bytes(&self) -> Vec<u8> {
        signed_bytes(
            self.trail,
            self.appliance_id.as_deref(),
            self.seq,
            &self.prev_hash,
            &self.time,
        )
    }

    /// The head's position, for messages: `seq 1234 (2026-…)`.
    pub fn describe(&self) -> String {
        format!(
            "the {} head at seq {} (signed {})",
            self.trail.as_str(),
            self.seq,
            self.time
        )
    }
}

/// [`SignedHead::signed_bytes`] before the signature exists.
pub fn signed_bytes(
    trail: TrailSide,
    appliance_id: Option<&str>,
    seq: i64,
    prev_hash: &str,
    time: &Timestamp,
) -> Vec<u8> {
    let fields = (
        "postern-trail-head/1",
        trail.as_str(),
        appliance_id,
        seq,
        prev_hash,
        time.to_string(),
    );
    serde_json::to_vec(&fields).unwrap_or_default()
}

/// The detail of an `audit.anchor` record: the other side's head, and for an appliance head
/// the certificate whose key signed it (standard base64 DER), so a later verifier can check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    #[serde(flatten)]
    pub head: SignedHead,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

/// The signature checks a verifier needs; errors are the reason, for the message.
pub trait HeadKeys {
    /// A head of the trail being verified.
    fn own(&self, head: &SignedHead) -> Result<(), String>;
    /// An anchor: the other side's head recorded in this trail.
    fn peer(&self, anchor: &Anchor) -> Result<(), String>;
}

/// A head kept outside the trail, to compare the trail with, and where it came from
/// (`head file`, `gateway`, `--anchor`), for the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutsideHead {
    pub head: SignedHead,
    pub source: String,
}

/// Why the heads of a trail do not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadFailure {
    /// A head or anchor record that does not verify.
    Record { seq: i64, reason: String },
    /// A head known from outside the trail is not in it: records were cut off the end, or the
    /// trail was replaced.
    Missing {
        head: Box<SignedHead>,
        source: String,
        /// The last seq the trail holds.
        trail_ends_at: i64,
        reason: String,
    },
}

impl HeadFailure {
    /// The seq to name: the failing record, or the missing head.
    pub fn seq(&self) -> i64 {
        match self {
            HeadFailure::Record { seq, .. } => *seq,
            HeadFailure::Missing { head, .. } => head.seq,
        }
    }

    pub fn message(&self) -> String {
        match self {
            HeadFailure::Record { seq, reason } => format!("record {seq}: {reason}"),
            HeadFailure::Missing {
                head,
                source,
                trail_ends_at,
                reason,
            } => format!(
                "{} is missing ({reason}; the trail ends at seq {trail_ends_at}; the head is known from the {source}): records were cut off the end or the trail was replaced",
                head.describe()
            ),
        }
    }
}

/// What the heads of a verified trail show.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadSummary {
    /// Own signed heads in the trail.
    pub heads: u64,
    /// The other side's heads recorded in the trail.
    pub anchors: u64,
    /// The last own head in the trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_head: Option<SignedHead>,
    /// Where the heads compared with came from (`head file`, `gateway`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compared_with: Vec<String>,
}

/// Checks a trail's heads and anchors a record at a time, alongside the chain check
/// ([`crate::api::ChainVerifier`]), so pages need not be held.
#[derive(Debug, Clone)]
pub struct HeadVerifier {
    side: TrailSide,
    outside: Vec<OutsideHead>,
    summary: HeadSummary,
    last_seq: i64,
}

impl HeadVerifier {
    pub fn new(side: TrailSide, outside: Vec<OutsideHead>) -> HeadVerifier {
        let summary = HeadSummary {
            compared_with: outside.iter().map(|o| o.source.clone()).collect(),
            ..HeadSummary::default()
        };
        HeadVerifier {
            side,
            outside,
            summary,
            last_seq: 0,
        }
    }

    /// The next record of the trail (whose chain link was already checked).
    pub fn push(&mut self, r: &AuditRecord, keys: &impl HeadKeys) -> Result<(), HeadFailure> {
        let bad = |reason: String| HeadFailure::Record { seq: r.seq, reason };
        self.last_seq = r.seq;
        let own = if r.kind == HEAD_KIND {
            let head: SignedHead = serde_json::from_value(r.detail.clone())
                .map_err(|e| bad(format!("the head record is malformed: {e}")))?;
            if head.trail != self.side {
                return Err(bad(format!(
                    "a {} head in the {} trail",
                    head.trail.as_str(),
                    self.side.as_str()
                )));
            }
            if head.seq != r.seq || head.prev_hash != r.prev_hash {
                return Err(bad(format!(
                    "the head states seq {} but stands at seq {} (or after another record): it was moved",
                    head.seq, r.seq
                )));
            }
            if self.side == TrailSide::Appliance && head.appliance_id != r.appliance_id {
                return Err(bad("the head is of another appliance".into()));
            }
            keys.own(&head)
                .map_err(|e| bad(format!("the head's signature does not verify: {e}")))?;
            self.summary.heads += 1;
            self.summary.last_head = Some(head.clone());
            Some(head)
        } else {
            if r.kind == ANCHOR_KIND {
                let anchor: Anchor = serde_json::from_value(r.detail.clone())
                    .map_err(|e| bad(format!("the anchor record is malformed: {e}")))?;
                if anchor.head.trail == self.side {
                    return Err(bad(format!(
                        "an anchor of the {} trail's own head",
                        self.side.as_str()
                    )));
                }
                if self.side == TrailSide::Gateway && anchor.head.appliance_id != r.appliance_id {
                    return Err(bad(
                        "the anchor's head is of another appliance than the record".into(),
                    ));
                }
                keys.peer(&anchor).map_err(|e| {
                    bad(format!(
                        "the anchored head's signature does not verify: {e}"
                    ))
                })?;
                self.summary.anchors += 1;
            }
            None
        };
        for o in self.outside.iter().filter(|o| o.head.seq == r.seq) {
            let same = own.as_ref().is_some_and(|h| {
                h.prev_hash == o.head.prev_hash
                    && h.signature == o.head.signature
                    && h.time == o.head.time
            });
            if !same {
                return Err(HeadFailure::Missing {
                    head: Box::new(o.head.clone()),
                    source: o.source.clone(),
                    trail_ends_at: r.seq,
                    reason: format!("the record at seq {} is not that head", r.seq),
                });
            }
        }
        Ok(())
    }

    /// After the last record: a head known from outside beyond the trail's end is missing.
    pub fn finish(self) -> Result<HeadSummary, HeadFailure> {
        if let Some(o) = self
            .outside
            .iter()
            .filter(|o| o.head.seq > self.last_seq)
            .min_by_key(|o| o.head.seq)
        {
            return Err(HeadFailure::Missing {
                head: Box::new(o.head.clone()),
                source: o.source.clone(),
                trail_ends_at: self.last_seq,
                reason: format!("no record at seq {}", o.head.seq),
            });
        }
        Ok(self.summary)
    }
}

/// When a writer owes its trail a head: records since the last one, and whether any of them is
/// more than a head or an anchor (idle trails do not grow by heads answering heads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadCadence<I> {
    since_head: i64,
    substantive: bool,
    last_head_at: I,
}

impl<I: Copy + Ord + std::ops::Add<Duration, Output = I>> HeadCadence<I> {
    pub fn new(now: I) -> Self {
        HeadCadence {
            since_head: 0,
            substantive: false,
            last_head_at: now,
        }
    }

    /// Records were written (not counting heads themselves).
    pub fn wrote(&mut self, kind: &str) {
        if kind == HEAD_KIND {
            return;
        }
        self.since_head += 1;
        self.substantive |= kind != ANCHOR_KIND;
    }

    /// Whether a head is due now.
    pub fn due(&self, now: I) -> bool {
        self.since_head >= HEAD_EVERY_RECORDS || (self.substantive && now >= self.deadline())
    }

    /// When the timer makes a head due (while something substantive waits for one).
    pub fn deadline(&self) -> I {
        self.last_head_at + HEAD_EVERY
    }

    /// Whether a head is due by count alone (a writer puts it right after the record).
    pub fn due_by_count(&self) -> bool {
        self.since_head >= HEAD_EVERY_RECORDS
    }

    /// Whether anything at all was written since the last head (for the head on shutdown).
    pub fn pending(&self) -> bool {
        self.since_head > 0
    }

    pub fn waiting(&self) -> bool {
        self.substantive
    }

    pub fn headed(&mut self, now: I) {
        self.since_head = 0;
        self.substantive = false;
        self.last_head_at = now;
    }
}

#[cfg(test)]
#[path = "trail_head_tests.rs"]
mod tests;
