//! The grants service on an in-memory store and the fakes of `ports`: no SQLite, no processes.

use super::{
    memory::{appliance, MemoryGrantStore},
    EndpointsOfGrant, GrantStore, Grants, BY_POLICY_AUTOMATIC, BY_POLICY_WINDOW,
    BY_STEADY_STATE_DEFAULT,
};
use crate::ports::GrantMover;
use crate::{
    identity::Caller,
    ports::{
        fakes::{FakeClock, MemoryAudit, RecordingAgents, RecordingNotifier},
        AgentPort, AgentView, Clock, GrantGate,
    },
    store::GrantChange,
};
use async_trait::async_trait;
use endpoint_types::{
    api::Role,
    control::{GrantLevel, GrantRequest, GrantState},
    frame::{LiveGrant, ToAgent},
    lifecycle::grant::GrantEvent,
    resource::{ApprovalMode, CloseReason, PolicySummary},
    ErrorCode,
};
use jiff::{SignedDuration, Timestamp};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

/// 2026-12-07T10:00:00Z, a whole second (the store's precision is the millisecond).
fn t0() -> Timestamp {
    "2026-12-07T10:00:00Z".parse().unwrap()
}

/// Keeps each "end everything of this grant" as (grant, reason, actor).
#[derive(Debug, Default)]
struct RecordingEndpoints(Mutex<Vec<(String, CloseReason, String)>>);

#[async_trait]
impl EndpointsOfGrant for RecordingEndpoints {
    async fn end_all_of_grant(&self, grant_id: &str, reason: CloseReason, caller: &Caller) {
        self.0
            .lock()
            .unwrap()
            .push((grant_id.into(), reason, caller.actor()));
    }
}

struct Fixture {
    grants: Arc<Grants>,
    store: Arc<MemoryGrantStore>,
    audit: Arc<MemoryAudit>,
    clock: Arc<FakeClock>,
    agents: Arc<RecordingAgents>,
    notifier: Arc<RecordingNotifier>,
    endpoints: Arc<RecordingEndpoints>,
}

/// Appliance `ap_acme` (shop/acme) and `ap_globex` (shop/globex), no agent connected, manual
/// policy (a person decides), the clock at [`t0`].
fn fixture() -> Fixture {
    let store = Arc::new(MemoryGrantStore::default());
    store.add_appliance(appliance("ap_acme", "shop", "acme"));
    store.add_appliance(appliance("ap_globex", "shop", "globex"));
    let audit = Arc::new(MemoryAudit::default());
    let clock = Arc::new(FakeClock::at(t0()));
    let agents = Arc::new(RecordingAgents::default());
    let notifier = Arc::new(RecordingNotifier::default());
    let endpoints = Arc::new(RecordingEndpoints::default());
    let grants = Arc::new(Grants::new(
        store.clone(),
        audit.clone(),
        clock.clone(),
        agents.clone(),
        notifier.clone(),
        endpoints.clone(),
    ));
    Fixture {
        grants,
        store,
        audit,
        clock,
        agents,
        notifier,
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

fn operator() -> Caller {
    caller("alice", Role::Operator, None)
}

fn approver(customer: &str) -> Caller {
    caller(
        &format!("approver-{customer}"),
        Role::Approver,
        Some(customer),
    )
}

fn operate_30m(customer: &str) -> GrantRequest {
    GrantRequest {
        app: "shop".into(),
        customer: customer.into(),
        level: GrantLevel::Operate,
        duration_s: 30 * 60,
        reason: "INC-1234: pods crash-looping".into(),
    }
}

fn policy(approval: ApprovalMode, maintenance: &[&str]) -> PolicySummary {
    PolicySummary {
        approval,
        time_zone: None,
        windows: Vec::new(),
        maintenance: maintenance.iter().map(|m| m.to_string()).collect(),
        steady_state: true,
        approver_key_ids: Vec::new(),
        phases: Vec::new(),
    }
}

fn connect(f: &Fixture, appliance_id: &str, policy: PolicySummary) {
    f.agents.connect(
        appliance_id,
        AgentView {
            policy,
            resources: Vec::new(),
        },
    );
}

/// The grant ids of every GrantSync sent to the appliance, in order.
fn grant_syncs(f: &Fixture, appliance_id: &str) -> Vec<Vec<String>> {
    f.agents
        .sent_to(appliance_id)
        .into_iter()
        .filter_map(|frame| match frame {
            ToAgent::GrantSync { grants } => {
                Some(grants.into_iter().map(|g: LiveGrant| g.grant_id).collect())
            }
            _ => None,
        })
        .collect()
}

/// A pending operate grant on acme, requested by the operator at the clock's time.
async fn pending(f: &Fixture) -> String {
    let g = f
        .grants
        .request(&operator(), operate_30m("acme"))
        .await
        .unwrap();
    assert_eq!(g.state, GrantState::PendingApproval);
    g.id
}

/// An operate grant on acme approved by acme's approver at the clock's time.
async fn approved(f: &Fixture) -> String {
    let id = pending(f).await;
    f.grants
        .decide(&approver("acme"), &id, true, None)
        .await
        .unwrap();
    id
}

#[tokio::test]
async fn an_automatic_policy_approves_at_once_and_tells_the_agent() {
    let f = fixture();
    connect(&f, "ap_acme", policy(ApprovalMode::Automatic, &[]));
    let g = f
        .grants
        .request(&operator(), operate_30m("acme"))
        .await
        .unwrap();

    assert_eq!(g.state, GrantState::Active);
    assert_eq!(g.decided_by.as_deref(), Some(BY_POLICY_AUTOMATIC));
    assert_eq!(g.approved_at, Some(t0()));
    assert_eq!(g.expires_at, Some(t0() + SignedDuration::from_mins(30)));
    assert_eq!(f.store.grant(&g.id).unwrap().state, GrantState::Active);
    assert_eq!(f.audit.kinds(), ["grant.requested", "grant.approved"]);
    assert_eq!(
        f.audit.of_kind("grant.approved")[0].actor,
        BY_POLICY_AUTOMATIC
    );
    assert_eq!(grant_syncs(&f, "ap_acme"), [vec![g.id.clone()]]);
    assert!(f.notifier.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_grant_approved_in_a_maintenance_window_ends_with_the_window() {
    let f = fixture();
    // Reported by the agent before it disconnected: read from the store.
    f.store.set_policy(
        "ap_acme",
        policy(
            ApprovalMode::Windows,
            &["2026-12-07T09:50:00Z/2026-12-07T10:10:00Z"],
        ),
    );
    let g = f
        .grants
        .request(&operator(), operate_30m("acme"))
        .await
        .unwrap();
    assert_eq!(g.state, GrantState::Active);
    assert_eq!(g.decided_by.as_deref(), Some(BY_POLICY_WINDOW));
    assert_eq!(
        g.expires_at,
        Some("2026-12-07T10:10:00Z".parse().unwrap()),
        "the window closes before the 30 minutes are up"
    );
    assert!(f.notifier.0.lock().unwrap().is_empty());

    // After the window a person decides again.
    f.clock.advance(Duration::from_secs(15 * 60));
    let later = f
        .grants
        .request(&operator(), operate_30m("acme"))
        .await
        .unwrap();
    assert_eq!(later.state, GrantState::PendingApproval);
    assert_eq!(later.decided_by, None);
}

#[tokio::test]
async fn a_request_the_policy_does_not_approve_waits_and_the_customer_is_notified() {
    let f = fixture();
    connect(&f, "ap_acme", policy(ApprovalMode::Manual, &[]));
    let g = f
        .grants
        .request(&operator(), operate_30m("acme"))
        .await
        .unwrap();

    assert_eq!(g.state, GrantState::PendingApproval);
    assert_eq!((g.expires_at, g.approved_at), (None, None));
    assert_eq!(g.requested_by, "alice");
    assert_eq!(
        *f.notifier.0.lock().unwrap(),
        [("acme".to_string(), "grant".to_string(), g.id.clone())]
    );
    assert_eq!(f.audit.kinds(), ["grant.requested"]);
    assert!(grant_syncs(&f, "ap_acme").is_empty());
}

#[tokio::test]
async fn an_unusable_policy_leaves_the_decision_to_a_person() {
    let f = fixture();
    // `windows` without a single window does not parse.
    connect(&f, "ap_acme", policy(ApprovalMode::Windows, &[]));
    assert_eq!(
        f.grants
            .automatic_decision("ap_acme", GrantLevel::Operate, t0())
            .await,
        None
    );
    let g = f
        .grants
        .request(&operator(), operate_30m("acme"))
        .await
        .unwrap();
    assert_eq!(g.state, GrantState::PendingApproval);
}

#[tokio::test]
async fn requests_are_checked_before_anything_is_stored() {
    let f = fixture();
    let refused = [
        (
            caller("carol", Role::Approver, Some("acme")),
            operate_30m("acme"),
            ErrorCode::Forbidden,
        ),
        (
            operator(),
            GrantRequest {
                duration_s: 1,
                ..operate_30m("acme")
            },
            ErrorCode::InvalidRequest,
        ),
        (
            operator(),
            GrantRequest {
                reason: "  ".into(),
                ..operate_30m("acme")
            },
            ErrorCode::InvalidRequest,
        ),
        (operator(), operate_30m("initech"), ErrorCode::NotFound),
    ];
    for (who, req, code) in refused {
        let e = f.grants.request(&who, req).await.unwrap_err();
        assert_eq!(e.code, code, "{e:?}");
    }
    assert!(f.grants.list(&operator()).await.unwrap().is_empty());
    assert!(f.audit.kinds().is_empty());
}

#[tokio::test]
async fn steady_state_is_on_by_default_and_the_customer_can_turn_it_off() {
    let f = fixture();
    let steady = GrantRequest {
        level: GrantLevel::SteadyState,
        ..operate_30m("acme")
    };
    // A policy as an agent reports it (`steady_state` defaults to true in agent.toml).
    f.store
        .set_policy("ap_acme", policy(ApprovalMode::Manual, &[]));
    let g = f.grants.request(&operator(), steady.clone()).await.unwrap();
    assert_eq!(g.state, GrantState::Active);
    assert_eq!(g.decided_by.as_deref(), Some(BY_STEADY_STATE_DEFAULT));

    f.store.set_steady_state("ap_acme", false);
    assert!(!f.grants.steady_state_enabled("ap_acme").await);
    let e = f
        .grants
        .request(&operator(), steady.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);

    // Off in the agent's own configuration, on at the approver: still off.
    f.store.set_steady_state("ap_acme", true);
    connect(
        &f,
        "ap_acme",
        PolicySummary {
            steady_state: false,
            ..policy(ApprovalMode::Manual, &[])
        },
    );
    assert!(!f.grants.steady_state_enabled("ap_acme").await);
    assert!(f.grants.request(&operator(), steady).await.is_err());
}

#[tokio::test]
async fn an_approval_counts_the_duration_from_the_decision_and_tells_the_agent() {
    let f = fixture();
    connect(&f, "ap_acme", policy(ApprovalMode::Manual, &[]));
    let id = pending(&f).await;
    f.clock.advance(Duration::from_secs(5 * 60));
    let g = f
        .grants
        .decide(&approver("acme"), &id, true, Some("go ahead".into()))
        .await
        .unwrap();

    let decided = t0() + SignedDuration::from_mins(5);
    assert_eq!(g.state, GrantState::Active);
    assert_eq!(g.decided_by.as_deref(), Some("approver-acme"));
    assert_eq!(g.approved_at, Some(decided));
    assert_eq!(g.expires_at, Some(decided + SignedDuration::from_mins(30)));
    assert_eq!(g.message.as_deref(), Some("go ahead"));
    let approved = f.audit.of_kind("grant.approved");
    assert_eq!(approved.len(), 1);
    assert_eq!(approved[0].actor, "approver-acme");
    assert_eq!(approved[0].detail["grant_id"], id.as_str());
    assert_eq!(grant_syncs(&f, "ap_acme"), [vec![id]]);
}

#[tokio::test]
async fn a_denial_ends_the_request_and_the_agent_hears_nothing() {
    let f = fixture();
    connect(&f, "ap_acme", policy(ApprovalMode::Manual, &[]));
    let id = pending(&f).await;
    let g = f
        .grants
        .decide(&approver("acme"), &id, false, Some("not now".into()))
        .await
        .unwrap();
    assert_eq!(g.state, GrantState::Denied);
    assert_eq!((g.approved_at, g.expires_at), (None, None));
    assert_eq!(f.audit.kinds(), ["grant.requested", "grant.denied"]);
    assert!(grant_syncs(&f, "ap_acme").is_empty());
}

#[tokio::test]
async fn deciding_a_grant_that_is_no_longer_pending_is_refused_and_recorded_as_denied() {
    let f = fixture();
    let approved_id = approved(&f).await;
    let denied_id = pending(&f).await;
    f.grants
        .decide(&approver("acme"), &denied_id, false, None)
        .await
        .unwrap();

    for (id, approve, state) in [
        (&approved_id, true, GrantState::Active),
        (&approved_id, false, GrantState::Active),
        (&denied_id, true, GrantState::Denied),
    ] {
        let before = f.audit.of_kind("denied").len();
        let e = f
            .grants
            .decide(&approver("acme"), id, approve, None)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Conflict, "{e:?}");
        assert_eq!(e.details["state"], state.as_str());
        assert_eq!(f.store.grant(id).unwrap().state, state, "unchanged");
        let denied = f.audit.of_kind("denied");
        assert_eq!(denied.len(), before + 1);
        let last = denied.last().unwrap();
        assert_eq!(last.actor, "approver-acme");
        assert_eq!(
            last.detail["action"],
            if approve { "approve" } else { "deny" }
        );
        assert_eq!(last.detail["id"], id.as_str());
        assert_eq!(last.subject.appliance_id.as_deref(), Some("ap_acme"));
    }
}

#[tokio::test]
async fn a_decision_lost_to_another_replica_is_refused_from_the_state_it_is_in_now() {
    let f = fixture();
    let id = pending(&f).await;
    // Another replica approves between this request's read and its compare-and-set: here the
    // grant is moved behind the service's back before the decision, as the race would.
    let stale = f.store.grant(&id).unwrap();
    f.store
        .move_grant(
            &id,
            GrantState::PendingApproval,
            GrantEvent::Deny,
            GrantChange {
                by: "approver-acme",
                at: t0(),
                message: None,
                expires_at: None,
            },
        )
        .await
        .unwrap();
    let e = f
        .grants
        .move_grant(
            &approver("acme"),
            &stale,
            (GrantEvent::Approve, "approve"),
            GrantChange {
                by: "other-approver",
                at: t0(),
                message: None,
                expires_at: None,
            },
            ("grant.approved", serde_json::json!({ "grant_id": id })),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(e.details["state"], "denied");
    assert_eq!(f.store.grant(&id).unwrap().state, GrantState::Denied);
    assert_eq!(f.audit.of_kind("denied").len(), 1);
    assert!(
        f.audit.of_kind("grant.approved").is_empty(),
        "a move that lost is not recorded"
    );
}

#[tokio::test]
async fn only_the_customers_approver_decides() {
    let f = fixture();
    let id = pending(&f).await;
    let e = f
        .grants
        .decide(&operator(), &id, true, None)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    // Another customer's approver does not even learn that the grant exists.
    let e = f
        .grants
        .decide(&approver("globex"), &id, true, None)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(
        f.store.grant(&id).unwrap().state,
        GrantState::PendingApproval
    );
}

#[tokio::test]
async fn a_revocation_ends_the_grants_endpoints_and_tells_the_agent() {
    let f = fixture();
    connect(&f, "ap_acme", policy(ApprovalMode::Manual, &[]));
    let kept = approved(&f).await;
    let revoked = approved(&f).await;
    let admin = caller("root", Role::Admin, None);
    let g = f.grants.revoke(&admin, &revoked).await.unwrap();

    assert_eq!(g.state, GrantState::Revoked);
    assert_eq!(
        *f.endpoints.0.lock().unwrap(),
        [(revoked.clone(), CloseReason::Revoked, "root".to_string())]
    );
    let revoked_records = f.audit.of_kind("grant.revoked");
    assert_eq!(revoked_records.len(), 1);
    assert_eq!(revoked_records[0].detail["was"], "active");
    // The last set the agent holds has the other grant only.
    assert_eq!(
        grant_syncs(&f, "ap_acme").last().unwrap(),
        &vec![kept.clone()]
    );
    assert_eq!(
        f.grants
            .require_operate(&appliance("ap_acme", "shop", "acme"), t0())
            .await
            .unwrap()
            .id,
        kept
    );
}

#[tokio::test]
async fn revoking_what_already_ended_is_refused_and_ends_nothing() {
    let f = fixture();
    let id = approved(&f).await;
    f.grants.revoke(&operator(), &id).await.unwrap();
    let e = f.grants.revoke(&operator(), &id).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(f.endpoints.0.lock().unwrap().len(), 1, "ended once");
    assert_eq!(f.audit.of_kind("denied")[0].detail["action"], "revoke");
}

#[tokio::test]
async fn a_requester_withdraws_a_pending_request_but_not_someone_elses() {
    let f = fixture();
    let id = pending(&f).await;
    let bob = caller("bob", Role::Operator, None);
    let e = f.grants.revoke(&bob, &id).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    let g = f.grants.revoke(&operator(), &id).await.unwrap();
    assert_eq!(g.state, GrantState::Revoked);
    assert_eq!(
        f.audit.of_kind("grant.revoked")[0].detail["was"],
        "pending-approval"
    );
}

#[tokio::test]
async fn a_grant_expires_by_the_clock() {
    let f = fixture();
    connect(&f, "ap_acme", policy(ApprovalMode::Manual, &[]));
    let id = approved(&f).await;
    let acme = appliance("ap_acme", "shop", "acme");
    assert_eq!(f.grants.live_grants("ap_acme").await.len(), 1);

    f.clock.advance(Duration::from_secs(30 * 60 - 1));
    assert_eq!(
        f.grants.get(&operator(), &id).await.unwrap().state,
        GrantState::Active
    );
    assert!(f.grants.require_operate(&acme, f.clock.now()).await.is_ok());

    f.clock.advance(Duration::from_secs(1));
    assert_eq!(
        f.grants.get(&operator(), &id).await.unwrap().state,
        GrantState::Expired
    );
    assert!(f.grants.live_grants("ap_acme").await.is_empty());
    // An expired grant cannot be revoked: it has ended already.
    let e = f.grants.revoke(&operator(), &id).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(e.details["state"], "expired");
    assert!(f.endpoints.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn require_operate_finds_the_live_grant_or_says_why_not() {
    let f = fixture();
    let acme = appliance("ap_acme", "shop", "acme");
    let gate: &dyn GrantGate = f.grants.as_ref();
    f.store
        .set_policy("ap_acme", policy(ApprovalMode::Manual, &[]));

    // Nothing, a pending request and a denied one: access is required.
    let e = gate.require_operate(&acme, t0()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::OperateAccessRequired);
    assert!(e.hint.contains("--app shop --customer acme"), "{}", e.hint);
    let denied = pending(&f).await;
    f.grants
        .decide(&approver("acme"), &denied, false, None)
        .await
        .unwrap();
    pending(&f).await;
    let steady = GrantRequest {
        level: GrantLevel::SteadyState,
        ..operate_30m("acme")
    };
    f.grants.request(&operator(), steady).await.unwrap();
    let e = gate.require_operate(&acme, t0()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::OperateAccessRequired);

    // Live: the one that lasts longest.
    let short = approved(&f).await;
    f.clock.advance(Duration::from_secs(60));
    let long = approved(&f).await;
    let now = f.clock.now();
    assert_eq!(gate.require_operate(&acme, now).await.unwrap().id, long);

    // Ended: which grant ended, and when.
    let after = now + SignedDuration::from_mins(31);
    let e = gate.require_operate(&acme, after).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::OperateAccessExpired);
    assert_eq!(e.details["grant_id"], long.as_str());
    assert_ne!(short, long);
}

#[tokio::test]
async fn the_policy_is_the_connected_agents_then_the_stored_one_then_manual() {
    let f = fixture();
    assert_eq!(
        f.grants.policy_of("ap_acme").await.approval,
        ApprovalMode::Manual
    );
    f.store
        .set_policy("ap_acme", policy(ApprovalMode::AlwaysRequire, &[]));
    assert_eq!(
        f.grants.policy_of("ap_acme").await.approval,
        ApprovalMode::AlwaysRequire
    );
    connect(&f, "ap_acme", policy(ApprovalMode::Automatic, &[]));
    assert_eq!(
        f.grants.policy_of("ap_acme").await.approval,
        ApprovalMode::Automatic
    );
    assert_eq!(
        f.grants
            .automatic_decision("ap_acme", GrantLevel::Operate, t0())
            .await,
        Some((BY_POLICY_AUTOMATIC, None))
    );
}

#[tokio::test]
async fn lists_show_an_approver_only_their_own_customers_grants() {
    let f = fixture();
    let a1 = pending(&f).await;
    f.clock.advance(Duration::from_secs(1));
    let g1 = f
        .grants
        .request(&operator(), operate_30m("globex"))
        .await
        .unwrap()
        .id;
    f.clock.advance(Duration::from_secs(1));
    let a2 = pending(&f).await;

    let ids = |list: Vec<endpoint_types::control::GrantRecord>| {
        list.into_iter().map(|g| g.id).collect::<Vec<_>>()
    };
    let all = vec![a1.clone(), g1.clone(), a2.clone()];
    assert_eq!(ids(f.grants.list(&operator()).await.unwrap()), all);
    assert_eq!(
        ids(f
            .grants
            .list(&caller("root", Role::Admin, None))
            .await
            .unwrap()),
        all
    );
    assert_eq!(
        ids(f.grants.list(&approver("acme")).await.unwrap()),
        [a1.clone(), a2]
    );
    let globex = f.grants.list(&approver("globex")).await.unwrap();
    assert_eq!(globex.len(), 1);
    assert_eq!(
        (globex[0].id.as_str(), globex[0].customer.as_str()),
        (g1.as_str(), "globex")
    );
    // And one grant: NOT_FOUND across customers.
    let e = f.grants.get(&approver("globex"), &a1).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
}

#[tokio::test]
async fn a_grant_set_is_read_under_the_lock_so_the_newest_is_sent_last() {
    let f = fixture();
    connect(&f, "ap_acme", policy(ApprovalMode::Manual, &[]));
    let first = approved(&f).await;
    assert_eq!(grant_syncs(&f, "ap_acme").len(), 1);

    // A push started while another holds the order lock waits for it, and reads the grants
    // only then: a grant approved meanwhile is in the set it sends.
    let order = f.agents.grant_sync_lock("ap_acme").unwrap();
    let held = order.lock().await;
    let grants = f.grants.clone();
    let push = tokio::spawn(async move { grants.push_grants("ap_acme").await });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(grant_syncs(&f, "ap_acme").len(), 1, "waits for the lock");
    // Requested later, so listed after the first (same-instant requests order by random id).
    f.clock.advance(Duration::from_secs(1));
    let second = pending(&f).await;
    f.store
        .move_grant(
            &second,
            GrantState::PendingApproval,
            GrantEvent::Approve,
            GrantChange {
                by: "approver-acme",
                at: t0(),
                message: None,
                expires_at: Some(t0() + SignedDuration::from_mins(30)),
            },
        )
        .await
        .unwrap();
    drop(held);
    push.await.unwrap();
    assert_eq!(
        grant_syncs(&f, "ap_acme").last().unwrap(),
        &vec![first, second]
    );
}

#[tokio::test]
async fn nothing_is_pushed_to_an_agent_that_is_not_connected() {
    let f = fixture();
    connect(&f, "ap_acme", policy(ApprovalMode::Manual, &[]));
    f.agents.disconnect("ap_acme");
    approved(&f).await;
    assert!(f.agents.sent.lock().unwrap().is_empty());
    // What it would be told on reconnect.
    assert_eq!(f.grants.live_grants("ap_acme").await.len(), 1);
}

#[tokio::test]
async fn the_requester_is_known_by_token_id_not_by_name() {
    let f = fixture();
    let id = pending(&f).await;
    // Another token under the same display name (a new token for "alice" after the old one
    // was revoked, or a forged display) is not the requester.
    let same_name = Caller {
        token_id: "tok_other".into(),
        ..operator()
    };
    let e = f.grants.revoke(&same_name, &id).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    let g = f.grants.revoke(&operator(), &id).await.unwrap();
    assert_eq!(g.state, GrantState::Revoked);
}

#[tokio::test]
async fn an_operator_bound_to_a_customer_acts_on_that_customers_appliances_only() {
    let f = fixture();
    let carol = caller("carol", Role::Operator, Some("acme"));
    let e = f
        .grants
        .request(&carol, operate_30m("globex"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    assert!(e.hint.contains("--customer acme"), "{}", e.hint);
    let g = f.grants.request(&carol, operate_30m("acme")).await.unwrap();
    assert_eq!(g.state, GrantState::PendingApproval);
    // Lists are filtered to the customer too.
    f.grants
        .request(&operator(), operate_30m("globex"))
        .await
        .unwrap();
    let seen = f.grants.list(&carol).await.unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].customer, "acme");
}

#[tokio::test]
async fn a_grant_the_appliance_refused_is_revoked_and_only_its_own_appliance_can_refuse_it() {
    let f = fixture();
    connect(&f, "ap_acme", policy(ApprovalMode::Manual, &[]));
    let id = approved(&f).await;
    let refusal = crate::approvals::refusal::sanitized(
        &id,
        &endpoint_types::approval::ApprovalInvalid::Missing.to_api_error(),
    );
    // Another appliance's agent cannot end acme's grant.
    f.grants
        .appliance_refused("ap_globex", &id, refusal.clone())
        .await;
    assert_eq!(f.store.grant(&id).unwrap().state, GrantState::Active);
    assert!(f.audit.of_kind("denied").is_empty());
    let syncs = grant_syncs(&f, "ap_acme").len();

    f.grants.appliance_refused("ap_acme", &id, refusal).await;
    assert_eq!(f.store.grant(&id).unwrap().state, GrantState::Revoked);
    let denied = f.audit.of_kind("denied");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].actor, "agent:ap_acme");
    assert_eq!(denied[0].detail["code"], "APPROVAL_INVALID");
    assert_eq!(denied[0].detail["approval"], "missing");
    assert_eq!(f.audit.of_kind("grant.revoked").len(), 1);
    // Its endpoints end, and the agent gets the set without it.
    assert_eq!(
        f.endpoints.0.lock().unwrap().clone(),
        vec![(
            id.clone(),
            CloseReason::Revoked,
            "system:gateway".to_string()
        )]
    );
    let after = grant_syncs(&f, "ap_acme");
    assert_eq!(after.len(), syncs + 1);
    assert!(after.last().unwrap().is_empty());
    // Refused again (the set was in flight): recorded, nothing moves twice.
    f.grants
        .appliance_refused(
            "ap_acme",
            &id,
            crate::approvals::refusal::sanitized(&id, &endpoint_types::ApiError::internal("x")),
        )
        .await;
    assert_eq!(f.audit.of_kind("grant.revoked").len(), 1);
    assert_eq!(f.endpoints.0.lock().unwrap().len(), 1);
}

/// `[policy] manual` with `[policy.deploy]` open on t0 (a Monday) and an automatic
/// `[policy.install]` as a hostile or old report might carry.
fn per_phase_policy() -> PolicySummary {
    let table =
        |phase, approval, windows: &[&str]| endpoint_types::phase_policy::PhasePolicySummary {
            phase,
            approval,
            time_zone: None,
            windows: windows.iter().map(|w| w.to_string()).collect(),
            maintenance: Vec::new(),
        };
    PolicySummary {
        phases: vec![
            table(
                GrantLevel::Deploy,
                ApprovalMode::Windows,
                &["Mon 09:00-12:00"],
            ),
            table(GrantLevel::Install, ApprovalMode::Automatic, &[]),
        ],
        ..policy(ApprovalMode::Manual, &[])
    }
}

#[tokio::test]
async fn each_grant_is_decided_by_its_phases_table_and_install_by_a_person() {
    let f = fixture();
    connect(&f, "ap_acme", per_phase_policy());
    let level = |level| GrantRequest {
        level,
        ..operate_30m("acme")
    };
    let deploy = f
        .grants
        .request(&operator(), level(GrantLevel::Deploy))
        .await
        .unwrap();
    assert_eq!(deploy.state, GrantState::Active);
    assert_eq!(deploy.decided_by.as_deref(), Some(BY_POLICY_WINDOW));
    let operate = f
        .grants
        .request(&operator(), level(GrantLevel::Operate))
        .await
        .unwrap();
    assert_eq!(operate.state, GrantState::PendingApproval);
    let install = f
        .grants
        .request(&operator(), level(GrantLevel::Install))
        .await
        .unwrap();
    assert_eq!(install.state, GrantState::PendingApproval);

    let approved = f.audit.of_kind("grant.approved");
    assert_eq!(approved.len(), 1);
    assert_eq!(approved[0].detail["phase"], "deploy");
    assert_eq!(
        approved[0].detail["rule"],
        "policy:window under [policy.deploy]"
    );
    let rules: Vec<String> = f
        .audit
        .of_kind("grant.requested")
        .iter()
        .map(|r| r.detail["rule"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        rules,
        [
            "policy:window under [policy.deploy]",
            "a person: [policy] approval = \"manual\"",
            "a person: install is approved by a person for each use, whatever the policy",
        ]
    );
}

#[tokio::test]
async fn an_expired_grant_is_recorded_once_and_a_revoked_one_never() {
    let f = fixture();
    let id = approved(&f).await;
    let revoked = approved(&f).await;
    f.grants.revoke(&operator(), &revoked).await.unwrap();
    let at = f.store.grant(&id).unwrap().expires_at.unwrap();

    // Not yet: nothing recorded, and the recorder knows when to look.
    assert_eq!(f.grants.record_expiries().await.unwrap(), Some(at));
    assert!(f.audit.of_kind("grant.expired").is_empty());

    f.clock.advance(Duration::from_secs(30 * 60 + 5));
    assert_eq!(f.grants.record_expiries().await.unwrap(), None);
    let expired = f.audit.of_kind("grant.expired");
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0].actor, "system:gateway");
    assert_eq!(expired[0].detail["grant_id"], id.as_str());
    assert_eq!(expired[0].detail["late_s"], 5);
    assert_eq!(expired[0].subject.appliance_id.as_deref(), Some("ap_acme"));

    // Once: a second look (or a restart, or another replica) writes nothing more.
    f.grants.record_expiries().await.unwrap();
    assert_eq!(f.audit.of_kind("grant.expired").len(), 1);
    assert!(!f.store.claim_expiry_record(&id, t0()).await.unwrap());
}
