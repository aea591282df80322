//! The part of the store the grants service uses, as a trait: the SQL [`Store`] in the
//! gateway, an in-memory one in the unit tests.

use crate::ports::GrantMover;
use crate::store::{
    ApplianceRow, CustomerGrants, GrantChange, GrantRow, GrantWithOwner, Store, StoreResult,
};
use async_trait::async_trait;
use endpoint_types::{control::GrantState, lifecycle::grant::GrantEvent, resource::PolicySummary};
use jiff::Timestamp;

#[async_trait]
pub trait GrantStore: GrantMover {
    /// The live (not revoked) appliance for an app and customer.
    async fn find_appliance(&self, app: &str, customer: &str) -> StoreResult<Option<ApplianceRow>>;
    async fn get_appliance(&self, id: &str) -> StoreResult<Option<ApplianceRow>>;
    /// The policy the appliance last reported; None if it never reported one.
    async fn appliance_policy(&self, appliance_id: &str) -> StoreResult<Option<PolicySummary>>;
    /// The customer approver's steady-state switch; None if the appliance does not exist.
    async fn steady_state(&self, appliance_id: &str) -> StoreResult<Option<bool>>;
    async fn insert_grant(&self, grant: &GrantRow) -> StoreResult<()>;
    async fn get_grant(&self, id: &str) -> StoreResult<Option<GrantRow>>;
    /// The grant and its appliance; None if either is missing. The SQL store reads both in
    /// one join (a revocation burst pays one round trip to SQLite's worker, not two).
    async fn grant_with_appliance(
        &self,
        id: &str,
    ) -> StoreResult<Option<(GrantRow, ApplianceRow)>> {
        let Some(grant) = self.get_grant(id).await? else {
            return Ok(None);
        };
        Ok(self
            .get_appliance(&grant.appliance_id)
            .await?
            .map(|a| (grant, a)))
    }
    /// The grants of one appliance, oldest request first.
    async fn grants_of(&self, appliance_id: &str) -> StoreResult<Vec<GrantRow>>;
    /// Every grant with its appliance's app and customer, oldest request first; only
    /// `customer`'s when one is given.
    async fn list_grants_with_owner(
        &self,
        customer: Option<&str>,
    ) -> StoreResult<Vec<GrantWithOwner>>;
    /// Active grants run out by `now` whose `grant.expired` is not recorded yet, earliest
    /// first, at most `limit` (migration 0021).
    async fn unrecorded_expiries(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<GrantRow>>;
    /// The earliest expiry of an active grant not recorded yet.
    async fn next_unrecorded_expiry(&self) -> StoreResult<Option<Timestamp>>;
    /// True for exactly one caller per grant, while it is active: that caller records it.
    async fn claim_expiry_record(&self, id: &str, at: Timestamp) -> StoreResult<bool>;
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
    /// The kill switch's one read: the appliances of `customer` (of `app` only, when given)
    /// and their grants live at `now` (see [`Store::live_grants_of_customer`]).
    async fn live_grants_of_customer(
        &self,
        customer: &str,
        app: Option<&str>,
        now: Timestamp,
    ) -> StoreResult<CustomerGrants>;
    /// Revokes each `(id, from)` by compare-and-set on `from`, in one transaction; the ids
    /// moved (see [`Store::revoke_grants`]).
    async fn revoke_grants(
        &self,
        grants: &[(String, GrantState)],
        change: GrantChange<'_>,
    ) -> StoreResult<Vec<String>>;
    /// The active grants of all of `appliance_ids` in one read, oldest request first.
    async fn active_grants_of_appliances(
        &self,
        appliance_ids: &[String],
    ) -> StoreResult<Vec<GrantRow>>;
    /// Which of `grant_ids` still have an active endpoint. A store that does not keep
    /// endpoints answers all of them: the caller then asks the endpoints of each.
    async fn grants_with_active_endpoints(&self, grant_ids: &[String]) -> StoreResult<Vec<String>> {
        Ok(grant_ids.to_vec())
    }
}

#[async_trait]
impl GrantStore for Store {
    async fn live_grants_of_customer(
        &self,
        customer: &str,
        app: Option<&str>,
        now: Timestamp,
    ) -> StoreResult<CustomerGrants> {
        Store::live_grants_of_customer(self, customer, app, now).await
    }

    async fn revoke_grants(
        &self,
        grants: &[(String, GrantState)],
        change: GrantChange<'_>,
    ) -> StoreResult<Vec<String>> {
        Store::revoke_grants(self, grants, change).await
    }

    async fn active_grants_of_appliances(
        &self,
        appliance_ids: &[String],
    ) -> StoreResult<Vec<GrantRow>> {
        Store::active_grants_of_appliances(self, appliance_ids).await
    }

    async fn grants_with_active_endpoints(&self, grant_ids: &[String]) -> StoreResult<Vec<String>> {
        Store::grants_with_active_endpoints(self, grant_ids).await
    }

    async fn unrecorded_expiries(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<GrantRow>> {
        Store::unrecorded_expiries(self, now, limit).await
    }

    async fn next_unrecorded_expiry(&self) -> StoreResult<Option<Timestamp>> {
        Store::next_unrecorded_expiry(self).await
    }

    async fn claim_expiry_record(&self, id: &str, at: Timestamp) -> StoreResult<bool> {
        Store::claim_expiry_record(self, id, at).await
    }

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

    async fn find_appliance(&self, app: &str, customer: &str) -> StoreResult<Option<ApplianceRow>> {
        Store::find_appliance(self, app, customer).await
    }

    async fn get_appliance(&self, id: &str) -> StoreResult<Option<ApplianceRow>> {
        Store::get_appliance(self, id).await
    }

    async fn appliance_policy(&self, appliance_id: &str) -> StoreResult<Option<PolicySummary>> {
        Store::appliance_policy(self, appliance_id).await
    }

    async fn steady_state(&self, appliance_id: &str) -> StoreResult<Option<bool>> {
        Store::steady_state(self, appliance_id).await
    }

    async fn insert_grant(&self, grant: &GrantRow) -> StoreResult<()> {
        Store::insert_grant(self, grant).await
    }

    async fn get_grant(&self, id: &str) -> StoreResult<Option<GrantRow>> {
        Store::get_grant(self, id).await
    }

    async fn grants_of(&self, appliance_id: &str) -> StoreResult<Vec<GrantRow>> {
        Store::grants_of(self, appliance_id).await
    }

    async fn grant_with_appliance(
        &self,
        id: &str,
    ) -> StoreResult<Option<(GrantRow, ApplianceRow)>> {
        Store::grant_with_appliance(self, id).await
    }

    async fn list_grants_with_owner(
        &self,
        customer: Option<&str>,
    ) -> StoreResult<Vec<GrantWithOwner>> {
        Store::list_grants_with_owner(self, customer).await
    }
}

#[async_trait]
impl GrantMover for Store {
    async fn move_grant(
        &self,
        id: &str,
        from: GrantState,
        event: GrantEvent,
        change: GrantChange<'_>,
    ) -> StoreResult<bool> {
        Store::move_grant(self, id, from, event, change).await
    }
}
