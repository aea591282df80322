//! SQLite connections kept out of sqlx's pool between statements.
//!
//! sqlx's pool pings every connection it is given back (`PoolConnection`'s drop), and nothing
//! turns that off. For SQLite a ping is a round trip to the connection's worker thread: every
//! statement cost two trips instead of one, and the one writer stayed busy for the second
//! while API calls queued for it (scale_bench's revocation burst, profiled). A local file has
//! no link to lose, so [`Conns::Held`] takes each connection from the pool once and keeps it,
//! handing it from statement to statement itself. A connection left inside a transaction (a
//! failed COMMIT SQLite rolled back on its own) goes back to the pool instead, whose
//! `before_acquire` check replaces it.

use futures_util::{stream::BoxStream, FutureExt, StreamExt, TryStreamExt};
use sqlx::{
    any::{AnyQueryResult, AnyRow},
    pool::PoolConnection,
    Any, AnyPool, Connection, Database, Either, Execute, Executor,
};
use std::{
    ops::{Deref, DerefMut},
    sync::Arc,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Where a store's statements run: sqlx's pool (PostgreSQL), or SQLite connections held.
#[derive(Clone, Debug)]
pub(crate) enum Conns {
    Pool(AnyPool),
    Held(Arc<Held>),
}

/// Up to `size` connections of `pool`, taken from it once and handed out in turn.
#[derive(Debug)]
pub(crate) struct Held {
    pool: AnyPool,
    idle: std::sync::Mutex<Vec<PoolConnection<Any>>>,
    turns: Arc<Semaphore>,
}

/// One connection, the caller's alone until dropped.
pub(crate) struct Conn {
    conn: Option<PoolConnection<Any>>,
    /// The holder it goes back to on drop, and the turn it takes meanwhile.
    home: Option<(Arc<Held>, OwnedSemaphorePermit)>,
    /// False while a call that may leave it mid-transaction is under way (`Conn::unsettled`).
    settled: bool,
}

impl Conns {
    /// Holds up to `size` of `pool`'s connections (its `max_connections`).
    pub(crate) fn held(pool: AnyPool, size: u32) -> Conns {
        Conns::Held(Arc::new(Held {
            pool,
            idle: std::sync::Mutex::new(Vec::new()),
            turns: Arc::new(Semaphore::new(size as usize)),
        }))
    }

    /// A connection for the caller alone (a transaction, several statements in order).
    pub(crate) async fn acquire(&self) -> Result<Conn, sqlx::Error> {
        match self {
            Conns::Pool(pool) => Ok(Conn {
                conn: Some(pool.acquire().await?),
                home: None,
                settled: true,
            }),
            Conns::Held(held) => {
                let turn = held
                    .turns
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| sqlx::Error::PoolClosed)?;
                let kept = held.idle.lock().ok().and_then(|mut idle| idle.pop());
                let conn = match kept {
                    Some(conn) => conn,
                    None => held.pool.acquire().await?,
                };
                Ok(Conn {
                    conn: Some(conn),
                    home: Some((held.clone(), turn)),
                    settled: true,
                })
            }
        }
    }

    pub(crate) async fn close(&self) {
        match self {
            Conns::Pool(pool) => pool.close().await,
            Conns::Held(held) => {
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
    }
}

impl Conn {
    /// From now until [`Conn::settled`], dropping the connection closes it: a call under way
    /// (raw `BEGIN … COMMIT` that sqlx does not track) may leave it inside a transaction the
    /// next caller must not inherit.
    pub(crate) fn unsettled(&mut self) {
        self.settled = false;
    }

    pub(crate) fn settled(&mut self) {
        self.settled = true;
    }

    /// A connection whose worker is gone, or whose file failed under it, is closed rather
    /// than handed on (the pool opens a new one), as sqlx's ping on release would have found.
    fn not_handed_on_if_broken<T>(&mut self, result: &Result<T, sqlx::Error>) {
        if let Err(sqlx::Error::WorkerCrashed | sqlx::Error::Io(_)) = result {
            self.settled = false;
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
        let Some((held, turn)) = self.home.take() else {
            return;
        };
        // A connection still counting a transaction goes back to the pool, which replaces it.
        if !conn.is_in_transaction() && !held.turns.is_closed() {
            if let Ok(mut idle) = held.idle.lock() {
                idle.push(conn);
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
        if let Conns::Pool(pool) = self {
            return pool.fetch_many(query);
        }
        // Collected while the connection is held: the store reads whole results anyway.
        futures_util::stream::once(async move {
            let mut conn = self.acquire().await?;
            let results = conn.fetch_many(query).try_collect::<Vec<_>>().await;
            conn.not_handed_on_if_broken(&results);
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
        if let Conns::Pool(pool) = self {
            return pool.fetch_optional(query);
        }
        async move {
            let mut conn = self.acquire().await?;
            let row = conn.fetch_optional(query).await;
            conn.not_handed_on_if_broken(&row);
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
        if let Conns::Pool(pool) = self {
            return pool.prepare_with(sql, parameters);
        }
        async move {
            let mut conn = self.acquire().await?;
            conn.prepare_with(sql, parameters).await
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
}
