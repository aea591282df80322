use super::*;
use endpoint_types::control::{ApprovalKind, ApprovalStage};
use jiff::Timestamp;
use std::sync::Mutex;

/// A queue of one kind holding fixed items and remembering the decisions it was asked for.
struct FakeQueue {
    prefix: &'static str,
    items: Vec<ApprovalItem>,
    decided: Mutex<Vec<(String, bool, Option<String>)>>,
}

impl FakeQueue {
    fn new(prefix: &'static str, items: Vec<ApprovalItem>) -> Arc<FakeQueue> {
        Arc::new(FakeQueue {
            prefix,
            items,
            decided: Mutex::default(),
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
        Approvals::new(vec![grants.clone(), ops.clone()]),
        grants,
        ops,
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
    a.decide(&acme, "op_out", false, Some("no".into()))
        .await
        .unwrap();
    a.decide(&acme, "gr_late", true, None).await.unwrap();
    assert_eq!(
        *ops.decided.lock().unwrap(),
        [("op_out".to_string(), false, Some("no".to_string()))]
    );
    assert_eq!(
        *grants.decided.lock().unwrap(),
        [("gr_late".to_string(), true, None)]
    );
    let e = a
        .decide(&caller(Role::Operator, None), "gr_late", true, None)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    let e = a.decide(&acme, "ep_1", true, None).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(grants.decided.lock().unwrap().len(), 1);
}
