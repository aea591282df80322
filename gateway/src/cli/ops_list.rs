//! `postern ops list [--state S] [--app A --customer C] [--mine]`: `{"ops": [...]}`, or a
//! table. The gateway filters (`GET /v1/ops?…`, crate::ops::list_filter) within what the
//! caller's token may see.

use super::{client::ApiClient, print_json, OutputFormat};
use clap::Args;
use endpoint_types::{control::OpRecord, ApiError};

#[derive(Debug, Args)]
pub struct OpsListArgs {
    /// Only ops in this state (pending-approval, approved, running, output-pending-approval,
    /// completed, failed, denied, timed-out, expired).
    #[arg(long)]
    state: Option<String>,
    /// Only the ops on this app's appliance (needs --customer).
    #[arg(long, requires = "customer")]
    app: Option<String>,
    /// Only the ops on this customer's appliances.
    #[arg(long)]
    customer: Option<String>,
    /// Only the ops this token requested.
    #[arg(long)]
    mine: bool,
}

#[derive(serde::Deserialize, serde::Serialize)]
struct OpList {
    ops: Vec<OpRecord>,
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn path(args: &OpsListArgs) -> String {
    let mut terms = Vec::new();
    for (k, v) in [
        ("state", &args.state),
        ("app", &args.app),
        ("customer", &args.customer),
    ] {
        if let Some(v) = v {
            terms.push(format!("{k}={}", encode(v)));
        }
    }
    if args.mine {
        terms.push("mine=true".into());
    }
    if terms.is_empty() {
        "/v1/ops".into()
    } else {
        format!("/v1/ops?{}", terms.join("&"))
    }
}

pub async fn run(args: OpsListArgs, c: &ApiClient, out: OutputFormat) -> Result<(), ApiError> {
    let list: OpList = c.get(&path(&args)).await?;
    match out {
        OutputFormat::Json => print_json(&list),
        OutputFormat::Text if list.ops.is_empty() => println!("no ops"),
        OutputFormat::Text => {
            println!(
                "{:<20} {:<24} {:<8} {:<28} {:<20} {:<16} COMMAND",
                "OP", "STATE", "TOOL", "APP/CUSTOMER", "REQUESTED", "BY"
            );
            for o in &list.ops {
                println!(
                    "{:<20} {:<24} {:<8} {:<28} {:<20} {:<16} {}",
                    o.id,
                    o.state.as_str(),
                    o.tool.as_str(),
                    format!("{}/{}", o.app, o.customer),
                    o.requested_at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    o.requested_by,
                    o.command
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_become_encoded_query_terms() {
        let args = OpsListArgs {
            state: Some("timed-out".into()),
            app: Some("my app".into()),
            customer: Some("acme&co".into()),
            mine: true,
        };
        assert_eq!(
            path(&args),
            "/v1/ops?state=timed-out&app=my%20app&customer=acme%26co&mine=true"
        );
        let none = OpsListArgs {
            state: None,
            app: None,
            customer: None,
            mine: false,
        };
        assert_eq!(path(&none), "/v1/ops");
    }
}
