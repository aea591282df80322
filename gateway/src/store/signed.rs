//! Approvers' signed decisions as the approver's key made them: stored as JSON text and read
//! back untouched, never built or changed by the gateway.

use super::{to_ms, Store, StoreResult};
use jiff::Timestamp;
use sqlx::Row;

impl Store {
    /// Keeps the decision an approver signed on `record_id` at `stage` (`command` or
    /// `output`); a later one for the same stage replaces it (a decision that did not take,
    /// repeated).
    pub async fn put_signed_decision(
        &self,
        record_id: &str,
        stage: &str,
        signed: &str,
        at: Timestamp,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO signed_decisions (record_id, stage, signed, stored_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (record_id, stage) DO UPDATE SET signed = excluded.signed, stored_at = excluded.stored_at",
        )
        .bind(record_id)
        .bind(stage)
        .bind(signed)
        .bind(to_ms(at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The signed decision on `record_id` at `stage`, as stored.
    pub async fn signed_decision(
        &self,
        record_id: &str,
        stage: &str,
    ) -> StoreResult<Option<String>> {
        let row =
            sqlx::query("SELECT signed FROM signed_decisions WHERE record_id = $1 AND stage = $2")
                .bind(record_id)
                .bind(stage)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.try_get::<String, _>("signed")).transpose()?)
    }
}
