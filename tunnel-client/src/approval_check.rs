//! The appliance's check of an approver's signed decision, before it acts on it.
//!
//! When `agent.toml` lists `[[approver]]` keys, a decision the appliance's own policy reserves
//! for a person is taken only with a statement signed by one of those keys that binds exactly
//! what the appliance is asked to do: this appliance, this record, `approve`, the same content
//! (for an op's command: tool, the argv the agent splits the command into, resource, timeout),
//! inside its validity. Each statement is good for one use; the statements used are also
//! appended to a file beside the customer trail (`<audit_path>.approvals-used`), so a restart
//! does not make a used statement good again. No keys listed: the gateway's word is taken, as
//! before (the agent warns at start-up).
//!
//! Decisions the policy makes itself (`policy:automatic`, `policy:window`) are the appliance's
//! own evaluation and need no signature.

use crate::{audit::Entry, config::AgentConfig};
use certs::approver::{statement_digest, ApprovalVerifier, Verified};
use endpoint_types::{
    approval::{ApprovalInvalid, DecidedContent, SignedDecision},
    frame::OpDispatch,
};
use jiff::Timestamp;
use serde_json::json;
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

/// The appliance's approvers and the statements already used.
pub struct SignedApprovals {
    /// This appliance's own id (from its enrollment, never from the gateway).
    appliance_id: String,
    verifier: Mutex<ApprovalVerifier>,
    /// Where used statements are remembered across restarts (absent: in memory only).
    used_file: Option<PathBuf>,
}

impl std::fmt::Debug for SignedApprovals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SignedApprovals({})", self.appliance_id)
    }
}

/// `digest-hex not_after` per line.
fn parse_used(line: &str) -> Option<([u8; 32], Timestamp)> {
    let (hex, not_after) = line.trim().split_once(' ')?;
    let mut digest = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some((digest, not_after.parse().ok()?))
}

fn used_line(digest: &[u8; 32], not_after: Timestamp) -> String {
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex} {not_after}\n")
}

impl SignedApprovals {
    /// From the loaded (validated) config; used statements still valid at `now` are read back.
    pub fn from_config(config: &AgentConfig, now: Timestamp) -> SignedApprovals {
        let approvers = config.approvers().unwrap_or_default();
        let used_file = (!approvers.is_empty()).then(|| {
            let mut name = config.audit_path.clone().into_os_string();
            name.push(".approvals-used");
            PathBuf::from(name)
        });
        let mut verifier = ApprovalVerifier::new(approvers);
        if let Some(path) = &used_file {
            let all = read_used(path);
            let live: Vec<_> = all.iter().filter(|(_, t)| *t >= now).copied().collect();
            for (digest, not_after) in &live {
                verifier.mark_used(*digest, *not_after);
            }
            // Expired statements are refused as expired anyway: the file keeps only live ones.
            if live.len() < all.len() {
                let text: String = live.iter().map(|(d, t)| used_line(d, *t)).collect();
                if let Err(e) = std::fs::write(path, text) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot compact the used approval statements");
                }
            }
        }
        SignedApprovals {
            appliance_id: config.appliance_id.clone().unwrap_or_default(),
            verifier: Mutex::new(verifier),
            used_file,
        }
    }

    /// Whether the customer listed approver keys (and so signed decisions are required).
    pub fn enforced(&self) -> bool {
        !self
            .verifier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Verifies and uses up the decision on `record_id` that `asked` needs. Ok(None): no keys
    /// listed, nothing to verify.
    pub fn verify(
        &self,
        signed: Option<&SignedDecision>,
        record_id: &str,
        asked: &DecidedContent,
        now: Timestamp,
    ) -> Result<Option<Verified>, ApprovalInvalid> {
        let mut verifier = self.verifier.lock().unwrap_or_else(|p| p.into_inner());
        if verifier.is_empty() {
            return Ok(None);
        }
        let signed = signed.ok_or(ApprovalInvalid::Missing)?;
        let verified = verifier.verify_once(signed, &self.appliance_id, record_id, asked, now)?;
        drop(verifier);
        self.remember(&signed.statement);
        Ok(Some(verified))
    }

    /// Checks a decision as of `at` without using it up: a grant or endpoint whose decision
    /// this appliance already accepted (at `at`), announced again (`crate::record_approval`).
    pub fn recheck(
        &self,
        signed: &SignedDecision,
        record_id: &str,
        asked: &DecidedContent,
        at: Timestamp,
    ) -> Result<Verified, ApprovalInvalid> {
        self.verifier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(signed, &self.appliance_id, record_id, asked, at)
    }

    /// The check of an op's command when the appliance's policy reserved it for a person
    /// (`needs_person`); a policy's own approval passes.
    pub fn check_op(
        &self,
        d: &OpDispatch,
        needs_person: bool,
        now: Timestamp,
    ) -> Result<Option<Verified>, ApprovalInvalid> {
        if !needs_person {
            return Ok(None);
        }
        let asked = DecidedContent::op_command(d.tool, &d.command, &d.resource_id, d.timeout_s)
            .map_err(|_| ApprovalInvalid::ContentMismatch("argv"))?;
        self.verify(d.signed_decision.as_ref(), &d.op_id, &asked, now)
    }

    /// Appends the statement to the used file before the decision is acted on. A failure is
    /// logged: the statement stays used for this process's life, but a restart would forget it.
    /// The line reaches the operating system (it survives the agent's crash or restart) but is
    /// not fsynced: a sync per op costs milliseconds (see `examples/approval_bench.rs`), and only
    /// a host power loss within the statement's validity could forget it.
    fn remember(&self, statement: &endpoint_types::approval::ApprovalStatement) {
        let Some(path) = &self.used_file else {
            return;
        };
        let line = used_line(&statement_digest(statement), statement.not_after);
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            tracing::error!(path = %path.display(), error = %e, "cannot record a used approval statement; a restart would forget that it was used");
        }
    }
}

/// The used statements a file lists (unreadable or bad lines are skipped).
fn read_used(path: &Path) -> Vec<([u8; 32], Timestamp)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(parse_used)
        .collect()
}

/// The customer-trail record of a refused decision: `denied`, with why.
pub fn denied_entry(
    actor: &str,
    stage: &str,
    signed: Option<&SignedDecision>,
    why: &ApprovalInvalid,
) -> Entry {
    Entry::new(
        "denied",
        actor.to_string(),
        json!({
            "reason": "APPROVAL_INVALID",
            "approval": why.reason(),
            "message": why.to_string(),
            "stage": stage,
            "key_id": signed.map(|s| s.statement.key_id.clone()),
        }),
    )
}

/// The customer-trail record of a verified decision: who signed it.
pub fn verified_entry(actor: &str, stage: &str, v: &Verified, signed: &SignedDecision) -> Entry {
    Entry::new(
        "approval.verified",
        actor.to_string(),
        json!({
            "stage": stage,
            "approver": v.approver,
            "key_id": v.key_id,
            "issued_at": signed.statement.issued_at.to_string(),
            "not_after": signed.statement.not_after.to_string(),
        }),
    )
}

#[cfg(test)]
#[path = "approval_check_tests.rs"]
mod tests;
