//! Steady-state snapshots at the gateway: what agents push ([`ToGateway::SteadyStateSnapshot`])
//! is queued off the frame path and written to the store by one task, and `postern appliance
//! status` reads the latest per resource back.
//!
//! Latest wins, end to end: the queue holds at most one round per appliance (a newer one
//! replaces one not yet written), and a round lost with a connection or a failing store is
//! replaced by the next one an interval later. The history is bounded: 24 h and
//! [`HISTORY_ROWS`] rows per appliance.
//!
//! [`ToGateway::SteadyStateSnapshot`]: endpoint_types::frame::ToGateway::SteadyStateSnapshot

use crate::store::{SnapshotRow, Store};
use endpoint_types::{
    steady_state::{ApplianceSnapshot, ResourceHealth, MAX_RESOURCES},
    ApiError, ErrorCode,
};
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub const HISTORY: SignedDuration = SignedDuration::from_hours(24);
/// 24 h of a 30 s interval for ~7 resources; a shorter interval keeps less than 24 h.
pub const HISTORY_ROWS: i64 = 20_000;

/// Rounds waiting for the store, one per appliance.
#[derive(Debug, Default)]
pub struct SnapshotQueue {
    pending: Mutex<HashMap<String, (Timestamp, ApplianceSnapshot)>>,
    bell: Notify,
}

impl SnapshotQueue {
    /// Queues a round (replacing one of the same appliance not yet written); never waits.
    pub fn offer(&self, appliance_id: &str, snapshot: ApplianceSnapshot, received_at: Timestamp) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(appliance_id.to_string(), (received_at, snapshot));
        self.bell.notify_one();
    }

    fn take(&self) -> Vec<(String, (Timestamp, ApplianceSnapshot))> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect()
    }

    /// Writes queued rounds until `shutdown`.
    pub async fn run(self: Arc<Self>, store: Store, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = self.bell.notified() => {}
                () = shutdown.cancelled() => return,
            }
            for (appliance_id, (received_at, snapshot)) in self.take() {
                let rows = rows_of(&snapshot, received_at);
                let keep_after = received_at - HISTORY;
                if let Err(e) = store
                    .put_snapshots(&appliance_id, &rows, keep_after, HISTORY_ROWS)
                    .await
                {
                    // The next round (an interval later) replaces this one.
                    tracing::warn!(appliance = %appliance_id, error = %e, "could not store a steady-state snapshot");
                }
            }
        }
    }
}

/// One row per resource (the first [`MAX_RESOURCES`]; one per resource id).
pub fn rows_of(snapshot: &ApplianceSnapshot, received_at: Timestamp) -> Vec<SnapshotRow> {
    let mut seen = std::collections::HashSet::new();
    snapshot
        .resources
        .iter()
        .filter(|r| seen.insert(r.resource_id.clone()))
        .take(MAX_RESOURCES)
        .filter_map(|r| {
            Some(SnapshotRow {
                resource_id: r.resource_id.clone(),
                collected_at: r.collected_at,
                received_at,
                health: serde_json::to_string(r).ok()?,
            })
        })
        .collect()
}

/// `GET /v1/appliances/{id}/status`.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub appliance_id: String,
    pub app: String,
    pub customer: String,
    pub resources: Vec<ResourceStatus>,
}

#[derive(Debug, Serialize)]
pub struct ResourceStatus {
    pub received_at: Timestamp,
    /// Seconds since the agent collected it.
    pub age_s: i64,
    #[serde(flatten)]
    pub health: ResourceHealth,
}

/// The error `appliance status` answers while steady-state is off.
pub fn disabled(app: &str, customer: &str) -> ApiError {
    ApiError::new(
        ErrorCode::SteadyStateDisabled,
        format!("steady-state observability is disabled for {app}/{customer}: nothing is collected"),
    )
    .hint(format!(
        "the customer's approver can enable it: postern access steady-state --enable --app {app} --customer {customer}"
    ))
}

/// The latest snapshot per resource, with its age at `now`.
pub fn report(
    appliance_id: &str,
    app: &str,
    customer: &str,
    rows: Vec<SnapshotRow>,
    now: Timestamp,
) -> StatusReport {
    let resources = rows
        .into_iter()
        .filter_map(|row| {
            let health: ResourceHealth = serde_json::from_str(&row.health).ok()?;
            Some(ResourceStatus {
                received_at: row.received_at,
                age_s: now.duration_since(health.collected_at).as_secs().max(0),
                health,
            })
        })
        .collect();
    StatusReport {
        appliance_id: appliance_id.to_string(),
        app: app.to_string(),
        customer: customer.to_string(),
        resources,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_types::{
        resource::ResourceKind,
        steady_state::{HealthDetail, TcpHealth},
    };

    fn health(id: &str, at: Timestamp) -> ResourceHealth {
        ResourceHealth {
            resource_id: id.into(),
            kind: ResourceKind::Tcp,
            collected_at: at,
            reachable: true,
            error: None,
            detail: Some(HealthDetail::Tcp(TcpHealth { connect_ms: 1 })),
        }
    }

    #[tokio::test]
    async fn a_queued_round_reaches_the_store_and_reads_back_with_its_age() {
        let store = Store::open_memory().await.unwrap();
        let queue = Arc::new(SnapshotQueue::default());
        let stop = CancellationToken::new();
        let worker = tokio::spawn(queue.clone().run(store.clone(), stop.clone()));
        let at = Timestamp::from_second(1_000).unwrap();
        // Two rounds before the worker runs: the older is replaced, a duplicate id dropped.
        queue.offer(
            "ap_1",
            ApplianceSnapshot {
                collected_at: at,
                resources: vec![health("old", at)],
            },
            at,
        );
        queue.offer(
            "ap_1",
            ApplianceSnapshot {
                collected_at: at,
                resources: vec![health("db", at), health("db", at)],
            },
            at,
        );
        let mut rows = Vec::new();
        for _ in 0..200 {
            rows = store.latest_snapshots("ap_1").await.unwrap();
            if !rows.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        stop.cancel();
        worker.await.unwrap();
        let r = report(
            "ap_1",
            "shop",
            "acme",
            rows,
            at + SignedDuration::from_secs(42),
        );
        assert_eq!(r.resources.len(), 1);
        assert_eq!(r.resources[0].health.resource_id, "db");
        assert_eq!(r.resources[0].age_s, 42);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["resources"][0]["detail"]["type"], "tcp");
        assert_eq!(json["resources"][0]["age_s"], 42);
    }

    #[test]
    fn disabled_names_the_code_and_who_can_enable_it() {
        let e = disabled("shop", "acme");
        assert_eq!(e.code, ErrorCode::SteadyStateDisabled);
        assert!(
            e.hint.contains("postern access steady-state --enable"),
            "{}",
            e.hint
        );
        assert!(e.hint.contains("approver"));
    }
}
