//! Which appliances are connected right now, and the handles to reach them.

use endpoint_types::{
    frame::ToAgent,
    resource::{PolicySummary, ResourceDescriptor},
};
use jiff::Timestamp;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};
use tokio::sync::mpsc;

/// QUIC close code for a connection dropped because a frame the agent must receive could not
/// be queued; the agent reconnects and is resynchronised from the store.
pub const RESYNC_CLOSE: u32 = 6;

/// A connected agent.
#[derive(Debug, Clone)]
pub struct AgentLink {
    pub appliance_id: String,
    pub connection: quinn::Connection,
    /// Frames to send on the control stream.
    pub control: mpsc::Sender<ToAgent>,
    pub agent_version: String,
    pub resources: Vec<ResourceDescriptor>,
    pub policy: PolicySummary,
    pub connected_at: Timestamp,
    /// Held while a grant set is read from the store and queued, so grant syncs reach the agent
    /// in the order they were read and a stale set never overtakes a newer one.
    pub grant_sync: Arc<tokio::sync::Mutex<()>>,
}

impl AgentLink {
    pub fn resource(&self, id: &str) -> Option<&ResourceDescriptor> {
        self.resources.iter().find(|r| r.id == id)
    }
}

#[derive(Debug, Default)]
pub struct AgentRegistry {
    links: Mutex<HashMap<String, AgentLink>>,
}

impl AgentRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AgentLink>> {
        // A panic while holding this lock cannot leave the map half-updated (single inserts and
        // removes), so a poisoned lock is still safe to use.
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, appliance_id: &str) -> Option<AgentLink> {
        self.lock().get(appliance_id).cloned()
    }

    pub fn is_online(&self, appliance_id: &str) -> bool {
        self.lock().contains_key(appliance_id)
    }

    /// Registers a connection unless a live one exists for the appliance; a stale entry whose
    /// connection already closed is replaced.
    pub fn try_register(&self, link: AgentLink) -> Result<(), Box<AgentLink>> {
        let mut links = self.lock();
        if let Some(existing) = links.get(&link.appliance_id) {
            if existing.connection.close_reason().is_none() {
                return Err(Box::new(existing.clone()));
            }
        }
        links.insert(link.appliance_id.clone(), link);
        Ok(())
    }

    /// Removes the entry only if it is still this connection.
    pub fn unregister(&self, appliance_id: &str, connection: &quinn::Connection) {
        let mut links = self.lock();
        if links
            .get(appliance_id)
            .is_some_and(|l| l.connection.stable_id() == connection.stable_id())
        {
            links.remove(appliance_id);
        }
    }

    /// Queues a control frame; false if the agent is not connected.
    ///
    /// A frame that cannot be queued (the agent stopped reading and its queue is full) is never
    /// silently dropped: the connection is closed instead, so the agent reconnects and is sent
    /// its full state (grants, endpoints) again before anything else. Callers that get `false`
    /// keep their record in the store, which is what the resync reads. Queued commands are
    /// numbered and must be acknowledged in time (`crate::delivery`).
    pub fn send(&self, appliance_id: &str, frame: ToAgent) -> bool {
        let Some(link) = self.get(appliance_id) else {
            return false;
        };
        match link.control.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(frame)) => {
                tracing::warn!(
                    appliance = %appliance_id,
                    frame = frame.name(),
                    "control queue full; dropping the connection so the agent resynchronises"
                );
                link.connection.close(
                    RESYNC_CLOSE.into(),
                    b"control queue full; reconnect to resync",
                );
                self.unregister(appliance_id, &link.connection);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    pub fn all(&self) -> Vec<AgentLink> {
        self.lock().values().cloned().collect()
    }
}
