//! What the domain services (grants, ops, endpoints, approvals) need from the rest of the
//! gateway, as narrow traits: a clock, an audit sink, a way to reach a connected agent and the
//! approval notifier. `server.rs` wires the real ones; unit tests use [`fakes`].
//!
//! Each service also declares the narrow store trait it needs next to itself (e.g.
//! `grants::GrantStore`), implemented for [`crate::store::Store`] and by an in-memory store in
//! its tests.

use crate::{
    agents::AgentRegistry,
    audit::{AuditLog, Subject, TrailDown},
    store::{ApplianceRow, GrantChange, GrantMove, GrantRow, StoreResult},
};
use async_trait::async_trait;
use endpoint_types::{
    control::GrantState,
    frame::ToAgent,
    lifecycle::grant::GrantEvent,
    resource::{PolicySummary, ResourceDescriptor},
    ApiError,
};
use jiff::Timestamp;
use std::sync::Arc;

/// The time a service decides by; tests move it by hand.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;

    /// Now at the store's precision (milliseconds), so a record reads back exactly as it was
    /// written and what is compared in memory agrees with what is kept.
    fn stored_now(&self) -> Timestamp {
        let now = self.now();
        Timestamp::from_millisecond(now.as_millisecond()).unwrap_or(now)
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// Moves a grant by compare-and-set: what a record standing on a grant move needs of the
/// store ([`AuditSink::record_grant_move`]).
#[async_trait]
pub trait GrantMover: Send + Sync {
    /// Compare-and-set move of grant `id` from `from` by `event` (see
    /// [`crate::store::Store::move_grant`]): false when it is no longer in `from`, or (from
    /// active) has expired by `change.at`.
    async fn move_grant(
        &self,
        id: &str,
        from: GrantState,
        event: GrantEvent,
        change: GrantChange<'_>,
    ) -> StoreResult<bool>;
}

/// Where the vendor trail's records go.
#[async_trait]
pub trait AuditSink: Send + Sync {
    /// Records something that already happened (held and retried if the store refuses it).
    async fn record(&self, kind: &str, actor: &str, subject: Subject, detail: serde_json::Value);
    /// Records the start of something that must not go ahead unrecorded.
    async fn record_before(
        &self,
        kind: &str,
        actor: &str,
        subject: Subject,
        detail: serde_json::Value,
    ) -> Result<(), TrailDown>;
    /// Records `kind` with the grant move it stands on: `Ok(true)` once both are done,
    /// `Ok(false)` when the move lost its compare-and-set (nothing recorded), an error when
    /// the store failed (the move is not to go ahead unrecorded).
    ///
    /// The default moves in `grants`, then records. The audit log ignores `grants`: it writes
    /// the move in the same transaction as the record, in its own store, which is the one
    /// the gateway's grants live in.
    async fn record_grant_move(
        &self,
        grants: &dyn GrantMover,
        kind: &str,
        actor: &str,
        subject: Subject,
        detail: serde_json::Value,
        grant_move: GrantMove,
    ) -> Result<bool, TrailDown> {
        let m = &grant_move;
        let moved = grants
            .move_grant(&m.id, m.from, m.event, m.change())
            .await
            .map_err(|e| TrailDown(e.to_string()))?;
        if moved {
            self.record(kind, actor, subject, detail).await;
        }
        Ok(moved)
    }
    /// Refuses a new request concerning `appliance_id` while its customer trail cannot take
    /// more records (`crate::customer_trail`); the default takes every request.
    async fn room_for_request(&self, appliance_id: &str) -> Result<(), ApiError> {
        let _ = appliance_id;
        Ok(())
    }
}

#[async_trait]
impl AuditSink for AuditLog {
    async fn record(&self, kind: &str, actor: &str, subject: Subject, detail: serde_json::Value) {
        AuditLog::record(self, kind, actor, subject, detail).await
    }

    async fn record_before(
        &self,
        kind: &str,
        actor: &str,
        subject: Subject,
        detail: serde_json::Value,
    ) -> Result<(), TrailDown> {
        AuditLog::record_before(self, kind, actor, subject, detail).await
    }

    async fn record_grant_move(
        &self,
        _grants: &dyn GrantMover,
        kind: &str,
        actor: &str,
        subject: Subject,
        detail: serde_json::Value,
        grant_move: GrantMove,
    ) -> Result<bool, TrailDown> {
        AuditLog::record_grant_move(self, kind, actor, subject, detail, grant_move).await
    }

    async fn room_for_request(&self, appliance_id: &str) -> Result<(), ApiError> {
        crate::customer_trail::room_for_request(self.store(), appliance_id).await
    }
}

/// A shared sink records as the one it shares (the gateway keeps its audit log in an `Arc`, so
/// `&gw.audit` still serves where a `&dyn AuditSink` is asked for).
#[async_trait]
impl<T: AuditSink + ?Sized> AuditSink for Arc<T> {
    async fn record(&self, kind: &str, actor: &str, subject: Subject, detail: serde_json::Value) {
        T::record(self, kind, actor, subject, detail).await
    }

    async fn record_before(
        &self,
        kind: &str,
        actor: &str,
        subject: Subject,
        detail: serde_json::Value,
    ) -> Result<(), TrailDown> {
        T::record_before(self, kind, actor, subject, detail).await
    }

    async fn record_grant_move(
        &self,
        grants: &dyn GrantMover,
        kind: &str,
        actor: &str,
        subject: Subject,
        detail: serde_json::Value,
        grant_move: GrantMove,
    ) -> Result<bool, TrailDown> {
        T::record_grant_move(self, grants, kind, actor, subject, detail, grant_move).await
    }

    async fn room_for_request(&self, appliance_id: &str) -> Result<(), ApiError> {
        T::room_for_request(self, appliance_id).await
    }
}

/// What a connected agent reported about its appliance.
#[derive(Debug, Clone, Default)]
pub struct AgentView {
    pub policy: PolicySummary,
    pub resources: Vec<ResourceDescriptor>,
}

impl AgentView {
    pub fn resource(&self, id: &str) -> Option<&ResourceDescriptor> {
        self.resources.iter().find(|r| r.id == id)
    }
}

/// The connected agents, as the services reach them.
pub trait AgentPort: Send + Sync {
    /// The agent's report, while it is connected.
    fn view(&self, appliance_id: &str) -> Option<AgentView>;
    fn is_online(&self, appliance_id: &str) -> bool {
        self.view(appliance_id).is_some()
    }
    /// Queues a frame for the agent; false if it is not connected. A command that cannot be
    /// queued drops the connection (the agent resynchronises from the store on reconnect), so
    /// `false` never means "lost": the store holds the state the resync sends.
    fn send(&self, appliance_id: &str, frame: ToAgent) -> bool;
    /// Held while a full grant set is read and queued, so a stale set never overtakes a newer one.
    fn grant_sync_lock(&self, appliance_id: &str) -> Option<Arc<tokio::sync::Mutex<()>>>;
}

impl AgentPort for AgentRegistry {
    fn view(&self, appliance_id: &str) -> Option<AgentView> {
        self.get(appliance_id).map(|l| AgentView {
            policy: l.policy,
            resources: l.resources,
        })
    }

    fn is_online(&self, appliance_id: &str) -> bool {
        AgentRegistry::is_online(self, appliance_id)
    }

    fn send(&self, appliance_id: &str, frame: ToAgent) -> bool {
        AgentRegistry::send(self, appliance_id, frame)
    }

    fn grant_sync_lock(&self, appliance_id: &str) -> Option<Arc<tokio::sync::Mutex<()>>> {
        self.get(appliance_id).map(|l| l.grant_sync)
    }
}

/// What ops and endpoints ask of the grants service: is operate live, would the policy approve
/// by itself right now, what the customer's policy is.
#[async_trait]
pub trait GrantGate: Send + Sync {
    /// The live operate grant that authorises an op or endpoint now, or the structured refusal.
    async fn require_operate(
        &self,
        appliance: &ApplianceRow,
        now: Timestamp,
    ) -> Result<GrantRow, ApiError>;
    /// The live grant of `phase` that authorises an op or endpoint of that phase now, or the
    /// structured refusal. Services that know only operate refuse the other phases.
    async fn require_phase(
        &self,
        appliance: &ApplianceRow,
        phase: endpoint_types::control::GrantLevel,
        now: Timestamp,
    ) -> Result<GrantRow, ApiError> {
        match phase {
            endpoint_types::control::GrantLevel::Operate => {
                self.require_operate(appliance, now).await
            }
            other => Err(endpoint_types::phase::grant_required(
                other,
                &appliance.app,
                &appliance.customer,
            )),
        }
    }
    /// (decided_by, latest expiry) when the policy of `phase` (`[policy.<phase>]`, else
    /// `[policy]`) approves by itself at `now`.
    async fn automatic_decision(
        &self,
        appliance_id: &str,
        phase: endpoint_types::control::GrantLevel,
        now: Timestamp,
    ) -> Option<(&'static str, Option<Timestamp>)>;
    /// The customer's policy as the appliance last reported it (unknown: manual).
    async fn policy_of(&self, appliance_id: &str) -> PolicySummary;
    /// What the policy of `phase` says at `at`, and the rule that says it (for the trail and
    /// `approvals show`).
    async fn ruling(
        &self,
        appliance_id: &str,
        phase: endpoint_types::control::GrantLevel,
        at: Timestamp,
    ) -> endpoint_types::phase_policy::Ruling {
        endpoint_types::phase_policy::ruling(&self.policy_of(appliance_id).await, phase, at)
    }
}

/// Tells the customer's people that something waits for them (the approval webhook).
#[async_trait]
pub trait Notifier: Send + Sync {
    async fn waiting(&self, customer: &str, kind: &str, id: &str);
}

/// In-memory stand-ins for the unit tests of the services.
#[cfg(test)]
pub mod fakes {
    use super::*;
    use std::sync::Mutex;

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A clock that moves only when told.
    #[derive(Debug)]
    pub struct FakeClock(Mutex<Timestamp>);

    impl FakeClock {
        pub fn at(t: Timestamp) -> FakeClock {
            FakeClock(Mutex::new(t))
        }
        pub fn advance(&self, by: std::time::Duration) {
            let mut t = lock(&self.0);
            *t += jiff::SignedDuration::try_from(by).unwrap_or_default();
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Timestamp {
            *lock(&self.0)
        }
    }

    /// One record as a service wrote it.
    #[derive(Debug, Clone)]
    pub struct Recorded {
        pub kind: String,
        pub actor: String,
        pub subject: Subject,
        pub detail: serde_json::Value,
    }

    /// Keeps every record; `fail_before` makes `record_before` refuse, as a failing store does.
    #[derive(Debug, Default)]
    pub struct MemoryAudit {
        pub records: Mutex<Vec<Recorded>>,
        pub fail_before: std::sync::atomic::AtomicBool,
    }

    impl MemoryAudit {
        pub fn kinds(&self) -> Vec<String> {
            lock(&self.records).iter().map(|r| r.kind.clone()).collect()
        }
        pub fn of_kind(&self, kind: &str) -> Vec<Recorded> {
            lock(&self.records)
                .iter()
                .filter(|r| r.kind == kind)
                .cloned()
                .collect()
        }
    }

    #[async_trait]
    impl AuditSink for MemoryAudit {
        async fn record(
            &self,
            kind: &str,
            actor: &str,
            subject: Subject,
            detail: serde_json::Value,
        ) {
            lock(&self.records).push(Recorded {
                kind: kind.into(),
                actor: actor.into(),
                subject,
                detail,
            });
        }

        async fn record_before(
            &self,
            kind: &str,
            actor: &str,
            subject: Subject,
            detail: serde_json::Value,
        ) -> Result<(), TrailDown> {
            if self.fail_before.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(TrailDown("the test store refuses records".into()));
            }
            self.record(kind, actor, subject, detail).await;
            Ok(())
        }
    }

    /// Connected agents that keep what they were sent.
    #[derive(Debug, Default)]
    pub struct RecordingAgents {
        pub online: Mutex<std::collections::HashMap<String, AgentView>>,
        pub sent: Mutex<Vec<(String, ToAgent)>>,
        locks: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    }

    impl RecordingAgents {
        pub fn connect(&self, appliance_id: &str, view: AgentView) {
            lock(&self.online).insert(appliance_id.into(), view);
        }
        pub fn disconnect(&self, appliance_id: &str) {
            lock(&self.online).remove(appliance_id);
        }
        pub fn sent_to(&self, appliance_id: &str) -> Vec<ToAgent> {
            lock(&self.sent)
                .iter()
                .filter(|(a, _)| a == appliance_id)
                .map(|(_, f)| f.clone())
                .collect()
        }
    }

    impl AgentPort for RecordingAgents {
        fn view(&self, appliance_id: &str) -> Option<AgentView> {
            lock(&self.online).get(appliance_id).cloned()
        }

        fn send(&self, appliance_id: &str, frame: ToAgent) -> bool {
            if !lock(&self.online).contains_key(appliance_id) {
                return false;
            }
            lock(&self.sent).push((appliance_id.into(), frame));
            true
        }

        fn grant_sync_lock(&self, appliance_id: &str) -> Option<Arc<tokio::sync::Mutex<()>>> {
            lock(&self.online).get(appliance_id)?;
            Some(
                lock(&self.locks)
                    .entry(appliance_id.into())
                    .or_default()
                    .clone(),
            )
        }
    }

    /// Keeps each notification as (customer, kind, id).
    #[derive(Debug, Default)]
    pub struct RecordingNotifier(pub Mutex<Vec<(String, String, String)>>);

    #[async_trait]
    impl Notifier for RecordingNotifier {
        async fn waiting(&self, customer: &str, kind: &str, id: &str) {
            lock(&self.0).push((customer.into(), kind.into(), id.into()));
        }
    }
}
