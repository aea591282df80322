//! The customer trail's outbox (migration 0008): the records of requests, decisions and
//! outcomes concerning an appliance, numbered per appliance and kept until its agent has
//! recorded them in its own trail (`crate::customer_trail` delivers them).
//!
//! A row is written in the same transaction as its vendor-trail record (the audit append
//! calls [`append_in_tx`]), so the two trails cannot disagree about what happened, and its
//! number is taken under the audit write lock, so numbers have no gaps even with several
//! replicas on one PostgreSQL.

use super::{Store, StoreError, StoreResult};
use endpoint_types::customer_trail::{GatewayEvent, GatewayRecord};
use jiff::Timestamp;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};
use tokio::sync::Notify;

/// Undelivered records one appliance may have before new requests for it are refused.
pub const OUTBOX_BOUND: u64 = 10_000;

/// Wakes the sender of a connected appliance when its outbox gains records (in this process;
/// a replica's sender also looks on a timer).
#[derive(Debug, Default, Clone)]
pub struct TrailBells(Arc<Mutex<HashMap<String, Arc<Notify>>>>);

impl TrailBells {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bell(&self, appliance_id: &str) -> Arc<Notify> {
        self.map()
            .entry(appliance_id.to_string())
            .or_default()
            .clone()
    }

    fn ring(&self, appliance_id: &str) {
        if let Some(bell) = self.map().get(appliance_id) {
            // A permit is kept when nobody waits: a ring is never lost.
            bell.notify_one();
        }
    }

    fn forget(&self, appliance_id: &str, bell: &Arc<Notify>) {
        let mut map = self.map();
        if map.get(appliance_id).is_some_and(|b| Arc::ptr_eq(b, bell)) {
            map.remove(appliance_id);
        }
    }
}

/// How far an appliance's outbox has got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxState {
    /// The last number given to one of its records (0: none yet).
    pub last_number: u64,
    /// The last number its agent reported its trail holds.
    pub recorded_number: u64,
}

impl OutboxState {
    /// Records the agent has not reported yet.
    pub fn undelivered(&self) -> u64 {
        self.last_number.saturating_sub(self.recorded_number)
    }
}

/// How far an agent's customer trail got, as it reported (`TrailRecorded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrailPosition {
    /// The agent's trail holds every record up to this number.
    pub number: u64,
    /// The number is at most the last one this gateway sent the agent: its head row exists
    /// and the numbering is past it, so the checks for a store restored from an older copy
    /// ([`Store::outbox_recorded`]) are skipped.
    pub within_sent: bool,
}

/// Appliance ids per `UPDATE … WHERE id IN (…)`: well under every backend's bind limit.
const IDS_PER_UPDATE: usize = 500;

/// What one vendor-trail record puts in the outbox.
pub(super) struct OutboxEntry<'a> {
    pub appliance_id: &'a str,
    pub event: GatewayEvent,
    pub time: String,
    pub actor: &'a str,
    pub endpoint_id: Option<&'a str>,
    pub op_id: Option<&'a str>,
    pub detail: String,
    pub seq: i64,
    pub hash: &'a str,
}

/// The outbox entry a vendor-trail record makes: one for the kinds of
/// [`GatewayEvent`] about an appliance, none for anything else.
#[allow(clippy::too_many_arguments)]
pub(super) fn entry_of<'a>(
    kind: &str,
    appliance_id: Option<&'a str>,
    time: String,
    actor: &'a str,
    (endpoint_id, op_id): (Option<&'a str>, Option<&'a str>),
    detail: impl FnOnce() -> String,
    seq: i64,
    hash: &'a str,
) -> Option<OutboxEntry<'a>> {
    let event = GatewayEvent::parse(kind)?;
    Some(OutboxEntry {
        appliance_id: appliance_id?,
        event,
        time,
        actor,
        endpoint_id,
        op_id,
        detail: detail(),
        seq,
        hash,
    })
}

fn to_db(n: u64) -> StoreResult<i64> {
    i64::try_from(n).map_err(|_| StoreError::Corrupt(format!("trail number {n} out of range")))
}

fn from_db(n: i64) -> StoreResult<u64> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("trail number {n}")))
}

/// Numbers and inserts `entries`, in order, inside the caller's audit transaction: one
/// statement moves the heads of every appliance the batch concerns and one inserts the rows
/// (per chunk), not two per record, because each statement is a round trip to the store's
/// one writer and a revocation burst's audit batches hold a record for many appliances.
pub(super) async fn append_in_tx(
    tx: &mut sqlx::AnyConnection,
    entries: &[OutboxEntry<'_>],
) -> StoreResult<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let (counts, ranks) = per_appliance_counts(entries);
    let mut last: HashMap<String, i64> = HashMap::new();
    for chunk in counts.chunks(POSITIONS_PER_STATEMENT) {
        last.extend(bumped_heads_in_tx(tx, chunk).await?);
    }
    let fresh: Vec<(&str, i64)> = counts
        .iter()
        .filter(|(id, _)| !last.contains_key(*id))
        .copied()
        .collect();
    for chunk in fresh.chunks(POSITIONS_PER_STATEMENT) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| format!("(${}, ${}, 0)", 2 * i + 1, 2 * i + 2))
            .collect();
        let sql = format!(
            "INSERT INTO customer_trail_heads (appliance_id, last_number, recorded_number) VALUES {}",
            values.join(", ")
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (id, count) in chunk {
            q = q.bind(*id).bind(*count);
        }
        q.execute(&mut *tx).await?;
        last.extend(chunk.iter().map(|(id, count)| (id.to_string(), *count)));
    }
    // The batch's records of one appliance take the numbers after its previous head, in order.
    let before: HashMap<&str, i64> = counts
        .iter()
        .map(|(id, count)| (*id, last.get(*id).copied().unwrap_or(*count) - count))
        .collect();
    let numbered: Vec<(i64, &OutboxEntry)> = entries
        .iter()
        .zip(ranks)
        .map(|(e, rank)| (before.get(e.appliance_id).copied().unwrap_or(0) + rank, e))
        .collect();
    for chunk in numbered.chunks(OUTBOX_ROWS_PER_INSERT) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| {
                let p: Vec<String> = (1..=10).map(|c| format!("${}", 10 * i + c)).collect();
                format!("({})", p.join(", "))
            })
            .collect();
        let sql = format!(
            "INSERT INTO customer_trail_outbox \
             (appliance_id, number, kind, time, actor, endpoint_id, op_id, detail, gateway_seq, gateway_hash) \
             VALUES {}",
            values.join(", ")
        );
        let args = chunk
            .iter()
            .flat_map(|(number, e)| {
                [super::Arg::Text(e.appliance_id), super::Arg::Int(*number)]
                    .into_iter()
                    .chain(outbox_row_rest(e))
            })
            .collect();
        super::with_args(sql, args).execute(&mut *tx).await?;
    }
    Ok(())
}

/// An outbox row's values after its appliance and number, in column order (`kind` …
/// `gateway_hash`).
fn outbox_row_rest<'a>(e: &'a OutboxEntry<'a>) -> [super::Arg<'a>; 8] {
    use super::Arg;
    [
        Arg::Text(e.event.as_str()),
        Arg::Text(&e.time),
        Arg::Text(e.actor),
        Arg::MaybeText(e.endpoint_id),
        Arg::MaybeText(e.op_id),
        Arg::Text(&e.detail),
        Arg::Int(e.seq),
        Arg::Text(e.hash),
    ]
}

/// The appliances `entries` concern, in order of first appearance, each with its number of
/// entries; and each entry's rank (1, 2, …) among the entries of its appliance.
fn per_appliance_counts<'a>(entries: &[OutboxEntry<'a>]) -> (Vec<(&'a str, i64)>, Vec<i64>) {
    let mut seen: HashMap<&str, i64> = HashMap::new();
    let mut order = Vec::new();
    let ranks = entries
        .iter()
        .map(|e| {
            let n = seen.entry(e.appliance_id).or_insert_with(|| {
                order.push(e.appliance_id);
                0
            });
            *n += 1;
            *n
        })
        .collect();
    let counts = order
        .into_iter()
        .map(|id| (id, seen.get(id).copied().unwrap_or(0)))
        .collect();
    (counts, ranks)
}

/// SQLite: the statements that number and insert `entries` inside the caller's audit
/// transaction, as text for the one call that also inserts the batch's audit rows
/// ([`super::Arg`]). Heads that do not exist yet are made first; each entry's number is its
/// appliance's head, read in the same statement, plus its rank among the batch's entries of
/// that appliance; the heads move on last (an increment, as in [`append_in_tx`]).
pub(super) fn sqlite_statements<'a>(
    entries: &'a [OutboxEntry<'a>],
    sql: &mut String,
    args: &mut Vec<super::Arg<'a>>,
) {
    use super::Arg;
    if entries.is_empty() {
        return;
    }
    let (counts, ranks) = per_appliance_counts(entries);
    let list = |n: usize, item: &str, sep: &str| vec![item; n].join(sep);
    for chunk in counts.chunks(POSITIONS_PER_STATEMENT) {
        sql.push_str(&format!(
            "INSERT INTO customer_trail_heads (appliance_id, last_number, recorded_number) VALUES {} \
             ON CONFLICT (appliance_id) DO NOTHING;\n",
            list(chunk.len(), "(?, 0, 0)", ", ")
        ));
        args.extend(chunk.iter().map(|(id, _)| Arg::Text(id)));
    }
    for chunk in entries
        .iter()
        .zip(ranks)
        .collect::<Vec<_>>()
        .chunks(OUTBOX_ROWS_PER_INSERT)
    {
        sql.push_str(&format!(
            "INSERT INTO customer_trail_outbox \
             (appliance_id, number, kind, time, actor, endpoint_id, op_id, detail, gateway_seq, gateway_hash) \
             VALUES {};\n",
            list(
                chunk.len(),
                "(?, (SELECT last_number FROM customer_trail_heads WHERE appliance_id = ?) + ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ", "
            )
        ));
        for (e, rank) in chunk {
            args.extend([
                Arg::Text(e.appliance_id),
                Arg::Text(e.appliance_id),
                Arg::Int(*rank),
            ]);
            args.extend(outbox_row_rest(e));
        }
    }
    for chunk in counts.chunks(POSITIONS_PER_STATEMENT) {
        sql.push_str(&format!(
            "UPDATE customer_trail_heads SET last_number = last_number + CASE appliance_id {} END \
             WHERE appliance_id IN ({});\n",
            list(chunk.len(), "WHEN ? THEN ?", " "),
            list(chunk.len(), "?", ", ")
        ));
        for (id, count) in chunk {
            args.extend([Arg::Text(id), Arg::Int(*count)]);
        }
        args.extend(chunk.iter().map(|(id, _)| Arg::Text(id)));
    }
}

/// Outbox rows one INSERT carries (ten binds each, far below either database's limit).
const OUTBOX_ROWS_PER_INSERT: usize = 100;

/// For `n` appliances bound as pairs (`$1`, `$2` the first appliance and its value, `$3`, `$4`
/// the second, …): the expression `CASE appliance_id WHEN $1 THEN $2 … END` and the id list
/// `$1, $3, …` of the `WHERE appliance_id IN (…)` that goes with it.
fn per_appliance(n: usize) -> (String, String) {
    let cases: Vec<String> = (0..n)
        .map(|i| format!("WHEN ${} THEN ${}", 2 * i + 1, 2 * i + 2))
        .collect();
    let ids: Vec<String> = (0..n).map(|i| format!("${}", 2 * i + 1)).collect();
    (
        format!("CASE appliance_id {} END", cases.join(" ")),
        ids.join(", "),
    )
}

/// Moves the heads of the appliances in `counts` on by their counts, in place (an increment,
/// not read-then-write: it holds each row against a concurrent move of the head by an agent
/// whose trail is ahead, `outbox_recorded`). Returns each moved appliance's new last number;
/// an appliance without a head row yet is not in the answer.
async fn bumped_heads_in_tx(
    tx: &mut sqlx::AnyConnection,
    counts: &[(&str, i64)],
) -> StoreResult<HashMap<String, i64>> {
    let (case, ids) = per_appliance(counts.len());
    let sql = format!(
        "UPDATE customer_trail_heads SET last_number = last_number + {case} \
         WHERE appliance_id IN ({ids}) RETURNING appliance_id, last_number"
    );
    let mut q = sqlx::query_as::<_, (String, i64)>(sqlx::AssertSqlSafe(sql));
    for (id, count) in counts {
        q = q.bind(*id).bind(*count);
    }
    Ok(q.fetch_all(&mut *tx).await?.into_iter().collect())
}

impl Store {
    /// Tells the senders of the appliances `entries` concern that there is more to send.
    pub(super) fn ring_trail_bells(&self, entries: &[OutboxEntry<'_>]) {
        for e in entries {
            self.trail_bells.ring(e.appliance_id);
        }
    }

    /// The bell rung when `appliance_id`'s outbox gains records.
    pub fn trail_bell(&self, appliance_id: &str) -> Arc<Notify> {
        self.trail_bells.bell(appliance_id)
    }

    /// Drops the bell of a sender that has ended (unless a newer sender holds another).
    pub fn forget_trail_bell(&self, appliance_id: &str, bell: &Arc<Notify>) {
        self.trail_bells.forget(appliance_id, bell)
    }

    pub async fn outbox_state(&self, appliance_id: &str) -> StoreResult<OutboxState> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT last_number, recorded_number FROM customer_trail_heads WHERE appliance_id = $1",
        )
        .bind(appliance_id)
        .fetch_optional(&self.reader)
        .await?;
        match row {
            None => Ok(OutboxState::default()),
            Some((last, recorded)) => Ok(OutboxState {
                last_number: from_db(last)?,
                recorded_number: from_db(recorded)?,
            }),
        }
    }

    /// The appliance's records numbered after `after`, in order, at most `limit`.
    pub async fn outbox_after(
        &self,
        appliance_id: &str,
        after: u64,
        limit: u32,
    ) -> StoreResult<Vec<GatewayRecord>> {
        type Row = (
            i64,
            String,
            String,
            String,
            Option<String>,
            Option<String>,
            String,
            i64,
            String,
        );
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT number, kind, time, actor, endpoint_id, op_id, detail, gateway_seq, gateway_hash \
             FROM customer_trail_outbox WHERE appliance_id = $1 AND number > $2 ORDER BY number LIMIT {limit}"
        )))
        .bind(appliance_id)
        .bind(to_db(after)?)
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(
                |(number, kind, time, actor, endpoint_id, op_id, detail, seq, hash)| {
                    Ok(GatewayRecord {
                        number: from_db(number)?,
                        event: GatewayEvent::parse(&kind)
                            .ok_or_else(|| StoreError::Corrupt(format!("trail kind {kind:?}")))?,
                        time: time.parse().map_err(|e| {
                            StoreError::Corrupt(format!("trail time {time:?}: {e}"))
                        })?,
                        actor,
                        endpoint_id,
                        op_id,
                        detail: serde_json::from_str(&detail)
                            .map_err(|e| StoreError::Corrupt(format!("trail detail: {e}")))?,
                        gateway_seq: seq,
                        gateway_hash: hash,
                    })
                },
            )
            .collect()
    }

    /// The agent's trail holds every record up to `number`: those rows are no longer needed.
    /// A number lower than before (a trail restored from an older copy) is taken as it is, so
    /// what is still kept is sent again. A number past the last one given (this store restored
    /// from an older copy) moves the numbering past it: the agent would skip the numbers it
    /// already holds as duplicates.
    pub async fn outbox_recorded(&self, appliance_id: &str, number: u64) -> StoreResult<()> {
        let mut conn = self.writer().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let ahead = recorded_in_tx(&mut tx, appliance_id, number).await?;
        tx.commit().await?;
        if ahead {
            tracing::warn!(appliance = %appliance_id, number, "the appliance's customer trail is ahead of this store's numbering (the store was restored?); numbering goes on after it");
        }
        Ok(())
    }

    /// One round of what agents reported (`crate::agent_rounds`), in one transaction: every
    /// appliance in `seen` was heard from at `seen_at`, and each agent in `trail` holds its
    /// customer trail up to the position's number (pruned as in [`Store::outbox_recorded`]).
    /// Returns the appliances whose trail was ahead of this store's numbering, with the number.
    pub async fn write_agent_round(
        &self,
        seen: &[&str],
        seen_at: Option<Timestamp>,
        trail: &[(&str, TrailPosition)],
    ) -> StoreResult<Vec<(String, u64)>> {
        let mut conn = self.writer().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        if let Some(at) = seen_at {
            for ids in seen.chunks(IDS_PER_UPDATE) {
                let sql = format!(
                    "UPDATE appliances SET last_seen = $1 WHERE id IN ({})",
                    super::placeholders(2, ids.len())
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(super::to_ms(at));
                for id in ids {
                    q = q.bind(*id);
                }
                q.execute(&mut *tx).await?;
            }
        }
        let mut pruned = std::collections::HashSet::new();
        let within_sent: Vec<(&str, i64)> = trail
            .iter()
            .filter(|(_, p)| p.within_sent)
            .map(|(id, p)| Ok((*id, to_db(p.number)?)))
            .collect::<StoreResult<_>>()?;
        for chunk in within_sent.chunks(POSITIONS_PER_STATEMENT) {
            pruned.extend(pruned_many_in_tx(&mut tx, chunk).await?);
        }
        let mut ahead = Vec::new();
        for (appliance_id, position) in trail {
            let moved = position.within_sent && pruned.contains(*appliance_id);
            if !moved && recorded_in_tx(&mut tx, appliance_id, position.number).await? {
                ahead.push((appliance_id.to_string(), position.number));
            }
        }
        tx.commit().await?;
        Ok(ahead)
    }
}

/// Agents' positions one statement pair takes (two binds each, far below either database's
/// limit on binds).
const POSITIONS_PER_STATEMENT: usize = 250;

/// The common case of a report, inside the caller's transaction: the head row exists and the
/// numbering is past the agent's number, which becomes the recorded one; rows up to it go. Two
/// statements for many appliances, not two each: a round after a burst
/// (a revocation of every grant) carries a position from most of the fleet. Returns the
/// appliances whose head row was there (and so was moved); the others take the slow path.
async fn pruned_many_in_tx(
    tx: &mut sqlx::AnyConnection,
    positions: &[(&str, i64)],
) -> StoreResult<Vec<String>> {
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    let (case, ids) = per_appliance(positions.len());
    let update = format!(
        "UPDATE customer_trail_heads SET recorded_number = {case} \
         WHERE appliance_id IN ({ids}) RETURNING appliance_id"
    );
    let mut q = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(update));
    for (id, number) in positions {
        q = q.bind(*id).bind(*number);
    }
    let moved = q.fetch_all(&mut *tx).await?;
    let moved_set: std::collections::HashSet<&str> = moved.iter().map(String::as_str).collect();
    let kept: Vec<&(&str, i64)> = positions
        .iter()
        .filter(|(id, _)| moved_set.contains(id))
        .collect();
    if !kept.is_empty() {
        let terms: Vec<String> = (0..kept.len())
            .map(|i| {
                format!(
                    "(appliance_id = ${} AND number <= ${})",
                    2 * i + 1,
                    2 * i + 2
                )
            })
            .collect();
        let delete = format!(
            "DELETE FROM customer_trail_outbox WHERE {}",
            terms.join(" OR ")
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(delete));
        for (id, number) in kept {
            q = q.bind(*id).bind(*number);
        }
        q.execute(&mut *tx).await?;
    }
    Ok(moved)
}

/// [`Store::outbox_recorded`] inside the caller's transaction; true if the trail was ahead of
/// the numbering (which then goes on after it).
async fn recorded_in_tx(
    tx: &mut sqlx::AnyConnection,
    appliance_id: &str,
    number: u64,
) -> StoreResult<bool> {
    let number = to_db(number)?;
    let updated =
        sqlx::query("UPDATE customer_trail_heads SET recorded_number = $1 WHERE appliance_id = $2")
            .bind(number)
            .bind(appliance_id)
            .execute(&mut *tx)
            .await?;
    if updated.rows_affected() == 0 && number > 0 {
        sqlx::query(
            "INSERT INTO customer_trail_heads (appliance_id, last_number, recorded_number) VALUES ($1, $2, $2)",
        )
        .bind(appliance_id)
        .bind(number)
        .execute(&mut *tx)
        .await?;
    }
    let ahead = sqlx::query(
        "UPDATE customer_trail_heads SET last_number = $1 WHERE appliance_id = $2 AND last_number < $1",
    )
    .bind(number)
    .bind(appliance_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM customer_trail_outbox WHERE appliance_id = $1 AND number <= $2")
        .bind(appliance_id)
        .bind(number)
        .execute(&mut *tx)
        .await?;
    Ok(ahead.rows_affected() > 0)
}
