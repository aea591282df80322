//! One round of agents' trail positions (`Store::write_agent_round`) on both backends: a
//! fleet-sized round is written in a few statements and prunes each appliance's outbox exactly
//! up to its own number; an appliance without a head row takes the careful path.

use gateway::{
    audit::{AuditLog, Subject},
    store::{ApplianceRow, Store, TrailPosition},
};
use jiff::Timestamp;
use postern::pg_cluster;
use serde_json::json;
use std::time::Duration;

/// More than one statement's worth of positions.
const FLEET: usize = 260;

fn appliance(id: &str) -> ApplianceRow {
    ApplianceRow {
        id: id.into(),
        app: format!("app-{id}"),
        customer: "acme".into(),
        created_at: Timestamp::from_second(1_700_000_000).expect("ts"),
        created_by: "admin".into(),
        cert_fingerprint: None,
        enrolled_at: None,
        revoked_at: None,
        last_seen: None,
        agent_version: None,
        resources: "[]".into(),
    }
}

async fn a_fleet_round_prunes_each_outbox_up_to_its_own_number(store: Store) {
    let ids: Vec<String> = (0..FLEET).map(|i| format!("ap_{i:03}")).collect();
    for id in &ids {
        store
            .insert_appliance(&appliance(id))
            .await
            .expect("appliance");
    }
    store
        .insert_appliance(&appliance("ap_new"))
        .await
        .expect("appliance");
    let log = AuditLog::open(store.clone()).await.expect("audit");
    // Three records each, so every appliance has a head row and numbers 1..=3.
    for _ in 0..3 {
        for id in &ids {
            log.record("grant.revoked", "alice", Subject::appliance(id), json!({}))
                .await;
        }
    }
    // Agent i holds its trail up to 1 + i % 3 (so 1, 2 or 3 records).
    let mut trail: Vec<(&str, TrailPosition)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let position = TrailPosition {
                number: 1 + (i % 3) as u64,
                within_sent: true,
            };
            (id.as_str(), position)
        })
        .collect();
    // Claimed as sent, but the store has no head row for it: made at its number.
    trail.push((
        "ap_new",
        TrailPosition {
            number: 2,
            within_sent: true,
        },
    ));
    let ahead = store
        .write_agent_round(&[], None, &trail)
        .await
        .expect("round");
    assert!(ahead.is_empty(), "nobody was ahead: {ahead:?}");
    for (i, id) in ids.iter().enumerate() {
        let held = 1 + (i % 3) as u64;
        let state = store.outbox_state(id).await.expect("state");
        assert_eq!(
            (state.last_number, state.recorded_number),
            (3, held),
            "{id}"
        );
        let left: Vec<u64> = store
            .outbox_after(id, 0, 9)
            .await
            .expect("outbox")
            .iter()
            .map(|r| r.number)
            .collect();
        assert_eq!(left, ((held + 1)..=3).collect::<Vec<_>>(), "{id}");
    }
    let new = store.outbox_state("ap_new").await.expect("state");
    assert_eq!((new.last_number, new.recorded_number), (2, 2));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_fleet_round_prunes_each_outbox_up_to_its_own_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite:{}", dir.path().join("postern.db").display());
    let store = Store::open(&url).await.expect("open");
    a_fleet_round_prunes_each_outbox_up_to_its_own_number(store).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_fleet_round_prunes_each_outbox_up_to_its_own_number() {
    let cluster = pg_cluster::shared();
    let url = cluster.create_database("agent_round_fleet");
    let store = Store::open(&url).await.expect("open");
    a_fleet_round_prunes_each_outbox_up_to_its_own_number(store).await;
    drop(cluster);
}

/// Appliances one burst of records concerns: more than one head statement's worth.
const BURST_APPLIANCES: usize = 300;

/// Records written at once are appended in group-commit batches that hold records of many
/// appliances, several of the same one and some whose head row does not exist yet: each
/// appliance's outbox still numbers them 1, 2, 3, … in the order of the vendor trail.
async fn a_burst_of_records_numbers_each_outbox_in_trail_order(store: Store) {
    let ids: Vec<String> = (0..BURST_APPLIANCES)
        .map(|i| format!("ap_{i:03}"))
        .collect();
    for id in &ids {
        store
            .insert_appliance(&appliance(id))
            .await
            .expect("appliance");
    }
    let log = AuditLog::open(store.clone()).await.expect("audit");
    // Every third appliance already has a head row (one record).
    for id in ids.iter().step_by(3) {
        log.record("grant.revoked", "alice", Subject::appliance(id), json!({}))
            .await;
    }
    let burst = (0..4).flat_map(|_| ids.iter()).map(|id| {
        let log = log.clone();
        async move {
            log.record("grant.revoked", "alice", Subject::appliance(id), json!({}))
                .await
        }
    });
    futures_util::future::join_all(burst).await;
    for (i, id) in ids.iter().enumerate() {
        let expected = if i % 3 == 0 { 5 } else { 4 };
        let records = store.outbox_after(id, 0, 100).await.expect("outbox");
        let numbers: Vec<u64> = records.iter().map(|r| r.number).collect();
        assert_eq!(numbers, (1..=expected).collect::<Vec<u64>>(), "{id}");
        assert!(
            records
                .windows(2)
                .all(|w| w.first().map(|r| r.gateway_seq) < w.get(1).map(|r| r.gateway_seq)),
            "{id}: outbox order differs from the vendor trail's"
        );
        let state = store.outbox_state(id).await.expect("state");
        assert_eq!((state.last_number, state.recorded_number), (expected, 0));
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_burst_of_records_numbers_each_outbox_in_trail_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite:{}", dir.path().join("postern.db").display());
    let store = Store::open(&url).await.expect("open");
    a_burst_of_records_numbers_each_outbox_in_trail_order(store).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_burst_of_records_numbers_each_outbox_in_trail_order() {
    let cluster = pg_cluster::shared();
    let url = cluster.create_database("trail_burst");
    let store = Store::open(&url).await.expect("open");
    a_burst_of_records_numbers_each_outbox_in_trail_order(store).await;
    drop(cluster);
}

/// Records from each of two replicas (two stores on one database, each with its own audit
/// writer and its own idea of the chain's head) written at once.
const RACED_RECORDS: usize = 200;

/// Two replicas append at once: each batch chains onto the head its replica last wrote, which
/// the other replica's commits keep making stale. Every record still lands once, in one
/// linear chain that both verify, and the shared appliance's outbox numbers 1..n without a gap.
async fn two_replicas_appending_at_once_keep_one_chain(url: &str) {
    let (a, b) = (
        Store::open(url).await.expect("open a"),
        Store::open(url).await.expect("open b"),
    );
    a.insert_appliance(&appliance("ap_shared"))
        .await
        .expect("appliance");
    let (log_a, log_b) = (
        AuditLog::open(a.clone()).await.expect("audit a"),
        AuditLog::open(b.clone()).await.expect("audit b"),
    );
    let writes = [&log_a, &log_b].into_iter().flat_map(|log| {
        (0..RACED_RECORDS).map(move |i| {
            let log = log.clone();
            async move {
                log.record(
                    "grant.revoked",
                    "alice",
                    Subject::appliance("ap_shared"),
                    json!({ "i": i }),
                )
                .await
            }
        })
    });
    // A refused batch is held and retried by its writer, whose callers would wait for ever.
    tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(writes),
    )
    .await
    .expect("the replicas' records were not all written within 60 s");
    let n = 2 * RACED_RECORDS as u64;
    for log in [&log_a, &log_b] {
        assert!(log.session_watch().is_ok(), "a replica's trail went down");
        assert_eq!(log.verify().await.expect("verify"), Ok(n));
    }
    let numbers: Vec<u64> = a
        .outbox_after("ap_shared", 0, 1000)
        .await
        .expect("outbox")
        .iter()
        .map(|r| r.number)
        .collect();
    assert_eq!(numbers, (1..=n).collect::<Vec<u64>>());
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_replicas_appending_at_once_keep_one_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite:{}", dir.path().join("postern.db").display());
    two_replicas_appending_at_once_keep_one_chain(&url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_replicas_appending_at_once_keep_one_chain() {
    let cluster = pg_cluster::shared();
    let url = cluster.create_database("trail_two_replicas");
    two_replicas_appending_at_once_keep_one_chain(&url).await;
    drop(cluster);
}
