//! A throwaway PostgreSQL cluster for tests: `initdb` into a temp dir, `postgres` on a free
//! loopback port, trust auth for user `postern`, one database per test.
//!
//! [`shared()`] hands out one cluster to every test that runs at the same time and stops it
//! when the last of them drops its handle (so a test binary never leaves a server behind when
//! it exits normally). The server is a child of a helper thread with `PR_SET_PDEATHSIG`, so it
//! also goes when the test process is killed; data dirs left by killed runs are swept on the
//! next start. Server binaries: `$POSTERN_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`
//! (Debian's `postgresql` package), else `initdb`/`postgres` on `PATH`. As root, `initdb` and
//! `postgres` run as the `postgres` user (they refuse to run as root).

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicI32, AtomicU32, Ordering},
        mpsc, Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

const USER: &str = "postern";
const DIR_PREFIX: &str = "postern-pg-";

pub struct PgCluster {
    port: u16,
    dir: PathBuf,
    /// The postmaster's pid; 0 while [`PgCluster::stop`] has it stopped.
    pid: AtomicI32,
    exited: Mutex<mpsc::Receiver<()>>,
    /// The server's extra settings, for [`PgCluster::restart`].
    extra: Vec<String>,
}

// Process-wide on purpose (test harness only, never in a product binary): the tests running in
// one process share one PostgreSQL, as starting one per test costs seconds; the number keeps
// their databases apart.
static CURRENT: Mutex<Weak<PgCluster>> = Mutex::new(Weak::new());
static DB_SEQ: AtomicU32 = AtomicU32::new(0);

/// The cluster the tests running now share, started if there is none.
pub fn shared() -> Arc<PgCluster> {
    let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = cur.upgrade() {
        return c;
    }
    let c = Arc::new(PgCluster::start());
    *cur = Arc::downgrade(&c);
    c
}

fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("POSTERN_PG_BIN") {
        let d = PathBuf::from(d);
        assert!(
            d.join("initdb").exists(),
            "POSTERN_PG_BIN={} has no initdb",
            d.display()
        );
        return d;
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
        return bin;
    }
    if let Some(dir) = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .find(|d| d.join("initdb").exists())
    {
        return dir;
    }
    panic!(
        "PostgreSQL server binaries not found: the PostgreSQL store tests need initdb and postgres \
         (looked in $POSTERN_PG_BIN, /usr/lib/postgresql/*/bin and PATH). Install them \
         (Debian: `apt-get install postgresql`; scripts/test does this) and run the tests again."
    );
}

/// uid and gid of the `postgres` user, when running as root.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("reading /etc/passwd");
    let ids = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == "postgres").then(|| (f[2].parse().ok(), f[3].parse().ok()))
    });
    match ids {
        Some((Some(uid), Some(gid))) => Some((uid, gid)),
        _ => panic!(
            "running as root, and initdb refuses root, but there is no `postgres` user to run the \
             throwaway PostgreSQL cluster as (Debian's postgresql package creates it)"
        ),
    }
}

fn as_user(cmd: &mut Command, ids: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Removes data dirs of test processes that no longer exist (killed runs).
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|r| r.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The child gets `signal` when the thread that spawns it exits (with the test process, too).
fn die_with_parent(cmd: &mut Command, signal: libc::c_int) -> &mut Command {
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        })
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free port")
        .port()
}

/// How to set up a cluster of one's own ([`PgCluster::start_with`]).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Roles other than `postern` log in with SCRAM-SHA-256 over TCP (as a real server would
    /// make an application role do); `postern` keeps trust.
    pub scram_for_others: bool,
    /// `ssl = on` with this server certificate chain and key (PEM).
    pub tls: Option<(String, String)>,
    /// With `tls`: every TCP login must be encrypted (`hostssl` only), as on a managed
    /// database that forces TLS.
    pub tls_only: bool,
}

impl PgCluster {
    fn start() -> PgCluster {
        Self::start_with(&Options::default())
    }

    /// A cluster of its own (not shared), set up as `opts` says; stopped when dropped.
    pub fn start_with(opts: &Options) -> PgCluster {
        let bin = bin_dir();
        let ids = run_as();
        sweep_stale();
        // Process-wide on purpose: names this process's clusters apart.
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir(&dir).expect("creating the cluster dir");
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .expect("chown of the cluster dir to postgres");
        }
        let data = dir.join("data");
        let out = die_with_parent(
            as_user(&mut Command::new(bin.join("initdb")), ids),
            libc::SIGKILL,
        )
        .current_dir(&dir)
        .args([
            "--auth=trust",
            "-U",
            USER,
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
            "-D",
        ])
        .arg(&data)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.join("initdb").display()));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let mut extra: Vec<String> = Vec::new();
        let own = |path: &Path, mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            if let Some((uid, gid)) = ids {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to postgres");
            }
        };
        if opts.scram_for_others || opts.tls_only {
            let hba = data.join("pg_hba.conf");
            let host = if opts.tls_only { "hostssl" } else { "host" };
            let others = if opts.scram_for_others {
                "scram-sha-256"
            } else {
                "trust"
            };
            std::fs::write(
                &hba,
                format!("local all all trust\n{host} all {USER} 127.0.0.1/32 trust\n{host} all all 127.0.0.1/32 {others}\n"),
            )
            .expect("writing pg_hba.conf");
            own(&hba, 0o600);
        }
        if let Some((cert, key)) = &opts.tls {
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = data.join(name);
                std::fs::write(&path, pem).expect("writing the server's TLS files");
                own(&path, 0o600);
            }
            extra.extend(
                [
                    "-c",
                    "ssl=on",
                    "-c",
                    "ssl_cert_file=server.crt",
                    "-c",
                    "ssl_key_file=server.key",
                ]
                .map(String::from),
            );
        }

        for _attempt in 0..5 {
            let port = free_port();
            let log = dir.join(format!("log-{port}"));
            let (pid, exited) = spawn_server(&bin, ids, &dir, &data, port, &log, &extra);
            let cluster = PgCluster {
                port,
                dir: dir.clone(),
                pid: AtomicI32::new(pid),
                exited: Mutex::new(exited),
                extra: extra.clone(),
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let ready = std::fs::read_to_string(data.join("postmaster.pid"))
                    .map(|s| s.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
                    .unwrap_or(false);
                if ready {
                    return cluster;
                }
                let gone = cluster
                    .exited
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .try_recv()
                    .is_ok();
                let log_text = std::fs::read_to_string(&log).unwrap_or_default();
                if gone {
                    if log_text.contains("could not bind") || log_text.contains("could not create")
                    {
                        std::mem::forget(cluster); // already stopped; keep the dir for the retry
                        break; // port taken meanwhile: try another
                    }
                    panic!("postgres exited while starting:\n{log_text}");
                }
                assert!(
                    Instant::now() < deadline,
                    "postgres did not become ready in 60 s:\n{log_text}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!(
            "postgres could not bind a free port in 5 attempts (see {})",
            dir.display()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs one SQL statement with `psql` against a database URL of this cluster (e.g. to
    /// tamper with a record the way an attacker with database access could).
    pub fn psql(&self, url: &str, sql: &str) -> String {
        let out = self.try_psql(url, sql);
        match out {
            Ok(s) => s,
            Err(e) => panic!("psql failed: {e}"),
        }
    }

    /// Like [`psql`](Self::psql), returning stderr as the error instead of panicking.
    pub fn try_psql(&self, url: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(bin_dir().join("psql"))
            .args([url, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()
            .unwrap_or_else(|e| panic!("running psql: {e}"));
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The directory of the server binaries (psql, pgbench) this cluster runs.
    pub fn bin_dir() -> PathBuf {
        bin_dir()
    }

    /// A new empty database for one test; returns its URL.
    pub fn create_database(&self, hint: &str) -> String {
        let clean: String = hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let name = format!("t{}_{clean}", DB_SEQ.fetch_add(1, Ordering::Relaxed));
        let out = Command::new(bin_dir().join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                &name,
            ])
            .output()
            .unwrap_or_else(|e| panic!("running createdb: {e}"));
        assert!(
            out.status.success(),
            "createdb {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(&name)
    }
}

/// Starts `postgres` from a helper thread that waits for it, so the server's parent thread
/// lives exactly as long as the server; the server gets SIGINT (fast shutdown) when that
/// thread, i.e. the test process, dies.
fn spawn_server(
    bin: &Path,
    ids: Option<(u32, u32)>,
    dir: &Path,
    data: &Path,
    port: u16,
    log: &Path,
    extra: &[String],
) -> (i32, mpsc::Receiver<()>) {
    let log_file = std::fs::File::create(log).expect("creating the server log");
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(log, Some(uid), Some(gid)).expect("chown of the server log");
    }
    let mut cmd = Command::new(bin.join("postgres"));
    as_user(&mut cmd, ids)
        .current_dir(dir)
        .arg("-D")
        .arg(data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(dir)
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
        ])
        .args([
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=32MB",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log handle"))
        .stderr(log_file);
    die_with_parent(&mut cmd, libc::SIGINT);
    let (pid_tx, pid_rx) = mpsc::channel();
    let (exit_tx, exit_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("postgres-{port}"))
        .spawn(move || match cmd.spawn() {
            Ok(mut child) => {
                let _ = pid_tx.send(Ok(child.id() as i32));
                let _ = child.wait();
                let _ = exit_tx.send(());
            }
            Err(e) => {
                let _ = pid_tx.send(Err(e));
            }
        })
        .expect("spawning the server thread");
    let pid = pid_rx
        .recv()
        .expect("server thread")
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.join("postgres").display()));
    (pid, exit_rx)
}

impl PgCluster {
    /// Stops the server as an outage would (fast shutdown: its sessions end, new connections
    /// are refused) and keeps its data; [`PgCluster::restart`] brings it back on the same
    /// port. For a cluster of one's own ([`PgCluster::start_with`]), not the shared one.
    pub fn stop(&self) {
        let exited = self.exited.lock().unwrap_or_else(|e| e.into_inner());
        let pid = self.pid.swap(0, Ordering::SeqCst);
        if pid <= 0 {
            return;
        }
        // SAFETY: signalling our own child, which has not been waited for yet.
        unsafe { libc::kill(pid, libc::SIGINT) };
        if exited.recv_timeout(Duration::from_secs(20)).is_err() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = exited.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Starts a stopped server again on its port and data, and waits until it is ready.
    pub fn restart(&self) {
        assert_eq!(
            self.pid.load(Ordering::SeqCst),
            0,
            "restart of a running cluster"
        );
        let data = self.dir.join("data");
        let log = self.dir.join(format!("log-{}-restarted", self.port));
        let (pid, exited) = spawn_server(
            &bin_dir(),
            run_as(),
            &self.dir,
            &data,
            self.port,
            &log,
            &self.extra,
        );
        self.pid.store(pid, Ordering::SeqCst);
        *self.exited.lock().unwrap_or_else(|e| e.into_inner()) = exited;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = std::fs::read_to_string(data.join("postmaster.pid"))
                .map(|s| s.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
                .unwrap_or(false);
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not come back in 60 s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
