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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::front_ends::fakes::{endpoint_row, Parts};

    fn report(endpoint_id: &str) -> SshTeardown {
        serde_json::from_value(serde_json::json!({
            "endpoint_id": endpoint_id, "resource_id": "res_1", "user": "ubuntu", "reason": "retired",
            "killed": [{"pid": 1234, "command": "sleep 600"}],
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn only_an_ended_ssh_endpoint_of_the_reporting_appliance_is_believed() {
        let parts = Parts::new();
        let ctx = parts.context(4);
        let store = &parts.store;
        store.put_endpoint(endpoint_row(
            "ep_live",
            EndpointType::Ssh,
            EndpointState::Active,
            None,
        ));
        store.put_endpoint(endpoint_row(
            "ep_pg",
            EndpointType::Postgres,
            EndpointState::Retired,
            None,
        ));
        store.put_endpoint(endpoint_row(
            "ep_done",
            EndpointType::Ssh,
            EndpointState::Retired,
            None,
        ));

        on_report(&ctx, "ap_1", report("ep_unknown")).await;
        on_report(&ctx, "ap_1", report("ep_live")).await;
        on_report(&ctx, "ap_1", report("ep_pg")).await;
        on_report(&ctx, "ap_2", report("ep_done")).await;
        assert!(parts.audit.kinds().is_empty(), "{:?}", parts.audit.kinds());

        on_report(&ctx, "ap_1", report("ep_done")).await;
        let rec = parts.audit.of_kind("ssh.teardown");
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].actor, "agent:ap_1");
        assert_eq!(rec[0].subject.endpoint_id.as_deref(), Some("ep_done"));
        assert_eq!(rec[0].detail["killed"][0]["pid"], 1234);
    }
}
