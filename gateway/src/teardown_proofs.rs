//! Teardown proofs from agents ([`endpoint_types::teardown`]): checked against the certificate
//! of the connection that delivered them, stored once per endpoint with that certificate,
//! recorded as `endpoint.teardown` in the vendor trail, and acknowledged so the agent stops
//! resending. A proof that can never be stored (another appliance's endpoint, a signature that
//! does not verify) is acknowledged with the refusal; one that could not be stored now (the
//! store is failing) is not acknowledged, and the agent sends it again.
//!
//! `postern audit teardown` reads them back through [`get`]; the CLI checks the signature and
//! the certificate itself, against the gateway CA it already trusts.

use crate::{audit::Subject, ports::AuditSink, store::Store};
use async_trait::async_trait;
use endpoint_types::{
    frame::ToAgent,
    teardown::{SignedTeardown, TeardownRecord, TEARDOWN_KIND},
    ApiError, ErrorCode,
};
/// What proofs need from the store.
#[async_trait]
pub trait TeardownStore: Send + Sync {
    /// The appliance an endpoint belongs to, if the endpoint is known.
    async fn endpoint_appliance(&self, endpoint_id: &str) -> Result<Option<String>, String>;
    async fn keep_cert(&self, appliance_id: &str, fp: &str, pem: &str) -> Result<(), String>;
    /// True if stored now, false if a proof for the endpoint was stored before.
    async fn insert_proof(
        &self,
        endpoint_id: &str,
        appliance_id: &str,
        proof_json: &str,
        fp: &str,
    ) -> Result<bool, String>;
    async fn proof(&self, endpoint_id: &str) -> Result<Option<TeardownRecord>, String>;
}

#[async_trait]
impl TeardownStore for Store {
    async fn endpoint_appliance(&self, endpoint_id: &str) -> Result<Option<String>, String> {
        self.get_endpoint(endpoint_id)
            .await
            .map(|r| r.map(|r| r.appliance_id))
            .map_err(|e| e.to_string())
    }

    async fn keep_cert(&self, appliance_id: &str, fp: &str, pem: &str) -> Result<(), String> {
        self.keep_appliance_cert(appliance_id, fp, pem, crate::store::now())
            .await
            .map_err(|e| e.to_string())
    }

    async fn insert_proof(
        &self,
        endpoint_id: &str,
        appliance_id: &str,
        proof_json: &str,
        fp: &str,
    ) -> Result<bool, String> {
        self.insert_teardown_proof(
            endpoint_id,
            appliance_id,
            proof_json,
            fp,
            crate::store::now(),
        )
        .await
        .map_err(|e| e.to_string())
    }

    async fn proof(&self, endpoint_id: &str) -> Result<Option<TeardownRecord>, String> {
        let Some(row) = self
            .get_teardown_proof(endpoint_id)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        // A row that no longer parses was edited: that is for the verifier to report, with
        // the endpoint named, not a server error.
        let signed: SignedTeardown = serde_json::from_str(&row.proof)
            .map_err(|e| format!("stored teardown proof of {endpoint_id} is not a proof: {e}"))?;
        Ok(Some(TeardownRecord {
            endpoint_id: row.endpoint_id,
            appliance_id: row.appliance_id,
            signed,
            cert_pem: row.cert_pem,
            received_at: row.received_at,
        }))
    }
}

/// PEM of a DER certificate.
pub fn pem_of(der: &[u8]) -> String {
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    let b64 = STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Handles one proof from `appliance_id`'s agent, delivered under certificate `cert_der`.
/// Returns the acknowledgement to send, or `None` when it could not be stored now.
pub async fn on_proof(
    store: &dyn TeardownStore,
    audit: &dyn AuditSink,
    appliance_id: &str,
    cert_der: &[u8],
    signed: SignedTeardown,
) -> Option<ToAgent> {
    let endpoint_id = signed.proof.endpoint_id.clone();
    let ack = |refused: Option<ApiError>| {
        Some(ToAgent::TeardownAck {
            endpoint_id: endpoint_id.clone(),
            refused,
        })
    };
    let refuse = |code: ErrorCode, why: String| {
        tracing::warn!(appliance = %appliance_id, endpoint = %endpoint_id, "refusing a teardown proof: {why}");
        ack(Some(ApiError::new(code, why)))
    };
    match store.endpoint_appliance(&endpoint_id).await {
        Ok(Some(owner)) if owner == appliance_id => {}
        Ok(_) => {
            return refuse(
                ErrorCode::NotFound,
                format!("endpoint {endpoint_id} is not an endpoint of appliance {appliance_id}"),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot look up the endpoint of a teardown proof");
            return None;
        }
    }
    if signed.proof.appliance_id != appliance_id {
        return refuse(
            ErrorCode::Forbidden,
            format!(
                "the proof names appliance {}, not {appliance_id}",
                signed.proof.appliance_id
            ),
        );
    }
    if let Err(e) = certs::record_signature::verify_with_cert(
        cert_der,
        signed.proof.canonical().as_bytes(),
        &signed.signature,
    ) {
        return refuse(
            ErrorCode::Forbidden,
            format!("the proof's signature does not verify with the agent's certificate: {e}"),
        );
    }
    let fp = certs::fingerprint(cert_der);
    let json = match serde_json::to_string(&signed) {
        Ok(j) => j,
        Err(e) => return refuse(ErrorCode::InvalidRequest, e.to_string()),
    };
    let stored = async {
        store
            .keep_cert(appliance_id, &fp, &pem_of(cert_der))
            .await?;
        store
            .insert_proof(&endpoint_id, appliance_id, &json, &fp)
            .await
    };
    match stored.await {
        Ok(true) => {
            let mut detail = serde_json::to_value(&signed).unwrap_or_default();
            detail["cert_fingerprint"] = fp.into();
            tracing::info!(endpoint = %endpoint_id, all_passed = signed.proof.all_passed(), "teardown proof stored");
            audit
                .record(
                    TEARDOWN_KIND,
                    &format!("agent:{appliance_id}"),
                    Subject::endpoint(appliance_id, &endpoint_id),
                    detail,
                )
                .await;
            ack(None)
        }
        // Sent again (the first acknowledgement was lost with its connection).
        Ok(false) => ack(None),
        Err(e) => {
            tracing::error!(endpoint = %endpoint_id, error = %e, "cannot store a teardown proof; the agent sends it again");
            None
        }
    }
}

/// The stored proof of `endpoint_id`; `NOT_FOUND` (saying why there may be none) if there
/// is none.
pub async fn get(store: &dyn TeardownStore, endpoint_id: &str) -> Result<TeardownRecord, ApiError> {
    match store.proof(endpoint_id).await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no teardown record for endpoint {endpoint_id}"),
        )
        .hint("an endpoint has one once it has ended and its appliance has proved the teardown; an appliance that is offline proves it when it reconnects")),
        Err(e) => Err(ApiError::new(ErrorCode::AuditChainBroken, e).hint(
            "the stored record was edited (it no longer reads as a proof); the customer's trail holds the agent's own copy",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::fakes::MemoryAudit;
    use certs::{record_signature::RecordSigner, teardown_proof::sign_teardown, Ca};
    use endpoint_types::{
        resource::{CloseReason, EndpointType},
        teardown::TeardownProof,
    };
    use jiff::Timestamp;
    use std::{collections::HashMap, sync::Mutex};

    #[derive(Default)]
    struct Memory {
        endpoints: HashMap<String, String>,
        proofs: Mutex<HashMap<String, (String, String)>>,
        fail: bool,
    }

    #[async_trait]
    impl TeardownStore for Memory {
        async fn endpoint_appliance(&self, id: &str) -> Result<Option<String>, String> {
            Ok(self.endpoints.get(id).cloned())
        }
        async fn keep_cert(&self, _: &str, _: &str, _: &str) -> Result<(), String> {
            Ok(())
        }
        async fn insert_proof(
            &self,
            id: &str,
            appliance: &str,
            json: &str,
            _: &str,
        ) -> Result<bool, String> {
            if self.fail {
                return Err("disk full".into());
            }
            let mut p = self.proofs.lock().unwrap();
            if p.contains_key(id) {
                return Ok(false);
            }
            p.insert(id.into(), (appliance.into(), json.into()));
            Ok(true)
        }
        async fn proof(&self, _: &str) -> Result<Option<TeardownRecord>, String> {
            Ok(None)
        }
    }

    fn enrolled(ca: &Ca, id: &str) -> (Vec<u8>, RecordSigner) {
        use rustls_pki_types::{pem::PemObject, CertificateDer};
        let (key, csr) = certs::generate_key_and_csr(id).unwrap();
        let pem = ca
            .sign_agent_csr(
                &csr,
                id,
                Timestamp::now(),
                std::time::Duration::from_secs(600),
            )
            .unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec();
        (der, RecordSigner::from_pem(key.expose()).unwrap())
    }

    fn proof(appliance: &str) -> TeardownProof {
        TeardownProof {
            endpoint_id: "ep_1".into(),
            appliance_id: appliance.into(),
            endpoint_type: EndpointType::Ssh,
            resource_id: "aws_instance.vm".into(),
            reason: CloseReason::Retired,
            ended_at: Timestamp::now(),
            proved_at: Timestamp::now(),
            offline: false,
            checks: vec![],
        }
    }

    fn refused(ack: Option<ToAgent>) -> Option<ErrorCode> {
        match ack {
            Some(ToAgent::TeardownAck { refused, .. }) => refused.map(|e| e.code),
            other => panic!("not an ack: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_proof_is_stored_and_recorded_once_and_acknowledged_each_time() {
        let ca = Ca::generate("ca", Timestamp::now()).unwrap();
        let (der, signer) = enrolled(&ca, "apl_1");
        let store = Memory {
            endpoints: [("ep_1".to_string(), "apl_1".to_string())].into(),
            ..Default::default()
        };
        let audit = MemoryAudit::default();
        let signed = sign_teardown(&signer, proof("apl_1")).unwrap();
        for _ in 0..2 {
            let ack = on_proof(&store, &audit, "apl_1", &der, signed.clone()).await;
            assert_eq!(refused(ack), None);
        }
        assert_eq!(audit.kinds(), vec![TEARDOWN_KIND.to_string()]);
        assert_eq!(store.proofs.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn forged_misdirected_and_unstorable_proofs() {
        let ca = Ca::generate("ca", Timestamp::now()).unwrap();
        let (der, signer) = enrolled(&ca, "apl_1");
        let (other_der, other_signer) = enrolled(&ca, "apl_2");
        let store = Memory {
            endpoints: [("ep_1".to_string(), "apl_1".to_string())].into(),
            ..Default::default()
        };
        let audit = MemoryAudit::default();
        // Edited after signing.
        let mut edited = sign_teardown(&signer, proof("apl_1")).unwrap();
        edited.proof.reason = CloseReason::Expired;
        assert_eq!(
            refused(on_proof(&store, &audit, "apl_1", &der, edited).await),
            Some(ErrorCode::Forbidden)
        );
        // Another appliance proving this appliance's endpoint.
        let theirs = sign_teardown(&other_signer, proof("apl_2")).unwrap();
        assert_eq!(
            refused(on_proof(&store, &audit, "apl_2", &other_der, theirs).await),
            Some(ErrorCode::NotFound)
        );
        // Signed by another key than the connection's certificate certifies.
        let wrong_key = sign_teardown(&other_signer, proof("apl_1")).unwrap();
        assert_eq!(
            refused(on_proof(&store, &audit, "apl_1", &der, wrong_key).await),
            Some(ErrorCode::Forbidden)
        );
        assert!(audit.kinds().is_empty());
        // A store that fails: no acknowledgement, so the agent sends it again.
        let failing = Memory {
            endpoints: [("ep_1".to_string(), "apl_1".to_string())].into(),
            fail: true,
            ..Default::default()
        };
        let good = sign_teardown(&signer, proof("apl_1")).unwrap();
        assert!(on_proof(&failing, &audit, "apl_1", &der, good)
            .await
            .is_none());
    }
}
