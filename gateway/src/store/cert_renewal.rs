//! Which certificate of an appliance is current and which renewed one waits for its first use
//! (migration 0011). Every certificate issued is also kept in `appliance_certs` (0007).

use super::{from_ms, to_ms, Store, StoreResult};
use jiff::Timestamp;
use sqlx::Row;

impl Store {
    /// The appliance a renewed, not yet used certificate was issued to.
    pub async fn appliance_of_pending_cert(&self, fp: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT id FROM appliances WHERE pending_cert_fingerprint = $1")
            .bind(fp)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("id")).transpose()?)
    }

    /// Keeps a renewed certificate as the appliance's pending one (replacing an earlier pending
    /// one that was never used). False when the appliance is revoked or unknown.
    pub async fn set_pending_cert(
        &self,
        appliance_id: &str,
        fp: &str,
        cert_pem: &str,
        now: Timestamp,
    ) -> StoreResult<bool> {
        self.keep_appliance_cert(appliance_id, fp, cert_pem, now)
            .await?;
        let done = sqlx::query(
            "UPDATE appliances SET pending_cert_fingerprint = $1 \
             WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(fp)
        .bind(appliance_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The pending certificate `fp` is in use now: it becomes current, and the one before it
    /// stops opening a tunnel. Compare-and-set, so of two racing connections one promotes.
    pub async fn promote_pending_cert(
        &self,
        appliance_id: &str,
        fp: &str,
        not_after: Timestamp,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE appliances SET cert_fingerprint = pending_cert_fingerprint, \
             pending_cert_fingerprint = NULL, cert_expires_at = $1 \
             WHERE id = $2 AND pending_cert_fingerprint = $3",
        )
        .bind(to_ms(not_after))
        .bind(appliance_id)
        .bind(fp)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The current certificate's expiry (enrollment; an appliance enrolled before 0011 gets
    /// it at its next connection). A new enrollment also drops any pending renewal.
    pub async fn set_cert_expiry(
        &self,
        appliance_id: &str,
        fp: &str,
        not_after: Timestamp,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE appliances SET cert_expires_at = $1, pending_cert_fingerprint = NULL \
             WHERE id = $2 AND cert_fingerprint = $3",
        )
        .bind(to_ms(not_after))
        .bind(appliance_id)
        .bind(fp)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Whether the current certificate's expiry is unknown (enrolled before migration 0011).
    pub async fn cert_expiry_unknown(&self, appliance_id: &str) -> StoreResult<bool> {
        let row = sqlx::query("SELECT cert_expires_at FROM appliances WHERE id = $1")
            .bind(appliance_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get::<Option<i64>, _>("cert_expires_at")?.is_none(),
            None => false,
        })
    }

    /// Current certificate expiry per appliance, for `appliance list`.
    pub async fn cert_expiries(&self) -> StoreResult<Vec<(String, Timestamp)>> {
        let rows = sqlx::query(
            "SELECT id, cert_expires_at FROM appliances WHERE cert_expires_at IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get("id")?, from_ms(r.try_get("cert_expires_at")?)?)))
            .collect()
    }

    /// The appliance a certificate was issued to, current or not (`appliance_certs`).
    pub async fn appliance_of_kept_cert(&self, fp: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT appliance_id FROM appliance_certs WHERE fingerprint = $1")
            .bind(fp)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("appliance_id")).transpose()?)
    }

    /// The PEM of the appliance's pending certificate, if one waits for its first use.
    pub async fn pending_cert_pem(&self, appliance_id: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query(
            "SELECT c.cert_pem FROM appliances a \
             JOIN appliance_certs c ON c.fingerprint = a.pending_cert_fingerprint \
             WHERE a.id = $1",
        )
        .bind(appliance_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.try_get("cert_pem")).transpose()?)
    }
}
