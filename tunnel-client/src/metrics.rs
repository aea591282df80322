//! The agent's `/metrics`, `/healthz` and `/readyz` (`postern-agent run --metrics ADDR`, off
//! by default), served by [`telemetry::health_http`] as the gateway's are.
//!
//! The registry belongs to the running agent (no process-wide registry). The agent's parts
//! that count hold an [`AgentMetrics`] handle, reached through the config they already share
//! (`AgentConfig::metrics`): the tunnel (connected, reconnects, commands applied), the
//! sessions (open, by endpoint type) and the customer trail's writer (records made durable,
//! time to write and sync a batch). `/readyz` is 200 while the tunnel to the gateway is up.

use endpoint_types::resource::{EndpointType, ResourceKind};
use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use std::time::Duration;

type Labels = Vec<(&'static str, String)>;

/// The agent's metrics; cheap to clone (every metric is a shared handle).
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    gateway_connected: Gauge,
    reconnects: Counter,
    sessions_open: Family<Labels, Gauge>,
    commands_applied: Counter,
    trail_records: Family<Labels, Counter>,
    trail_write_seconds: Histogram,
}

impl AgentMetrics {
    /// New metrics registered in a new registry, which the caller keeps (the metrics server).
    pub fn new() -> (AgentMetrics, Registry) {
        let m = AgentMetrics {
            gateway_connected: Gauge::default(),
            reconnects: Counter::default(),
            sessions_open: Family::default(),
            commands_applied: Counter::default(),
            trail_records: Family::default(),
            // 0.1 ms … ~3 s.
            trail_write_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        };
        let mut r = Registry::with_prefix("postern_agent");
        r.register(
            "gateway_connected",
            "1 while the tunnel to the gateway is up (hello accepted), else 0",
            m.gateway_connected.clone(),
        );
        r.register(
            "reconnects",
            "Times the agent dialled the gateway again after a lost connection or a failed dial",
            m.reconnects.clone(),
        );
        r.register(
            "sessions_open",
            "Endpoint sessions being served now, by endpoint type",
            m.sessions_open.clone(),
        );
        r.register(
            "commands_applied",
            "Commands from the gateway (endpoint and grant changes) applied and acknowledged",
            m.commands_applied.clone(),
        );
        r.register(
            "trail_records",
            "Records made durable in the customer's audit trail, by kind",
            m.trail_records.clone(),
        );
        r.register(
            "trail_write_seconds",
            "Time to write and sync one batch of the customer's audit trail",
            m.trail_write_seconds.clone(),
        );
        (m, r)
    }

    /// The tunnel is up (a hello was accepted) or down.
    pub fn set_connected(&self, up: bool) {
        self.gateway_connected.set(i64::from(up));
    }

    pub fn connected(&self) -> bool {
        self.gateway_connected.get() == 1
    }

    pub fn reconnecting(&self) {
        self.reconnects.inc();
    }

    pub fn command_applied(&self) {
        self.commands_applied.inc();
    }

    /// A session on a resource of `kind` is being served until the guard is dropped.
    pub fn session_open(&self, kind: ResourceKind) -> OpenSession {
        let endpoint_type = [
            EndpointType::Kubectl,
            EndpointType::Postgres,
            EndpointType::Ssh,
            EndpointType::Tcp,
        ]
        .into_iter()
        .find(|t| t.resource_kind() == kind)
        .map_or("other", EndpointType::as_str);
        let gauge = self
            .sessions_open
            .get_or_create(&vec![("type", endpoint_type.to_string())])
            .clone();
        gauge.inc();
        OpenSession(gauge)
    }

    /// The trail's writer made a batch of records of these kinds durable in `took`.
    pub fn trail_batch<'a>(&self, kinds: impl Iterator<Item = &'a str>, took: Duration) {
        for kind in kinds {
            self.trail_records
                .get_or_create(&vec![("kind", kind.to_string())])
                .inc();
        }
        self.trail_write_seconds.observe(took.as_secs_f64());
    }
}

/// Counts one open session until dropped (however the session ends).
#[derive(Debug)]
pub struct OpenSession(Gauge);

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `/readyz`: ready while the tunnel is up.
pub struct AgentProbe(pub AgentMetrics);

impl telemetry::Probe for AgentProbe {
    async fn refresh(&self) {}

    async fn ready(&self) -> Result<(), String> {
        if self.0.connected() {
            Ok(())
        } else {
            Err("the tunnel to the gateway is down".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn sessions_are_counted_while_open_by_endpoint_type() {
        let (m, r) = AgentMetrics::new();
        let a = m.session_open(ResourceKind::Kubernetes);
        let b = m.session_open(ResourceKind::Kubernetes);
        let c = m.session_open(ResourceKind::Tcp);
        drop(a);
        m.trail_batch(
            ["session.opened", "session.opened"].into_iter(),
            Duration::from_millis(2),
        );
        let mut text = String::new();
        encode(&mut text, &r).unwrap();
        assert!(
            text.contains("postern_agent_sessions_open{type=\"kubectl\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("postern_agent_sessions_open{type=\"tcp\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("postern_agent_trail_records_total{kind=\"session.opened\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("postern_agent_trail_write_seconds_count 1"),
            "{text}"
        );
        drop((b, c));
    }
}
