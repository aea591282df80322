//! The live-endpoint table: the agent's own record of which endpoints it may serve, and until
//! when. The gateway proposes (open, sync, close); the agent decides by its own clock.
//!
//! Pure state, `now` passed in; the control loop drives it and owns the timers.
//!
//! A live endpoint is `active` in the endpoint state machine shared with the gateway
//! ([`endpoint_lifecycle::next`]); the agent ends it (closed by the gateway, its grant gone,
//! its expiry passed) only by a move that machine allows, so an endpoint that has ended is not
//! ended again under another reason. A grant is live by the same rule the gateway applies
//! ([`grant_state`]: expired at `expires_at`), read with this appliance's clock.

use endpoint_types::{
    api::EndpointState,
    control::{GrantLevel, GrantState},
    frame::{EndpointGrant, LiveGrant},
    lifecycle::{
        endpoint::{self as endpoint_lifecycle, EndpointEvent},
        grant_authorises_ops, grant_state,
    },
    resource::CloseReason,
};
use jiff::Timestamp;
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, OnceLock},
};
use tokio_util::sync::CancellationToken;

/// How many ended endpoints are remembered, to tell "retired"/"expired" from "never heard of".
const ENDED_MEMORY: usize = 4096;

/// The endpoint machine's event for ending an endpoint with `reason`: expiry, or retirement
/// for every other end (retired by a person, its grant revoked, the connection gone).
fn end_event(reason: CloseReason) -> EndpointEvent {
    match reason {
        CloseReason::Expired => EndpointEvent::Expire,
        CloseReason::Retired
        | CloseReason::Revoked
        | CloseReason::Client
        | CloseReason::Interrupted
        | CloseReason::Error => EndpointEvent::Retire,
    }
}

/// The state an endpoint that ended with `reason` is in.
fn ended_state(reason: CloseReason) -> EndpointState {
    match reason {
        CloseReason::Expired => EndpointState::Expired,
        _ => EndpointState::Retired,
    }
}

/// Whether `g` is a live operate grant at `now` by this appliance's clock: in force since its
/// approval, and not expired by the rule the gateway applies.
pub fn operate_grant_in_force(g: &LiveGrant, now: Timestamp) -> bool {
    g.approved_at <= now
        && grant_authorises_ops(
            g.level,
            grant_state(GrantState::Active, Some(g.expires_at), now),
        )
}

/// Whether `g` is a live grant of `phase` at `now` by this appliance's clock (an endpoint or
/// op of a phase needs a grant of that very phase).
pub fn grant_in_force_for(g: &LiveGrant, phase: GrantLevel, now: Timestamp) -> bool {
    g.approved_at <= now
        && endpoint_types::phase::grant_authorises(
            g.level,
            phase,
            grant_state(GrantState::Active, Some(g.expires_at), now),
        )
}

/// The sessions an endpoint has admitted that have not ended yet: each session's [`Cut`]
/// (and its clones) holds a mark, so a session counts until its last handle is gone. What a
/// teardown proof checks after the cut ([`crate::teardown_proof`]).
#[derive(Debug, Clone, Default)]
pub struct LiveSessions(Arc<std::sync::Mutex<SessionMarks>>);

#[derive(Debug, Default)]
struct SessionMarks {
    live: Vec<std::sync::Weak<()>>,
    admitted: usize,
}

impl LiveSessions {
    fn admit(&self) -> Arc<()> {
        let mark = Arc::new(());
        let mut marks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        marks.live.retain(|m| m.strong_count() > 0);
        marks.live.push(Arc::downgrade(&mark));
        marks.admitted += 1;
        mark
    }

    /// Sessions admitted and not yet ended.
    pub fn count(&self) -> usize {
        let marks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        marks.live.iter().filter(|m| m.strong_count() > 0).count()
    }

    /// Sessions admitted over the endpoint's life (in this agent process).
    pub fn admitted(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).admitted
    }
}

impl PartialEq for LiveSessions {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Cuts an endpoint's sessions, carrying why; the first reason given wins.
#[derive(Debug, Clone, Default)]
pub struct Cut {
    token: CancellationToken,
    reason: Arc<OnceLock<CloseReason>>,
    /// A session's endpoint's reason: a session cut on its own says why itself.
    parent: Option<Arc<OnceLock<CloseReason>>>,
    /// An endpoint's: its sessions still running.
    sessions: LiveSessions,
    /// A session's: it counts among its endpoint's sessions while this lives.
    _mark: Option<Arc<()>>,
}

impl Cut {
    pub fn cut(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// A handle for one session: cancelled with its endpoint, never cancels the endpoint.
    pub fn child(&self) -> Cut {
        Cut {
            token: self.token.child_token(),
            reason: Arc::default(),
            parent: Some(self.reason.clone()),
            sessions: LiveSessions::default(),
            _mark: Some(self.sessions.admit()),
        }
    }

    /// The sessions admitted under this (an endpoint's) cut that are still running.
    pub fn sessions(&self) -> &LiveSessions {
        &self.sessions
    }

    pub fn is_cut(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Why it was cut: its own reason, else its endpoint's.
    pub fn reason(&self) -> Option<CloseReason> {
        self.token.is_cancelled().then(|| {
            self.reason
                .get()
                .or_else(|| self.parent.as_ref().and_then(|p| p.get()))
                .copied()
                .unwrap_or(CloseReason::Interrupted)
        })
    }

    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }
}

#[derive(Debug)]
struct Live {
    grant: EndpointGrant,
    cut: Cut,
}

/// What the table says about an endpoint id at a given time.
#[derive(Debug)]
pub enum Liveness<'a> {
    Live {
        grant: &'a EndpointGrant,
        cut: &'a Cut,
    },
    /// The endpoint is live but the operate grant it was created under is not (by our clock).
    NoGrant,
    Ended(CloseReason),
    Unknown,
}

/// An endpoint that left the table, for the caller to audit.
#[derive(Debug, Clone, PartialEq)]
pub struct Removed {
    pub endpoint_id: String,
    pub reason: CloseReason,
    /// What the endpoint was, so per-type teardown (a Postgres role) knows what to undo.
    pub grant: EndpointGrant,
    /// Its sessions, cut: the teardown proof waits for them to end.
    pub sessions: LiveSessions,
}

#[derive(Debug, Default)]
pub struct LiveEndpoints {
    live: HashMap<String, Live>,
    /// The appliance's grants as the gateway last synced them; checked against our clock.
    grants: HashMap<String, LiveGrant>,
    ended: HashMap<String, CloseReason>,
    ended_order: VecDeque<String>,
}

impl LiveEndpoints {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or refreshes a grant. Returns whether it is live: a grant already past its
    /// expiry by our clock is recorded as expired, whatever the gateway thinks.
    pub fn insert(&mut self, grant: EndpointGrant, now: Timestamp) -> bool {
        if grant.expires_at <= now {
            // A live one ends as expired (its sessions cut); one never heard of is remembered so.
            let _ = self.close(&grant.endpoint_id, CloseReason::Expired);
            return false;
        }
        self.ended.remove(&grant.endpoint_id);
        match self.live.get_mut(&grant.endpoint_id) {
            // A refresh keeps the sessions: they were admitted under the same endpoint.
            Some(existing) => existing.grant = grant,
            None => {
                self.live.insert(
                    grant.endpoint_id.clone(),
                    Live {
                        grant,
                        cut: Cut::default(),
                    },
                );
            }
        }
        true
    }

    /// Replaces the live set with `grants`. Returns the ids newly live and the ones removed
    /// (their sessions already cut).
    pub fn sync(
        &mut self,
        grants: Vec<EndpointGrant>,
        now: Timestamp,
    ) -> (Vec<String>, Vec<Removed>) {
        let keep: std::collections::HashSet<&str> =
            grants.iter().map(|g| g.endpoint_id.as_str()).collect();
        let gone: Vec<String> = self
            .live
            .keys()
            .filter(|id| !keep.contains(id.as_str()))
            .cloned()
            .collect();
        let mut removed = Vec::new();
        for id in gone {
            let expired = self
                .live
                .get(&id)
                .is_some_and(|l| l.grant.expires_at <= now);
            let reason = if expired {
                CloseReason::Expired
            } else {
                CloseReason::Retired
            };
            if let Some(r) = self.close(&id, reason) {
                removed.push(r);
            }
        }
        let mut added = Vec::new();
        for grant in grants {
            let id = grant.endpoint_id.clone();
            let was_live = self.live.contains_key(&id);
            if self.insert(grant, now) && !was_live {
                added.push(id);
            }
        }
        (added, removed)
    }

    /// The endpoint's state in this table: `active` while live, its end once ended, `None`
    /// when the table never held it (or has forgotten it).
    pub fn state_of(&self, endpoint_id: &str) -> Option<EndpointState> {
        if self.live.contains_key(endpoint_id) {
            return Some(EndpointState::Active);
        }
        self.ended.get(endpoint_id).copied().map(ended_state)
    }

    /// Ends a live endpoint and cuts its sessions, by the endpoint machine's move for
    /// `reason`. `None` if it was not live: one that has ended keeps its end (the machine
    /// refuses a second), one never heard of is remembered as ended with `reason`.
    pub fn close(&mut self, endpoint_id: &str, reason: CloseReason) -> Option<Removed> {
        let Some(from) = self.state_of(endpoint_id) else {
            self.remember_ended(endpoint_id.to_string(), reason);
            return None;
        };
        if let Err(e) = endpoint_lifecycle::next(from, end_event(reason)) {
            tracing::debug!(endpoint = %endpoint_id, reason = reason.as_str(), "not ending an endpoint again: {e}");
            return None;
        }
        let live = self.live.remove(endpoint_id)?;
        self.remember_ended(endpoint_id.to_string(), reason);
        live.cut.cut(reason);
        Some(Removed {
            endpoint_id: endpoint_id.to_string(),
            reason,
            grant: live.grant,
            sessions: live.cut.sessions.clone(),
        })
    }

    /// Ends every endpoint whose expiry has passed.
    pub fn expire_due(&mut self, now: Timestamp) -> Vec<Removed> {
        let due: Vec<String> = self
            .live
            .iter()
            .filter(|(_, l)| l.grant.expires_at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        due.iter()
            .filter_map(|id| self.close(id, CloseReason::Expired))
            .collect()
    }

    /// When the control loop must next call [`LiveEndpoints::expire_due`].
    pub fn next_expiry(&self) -> Option<Timestamp> {
        self.live.values().map(|l| l.grant.expires_at).min()
    }

    /// Forgets every endpoint, cutting all sessions: the connection is gone, and the gateway
    /// resends the live set after the next hello.
    pub fn clear(&mut self, reason: CloseReason) -> usize {
        let n = self.live.len();
        for (_, l) in self.live.drain() {
            l.cut.cut(reason);
        }
        n
    }

    /// Replaces the grant set. Endpoints whose operate grant is no longer among the live
    /// grants are ended with reason `revoked`, and their sessions cut.
    pub fn sync_grants(&mut self, grants: Vec<LiveGrant>, now: Timestamp) -> Vec<Removed> {
        self.grants = grants
            .into_iter()
            .map(|g| (g.grant_id.clone(), g))
            .collect();
        let orphaned: Vec<String> = self
            .live
            .iter()
            .filter(|(_, l)| {
                !self.grant_live_for(l.grant.grant_id.as_deref(), l.grant.phase, now)
                    && self.grant_known_gone(&l.grant)
            })
            .map(|(id, _)| id.clone())
            .collect();
        orphaned
            .iter()
            .filter_map(|id| self.close(id, CloseReason::Revoked))
            .collect()
    }

    fn grant_known_gone(&self, ep: &EndpointGrant) -> bool {
        ep.grant_id
            .as_ref()
            .is_none_or(|g| !self.grants.contains_key(g))
    }

    /// Whether `grant_id` names a live operate grant by our clock.
    pub fn operate_grant_live(&self, grant_id: Option<&str>, now: Timestamp) -> bool {
        grant_id
            .and_then(|g| self.grants.get(g))
            .is_some_and(|g| operate_grant_in_force(g, now))
    }

    /// Whether `grant_id` names a live grant of `phase` by our clock.
    pub fn grant_live_for(
        &self,
        grant_id: Option<&str>,
        phase: GrantLevel,
        now: Timestamp,
    ) -> bool {
        grant_id
            .and_then(|g| self.grants.get(g))
            .is_some_and(|g| grant_in_force_for(g, phase, now))
    }

    /// The live operate grant with the latest expiry, if any (ops run under it).
    pub fn live_operate_grant(&self, now: Timestamp) -> Option<&LiveGrant> {
        self.grants
            .values()
            .filter(|g| self.operate_grant_live(Some(&g.grant_id), now))
            .max_by_key(|g| g.expires_at)
    }

    pub fn check(&self, endpoint_id: &str, now: Timestamp) -> Liveness<'_> {
        match self.live.get(endpoint_id) {
            Some(l)
                if l.grant.expires_at > now
                    && !self.grant_live_for(l.grant.grant_id.as_deref(), l.grant.phase, now) =>
            {
                Liveness::NoGrant
            }
            Some(l) if l.grant.expires_at > now => Liveness::Live {
                grant: &l.grant,
                cut: &l.cut,
            },
            Some(_) => Liveness::Ended(CloseReason::Expired),
            None => match self.ended.get(endpoint_id) {
                Some(reason) => Liveness::Ended(*reason),
                None => Liveness::Unknown,
            },
        }
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    fn remember_ended(&mut self, id: String, reason: CloseReason) {
        if self.ended.insert(id.clone(), reason).is_none() {
            self.ended_order.push_back(id);
        }
        while self.ended_order.len() > ENDED_MEMORY {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_types::{control::GrantLevel, resource::EndpointType};
    use jiff::SignedDuration;

    fn t0() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    fn at(secs: i64) -> Timestamp {
        t0() + SignedDuration::from_secs(secs)
    }

    fn grant(id: &str, expires: i64) -> EndpointGrant {
        EndpointGrant {
            phase: endpoint_types::phase::operate(),
            endpoint_id: id.into(),
            endpoint_type: EndpointType::Tcp,
            resource_id: "null_resource.echo".into(),
            expires_at: at(expires),
            grant_id: Some("gr_1".into()),
            signed_decision: None,
        }
    }

    /// A table that already holds a day-long operate grant `gr_1`.
    fn table() -> LiveEndpoints {
        let mut t = LiveEndpoints::new();
        t.sync_grants(
            vec![LiveGrant {
                grant_id: "gr_1".into(),
                level: GrantLevel::Operate,
                approved_by: "bob@acme".into(),
                approved_at: at(0),
                expires_at: at(86_400),
                signed_decision: None,
            }],
            at(0),
        );
        t
    }

    fn session(t: &LiveEndpoints, id: &str, now: Timestamp) -> Cut {
        match t.check(id, now) {
            Liveness::Live { cut, .. } => cut.child(),
            other => panic!("{id} not live: {other:?}"),
        }
    }

    #[test]
    fn live_until_expiry_by_our_clock() {
        let mut t = table();
        assert!(t.insert(grant("ep1", 60), at(0)));
        assert!(matches!(t.check("ep1", at(59)), Liveness::Live { .. }));
        // Even before the timer fires, an expired grant serves nothing.
        assert!(matches!(
            t.check("ep1", at(60)),
            Liveness::Ended(CloseReason::Expired)
        ));
        assert!(matches!(t.check("nope", at(0)), Liveness::Unknown));
    }

    #[test]
    fn already_expired_grant_is_not_inserted() {
        let mut t = table();
        assert!(!t.insert(grant("ep1", 10), at(10)));
        assert!(t.is_empty());
        assert!(matches!(
            t.check("ep1", at(0)),
            Liveness::Ended(CloseReason::Expired)
        ));
    }

    #[test]
    fn close_cuts_sessions_with_the_reason() {
        let mut t = table();
        t.insert(grant("ep1", 60), at(0));
        let s = session(&t, "ep1", at(1));
        assert_eq!(s.reason(), None);
        assert_eq!(
            t.close("ep1", CloseReason::Retired)
                .map(|r| (r.endpoint_id, r.reason)),
            Some(("ep1".into(), CloseReason::Retired))
        );
        assert_eq!(s.reason(), Some(CloseReason::Retired));
        assert!(matches!(
            t.check("ep1", at(1)),
            Liveness::Ended(CloseReason::Retired)
        ));
        assert_eq!(t.close("ep1", CloseReason::Retired), None);
    }

    #[test]
    fn expire_due_and_next_expiry() {
        let mut t = table();
        t.insert(grant("a", 10), at(0));
        t.insert(grant("b", 20), at(0));
        assert_eq!(t.next_expiry(), Some(at(10)));
        let s = session(&t, "a", at(1));
        let due: Vec<_> = t
            .expire_due(at(10))
            .into_iter()
            .map(|r| (r.endpoint_id, r.reason))
            .collect();
        assert_eq!(due, vec![("a".to_string(), CloseReason::Expired)]);
        assert_eq!(s.reason(), Some(CloseReason::Expired));
        assert_eq!(t.next_expiry(), Some(at(20)));
        assert!(t.expire_due(at(11)).is_empty());
    }

    #[test]
    fn sync_replaces_the_set_and_keeps_surviving_sessions() {
        let mut t = table();
        t.insert(grant("a", 60), at(0));
        t.insert(grant("b", 60), at(0));
        let sa = session(&t, "a", at(1));
        let sb = session(&t, "b", at(1));
        let (added, removed) = t.sync(vec![grant("a", 120), grant("c", 60)], at(2));
        assert_eq!(added, vec!["c".to_string()]);
        let removed: Vec<_> = removed
            .into_iter()
            .map(|r| (r.endpoint_id, r.reason))
            .collect();
        assert_eq!(removed, vec![("b".to_string(), CloseReason::Retired)]);
        assert!(!sa.is_cut());
        assert_eq!(sb.reason(), Some(CloseReason::Retired));
        // The refresh extended a's expiry.
        assert!(matches!(t.check("a", at(100)), Liveness::Live { .. }));
    }

    #[test]
    fn clear_cuts_everything_as_interrupted() {
        let mut t = table();
        t.insert(grant("a", 60), at(0));
        let s = session(&t, "a", at(1));
        assert_eq!(t.clear(CloseReason::Interrupted), 1);
        assert_eq!(s.reason(), Some(CloseReason::Interrupted));
        assert!(matches!(t.check("a", at(1)), Liveness::Unknown));
    }

    #[test]
    fn an_endpoint_counts_its_sessions_until_each_ends() {
        let mut t = table();
        t.insert(grant("a", 60), at(0));
        let s1 = session(&t, "a", at(1));
        let s1_clone = s1.clone();
        let s2 = session(&t, "a", at(1));
        let removed = t.close("a", CloseReason::Retired).unwrap();
        assert_eq!(removed.sessions.count(), 2);
        assert_eq!(removed.sessions.admitted(), 2);
        drop(s2);
        assert_eq!(removed.sessions.count(), 1);
        drop(s1);
        // A clone of a session's cut is the same session.
        assert_eq!(removed.sessions.count(), 1);
        drop(s1_clone);
        assert_eq!(removed.sessions.count(), 0);
    }

    #[test]
    fn first_reason_wins() {
        let c = Cut::default();
        let s = c.child();
        c.cut(CloseReason::Revoked);
        c.cut(CloseReason::Interrupted);
        assert_eq!(s.reason(), Some(CloseReason::Revoked));
    }

    #[test]
    fn an_ended_endpoint_is_not_ended_again() {
        let mut t = table();
        t.insert(grant("a", 60), at(0));
        assert_eq!(t.state_of("a"), Some(EndpointState::Active));
        let due = t.expire_due(at(60));
        assert_eq!(due.len(), 1);
        assert_eq!(t.state_of("a"), Some(EndpointState::Expired));
        // The gateway's close arrives after the agent's clock ended it: the machine refuses a
        // second end, so nothing is cut or audited again and the first reason stays.
        for reason in [
            CloseReason::Retired,
            CloseReason::Revoked,
            CloseReason::Expired,
        ] {
            assert_eq!(t.close("a", reason), None);
            assert!(matches!(
                t.check("a", at(61)),
                Liveness::Ended(CloseReason::Expired)
            ));
        }
        // A grant announced expired for an endpoint that already ended keeps its end too.
        t.insert(grant("b", 60), at(0));
        assert_eq!(
            t.close("b", CloseReason::Revoked).map(|r| r.reason),
            Some(CloseReason::Revoked)
        );
        assert!(!t.insert(grant("b", 10), at(10)));
        assert!(matches!(
            t.check("b", at(10)),
            Liveness::Ended(CloseReason::Revoked)
        ));
        assert_eq!(t.state_of("b"), Some(EndpointState::Retired));
        // A close for an endpoint never held is remembered as the gateway said.
        assert_eq!(t.close("c", CloseReason::Retired), None);
        assert!(matches!(
            t.check("c", at(0)),
            Liveness::Ended(CloseReason::Retired)
        ));
        assert_eq!(t.state_of("never"), None);
    }

    #[test]
    fn grants_are_live_by_the_gateways_expiry_rule_and_this_clock() {
        let g = LiveGrant {
            grant_id: "gr_1".into(),
            level: GrantLevel::Operate,
            approved_by: "bob@acme".into(),
            approved_at: at(10),
            expires_at: at(70),
            signed_decision: None,
        };
        assert!(
            !operate_grant_in_force(&g, at(9)),
            "not in force before its approval"
        );
        assert!(operate_grant_in_force(&g, at(10)));
        assert!(operate_grant_in_force(&g, at(69)));
        assert!(
            !operate_grant_in_force(&g, at(70)),
            "expired at expires_at exactly"
        );
        let deploy = LiveGrant {
            level: GrantLevel::Deploy,
            ..g
        };
        assert!(!operate_grant_in_force(&deploy, at(20)));
    }

    #[test]
    fn an_endpoint_is_live_only_under_a_grant_of_its_own_phase() {
        // `gr_1` is an operate grant: a deploy endpoint naming it serves nothing.
        let mut t = table();
        t.insert(
            EndpointGrant {
                phase: GrantLevel::Deploy,
                ..grant("dep", 600)
            },
            at(0),
        );
        t.insert(grant("op", 600), at(0));
        assert!(matches!(t.check("dep", at(1)), Liveness::NoGrant));
        assert!(matches!(t.check("op", at(1)), Liveness::Live { .. }));
        // Under a live deploy grant it is live; the operate endpoint naming that grant is not.
        let deploy = LiveGrant {
            grant_id: "gr_2".into(),
            level: GrantLevel::Deploy,
            approved_by: "policy:automatic".into(),
            approved_at: at(0),
            expires_at: at(86_400),
            signed_decision: None,
        };
        let mut t = LiveEndpoints::new();
        t.sync_grants(vec![deploy.clone()], at(0));
        for (id, phase) in [("dep", GrantLevel::Deploy), ("op", GrantLevel::Operate)] {
            t.insert(
                EndpointGrant {
                    phase,
                    grant_id: Some("gr_2".into()),
                    ..grant(id, 600)
                },
                at(0),
            );
        }
        assert!(matches!(t.check("dep", at(1)), Liveness::Live { .. }));
        assert!(matches!(t.check("op", at(1)), Liveness::NoGrant));
        assert!(grant_in_force_for(&deploy, GrantLevel::Deploy, at(1)));
        assert!(!grant_in_force_for(&deploy, GrantLevel::Operate, at(1)));
        assert!(!grant_in_force_for(
            &LiveGrant {
                level: GrantLevel::SteadyState,
                ..deploy
            },
            GrantLevel::SteadyState,
            at(1)
        ));
    }

    #[test]
    fn reopen_after_close_is_live_again() {
        let mut t = table();
        t.insert(grant("a", 60), at(0));
        t.close("a", CloseReason::Retired);
        assert!(t.insert(grant("a", 60), at(1)));
        assert!(matches!(t.check("a", at(2)), Liveness::Live { .. }));
    }
}
