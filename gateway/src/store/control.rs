//! Control-plane tables: grants (permission phases), one-off ops, the per-appliance
//! steady-state switch and per-customer settings.

use super::{from_ms, opt_ts, parse_kw, to_ms, Store, StoreError, StoreResult};
use endpoint_types::{
    control::{GrantLevel, GrantState, OpState, OpTool},
    lifecycle::{self, grant::GrantEvent},
    ApiError,
};
use jiff::Timestamp;
use sqlx::{any::AnyRow, Row};
use std::time::Duration;

/// Stored output per stream of one op (DESIGN: 1 MiB per stream, then `truncated: true`).
pub const OP_OUTPUT_CAP: usize = 1 << 20;

/// The part of `add` that fits after `have` bytes under [`OP_OUTPUT_CAP`], cut at a character
/// boundary, and whether anything was cut.
pub fn within_cap(have: usize, add: &str) -> (&str, bool) {
    let room = OP_OUTPUT_CAP.saturating_sub(have);
    if add.len() <= room {
        return (add, false);
    }
    let mut end = room;
    while !add.is_char_boundary(end) {
        end -= 1;
    }
    (add.get(..end).unwrap_or_default(), true)
}

/// A grant request and its decision. `state` is what was decided (pending-approval, active,
/// denied, revoked); whether an active grant has expired is derived from `expires_at` and the
/// clock, never stored.
#[derive(Debug, Clone, PartialEq)]
pub struct GrantRow {
    pub id: String,
    pub appliance_id: String,
    pub level: GrantLevel,
    pub state: GrantState,
    pub requested_by: String,
    /// The id of the API token that asked: who may withdraw or revoke it as its requester
    /// (None for grants from before token ids were kept whose requester's name was not unique).
    pub requested_by_id: Option<String>,
    pub reason: String,
    /// Requested duration; counts from the approval.
    pub duration_ms: i64,
    pub requested_at: Timestamp,
    pub decided_by: Option<String>,
    pub decided_at: Option<Timestamp>,
    /// The customer's message with the decision.
    pub message: Option<String>,
    pub expires_at: Option<Timestamp>,
}

/// One one-off op, everything the control plane keeps about it (including output held for
/// approval).
#[derive(Debug, Clone, PartialEq)]
pub struct OpRow {
    pub id: String,
    pub appliance_id: String,
    pub tool: OpTool,
    pub command: String,
    pub origin_resource_id: String,
    pub timeout: Duration,
    pub state: OpState,
    pub requested_by: String,
    pub requested_at: Timestamp,
    /// The operate grant it runs under.
    pub grant_id: Option<String>,
    pub command_approved_by: Option<String>,
    pub command_approved_at: Option<Timestamp>,
    pub output_approved_by: Option<String>,
    pub output_approved_at: Option<Timestamp>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub exit_code: Option<i64>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    pub truncated: bool,
    pub error: Option<ApiError>,
    /// The customer's message with a decision (e.g. a denial).
    pub message: Option<String>,
    /// Token id of who asked (ownership is by id, never by name); None when the gateway or a
    /// name shared by several old tokens asked.
    pub requested_by_id: Option<String>,
    /// The phase it runs under (`--phase`).
    pub phase: GrantLevel,
}

/// The who, when and what of a grant's move (see [`Store::move_grant`]): `by`/`at` are the
/// decider and time of an approval or denial (`decided_*`), or of a revocation (`revoked_*`);
/// `message` and `expires_at` go with a decision.
#[derive(Debug, Clone, Copy)]
pub struct GrantChange<'a> {
    pub by: &'a str,
    pub at: Timestamp,
    pub message: Option<&'a str>,
    pub expires_at: Option<Timestamp>,
}

pub(super) const GRANT_COLS: &str = "id, appliance_id, level, state, requested_by, reason, duration_ms, requested_at, decided_by, decided_at, message, expires_at, requested_by_id";

pub(super) const OP_COLS: &str =
    "id, appliance_id, tool, command, origin_resource_id, timeout_ms, state, requested_by, requested_at, grant_id, \
     command_approved_by, command_approved_at, output_approved_by, output_approved_at, started_at, finished_at, exit_code, \
     stdout, stderr, truncated, error, message, requested_by_id, phase";

pub(super) fn grant_from(r: AnyRow) -> StoreResult<GrantRow> {
    Ok(GrantRow {
        id: r.try_get("id")?,
        appliance_id: r.try_get("appliance_id")?,
        level: parse_kw(
            &r.try_get::<String, _>("level")?,
            "grant level",
            GrantLevel::parse,
        )?,
        state: parse_kw(
            &r.try_get::<String, _>("state")?,
            "grant state",
            GrantState::parse,
        )?,
        requested_by: r.try_get("requested_by")?,
        requested_by_id: r.try_get("requested_by_id")?,
        reason: r.try_get("reason")?,
        duration_ms: r.try_get("duration_ms")?,
        requested_at: from_ms(r.try_get("requested_at")?)?,
        decided_by: r.try_get("decided_by")?,
        decided_at: opt_ts(r.try_get("decided_at")?)?,
        message: r.try_get("message")?,
        expires_at: opt_ts(r.try_get("expires_at")?)?,
    })
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(super) fn op_from(r: AnyRow) -> StoreResult<OpRow> {
    let id: String = r.try_get("id")?;
    let error = r
        .try_get::<Option<String>, _>("error")?
        .map(|e| {
            serde_json::from_str::<ApiError>(&e)
                .map_err(|e| StoreError::Corrupt(format!("error of op {id}: {e}")))
        })
        .transpose()?;
    Ok(OpRow {
        appliance_id: r.try_get("appliance_id")?,
        tool: parse_kw(&r.try_get::<String, _>("tool")?, "op tool", OpTool::parse)?,
        command: r.try_get("command")?,
        origin_resource_id: r.try_get("origin_resource_id")?,
        timeout: Duration::from_millis(r.try_get::<i64, _>("timeout_ms")?.max(0) as u64),
        state: parse_kw(
            &r.try_get::<String, _>("state")?,
            "op state",
            OpState::parse,
        )?,
        requested_by: r.try_get("requested_by")?,
        requested_at: from_ms(r.try_get("requested_at")?)?,
        grant_id: r.try_get("grant_id")?,
        command_approved_by: r.try_get("command_approved_by")?,
        command_approved_at: opt_ts(r.try_get("command_approved_at")?)?,
        output_approved_by: r.try_get("output_approved_by")?,
        output_approved_at: opt_ts(r.try_get("output_approved_at")?)?,
        started_at: opt_ts(r.try_get("started_at")?)?,
        finished_at: opt_ts(r.try_get("finished_at")?)?,
        exit_code: r.try_get("exit_code")?,
        stdout: r.try_get("stdout")?,
        stderr: r.try_get("stderr")?,
        truncated: r.try_get::<i64, _>("truncated")? != 0,
        error,
        message: r.try_get("message")?,
        requested_by_id: r.try_get("requested_by_id")?,
        phase: parse_kw(
            &r.try_get::<String, _>("phase")?,
            "phase",
            GrantLevel::parse,
        )?,
        id,
    })
}

fn error_json(e: &Option<ApiError>) -> StoreResult<Option<String>> {
    e.as_ref()
        .map(|e| {
            serde_json::to_string(e)
                .map_err(|e| StoreError::Corrupt(format!("op error does not serialise: {e}")))
        })
        .transpose()
}

impl Store {
    // ---- grants ----

    pub async fn insert_grant(&self, g: &GrantRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO grants (id, appliance_id, level, state, requested_by, reason, duration_ms, requested_at, decided_by, decided_at, message, expires_at, requested_by_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&g.id)
        .bind(&g.appliance_id)
        .bind(g.level.as_str())
        .bind(g.state.as_str())
        .bind(&g.requested_by)
        .bind(&g.reason)
        .bind(g.duration_ms)
        .bind(to_ms(g.requested_at))
        .bind(&g.decided_by)
        .bind(g.decided_at.map(to_ms))
        .bind(&g.message)
        .bind(g.expires_at.map(to_ms))
        .bind(&g.requested_by_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn grants_where(
        &self,
        clause: &'static str,
        binds: &[&str],
    ) -> StoreResult<Vec<GrantRow>> {
        let sql = format!("SELECT {GRANT_COLS} FROM grants {clause} ORDER BY requested_at, id");
        self.select_rows(sql, binds, grant_from).await
    }

    pub async fn get_grant(&self, id: &str) -> StoreResult<Option<GrantRow>> {
        Ok(self
            .grants_where("WHERE id = $1", &[id])
            .await?
            .into_iter()
            .next())
    }

    /// All grants, oldest request first.
    pub async fn list_grants(&self) -> StoreResult<Vec<GrantRow>> {
        self.grants_where("", &[]).await
    }

    /// The grants of one appliance, oldest request first.
    pub async fn grants_of(&self, appliance_id: &str) -> StoreResult<Vec<GrantRow>> {
        self.grants_where("WHERE appliance_id = $1", &[appliance_id])
            .await
    }

    /// Records the decision on a grant that is still pending approval; false if it is not (it
    /// was decided by someone else, or does not exist): of concurrent deciders exactly one wins.
    /// `state` is `active` (approve) or `denied` (deny).
    pub async fn decide_grant(
        &self,
        id: &str,
        state: GrantState,
        decided_by: &str,
        decided_at: Timestamp,
        message: Option<&str>,
        expires_at: Option<Timestamp>,
    ) -> StoreResult<bool> {
        let event = match state {
            GrantState::Active => GrantEvent::Approve,
            GrantState::Denied => GrantEvent::Deny,
            other => {
                return Err(StoreError::IllegalTransition(format!(
                    "a decision cannot make a grant {}",
                    other.as_str()
                )))
            }
        };
        let change = GrantChange {
            by: decided_by,
            at: decided_at,
            message,
            expires_at,
        };
        self.move_grant(id, GrantState::PendingApproval, event, change)
            .await
    }

    /// Revokes an active grant that has not expired at `at`; false if it is not active (or
    /// expired, or does not exist). Who revoked it and when are kept in `revoked_by` /
    /// `revoked_at`; `decided_by` / `decided_at` keep the approval.
    pub async fn revoke_grant(&self, id: &str, by: &str, at: Timestamp) -> StoreResult<bool> {
        let change = GrantChange {
            by,
            at,
            message: None,
            expires_at: None,
        };
        self.move_grant(id, GrantState::Active, GrantEvent::Revoke, change)
            .await
    }

    // ---- ops ----

    pub async fn insert_op(&self, o: &OpRow) -> StoreResult<()> {
        let sql = format!(
            "INSERT INTO ops ({OP_COLS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24)"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&o.id)
            .bind(&o.appliance_id)
            .bind(o.tool.as_str())
            .bind(&o.command)
            .bind(&o.origin_resource_id)
            .bind(duration_ms(o.timeout))
            .bind(o.state.as_str())
            .bind(&o.requested_by)
            .bind(to_ms(o.requested_at))
            .bind(&o.grant_id)
            .bind(&o.command_approved_by)
            .bind(o.command_approved_at.map(to_ms))
            .bind(&o.output_approved_by)
            .bind(o.output_approved_at.map(to_ms))
            .bind(o.started_at.map(to_ms))
            .bind(o.finished_at.map(to_ms))
            .bind(o.exit_code)
            .bind(&o.stdout)
            .bind(&o.stderr)
            .bind(i64::from(o.truncated))
            .bind(error_json(&o.error)?)
            .bind(&o.message)
            .bind(&o.requested_by_id)
            .bind(o.phase.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn ops_where(&self, clause: &'static str, binds: &[&str]) -> StoreResult<Vec<OpRow>> {
        let sql = format!("SELECT {OP_COLS} FROM ops {clause} ORDER BY requested_at, id");
        self.select_rows(sql, binds, op_from).await
    }

    pub async fn get_op(&self, id: &str) -> StoreResult<Option<OpRow>> {
        Ok(self
            .ops_where("WHERE id = $1", &[id])
            .await?
            .into_iter()
            .next())
    }

    /// All ops, oldest request first.
    pub async fn list_ops(&self) -> StoreResult<Vec<OpRow>> {
        self.ops_where("", &[]).await
    }

    /// The ops of one appliance, oldest request first.
    pub async fn ops_of(&self, appliance_id: &str) -> StoreResult<Vec<OpRow>> {
        self.ops_where("WHERE appliance_id = $1", &[appliance_id])
            .await
    }

    /// The ops in one state (e.g. everything `running` when the gateway restarts).
    pub async fn ops_in_state(&self, state: OpState) -> StoreResult<Vec<OpRow>> {
        self.ops_where("WHERE state = $1", &[state.as_str()]).await
    }

    /// Compare-and-set: writes every mutable column of `o` (state, grant, approvals, times,
    /// exit code, stdout/stderr, truncated, error, message; not the request itself) only if
    /// the stored state is still `expected`. False if it is not (another task or replica moved
    /// the op on) or the op does not exist.
    ///
    /// stdout/stderr are written as given: a caller racing [`Store::append_op_output`] must
    /// re-read the row, or leave output to `append_op_output`.
    ///
    /// An ended op never changes: `expected` in a final state is
    /// [`StoreError::IllegalTransition`] (callers move ops by [`endpoint_types::lifecycle::next`],
    /// which takes no event in a final state).
    pub async fn update_op(&self, o: &OpRow, expected: OpState) -> StoreResult<bool> {
        if expected.is_final() {
            return Err(StoreError::IllegalTransition(format!(
                "op {} has ended as {}",
                o.id,
                expected.as_str()
            )));
        }
        let r = sqlx::query(
            "UPDATE ops SET state = $1, grant_id = $2, command_approved_by = $3, command_approved_at = $4, \
             output_approved_by = $5, output_approved_at = $6, started_at = $7, finished_at = $8, exit_code = $9, \
             stdout = $10, stderr = $11, truncated = $12, error = $13, message = $14 \
             WHERE id = $15 AND state = $16",
        )
        .bind(o.state.as_str())
        .bind(&o.grant_id)
        .bind(&o.command_approved_by)
        .bind(o.command_approved_at.map(to_ms))
        .bind(&o.output_approved_by)
        .bind(o.output_approved_at.map(to_ms))
        .bind(o.started_at.map(to_ms))
        .bind(o.finished_at.map(to_ms))
        .bind(o.exit_code)
        .bind(&o.stdout)
        .bind(&o.stderr)
        .bind(i64::from(o.truncated))
        .bind(error_json(&o.error)?)
        .bind(&o.message)
        .bind(&o.id)
        .bind(expected.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Appends streamed output to an op's stdout and stderr (NULL counts as empty), each
    /// stream capped at [`OP_OUTPUT_CAP`] bytes: what does not fit is dropped (at a character
    /// boundary) and the op is marked `truncated`. Only an op that is producing output (running,
    /// or releasing output held for approval) takes any; false if the op does not exist or is
    /// in another state (a late or forged frame changes nothing).
    pub async fn append_op_output(
        &self,
        id: &str,
        stdout_add: &str,
        stderr_add: &str,
    ) -> StoreResult<bool> {
        let lengths = match self.backend {
            super::Backend::Sqlite => {
                "SELECT state, LENGTH(CAST(COALESCE(stdout, '') AS BLOB)) AS out_len, \
                 LENGTH(CAST(COALESCE(stderr, '') AS BLOB)) AS err_len FROM ops WHERE id = $1"
            }
            super::Backend::Postgres => {
                "SELECT state, CAST(OCTET_LENGTH(COALESCE(stdout, '')) AS BIGINT) AS out_len, \
                 CAST(OCTET_LENGTH(COALESCE(stderr, '')) AS BIGINT) AS err_len FROM ops WHERE id = $1"
            }
        };
        // The write lock from the start: two appends cannot both fit into the same room.
        let mut conn = self.writer().await?;
        let mut tx = self.write_tx(&mut conn, "ops").await?;
        let Some(row) = sqlx::query(lengths)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(false);
        };
        let state: String = row.try_get("state")?;
        if !OpState::parse(&state).is_some_and(lifecycle::op_takes_output) {
            return Ok(false);
        }
        let have = |col: &str| -> StoreResult<usize> {
            Ok(usize::try_from(row.try_get::<i64, _>(col)?).unwrap_or(0))
        };
        let (out, out_cut) = within_cap(have("out_len")?, stdout_add);
        let (err, err_cut) = within_cap(have("err_len")?, stderr_add);
        sqlx::query(
            "UPDATE ops SET stdout = COALESCE(stdout, '') || $1, stderr = COALESCE(stderr, '') || $2, \
             truncated = CASE WHEN $3 <> 0 THEN 1 ELSE truncated END WHERE id = $4",
        )
        .bind(out)
        .bind(err)
        .bind(i64::from(out_cut || err_cut))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    // ---- appliances: steady state ----

    /// Turns an appliance's steady-state access on or off (a customer approver's switch; on by
    /// default). False if the appliance does not exist.
    pub async fn set_steady_state(&self, appliance_id: &str, enabled: bool) -> StoreResult<bool> {
        let r = sqlx::query("UPDATE appliances SET steady_state_disabled = $1 WHERE id = $2")
            .bind(i64::from(!enabled))
            .bind(appliance_id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Whether steady-state access is on; None if the appliance does not exist.
    pub async fn steady_state(&self, appliance_id: &str) -> StoreResult<Option<bool>> {
        let row = sqlx::query("SELECT steady_state_disabled FROM appliances WHERE id = $1")
            .bind(appliance_id)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row
            .map(|r| r.try_get::<i64, _>("steady_state_disabled"))
            .transpose()?
            .map(|d| d == 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_fits_under_the_cap_and_is_cut_at_a_character_boundary() {
        assert_eq!(within_cap(0, "abc"), ("abc", false));
        assert_eq!(within_cap(OP_OUTPUT_CAP - 3, "abc"), ("abc", false));
        assert_eq!(within_cap(OP_OUTPUT_CAP - 2, "abc"), ("ab", true));
        assert_eq!(within_cap(OP_OUTPUT_CAP, "abc"), ("", true));
        assert_eq!(within_cap(OP_OUTPUT_CAP + 5, "abc"), ("", true));
        assert_eq!(within_cap(OP_OUTPUT_CAP, ""), ("", false));
        // "ü" is two bytes: one byte of room takes none of it.
        assert_eq!(within_cap(OP_OUTPUT_CAP - 2, "aü"), ("a", true));
        assert_eq!(within_cap(OP_OUTPUT_CAP - 3, "aü"), ("aü", false));
    }
}
