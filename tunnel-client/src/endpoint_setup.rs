//! Per-type work in the appliance when an endpoint becomes live or ends: a Postgres endpoint
//! gets its own ephemeral login role, dropped again when the endpoint ends; an SSH endpoint's
//! end is torn down on the VM ([`crate::ssh_teardown`]). Types that need nothing of the kind
//! (tcp, kubectl) pass through.

use crate::{grants::Removed, sessions::Sessions};
use endpoint_types::{frame::EndpointGrant, resource::EndpointType};

/// Called once when an endpoint becomes live in this appliance. Must not block the control
/// loop: slow work runs on its own task.
pub fn opened(ctx: &Sessions, grant: &EndpointGrant) {
    if grant.endpoint_type == EndpointType::Postgres {
        crate::postgres::prepare(ctx, grant);
    }
    ctx.teardowns.owe(grant);
}

/// Called once when an endpoint leaves the table (retired, expired, revoked).
pub fn closed(ctx: &Sessions, removed: &Removed) {
    if removed.grant.endpoint_type == EndpointType::Postgres {
        crate::postgres::teardown(ctx, removed);
    }
    if removed.grant.endpoint_type == EndpointType::Ssh {
        crate::ssh_teardown::start(ctx, &removed.grant, removed.reason);
    }
}

/// After the gateway's endpoint sync: endpoints that ended while the agent was disconnected
/// (the sync no longer lists them) get the teardown they were owed.
pub fn synced(ctx: &Sessions, endpoints: &[EndpointGrant]) {
    ctx.teardowns.synced(ctx, endpoints);
}
