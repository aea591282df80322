//! The vendor's audit trail: append-only, hash-chained records in the store.

use crate::store::AuditRow;
use crate::store::{AuditPageQuery, GrantMove, Store, StoreError};
use endpoint_types::api::{AuditRecord, ChainVerifier, AUDIT_GENESIS_HASH};
use jiff::Timestamp;
use serde_json::value::RawValue;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::sync::CancellationToken;

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

/// First and longest pause between the writer's attempts at a batch the store refused.
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);
/// How often an idle writer checks that the store still answers: a store that went away
/// cuts live sessions even when none of them is writing records (a tcp session's end could
/// not be recorded), and a trail that is down comes back without waiting for a record.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// A store that does not answer a probe in this long counts as down.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The chain head this process knows, with the store that holds the chain.
#[derive(Debug)]
struct Chain {
    store: Store,
    /// `(last seq, last hash)` this process has seen: other replicas may have appended since.
    /// The chain itself is kept linear by the store.
    head: Mutex<(i64, String)>,
    health: std::sync::Mutex<Health>,
    /// The last seq written by this process, for the signed heads (crate::audit_heads).
    commits: tokio::sync::watch::Sender<i64>,
    /// Counts sessions and times commits when the gateway serves metrics (crate::metrics).
    metrics: std::sync::OnceLock<crate::metrics::GatewayMetrics>,
}

/// Whether the trail can be written. Sessions hold a clone of `live`: it is cancelled the
/// moment a write fails, which cuts them all; a fresh one is made once the store takes
/// records again.
#[derive(Debug)]
struct Health {
    live: CancellationToken,
    /// The store's error, while the trail cannot be written.
    down: Option<String>,
}

/// The vendor trail cannot be written: what it records must not go ahead.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the vendor audit trail cannot be written: {0}")]
pub struct TrailDown(pub String);

impl TrailDown {
    pub fn to_api_error(&self) -> endpoint_types::ApiError {
        endpoint_types::ApiError::new(endpoint_types::ErrorCode::Internal, self.to_string()).hint(
            "the gateway's store is failing; sessions are refused until it takes records again",
        )
    }
}

/// A record waiting in the queue, stamped when it was queued.
struct Pending {
    /// Borrowed for the kinds known at compile time (the hot path), owned for the rest.
    kind: std::borrow::Cow<'static, str>,
    actor: Arc<str>,
    subject: Arc<Subject>,
    /// JSON text, made on the caller's side so the writer only copies it.
    detail: Box<RawValue>,
    time: Timestamp,
    /// The grant move this record stands on: both are written in one transaction, or neither
    /// ([`AuditLog::record_grant_move`]).
    grant_move: Option<GrantMove>,
}

enum Queued {
    Record(Pending),
    /// Answered once everything queued before it is in the store, or at once with the
    /// store's error if the batch holding them failed.
    Flush(oneshot::Sender<Result<(), TrailDown>>),
    /// A record and a flush right behind it, in one message so the writer never waits for
    /// more (group commit) while its caller waits ([`AuditLog::record`]).
    RecordFlush(Pending, oneshot::Sender<Result<(), TrailDown>>),
    /// A record standing on a grant move, answered with whether the move won (and so was
    /// written with its record), or with the store's error (neither was written).
    Moved(Pending, oneshot::Sender<Result<bool, TrailDown>>),
}

/// Clones share the one chain and writer queue.
#[derive(Debug, Clone)]
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
            commits: tokio::sync::watch::channel(head.0).0,
            metrics: std::sync::OnceLock::new(),
            head: Mutex::new(head),
            health: std::sync::Mutex::new(Health {
                live: CancellationToken::new(),
                down: None,
            }),
        });
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        // Ends when the log (the last sender) is dropped, after writing what was queued.
        tokio::spawn(write_queued(chain.clone(), rx));
        Ok(AuditLog { chain, queue })
    }

    /// Has records counted and commits timed in `metrics` from now on.
    pub fn count_in(&self, metrics: crate::metrics::GatewayMetrics) {
        let _ = self.chain.metrics.set(metrics);
    }

    /// Records queued for the writer and not yet taken by it.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    fn observe(&self, kind: &str, detail: &serde_json::Value) {
        if let Some(m) = self.chain.metrics.get() {
            m.observe_record(kind, detail);
        }
    }

    pub async fn append(
        &self,
        kind: &str,
        actor: &str,
        subject: Subject,
        detail: serde_json::Value,
        now: Timestamp,
    ) -> Result<AuditRecord, StoreError> {
        self.append_made(kind, actor, subject, now, |_, _| detail)
            .await
    }

    /// [`AuditLog::append`] of a record whose detail is made knowing its seq and the hash of
    /// the record before it: a signed head (crate::audit_heads).
    pub async fn append_made(
        &self,
        kind: &str,
        actor: &str,
        subject: Subject,
        now: Timestamp,
        make_detail: impl FnOnce(i64, &str) -> serde_json::Value + Send,
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
                    detail: make_detail(seq, prev_hash),
                    prev_hash: prev_hash.to_string(),
                    hash: String::new(),
                };
                r.hash = sha256_hex(&r.chain_input());
                r
            })
            .await
            .inspect_err(|e| self.chain.mark_down(e))?;
        if r.seq > head.0 {
            *head = (r.seq, r.hash.clone());
            self.chain.commits.send_replace(r.seq);
        }
        Ok(r)
    }

    /// The last seq this process wrote or saw, as it changes.
    pub fn commits(&self) -> tokio::sync::watch::Receiver<i64> {
        self.chain.commits.subscribe()
    }

    /// The last seq this process wrote or saw.
    pub async fn head_seq(&self) -> i64 {
        self.chain.head.lock().await.0
    }

    /// The store the trail is in, for verification page by page (crate::audit_heads).
    pub fn store(&self) -> &Store {
        &self.chain.store
    }

    /// A token cancelled the moment the trail cannot be written, for a session to be cut
    /// on; or the refusal, while it cannot.
    pub fn session_watch(&self) -> Result<CancellationToken, TrailDown> {
        self.chain.watch()
    }

    /// Records a session's or action's start: unlike [`AuditLog::record`] the caller learns
    /// that the record could not be stored, and must not go ahead.
    pub async fn record_before(
        &self,
        kind: &str,
        actor: &str,
        subject: Subject,
        detail: serde_json::Value,
    ) -> Result<(), TrailDown> {
        self.chain.watch()?;
        self.observe(kind, &detail);
        match self
            .append(kind, actor, subject.clone(), detail, Timestamp::now())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                // The action does not go ahead, so its record is not held; that it was
                // refused is, and holding it sets the writer retrying until the store is back.
                let note = serde_json::json!({ "kind": kind, "error": e.to_string() });
                self.hold("audit.write_failed", actor, subject, note, Timestamp::now());
                Err(TrailDown(e.to_string()))
            }
        }
    }

    /// Queues a record behind those the writer holds, without waiting.
    fn hold(
        &self,
        kind: &str,
        actor: &str,
        subject: Subject,
        detail: serde_json::Value,
        time: Timestamp,
    ) {
        let Ok(raw) = serde_json::value::to_raw_value(&detail) else {
            return;
        };
        let pending = Pending {
            kind: kind.to_string().into(),
            actor: Arc::from(actor),
            subject: Arc::new(subject),
            detail: raw,
            time,
            grant_move: None,
        };
        if self.queue.try_send(Queued::Record(pending)).is_err() {
            tracing::error!(
                kind,
                actor,
                ?detail,
                "audit record lost: the writer's queue is full or gone"
            );
        }
    }

    /// Records an action that already happened, and returns once it is in the store: it goes
    /// through the writer task, in one transaction with whatever other callers queued
    /// meanwhile. A record the store refuses marks the trail down (live sessions are cut, new
    /// ones refused) and is held by the writer, to be written after the records held before
    /// it once the store takes records again. While the trail is down a record is queued
    /// behind the held ones without waiting; only if that queue is full is it lost, and then
    /// it is logged whole.
    pub async fn record(
        &self,
        kind: &str,
        actor: &str,
        subject: Subject,
        detail: serde_json::Value,
    ) {
        let now = Timestamp::now();
        self.observe(kind, &detail);
        // While the trail is down the writer holds earlier records: queue behind them.
        if self.chain.watch().is_ok() {
            if let Ok(raw) = serde_json::value::to_raw_value(&detail) {
                let pending = Pending {
                    kind: kind.to_string().into(),
                    actor: Arc::from(actor),
                    subject: Arc::new(subject.clone()),
                    detail: raw,
                    time: now,
                    grant_move: None,
                };
                // Through the writer, which takes every caller's records queued meanwhile into
                // one transaction: a burst of API calls (1000 revocations) costs a commit per
                // round, not one each. Once queued the record is the writer's: a batch the store
                // refuses is held and retried there (the trail is marked down meanwhile), so an
                // error here is not a lost record.
                let (done, written) = oneshot::channel();
                match self.queue.send(Queued::RecordFlush(pending, done)).await {
                    Ok(()) => {
                        if let Ok(Err(e)) = written.await {
                            tracing::error!(kind, error = %e, "could not write audit record; the writer holds it");
                        }
                        return;
                    }
                    Err(mpsc::error::SendError(_)) => {
                        // Only if the writer task is gone: write it here.
                        match self
                            .append(kind, actor, subject.clone(), detail.clone(), now)
                            .await
                        {
                            Ok(_) => return,
                            Err(e) => {
                                tracing::error!(kind, error = %e, "could not write audit record; holding it")
                            }
                        }
                    }
                }
            }
        }
        self.hold(kind, actor, subject, detail, now);
    }

    /// Records `kind` together with the grant move it stands on, in one store transaction
    /// with whatever other callers queued meanwhile: `Ok(true)` once both are written,
    /// `Ok(false)` if the move lost its compare-and-set (nothing written), an error if the
    /// store refused the batch or the trail is down (nothing written: the move does not go
    /// ahead unrecorded, nor is it held to be written later).
    pub async fn record_grant_move(
        &self,
        kind: &str,
        actor: &str,
        subject: Subject,
        detail: serde_json::Value,
        grant_move: GrantMove,
    ) -> Result<bool, TrailDown> {
        self.chain.watch()?;
        let raw = serde_json::value::to_raw_value(&detail)
            .map_err(|e| TrailDown(format!("the record cannot be written: {e}")))?;
        let pending = Pending {
            kind: kind.to_string().into(),
            actor: Arc::from(actor),
            subject: Arc::new(subject),
            detail: raw,
            time: Timestamp::now(),
            grant_move: Some(grant_move),
        };
        let stopped = || TrailDown("the audit writer has stopped".into());
        let (done, answer) = oneshot::channel();
        self.queue
            .send(Queued::Moved(pending, done))
            .await
            .map_err(|_| stopped())?;
        let moved = answer.await.unwrap_or_else(|_| Err(stopped()))?;
        if moved {
            self.observe(kind, &detail);
        }
        Ok(moved)
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
            kind: kind.into(),
            actor,
            subject,
            detail,
            time: Timestamp::now(),
            grant_move: None,
        };
        if let Err(mpsc::error::SendError(Queued::Record(p))) =
            self.queue.send(Queued::Record(pending)).await
        {
            // Only if the writer task is gone: write it here rather than lose it.
            let detail = serde_json::from_str(p.detail.get()).unwrap_or_default();
            if let Err(e) = self
                .append(&p.kind, &p.actor, (*p.subject).clone(), detail, p.time)
                .await
            {
                tracing::error!(kind = %p.kind, error = %e, "audit record lost: no writer and the store refused it");
            }
        }
    }

    /// Waits until everything queued before this call is in the store; fails at once while
    /// the trail is down (the writer holds the records and writes them once it is back).
    pub async fn flush(&self) -> Result<(), TrailDown> {
        self.chain.watch()?;
        let (tx, rx) = oneshot::channel();
        if self.queue.send(Queued::Flush(tx)).await.is_err() {
            return Err(TrailDown("the audit writer has stopped".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(TrailDown("the audit writer has stopped".into())))
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
    loop {
        // `recv_many` is cancel safe: a probe in between loses nothing.
        let got = tokio::select! {
            n = rx.recv_many(&mut items, QUEUE_BATCH) => n,
            _ = tokio::time::sleep(PROBE_EVERY) => {
                chain.probe().await;
                continue;
            }
        };
        if got == 0 {
            break;
        }
        // Group commit: a moment's wait gathers what busy sessions queue meanwhile into the
        // same transaction. The channel is not polled while waiting, so those sends wake
        // nobody: the writer (and the store's worker) wake once per batch, not per statement.
        // A flush (a session ending) waits at most this long more.
        if items.len() < QUEUE_BATCH
            && !items.iter().any(|i| {
                matches!(
                    i,
                    Queued::Flush(_) | Queued::RecordFlush(..) | Queued::Moved(..)
                )
            })
        {
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
        let mut moves = Vec::new();
        for item in items.drain(..) {
            match item {
                Queued::Record(p) => records.push(p),
                Queued::Flush(done) => flushes.push(done),
                Queued::RecordFlush(p, done) => {
                    records.push(p);
                    flushes.push(done);
                }
                Queued::Moved(p, done) => {
                    moves.push((records.len(), done));
                    records.push(p);
                }
            }
        }
        if !records.is_empty() {
            let started = std::time::Instant::now();
            chain.append_batch(records, &mut flushes, moves).await;
            if let Some(m) = chain.metrics.get() {
                m.observe_audit_commit(started.elapsed());
            }
        }
        // A flush is answered after the records received with it, which include everything
        // its sender queued before it.
        for done in flushes {
            let _ = done.send(Ok(()));
        }
    }
}

impl Chain {
    fn watch(&self) -> Result<CancellationToken, TrailDown> {
        let health = self
            .health
            .lock()
            .map_err(|_| TrailDown("audit state poisoned".into()))?;
        match &health.down {
            Some(e) => Err(TrailDown(e.clone())),
            None => Ok(health.live.clone()),
        }
    }

    /// Reads the chain head: a store that cannot answer marks the trail down; one that
    /// answers again brings it back (when no held record is waiting: those bring it back
    /// themselves, once written).
    async fn probe(&self) {
        match tokio::time::timeout(PROBE_TIMEOUT, self.store.last_audit()).await {
            Ok(Ok(_)) => {
                if let Some(was) = self.mark_up() {
                    self.note_recovered(Timestamp::now(), was, 0).await;
                }
            }
            Ok(Err(e)) => self.mark_down(&e),
            Err(_) => self.mark_down(&format!(
                "the store did not answer in {} s",
                PROBE_TIMEOUT.as_secs()
            )),
        }
    }

    /// The store refused a record: cut every live session, refuse new ones.
    fn mark_down(&self, e: &dyn std::fmt::Display) {
        if let Ok(mut health) = self.health.lock() {
            if health.down.is_none() {
                tracing::error!(error = %e, "vendor audit trail down: cutting live sessions, refusing new ones");
            }
            health.down = Some(e.to_string());
            health.live.cancel();
        }
    }

    /// The store took records again; returns the error it was down with, if it was.
    fn mark_up(&self) -> Option<String> {
        let mut health = self.health.lock().ok()?;
        let was = health.down.take()?;
        health.live = CancellationToken::new();
        Some(was)
    }

    /// Appends the records in one store transaction, in order. A failure marks the trail
    /// down, answers the waiting flushes with it, and retries the same batch until the store
    /// takes it: the records are held, not dropped, and their seqs are given only when they
    /// are written, so the chain stays gapless and `audit verify` holds. Then the outage is
    /// itself recorded (`audit.store_recovered`) so the trail shows it.
    ///
    /// `moves` are the records (by index) that stand on a grant move, with their callers:
    /// each is answered whether its move won once the batch is written. A failed batch
    /// answers them with the error and drops them from what is retried (the move did not
    /// happen, and must not happen later unasked).
    async fn append_batch(
        &self,
        mut records: Vec<Pending>,
        flushes: &mut Vec<oneshot::Sender<Result<(), TrailDown>>>,
        mut moves: Vec<(usize, oneshot::Sender<Result<bool, TrailDown>>)>,
    ) {
        let mut pause = RETRY_FIRST;
        let mut failed_since: Option<(Timestamp, String)> = None;
        loop {
            let result = {
                let attempt = self.try_append_batch(&records);
                tokio::pin!(attempt);
                tokio::select! {
                r = &mut attempt => r,
                // A store that hangs (a PostgreSQL server gone: the pool keeps trying to
                // connect) is down as much as one that errs. The write is not abandoned, so a
                // commit that lands late is not written twice.
                _ = tokio::time::sleep(PROBE_TIMEOUT) => {
                    let e = format!("the store did not take a batch in {} s", PROBE_TIMEOUT.as_secs());
                    self.mark_down(&e);
                    let down = TrailDown(e.clone());
                    for done in flushes.drain(..) {
                        let _ = done.send(Err(down.clone()));
                    }
                    failed_since.get_or_insert_with(|| (Timestamp::now(), e));
                    attempt.await
                }
                }
            };
            match result {
                Ok(lost) => {
                    for (i, done) in moves.drain(..) {
                        let _ = done.send(Ok(!lost.contains(&i)));
                    }
                    break;
                }
                Err(e) => {
                    self.mark_down(&e);
                    let down = TrailDown(e.to_string());
                    for done in flushes.drain(..) {
                        let _ = done.send(Err(down.clone()));
                    }
                    if !moves.is_empty() {
                        for (_, done) in moves.drain(..) {
                            let _ = done.send(Err(down.clone()));
                        }
                        records.retain(|p| p.grant_move.is_none());
                        if records.is_empty() {
                            // Nothing left to hold: the probe finds when the store is back.
                            return;
                        }
                    }
                    failed_since.get_or_insert_with(|| (Timestamp::now(), e.to_string()));
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
        if let Some(was) = self.mark_up() {
            let (since, error) = failed_since.unwrap_or_else(|| (Timestamp::now(), was));
            self.note_recovered(since, error, records.len()).await;
        }
    }

    /// Records the outage itself, so the trail shows it.
    async fn note_recovered(&self, since: Timestamp, error: String, held: usize) {
        tracing::warn!(held, "vendor audit trail back: held records written");
        let note = Pending {
            kind: "audit.store_recovered".into(),
            actor: Arc::from("gateway"),
            subject: Arc::new(Subject::default()),
            detail: serde_json::value::to_raw_value(&serde_json::json!({
                "down_since": since.to_string(), "error": error, "held_records": held,
            }))
            .unwrap_or_else(|_| RawValue::NULL.to_owned()),
            time: Timestamp::now(),
            grant_move: None,
        };
        if let Err(e) = self.try_append_batch(std::slice::from_ref(&note)).await {
            self.mark_down(&e);
        }
    }

    /// Returns the records (by index) whose grant move lost, and so were not written.
    async fn try_append_batch(&self, records: &[Pending]) -> Result<Vec<usize>, StoreError> {
        let mut head = self.head.lock().await;
        let written = self
            .store
            .append_audit_rows_with(
                records,
                Some((head.0, &head.1)),
                |p| p.grant_move.as_ref(),
                |p, seq, prev_hash| {
                    let mut row = AuditRow {
                        seq,
                        time: p.time.to_string(),
                        kind: &p.kind,
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
                },
            )
            .await?;
        if let Some(last) = written.head {
            if last.0 > head.0 {
                self.commits.send_replace(last.0);
                *head = last;
            }
        }
        Ok(written.lost)
    }
}

#[cfg(test)]
mod tests;
