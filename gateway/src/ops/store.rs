//! What ops need from the store, and nothing else: ops and the appliances they run on.

use crate::store::{ApplianceRow, OpRow, Store, StoreResult};
use async_trait::async_trait;
use endpoint_types::{
    approval::SignedDecision,
    control::{ApprovalStage, OpState},
};

/// The store as the ops service sees it. [`Store`] is the real one; the unit tests run on an
/// in-memory one with the same contract.
#[async_trait]
pub trait OpStore: Send + Sync {
    async fn get_op(&self, id: &str) -> StoreResult<Option<OpRow>>;
    async fn insert_op(&self, op: &OpRow) -> StoreResult<()>;
    /// Compare-and-set on the stored state (see [`Store::update_op`]): false if another writer
    /// moved the op on, or it does not exist.
    async fn update_op(&self, op: &OpRow, expected: OpState) -> StoreResult<bool>;
    /// The ops of one appliance, oldest request first.
    async fn ops_of(&self, appliance_id: &str) -> StoreResult<Vec<OpRow>>;
    /// Appends streamed output, each stream capped (see [`Store::append_op_output`]): false if
    /// the op is not producing output.
    async fn append_op_output(&self, id: &str, stdout: &str, stderr: &str) -> StoreResult<bool>;
    async fn get_appliance(&self, id: &str) -> StoreResult<Option<ApplianceRow>>;
    /// The live (not revoked) appliance of an app at a customer.
    async fn find_appliance(&self, app: &str, customer: &str) -> StoreResult<Option<ApplianceRow>>;
    /// Every op with its appliance, oldest request first; only `customer`'s when given.
    async fn ops_with_appliance(
        &self,
        customer: Option<&str>,
    ) -> StoreResult<Vec<(OpRow, ApplianceRow)>>;
    /// The approver's signed decision on op `id` at `stage`, as kept (see
    /// `approvals::SignedDecisions`).
    async fn signed_decision(
        &self,
        id: &str,
        stage: ApprovalStage,
    ) -> StoreResult<Option<SignedDecision>>;
}

#[async_trait]
impl OpStore for Store {
    async fn get_op(&self, id: &str) -> StoreResult<Option<OpRow>> {
        Store::get_op(self, id).await
    }

    async fn insert_op(&self, op: &OpRow) -> StoreResult<()> {
        Store::insert_op(self, op).await
    }

    async fn update_op(&self, op: &OpRow, expected: OpState) -> StoreResult<bool> {
        Store::update_op(self, op, expected).await
    }

    async fn ops_of(&self, appliance_id: &str) -> StoreResult<Vec<OpRow>> {
        Store::ops_of(self, appliance_id).await
    }

    async fn append_op_output(&self, id: &str, stdout: &str, stderr: &str) -> StoreResult<bool> {
        Store::append_op_output(self, id, stdout, stderr).await
    }

    async fn get_appliance(&self, id: &str) -> StoreResult<Option<ApplianceRow>> {
        Store::get_appliance(self, id).await
    }

    async fn find_appliance(&self, app: &str, customer: &str) -> StoreResult<Option<ApplianceRow>> {
        Store::find_appliance(self, app, customer).await
    }

    async fn ops_with_appliance(
        &self,
        customer: Option<&str>,
    ) -> StoreResult<Vec<(OpRow, ApplianceRow)>> {
        Store::list_ops_with_appliance(self, customer).await
    }

    async fn signed_decision(
        &self,
        id: &str,
        stage: ApprovalStage,
    ) -> StoreResult<Option<SignedDecision>> {
        crate::approvals::SignedDecisions::get(self, id, stage).await
    }
}
