//! `postern appliance status [ID | --app A --customer C] [--watch]`: the latest steady-state
//! snapshot per resource with its age.

use super::client::ApiClient;
use super::{print_json, OutputFormat};
use endpoint_types::{
    api::ApplianceList,
    duration::parse_duration,
    steady_state::{HealthDetail, ResourceHealth},
    ApiError,
};
use serde_json::Value;
use std::{fmt::Write, time::Duration};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The appliance id (or name it with --app and --customer).
    #[arg(conflicts_with_all = ["app", "customer"], required_unless_present_all = ["app", "customer"])]
    id: Option<String>,
    /// The appliance's app (with --customer).
    #[arg(long, requires = "customer")]
    app: Option<String>,
    /// The appliance's customer (with --app).
    #[arg(long, requires = "app")]
    customer: Option<String>,
    /// Poll again every --every until Ctrl-C.
    #[arg(long)]
    watch: bool,
    /// How often --watch polls.
    #[arg(long, default_value = "3s")]
    every: String,
    /// Stop --watch after this many polls (scripts and tests).
    #[arg(long, hide = true)]
    count: Option<u64>,
}

pub async fn run(args: StatusArgs, c: &ApiClient, out: OutputFormat) -> Result<(), ApiError> {
    let every = parse_duration(&args.every)
        .map_err(|e| ApiError::invalid(format!("--every: {e}")).hint("e.g. --every 5s"))?
        .max(Duration::from_millis(200));
    let id = match (args.id, args.app, args.customer) {
        (Some(id), _, _) => id,
        (None, Some(app), Some(customer)) => appliance_id(c, &app, &customer).await?,
        _ => {
            return Err(ApiError::invalid("name the appliance")
                .hint("postern appliance status ID, or --app A --customer C"))
        }
    };
    let polls = if args.watch {
        args.count.unwrap_or(u64::MAX)
    } else {
        1
    };
    for n in 0..polls {
        if n > 0 {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
        let report: Value = c.get(&format!("/v1/appliances/{id}/status")).await?;
        match out {
            OutputFormat::Json => print_json(&report),
            OutputFormat::Text => print!("{}", render(&report)),
        }
    }
    Ok(())
}

async fn appliance_id(c: &ApiClient, app: &str, customer: &str) -> Result<String, ApiError> {
    let list: ApplianceList = c.get("/v1/appliances").await?;
    list.appliances
        .into_iter()
        .find(|a| a.app == app && a.customer == customer && !a.revoked)
        .map(|a| a.appliance_id)
        .ok_or_else(|| {
            ApiError::new(
                endpoint_types::ErrorCode::NotFound,
                format!("no appliance for app {app} and customer {customer}"),
            )
            .hint("`postern appliance list` shows them")
        })
}

/// The text table: a row per resource.
pub fn render(report: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} / {} ({})",
        report["app"].as_str().unwrap_or("?"),
        report["customer"].as_str().unwrap_or("?"),
        report["appliance_id"].as_str().unwrap_or("?")
    );
    let resources = report["resources"].as_array().cloned().unwrap_or_default();
    if resources.is_empty() {
        let _ = writeln!(
            s,
            "no snapshot yet (the agent sends one every steady_state.interval)"
        );
        return s;
    }
    let _ = writeln!(
        s,
        "{:<24} {:<11} {:<9} {:>6}  SUMMARY",
        "RESOURCE", "KIND", "REACHABLE", "AGE"
    );
    for r in resources {
        let age = r["age_s"].as_i64().unwrap_or(0);
        let Ok(h) = serde_json::from_value::<ResourceHealth>(r) else {
            continue;
        };
        let kind = serde_json::to_value(h.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{:<24} {:<11} {:<9} {:>5}s  {}",
            h.resource_id,
            kind,
            if h.reachable { "yes" } else { "no" },
            age,
            summary(&h)
        );
    }
    s
}

fn summary(h: &ResourceHealth) -> String {
    let mut parts: Vec<String> = Vec::new();
    match &h.detail {
        Some(HealthDetail::Tcp(t)) => parts.push(format!("connect {} ms", t.connect_ms)),
        Some(HealthDetail::Ssh(t)) => {
            parts.push(format!("{} (connect {} ms)", t.banner, t.connect_ms));
            if let Some(vm) = &t.vm {
                parts.push(format!(
                    "up {}h, load {:.2} {:.2} {:.2}",
                    vm.uptime_s / 3600,
                    vm.load_1m,
                    vm.load_5m,
                    vm.load_15m
                ));
                for d in &vm.disks {
                    let pct = d.used_bytes.saturating_mul(100) / d.size_bytes.max(1);
                    parts.push(format!("{} {pct}% used", d.path));
                }
            }
        }
        Some(HealthDetail::Postgres(p)) => {
            parts.push(p.version.split(" on ").next().unwrap_or("").to_string());
            parts.push(format!(
                "connections {}/{}",
                p.connections, p.max_connections
            ));
            parts.push(format!(
                "size {} MiB",
                p.database_size_bytes / (1024 * 1024)
            ));
            if let Some(t) = p.longest_transaction_s {
                parts.push(format!("oldest transaction {t:.0}s"));
            }
            if let Some(l) = p.replication_lag_s {
                parts.push(format!("replication lag {l:.1}s"));
            }
        }
        Some(HealthDetail::Kubernetes(k)) => {
            let phases: Vec<String> = k
                .pods_by_phase
                .iter()
                .map(|(p, n)| format!("{p}={n}"))
                .collect();
            parts.push(format!("pods {}", phases.join(" ")));
            parts.push(format!("restarts {}", k.restarts));
            if !k.not_ready_pods.is_empty() {
                parts.push(format!("not ready: {}", k.not_ready_pods.join(" ")));
            }
            for w in &k.not_ready_workloads {
                parts.push(format!(
                    "{} {} {}/{} ready",
                    w.kind, w.name, w.ready, w.desired
                ));
            }
            if let Some(w) = k.warnings.first() {
                parts.push(format!(
                    "{} warning(s), latest {} on {}",
                    k.warnings.len(),
                    w.reason,
                    w.object
                ));
            }
        }
        None => {}
    }
    if let Some(e) = &h.error {
        parts.push(format!("error: {e}"));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_has_a_row_per_resource_with_its_age_and_summary() {
        let report = json!({"appliance_id": "ap_1", "app": "shop", "customer": "acme", "resources": [
            {"resource_id": "db", "kind": "postgres", "collected_at": "2026-01-01T00:00:00Z", "received_at": "2026-01-01T00:00:00Z",
             "age_s": 4, "reachable": true,
             "detail": {"type": "postgres", "version": "PostgreSQL 16.4 on x86_64", "connections": 3, "max_connections": 100,
                        "database_size_bytes": 8388608, "longest_transaction_s": 12.4}},
            {"resource_id": "cluster", "kind": "kubernetes", "collected_at": "2026-01-01T00:00:00Z", "received_at": "2026-01-01T00:00:00Z",
             "age_s": 1, "reachable": true,
             "detail": {"type": "kubernetes", "namespaces": ["shop"], "pods_by_phase": {"Running": 2}, "restarts": 0,
                        "not_ready_pods": ["shop/web-2"]}},
            {"resource_id": "cache", "kind": "tcp", "collected_at": "2026-01-01T00:00:00Z", "received_at": "2026-01-01T00:00:00Z",
             "age_s": 2, "reachable": false, "error": "connect 127.0.0.1:1: refused"},
        ]});
        let text = render(&report);
        assert!(text.contains("oldest transaction 12s"), "{text}");
        assert!(text.contains("connections 3/100"), "{text}");
        assert!(text.contains("not ready: shop/web-2"), "{text}");
        assert!(
            text.contains("error: connect 127.0.0.1:1: refused"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 5, "{text}");
    }

    #[test]
    fn no_snapshot_yet_says_so() {
        let text =
            render(&json!({"appliance_id": "ap_1", "app": "a", "customer": "c", "resources": []}));
        assert!(text.contains("no snapshot yet"), "{text}");
    }
}
