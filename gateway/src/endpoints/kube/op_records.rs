//! What a `kubectl` op's per-op proxy in the appliance forwarded or refused, reported by the
//! agent so the vendor trail holds every request of the op as the customer's trail does.

use crate::{audit::Subject, endpoints::front_ends::FrontEndContext};

/// Records an agent's `OpRecord` frame: only `kube.request` and `denied`, only for an op of
/// the reporting appliance that is still running.
pub async fn on_op_record(
    ctx: &FrontEndContext,
    appliance_id: &str,
    op_id: &str,
    kind: &str,
    mut detail: serde_json::Value,
) {
    let kind: &'static str = match kind {
        "kube.request" => "kube.request",
        "denied" => "denied",
        other => {
            return tracing::warn!(appliance = %appliance_id, op = %op_id, kind = %other, "agent sent an op record of an unknown kind; ignored")
        }
    };
    let Ok(Some(row)) = ctx.store.get_op(op_id).await else {
        return tracing::warn!(appliance = %appliance_id, op = %op_id, "agent reported on an unknown op");
    };
    if row.appliance_id != appliance_id {
        return tracing::warn!(appliance = %appliance_id, op = %op_id, "agent reported on another appliance's op; ignored");
    }
    if !detail.is_object() {
        return tracing::warn!(appliance = %appliance_id, op = %op_id, "agent sent an op record without a detail object; ignored");
    }
    detail["operator"] = serde_json::json!(row.requested_by);
    detail["reported_by"] = serde_json::json!(format!("agent:{appliance_id}"));
    let subject = Subject {
        appliance_id: Some(row.appliance_id.clone()),
        op_id: Some(row.id.clone()),
        ..Default::default()
    };
    ctx.audit
        .record(kind, &row.requested_by, subject, detail)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::front_ends::fakes::{op_row, Parts};

    #[tokio::test]
    async fn an_op_record_is_kept_only_for_the_reporting_appliances_op_and_known_kinds() {
        let parts = Parts::new();
        let ctx = parts.context(4);
        parts.store.put_op(op_row("op_1", "ap_1"));
        let detail = || serde_json::json!({"verb": "get", "resource": "pods"});

        on_op_record(&ctx, "ap_1", "op_1", "kube.secret", detail()).await;
        on_op_record(&ctx, "ap_1", "op_unknown", "kube.request", detail()).await;
        on_op_record(&ctx, "ap_2", "op_1", "kube.request", detail()).await;
        on_op_record(
            &ctx,
            "ap_1",
            "op_1",
            "kube.request",
            serde_json::json!("get pods"),
        )
        .await;
        assert!(parts.audit.kinds().is_empty(), "{:?}", parts.audit.kinds());

        on_op_record(&ctx, "ap_1", "op_1", "kube.request", detail()).await;
        on_op_record(&ctx, "ap_1", "op_1", "denied", detail()).await;
        assert_eq!(parts.audit.kinds(), ["kube.request", "denied"]);
        let rec = &parts.audit.of_kind("kube.request")[0];
        assert_eq!(rec.actor, "alice");
        assert_eq!(rec.subject.op_id.as_deref(), Some("op_1"));
        assert_eq!(rec.detail["operator"], "alice");
        assert_eq!(rec.detail["reported_by"], "agent:ap_1");
        assert_eq!(rec.detail["verb"], "get");
    }
}
