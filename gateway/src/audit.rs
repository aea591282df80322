//! The vendor's audit trail: append-only, hash-chained records in the store.

use crate::store::AuditRow;
use crate::store::{AuditPageQuery, Store, StoreError};
use endpoint_types::api::{AuditRecord, ChainVerifier, AUDIT_GENESIS_HASH};
use jiff::Timestamp;
use serde_json::value::RawValue;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Mutex};

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, b))
}

/// What one record is about; the ids that apply.
#[derive(Debug, Default, Clone)]
pub struct Subject {
    pub appliance_id: Option<String>,
    pub endpoint_id: Option<String>,
    pub session_id: Option<String>,
    pub op_id: Option<String>,
}

impl Subject {
    pub fn appliance(id: &str) -> Subject {
        Subject {
            appliance_id: Some(id.to_string()),
            ..Default::default()
        }
    }

    pub fn endpoint(appliance_id: &str, endpoint_id: &str) -> Subject {
        Subject {
            appliance_id: Some(appliance_id.to_string()),
            endpoint_id: Some(endpoint_id.to_string()),
            ..Default::default()
        }
    }

    pub fn session(appliance_id: &str, endpoint_id: &str, session_id: &str) -> Subject {
        Subject {
            session_id: Some(session_id.to_string()),
            ..Subject::endpoint(appliance_id, endpoint_id)
        }
    }
}

/// Records the writer task takes at once: one store transaction each.
const QUEUE_BATCH: usize = 256;
/// Records per store read while verifying.
const VERIFY_PAGE: u32 = 10_000;
/// How long the writer gathers queued records before a commit (unless a flush is waiting).
const GROUP_COMMIT_WAIT: std::time::Duration = std::time::Duration::from_millis(10);
/// Queued records before callers of [`AuditLog::enqueue`] wait (nothing is dropped).
const QUEUE_DEPTH: usize = 16 * 1024;

/// The chain head this process knows, with the store that holds the chain.
#[derive(Debug)]
struct Chain {
    store: Store,
    /// `(last seq, last hash)` this process has seen: other replicas may have appended since.
    /// The chain itself is kept linear by the store.
    head: Mutex<(i64, String)>,
}

/// A record waiting in the queue, stamped when it was queued.
struct Pending {
    kind: &'static str,
    actor: Arc<str>,
    subject: Arc<Subject>,
    /// JSON text, made on the caller's side so the writer only copies it.
    detail: Box<RawValue>,
    time: Timestamp,
}

enum Queued {
    Record(Pending),
    /// Answered once everything queued before it is in the store.
    Flush(oneshot::Sender<()>),
}

#[derive(Debug)]
pub struct AuditLog {
    chain: Arc<Chain>,
    queue: mpsc::Sender<Queued>,
}

impl AuditLog {
    pub async fn open(store: Store) -> Result<AuditLog, StoreError> {
        let head = store
            .last_audit()
            .await?
            .unwrap_or((0, AUDIT_GENESIS_HASH.to_string()));
        let chain = Arc::new(Chain {
            store,
            head: Mutex::new(head),
        });
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        // Ends when the log (the last sender) is dropped, after writing what was queued.
        tokio::spawn(write_queued(chain.clone(), rx));
        Ok(AuditLog { chain, queue })
    }

    pub async fn append(
        &self,
        kind: &str,
        actor: &str,
        subject: Subject,
        detail: serde_json::Value,
        now: Timestamp,
    ) -> Result<AuditRecord, StoreError> {
        // The lock keeps this process's appends from queueing on the database's write lock;
        // the store serialises appends across processes (replicas sharing PostgreSQL).
        let mut head = self.chain.head.lock().await;
        let r = self
            .chain
            .store
            .append_audit_with(|seq, prev_hash| {
                let mut r = AuditRecord {
                    seq,
                    time: now,
                    kind: kind.to_string(),
                    actor: actor.to_string(),
                    appliance_id: subject.appliance_id,
                    endpoint_id: subject.endpoint_id,
                    session_id: subject.session_id,
                    op_id: subject.op_id,
                    detail,
                    prev_hash: prev_hash.to_string(),
                    hash: String::new(),
                };
                r.hash = sha256_hex(&r.chain_input());
                r
            })
            .await?;
        if r.seq > head.0 {
            *head = (r.seq, r.hash.clone());
        }
        Ok(r)
    }

    /// Records and logs; an audit write that fails is logged loudly rather than failing the
    /// caller's already-completed action.
    pub async fn record(
        &self,
        kind: &str,
        actor: &str,
        subject: Subject,
        detail: serde_json::Value,
    ) {
        if let Err(e) = self
            .append(kind, actor, subject, detail, Timestamp::now())
            .await
        {
            tracing::error!(kind, error = %e, "could not write audit record");
        }
    }

    /// Queues a record for the writer task, which writes whatever is queued, from every
    /// caller, in one store transaction: busy sessions' statements cost one commit per round
    /// between them, not one each. Records from one caller keep their order; waits only when
    /// the queue is full. Call [`AuditLog::flush`] before a record that must come after these.
    pub async fn enqueue(
        &self,
        kind: &'static str,
        actor: Arc<str>,
        subject: Arc<Subject>,
        detail: Box<RawValue>,
    ) {
        let pending = Pending {
            kind,
            actor,
            subject,
            detail,
            time: Timestamp::now(),
        };
        if let Err(mpsc::error::SendError(Queued::Record(p))) =
            self.queue.send(Queued::Record(pending)).await
        {
            // Only if the writer task is gone: write it here rather than lose it.
            let detail = serde_json::from_str(p.detail.get()).unwrap_or_default();
            self.record(p.kind, &p.actor, (*p.subject).clone(), detail)
                .await;
        }
    }

    /// Waits until everything queued before this call is in the store.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.queue.send(Queued::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Verifies the whole stored chain against the head this process holds, so a deleted
    /// tail (up to the last record this process wrote or saw) is caught too.
    ///
    /// The trail is read a page at a time: memory stays flat however long it is.
    pub async fn verify(&self) -> Result<Result<u64, i64>, StoreError> {
        let head = self.chain.head.lock().await.0;
        let mut chain = ChainVerifier::new();
        let mut query = AuditPageQuery {
            limit: VERIFY_PAGE,
            ..AuditPageQuery::default()
        };
        loop {
            let page = self.chain.store.audit_page(&query).await?;
            for r in &page.records {
                if let Err(seq) = chain.push(r, sha256_hex) {
                    return Ok(Err(seq));
                }
            }
            match page.next_after_seq {
                Some(seq) => query.after_seq = seq,
                None => break,
            }
        }
        let n = chain.records();
        Ok(if (n as i64) < head {
            Err(n as i64 + 1)
        } else {
            Ok(n)
        })
    }
}

async fn write_queued(chain: Arc<Chain>, mut rx: mpsc::Receiver<Queued>) {
    let mut items = Vec::with_capacity(QUEUE_BATCH);
    while rx.recv_many(&mut items, QUEUE_BATCH).await > 0 {
        // Group commit: a moment's wait gathers what busy sessions queue meanwhile into the
        // same transaction. The channel is not polled while waiting, so those sends wake
        // nobody: the writer (and the store's worker) wake once per batch, not per statement.
        // A flush (a session ending) waits at most this long more.
        if items.len() < QUEUE_BATCH && !items.iter().any(|i| matches!(i, Queued::Flush(_))) {
            tokio::time::sleep(GROUP_COMMIT_WAIT).await;
            while items.len() < QUEUE_BATCH {
                match rx.try_recv() {
                    Ok(item) => items.push(item),
                    Err(_) => break,
                }
            }
        }
        let mut records = Vec::with_capacity(items.len());
        let mut flushes = Vec::new();
        for item in items.drain(..) {
            match item {
                Queued::Record(p) => records.push(p),
                Queued::Flush(done) => flushes.push(done),
            }
        }
        if !records.is_empty() {
            chain.append_batch(records).await;
        }
        // A flush is answered after the records received with it, which include everything
        // its sender queued before it.
        for done in flushes {
            let _ = done.send(());
        }
    }
}

impl Chain {
    /// Appends the records in one store transaction, in order; a failure is logged loudly.
    async fn append_batch(&self, records: Vec<Pending>) {
        let n = records.len();
        let mut head = self.head.lock().await;
        let made = self
            .store
            .append_audit_rows_with(&records, |p, seq, prev_hash| {
                let mut row = AuditRow {
                    seq,
                    time: p.time.to_string(),
                    kind: p.kind,
                    actor: &p.actor,
                    appliance_id: p.subject.appliance_id.as_deref(),
                    endpoint_id: p.subject.endpoint_id.as_deref(),
                    session_id: p.subject.session_id.as_deref(),
                    op_id: p.subject.op_id.as_deref(),
                    detail: &p.detail,
                    prev_hash: prev_hash.to_string(),
                    hash: String::new(),
                };
                row.hash = sha256_hex(&row.chain_input());
                row
            })
            .await;
        match made {
            Ok(Some(last)) => {
                if last.0 > head.0 {
                    *head = last;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(records = n, error = %e, "could not write queued audit records")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chain_verifies_and_tampering_is_found() {
        let store = Store::open_memory().await.unwrap();
        let log = AuditLog::open(store.clone()).await.unwrap();
        for i in 0..4 {
            log.append(
                "endpoint.created",
                "alice",
                Subject::appliance("ap_1"),
                serde_json::json!({"i": i}),
                Timestamp::now(),
            )
            .await
            .unwrap();
        }
        assert_eq!(log.verify().await.unwrap(), Ok(4));
        store.tamper_audit_detail(2, r#"{"i":42}"#).await.unwrap();
        assert_eq!(log.verify().await.unwrap(), Err(2));
    }

    #[tokio::test]
    async fn queued_records_continue_the_chain_in_each_callers_order() {
        let store = Store::open_memory().await.unwrap();
        let log = Arc::new(AuditLog::open(store.clone()).await.unwrap());
        log.append(
            "a",
            "x",
            Subject::default(),
            serde_json::Value::Null,
            Timestamp::now(),
        )
        .await
        .unwrap();
        let session = |id: &str| Arc::new(Subject::session("ap_1", "ep_1", id));
        let callers = ["s1", "s2", "s3"].map(|id| {
            let (log, subject) = (log.clone(), session(id));
            tokio::spawn(async move {
                for i in 0..300 {
                    log.enqueue(
                        "sql.statement",
                        Arc::from("op"),
                        subject.clone(),
                        serde_json::value::to_raw_value(&serde_json::json!({ "i": i })).unwrap(),
                    )
                    .await;
                    if i % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                log.flush().await;
                // Written after this caller's statements, as `session.closed` is.
                log.append(
                    "session.closed",
                    "op",
                    (*subject).clone(),
                    serde_json::Value::Null,
                    Timestamp::now(),
                )
                .await
                .unwrap();
            })
        });
        for c in callers {
            c.await.unwrap();
        }
        let records = store.list_audit(0).await.unwrap();
        assert_eq!(records.len(), 1 + 3 * 301);
        for id in ["s1", "s2", "s3"] {
            let mine: Vec<_> = records
                .iter()
                .filter(|r| r.session_id.as_deref() == Some(id))
                .collect();
            let order: Vec<_> = mine
                .iter()
                .filter_map(|r| r.detail.get("i").and_then(|v| v.as_i64()))
                .collect();
            assert_eq!(
                order,
                (0..300).collect::<Vec<_>>(),
                "{id}'s statements in order"
            );
            assert_eq!(
                mine.last().map(|r| r.kind.as_str()),
                Some("session.closed"),
                "{id} closes last"
            );
        }
        assert_eq!(log.verify().await.unwrap(), Ok(records.len() as u64));
    }

    #[tokio::test]
    async fn flush_waits_for_the_store() {
        let store = Store::open_memory().await.unwrap();
        let log = AuditLog::open(store.clone()).await.unwrap();
        let subject = Arc::new(Subject::appliance("ap_1"));
        for i in 0..5 {
            log.enqueue(
                "sql.statement",
                Arc::from("op"),
                subject.clone(),
                serde_json::value::to_raw_value(&serde_json::json!({ "i": i })).unwrap(),
            )
            .await;
        }
        log.flush().await;
        let records = store.list_audit(0).await.unwrap();
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(records[2].detail, serde_json::json!({ "i": 2 }));
    }

    #[tokio::test]
    async fn chain_continues_across_reopen() {
        let store = Store::open_memory().await.unwrap();
        let log = AuditLog::open(store.clone()).await.unwrap();
        log.append(
            "a",
            "x",
            Subject::default(),
            serde_json::Value::Null,
            Timestamp::now(),
        )
        .await
        .unwrap();
        let log2 = AuditLog::open(store).await.unwrap();
        let r = log2
            .append(
                "b",
                "x",
                Subject::default(),
                serde_json::Value::Null,
                Timestamp::now(),
            )
            .await
            .unwrap();
        assert_eq!(r.seq, 2);
        assert_eq!(log2.verify().await.unwrap(), Ok(2));
    }
}
