//! The first page of a long vendor trail: a gateway whose store holds `records` audit records
//! (seeded straight into the table with one bulk insert while the gateway is stopped; the seeded
//! records are not a valid hash chain, which listing does not need), timed on `GET /v1/audit`
//! (the first page, default limit 1000, what `postern audit list --limit 1000` asks for) over a
//! kept-alive connection, and with the CLI itself. The gateway's RSS is read before and after:
//! a page costs the same memory whatever the trail's length.

use super::{percentile, round, rss_settled, Api, ApiTarget};
use anyhow::{bail, Context, Result};
use postern::testbed::Gateway;
use serde_json::{json, Value};
use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};
use tokio::runtime::Runtime;

/// Repeats of each timed call after the first, for a steady-state median.
const REPEATS: usize = 10;

pub struct AuditFigures {
    records: u64,
    seed_s: f64,
    /// The first call after the restart.
    first_page_ms: f64,
    /// Median of the calls after it.
    first_page_p50_ms: f64,
    /// A page at the far end of the trail (`after_seq` near the last record).
    last_page_ms: f64,
    /// One appliance's first page (served by the appliance index).
    appliance_page_ms: f64,
    cli_ms: f64,
    rss_before_kib: u64,
    rss_after_kib: u64,
}

impl AuditFigures {
    /// One line for the progress log, so the figures survive a later failure of the run.
    pub fn summary(&self) -> String {
        format!(
            "first page {:.1} ms (again: {:.1} ms), last page {:.1} ms, one appliance {:.1} ms, CLI {:.1} ms; gateway RSS {} -> {} KiB",
            self.first_page_ms,
            self.first_page_p50_ms,
            self.last_page_ms,
            self.appliance_page_ms,
            self.cli_ms,
            self.rss_before_kib,
            self.rss_after_kib
        )
    }

    pub fn put(&self, put: &mut impl FnMut(&str, Value)) {
        put("audit_records", json!(self.records));
        put("audit_seed_s", json!(round(self.seed_s, 1)));
        put("audit_first_page_ms", json!(round(self.first_page_ms, 1)));
        put(
            "audit_first_page_p50_ms",
            json!(round(self.first_page_p50_ms, 1)),
        );
        put("audit_last_page_ms", json!(round(self.last_page_ms, 1)));
        put(
            "audit_appliance_page_ms",
            json!(round(self.appliance_page_ms, 1)),
        );
        put("audit_first_page_cli_ms", json!(round(self.cli_ms, 1)));
        put("audit_rss_before_kib", json!(self.rss_before_kib));
        put("audit_rss_after_kib", json!(self.rss_after_kib));
    }
}

/// `store`: None for SQLite in the data dir, or a PostgreSQL URL of an empty database.
pub fn measure(
    client: &Runtime,
    root: &Path,
    store: Option<&str>,
    records: u64,
) -> Result<AuditFigures> {
    let dir = root.join("gw-audit");
    let mut gw = match store {
        None => Gateway::start(&dir)?,
        Some(url) => Gateway::start_with_store(&dir, url)?,
    };
    let (api, relay) = (gw.api, gw.relay);
    gw.stop();
    let url = match store {
        Some(url) => url.to_string(),
        None => format!("sqlite://{}", dir.join("postern.db").display()),
    };
    let t0 = Instant::now();
    client
        .block_on(seed(&url, records))
        .context("seeding the audit trail")?;
    let seed_s = t0.elapsed().as_secs_f64();
    eprintln!("scale_bench:   {records} records seeded in {seed_s:.1} s");

    let gw = match store {
        None => Gateway::start_on(&dir, api, relay)?,
        Some(url) => Gateway::start_on_with_store(&dir, api, relay, url)?,
    };
    thread::sleep(Duration::from_secs(1));
    let rss_before_kib = rss_settled(gw.pid())?;
    let target = ApiTarget::of(&gw)?;
    let (first, rest, last, appliance) = client.block_on(async {
        let mut api = Api::new(&target);
        api.get("/v1/whoami").await?;
        let (first, page) = timed(&mut api, "/v1/audit").await?;
        let recs = page["records"].as_array().map_or(0, Vec::len);
        let next = page["next_after_seq"].as_i64();
        if recs != 1000 || next.is_none() {
            bail!("the first page has {recs} records, next_after_seq {next:?}");
        }
        let mut rest = Vec::with_capacity(REPEATS);
        for _ in 0..REPEATS {
            rest.push(timed(&mut api, "/v1/audit").await?.0);
        }
        rest.sort_by(|a, b| a.total_cmp(b));
        let tail = records.saturating_sub(500);
        let (last, _) = timed(&mut api, &format!("/v1/audit?after_seq={tail}")).await?;
        let (appliance, page) = timed(&mut api, "/v1/audit?appliance=seed-app-7").await?;
        if page["records"].as_array().is_none_or(Vec::is_empty) {
            bail!("no records for one seeded appliance: {page}");
        }
        anyhow::Ok((first, rest, last, appliance))
    })?;
    let t0 = Instant::now();
    let cli = gw.cli(&["audit", "list", "--limit", "1000"])?.ok()?;
    let cli_ms = t0.elapsed().as_secs_f64() * 1000.0;
    if cli["records"].as_array().map_or(0, Vec::len) != 1000 {
        bail!("`audit list --limit 1000` did not print 1000 records");
    }
    let rss_after_kib = rss_settled(gw.pid())?;
    Ok(AuditFigures {
        records,
        seed_s,
        first_page_ms: first,
        first_page_p50_ms: percentile(&rest, 50.0),
        last_page_ms: last,
        appliance_page_ms: appliance,
        cli_ms,
        rss_before_kib,
        rss_after_kib,
    })
}

async fn timed(api: &mut Api, path: &str) -> Result<(f64, Value)> {
    let t0 = Instant::now();
    let v = api.get(path).await?;
    Ok((t0.elapsed().as_secs_f64() * 1000.0, v))
}

/// Appends `n` records after the last one in the store, with one statement.
async fn seed(url: &str, n: u64) -> Result<()> {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let sqlite = url.starts_with("sqlite:");
    let base: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM audit_log")
        .fetch_one(&mut conn)
        .await?;
    // Seeded times end an hour before now, one record every 10 ms.
    let start = jiff::Timestamp::now().as_second() - 3600 - (n / 100) as i64;
    // Kubernetes requests spread over 1000 appliances and 5000 endpoints, ~120 bytes of detail.
    let sql = if sqlite {
        format!(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) \
             INSERT INTO audit_log (seq, time, kind, actor, appliance_id, endpoint_id, session_id, op_id, detail, prev_hash, hash) \
             SELECT {base} + x, \
                    strftime('%Y-%m-%dT%H:%M:%fZ', {start} + x / 100.0, 'unixepoch'), \
                    'kube.request', 'operator:bench', 'seed-app-' || (x % 1000), 'seed-ep-' || (x % 5000), \
                    'seed-session-' || (x % 20000), NULL, \
                    '{{\"verb\":\"get\",\"resource\":\"pods\",\"namespace\":\"default\",\"status\":200,\"n\":' || x || '}}', \
                    printf('%064d', x - 1), printf('%064d', x) \
             FROM c"
        )
    } else {
        format!(
            "INSERT INTO audit_log (seq, time, kind, actor, appliance_id, endpoint_id, session_id, op_id, detail, prev_hash, hash) \
             SELECT {base} + x, \
                    to_char(to_timestamp({start} + x / 100.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                    'kube.request', 'operator:bench', 'seed-app-' || (x % 1000), 'seed-ep-' || (x % 5000), \
                    'seed-session-' || (x % 20000), NULL, \
                    '{{\"verb\":\"get\",\"resource\":\"pods\",\"namespace\":\"default\",\"status\":200,\"n\":' || x || '}}', \
                    lpad((x - 1)::text, 64, '0'), lpad(x::text, 64, '0') \
             FROM generate_series(1, {n}) AS x"
        )
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await?;
    if sqlite {
        // Fold the WAL into the database file, as a gateway that ran this long would have.
        sqlx::raw_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await?;
    } else {
        sqlx::raw_sql("ANALYZE audit_log")
            .execute(&mut conn)
            .await?;
    }
    conn.close().await?;
    Ok(())
}
