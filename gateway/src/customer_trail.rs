//! Delivers each appliance's customer-trail outbox to its agent.
//!
//! The outbox (`crate::store`, migration 0008) holds, numbered per appliance, every request,
//! decision and outcome concerning the appliance, written in the same transaction as its
//! vendor-trail record. While the agent is connected one sender per connection sends what
//! follows the last number the agent's trail holds, as `TrailRecords` commands (numbered and
//! acknowledged like every command, `crate::delivery`), one batch at a time: the next batch
//! goes once the agent has reported (`TrailRecorded`) the last number it holds durably. The
//! agent reports that number in its hello too, so after a reconnect (or a restart of either
//! side) the sender resumes right after it; a number it reports lower than what was sent (a
//! gap it found, or a trail that could not be written) makes the sender send again from there.
//! Reported records are pruned. While the agent is away the outbox keeps its records, at most
//! [`OUTBOX_BOUND`] undelivered per appliance: then new requests for that appliance are
//! refused ([`room`]); decisions on requests already made still go in.

use crate::{
    agent_rounds::AgentRounds,
    ports::AgentPort,
    store::{Store, TrailPosition, OUTBOX_BOUND},
};
use endpoint_types::{customer_trail::GatewayRecord, frame::ToAgent, ApiError, ErrorCode};
use std::{sync::Arc, time::Duration};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Records per `TrailRecords` command, and the bytes they may take (well under a frame).
const BATCH: u32 = 100;
const BATCH_BYTES: usize = 256 * 1024;
/// Pause before sending again after the agent took less than it was sent.
const RETRY: Duration = Duration::from_secs(1);
/// How often a sender looks at the outbox without being rung (records another replica made).
const LOOK_EVERY: Duration = Duration::from_secs(10);

/// Refuses a new request for `appliance_id` while its outbox holds `bound` undelivered records.
pub async fn room(store: &Store, appliance_id: &str, bound: u64) -> Result<(), ApiError> {
    let state = store
        .outbox_state(appliance_id)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if state.undelivered() < bound {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::AuditUnavailable,
        format!(
            "the customer trail of appliance {appliance_id} cannot take more records: {} are waiting for its agent (at most {bound})",
            state.undelivered()
        ),
    )
    .hint("the appliance's agent has been away (or is too old to keep these records) for a long time; once it is connected (and up to date) it records the waiting ones and requests are accepted again")
    .details(serde_json::json!({
        "appliance_id": appliance_id,
        "undelivered": state.undelivered(),
        "bound": bound,
    })))
}

/// [`room`] with the bound the gateway uses.
pub async fn room_for_request(store: &Store, appliance_id: &str) -> Result<(), ApiError> {
    room(store, appliance_id, OUTBOX_BOUND).await
}

/// The sender's position, sans IO: one batch in flight at a time, and the outbox read only
/// when it may hold something not sent yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxCursor {
    /// The last number the agent reported its trail holds.
    recorded: u64,
    /// The last number of the batch sent and not yet reported on.
    in_flight: Option<u64>,
    /// The highest number sent on this connection (0: none yet).
    highest_sent: u64,
    /// Whether the outbox may hold records after `recorded` that were not sent: records were
    /// added since it was last read (the bell), the last batch was cut short, or the agent
    /// reported less than was sent. Without it, every report cost two reads that found
    /// nothing (scale_bench: one per revocation, on the store's one SQLite connection).
    look: bool,
}

/// What a report from the agent means for the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// It holds everything sent: go on.
    Caught,
    /// It holds less than was sent (a gap it found, or its trail could not take them): send
    /// again from its number, after a pause.
    Behind,
}

impl OutboxCursor {
    /// Starts after the number the agent's hello reported.
    pub fn new(recorded: u64) -> OutboxCursor {
        OutboxCursor {
            recorded,
            in_flight: None,
            highest_sent: 0,
            look: true,
        }
    }

    /// The number to read records after: when nothing is in flight and the outbox may hold
    /// something not sent.
    pub fn next_after(&self) -> Option<u64> {
        (self.in_flight.is_none() && self.look).then_some(self.recorded)
    }

    /// A batch ending at `last` went out; `more` if the read was cut short (more records may
    /// follow it).
    pub fn sent(&mut self, last: u64, more: bool) {
        self.in_flight = Some(last);
        self.highest_sent = self.highest_sent.max(last);
        self.look = more;
    }

    /// The outbox held nothing after [`OutboxCursor::next_after`].
    pub fn read_all(&mut self) {
        self.look = false;
    }

    /// Records were added (or may have been, by another replica): read again when free.
    pub fn rung(&mut self) {
        self.look = true;
    }

    pub fn reported(&mut self, number: u64) -> Reported {
        let sent = self.in_flight.take();
        self.recorded = number;
        match sent {
            Some(last) if number < last => {
                self.look = true;
                Reported::Behind
            }
            _ => Reported::Caught,
        }
    }

    /// The report of `number` as the store takes it: within what this connection sent, the
    /// head row exists and the numbering is past it.
    pub fn position(&self, number: u64) -> TrailPosition {
        TrailPosition {
            number,
            within_sent: self.highest_sent > 0 && number <= self.highest_sent,
        }
    }

    pub fn recorded(&self) -> u64 {
        self.recorded
    }
}

/// Takes records from the front of `records` while they fit one batch's bytes (at least one).
fn fit_batch(mut records: Vec<GatewayRecord>) -> Vec<GatewayRecord> {
    let mut bytes = 0;
    let mut keep = 0;
    for r in &records {
        bytes += serde_json::to_vec(r)
            .map(|v| v.len())
            .unwrap_or(BATCH_BYTES);
        if keep > 0 && bytes > BATCH_BYTES {
            break;
        }
        keep += 1;
    }
    records.truncate(keep);
    records
}

/// The next batch to send after `after`.
struct Batch {
    records: Vec<GatewayRecord>,
    /// The number up to which records after `after` are gone (pruned once reported, so the
    /// agent's trail lost them since).
    lost_through: Option<u64>,
    /// The read was cut short: more records may follow.
    more: bool,
}

/// What to send after `after`; `None` when there is nothing.
async fn next_batch(
    store: &Store,
    appliance_id: &str,
    after: u64,
) -> Result<Option<Batch>, crate::store::StoreError> {
    let read = store.outbox_after(appliance_id, after, BATCH).await?;
    let (mut full, mut read_len) = (read.len() >= BATCH as usize, read.len());
    let mut records = fit_batch(read);
    if records.is_empty() {
        let last = store.outbox_state(appliance_id).await?.last_number;
        if last <= after {
            return Ok(None);
        }
        // A record numbered after `after` may have been committed between the two reads
        // above: it is not lost. Numbers are committed in order (taken under the audit write
        // lock), so every record up to `last` is committed now: read once more, and what is
        // still missing was pruned.
        let again = store.outbox_after(appliance_id, after, BATCH).await?;
        (full, read_len) = (again.len() >= BATCH as usize, again.len());
        records = fit_batch(again);
        if records.is_empty() {
            return Ok(Some(Batch {
                records,
                lost_through: Some(last),
                more: false,
            }));
        }
    }
    let more = full || records.len() < read_len;
    // Numbers are committed in order, so a record missing before the first one was pruned.
    let gone_to = records
        .first()
        .map_or(after, |first| first.number.saturating_sub(1));
    let lost_through = (gone_to > after).then_some(gone_to);
    Ok(Some(Batch {
        records,
        lost_through,
        more,
    }))
}

/// One connection's sender: runs until `stop` is cancelled or the connection cannot take a
/// command. `reports` carries the agent's `TrailRecorded` numbers, starting with its hello's;
/// they go to the store with the next round of `rounds`.
pub async fn deliver(
    store: Store,
    agents: Arc<dyn AgentPort>,
    rounds: Arc<AgentRounds>,
    appliance_id: String,
    mut reports: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    let bell = store.trail_bell(&appliance_id);
    let start = *reports.borrow_and_update();
    let mut cursor = OutboxCursor::new(start);
    rounds.recorded(&appliance_id, cursor.position(start));
    let pause = |d: Duration| {
        let stop = stop.clone();
        async move {
            tokio::select! {
                () = stop.cancelled() => false,
                () = tokio::time::sleep(d) => true,
            }
        }
    };
    loop {
        if let Some(after) = cursor.next_after() {
            match next_batch(&store, &appliance_id, after).await {
                Ok(Some(batch)) => {
                    let last = batch
                        .records
                        .last()
                        .map(|r| r.number)
                        .or(batch.lost_through)
                        .unwrap_or(after);
                    let frame = ToAgent::TrailRecords {
                        records: batch.records,
                        lost_through: batch.lost_through,
                    };
                    if !agents.send(&appliance_id, frame) {
                        break;
                    }
                    cursor.sent(last, batch.more);
                    continue;
                }
                Ok(None) => cursor.read_all(),
                Err(e) => {
                    tracing::warn!(appliance = %appliance_id, error = %e, "cannot read the customer trail's outbox");
                    if !pause(RETRY).await {
                        break;
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = bell.notified() => cursor.rung(),
            changed = reports.changed() => {
                if changed.is_err() {
                    break;
                }
                let number = *reports.borrow_and_update();
                rounds.recorded(&appliance_id, cursor.position(number));
                if cursor.reported(number) == Reported::Behind {
                    tracing::info!(appliance = %appliance_id, number, "the agent's customer trail is behind what was sent; sending again after it");
                    if !pause(RETRY).await {
                        break;
                    }
                }
            }
            () = tokio::time::sleep(LOOK_EVERY) => cursor.rung(),
        }
    }
    store.forget_trail_bell(&appliance_id, &bell);
}

#[cfg(test)]
mod tests;
