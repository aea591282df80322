//! The kill switch (`bulk`) on the in-memory store and the fakes of `ports`.

use super::{
    memory::{appliance, MemoryGrantStore},
    BulkRevokeRequest, EndpointsOfGrant, GrantStore, Grants,
};
use crate::{
    identity::Caller,
    ports::{
        fakes::{FakeClock, MemoryAudit, RecordingAgents, RecordingNotifier},
        AgentPort, AgentView,
    },
    store::GrantRow,
};
use async_trait::async_trait;
use endpoint_types::{
    api::Role,
    control::{GrantLevel, GrantState},
    frame::ToAgent,
    resource::CloseReason,
    ErrorCode,
};
use jiff::{SignedDuration, Timestamp};
use std::sync::{Arc, Mutex};

fn t0() -> Timestamp {
    "2026-12-07T10:00:00Z".parse().unwrap()
}

/// Keeps each "end everything of this grant" as (grant, reason).
#[derive(Debug, Default)]
struct RecordingEndpoints(Mutex<Vec<(String, CloseReason)>>);

#[async_trait]
impl EndpointsOfGrant for RecordingEndpoints {
    async fn end_all_of_grant(&self, grant_id: &str, reason: CloseReason, _caller: &Caller) {
        self.0.lock().unwrap().push((grant_id.into(), reason));
    }
}

struct Fixture {
    grants: Arc<Grants>,
    store: Arc<MemoryGrantStore>,
    audit: Arc<MemoryAudit>,
    agents: Arc<RecordingAgents>,
    endpoints: Arc<RecordingEndpoints>,
}

/// acme has `ap_shop` (app shop) and `ap_crm` (app crm), globex `ap_globex` (app shop); the
/// agents of `ap_shop` and `ap_globex` are connected, `ap_crm`'s is not.
fn fixture() -> Fixture {
    let store = Arc::new(MemoryGrantStore::default());
    store.add_appliance(appliance("ap_shop", "shop", "acme"));
    store.add_appliance(appliance("ap_crm", "crm", "acme"));
    store.add_appliance(appliance("ap_globex", "shop", "globex"));
    let audit = Arc::new(MemoryAudit::default());
    let agents = Arc::new(RecordingAgents::default());
    for id in ["ap_shop", "ap_globex"] {
        agents.connect(id, AgentView::default());
    }
    let endpoints = Arc::new(RecordingEndpoints::default());
    let grants = Arc::new(Grants::new(
        store.clone(),
        audit.clone(),
        Arc::new(FakeClock::at(t0())),
        agents.clone(),
        Arc::new(RecordingNotifier::default()),
        endpoints.clone(),
    ));
    Fixture {
        grants,
        store,
        audit,
        agents,
        endpoints,
    }
}

fn caller(name: &str, role: Role, customer: Option<&str>) -> Caller {
    Caller {
        token_id: format!("tok_{name}"),
        name: name.into(),
        role,
        customer: customer.map(str::to_string),
    }
}

fn admin() -> Caller {
    caller("root", Role::Admin, None)
}

fn approver(customer: &str) -> Caller {
    caller(
        &format!("approver-{customer}"),
        Role::Approver,
        Some(customer),
    )
}

fn kill(customer: &str, app: Option<&str>) -> BulkRevokeRequest {
    BulkRevokeRequest {
        customer: customer.into(),
        app: app.map(str::to_string),
        reason: Some("INC-9: vendor laptop stolen".into()),
    }
}

/// A grant stored in `state`, requested `minutes` after t0; active ones expire in an hour
/// from t0 unless `expires_at` says otherwise.
fn put(
    f: &Fixture,
    id: &str,
    appliance_id: &str,
    state: GrantState,
    minutes: i64,
    expires_at: Option<Timestamp>,
) {
    let decided = state != GrantState::PendingApproval;
    let row = GrantRow {
        id: id.into(),
        appliance_id: appliance_id.into(),
        level: GrantLevel::Operate,
        state,
        requested_by: "alice".into(),
        requested_by_id: Some("tok_alice".into()),
        reason: "INC-1".into(),
        duration_ms: 3_600_000,
        requested_at: t0() - SignedDuration::from_mins(60 - minutes),
        decided_by: decided.then(|| "policy:automatic".to_string()),
        decided_at: decided.then(t0),
        message: None,
        expires_at: if state == GrantState::Active {
            Some(expires_at.unwrap_or(t0() + SignedDuration::from_hours(1)))
        } else {
            None
        },
    };
    futures_util::FutureExt::now_or_never(f.store.insert_grant(&row))
        .unwrap()
        .unwrap();
}

/// The grant ids of every GrantSync sent to the appliance, in order.
fn grant_syncs(f: &Fixture, appliance_id: &str) -> Vec<Vec<String>> {
    f.agents
        .sent_to(appliance_id)
        .into_iter()
        .filter_map(|frame| match frame {
            ToAgent::GrantSync { grants } => Some(grants.into_iter().map(|g| g.grant_id).collect()),
            _ => None,
        })
        .collect()
}

fn state(f: &Fixture, id: &str) -> GrantState {
    f.store.grant(id).unwrap().state
}

/// acme: two active grants and a pending request on shop, an active one on crm, and grants
/// that are over (denied, revoked, expired); globex: one active grant.
fn a_busy_customer(f: &Fixture) {
    put(f, "gr_shop1", "ap_shop", GrantState::Active, 1, None);
    put(f, "gr_shop2", "ap_shop", GrantState::Active, 2, None);
    put(
        f,
        "gr_shop_pending",
        "ap_shop",
        GrantState::PendingApproval,
        3,
        None,
    );
    put(f, "gr_crm", "ap_crm", GrantState::Active, 4, None);
    put(f, "gr_denied", "ap_shop", GrantState::Denied, 5, None);
    put(f, "gr_revoked", "ap_crm", GrantState::Revoked, 6, None);
    let ran_out = Some(t0() - SignedDuration::from_mins(1));
    put(f, "gr_expired", "ap_shop", GrantState::Active, 7, ran_out);
    put(f, "gr_globex", "ap_globex", GrantState::Active, 8, None);
}

#[tokio::test]
async fn every_live_grant_of_the_customer_ends_and_nothing_else() {
    let f = fixture();
    a_busy_customer(&f);
    let done = f
        .grants
        .revoke_customer(&approver("acme"), kill("acme", None))
        .await
        .unwrap();

    let ids: Vec<&str> = done.grants.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids, ["gr_shop1", "gr_shop2", "gr_shop_pending", "gr_crm"]);
    assert_eq!(done.revoked, 4);
    for g in &done.grants {
        assert_eq!(g.state, GrantState::Revoked, "{}", g.id);
        assert_eq!(g.customer, "acme");
        assert_eq!(state(&f, &g.id), GrantState::Revoked);
    }
    assert_eq!(done.grants[3].app, "crm");
    // What was over stays as it was; globex is untouched.
    assert_eq!(state(&f, "gr_denied"), GrantState::Denied);
    assert_eq!(state(&f, "gr_expired"), GrantState::Active);
    assert_eq!(state(&f, "gr_globex"), GrantState::Active);

    // One record per grant, as the single revoke writes it plus `bulk` and the reason.
    let records = f.audit.of_kind("grant.revoked");
    assert_eq!(records.len(), 4);
    assert_eq!(f.audit.kinds().len(), 4, "{:?}", f.audit.kinds());
    for r in &records {
        assert_eq!(r.actor, "approver-acme");
        assert_eq!(r.detail["bulk"], true);
        assert_eq!(r.detail["reason"], "INC-9: vendor laptop stolen");
    }
    let pending = records
        .iter()
        .find(|r| r.detail["grant_id"] == "gr_shop_pending")
        .unwrap();
    assert_eq!(pending.detail["was"], "pending-approval");
    assert_eq!(pending.subject.appliance_id.as_deref(), Some("ap_shop"));
    let crm = records
        .iter()
        .find(|r| r.detail["grant_id"] == "gr_crm")
        .unwrap();
    assert_eq!(crm.detail["was"], "active");
    assert_eq!(crm.subject.appliance_id.as_deref(), Some("ap_crm"));

    // Every revoked grant's endpoints end with reason `revoked`.
    let mut ended = f.endpoints.0.lock().unwrap().clone();
    ended.sort_by(|a, b| a.0.cmp(&b.0));
    let want: Vec<(String, CloseReason)> = ["gr_crm", "gr_shop1", "gr_shop2", "gr_shop_pending"]
        .iter()
        .map(|id| (id.to_string(), CloseReason::Revoked))
        .collect();
    assert_eq!(ended, want);

    // The connected agent gets one set, without the revoked grants; the one away gets its
    // set from the store on reconnect; globex's agent hears nothing.
    assert_eq!(grant_syncs(&f, "ap_shop"), [Vec::<String>::new()]);
    assert!(f.agents.sent_to("ap_crm").is_empty());
    assert!(f.agents.sent_to("ap_globex").is_empty());
}

#[tokio::test]
async fn app_narrows_it_to_one_appliance_and_a_second_run_finds_nothing() {
    let f = fixture();
    a_busy_customer(&f);
    let done = f
        .grants
        .revoke_customer(&admin(), kill("acme", Some("crm")))
        .await
        .unwrap();
    let ids: Vec<&str> = done.grants.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids, ["gr_crm"]);
    assert_eq!(state(&f, "gr_shop1"), GrantState::Active);
    assert!(f.agents.sent_to("ap_shop").is_empty());

    let again = f
        .grants
        .revoke_customer(&admin(), kill("acme", Some("crm")))
        .await
        .unwrap();
    assert_eq!((again.revoked, again.grants.len()), (0, 0));
    assert_eq!(f.audit.of_kind("grant.revoked").len(), 1);
    assert_eq!(f.endpoints.0.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn without_a_reason_the_record_says_null() {
    let f = fixture();
    put(&f, "gr_1", "ap_shop", GrantState::Active, 1, None);
    let req = BulkRevokeRequest {
        reason: Some("   ".into()),
        ..kill("acme", None)
    };
    f.grants.revoke_customer(&admin(), req).await.unwrap();
    let r = &f.audit.of_kind("grant.revoked")[0];
    assert!(r.detail["reason"].is_null(), "{}", r.detail);
    assert_eq!(r.actor, "root");
}

#[tokio::test]
async fn who_may_pull_it() {
    let f = fixture();
    a_busy_customer(&f);
    let refused = [
        (approver("acme"), kill("globex", None), ErrorCode::Forbidden),
        (
            caller("alice", Role::Operator, None),
            kill("acme", None),
            ErrorCode::Forbidden,
        ),
        (
            caller("oscar", Role::Operator, Some("acme")),
            kill("acme", None),
            ErrorCode::Forbidden,
        ),
        (admin(), kill("initech", None), ErrorCode::NotFound),
        (admin(), kill("acme", Some("billing")), ErrorCode::NotFound),
        (admin(), kill(" ", None), ErrorCode::InvalidRequest),
        // Another customer's approver learns nothing about whether it exists.
        (
            approver("acme"),
            kill("initech", None),
            ErrorCode::Forbidden,
        ),
    ];
    for (who, req, code) in refused {
        let e = f
            .grants
            .revoke_customer(&who, req.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code, code, "{} on {req:?}: {e:?}", who.name);
        assert!(!e.hint.is_empty(), "{e:?}");
    }
    let operator = f
        .grants
        .revoke_customer(&caller("alice", Role::Operator, None), kill("acme", None))
        .await
        .unwrap_err();
    assert!(
        operator.hint.contains("postern access revoke ID"),
        "{}",
        operator.hint
    );
    assert!(f.audit.kinds().is_empty());
    assert_eq!(state(&f, "gr_shop1"), GrantState::Active);
    assert_eq!(state(&f, "gr_globex"), GrantState::Active);
    assert!(f.agents.sent_to("ap_shop").is_empty());
}

#[tokio::test]
async fn a_grant_another_request_moved_meanwhile_is_left_out() {
    let f = fixture();
    put(&f, "gr_a", "ap_shop", GrantState::Active, 1, None);
    put(&f, "gr_b", "ap_shop", GrantState::Active, 2, None);
    put(
        &f,
        "gr_wait",
        "ap_shop",
        GrantState::PendingApproval,
        3,
        None,
    );
    // Between the kill switch's read and its write, gr_a is revoked by its requester and
    // gr_wait approved by the customer.
    f.store
        .move_before_next_revocation("gr_a", GrantState::Revoked);
    f.store
        .move_before_next_revocation("gr_wait", GrantState::Active);
    let done = f
        .grants
        .revoke_customer(&admin(), kill("acme", None))
        .await
        .unwrap();
    let ids: Vec<&str> = done.grants.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids, ["gr_b"]);
    assert_eq!(done.revoked, 1);
    let recorded: Vec<String> = f
        .audit
        .of_kind("grant.revoked")
        .iter()
        .map(|r| r.detail["grant_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(recorded, ["gr_b"]);
    // The approval won its race: the agent's new set, read after the write, holds it.
    assert_eq!(state(&f, "gr_wait"), GrantState::Active);
    assert_eq!(grant_syncs(&f, "ap_shop"), [vec!["gr_wait".to_string()]]);
}

#[tokio::test(flavor = "current_thread")]
async fn a_set_being_sent_is_never_overtaken() {
    let f = fixture();
    put(&f, "gr_1", "ap_shop", GrantState::Active, 1, None);
    // Another change to ap_shop holds the appliance's ordering lock (it is reading its set).
    let order = f.agents.grant_sync_lock("ap_shop").unwrap();
    let held = order.lock().await;
    let grants = f.grants.clone();
    let kill_switch =
        tokio::spawn(async move { grants.revoke_customer(&admin(), kill("acme", None)).await });
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    // The revocation is written, but the set waits for the lock.
    assert_eq!(state(&f, "gr_1"), GrantState::Revoked);
    assert!(!kill_switch.is_finished());
    assert!(grant_syncs(&f, "ap_shop").is_empty());
    drop(held);
    let done = kill_switch.await.unwrap().unwrap();
    assert_eq!(done.revoked, 1);
    assert_eq!(grant_syncs(&f, "ap_shop"), [Vec::<String>::new()]);
}

#[tokio::test]
async fn the_answer_and_request_are_json_as_documented() {
    let f = fixture();
    put(&f, "gr_1", "ap_shop", GrantState::Active, 1, None);
    let done = f
        .grants
        .revoke_customer(&admin(), kill("acme", None))
        .await
        .unwrap();
    let v = serde_json::to_value(&done).unwrap();
    assert_eq!(v["revoked"], 1);
    assert_eq!(v["grants"][0]["id"], "gr_1");
    assert_eq!(v["grants"][0]["state"], "revoked");
    assert_eq!(v["grants"][0]["app"], "shop");

    let req: BulkRevokeRequest = serde_json::from_str(r#"{"customer": "acme"}"#).unwrap();
    assert_eq!((req.app, req.reason), (None, None));
    let unknown =
        serde_json::from_str::<BulkRevokeRequest>(r#"{"customer": "acme", "everything": true}"#)
            .unwrap_err();
    assert!(unknown.to_string().contains("everything"), "{unknown}");
}
