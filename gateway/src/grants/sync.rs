//! Keeps each connected agent's view of its grants current: the agent enforces with it.

use super::Grants;
use crate::store::GrantRow;
use endpoint_types::{
    control::GrantState,
    frame::{LiveGrant, ToAgent},
    lifecycle::grant_state,
};
use jiff::Timestamp;

impl Grants {
    /// The appliance's live grants, as the agent is told them.
    pub async fn live_grants(&self, appliance_id: &str) -> Vec<LiveGrant> {
        let now = self.clock.now();
        match self.store.grants_of(appliance_id).await {
            Ok(rows) => self.live_set(rows, now).await,
            Err(e) => {
                tracing::error!(appliance = %appliance_id, error = %e, "cannot list grants for the agent");
                Vec::new()
            }
        }
    }

    /// Of one appliance's grants, those live at `now`, as the agent is told them.
    pub(super) async fn live_set(&self, rows: Vec<GrantRow>, now: Timestamp) -> Vec<LiveGrant> {
        let mut live = Vec::new();
        for g in rows
            .into_iter()
            .filter(|g| grant_state(g.state, g.expires_at, now) == GrantState::Active)
        {
            let (Some(approved_by), Some(approved_at), Some(expires_at)) =
                (g.decided_by.clone(), g.decided_at, g.expires_at)
            else {
                continue;
            };
            // A person's decision goes with the grant, every time the set is sent: the
            // appliance checks it (and accepts it once) before honouring the grant.
            let signed_decision = if approved_by.starts_with("policy:") {
                None
            } else {
                self.signed_decision_of(&g.id).await
            };
            live.push(LiveGrant {
                approved_by,
                approved_at,
                expires_at,
                level: g.level,
                grant_id: g.id,
                signed_decision,
            });
        }
        live
    }

    /// Sends the full live grant set to the appliance's agent, if it is connected.
    pub async fn push_grants(&self, appliance_id: &str) {
        if let Some(order) = self.agents.grant_sync_lock(appliance_id) {
            // Two changes in a row push two sets; the lock keeps the newer read queued last.
            let _order = order.lock().await;
            let grants = self.live_grants(appliance_id).await;
            // Not queued means not connected (or dropped for a full queue): the agent gets the
            // store's set when it reconnects.
            self.agents
                .send(appliance_id, ToAgent::GrantSync { grants });
        }
    }
}
