//! Keeps each connected agent's view of its grants current: the agent enforces with it.

use crate::server::Gateway;
use endpoint_types::{
    control::GrantState,
    frame::{LiveGrant, ToAgent},
    lifecycle::grant_state,
};
use jiff::Timestamp;

/// The appliance's live grants, as the agent is told them.
pub async fn live_grants(gw: &Gateway, appliance_id: &str) -> Vec<LiveGrant> {
    let now = Timestamp::now();
    match gw.store.grants_of(appliance_id).await {
        Ok(rows) => rows
            .into_iter()
            .filter(|g| grant_state(g.state, g.expires_at, now) == GrantState::Active)
            .filter_map(|g| {
                Some(LiveGrant {
                    approved_by: g.decided_by.clone()?,
                    approved_at: g.decided_at?,
                    expires_at: g.expires_at?,
                    level: g.level,
                    grant_id: g.id,
                })
            })
            .collect(),
        Err(e) => {
            tracing::error!(appliance = %appliance_id, error = %e, "cannot list grants for the agent");
            Vec::new()
        }
    }
}

/// Sends the full live grant set to the appliance's agent, if it is connected.
pub async fn push_grants(gw: &Gateway, appliance_id: &str) {
    if let Some(link) = gw.agents.get(appliance_id) {
        // Two changes in a row push two sets; the lock keeps the newer read queued last.
        let _order = link.grant_sync.lock().await;
        let grants = live_grants(gw, appliance_id).await;
        gw.agents.send(appliance_id, ToAgent::GrantSync { grants });
    }
}
