//! Group commit for the customer's trail: writers queue records; one writer thread chains a
//! batch (everything queued while the previous batch was being synced), appends it with one
//! `write` to the `O_APPEND` file, `fdatasync`s, and only then acknowledges each writer.
//!
//! The writer never waits to gather a batch, so a record is durable within the time of at
//! most two batches' write and sync; a batch slower than [`SLOW_BATCH`] is logged, so the
//! customer learns when the disk breaks the bound. A batch that cannot be written or synced is
//! cut off the file again (the file ends at the last durable record), every record in it is
//! refused, and the chain continues from the last durable record: the file always verifies.

use endpoint_types::api::AuditRecord;
use endpoint_types::trail_head::{HeadCadence, HEAD_KIND};
use jiff::Timestamp;
use serde_json::value::RawValue;
use std::{
    fs::File,
    io::Write,
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

/// The bound the README states: a healthy disk syncs a batch well within it.
pub const SLOW_BATCH: Duration = Duration::from_millis(10);
/// Caps one batch, so one write and sync stay short even under a burst.
const MAX_BATCH: usize = 4096;

/// Why a record could not be made durable (the I/O error's text: it is shared by a batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFailure(pub String);

/// Who waits for a record, and how.
pub enum Ack {
    /// An async writer awaiting durability.
    Async(tokio::sync::oneshot::Sender<Result<AuditRecord, WriteFailure>>),
    /// A synchronous writer (not on an async task) blocking for durability.
    Blocking(mpsc::SyncSender<Result<AuditRecord, WriteFailure>>),
    /// Nobody: a failure is logged and counted, and sessions watching the count are cut.
    Detached,
}

/// What writers queue: a record, or a flush answered once everything queued before it is durable.
pub enum Item {
    Record(Queued),
    /// Records that go into the same batch, so they are durable together or not at all.
    Group(Vec<Queued>),
    Flush(tokio::sync::oneshot::Sender<()>),
    /// A signed head now if anything was written since the last (the agent's shutdown),
    /// answered once it is durable.
    Head(tokio::sync::oneshot::Sender<()>),
}

/// The trail's signed heads (crate::trail_heads): who signs, and when the next is due.
pub struct Heads {
    pub signer: crate::trail_heads::HeadSigner,
    pub cadence: HeadCadence<Instant>,
}

/// One record to chain; `seq`, `time` and the hashes are the writer's.
pub struct Queued {
    pub kind: &'static str,
    pub actor: String,
    pub endpoint_id: Option<String>,
    pub session_id: Option<String>,
    pub op_id: Option<String>,
    pub detail: Box<RawValue>,
    pub ack: Ack,
}

/// The chain's durable end and the file it is in.
pub struct Chain {
    pub path: PathBuf,
    pub file: File,
    /// Bytes of the file that hold durable records.
    pub durable_len: u64,
    pub next_seq: i64,
    pub prev_hash: String,
    pub appliance_id: Option<String>,
    /// None for an unenrolled agent (no key to sign with).
    pub heads: Option<Heads>,
}

/// The writer thread: runs until every sender is dropped, then returns after the last batch.
pub fn run(
    mut chain: Chain,
    rx: mpsc::Receiver<Item>,
    failures: tokio::sync::watch::Sender<u64>,
    metrics: std::sync::Arc<std::sync::OnceLock<crate::metrics::AgentMetrics>>,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        let first = match next_item(&rx, &chain) {
            Next::Item(item) => item,
            Next::HeadDue => {
                write_head(&mut chain, &mut buf, &failures);
                continue;
            }
            Next::Closed => break,
        };
        let mut batch = Vec::new();
        let mut flushes = Vec::new();
        let mut heads = Vec::new();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Item::Record(q) => batch.push(q),
                Item::Group(group) => batch.extend(group),
                Item::Flush(tx) => flushes.push(tx),
                Item::Head(tx) => heads.push(tx),
            }
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if batch.is_empty() {
            if !heads.is_empty() && chain.heads.as_ref().is_some_and(|h| h.cadence.pending()) {
                write_head(&mut chain, &mut buf, &failures);
            }
            for tx in flushes.into_iter().chain(heads) {
                let _ = tx.send(());
            }
            continue;
        }
        let started = Instant::now();
        let outcome = write_batch(&mut chain, &batch, &mut buf);
        let took = started.elapsed();
        if took > SLOW_BATCH {
            tracing::warn!(records = batch.len(), took_ms = took.as_millis() as u64, path = %chain.path.display(), "the customer's audit trail took longer than {SLOW_BATCH:?} to write and sync a batch");
        }
        match outcome {
            Ok(records) => {
                if let Some(m) = metrics.get() {
                    m.trail_batch(batch.iter().map(|q| q.kind), took);
                }
                for (q, r) in batch.into_iter().zip(records) {
                    if let Some(r) = r {
                        acknowledge(q.ack, Ok(r));
                    }
                }
            }
            Err(failure) => {
                tracing::error!(records = batch.len(), path = %chain.path.display(), error = %failure.0, "cannot write the customer's audit trail: the records of this batch are refused and the sessions they belong to are cut");
                failures.send_modify(|n| *n += 1);
                for q in batch {
                    acknowledge(q.ack, Err(failure.clone()));
                }
            }
        }
        let due = chain.heads.as_ref().is_some_and(|h| {
            h.cadence.due(Instant::now()) || (!heads.is_empty() && h.cadence.pending())
        });
        if due {
            write_head(&mut chain, &mut buf, &failures);
        }
        for tx in flushes.into_iter().chain(heads) {
            let _ = tx.send(());
        }
    }
    // Every writer is gone (the agent is stopping): the end of the trail gets its head.
    if chain.heads.as_ref().is_some_and(|h| h.cadence.pending()) {
        write_head(&mut chain, &mut buf, &failures);
    }
}

enum Next {
    Item(Item),
    HeadDue,
    Closed,
}

/// The next queued item; while a timed head is owed, no longer than until it is due.
fn next_item(rx: &mpsc::Receiver<Item>, chain: &Chain) -> Next {
    let deadline = chain
        .heads
        .as_ref()
        .filter(|h| h.cadence.waiting())
        .map(|h| h.cadence.deadline());
    match deadline {
        Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
            Ok(item) => Next::Item(item),
            Err(mpsc::RecvTimeoutError::Timeout) => Next::HeadDue,
            Err(mpsc::RecvTimeoutError::Disconnected) => Next::Closed,
        },
        None => rx.recv().map_or(Next::Closed, Next::Item),
    }
}

/// Signs the chain's head and appends it as the next record (once per hundred records or a
/// minute: the signature costs the writer tens of microseconds, never a statement's writer).
fn write_head(chain: &mut Chain, buf: &mut Vec<u8>, failures: &tokio::sync::watch::Sender<u64>) {
    let Some((head, q)) = chain.heads.as_ref().and_then(|h| {
        head_record(
            h,
            chain.appliance_id.as_deref(),
            chain.next_seq,
            &chain.prev_hash,
        )
    }) else {
        return;
    };
    match write_batch(chain, std::slice::from_ref(&q), buf) {
        Ok(_) => {
            if let Some(h) = chain.heads.as_mut() {
                h.cadence.headed(Instant::now());
                h.signer.written(head);
            }
        }
        Err(failure) => {
            tracing::error!(path = %chain.path.display(), error = %failure.0, "cannot write the customer trail's signed head");
            failures.send_modify(|n| *n += 1);
        }
    }
}

/// The signed head for a head record at `seq`, and that record, ready to chain.
fn head_record(
    heads: &Heads,
    appliance_id: Option<&str>,
    seq: i64,
    prev_hash: &str,
) -> Option<(endpoint_types::trail_head::SignedHead, Queued)> {
    let head = heads
        .signer
        .sign(seq, prev_hash, Timestamp::now())
        .inspect_err(|e| tracing::error!(error = %e, "cannot sign the customer trail's head"))
        .ok()?;
    // Through a `Value`, as every detail is: its keys in the order a verifier re-serialises.
    let detail = serde_json::to_value(&head)
        .and_then(|v| serde_json::value::to_raw_value(&v))
        .inspect_err(|e| tracing::error!(error = %e, "cannot encode the trail's head"))
        .ok()?;
    let q = Queued {
        kind: HEAD_KIND,
        actor: format!("agent:{}", appliance_id.unwrap_or("unenrolled")),
        endpoint_id: None,
        session_id: None,
        op_id: None,
        detail,
        ack: Ack::Detached,
    };
    Some((head, q))
}

fn acknowledge(ack: Ack, r: Result<AuditRecord, WriteFailure>) {
    match ack {
        Ack::Async(tx) => {
            let _ = tx.send(r);
        }
        Ack::Blocking(tx) => {
            let _ = tx.send(r);
        }
        Ack::Detached => {}
    }
}

/// Chains, appends and syncs one batch; on failure the file is cut back to its durable end.
fn write_batch(
    chain: &mut Chain,
    batch: &[Queued],
    buf: &mut Vec<u8>,
) -> Result<Vec<Option<AuditRecord>>, WriteFailure> {
    buf.clear();
    let mut records = Vec::with_capacity(batch.len());
    let mut seq = chain.next_seq;
    let mut prev_hash = chain.prev_hash.clone();
    // Heads due by count go into the same write and sync, right after their hundredth record;
    // the cadence is committed only if the batch is.
    let mut cadence = chain.heads.as_ref().map(|h| h.cadence.clone());
    let mut last_head = None;
    for q in batch {
        let time = Timestamp::now();
        let hash = crate::audit::chain_line(
            seq,
            &time,
            q,
            chain.appliance_id.as_deref(),
            &prev_hash,
            buf,
        )
        .map_err(|e| WriteFailure(e.to_string()))?;
        let prev = std::mem::replace(&mut prev_hash, hash);
        // Statements are detached: building their record would only be thrown away.
        records.push(match q.ack {
            Ack::Detached => None,
            _ => Some(AuditRecord {
                seq,
                time,
                kind: q.kind.to_string(),
                actor: q.actor.clone(),
                appliance_id: chain.appliance_id.clone(),
                endpoint_id: q.endpoint_id.clone(),
                session_id: q.session_id.clone(),
                op_id: q.op_id.clone(),
                detail: serde_json::from_str(q.detail.get()).unwrap_or_default(),
                prev_hash: prev,
                hash: prev_hash.clone(),
            }),
        });
        seq += 1;
        if let (Some(heads), Some(c)) = (chain.heads.as_ref(), cadence.as_mut()) {
            c.wrote(q.kind);
            if c.due_by_count() {
                if let Some((head, hq)) =
                    head_record(heads, chain.appliance_id.as_deref(), seq, &prev_hash)
                {
                    prev_hash = crate::audit::chain_line(
                        seq,
                        &Timestamp::now(),
                        &hq,
                        chain.appliance_id.as_deref(),
                        &prev_hash,
                        buf,
                    )
                    .map_err(|e| WriteFailure(e.to_string()))?;
                    seq += 1;
                    c.headed(Instant::now());
                    last_head = Some(head);
                }
            }
        }
    }
    let written = restore_end(chain)
        .and_then(|()| chain.file.write_all(buf))
        .and_then(|()| chain.file.sync_data());
    if let Err(e) = written {
        // A partial line must not stay: the next batch would chain after a record that is not
        // there, and `audit verify` would call the whole trail broken.
        let _ = chain.file.set_len(chain.durable_len);
        return Err(WriteFailure(e.to_string()));
    }
    chain.durable_len += buf.len() as u64;
    chain.next_seq = seq;
    chain.prev_hash = prev_hash;
    if let (Some(h), Some(c)) = (chain.heads.as_mut(), cadence) {
        h.cadence = c;
        if let Some(head) = last_head {
            h.signer.written(head);
        }
    }
    Ok(records)
}

/// After a failed batch whose cut-back also failed, the file may still hold part of it.
fn restore_end(chain: &mut Chain) -> std::io::Result<()> {
    if chain.file.metadata()?.len() != chain.durable_len {
        chain.file.set_len(chain.durable_len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(i: i64, ack: Ack) -> Item {
        Item::Record(Queued {
            kind: "t",
            actor: "a".into(),
            endpoint_id: None,
            session_id: Some("ses_1".into()),
            op_id: None,
            detail: serde_json::value::to_raw_value(&serde_json::json!({ "i": i })).unwrap(),
            ack,
        })
    }

    /// On a device that takes no writes every writer of the batch hears why, the failure is
    /// counted for the sessions watching, and a flush behind it still returns.
    #[test]
    fn a_batch_that_cannot_be_written_is_refused_to_every_writer() {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open("/dev/full")
            .unwrap();
        let chain = Chain {
            path: "/dev/full".into(),
            file,
            durable_len: 0,
            next_seq: 1,
            prev_hash: endpoint_types::api::AUDIT_GENESIS_HASH.into(),
            appliance_id: None,
            heads: None,
        };
        let (tx, rx) = mpsc::channel();
        let (failures, watched) = tokio::sync::watch::channel(0u64);
        let mut acks = Vec::new();
        for i in 0..3 {
            let (a, b) = mpsc::sync_channel(1);
            tx.send(queued(i, Ack::Blocking(a))).unwrap();
            acks.push(b);
        }
        tx.send(queued(9, Ack::Detached)).unwrap();
        let (flush_tx, mut flush_rx) = tokio::sync::oneshot::channel();
        tx.send(Item::Flush(flush_tx)).unwrap();
        drop(tx);
        run(chain, rx, failures, Default::default());
        for ack in acks {
            let failure = ack.recv().unwrap().unwrap_err();
            assert!(failure.0.contains("space"), "{failure:?}");
        }
        assert!(*watched.borrow() >= 1);
        assert_eq!(flush_rx.try_recv(), Ok(()));
    }
}
