//! `/metrics` (Prometheus text), `/healthz` and `/readyz` on a listener of their own
//! (`postern server --metrics ADDR`, off by default).
//!
//! The registry belongs to the running gateway (no process-wide registry): services that
//! count hold a [`GatewayMetrics`] handle (the audit log's record hook, the audit writer's
//! commit timer); what the gateway already keeps (agents online, refused handshakes, ops and
//! approvals in the store, the audit queue) is read at scrape time instead of being
//! mirrored on every change.

use crate::{admission::FrontDoors, agents::AgentRegistry, audit::AuditLog, store::Store};
use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;

type Labels = Vec<(&'static str, String)>;

/// A store that does not answer a scrape's queries in this long is reported unreachable.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// The gateway's metrics; cheap to clone (every metric is a shared handle).
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    sessions_opened: Family<Labels, Counter>,
    sessions_closed: Family<Labels, Counter>,
    session_bytes: Family<Labels, Counter>,
    audit_commit_seconds: Histogram,
    agents_online: Gauge,
    handshakes_refused: Family<Labels, Counter>,
    approvals_pending: Gauge,
    approvals_oldest_age: Gauge<f64, AtomicU64>,
    records_by_state: Family<Labels, Gauge>,
    audit_queue_depth: Gauge,
    store_seconds: Histogram,
    store_up: Gauge,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl GatewayMetrics {
    /// New metrics registered in a new registry, which the caller keeps (the metrics server).
    pub fn new() -> (GatewayMetrics, Registry) {
        let m = GatewayMetrics {
            sessions_opened: Family::default(),
            sessions_closed: Family::default(),
            session_bytes: Family::default(),
            audit_commit_seconds: latency_histogram(),
            agents_online: Gauge::default(),
            handshakes_refused: Family::default(),
            approvals_pending: Gauge::default(),
            approvals_oldest_age: Gauge::default(),
            records_by_state: Family::default(),
            audit_queue_depth: Gauge::default(),
            store_seconds: latency_histogram(),
            store_up: Gauge::default(),
        };
        let mut r = Registry::with_prefix("postern");
        r.register(
            "sessions_opened",
            "Endpoint sessions the agent accepted, by endpoint type",
            m.sessions_opened.clone(),
        );
        r.register(
            "sessions_closed",
            "Endpoint sessions ended, by endpoint type and close reason",
            m.sessions_closed.clone(),
        );
        r.register("session_bytes", "Bytes relayed by ended sessions, by endpoint type and direction (up: client to resource)", m.session_bytes.clone());
        r.register(
            "audit_commit_seconds",
            "Time the audit writer took to commit one batch of records",
            m.audit_commit_seconds.clone(),
        );
        r.register(
            "agents_online",
            "Agents with a live tunnel to this gateway",
            m.agents_online.clone(),
        );
        r.register(
            "handshakes_refused",
            "Unauthenticated handshakes refused at a listener's admission cap, by listener",
            m.handshakes_refused.clone(),
        );
        r.register(
            "approvals_pending",
            "Grants, ops and endpoints waiting for a customer approver",
            m.approvals_pending.clone(),
        );
        r.register(
            "approvals_oldest_age_seconds",
            "Age of the oldest item waiting for an approver (0 when none waits)",
            m.approvals_oldest_age.clone(),
        );
        r.register(
            "records",
            "Ops, grants and endpoints in the store, by kind and state",
            m.records_by_state.clone(),
        );
        r.register(
            "audit_queue_depth",
            "Audit records queued for the writer and not yet committed",
            m.audit_queue_depth.clone(),
        );
        r.register(
            "store_query_seconds",
            "Time the store took to answer a scrape's queries",
            m.store_seconds.clone(),
        );
        r.register(
            "store_up",
            "1 when the store answered the last scrape's queries, else 0",
            m.store_up.clone(),
        );
        (m, r)
    }

    /// The audit log's hook: counts sessions from the records that open and close them.
    pub fn observe_record(&self, kind: &str, detail: &serde_json::Value) {
        let endpoint_type = || detail["type"].as_str().unwrap_or("unknown").to_string();
        match kind {
            "session.opened" => {
                self.sessions_opened
                    .get_or_create(&vec![("type", endpoint_type())])
                    .inc();
            }
            "session.closed" => {
                let reason = detail["reason"].as_str().unwrap_or("unknown").to_string();
                self.sessions_closed
                    .get_or_create(&vec![("type", endpoint_type()), ("reason", reason)])
                    .inc();
                for direction in ["up", "down"] {
                    if let Some(n) = detail[format!("bytes_{direction}")].as_u64() {
                        self.session_bytes
                            .get_or_create(&vec![
                                ("type", endpoint_type()),
                                ("direction", direction.to_string()),
                            ])
                            .inc_by(n);
                    }
                }
            }
            _ => {}
        }
    }

    /// The audit writer's hook: one committed batch took `took`.
    pub fn observe_audit_commit(&self, took: Duration) {
        self.audit_commit_seconds.observe(took.as_secs_f64());
    }
}

/// What a scrape reads from the running gateway.
#[derive(Debug)]
pub struct Sources {
    pub store: Store,
    pub audit: AuditLog,
    pub agents: Arc<AgentRegistry>,
    pub doors: Arc<FrontDoors>,
    /// Set once every listener of the gateway is bound.
    pub listening: Arc<AtomicBool>,
}

/// What a scrape or a probe reads: the gauges to refresh and where from.
struct GatewayProbe {
    metrics: GatewayMetrics,
    sources: Sources,
}

/// Binds nothing: serves `/metrics`, `/healthz` and `/readyz` on a bound listener until
/// `shutdown` (the HTTP side is shared with the agent: [`telemetry::health_http`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: GatewayMetrics,
    registry: Registry,
    sources: Sources,
    shutdown: CancellationToken,
) {
    telemetry::serve(
        listener,
        registry,
        GatewayProbe { metrics, sources },
        shutdown,
    )
    .await;
}

impl GatewayProbe {
    /// Reads the scrape-time gauges; false if the store did not answer.
    async fn refresh(&self) -> bool {
        let m = &self.metrics;
        let s = &self.sources;
        m.agents_online.set(s.agents.all().len() as i64);
        m.audit_queue_depth.set(s.audit.queued() as i64);
        let d = &s.doors;
        for door in [&d.relay, &d.api, &d.kube, &d.postgres, &d.ssh, &d.tcp] {
            let counter = m
                .handshakes_refused
                .get_or_create(&vec![("listener", door.name().to_string())]);
            // The door keeps the running total; the counter catches up to it.
            let behind = door.refused().saturating_sub(counter.get());
            counter.inc_by(behind);
        }
        let started = Instant::now();
        let counted = tokio::time::timeout(STORE_TIMEOUT, s.store.count_by_state()).await;
        m.store_seconds.observe(started.elapsed().as_secs_f64());
        let counts = match counted {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "metrics: the store did not answer");
                m.store_up.set(0);
                return false;
            }
            Err(_) => {
                tracing::warn!("metrics: the store did not answer in time");
                m.store_up.set(0);
                return false;
            }
        };
        m.store_up.set(1);
        m.records_by_state.clear();
        let now_ms = jiff::Timestamp::now().as_millisecond();
        let (mut pending, mut oldest_ms) = (0i64, None::<i64>);
        for c in counts {
            m.records_by_state
                .get_or_create(&vec![
                    ("kind", c.kind.to_string()),
                    ("state", c.state.clone()),
                ])
                .set(c.count);
            if c.state.ends_with("pending-approval") {
                pending += c.count;
                oldest_ms = Some(oldest_ms.map_or(c.oldest_ms, |o| o.min(c.oldest_ms)));
            }
        }
        m.approvals_pending.set(pending);
        let age = oldest_ms.map_or(0.0, |o| (now_ms - o).max(0) as f64 / 1000.0);
        m.approvals_oldest_age.set(age);
        true
    }
}

impl telemetry::Probe for GatewayProbe {
    async fn refresh(&self) {
        // A store that does not answer shows as postern_store_up 0.
        let _ = GatewayProbe::refresh(self).await;
    }

    /// Ready once every listener is bound and the store answers.
    async fn ready(&self) -> Result<(), String> {
        if !self.sources.listening.load(Ordering::Acquire) {
            return Err("listeners are not bound yet".into());
        }
        if GatewayProbe::refresh(self).await {
            Ok(())
        } else {
            Err("the store does not answer".into())
        }
    }
}
