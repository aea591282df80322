//! Grants listed with the app and customer of their appliance: one join, however many grants
//! there are.

use super::{
    control::{grant_from, GrantRow, GRANT_COLS},
    Store, StoreResult,
};
use sqlx::Row;

/// A grant and who it belongs to (through its appliance).
#[derive(Debug, Clone, PartialEq)]
pub struct GrantWithOwner {
    pub grant: GrantRow,
    pub app: String,
    pub customer: String,
}

impl Store {
    /// Every grant with its appliance's app and customer, oldest request first; only
    /// `customer`'s when one is given.
    pub async fn list_grants_with_owner(
        &self,
        customer: Option<&str>,
    ) -> StoreResult<Vec<GrantWithOwner>> {
        // Qualified and named as in `grants`, so one row reader serves both.
        let cols: Vec<String> = GRANT_COLS
            .split(", ")
            .map(|c| format!("g.{c} AS {c}"))
            .collect();
        let filter = if customer.is_some() {
            "WHERE a.customer = $1"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {}, a.app AS owner_app, a.customer AS owner_customer \
             FROM grants g JOIN appliances a ON a.id = g.appliance_id {filter} \
             ORDER BY g.requested_at, g.id",
            cols.join(", ")
        );
        let binds: Vec<&str> = customer.into_iter().collect();
        self.select_rows(sql, &binds, |r| {
            let app: String = r.try_get("owner_app")?;
            let customer: String = r.try_get("owner_customer")?;
            Ok(GrantWithOwner {
                grant: grant_from(r)?,
                app,
                customer,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ApplianceRow;
    use endpoint_types::control::{GrantLevel, GrantState};
    use jiff::Timestamp;

    fn appliance(id: &str, app: &str, customer: &str) -> ApplianceRow {
        ApplianceRow {
            id: id.into(),
            app: app.into(),
            customer: customer.into(),
            created_at: Timestamp::from_millisecond(1_750_000_000_000).unwrap(),
            created_by: "admin".into(),
            cert_fingerprint: None,
            enrolled_at: None,
            revoked_at: None,
            last_seen: None,
            agent_version: None,
            resources: "[]".into(),
        }
    }

    fn grant(id: &str, appliance_id: &str, requested_ms: i64) -> GrantRow {
        GrantRow {
            id: id.into(),
            appliance_id: appliance_id.into(),
            level: GrantLevel::Operate,
            state: GrantState::PendingApproval,
            requested_by: "alice".into(),
            requested_by_id: None,
            reason: "INC-1".into(),
            duration_ms: 60_000,
            requested_at: Timestamp::from_millisecond(requested_ms).unwrap(),
            decided_by: None,
            decided_at: None,
            message: None,
            expires_at: None,
        }
    }

    #[tokio::test]
    async fn grants_come_with_their_owner_in_request_order_and_filtered_by_customer() {
        let s = Store::open("sqlite::memory:").await.unwrap();
        s.insert_appliance(&appliance("ap_a", "shop", "acme"))
            .await
            .unwrap();
        s.insert_appliance(&appliance("ap_b", "shop", "globex"))
            .await
            .unwrap();
        let t = 1_750_000_000_000;
        let (g1, g2, g3) = (
            grant("gr_1", "ap_b", t + 2),
            grant("gr_2", "ap_a", t + 1),
            grant("gr_3", "ap_a", t + 3),
        );
        for g in [&g1, &g2, &g3] {
            s.insert_grant(g).await.unwrap();
        }

        let all = s.list_grants_with_owner(None).await.unwrap();
        let ids: Vec<&str> = all.iter().map(|g| g.grant.id.as_str()).collect();
        assert_eq!(ids, ["gr_2", "gr_1", "gr_3"]);
        assert_eq!(all[0].grant, g2);
        assert_eq!(
            (all[1].app.as_str(), all[1].customer.as_str()),
            ("shop", "globex")
        );

        let acme = s.list_grants_with_owner(Some("acme")).await.unwrap();
        let ids: Vec<&str> = acme.iter().map(|g| g.grant.id.as_str()).collect();
        assert_eq!(ids, ["gr_2", "gr_3"]);
        assert!(acme.iter().all(|g| g.customer == "acme"));
        assert!(s
            .list_grants_with_owner(Some("initech"))
            .await
            .unwrap()
            .is_empty());
    }
}
