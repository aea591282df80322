//! The vendor's audit trail: append-only, hash-chained records in the store.

use crate::store::{Store, StoreError};
use endpoint_types::api::{verify_chain, AuditRecord, AUDIT_GENESIS_HASH};
use jiff::Timestamp;
use tokio::sync::Mutex;

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
        Subject { appliance_id: Some(id.to_string()), ..Default::default() }
    }

    pub fn endpoint(appliance_id: &str, endpoint_id: &str) -> Subject {
        Subject { appliance_id: Some(appliance_id.to_string()), endpoint_id: Some(endpoint_id.to_string()), ..Default::default() }
    }

    pub fn session(appliance_id: &str, endpoint_id: &str, session_id: &str) -> Subject {
        Subject { session_id: Some(session_id.to_string()), ..Subject::endpoint(appliance_id, endpoint_id) }
    }
}

#[derive(Debug)]
pub struct AuditLog {
    store: Store,
    /// `(last seq, last hash)` this process has seen: other replicas may have appended since.
    /// The chain itself is kept linear by the store.
    head: Mutex<(i64, String)>,
}

impl AuditLog {
    pub async fn open(store: Store) -> Result<AuditLog, StoreError> {
        let head = store.last_audit().await?.unwrap_or((0, AUDIT_GENESIS_HASH.to_string()));
        Ok(AuditLog { store, head: Mutex::new(head) })
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
        let mut head = self.head.lock().await;
        let r = self
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
    pub async fn record(&self, kind: &str, actor: &str, subject: Subject, detail: serde_json::Value) {
        if let Err(e) = self.append(kind, actor, subject, detail, Timestamp::now()).await {
            tracing::error!(kind, error = %e, "could not write audit record");
        }
    }

    /// Records several details of one kind, actor and subject in one store transaction, in
    /// order: a busy session's statements cost one commit per batch, not one each.
    pub async fn record_batch(&self, kind: &str, actor: &str, subject: &Subject, details: Vec<serde_json::Value>) {
        let n = details.len();
        if n == 0 {
            return;
        }
        let now = Timestamp::now();
        let mut details = details.into_iter();
        let mut head = self.head.lock().await;
        let made = self
            .store
            .append_audit_batch_with(n, |_, seq, prev_hash| {
                let mut r = AuditRecord {
                    seq,
                    time: now,
                    kind: kind.to_string(),
                    actor: actor.to_string(),
                    appliance_id: subject.appliance_id.clone(),
                    endpoint_id: subject.endpoint_id.clone(),
                    session_id: subject.session_id.clone(),
                    op_id: subject.op_id.clone(),
                    detail: details.next().unwrap_or_default(),
                    prev_hash: prev_hash.to_string(),
                    hash: String::new(),
                };
                r.hash = sha256_hex(&r.chain_input());
                r
            })
            .await;
        match made {
            Ok(records) => {
                if let Some(last) = records.last().filter(|r| r.seq > head.0) {
                    *head = (last.seq, last.hash.clone());
                }
            }
            Err(e) => tracing::error!(kind, records = n, error = %e, "could not write audit records"),
        }
    }

    /// Verifies the whole stored chain against the head this process holds, so a deleted
    /// tail (up to the last record this process wrote or saw) is caught too.
    pub async fn verify(&self) -> Result<Result<u64, i64>, StoreError> {
        let records = self.store.list_audit(0).await?;
        let head = self.head.lock().await.0;
        Ok(match verify_chain(&records, sha256_hex) {
            Ok(n) if (n as i64) < head => Err(n as i64 + 1),
            other => other,
        })
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
            log.append("endpoint.created", "alice", Subject::appliance("ap_1"), serde_json::json!({"i": i}), Timestamp::now())
                .await
                .unwrap();
        }
        assert_eq!(log.verify().await.unwrap(), Ok(4));
        store.tamper_audit_detail(2, r#"{"i":42}"#).await.unwrap();
        assert_eq!(log.verify().await.unwrap(), Err(2));
    }

    #[tokio::test]
    async fn batches_continue_the_chain() {
        let store = Store::open_memory().await.unwrap();
        let log = AuditLog::open(store.clone()).await.unwrap();
        log.append("a", "x", Subject::default(), serde_json::Value::Null, Timestamp::now()).await.unwrap();
        let details = (0..5).map(|i| serde_json::json!({ "i": i })).collect();
        log.record_batch("sql.statement", "x", &Subject::appliance("ap_1"), details).await;
        log.append("b", "x", Subject::default(), serde_json::Value::Null, Timestamp::now()).await.unwrap();
        let records = store.list_audit(0).await.unwrap();
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(records[3].detail, serde_json::json!({ "i": 2 }));
        assert_eq!(log.verify().await.unwrap(), Ok(7));
    }

    #[tokio::test]
    async fn chain_continues_across_reopen() {
        let store = Store::open_memory().await.unwrap();
        let log = AuditLog::open(store.clone()).await.unwrap();
        log.append("a", "x", Subject::default(), serde_json::Value::Null, Timestamp::now()).await.unwrap();
        let log2 = AuditLog::open(store).await.unwrap();
        let r = log2.append("b", "x", Subject::default(), serde_json::Value::Null, Timestamp::now()).await.unwrap();
        assert_eq!(r.seq, 2);
        assert_eq!(log2.verify().await.unwrap(), Ok(2));
    }
}
