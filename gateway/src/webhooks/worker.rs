//! The delivery worker: one tracked task that takes due deliveries from the store, attempts a
//! handful at a time, writes each outcome with the next due time, and sleeps until the next one
//! is due or a new one is queued. Pending deliveries live in the store, so a restart resumes.

use super::{
    deliver::{self, Post},
    schedule::{self, Outcome},
    signature, target, Webhooks,
};
use crate::store::{AttemptRecord, DeliveryRow};
use jiff::{SignedDuration, Timestamp};
use std::{sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// Attempts in flight at once (one slow receiver does not hold up the others' deliveries).
const BATCH: i64 = 16;
/// How long a taken delivery is not handed out again (longer than an attempt can last).
const LEASE: Duration = Duration::from_secs(60);
/// The longest sleep between looks at the store (another replica may have queued work).
const IDLE_LOOK: Duration = Duration::from_secs(30);

/// Runs until `shutdown`.
pub async fn run(hooks: Arc<Webhooks>, shutdown: CancellationToken) {
    loop {
        let worked = match hooks
            .store
            .due_deliveries(hooks.clock.stored_now(), BATCH)
            .await
        {
            Ok(due) => {
                let n = due.len();
                let attempts = due.into_iter().map(|d| attempt_one(&hooks, d));
                tokio::select! {
                    _ = futures_util::future::join_all(attempts) => {}
                    _ = shutdown.cancelled() => return,
                }
                n
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read due webhook deliveries");
                0
            }
        };
        if worked as i64 == BATCH {
            continue;
        }
        let sleep = match hooks.store.next_delivery_due().await {
            Ok(Some(due)) => due
                .duration_since(hooks.clock.now())
                .try_into()
                .unwrap_or(Duration::ZERO)
                .min(IDLE_LOOK),
            _ => IDLE_LOOK,
        };
        if sleep.is_zero() && worked > 0 {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(sleep.max(Duration::from_millis(50))) => {}
            _ = hooks.wake.notified() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn attempt_one(hooks: &Webhooks, d: DeliveryRow) {
    let now = hooks.clock.stored_now();
    let (Some(seen_due), Ok(lease)) = (d.next_attempt_at, SignedDuration::try_from(LEASE)) else {
        return;
    };
    let lease_until = now.checked_add(lease).unwrap_or(now);
    match hooks
        .store
        .claim_delivery(&d.id, seen_due, lease_until)
        .await
    {
        Ok(true) => {}
        Ok(false) => return, // another worker took it
        Err(e) => {
            return tracing::warn!(delivery = %d.id, error = %e, "cannot take a webhook delivery")
        }
    }
    let outcome = post(hooks, &d).await;
    let after = schedule::after_attempt(
        d.created_at,
        d.attempts.saturating_add(1),
        outcome,
        hooks.clock.stored_now(),
    );
    match &after.last_error {
        None => {
            tracing::info!(delivery = %d.id, customer = %d.customer, "approval webhook delivered")
        }
        Some(e) => tracing::warn!(
            delivery = %d.id, customer = %d.customer, attempts = after.attempts, error = %e,
            state = after.state.as_str(), "approval webhook attempt failed"
        ),
    }
    let record = AttemptRecord {
        attempts: after.attempts,
        last_status: after.last_status,
        last_error: after.last_error.as_deref(),
        state: after.state,
        next_attempt_at: after.next_attempt_at,
        delivered_at: after.delivered_at,
    };
    if let Err(e) = hooks.store.record_attempt(&d.id, &record).await {
        tracing::warn!(delivery = %d.id, error = %e, "cannot record a webhook attempt");
    }
}

/// Signs and sends one delivery with the customer's current webhook settings.
async fn post(hooks: &Webhooks, d: &DeliveryRow) -> Outcome {
    let settings = match hooks.store.webhook(&d.customer).await {
        Ok(Some(s)) if s.url == d.target => s,
        Ok(_) => return Outcome::NoAnswer("the customer's webhook changed".into()),
        Err(e) => return Outcome::NoAnswer(format!("cannot read the webhook: {e}")),
    };
    let secret = match hooks.open_secret(&d.customer, &settings) {
        Ok(s) => s,
        Err(e) => return Outcome::NoAnswer(e),
    };
    let target = match target::parse(&settings.url, settings.allow_private) {
        Ok(t) => t,
        Err(e) => return Outcome::NoAnswer(e.to_string()),
    };
    let tls = match deliver::tls_config(settings.ca_pem.as_deref()) {
        Ok(t) => t,
        Err(e) => return Outcome::NoAnswer(e),
    };
    // Signed at the moment of sending, so each retry carries a fresh timestamp.
    let t = Timestamp::now().as_second();
    let headers = vec![
        (
            signature::HEADER,
            signature::header_value(&secret, t, d.body.as_bytes()),
        ),
        ("Postern-Delivery", d.id.clone()),
        ("Postern-Event", d.event.clone()),
    ];
    deliver::attempt(Post {
        target: &target,
        allow_private: settings.allow_private,
        tls,
        headers,
        body: bytes::Bytes::from(d.body.clone()),
    })
    .await
}
