//! Counts the `/metrics` endpoint reads at scrape time: one grouped query per table.

use super::{Store, StoreResult};
use sqlx::Row;

/// How many records of a table are in one state, and when the oldest of them was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateCount {
    /// Which table: `op`, `grant` or `endpoint`.
    pub kind: &'static str,
    pub state: String,
    pub count: i64,
    /// Unix milliseconds of the oldest record in this state.
    pub oldest_ms: i64,
}

impl Store {
    /// Ops, grants and endpoints counted by state. The table names and columns are constants.
    pub async fn count_by_state(&self) -> StoreResult<Vec<StateCount>> {
        let mut out = Vec::new();
        for (kind, table, made) in [
            ("op", "ops", "requested_at"),
            ("grant", "grants", "requested_at"),
            ("endpoint", "endpoints", "created_at"),
        ] {
            let sql = format!(
                "SELECT state, COUNT(*) AS n, MIN({made}) AS oldest FROM {table} GROUP BY state"
            );
            let rows = self
                .select_rows(sql, &[], |r| {
                    Ok((
                        r.try_get::<String, _>("state")?,
                        r.try_get::<i64, _>("n")?,
                        r.try_get::<i64, _>("oldest")?,
                    ))
                })
                .await?;
            out.extend(
                rows.into_iter()
                    .map(|(state, count, oldest_ms)| StateCount {
                        kind,
                        state,
                        count,
                        oldest_ms,
                    }),
            );
        }
        Ok(out)
    }
}
