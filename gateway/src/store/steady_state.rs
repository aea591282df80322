//! Steady-state snapshots (migration 0015): the latest per resource and a bounded history.

use super::{from_ms, to_ms, Store, StoreResult};
use jiff::Timestamp;
use sqlx::Row;

/// One resource's health as an agent reported it (`health` is the JSON of
/// `endpoint_types::steady_state::ResourceHealth`).
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    pub resource_id: String,
    pub collected_at: Timestamp,
    pub received_at: Timestamp,
    pub health: String,
}

impl Store {
    /// Stores one collection round and prunes the appliance's history: rows received before
    /// `keep_after` go, and so do all but the newest `keep_rows` (fewer where rounds tie).
    pub async fn put_snapshots(
        &self,
        appliance_id: &str,
        rows: &[SnapshotRow],
        keep_after: Timestamp,
        keep_rows: i64,
    ) -> StoreResult<()> {
        let mut conn = self.writer().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO steady_state_snapshots \
                 (appliance_id, resource_id, collected_at_ms, received_at_ms, health) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(appliance_id)
            .bind(r.resource_id.as_str())
            .bind(to_ms(r.collected_at))
            .bind(to_ms(r.received_at))
            .bind(r.health.as_str())
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "DELETE FROM steady_state_snapshots WHERE appliance_id = $1 AND received_at_ms < $2",
        )
        .bind(appliance_id)
        .bind(to_ms(keep_after))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM steady_state_snapshots WHERE appliance_id = $1 AND received_at_ms <= \
             (SELECT received_at_ms FROM steady_state_snapshots WHERE appliance_id = $1 \
              ORDER BY received_at_ms DESC LIMIT 1 OFFSET $2)",
        )
        .bind(appliance_id)
        .bind(keep_rows)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The newest row of each resource of the appliance, by resource id.
    pub async fn latest_snapshots(&self, appliance_id: &str) -> StoreResult<Vec<SnapshotRow>> {
        let rows = sqlx::query(
            "SELECT resource_id, collected_at_ms, received_at_ms, health \
             FROM steady_state_snapshots s WHERE appliance_id = $1 AND received_at_ms = \
             (SELECT MAX(received_at_ms) FROM steady_state_snapshots t \
              WHERE t.appliance_id = s.appliance_id AND t.resource_id = s.resource_id) \
             ORDER BY resource_id",
        )
        .bind(appliance_id)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<SnapshotRow> = Vec::with_capacity(rows.len());
        for r in rows {
            let row = SnapshotRow {
                resource_id: r.try_get("resource_id")?,
                collected_at: from_ms(r.try_get("collected_at_ms")?)?,
                received_at: from_ms(r.try_get("received_at_ms")?)?,
                health: r.try_get("health")?,
            };
            // Two rows of one round share a received time; one per resource is shown.
            if out.last().is_none_or(|l| l.resource_id != row.resource_id) {
                out.push(row);
            }
        }
        Ok(out)
    }

    /// How many history rows the appliance has (for tests and pruning checks).
    pub async fn snapshot_count(&self, appliance_id: &str) -> StoreResult<i64> {
        let row =
            sqlx::query("SELECT COUNT(*) AS n FROM steady_state_snapshots WHERE appliance_id = $1")
                .bind(appliance_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(row.try_get("n")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(resource: &str, at_s: i64) -> SnapshotRow {
        let at = Timestamp::from_second(at_s).unwrap();
        SnapshotRow {
            resource_id: resource.into(),
            collected_at: at,
            received_at: at,
            health: format!("{{\"at\":{at_s}}}"),
        }
    }

    #[tokio::test]
    async fn the_latest_per_resource_is_kept_and_history_is_bounded_by_age_and_count() {
        let store = Store::open_memory().await.unwrap();
        let epoch = Timestamp::from_second(0).unwrap();
        for t in 1..=5 {
            store
                .put_snapshots("ap_1", &[row("db", t), row("web", t)], epoch, 6)
                .await
                .unwrap();
        }
        store
            .put_snapshots("ap_2", &[row("db", 9)], epoch, 6)
            .await
            .unwrap();
        let latest = store.latest_snapshots("ap_1").await.unwrap();
        assert_eq!(latest, vec![row("db", 5), row("web", 5)]);
        // Capped at 6 rows: the three newest rounds.
        assert_eq!(store.snapshot_count("ap_1").await.unwrap(), 6);
        // Older than the age limit: gone.
        let cut = Timestamp::from_second(5).unwrap();
        store
            .put_snapshots("ap_1", &[row("db", 6)], cut, 100)
            .await
            .unwrap();
        assert_eq!(store.snapshot_count("ap_1").await.unwrap(), 3);
        assert_eq!(store.snapshot_count("ap_2").await.unwrap(), 1);
    }
}
