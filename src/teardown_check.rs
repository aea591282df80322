//! Teardown proofs in the end-to-end tests: `postern audit teardown` against a running
//! gateway, and editing a stored proof in the gateway's SQLite file (as anyone with write
//! access to the store could) to see verification fail.

use crate::testbed::{CliOutput, Gateway};
use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use std::time::Duration;

/// `postern audit teardown ENDPOINT` once the appliance's proof has reached the gateway
/// (polled up to `limit`). Returns the verified record, whose checks must include `checks`
/// and all pass.
pub fn verified(gw: &Gateway, endpoint: &str, checks: &[&str], limit: Duration) -> Result<Value> {
    let started = std::time::Instant::now();
    let out = loop {
        let out = gw.cli(&["audit", "teardown", endpoint])?;
        if out.success || out.error_code() != Some("NOT_FOUND") || started.elapsed() > limit {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !out.success {
        bail!(
            "no verified teardown record for {endpoint}: {} {}",
            out.json,
            out.stderr
        );
    }
    let v = out.json;
    if v["verified"] != true || v["proof"]["endpoint_id"] != endpoint {
        bail!("not a verified proof of {endpoint}: {v}");
    }
    let proof_checks = v["proof"]["checks"]
        .as_array()
        .ok_or_else(|| anyhow!("no checks in {v}"))?;
    for name in checks {
        let c = proof_checks
            .iter()
            .find(|c| c["name"] == *name)
            .ok_or_else(|| anyhow!("no {name} check in {v}"))?;
        if c["passed"] != true || !c["took_ms"].is_u64() {
            bail!("check {name} did not pass: {c}");
        }
    }
    if v["all_checks_passed"] != true {
        bail!("not every check passed: {v}");
    }
    Ok(v)
}

/// Edits one field of the stored proof of `endpoint` (the detail of its first check), then
/// asks `postern audit teardown` again.
pub fn edit_and_verify(gw: &Gateway, endpoint: &str) -> Result<CliOutput> {
    let changed = gw.store_sql(
        &format!(
            "UPDATE teardown_proofs SET proof = json_set(proof, '$.proof.checks[0].detail', 'nothing was left') \
             WHERE endpoint_id = '{endpoint}'; SELECT changes();"
        ),
    )?;
    if changed != "1" {
        bail!("no stored proof of {endpoint} to edit ({changed})");
    }
    gw.cli(&["audit", "teardown", endpoint])
}

/// Asserts that `out` is the structured refusal of an edited record.
pub fn assert_edit_refused(out: &CliOutput, endpoint: &str) -> Result<()> {
    if out.success
        || out.error_code() != Some("AUDIT_CHAIN_BROKEN")
        || out.json["error"]["details"]["failed"] != "signature"
        || out.json["error"]["details"]["endpoint_id"] != endpoint
        || out.json["error"]["hint"].as_str().is_none_or(str::is_empty)
    {
        bail!(
            "an edited teardown record was not refused as it should be: {}",
            out.json
        );
    }
    Ok(())
}
