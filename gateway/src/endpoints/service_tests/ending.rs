//! The endpoint service ending endpoints (retire, revocation, expiry), listing them, restoring
//! them at start-up, and the records it makes.

use super::*;

#[tokio::test]
async fn retiring_an_active_endpoint_cuts_its_sessions_and_tells_the_agent() {
    let h = harness();
    let rec = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap();
    let ep = h.live.get(&rec.id).unwrap();
    ep.live_sessions
        .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
    let rec = h.service.retire(&bob(), &rec.id).await.unwrap();
    assert_eq!(
        (rec.state, rec.sessions_cut),
        (EndpointState::Retired, Some(2))
    );
    assert!(ep.cancel.is_cancelled(), "its sessions are cut");
    assert_eq!(ep.end_reason(), CloseReason::Retired);
    assert!(h.live.get(&rec.id).is_none());
    assert_eq!(
        closed(&h.agents.sent_to("ap_1")),
        [(rec.id.clone(), CloseReason::Retired)]
    );
    let retired = &h.audit.of_kind("endpoint.retired")[0];
    assert_eq!(
        (retired.actor.as_str(), &retired.detail["sessions_cut"]),
        ("bob", &serde_json::json!(2))
    );
    let row = h.store.endpoint(&rec.id).unwrap();
    assert_eq!(row.ended_at, Some(t0()));

    // Once more: refused with the endpoint's own code, audited, nothing sent again.
    let err = h.service.retire(&bob(), &rec.id).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::EndpointRetired);
    assert_eq!(h.audit.of_kind("denied")[0].detail["action"], "retire");
    assert_eq!(closed(&h.agents.sent_to("ap_1")).len(), 1);
}

#[tokio::test]
async fn retiring_a_pending_request_withdraws_it_for_good() {
    let h = harness();
    let id = pending(&h, 600).await;
    let rec = h.service.retire(&bob(), &id).await.unwrap();
    assert_eq!(
        (rec.state, rec.sessions_cut),
        (EndpointState::Retired, Some(0))
    );
    assert_eq!(
        h.audit.of_kind("endpoint.retired")[0].detail["while"],
        "pending approval"
    );
    assert!(h.agents.sent_to("ap_1").is_empty(), "nothing was open");
    let err = h
        .service
        .decide(&acme_approver(), &id, true, None)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    assert_eq!(h.store.endpoint(&id).unwrap().state, EndpointState::Retired);
}

#[tokio::test]
async fn ending_a_grant_ends_exactly_that_grants_endpoints() {
    let h = harness();
    let a = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap();
    let b = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap();
    *h.grants.operate.lock().unwrap() = Some(grant("gr_2", "ap_1", None));
    let c = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap();
    h.service
        .end_all_of_grant("gr_1", CloseReason::Revoked, &Caller::system())
        .await;
    let state = |id: &str| h.store.endpoint(id).unwrap().state;
    assert_eq!(
        [state(&a.id), state(&b.id), state(&c.id)],
        [
            EndpointState::Retired,
            EndpointState::Retired,
            EndpointState::Active
        ]
    );
    let mut ended = closed(&h.agents.sent_to("ap_1"));
    ended.sort_by(|x, y| x.0.cmp(&y.0));
    let mut expected = vec![
        (a.id.clone(), CloseReason::Revoked),
        (b.id.clone(), CloseReason::Revoked),
    ];
    expected.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(ended, expected);
    assert!(h.live.get(&c.id).is_some());
    assert_eq!(h.audit.of_kind("endpoint.retired").len(), 2);
}

#[tokio::test]
async fn revoking_an_appliance_ends_its_endpoints_only() {
    let h = harness();
    let ours = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap();
    *h.grants.operate.lock().unwrap() = Some(grant("gr_9", "ap_2", None));
    let theirs = h
        .service
        .create(&bob(), kubectl("globex", 600))
        .await
        .unwrap();
    h.service
        .end_all_of("ap_1", CloseReason::Revoked, &Caller::system())
        .await;
    assert_eq!(
        h.store.endpoint(&ours.id).unwrap().state,
        EndpointState::Retired
    );
    assert_eq!(
        h.store.endpoint(&theirs.id).unwrap().state,
        EndpointState::Active
    );
    assert!(closed(&h.agents.sent_to("ap_2")).is_empty());
}

#[tokio::test]
async fn past_its_expiry_an_endpoint_reads_expired_and_cannot_be_retired() {
    let h = harness();
    let rec = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(601));
    let rec = h.service.get(&bob(), &rec.id).await.unwrap();
    assert_eq!((rec.state, rec.address), (EndpointState::Expired, None));
    assert!(rec.access.is_none());
    let err = h.service.retire(&bob(), &rec.id).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::EndpointExpired);
}

#[tokio::test]
async fn the_expiry_timer_ends_the_endpoint_when_its_grant_runs_out() {
    let h = harness();
    // The grant ends 50 ms after the fake clock's now: the timer waits exactly that.
    let grant_end = t0() + SignedDuration::from_millis(50);
    *h.grants.operate.lock().unwrap() = Some(grant("gr_1", "ap_1", Some(grant_end)));
    let rec = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap();
    assert_eq!(rec.expires_at, grant_end);
    tokio::time::timeout(Duration::from_secs(10), async {
        while h.store.endpoint(&rec.id).unwrap().state == EndpointState::Active {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the timer ends it");
    assert_eq!(
        h.store.endpoint(&rec.id).unwrap().state,
        EndpointState::Expired
    );
    assert_eq!(
        closed(&h.agents.sent_to("ap_1")),
        [(rec.id.clone(), CloseReason::Expired)]
    );
    let expired = &h.audit.of_kind("endpoint.expired")[0];
    assert_eq!(expired.actor, "system:gateway");
    assert!(h.live.get(&rec.id).is_none());
}

#[tokio::test]
async fn list_shows_each_caller_the_customers_they_may_see() {
    let h = harness();
    let ours = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap();
    *h.grants.operate.lock().unwrap() = Some(grant("gr_9", "ap_2", None));
    h.clock.advance(Duration::from_secs(1));
    let theirs = h
        .service
        .create(&bob(), kubectl("globex", 600))
        .await
        .unwrap();
    let ids = |recs: Vec<endpoint_types::api::EndpointRecord>| {
        recs.into_iter().map(|r| r.id).collect::<Vec<_>>()
    };
    // Operators work for the vendor: every customer, oldest first.
    let all = ids(h.service.list(&bob()).await.unwrap());
    assert_eq!(all, [ours.id.clone(), theirs.id.clone()]);
    let other_operator = caller("erin", Role::Operator, None);
    assert_eq!(ids(h.service.list(&other_operator).await.unwrap()), all);
    // An approver sees their own customer's only.
    assert_eq!(
        ids(h.service.list(&acme_approver()).await.unwrap()),
        [ours.id.as_str()]
    );
    // Lists never carry credentials; the creator's `get` does, another operator's does not.
    assert!(h
        .service
        .list(&bob())
        .await
        .unwrap()
        .iter()
        .all(|r| r.access.is_none()));
    assert!(h
        .service
        .get(&bob(), &ours.id)
        .await
        .unwrap()
        .access
        .is_some());
    let seen_by_erin = h.service.get(&other_operator, &ours.id).await.unwrap();
    assert!(seen_by_erin.access.is_none());
    let err = h
        .service
        .get(&acme_approver(), &theirs.id)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
}

fn stored(
    id: &str,
    t: EndpointType,
    address: Option<String>,
    expires_at: Timestamp,
) -> EndpointRow {
    EndpointRow {
        phase: endpoint_types::phase::operate(),
        id: id.into(),
        endpoint_type: t,
        appliance_id: "ap_1".into(),
        resource_id: "web".into(),
        state: EndpointState::Active,
        created_by: "bob".into(),
        created_by_id: None,
        created_at: t0() - SignedDuration::from_secs(60),
        expires_at,
        ended_at: None,
        address,
        sessions_total: 0,
        grant_id: Some("gr_1".into()),
        credential: None,
    }
}

#[tokio::test]
async fn restore_reopens_live_endpoints_and_expires_the_overdue() {
    let h = harness();
    let later = t0() + SignedDuration::from_secs(600);
    // A free address is kept; a taken one is replaced.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().to_string();
    for row in [
        stored("ep_free", EndpointType::Tcp, Some(free.clone()), later),
        stored("ep_taken", EndpointType::Tcp, Some(taken.clone()), later),
        stored("ep_overdue", EndpointType::Tcp, Some(free.clone()), t0()),
    ] {
        h.store.insert_endpoint(&row).await.unwrap();
    }
    h.service.restore().await.unwrap();

    assert_eq!(
        h.store.endpoint("ep_free").unwrap().address.as_deref(),
        Some(free.as_str())
    );
    let moved = h.store.endpoint("ep_taken").unwrap().address.unwrap();
    assert_ne!(moved, taken);
    let mut served = h.front_ends.served.lock().unwrap().clone();
    served.sort();
    assert_eq!(served, ["ep_free", "ep_taken"]);
    assert!(h.live.get("ep_free").is_some() && h.live.get("ep_taken").is_some());

    let overdue = h.store.endpoint("ep_overdue").unwrap();
    assert_eq!(
        (overdue.state, overdue.ended_at),
        (EndpointState::Expired, Some(t0()))
    );
    assert!(h.live.get("ep_overdue").is_none());
    let expired = h.audit.of_kind("endpoint.expired");
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].detail["while"], "gateway down");

    // A reconnecting agent is told to open exactly the restored ones.
    let mut open: Vec<String> = h
        .service
        .grants_for("ap_1")
        .await
        .into_iter()
        .map(|g| g.endpoint_id)
        .collect();
    open.sort();
    assert_eq!(open, ["ep_free", "ep_taken"]);
}

#[test]
fn a_record_carries_its_owner_and_shows_the_address_only_while_active() {
    let now = Timestamp::from_second(1_000).unwrap();
    let later = Timestamp::from_second(2_000).unwrap();
    let row = |state, expires_at| EndpointRow {
        endpoint_type: EndpointType::Postgres,
        resource_id: "db-main".into(),
        state,
        created_at: Timestamp::UNIX_EPOCH,
        address: Some("127.0.0.1:5432".into()),
        sessions_total: 7,
        ..stored("ep_1", EndpointType::Postgres, None, expires_at)
    };
    let rec = record_of(
        row(EndpointState::Active, later),
        "shop".into(),
        "acme".into(),
        2,
        now,
    );
    assert_eq!(
        (rec.app.as_str(), rec.customer.as_str(), rec.state),
        ("shop", "acme", EndpointState::Active)
    );
    assert_eq!((rec.sessions, rec.sessions_total), (2, 7));
    assert_eq!(rec.origin_resource_id, "db-main");
    assert_eq!(rec.address.as_deref(), Some("127.0.0.1:5432"));
    assert!(rec.access.is_none(), "access is the creator's, added apart");

    // Past its expiry it is expired, even before the timer has recorded it so.
    let rec = record_of(
        row(EndpointState::Active, now),
        "shop".into(),
        "acme".into(),
        0,
        now,
    );
    assert_eq!((rec.state, rec.address), (EndpointState::Expired, None));
    let rec = record_of(
        row(EndpointState::Retired, later),
        "shop".into(),
        "acme".into(),
        0,
        now,
    );
    assert_eq!((rec.state, rec.address), (EndpointState::Retired, None));
}

#[test]
fn a_credential_that_opens_a_live_endpoint_is_refused_for_another() {
    let live = EndpointRegistry::default();
    let (kube, _) = test_credentials::csr(EndpointType::Kubectl);
    let (ssh, _) = test_credentials::ssh();
    let pg = test_credentials::postgres();
    for (t, cred) in [
        (EndpointType::Kubectl, &kube),
        (EndpointType::Ssh, &ssh),
        (EndpointType::Postgres, &pg),
    ] {
        assert!(credential_is_free(&live, t, Some(cred)).is_ok());
        let mut r = stored(&format!("ep_{t}"), t, None, Timestamp::MAX);
        r.credential = Some(cred.clone());
        let ep = Arc::new(LiveEndpoint::new(&r, CancellationToken::new()));
        live.insert(ep).unwrap();
    }
    for (t, cred) in [(EndpointType::Kubectl, &kube), (EndpointType::Ssh, &ssh)] {
        let err = credential_is_free(&live, t, Some(cred)).unwrap_err();
        assert_eq!(err.code, ErrorCode::Conflict, "{t}");
        assert!(err.hint.contains("own key"), "{}", err.hint);
    }
    // A postgres endpoint is found by its own new id: its verifier may repeat.
    assert!(credential_is_free(&live, EndpointType::Postgres, Some(&pg)).is_ok());
    // The same key for another type is another credential.
    let ClientCredential::Kubectl { csr_pem } = &kube else {
        panic!("a kubectl credential")
    };
    let as_tcp = ClientCredential::Tcp {
        csr_pem: csr_pem.clone(),
    };
    assert!(credential_is_free(&live, EndpointType::Tcp, Some(&as_tcp)).is_ok());
    // Once it ended, the key is free again.
    live.remove("ep_kubectl");
    assert!(credential_is_free(&live, EndpointType::Kubectl, Some(&kube)).is_ok());
    // Nothing to check without a credential (create refused that already).
    assert!(credential_is_free(&live, EndpointType::Tcp, None).is_ok());
}
