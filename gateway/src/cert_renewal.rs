//! Agent certificates renewed over the tunnel (`endpoint_types::cert_renewal`).
//!
//! The agent sends a CSR for a fresh key on its control stream; the gateway signs it with the
//! CA for the appliance the *connection* authenticated as (the name in the CSR must agree, but
//! is never what decides), keeps the new certificate as the appliance's pending one and answers
//! with it. The old certificate keeps opening tunnels until the agent's first connection with
//! the new one, which makes the new one current (`appliances.cert_fingerprint`) and the old one
//! unusable; a renewal that never reached the disk leaves the old one working until it expires.
//! A revoked appliance is refused renewal, and its renewed certificate opens nothing either
//! (the relay checks `revoked_at` whichever certificate maps to the appliance).

use crate::{audit::Subject, ports::AuditSink, store::ApplianceRow, store::Store};
use certs::{Ca, CertInfo};
use endpoint_types::{
    cert_renewal::{CertRenewAnswer, CertRenewRequest, RENEWED_KIND},
    duration::parse_duration,
    frame::ToAgent,
    ApiError, ErrorCode,
};
use jiff::Timestamp;
use std::time::Duration;

/// Agent certificates live 90 days unless configured otherwise, renewed after 60.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(90 * 86_400);
/// Shorter would leave no room to renew (tests use a few seconds).
pub const MIN_LIFETIME: Duration = Duration::from_secs(5);
pub const MAX_LIFETIME: Duration = Duration::from_secs(3650 * 86_400);

/// A configured lifetime, checked against the bounds.
pub fn check_lifetime(d: Duration) -> Result<Duration, String> {
    if d < MIN_LIFETIME || d > MAX_LIFETIME {
        return Err(format!(
            "{d:?} is outside 5s–3650d (agents renew two thirds into the lifetime, so it must leave time to renew)"
        ));
    }
    Ok(d)
}

/// `--agent-cert-lifetime 90d`.
pub fn parse_lifetime(text: &str) -> Result<Duration, String> {
    check_lifetime(parse_duration(text).map_err(|e| e.to_string())?)
}

/// What renewal needs of the gateway.
pub struct Renewals<'a> {
    pub store: &'a Store,
    pub audit: &'a dyn AuditSink,
    pub ca: &'a Ca,
    pub lifetime: Duration,
}

/// The appliance a presented agent certificate opens a tunnel for: its current certificate,
/// or the renewed one it was issued last (which becomes current now). None if neither.
pub async fn appliance_for_cert(
    store: &Store,
    peer_der: &[u8],
) -> crate::store::StoreResult<Option<ApplianceRow>> {
    let fp = certs::fingerprint(peer_der);
    if let Some(a) = store.appliance_by_fingerprint(&fp).await? {
        // Enrolled before the expiry was kept (migration 0011): learn it from the certificate.
        if store.cert_expiry_unknown(&a.id).await? {
            if let Ok(info) = CertInfo::from_der(peer_der) {
                store.set_cert_expiry(&a.id, &fp, info.not_after).await?;
            }
        }
        return Ok(Some(a));
    }
    let Some(id) = store.appliance_of_pending_cert(&fp).await? else {
        return Ok(None);
    };
    let not_after = CertInfo::from_der(peer_der)
        .map(|i| i.not_after)
        .unwrap_or_else(|_| Timestamp::now());
    if store.promote_pending_cert(&id, &fp, not_after).await? {
        tracing::info!(appliance = %id, fingerprint = %fp, "the renewed agent certificate is in use: it is current now and the previous one opens no tunnel");
    }
    // Read again: the connection is judged by the appliance's state (revoked or not) now.
    let a = store.get_appliance(&id).await?;
    Ok(a.filter(|a| a.cert_fingerprint.as_deref() == Some(fp.as_str())))
}

/// Why a certificate that opens no appliance is refused: one this gateway issued but that a
/// renewal (or a new enrollment) replaced says so, and names its appliance for the trail.
pub async fn unknown_cert(store: &Store, peer_der: &[u8]) -> (ApiError, Option<String>) {
    let fp = certs::fingerprint(peer_der);
    match store.appliance_of_kept_cert(&fp).await {
        Ok(Some(id)) => (
            ApiError::new(
                ErrorCode::Unauthenticated,
                format!("this certificate of appliance {id} was replaced by a newer one"),
            )
            .hint("the agent uses its renewed certificate from the next connection; an agent that lost it must be enrolled again"),
            Some(id),
        ),
        _ => (
            ApiError::new(
                ErrorCode::Unauthenticated,
                "this agent certificate is not enrolled with the gateway",
            ),
            None,
        ),
    }
}

/// At enrollment: the certificate's expiry, for `appliance list` (and no pending renewal).
pub async fn enrolled(store: &Store, appliance_id: &str, cert_pem: &str) {
    let info = match CertInfo::from_pem(cert_pem) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(appliance = %appliance_id, error = %e, "cannot read the issued certificate's expiry");
            return;
        }
    };
    if let Err(e) = store
        .set_cert_expiry(appliance_id, &info.fingerprint, info.not_after)
        .await
    {
        tracing::warn!(appliance = %appliance_id, error = %e, "cannot keep the certificate's expiry");
    }
}

impl Renewals<'_> {
    /// Answers one renewal request from `appliance_id`'s agent, whose connection was
    /// authenticated with `conn_cert_der`.
    pub async fn on_request(
        &self,
        appliance_id: &str,
        conn_cert_der: Option<&[u8]>,
        req: CertRenewRequest,
        now: Timestamp,
    ) -> ToAgent {
        let request_id = req.request_id;
        let answer = match self.renew(appliance_id, conn_cert_der, &req, now).await {
            Ok(cert_pem) => CertRenewAnswer {
                request_id,
                cert_pem: Some(cert_pem),
                refused: None,
            },
            Err(e) => {
                tracing::warn!(appliance = %appliance_id, code = %e.code, "refused a certificate renewal: {}", e.message);
                self.audit
                    .record(
                        "denied",
                        &format!("agent:{appliance_id}"),
                        Subject::appliance(appliance_id),
                        serde_json::json!({
                            "action": "cert_renew", "code": e.code, "reason": e.message,
                        }),
                    )
                    .await;
                CertRenewAnswer {
                    request_id,
                    cert_pem: None,
                    refused: Some(e),
                }
            }
        };
        ToAgent::CertRenewal(answer)
    }

    async fn renew(
        &self,
        appliance_id: &str,
        conn_cert_der: Option<&[u8]>,
        req: &CertRenewRequest,
        now: Timestamp,
    ) -> Result<String, ApiError> {
        let internal = |e: crate::store::StoreError| ApiError::internal(e.to_string());
        let appliance = self
            .store
            .get_appliance(appliance_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!("appliance {appliance_id} is unknown"),
                )
            })?;
        if appliance.revoked_at.is_some() {
            return Err(ApiError::new(
                ErrorCode::ApplianceRevoked,
                format!(
                    "appliance {appliance_id} has been revoked; its certificate is not renewed"
                ),
            )
            .hint("a revoked appliance must be added and enrolled again"));
        }
        let bad_csr = |why: String| {
            ApiError::invalid(format!("the renewal CSR was refused: {why}")).hint(
                "the agent makes a fresh key and CSR for its own appliance id at each renewal",
            )
        };
        // The CSR names the appliance it is for; the connection decides which that is.
        match certs::csr_common_name(&req.csr_pem).map_err(|e| bad_csr(e.to_string()))? {
            Some(cn) if cn == appliance_id => {}
            Some(cn) => {
                return Err(bad_csr(format!(
                    "it asks for {cn:?}, but this connection is appliance {appliance_id}"
                )))
            }
            None => return Err(bad_csr("it names no appliance".into())),
        }
        let spki = certs::verified_csr_spki(&req.csr_pem).map_err(|e| bad_csr(e.to_string()))?;
        let old = self.previous(appliance_id, conn_cert_der).await?;
        // A renewal is a new key: a key that is already certified gains nothing from it.
        if let Some(old) = &old {
            if certs::cert_spki_pem(&old.1).ok().as_deref() == Some(spki.as_slice()) {
                return Err(bad_csr(
                    "it certifies the key already in use, not a fresh one".into(),
                ));
            }
        }
        let cert_pem = self
            .ca
            .sign_agent_csr(&req.csr_pem, appliance_id, now, self.lifetime)
            .map_err(|e| bad_csr(e.to_string()))?;
        let new = CertInfo::from_pem(&cert_pem).map_err(|e| ApiError::internal(e.to_string()))?;
        if !self
            .store
            .set_pending_cert(appliance_id, &new.fingerprint, &cert_pem, now)
            .await
            .map_err(internal)?
        {
            return Err(ApiError::new(
                ErrorCode::ApplianceRevoked,
                format!(
                    "appliance {appliance_id} has been revoked; its certificate is not renewed"
                ),
            ));
        }
        let old_info = old.map(|(info, _)| info);
        self.audit
            .record(
                RENEWED_KIND,
                &format!("agent:{appliance_id}"),
                Subject::appliance(appliance_id),
                certs::renewed_detail(old_info.as_ref(), &new),
            )
            .await;
        tracing::info!(appliance = %appliance_id, serial = %new.serial, not_after = %new.not_after, "renewed the agent certificate");
        Ok(cert_pem)
    }

    /// The certificate this renewal replaces: the pending one the agent was issued last, else
    /// the one the connection was authenticated with.
    async fn previous(
        &self,
        appliance_id: &str,
        conn_cert_der: Option<&[u8]>,
    ) -> Result<Option<(CertInfo, String)>, ApiError> {
        let pending = self
            .store
            .pending_cert_pem(appliance_id)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let pem = match (pending, conn_cert_der) {
            (Some(pem), _) => pem,
            (None, Some(der)) => crate::teardown_proofs::pem_of(der),
            (None, None) => return Ok(None),
        };
        Ok(CertInfo::from_pem(&pem).ok().map(|info| (info, pem)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::fakes::MemoryAudit;

    /// The service as the tests use it: certificates of 30 s.
    fn renewals<'a>(store: &'a Store, audit: &'a MemoryAudit, ca: &'a Ca) -> Renewals<'a> {
        Renewals {
            store,
            audit,
            ca,
            lifetime: Duration::from_secs(30),
        }
    }

    async fn setup() -> (Store, Ca, ApplianceRow, String) {
        let store = Store::open_memory().await.unwrap();
        let ca = Ca::generate("test", Timestamp::now()).unwrap();
        let a = ApplianceRow {
            id: "ap_1".into(),
            app: "shop".into(),
            customer: "acme".into(),
            created_at: Timestamp::now(),
            created_by: "admin".into(),
            cert_fingerprint: None,
            enrolled_at: None,
            revoked_at: None,
            last_seen: None,
            agent_version: None,
            resources: "[]".into(),
        };
        store.insert_appliance(&a).await.unwrap();
        let (_, csr) = certs::generate_key_and_csr("ap_1").unwrap();
        let cert = ca
            .sign_agent_csr(&csr, "ap_1", Timestamp::now(), Duration::from_secs(60))
            .unwrap();
        let fp = certs::fingerprint_pem(&cert).unwrap();
        store
            .set_enrolled("ap_1", &fp, Timestamp::now())
            .await
            .unwrap();
        // As the relay's enrollment does.
        store
            .keep_appliance_cert("ap_1", &fp, &cert, Timestamp::now())
            .await
            .unwrap();
        enrolled(&store, "ap_1", &cert).await;
        (store, ca, a, cert)
    }

    fn der(pem: &str) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    fn request(cn: &str) -> CertRenewRequest {
        let (_, csr_pem) = certs::generate_key_and_csr(cn).unwrap();
        CertRenewRequest {
            request_id: 9,
            csr_pem,
        }
    }

    /// The certificate ap_1 gets for a fresh key, renewing with its enrolled `old` one.
    async fn renew_once(r: &Renewals<'_>, old: &str) -> String {
        granted(
            r.on_request("ap_1", Some(&der(old)), request("ap_1"), Timestamp::now())
                .await,
        )
        .unwrap()
    }

    fn granted(frame: ToAgent) -> Result<String, ApiError> {
        match frame {
            ToAgent::CertRenewal(a) => {
                assert_eq!(a.request_id, 9);
                match (a.cert_pem, a.refused) {
                    (Some(c), None) => Ok(c),
                    (None, Some(e)) => Err(e),
                    other => panic!("neither or both: {other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn renewed_cert_is_pending_until_first_use_then_replaces_the_old() {
        let (store, ca, _, old) = setup().await;
        let audit = MemoryAudit::default();
        let new = renew_once(&renewals(&store, &audit, &ca), &old).await;
        assert_eq!(certs::cert_common_name(&der(&new)).unwrap(), "ap_1");
        // Both open the appliance until the new one is used.
        let a = appliance_for_cert(&store, &der(&old)).await.unwrap();
        assert_eq!(a.unwrap().id, "ap_1");
        let a = appliance_for_cert(&store, &der(&new)).await.unwrap();
        assert_eq!(a.unwrap().id, "ap_1");
        // Now the old one is replaced.
        assert!(appliance_for_cert(&store, &der(&old))
            .await
            .unwrap()
            .is_none());
        let expiries = store.cert_expiries().await.unwrap();
        let new_info = CertInfo::from_pem(&new).unwrap();
        assert_eq!(expiries, vec![("ap_1".to_string(), new_info.not_after)]);

        let rec = audit.of_kind(RENEWED_KIND);
        assert_eq!(rec.len(), 1);
        let old_info = CertInfo::from_pem(&old).unwrap();
        assert_eq!(rec[0].detail["old"]["serial"], old_info.serial);
        assert_eq!(rec[0].detail["new"]["serial"], new_info.serial);
        assert_eq!(rec[0].detail["new"]["fingerprint"], new_info.fingerprint);
        assert_ne!(old_info.serial, new_info.serial);
    }

    #[tokio::test]
    async fn a_csr_for_another_appliance_or_the_same_key_or_a_revoked_one_is_refused() {
        let (store, ca, _, old) = setup().await;
        let audit = MemoryAudit::default();
        let r = renewals(&store, &audit, &ca);
        let now = Timestamp::now();
        let e = granted(
            r.on_request("ap_1", Some(&der(&old)), request("ap_2"), now)
                .await,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("ap_2"), "{}", e.message);

        let mut garbage = request("ap_1");
        garbage.csr_pem = "not a csr".into();
        let e = granted(r.on_request("ap_1", Some(&der(&old)), garbage, now).await).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);

        // The key already certified again: no fresh key, no renewal.
        let (key, csr) = certs::generate_key_and_csr("ap_1").unwrap();
        let cert = ca
            .sign_agent_csr(&csr, "ap_1", now, Duration::from_secs(60))
            .unwrap();
        let again = CertRenewRequest {
            request_id: 9,
            csr_pem: csr,
        };
        assert!(certs::key_matches_cert(key.expose(), &cert).unwrap());
        let e = granted(r.on_request("ap_1", Some(&der(&cert)), again, now).await).unwrap_err();
        assert!(e.message.contains("fresh"), "{}", e.message);

        store.revoke_appliance("ap_1", now).await.unwrap();
        let e = granted(
            r.on_request("ap_1", Some(&der(&old)), request("ap_1"), now)
                .await,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::ApplianceRevoked);
        assert_eq!(audit.of_kind("denied").len(), 4);
        assert!(audit.of_kind(RENEWED_KIND).is_empty());
    }

    #[tokio::test]
    async fn a_pending_cert_of_a_revoked_appliance_still_maps_to_it_so_the_relay_refuses_it() {
        let (store, ca, _, old) = setup().await;
        let audit = MemoryAudit::default();
        let new = renew_once(&renewals(&store, &audit, &ca), &old).await;
        store
            .revoke_appliance("ap_1", Timestamp::now())
            .await
            .unwrap();
        let a = appliance_for_cert(&store, &der(&new))
            .await
            .unwrap()
            .unwrap();
        assert!(a.revoked_at.is_some());
    }

    #[tokio::test]
    async fn a_replaced_cert_is_refused_naming_its_appliance() {
        let (store, ca, _, old) = setup().await;
        let audit = MemoryAudit::default();
        let new = renew_once(&renewals(&store, &audit, &ca), &old).await;
        assert!(appliance_for_cert(&store, &der(&new))
            .await
            .unwrap()
            .is_some());
        assert!(appliance_for_cert(&store, &der(&old))
            .await
            .unwrap()
            .is_none());
        let (e, id) = unknown_cert(&store, &der(&old)).await;
        assert_eq!(e.code, ErrorCode::Unauthenticated);
        assert!(e.message.contains("replaced"), "{}", e.message);
        assert_eq!(id.as_deref(), Some("ap_1"));
        let stranger = Ca::generate("x", Timestamp::now()).unwrap();
        let (_, csr) = certs::generate_key_and_csr("ap_1").unwrap();
        let foreign = stranger
            .sign_agent_csr(&csr, "ap_1", Timestamp::now(), Duration::from_secs(60))
            .unwrap();
        let (e, id) = unknown_cert(&store, &der(&foreign)).await;
        assert!(e.message.contains("not enrolled"), "{}", e.message);
        assert_eq!(id, None);
    }

    #[test]
    fn lifetimes_are_bounded() {
        assert_eq!(parse_lifetime("90d").unwrap(), DEFAULT_LIFETIME);
        assert_eq!(parse_lifetime("9s").unwrap(), Duration::from_secs(9));
        assert!(parse_lifetime("1s").is_err());
        assert!(parse_lifetime("4000d").is_err());
        assert!(parse_lifetime("soon").is_err());
    }
}
