//! The read-only probes, one per resource kind. What they read is turned into the snapshot by
//! the pure functions of [`endpoint_types::steady_state`]; here is only the I/O.

use crate::{config::ResourceConfig, kube::Clusters, postgres::role::admin_config};
use endpoint_types::{
    resource::ResourceKind,
    steady_state::{
        add_pods, add_warnings, add_workloads, bounded_text, postgres_health, ssh_banner,
        HealthDetail, KubeHealth, PgStatsRow, ResourceHealth, SshHealth, TcpHealth,
    },
};
use jiff::{SignedDuration, Timestamp};
use std::time::Instant;
use tokio::{io::AsyncReadExt, net::TcpStream};

/// Warning events older than this are not "recent".
const WARNINGS_SINCE: SignedDuration = SignedDuration::from_hours(1);
/// The most bytes read while waiting for an SSH server's identification line.
const BANNER_MAX: usize = 512;
/// How long the VM facts command may take (the round is bounded by the interval too).
const VM_FACTS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Output kept from it: two `/proc` lines and a `df` row per path fit many times over.
const VM_FACTS_OUTPUT_MAX: usize = 16 * 1024;

/// Statistics only (no table is read): one read-only transaction.
const PG_STATS: &str = "BEGIN READ ONLY; \
SELECT version(), \
 (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::text, \
 current_setting('max_connections'), \
 pg_database_size(current_database())::text, \
 (SELECT extract(epoch FROM now() - min(xact_start)) FROM pg_stat_activity \
   WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() AND backend_type = 'client backend' \
   AND datname = current_database())::text, \
 COALESCE((SELECT extract(epoch FROM max(replay_lag)) FROM pg_stat_replication), \
   CASE WHEN pg_is_in_recovery() THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END)::text; \
COMMIT";

/// The application name the steady-state connection shows in `pg_stat_activity`.
pub const PG_APPLICATION_NAME: &str = "postern-steady-state";

/// Probes `r` as the steady-state phase sees it (`steady_state_identity`); `disk_paths` for
/// an SSH VM with a steady-state user.
pub async fn probe(
    r: &ResourceConfig,
    clusters: &Clusters,
    disk_paths: &[String],
) -> ResourceHealth {
    let collected_at = Timestamp::now();
    let outcome = match r.kind {
        ResourceKind::Tcp => tcp(r).await.map(|d| (d, None)),
        ResourceKind::Ssh => ssh(r, disk_paths).await,
        ResourceKind::Postgres => postgres(r).await.map(|d| (d, None)),
        ResourceKind::Kubernetes => kubernetes(r, clusters, collected_at).await,
        ResourceKind::Docker | ResourceKind::Cloud => Err(Probe::Unreachable(
            "not observed in steady-state".to_string(),
        )),
    };
    let (reachable, error, detail) = match outcome {
        Ok((detail, partial)) => (true, partial.map(|e| bounded_text(&e)), Some(detail)),
        Err(Probe::Unreachable(e)) => (false, Some(bounded_text(&e)), None),
        Err(Probe::Partial(e)) => (true, Some(bounded_text(&e)), None),
    };
    ResourceHealth {
        resource_id: r.id.clone(),
        kind: r.kind,
        collected_at,
        reachable,
        error,
        detail,
    }
}

enum Probe {
    Unreachable(String),
    /// Reached, but the statistics could not be read.
    Partial(String),
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

async fn connect(addr: Option<&str>) -> Result<(TcpStream, u64), Probe> {
    let addr = addr.ok_or_else(|| Probe::Unreachable("no address configured".into()))?;
    let started = Instant::now();
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Probe::Unreachable(format!("connect {addr}: {e}")))?;
    Ok((stream, millis(started)))
}

async fn tcp(r: &ResourceConfig) -> Result<HealthDetail, Probe> {
    let (_stream, connect_ms) = connect(r.target.as_deref()).await?;
    Ok(HealthDetail::Tcp(TcpHealth { connect_ms }))
}

/// Reachable and the banner; with a steady-state user, uptime, load and disk use too.
async fn ssh(
    r: &ResourceConfig,
    disk_paths: &[String],
) -> Result<(HealthDetail, Option<String>), Probe> {
    let HealthDetail::Ssh(mut health) = ssh_banner_probe(r).await? else {
        return Err(Probe::Partial("not an SSH probe".into()));
    };
    let steady_state_user = r
        .phases
        .as_ref()
        .and_then(|p| p.steady_state.as_ref())
        .and_then(|i| i.user.as_ref());
    if steady_state_user.is_none() {
        return Ok((HealthDetail::Ssh(health), None));
    }
    // `r` is the steady-state view already: its `user` is the steady-state user, logging in
    // with the resource's key and pinned host key (no other secret).
    let partial = match vm_facts(r, disk_paths).await {
        Ok(facts) => {
            health.vm = Some(facts);
            None
        }
        Err(e) => Some(e),
    };
    Ok((HealthDetail::Ssh(health), partial))
}

/// Runs the fixed read-only command of [`endpoint_types::vm_facts`] and keeps its numbers.
async fn vm_facts(
    r: &ResourceConfig,
    disk_paths: &[String],
) -> Result<endpoint_types::vm_facts::VmFacts, String> {
    let command = endpoint_types::vm_facts::remote_command(disk_paths);
    let mut spec = crate::ops::OpSpec::new(
        "steady-state",
        endpoint_types::control::OpTool::Ssh,
        command.clone(),
    );
    spec.timeout = VM_FACTS_TIMEOUT;
    spec.output_cap = VM_FACTS_OUTPUT_MAX;
    let never = tokio_util::sync::CancellationToken::new();
    let out = crate::op_ssh::run(&spec, r, &command, &never, None)
        .await
        .map_err(|e| format!("vm facts: {e}"))?;
    if out.timed_out {
        return Err("vm facts: no answer in time".into());
    }
    if out.exit_code != Some(0) {
        return Err(format!(
            "vm facts: the command exited with {:?}",
            out.exit_code
        ));
    }
    endpoint_types::vm_facts::parse(&String::from_utf8_lossy(&out.stdout), disk_paths)
        .map_err(|e| format!("vm facts: {e}"))
}

async fn ssh_banner_probe(r: &ResourceConfig) -> Result<HealthDetail, Probe> {
    let (mut stream, connect_ms) = connect(r.host.as_deref()).await?;
    let mut buf = Vec::with_capacity(BANNER_MAX);
    let mut chunk = [0u8; 256];
    while buf.len() < BANNER_MAX && !buf.contains(&b'\n') {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| Probe::Partial(format!("reading the banner: {e}")))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    let banner = ssh_banner(&buf).ok_or_else(|| Probe::Partial("no SSH banner".into()))?;
    Ok(HealthDetail::Ssh(SshHealth {
        connect_ms,
        banner,
        vm: None,
    }))
}

async fn postgres(r: &ResourceConfig) -> Result<HealthDetail, Probe> {
    let (mut config, tls) = admin_config(r).map_err(|e| Probe::Unreachable(e.to_string()))?;
    if let Some(db) = &r.database {
        config.dbname(db);
    }
    config.application_name(PG_APPLICATION_NAME);
    let (client, conn) = config
        .connect(tls.make_connect())
        .await
        .map_err(|e| Probe::Unreachable(e.to_string()))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = client.simple_query(PG_STATS).await;
    drop(client);
    let _ = driver.await;
    let messages = result.map_err(|e| {
        Probe::Partial(
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string()),
        )
    })?;
    let row = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .ok_or_else(|| Probe::Partial("no statistics row".into()))?;
    let col = |i: usize| row.try_get(i).ok().flatten().map(str::to_string);
    let stats = PgStatsRow {
        version: col(0),
        connections: col(1),
        max_connections: col(2),
        database_size_bytes: col(3),
        longest_transaction_s: col(4),
        replication_lag_s: col(5),
    };
    postgres_health(&stats)
        .map(HealthDetail::Postgres)
        .map_err(Probe::Partial)
}

/// `GET`s only, in the namespaces in scope: pods, deployments, statefulsets and events.
async fn kubernetes(
    r: &ResourceConfig,
    clusters: &Clusters,
    now: Timestamp,
) -> Result<(HealthDetail, Option<String>), Probe> {
    let namespaces = r.namespaces.clone().unwrap_or_default();
    if namespaces.is_empty() {
        return Err(Probe::Partial("no namespaces in scope".into()));
    }
    let mut health = KubeHealth {
        namespaces: namespaces.iter().map(|n| bounded_text(n)).collect(),
        ..KubeHealth::default()
    };
    let since = now - WARNINGS_SINCE;
    let mut failures = Vec::new();
    let mut reached = false;
    for ns in &namespaces {
        let pods = clusters
            .get_json(r, &format!("/api/v1/namespaces/{ns}/pods"))
            .await;
        match pods {
            Ok(list) => {
                reached = true;
                add_pods(&mut health, &list)
            }
            // Nothing answered yet: the cluster is not reachable at all.
            Err(e) if !reached => return Err(Probe::Unreachable(e)),
            Err(e) => failures.push(e),
        }
        for (kind, path) in [
            (
                "Deployment",
                format!("/apis/apps/v1/namespaces/{ns}/deployments"),
            ),
            (
                "StatefulSet",
                format!("/apis/apps/v1/namespaces/{ns}/statefulsets"),
            ),
        ] {
            match clusters.get_json(r, &path).await {
                Ok(list) => add_workloads(&mut health, kind, &list),
                Err(e) => failures.push(e),
            }
        }
        match clusters
            .get_json(r, &format!("/api/v1/namespaces/{ns}/events"))
            .await
        {
            Ok(list) => add_warnings(&mut health, &list, since),
            Err(e) => failures.push(e),
        }
    }
    // Partial data is still reported; the first failure says what is missing.
    Ok((
        HealthDetail::Kubernetes(health),
        failures.into_iter().next(),
    ))
}
