//! The endpoint service without a store or processes: the in-memory store, the fakes of
//! `ports::fakes`, a grant gate and front ends that answer as told.

use super::{
    credential::test_credentials,
    service::{credential_is_free, record_of},
    service_store::{memory::MemoryEndpointStore, EndpointStore},
    tcp, EndpointDeps, EndpointRegistry, Endpoints, FrontEndPort, Listening, LiveEndpoint,
};
use crate::{
    identity::Caller,
    ports::{
        fakes::{FakeClock, MemoryAudit, RecordingAgents, RecordingNotifier},
        AgentView, GrantGate,
    },
    store::{ApplianceRow, EndpointRow, GrantRow},
};
use async_trait::async_trait;
use endpoint_types::{
    api::{ClientCredential, EndpointAccess, EndpointCreateRequest, EndpointState, Role},
    control::{GrantLevel, GrantState},
    frame::ToAgent,
    resource::{CloseReason, EndpointType, PolicySummary, ResourceDescriptor, ResourceKind},
    ApiError, ErrorCode,
};
use jiff::{SignedDuration, Timestamp};
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

const KUBE_FRONT_END: &str = "127.0.0.1:6443";

fn t0() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

/// Operate is live while `operate` holds a grant; the policy approves by itself while
/// `automatic` says so.
#[derive(Default)]
struct FakeGrants {
    operate: Mutex<Option<GrantRow>>,
    automatic: Mutex<Option<(&'static str, Option<Timestamp>)>>,
}

#[async_trait]
impl GrantGate for FakeGrants {
    async fn require_operate(
        &self,
        appliance: &ApplianceRow,
        _now: Timestamp,
    ) -> Result<GrantRow, ApiError> {
        self.operate
            .lock()
            .unwrap()
            .clone()
            .filter(|g| g.appliance_id == appliance.id)
            .ok_or_else(|| ApiError::new(ErrorCode::OperateAccessRequired, "no live operate grant"))
    }

    async fn automatic_decision(
        &self,
        _appliance_id: &str,
        _phase: endpoint_types::control::GrantLevel,
        _now: Timestamp,
    ) -> Option<(&'static str, Option<Timestamp>)> {
        *self.automatic.lock().unwrap()
    }

    async fn policy_of(&self, _appliance_id: &str) -> PolicySummary {
        PolicySummary::default()
    }
}

/// The kubectl front end on a fixed address; tcp endpoints on a loopback listener of their
/// own, as the real front ends do. Keeps which endpoints it served.
#[derive(Default)]
struct FakeFrontEnds {
    served: Mutex<Vec<String>>,
}

impl FrontEndPort for FakeFrontEnds {
    fn listen(
        &self,
        t: EndpointType,
        preferred: Option<SocketAddr>,
    ) -> Result<Listening, ApiError> {
        if t != EndpointType::Tcp {
            return Ok(Listening {
                address: KUBE_FRONT_END.into(),
                listener: None,
            });
        }
        let listener = tcp::bind(IpAddr::V4(Ipv4Addr::LOCALHOST), preferred)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(Listening {
            address: listener.local_addr().unwrap().to_string(),
            listener: Some(listener),
        })
    }

    fn serve(&self, ep: Arc<LiveEndpoint>, _listener: std::net::TcpListener) {
        self.served.lock().unwrap().push(ep.id.clone());
    }

    fn access(&self, ep: &LiveEndpoint, address: Option<&str>) -> Result<EndpointAccess, ApiError> {
        Ok(EndpointAccess::Tcp {
            address: address.unwrap_or_default().into(),
            tls_server_name: "localhost".into(),
            ca_pem: "test ca".into(),
            cert_pem: format!("cert for {}", ep.id),
        })
    }
}

struct Harness {
    service: Arc<Endpoints>,
    store: Arc<MemoryEndpointStore>,
    audit: Arc<MemoryAudit>,
    clock: Arc<FakeClock>,
    agents: Arc<RecordingAgents>,
    notifier: Arc<RecordingNotifier>,
    grants: Arc<FakeGrants>,
    front_ends: Arc<FakeFrontEnds>,
    live: Arc<EndpointRegistry>,
}

/// Appliance `ap_1` (shop/acme) and `ap_2` (shop/globex), both connected and declaring a
/// cluster `k8s` and a service `web`; operate grant `gr_1` on `ap_1`, the policy automatic.
fn harness() -> Harness {
    let store = Arc::new(MemoryEndpointStore::default());
    store.add_appliance("ap_1", "shop", "acme");
    store.add_appliance("ap_2", "shop", "globex");
    let agents = Arc::new(RecordingAgents::default());
    for ap in ["ap_1", "ap_2"] {
        agents.connect(
            ap,
            AgentView {
                policy: PolicySummary::default(),
                resources: vec![
                    ResourceDescriptor {
                        id: "k8s".into(),
                        kind: ResourceKind::Kubernetes,
                        scope: None,
                    },
                    ResourceDescriptor {
                        id: "web".into(),
                        kind: ResourceKind::Tcp,
                        scope: None,
                    },
                ],
            },
        );
    }
    let grants = Arc::new(FakeGrants::default());
    *grants.operate.lock().unwrap() = Some(grant("gr_1", "ap_1", None));
    *grants.automatic.lock().unwrap() = Some(("policy:automatic", None));
    let (audit, clock, notifier, front_ends, live) = (
        Arc::new(MemoryAudit::default()),
        Arc::new(FakeClock::at(t0())),
        Arc::new(RecordingNotifier::default()),
        Arc::new(FakeFrontEnds::default()),
        Arc::new(EndpointRegistry::default()),
    );
    let service = Arc::new(Endpoints::new(EndpointDeps {
        store: store.clone(),
        audit: audit.clone(),
        clock: clock.clone(),
        agents: agents.clone(),
        notifier: notifier.clone(),
        grants: grants.clone(),
        front_ends: front_ends.clone(),
        live: live.clone(),
        default_ttl: Duration::from_secs(3600),
        tasks: TaskTracker::new(),
        runtime: tokio::runtime::Handle::current(),
        shutdown: CancellationToken::new(),
    }));
    Harness {
        service,
        store,
        audit,
        clock,
        agents,
        notifier,
        grants,
        front_ends,
        live,
    }
}

fn grant(id: &str, appliance_id: &str, expires_at: Option<Timestamp>) -> GrantRow {
    GrantRow {
        id: id.into(),
        appliance_id: appliance_id.into(),
        level: GrantLevel::Operate,
        state: GrantState::Active,
        requested_by: "bob".into(),
        requested_by_id: None,
        reason: "incident".into(),
        duration_ms: 3_600_000,
        requested_at: t0(),
        decided_by: Some("carol".into()),
        decided_at: Some(t0()),
        message: None,
        expires_at,
    }
}

fn caller(name: &str, role: Role, customer: Option<&str>) -> Caller {
    Caller {
        token_id: format!("tok_{name}"),
        name: name.into(),
        role,
        customer: customer.map(String::from),
    }
}

fn bob() -> Caller {
    caller("bob", Role::Operator, None)
}

fn acme_approver() -> Caller {
    caller("carol", Role::Approver, Some("acme"))
}

/// A kubectl endpoint into `customer`'s cluster, with a credential of its own.
fn kubectl(customer: &str, ttl_s: u64) -> EndpointCreateRequest {
    EndpointCreateRequest {
        phase: endpoint_types::phase::operate(),
        endpoint_type: EndpointType::Kubectl,
        app: "shop".into(),
        customer: customer.into(),
        origin_resource_id: "k8s".into(),
        ttl_s: Some(ttl_s),
        credential: Some(test_credentials::csr(EndpointType::Kubectl).0),
    }
}

fn opened(frames: &[ToAgent]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|f| match f {
            ToAgent::EndpointOpen(g) => Some(g.endpoint_id.clone()),
            _ => None,
        })
        .collect()
}

fn closed(frames: &[ToAgent]) -> Vec<(String, CloseReason)> {
    frames
        .iter()
        .filter_map(|f| match f {
            ToAgent::EndpointClose {
                endpoint_id,
                reason,
            } => Some((endpoint_id.clone(), *reason)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn under_an_automatic_policy_create_opens_the_endpoint_and_tells_the_agent() {
    let h = harness();
    let rec = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap();
    assert_eq!(rec.state, EndpointState::Active);
    assert_eq!(rec.address.as_deref(), Some(KUBE_FRONT_END));
    assert_eq!(rec.expires_at, t0() + SignedDuration::from_secs(600));
    assert!(
        matches!(&rec.access, Some(EndpointAccess::Tcp { cert_pem, .. }) if cert_pem == &format!("cert for {}", rec.id)),
        "the creator gets what their client needs: {:?}",
        rec.access
    );
    let row = h.store.endpoint(&rec.id).unwrap();
    assert_eq!(
        (row.state, row.grant_id.as_deref()),
        (EndpointState::Active, Some("gr_1"))
    );
    assert!(h.live.get(&rec.id).is_some(), "registered live");

    let sent = h.agents.sent_to("ap_1");
    let [ToAgent::EndpointOpen(g)] = sent.as_slice() else {
        panic!("one EndpointOpen for the agent, got {sent:?}")
    };
    assert_eq!(
        (
            g.endpoint_id.as_str(),
            g.resource_id.as_str(),
            g.grant_id.as_deref()
        ),
        (rec.id.as_str(), "k8s", Some("gr_1"))
    );
    assert_eq!(g.expires_at, rec.expires_at);

    assert_eq!(h.audit.kinds(), ["endpoint.requested", "endpoint.created"]);
    let created = &h.audit.of_kind("endpoint.created")[0];
    assert_eq!(created.actor, "policy:automatic");
    assert_eq!(created.detail["approved_by"], "policy:automatic");
    assert!(h.notifier.0.lock().unwrap().is_empty(), "no one to ask");
}

#[tokio::test]
async fn an_automatic_endpoint_never_outlives_its_grant_nor_the_window_that_approved_it() {
    let h = harness();
    let grant_end = t0() + SignedDuration::from_secs(300);
    *h.grants.operate.lock().unwrap() = Some(grant("gr_1", "ap_1", Some(grant_end)));
    let rec = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap();
    assert_eq!(rec.expires_at, grant_end);

    let window_end = t0() + SignedDuration::from_secs(120);
    *h.grants.automatic.lock().unwrap() = Some(("policy:window", Some(window_end)));
    let rec = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap();
    assert_eq!(rec.expires_at, window_end);
}

#[tokio::test]
async fn a_tcp_endpoint_gets_a_listener_of_its_own_served_by_the_front_ends() {
    let h = harness();
    let req = EndpointCreateRequest {
        endpoint_type: EndpointType::Tcp,
        origin_resource_id: "web".into(),
        credential: Some(test_credentials::csr(EndpointType::Tcp).0),
        ..kubectl("acme", 600)
    };
    let rec = h.service.create(&bob(), req).await.unwrap();
    assert_ne!(rec.address.as_deref(), Some(KUBE_FRONT_END));
    assert_eq!(*h.front_ends.served.lock().unwrap(), [rec.id.as_str()]);
}

#[tokio::test]
async fn under_a_manual_policy_create_waits_for_a_person_who_is_notified() {
    let h = harness();
    *h.grants.automatic.lock().unwrap() = None;
    let rec = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap();
    assert_eq!(rec.state, EndpointState::PendingApproval);
    assert_eq!((rec.address, rec.access), (None, None));
    assert_eq!(
        *h.notifier.0.lock().unwrap(),
        [("acme".to_string(), "endpoint".to_string(), rec.id.clone())]
    );
    assert!(h.agents.sent_to("ap_1").is_empty(), "nothing opens yet");
    assert!(h.live.get(&rec.id).is_none());
    assert_eq!(h.audit.kinds(), ["endpoint.requested"]);
    assert_eq!(
        h.store.endpoint(&rec.id).unwrap().state,
        EndpointState::PendingApproval
    );
}

#[tokio::test]
async fn create_is_refused_without_a_live_operate_grant() {
    let h = harness();
    *h.grants.operate.lock().unwrap() = None;
    let err = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::OperateAccessRequired);
    assert!(h.store.endpoints.lock().unwrap().is_empty());
    assert!(h.agents.sent_to("ap_1").is_empty());
    assert!(h.audit.kinds().is_empty());
}

#[tokio::test]
async fn create_refuses_what_cannot_become_an_endpoint() {
    let h = harness();
    let code = |r: Result<_, ApiError>| r.unwrap_err().code;
    let (bob, carol) = (bob(), acme_approver());
    // Approvers decide; they do not open endpoints.
    let as_approver = h.service.create(&carol, kubectl("acme", 600));
    assert_eq!(code(as_approver.await), ErrorCode::Forbidden);
    let ttl_too_short = h.service.create(&bob, kubectl("acme", 1));
    assert_eq!(code(ttl_too_short.await), ErrorCode::InvalidRequest);
    let unknown = EndpointCreateRequest {
        origin_resource_id: "nope".into(),
        ..kubectl("acme", 600)
    };
    let err = h.service.create(&bob, unknown).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidOriginResourceId);
    assert!(err.hint.contains("k8s, web"), "{}", err.hint);
    let wrong_kind = EndpointCreateRequest {
        origin_resource_id: "web".into(),
        ..kubectl("acme", 600)
    };
    let err = h.service.create(&bob, wrong_kind).await.unwrap_err();
    assert!(err.hint.contains("--type tcp"), "{}", err.hint);
    let no_credential = EndpointCreateRequest {
        credential: None,
        ..kubectl("acme", 600)
    };
    assert_eq!(
        code(h.service.create(&bob, no_credential).await),
        ErrorCode::InvalidRequest
    );
    h.agents.disconnect("ap_1");
    let offline = h.service.create(&bob, kubectl("acme", 600));
    assert_eq!(code(offline.await), ErrorCode::ApplianceOffline);
    assert!(h.store.endpoints.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_credential_that_opens_a_live_endpoint_is_refused_at_create() {
    let h = harness();
    let req = kubectl("acme", 600);
    h.service.create(&bob(), req.clone()).await.unwrap();
    let err = h.service.create(&bob(), req).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    assert_eq!(h.store.endpoints.lock().unwrap().len(), 1);
}

/// A pending endpoint of bob's on acme's appliance, created at `t0`.
async fn pending(h: &Harness, ttl_s: u64) -> String {
    *h.grants.automatic.lock().unwrap() = None;
    let rec = h
        .service
        .create(&bob(), kubectl("acme", ttl_s))
        .await
        .unwrap();
    assert_eq!(rec.state, EndpointState::PendingApproval);
    rec.id
}

#[tokio::test]
async fn approval_activates_a_pending_endpoint_for_its_ttl_from_then_and_tells_the_agent() {
    let h = harness();
    let id = pending(&h, 600).await;
    h.clock.advance(Duration::from_secs(100));
    let rec = h
        .service
        .decide(&acme_approver(), &id, true, None)
        .await
        .unwrap();
    assert_eq!(rec.state, EndpointState::Active);
    assert_eq!(rec.expires_at, t0() + SignedDuration::from_secs(700));
    assert_eq!(rec.address.as_deref(), Some(KUBE_FRONT_END));
    assert!(rec.access.is_none(), "the approver is not the creator");
    assert_eq!(opened(&h.agents.sent_to("ap_1")), [id.as_str()]);
    let created = &h.audit.of_kind("endpoint.created")[0];
    assert_eq!(
        (created.actor.as_str(), &created.detail["approved_by"]),
        ("carol", &serde_json::json!("carol"))
    );
    // The creator now gets their access.
    let rec = h.service.get(&bob(), &id).await.unwrap();
    assert!(rec.access.is_some());
}

#[tokio::test]
async fn denial_ends_a_pending_endpoint_and_a_second_decision_is_refused_and_audited() {
    let h = harness();
    let id = pending(&h, 600).await;
    let rec = h
        .service
        .decide(&acme_approver(), &id, false, Some("not now".into()))
        .await
        .unwrap();
    assert_eq!(rec.state, EndpointState::Denied);
    let denied = &h.audit.of_kind("endpoint.denied")[0];
    assert_eq!(denied.detail["message"], "not now");
    assert!(h.agents.sent_to("ap_1").is_empty());

    let err = h
        .service
        .decide(&acme_approver(), &id, true, None)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    assert_eq!(h.store.endpoint(&id).unwrap().state, EndpointState::Denied);
    let refusals = h.audit.of_kind("denied");
    assert_eq!(refusals.len(), 1);
    assert_eq!(
        (
            refusals[0].actor.as_str(),
            &refusals[0].detail["action"],
            &refusals[0].detail["state"]
        ),
        (
            "carol",
            &serde_json::json!("approve"),
            &serde_json::json!("denied")
        )
    );
    assert!(h.agents.sent_to("ap_1").is_empty(), "nothing opened");
}

#[tokio::test]
async fn deciding_an_active_endpoint_is_refused_and_audited() {
    let h = harness();
    let rec = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap();
    let err = h
        .service
        .decide(&acme_approver(), &rec.id, false, None)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    assert_eq!(h.audit.of_kind("denied")[0].detail["action"], "deny");
    assert_eq!(
        h.store.endpoint(&rec.id).unwrap().state,
        EndpointState::Active
    );
}

#[tokio::test]
async fn an_approver_of_another_customer_cannot_see_nor_decide_the_endpoint() {
    let h = harness();
    let id = pending(&h, 600).await;
    let globex = caller("dave", Role::Approver, Some("globex"));
    let err = h
        .service
        .decide(&globex, &id, true, None)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert_eq!(
        h.store.endpoint(&id).unwrap().state,
        EndpointState::PendingApproval
    );
}

#[tokio::test]
async fn approval_after_the_grant_ended_expires_the_request() {
    let h = harness();
    let id = pending(&h, 600).await;
    *h.grants.operate.lock().unwrap() = None;
    let err = h
        .service
        .decide(&acme_approver(), &id, true, None)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::OperateAccessExpired);
    assert_eq!(h.store.endpoint(&id).unwrap().state, EndpointState::Expired);
    let expired = &h.audit.of_kind("endpoint.expired")[0];
    assert_eq!(expired.detail["while"], "pending approval");
    assert_eq!(h.audit.of_kind("denied").len(), 1);
    assert!(h.agents.sent_to("ap_1").is_empty());
}

mod ending;

#[tokio::test]
async fn a_revoked_tokens_endpoints_end_and_a_namesakes_do_not() {
    let h = harness();
    let namesake = Caller {
        token_id: "tok_namesake".into(),
        ..bob()
    };
    let active = h
        .service
        .create(&bob(), kubectl("acme", 600))
        .await
        .unwrap();
    assert_eq!(active.state, EndpointState::Active);
    assert!(active.access.is_some(), "the creator gets access");
    let theirs = h
        .service
        .create(&namesake, kubectl("acme", 600))
        .await
        .unwrap();
    // Same display name, another token: not the creator.
    assert!(h
        .service
        .get(&namesake, &active.id)
        .await
        .unwrap()
        .access
        .is_none());
    assert!(h
        .service
        .get(&bob(), &theirs.id)
        .await
        .unwrap()
        .access
        .is_none());
    let waiting = pending(&h, 600).await;

    let admin = caller("root", Role::Admin, None);
    assert_eq!(h.service.end_all_created_by("tok_bob", &admin).await, 2);
    assert_eq!(
        h.store.endpoint(&active.id).unwrap().state,
        EndpointState::Retired
    );
    assert_eq!(
        h.store.endpoint(&waiting).unwrap().state,
        EndpointState::Expired
    );
    assert_eq!(
        h.store.endpoint(&theirs.id).unwrap().state,
        EndpointState::Active
    );
    let expired = &h.audit.of_kind("endpoint.expired")[0];
    assert_eq!(expired.detail["reason"], "revoked");
    assert_eq!(expired.detail["token_id"], "tok_bob");
    // Nothing is left to end.
    assert_eq!(h.service.end_all_created_by("tok_bob", &admin).await, 0);
}
