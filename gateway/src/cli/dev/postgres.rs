//! The demo appliance's database: a throwaway PostgreSQL cluster (`initdb` in the run dir,
//! `postgres` on a free loopback port, trust auth for the local admin `postern`) holding a
//! database `demo` with a table `app.items`. As root, `initdb` and `postgres` run as the
//! `postgres` user, since both refuse root.

use super::process::DemoProcess;
use anyhow::{anyhow, bail, Context, Result};
use sqlx::Connection;
use std::{
    os::unix::fs::chown,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::process::Command;

const ADMIN: &str = "postern";
pub const DATABASE: &str = "demo";
const INSTALL: &str = "install PostgreSQL's server (Debian: apt-get install postgresql)";

pub struct DemoPostgres {
    pub process: DemoProcess,
    /// What the agent is given: the admin connection to `demo`.
    pub admin_url: String,
}

/// Server binaries: `$POSTERN_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin` (Debian
/// keeps them off PATH), else PATH. `Err` is the note saying what to install.
fn bin_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("POSTERN_PG_BIN") {
        let d = PathBuf::from(d);
        if !d.join("initdb").exists() || !d.join("postgres").exists() {
            return Err(format!(
                "POSTERN_PG_BIN={} has no initdb/postgres: {INSTALL}",
                d.display()
            ));
        }
        return Ok(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .find(|d| d.join("initdb").exists() && d.join("postgres").exists())
        .ok_or_else(|| format!("no initdb/postgres found: {INSTALL}"))
}

/// uid and gid of the `postgres` user when running as root (initdb refuses root).
fn run_as() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some("postgres")).then_some(())?;
            let uid = f.nth(1)?.parse().ok()?;
            let gid = f.next()?.parse().ok()?;
            Some(Some((uid, gid)))
        })
        .ok_or_else(|| {
            format!("running as root and initdb refuses root, but there is no `postgres` user to run it as: {INSTALL}")
        })
}

/// What is needed is present: the binaries and, as root, a user to run them as. `Err` is the
/// one-line note for the user.
pub fn available() -> Result<(PathBuf, Option<(u32, u32)>), String> {
    Ok((bin_dir()?, run_as()?))
}

fn as_user(cmd: &mut Command, ids: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn own(path: &Path, ids: Option<(u32, u32)>) -> Result<()> {
    if let Some((uid, gid)) = ids {
        chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown of {} to postgres", path.display()))?;
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `initdb`, `postgres`, and the demo database, in `dir` (a fresh directory of the run dir).
pub async fn start(bin: &Path, ids: Option<(u32, u32)>, dir: &Path) -> Result<DemoPostgres> {
    std::fs::create_dir_all(dir)?;
    own(dir, ids)?;
    let data = dir.join("data");
    let out = as_user(&mut Command::new(bin.join("initdb")), ids)
        .current_dir(dir)
        .args([
            "--auth=trust",
            "-U",
            ADMIN,
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
            "-D",
        ])
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", bin.join("initdb").display()))?;
    if !out.status.success() {
        bail!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let log = dir.join("postgres.log");
    let mut last = String::new();
    // The port was free when probed; another process may take it first, so a few tries.
    for _ in 0..3 {
        let port = free_port()?;
        let logf = std::fs::File::create(&log)?;
        own(&log, ids)?;
        let mut cmd = Command::new(bin.join("postgres"));
        as_user(&mut cmd, ids)
            .current_dir(dir)
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "shared_buffers=32MB", "-c", "max_connections=100"])
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let mut process =
            DemoProcess::spawn("postgres", &mut cmd, libc::SIGINT).context("starting postgres")?;
        let ready = wait_ready(&data, &mut process).await;
        last = std::fs::read_to_string(&log).unwrap_or_default();
        if !ready {
            process.stop(Duration::from_secs(5)).await;
            if last.contains("could not bind") {
                continue;
            }
            bail!(
                "postgres did not start (log {}): {}",
                log.display(),
                last.trim()
            );
        }
        let admin_url = format!("postgres://{ADMIN}@127.0.0.1:{port}/{DATABASE}");
        if let Err(e) = seed(port).await {
            process.stop(Duration::from_secs(5)).await;
            return Err(e);
        }
        return Ok(DemoPostgres { process, admin_url });
    }
    bail!("postgres found no free port: {}", last.trim())
}

/// Ready once the postmaster says so in its pid file (line 8); false if it exited or took
/// longer than 30 s.
async fn wait_ready(data: &Path, process: &mut DemoProcess) -> bool {
    for _ in 0..300 {
        let ready = std::fs::read_to_string(data.join("postmaster.pid"))
            .map(|s| s.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
            .unwrap_or(false);
        if ready {
            return true;
        }
        if process.exited().is_some() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The demo database: a schema `app` with a few rows the tour reads, and a schema `secret`
/// outside the endpoint's scope.
async fn seed(port: u16) -> Result<()> {
    let admin = |db: &str| format!("postgres://{ADMIN}@127.0.0.1:{port}/{db}");
    let mut conn = sqlx::PgConnection::connect(&admin("postgres"))
        .await
        .map_err(|e| anyhow!("connecting to the demo cluster: {e}"))?;
    sqlx::raw_sql("CREATE DATABASE demo")
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    let mut conn = sqlx::PgConnection::connect(&admin(DATABASE)).await?;
    sqlx::raw_sql(
        "CREATE SCHEMA app; \
         CREATE TABLE app.items (id serial PRIMARY KEY, name text NOT NULL); \
         INSERT INTO app.items (name) VALUES ('first'), ('second'); \
         CREATE SCHEMA secret; CREATE TABLE secret.keys (k text); \
         INSERT INTO secret.keys VALUES ('not for the vendor');",
    )
    .execute(&mut conn)
    .await?;
    conn.close().await?;
    Ok(())
}
