//! The kill switch's SQL (`store::grant_bulk`), on both backends: the one read of a customer's
//! live grants, the one transaction of compare-and-set revocations, the grant sets of many
//! appliances in one read, and which grants still have an active endpoint.

use endpoint_types::{
    api::{ClientCredential, EndpointState},
    control::{GrantLevel, GrantState},
    resource::EndpointType,
};
use gateway::store::{ApplianceRow, EndpointRow, GrantChange, GrantRow, Store, IDS_PER_STATEMENT};
use jiff::Timestamp;
use postern::pg_cluster;

const T0: i64 = 1_750_000_000_000;
const MINUTE: i64 = 60_000;

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).expect("timestamp")
}

fn appliance(id: &str, app: &str, customer: &str) -> ApplianceRow {
    ApplianceRow {
        id: id.into(),
        app: app.into(),
        customer: customer.into(),
        created_at: ts(T0),
        created_by: "admin".into(),
        cert_fingerprint: None,
        enrolled_at: None,
        revoked_at: None,
        last_seen: None,
        agent_version: None,
        resources: "[]".into(),
    }
}

/// A grant in `state` requested at T0 + `minute` minutes; an active one expires at
/// `expires_minute` (an hour after T0 unless given).
fn grant(id: &str, appliance_id: &str, state: GrantState, minute: i64) -> GrantRow {
    let decided = state != GrantState::PendingApproval;
    GrantRow {
        id: id.into(),
        appliance_id: appliance_id.into(),
        level: GrantLevel::Operate,
        state,
        requested_by: "alice".into(),
        requested_by_id: Some("tok_alice".into()),
        reason: "INC-1".into(),
        duration_ms: 3_600_000,
        requested_at: ts(T0 + minute * MINUTE),
        decided_by: decided.then(|| "policy:automatic".to_string()),
        decided_at: decided.then(|| ts(T0 + minute * MINUTE)),
        message: None,
        expires_at: (state == GrantState::Active).then(|| ts(T0 + 60 * MINUTE)),
    }
}

fn endpoint(id: &str, appliance_id: &str, grant_id: &str, state: EndpointState) -> EndpointRow {
    EndpointRow {
        phase: endpoint_types::phase::operate(),
        id: id.into(),
        endpoint_type: EndpointType::Postgres,
        appliance_id: appliance_id.into(),
        resource_id: "db-main".into(),
        state,
        created_by: "alice".into(),
        created_by_id: Some("tok_alice".into()),
        created_at: ts(T0),
        expires_at: ts(T0 + 60 * MINUTE),
        ended_at: None,
        address: None,
        sessions_total: 0,
        grant_id: Some(grant_id.into()),
        credential: Some(ClientCredential::Postgres {
            scram_verifier: "SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5".into(),
        }),
    }
}

async fn state(s: &Store, id: &str) -> GrantState {
    s.get_grant(id).await.expect("get").expect("grant").state
}

/// acme: `ap_shop` with two active grants, a pending request, a denied one and one that ran
/// out; `ap_crm` with an active grant; `ap_idle` with nothing. globex: `ap_globex`, active.
async fn a_busy_customer(s: &Store) {
    for a in [
        appliance("ap_shop", "shop", "acme"),
        appliance("ap_crm", "crm", "acme"),
        appliance("ap_idle", "idle", "acme"),
        appliance("ap_globex", "shop", "globex"),
    ] {
        s.insert_appliance(&a).await.expect("appliance");
    }
    let mut ran_out = grant("gr_expired", "ap_shop", GrantState::Active, 5);
    ran_out.expires_at = Some(ts(T0 + 10 * MINUTE));
    for g in [
        grant("gr_shop2", "ap_shop", GrantState::Active, 2),
        grant("gr_shop1", "ap_shop", GrantState::Active, 1),
        grant("gr_wait", "ap_shop", GrantState::PendingApproval, 3),
        grant("gr_denied", "ap_shop", GrantState::Denied, 4),
        ran_out,
        grant("gr_crm", "ap_crm", GrantState::Active, 6),
        grant("gr_globex", "ap_globex", GrantState::Active, 7),
    ] {
        s.insert_grant(&g).await.expect("grant");
    }
}

async fn the_kill_switch_reads_once_and_revokes_by_compare_and_set(s: Store) {
    a_busy_customer(&s).await;
    let now = ts(T0 + 20 * MINUTE);

    let acme = s
        .live_grants_of_customer("acme", None, now)
        .await
        .expect("read");
    let appliances: Vec<&str> = acme.appliances.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(appliances, ["ap_crm", "ap_idle", "ap_shop"]);
    let live: Vec<&str> = acme.live.iter().map(|g| g.grant.id.as_str()).collect();
    assert_eq!(live, ["gr_shop1", "gr_shop2", "gr_wait", "gr_crm"]);
    assert_eq!(
        acme.live[0].grant,
        grant("gr_shop1", "ap_shop", GrantState::Active, 1)
    );
    assert_eq!(
        (acme.live[3].app.as_str(), acme.live[3].customer.as_str()),
        ("crm", "acme")
    );

    let crm = s
        .live_grants_of_customer("acme", Some("crm"), now)
        .await
        .expect("read");
    assert_eq!(crm.appliances, [("ap_crm".to_string(), "crm".to_string())]);
    assert_eq!(crm.live.len(), 1);
    let idle = s
        .live_grants_of_customer("acme", Some("idle"), now)
        .await
        .expect("read");
    assert_eq!((idle.appliances.len(), idle.live.len()), (1, 0));
    for (customer, app) in [("initech", None), ("acme", Some("billing"))] {
        let none = s
            .live_grants_of_customer(customer, app, now)
            .await
            .expect("read");
        assert!(none.appliances.is_empty() && none.live.is_empty());
    }

    // Meanwhile gr_shop2 was revoked by its requester and gr_wait approved: the states this
    // read saw no longer hold, so neither moves.
    assert!(s
        .revoke_grant("gr_shop2", "alice", now)
        .await
        .expect("single revoke"));
    assert!(s
        .decide_grant(
            "gr_wait",
            GrantState::Active,
            "bob",
            now,
            None,
            Some(ts(T0 + 90 * MINUTE))
        )
        .await
        .expect("approve"));
    let moves: Vec<(String, GrantState)> = acme
        .live
        .iter()
        .map(|g| (g.grant.id.clone(), g.grant.state))
        .chain([("gr_expired".to_string(), GrantState::Active)])
        .collect();
    let change = GrantChange {
        by: "approver-acme",
        at: now,
        message: None,
        expires_at: None,
    };
    let mut moved = s.revoke_grants(&moves, change).await.expect("revoke");
    moved.sort();
    assert_eq!(moved, ["gr_crm", "gr_shop1"]);
    for (id, want) in [
        ("gr_shop1", GrantState::Revoked),
        ("gr_crm", GrantState::Revoked),
        ("gr_shop2", GrantState::Revoked),
        ("gr_wait", GrantState::Active),
        ("gr_expired", GrantState::Active),
        ("gr_denied", GrantState::Denied),
        ("gr_globex", GrantState::Active),
    ] {
        assert_eq!(state(&s, id).await, want, "{id}");
    }
    // The revocation keeps the approval (decided_*) as the single revoke does.
    let shop1 = s.get_grant("gr_shop1").await.expect("get").expect("grant");
    assert_eq!(shop1.decided_by.as_deref(), Some("policy:automatic"));

    // A pending request is revoked from pending (its requester's or the kill switch's).
    s.insert_grant(&grant("gr_wait2", "ap_crm", GrantState::PendingApproval, 8))
        .await
        .expect("grant");
    let moved = s
        .revoke_grants(
            &[("gr_wait2".to_string(), GrantState::PendingApproval)],
            change,
        )
        .await
        .expect("revoke");
    assert_eq!(moved, ["gr_wait2"]);
    assert_eq!(state(&s, "gr_wait2").await, GrantState::Revoked);

    // A move the grant machine refuses writes nothing, not even the legal ones beside it.
    let refused = s
        .revoke_grants(
            &[
                ("gr_wait".to_string(), GrantState::Active),
                ("gr_denied".to_string(), GrantState::Denied),
            ],
            change,
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(gateway::store::StoreError::IllegalTransition(_))
        ),
        "{refused:?}"
    );
    assert_eq!(state(&s, "gr_wait").await, GrantState::Active);
    assert!(s
        .revoke_grants(&[], change)
        .await
        .expect("nothing")
        .is_empty());

    // The agents' sets: every active grant (expired included; the caller derives expiry) of
    // the named appliances only, oldest first.
    let sets = s
        .active_grants_of_appliances(&["ap_shop".to_string(), "ap_globex".to_string()])
        .await
        .expect("sets");
    let ids: Vec<&str> = sets.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids, ["gr_wait", "gr_expired", "gr_globex"]);
    assert!(s
        .active_grants_of_appliances(&[])
        .await
        .expect("none")
        .is_empty());

    // Only grants with an active endpoint need their endpoints ended.
    for e in [
        endpoint("ep_live", "ap_shop", "gr_shop1", EndpointState::Active),
        endpoint("ep_done", "ap_crm", "gr_crm", EndpointState::Retired),
        endpoint("ep_live2", "ap_shop", "gr_shop1", EndpointState::Active),
    ] {
        s.insert_endpoint(&e).await.expect("endpoint");
    }
    let with = s
        .grants_with_active_endpoints(&["gr_crm".to_string(), "gr_shop1".to_string()])
        .await
        .expect("endpoints");
    assert_eq!(with, ["gr_shop1"]);
    s.close().await;
}

/// More grants and appliances than one statement binds: every one is still read and moved.
async fn a_fleet_larger_than_one_statement(s: Store) {
    let n = IDS_PER_STATEMENT + 3;
    let mut appliance_ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("ap_{i:05}");
        s.insert_appliance(&appliance(&id, &format!("app-{i}"), "fleet"))
            .await
            .expect("appliance");
        s.insert_grant(&grant(&format!("gr_{i:05}"), &id, GrantState::Active, 1))
            .await
            .expect("grant");
        appliance_ids.push(id);
    }
    let now = ts(T0 + 2 * MINUTE);
    let sets = s
        .active_grants_of_appliances(&appliance_ids)
        .await
        .expect("sets");
    assert_eq!(sets.len(), n);
    let fleet = s
        .live_grants_of_customer("fleet", None, now)
        .await
        .expect("read");
    assert_eq!((fleet.appliances.len(), fleet.live.len()), (n, n));
    let moves: Vec<(String, GrantState)> = fleet
        .live
        .iter()
        .map(|g| (g.grant.id.clone(), g.grant.state))
        .collect();
    let change = GrantChange {
        by: "admin",
        at: now,
        message: None,
        expires_at: None,
    };
    let moved = s.revoke_grants(&moves, change).await.expect("revoke");
    assert_eq!(moved.len(), n);
    assert!(s
        .active_grants_of_appliances(&appliance_ids)
        .await
        .expect("sets")
        .is_empty());
    let grant_ids: Vec<String> = moves.into_iter().map(|(id, _)| id).collect();
    assert!(s
        .grants_with_active_endpoints(&grant_ids)
        .await
        .expect("endpoints")
        .is_empty());
    s.close().await;
}

async fn sqlite() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite:{}", dir.path().join("postern.db").display());
    let s = Store::open(&url).await.expect("open");
    (dir, s)
}

/// The cluster's handle keeps it running while the test holds it.
async fn postgres(test: &str) -> (std::sync::Arc<pg_cluster::PgCluster>, Store) {
    let cluster = pg_cluster::shared();
    let url = cluster.create_database(test);
    let s = Store::open(&url).await.expect("open");
    (cluster, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_the_kill_switch_reads_once_and_revokes_by_compare_and_set() {
    let (_dir, s) = sqlite().await;
    the_kill_switch_reads_once_and_revokes_by_compare_and_set(s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_the_kill_switch_reads_once_and_revokes_by_compare_and_set() {
    let (_cluster, s) = postgres("kill_switch_reads_once_and_revokes").await;
    the_kill_switch_reads_once_and_revokes_by_compare_and_set(s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_fleet_larger_than_one_statement() {
    let (_dir, s) = sqlite().await;
    a_fleet_larger_than_one_statement(s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_fleet_larger_than_one_statement() {
    let (_cluster, s) = postgres("kill_switch_fleet_larger_than_one_statement").await;
    a_fleet_larger_than_one_statement(s).await
}
