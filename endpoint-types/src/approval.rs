//! Signed approval statements: what a customer's approver decided, in canonical bytes the
//! approver's key signs and the appliance's agent verifies before it acts.
//!
//! The canonical form is a short text, one `name: value` line per field in a fixed order
//! after a version line, every value JSON-encoded (so a value can never contain a line break
//! or pass for another field). It is what `approvals show` prints and what gets signed:
//! - an Ed25519 approver key signs these bytes directly;
//! - a WebAuthn passkey signs `authenticatorData || sha256(clientDataJSON)` where the client
//!   data's `challenge` is base64url(sha256(these bytes)) ([`ApprovalStatement::challenge_input`]).
//!
//! Signature checks live in the `certs` crate (it holds the crypto); this module is pure data.

use crate::{control::GrantLevel, resource::EndpointType};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// First line of every statement; a new layout gets a new version line.
pub const STATEMENT_VERSION: &str = "postern-approval-v1";

/// The longest a statement may be valid for, issued-at to not-after.
pub const MAX_VALIDITY: jiff::SignedDuration = jiff::SignedDuration::from_hours(24);

/// How far an approver's clock may run ahead of the appliance's.
pub const CLOCK_SKEW: jiff::SignedDuration = jiff::SignedDuration::from_mins(5);

/// How long the statement `approvals approve` signs stays valid for an op's command or output
/// or an endpoint: long enough for an appliance that is briefly offline to receive it, short
/// enough that a stolen statement soon goes stale (it is single-use besides).
pub const DEFAULT_VALIDITY: jiff::SignedDuration = jiff::SignedDuration::from_hours(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Approve,
    Deny,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Deny => "deny",
        }
    }
}

/// Exactly what was decided, per kind of request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DecidedContent {
    Grant {
        level: GrantLevel,
        duration_s: u64,
    },
    /// An op's command: the tool and its argv exactly as the agent will run it.
    OpCommand {
        tool: String,
        argv: Vec<String>,
        resource_id: String,
        timeout_s: u64,
    },
    /// Release of an op's held output, bound to its digest.
    OpOutput {
        output_sha256: String,
    },
    Endpoint {
        endpoint_type: EndpointType,
        resource_id: String,
        ttl_s: u64,
    },
}

impl DecidedContent {
    /// An op's command as the agent will run it: the argv it splits `command` into.
    pub fn op_command(
        tool: crate::control::OpTool,
        command: &str,
        resource_id: &str,
        timeout_s: u64,
    ) -> Result<DecidedContent, crate::op_command::CommandError> {
        Ok(DecidedContent::OpCommand {
            tool: tool.as_str().to_string(),
            argv: crate::op_command::parse_command(tool, command)?,
            resource_id: resource_id.to_string(),
            timeout_s,
        })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            DecidedContent::Grant { .. } => "grant",
            DecidedContent::OpCommand { .. } => "op_command",
            DecidedContent::OpOutput { .. } => "op_output",
            DecidedContent::Endpoint { .. } => "endpoint",
        }
    }

    /// The fields after `kind`, in their canonical order, as (name, JSON value).
    fn fields(&self) -> Vec<(&'static str, serde_json::Value)> {
        use serde_json::json;
        match self {
            DecidedContent::Grant { level, duration_s } => vec![
                ("level", json!(level.as_str())),
                ("duration_s", json!(duration_s)),
            ],
            DecidedContent::OpCommand {
                tool,
                argv,
                resource_id,
                timeout_s,
            } => vec![
                ("tool", json!(tool)),
                ("argv", json!(argv)),
                ("resource_id", json!(resource_id)),
                ("timeout_s", json!(timeout_s)),
            ],
            DecidedContent::OpOutput { output_sha256 } => {
                vec![("output_sha256", json!(output_sha256))]
            }
            DecidedContent::Endpoint {
                endpoint_type,
                resource_id,
                ttl_s,
            } => vec![
                ("endpoint_type", json!(endpoint_type.as_str())),
                ("resource_id", json!(resource_id)),
                ("ttl_s", json!(ttl_s)),
            ],
        }
    }

    /// The first field in which `self` (what was signed) differs from `asked` (what the agent
    /// is asked to act on), if any.
    pub fn first_difference(&self, asked: &DecidedContent) -> Option<&'static str> {
        if self.kind() != asked.kind() {
            return Some("kind");
        }
        self.fields()
            .into_iter()
            .zip(asked.fields())
            .find(|((_, a), (_, b))| a != b)
            .map(|((name, _), _)| name)
    }
}

/// One approver's decision on one record of one appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalStatement {
    /// The grant, op or endpoint id the decision is about.
    pub record_id: String,
    pub appliance_id: String,
    pub decision: Decision,
    pub content: DecidedContent,
    pub issued_at: Timestamp,
    pub not_after: Timestamp,
    /// The signing key's id (`SHA256:` + base64 of its public key's digest, as OpenSSH prints).
    pub key_id: String,
}

impl ApprovalStatement {
    /// The bytes that are signed, and shown to the approver before signing.
    pub fn canonical(&self) -> String {
        let mut out = String::with_capacity(256);
        out.push_str(STATEMENT_VERSION);
        out.push('\n');
        let mut line = |name: &str, value: serde_json::Value| {
            // JSON text of a value never holds a raw line break.
            let _ = writeln!(out, "{name}: {value}");
        };
        line("kind", self.content.kind().into());
        line("record_id", self.record_id.as_str().into());
        line("appliance_id", self.appliance_id.as_str().into());
        line("decision", self.decision.as_str().into());
        for (name, value) in self.content.fields() {
            line(name, value);
        }
        line("issued_at", self.issued_at.to_string().into());
        line("not_after", self.not_after.to_string().into());
        line("key_id", self.key_id.as_str().into());
        out
    }

    /// What a WebAuthn assertion's challenge is made of (sha256 of this, base64url).
    pub fn challenge_input(&self) -> Vec<u8> {
        self.canonical().into_bytes()
    }
}

/// How a statement is signed: the credential kinds an approver can hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "snake_case")]
pub enum ApprovalSignature {
    /// Ed25519 over the canonical bytes (standard base64).
    Ed25519 { signature: String },
    /// A WebAuthn assertion whose challenge is base64url(sha256(canonical bytes)); each field
    /// standard base64 as the browser returned it.
    Webauthn {
        authenticator_data: String,
        client_data_json: String,
        signature: String,
    },
}

/// A statement with its signature, as the gateway stores and forwards it untouched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDecision {
    pub statement: ApprovalStatement,
    pub signature: ApprovalSignature,
}

/// Why the agent refused a signed decision; recorded as `denied` with this reason and
/// reported as `APPROVAL_INVALID`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalInvalid {
    #[error("no decision signed by one of this appliance's approvers came with the request")]
    Missing,
    #[error("the signing key {0} is not one of this appliance's approvers")]
    UnknownKey(String),
    #[error("the signature does not verify for key {0}")]
    BadSignature(String),
    #[error("the statement is for appliance {0}, not this one")]
    WrongAppliance(String),
    #[error("the statement decides {signed}, not {asked}")]
    WrongRecord { signed: String, asked: String },
    #[error("the signed {0} differs from what the appliance is asked to do")]
    ContentMismatch(&'static str),
    #[error("the statement decides `{0}`, not approve")]
    NotApproved(&'static str),
    #[error("the statement expired at {0}")]
    Expired(Timestamp),
    #[error("the statement is issued in the future ({0})")]
    NotYetValid(Timestamp),
    #[error("the statement is valid for longer than the 24 h a statement may be")]
    TooLong,
    #[error("the statement was already used")]
    Replayed,
    #[error("the signature is malformed: {0}")]
    Malformed(String),
}

impl ApprovalInvalid {
    /// The short machine-readable reason for the trail.
    pub fn reason(&self) -> &'static str {
        match self {
            ApprovalInvalid::Missing => "missing",
            ApprovalInvalid::UnknownKey(_) => "unknown_key",
            ApprovalInvalid::BadSignature(_) => "bad_signature",
            ApprovalInvalid::WrongAppliance(_) => "wrong_appliance",
            ApprovalInvalid::WrongRecord { .. } => "wrong_record",
            ApprovalInvalid::ContentMismatch(_) => "content_mismatch",
            ApprovalInvalid::NotApproved(_) => "not_approved",
            ApprovalInvalid::Expired(_) => "expired",
            ApprovalInvalid::NotYetValid(_) => "not_yet_valid",
            ApprovalInvalid::TooLong => "too_long",
            ApprovalInvalid::Replayed => "replayed",
            ApprovalInvalid::Malformed(_) => "malformed",
        }
    }

    pub fn to_api_error(&self) -> crate::ApiError {
        crate::ApiError::new(
            crate::ErrorCode::ApprovalInvalid,
            format!("the appliance refused the approval: {self}"),
        )
        .hint("an approver listed in the appliance's agent.toml ([[approver]]) must sign the decision: postern approvals approve ID --key PATH")
        .details(serde_json::json!({ "reason": self.reason() }))
    }
}

/// What the agent is asked to act on, checked against a statement before any signature
/// work: the parts of verification that need no crypto.
pub fn check_binding(
    statement: &ApprovalStatement,
    appliance_id: &str,
    record_id: &str,
    asked: &DecidedContent,
    now: Timestamp,
) -> Result<(), ApprovalInvalid> {
    if statement.appliance_id != appliance_id {
        return Err(ApprovalInvalid::WrongAppliance(
            statement.appliance_id.clone(),
        ));
    }
    if statement.record_id != record_id {
        return Err(ApprovalInvalid::WrongRecord {
            signed: statement.record_id.clone(),
            asked: record_id.to_string(),
        });
    }
    if statement.decision != Decision::Approve {
        return Err(ApprovalInvalid::NotApproved(statement.decision.as_str()));
    }
    if let Some(field) = statement.content.first_difference(asked) {
        return Err(ApprovalInvalid::ContentMismatch(field));
    }
    if statement.not_after.duration_since(statement.issued_at) > MAX_VALIDITY {
        return Err(ApprovalInvalid::TooLong);
    }
    if statement.issued_at.duration_since(now) > CLOCK_SKEW {
        return Err(ApprovalInvalid::NotYetValid(statement.issued_at));
    }
    if now > statement.not_after {
        return Err(ApprovalInvalid::Expired(statement.not_after));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn op() -> ApprovalStatement {
        ApprovalStatement {
            record_id: "op_1".into(),
            appliance_id: "ap_1".into(),
            decision: Decision::Approve,
            content: DecidedContent::OpCommand {
                tool: "kubectl".into(),
                argv: vec!["kubectl".into(), "get".into(), "pods".into()],
                resource_id: "k8s.main".into(),
                timeout_s: 60,
            },
            issued_at: t("2026-12-07T01:00:00Z"),
            not_after: t("2026-12-07T02:00:00Z"),
            key_id: "SHA256:abc".into(),
        }
    }

    #[test]
    fn canonical_bytes_are_fixed_and_readable() {
        assert_eq!(
            op().canonical(),
            "postern-approval-v1\nkind: \"op_command\"\nrecord_id: \"op_1\"\nappliance_id: \"ap_1\"\n\
decision: \"approve\"\ntool: \"kubectl\"\nargv: [\"kubectl\",\"get\",\"pods\"]\nresource_id: \"k8s.main\"\n\
timeout_s: 60\nissued_at: \"2026-12-07T01:00:00Z\"\nnot_after: \"2026-12-07T02:00:00Z\"\nkey_id: \"SHA256:abc\"\n"
        );
    }

    #[test]
    fn a_line_break_in_a_value_cannot_forge_a_field() {
        let mut s = op();
        s.record_id = "op_1\"\nappliance_id: \"ap_2".into();
        let c = s.canonical();
        assert_eq!(
            c.lines().filter(|l| l.starts_with("appliance_id")).count(),
            1
        );
        // argv split differently is different bytes.
        let mut a = op();
        let mut b = op();
        a.content = DecidedContent::OpCommand {
            tool: "psql".into(),
            argv: vec!["psql".into(), "-c".into(), "select 1".into()],
            resource_id: "db".into(),
            timeout_s: 1,
        };
        b.content = DecidedContent::OpCommand {
            tool: "psql".into(),
            argv: vec!["psql".into(), "-c select 1".into()],
            resource_id: "db".into(),
            timeout_s: 1,
        };
        assert_ne!(a.canonical(), b.canonical());
    }

    #[test]
    fn binding_refuses_every_mismatch() {
        let s = op();
        let now = t("2026-12-07T01:30:00Z");
        let asked = s.content.clone();
        assert_eq!(check_binding(&s, "ap_1", "op_1", &asked, now), Ok(()));
        assert_eq!(
            check_binding(&s, "ap_2", "op_1", &asked, now)
                .unwrap_err()
                .reason(),
            "wrong_appliance"
        );
        assert_eq!(
            check_binding(&s, "ap_1", "op_2", &asked, now)
                .unwrap_err()
                .reason(),
            "wrong_record"
        );
        let tampered = DecidedContent::OpCommand {
            tool: "kubectl".into(),
            argv: vec!["kubectl".into(), "delete".into(), "pods".into()],
            resource_id: "k8s.main".into(),
            timeout_s: 60,
        };
        assert_eq!(
            check_binding(&s, "ap_1", "op_1", &tampered, now),
            Err(ApprovalInvalid::ContentMismatch("argv"))
        );
        let grant = DecidedContent::Grant {
            level: GrantLevel::Operate,
            duration_s: 60,
        };
        assert_eq!(
            check_binding(&s, "ap_1", "op_1", &grant, now),
            Err(ApprovalInvalid::ContentMismatch("kind"))
        );
        assert_eq!(
            check_binding(&s, "ap_1", "op_1", &asked, t("2026-12-07T02:00:01Z"))
                .unwrap_err()
                .reason(),
            "expired"
        );
        assert_eq!(
            check_binding(&s, "ap_1", "op_1", &asked, t("2026-12-07T00:50:00Z"))
                .unwrap_err()
                .reason(),
            "not_yet_valid"
        );
        let mut deny = op();
        deny.decision = Decision::Deny;
        assert_eq!(
            check_binding(&deny, "ap_1", "op_1", &asked, now)
                .unwrap_err()
                .reason(),
            "not_approved"
        );
        let mut long = op();
        long.not_after = t("2026-12-09T01:00:00Z");
        assert_eq!(
            check_binding(&long, "ap_1", "op_1", &asked, now),
            Err(ApprovalInvalid::TooLong)
        );
    }

    #[test]
    fn signed_decisions_round_trip_as_json() {
        let d = SignedDecision {
            statement: op(),
            signature: ApprovalSignature::Ed25519 {
                signature: "AAAA".into(),
            },
        };
        let back: SignedDecision =
            serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }
}
