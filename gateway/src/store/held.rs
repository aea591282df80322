//! Store connections kept out of sqlx's pool between statements.
//!
//! sqlx's pool pings every connection it is given back (`PoolConnection`'s drop), and nothing
//! turns that off; for PostgreSQL it pings again before each checkout. For SQLite a ping is a
//! round trip to the connection's worker thread, for PostgreSQL one to the server: every
//! statement cost two or three trips instead of one, and the one writer stayed busy meanwhile
//! while API calls queued for it (scale_bench's revocation burst, profiled). So [`Conns`]
//! takes each connection from the pool once and keeps it, handing it from statement to
//! statement itself. What the pings were for is kept:
//! - a connection a failed or cancelled call may have left unusable (its link or worker gone,
//!   a transaction sqlx does not track) is closed, not handed on;
//! - a PostgreSQL connection whose statement was dropped midway (a reply half read) goes back
//!   to the pool, whose ping on release reads the rest (`Conn::in_flight`);
//! - a PostgreSQL connection idle for a while is pinged before it is handed out, since a
//!   restarted server leaves the idle ones dead (`ping_after`);
//! - a connection left inside a transaction (a failed COMMIT SQLite rolled back on its own)
//!   goes back to the pool instead, whose checks replace it.

use futures_util::{stream::BoxStream, FutureExt, StreamExt, TryStreamExt};
use sqlx::{
    any::{AnyQueryResult, AnyRow},
    pool::PoolConnection,
    Any, AnyPool, Connection, Database, Either, Execute, Executor,
};
use std::{
    ops::{Deref, DerefMut},
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Where a store's statements run: up to a number of `pool`'s connections, taken from it once
/// and handed out in turn.
#[derive(Clone, Debug)]
pub(crate) struct Conns(Arc<Held>);

#[derive(Debug)]
struct Held {
    pool: AnyPool,
    /// Connections between statements, with when each was last given back.
    idle: std::sync::Mutex<Vec<(PoolConnection<Any>, Instant)>>,
    turns: Arc<Semaphore>,
    /// A connection idle this long is pinged before it is handed out; `None` for connections
    /// with no network link to lose (SQLite).
    ping_after: Option<Duration>,
}

/// One connection, the caller's alone until dropped.
pub(crate) struct Conn {
    conn: Option<PoolConnection<Any>>,
    /// The holder it goes back to on drop, and the turn it takes meanwhile.
    home: Option<(Arc<Held>, OwnedSemaphorePermit)>,
    /// False while a call that may leave it unusable is under way (`Conn::unsettled`).
    settled: bool,
    /// True while a statement over a network link is under way (`Conn::in_flight`).
    midway: bool,
}

impl Conns {
    /// Holds up to `size` of `pool`'s connections (its `max_connections`), pinging one idle
    /// for `ping_after` before handing it out.
    pub(crate) fn held(pool: AnyPool, size: u32, ping_after: Option<Duration>) -> Conns {
        Conns(Arc::new(Held {
            pool,
            idle: std::sync::Mutex::new(Vec::new()),
            turns: Arc::new(Semaphore::new(size as usize)),
            ping_after,
        }))
    }

    /// A connection for the caller alone (a transaction, several statements in order).
    pub(crate) async fn acquire(&self) -> Result<Conn, sqlx::Error> {
        let held = &self.0;
        let turn = held
            .turns
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let kept = held.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match kept {
            Some((conn, since)) => match held.ping_after {
                Some(after) if since.elapsed() >= after => held.checked(conn).await?,
                _ => conn,
            },
            None => held.pool.acquire().await?,
        };
        Ok(Conn {
            conn: Some(conn),
            home: Some((held.clone(), turn)),
            settled: true,
            midway: false,
        })
    }

    pub(crate) async fn close(&self) {
        let held = &self.0;
        held.turns.close();
        let kept: Vec<_> = held
            .idle
            .lock()
            .map(|mut idle| idle.drain(..).collect())
            .unwrap_or_default();
        drop(kept);
        held.pool.close().await;
    }
}

impl Held {
    /// `conn` if it answers a ping in time, else a connection from the pool (which tests its
    /// own).
    async fn checked(
        &self,
        mut conn: PoolConnection<Any>,
    ) -> Result<PoolConnection<Any>, sqlx::Error> {
        if let Ok(Ok(())) = tokio::time::timeout(PING_LIMIT, conn.ping()).await {
            return Ok(conn);
        }
        conn.close_on_drop();
        drop(conn);
        self.pool.acquire().await
    }
}

/// Longest a ping may take before its connection counts as dead (a server gone without closing
/// the link never answers).
const PING_LIMIT: Duration = Duration::from_secs(5);

/// Whether `error` may leave its connection unusable: its worker or link gone, the protocol
/// out of step, or the server ending the session (SQLSTATE class 08, 57P01–57P05).
fn breaks_connection(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::WorkerCrashed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}

impl Conn {
    /// From now until [`Conn::settled`], dropping the connection closes it: a call under way
    /// may leave it inside a raw `BEGIN … COMMIT` sqlx does not track, which the next caller
    /// must not inherit.
    pub(crate) fn unsettled(&mut self) {
        self.settled = false;
    }

    pub(crate) fn settled(&mut self) {
        self.settled = true;
        self.midway = false;
    }

    /// A statement goes out: over a network link, a connection dropped before its reply is
    /// read whole is not handed on with the reply half read. It goes back to sqlx's pool, whose
    /// ping on release reads the rest and keeps it (or closes it if that fails), as sqlx means
    /// for cancelled calls: closing it would cost a new connection per timeout, under load when
    /// timeouts come most. (SQLite's worker finishes a statement whose caller left.)
    fn in_flight(&mut self) {
        self.midway = self
            .home
            .as_ref()
            .is_some_and(|(held, _)| held.ping_after.is_some());
    }

    /// The statement of [`Conn::in_flight`] ended with `result`. A connection it may have broken
    /// is closed rather than handed on (the pool opens a new one), as sqlx's ping on release
    /// would have found.
    fn landed<T>(&mut self, result: &Result<T, sqlx::Error>) {
        self.settled();
        if let Err(e) = result {
            if breaks_connection(e) {
                self.settled = false;
            }
        }
    }
}

impl Deref for Conn {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &Self::Target {
        // Only `Drop` takes the connection out.
        self.conn.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.conn.as_deref_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !self.settled {
            conn.close_on_drop();
            return;
        }
        if self.midway {
            // Dropped, `conn` goes back to the pool by way of its ping (see `in_flight`).
            return;
        }
        let Some((held, turn)) = self.home.take() else {
            return;
        };
        // A connection still counting a transaction goes back to the pool, which replaces it.
        if !conn.is_in_transaction() && !held.turns.is_closed() {
            if let Ok(mut idle) = held.idle.lock() {
                idle.push((conn, Instant::now()));
            }
        }
        // The turn ends after the connection is back: the next caller finds it.
        drop(turn);
    }
}

impl<'p> Executor<'p> for &'p Conns {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<AnyQueryResult, AnyRow>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Any>,
    {
        // Collected while the connection is held: the store reads whole results anyway.
        futures_util::stream::once(async move {
            let mut conn = self.acquire().await?;
            conn.in_flight();
            let results = conn.fetch_many(query).try_collect::<Vec<_>>().await;
            conn.landed(&results);
            results
        })
        .map_ok(|results| futures_util::stream::iter(results.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> futures_util::future::BoxFuture<'e, Result<Option<AnyRow>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Any>,
    {
        async move {
            let mut conn = self.acquire().await?;
            conn.in_flight();
            let row = conn.fetch_optional(query).await;
            conn.landed(&row);
            row
        }
        .boxed()
    }

    fn prepare_with<'e>(
        self,
        sql: sqlx::SqlStr,
        parameters: &'e [<Any as Database>::TypeInfo],
    ) -> futures_util::future::BoxFuture<'e, Result<<Any as Database>::Statement, sqlx::Error>>
    where
        'p: 'e,
    {
        async move {
            let mut conn = self.acquire().await?;
            conn.in_flight();
            let prepared = conn.prepare_with(sql, parameters).await;
            conn.landed(&prepared);
            prepared
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store on a SQLite file (held writer and readers), with the directory that holds it.
    async fn file_store() -> (tempfile::TempDir, super::super::Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::Store::open_sqlite(&dir.path().join("s.db"))
            .await
            .unwrap();
        (dir, store)
    }

    async fn in_transaction(conns: &Conns) -> bool {
        let mut conn = conns.acquire().await.unwrap();
        // SQLite refuses a BEGIN inside a transaction.
        let open = sqlx::query("BEGIN").execute(&mut *conn).await.is_err();
        if !open {
            sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
        }
        open
    }

    /// A connection left inside a raw `BEGIN` (sqlx does not track it) by a call that was
    /// cancelled is closed, not handed to the next caller, who would write inside it.
    #[tokio::test]
    async fn a_connection_dropped_unsettled_is_not_handed_on() {
        let (_dir, store) = file_store().await;
        for settle in [true, false] {
            let mut conn = store.pool.acquire().await.unwrap();
            conn.unsettled();
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut *conn)
                .await
                .unwrap();
            if settle {
                // What a handler that forgot the transaction would do: the next caller gets it.
                conn.settled();
            }
            drop(conn);
            assert_eq!(in_transaction(&store.pool).await, settle);
            if settle {
                let mut conn = store.pool.acquire().await.unwrap();
                sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
            }
        }
        store.close().await;
    }

    /// Statements take turns on the held connections: more callers than connections all
    /// finish, and each connection is kept (a per-connection setting survives).
    #[tokio::test]
    async fn callers_take_turns_on_the_held_connections() {
        let (_dir, store) = file_store().await;
        {
            let mut conn = store.pool.acquire().await.unwrap();
            sqlx::query("PRAGMA cache_size = -1234")
                .execute(&mut *conn)
                .await
                .unwrap();
        }
        let reads = (0..32).map(|i| {
            let store = store.clone();
            async move {
                let v: i64 = sqlx::query_scalar("SELECT $1")
                    .bind(i as i64)
                    .fetch_one(&store.reader)
                    .await
                    .unwrap();
                v
            }
        });
        let got = futures_util::future::join_all(reads).await;
        assert_eq!(got, (0..32).collect::<Vec<i64>>());
        let cache: i64 = sqlx::query_scalar("PRAGMA cache_size")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(cache, -1234, "the writer's connection was not kept");
        store.close().await;
    }

    async fn backend_pid(conns: &Conns) -> Result<i32, sqlx::Error> {
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(conns)
            .await
    }

    /// A PostgreSQL connection whose statement was dropped before its reply was read (a
    /// timeout around it) is not handed on: the next caller gets another, not one with a reply
    /// half read. (It went back to sqlx's pool, which reads the rest before handing it out.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_postgres_statement_dropped_midway_is_not_handed_on() {
        let cluster = postern::pg_cluster::shared();
        let url = cluster.create_database("held_dropped_midway");
        let store = super::super::Store::open_postgres(&url).await.unwrap();
        let first = backend_pid(&store.pool).await.unwrap();
        // Idle connections are handed out last given back first: the same one, kept.
        assert_eq!(backend_pid(&store.pool).await.unwrap(), first);
        let slow = sqlx::query("SELECT pg_sleep(2)").execute(&store.pool);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), slow)
                .await
                .is_err(),
            "the sleep was not cut short"
        );
        let next = backend_pid(&store.pool).await.unwrap();
        assert_ne!(
            next, first,
            "the connection with a reply half read was handed on"
        );
        store.close().await;
    }

    /// PostgreSQL restarted under a store: connections idle since are pinged and replaced,
    /// so no statement after the restart fails on a dead one (each would cut sessions).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_restarted_under_held_connections_fails_no_statement_after() {
        let cluster = Arc::new(postern::pg_cluster::PgCluster::start_with(
            &Default::default(),
        ));
        let url = cluster.create_database("held_restarted");
        let store = super::super::Store::open_postgres(&url).await.unwrap();
        let busy = || {
            futures_util::future::join_all((0..8).map(|_| {
                let store = store.clone();
                async move {
                    sqlx::query_scalar::<_, i32>("SELECT 1 FROM pg_sleep(0.05)")
                        .fetch_one(&store.reader)
                        .await
                }
            }))
        };
        // Eight connections held, each used at once.
        assert!(busy().await.iter().all(|r| r.is_ok()));
        let before = backend_pid(&store.pool).await.unwrap();

        let stop = cluster.clone();
        tokio::task::spawn_blocking(move || stop.stop())
            .await
            .unwrap();
        // The connection used last fails at once (no waiting for a new one), and is closed.
        assert!(backend_pid(&store.pool).await.is_err());
        let start = cluster.clone();
        tokio::task::spawn_blocking(move || start.restart())
            .await
            .unwrap();
        // Past the ping: as a restart that takes a while would leave them.
        tokio::time::sleep(super::super::POSTGRES_PING_AFTER).await;
        let after = busy().await;
        assert!(after.iter().all(|r| r.is_ok()), "{after:?}");
        assert_ne!(backend_pid(&store.pool).await.unwrap(), before);
        store.close().await;
    }
}
