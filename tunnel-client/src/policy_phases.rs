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
    pub fn parse(
        summary: &PolicySummary,
    ) -> Result<PhasePolicies, endpoint_types::policy::PolicyError> {
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
    pub fn ruling(
        &self,
        phase: GrantLevel,
        now: jiff::Timestamp,
    ) -> endpoint_types::phase_policy::Ruling {
        endpoint_types::phase_policy::ruling(&self.summary, phase, now)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::AgentConfig;
    use endpoint_types::{control::GrantLevel, phase_policy::ruling, resource::ApprovalMode};
    use std::path::Path;

    fn parse(policy: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(
            &format!("audit_path = \"a\"\n{policy}"),
            Path::new("/etc/postern/agent.toml"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_phase_table_takes_what_it_leaves_out_from_policy() {
        let c = parse(
            "[policy]\napproval = \"manual\"\ntime_zone = \"Europe/Berlin\"\nwindows = [\"Mon-Fri 09:00-17:00\"]\n\n\
             [policy.deploy]\napproval = \"windows\"\nwindows = [\"Sat 02:00-06:00\"]\n\n\
             [policy.operate]\napproval = \"windows\"\n",
        )
        .unwrap();
        let s = c.policy_summary();
        assert_eq!(s.approval, ApprovalMode::Manual);
        let deploy = s
            .phases
            .iter()
            .find(|p| p.phase == GrantLevel::Deploy)
            .unwrap();
        assert_eq!(deploy.windows, vec!["Sat 02:00-06:00".to_string()]);
        assert_eq!(deploy.time_zone.as_deref(), Some("Europe/Berlin"));
        let operate = s
            .phases
            .iter()
            .find(|p| p.phase == GrantLevel::Operate)
            .unwrap();
        assert_eq!(operate.windows, vec!["Mon-Fri 09:00-17:00".to_string()]);
        assert!(!s.phases.iter().any(|p| p.phase == GrantLevel::Install));
        // Saturday 2026-12-05 03:00 Berlin: the deploy window is open, operate's is not.
        let at = "2026-12-05T02:00:00Z".parse().unwrap();
        assert_eq!(
            ruling(&s, GrantLevel::Deploy, at).rule(),
            "policy:window under [policy.deploy]"
        );
        assert_eq!(
            ruling(&s, GrantLevel::Operate, at).rule(),
            "a person: outside the windows of [policy.operate]"
        );
        assert_eq!(
            ruling(&s, GrantLevel::Install, at).rule(),
            "a person: install is approved by a person for each use, whatever the policy"
        );
    }

    #[test]
    fn what_a_phase_table_cannot_mean_is_refused_in_words_naming_it() {
        let cases = [
            ("[policy.deplyo]\napproval = \"manual\"\n", "deplyo"),
            ("[policy.deploy]\napprovl = \"manual\"\n", "approvl"),
            (
                "[policy.steady-state]\napproval = \"automatic\"\n",
                "[policy.steady-state] is not a policy table",
            ),
            (
                "[policy.install]\napproval = \"windows\"\nwindows = [\"Sat 02:00-06:00\"]\n",
                "[policy.install] approval = \"windows\": install is approved by a person",
            ),
            (
                "[policy.deploy]\napproval = \"windows\"\n",
                "[policy.deploy] approval = \"windows\" needs at least one entry",
            ),
            (
                "[policy.operate]\nwindows = [\"Mon 9:00-17:00\"]\n",
                "[policy.operate] windows",
            ),
        ];
        for (text, says) in cases {
            let e = parse(&format!("[policy]\napproval = \"manual\"\n{text}")).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
        // A manual install table says what install is anyway, and is fine.
        parse("[policy.install]\napproval = \"manual\"\n").unwrap();
    }
}
