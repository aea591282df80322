//! Appliance certificates and the teardown proofs agents delivered (migration 0007).

use super::{from_ms, to_ms, Store, StoreResult};
use jiff::Timestamp;
use sqlx::Row;

/// A stored teardown proof with the certificate it was delivered under.
#[derive(Debug, Clone)]
pub struct TeardownProofRow {
    pub endpoint_id: String,
    pub appliance_id: String,
    /// JSON of `SignedTeardown`, as received.
    pub proof: String,
    pub cert_pem: String,
    pub received_at: Timestamp,
}

impl Store {
    /// Keeps a certificate of `appliance_id` (kept once per fingerprint).
    pub async fn keep_appliance_cert(
        &self,
        appliance_id: &str,
        fingerprint: &str,
        cert_pem: &str,
        now: Timestamp,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO appliance_certs (fingerprint, appliance_id, cert_pem, stored_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (fingerprint) DO NOTHING",
        )
        .bind(fingerprint)
        .bind(appliance_id)
        .bind(cert_pem)
        .bind(to_ms(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores the proof for its endpoint unless one is stored already; true if this one was.
    pub async fn insert_teardown_proof(
        &self,
        endpoint_id: &str,
        appliance_id: &str,
        proof_json: &str,
        cert_fingerprint: &str,
        now: Timestamp,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO teardown_proofs (endpoint_id, appliance_id, proof, cert_fingerprint, received_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (endpoint_id) DO NOTHING",
        )
        .bind(endpoint_id)
        .bind(appliance_id)
        .bind(proof_json)
        .bind(cert_fingerprint)
        .bind(to_ms(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn get_teardown_proof(
        &self,
        endpoint_id: &str,
    ) -> StoreResult<Option<TeardownProofRow>> {
        let row = sqlx::query(
            "SELECT p.endpoint_id, p.appliance_id, p.proof, c.cert_pem, p.received_at \
             FROM teardown_proofs p JOIN appliance_certs c ON c.fingerprint = p.cert_fingerprint \
             WHERE p.endpoint_id = $1",
        )
        .bind(endpoint_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| -> StoreResult<TeardownProofRow> {
            Ok(TeardownProofRow {
                endpoint_id: r.try_get("endpoint_id")?,
                appliance_id: r.try_get("appliance_id")?,
                proof: r.try_get("proof")?,
                cert_pem: r.try_get("cert_pem")?,
                received_at: from_ms(r.try_get("received_at")?)?,
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_proof_is_stored_once_with_its_certificate() {
        let s = Store::open_memory().await.unwrap();
        let now = crate::store::now();
        s.insert_appliance(&crate::store::ApplianceRow {
            id: "apl_1".into(),
            app: "app".into(),
            customer: "acme".into(),
            created_at: now,
            created_by: "admin".into(),
            cert_fingerprint: None,
            enrolled_at: None,
            revoked_at: None,
            last_seen: None,
            agent_version: None,
            resources: "[]".into(),
        })
        .await
        .unwrap();
        s.keep_appliance_cert("apl_1", "fp1", "PEM1", now)
            .await
            .unwrap();
        s.keep_appliance_cert("apl_1", "fp1", "PEM-other", now)
            .await
            .unwrap();
        assert!(s
            .insert_teardown_proof("ep_1", "apl_1", "{\"a\":1}", "fp1", now)
            .await
            .unwrap());
        assert!(!s
            .insert_teardown_proof("ep_1", "apl_1", "{\"a\":2}", "fp1", now)
            .await
            .unwrap());
        let row = s.get_teardown_proof("ep_1").await.unwrap().unwrap();
        assert_eq!(
            (row.proof.as_str(), row.cert_pem.as_str(), row.received_at),
            ("{\"a\":1}", "PEM1", now)
        );
        assert!(s.get_teardown_proof("ep_2").await.unwrap().is_none());
    }
}
