//! `postern approvals show|approve|deny`: the statement an approver signs, signed on this
//! machine with the approver's own key and sent with the decision.
//!
//! The gateway says what the request will make the appliance do (`GET
//! /v1/approvals/{id}/statement`); the approver sees exactly those bytes (`approvals show`),
//! and their key signs them here. The private key never leaves this machine, and the
//! appliance trusts only the keys its own `agent.toml` lists, so the gateway cannot make or
//! alter a decision.

use super::{approver_key, client::ApiClient, OutputFormat};
use certs::approver::ApproverKey;
use endpoint_types::{
    approval::{ApprovalStatement, Decision, SignedDecision},
    ApiError,
};
use jiff::Timestamp;
use std::path::PathBuf;

/// The approver's key: the one `--key` names, else the default one if there is one. None:
/// the decision goes unsigned (the gateway refuses it where the appliance lists approvers).
fn signing_key(key: Option<PathBuf>) -> Result<Option<ApproverKey>, ApiError> {
    match key {
        Some(path) => approver_key::load(Some(path)).map(Some),
        None => match approver_key::default_key_path() {
            Some(p) if p.exists() => approver_key::load(Some(p)).map(Some),
            _ => Ok(None),
        },
    }
}

/// The statement as the gateway offers it, made this approver's: their decision, issued now
/// by this machine's clock for the validity the gateway chose.
fn own_statement(
    offered: ApprovalStatement,
    decision: Decision,
    now: Timestamp,
) -> ApprovalStatement {
    let validity = offered.not_after.duration_since(offered.issued_at);
    ApprovalStatement {
        decision,
        issued_at: now,
        not_after: now.saturating_add(validity).unwrap_or(now),
        ..offered
    }
}

/// The offered statement of `id`, if the gateway offers one; a request that is not waiting
/// any more gets its refusal from the decision itself.
async fn offered(c: &ApiClient, id: &str) -> Option<ApprovalStatement> {
    let v: serde_json::Value = c.get(&format!("/v1/approvals/{id}/statement")).await.ok()?;
    serde_json::from_value(v["statement"].clone()).ok()
}

/// Approves or denies `id`, signed with the approver's key where the gateway offers a
/// statement and a key is at hand.
pub async fn decide(
    c: &ApiClient,
    id: &str,
    approve: bool,
    key: Option<PathBuf>,
    message: Option<String>,
) -> Result<serde_json::Value, ApiError> {
    let key = signing_key(key)?;
    let decision = if approve {
        Decision::Approve
    } else {
        Decision::Deny
    };
    let signed: Option<SignedDecision> = match (&key, offered(c, id).await) {
        (Some(key), Some(statement)) => {
            Some(key.sign(own_statement(statement, decision, Timestamp::now())))
        }
        _ => None,
    };
    let path = if approve { "approve" } else { "deny" };
    c.post(
        &format!("/v1/approvals/{id}/{path}"),
        serde_json::json!({ "message": message, "signed": signed }),
    )
    .await
}

/// `approvals show`: the request and, where one applies, the exact text the approver's key
/// will sign (with this machine's key id when it has a key).
pub fn print_show(mut v: serde_json::Value, out: OutputFormat) {
    let offered: Option<ApprovalStatement> = serde_json::from_value(v["statement"].clone()).ok();
    let key = signing_key(None).ok().flatten();
    if let (Some(mut s), Some(key)) = (offered, &key) {
        s.key_id = key.public().key_id();
        v["canonical"] = s.canonical().into();
        v["statement"] = serde_json::to_value(&s).unwrap_or_default();
    }
    match out {
        OutputFormat::Json => super::print_json(&v),
        OutputFormat::Text => {
            let mut request = v.clone();
            for k in [
                "statement",
                "canonical",
                "approver_key_ids",
                "signature_required",
            ] {
                if let Some(o) = request.as_object_mut() {
                    o.remove(k);
                }
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&request).unwrap_or_default()
            );
            if let Some(text) = v["canonical"].as_str() {
                println!("\nwhat `approvals approve` signs (issued_at and not_after are set when you sign):\n");
                print!("{text}");
                println!(
                    "\n{}",
                    serde_json::to_string_pretty(&v["statement"]).unwrap_or_default()
                );
                if v["signature_required"] == true && key.is_none() {
                    println!("\nthis appliance requires a signed decision: make a key with `postern approvals key create`, or pass --key");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_types::approval::DecidedContent;

    #[test]
    fn the_approver_signs_the_offered_content_as_issued_by_their_clock() {
        let offered = ApprovalStatement {
            record_id: "op_1".into(),
            appliance_id: "ap_1".into(),
            decision: Decision::Approve,
            content: DecidedContent::OpOutput {
                output_sha256: "ab".into(),
            },
            issued_at: "2026-12-07T01:00:00Z".parse().unwrap(),
            not_after: "2026-12-07T02:00:00Z".parse().unwrap(),
            key_id: String::new(),
        };
        let now: Timestamp = "2026-12-07T01:00:30Z".parse().unwrap();
        let own = own_statement(offered.clone(), Decision::Deny, now);
        assert_eq!(own.decision, Decision::Deny);
        assert_eq!(own.issued_at, now);
        assert_eq!(own.not_after, "2026-12-07T02:00:30Z".parse().unwrap());
        assert_eq!(own.content, offered.content);
        assert_eq!(own.record_id, "op_1");
    }
}
