//! The spine's tables: appliances, enrollment, endpoints, audit (API tokens are `tokens.rs`).

use super::{from_ms, opt_ts, to_ms, Store, StoreError, StoreResult};
use endpoint_types::{
    api::{AuditRecord, ClientCredential, EndpointState},
    lifecycle::endpoint::{self as endpoint_lifecycle, EndpointEvent},
    resource::{EndpointType, PolicySummary},
};
use jiff::Timestamp;
use sqlx::{any::AnyRow, Row};

#[derive(Debug, Clone)]
pub struct ApplianceRow {
    pub id: String,
    pub app: String,
    pub customer: String,
    pub created_at: Timestamp,
    pub created_by: String,
    pub cert_fingerprint: Option<String>,
    pub enrolled_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    pub last_seen: Option<Timestamp>,
    pub agent_version: Option<String>,
    /// JSON array of `ResourceDescriptor`, as last reported in a hello.
    pub resources: String,
}

#[derive(Debug, Clone)]
pub struct EnrollmentRow {
    pub id: String,
    pub appliance_id: String,
    pub secret_hash: String,
    pub expires_at: Timestamp,
    pub used: bool,
}

#[derive(Debug, Clone)]
pub struct EndpointRow {
    pub id: String,
    pub endpoint_type: EndpointType,
    pub appliance_id: String,
    pub resource_id: String,
    pub state: EndpointState,
    pub created_by: String,
    /// The id of the API token that created it: who may fetch its credentials (None for
    /// endpoints from before token ids were kept whose creator's name was not unique).
    pub created_by_id: Option<String>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    pub address: Option<String>,
    pub sessions_total: u64,
    /// The operate grant it was created under; it never outlives it.
    pub grant_id: Option<String>,
    /// The public half of the client credential (kubectl, postgres, ssh endpoints).
    pub credential: Option<ClientCredential>,
    /// The phase it runs under (`--phase`).
    pub phase: endpoint_types::control::GrantLevel,
}

/// What `audit_page` selects: records after `after_seq`, at most `limit` of them.
#[derive(Debug, Clone, Default)]
pub struct AuditPageQuery {
    pub after_seq: i64,
    pub limit: u32,
    pub since: Option<Timestamp>,
    pub appliance: Option<String>,
    /// Only records about these appliances (a customer's approver sees its own).
    pub appliances_in: Option<Vec<String>>,
}

/// A page of the trail; `next_after_seq` is set when more may follow.
#[derive(Debug, Clone, Default)]
pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    pub next_after_seq: Option<i64>,
}

const AUDIT_COLS: &str =
    "seq, time, kind, actor, appliance_id, endpoint_id, session_id, op_id, detail, prev_hash, hash";

fn audit_from(r: AnyRow) -> StoreResult<AuditRecord> {
    let time: String = r.try_get("time")?;
    let detail: String = r.try_get("detail")?;
    Ok(AuditRecord {
        seq: r.try_get("seq")?,
        time: time
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("audit time {time}: {e}")))?,
        kind: r.try_get("kind")?,
        actor: r.try_get("actor")?,
        appliance_id: r.try_get("appliance_id")?,
        endpoint_id: r.try_get("endpoint_id")?,
        session_id: r.try_get("session_id")?,
        op_id: r.try_get("op_id")?,
        detail: serde_json::from_str(&detail)
            .map_err(|e| StoreError::Corrupt(format!("audit detail: {e}")))?,
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
    })
}

async fn insert_audit<'e>(
    ex: impl sqlx::Executor<'e, Database = sqlx::Any>,
    r: &AuditRecord,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO audit_log (seq, time, kind, actor, appliance_id, endpoint_id, session_id, op_id, detail, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(r.seq)
    .bind(r.time.to_string())
    .bind(&r.kind)
    .bind(&r.actor)
    .bind(&r.appliance_id)
    .bind(&r.endpoint_id)
    .bind(&r.session_id)
    .bind(&r.op_id)
    .bind(r.detail.to_string())
    .bind(&r.prev_hash)
    .bind(&r.hash)
    .execute(ex)
    .await?;
    Ok(())
}

/// One audit record as written: borrowed text, the detail already JSON.
#[derive(Debug)]
pub struct AuditRow<'a> {
    pub seq: i64,
    /// RFC 3339, as `Timestamp` displays.
    pub time: String,
    pub kind: &'a str,
    pub actor: &'a str,
    pub appliance_id: Option<&'a str>,
    pub endpoint_id: Option<&'a str>,
    pub session_id: Option<&'a str>,
    pub op_id: Option<&'a str>,
    pub detail: &'a serde_json::value::RawValue,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRow<'_> {
    /// What `hash` is taken over: the same bytes as [`AuditRecord::chain_input`] of the record.
    pub fn chain_input(&self) -> Vec<u8> {
        endpoint_types::api::ChainFields {
            seq: self.seq,
            time: &self.time,
            kind: self.kind,
            actor: self.actor,
            appliance_id: self.appliance_id,
            endpoint_id: self.endpoint_id,
            session_id: self.session_id,
            op_id: self.op_id,
            detail: self.detail,
            prev_hash: &self.prev_hash,
        }
        .chain_input()
    }
}

/// Rows per multi-row INSERT: 11 parameters each stays far below SQLite's and PostgreSQL's
/// limits on bound parameters.
pub(super) const ROWS_PER_INSERT: usize = 64;

/// `INSERT INTO audit_log … VALUES` for `n` rows, onto `sql`.
pub(super) fn audit_rows_sql(backend: super::Backend, n: usize, sql: &mut String) {
    use std::fmt::Write;
    sql.push_str(
        "INSERT INTO audit_log (seq, time, kind, actor, appliance_id, endpoint_id, session_id, op_id, detail, prev_hash, hash) VALUES ",
    );
    for i in 0..n {
        sql.push_str(if i == 0 { "(" } else { ", (" });
        for c in 0..11 {
            let sep = if c == 0 { "" } else { ", " };
            // SQLite resolves each `$N` by a scan of the statement's names (quadratic in a
            // long VALUES list); anonymous `?` are positional.
            let _ = match backend {
                super::Backend::Sqlite => write!(sql, "{sep}?"),
                super::Backend::Postgres => write!(sql, "{sep}${}", i * 11 + c + 1),
            };
        }
        sql.push(')');
    }
}

/// One row's values, in the order of [`audit_rows_sql`].
pub(super) fn audit_row_args<'a>(r: &'a AuditRow<'a>) -> [super::Arg<'a>; 11] {
    use super::Arg;
    [
        Arg::Int(r.seq),
        Arg::Text(&r.time),
        Arg::Text(r.kind),
        Arg::Text(r.actor),
        Arg::MaybeText(r.appliance_id),
        Arg::MaybeText(r.endpoint_id),
        Arg::MaybeText(r.session_id),
        Arg::MaybeText(r.op_id),
        Arg::Text(r.detail.get()),
        Arg::Text(&r.prev_hash),
        Arg::Text(&r.hash),
    ]
}

pub(super) async fn insert_audit_rows<'e>(
    ex: impl sqlx::Executor<'e, Database = sqlx::Any>,
    backend: super::Backend,
    rows: &[AuditRow<'_>],
) -> StoreResult<()> {
    let mut sql = String::new();
    audit_rows_sql(backend, rows.len(), &mut sql);
    let args = rows.iter().flat_map(audit_row_args).collect();
    super::with_args(sql, args).execute(ex).await?;
    Ok(())
}

pub(super) async fn last_audit<'e>(
    ex: impl sqlx::Executor<'e, Database = sqlx::Any>,
) -> StoreResult<Option<(i64, String)>> {
    let row = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(ex)
        .await?;
    row.map(|r| Ok((r.try_get("seq")?, r.try_get("hash")?)))
        .transpose()
}

pub(super) const ENDPOINT_COLS: &str =
    "id, endpoint_type, appliance_id, resource_id, state, created_by, created_at, expires_at, ended_at, address, sessions_total, grant_id, credential, created_by_id, phase";

impl Store {
    // ---- appliances ----

    pub async fn insert_appliance(&self, a: &ApplianceRow) -> StoreResult<()> {
        sqlx::query("INSERT INTO appliances (id, app, customer, created_at, created_by) VALUES ($1, $2, $3, $4, $5)")
            .bind(&a.id)
            .bind(&a.app)
            .bind(&a.customer)
            .bind(to_ms(a.created_at))
            .bind(&a.created_by)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) const APPLIANCE_COLS: &'static str = "id, app, customer, created_at, created_by, cert_fingerprint, enrolled_at, revoked_at, last_seen, agent_version, resources";

    fn appliance_from(r: AnyRow) -> StoreResult<ApplianceRow> {
        Ok(ApplianceRow {
            id: r.try_get("id")?,
            app: r.try_get("app")?,
            customer: r.try_get("customer")?,
            created_at: from_ms(r.try_get("created_at")?)?,
            created_by: r.try_get("created_by")?,
            cert_fingerprint: r.try_get("cert_fingerprint")?,
            enrolled_at: opt_ts(r.try_get("enrolled_at")?)?,
            revoked_at: opt_ts(r.try_get("revoked_at")?)?,
            last_seen: opt_ts(r.try_get("last_seen")?)?,
            agent_version: r.try_get("agent_version")?,
            resources: r.try_get("resources")?,
        })
    }

    async fn appliances_where(
        &self,
        clause: &'static str,
        binds: &[&str],
    ) -> StoreResult<Vec<ApplianceRow>> {
        let sql = format!(
            "SELECT {} FROM appliances {clause} ORDER BY created_at, id",
            Self::APPLIANCE_COLS
        );
        self.select_rows(sql, binds, Self::appliance_from).await
    }

    pub async fn get_appliance(&self, id: &str) -> StoreResult<Option<ApplianceRow>> {
        Ok(self
            .appliances_where("WHERE id = $1", &[id])
            .await?
            .into_iter()
            .next())
    }

    /// The live (not revoked) appliance for an app and customer.
    pub async fn find_appliance(
        &self,
        app: &str,
        customer: &str,
    ) -> StoreResult<Option<ApplianceRow>> {
        Ok(self
            .appliances_where(
                "WHERE app = $1 AND customer = $2 AND revoked_at IS NULL",
                &[app, customer],
            )
            .await?
            .into_iter()
            .next())
    }

    pub async fn appliance_by_fingerprint(&self, fp: &str) -> StoreResult<Option<ApplianceRow>> {
        Ok(self
            .appliances_where("WHERE cert_fingerprint = $1", &[fp])
            .await?
            .into_iter()
            .next())
    }

    pub async fn list_appliances(&self) -> StoreResult<Vec<ApplianceRow>> {
        self.appliances_where("", &[]).await
    }

    pub async fn set_enrolled(
        &self,
        id: &str,
        fingerprint: &str,
        now: Timestamp,
    ) -> StoreResult<()> {
        sqlx::query("UPDATE appliances SET cert_fingerprint = $1, enrolled_at = $2 WHERE id = $3")
            .bind(fingerprint)
            .bind(to_ms(now))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_presence(
        &self,
        id: &str,
        last_seen: Timestamp,
        agent_version: Option<&str>,
        resources: Option<&str>,
        policy: Option<&str>,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE appliances SET last_seen = $1, agent_version = COALESCE($2, agent_version), \
             resources = COALESCE($3, resources), policy = COALESCE($4, policy) WHERE id = $5",
        )
        .bind(to_ms(last_seen))
        .bind(agent_version)
        .bind(resources)
        .bind(policy)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The customer's approval policy as the appliance last reported it in a hello (stored by
    /// [`Store::set_presence`] as JSON); None if it never reported one or the appliance does not
    /// exist.
    pub async fn appliance_policy(&self, id: &str) -> StoreResult<Option<PolicySummary>> {
        let row = sqlx::query("SELECT policy FROM appliances WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        let Some(json) = row
            .map(|r| r.try_get::<Option<String>, _>("policy"))
            .transpose()?
            .flatten()
        else {
            return Ok(None);
        };
        serde_json::from_str::<Option<PolicySummary>>(&json)
            .map_err(|e| StoreError::Corrupt(format!("policy of appliance {id}: {e}")))
    }

    /// Marks an appliance revoked; false if it was already revoked or does not exist.
    pub async fn revoke_appliance(&self, id: &str, now: Timestamp) -> StoreResult<bool> {
        let r = sqlx::query(
            "UPDATE appliances SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(to_ms(now))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    // ---- enrollment ----

    pub async fn insert_enrollment_token(&self, e: &EnrollmentRow) -> StoreResult<()> {
        sqlx::query("INSERT INTO enrollment_tokens (id, appliance_id, secret_hash, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(&e.id)
            .bind(&e.appliance_id)
            .bind(&e.secret_hash)
            .bind(to_ms(e.expires_at))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn get_enrollment_token(&self, id: &str) -> StoreResult<Option<EnrollmentRow>> {
        let row = sqlx::query("SELECT id, appliance_id, secret_hash, expires_at, used_at FROM enrollment_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(EnrollmentRow {
                id: r.try_get("id")?,
                appliance_id: r.try_get("appliance_id")?,
                secret_hash: r.try_get("secret_hash")?,
                expires_at: from_ms(r.try_get("expires_at")?)?,
                used: r.try_get::<Option<i64>, _>("used_at")?.is_some(),
            })
        })
        .transpose()
    }

    /// Consumes a token atomically: of any number of concurrent callers (in any number of
    /// processes) exactly one gets `true`.
    pub async fn consume_enrollment_token(&self, id: &str, now: Timestamp) -> StoreResult<bool> {
        let r = sqlx::query("UPDATE enrollment_tokens SET used_at = $1 WHERE id = $2 AND used_at IS NULL AND expires_at > $1")
            .bind(to_ms(now))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    // ---- endpoints ----

    pub async fn insert_endpoint(&self, e: &EndpointRow) -> StoreResult<()> {
        let credential = match &e.credential {
            Some(c) => {
                Some(serde_json::to_string(c).map_err(|e| StoreError::Corrupt(e.to_string()))?)
            }
            None => None,
        };
        sqlx::query(
            "INSERT INTO endpoints (id, endpoint_type, appliance_id, resource_id, state, created_by, created_at, expires_at, address, grant_id, credential, created_by_id, phase) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&e.id)
        .bind(e.endpoint_type.as_str())
        .bind(&e.appliance_id)
        .bind(&e.resource_id)
        .bind(e.state.as_str())
        .bind(&e.created_by)
        .bind(to_ms(e.created_at))
        .bind(to_ms(e.expires_at))
        .bind(&e.address)
        .bind(&e.grant_id)
        .bind(credential)
        .bind(&e.created_by_id)
        .bind(e.phase.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) fn endpoint_from(r: AnyRow) -> StoreResult<EndpointRow> {
        let t: String = r.try_get("endpoint_type")?;
        let s: String = r.try_get("state")?;
        Ok(EndpointRow {
            id: r.try_get("id")?,
            endpoint_type: EndpointType::parse(&t)
                .ok_or_else(|| StoreError::Corrupt(format!("endpoint type {t}")))?,
            appliance_id: r.try_get("appliance_id")?,
            resource_id: r.try_get("resource_id")?,
            state: EndpointState::parse(&s)
                .ok_or_else(|| StoreError::Corrupt(format!("endpoint state {s}")))?,
            created_by: r.try_get("created_by")?,
            created_by_id: r.try_get("created_by_id")?,
            created_at: from_ms(r.try_get("created_at")?)?,
            expires_at: from_ms(r.try_get("expires_at")?)?,
            ended_at: opt_ts(r.try_get("ended_at")?)?,
            address: r.try_get("address")?,
            sessions_total: r.try_get::<i64, _>("sessions_total")?.max(0) as u64,
            grant_id: r.try_get("grant_id")?,
            credential: match r.try_get::<Option<String>, _>("credential")? {
                Some(json) => Some(
                    serde_json::from_str(&json)
                        .map_err(|e| StoreError::Corrupt(format!("endpoint credential: {e}")))?,
                ),
                None => None,
            },
            phase: {
                let p: String = r.try_get("phase")?;
                endpoint_types::control::GrantLevel::parse(&p)
                    .ok_or_else(|| StoreError::Corrupt(format!("endpoint phase {p}")))?
            },
        })
    }

    async fn endpoints_where(
        &self,
        clause: &'static str,
        binds: &[&str],
    ) -> StoreResult<Vec<EndpointRow>> {
        let sql = format!("SELECT {ENDPOINT_COLS} FROM endpoints {clause} ORDER BY created_at, id");
        self.select_rows(sql, binds, Self::endpoint_from).await
    }

    pub async fn get_endpoint(&self, id: &str) -> StoreResult<Option<EndpointRow>> {
        Ok(self
            .endpoints_where("WHERE id = $1", &[id])
            .await?
            .into_iter()
            .next())
    }

    pub async fn list_endpoints(&self) -> StoreResult<Vec<EndpointRow>> {
        self.endpoints_where("", &[]).await
    }

    pub async fn active_endpoints(&self) -> StoreResult<Vec<EndpointRow>> {
        self.endpoints_where("WHERE state = 'active'", &[]).await
    }

    pub async fn active_endpoints_of(&self, appliance_id: &str) -> StoreResult<Vec<EndpointRow>> {
        self.endpoints_where(
            "WHERE state = 'active' AND appliance_id = $1",
            &[appliance_id],
        )
        .await
    }

    /// Approves a pending endpoint: active until `expires_at`, listening on `address`. False if
    /// it is no longer pending (decided, withdrawn or expired meanwhile) or does not exist: the
    /// compare-and-set on `pending-approval`, the one state the endpoint machine approves from.
    pub async fn activate_endpoint(
        &self,
        id: &str,
        expires_at: Timestamp,
        address: &str,
    ) -> StoreResult<bool> {
        debug_assert_eq!(
            endpoint_lifecycle::next(EndpointState::PendingApproval, EndpointEvent::Approve),
            Ok(EndpointState::Active)
        );
        let r = sqlx::query(
            "UPDATE endpoints SET state = 'active', expires_at = $1, address = $2 WHERE id = $3 AND state = 'pending-approval'",
        )
        .bind(to_ms(expires_at))
        .bind(address)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Denies a pending endpoint; false if it is no longer pending or does not exist.
    pub async fn deny_endpoint(&self, id: &str, now: Timestamp) -> StoreResult<bool> {
        self.move_endpoint(id, EndpointState::PendingApproval, EndpointEvent::Deny, now)
            .await
    }

    /// Ends endpoint `id` by `event` (deny, retire, expire) from the state `from` the caller
    /// read, as the endpoint state machine says, with a compare-and-set in SQL: false (nothing
    /// written) when the stored state is no longer `from` (another request or replica moved it
    /// first). A move the machine refuses, or an approval (that is [`Store::activate_endpoint`],
    /// which also sets the address), is [`StoreError::IllegalTransition`].
    pub async fn move_endpoint(
        &self,
        id: &str,
        from: EndpointState,
        event: EndpointEvent,
        at: Timestamp,
    ) -> StoreResult<bool> {
        let to = endpoint_lifecycle::next(from, event)
            .map_err(|e| StoreError::IllegalTransition(format!("endpoint {id}: {e}")))?;
        if !endpoint_lifecycle::is_final(to) {
            return Err(StoreError::IllegalTransition(format!(
                "endpoint {id}: {} is activate_endpoint's",
                event.name()
            )));
        }
        let r = sqlx::query(
            "UPDATE endpoints SET state = $1, ended_at = $2 WHERE id = $3 AND state = $4",
        )
        .bind(to.as_str())
        .bind(to_ms(at))
        .bind(id)
        .bind(from.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The active endpoints created under a grant (to end them when it is revoked or expires).
    pub async fn active_endpoints_of_grant(&self, grant_id: &str) -> StoreResult<Vec<EndpointRow>> {
        self.endpoints_where("WHERE state = 'active' AND grant_id = $1", &[grant_id])
            .await
    }

    /// Moves an active endpoint to `retired` or `expired`; false if it was not active (someone
    /// else ended it).
    pub async fn end_endpoint(
        &self,
        id: &str,
        state: EndpointState,
        now: Timestamp,
    ) -> StoreResult<bool> {
        let event = match state {
            EndpointState::Retired => EndpointEvent::Retire,
            EndpointState::Expired => EndpointEvent::Expire,
            other => {
                return Err(StoreError::IllegalTransition(format!(
                    "ending cannot make endpoint {id} {}",
                    other.as_str()
                )))
            }
        };
        self.move_endpoint(id, EndpointState::Active, event, now)
            .await
    }

    pub async fn set_endpoint_address(&self, id: &str, address: &str) -> StoreResult<()> {
        sqlx::query("UPDATE endpoints SET address = $1 WHERE id = $2")
            .bind(address)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn count_session(&self, id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE endpoints SET sessions_total = sessions_total + 1 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- audit ----

    /// Inserts a record the caller chained itself. Only safe with one writer process; several
    /// replicas must use [`Store::append_audit_with`].
    pub async fn append_audit(&self, r: &AuditRecord) -> StoreResult<()> {
        insert_audit(&self.pool, r).await
    }

    /// Appends the next record of the chain, serialised in the database so that any number of
    /// processes sharing it (gateway replicas on PostgreSQL) produce one linear chain: in one
    /// transaction holding the audit write lock it reads the last `(seq, hash)` (`(0, genesis)`
    /// when empty), asks `make(next_seq, prev_hash)` for the record (which must carry that seq
    /// and prev_hash, and its hash), inserts it and commits.
    pub async fn append_audit_with<F>(&self, make: F) -> StoreResult<AuditRecord>
    where
        F: FnOnce(i64, &str) -> AuditRecord + Send,
    {
        let mut conn = self.writer().await?;
        let mut tx = self.write_tx(&mut conn, "audit_log").await?;
        let (seq, prev) = last_audit(&mut *tx)
            .await?
            .unwrap_or_else(|| (0, endpoint_types::api::AUDIT_GENESIS_HASH.to_string()));
        let r = make(seq + 1, &prev);
        if r.seq != seq + 1 || r.prev_hash != prev {
            return Err(StoreError::BrokenChain(format!(
                "got seq {} after {prev}, expected seq {} after the head's hash",
                r.seq,
                seq + 1
            )));
        }
        insert_audit(&mut *tx, &r).await?;
        let outbox: Vec<_> = super::customer_trail::entry_of(
            &r.kind,
            r.appliance_id.as_deref(),
            r.time.to_string(),
            &r.actor,
            (r.endpoint_id.as_deref(), r.op_id.as_deref()),
            || r.detail.to_string(),
            r.seq,
            &r.hash,
        )
        .into_iter()
        .collect();
        super::customer_trail::append_in_tx(&mut tx, &outbox).await?;
        tx.commit().await?;
        self.ring_trail_bells(&outbox);
        Ok(r)
    }

    /// The last record of `kind` about `appliance_id` (the latest anchor of an appliance's
    /// head): served from the (appliance_id, seq) index, newest first.
    pub async fn last_audit_of(
        &self,
        appliance_id: &str,
        kind: &str,
    ) -> StoreResult<Option<AuditRecord>> {
        let sql = format!(
            "SELECT {AUDIT_COLS} FROM audit_log WHERE appliance_id = $1 AND kind = $2 ORDER BY seq DESC LIMIT 1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(appliance_id)
            .bind(kind)
            .fetch_optional(&self.reader)
            .await?;
        row.map(audit_from).transpose()
    }

    /// Audit records in order, optionally only those after `after_seq`.
    pub async fn list_audit(&self, after_seq: i64) -> StoreResult<Vec<AuditRecord>> {
        let sql = format!("SELECT {AUDIT_COLS} FROM audit_log WHERE seq > $1 ORDER BY seq");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(after_seq)
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter().map(audit_from).collect()
    }

    /// One page of the trail, oldest first, filtered in SQL (an index serves each filter), so
    /// the first page of a long trail costs the same as the first page of a short one.
    pub async fn audit_page(&self, q: &AuditPageQuery) -> StoreResult<AuditPage> {
        let mut sql = format!("SELECT {AUDIT_COLS} FROM audit_log WHERE seq > $1");
        let mut n = 1;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        // Times are stored as RFC 3339 text with a variable number of fraction digits, which
        // does not sort as text within a second: SQL takes a superset (from a second earlier)
        // and the exact bound is applied below.
        let since_text = q.since.map(|t| {
            (t - jiff::SignedDuration::from_secs(1))
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
        });
        if since_text.is_some() {
            sql += &format!(" AND time >= {}", next());
        }
        if q.appliance.is_some() {
            sql += &format!(" AND appliance_id = {}", next());
        }
        if let Some(ids) = &q.appliances_in {
            if ids.is_empty() {
                return Ok(AuditPage::default());
            }
            let list: Vec<String> = ids.iter().map(|_| next()).collect();
            sql += &format!(" AND appliance_id IN ({})", list.join(", "));
        }
        sql += &format!(" ORDER BY seq LIMIT {}", q.limit);
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(q.after_seq);
        if let Some(t) = since_text {
            query = query.bind(t);
        }
        if let Some(a) = &q.appliance {
            query = query.bind(a.clone());
        }
        for id in q.appliances_in.iter().flatten() {
            query = query.bind(id.clone());
        }
        let rows = query.fetch_all(&self.reader).await?;
        let full = rows.len() as u64 >= u64::from(q.limit);
        let mut records = rows
            .into_iter()
            .map(audit_from)
            .collect::<StoreResult<Vec<_>>>()?;
        let last_seq = records.last().map(|r| r.seq);
        if let Some(since) = q.since {
            records.retain(|r| r.time >= since);
        }
        Ok(AuditPage {
            records,
            next_after_seq: if full { last_seq } else { None },
        })
    }

    pub async fn last_audit(&self) -> StoreResult<Option<(i64, String)>> {
        last_audit(&self.pool).await
    }

    /// Deletes the records after `seq`, as an attacker with database access could.
    #[cfg(test)]
    pub async fn truncate_audit_after(&self, seq: i64) -> StoreResult<()> {
        sqlx::query("DELETE FROM audit_log WHERE seq > $1")
            .bind(seq)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Rewrites one record's detail in place, as an attacker with database access could.
    #[cfg(test)]
    pub async fn tamper_audit_detail(&self, seq: i64, detail: &str) -> StoreResult<()> {
        sqlx::query("UPDATE audit_log SET detail = $1 WHERE seq = $2")
            .bind(detail)
            .bind(seq)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Makes the database refuse (or take again) changes to appliances (presence), as a full
    /// or read-only disk would.
    #[cfg(test)]
    pub async fn refuse_appliance_updates(&self, refuse: bool) -> StoreResult<()> {
        let sql = if refuse {
            "CREATE TRIGGER IF NOT EXISTS refuse_appliances BEFORE UPDATE ON appliances \
             BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        } else {
            "DROP TRIGGER IF EXISTS refuse_appliances"
        };
        sqlx::query(sql).execute(&self.pool).await?;
        Ok(())
    }

    /// Makes the database refuse (or take again) vendor-trail inserts, as a full or
    /// read-only disk would: the writes fail inside the store, not in a stand-in.
    #[cfg(test)]
    pub async fn refuse_audit_writes(&self, refuse: bool) -> StoreResult<()> {
        let sql = if refuse {
            "CREATE TRIGGER IF NOT EXISTS refuse_audit BEFORE INSERT ON audit_log \
             BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        } else {
            "DROP TRIGGER IF EXISTS refuse_audit"
        };
        sqlx::query(sql).execute(&self.pool).await?;
        Ok(())
    }
}
