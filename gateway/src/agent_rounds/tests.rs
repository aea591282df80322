use super::*;
use crate::{
    audit::{AuditLog, Subject},
    store::ApplianceRow,
};
use serde_json::json;

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + s).unwrap()
}

fn sent(number: u64) -> TrailPosition {
    TrailPosition {
        number,
        within_sent: true,
    }
}

#[test]
fn a_round_keeps_the_latest_of_each_report_per_appliance() {
    let mut r = Round::default();
    assert!(r.is_empty());
    r.seen("ap_1", at(5));
    r.seen("ap_1", at(3));
    r.seen("ap_2", at(4));
    assert_eq!(r.seen["ap_1"], at(5), "the later heartbeat stays");
    assert_eq!(r.seen_at(), Some(at(5)));
    r.recorded("ap_1", sent(7));
    // A lower number is taken as it is (a trail restored from an older copy).
    r.recorded("ap_1", sent(4));
    assert_eq!(r.trail["ap_1"], sent(4));
    assert_eq!((r.seen.len(), r.trail.len()), (2, 1));
    assert!(!r.is_empty());
}

#[test]
fn a_refused_round_goes_back_under_what_came_since() {
    let mut refused = Round::default();
    refused.seen("ap_1", at(1));
    refused.seen("ap_2", at(9));
    refused.recorded("ap_1", sent(3));
    refused.recorded("ap_2", sent(8));
    let mut since = Round::default();
    since.seen("ap_1", at(2));
    since.recorded("ap_1", sent(5));
    since.keep_under(refused);
    assert_eq!(since.seen["ap_1"], at(2));
    assert_eq!(since.seen["ap_2"], at(9), "kept: nothing newer came");
    assert_eq!(since.trail["ap_1"], sent(5), "the newer report wins");
    assert_eq!(since.trail["ap_2"], sent(8), "kept: nothing newer came");
}

fn appliance(id: &str) -> ApplianceRow {
    ApplianceRow {
        id: id.into(),
        app: format!("app-{id}"),
        customer: "acme".into(),
        created_at: at(0),
        created_by: "admin".into(),
        cert_fingerprint: None,
        enrolled_at: None,
        revoked_at: None,
        last_seen: None,
        agent_version: None,
        resources: "[]".into(),
    }
}

/// Three outbox records for `ap_1`, one for `ap_2`.
async fn store_with_records() -> (Store, AuditLog) {
    let store = Store::open_memory().await.unwrap();
    for id in ["ap_1", "ap_2", "ap_3"] {
        store.insert_appliance(&appliance(id)).await.unwrap();
    }
    let log = AuditLog::open(store.clone()).await.unwrap();
    for (id, n) in [("ap_1", 3), ("ap_2", 1)] {
        for _ in 0..n {
            log.record("grant.revoked", "alice", Subject::appliance(id), json!({}))
                .await;
        }
    }
    (store, log)
}

async fn last_seen(store: &Store, id: &str) -> Option<Timestamp> {
    store.get_appliance(id).await.unwrap().unwrap().last_seen
}

#[tokio::test]
async fn one_round_writes_every_presence_and_prunes_every_reported_trail() {
    let (store, _log) = store_with_records().await;
    let mut r = Round::default();
    r.seen("ap_1", at(10));
    r.seen("ap_3", at(11));
    r.recorded("ap_1", sent(2));
    r.recorded("ap_2", sent(1));
    write(&store, &r).await.unwrap();
    assert_eq!(last_seen(&store, "ap_1").await, Some(at(11)));
    assert_eq!(last_seen(&store, "ap_3").await, Some(at(11)));
    assert_eq!(last_seen(&store, "ap_2").await, None, "not heard from");
    let one = store.outbox_state("ap_1").await.unwrap();
    assert_eq!((one.last_number, one.recorded_number), (3, 2));
    assert_eq!(store.outbox_after("ap_1", 0, 9).await.unwrap().len(), 1);
    assert_eq!(store.outbox_state("ap_2").await.unwrap().undelivered(), 0);
    assert!(store.outbox_after("ap_2", 0, 9).await.unwrap().is_empty());
}

/// A number the gateway never sent (the hello's) goes through the checks for a restored store:
/// a trail ahead of the numbering moves it, a head row that is missing is made.
#[tokio::test]
async fn a_position_outside_what_was_sent_is_checked_against_the_numbering() {
    let (store, log) = store_with_records().await;
    let hello = |number| TrailPosition {
        number,
        within_sent: false,
    };
    // Claimed as sent, but there is no head row: taken the careful way all the same.
    let mut claimed = Round::default();
    claimed.recorded("ap_4", sent(2));
    store.insert_appliance(&appliance("ap_4")).await.unwrap();
    let ahead = store
        .write_agent_round(&[], None, &[("ap_1", hello(10)), ("ap_3", hello(4))])
        .await
        .unwrap();
    // ap_3 had no head row: one is made at its number, which is not "ahead".
    assert_eq!(ahead, [("ap_1".to_string(), 10)]);
    write(&store, &claimed).await.unwrap();
    for (id, n) in [("ap_1", 10), ("ap_3", 4), ("ap_4", 2)] {
        let s = store.outbox_state(id).await.unwrap();
        assert_eq!((s.last_number, s.recorded_number), (n, n), "{id}");
    }
    // The numbering goes on after the agent's trail.
    log.record(
        "grant.revoked",
        "alice",
        Subject::appliance("ap_1"),
        json!({}),
    )
    .await;
    let next = store.outbox_after("ap_1", 10, 9).await.unwrap();
    assert_eq!(next.iter().map(|r| r.number).collect::<Vec<_>>(), [11]);
}

#[tokio::test]
async fn the_writer_keeps_a_refused_round_and_writes_it_when_the_store_returns() {
    let (store, _log) = store_with_records().await;
    let rounds = Arc::new(AgentRounds::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(rounds.clone().run(store.clone(), stop.clone()));
    store.refuse_appliance_updates(true).await.unwrap();
    rounds.seen("ap_1", at(20));
    rounds.recorded("ap_1", sent(3));
    tokio::time::sleep(GATHER * 4).await;
    assert_eq!(last_seen(&store, "ap_1").await, None, "refused");
    assert_eq!(
        store.outbox_state("ap_1").await.unwrap().recorded_number,
        0,
        "the whole round is one transaction"
    );
    rounds.recorded("ap_1", sent(2));
    store.refuse_appliance_updates(false).await.unwrap();
    let mut written = false;
    for _ in 0..100 {
        tokio::time::sleep(GATHER).await;
        if last_seen(&store, "ap_1").await.is_some() {
            written = true;
            break;
        }
    }
    assert!(
        written,
        "the kept round was written after the store came back"
    );
    assert_eq!(last_seen(&store, "ap_1").await, Some(at(20)));
    assert_eq!(
        store.outbox_state("ap_1").await.unwrap().recorded_number,
        2,
        "the report that came meanwhile won"
    );
    // What is reported before a shutdown is written on the way out.
    rounds.seen("ap_2", at(30));
    stop.cancel();
    task.await.unwrap();
    assert_eq!(last_seen(&store, "ap_2").await, Some(at(30)));
}
