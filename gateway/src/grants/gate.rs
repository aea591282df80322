//! What the customer's policy allows by itself, and whether an operate grant is live: the
//! checks ops and endpoints make before anything reaches the appliance.

use super::{internal, Grants, BY_POLICY_AUTOMATIC, BY_POLICY_WINDOW};
use crate::{
    ports::GrantGate,
    store::{ApplianceRow, GrantRow},
};
use async_trait::async_trait;
use endpoint_types::{
    control::{GrantLevel, GrantState},
    lifecycle::grant_state,
    policy::Decision,
    resource::PolicySummary,
    ApiError, ErrorCode,
};
use jiff::Timestamp;

pub fn access_hint(app: &str, customer: &str) -> String {
    format!("request it: postern access request --app {app} --customer {customer} --level operate --duration 30m --reason \"…\"")
}

impl Grants {
    /// Steady-state is on unless the customer turned it off, in its agent.toml or through an
    /// approver.
    pub async fn steady_state_enabled(&self, appliance_id: &str) -> bool {
        let by_config = self.policy_of(appliance_id).await.steady_state;
        let by_approver = self
            .store
            .steady_state(appliance_id)
            .await
            .ok()
            .flatten()
            .unwrap_or(true);
        by_config && by_approver
    }

    /// The customer's policy as the appliance last reported it. Unknown (never connected) is
    /// treated as `manual`: a person decides.
    pub async fn policy_of(&self, appliance_id: &str) -> PolicySummary {
        if let Some(view) = self.agents.view(appliance_id) {
            return view.policy;
        }
        self.store
            .appliance_policy(appliance_id)
            .await
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// What the policy of `phase` says at `now`, as (decided_by, latest expiry) when it
    /// approves by itself (install never: a person decides each use).
    pub async fn automatic_decision(
        &self,
        appliance_id: &str,
        phase: GrantLevel,
        now: Timestamp,
    ) -> Option<(&'static str, Option<Timestamp>)> {
        let summary = self.policy_of(appliance_id).await;
        let ruling = endpoint_types::phase_policy::ruling(&summary, phase, now);
        if ruling.person_because == Some(endpoint_types::phase_policy::PersonBecause::Unusable) {
            tracing::warn!(appliance = %appliance_id, table = %ruling.table, "appliance reported an unusable policy; a person must decide");
        }
        match ruling.decision {
            Decision::Automatic => Some((BY_POLICY_AUTOMATIC, None)),
            Decision::InWindow { closes_at } => Some((BY_POLICY_WINDOW, Some(closes_at))),
            Decision::NeedsPerson => None,
        }
    }

    /// The live operate grant that authorises an op or endpoint at `now`, or the structured
    /// refusal: OPERATE_ACCESS_EXPIRED when one was approved and has ended, otherwise
    /// OPERATE_ACCESS_REQUIRED.
    pub async fn require_operate(
        &self,
        appliance: &ApplianceRow,
        now: Timestamp,
    ) -> Result<GrantRow, ApiError> {
        let grants = self
            .store
            .grants_of(&appliance.id)
            .await
            .map_err(internal)?;
        let operate: Vec<&GrantRow> = grants
            .iter()
            .filter(|g| g.level == GrantLevel::Operate)
            .collect();
        if let Some(live) = operate
            .iter()
            .filter(|g| grant_state(g.state, g.expires_at, now) == GrantState::Active)
            .max_by_key(|g| g.expires_at)
        {
            return Ok((*live).clone());
        }
        let hint = access_hint(&appliance.app, &appliance.customer);
        if let Some(last) = operate
            .iter()
            .filter(|g| g.decided_at.is_some() && g.state != GrantState::Denied)
            .max_by_key(|g| g.expires_at)
        {
            return Err(ApiError::new(
                ErrorCode::OperateAccessExpired,
                format!(
                    "the operate grant {} on {}/{} has ended",
                    last.id, appliance.app, appliance.customer
                ),
            )
            .hint(hint)
            .details(serde_json::json!({"grant_id": last.id, "expired_at": last.expires_at})));
        }
        Err(ApiError::new(
            ErrorCode::OperateAccessRequired,
            format!(
                "no live operate grant on {}/{}",
                appliance.app, appliance.customer
            ),
        )
        .hint(hint))
    }
}

#[async_trait]
impl GrantGate for Grants {
    async fn require_phase(
        &self,
        appliance: &ApplianceRow,
        phase: GrantLevel,
        now: Timestamp,
    ) -> Result<GrantRow, ApiError> {
        if phase == GrantLevel::Operate {
            return Grants::require_operate(self, appliance, now).await;
        }
        let grants = self
            .store
            .grants_of(&appliance.id)
            .await
            .map_err(internal)?;
        grants
            .into_iter()
            .filter(|g| {
                endpoint_types::phase::grant_authorises(
                    g.level,
                    phase,
                    grant_state(g.state, g.expires_at, now),
                )
            })
            .max_by_key(|g| g.expires_at)
            .ok_or_else(|| {
                endpoint_types::phase::grant_required(phase, &appliance.app, &appliance.customer)
            })
    }

    async fn require_operate(
        &self,
        appliance: &ApplianceRow,
        now: Timestamp,
    ) -> Result<GrantRow, ApiError> {
        Grants::require_operate(self, appliance, now).await
    }

    async fn automatic_decision(
        &self,
        appliance_id: &str,
        phase: GrantLevel,
        now: Timestamp,
    ) -> Option<(&'static str, Option<Timestamp>)> {
        Grants::automatic_decision(self, appliance_id, phase, now).await
    }

    async fn policy_of(&self, appliance_id: &str) -> PolicySummary {
        Grants::policy_of(self, appliance_id).await
    }
}
