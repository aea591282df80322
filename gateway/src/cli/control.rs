//! `postern access …` and `postern approvals …`: permission phases and customer decisions.

use super::{duration_secs, print_json, OutputFormat};
use super::client::ApiClient;
use clap::Subcommand;
use endpoint_types::{control::*, ApiError};

#[derive(Debug, Subcommand)]
pub enum AccessCmd {
    /// Ask for a permission phase on an appliance for a while.
    Request {
        #[arg(long)]
        app: String,
        #[arg(long)]
        customer: String,
        #[arg(long, value_parser = ["install", "steady-state", "deploy", "operate"])]
        level: String,
        #[arg(long)]
        duration: String,
        #[arg(long)]
        reason: String,
    },
    /// Grants you can see.
    List,
    /// End a grant now.
    Revoke { id: String },
    /// Turn the default read-only steady-state phase on or off (customer approver).
    SteadyState {
        #[arg(long)]
        app: String,
        #[arg(long)]
        customer: String,
        #[arg(long, conflicts_with = "disable", required_unless_present = "disable")]
        enable: bool,
        #[arg(long)]
        disable: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCmd {
    /// Requests waiting for a decision.
    List,
    /// The full request (and, at the output stage, the held output).
    Show { id: String },
    /// Approve a grant, an op's command or output, or an endpoint, by its id.
    Approve { id: String },
    /// Deny, optionally with a message for the operator.
    Deny {
        id: String,
        #[arg(long)]
        message: Option<String>,
    },
}

fn print_grant(g: &GrantRecord) {
    println!("grant {} ({}) {} for {}/{} — {}", g.id, g.level.as_str(), g.state.as_str(), g.app, g.customer, g.reason);
    match (g.approved_at, g.expires_at) {
        (Some(a), Some(e)) => println!("  approved {a} by {}, expires {e}", g.decided_by.as_deref().unwrap_or("?")),
        _ if g.state == GrantState::PendingApproval => println!("  waiting for the customer's approval: postern approvals approve {}", g.id),
        _ => {}
    }
    if let Some(m) = &g.message {
        println!("  message from the customer: {m}");
    }
}

pub async fn access(cmd: AccessCmd, c: &ApiClient, out: OutputFormat) -> Result<(), ApiError> {
    let grant: GrantRecord = match cmd {
        AccessCmd::Request { app, customer, level, duration, reason } => {
            let level = GrantLevel::parse(&level).ok_or_else(|| ApiError::invalid(format!("unknown level {level}")))?;
            let duration_s = duration_secs("duration", &duration)?;
            c.post("/v1/grants", serde_json::json!({
                "app": app, "customer": customer, "level": level, "duration_s": duration_s, "reason": reason,
            }))
            .await?
        }
        AccessCmd::Revoke { id } => c.post(&format!("/v1/grants/{id}/revoke"), serde_json::json!({})).await?,
        AccessCmd::List => {
            let v: serde_json::Value = c.get("/v1/grants").await?;
            match out {
                OutputFormat::Json => print_json(&v),
                OutputFormat::Text => {
                    let grants: Vec<GrantRecord> = serde_json::from_value(v["grants"].clone()).unwrap_or_default();
                    for g in &grants {
                        print_grant(g);
                    }
                }
            }
            return Ok(());
        }
        AccessCmd::SteadyState { app, customer, enable, disable: _ } => {
            let v: serde_json::Value =
                c.post("/v1/steady-state", serde_json::json!({"app": app, "customer": customer, "enabled": enable})).await?;
            match out {
                OutputFormat::Json => print_json(&v),
                OutputFormat::Text => println!(
                    "steady-state access for {app}/{customer} is now {}",
                    if enable { "enabled" } else { "disabled" }
                ),
            }
            return Ok(());
        }
    };
    match out {
        OutputFormat::Json => print_json(&grant),
        OutputFormat::Text => print_grant(&grant),
    }
    Ok(())
}

pub async fn approvals(cmd: ApprovalsCmd, c: &ApiClient, out: OutputFormat) -> Result<(), ApiError> {
    let v: serde_json::Value = match cmd {
        ApprovalsCmd::List => {
            let v: serde_json::Value = c.get("/v1/approvals").await?;
            if out == OutputFormat::Text {
                let items: Vec<ApprovalItem> = serde_json::from_value(v["approvals"].clone()).unwrap_or_default();
                if items.is_empty() {
                    println!("nothing is waiting for approval");
                }
                for a in items {
                    let stage = match a.stage { ApprovalStage::Command => "command", ApprovalStage::Output => "output" };
                    let kind = match a.kind { ApprovalKind::Grant => "grant", ApprovalKind::Op => "op", ApprovalKind::Endpoint => "endpoint" };
                    println!("{:<22} {:<8} {:<7} {}/{}  by {}  {}", a.id, kind, stage, a.app, a.customer, a.requested_by, a.summary);
                }
                return Ok(());
            }
            v
        }
        ApprovalsCmd::Show { id } => c.get(&format!("/v1/approvals/{id}")).await?,
        ApprovalsCmd::Approve { id } => c.post(&format!("/v1/approvals/{id}/approve"), serde_json::json!({})).await?,
        ApprovalsCmd::Deny { id, message } => {
            c.post(&format!("/v1/approvals/{id}/deny"), serde_json::json!({"message": message})).await?
        }
    };
    match out {
        OutputFormat::Json => print_json(&v),
        OutputFormat::Text => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
    }
    Ok(())
}
