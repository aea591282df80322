//! Per-type work in the appliance when an endpoint becomes live or ends: a Postgres endpoint
//! gets its own ephemeral login role, dropped again when the endpoint ends. Types that need
//! nothing of the kind (tcp, kubectl, ssh) pass through.

use crate::{grants::Removed, sessions::Sessions};
use endpoint_types::{frame::EndpointGrant, resource::EndpointType};

/// Called once when an endpoint becomes live in this appliance. Must not block the control
/// loop: slow work runs on its own task.
pub fn opened(ctx: &Sessions, grant: &EndpointGrant) {
    if grant.endpoint_type == EndpointType::Postgres {
        crate::postgres::prepare(ctx, grant);
    }
}

/// Called once when an endpoint leaves the table (retired, expired, revoked).
pub fn closed(ctx: &Sessions, removed: &Removed) {
    if removed.grant.endpoint_type == EndpointType::Postgres {
        crate::postgres::teardown(ctx, removed);
    }
}
