//! The phase of a waiting approval and the rule that left it to a person, for `approvals show`.

use endpoint_types::{
    control::{ApprovalItem, ApprovalStage, GrantLevel},
    phase_policy::Ruling,
};

/// An op's or endpoint's `phase`, a grant's `level`; operate for what says neither (records
/// from before phases).
pub fn phase_of(item: &ApprovalItem) -> GrantLevel {
    ["phase", "level"]
        .iter()
        .find_map(|k| item.request.get(*k).and_then(|v| v.as_str()))
        .and_then(GrantLevel::parse)
        .unwrap_or(GrantLevel::Operate)
}

/// `{"phase", "policy_table", "rule"}` of a waiting item.
pub struct WaitingRule {
    phase: GrantLevel,
    table: String,
    rule: String,
}

impl WaitingRule {
    pub fn new(item: &ApprovalItem, ruling: Ruling) -> WaitingRule {
        let rule = if item.stage == ApprovalStage::Output {
            format!("a person: the output is held under {}", ruling.table)
        } else if item.kind == endpoint_types::control::ApprovalKind::Grant
            && ruling.phase == GrantLevel::SteadyState
        {
            "a person: steady-state access is off for this appliance".to_string()
        } else if ruling.decided_by().is_some() {
            // The policy approved it when asked; it waits again because the window closed
            // before it was dispatched.
            format!(
                "a person: the window of {} closed before dispatch",
                ruling.table
            )
        } else {
            ruling.rule()
        };
        WaitingRule {
            phase: ruling.phase,
            table: ruling.table,
            rule,
        }
    }

    /// Adds the three keys to `approvals show`'s object.
    pub fn add_to(&self, v: &mut serde_json::Value) {
        if let Some(o) = v.as_object_mut() {
            o.insert("phase".into(), self.phase.as_str().into());
            o.insert("policy_table".into(), self.table.clone().into());
            o.insert("rule".into(), self.rule.clone().into());
        }
    }
}
