//! An [`OpStore`] in memory for the unit tests, with the contract of the SQL store: a
//! compare-and-set on the state, no write to an ended op, output only while an op produces it
//! and capped per stream.

use super::OpStore;
use crate::store::{within_cap, ApplianceRow, OpRow, StoreError, StoreResult};
use async_trait::async_trait;
use endpoint_types::control::OpState;
use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Mutex, MutexGuard,
};

#[derive(Debug, Default)]
pub struct MemoryOpStore {
    ops: Mutex<Vec<OpRow>>,
    /// Signed decisions by (op id, stage).
    pub signed: crate::approvals::signed::memory::MemorySignedDecisions,
    appliances: Mutex<Vec<ApplianceRow>>,
    /// This many compare-and-sets fail as if another writer had just moved the op.
    pub lost_races: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryOpStore {
    pub fn add_appliance(&self, a: ApplianceRow) {
        lock(&self.appliances).push(a);
    }

    /// Puts an op in as it is, whatever its state (a test's starting point).
    pub fn put_op(&self, op: OpRow) {
        let mut ops = lock(&self.ops);
        ops.retain(|o| o.id != op.id);
        ops.push(op);
    }

    pub fn op(&self, id: &str) -> Option<OpRow> {
        lock(&self.ops).iter().find(|o| o.id == id).cloned()
    }

    pub fn all_ops(&self) -> Vec<OpRow> {
        lock(&self.ops).clone()
    }

    fn sorted(mut ops: Vec<OpRow>) -> Vec<OpRow> {
        ops.sort_by(|a, b| (a.requested_at, &a.id).cmp(&(b.requested_at, &b.id)));
        ops
    }
}

#[async_trait]
impl OpStore for MemoryOpStore {
    async fn signed_decision(
        &self,
        id: &str,
        stage: endpoint_types::control::ApprovalStage,
    ) -> StoreResult<Option<endpoint_types::approval::SignedDecision>> {
        crate::approvals::SignedDecisions::get(&self.signed, id, stage).await
    }

    async fn get_op(&self, id: &str) -> StoreResult<Option<OpRow>> {
        Ok(self.op(id))
    }

    async fn insert_op(&self, op: &OpRow) -> StoreResult<()> {
        let mut ops = lock(&self.ops);
        if ops.iter().any(|o| o.id == op.id) {
            return Err(StoreError::Corrupt(format!("op {} exists", op.id)));
        }
        ops.push(op.clone());
        Ok(())
    }

    async fn update_op(&self, op: &OpRow, expected: OpState) -> StoreResult<bool> {
        if expected.is_final() {
            return Err(StoreError::IllegalTransition(format!(
                "op {} has ended as {}",
                op.id,
                expected.as_str()
            )));
        }
        let lost = self
            .lost_races
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if lost.is_ok() {
            return Ok(false);
        }
        let mut ops = lock(&self.ops);
        let Some(stored) = ops
            .iter_mut()
            .find(|o| o.id == op.id && o.state == expected)
        else {
            return Ok(false);
        };
        // Everything but the request itself, as the SQL store's UPDATE.
        *stored = OpRow {
            id: stored.id.clone(),
            appliance_id: stored.appliance_id.clone(),
            tool: stored.tool,
            command: stored.command.clone(),
            origin_resource_id: stored.origin_resource_id.clone(),
            timeout: stored.timeout,
            requested_by: stored.requested_by.clone(),
            requested_by_id: stored.requested_by_id.clone(),
            requested_at: stored.requested_at,
            ..op.clone()
        };
        Ok(true)
    }

    async fn ops_of(&self, appliance_id: &str) -> StoreResult<Vec<OpRow>> {
        let ops = lock(&self.ops)
            .iter()
            .filter(|o| o.appliance_id == appliance_id)
            .cloned()
            .collect();
        Ok(MemoryOpStore::sorted(ops))
    }

    async fn append_op_output(&self, id: &str, stdout: &str, stderr: &str) -> StoreResult<bool> {
        let mut ops = lock(&self.ops);
        let Some(op) = ops.iter_mut().find(|o| o.id == id) else {
            return Ok(false);
        };
        if !matches!(op.state, OpState::Running | OpState::OutputPendingApproval) {
            return Ok(false);
        }
        let mut cut = false;
        for (stream, add) in [(&mut op.stdout, stdout), (&mut op.stderr, stderr)] {
            let have = stream.as_deref().map_or(0, str::len);
            let (fits, was_cut) = within_cap(have, add);
            stream.get_or_insert_with(String::new).push_str(fits);
            cut |= was_cut;
        }
        op.truncated |= cut;
        Ok(true)
    }

    async fn get_appliance(&self, id: &str) -> StoreResult<Option<ApplianceRow>> {
        Ok(lock(&self.appliances).iter().find(|a| a.id == id).cloned())
    }

    async fn find_appliance(&self, app: &str, customer: &str) -> StoreResult<Option<ApplianceRow>> {
        Ok(lock(&self.appliances)
            .iter()
            .find(|a| a.app == app && a.customer == customer && a.revoked_at.is_none())
            .cloned())
    }

    async fn ops_with_appliance(
        &self,
        customer: Option<&str>,
    ) -> StoreResult<Vec<(OpRow, ApplianceRow)>> {
        let appliances = lock(&self.appliances).clone();
        Ok(MemoryOpStore::sorted(lock(&self.ops).clone())
            .into_iter()
            .filter_map(|o| {
                let a = appliances.iter().find(|a| a.id == o.appliance_id)?;
                customer
                    .is_none_or(|c| a.customer == c)
                    .then(|| (o, a.clone()))
            })
            .collect())
    }
}
