//! The postgres front end's decisions, from in-memory parts.

use super::*;
use crate::endpoints::front_ends::fakes::{endpoint_row, Parts};
use endpoint_types::{api::EndpointState, resource::EndpointType};

#[tokio::test]
async fn a_user_that_opens_no_live_endpoint_is_told_why() {
    let parts = Parts::new();
    for (id, t, state) in [
        ("ep_retired", EndpointType::Postgres, EndpointState::Retired),
        ("ep_expired", EndpointType::Postgres, EndpointState::Expired),
        // Still active in the store but out of the registry: its expiry is being recorded.
        ("ep_ending", EndpointType::Postgres, EndpointState::Active),
        ("ep_ssh", EndpointType::Ssh, EndpointState::Retired),
    ] {
        parts.store.put_endpoint(endpoint_row(id, t, state, None));
    }
    let message = |user: &'static str| {
        let store = parts.store.clone();
        async move { session::no_endpoint(&*store, user).await }
    };
    let e = message("ep_retired").await;
    assert_eq!(
        e.sqlstate,
        endpoint_types::pgwire::sqlstate::INVALID_AUTHORIZATION
    );
    assert_eq!(e.message, "endpoint \"ep_retired\" has been retired");
    assert_eq!(
        message("ep_expired").await.message,
        "endpoint \"ep_expired\" has expired"
    );
    assert_eq!(
        message("ep_ending").await.message,
        "endpoint \"ep_ending\" has expired"
    );
    assert_eq!(
        message("ep_ssh").await.message,
        "no active postgres endpoint \"ep_ssh\""
    );
    assert_eq!(
        message("postgres").await.message,
        "no active postgres endpoint \"postgres\""
    );
}

#[test]
fn access_waits_for_the_database_the_agent_reports() {
    let parts = Parts::new();
    let ctx = parts.context(4);
    let ep = parts.go_live(&endpoint_row(
        "ep_pg",
        EndpointType::Postgres,
        EndpointState::Active,
        None,
    ));
    let e = access(&ctx, &ep).unwrap_err();
    assert_eq!(e.code, ErrorCode::ApplianceOffline);

    parts.agents.report(
        "ap_1",
        "res_1",
        ResourceScope::Postgres {
            database: "shop".into(),
            schemas: vec!["public".into()],
            privileges: vec!["select".into()],
        },
    );
    assert_eq!(database_of(&ctx, &ep).as_deref(), Some("shop"));
    let EndpointAccess::Postgres {
        host,
        port,
        database,
        user,
        ca_pem,
        ..
    } = access(&ctx, &ep).unwrap()
    else {
        panic!("not a postgres access");
    };
    assert_eq!((host.as_str(), port), ("127.0.0.1", 5432));
    assert_eq!((database.as_str(), user.as_str()), ("shop", "ep_pg"));
    assert_eq!(ca_pem, parts.ca.cert_pem());
}
