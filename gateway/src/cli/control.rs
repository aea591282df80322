//! `postern access …` and `postern approvals …`: permission phases and customer decisions.

use super::client::ApiClient;
use super::{duration_secs, print_json, Outcome, OutputFormat};
use clap::Subcommand;
use endpoint_types::{control::*, ApiError};

#[derive(Debug, Subcommand)]
pub enum AccessCmd {
    /// Ask for a permission phase on an appliance for a while.
    Request {
        /// The appliance's app.
        #[arg(long)]
        app: String,
        /// The appliance's customer.
        #[arg(long)]
        customer: String,
        /// The permission phase asked for.
        #[arg(long, value_parser = ["install", "steady-state", "deploy", "operate"])]
        level: String,
        /// How long, counted from the approval (30m, 4h, 1d).
        #[arg(long)]
        duration: String,
        /// Why: shown to the customer's approvers and kept in both trails.
        #[arg(long)]
        reason: String,
    },
    /// Grants you can see.
    List,
    /// End a grant now; or, with --customer instead of an id, every live grant (active or
    /// waiting for approval) on a customer's appliances at once: the customer's kill switch
    /// (admin, or the customer's approver).
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "customer"])))]
    Revoke {
        /// The grant's id (gr_…).
        id: Option<String>,
        /// Every live grant of this customer's appliances, instead of one grant.
        #[arg(long)]
        customer: Option<String>,
        /// With --customer: only the grants of this app's appliance.
        #[arg(long, requires = "customer", conflicts_with = "id")]
        app: Option<String>,
        /// With --customer: why, kept in each grant's `grant.revoked` record.
        #[arg(long, requires = "customer", conflicts_with = "id")]
        reason: Option<String>,
    },
    /// Turn the default read-only steady-state phase on or off (customer approver).
    SteadyState {
        /// The appliance's app.
        #[arg(long)]
        app: String,
        /// The appliance's customer.
        #[arg(long)]
        customer: String,
        /// Turn it on.
        #[arg(long, conflicts_with = "disable", required_unless_present = "disable")]
        enable: bool,
        /// Turn it off: no health snapshots are collected or sent.
        #[arg(long)]
        disable: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCmd {
    /// Requests waiting for a decision.
    List,
    /// The full request (and, at the output stage, the held output), with the statement an
    /// approval signs.
    Show {
        /// The id of the grant, op or endpoint.
        id: String,
    },
    /// Approve a grant, an op's command or output, or an endpoint, by its id; signed with your
    /// approver key.
    Approve {
        /// The id of the grant, op (command or output stage) or endpoint.
        id: String,
        /// The approver's private key (default: approver.key in your config dir, if present).
        #[arg(long)]
        key: Option<std::path::PathBuf>,
        /// A message for the operator, kept with the decision.
        #[arg(long)]
        message: Option<String>,
    },
    /// Deny, optionally with a message for the operator.
    Deny {
        /// The id of the grant, op or endpoint.
        id: String,
        /// The approver's private key (default: approver.key in your config dir, if present).
        #[arg(long)]
        key: Option<std::path::PathBuf>,
        /// A message for the operator, kept with the decision.
        #[arg(long)]
        message: Option<String>,
    },
    /// The approver's own signing key.
    #[command(subcommand)]
    Key(super::approver_key::KeyCmd),
    /// Set (or clear) the https URL that gets a signed JSON POST for every request waiting
    /// for this customer; `status` shows the deliveries.
    Webhook(super::webhook::WebhookArgs),
}

pub(super) fn print_grant(g: &GrantRecord) {
    println!(
        "grant {} ({}) {} for {}/{} — {}",
        g.id,
        g.level.as_str(),
        g.state.as_str(),
        g.app,
        g.customer,
        g.reason
    );
    match (g.approved_at, g.expires_at) {
        (Some(a), Some(e)) => println!(
            "  approved {a} by {}, expires {e}",
            g.decided_by.as_deref().unwrap_or("?")
        ),
        _ if g.state == GrantState::PendingApproval => println!(
            "  waiting for the customer's approval: postern approvals approve {}",
            g.id
        ),
        _ => {}
    }
    if let Some(e) = &g.refused {
        println!(
            "  refused by the appliance ({}): {} (hint: {})",
            e.code, e.message, e.hint
        );
    }
    if let Some(m) = &g.message {
        println!("  message from the customer: {m}");
    }
}

pub async fn access(cmd: AccessCmd, c: &ApiClient, out: OutputFormat) -> Result<(), ApiError> {
    let grant: GrantRecord = match cmd {
        AccessCmd::Request {
            app,
            customer,
            level,
            duration,
            reason,
        } => {
            let level = GrantLevel::parse(&level)
                .ok_or_else(|| ApiError::invalid(format!("unknown level {level}")))?;
            let duration_s = duration_secs("duration", &duration)?;
            c.post("/v1/grants", serde_json::json!({
                "app": app, "customer": customer, "level": level, "duration_s": duration_s, "reason": reason,
            }))
            .await?
        }
        AccessCmd::Revoke { id: Some(id), .. } => {
            c.post(&format!("/v1/grants/{id}/revoke"), serde_json::json!({}))
                .await?
        }
        AccessCmd::Revoke {
            id: None,
            customer,
            app,
            reason,
        } => {
            // Clap asks for exactly one of the id and --customer.
            let customer = customer.ok_or_else(|| {
                ApiError::invalid("name a grant or a customer")
                    .hint("postern access revoke ID, or postern access revoke --customer CUSTOMER")
            })?;
            let req = crate::grants::BulkRevokeRequest {
                customer,
                app,
                reason,
            };
            return super::kill_switch::run(req, c, out).await;
        }
        AccessCmd::List => {
            let v: serde_json::Value = c.get("/v1/grants").await?;
            match out {
                OutputFormat::Json => print_json(&v),
                OutputFormat::Text => {
                    let grants: Vec<GrantRecord> =
                        serde_json::from_value(v["grants"].clone()).unwrap_or_default();
                    for g in &grants {
                        print_grant(g);
                    }
                }
            }
            return Ok(());
        }
        AccessCmd::SteadyState {
            app,
            customer,
            enable,
            disable: _,
        } => {
            let v: serde_json::Value = c
                .post(
                    "/v1/steady-state",
                    serde_json::json!({"app": app, "customer": customer, "enabled": enable}),
                )
                .await?;
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

pub async fn approvals(
    cmd: ApprovalsCmd,
    c: &ApiClient,
    out: OutputFormat,
) -> Result<(), ApiError> {
    let v: serde_json::Value = match cmd {
        ApprovalsCmd::List => {
            let v: serde_json::Value = c.get("/v1/approvals").await?;
            if out == OutputFormat::Text {
                let items: Vec<ApprovalItem> =
                    serde_json::from_value(v["approvals"].clone()).unwrap_or_default();
                if items.is_empty() {
                    println!("nothing is waiting for approval");
                }
                for a in items {
                    let stage = match a.stage {
                        ApprovalStage::Command => "command",
                        ApprovalStage::Output => "output",
                    };
                    let kind = match a.kind {
                        ApprovalKind::Grant => "grant",
                        ApprovalKind::Op => "op",
                        ApprovalKind::Endpoint => "endpoint",
                    };
                    println!(
                        "{:<22} {:<8} {:<7} {}/{}  by {}  {}",
                        a.id, kind, stage, a.app, a.customer, a.requested_by, a.summary
                    );
                }
                return Ok(());
            }
            v
        }
        ApprovalsCmd::Show { id } => {
            let v = c.get(&format!("/v1/approvals/{id}")).await?;
            super::approval_sign::print_show(v, out);
            return Ok(());
        }
        ApprovalsCmd::Approve { id, key, message } => {
            super::approval_sign::decide(c, &id, true, key, message).await?
        }
        ApprovalsCmd::Deny { id, key, message } => {
            super::approval_sign::decide(c, &id, false, key, message).await?
        }
        ApprovalsCmd::Key(cmd) => return super::approver_key::run(cmd, out),
        ApprovalsCmd::Webhook(args) => return super::webhook::run(args, c, out).await,
    };
    match out {
        OutputFormat::Json => print_json(&v),
        OutputFormat::Text => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct OpArgs {
    /// The appliance's app.
    #[arg(long)]
    app: String,
    /// The appliance's customer.
    #[arg(long)]
    customer: String,
    /// The resource it runs against, by its id in the appliance's config (e.g. the Terraform
    /// address `aws_eks_cluster.main`).
    #[arg(long)]
    origin_resource_id: String,
    /// The exact command, starting with the tool's name; split in the appliance, never run by a shell.
    #[arg(long)]
    command: String,
    /// How long the tool may run in the appliance before it is stopped (op state timed-out).
    #[arg(long, default_value = "5m")]
    timeout: String,
    /// Wait until the op has ended (approvals included), with progress on stderr; the exit
    /// code says how it ended (see `postern --help`).
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this long (exit 5, error WAIT_TIMEOUT; the op goes on).
    #[arg(long, default_value = super::wait_progress::DEFAULT_WAIT)]
    wait_timeout: String,
    /// The phase it runs under: the grant it needs and the identity used at the target.
    #[arg(long, default_value = "operate")]
    phase: String,
}

/// Prints the op; how it ended decides the exit code ([`Outcome::of_op`]).
fn print_op(op: &OpRecord, out: OutputFormat) -> Outcome {
    match out {
        OutputFormat::Json => print_json(op),
        OutputFormat::Text => {
            println!(
                "op {} ({}) {} — `{}` on {} ({}/{})",
                op.id,
                op.tool.as_str(),
                op.state.as_str(),
                op.command,
                op.origin_resource_id,
                op.app,
                op.customer
            );
            if let Some(code) = op.exit_code {
                println!(
                    "  exit code {code}{}",
                    if op.truncated {
                        " (output truncated)"
                    } else {
                        ""
                    }
                );
            }
            if let Some(s) = &op.stdout {
                print!("{s}");
            }
            if let Some(s) = &op.stderr {
                eprint!("{s}");
            }
            if let Some(e) = &op.error {
                eprintln!("error: {}", e.message);
                if !e.hint.is_empty() {
                    eprintln!("hint: {}", e.hint);
                }
            }
            if op.state == OpState::PendingApproval {
                println!("  waiting for the customer's approval of the command");
            } else if op.state == OpState::OutputPendingApproval {
                println!(
                    "  ran; its output is held in the appliance until the customer releases it"
                );
            }
        }
    }
    Outcome::of_op(op.state)
}

pub async fn run_op(
    tool: OpTool,
    args: OpArgs,
    c: &ApiClient,
    out: OutputFormat,
) -> Result<Outcome, ApiError> {
    let timeout_s = duration_secs("timeout", &args.timeout)?;
    let wait_limit =
        std::time::Duration::from_secs(duration_secs("wait-timeout", &args.wait_timeout)?);
    let op: OpRecord = c
        .post("/v1/ops", serde_json::json!({
            "tool": tool, "app": args.app, "customer": args.customer, "origin_resource_id": args.origin_resource_id,
            "command": args.command, "timeout_s": timeout_s, "phase": args.phase,
        }))
        .await?;
    let op = if args.wait {
        super::wait_progress::op(c, &op.id, wait_limit, out).await?
    } else {
        op
    };
    Ok(print_op(&op, out))
}

/// `ops get`, or `ops wait` when `wait` gives its deadline.
pub async fn get_op(
    id: &str,
    wait: Option<std::time::Duration>,
    c: &ApiClient,
    out: OutputFormat,
) -> Result<Outcome, ApiError> {
    let op = if let Some(limit) = wait {
        super::wait_progress::op(c, id, limit, out).await?
    } else {
        c.get(&format!("/v1/ops/{id}")).await?
    };
    Ok(print_op(&op, out))
}
