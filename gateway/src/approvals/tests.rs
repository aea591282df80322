use super::*;
use endpoint_types::control::{ApprovalKind, ApprovalStage};
use jiff::Timestamp;
use std::sync::Mutex;

/// A queue of one kind holding fixed items and remembering the decisions it was asked for.
struct FakeQueue {
    prefix: &'static str,
    items: Vec<ApprovalItem>,
    decided: Mutex<Vec<(String, bool, Option<String>)>>,
    /// The content cannot be had (as held output while the appliance is offline).
    content_fails: Mutex<bool>,
}

impl FakeQueue {
    fn new(prefix: &'static str, items: Vec<ApprovalItem>) -> Arc<FakeQueue> {
        Arc::new(FakeQueue {
            prefix,
            items,
            decided: Mutex::default(),
            content_fails: Mutex::default(),
        })
    }
}

#[async_trait]
impl Queue for FakeQueue {
    fn owns(&self, id: &str) -> bool {
        id.starts_with(self.prefix)
    }

    async fn waiting(&self, caller: &Caller) -> Result<Vec<ApprovalItem>, ApiError> {
        Ok(self
            .items
            .iter()
            .filter(|i| caller.customer_scope().is_none_or(|c| c == i.customer))
            .cloned()
            .collect())
    }

    async fn detail(
        &self,
        _caller: &Caller,
        item: &ApprovalItem,
    ) -> Result<Option<(&'static str, serde_json::Value)>, ApiError> {
        Ok((item.stage == ApprovalStage::Output)
            .then(|| ("output", serde_json::json!({ "stdout": "held" }))))
    }

    async fn content(
        &self,
        _caller: &Caller,
        item: &ApprovalItem,
    ) -> Result<Option<DecidedContent>, ApiError> {
        if *self.content_fails.lock().unwrap() {
            return Err(ApiError::new(ErrorCode::ApplianceOffline, "offline"));
        }
        Ok(item
            .id
            .starts_with("op_cmd")
            .then(|| command("kubectl get pods")))
    }

    async fn decide(
        &self,
        _caller: &Caller,
        id: &str,
        approve: bool,
        message: Option<String>,
    ) -> Result<serde_json::Value, ApiError> {
        self.decided
            .lock()
            .unwrap()
            .push((id.into(), approve, message));
        Ok(serde_json::json!({ "id": id }))
    }
}

fn item(id: &str, kind: ApprovalKind, customer: &str, at: &str) -> ApprovalItem {
    ApprovalItem {
        id: id.into(),
        kind,
        stage: if id.ends_with("_out") {
            ApprovalStage::Output
        } else {
            ApprovalStage::Command
        },
        appliance_id: "ap_1".into(),
        app: "app".into(),
        customer: customer.into(),
        requested_by: "dev".into(),
        requested_at: at.parse::<Timestamp>().unwrap(),
        summary: String::new(),
        request: serde_json::Value::Null,
    }
}

fn caller(role: Role, customer: Option<&str>) -> Caller {
    Caller {
        token_id: "tok_1".into(),
        name: "someone".into(),
        role,
        customer: customer.map(String::from),
    }
}

fn approvals() -> (Approvals, Arc<FakeQueue>, Arc<FakeQueue>) {
    let grants = FakeQueue::new(
        "gr_",
        vec![
            item(
                "gr_late",
                ApprovalKind::Grant,
                "acme",
                "2026-12-07T03:00:00Z",
            ),
            item(
                "gr_other",
                ApprovalKind::Grant,
                "globex",
                "2026-12-07T01:00:00Z",
            ),
        ],
    );
    let ops = FakeQueue::new(
        "op_",
        vec![item(
            "op_out",
            ApprovalKind::Op,
            "acme",
            "2026-12-07T02:00:00Z",
        )],
    );
    (
        Approvals::new(vec![grants.clone(), ops.clone()], signing(&[]).0),
        grants,
        ops,
    )
}

/// An appliance policy listing `keys` as its approvers; nothing else is asked of it.
struct FakePolicies(Vec<String>);

#[async_trait]
impl crate::ports::GrantGate for FakePolicies {
    async fn require_operate(
        &self,
        _appliance: &crate::store::ApplianceRow,
        _now: Timestamp,
    ) -> Result<crate::store::GrantRow, ApiError> {
        Err(ApiError::internal("not used"))
    }
    async fn automatic_decision(
        &self,
        _appliance_id: &str,
        _phase: endpoint_types::control::GrantLevel,
        _now: Timestamp,
    ) -> Option<(&'static str, Option<Timestamp>)> {
        None
    }
    async fn policy_of(&self, _appliance_id: &str) -> endpoint_types::resource::PolicySummary {
        endpoint_types::resource::PolicySummary {
            approver_key_ids: self.0.clone(),
            ..Default::default()
        }
    }
}

const NOW: &str = "2026-12-07T04:00:00Z";

fn signing(keys: &[String]) -> (Signing, Arc<signed::memory::MemorySignedDecisions>) {
    let store = Arc::new(signed::memory::MemorySignedDecisions::default());
    (
        Signing {
            store: store.clone(),
            policies: Arc::new(FakePolicies(keys.to_vec())),
            clock: Arc::new(crate::ports::fakes::FakeClock::at(NOW.parse().unwrap())),
        },
        store,
    )
}

#[tokio::test]
async fn what_waits_is_merged_oldest_first_and_scoped_to_the_approvers_customer() {
    let (a, _, _) = approvals();
    let ids = |items: Vec<ApprovalItem>| items.into_iter().map(|i| i.id).collect::<Vec<_>>();
    assert_eq!(
        ids(a.list(&caller(Role::Admin, None)).await.unwrap()),
        ["gr_other", "op_out", "gr_late"]
    );
    assert_eq!(
        ids(a.list(&caller(Role::Approver, Some("acme"))).await.unwrap()),
        ["op_out", "gr_late"]
    );
}

#[tokio::test]
async fn show_adds_the_queues_detail_and_hides_other_customers_requests() {
    let (a, _, _) = approvals();
    let acme = caller(Role::Approver, Some("acme"));
    let v = a.show(&acme, "op_out").await.unwrap();
    assert_eq!(v["output"]["stdout"], "held");
    assert_eq!(v["id"], "op_out");
    let v = a.show(&acme, "gr_late").await.unwrap();
    assert!(v.get("output").is_none());
    let e = a.show(&acme, "gr_other").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = a.show(&acme, "xx_1").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
}

#[tokio::test]
async fn decisions_go_to_the_queue_that_owns_the_id_and_only_approvers_decide() {
    let (a, grants, ops) = approvals();
    let acme = caller(Role::Approver, Some("acme"));
    a.decide(&acme, "op_out", false, Some("no".into()), None)
        .await
        .unwrap();
    a.decide(&acme, "gr_late", true, None, None).await.unwrap();
    assert_eq!(
        *ops.decided.lock().unwrap(),
        [("op_out".to_string(), false, Some("no".to_string()))]
    );
    assert_eq!(
        *grants.decided.lock().unwrap(),
        [("gr_late".to_string(), true, None)]
    );
    let e = a
        .decide(&caller(Role::Operator, None), "gr_late", true, None, None)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    let e = a.decide(&acme, "ep_1", true, None, None).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(grants.decided.lock().unwrap().len(), 1);
}

fn command(line: &str) -> DecidedContent {
    DecidedContent::op_command(
        endpoint_types::control::OpTool::Kubectl,
        line,
        "k8s.main",
        300,
    )
    .unwrap()
}

/// An op waiting for its command approval on an appliance that lists `keys`.
fn signed_fixture(
    keys: &[String],
) -> (
    Approvals,
    Arc<FakeQueue>,
    Arc<signed::memory::MemorySignedDecisions>,
) {
    let ops = FakeQueue::new(
        "op_",
        vec![item(
            "op_cmd1",
            ApprovalKind::Op,
            "acme",
            "2026-12-07T03:00:00Z",
        )],
    );
    let (signing, store) = signing(keys);
    (Approvals::new(vec![ops.clone()], signing), ops, store)
}

#[tokio::test]
async fn the_statement_binds_the_argv_the_appliance_will_run() {
    let (a, _, _) = signed_fixture(&["SHA256:k".into()]);
    let acme = caller(Role::Approver, Some("acme"));
    let v = a.statement(&acme, "op_cmd1").await.unwrap();
    assert_eq!(v["signature_required"], true);
    assert_eq!(v["approver_key_ids"][0], "SHA256:k");
    let s: endpoint_types::approval::ApprovalStatement =
        serde_json::from_value(v["statement"].clone()).unwrap();
    assert_eq!(s.record_id, "op_cmd1");
    assert_eq!(s.appliance_id, "ap_1");
    assert_eq!(s.issued_at, NOW.parse::<Timestamp>().unwrap());
    assert_eq!(
        s.not_after,
        s.issued_at + endpoint_types::approval::DEFAULT_VALIDITY
    );
    match &s.content {
        DecidedContent::OpCommand { argv, .. } => assert_eq!(argv, &["kubectl", "get", "pods"]),
        other => panic!("{other:?}"),
    }
    assert_eq!(v["canonical"], s.canonical());
    // `show` carries the same, beside the item.
    let shown = a.show(&acme, "op_cmd1").await.unwrap();
    assert_eq!(shown["id"], "op_cmd1");
    assert_eq!(shown["statement"], v["statement"]);
    // What no statement covers shows none and needs none.
    let (plain, _, _) = approvals();
    let v = plain.statement(&acme, "gr_late").await.unwrap();
    assert!(v["statement"].is_null());
    assert_eq!(v["signature_required"], false);
}

#[tokio::test]
async fn an_unsigned_or_mismatched_approval_is_refused_and_a_matching_one_is_kept_untouched() {
    let (key, _) = certs::approver::ApproverKey::generate().unwrap();
    let (a, ops, store) = signed_fixture(&[key.public().key_id()]);
    let acme = caller(Role::Approver, Some("acme"));
    let v = a.statement(&acme, "op_cmd1").await.unwrap();
    let statement: endpoint_types::approval::ApprovalStatement =
        serde_json::from_value(v["statement"].clone()).unwrap();
    let reason = |e: ApiError| {
        assert_eq!(e.code, ErrorCode::ApprovalInvalid, "{e:?}");
        e.details["reason"].as_str().unwrap_or_default().to_string()
    };

    let e = a
        .decide(&acme, "op_cmd1", true, None, None)
        .await
        .unwrap_err();
    assert!(e.hint.contains("approvals key create"), "{}", e.hint);
    assert_eq!(reason(e), "missing");

    let mut tampered = statement.clone();
    tampered.content = command("kubectl delete pods");
    let e = a
        .decide(&acme, "op_cmd1", true, None, Some(key.sign(tampered)))
        .await
        .unwrap_err();
    assert_eq!(reason(e), "content_mismatch");

    let mut other = statement.clone();
    other.record_id = "op_cmd2".into();
    let e = a
        .decide(&acme, "op_cmd1", true, None, Some(key.sign(other)))
        .await
        .unwrap_err();
    assert_eq!(reason(e), "wrong_record");

    let (stranger, _) = certs::approver::ApproverKey::generate().unwrap();
    let e = a
        .decide(
            &acme,
            "op_cmd1",
            true,
            None,
            Some(stranger.sign(statement.clone())),
        )
        .await
        .unwrap_err();
    assert_eq!(reason(e), "unknown_key");

    let e = a
        .decide(
            &acme,
            "op_cmd1",
            false,
            None,
            Some(key.sign(statement.clone())),
        )
        .await
        .unwrap_err();
    assert_eq!(reason(e), "not_approved");
    assert!(ops.decided.lock().unwrap().is_empty());

    let good = key.sign(statement);
    a.decide(&acme, "op_cmd1", true, None, Some(good.clone()))
        .await
        .unwrap();
    assert_eq!(
        SignedDecisions::get(&*store, "op_cmd1", ApprovalStage::Command)
            .await
            .unwrap(),
        Some(good)
    );
    assert_eq!(
        *ops.decided.lock().unwrap(),
        [("op_cmd1".to_string(), true, None)]
    );
    // A denial needs no signature, and one whose content cannot be had goes unsigned.
    let (a, ops, _) = signed_fixture(&[key.public().key_id()]);
    a.decide(&acme, "op_cmd1", false, None, None).await.unwrap();
    assert_eq!(ops.decided.lock().unwrap().len(), 1);
    let (a, ops, store) = signed_fixture(&[key.public().key_id()]);
    *ops.content_fails.lock().unwrap() = true;
    let offered = item("op_cmd1", ApprovalKind::Op, "acme", "2026-12-07T03:00:00Z");
    let mut deny =
        signed::statement_for(&offered, command("kubectl get pods"), NOW.parse().unwrap());
    deny.decision = endpoint_types::approval::Decision::Deny;
    a.decide(&acme, "op_cmd1", false, None, Some(key.sign(deny)))
        .await
        .unwrap();
    assert_eq!(ops.decided.lock().unwrap().len(), 1);
    assert_eq!(
        SignedDecisions::get(&*store, "op_cmd1", ApprovalStage::Command)
            .await
            .unwrap(),
        None
    );
    let e = a
        .decide(&acme, "op_cmd1", true, None, None)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ApplianceOffline);
}
