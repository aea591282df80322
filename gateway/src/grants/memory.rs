//! An in-memory [`GrantStore`] for the unit tests: the same compare-and-set rules as the SQL
//! store's `move_grant`, without a database.

use super::GrantStore;
use crate::ports::GrantMover;
use crate::store::{
    ApplianceRow, CustomerGrants, GrantChange, GrantRow, GrantWithOwner, StoreError, StoreResult,
};
use async_trait::async_trait;
use endpoint_types::{
    control::GrantState,
    lifecycle::grant::{self, GrantEvent},
    resource::PolicySummary,
};
use jiff::Timestamp;
use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
};

#[derive(Debug, Default)]
struct Tables {
    appliances: Vec<ApplianceRow>,
    policies: HashMap<String, PolicySummary>,
    steady_state_disabled: HashMap<String, bool>,
    grants: Vec<GrantRow>,
    expiry_recorded: std::collections::HashSet<String>,
    /// States other requests give these grants just before the next bulk revocation writes
    /// (a race the kill switch loses for them).
    moved_meanwhile: Vec<(String, GrantState)>,
}

#[derive(Debug, Default)]
pub struct MemoryGrantStore(Mutex<Tables>);

pub fn appliance(id: &str, app: &str, customer: &str) -> ApplianceRow {
    ApplianceRow {
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
    }
}

impl MemoryGrantStore {
    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_appliance(&self, a: ApplianceRow) {
        self.tables().appliances.push(a);
    }

    /// The policy as if the agent had reported it in a hello (and since disconnected).
    pub fn set_policy(&self, appliance_id: &str, policy: PolicySummary) {
        self.tables().policies.insert(appliance_id.into(), policy);
    }

    pub fn set_steady_state(&self, appliance_id: &str, enabled: bool) {
        self.tables()
            .steady_state_disabled
            .insert(appliance_id.into(), !enabled);
    }

    /// Has grant `id` moved to `state` by another request between the next bulk revocation's
    /// read and its write.
    pub fn move_before_next_revocation(&self, id: &str, state: GrantState) {
        self.tables().moved_meanwhile.push((id.into(), state));
    }

    pub fn grant(&self, id: &str) -> Option<GrantRow> {
        self.tables().grants.iter().find(|g| g.id == id).cloned()
    }

    fn sorted(mut grants: Vec<GrantRow>) -> Vec<GrantRow> {
        grants.sort_by(|a, b| (a.requested_at, &a.id).cmp(&(b.requested_at, &b.id)));
        grants
    }
}

#[async_trait]
impl GrantStore for MemoryGrantStore {
    async fn live_grants_of_customer(
        &self,
        customer: &str,
        app: Option<&str>,
        now: Timestamp,
    ) -> StoreResult<CustomerGrants> {
        let t = self.tables();
        let mut appliances: Vec<(String, String)> = t
            .appliances
            .iter()
            .filter(|a| a.customer == customer && app.is_none_or(|app| a.app == app))
            .map(|a| (a.id.clone(), a.app.clone()))
            .collect();
        appliances.sort();
        let live = Self::sorted(t.grants.clone())
            .into_iter()
            .filter(|g| match g.state {
                GrantState::PendingApproval => true,
                GrantState::Active => g.expires_at.is_none_or(|e| e > now),
                _ => false,
            })
            .filter_map(|grant| {
                let (_, app) = appliances
                    .iter()
                    .find(|(id, _)| *id == grant.appliance_id)?;
                Some(GrantWithOwner {
                    app: app.clone(),
                    customer: customer.to_string(),
                    grant,
                })
            })
            .collect();
        Ok(CustomerGrants { appliances, live })
    }

    async fn revoke_grants(
        &self,
        grants: &[(String, GrantState)],
        change: GrantChange<'_>,
    ) -> StoreResult<Vec<String>> {
        let mut moves = Vec::with_capacity(grants.len());
        for (id, from) in grants {
            let to = grant::next(*from, GrantEvent::Revoke)
                .map_err(|e| StoreError::IllegalTransition(format!("grant {id}: {e}")))?;
            moves.push((id, *from, to));
        }
        let mut t = self.tables();
        for (id, state) in std::mem::take(&mut t.moved_meanwhile) {
            if let Some(g) = t.grants.iter_mut().find(|g| g.id == id) {
                if g.state == GrantState::PendingApproval && state == GrantState::Active {
                    // Approved by the policy, for a day from its request.
                    g.decided_by = Some("policy:automatic".into());
                    g.decided_at = Some(g.requested_at);
                    g.expires_at = Some(g.requested_at + jiff::SignedDuration::from_hours(24));
                }
                g.state = state;
            }
        }
        let mut moved = Vec::new();
        for (id, from, to) in moves {
            let Some(row) = t.grants.iter_mut().find(|g| g.id == *id && g.state == from) else {
                continue;
            };
            if row.state == GrantState::Active && row.expires_at.is_some_and(|e| e <= change.at) {
                continue;
            }
            row.state = to;
            moved.push(id.clone());
        }
        Ok(moved)
    }

    async fn active_grants_of_appliances(
        &self,
        appliance_ids: &[String],
    ) -> StoreResult<Vec<GrantRow>> {
        let grants = self
            .tables()
            .grants
            .iter()
            .filter(|g| g.state == GrantState::Active && appliance_ids.contains(&g.appliance_id))
            .cloned()
            .collect();
        Ok(Self::sorted(grants))
    }

    async fn unrecorded_expiries(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<GrantRow>> {
        let t = self.tables();
        let mut due: Vec<GrantRow> = t
            .grants
            .iter()
            .filter(|g| {
                g.state == GrantState::Active
                    && g.expires_at.is_some_and(|e| e <= now)
                    && !t.expiry_recorded.contains(&g.id)
            })
            .cloned()
            .collect();
        due.sort_by(|a, b| (a.expires_at, &a.id).cmp(&(b.expires_at, &b.id)));
        due.truncate(limit as usize);
        Ok(due)
    }

    async fn next_unrecorded_expiry(&self) -> StoreResult<Option<Timestamp>> {
        let t = self.tables();
        Ok(t.grants
            .iter()
            .filter(|g| g.state == GrantState::Active && !t.expiry_recorded.contains(&g.id))
            .filter_map(|g| g.expires_at)
            .min())
    }

    async fn claim_expiry_record(&self, id: &str, _at: Timestamp) -> StoreResult<bool> {
        let mut t = self.tables();
        let active = t
            .grants
            .iter()
            .any(|g| g.id == id && g.state == GrantState::Active);
        Ok(active && t.expiry_recorded.insert(id.to_string()))
    }

    async fn find_appliance(&self, app: &str, customer: &str) -> StoreResult<Option<ApplianceRow>> {
        Ok(self
            .tables()
            .appliances
            .iter()
            .find(|a| a.app == app && a.customer == customer && a.revoked_at.is_none())
            .cloned())
    }

    async fn get_appliance(&self, id: &str) -> StoreResult<Option<ApplianceRow>> {
        Ok(self
            .tables()
            .appliances
            .iter()
            .find(|a| a.id == id)
            .cloned())
    }

    async fn appliance_policy(&self, appliance_id: &str) -> StoreResult<Option<PolicySummary>> {
        Ok(self.tables().policies.get(appliance_id).cloned())
    }

    async fn steady_state(&self, appliance_id: &str) -> StoreResult<Option<bool>> {
        let t = self.tables();
        if !t.appliances.iter().any(|a| a.id == appliance_id) {
            return Ok(None);
        }
        Ok(Some(
            !t.steady_state_disabled
                .get(appliance_id)
                .copied()
                .unwrap_or(false),
        ))
    }

    async fn insert_grant(&self, grant: &GrantRow) -> StoreResult<()> {
        let mut t = self.tables();
        if t.grants.iter().any(|g| g.id == grant.id) {
            return Err(StoreError::Corrupt(format!("grant {} exists", grant.id)));
        }
        t.grants.push(grant.clone());
        Ok(())
    }

    async fn get_grant(&self, id: &str) -> StoreResult<Option<GrantRow>> {
        Ok(self.grant(id))
    }

    async fn grants_of(&self, appliance_id: &str) -> StoreResult<Vec<GrantRow>> {
        let grants = self
            .tables()
            .grants
            .iter()
            .filter(|g| g.appliance_id == appliance_id)
            .cloned()
            .collect();
        Ok(Self::sorted(grants))
    }

    async fn list_grants_with_owner(
        &self,
        customer: Option<&str>,
    ) -> StoreResult<Vec<GrantWithOwner>> {
        let t = self.tables();
        let grants = Self::sorted(t.grants.clone());
        Ok(grants
            .into_iter()
            .filter_map(|grant| {
                let a = t.appliances.iter().find(|a| a.id == grant.appliance_id)?;
                if customer.is_some_and(|c| c != a.customer) {
                    return None;
                }
                Some(GrantWithOwner {
                    app: a.app.clone(),
                    customer: a.customer.clone(),
                    grant,
                })
            })
            .collect())
    }
}

#[async_trait]
impl GrantMover for MemoryGrantStore {
    async fn move_grant(
        &self,
        id: &str,
        from: GrantState,
        event: GrantEvent,
        change: GrantChange<'_>,
    ) -> StoreResult<bool> {
        let to = grant::next(from, event)
            .map_err(|e| StoreError::IllegalTransition(format!("grant {id}: {e}")))?;
        if event == GrantEvent::Expire {
            return Err(StoreError::IllegalTransition(format!(
                "grant {id}: expiry is derived from expires_at, never stored"
            )));
        }
        let mut t = self.tables();
        let Some(row) = t.grants.iter_mut().find(|g| g.id == id && g.state == from) else {
            return Ok(false);
        };
        let live = row.state != GrantState::Active || row.expires_at.is_none_or(|e| e > change.at);
        match event {
            GrantEvent::Approve | GrantEvent::Deny => {
                row.state = to;
                row.decided_by = Some(change.by.to_string());
                row.decided_at = Some(change.at);
                row.message = change.message.map(str::to_string);
                row.expires_at = change.expires_at;
            }
            GrantEvent::Revoke if live => row.state = to,
            _ => return Ok(false),
        }
        Ok(true)
    }
}
