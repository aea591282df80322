//! The agent's report of an ended SSH endpoint's teardown (what it killed and removed on the
//! VM as the endpoint's login user), recorded as `ssh.teardown` in the vendor trail. The
//! report is believed only for an ended SSH endpoint of the reporting appliance.

use crate::{audit::Subject, endpoints::front_ends::FrontEndContext};
use endpoint_types::{api::EndpointState, resource::EndpointType, ssh_scope::SshTeardown};

pub async fn on_report(ctx: &FrontEndContext, appliance_id: &str, report: SshTeardown) {
    let report = report.capped();
    let row = match ctx.store.get_endpoint(&report.endpoint_id).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            return tracing::warn!(appliance = %appliance_id, endpoint = %report.endpoint_id, "teardown report for an unknown endpoint")
        }
        Err(e) => {
            return tracing::error!(error = %e, "could not look up the endpoint of a teardown report")
        }
    };
    if row.appliance_id != appliance_id
        || row.endpoint_type != EndpointType::Ssh
        || row.state == EndpointState::Active
    {
        return tracing::warn!(
            appliance = %appliance_id, endpoint = %report.endpoint_id,
            "ignoring a teardown report for an endpoint that is not an ended ssh endpoint of this appliance"
        );
    }
    let detail = match serde_json::to_value(&report) {
        Ok(v) => v,
        Err(e) => return tracing::error!(error = %e, "could not serialise a teardown report"),
    };
    tracing::info!(endpoint = %report.endpoint_id, killed = report.killed.len(), "ssh teardown reported");
    ctx.audit
        .record(
            "ssh.teardown",
            &format!("agent:{appliance_id}"),
            Subject::endpoint(appliance_id, &report.endpoint_id),
            detail,
        )
        .await;
}
