//! A grant's compare-and-set, as one statement: on its own ([`Store::move_grant`]) or inside
//! the vendor-trail batch that records it (`audit_batch`), so the move and its record commit
//! together.

use super::{to_ms, Arg, Backend, GrantChange, Store, StoreError, StoreResult};
use endpoint_types::{
    control::GrantState,
    lifecycle::grant::{self, GrantEvent},
};
use jiff::Timestamp;

/// A grant's move by compare-and-set on `from`, owned so it can travel with the record that
/// stands on it to the audit writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantMove {
    pub id: String,
    pub from: GrantState,
    pub event: GrantEvent,
    pub by: String,
    pub at: Timestamp,
    pub message: Option<String>,
    pub expires_at: Option<Timestamp>,
}

impl GrantMove {
    pub fn new(id: &str, from: GrantState, event: GrantEvent, change: GrantChange<'_>) -> Self {
        GrantMove {
            id: id.to_string(),
            from,
            event,
            by: change.by.to_string(),
            at: change.at,
            message: change.message.map(str::to_string),
            expires_at: change.expires_at,
        }
    }

    /// The move as [`Store::move_grant`] takes it.
    pub fn change(&self) -> GrantChange<'_> {
        GrantChange {
            by: &self.by,
            at: self.at,
            message: self.message.as_deref(),
            expires_at: self.expires_at,
        }
    }

    /// The state the move leads to, as the grant state machine says. Expiry is derived from
    /// `expires_at` and never stored, so `expire` is refused here.
    fn to_state(&self) -> StoreResult<GrantState> {
        if self.event == GrantEvent::Expire {
            return Err(StoreError::IllegalTransition(format!(
                "grant {}: expiry is derived from expires_at, never stored",
                self.id
            )));
        }
        grant::next(self.from, self.event)
            .map_err(|e| StoreError::IllegalTransition(format!("grant {}: {e}", self.id)))
    }

    /// The `UPDATE`, its parameters numbered from `$1` (PostgreSQL, or SQLite alone) or
    /// anonymous (`?`, SQLite statements sent together), and its arguments in order.
    pub(super) fn statement(&self, backend: Backend) -> StoreResult<(String, Vec<Arg<'_>>)> {
        let to = self.to_state()?;
        let (set, args) = match self.event {
            GrantEvent::Approve | GrantEvent::Deny => (
                "decided_by = #, decided_at = #, message = #, expires_at = #",
                vec![
                    Arg::Text(&self.by),
                    Arg::Int(to_ms(self.at)),
                    Arg::MaybeText(self.message.as_deref()),
                    Arg::MaybeInt(self.expires_at.map(to_ms)),
                ],
            ),
            // `to_state` refused an expiry above.
            GrantEvent::Revoke | GrantEvent::Expire => (
                "revoked_by = #, revoked_at = #",
                vec![Arg::Text(&self.by), Arg::Int(to_ms(self.at))],
            ),
        };
        // An active grant is only live before its expiry: it moves only while `expires_at` is
        // in the future at `at` (a grant without expiry is always live).
        let template = format!(
            "UPDATE grants SET state = #, {set} WHERE id = # AND state = # \
             AND (state <> 'active' OR expires_at IS NULL OR expires_at > #)"
        );
        let mut all = vec![Arg::Text(to.as_str())];
        all.extend(args);
        all.extend([
            Arg::Text(&self.id),
            Arg::Text(self.from.as_str()),
            Arg::Int(to_ms(self.at)),
        ]);
        Ok((numbered(&template, backend), all))
    }
}

/// `template` with each `#` made a parameter of `backend`'s kind.
fn numbered(template: &str, backend: Backend) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut n = 0;
    for c in template.chars() {
        if c != '#' {
            out.push(c);
            continue;
        }
        n += 1;
        match backend {
            Backend::Sqlite => out.push('?'),
            Backend::Postgres => out.push_str(&format!("${n}")),
        }
    }
    out
}

/// Whether the move happened: it did if it changed the one row.
pub(super) async fn run<'e>(
    ex: impl sqlx::Executor<'e, Database = sqlx::Any>,
    backend: Backend,
    m: &GrantMove,
) -> StoreResult<bool> {
    let (sql, args) = m.statement(backend)?;
    let done = super::with_args(sql, args).execute(ex).await?;
    Ok(done.rows_affected() == 1)
}

/// Runs `moves` (by item index) in the caller's transaction; returns the indices of those
/// that lost their compare-and-set.
///
/// PostgreSQL takes the moves of one event in one statement (each statement is a round trip
/// to the server, made while the trail's writer holds the batch), unless two of them are of
/// one grant: then one by one, in order, so the first wins as it would alone.
pub(super) async fn run_all(
    tx: &mut sqlx::AnyConnection,
    backend: Backend,
    moves: &[(usize, &GrantMove)],
) -> StoreResult<Vec<usize>> {
    for (_, m) in moves {
        m.to_state()?;
    }
    let ids: std::collections::HashSet<&str> = moves.iter().map(|(_, m)| m.id.as_str()).collect();
    let mut lost = Vec::new();
    if backend == Backend::Sqlite || ids.len() < moves.len() {
        for (i, m) in moves {
            if !run(&mut *tx, backend, m).await? {
                lost.push(*i);
            }
        }
        return Ok(lost);
    }
    for event in [GrantEvent::Approve, GrantEvent::Deny, GrantEvent::Revoke] {
        let of_event: Vec<&(usize, &GrantMove)> =
            moves.iter().filter(|(_, m)| m.event == event).collect();
        if of_event.is_empty() {
            continue;
        }
        let moved = run_together(&mut *tx, event, of_event.iter().map(|(_, m)| *m)).await?;
        lost.extend(
            of_event
                .iter()
                .filter(|(_, m)| !moved.contains(&m.id))
                .map(|(i, _)| *i),
        );
    }
    lost.sort_unstable();
    Ok(lost)
}

/// PostgreSQL: moves of one `event`, of distinct grants, in one `UPDATE … FROM (VALUES …)`;
/// returns the ids moved. The conditions are [`GrantMove::statement`]'s, row by row.
async fn run_together<'m>(
    tx: &mut sqlx::AnyConnection,
    event: GrantEvent,
    moves: impl Iterator<Item = &'m GrantMove>,
) -> StoreResult<std::collections::HashSet<String>> {
    // A decision also sets its message and expiry: two more values per row.
    let decision = matches!(event, GrantEvent::Approve | GrantEvent::Deny);
    let (set, per_row) = if decision {
        (
            "decided_by = v.by_whom, decided_at = v.at_ms, message = v.message, expires_at = v.expires_ms",
            7,
        )
    } else {
        ("revoked_by = v.by_whom, revoked_at = v.at_ms", 5)
    };
    let mut rows = Vec::new();
    let mut args = Vec::new();
    for (r, m) in moves.enumerate() {
        let to = m.to_state()?;
        let p = |c: usize| r * per_row + c;
        let mut row = format!(
            "(${}::TEXT, ${}::TEXT, ${}::TEXT, ${}::TEXT, ${}::BIGINT",
            p(1),
            p(2),
            p(3),
            p(4),
            p(5)
        );
        args.extend([
            Arg::Text(&m.id),
            Arg::Text(m.from.as_str()),
            Arg::Text(to.as_str()),
            Arg::Text(&m.by),
            Arg::Int(to_ms(m.at)),
        ]);
        if decision {
            row.push_str(&format!(", ${}::TEXT, ${}::BIGINT", p(6), p(7)));
            args.extend([
                Arg::MaybeText(m.message.as_deref()),
                Arg::MaybeInt(m.expires_at.map(to_ms)),
            ]);
        }
        row.push(')');
        rows.push(row);
    }
    let columns = if decision {
        "id, from_state, to_state, by_whom, at_ms, message, expires_ms"
    } else {
        "id, from_state, to_state, by_whom, at_ms"
    };
    let sql = format!(
        "UPDATE grants AS g SET state = v.to_state, {set} FROM (VALUES {}) AS v({columns}) \
         WHERE g.id = v.id AND g.state = v.from_state \
         AND (g.state <> 'active' OR g.expires_at IS NULL OR g.expires_at > v.at_ms) RETURNING g.id",
        rows.join(", ")
    );
    let moved = super::with_args(sql, args).fetch_all(&mut *tx).await?;
    moved
        .iter()
        .map(|r| Ok(sqlx::Row::try_get::<String, _>(r, "id")?))
        .collect()
}

impl Store {
    /// Moves grant `id` by `event` from the state `from` the caller read, as the grant state
    /// machine says, with a compare-and-set in SQL: false (nothing written) when the stored
    /// state is no longer `from` (another request or replica moved it first) or, for `from =
    /// active`, when the grant has expired by `change.at`. A move the machine refuses is
    /// [`StoreError::IllegalTransition`]. Expiry is derived from `expires_at` and never stored,
    /// so `expire` is refused here too.
    pub async fn move_grant(
        &self,
        id: &str,
        from: GrantState,
        event: GrantEvent,
        change: GrantChange<'_>,
    ) -> StoreResult<bool> {
        run(
            &self.pool,
            self.backend,
            &GrantMove::new(id, from, event, change),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_numbers_its_parameters_for_postgres_and_leaves_them_anonymous_for_sqlite() {
        let m = GrantMove {
            id: "g_1".into(),
            from: GrantState::Active,
            event: GrantEvent::Revoke,
            by: "alice".into(),
            at: Timestamp::UNIX_EPOCH,
            message: None,
            expires_at: None,
        };
        let (pg, args) = m.statement(Backend::Postgres).unwrap();
        assert!(
            pg.contains(
                "state = $1, revoked_by = $2, revoked_at = $3 WHERE id = $4 AND state = $5"
            ),
            "{pg}"
        );
        assert!(pg.contains("expires_at > $6"), "{pg}");
        assert_eq!(args.len(), 6);
        let (lite, _) = m.statement(Backend::Sqlite).unwrap();
        assert_eq!(lite.matches('?').count(), 6, "{lite}");
        assert!(!lite.contains('$'));
        let expire = GrantMove {
            event: GrantEvent::Expire,
            ..m
        };
        assert!(matches!(
            expire.statement(Backend::Sqlite),
            Err(StoreError::IllegalTransition(_))
        ));
    }
}
