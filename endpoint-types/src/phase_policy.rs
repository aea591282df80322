//! Policy per phase: `[policy.deploy]`, `[policy.operate]`, `[policy.install]` in `agent.toml`.
//!
//! A phase with its own table is decided by that table; a key the table leaves out is taken
//! from `[policy]`, and a phase without a table is decided by `[policy]` alone. The agent
//! resolves each table against `[policy]` and reports it in the hello
//! ([`PolicySummary::phases`]), so the gateway (what it approves by itself) and the agent (what
//! it accepts without a person's signature) read the same policy for the same phase through
//! [`ruling`]. Install is a person's decision for each use whatever any table says; a
//! steady-state grant (the appliance's own read-only observability) follows `[policy]`.
//!
//! Every decision names its phase and the rule that decided ([`Ruling::rule`]), for
//! `approvals show` and both trails.

use crate::{
    control::GrantLevel,
    phase::always_needs_person,
    policy::{Decision, Policy},
    resource::{ApprovalMode, PolicySummary},
};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The phases that may have their own `[policy.<phase>]` table.
pub const POLICY_PHASES: [GrantLevel; 3] =
    [GrantLevel::Deploy, GrantLevel::Operate, GrantLevel::Install];

/// One phase's `[policy.<phase>]` table as the agent reports it: every key resolved against
/// `[policy]` already (what the table leaves out is `[policy]`'s).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhasePolicySummary {
    pub phase: GrantLevel,
    pub approval: ApprovalMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    #[serde(default)]
    pub windows: Vec<String>,
    #[serde(default)]
    pub maintenance: Vec<String>,
}

/// The policy that governs `phase`, and the name of the table it comes from (`[policy]` or
/// `[policy.<phase>]`).
pub fn summary_for(summary: &PolicySummary, phase: GrantLevel) -> (PolicySummary, String) {
    let mut resolved = summary.clone();
    resolved.phases = Vec::new();
    let Some(own) = summary.phases.iter().find(|p| p.phase == phase) else {
        return (resolved, "[policy]".to_string());
    };
    resolved.approval = own.approval;
    resolved.time_zone = own.time_zone.clone();
    resolved.windows = own.windows.clone();
    resolved.maintenance = own.maintenance.clone();
    (resolved, format!("[policy.{}]", phase.as_str()))
}

/// The parsed policy of `phase` (for the output hold and hints), `None` when it does not parse.
pub fn policy_for(summary: &PolicySummary, phase: GrantLevel) -> Option<Policy> {
    Policy::parse(&summary_for(summary, phase).0).ok()
}

/// Why a person has to decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersonBecause {
    /// Install is a person's decision for each use, whatever the policy.
    Install,
    /// `approval = "manual"` or `"always-require"`.
    Mode(ApprovalMode),
    /// `approval = "windows"` and none is open.
    OutsideWindows,
    /// The policy does not parse (the agent refuses such a config; an old report may hold one).
    Unusable,
}

/// What the policy of one phase says at one instant, and which rule said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruling {
    pub phase: GrantLevel,
    /// `[policy]` or `[policy.<phase>]`.
    pub table: String,
    pub decision: Decision,
    /// Set when `decision` is [`Decision::NeedsPerson`].
    pub person_because: Option<PersonBecause>,
}

/// The decision of `phase`'s policy at `now`.
pub fn ruling(summary: &PolicySummary, phase: GrantLevel, now: Timestamp) -> Ruling {
    let (resolved, table) = summary_for(summary, phase);
    let person = |why| Ruling {
        phase,
        table: table.clone(),
        decision: Decision::NeedsPerson,
        person_because: Some(why),
    };
    if always_needs_person(phase) {
        return person(PersonBecause::Install);
    }
    let Ok(policy) = Policy::parse(&resolved) else {
        return person(PersonBecause::Unusable);
    };
    match policy.evaluate(now) {
        Decision::NeedsPerson if policy.approval() == ApprovalMode::Windows => {
            person(PersonBecause::OutsideWindows)
        }
        Decision::NeedsPerson => person(PersonBecause::Mode(policy.approval())),
        decision => Ruling {
            phase,
            table,
            decision,
            person_because: None,
        },
    }
}

fn mode_name(mode: ApprovalMode) -> &'static str {
    match mode {
        ApprovalMode::Automatic => "automatic",
        ApprovalMode::Manual => "manual",
        ApprovalMode::Windows => "windows",
        ApprovalMode::AlwaysRequire => "always-require",
    }
}

impl Ruling {
    /// The principal of an automatic decision (`policy:automatic`, `policy:window`).
    pub fn decided_by(&self) -> Option<&'static str> {
        self.decision.decided_by()
    }

    /// The rule that decided, in words for both trails and `approvals show`:
    /// `policy:window under [policy.deploy]`, or why a person decides
    /// (`a person: [policy.operate] approval = "manual"`).
    pub fn rule(&self) -> String {
        if let Some(by) = self.decided_by() {
            return format!("{by} under {}", self.table);
        }
        match self.person_because {
            Some(PersonBecause::Install) => {
                "a person: install is approved by a person for each use, whatever the policy"
                    .to_string()
            }
            Some(PersonBecause::Mode(mode)) => {
                format!(
                    "a person: {} approval = \"{}\"",
                    self.table,
                    mode_name(mode)
                )
            }
            Some(PersonBecause::OutsideWindows) => {
                format!("a person: outside the windows of {}", self.table)
            }
            Some(PersonBecause::Unusable) | None => {
                format!("a person: {} is unusable", self.table)
            }
        }
    }

    /// `{"phase", "policy_table", "rule"}` for a trail record or `approvals show`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "phase": self.phase.as_str(),
            "policy_table": self.table,
            "rule": self.rule(),
        })
    }

    /// Adds [`Ruling::json`]'s keys to an object (anything else is left as it is).
    pub fn add_to(&self, v: &mut serde_json::Value) {
        if let (Some(o), serde_json::Value::Object(add)) = (v.as_object_mut(), self.json()) {
            o.extend(add);
        }
    }
}

/// `{"phase", "policy_table", "rule"}` of something already decided by `approved_by`: a
/// policy's own decision (`policy:…`) names the table it came from, anyone else is a person.
pub fn decided_rule(
    summary: &PolicySummary,
    phase: GrantLevel,
    approved_by: &str,
) -> serde_json::Value {
    let (_, table) = summary_for(summary, phase);
    let rule = if approved_by.starts_with("policy:") {
        format!("{approved_by} under {table}")
    } else {
        format!("a person ({approved_by})")
    };
    serde_json::json!({ "phase": phase.as_str(), "policy_table": table, "rule": rule })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// `[policy]` manual, `[policy.deploy]` windows Saturday 02:00-06:00 UTC.
    fn summary() -> PolicySummary {
        PolicySummary {
            approval: ApprovalMode::Manual,
            steady_state: true,
            phases: vec![PhasePolicySummary {
                phase: GrantLevel::Deploy,
                approval: ApprovalMode::Windows,
                time_zone: None,
                windows: vec!["Sat 02:00-06:00".into()],
                maintenance: vec![],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_phase_table_decides_its_phase_and_policy_the_rest() {
        let s = summary();
        // 2026-12-05 is a Saturday.
        let inside = ts("2026-12-05T03:00:00Z");
        let deploy = ruling(&s, GrantLevel::Deploy, inside);
        assert_eq!(deploy.decided_by(), Some("policy:window"));
        assert_eq!(deploy.rule(), "policy:window under [policy.deploy]");
        let operate = ruling(&s, GrantLevel::Operate, inside);
        assert_eq!(operate.decision, Decision::NeedsPerson);
        assert_eq!(operate.rule(), "a person: [policy] approval = \"manual\"");
        let outside = ruling(&s, GrantLevel::Deploy, ts("2026-12-05T07:00:00Z"));
        assert_eq!(outside.decision, Decision::NeedsPerson);
        assert_eq!(
            outside.rule(),
            "a person: outside the windows of [policy.deploy]"
        );
        let j = deploy.json();
        assert_eq!(j["phase"], "deploy");
        assert_eq!(j["policy_table"], "[policy.deploy]");
    }

    #[test]
    fn install_is_a_person_whatever_the_policy() {
        let mut s = summary();
        s.approval = ApprovalMode::Automatic;
        s.phases.push(PhasePolicySummary {
            phase: GrantLevel::Install,
            approval: ApprovalMode::Automatic,
            time_zone: None,
            windows: vec![],
            maintenance: vec![],
        });
        let r = ruling(&s, GrantLevel::Install, ts("2026-12-05T03:00:00Z"));
        assert_eq!(r.decision, Decision::NeedsPerson);
        assert!(r.rule().contains("install"), "{}", r.rule());
        // The other phases still follow their tables.
        assert!(ruling(&s, GrantLevel::Operate, ts("2026-12-05T03:00:00Z"))
            .decision
            .is_auto());
    }

    #[test]
    fn an_old_report_without_phases_reads_as_before() {
        let old: PolicySummary =
            serde_json::from_str(r#"{"approval":"automatic","windows":[],"maintenance":[]}"#)
                .unwrap();
        assert!(old.phases.is_empty());
        let r = ruling(&old, GrantLevel::Deploy, ts("2026-12-05T03:00:00Z"));
        assert_eq!(r.rule(), "policy:automatic under [policy]");
        // And a report without phases leaves the key out, as an old gateway expects.
        let v = serde_json::to_value(&old).unwrap();
        assert!(v.get("phases").is_none());
    }
}
