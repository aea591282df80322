//! Per-type work in the appliance when an endpoint becomes live or ends: a Postgres endpoint
//! gets its own ephemeral login role, dropped again when the endpoint ends; an SSH endpoint's
//! end is torn down on the VM ([`crate::ssh_teardown`]). Every end is then checked and proved
//! ([`crate::teardown_proof`]).

use crate::{grants::Removed, sessions::Sessions, teardown_proof};
use endpoint_types::{
    frame::EndpointGrant,
    resource::{CloseReason, EndpointType},
};
use jiff::Timestamp;

/// Called once when an endpoint becomes live in this appliance. Must not block the control
/// loop: slow work runs on its own task.
pub fn opened(ctx: &Sessions, grant: &EndpointGrant) {
    if grant.endpoint_type == EndpointType::Postgres {
        crate::postgres::prepare(ctx, grant);
    }
    ctx.teardowns.owe(grant);
    ctx.proofs.owe(grant);
}

/// Called once when an endpoint leaves the table (retired, expired, revoked).
pub fn closed(ctx: &Sessions, removed: &Removed) {
    ended(ctx, removed, false);
}

fn ended(ctx: &Sessions, removed: &Removed, offline: bool) {
    let mut undoing = teardown_proof::Undoing::default();
    if removed.grant.endpoint_type == EndpointType::Postgres {
        undoing.postgres = Some(crate::postgres::teardown(ctx, removed));
    }
    if removed.grant.endpoint_type == EndpointType::Ssh {
        undoing.ssh = crate::ssh_teardown::start(ctx, &removed.grant, removed.reason);
    }
    teardown_proof::prove(ctx, removed, offline, undoing);
}

/// After the gateway's endpoint sync: endpoints that ended while the agent was disconnected
/// or stopped (the sync no longer lists them) get the teardown and proof they were owed.
pub fn synced(ctx: &Sessions, endpoints: &[EndpointGrant]) {
    for removed in ctx.proofs.ended_meanwhile(endpoints, Timestamp::now()) {
        tracing::info!(endpoint = %removed.endpoint_id, "endpoint ended while the agent was away; tearing it down now");
        ended(ctx, &removed, true);
    }
}

/// The gateway refused this appliance as revoked: every endpoint it held has ended with it.
/// They are torn down and proved now (the proofs reach the customer's trail; the gateway
/// takes them only if the appliance is let in again).
pub fn appliance_revoked(ctx: &Sessions) {
    for mut removed in ctx.proofs.ended_meanwhile(&[], Timestamp::now()) {
        if removed.reason == CloseReason::Retired {
            removed.reason = CloseReason::Revoked;
        }
        tracing::info!(endpoint = %removed.endpoint_id, "the appliance was revoked; tearing its endpoint down");
        ended(ctx, &removed, true);
    }
}
