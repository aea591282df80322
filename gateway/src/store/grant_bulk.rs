//! A customer's kill switch in the store (`crate::grants::bulk`): the live grants of the
//! customer's appliances in one read, their revocation in one transaction, and the grant sets
//! of many appliances in one read — a statement per chunk of ids, never one per grant.
//!
//! The reads are plain reads (the `reader` pool, beside SQLite's one writer): the read before
//! the write is checked again by the write's compare-and-set, and the reads after it start
//! after its commit, so they see it.

use super::{
    control::{grant_from, GrantChange, GrantRow, GRANT_COLS},
    grant_list::GrantWithOwner,
    placeholders, to_ms, Store, StoreError, StoreResult,
};
use endpoint_types::{
    control::GrantState,
    lifecycle::grant::{self, GrantEvent},
};
use jiff::Timestamp;
use sqlx::Row;

/// Ids bound in one statement: well under both backends' limits on bound parameters (SQLite
/// 32766, PostgreSQL 65535), and a whole 1000-appliance fleet in one read.
pub const IDS_PER_STATEMENT: usize = 1000;

/// What a kill switch reaches: the appliances that matched and their live grants.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CustomerGrants {
    /// `(id, app)` of every appliance of the customer (of the app, when one was named),
    /// revoked ones included (a grant left on one is ended too); empty: no such customer/app.
    pub appliances: Vec<(String, String)>,
    /// The grants still live at `now`: pending approval, or active and not expired; oldest
    /// request first.
    pub live: Vec<GrantWithOwner>,
}

impl Store {
    /// The appliances of `customer` (only `app`'s when given) and their grants that are live
    /// at `now`, in one read: a LEFT JOIN, so an appliance without live grants still shows
    /// that the customer exists.
    pub async fn live_grants_of_customer(
        &self,
        customer: &str,
        app: Option<&str>,
        now: Timestamp,
    ) -> StoreResult<CustomerGrants> {
        let cols: Vec<String> = GRANT_COLS
            .split(", ")
            .map(|c| format!("g.{c} AS {c}"))
            .collect();
        let app_filter = if app.is_some() { "AND a.app = $5" } else { "" };
        let sql = format!(
            "SELECT a.id AS owner_id, a.app AS owner_app, {} \
             FROM appliances a LEFT JOIN grants g ON g.appliance_id = a.id \
               AND (g.state = $2 OR (g.state = $3 AND (g.expires_at IS NULL OR g.expires_at > $4))) \
             WHERE a.customer = $1 {app_filter} \
             ORDER BY g.requested_at, g.id, a.id",
            cols.join(", ")
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(customer)
            .bind(GrantState::PendingApproval.as_str())
            .bind(GrantState::Active.as_str())
            .bind(to_ms(now));
        if let Some(app) = app {
            q = q.bind(app);
        }
        let mut out = CustomerGrants::default();
        for r in q.fetch_all(&self.reader).await? {
            let appliance_id: String = r.try_get("owner_id")?;
            let owner_app: String = r.try_get("owner_app")?;
            // No grant joined: the appliance matched but holds nothing live.
            let has_grant = r.try_get::<Option<String>, _>("id")?.is_some();
            out.appliances.push((appliance_id, owner_app.clone()));
            if has_grant {
                out.live.push(GrantWithOwner {
                    grant: grant_from(r)?,
                    app: owner_app,
                    customer: customer.to_string(),
                });
            }
        }
        // One row per grant: an appliance with several shows as often.
        out.appliances.sort();
        out.appliances.dedup();
        Ok(out)
    }

    /// Revokes each grant `(id, from)` by the grant state machine with a compare-and-set on
    /// the state `from` its caller read (and, from active, only if not expired at
    /// `change.at`), all in one transaction: one UPDATE per source state and chunk of ids.
    /// Returns the ids it moved; a grant that another request moved meanwhile is not among
    /// them. A `from` the machine does not let be revoked is [`StoreError::IllegalTransition`]
    /// and nothing is written.
    pub async fn revoke_grants(
        &self,
        grants: &[(String, GrantState)],
        change: GrantChange<'_>,
    ) -> StoreResult<Vec<String>> {
        // Grouped by source state: each UPDATE compares against one state.
        let mut groups: Vec<(GrantState, GrantState, Vec<&str>)> = Vec::new();
        for (id, from) in grants {
            let to = grant::next(*from, GrantEvent::Revoke)
                .map_err(|e| StoreError::IllegalTransition(format!("grant {id}: {e}")))?;
            match groups.iter_mut().find(|(f, _, _)| f == from) {
                Some((_, _, ids)) => ids.push(id),
                None => groups.push((*from, to, vec![id])),
            }
        }
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let at = to_ms(change.at);
        let mut moved = Vec::with_capacity(grants.len());
        let mut conn = self.writer().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        for (from, to, ids) in &groups {
            for chunk in ids.chunks(IDS_PER_STATEMENT) {
                let sql = format!(
                    "UPDATE grants SET state = $1, revoked_by = $2, revoked_at = $3 \
                     WHERE state = $4 AND (state <> 'active' OR expires_at IS NULL OR expires_at > $5) \
                     AND id IN ({}) RETURNING id",
                    placeholders(6, chunk.len())
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(to.as_str())
                    .bind(change.by)
                    .bind(at)
                    .bind(from.as_str())
                    .bind(at);
                for id in chunk {
                    q = q.bind(*id);
                }
                for r in q.fetch_all(&mut *tx).await? {
                    moved.push(r.try_get::<String, _>("id")?);
                }
            }
        }
        tx.commit().await?;
        Ok(moved)
    }

    /// The active grants (expired ones included: the caller derives expiry) of every
    /// appliance in `appliance_ids`, oldest request first: one read per
    /// [`IDS_PER_STATEMENT`] appliances.
    pub async fn active_grants_of_appliances(
        &self,
        appliance_ids: &[String],
    ) -> StoreResult<Vec<GrantRow>> {
        let mut out = Vec::new();
        for chunk in appliance_ids.chunks(IDS_PER_STATEMENT) {
            let sql = format!(
                "SELECT {GRANT_COLS} FROM grants WHERE state = $1 AND appliance_id IN ({}) \
                 ORDER BY requested_at, id",
                placeholders(2, chunk.len())
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(GrantState::Active.as_str());
            for id in chunk {
                q = q.bind(id.as_str());
            }
            for r in q.fetch_all(&self.reader).await? {
                out.push(grant_from(r)?);
            }
        }
        Ok(out)
    }

    /// Which of `grant_ids` still have an active endpoint: only those need ending, so a kill
    /// switch over a thousand grants does not look up each one's endpoints.
    pub async fn grants_with_active_endpoints(
        &self,
        grant_ids: &[String],
    ) -> StoreResult<Vec<String>> {
        let mut out = Vec::new();
        for chunk in grant_ids.chunks(IDS_PER_STATEMENT) {
            let sql = format!(
                "SELECT DISTINCT grant_id FROM endpoints WHERE state = 'active' AND grant_id IN ({})",
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(id.as_str());
            }
            for r in q.fetch_all(&self.reader).await? {
                out.push(r.try_get::<String, _>("grant_id")?);
            }
        }
        out.sort();
        Ok(out)
    }
}
