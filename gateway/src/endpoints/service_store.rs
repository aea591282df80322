//! What the endpoint service keeps in the store, as the narrow trait it needs: implemented for
//! [`Store`] by delegating, and in memory for the service's unit tests.

use crate::store::{ApplianceRow, EndpointRow, EndpointWithOwner, Store, StoreResult};
use async_trait::async_trait;
use endpoint_types::{api::EndpointState, lifecycle::endpoint::EndpointEvent};
use jiff::Timestamp;

#[async_trait]
pub trait EndpointStore: Send + Sync {
    async fn get_appliance(&self, id: &str) -> StoreResult<Option<ApplianceRow>>;
    /// The live (not revoked) appliance for an app and customer.
    async fn find_appliance(&self, app: &str, customer: &str) -> StoreResult<Option<ApplianceRow>>;
    async fn get_endpoint(&self, id: &str) -> StoreResult<Option<EndpointRow>>;
    /// Every endpoint with its appliance's app and customer (of one customer if given), oldest
    /// first.
    async fn list_endpoints_with_owner(
        &self,
        customer: Option<&str>,
    ) -> StoreResult<Vec<EndpointWithOwner>>;
    async fn active_endpoints(&self) -> StoreResult<Vec<EndpointRow>>;
    async fn active_endpoints_of(&self, appliance_id: &str) -> StoreResult<Vec<EndpointRow>>;
    async fn active_endpoints_of_grant(&self, grant_id: &str) -> StoreResult<Vec<EndpointRow>>;
    async fn insert_endpoint(&self, row: &EndpointRow) -> StoreResult<()>;
    /// Compare-and-set from pending-approval to active; false if it was no longer pending.
    async fn activate_endpoint(
        &self,
        id: &str,
        expires_at: Timestamp,
        address: &str,
    ) -> StoreResult<bool>;
    /// Compare-and-set from `from` to the end state `event` leads to; false if it moved.
    async fn move_endpoint(
        &self,
        id: &str,
        from: EndpointState,
        event: EndpointEvent,
        at: Timestamp,
    ) -> StoreResult<bool>;
    async fn set_endpoint_address(&self, id: &str, address: &str) -> StoreResult<()>;
    /// When an API token stops working (None: never, or no such token): an endpoint never
    /// outlives the token that created it.
    async fn token_expiry(&self, _token_id: &str) -> StoreResult<Option<Timestamp>> {
        Ok(None)
    }
    /// The approver's signed decision on `id` (a grant or endpoint), as kept
    /// (`approvals::SignedDecisions`); None where none is kept (the in-memory test stores).
    async fn signed_decision(
        &self,
        _id: &str,
    ) -> StoreResult<Option<endpoint_types::approval::SignedDecision>> {
        Ok(None)
    }
    /// Keeps the appliance's refusal of `id` (`approvals::refusal`).
    async fn put_refusal(
        &self,
        _id: &str,
        _appliance_id: &str,
        _error: &endpoint_types::ApiError,
        _at: jiff::Timestamp,
    ) -> StoreResult<()> {
        Ok(())
    }
    /// The appliance's refusal of `id`, if it refused it.
    async fn refusal(&self, _id: &str) -> StoreResult<Option<endpoint_types::ApiError>> {
        Ok(None)
    }
}

#[async_trait]
impl EndpointStore for Store {
    async fn signed_decision(
        &self,
        id: &str,
    ) -> StoreResult<Option<endpoint_types::approval::SignedDecision>> {
        crate::approvals::refusal::signed_of(self, id).await
    }

    async fn put_refusal(
        &self,
        id: &str,
        appliance_id: &str,
        error: &endpoint_types::ApiError,
        at: jiff::Timestamp,
    ) -> StoreResult<()> {
        crate::approvals::refusal::put(self, id, appliance_id, error, at).await
    }

    async fn refusal(&self, id: &str) -> StoreResult<Option<endpoint_types::ApiError>> {
        crate::approvals::refusal::get(self, id).await
    }

    async fn get_appliance(&self, id: &str) -> StoreResult<Option<ApplianceRow>> {
        Store::get_appliance(self, id).await
    }

    async fn find_appliance(&self, app: &str, customer: &str) -> StoreResult<Option<ApplianceRow>> {
        Store::find_appliance(self, app, customer).await
    }

    async fn get_endpoint(&self, id: &str) -> StoreResult<Option<EndpointRow>> {
        Store::get_endpoint(self, id).await
    }

    async fn list_endpoints_with_owner(
        &self,
        customer: Option<&str>,
    ) -> StoreResult<Vec<EndpointWithOwner>> {
        Store::list_endpoints_with_owner(self, customer).await
    }

    async fn active_endpoints(&self) -> StoreResult<Vec<EndpointRow>> {
        Store::active_endpoints(self).await
    }

    async fn active_endpoints_of(&self, appliance_id: &str) -> StoreResult<Vec<EndpointRow>> {
        Store::active_endpoints_of(self, appliance_id).await
    }

    async fn active_endpoints_of_grant(&self, grant_id: &str) -> StoreResult<Vec<EndpointRow>> {
        Store::active_endpoints_of_grant(self, grant_id).await
    }

    async fn insert_endpoint(&self, row: &EndpointRow) -> StoreResult<()> {
        Store::insert_endpoint(self, row).await
    }

    async fn activate_endpoint(
        &self,
        id: &str,
        expires_at: Timestamp,
        address: &str,
    ) -> StoreResult<bool> {
        Store::activate_endpoint(self, id, expires_at, address).await
    }

    async fn move_endpoint(
        &self,
        id: &str,
        from: EndpointState,
        event: EndpointEvent,
        at: Timestamp,
    ) -> StoreResult<bool> {
        Store::move_endpoint(self, id, from, event, at).await
    }

    async fn set_endpoint_address(&self, id: &str, address: &str) -> StoreResult<()> {
        Store::set_endpoint_address(self, id, address).await
    }

    async fn token_expiry(&self, token_id: &str) -> StoreResult<Option<Timestamp>> {
        // A revoked token stopped working when it was revoked, whatever its expiry said.
        Ok(Store::get_token(self, token_id)
            .await?
            .and_then(|t| t.revoked_at.into_iter().chain(t.expires_at).min()))
    }
}

/// The store of the service's unit tests: the same compare-and-set rules as the SQL one.
#[cfg(test)]
pub mod memory {
    use super::*;
    use crate::store::StoreError;
    use endpoint_types::lifecycle::endpoint as endpoint_lifecycle;
    use std::sync::{Mutex, MutexGuard};

    #[derive(Debug, Default)]
    pub struct MemoryEndpointStore {
        pub appliances: Mutex<Vec<ApplianceRow>>,
        pub endpoints: Mutex<Vec<EndpointRow>>,
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    impl MemoryEndpointStore {
        pub fn add_appliance(&self, id: &str, app: &str, customer: &str) {
            lock(&self.appliances).push(ApplianceRow {
                id: id.into(),
                app: app.into(),
                customer: customer.into(),
                created_at: Timestamp::UNIX_EPOCH,
                created_by: "admin".into(),
                cert_fingerprint: None,
                enrolled_at: None,
                revoked_at: None,
                last_seen: None,
                agent_version: None,
                resources: "[]".into(),
            });
        }

        pub fn endpoint(&self, id: &str) -> Option<EndpointRow> {
            lock(&self.endpoints).iter().find(|e| e.id == id).cloned()
        }

        fn endpoints_where(&self, keep: impl Fn(&EndpointRow) -> bool) -> Vec<EndpointRow> {
            lock(&self.endpoints)
                .iter()
                .filter(|e| keep(e))
                .cloned()
                .collect()
        }
    }

    #[async_trait]
    impl EndpointStore for MemoryEndpointStore {
        async fn get_appliance(&self, id: &str) -> StoreResult<Option<ApplianceRow>> {
            Ok(lock(&self.appliances).iter().find(|a| a.id == id).cloned())
        }

        async fn find_appliance(
            &self,
            app: &str,
            customer: &str,
        ) -> StoreResult<Option<ApplianceRow>> {
            Ok(lock(&self.appliances)
                .iter()
                .find(|a| a.app == app && a.customer == customer && a.revoked_at.is_none())
                .cloned())
        }

        async fn get_endpoint(&self, id: &str) -> StoreResult<Option<EndpointRow>> {
            Ok(self.endpoint(id))
        }

        async fn list_endpoints_with_owner(
            &self,
            customer: Option<&str>,
        ) -> StoreResult<Vec<EndpointWithOwner>> {
            let appliances = lock(&self.appliances).clone();
            let mut rows: Vec<EndpointWithOwner> = self
                .endpoints_where(|_| true)
                .into_iter()
                .filter_map(|e| {
                    let a = appliances.iter().find(|a| a.id == e.appliance_id)?;
                    Some(EndpointWithOwner {
                        app: a.app.clone(),
                        customer: a.customer.clone(),
                        endpoint: e,
                    })
                })
                .filter(|r| customer.is_none_or(|c| r.customer == c))
                .collect();
            rows.sort_by(|a, b| {
                (a.endpoint.created_at, &a.endpoint.id)
                    .cmp(&(b.endpoint.created_at, &b.endpoint.id))
            });
            Ok(rows)
        }

        async fn active_endpoints(&self) -> StoreResult<Vec<EndpointRow>> {
            Ok(self.endpoints_where(|e| e.state == EndpointState::Active))
        }

        async fn active_endpoints_of(&self, appliance_id: &str) -> StoreResult<Vec<EndpointRow>> {
            Ok(self.endpoints_where(|e| {
                e.state == EndpointState::Active && e.appliance_id == appliance_id
            }))
        }

        async fn active_endpoints_of_grant(&self, grant_id: &str) -> StoreResult<Vec<EndpointRow>> {
            Ok(self.endpoints_where(|e| {
                e.state == EndpointState::Active && e.grant_id.as_deref() == Some(grant_id)
            }))
        }

        async fn insert_endpoint(&self, row: &EndpointRow) -> StoreResult<()> {
            let mut rows = lock(&self.endpoints);
            if rows.iter().any(|e| e.id == row.id) {
                return Err(StoreError::Corrupt(format!("endpoint {} exists", row.id)));
            }
            rows.push(row.clone());
            Ok(())
        }

        async fn activate_endpoint(
            &self,
            id: &str,
            expires_at: Timestamp,
            address: &str,
        ) -> StoreResult<bool> {
            let mut rows = lock(&self.endpoints);
            let Some(row) = rows
                .iter_mut()
                .find(|e| e.id == id && e.state == EndpointState::PendingApproval)
            else {
                return Ok(false);
            };
            row.state = endpoint_lifecycle::next(row.state, EndpointEvent::Approve)
                .map_err(|e| StoreError::IllegalTransition(e.to_string()))?;
            row.expires_at = expires_at;
            row.address = Some(address.into());
            Ok(true)
        }

        async fn move_endpoint(
            &self,
            id: &str,
            from: EndpointState,
            event: EndpointEvent,
            at: Timestamp,
        ) -> StoreResult<bool> {
            let to = endpoint_lifecycle::next(from, event)
                .map_err(|e| StoreError::IllegalTransition(format!("endpoint {id}: {e}")))?;
            if !endpoint_lifecycle::is_final(to) {
                return Err(StoreError::IllegalTransition(format!(
                    "endpoint {id}: {} is activate_endpoint's",
                    event.name()
                )));
            }
            let mut rows = lock(&self.endpoints);
            let Some(row) = rows.iter_mut().find(|e| e.id == id && e.state == from) else {
                return Ok(false);
            };
            row.state = to;
            row.ended_at = Some(at);
            Ok(true)
        }

        async fn set_endpoint_address(&self, id: &str, address: &str) -> StoreResult<()> {
            if let Some(row) = lock(&self.endpoints).iter_mut().find(|e| e.id == id) {
                row.address = Some(address.into());
            }
            Ok(())
        }
    }
}
