//! Steady-state observability in the appliance: while the gateway says steady-state is enabled
//! (the customer approver's switch, [`ToAgent::SteadyState`]) and `[policy] steady_state` is
//! on, one task collects a read-only health snapshot of each resource every
//! `[steady_state] interval` and offers it to the control loop, which sends it as
//! [`ToGateway::SteadyStateSnapshot`]. Latest wins: the control loop sends the newest snapshot
//! only, and one lost with a connection is replaced by the next. Disabled (or disconnected),
//! the task is stopped: nothing reaches the resources.
//!
//! [`ToAgent::SteadyState`]: endpoint_types::frame::ToAgent::SteadyState
//! [`ToGateway::SteadyStateSnapshot`]: endpoint_types::frame::ToGateway::SteadyStateSnapshot

mod probes;

use crate::{
    audit::{AuditLog, Entry},
    config::{AgentConfig, ResourceConfig},
    kube::Clusters,
};
use endpoint_types::{
    duration::HumanDuration,
    steady_state::{ApplianceSnapshot, ResourceHealth, MAX_RESOURCES},
};
use jiff::Timestamp;
use serde::Deserialize;
use serde_json::json;
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// Below this a collector would load the resources it watches.
const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// `[steady_state]` of agent.toml. (Whether steady-state is allowed at all stays
/// `[policy] steady_state`.)
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteadyStateConfig {
    /// How often a snapshot is collected (default 30 s).
    pub interval: Option<HumanDuration>,
    /// The paths whose disk use an SSH VM with a steady-state user reports (default `["/"]`).
    pub disk_paths: Option<Vec<String>>,
}

impl SteadyStateConfig {
    pub fn disk_paths(&self) -> Vec<String> {
        self.disk_paths
            .clone()
            .unwrap_or_else(|| vec!["/".to_string()])
    }

    /// `disk_paths`: absolute, quotable, at most [`endpoint_types::vm_facts::MAX_DISK_PATHS`].
    pub fn validate(&self) -> Result<(), String> {
        let paths = self.disk_paths();
        if paths.len() > endpoint_types::vm_facts::MAX_DISK_PATHS {
            return Err(format!(
                "[steady_state] disk_paths lists {} paths; at most {}",
                paths.len(),
                endpoint_types::vm_facts::MAX_DISK_PATHS
            ));
        }
        paths
            .iter()
            .try_for_each(|p| endpoint_types::vm_facts::check_path(p))
            .map_err(|e| format!("[steady_state] {e}"))
    }

    pub fn interval(&self) -> Duration {
        self.interval
            .map(|d| d.0)
            .unwrap_or(DEFAULT_INTERVAL)
            .max(MIN_INTERVAL)
    }
}

/// Which identity a collection uses at the resource: every probe asks this one function.
///
/// - kubernetes: with `[resource.phases.steady-state] impersonate`, the probes' GETs carry
///   that user and groups (`Impersonate-User`/`-Group`) on the kubeconfig's credential;
///   without it, the kubeconfig's credential alone, impersonating nobody (never the operate
///   identity: steady-state is not operate).
/// - postgres: `admin_url` in a `BEGIN READ ONLY` transaction reading statistics views only;
///   steady-state `privileges` do not apply, as the probe touches no table (creating a role
///   per round to hold them would write to the customer's catalog every interval).
/// - ssh: with a steady-state `user`, a login as that user (the resource's key, its pinned host
///   key) running one fixed read-only command for uptime, load and disk use; without it, a TCP
///   connect and the banner only.
/// - tcp: a TCP connect.
pub fn steady_state_identity(resource: &ResourceConfig) -> ResourceConfig {
    let phase = endpoint_types::control::GrantLevel::SteadyState;
    match crate::phases::for_phase(resource, phase) {
        Ok(view) => view,
        Err(_) => {
            let mut own = resource.clone();
            own.impersonate = None;
            own
        }
    }
}

/// Starts and stops the collecting task; the control loop reads the latest snapshot.
pub struct Collector {
    config: Arc<AgentConfig>,
    clusters: Clusters,
    audit: AuditLog,
    tracker: TaskTracker,
    latest: watch::Sender<Option<ApplianceSnapshot>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: Option<CancellationToken>,
    /// What the gateway last said, for the trail (only changes are recorded).
    enabled: Option<bool>,
}

impl Collector {
    pub fn new(
        config: Arc<AgentConfig>,
        clusters: Clusters,
        audit: AuditLog,
        tracker: TaskTracker,
    ) -> Collector {
        Collector {
            config,
            clusters,
            audit,
            tracker,
            latest: watch::channel(None).0,
            state: Mutex::new(State::default()),
        }
    }

    /// The newest snapshot, for the control loop.
    pub fn subscribe(&self) -> watch::Receiver<Option<ApplianceSnapshot>> {
        self.latest.subscribe()
    }

    /// The gateway's word on the switch: starts or stops the collecting task. A change is
    /// recorded in the customer trail.
    pub fn set_enabled(&self, enabled: bool) {
        let allowed = self.config.policy.steady_state;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.enabled != Some(enabled) {
            let kind = if enabled {
                "steady_state.enabled"
            } else {
                "steady_state.disabled"
            };
            self.audit.record_or_log(Entry::new(
                kind,
                "gateway",
                json!({ "collecting": enabled && allowed }),
            ));
            state.enabled = Some(enabled);
        }
        if !(enabled && allowed) {
            if let Some(t) = state.running.take() {
                t.cancel();
            }
            self.latest.send_replace(None);
            return;
        }
        if state.running.is_some() {
            return;
        }
        let stop = CancellationToken::new();
        state.running = Some(stop.clone());
        let config = self.config.clone();
        let clusters = self.clusters.clone();
        let latest = self.latest.clone();
        self.tracker.spawn(async move {
            let every = config.steady_state.interval();
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                // A round is cut short by a stop: nothing reaches a resource after it.
                let snapshot = tokio::select! {
                    () = stop.cancelled() => return,
                    s = collect(&config, &clusters, every) => s,
                };
                latest.send_replace(Some(snapshot));
            }
        });
    }

    /// The connection ended: collect nothing until the next connection's gateway says so.
    pub fn stop(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = state.running.take() {
            t.cancel();
        }
        self.latest.send_replace(None);
    }
}

/// One round: every resource probed at once, each bounded by the interval.
pub async fn collect(
    config: &AgentConfig,
    clusters: &Clusters,
    limit: Duration,
) -> ApplianceSnapshot {
    let probes = config
        .resources
        .iter()
        .take(MAX_RESOURCES)
        .map(|r| async move {
            let identity = steady_state_identity(r);
            let started = Timestamp::now();
            let disk_paths = config.steady_state.disk_paths();
            match tokio::time::timeout(limit, probes::probe(&identity, clusters, &disk_paths)).await
            {
                Ok(health) => health,
                Err(_) => ResourceHealth {
                    resource_id: r.id.clone(),
                    kind: r.kind,
                    collected_at: started,
                    reachable: false,
                    error: Some(format!("no answer within {}", HumanDuration(limit))),
                    detail: None,
                },
            }
        });
    let resources = futures_util::future::join_all(probes).await;
    ApplianceSnapshot {
        collected_at: Timestamp::now(),
        resources,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Result<AgentConfig, crate::config::ConfigError> {
        AgentConfig::parse(text, Path::new("/etc/postern/agent.toml"))
    }

    #[test]
    fn the_interval_defaults_to_30s_has_a_floor_and_the_table_refuses_unknown_keys() {
        let c = parse("audit_path = \"a\"\n").unwrap();
        assert_eq!(c.steady_state.interval(), DEFAULT_INTERVAL);
        let c = parse("audit_path = \"a\"\n[steady_state]\ninterval = \"1s\"\n").unwrap();
        assert_eq!(c.steady_state.interval(), Duration::from_secs(1));
        let c = parse("audit_path = \"a\"\n[steady_state]\ninterval = \"10ms\"\n").unwrap();
        assert_eq!(c.steady_state.interval(), MIN_INTERVAL);
        // `[policy] steady_state` (the on/off switch) keeps working beside the table.
        let c = parse("audit_path = \"a\"\n[policy]\nsteady_state = false\n[steady_state]\ninterval = \"5s\"\n").unwrap();
        assert!(!c.policy.steady_state);
        let e = parse("audit_path = \"a\"\n[steady_state]\nintervall = \"5s\"\n").unwrap_err();
        assert!(e.to_string().contains("intervall"), "{e}");
        assert!(parse("audit_path = \"a\"\n[steady_state]\ninterval = \"soon\"\n").is_err());
    }
}
