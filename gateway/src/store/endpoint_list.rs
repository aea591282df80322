//! Endpoints listed with the app and customer of their appliance: one join, however many
//! endpoints there are.

use super::{
    spine::{EndpointRow, ENDPOINT_COLS},
    Store, StoreResult,
};
use sqlx::Row;

/// An endpoint and who it belongs to (through its appliance).
#[derive(Debug, Clone)]
pub struct EndpointWithOwner {
    pub endpoint: EndpointRow,
    pub app: String,
    pub customer: String,
}

impl Store {
    /// Every endpoint with its appliance's app and customer, oldest first; only `customer`'s
    /// when one is given.
    pub async fn list_endpoints_with_owner(
        &self,
        customer: Option<&str>,
    ) -> StoreResult<Vec<EndpointWithOwner>> {
        // Qualified and named as in `endpoints`, so one row reader serves both.
        let cols: Vec<String> = ENDPOINT_COLS
            .split(", ")
            .map(|c| format!("e.{c} AS {c}"))
            .collect();
        let filter = if customer.is_some() {
            "WHERE a.customer = $1"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {}, a.app AS owner_app, a.customer AS owner_customer \
             FROM endpoints e JOIN appliances a ON a.id = e.appliance_id {filter} \
             ORDER BY e.created_at, e.id",
            cols.join(", ")
        );
        let binds: Vec<&str> = customer.into_iter().collect();
        self.select_rows(sql, &binds, |r| {
            let app: String = r.try_get("owner_app")?;
            let customer: String = r.try_get("owner_customer")?;
            Ok(EndpointWithOwner {
                endpoint: Store::endpoint_from(r)?,
                app,
                customer,
            })
        })
        .await
    }
}
