use super::*;

/// A record of `kind` by `x` about nothing, now.
async fn append_bare(log: &AuditLog, kind: &str) -> AuditRecord {
    log.append(
        kind,
        "x",
        Subject::default(),
        serde_json::Value::Null,
        Timestamp::now(),
    )
    .await
    .unwrap()
}

/// Queues statement `i` of `subject`'s session.
async fn enqueue_statement(log: &AuditLog, subject: &Arc<Subject>, i: i32) {
    log.enqueue(
        "sql.statement",
        Arc::from("op"),
        subject.clone(),
        serde_json::value::to_raw_value(&serde_json::json!({ "i": i })).unwrap(),
    )
    .await;
}

#[tokio::test]
async fn chain_verifies_and_tampering_is_found() {
    let store = Store::open_memory().await.unwrap();
    let log = AuditLog::open(store.clone()).await.unwrap();
    for i in 0..4 {
        log.append(
            "endpoint.created",
            "alice",
            Subject::appliance("ap_1"),
            serde_json::json!({"i": i}),
            Timestamp::now(),
        )
        .await
        .unwrap();
    }
    assert_eq!(log.verify().await.unwrap(), Ok(4));
    store.tamper_audit_detail(2, r#"{"i":42}"#).await.unwrap();
    assert_eq!(log.verify().await.unwrap(), Err(2));
}

#[tokio::test]
async fn queued_records_continue_the_chain_in_each_callers_order() {
    let store = Store::open_memory().await.unwrap();
    let log = Arc::new(AuditLog::open(store.clone()).await.unwrap());
    append_bare(&log, "a").await;
    let session = |id: &str| Arc::new(Subject::session("ap_1", "ep_1", id));
    let callers = ["s1", "s2", "s3"].map(|id| {
        let (log, subject) = (log.clone(), session(id));
        tokio::spawn(async move {
            for i in 0..300 {
                enqueue_statement(&log, &subject, i).await;
                if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            log.flush().await.unwrap();
            // Written after this caller's statements, as `session.closed` is.
            log.append(
                "session.closed",
                "op",
                (*subject).clone(),
                serde_json::Value::Null,
                Timestamp::now(),
            )
            .await
            .unwrap();
        })
    });
    for c in callers {
        c.await.unwrap();
    }
    let records = store.list_audit(0).await.unwrap();
    assert_eq!(records.len(), 1 + 3 * 301);
    for id in ["s1", "s2", "s3"] {
        let mine: Vec<_> = records
            .iter()
            .filter(|r| r.session_id.as_deref() == Some(id))
            .collect();
        let order: Vec<_> = mine
            .iter()
            .filter_map(|r| r.detail.get("i").and_then(|v| v.as_i64()))
            .collect();
        assert_eq!(
            order,
            (0..300).collect::<Vec<_>>(),
            "{id}'s statements in order"
        );
        assert_eq!(
            mine.last().map(|r| r.kind.as_str()),
            Some("session.closed"),
            "{id} closes last"
        );
    }
    assert_eq!(log.verify().await.unwrap(), Ok(records.len() as u64));
}

#[tokio::test]
async fn flush_waits_for_the_store() {
    let store = Store::open_memory().await.unwrap();
    let log = AuditLog::open(store.clone()).await.unwrap();
    let subject = Arc::new(Subject::appliance("ap_1"));
    for i in 0..5 {
        enqueue_statement(&log, &subject, i).await;
    }
    log.flush().await.unwrap();
    let records = store.list_audit(0).await.unwrap();
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(records[2].detail, serde_json::json!({ "i": 2 }));
}

/// Waits (bounded) until the writer has found the store back.
async fn until_up(log: &AuditLog) -> CancellationToken {
    for _ in 0..100 {
        if let Ok(t) = log.session_watch() {
            return t;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the trail did not come back");
}

fn raw(v: serde_json::Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(&v).unwrap()
}

#[tokio::test]
async fn a_failed_batch_cuts_sessions_refuses_new_ones_and_is_written_when_the_store_returns() {
    let store = Store::open_memory().await.unwrap();
    let log = AuditLog::open(store.clone()).await.unwrap();
    let subject = Arc::new(Subject::session("ap_1", "ep_1", "ses_1"));
    log.record_before(
        "session.opened",
        "op",
        (*subject).clone(),
        serde_json::Value::Null,
    )
    .await
    .unwrap();
    let live = log.session_watch().unwrap();

    store.refuse_audit_writes(true).await.unwrap();
    for i in 0..3 {
        log.enqueue(
            "sql.statement",
            Arc::from("op"),
            subject.clone(),
            raw(serde_json::json!({ "i": i })),
        )
        .await;
    }
    // The failure reaches the waiting caller, and every live session's token.
    let err = log.flush().await.unwrap_err();
    assert!(err.0.contains("disk is full"), "{err}");
    assert!(live.is_cancelled(), "live sessions are cut");
    assert!(log.session_watch().is_err(), "new sessions are refused");
    assert!(log
        .record_before(
            "session.opened",
            "op",
            Subject::session("ap_1", "ep_1", "ses_2"),
            serde_json::Value::Null
        )
        .await
        .is_err());
    // The cut session's end is held behind its statements.
    log.record(
        "session.closed",
        "op",
        (*subject).clone(),
        serde_json::json!({ "reason": "error" }),
    )
    .await;
    assert_eq!(
        store.list_audit(0).await.unwrap().len(),
        1,
        "nothing written while down"
    );

    store.refuse_audit_writes(false).await.unwrap();
    let again = until_up(&log).await;
    assert!(!again.is_cancelled(), "a fresh token for new sessions");
    log.flush().await.unwrap();
    let records = store.list_audit(0).await.unwrap();
    let kinds: Vec<_> = records.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "session.opened",
            "sql.statement",
            "sql.statement",
            "sql.statement",
            "audit.store_recovered",
            "session.closed"
        ]
    );
    assert_eq!(records[4].detail["held_records"], 3);
    assert_eq!(records[5].detail["reason"], "error");
    // Seqs given at write time: gapless, and the chain verifies.
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    assert_eq!(log.verify().await.unwrap(), Ok(6));
}

#[tokio::test]
async fn a_start_the_store_refuses_does_not_go_ahead_and_the_refusal_is_recorded() {
    let store = Store::open_memory().await.unwrap();
    let log = AuditLog::open(store.clone()).await.unwrap();
    store.refuse_audit_writes(true).await.unwrap();
    let subject = Subject::session("ap_1", "ep_1", "ses_1");
    let err = log
        .record_before("session.opened", "op", subject, serde_json::Value::Null)
        .await
        .unwrap_err();
    assert!(err.to_api_error().message.contains("vendor audit trail"));
    assert!(log.session_watch().is_err());
    store.refuse_audit_writes(false).await.unwrap();
    until_up(&log).await;
    log.flush().await.unwrap();
    let records = store.list_audit(0).await.unwrap();
    let kinds: Vec<_> = records.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["audit.write_failed", "audit.store_recovered"]);
    assert_eq!(records[0].detail["kind"], "session.opened");
    assert_eq!(records[0].session_id.as_deref(), Some("ses_1"));
    assert_eq!(log.verify().await.unwrap(), Ok(2));
}

#[tokio::test]
async fn a_direct_record_the_store_refuses_is_held_and_written_later() {
    let store = Store::open_memory().await.unwrap();
    let log = AuditLog::open(store.clone()).await.unwrap();
    let live = log.session_watch().unwrap();
    store.refuse_audit_writes(true).await.unwrap();
    log.record(
        "grant.revoked",
        "alice",
        Subject::appliance("ap_1"),
        serde_json::json!({ "n": 1 }),
    )
    .await;
    assert!(live.is_cancelled());
    assert!(log.flush().await.is_err());
    store.refuse_audit_writes(false).await.unwrap();
    until_up(&log).await;
    log.flush().await.unwrap();
    let records = store.list_audit(0).await.unwrap();
    let kinds: Vec<_> = records.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["grant.revoked", "audit.store_recovered"]);
    assert_eq!(log.verify().await.unwrap(), Ok(2));
}

#[tokio::test]
async fn a_store_that_stops_answering_cuts_sessions_that_write_nothing() {
    let store = Store::open_memory().await.unwrap();
    let log = AuditLog::open(store.clone()).await.unwrap();
    let live = log.session_watch().unwrap();
    store.close().await;
    tokio::time::timeout(PROBE_EVERY * 5, live.cancelled())
        .await
        .expect("the writer's probe found the store gone");
    assert!(log.session_watch().is_err());
}

/// Two writers on one store (as two replicas on PostgreSQL): each batch chains onto the
/// head its writer last wrote, so the other's records in between make its guess stale.
/// The batch is chained again onto the store's head: nothing refused, one linear chain.
#[tokio::test]
async fn a_batch_after_another_writers_records_chains_onto_the_stores_head() {
    let store = Store::open_memory().await.unwrap();
    let (one, two) = (
        AuditLog::open(store.clone()).await.unwrap(),
        AuditLog::open(store.clone()).await.unwrap(),
    );
    for (log, kind) in [
        (&one, "a"),
        (&two, "b"),
        (&two, "c"),
        (&one, "d"),
        (&two, "e"),
    ] {
        log.record(kind, "x", Subject::default(), serde_json::Value::Null)
            .await;
        assert!(log.session_watch().is_ok(), "the trail went down at {kind}");
    }
    let kinds: Vec<_> = store
        .list_audit(0)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.seq, r.kind))
        .collect();
    let want: Vec<_> = ["a", "b", "c", "d", "e"]
        .iter()
        .enumerate()
        .map(|(i, k)| (i as i64 + 1, k.to_string()))
        .collect();
    assert_eq!(kinds, want);
    assert_eq!(one.verify().await.unwrap(), Ok(5));
    assert_eq!(two.verify().await.unwrap(), Ok(5));
}

#[tokio::test]
async fn chain_continues_across_reopen() {
    let store = Store::open_memory().await.unwrap();
    let log = AuditLog::open(store.clone()).await.unwrap();
    append_bare(&log, "a").await;
    let log2 = AuditLog::open(store).await.unwrap();
    let r = append_bare(&log2, "b").await;
    assert_eq!(r.seq, 2);
    assert_eq!(log2.verify().await.unwrap(), Ok(2));
}

/// A grant move whose record the store refuses does not happen either (one transaction), is
/// not held to happen later, and the trail is down meanwhile; once the store takes records
/// again the same move goes through with its record.
#[tokio::test]
async fn a_grant_move_whose_record_the_store_refuses_does_not_happen() {
    use crate::store::{GrantChange, GrantMove, GrantRow};
    use endpoint_types::{
        control::{GrantLevel, GrantState},
        lifecycle::grant::GrantEvent,
    };
    let store = Store::open_memory().await.unwrap();
    let at = Timestamp::now();
    let appliance = crate::grants::memory::appliance("ap_1", "shop", "acme");
    store.insert_appliance(&appliance).await.unwrap();
    store
        .insert_grant(&GrantRow {
            id: "gr_1".into(),
            appliance_id: "ap_1".into(),
            level: GrantLevel::Operate,
            state: GrantState::PendingApproval,
            requested_by: "bob".into(),
            requested_by_id: None,
            reason: "INC-1".into(),
            duration_ms: 3_600_000,
            requested_at: at,
            decided_by: None,
            decided_at: None,
            message: None,
            expires_at: None,
        })
        .await
        .unwrap();
    let log = AuditLog::open(store.clone()).await.unwrap();
    let approve = GrantMove::new(
        "gr_1",
        GrantState::PendingApproval,
        GrantEvent::Approve,
        GrantChange {
            by: "approver",
            at,
            message: None,
            expires_at: Some(at + std::time::Duration::from_secs(3600)),
        },
    );
    let detail = serde_json::json!({ "grant_id": "gr_1" });

    store.refuse_audit_writes(true).await.unwrap();
    let subject = || Subject::appliance("ap_1");
    let e = log
        .record_grant_move(
            "grant.approved",
            "approver",
            subject(),
            detail.clone(),
            approve.clone(),
        )
        .await
        .unwrap_err();
    assert!(e.0.contains("disk is full"), "{e}");
    let g = store.get_grant("gr_1").await.unwrap().unwrap();
    assert_eq!(
        g.state,
        GrantState::PendingApproval,
        "rolled back with its record"
    );
    // While the trail is down the move is refused at once, without reaching the store.
    assert!(log
        .record_grant_move(
            "grant.approved",
            "approver",
            subject(),
            detail.clone(),
            approve.clone()
        )
        .await
        .is_err());

    store.refuse_audit_writes(false).await.unwrap();
    until_up(&log).await;
    let g = store.get_grant("gr_1").await.unwrap().unwrap();
    assert_eq!(
        g.state,
        GrantState::PendingApproval,
        "not held to happen later"
    );
    assert!(log
        .record_grant_move("grant.approved", "approver", subject(), detail, approve)
        .await
        .unwrap());
    let g = store.get_grant("gr_1").await.unwrap().unwrap();
    assert_eq!(g.state, GrantState::Active);
    let kinds: Vec<_> = store
        .list_audit(0)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(kinds, ["audit.store_recovered", "grant.approved"]);
    assert_eq!(log.verify().await.unwrap(), Ok(2));
}
