//! Steady-state observability: the health snapshot the agent collects of each resource while
//! steady-state is enabled, and the pure functions that turn what a collector read (kube JSON
//! lists, PostgreSQL statistics rows) into it. No row data, secrets, ConfigMap/Secret contents
//! or command output ever enter these types: only counts, names of workloads and events, ages
//! and sizes.
//!
//! Snapshots are latest-wins: one lost (a dropped connection, a full queue) is replaced by the
//! next one an interval later, so they are neither numbered nor acknowledged.

use crate::resource::ResourceKind;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The most not-ready workloads, not-ready pods or warnings one kubernetes snapshot lists (the
/// counts stay exact).
pub const MAX_LISTED: usize = 20;
/// The longest text (an event message, an error, a banner) a snapshot keeps.
pub const MAX_TEXT: usize = 240;
/// The most resources one appliance snapshot carries.
pub const MAX_RESOURCES: usize = 64;

/// One collection round of an appliance: a health record per resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplianceSnapshot {
    pub collected_at: Timestamp,
    pub resources: Vec<ResourceHealth>,
}

/// The health of one resource at `collected_at`. `error` says why a reachable resource's
/// detail is missing or partial (e.g. a statistics view the identity may not read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceHealth {
    pub resource_id: String,
    pub kind: ResourceKind,
    pub collected_at: Timestamp,
    pub reachable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<HealthDetail>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HealthDetail {
    Tcp(TcpHealth),
    Postgres(PostgresHealth),
    Kubernetes(KubeHealth),
    Ssh(SshHealth),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TcpHealth {
    pub connect_ms: u64,
}

/// An SSH VM: reachable and its banner; with a steady-state user
/// (`[resource.phases.steady-state] user`), also uptime, load and disk use read as that user
/// (see [`crate::vm_facts`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SshHealth {
    pub connect_ms: u64,
    pub banner: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<crate::vm_facts::VmFacts>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PostgresHealth {
    pub version: String,
    pub connections: i64,
    pub max_connections: i64,
    pub database_size_bytes: i64,
    /// The age of the oldest open transaction, if any is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longest_transaction_s: Option<f64>,
    /// The largest replay lag of a replica (on a primary) or of this replica; none without
    /// replication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_lag_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct KubeHealth {
    pub namespaces: Vec<String>,
    pub pods_by_phase: BTreeMap<String, u32>,
    pub restarts: u64,
    #[serde(default)]
    pub not_ready_pods: Vec<String>,
    #[serde(default)]
    pub not_ready_workloads: Vec<NotReadyWorkload>,
    #[serde(default)]
    pub warnings: Vec<KubeWarning>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotReadyWorkload {
    /// `Deployment` or `StatefulSet`.
    pub kind: String,
    /// `namespace/name`.
    pub name: String,
    pub ready: i64,
    pub desired: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KubeWarning {
    /// `namespace/Kind/name` of the object the event is about.
    pub object: String,
    pub reason: String,
    pub message: String,
    pub count: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Timestamp>,
}

/// Cuts text to [`MAX_TEXT`] characters.
pub fn bounded_text(s: &str) -> String {
    s.chars().take(MAX_TEXT).collect()
}

fn items(list: &Value) -> &[Value] {
    list.get("items")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut at = v;
    for k in path {
        match at.get(k) {
            Some(next) => at = next,
            None => return "",
        }
    }
    at.as_str().unwrap_or("")
}

fn int_at(v: &Value, path: &[&str]) -> Option<i64> {
    let mut at = v;
    for k in path {
        at = at.get(k)?;
    }
    at.as_i64()
}

fn qualified(v: &Value) -> String {
    format!(
        "{}/{}",
        str_at(v, &["metadata", "namespace"]),
        str_at(v, &["metadata", "name"])
    )
}

/// Adds a `PodList` (`GET /api/v1/namespaces/NS/pods`): pods by phase, container restarts,
/// and running pods whose `Ready` condition is not `True`.
pub fn add_pods(health: &mut KubeHealth, list: &Value) {
    for pod in items(list) {
        let phase = match str_at(pod, &["status", "phase"]) {
            "" => "Unknown",
            p => p,
        };
        *health.pods_by_phase.entry(bounded_text(phase)).or_default() += 1;
        let statuses = pod
            .pointer("/status/containerStatuses")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let restarts: u64 = statuses
            .iter()
            .filter_map(|c| c.get("restartCount").and_then(Value::as_u64))
            .sum();
        health.restarts = health.restarts.saturating_add(restarts);
        let ready = pod
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| str_at(c, &["type"]) == "Ready"))
            .is_some_and(|c| str_at(c, &["status"]) == "True");
        // A finished pod is not expected to be ready.
        if !ready
            && !matches!(phase, "Succeeded" | "Failed")
            && health.not_ready_pods.len() < MAX_LISTED
        {
            health.not_ready_pods.push(bounded_text(&qualified(pod)));
        }
    }
}

/// Adds a `DeploymentList` or `StatefulSetList`: the workloads with fewer ready replicas than
/// desired.
pub fn add_workloads(health: &mut KubeHealth, kind: &str, list: &Value) {
    for w in items(list) {
        let desired = int_at(w, &["spec", "replicas"]).unwrap_or(1);
        let ready = int_at(w, &["status", "readyReplicas"]).unwrap_or(0);
        if ready < desired && health.not_ready_workloads.len() < MAX_LISTED {
            health.not_ready_workloads.push(NotReadyWorkload {
                kind: kind.to_string(),
                name: bounded_text(&qualified(w)),
                ready,
                desired,
            });
        }
    }
}

/// Adds an `EventList`: `Warning` events seen at or after `since`, newest first.
pub fn add_warnings(health: &mut KubeHealth, list: &Value, since: Timestamp) {
    let mut found: Vec<KubeWarning> = items(list)
        .iter()
        .filter(|e| str_at(e, &["type"]) == "Warning")
        .filter_map(|e| {
            let last_seen = ["lastTimestamp", "eventTime"]
                .iter()
                .find_map(|k| str_at(e, &[*k]).parse::<Timestamp>().ok())
                .or_else(|| str_at(e, &["metadata", "creationTimestamp"]).parse().ok());
            if last_seen.is_some_and(|t| t < since) {
                return None;
            }
            Some(KubeWarning {
                object: bounded_text(&format!(
                    "{}/{}/{}",
                    str_at(e, &["involvedObject", "namespace"]),
                    str_at(e, &["involvedObject", "kind"]),
                    str_at(e, &["involvedObject", "name"])
                )),
                reason: bounded_text(str_at(e, &["reason"])),
                message: bounded_text(str_at(e, &["message"])),
                count: int_at(e, &["count"]).unwrap_or(1),
                last_seen,
            })
        })
        .collect();
    found.sort_by_key(|w| std::cmp::Reverse(w.last_seen));
    for w in found {
        if health.warnings.len() >= MAX_LISTED {
            break;
        }
        health.warnings.push(w);
    }
}

/// The statistics one read-only query returns (see the agent's postgres collector), as text
/// columns so that the parsing is independent of the driver.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PgStatsRow {
    pub version: Option<String>,
    pub connections: Option<String>,
    pub max_connections: Option<String>,
    pub database_size_bytes: Option<String>,
    pub longest_transaction_s: Option<String>,
    pub replication_lag_s: Option<String>,
}

/// Parses the statistics row; a value missing or not a number is reported as an error rather
/// than guessed.
pub fn postgres_health(row: &PgStatsRow) -> Result<PostgresHealth, String> {
    fn int(name: &str, v: &Option<String>) -> Result<i64, String> {
        v.as_deref()
            .ok_or_else(|| format!("{name} missing"))?
            .trim()
            .parse()
            .map_err(|_| format!("{name} is not a number"))
    }
    fn secs(name: &str, v: &Option<String>) -> Result<Option<f64>, String> {
        v.as_deref()
            .map(|s| {
                s.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("{name} is not a number"))
            })
            .transpose()
    }
    Ok(PostgresHealth {
        version: bounded_text(row.version.as_deref().unwrap_or("")),
        connections: int("connections", &row.connections)?,
        max_connections: int("max_connections", &row.max_connections)?,
        database_size_bytes: int("database size", &row.database_size_bytes)?,
        longest_transaction_s: secs("transaction age", &row.longest_transaction_s)?,
        replication_lag_s: secs("replication lag", &row.replication_lag_s)?,
    })
}

/// The first line of an SSH server's identification (`SSH-2.0-…`), or None if the bytes are
/// not one.
pub fn ssh_banner(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().find(|l| l.starts_with("SSH-"))?;
    Some(bounded_text(line.trim_end()))
}

#[cfg(test)]
#[path = "steady_state_tests.rs"]
mod tests;
