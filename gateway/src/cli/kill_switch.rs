//! `postern access revoke --customer C [--app A] [--reason TEXT]`: the customer's kill switch
//! (`crate::grants::bulk`), every live grant on the customer's appliances ended at once.

use super::{client::ApiClient, control::print_grant, print_json, OutputFormat};
use crate::grants::{BulkRevokeRequest, BulkRevoked};
use endpoint_types::ApiError;

pub async fn run(req: BulkRevokeRequest, c: &ApiClient, out: OutputFormat) -> Result<(), ApiError> {
    let body = serde_json::to_value(&req)
        .map_err(|e| ApiError::internal(format!("cannot encode the request: {e}")))?;
    let done: BulkRevoked = c.post("/v1/grants/revoke", body).await?;
    match out {
        OutputFormat::Json => print_json(&done),
        OutputFormat::Text => print_text(&req, &done),
    }
    Ok(())
}

fn print_text(req: &BulkRevokeRequest, done: &BulkRevoked) {
    let whose = match &req.app {
        Some(app) => format!("customer {} (app {app})", req.customer),
        None => format!("customer {}", req.customer),
    };
    if done.revoked == 0 {
        println!("no live grants of {whose}: nothing to revoke");
        return;
    }
    println!(
        "revoked {} grant{} of {whose}; their sessions are cut and the agents told",
        done.revoked,
        if done.revoked == 1 { "" } else { "s" }
    );
    for g in &done.grants {
        print_grant(g);
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::Cli;
    use clap::Parser;

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(line.split_whitespace())
    }

    #[test]
    fn one_grant_or_one_customer_never_both_nor_neither() {
        for ok in [
            "postern access revoke gr_0123",
            "postern access revoke --customer acme",
            "postern access revoke --customer acme --app shop --reason INC-9",
        ] {
            assert!(parse(ok).is_ok(), "{ok}: {:?}", parse(ok).err());
        }
        for bad in [
            "postern access revoke",
            "postern access revoke gr_0123 --customer acme",
            "postern access revoke gr_0123 --app shop",
            "postern access revoke gr_0123 --reason why",
            "postern --output json access revoke --app shop",
        ] {
            let e = parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} was taken"));
            assert_eq!(e.exit_code(), 2, "{bad}");
            let api = crate::cli::usage::to_api_error(&e);
            assert_eq!(api.code, endpoint_types::ErrorCode::InvalidRequest, "{bad}");
            assert!(!api.message.is_empty() && !api.hint.is_empty(), "{bad}");
        }
    }
}
