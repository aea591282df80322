//! `postern approvals webhook --customer C --url https://… | --clear` and
//! `postern approvals webhook status [--customer C]`.

use super::client::ApiClient;
use super::{print_json, OutputFormat};
use clap::{Args, Subcommand};
use endpoint_types::ApiError;
use std::path::PathBuf;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct WebhookArgs {
    #[command(subcommand)]
    pub cmd: Option<WebhookCmd>,
    /// The customer whose approvers the webhook tells.
    #[arg(long, required = true)]
    pub customer: Option<String>,
    /// The receiver, https:// only.
    #[arg(long, conflicts_with = "clear", required_unless_present = "clear")]
    pub url: Option<String>,
    /// Remove the webhook (pending deliveries are dropped).
    #[arg(long)]
    pub clear: bool,
    /// PEM file with the CA certificate(s) the receiver's chain must end in (default: the
    /// system roots). Not the gateway's --ca-file.
    #[arg(long, conflicts_with = "clear")]
    pub receiver_ca_file: Option<PathBuf>,
    /// Let the target be a loopback, link-local, private or CGNAT address (admin only).
    /// Metadata, unspecified and multicast addresses stay refused.
    #[arg(long, conflicts_with = "clear")]
    pub allow_private: bool,
}

#[derive(Debug, Subcommand)]
pub enum WebhookCmd {
    /// Deliveries, newest first: attempts, last status or error, next attempt, delivered.
    Status {
        /// One customer (an approver's own by default; all for an admin).
        #[arg(long)]
        customer: Option<String>,
    },
}

pub async fn run(args: WebhookArgs, c: &ApiClient, out: OutputFormat) -> Result<(), ApiError> {
    if let Some(WebhookCmd::Status { customer }) = args.cmd {
        return status(customer, c, out).await;
    }
    let customer = args
        .customer
        .ok_or_else(|| ApiError::invalid("--customer is required").hint("add --customer NAME"))?;
    let ca_pem = match &args.receiver_ca_file {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| {
            ApiError::invalid(format!("cannot read {}: {e}", p.display()))
                .hint("--receiver-ca-file takes a PEM file with the receiver's CA certificate")
        })?),
        None => None,
    };
    let v: serde_json::Value = c
        .post(
            &format!("/v1/customers/{}/webhook", encode(&customer)),
            serde_json::json!({"url": args.url, "ca_pem": ca_pem,
                "allow_private": args.allow_private}),
        )
        .await?;
    match out {
        OutputFormat::Json => print_json(&v),
        OutputFormat::Text => match v["secret"].as_str() {
            Some(secret) => {
                println!(
                    "approval webhook for {customer} set to {}",
                    v["webhook_url"].as_str().unwrap_or_default()
                );
                println!("signing secret (shown once, store it now): {secret}");
                println!("receivers verify the Postern-Signature header with it");
            }
            None => println!("approval webhook for {customer} cleared"),
        },
    }
    Ok(())
}

async fn status(
    customer: Option<String>,
    c: &ApiClient,
    out: OutputFormat,
) -> Result<(), ApiError> {
    let path = match &customer {
        Some(cu) => format!("/v1/webhook-deliveries?customer={}", encode(cu)),
        None => "/v1/webhook-deliveries".to_string(),
    };
    let v: serde_json::Value = c.get(&path).await?;
    if out == OutputFormat::Json {
        print_json(&v);
        return Ok(());
    }
    let empty = Vec::new();
    let deliveries = v["deliveries"].as_array().unwrap_or(&empty);
    if deliveries.is_empty() {
        println!("no webhook deliveries");
    }
    for d in deliveries {
        let s = |k: &str| d[k].as_str().unwrap_or("-").to_string();
        let detail = match d["state"].as_str() {
            Some("delivered") => format!("delivered {}", s("delivered_at")),
            Some("pending") => format!(
                "next attempt {} (last: {})",
                s("next_attempt_at"),
                s("last_error")
            ),
            _ => format!("given up: {}", s("last_error")),
        };
        println!(
            "{:<20} {:<10} {:<16} {:<9} attempts {:<3} {}  {}",
            s("id"),
            s("customer"),
            s("event"),
            s("state"),
            d["attempts"],
            s("target"),
            detail
        );
    }
    Ok(())
}

/// A path or query component: anything but unreserved characters percent-encoded.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
