//! The grants service reached through the [`Gateway`], for the modules that do not hold it
//! (or a [`GrantGate`]) yet.

use crate::{
    identity::Caller,
    ports::GrantGate,
    server::Gateway,
    store::{ApplianceRow, GrantRow},
};
use async_trait::async_trait;
use endpoint_types::{control::GrantRecord, resource::PolicySummary, ApiError};
use jiff::Timestamp;
use std::sync::Arc;

/// The gateway's grants service as [`GrantGate`].
pub struct GatewayGrants(pub Arc<Gateway>);

#[async_trait]
impl GrantGate for GatewayGrants {
    async fn require_operate(
        &self,
        appliance: &ApplianceRow,
        now: Timestamp,
    ) -> Result<GrantRow, ApiError> {
        self.0.grants.require_operate(appliance, now).await
    }

    async fn automatic_decision(
        &self,
        appliance_id: &str,
        now: Timestamp,
    ) -> Option<(&'static str, Option<Timestamp>)> {
        self.0.grants.automatic_decision(appliance_id, now).await
    }

    async fn policy_of(&self, appliance_id: &str) -> PolicySummary {
        self.0.grants.policy_of(appliance_id).await
    }
}

// Until callers hold a GrantGate
pub async fn steady_state_enabled(gw: &Gateway, appliance_id: &str) -> bool {
    gw.grants.steady_state_enabled(appliance_id).await
}

// Until callers hold a GrantGate
pub async fn policy_of(gw: &Gateway, appliance_id: &str) -> PolicySummary {
    gw.grants.policy_of(appliance_id).await
}

// Until callers hold a GrantGate
pub async fn automatic_decision(
    gw: &Gateway,
    appliance_id: &str,
    now: Timestamp,
) -> Option<(&'static str, Option<Timestamp>)> {
    gw.grants.automatic_decision(appliance_id, now).await
}

// Until callers hold a GrantGate
pub async fn require_operate(
    gw: &Gateway,
    appliance: &ApplianceRow,
    now: Timestamp,
) -> Result<GrantRow, ApiError> {
    gw.grants.require_operate(appliance, now).await
}

// Until callers hold a GrantGate (approvals lists and decides grants through these)
pub async fn list(gw: &Gateway, caller: &Caller) -> Result<Vec<GrantRecord>, ApiError> {
    gw.grants.list(caller).await
}

// Until callers hold a GrantGate (approvals lists and decides grants through these)
pub async fn decide(
    gw: &Gateway,
    caller: &Caller,
    id: &str,
    approve: bool,
    message: Option<String>,
) -> Result<GrantRecord, ApiError> {
    gw.grants.decide(caller, id, approve, message).await
}
