//! Which grants have run out without their `grant.expired` record yet (migration 0021). Expiry
//! itself is derived from `expires_at`; only the fact that it was recorded is stored, claimed
//! with a compare-and-set so one replica (and one run) writes each record.

use super::{
    control::{grant_from, GrantRow, GRANT_COLS},
    from_ms, to_ms, Store, StoreResult,
};
use jiff::Timestamp;
use sqlx::Row;

impl Store {
    /// Active grants whose expiry has passed at `now` and is not recorded yet, earliest first,
    /// at most `limit`.
    pub async fn unrecorded_expiries(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<GrantRow>> {
        let sql = format!(
            "SELECT {GRANT_COLS} FROM grants \
             WHERE state = 'active' AND expiry_recorded_at IS NULL AND expires_at IS NOT NULL AND expires_at <= $1 \
             ORDER BY expires_at, id LIMIT $2"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(to_ms(now))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(grant_from)
            .collect()
    }

    /// The earliest expiry of an active grant not recorded yet (due or not).
    pub async fn next_unrecorded_expiry(&self) -> StoreResult<Option<Timestamp>> {
        let row = sqlx::query(
            "SELECT MIN(expires_at) AS next FROM grants \
             WHERE state = 'active' AND expiry_recorded_at IS NULL AND expires_at IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        let next: Option<i64> = row.try_get("next")?;
        next.map(from_ms).transpose()
    }

    /// Claims the writing of grant `id`'s expiry record: true for exactly one caller, and only
    /// while the grant is still active (a revoke that won the race keeps its own record).
    pub async fn claim_expiry_record(&self, id: &str, at: Timestamp) -> StoreResult<bool> {
        let r = sqlx::query(
            "UPDATE grants SET expiry_recorded_at = $1 \
             WHERE id = $2 AND state = 'active' AND expiry_recorded_at IS NULL",
        )
        .bind(to_ms(at))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }
}
