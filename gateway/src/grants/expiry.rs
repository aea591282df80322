//! Grants that run out. Expiry is derived from `expires_at` (the agent decides by its own
//! clock, the gateway by its own); what the gateway adds here is the record: `grant.expired`,
//! once per grant, in the vendor trail and from there in the appliance's customer trail, also
//! when the agent was away at that moment or the gateway was down (it is written late then,
//! and says by how much).

use super::Grants;
use crate::{audit::Subject, identity::Caller, store::StoreError};
use jiff::Timestamp;
use std::{sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// Expiries read and recorded per store round.
const BATCH: u32 = 100;
/// Rounds per wake: bounds a wake's work even if claims keep failing.
const ROUNDS: usize = 100;
/// The longest sleep between looks, for grants another replica approved (its bell rings
/// there, not here) and after a store error.
const LOOK_EVERY: Duration = Duration::from_secs(30);
/// A timer may fire a moment before the expiry it was set for, by the store's precision.
const SLACK: Duration = Duration::from_millis(5);

impl Grants {
    /// Records `grant.expired` for every grant that has run out and was not recorded yet;
    /// returns the expiry to wake for next.
    pub async fn record_expiries(&self) -> Result<Option<Timestamp>, StoreError> {
        let now = self.stored_now();
        for _ in 0..ROUNDS {
            let due = self.store.unrecorded_expiries(now, BATCH).await?;
            let full = due.len() == BATCH as usize;
            for row in due {
                // Exactly one replica (and one run) writes it.
                if !self.store.claim_expiry_record(&row.id, now).await? {
                    continue;
                }
                let late_s = row
                    .expires_at
                    .map_or(0, |at| now.duration_since(at).as_secs().max(0));
                self.audit
                    .record(
                        "grant.expired",
                        &Caller::system().actor(),
                        Subject::appliance(&row.appliance_id),
                        serde_json::json!({
                            "grant_id": row.id, "level": row.level.as_str(),
                            "expires_at": row.expires_at, "late_s": late_s,
                        }),
                    )
                    .await;
            }
            if !full {
                break;
            }
        }
        self.store.next_unrecorded_expiry().await
    }

    /// Rung when a grant is approved, so its expiry gets a timer at once.
    pub(super) fn ring_expiry_bell(&self) {
        self.expiry_bell.notify_one();
    }
}

/// How long to sleep before the expiry at `next`, seen at `now`.
fn wait_for(next: Option<Timestamp>, now: Timestamp) -> Duration {
    let Some(next) = next else {
        return LOOK_EVERY;
    };
    let ms = next.as_millisecond().saturating_sub(now.as_millisecond());
    let ms = u64::try_from(ms).unwrap_or(0);
    (Duration::from_millis(ms) + SLACK).min(LOOK_EVERY)
}

/// Records grants' expiries as they fall due, until `stop`.
pub async fn run(grants: Arc<Grants>, stop: CancellationToken) {
    let bell = grants.expiry_bell.clone();
    loop {
        let wait = match grants.record_expiries().await {
            Ok(next) => wait_for(next, grants.clock.now()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot record grants' expiries; trying again");
                LOOK_EVERY
            }
        };
        tokio::select! {
            () = stop.cancelled() => break,
            () = bell.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_until_the_next_expiry_and_never_longer_than_a_look() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert_eq!(wait_for(None, now), LOOK_EVERY);
        assert_eq!(
            wait_for(Some(Timestamp::from_second(1_002).unwrap()), now),
            Duration::from_secs(2) + SLACK
        );
        // Past due: at once (the slack only).
        assert_eq!(
            wait_for(Some(Timestamp::from_second(990).unwrap()), now),
            SLACK
        );
        assert_eq!(
            wait_for(Some(Timestamp::from_second(5_000).unwrap()), now),
            LOOK_EVERY
        );
    }
}
