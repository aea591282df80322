//! The vendor trail's batches: records chained onto the head and written in one transaction
//! with their customer-trail outbox entries, and the grant moves some of them stand on.

use super::{
    grant_move::{self, GrantMove},
    spine::{
        audit_row_args, audit_rows_sql, insert_audit_rows, last_audit, AuditRow, ROWS_PER_INSERT,
    },
    Backend, Store, StoreError, StoreResult,
};

/// What SQLite says when a batch's grant move found the grant moved already: the statement
/// after each move asks `abs()` of the smallest integer, which SQLite refuses with this
/// message, and the call stops there (SQLite has no `RAISE` outside triggers).
const MOVE_LOST: &str = "integer overflow";

/// A written batch.
#[derive(Debug)]
pub struct Written {
    /// The new head `(seq, hash)`, if the batch wrote a row.
    pub head: Option<(i64, String)>,
    /// The items whose grant move lost its compare-and-set: neither moved nor recorded.
    pub lost: Vec<usize>,
}

/// A batch's rows, made by `make` in order, each chained onto the one before from `head`.
fn chained<'a, T, F>(
    items: impl ExactSizeIterator<Item = &'a T>,
    (mut seq, mut prev): (i64, String),
    make: &mut F,
) -> StoreResult<Vec<AuditRow<'a>>>
where
    T: 'a,
    F: FnMut(&'a T, i64, &str) -> AuditRow<'a>,
{
    let mut rows = Vec::with_capacity(items.len());
    for (i, item) in items.enumerate() {
        let r = make(item, seq + 1, &prev);
        if r.seq != seq + 1 || r.prev_hash != prev {
            return Err(StoreError::BrokenChain(format!(
                "batch record {i} does not continue the chain at seq {}",
                seq + 1
            )));
        }
        (seq, prev) = (r.seq, r.hash.clone());
        rows.push(r);
    }
    Ok(rows)
}

/// The customer-trail outbox entries a batch's rows carry.
fn outbox_of<'a>(rows: &'a [AuditRow<'_>]) -> Vec<super::customer_trail::OutboxEntry<'a>> {
    rows.iter()
        .filter_map(|r| {
            super::customer_trail::entry_of(
                r.kind,
                r.appliance_id,
                r.time.clone(),
                r.actor,
                (r.endpoint_id, r.op_id),
                || r.detail.get().to_string(),
                r.seq,
                &r.hash,
            )
        })
        .collect()
}

/// SQLite: a batch's audit INSERTs and its customer-trail statements, appended to `sql` with
/// their arguments in order (anonymous parameters, bound in sequence across statements).
fn sqlite_batch_statements<'q>(
    rows: &'q [AuditRow<'_>],
    outbox: &'q [super::customer_trail::OutboxEntry<'_>],
    sql: &mut String,
    args: &mut Vec<super::Arg<'q>>,
) {
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        audit_rows_sql(super::Backend::Sqlite, chunk.len(), sql);
        sql.push_str(";\n");
        args.extend(chunk.iter().flat_map(audit_row_args));
    }
    super::customer_trail::sqlite_statements(outbox, sql, args);
}

impl Store {
    /// Appends several records in one transaction (busy sessions' statements, a burst of API
    /// calls): `make(item, seq, prev_hash)` makes each row, chained onto the one before, in
    /// order.
    ///
    /// An item that `guard` gives a [`GrantMove`] stands on it: the move runs in the same
    /// transaction, and only if it wins its compare-and-set is the item recorded (a grant is
    /// never revoked without its record, nor recorded revoked when it was not). Items whose
    /// move lost are left out and listed in [`Written::lost`].
    ///
    /// `known_head` is the head this process last wrote, if it has one: chaining onto it saves
    /// reading the head in every batch. Should another process (a replica on PostgreSQL) have
    /// appended since, the first row's seq is taken (it is the primary key), and the batch is
    /// made again onto the head read from the store, in a new transaction.
    pub async fn append_audit_rows_with<'a, T, F, G>(
        &self,
        items: &'a [T],
        known_head: Option<(i64, &str)>,
        guard: G,
        mut make: F,
    ) -> StoreResult<Written>
    where
        T: Sync,
        F: FnMut(&'a T, i64, &str) -> AuditRow<'a> + Send,
        G: Fn(&'a T) -> Option<&'a GrantMove> + Send,
    {
        let moves: Vec<(usize, &GrantMove)> = items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| guard(item).map(|m| (i, m)))
            .collect();
        if let (Backend::Sqlite, Some((seq, hash))) = (self.backend, known_head) {
            let rows = chained(items.iter(), (seq, hash.to_string()), &mut make)?;
            let outbox = outbox_of(&rows);
            match self.write_batch_in_one_call(&moves, &rows, &outbox).await {
                // Another process appended since: chain onto its head under the write lock.
                Err(StoreError::Db(e)) if super::is_unique_violation(&e) => {}
                // A move lost: find which, one by one, below.
                Err(StoreError::Db(e))
                    if !moves.is_empty() && e.to_string().contains(MOVE_LOST) => {}
                other => {
                    other?;
                    self.ring_trail_bells(&outbox);
                    let head = rows.last().map(|r| (r.seq, r.hash.clone()));
                    return Ok(Written {
                        head,
                        lost: Vec::new(),
                    });
                }
            }
        }
        let mut guess = match self.backend {
            // SQLite tried the known head above; what failed there is read again here.
            Backend::Sqlite => None,
            Backend::Postgres => known_head.map(|(seq, hash)| (seq, hash.to_string())),
        };
        loop {
            let guessed = guess.is_some();
            let mut conn = self.writer().await?;
            let mut tx = self.write_tx(&mut conn, "audit_log").await?;
            let lost = grant_move::run_all(&mut tx, self.backend, &moves).await?;
            let head = match guess.take() {
                Some(head) => Some(head),
                None => last_audit(&mut *tx).await?,
            };
            let head =
                head.unwrap_or_else(|| (0, endpoint_types::api::AUDIT_GENESIS_HASH.to_string()));
            let kept: Vec<&T> = items
                .iter()
                .enumerate()
                .filter(|(i, _)| !lost.contains(i))
                .map(|(_, item)| item)
                .collect();
            let rows = chained(kept.into_iter(), head, &mut make)?;
            let outbox = outbox_of(&rows);
            match self.write_batch(&mut tx, &rows, &outbox).await {
                Err(StoreError::Db(e)) if guessed && super::is_unique_violation(&e) => {
                    // Someone else appended after the head this process knew: read it.
                    let _ = tx.rollback().await;
                    continue;
                }
                other => other?,
            }
            tx.commit().await?;
            self.ring_trail_bells(&outbox);
            let head = rows.last().map(|r| (r.seq, r.hash.clone()));
            return Ok(Written { head, lost });
        }
    }

    /// SQLite only: the whole batch, from `BEGIN IMMEDIATE` to `COMMIT`, in one call to the
    /// one writer, which the batch then holds for one round trip instead of three (a burst of
    /// API calls waits on it for their records and their own writes alike). Each grant move is
    /// followed by a statement that fails the call if the move changed no row ([`MOVE_LOST`]).
    async fn write_batch_in_one_call(
        &self,
        moves: &[(usize, &GrantMove)],
        rows: &[AuditRow<'_>],
        outbox: &[super::customer_trail::OutboxEntry<'_>],
    ) -> StoreResult<()> {
        let (mut sql, mut args) = (String::from("BEGIN IMMEDIATE;\n"), Vec::new());
        for (_, m) in moves {
            let (update, update_args) = m.statement(Backend::Sqlite)?;
            sql.push_str(&update);
            sql.push_str(
                ";\nSELECT CASE WHEN changes() = 1 THEN 0 ELSE abs(-9223372036854775807 - 1) END;\n",
            );
            args.extend(update_args);
        }
        sqlite_batch_statements(rows, outbox, &mut sql, &mut args);
        sql.push_str("COMMIT;");
        let mut conn = self.writer().await?;
        // Until the call is over, and any transaction it left open ended, a drop (the caller
        // cancelled) closes the connection instead of handing it on inside that transaction.
        conn.unsettled();
        let written = super::with_args(sql, args).execute(&mut *conn).await;
        match &written {
            Ok(_) => conn.settled(),
            // The call stops at the failing statement, which can leave the transaction open
            // (a constraint does; an I/O error has SQLite roll it back itself). End it.
            Err(_) => match sqlx::query("ROLLBACK").execute(&mut *conn).await {
                Ok(_) => conn.settled(),
                Err(e) if e.to_string().contains("no transaction is active") => conn.settled(),
                Err(_) => {}
            },
        }
        written?;
        Ok(())
    }

    /// Inserts a batch's audit rows and numbers its outbox entries in the caller's
    /// transaction. SQLite takes every statement in one call (each call is a round trip to its
    /// one writer, held by this transaction meanwhile); PostgreSQL takes them one by one.
    async fn write_batch(
        &self,
        tx: &mut sqlx::AnyConnection,
        rows: &[AuditRow<'_>],
        outbox: &[super::customer_trail::OutboxEntry<'_>],
    ) -> StoreResult<()> {
        match self.backend {
            super::Backend::Sqlite => {
                let (mut sql, mut args) = (String::new(), Vec::new());
                sqlite_batch_statements(rows, outbox, &mut sql, &mut args);
                super::with_args(sql, args).execute(&mut *tx).await?;
            }
            super::Backend::Postgres => {
                // Many rows per statement: each statement is a round trip to the store.
                for chunk in rows.chunks(ROWS_PER_INSERT) {
                    insert_audit_rows(&mut *tx, self.backend, chunk).await?;
                }
                super::customer_trail::append_in_tx(tx, outbox).await?;
            }
        }
        Ok(())
    }
}
