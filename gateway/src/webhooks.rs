//! The approval webhook: for each request that waits for a person, a signed JSON POST to the
//! customer's https receiver, queued in the store and retried with backoff for 24 hours by a
//! background worker (so a gateway restart resumes it), to an address checked after DNS
//! resolution. The pure parts: [`signature`], [`schedule`], [`address`], [`target`].

pub mod address;
mod deliver;
pub mod schedule;
pub mod sealed;
pub mod signature;
pub mod target;
mod worker;

use crate::{
    identity::random_hex,
    ports::{Clock, Notifier},
    store::{AttemptRecord, DeliveryRow, NewDelivery, Store, StoreResult, WebhookSettings},
};
use endpoint_types::{secret::Secret, ApiError};
use jiff::Timestamp;
use sealed::SecretBox;
use std::sync::Arc;

pub use worker::run;

/// The one event the webhook carries today.
pub const EVENT_APPROVAL_WAITING: &str = "approval.waiting";
/// Largest CA bundle a webhook may carry.
const MAX_CA_PEM: usize = 64 * 1024;

/// What the API asks to set.
#[derive(Debug, Clone)]
pub struct SetRequest {
    pub url: String,
    pub ca_pem: Option<String>,
    pub allow_private: bool,
}

/// What a set returned: the secret, shown this once.
#[derive(Debug)]
pub struct SetOutcome {
    pub secret: Secret,
    /// Deliveries still pending for the previous setting, given up.
    pub superseded: u64,
}

/// What the webhook service and its worker ask of the store (see `store/webhooks.rs`).
#[async_trait::async_trait]
pub trait WebhookStore: Send + Sync {
    async fn set_webhook(
        &self,
        customer: &str,
        settings: Option<&WebhookSettings>,
        now: Timestamp,
    ) -> StoreResult<u64>;
    async fn webhook(&self, customer: &str) -> StoreResult<Option<WebhookSettings>>;
    async fn enqueue_delivery(&self, d: &NewDelivery, now: Timestamp) -> StoreResult<u64>;
    async fn due_deliveries(&self, now: Timestamp, limit: i64) -> StoreResult<Vec<DeliveryRow>>;
    async fn next_delivery_due(&self) -> StoreResult<Option<Timestamp>>;
    async fn claim_delivery(
        &self,
        id: &str,
        seen_due: Timestamp,
        lease_until: Timestamp,
    ) -> StoreResult<bool>;
    async fn record_attempt(&self, id: &str, a: &AttemptRecord<'_>) -> StoreResult<bool>;
    async fn deliveries(&self, customer: Option<&str>, limit: i64)
        -> StoreResult<Vec<DeliveryRow>>;
}

#[async_trait::async_trait]
impl WebhookStore for Store {
    async fn set_webhook(
        &self,
        customer: &str,
        settings: Option<&WebhookSettings>,
        now: Timestamp,
    ) -> StoreResult<u64> {
        Store::set_webhook(self, customer, settings, now).await
    }
    async fn webhook(&self, customer: &str) -> StoreResult<Option<WebhookSettings>> {
        Store::webhook(self, customer).await
    }
    async fn enqueue_delivery(&self, d: &NewDelivery, now: Timestamp) -> StoreResult<u64> {
        Store::enqueue_delivery(self, d, now).await
    }
    async fn due_deliveries(&self, now: Timestamp, limit: i64) -> StoreResult<Vec<DeliveryRow>> {
        Store::due_deliveries(self, now, limit).await
    }
    async fn next_delivery_due(&self) -> StoreResult<Option<Timestamp>> {
        Store::next_delivery_due(self).await
    }
    async fn claim_delivery(
        &self,
        id: &str,
        seen_due: Timestamp,
        lease_until: Timestamp,
    ) -> StoreResult<bool> {
        Store::claim_delivery(self, id, seen_due, lease_until).await
    }
    async fn record_attempt(&self, id: &str, a: &AttemptRecord<'_>) -> StoreResult<bool> {
        Store::record_attempt(self, id, a).await
    }
    async fn deliveries(
        &self,
        customer: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<DeliveryRow>> {
        Store::deliveries(self, customer, limit).await
    }
}

/// Sets webhooks, queues deliveries and hands them to the worker.
pub struct Webhooks {
    store: Arc<dyn WebhookStore>,
    clock: Arc<dyn Clock>,
    secrets: SecretBox,
    /// Rung when a delivery is queued, so the worker need not poll.
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks").finish_non_exhaustive()
    }
}

impl Webhooks {
    pub fn new(
        store: Arc<dyn WebhookStore>,
        clock: Arc<dyn Clock>,
        secrets: SecretBox,
    ) -> Webhooks {
        Webhooks {
            store,
            clock,
            secrets,
            wake: tokio::sync::Notify::new(),
        }
    }

    /// Checks the target and CA, makes a new signing secret and stores the webhook sealed.
    pub async fn set(&self, customer: &str, req: SetRequest) -> Result<SetOutcome, ApiError> {
        let target = target::parse(&req.url, req.allow_private).map_err(|e| e.to_api_error())?;
        if let Some(pem) = &req.ca_pem {
            check_ca_pem(pem)?;
        }
        let secret = signature::generate_secret();
        let sealed = self
            .secrets
            .seal(customer, &secret)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let settings = WebhookSettings {
            url: req.url,
            secret_sealed: sealed,
            ca_pem: req.ca_pem,
            allow_private: req.allow_private,
        };
        let superseded = self
            .store
            .set_webhook(customer, Some(&settings), self.clock.stored_now())
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        tracing::info!(%customer, host = ?target.host, port = target.port, "approval webhook set");
        Ok(SetOutcome { secret, superseded })
    }

    /// Clears the customer's webhook; pending deliveries are given up.
    pub async fn clear(&self, customer: &str) -> Result<u64, ApiError> {
        self.store
            .set_webhook(customer, None, self.clock.stored_now())
            .await
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// The customer's webhook (never its secret).
    pub async fn settings(&self, customer: &str) -> Result<Option<WebhookSettings>, ApiError> {
        self.store
            .webhook(customer)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// Deliveries, newest first, of one customer or of all.
    pub async fn deliveries(&self, customer: Option<&str>) -> Result<Vec<DeliveryRow>, ApiError> {
        self.store
            .deliveries(customer, 500)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    fn open_secret(&self, customer: &str, settings: &WebhookSettings) -> Result<Secret, String> {
        self.secrets
            .open(customer, &settings.secret_sealed)
            .map_err(|e| e.to_string())
    }
}

fn check_ca_pem(pem: &str) -> Result<(), ApiError> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let hint = "give --receiver-ca-file a PEM file with the CA certificate(s) the receiver's chain ends in";
    if pem.len() > MAX_CA_PEM {
        return Err(ApiError::invalid("the webhook CA file is larger than 64 KiB").hint(hint));
    }
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ApiError::invalid(format!("the webhook CA file is not PEM: {e}")).hint(hint)
        })?;
    if certs.is_empty() {
        return Err(ApiError::invalid("the webhook CA file holds no certificate").hint(hint));
    }
    deliver::tls_config(Some(pem)).map_err(|e| ApiError::invalid(e).hint(hint))?;
    Ok(())
}

/// The JSON the receiver gets (and the bytes that are signed).
pub fn payload(delivery: &str, customer: &str, kind: &str, id: &str) -> String {
    serde_json::json!({
        "event": EVENT_APPROVAL_WAITING,
        "delivery": delivery,
        "customer": customer,
        "kind": kind,
        "id": id,
        "hint": format!("postern approvals show {id}"),
    })
    .to_string()
}

/// A delivery as `approvals webhook status` shows it (never the body's secret: it has none).
pub fn delivery_json(d: &DeliveryRow) -> serde_json::Value {
    serde_json::json!({
        "id": d.id,
        "customer": d.customer,
        "event": d.event,
        "target": d.target,
        "state": d.state.as_str(),
        "created_at": d.created_at,
        "attempts": d.attempts,
        "last_status": d.last_status,
        "last_error": d.last_error,
        "next_attempt_at": d.next_attempt_at,
        "delivered_at": d.delivered_at,
    })
}

#[async_trait::async_trait]
impl Notifier for Webhooks {
    /// Queues the delivery in the store (so it outlives this process) and wakes the worker.
    async fn waiting(&self, customer: &str, kind: &str, id: &str) {
        let settings = match self.store.webhook(customer).await {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => return tracing::warn!(error = %e, "cannot read the customer's webhook"),
        };
        let delivery_id = format!("wh_{}", random_hex(8));
        let delivery = NewDelivery {
            id: delivery_id.clone(),
            customer: customer.to_string(),
            event: EVENT_APPROVAL_WAITING.to_string(),
            target: settings.url,
            body: payload(&delivery_id, customer, kind, id),
        };
        match self
            .store
            .enqueue_delivery(&delivery, self.clock.stored_now())
            .await
        {
            Ok(0) => {}
            Ok(dropped) => tracing::warn!(
                %customer, dropped,
                "the customer's webhook queue is full; its oldest pending deliveries were given up"
            ),
            Err(e) => {
                return tracing::warn!(%customer, error = %e, "cannot queue the approval webhook")
            }
        }
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_names_the_delivery_and_how_to_act() {
        let v: serde_json::Value =
            serde_json::from_str(&payload("wh_1", "acme", "grant", "gr_9")).unwrap();
        assert_eq!(v["event"], "approval.waiting");
        assert_eq!(v["delivery"], "wh_1");
        assert_eq!(v["hint"], "postern approvals show gr_9");
    }

    fn service(store: &Store) -> Webhooks {
        let clock = crate::ports::fakes::FakeClock::at(
            jiff::Timestamp::from_second(1_800_000_000).unwrap(),
        );
        Webhooks::new(
            Arc::new(store.clone()),
            Arc::new(clock),
            SecretBox::derive(&Secret::new("test CA key")).unwrap(),
        )
    }

    fn request(url: &str, allow_private: bool) -> SetRequest {
        SetRequest {
            url: url.into(),
            ca_pem: None,
            allow_private,
        }
    }

    #[tokio::test]
    async fn set_refuses_bad_targets_and_keeps_only_the_sealed_secret() {
        let store = Store::open_memory().await.unwrap();
        let hooks = service(&store);
        for (url, allow, code) in [
            (
                "http://hooks.example.com/",
                true,
                endpoint_types::ErrorCode::InvalidRequest,
            ),
            (
                "https://10.0.0.5/",
                false,
                endpoint_types::ErrorCode::Forbidden,
            ),
            (
                "https://169.254.169.254/",
                true,
                endpoint_types::ErrorCode::Forbidden,
            ),
        ] {
            let e = hooks.set("acme", request(url, allow)).await.unwrap_err();
            assert_eq!(e.code, code, "{url}");
            assert!(!e.hint.is_empty());
        }
        assert_eq!(
            hooks.settings("acme").await.unwrap(),
            None,
            "nothing stored"
        );
        let bad_ca = SetRequest {
            ca_pem: Some("not a certificate".into()),
            ..request("https://hooks.example.com/", false)
        };
        assert!(hooks.set("acme", bad_ca).await.is_err());

        let out = hooks
            .set("acme", request("https://hooks.example.com/p", false))
            .await
            .unwrap();
        let stored = hooks.settings("acme").await.unwrap().unwrap();
        assert!(!stored.secret_sealed.contains(out.secret.expose()));
        assert_eq!(hooks.open_secret("acme", &stored).unwrap(), out.secret);
        assert!(hooks.open_secret("globex", &stored).is_err());
        assert!(!format!("{stored:?}").contains(&stored.secret_sealed));
    }

    #[tokio::test]
    async fn waiting_queues_a_delivery_only_where_a_webhook_is_set() {
        let store = Store::open_memory().await.unwrap();
        let hooks = service(&store);
        hooks.waiting("globex", "grant", "gr_1").await;
        assert!(hooks.deliveries(None).await.unwrap().is_empty());

        hooks
            .set("acme", request("https://hooks.example.com/p", false))
            .await
            .unwrap();
        hooks.waiting("acme", "op", "op_7").await;
        let d = hooks.deliveries(Some("acme")).await.unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].state, d[0].attempts, d[0].target.as_str()),
            (
                schedule::DeliveryState::Pending,
                0,
                "https://hooks.example.com/p"
            )
        );
        let body: serde_json::Value = serde_json::from_str(&d[0].body).unwrap();
        assert_eq!(
            (body["id"].as_str(), body["kind"].as_str()),
            (Some("op_7"), Some("op"))
        );
        assert_eq!(body["delivery"].as_str(), Some(d[0].id.as_str()));
        let shown = delivery_json(&d[0]);
        for k in [
            "id",
            "event",
            "target",
            "attempts",
            "last_status",
            "last_error",
            "next_attempt_at",
            "delivered_at",
        ] {
            assert!(shown.get(k).is_some(), "{k} missing from {shown}");
        }

        // Cleared: the pending delivery is given up, new events queue nothing.
        assert_eq!(hooks.clear("acme").await.unwrap(), 1);
        hooks.waiting("acme", "op", "op_8").await;
        let d = hooks.deliveries(Some("acme")).await.unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].state, schedule::DeliveryState::Failed);
    }

    #[test]
    fn ca_files_must_hold_certificates() {
        assert!(check_ca_pem("").is_err());
        assert!(check_ca_pem("not pem").is_err());
        let ca = certs::Ca::generate("test", jiff::Timestamp::now()).unwrap();
        assert_eq!(check_ca_pem(ca.cert_pem()), Ok(()));
    }
}
