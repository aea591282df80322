//! Records and the credential check at create, without a store or processes.

use super::*;

fn row(state: EndpointState, expires_at: Timestamp) -> EndpointRow {
    EndpointRow {
        id: "ep_1".into(),
        endpoint_type: EndpointType::Postgres,
        appliance_id: "ap_1".into(),
        resource_id: "db-main".into(),
        state,
        created_by: "bob".into(),
        created_at: Timestamp::UNIX_EPOCH,
        expires_at,
        ended_at: None,
        address: Some("127.0.0.1:5432".into()),
        sessions_total: 7,
        grant_id: Some("gr_1".into()),
        credential: None,
    }
}

#[test]
fn a_record_carries_its_owner_and_shows_the_address_only_while_active() {
    let now = Timestamp::from_second(1_000).unwrap();
    let later = Timestamp::from_second(2_000).unwrap();
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
    use credential::test_credentials;
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
        let mut r = row(EndpointState::Active, Timestamp::MAX);
        r.id = format!("ep_{t}");
        r.endpoint_type = t;
        r.credential = Some(cred.clone());
        let ep = Arc::new(LiveEndpoint::new(
            &r,
            tokio_util::sync::CancellationToken::new(),
        ));
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
