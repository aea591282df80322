//! Grants listed with the app and customer of their appliance: one join, however many grants
//! there are.

use super::{
    control::{grant_from, GrantRow, GRANT_COLS},
    op_list::{appliance_from, APPLIANCE},
    ApplianceRow, Store, StoreResult,
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

impl Store {
    /// The grant and its appliance, in one join; None if either is missing.
    pub async fn grant_with_appliance(
        &self,
        id: &str,
    ) -> StoreResult<Option<(GrantRow, ApplianceRow)>> {
        let grant_cols = GRANT_COLS.split(", ").map(|c| format!("g.{c} AS {c}"));
        let appliance_cols = Store::APPLIANCE_COLS
            .split(", ")
            .map(|c| format!("a.{c} AS {APPLIANCE}{c}"));
        let cols: Vec<String> = grant_cols.chain(appliance_cols).collect();
        let sql = format!(
            "SELECT {} FROM grants g JOIN appliances a ON a.id = g.appliance_id WHERE g.id = $1",
            cols.join(", ")
        );
        let rows = self
            .select_rows(sql, &[id], |r| {
                let appliance = appliance_from(&r)?;
                Ok((grant_from(r)?, appliance))
            })
            .await?;
        Ok(rows.into_iter().next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[tokio::test]
    async fn a_grant_comes_with_its_appliance_in_one_read() {
        let s = Store::open("sqlite::memory:").await.unwrap();
        s.insert_appliance(&appliance("ap_a", "shop", "acme"))
            .await
            .unwrap();
        let g = grant("gr_1", "ap_a", 1_750_000_000_000);
        s.insert_grant(&g).await.unwrap();
        let (got, a) = s.grant_with_appliance("gr_1").await.unwrap().unwrap();
        assert_eq!(got, g);
        assert_eq!(
            (a.id.as_str(), a.app.as_str(), a.customer.as_str()),
            ("ap_a", "shop", "acme")
        );
        assert_eq!(a.created_at, appliance("ap_a", "shop", "acme").created_at);
        assert!(s.grant_with_appliance("gr_2").await.unwrap().is_none());
    }
}
