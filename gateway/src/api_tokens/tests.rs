//! The token rules on the in-memory SQLite store: lifetimes, revocation, names, who may do what.

use super::*;
use crate::identity::authenticate;

fn t0() -> Timestamp {
    "2026-12-07T10:00:00Z".parse().unwrap()
}

fn admin() -> Caller {
    Caller {
        token_id: "tok_admin".into(),
        name: "root@vendor".into(),
        role: Role::Admin,
        customer: None,
    }
}

fn req(role: Role, name: &str, customer: Option<&str>) -> TokenCreateRequest {
    TokenCreateRequest {
        role,
        name: name.into(),
        customer: customer.map(Into::into),
        ttl: None,
    }
}

fn new<'a>(role: Role, name: &'a str, ttl: Option<Duration>) -> NewToken<'a> {
    NewToken {
        role,
        name,
        customer: None,
        created_by: "root@vendor",
        created_by_id: Some("tok_admin"),
        ttl,
    }
}

fn caller_of(row: &TokenRow) -> Caller {
    Caller {
        token_id: row.id.clone(),
        name: row.name.clone(),
        role: Role::parse(&row.role).unwrap(),
        customer: row.customer.clone(),
    }
}

#[test]
fn lifetimes_default_to_90_days_and_never_is_explicit() {
    assert_eq!(parse_ttl(None).unwrap(), Some(DEFAULT_TTL));
    assert_eq!(DEFAULT_TTL, Duration::from_secs(90 * 86_400));
    assert_eq!(parse_ttl(Some("never")).unwrap(), None);
    assert_eq!(parse_ttl(Some("2s")).unwrap(), Some(Duration::from_secs(2)));
    for bad in ["0s", "500ms", "3651d", "soon", ""] {
        let e = parse_ttl(Some(bad)).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad}");
        assert!(!e.hint.is_empty(), "{bad}");
    }
}

#[test]
fn names_that_look_like_system_actors_are_refused() {
    for bad in [
        "policy:x",
        "Policy:automatic",
        "system:gateway",
        "agent:ap_1",
        "postern:x",
    ] {
        let e = validate_name(bad).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad}");
        assert!(e.message.contains("system actor"), "{bad}: {}", e.message);
    }
    for bad in ["", "a b", "x/y", "ünï", &"a".repeat(129)] {
        assert_eq!(
            validate_name(bad).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
    }
    for ok in ["alice@vendor.example", "ci-deploy", "bob+ops", "team:eu"] {
        assert!(validate_name(ok).is_ok(), "{ok}");
    }
}

#[test]
fn only_admins_mint_and_customers_fit_the_role() {
    assert!(check_create(&admin(), &req(Role::Operator, "a", None)).is_ok());
    assert!(check_create(&admin(), &req(Role::Operator, "a", Some("acme"))).is_ok());
    assert!(check_create(&admin(), &req(Role::Admin, "a", None)).is_ok());
    assert!(check_create(&admin(), &req(Role::Approver, "a", Some("acme"))).is_ok());
    let no_customer = check_create(&admin(), &req(Role::Approver, "a", None)).unwrap_err();
    assert_eq!(no_customer.code, ErrorCode::InvalidRequest);
    let scoped_admin = check_create(&admin(), &req(Role::Admin, "a", Some("acme"))).unwrap_err();
    assert_eq!(scoped_admin.code, ErrorCode::InvalidRequest);
    let op = Caller {
        role: Role::Operator,
        ..admin()
    };
    assert_eq!(
        check_create(&op, &req(Role::Operator, "a", None))
            .unwrap_err()
            .code,
        ErrorCode::Forbidden
    );
}

#[tokio::test]
async fn an_expired_token_is_unauthenticated_from_its_expiry_on() {
    let store = Store::open_memory().await.unwrap();
    let (row, _) = mint(
        &store,
        &new(Role::Operator, "alice", Some(Duration::from_secs(2))),
        t0(),
    )
    .await
    .unwrap();
    assert_eq!(row.expires_at, Some(t0() + SignedDuration::from_secs(2)));
    assert!(check_usable(&row, t0() + SignedDuration::from_millis(1999)).is_ok());
    for at in [
        t0() + SignedDuration::from_secs(2),
        t0() + SignedDuration::from_hours(1),
    ] {
        let e = check_usable(&row, at).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthenticated);
        assert!(e.message.contains("expired"), "{}", e.message);
        assert!(
            e.hint.contains(&format!("postern token revoke {}", row.id))
                && e.hint
                    .contains("postern token create --role operator --name alice"),
            "{}",
            e.hint
        );
    }
    let (forever, _) = mint(&store, &new(Role::Admin, "root", None), t0())
        .await
        .unwrap();
    assert_eq!(forever.expires_at, None);
    assert!(check_usable(&forever, t0() + SignedDuration::from_hours(24 * 365 * 50)).is_ok());
}

#[tokio::test]
async fn a_revoked_token_is_refused_at_once_and_its_name_is_free_again() {
    let store = Store::open_memory().await.unwrap();
    mint(&store, &new(Role::Admin, "root", None), t0())
        .await
        .unwrap();
    let (row, secret) = mint(
        &store,
        &new(Role::Operator, "alice", Some(DEFAULT_TTL)),
        t0(),
    )
    .await
    .unwrap();
    assert!(authenticate(&store, Some(secret.expose())).await.is_ok());

    let dup = mint(
        &store,
        &new(Role::Approver, "alice", Some(DEFAULT_TTL)),
        t0(),
    )
    .await
    .unwrap_err();
    assert_eq!(dup.code, ErrorCode::Conflict);
    assert_eq!(dup.details["token_id"], row.id.as_str());
    assert!(dup.hint.contains("unique"), "{}", dup.hint);

    let revoked = revoke(&store, &admin(), &row.id, t0()).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(t0()));
    let e = authenticate(&store, Some(secret.expose()))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Unauthenticated);
    assert!(e.message.contains("revoked"), "{}", e.message);
    assert!(!e.hint.is_empty());
    let again = revoke(&store, &admin(), &row.id, t0()).await.unwrap_err();
    assert_eq!(again.code, ErrorCode::Conflict);

    let (second, _) = mint(
        &store,
        &new(Role::Operator, "alice", Some(DEFAULT_TTL)),
        t0(),
    )
    .await
    .unwrap();
    assert_ne!(second.id, row.id);
}

#[tokio::test]
async fn the_store_keeps_names_unique_even_past_the_check() {
    let store = Store::open_memory().await.unwrap();
    let (row, _) = mint(&store, &new(Role::Operator, "alice", None), t0())
        .await
        .unwrap();
    // As a second replica that passed the check at the same moment would insert it.
    let twin = TokenRow {
        id: "feedface".into(),
        ..row.clone()
    };
    assert!(!store.insert_token(&twin).await.unwrap());
    assert!(store.get_token("feedface").await.unwrap().is_none());
}

#[tokio::test]
async fn people_see_and_revoke_their_own_token_and_admins_all_but_the_last_admin() {
    let store = Store::open_memory().await.unwrap();
    let (root, _) = mint(&store, &new(Role::Admin, "root", None), t0())
        .await
        .unwrap();
    let (alice, _) = mint(
        &store,
        &new(Role::Operator, "alice", Some(DEFAULT_TTL)),
        t0(),
    )
    .await
    .unwrap();
    let (bob, _) = mint(&store, &new(Role::Operator, "bob", Some(DEFAULT_TTL)), t0())
        .await
        .unwrap();

    assert_eq!(list(&store, &admin()).await.unwrap().len(), 3);
    let own = list(&store, &caller_of(&alice)).await.unwrap();
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].id, alice.id);
    assert_eq!(own[0].expires_at, alice.expires_at);

    let e = revoke(&store, &caller_of(&alice), &bob.id, t0())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(store
        .get_token(&bob.id)
        .await
        .unwrap()
        .unwrap()
        .revoked_at
        .is_none());
    revoke(&store, &caller_of(&alice), &alice.id, t0())
        .await
        .unwrap();

    let last = revoke(&store, &caller_of(&root), &root.id, t0())
        .await
        .unwrap_err();
    assert_eq!(last.code, ErrorCode::Conflict);
    assert!(last.hint.contains("--role admin"), "{}", last.hint);
    // An expired admin does not count as another usable one.
    let (old, _) = mint(
        &store,
        &new(Role::Admin, "old-root", Some(Duration::from_secs(60))),
        t0(),
    )
    .await
    .unwrap();
    let later = t0() + SignedDuration::from_hours(1);
    assert_eq!(
        revoke(&store, &caller_of(&root), &root.id, later)
            .await
            .unwrap_err()
            .code,
        ErrorCode::Conflict
    );
    // A second usable admin makes it possible.
    mint(&store, &new(Role::Admin, "root-2", None), later)
        .await
        .unwrap();
    revoke(&store, &caller_of(&root), &root.id, later)
        .await
        .unwrap();
    assert!(store
        .get_token(&old.id)
        .await
        .unwrap()
        .unwrap()
        .revoked_at
        .is_none());
}

#[tokio::test]
async fn last_use_is_written_at_most_once_a_minute_per_token() {
    let store = Store::open_memory().await.unwrap();
    let (row, _) = mint(&store, &new(Role::Operator, "alice", None), t0())
        .await
        .unwrap();
    let uses = LastUse::default();
    uses.note(&store, &row.id, t0()).await;
    assert_eq!(
        store
            .get_token(&row.id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at,
        Some(t0())
    );
    // Further uses within the minute are not written.
    uses.note(&store, &row.id, t0() + SignedDuration::from_secs(59))
        .await;
    assert_eq!(
        store
            .get_token(&row.id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at,
        Some(t0())
    );
    assert!(uses.due("another", t0() + SignedDuration::from_secs(1)));
    let next = t0() + SignedDuration::from_secs(60);
    uses.note(&store, &row.id, next).await;
    assert_eq!(
        store
            .get_token(&row.id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at,
        Some(next)
    );
    assert_eq!(
        list(&store, &admin()).await.unwrap()[0].last_used_at,
        Some(next)
    );
}
