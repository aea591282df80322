//! `postern audit teardown ENDPOINT`: fetches the stored teardown proof and checks it here,
//! client side: the appliance certificate must chain to the gateway CA this CLI already
//! trusts (its `--ca-file`) and name the appliance, and the appliance key's signature must
//! hold over the proof's canonical bytes. So neither the gateway nor anyone with write access
//! to its store can edit a proof, or make one, without this failing.

use super::{client::ApiClient, print_json, OutputFormat};
use certs::teardown_proof::{verify_teardown, TeardownVerifyError};
use endpoint_types::{
    teardown::{TeardownRecord, TeardownVerified},
    ApiError, ErrorCode,
};

pub async fn show(c: &ApiClient, endpoint: &str, out: OutputFormat) -> Result<(), ApiError> {
    if endpoint.is_empty()
        || !endpoint
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
    {
        return Err(
            ApiError::invalid(format!("{endpoint:?} is not an endpoint id"))
                .hint("give the id `postern ops endpoint list` shows (ep_…)"),
        );
    }
    if c.ca_pem().is_empty() {
        return Err(ApiError::invalid(
            "a teardown proof is checked against the gateway CA, and this CLI was given none (it trusts the host's roots)",
        )
        .hint("give --ca-file (or POSTERN_CA_FILE) the gateway's ca.crt; where the gateway serves a public CA's certificate, a file holding both CAs"));
    }
    let record: TeardownRecord = c.get(&format!("/v1/audit/teardown/{endpoint}")).await?;
    let verified = verify(c.ca_pem(), endpoint, record)?;
    match out {
        OutputFormat::Json => print_json(&verified),
        OutputFormat::Text => print_text(&verified),
    }
    Ok(())
}

/// Checks `record` as the proof of `endpoint`; a record that fails is a structured error
/// naming what failed.
pub fn verify(
    ca_pem: &str,
    endpoint: &str,
    record: TeardownRecord,
) -> Result<TeardownVerified, ApiError> {
    let checked =
        verify_teardown(ca_pem, &record.cert_pem, endpoint, &record.signed).and_then(|fp| {
            // The gateway's endpoint record and the proof must agree on whose endpoint it was.
            if record.appliance_id == record.signed.proof.appliance_id {
                Ok(fp)
            } else {
                Err(TeardownVerifyError::WrongAppliance {
                    want: record.appliance_id.clone(),
                    found: record.signed.proof.appliance_id.clone(),
                })
            }
        });
    let fp = checked.map_err(|e| {
        ApiError::new(
            ErrorCode::AuditChainBroken,
            format!("the teardown record of endpoint {endpoint} does not verify: {e}"),
        )
        .hint("the record was edited after the appliance signed it, or was not made by the appliance; the customer's trail (`postern-agent audit verify`) holds the agent's own copy")
        .details(serde_json::json!({ "endpoint_id": endpoint, "failed": e.part() }))
    })?;
    let proof = record.signed.proof;
    Ok(TeardownVerified {
        endpoint_id: endpoint.to_string(),
        verified: true,
        all_checks_passed: proof.all_passed(),
        signer: format!("appliance {}", proof.appliance_id),
        cert_fingerprint: fp,
        signature: record.signed.signature,
        received_at: record.received_at,
        proof,
    })
}

fn print_text(v: &TeardownVerified) {
    let p = &v.proof;
    println!(
        "endpoint {} ({} on {}) ended {}: {}{}",
        p.endpoint_id,
        p.endpoint_type,
        p.resource_id,
        p.reason.as_str(),
        p.ended_at,
        if p.offline {
            " (while the appliance was offline; torn down when it reconnected)"
        } else {
            ""
        }
    );
    println!(
        "signature verified: {} (certificate {}, issued by the gateway CA)",
        v.signer, v.cert_fingerprint
    );
    for c in &p.checks {
        println!(
            "  [{}] {:<26} {:>6} ms  {}",
            if c.passed { "ok" } else { "FAILED" },
            c.name,
            c.took_ms,
            c.detail
        );
    }
    println!(
        "{}",
        if v.all_checks_passed {
            "every check passed"
        } else {
            "SOME CHECKS FAILED: the endpoint may not be fully gone"
        }
    );
}
