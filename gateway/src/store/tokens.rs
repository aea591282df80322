//! API tokens: minted (hash only), listed, revoked, their last use noted.

use super::{from_ms, is_unique_violation, opt_ts, to_ms, Store, StoreResult};
use jiff::Timestamp;
use sqlx::{any::AnyRow, Row};

#[derive(Clone)]
pub struct TokenRow {
    pub id: String,
    pub name: String,
    pub role: String,
    pub customer: Option<String>,
    pub secret_hash: String,
    pub created_at: Timestamp,
    /// Display name of who minted it (`system:gateway` for the bootstrap admin).
    pub created_by: String,
    /// Token id of who minted it; None when the gateway itself did.
    pub created_by_id: Option<String>,
    /// None: never expires (`--ttl never`, the bootstrap admin, tokens minted before expiry
    /// existed).
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    pub last_used_at: Option<Timestamp>,
}

impl std::fmt::Debug for TokenRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRow")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("role", &self.role)
            .field("customer", &self.customer)
            .field("expires_at", &self.expires_at)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}

/// What [`Store::revoke_token`] did.
#[derive(Debug, Clone)]
pub enum TokenRevocation {
    Revoked(Box<TokenRow>),
    NotFound,
    AlreadyRevoked(Timestamp),
    /// Nothing written: it is the last admin token that is neither revoked nor expired.
    LastAdmin,
}

const TOKEN_COLS: &str = "id, name, role, customer, secret_hash, created_at, created_by, created_by_id, expires_at, revoked_at, last_used_at";

fn token_from(r: AnyRow) -> StoreResult<TokenRow> {
    Ok(TokenRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        role: r.try_get("role")?,
        customer: r.try_get("customer")?,
        secret_hash: r.try_get("secret_hash")?,
        created_at: from_ms(r.try_get("created_at")?)?,
        created_by: r.try_get("created_by")?,
        created_by_id: r.try_get("created_by_id")?,
        expires_at: opt_ts(r.try_get("expires_at")?)?,
        revoked_at: opt_ts(r.try_get("revoked_at")?)?,
        last_used_at: opt_ts(r.try_get("last_used_at")?)?,
    })
}

impl Store {
    /// Stores a new token; false (nothing written) when a live token already has its name
    /// (or, with odds of 2^-64, its random id: a unique key either way).
    pub async fn insert_token(&self, t: &TokenRow) -> StoreResult<bool> {
        let r = sqlx::query(
            "INSERT INTO api_tokens (id, name, role, customer, secret_hash, created_at, created_by, created_by_id, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.role)
        .bind(&t.customer)
        .bind(&t.secret_hash)
        .bind(to_ms(t.created_at))
        .bind(&t.created_by)
        .bind(&t.created_by_id)
        .bind(t.expires_at.map(to_ms))
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if is_unique_violation(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get_token(&self, id: &str) -> StoreResult<Option<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLS} FROM api_tokens WHERE id = $1");
        Ok(self
            .select_rows(sql, &[id], token_from)
            .await?
            .into_iter()
            .next())
    }

    /// The live (unrevoked) token with this name, if any.
    pub async fn live_token_named(&self, name: &str) -> StoreResult<Option<TokenRow>> {
        let sql =
            format!("SELECT {TOKEN_COLS} FROM api_tokens WHERE name = $1 AND revoked_at IS NULL");
        Ok(self
            .select_rows(sql, &[name], token_from)
            .await?
            .into_iter()
            .next())
    }

    /// Every token, oldest first.
    pub async fn list_tokens(&self) -> StoreResult<Vec<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLS} FROM api_tokens ORDER BY created_at, id");
        self.select_rows(sql, &[], token_from).await
    }

    /// Admin tokens not revoked (expired ones count: the store still holds an admin, and
    /// start-up must not mint a new one behind the operator's back).
    pub async fn count_admin_tokens(&self) -> StoreResult<i64> {
        Ok(sqlx::query(
            "SELECT COUNT(*) AS n FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?)
    }

    /// Revokes a token, in one transaction holding the table's write lock so that two admins
    /// revoking each other at once cannot leave the gateway with no usable admin.
    pub async fn revoke_token(&self, id: &str, now: Timestamp) -> StoreResult<TokenRevocation> {
        let mut conn = self.writer().await?;
        let mut tx = self.write_tx(&mut conn, "api_tokens").await?;
        let sql = format!("SELECT {TOKEN_COLS} FROM api_tokens WHERE id = $1");
        let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .map(token_from)
            .transpose()?
        else {
            return Ok(TokenRevocation::NotFound);
        };
        if let Some(at) = row.revoked_at {
            return Ok(TokenRevocation::AlreadyRevoked(at));
        }
        if row.role == "admin" {
            let others: i64 = sqlx::query(
                "SELECT COUNT(*) AS n FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL \
                 AND id <> $1 AND (expires_at IS NULL OR expires_at > $2)",
            )
            .bind(id)
            .bind(to_ms(now))
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
            if others == 0 {
                return Ok(TokenRevocation::LastAdmin);
            }
        }
        sqlx::query("UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(to_ms(now))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(TokenRevocation::Revoked(Box::new(TokenRow {
            revoked_at: Some(now),
            ..row
        })))
    }

    /// Notes a token's last use (callers throttle this; it is not written per request).
    pub async fn touch_token(&self, id: &str, at: Timestamp) -> StoreResult<()> {
        sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE id = $2")
            .bind(to_ms(at))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::{any::AnyPoolOptions, migrate::Migrator};

    async fn exec(pool: &sqlx::AnyPool, sql: &str) {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(pool)
            .await
            .unwrap();
    }

    /// A store made before token ids were kept: owners the name proves are kept, ambiguous
    /// ones are nobody's, duplicate live names are made unique, and old tokens never expire.
    #[tokio::test]
    async fn migration_keeps_the_owners_it_is_sure_of_and_makes_live_names_unique() {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect(&super::super::sqlite_url(&path))
            .await
            .unwrap();
        let all = super::super::migrator();
        Migrator::with_migrations(all.iter().filter(|m| m.version < 9).cloned().collect())
            .run(&pool)
            .await
            .unwrap();
        for (id, name, at, revoked) in [
            ("a1", "alice", 1, "NULL"),
            ("a2", "alice", 2, "NULL"),
            ("a3", "alice", 3, "5"),
            ("b1", "bob", 1, "NULL"),
        ] {
            exec(&pool, &format!(
                "INSERT INTO api_tokens (id, name, role, secret_hash, created_at, created_by, revoked_at) \
                 VALUES ('{id}', '{name}', 'operator', 'h', {at}, 'admin', {revoked})"
            ))
            .await;
        }
        exec(&pool, "INSERT INTO appliances (id, app, customer, created_at, created_by) VALUES ('ap', 'shop', 'acme', 1, 'admin')").await;
        for (id, by) in [("g_alice", "alice"), ("g_bob", "bob")] {
            exec(&pool, &format!(
                "INSERT INTO grants (id, appliance_id, level, state, requested_by, reason, duration_ms, requested_at) \
                 VALUES ('{id}', 'ap', 'operate', 'active', '{by}', 'r', 1000, 1)"
            ))
            .await;
        }
        exec(&pool, "INSERT INTO endpoints (id, endpoint_type, appliance_id, resource_id, state, created_by, created_at, expires_at) \
                     VALUES ('ep_bob', 'tcp', 'ap', 'r', 'active', 'bob', 1, 2)").await;
        pool.close().await;

        let store = Store::open_sqlite(&path).await.unwrap();
        let names: Vec<(String, String)> = store
            .list_tokens()
            .await
            .unwrap()
            .into_iter()
            .map(|t| (t.id, t.name))
            .collect();
        assert!(names.contains(&("a1".into(), "alice".into())), "{names:?}");
        assert!(
            names.contains(&("a2".into(), "alice#a2".into())),
            "{names:?}"
        );
        assert!(names.contains(&("a3".into(), "alice".into())), "{names:?}");
        let b1 = store.get_token("b1").await.unwrap().unwrap();
        assert_eq!((b1.expires_at, b1.last_used_at), (None, None));
        let bob = store.get_grant("g_bob").await.unwrap().unwrap();
        assert_eq!(bob.requested_by_id.as_deref(), Some("b1"));
        let alice = store.get_grant("g_alice").await.unwrap().unwrap();
        assert_eq!(alice.requested_by_id, None);
        let ep = store.get_endpoint("ep_bob").await.unwrap().unwrap();
        assert_eq!(ep.created_by_id.as_deref(), Some("b1"));
    }
}
