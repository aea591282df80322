//! The customer's approval webhook (target, sealed signing secret, CA, private-address
//! permission) and its durable delivery queue: what is pending survives a restart, each
//! customer's queue is bounded, finished deliveries are kept for `status` and pruned.

use super::{from_ms, opt_ts, to_ms, Store, StoreResult};
use crate::webhooks::schedule::DeliveryState;
use jiff::Timestamp;
use sqlx::{any::AnyRow, Row};

/// Pending deliveries one customer may have; past it the oldest pending one is given up
/// (a receiver that is down for a day should not grow the store without bound).
pub const DELIVERY_QUEUE_BOUND: i64 = 500;
/// Finished (delivered or given up) deliveries kept per customer for `webhook status`.
const FINISHED_KEPT: i64 = 200;

/// A customer's webhook as set.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    pub url: String,
    /// The signing secret sealed by `webhooks::sealed`; useless without the gateway CA key.
    pub secret_sealed: String,
    /// PEM certificates the receiver must chain to; None: the system roots.
    pub ca_pem: Option<String>,
    pub allow_private: bool,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &self.url)
            .field("secret_sealed", &"<redacted>")
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field("allow_private", &self.allow_private)
            .finish()
    }
}

/// One delivery to queue.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: String,
    pub customer: String,
    pub event: String,
    pub target: String,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRow {
    pub id: String,
    pub customer: String,
    pub event: String,
    pub target: String,
    pub body: String,
    pub state: DeliveryState,
    pub created_at: Timestamp,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<Timestamp>,
    pub delivered_at: Option<Timestamp>,
}

const DELIVERY_COLS: &str = "id, customer, event, target, body, state, created_at, attempts, \
                             last_status, last_error, next_attempt_at, delivered_at";

fn delivery_from(r: AnyRow) -> StoreResult<DeliveryRow> {
    let state: String = r.try_get("state")?;
    let attempts: i64 = r.try_get("attempts")?;
    let last_status: Option<i64> = r.try_get("last_status")?;
    Ok(DeliveryRow {
        id: r.try_get("id")?,
        customer: r.try_get("customer")?,
        event: r.try_get("event")?,
        target: r.try_get("target")?,
        body: r.try_get("body")?,
        state: super::parse_kw(&state, "delivery state", DeliveryState::parse)?,
        created_at: from_ms(r.try_get("created_at")?)?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        last_status: last_status.and_then(|s| u16::try_from(s).ok()),
        last_error: r.try_get("last_error")?,
        next_attempt_at: opt_ts(r.try_get("next_attempt_at")?)?,
        delivered_at: opt_ts(r.try_get("delivered_at")?)?,
    })
}

/// What one attempt left on a delivery.
#[derive(Debug, Clone)]
pub struct AttemptRecord<'a> {
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<&'a str>,
    pub state: DeliveryState,
    pub next_attempt_at: Option<Timestamp>,
    pub delivered_at: Option<Timestamp>,
}

impl Store {
    /// Sets (or clears, with None) the customer's webhook. Deliveries still pending for the
    /// previous setting are given up: they were meant for a target (and a secret) that is no
    /// longer the customer's. Returns how many were given up.
    pub async fn set_webhook(
        &self,
        customer: &str,
        settings: Option<&WebhookSettings>,
        now: Timestamp,
    ) -> StoreResult<u64> {
        let mut conn = self.writer().await?;
        let mut tx = self.write_tx(&mut conn, "webhook_deliveries").await?;
        sqlx::query(
            "INSERT INTO customer_settings \
               (customer, webhook_url, webhook_secret_sealed, webhook_ca_pem, webhook_allow_private) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (customer) DO UPDATE SET webhook_url = excluded.webhook_url, \
               webhook_secret_sealed = excluded.webhook_secret_sealed, \
               webhook_ca_pem = excluded.webhook_ca_pem, \
               webhook_allow_private = excluded.webhook_allow_private",
        )
        .bind(customer)
        .bind(settings.map(|s| s.url.as_str()))
        .bind(settings.map(|s| s.secret_sealed.as_str()))
        .bind(settings.and_then(|s| s.ca_pem.as_deref()))
        .bind(i64::from(settings.is_some_and(|s| s.allow_private)))
        .execute(&mut *tx)
        .await?;
        let dropped = sqlx::query(
            "UPDATE webhook_deliveries SET state = $1, next_attempt_at = NULL, \
               last_error = COALESCE(last_error || '; ', '') || $2 \
             WHERE customer = $3 AND state = $4",
        )
        .bind(DeliveryState::Failed.as_str())
        .bind(format!(
            "given up at {now}: the customer's webhook was set again or cleared"
        ))
        .bind(customer)
        .bind(DeliveryState::Pending.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(dropped)
    }

    /// The customer's webhook; None when none is set.
    pub async fn webhook(&self, customer: &str) -> StoreResult<Option<WebhookSettings>> {
        let row = sqlx::query(
            "SELECT webhook_url, webhook_secret_sealed, webhook_ca_pem, webhook_allow_private \
             FROM customer_settings WHERE customer = $1",
        )
        .bind(customer)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let url: Option<String> = r.try_get("webhook_url")?;
        let sealed: Option<String> = r.try_get("webhook_secret_sealed")?;
        Ok(match (url, sealed) {
            (Some(url), Some(secret_sealed)) => Some(WebhookSettings {
                url,
                secret_sealed,
                ca_pem: r.try_get("webhook_ca_pem")?,
                allow_private: r.try_get::<i64, _>("webhook_allow_private")? != 0,
            }),
            _ => None,
        })
    }

    /// Queues a delivery, due at once. Past [`DELIVERY_QUEUE_BOUND`] pending deliveries the
    /// customer's oldest pending ones are given up; finished ones past a few hundred are
    /// deleted. Returns how many pending deliveries were given up to make room.
    pub async fn enqueue_delivery(&self, d: &NewDelivery, now: Timestamp) -> StoreResult<u64> {
        let mut conn = self.writer().await?;
        let mut tx = self.write_tx(&mut conn, "webhook_deliveries").await?;
        sqlx::query(
            "INSERT INTO webhook_deliveries \
               (id, customer, event, target, body, state, created_at, attempts, next_attempt_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $7)",
        )
        .bind(&d.id)
        .bind(&d.customer)
        .bind(&d.event)
        .bind(&d.target)
        .bind(&d.body)
        .bind(DeliveryState::Pending.as_str())
        .bind(to_ms(now))
        .execute(&mut *tx)
        .await?;
        let pending = DeliveryState::Pending.as_str();
        let dropped = sqlx::query(
            "UPDATE webhook_deliveries SET state = $1, next_attempt_at = NULL, \
               last_error = COALESCE(last_error || '; ', '') || $2 \
             WHERE customer = $3 AND state = $4 AND id NOT IN ( \
               SELECT id FROM webhook_deliveries WHERE customer = $3 AND state = $4 \
               ORDER BY created_at DESC, id DESC LIMIT $5)",
        )
        .bind(DeliveryState::Failed.as_str())
        .bind(format!(
            "given up: more than {DELIVERY_QUEUE_BOUND} deliveries were pending for this customer"
        ))
        .bind(&d.customer)
        .bind(pending)
        .bind(DELIVERY_QUEUE_BOUND)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "DELETE FROM webhook_deliveries WHERE customer = $1 AND state <> $2 AND id NOT IN ( \
               SELECT id FROM webhook_deliveries WHERE customer = $1 AND state <> $2 \
               ORDER BY created_at DESC, id DESC LIMIT $3)",
        )
        .bind(&d.customer)
        .bind(pending)
        .bind(FINISHED_KEPT)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(dropped)
    }

    /// Pending deliveries due at `now`, the most overdue first.
    pub async fn due_deliveries(
        &self,
        now: Timestamp,
        limit: i64,
    ) -> StoreResult<Vec<DeliveryRow>> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {DELIVERY_COLS} FROM webhook_deliveries \
             WHERE state = $1 AND next_attempt_at <= $2 ORDER BY next_attempt_at, id LIMIT $3"
        )))
        .bind(DeliveryState::Pending.as_str())
        .bind(to_ms(now))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(delivery_from)
        .collect()
    }

    /// When the next pending delivery is due (None: nothing pending).
    pub async fn next_delivery_due(&self) -> StoreResult<Option<Timestamp>> {
        let row = sqlx::query(
            "SELECT MIN(next_attempt_at) AS due FROM webhook_deliveries WHERE state = $1",
        )
        .bind(DeliveryState::Pending.as_str())
        .fetch_one(&self.pool)
        .await?;
        opt_ts(row.try_get("due")?)
    }

    /// Takes a due delivery for one attempt: moves its due time to `lease_until` if it is
    /// still pending and due at `seen_due` (another worker, e.g. another replica, has not
    /// taken it). A worker that dies mid-attempt leaves it due again at `lease_until`.
    pub async fn claim_delivery(
        &self,
        id: &str,
        seen_due: Timestamp,
        lease_until: Timestamp,
    ) -> StoreResult<bool> {
        let r = sqlx::query(
            "UPDATE webhook_deliveries SET next_attempt_at = $1 \
             WHERE id = $2 AND state = $3 AND next_attempt_at = $4",
        )
        .bind(to_ms(lease_until))
        .bind(id)
        .bind(DeliveryState::Pending.as_str())
        .bind(to_ms(seen_due))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Writes what an attempt on a claimed delivery came to; only while it is still pending
    /// (a webhook set again meanwhile has given it up).
    pub async fn record_attempt(&self, id: &str, a: &AttemptRecord<'_>) -> StoreResult<bool> {
        let r = sqlx::query(
            "UPDATE webhook_deliveries SET attempts = $1, last_status = $2, last_error = $3, \
               state = $4, next_attempt_at = $5, delivered_at = $6 \
             WHERE id = $7 AND state = $8",
        )
        .bind(i64::from(a.attempts))
        .bind(a.last_status.map(i64::from))
        .bind(a.last_error)
        .bind(a.state.as_str())
        .bind(a.next_attempt_at.map(to_ms))
        .bind(a.delivered_at.map(to_ms))
        .bind(id)
        .bind(DeliveryState::Pending.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Deliveries, newest first, of one customer or of all.
    pub async fn deliveries(
        &self,
        customer: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<DeliveryRow>> {
        let (filter, binds): (&str, Vec<&str>) = match customer {
            Some(c) => ("WHERE customer = $1", vec![c]),
            None => ("", vec![]),
        };
        // LIMIT as a constant: the binds are text.
        let limit = limit.clamp(1, 10_000);
        self.select_rows(
            format!(
                "SELECT {DELIVERY_COLS} FROM webhook_deliveries {filter} \
                 ORDER BY created_at DESC, id DESC LIMIT {limit}"
            ),
            &binds,
            delivery_from,
        )
        .await
    }
}
