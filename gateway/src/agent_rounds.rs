//! What connected agents report that no request waits for: their presence (a heartbeat) and
//! how far their customer trail got (`TrailRecorded`, `crate::customer_trail`). Gathered from
//! every connection and written by one task, one store transaction per round.
//!
//! One write per heartbeat (about 200 a second with 1000 agents) and one transaction per
//! `TrailRecorded` shared the gateway's single SQLite connection with every API call: in
//! scale_bench's revocation burst each revoke paid for its report's own transaction on top of
//! its own. A round costs one `BEGIN`/`COMMIT`, one statement for all the presences in it and
//! two statements per appliance whose trail moved.
//!
//! Latest wins, and nothing is lost: the round holds at most one presence and one trail
//! position per appliance (a newer one replaces one not yet written), pushing never waits and
//! never fails, and a round the store refuses is kept under the newer reports and written
//! with the next round.

use crate::store::{Store, TrailPosition};
use jiff::Timestamp;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long the writer gathers reports after the first one before it writes the round: long
/// enough that a busy gateway's heartbeats share a transaction, short next to the heartbeat
/// interval and to anything that reads these rows (`appliance list`, the outbox bound).
const GATHER: Duration = Duration::from_millis(50);
/// Pause after a round the store refused, before it is tried again (with what came meanwhile).
const RETRY: Duration = Duration::from_secs(1);

/// The reports not yet written, at most one of each kind per appliance. Sans IO.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Appliances that were heard from, and the latest time each was.
    pub seen: HashMap<String, Timestamp>,
    /// The latest customer-trail position each agent reported.
    pub trail: HashMap<String, TrailPosition>,
}

impl Round {
    /// The agent of `appliance_id` was heard from at `at`.
    pub fn seen(&mut self, appliance_id: &str, at: Timestamp) {
        match self.seen.get_mut(appliance_id) {
            Some(t) => *t = (*t).max(at),
            None => {
                self.seen.insert(appliance_id.to_string(), at);
            }
        }
    }

    /// The agent reported its trail's position: the latest report wins, also when it is lower
    /// (a trail restored from an older copy is taken as it is, `Store::outbox_recorded`).
    pub fn recorded(&mut self, appliance_id: &str, position: TrailPosition) {
        self.trail.insert(appliance_id.to_string(), position);
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty() && self.trail.is_empty()
    }

    /// Puts back a round the store refused, under what was reported since: a newer trail
    /// position stays, the later presence stays.
    pub fn keep_under(&mut self, older: Round) {
        for (id, at) in older.seen {
            self.seen(&id, at);
        }
        for (id, position) in older.trail {
            self.trail.entry(id).or_insert(position);
        }
    }

    /// The time the round writes for every appliance seen in it: the latest heartbeat of the
    /// round (all within [`GATHER`] of each other, plus a retry's pause).
    pub fn seen_at(&self) -> Option<Timestamp> {
        self.seen.values().max().copied()
    }
}

/// The reports waiting for the writer; pushing never waits.
#[derive(Debug, Default)]
pub struct AgentRounds {
    round: Mutex<Round>,
    bell: Notify,
}

impl AgentRounds {
    fn with_round(&self, f: impl FnOnce(&mut Round)) {
        f(&mut self.round.lock().unwrap_or_else(|p| p.into_inner()));
        self.bell.notify_one();
    }

    /// A heartbeat from the agent of `appliance_id`.
    pub fn seen(&self, appliance_id: &str, at: Timestamp) {
        self.with_round(|r| r.seen(appliance_id, at));
    }

    /// The agent of `appliance_id` holds its customer trail up to `position.number`.
    pub fn recorded(&self, appliance_id: &str, position: TrailPosition) {
        self.with_round(|r| r.recorded(appliance_id, position));
    }

    fn take(&self) -> Round {
        std::mem::take(&mut *self.round.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn keep(&self, refused: Round) {
        self.round
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keep_under(refused);
    }

    /// Writes rounds until `shutdown`, then what is left.
    pub async fn run(self: Arc<Self>, store: Store, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = self.bell.notified() => {}
                () = shutdown.cancelled() => {
                    self.write_round(&store).await;
                    return;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(GATHER) => {}
                () = shutdown.cancelled() => {}
            }
            if !self.write_round(&store).await {
                tokio::select! {
                    () = tokio::time::sleep(RETRY) => {}
                    () = shutdown.cancelled() => {}
                }
                self.bell.notify_one();
            }
        }
    }

    /// Writes what was reported so far; false (the round kept for the next) if the store
    /// refused it.
    async fn write_round(&self, store: &Store) -> bool {
        let round = self.take();
        if round.is_empty() {
            return true;
        }
        match write(store, &round).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "could not record agents' presence and trail positions; trying again with the next round");
                self.keep(round);
                false
            }
        }
    }
}

async fn write(store: &Store, round: &Round) -> Result<(), crate::store::StoreError> {
    let seen: Vec<&str> = round.seen.keys().map(String::as_str).collect();
    let trail: Vec<(&str, TrailPosition)> = round
        .trail
        .iter()
        .map(|(id, p)| (id.as_str(), *p))
        .collect();
    let ahead = store
        .write_agent_round(&seen, round.seen_at(), &trail)
        .await?;
    for (appliance, number) in ahead {
        tracing::warn!(%appliance, number, "the appliance's customer trail is ahead of this store's numbering (the store was restored?); numbering goes on after it");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
