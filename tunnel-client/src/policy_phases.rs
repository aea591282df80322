//! `[policy.deploy]`, `[policy.operate]`, `[policy.install]`: the approval policy of one phase.
//!
//! A key a phase table leaves out is `[policy]`'s; a phase without a table follows `[policy]`
//! (see `endpoint_types::phase_policy`, which both the agent and the gateway decide with).
//! Install is a person's decision for each use whatever the policy, so `[policy.install]` may
//! only say so (`approval = "manual"` or `"always-require"`). Steady-state has no table: it
//! opens no endpoint and runs no op, and its switch is `[policy] steady_state`.

use crate::config::PolicyConfig;
use endpoint_types::{
    control::GrantLevel,
    phase_policy::PhasePolicySummary,
    policy::Policy,
    resource::{ApprovalMode, PolicySummary},
};
use serde::Deserialize;

/// One `[policy.<phase>]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhasePolicyConfig {
    pub approval: Option<ApprovalMode>,
    pub time_zone: Option<String>,
    pub windows: Option<Vec<String>>,
    pub maintenance: Option<Vec<String>>,
}

impl PhasePolicyConfig {
    /// The table with what it leaves out taken from `[policy]`.
    fn resolve(&self, phase: GrantLevel, global: &PolicyConfig) -> PhasePolicySummary {
        PhasePolicySummary {
            phase,
            approval: self.approval.unwrap_or(global.approval),
            time_zone: self.time_zone.clone().or_else(|| global.time_zone.clone()),
            windows: self
                .windows
                .clone()
                .unwrap_or_else(|| global.windows.clone()),
            maintenance: self
                .maintenance
                .clone()
                .unwrap_or_else(|| global.maintenance.clone()),
        }
    }
}

/// The phase tables written, in a fixed order.
fn tables(p: &PolicyConfig) -> impl Iterator<Item = (GrantLevel, &PhasePolicyConfig)> {
    [
        (GrantLevel::Deploy, p.deploy.as_ref()),
        (GrantLevel::Operate, p.operate.as_ref()),
        (GrantLevel::Install, p.install.as_ref()),
    ]
    .into_iter()
    .filter_map(|(phase, t)| t.map(|t| (phase, t)))
}

/// The resolved phase tables, as reported in the hello.
pub fn summaries(p: &PolicyConfig) -> Vec<PhasePolicySummary> {
    tables(p).map(|(phase, t)| t.resolve(phase, p)).collect()
}

/// Refuses what a phase table cannot mean, in words that name the table; each resolved table
/// is parsed with the parser the gateway evaluates it with.
pub fn validate(p: &PolicyConfig) -> Result<(), String> {
    if p.steady_state_table.is_some() {
        return Err("[policy.steady-state] is not a policy table: steady-state opens no endpoint and runs no op; turn it off with `steady_state = false` under [policy] (phases with their own policy: deploy, operate, install)".into());
    }
    if let Some(install) = &p.install {
        if let Some(mode @ (ApprovalMode::Automatic | ApprovalMode::Windows)) = install.approval {
            let name = if mode == ApprovalMode::Automatic {
                "automatic"
            } else {
                "windows"
            };
            return Err(format!("[policy.install] approval = \"{name}\": install is approved by a person for each use, whatever the policy; write approval = \"manual\" or leave the table out"));
        }
    }
    for (phase, t) in tables(p) {
        let r = t.resolve(phase, p);
        Policy::parse(&PolicySummary {
            approval: r.approval,
            time_zone: r.time_zone,
            windows: r.windows,
            maintenance: r.maintenance,
            ..Default::default()
        })
        .map_err(|e| format!("[policy.{}] {e}", phase.as_str()))?;
    }
    Ok(())
}

/// The parsed policy of each phase, for the op runner's check at dispatch.
#[derive(Debug, Clone)]
pub struct PhasePolicies {
    summary: PolicySummary,
    global: Policy,
    own: Vec<(GrantLevel, Policy)>,
}

impl PhasePolicies {
    pub fn parse(summary: &PolicySummary) -> Result<PhasePolicies, endpoint_types::policy::PolicyError> {
        let global = Policy::parse(summary)?;
        let mut own = Vec::with_capacity(summary.phases.len());
        for p in &summary.phases {
            let (resolved, _) = endpoint_types::phase_policy::summary_for(summary, p.phase);
            own.push((p.phase, Policy::parse(&resolved)?));
        }
        Ok(PhasePolicies {
            summary: summary.clone(),
            global,
            own,
        })
    }

    /// `[policy.<phase>]`, else `[policy]`.
    pub fn of(&self, phase: GrantLevel) -> &Policy {
        self.own
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, policy)| policy)
            .unwrap_or(&self.global)
    }

    /// What the policy of `phase` says at `now`, and which rule said it.
    pub fn ruling(&self, phase: GrantLevel, now: jiff::Timestamp) -> endpoint_types::phase_policy::Ruling {
        endpoint_types::phase_policy::ruling(&self.summary, phase, now)
    }
}
