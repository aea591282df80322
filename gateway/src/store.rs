//! Control-plane state behind one interface. The spine ships the embedded SQLite backend; the
//! schema and queries are kept portable so a PostgreSQL backend can share the migrations.

use endpoint_types::{
    api::{AuditRecord, EndpointState},
    resource::EndpointType,
};
use jiff::Timestamp;
use sqlx::{
    migrate::{Migration, MigrationType, Migrator},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions},
    Row, SqlSafeStr, SqlitePool,
};
use std::{path::Path, time::Duration};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        "spine".into(),
        MigrationType::Simple,
        include_str!("../migrations/0001_spine.sql").into_sql_str(),
        false,
    )])
}

/// Now, at the store's precision (milliseconds), so a record reads back exactly as it was
/// written and shown.
pub fn now() -> Timestamp {
    Timestamp::from_millisecond(Timestamp::now().as_millisecond()).unwrap_or_else(|_| Timestamp::now())
}

pub fn to_ms(t: Timestamp) -> i64 {
    t.as_millisecond()
}

pub fn from_ms(ms: i64) -> StoreResult<Timestamp> {
    Timestamp::from_millisecond(ms).map_err(|e| StoreError::Corrupt(format!("timestamp {ms}: {e}")))
}

fn opt_ts(ms: Option<i64>) -> StoreResult<Option<Timestamp>> {
    ms.map(from_ms).transpose()
}

#[derive(Debug, Clone)]
pub struct TokenRow {
    pub id: String,
    pub name: String,
    pub role: String,
    pub customer: Option<String>,
    pub secret_hash: String,
    pub created_at: Timestamp,
    pub created_by: String,
    pub revoked: bool,
}

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
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    pub address: Option<String>,
    pub sessions_total: u64,
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the SQLite database file and applies migrations.
    pub async fn open_sqlite(path: &Path) -> StoreResult<Store> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?;
        migrator().run(&pool).await?;
        Ok(Store { pool })
    }

    /// A private in-memory database (tests).
    pub async fn open_memory() -> StoreResult<Store> {
        let opts = SqliteConnectOptions::new().in_memory(true).foreign_keys(true);
        // One connection: every in-memory connection would otherwise be its own database.
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(opts).await?;
        migrator().run(&pool).await?;
        Ok(Store { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- identities ----

    pub async fn insert_token(&self, t: &TokenRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO api_tokens (id, name, role, customer, secret_hash, created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.role)
        .bind(&t.customer)
        .bind(&t.secret_hash)
        .bind(to_ms(t.created_at))
        .bind(&t.created_by)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_token(&self, id: &str) -> StoreResult<Option<TokenRow>> {
        let row = sqlx::query(
            "SELECT id, name, role, customer, secret_hash, created_at, created_by, revoked_at FROM api_tokens WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(TokenRow {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                role: r.try_get("role")?,
                customer: r.try_get("customer")?,
                secret_hash: r.try_get("secret_hash")?,
                created_at: from_ms(r.try_get("created_at")?)?,
                created_by: r.try_get("created_by")?,
                revoked: r.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
            })
        })
        .transpose()
    }

    pub async fn count_admin_tokens(&self) -> StoreResult<i64> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

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

    const APPLIANCE_COLS: &'static str = "id, app, customer, created_at, created_by, cert_fingerprint, enrolled_at, revoked_at, last_seen, agent_version, resources";

    fn appliance_from(r: sqlx::sqlite::SqliteRow) -> StoreResult<ApplianceRow> {
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

    async fn appliances_where(&self, clause: &'static str, binds: &[&str]) -> StoreResult<Vec<ApplianceRow>> {
        let sql = format!("SELECT {} FROM appliances {clause} ORDER BY created_at, id", Self::APPLIANCE_COLS);
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for b in binds {
            q = q.bind(*b);
        }
        q.fetch_all(&self.pool).await?.into_iter().map(Self::appliance_from).collect()
    }

    pub async fn get_appliance(&self, id: &str) -> StoreResult<Option<ApplianceRow>> {
        Ok(self.appliances_where("WHERE id = $1", &[id]).await?.into_iter().next())
    }

    /// The live (not revoked) appliance for an app and customer.
    pub async fn find_appliance(&self, app: &str, customer: &str) -> StoreResult<Option<ApplianceRow>> {
        Ok(self
            .appliances_where("WHERE app = $1 AND customer = $2 AND revoked_at IS NULL", &[app, customer])
            .await?
            .into_iter()
            .next())
    }

    pub async fn appliance_by_fingerprint(&self, fp: &str) -> StoreResult<Option<ApplianceRow>> {
        Ok(self.appliances_where("WHERE cert_fingerprint = $1", &[fp]).await?.into_iter().next())
    }

    pub async fn list_appliances(&self) -> StoreResult<Vec<ApplianceRow>> {
        self.appliances_where("", &[]).await
    }

    pub async fn set_enrolled(&self, id: &str, fingerprint: &str, now: Timestamp) -> StoreResult<()> {
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

    /// Marks an appliance revoked; false if it was already revoked or does not exist.
    pub async fn revoke_appliance(&self, id: &str, now: Timestamp) -> StoreResult<bool> {
        let r = sqlx::query("UPDATE appliances SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
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

    /// Consumes a token atomically: of any number of concurrent callers exactly one gets `true`.
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
        sqlx::query(
            "INSERT INTO endpoints (id, endpoint_type, appliance_id, resource_id, state, created_by, created_at, expires_at, address) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    fn endpoint_from(r: sqlx::sqlite::SqliteRow) -> StoreResult<EndpointRow> {
        let t: String = r.try_get("endpoint_type")?;
        let s: String = r.try_get("state")?;
        Ok(EndpointRow {
            id: r.try_get("id")?,
            endpoint_type: EndpointType::parse(&t).ok_or_else(|| StoreError::Corrupt(format!("endpoint type {t}")))?,
            appliance_id: r.try_get("appliance_id")?,
            resource_id: r.try_get("resource_id")?,
            state: EndpointState::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("endpoint state {s}")))?,
            created_by: r.try_get("created_by")?,
            created_at: from_ms(r.try_get("created_at")?)?,
            expires_at: from_ms(r.try_get("expires_at")?)?,
            ended_at: opt_ts(r.try_get("ended_at")?)?,
            address: r.try_get("address")?,
            sessions_total: r.try_get::<i64, _>("sessions_total")?.max(0) as u64,
        })
    }

    async fn endpoints_where(&self, clause: &'static str, binds: &[&str]) -> StoreResult<Vec<EndpointRow>> {
        let sql = format!(
            "SELECT id, endpoint_type, appliance_id, resource_id, state, created_by, created_at, expires_at, ended_at, address, sessions_total \
             FROM endpoints {clause} ORDER BY created_at, id"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for b in binds {
            q = q.bind(*b);
        }
        q.fetch_all(&self.pool).await?.into_iter().map(Self::endpoint_from).collect()
    }

    pub async fn get_endpoint(&self, id: &str) -> StoreResult<Option<EndpointRow>> {
        Ok(self.endpoints_where("WHERE id = $1", &[id]).await?.into_iter().next())
    }

    pub async fn list_endpoints(&self) -> StoreResult<Vec<EndpointRow>> {
        self.endpoints_where("", &[]).await
    }

    pub async fn active_endpoints(&self) -> StoreResult<Vec<EndpointRow>> {
        self.endpoints_where("WHERE state = 'active'", &[]).await
    }

    pub async fn active_endpoints_of(&self, appliance_id: &str) -> StoreResult<Vec<EndpointRow>> {
        self.endpoints_where("WHERE state = 'active' AND appliance_id = $1", &[appliance_id]).await
    }

    /// Moves an active endpoint to a final state; false if it was not active (someone else ended it).
    pub async fn end_endpoint(&self, id: &str, state: EndpointState, now: Timestamp) -> StoreResult<bool> {
        let r = sqlx::query("UPDATE endpoints SET state = $1, ended_at = $2 WHERE id = $3 AND state = 'active'")
            .bind(state.as_str())
            .bind(to_ms(now))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn set_endpoint_address(&self, id: &str, address: &str) -> StoreResult<()> {
        sqlx::query("UPDATE endpoints SET address = $1 WHERE id = $2").bind(address).bind(id).execute(&self.pool).await?;
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

    pub async fn append_audit(&self, r: &AuditRecord) -> StoreResult<()> {
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Audit records in order, optionally only those after `after_seq`.
    pub async fn list_audit(&self, after_seq: i64) -> StoreResult<Vec<AuditRecord>> {
        let rows = sqlx::query(
            "SELECT seq, time, kind, actor, appliance_id, endpoint_id, session_id, op_id, detail, prev_hash, hash \
             FROM audit_log WHERE seq > $1 ORDER BY seq",
        )
        .bind(after_seq)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let time: String = r.try_get("time")?;
                let detail: String = r.try_get("detail")?;
                Ok(AuditRecord {
                    seq: r.try_get("seq")?,
                    time: time.parse().map_err(|e| StoreError::Corrupt(format!("audit time {time}: {e}")))?,
                    kind: r.try_get("kind")?,
                    actor: r.try_get("actor")?,
                    appliance_id: r.try_get("appliance_id")?,
                    endpoint_id: r.try_get("endpoint_id")?,
                    session_id: r.try_get("session_id")?,
                    op_id: r.try_get("op_id")?,
                    detail: serde_json::from_str(&detail).map_err(|e| StoreError::Corrupt(format!("audit detail: {e}")))?,
                    prev_hash: r.try_get("prev_hash")?,
                    hash: r.try_get("hash")?,
                })
            })
            .collect()
    }

    pub async fn last_audit(&self) -> StoreResult<Option<(i64, String)>> {
        let row = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetch_optional(&self.pool).await?;
        row.map(|r| Ok((r.try_get("seq")?, r.try_get("hash")?))).transpose()
    }

    /// Rewrites one record's detail in place, as an attacker with database access could.
    #[cfg(test)]
    pub async fn tamper_audit_detail(&self, seq: i64, detail: &str) -> StoreResult<()> {
        sqlx::query("UPDATE audit_log SET detail = $1 WHERE seq = $2").bind(detail).bind(seq).execute(&self.pool).await?;
        Ok(())
    }
}
