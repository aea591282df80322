use super::*;
use crate::{
    audit::{AuditLog, Subject},
    ports::{fakes::RecordingAgents, AgentView},
    store::OutboxState,
};
use endpoint_types::customer_trail::GatewayEvent;
use serde_json::json;

async fn log() -> (Store, AuditLog) {
    let store = Store::open_memory().await.unwrap();
    let log = AuditLog::open(store.clone()).await.unwrap();
    (store, log)
}

fn op(appliance: &str, op: &str) -> Subject {
    Subject {
        appliance_id: Some(appliance.into()),
        op_id: Some(op.into()),
        ..Default::default()
    }
}

fn numbers(records: &[GatewayRecord]) -> Vec<u64> {
    records.iter().map(|r| r.number).collect()
}

/// Every record concerning an appliance (and only those) is numbered per appliance from 1,
/// without gaps, with its vendor record's seq and hash; whichever way the vendor trail wrote it.
#[tokio::test]
async fn records_about_an_appliance_are_numbered_per_appliance() {
    let (store, log) = log().await;
    log.record(
        "op.requested",
        "alice@vendor",
        op("ap_1", "op_1"),
        json!({"command": "get pods"}),
    )
    .await;
    log.record(
        "grant.requested",
        "alice@vendor",
        Subject::appliance("ap_2"),
        json!({}),
    )
    .await;
    // Not events of the customer trail: a statement, a refusal, a record about no appliance.
    log.record(
        "sql.statement",
        "alice@vendor",
        Subject::session("ap_1", "ep_1", "s"),
        json!({}),
    )
    .await;
    log.record("denied", "mallory", Subject::appliance("ap_1"), json!({}))
        .await;
    log.record("op.denied", "bob@customer", Subject::default(), json!({}))
        .await;
    log.record(
        "op.denied",
        "bob@customer",
        op("ap_1", "op_1"),
        json!({"message": "no"}),
    )
    .await;
    // The batched path (held records, busy sessions) numbers the same way.
    log.enqueue(
        "op.expired",
        Arc::from("system:gateway"),
        Arc::new(op("ap_1", "op_2")),
        serde_json::value::to_raw_value(&json!({"reason": "grant ended"})).unwrap(),
    )
    .await;
    log.flush().await.unwrap();

    let one = store.outbox_after("ap_1", 0, 100).await.unwrap();
    assert_eq!(numbers(&one), vec![1, 2, 3]);
    let events: Vec<_> = one.iter().map(|r| r.event).collect();
    assert_eq!(
        events,
        vec![
            GatewayEvent::OpRequested,
            GatewayEvent::OpDenied,
            GatewayEvent::OpExpired
        ]
    );
    assert_eq!(one[1].actor, "bob@customer");
    assert_eq!(one[1].detail["message"], "no");
    assert_eq!(one[2].op_id.as_deref(), Some("op_2"));
    let vendor = store.list_audit(0).await.unwrap();
    for r in &one {
        let v = vendor.iter().find(|v| v.seq == r.gateway_seq).unwrap();
        assert_eq!(
            (v.kind.as_str(), &v.hash),
            (r.event.as_str(), &r.gateway_hash)
        );
    }
    let two = store.outbox_after("ap_2", 0, 100).await.unwrap();
    assert_eq!(numbers(&two), vec![1]);
    assert_eq!(
        store.outbox_state("ap_1").await.unwrap(),
        OutboxState {
            last_number: 3,
            recorded_number: 0
        }
    );
}

/// What the agent reports it holds is pruned; what follows is sent again from there, also
/// when it reports a lower number than before.
#[tokio::test]
async fn records_after_a_number_are_sent_again_and_reported_ones_pruned() {
    let (store, log) = log().await;
    for i in 0..5 {
        log.record(
            "op.requested",
            "a",
            op("ap_1", &format!("op_{i}")),
            json!({}),
        )
        .await;
    }
    assert_eq!(
        numbers(&store.outbox_after("ap_1", 2, 100).await.unwrap()),
        vec![3, 4, 5]
    );
    assert_eq!(
        numbers(&store.outbox_after("ap_1", 0, 2).await.unwrap()),
        vec![1, 2]
    );
    store.outbox_recorded("ap_1", 3).await.unwrap();
    assert_eq!(
        numbers(&store.outbox_after("ap_1", 0, 100).await.unwrap()),
        vec![4, 5]
    );
    assert_eq!(store.outbox_state("ap_1").await.unwrap().undelivered(), 2);
    store.outbox_recorded("ap_1", 1).await.unwrap();
    assert_eq!(store.outbox_state("ap_1").await.unwrap().undelivered(), 4);
    assert_eq!(
        numbers(&store.outbox_after("ap_1", 1, 100).await.unwrap()),
        vec![4, 5]
    );
    // Numbering goes on after pruning.
    log.record("op.denied", "b", op("ap_1", "op_9"), json!({}))
        .await;
    assert_eq!(
        numbers(&store.outbox_after("ap_1", 4, 100).await.unwrap()),
        vec![5, 6]
    );
    // An agent ahead of the store (the store restored from an older copy): numbering goes on
    // after the agent's number, so nothing new is skipped as a duplicate.
    store.outbox_recorded("ap_1", 10).await.unwrap();
    log.record("op.denied", "b", op("ap_1", "op_10"), json!({}))
        .await;
    assert_eq!(
        numbers(&store.outbox_after("ap_1", 10, 100).await.unwrap()),
        vec![11]
    );
    store.outbox_recorded("ap_3", 4).await.unwrap();
    log.record(
        "grant.requested",
        "a",
        Subject::appliance("ap_3"),
        json!({}),
    )
    .await;
    assert_eq!(
        numbers(&store.outbox_after("ap_3", 0, 100).await.unwrap()),
        vec![5]
    );
}

/// At the bound new requests are refused with a structured error; once the agent has
/// recorded some, they are accepted again.
#[tokio::test]
async fn a_full_outbox_refuses_new_requests_with_a_clear_error() {
    let (store, log) = log().await;
    for i in 0..3 {
        log.record(
            "grant.requested",
            "a",
            Subject::appliance("ap_1"),
            json!({"i": i}),
        )
        .await;
        assert!(room(&store, "ap_1", 3).await.is_ok() == (i < 2), "{i}");
    }
    let e = room(&store, "ap_1", 3).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuditUnavailable);
    assert_eq!(e.details["undelivered"], 3);
    assert_eq!(e.details["bound"], 3);
    assert!(!e.hint.is_empty());
    // Other appliances are not affected; a decision on a request already made still goes in.
    assert!(room(&store, "ap_2", 3).await.is_ok());
    log.record("grant.denied", "b", Subject::appliance("ap_1"), json!({}))
        .await;
    assert_eq!(store.outbox_state("ap_1").await.unwrap().last_number, 4);
    store.outbox_recorded("ap_1", 2).await.unwrap();
    assert!(room(&store, "ap_1", 3).await.is_ok());
    // The gateway's own bound, through the vendor sink the services hold.
    use crate::ports::AuditSink;
    assert!(log.room_for_request("ap_1").await.is_ok());
    assert_eq!(OUTBOX_BOUND, 10_000);
}

#[test]
fn the_cursor_sends_one_batch_at_a_time_and_again_after_a_short_report() {
    let mut c = OutboxCursor::new(4);
    assert_eq!(c.next_after(), Some(4));
    c.sent(10, true);
    assert_eq!(c.next_after(), None, "one batch in flight");
    assert_eq!(c.reported(10), Reported::Caught);
    assert_eq!(
        c.next_after(),
        Some(10),
        "the batch was cut short: more may follow"
    );
    c.sent(20, false);
    assert_eq!(c.reported(15), Reported::Behind);
    assert_eq!(c.next_after(), Some(15), "sent again after what it holds");
    assert_eq!(c.recorded(), 15);
    // A report with nothing in flight (the hello's number again) is no reason to wait.
    assert_eq!(c.reported(15), Reported::Caught);
}

#[test]
fn the_cursor_reads_the_outbox_again_only_when_it_may_hold_something_new() {
    let mut c = OutboxCursor::new(0);
    assert_eq!(c.next_after(), Some(0), "at the start it may");
    c.read_all();
    assert_eq!(c.next_after(), None, "nothing was there");
    c.rung();
    assert_eq!(c.next_after(), Some(0));
    c.sent(3, false);
    assert_eq!(c.reported(3), Reported::Caught);
    assert_eq!(c.next_after(), None, "all of it was sent and nothing rang");
    // Rung while a batch is in flight: read once it is reported.
    c.rung();
    c.sent(5, false);
    c.rung();
    assert_eq!(c.next_after(), None);
    c.reported(5);
    assert_eq!(c.next_after(), Some(5));
}

#[test]
fn a_report_within_what_was_sent_skips_the_restored_store_checks() {
    let mut c = OutboxCursor::new(7);
    assert!(
        !c.position(7).within_sent,
        "the hello's number was never sent here"
    );
    c.sent(9, false);
    c.reported(9);
    assert!(c.position(9).within_sent);
    assert!(c.position(2).within_sent, "a lower number too");
    assert!(!c.position(10).within_sent, "ahead of anything sent");
}

#[test]
fn a_batch_keeps_at_least_one_record_and_stays_under_its_bytes() {
    let big = |number| GatewayRecord {
        number,
        event: GatewayEvent::OpRequested,
        time: jiff::Timestamp::UNIX_EPOCH,
        actor: "a".into(),
        endpoint_id: None,
        op_id: None,
        detail: json!({"command": "x".repeat(100 * 1024)}),
        gateway_seq: 1,
        gateway_hash: String::new(),
    };
    assert_eq!(numbers(&fit_batch((1..=5).map(big).collect())), vec![1, 2]);
    let huge = GatewayRecord {
        detail: json!({"command": "x".repeat(BATCH_BYTES)}),
        ..big(1)
    };
    assert_eq!(fit_batch(vec![huge]).len(), 1);
}

fn sent_numbers(agents: &RecordingAgents) -> Vec<Vec<u64>> {
    agents
        .sent_to("ap_1")
        .into_iter()
        .filter_map(|f| match f {
            ToAgent::TrailRecords { records, .. } => Some(numbers(&records)),
            _ => None,
        })
        .collect()
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The sender starts after the hello's number, sends the next batch only once the last one is
/// reported, sends again after a short report, and is rung by new records.
#[tokio::test]
async fn the_sender_resumes_after_the_agents_number_and_waits_for_each_report() {
    let (store, log) = log().await;
    for i in 0..3 {
        log.record(
            "op.requested",
            "a",
            op("ap_1", &format!("op_{i}")),
            json!({}),
        )
        .await;
    }
    let agents = Arc::new(RecordingAgents::default());
    agents.connect("ap_1", AgentView::default());
    let (reports, watched) = watch::channel(1u64);
    let stop = CancellationToken::new();
    let rounds = Arc::new(AgentRounds::default());
    let writer = tokio::spawn(rounds.clone().run(store.clone(), stop.clone()));
    let task = tokio::spawn(deliver(
        store.clone(),
        agents.clone(),
        rounds,
        "ap_1".into(),
        watched,
        stop.clone(),
    ));
    until("the first batch", || {
        sent_numbers(&agents) == vec![vec![2, 3]]
    })
    .await;
    // The hello's number was taken as recorded: 1 is pruned (with the next round).
    let mut held = Vec::new();
    for _ in 0..500 {
        held = numbers(&store.outbox_after("ap_1", 0, 9).await.unwrap());
        if held == vec![2, 3] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(held, vec![2, 3]);
    // A new record while a batch is in flight waits for the report.
    log.record("op.denied", "b", op("ap_1", "op_1"), json!({}))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(sent_numbers(&agents).len(), 1);
    // The agent found a gap after 2: 3 and 4 come again.
    reports.send_replace(2);
    until("the resend", || sent_numbers(&agents).len() == 2).await;
    assert_eq!(sent_numbers(&agents)[1], vec![3, 4]);
    reports.send_replace(4);
    let mut pruned = false;
    for _ in 0..500 {
        if store.outbox_state("ap_1").await.unwrap().undelivered() == 0 {
            pruned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(pruned, "the reported records are pruned");
    // Rung by a new record: sent without waiting for the timer.
    log.record("op.approved", "b", op("ap_1", "op_2"), json!({}))
        .await;
    until("the rung batch", || sent_numbers(&agents).len() == 3).await;
    assert_eq!(sent_numbers(&agents)[2], vec![5]);
    stop.cancel();
    task.await.unwrap();
    writer.await.unwrap();
}

/// An agent whose trail went back (an older copy) asks for numbers already pruned: it is told
/// they are gone, with what is still held, instead of being asked to wait for them forever.
#[tokio::test]
async fn numbers_already_pruned_are_sent_as_lost() {
    let (store, log) = log().await;
    for i in 0..5 {
        log.record(
            "op.requested",
            "a",
            op("ap_1", &format!("op_{i}")),
            json!({}),
        )
        .await;
    }
    store.outbox_recorded("ap_1", 3).await.unwrap();
    let batch = |b: Batch| (numbers(&b.records), b.lost_through, b.more);
    let next = next_batch(&store, "ap_1", 1).await.unwrap().unwrap();
    assert_eq!(batch(next), (vec![4, 5], Some(3), false));
    let next = next_batch(&store, "ap_1", 3).await.unwrap().unwrap();
    assert_eq!(batch(next), (vec![4, 5], None, false));
    store.outbox_recorded("ap_1", 5).await.unwrap();
    assert!(next_batch(&store, "ap_1", 5).await.unwrap().is_none());
    let next = next_batch(&store, "ap_1", 0).await.unwrap().unwrap();
    let (records, lost) = (next.records, next.lost_through);
    assert_eq!((records.len(), lost), (0, Some(5)));
}
