use super::*;
use serde_json::json;

fn pod(name: &str, phase: &str, ready: &str, restarts: u64) -> Value {
    json!({"metadata": {"name": name, "namespace": "shop"},
           "status": {"phase": phase, "conditions": [{"type": "Ready", "status": ready}],
                      "containerStatuses": [{"name": "app", "restartCount": restarts}]}})
}

#[test]
fn pods_are_counted_by_phase_with_restarts_and_not_ready_ones_named() {
    let list = json!({"items": [
        pod("web-1", "Running", "True", 0),
        pod("web-2", "Running", "False", 3),
        pod("job-1", "Succeeded", "False", 1),
        {"metadata": {"name": "odd"}},
    ]});
    let mut h = KubeHealth::default();
    add_pods(&mut h, &list);
    assert_eq!(h.pods_by_phase.get("Running"), Some(&2));
    assert_eq!(h.pods_by_phase.get("Succeeded"), Some(&1));
    assert_eq!(h.pods_by_phase.get("Unknown"), Some(&1));
    assert_eq!(h.restarts, 4);
    assert_eq!(
        h.not_ready_pods,
        vec!["shop/web-2".to_string(), "/odd".to_string()]
    );
}

#[test]
fn a_list_that_is_not_one_adds_nothing() {
    let mut h = KubeHealth::default();
    add_pods(&mut h, &json!({"items": "nope"}));
    add_workloads(&mut h, "Deployment", &json!([1, 2]));
    add_warnings(&mut h, &json!(null), Timestamp::UNIX_EPOCH);
    assert_eq!(h, KubeHealth::default());
}

#[test]
fn not_ready_pods_are_listed_up_to_the_cap_but_counted_exactly() {
    let items: Vec<Value> = (0..MAX_LISTED + 5)
        .map(|i| pod(&format!("p{i}"), "Pending", "False", 0))
        .collect();
    let mut h = KubeHealth::default();
    add_pods(&mut h, &json!({ "items": items }));
    assert_eq!(h.not_ready_pods.len(), MAX_LISTED);
    assert_eq!(
        h.pods_by_phase.get("Pending"),
        Some(&(MAX_LISTED as u32 + 5))
    );
}

#[test]
fn workloads_short_of_their_replicas_are_not_ready() {
    let list = json!({"items": [
        {"metadata": {"name": "web", "namespace": "shop"}, "spec": {"replicas": 3}, "status": {"readyReplicas": 2}},
        {"metadata": {"name": "api", "namespace": "shop"}, "spec": {"replicas": 2}, "status": {"readyReplicas": 2}},
        {"metadata": {"name": "db", "namespace": "shop"}, "spec": {"replicas": 1}, "status": {}},
    ]});
    let mut h = KubeHealth::default();
    add_workloads(&mut h, "StatefulSet", &list);
    assert_eq!(
        h.not_ready_workloads,
        vec![
            NotReadyWorkload {
                kind: "StatefulSet".into(),
                name: "shop/web".into(),
                ready: 2,
                desired: 3
            },
            NotReadyWorkload {
                kind: "StatefulSet".into(),
                name: "shop/db".into(),
                ready: 0,
                desired: 1
            },
        ]
    );
}

#[test]
fn only_recent_warnings_are_kept_newest_first_and_bounded() {
    let ev = |reason: &str, ty: &str, at: &str| {
        json!({"type": ty, "reason": reason, "message": "x".repeat(1000), "count": 2, "lastTimestamp": at,
               "involvedObject": {"namespace": "shop", "kind": "Pod", "name": "web-2"}})
    };
    let list = json!({"items": [
        ev("Old", "Warning", "2026-01-01T00:00:00Z"),
        ev("BackOff", "Warning", "2026-01-02T00:00:00Z"),
        ev("Pulled", "Normal", "2026-01-02T00:00:00Z"),
        ev("Unhealthy", "Warning", "2026-01-03T00:00:00Z"),
    ]});
    let mut h = KubeHealth::default();
    add_warnings(&mut h, &list, "2026-01-01T12:00:00Z".parse().unwrap());
    let reasons: Vec<&str> = h.warnings.iter().map(|w| w.reason.as_str()).collect();
    assert_eq!(reasons, ["Unhealthy", "BackOff"]);
    assert_eq!(h.warnings[0].object, "shop/Pod/web-2");
    assert_eq!(h.warnings[0].message.chars().count(), MAX_TEXT);
}

#[test]
fn postgres_statistics_parse_and_bad_numbers_are_errors() {
    let row = PgStatsRow {
        version: Some("PostgreSQL 16.4".into()),
        connections: Some("7".into()),
        max_connections: Some("100".into()),
        database_size_bytes: Some("7651123".into()),
        longest_transaction_s: Some("12.5".into()),
        replication_lag_s: None,
    };
    let h = postgres_health(&row).unwrap();
    assert_eq!((h.connections, h.max_connections), (7, 100));
    assert_eq!(h.longest_transaction_s, Some(12.5));
    assert_eq!(h.replication_lag_s, None);
    let bad = PgStatsRow {
        max_connections: Some("many".into()),
        ..row.clone()
    };
    assert_eq!(
        postgres_health(&bad).unwrap_err(),
        "max_connections is not a number"
    );
    let missing = PgStatsRow {
        connections: None,
        ..row
    };
    assert_eq!(
        postgres_health(&missing).unwrap_err(),
        "connections missing"
    );
}

#[test]
fn an_ssh_banner_is_its_identification_line() {
    assert_eq!(
        ssh_banner(b"SSH-2.0-OpenSSH_9.6\r\n").as_deref(),
        Some("SSH-2.0-OpenSSH_9.6")
    );
    assert_eq!(ssh_banner(b"HTTP/1.1 400 Bad Request\r\n"), None);
}

#[test]
fn a_snapshot_round_trips_as_json() {
    let s = ApplianceSnapshot {
        collected_at: Timestamp::UNIX_EPOCH,
        resources: vec![ResourceHealth {
            resource_id: "db".into(),
            kind: ResourceKind::Tcp,
            collected_at: Timestamp::UNIX_EPOCH,
            reachable: true,
            error: None,
            detail: Some(HealthDetail::Tcp(TcpHealth { connect_ms: 3 })),
        }],
    };
    let text = serde_json::to_string(&s).unwrap();
    assert!(
        text.contains(r#""detail":{"type":"tcp","connect_ms":3}"#),
        "{text}"
    );
    assert_eq!(serde_json::from_str::<ApplianceSnapshot>(&text).unwrap(), s);
}
