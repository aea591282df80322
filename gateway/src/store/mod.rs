//! Control-plane state behind one interface with two backends: the embedded SQLite database
//! (the default, a file in the data dir) and PostgreSQL (several gateway replicas sharing
//! state). Both run through `sqlx::Any` with the same portable SQL (`$1` parameters, TEXT and
//! BIGINT columns) and the same migrations; the few places where the backends differ (pool
//! set-up, how a transaction takes the write lock) branch on [`Backend`].

mod audit_batch;
mod cert_renewal;
mod control;
mod customer_trail;
mod endpoint_list;
mod gauges;
mod grant_bulk;
mod grant_expiry;
mod grant_list;
mod grant_move;
mod held;
mod op_list;
mod refusals;
mod signed;
mod spine;
mod steady_state;
mod teardown;
mod tokens;
mod webhooks;

pub use control::{within_cap, GrantChange, GrantRow, OpRow, OP_OUTPUT_CAP};
pub use customer_trail::{OutboxState, TrailBells, TrailPosition, OUTBOX_BOUND};
pub use endpoint_list::EndpointWithOwner;
pub use gauges::StateCount;
pub use grant_bulk::{CustomerGrants, IDS_PER_STATEMENT};
pub use grant_list::GrantWithOwner;
pub use grant_move::GrantMove;
pub use spine::{ApplianceRow, AuditPage, AuditPageQuery, AuditRow, EndpointRow, EnrollmentRow};
pub use steady_state::SnapshotRow;
pub use teardown::TeardownProofRow;
pub use tokens::{TokenRevocation, TokenRow};
pub use webhooks::{
    AttemptRecord, DeliveryRow, NewDelivery, WebhookSettings, DELIVERY_QUEUE_BOUND,
};

use jiff::Timestamp;
use sqlx::{
    any::{AnyConnectOptions, AnyPoolOptions},
    migrate::{Migration, MigrationType, Migrator},
    Executor, SqlSafeStr,
};
use std::{path::Path, str::FromStr, time::Duration};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "unsupported store URL {0:?}: use sqlite:PATH, sqlite::memory: or postgres://USER@HOST/DB"
    )]
    UnsupportedUrl(String),
    #[error("audit record does not continue the chain: {0}")]
    BrokenChain(String),
    /// A caller asked the store for a move the record's state machine does not allow; nothing
    /// was written. The callers check with the machine first, so this is a bug in the caller.
    #[error("illegal state change refused by the store: {0}")]
    IllegalTransition(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Which database a [`Store`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// The schema, the same files for both backends. Never edit an applied migration (its
/// checksum is stored); add the next one.
fn migrator() -> Migrator {
    let m = |version: i64, name: &str, sql: &'static str| {
        Migration::new(
            version,
            name.to_string().into(),
            MigrationType::Simple,
            sql.into_sql_str(),
            false,
        )
    };
    Migrator::with_migrations(vec![
        m(1, "spine", include_str!("../../migrations/0001_spine.sql")),
        m(
            2,
            "control plane",
            include_str!("../../migrations/0002_control_plane.sql"),
        ),
        m(
            3,
            "endpoint credentials",
            include_str!("../../migrations/0003_endpoint_credentials.sql"),
        ),
        m(
            4,
            "audit paging",
            include_str!("../../migrations/0004_audit_paging.sql"),
        ),
        m(
            5,
            "signed decisions",
            include_str!("../../migrations/0005_signed_decisions.sql"),
        ),
        m(
            7,
            "teardown proofs",
            include_str!("../../migrations/0007_teardown_proofs.sql"),
        ),
        m(
            8,
            "customer trail outbox",
            include_str!("../../migrations/0008_customer_trail_outbox.sql"),
        ),
        m(
            9,
            "token lifetimes",
            include_str!("../../migrations/0009_token_lifetimes.sql"),
        ),
        m(
            10,
            "appliance refusals",
            include_str!("../../migrations/0010_appliance_refusals.sql"),
        ),
        m(
            11,
            "cert renewal",
            include_str!("../../migrations/0011_cert_renewal.sql"),
        ),
        m(
            13,
            "signed webhooks",
            include_str!("../../migrations/0013_signed_webhooks.sql"),
        ),
        m(
            14,
            "op requester id",
            include_str!("../../migrations/0014_op_requester_id.sql"),
        ),
        m(
            15,
            "steady-state snapshots",
            include_str!("../../migrations/0015_steady_state_snapshots.sql"),
        ),
        m(
            17,
            "phases",
            include_str!("../../migrations/0017_phases.sql"),
        ),
        m(
            21,
            "grant expiry records",
            include_str!("../../migrations/0021_grant_expiry_records.sql"),
        ),
    ])
}

/// Now, at the store's precision (milliseconds), so a record reads back exactly as it was
/// written and shown.
pub fn now() -> Timestamp {
    Timestamp::from_millisecond(Timestamp::now().as_millisecond())
        .unwrap_or_else(|_| Timestamp::now())
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

/// A stored keyword (state, level, tool…) back into its enum.
fn parse_kw<T>(s: &str, what: &str, parse: impl FnOnce(&str) -> Option<T>) -> StoreResult<T> {
    parse(s).ok_or_else(|| StoreError::Corrupt(format!("{what} {s:?}")))
}

/// A store URL with any password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url.to_string(),
    }
}

/// `sqlite://` URL for a file path, percent-encoding everything but unreserved characters so
/// that `?`, `#` and `%` in a path survive sqlx's URL parsing.
fn sqlite_url(path: &Path) -> String {
    let mut s = String::from("sqlite://");
    for &b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s.push_str("?mode=rwc");
    s
}

/// Whether a database error is a unique-constraint violation (the name or number is taken).
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

/// A value for one of several statements sent to SQLite as one text: its worker runs them in
/// order in one call, where each statement sent alone is a round trip to the store's one
/// writer. The statements use anonymous `?` parameters, bound in order.
pub(super) enum Arg<'a> {
    Text(&'a str),
    MaybeText(Option<&'a str>),
    Int(i64),
    MaybeInt(Option<i64>),
}

/// `args`, in order, bound to `sql`.
fn with_args<'q>(
    sql: String,
    args: Vec<Arg<'q>>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    args.into_iter()
        .fold(sqlx::query(sqlx::AssertSqlSafe(sql)), |q, a| match a {
            Arg::Text(v) => q.bind(v),
            Arg::MaybeText(v) => q.bind(v),
            Arg::Int(v) => q.bind(v),
            Arg::MaybeInt(v) => q.bind(v),
        })
}

/// `$first, $first+1, …` for `n` bound ids (an `IN (…)` list).
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Read-only connections beside SQLite's one writer: enough for the API's concurrent reads on
/// a small machine; each is a thread of its own.
const SQLITE_READERS: u32 = 3;

/// PostgreSQL connections per gateway, shared by reads and writes.
const POSTGRES_CONNECTIONS: u32 = 10;

/// A PostgreSQL connection idle this long is pinged before use: a restart of the server leaves
/// idle connections dead, and a statement on one would fail (cutting sessions) for nothing.
/// Busy connections skip the ping, which was a round trip per statement (`held`).
const POSTGRES_PING_AFTER: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Store {
    /// Every write, and reads that must be ordered with writes (a read in a write transaction).
    pool: held::Conns,
    /// Plain reads ([`Store::select_rows`]). For a SQLite file a few read-only connections of
    /// their own: in WAL mode they read beside the one writer instead of queueing behind it
    /// on its worker thread (a revocation burst spent most of its time in that queue). A read
    /// sees every commit that finished before it started, so a request still reads its own
    /// writes. The same pool as `pool` for PostgreSQL and in-memory SQLite.
    reader: held::Conns,
    backend: Backend,
    /// Rung when an appliance's customer-trail outbox gains records.
    trail_bells: TrailBells,
}

impl Store {
    /// Opens the store a URL names and applies migrations: `sqlite:PATH` (also `sqlite://PATH`),
    /// `sqlite::memory:`, or `postgres://…` / `postgresql://…` (libpq-style URL; `sslmode` etc.
    /// as query parameters).
    pub async fn open(url: &str) -> StoreResult<Store> {
        if url == "sqlite::memory:" || url == "sqlite://:memory:" {
            Store::open_memory().await
        } else if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.trim_start_matches("//");
            if path.is_empty() {
                return Err(StoreError::UnsupportedUrl(url.to_string()));
            }
            Store::open_sqlite(Path::new(path)).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Store::open_postgres(url).await
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }

    /// Opens (creating if needed) the SQLite database file and applies migrations.
    pub async fn open_sqlite(path: &Path) -> StoreResult<Store> {
        let path = std::path::absolute(path).map_err(|e| sqlx::Error::Configuration(e.into()))?;
        let url = sqlite_url(&path);
        let mut store = Store::connect(
            Backend::Sqlite,
            &url,
            // One connection: SQLite has one writer anyway, and queueing in the pool is far cheaper
            // than SQLite's sleep-and-retry busy handler when many agents write at once.
            AnyPoolOptions::new()
                .max_connections(1)
                // A local file has no link to lose: the ping before each checkout was a
                // round trip to SQLite's worker thread on every query (seen in scale_bench's
                // profile), and a broken connection is still replaced (below).
                .test_before_acquire(false)
                // A COMMIT that fails on a full or read-only disk may be rolled back by SQLite
                // itself; sqlx's ROLLBACK then fails and the connection keeps counting a
                // transaction that no longer exists, refusing every later BEGIN. Such a
                // connection is replaced, so the store recovers once the disk does.
                .before_acquire(|conn, _| {
                    Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(&*conn)) })
                })
                .after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL with synchronous=NORMAL: a crash of the gateway loses nothing; a power
                    // loss can lose the last commits but never breaks the audit chain. FULL made
                    // every presence and audit write an fsync, which serialised 1000 reconnecting
                    // agents behind the disk.
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                    )
                        .await
                        .map(|_| ())
                })
            }),
        )
        .await?;
        let readers = AnyPoolOptions::new()
            .max_connections(SQLITE_READERS)
            .test_before_acquire(false)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA busy_timeout = 10000; PRAGMA query_only = ON;")
                        .await
                        .map(|_| ())
                })
            })
            .acquire_timeout(Duration::from_secs(30))
            .connect_lazy_with(AnyConnectOptions::from_str(&url)?);
        store.reader = held::Conns::held(readers, SQLITE_READERS, None);
        Ok(store)
    }

    /// A private in-memory SQLite database (tests).
    pub async fn open_memory() -> StoreResult<Store> {
        // One connection, never recycled: the database lives as long as its connection.
        Store::connect(
            Backend::Sqlite,
            "sqlite::memory:",
            AnyPoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .after_connect(|conn, _| {
                    Box::pin(
                        async move { conn.execute("PRAGMA foreign_keys = ON;").await.map(|_| ()) },
                    )
                }),
        )
        .await
    }

    /// Connects to PostgreSQL and applies migrations (the migrator takes an advisory lock, so
    /// replicas starting together apply them once).
    pub async fn open_postgres(url: &str) -> StoreResult<Store> {
        Store::connect(
            Backend::Postgres,
            url,
            AnyPoolOptions::new().max_connections(POSTGRES_CONNECTIONS),
        )
        .await
    }

    async fn connect(backend: Backend, url: &str, opts: AnyPoolOptions) -> StoreResult<Store> {
        sqlx::any::install_default_drivers();
        let conn = AnyConnectOptions::from_str(url)?;
        let pool = opts
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(conn)
            .await?;
        migrator().run(&pool).await?;
        let pool = match backend {
            // SQLite's one writer connection, held (`held`): for an in-memory database also
            // its reader; a file's readers are held by `open_sqlite`. PostgreSQL's connections
            // serve both.
            Backend::Sqlite => held::Conns::held(pool, 1, None),
            Backend::Postgres => {
                held::Conns::held(pool, POSTGRES_CONNECTIONS, Some(POSTGRES_PING_AFTER))
            }
        };
        Ok(Store {
            reader: pool.clone(),
            pool,
            backend,
            trail_bells: TrailBells::default(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        self.reader.close().await;
        self.pool.close().await;
    }

    /// A transaction that holds the database's write lock for the table it names from the
    /// start, so read-then-write sequences in it are serial across processes. SQLite has one
    /// writer (`BEGIN IMMEDIATE` takes it); PostgreSQL locks `table` against other writers.
    /// Runs a SELECT whose text was assembled from constants only, binding `binds` in order,
    /// and maps every row.
    async fn select_rows<T>(
        &self,
        sql: String,
        binds: &[&str],
        from: impl Fn(sqlx::any::AnyRow) -> StoreResult<T>,
    ) -> StoreResult<Vec<T>> {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for b in binds {
            q = q.bind(*b);
        }
        q.fetch_all(&self.reader)
            .await?
            .into_iter()
            .map(from)
            .collect()
    }

    /// A connection of the writer's, the caller's alone: for a transaction, which borrows it.
    async fn writer(&self) -> StoreResult<held::Conn> {
        Ok(self.pool.acquire().await?)
    }

    async fn write_tx<'c>(
        &self,
        conn: &'c mut held::Conn,
        table: &'static str,
    ) -> StoreResult<sqlx::Transaction<'c, sqlx::Any>> {
        match self.backend {
            Backend::Sqlite => {
                Ok(sqlx::Connection::begin_with(&mut **conn, "BEGIN IMMEDIATE").await?)
            }
            // One round trip: the simple query protocol takes both statements at once.
            Backend::Postgres => Ok(sqlx::Connection::begin_with(
                &mut **conn,
                sqlx::AssertSqlSafe(format!("BEGIN; LOCK TABLE {table} IN EXCLUSIVE MODE")),
            )
            .await?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_encode_odd_paths() {
        assert_eq!(
            sqlite_url(Path::new("/tmp/a b/p%q?.db")),
            "sqlite:///tmp/a%20b/p%25q%3F.db?mode=rwc"
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[tokio::test]
    async fn open_parses_urls() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&format!("sqlite:{}", dir.path().join("x.db").display()))
            .await
            .unwrap();
        assert_eq!(s.backend(), Backend::Sqlite);
        assert!(dir.path().join("x.db").exists());
        for (pragma, want) in [
            ("journal_mode", "wal"),
            ("foreign_keys", "1"),
            ("busy_timeout", "10000"),
        ] {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA {pragma}")))
                .fetch_one(&s.pool)
                .await
                .unwrap();
            let got = sqlx::Row::try_get::<String, _>(&row, 0)
                .or_else(|_| sqlx::Row::try_get::<i64, _>(&row, 0).map(|n| n.to_string()));
            assert_eq!(got.unwrap(), want, "{pragma}");
        }
        let s = Store::open(&format!("sqlite://{}", dir.path().join("y.db").display()))
            .await
            .unwrap();
        assert_eq!(s.count_admin_tokens().await.unwrap(), 0);
        assert!(dir.path().join("y.db").exists());
        Store::open("sqlite::memory:").await.unwrap();
        assert!(
            matches!(Store::open("mysql://u:pw@h/db").await, Err(StoreError::UnsupportedUrl(u)) if !u.contains("pw"))
        );
    }
}
