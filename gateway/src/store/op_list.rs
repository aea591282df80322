//! Ops listed with their appliance: one join, however many ops there are.

use super::{control, from_ms, opt_ts, ApplianceRow, OpRow, Store, StoreResult};
use sqlx::{any::AnyRow, Row};

/// Prefix of the appliance's columns in the join (both tables have an `id`).
pub(super) const APPLIANCE: &str = "a_";

/// The appliance half of a joined row, its columns read under [`APPLIANCE`].
pub(super) fn appliance_from(r: &AnyRow) -> StoreResult<ApplianceRow> {
    let col = |c: &str| format!("{APPLIANCE}{c}");
    Ok(ApplianceRow {
        id: r.try_get(col("id").as_str())?,
        app: r.try_get(col("app").as_str())?,
        customer: r.try_get(col("customer").as_str())?,
        created_at: from_ms(r.try_get(col("created_at").as_str())?)?,
        created_by: r.try_get(col("created_by").as_str())?,
        cert_fingerprint: r.try_get(col("cert_fingerprint").as_str())?,
        enrolled_at: opt_ts(r.try_get(col("enrolled_at").as_str())?)?,
        revoked_at: opt_ts(r.try_get(col("revoked_at").as_str())?)?,
        last_seen: opt_ts(r.try_get(col("last_seen").as_str())?)?,
        agent_version: r.try_get(col("agent_version").as_str())?,
        resources: r.try_get(col("resources").as_str())?,
    })
}

impl Store {
    /// Every op with its appliance, oldest request first; only `customer`'s when one is given.
    /// An op whose appliance is gone is not listed (no caller could be shown its owner).
    pub async fn list_ops_with_appliance(
        &self,
        customer: Option<&str>,
    ) -> StoreResult<Vec<(OpRow, ApplianceRow)>> {
        let op_cols = control::OP_COLS
            .split(',')
            .map(str::trim)
            .map(|c| format!("o.{c} AS {c}"));
        let appliance_cols = Store::APPLIANCE_COLS
            .split(',')
            .map(str::trim)
            .map(|c| format!("a.{c} AS {APPLIANCE}{c}"));
        let cols: Vec<String> = op_cols.chain(appliance_cols).collect();
        let filter = if customer.is_some() {
            "WHERE a.customer = $1"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {} FROM ops o JOIN appliances a ON a.id = o.appliance_id {filter} \
             ORDER BY o.requested_at, o.id",
            cols.join(", ")
        );
        let binds: Vec<&str> = customer.into_iter().collect();
        self.select_rows(sql, &binds, |r| {
            let appliance = appliance_from(&r)?;
            Ok((control::op_from(r)?, appliance))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_types::control::{OpState, OpTool};
    use jiff::Timestamp;
    use std::time::Duration;

    fn appliance(id: &str, customer: &str) -> ApplianceRow {
        ApplianceRow {
            id: id.into(),
            app: "shop".into(),
            customer: customer.into(),
            created_at: Timestamp::from_second(1_700_000_000).unwrap(),
            created_by: "admin".into(),
            cert_fingerprint: None,
            enrolled_at: None,
            revoked_at: None,
            last_seen: None,
            agent_version: None,
            resources: "[]".into(),
        }
    }

    fn op(id: &str, appliance_id: &str, at_s: i64) -> OpRow {
        OpRow {
            phase: endpoint_types::phase::operate(),
            id: id.into(),
            appliance_id: appliance_id.into(),
            tool: OpTool::Kubectl,
            command: "kubectl get pods".into(),
            origin_resource_id: "aws_eks_cluster.main".into(),
            timeout: Duration::from_secs(300),
            state: OpState::PendingApproval,
            requested_by: "op@vendor".into(),
            requested_at: Timestamp::from_second(at_s).unwrap(),
            grant_id: Some("gr_1".into()),
            command_approved_by: None,
            command_approved_at: None,
            output_approved_by: None,
            output_approved_at: None,
            started_at: None,
            finished_at: None,
            exit_code: None,
            stdout: Some("out".into()),
            stderr: None,
            truncated: false,
            error: None,
            message: None,
            requested_by_id: None,
        }
    }

    #[tokio::test]
    async fn ops_come_with_their_appliance_scoped_by_customer() {
        let store = Store::open_memory().await.unwrap();
        store
            .insert_appliance(&appliance("ap_acme", "acme"))
            .await
            .unwrap();
        store
            .insert_appliance(&appliance("ap_globex", "globex"))
            .await
            .unwrap();
        // Inserted out of order: the list is by request time.
        store
            .insert_op(&op("op_2", "ap_globex", 1_700_000_200))
            .await
            .unwrap();
        store
            .insert_op(&op("op_1", "ap_acme", 1_700_000_100))
            .await
            .unwrap();
        store
            .insert_op(&op("op_3", "ap_acme", 1_700_000_300))
            .await
            .unwrap();

        let all = store.list_ops_with_appliance(None).await.unwrap();
        let ids: Vec<(&str, &str)> = all
            .iter()
            .map(|(o, a)| (o.id.as_str(), a.id.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                ("op_1", "ap_acme"),
                ("op_2", "ap_globex"),
                ("op_3", "ap_acme")
            ]
        );
        // Both halves read back whole, the op's own id not shadowed by the appliance's.
        assert_eq!(all[0].0, op("op_1", "ap_acme", 1_700_000_100));
        assert_eq!(all[1].1.customer, "globex");
        assert_eq!(all[1].1.created_at, appliance("x", "y").created_at);

        let acme = store.list_ops_with_appliance(Some("acme")).await.unwrap();
        let ids: Vec<&str> = acme.iter().map(|(o, _)| o.id.as_str()).collect();
        assert_eq!(ids, ["op_1", "op_3"]);
        assert!(acme.iter().all(|(_, a)| a.customer == "acme"));
        assert!(store
            .list_ops_with_appliance(Some("initech"))
            .await
            .unwrap()
            .is_empty());
    }
}
