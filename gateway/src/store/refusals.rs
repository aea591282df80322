//! Grants and endpoints the appliance refused for want of a valid signed decision, with the
//! appliance's error, for the operator to see with the record.

use super::{to_ms, Store, StoreResult};
use jiff::Timestamp;
use sqlx::Row;

impl Store {
    /// Keeps the appliance's refusal of `record_id` (the latest one wins).
    pub async fn put_refusal(
        &self,
        record_id: &str,
        appliance_id: &str,
        error: &str,
        at: Timestamp,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO appliance_refusals (record_id, appliance_id, error, refused_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (record_id) DO UPDATE SET error = excluded.error, refused_at = excluded.refused_at",
        )
        .bind(record_id)
        .bind(appliance_id)
        .bind(error)
        .bind(to_ms(at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The appliance's refusal of `record_id` (JSON text), if it refused it.
    pub async fn refusal(&self, record_id: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT error FROM appliance_refusals WHERE record_id = $1")
            .bind(record_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get::<String, _>("error")).transpose()?)
    }
}
