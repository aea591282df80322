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
