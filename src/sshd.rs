//! A private OpenSSH `sshd` for tests: its own config, host key and authorized_keys in a temp
//! dir, a free loopback port, and a non-root login user. It stands in for the appliance's VM.
//!
//! sshd runs as root (the tests do) because only root can switch to the login user. Each
//! server has a login user of its own (`postern-ssh0`, `postern-ssh1`, …), held under an
//! exclusive lock for the server's life: an SSH endpoint's teardown ends every process of its
//! user, and tests run in parallel processes, so no two live servers may share one. The users
//! are created on first use; the password field is set to `*` (no password, but not locked:
//! sshd refuses locked accounts even for key logins). `StrictModes no` lets the
//! authorized_keys file live in the temp dir, which the user can read but does not own.
//! The server is killed by PID when the handle drops, and dies with the test process.

use crate::testbed::append_log;
use anyhow::{anyhow, bail, Context, Result};
use std::{
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The prefix of the private sshds' login users ([`Sshd::user`] is the one of a server). Never root.
pub const USER: &str = "postern-ssh";
/// How many login users a machine may have: the most servers alive at once.
const USER_POOL: usize = 64;

pub struct Sshd {
    pub addr: SocketAddr,
    /// The server's public host key line (`ssh-ed25519 AAAA… comment`).
    pub host_key: String,
    /// A private key authorized for `user` (what the appliance holds).
    pub client_key: PathBuf,
    pub user: String,
    pub log: PathBuf,
    dir: tempfile::TempDir,
    child: Child,
    /// The lock that makes `user` this server's alone; released when the server drops.
    _user_lock: std::fs::File,
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An ed25519 key pair at `path` / `path.pub`; returns the public line.
pub fn keygen(path: &Path, comment: &str) -> Result<String> {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path))?;
    Ok(std::fs::read_to_string(path.with_extension("pub"))?
        .trim()
        .to_string())
}

fn flock(file: &std::fs::File, how: libc::c_int) -> bool {
    // SAFETY: flock on a file descriptor we own; released when `file` closes.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(file), how) == 0 }
}

/// Claims a login user no other live server has (an exclusive lock per user name, held by the
/// returned file) and creates it if needed. Tests run in parallel processes, so creation is
/// serialised with an exclusive lock on one more file.
fn claim_user() -> Result<(String, std::fs::File)> {
    let open = |path: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
    };
    for n in 0..USER_POOL {
        let held = open(&format!("/tmp/postern-sshd-user-{n}.lock"))?;
        if !flock(&held, libc::LOCK_EX | libc::LOCK_NB) {
            continue;
        }
        let user = format!("{USER}{n}");
        let create = open("/tmp/postern-sshd-user.lock")?;
        if !flock(&create, libc::LOCK_EX) {
            bail!(
                "cannot lock /tmp/postern-sshd-user.lock: {}",
                std::io::Error::last_os_error()
            );
        }
        let exists = Command::new("id")
            .arg(&user)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        if !exists {
            run(Command::new("useradd").args(["--create-home", "--shell", "/bin/bash", &user]))?;
        }
        // Unlocked without a usable password: key logins only.
        run(Command::new("usermod").args(["-p", "*", &user]))?;
        return Ok((user, held));
    }
    bail!("all {USER_POOL} private sshd login users are in use")
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// True once something on `addr` speaks SSH.
fn banner_ready(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 8];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-2.0-"
}

impl Sshd {
    pub fn start() -> Result<Sshd> {
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "the private sshd needs root (to switch to its login user); the tests run as root"
            );
        }
        let sshd = ["/usr/sbin/sshd", "/usr/local/sbin/sshd"].into_iter().map(PathBuf::from).find(|p| p.exists()).ok_or_else(|| {
            anyhow!("sshd not found; install OpenSSH's server (Debian: apt-get install openssh-server; scripts/test does this)")
        })?;
        let (user, user_lock) = claim_user()?;
        // Privilege separation directory Debian's sshd insists on.
        std::fs::create_dir_all("/run/sshd")?;
        let dir = tempfile::Builder::new().prefix("postern-sshd-").tempdir()?;
        // The login user reads authorized_keys (sshd drops to the user to read it).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let host_key_path = dir.path().join("host_ed25519");
        let host_key = keygen(&host_key_path, "postern-test-sshd")?;
        let client_key = dir.path().join("appliance_ed25519");
        let client_pub = keygen(&client_key, "postern-appliance")?;
        let authorized = dir.path().join("authorized_keys");
        std::fs::write(&authorized, format!("{client_pub}\n"))?;
        std::fs::set_permissions(&authorized, std::fs::Permissions::from_mode(0o644))?;
        let log = dir.path().join("sshd.log");
        let mut last_err = String::new();
        // The port is free when probed but another process may take it before sshd binds.
        for _ in 0..5 {
            let port = free_port()?;
            let config = dir.path().join("sshd_config");
            std::fs::write(
                &config,
                sshd_config(port, &host_key_path, &authorized, &user),
            )?;
            let mut cmd = Command::new(&sshd);
            cmd.args(["-D", "-e", "-f"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(append_log(&log)?);
            // SAFETY: prctl in the child before exec; async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            let mut child = cmd.spawn().context("starting sshd")?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!(
                        "sshd exited with {status}: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break;
                }
                if banner_ready(addr) {
                    return Ok(Sshd {
                        addr,
                        host_key,
                        client_key,
                        user,
                        log,
                        dir,
                        child,
                        _user_lock: user_lock,
                    });
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = format!("sshd did not answer on {addr} within 10 s");
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        bail!("could not start the private sshd: {last_err}")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A `known_hosts` file that trusts this server's host key, for direct `ssh` logins.
    pub fn known_hosts(&self) -> Result<PathBuf> {
        let p = self.dir.path().join("known_hosts");
        std::fs::write(
            &p,
            format!("[127.0.0.1]:{} {}\n", self.port(), self.host_key),
        )?;
        Ok(p)
    }

    /// Stock `ssh` straight to this server as its user with the appliance's key, host key
    /// pinned, no config file, no agent, no prompts. Append options and the command.
    pub fn ssh_direct(&self) -> Result<Command> {
        self.ssh_direct_with_key(&self.client_key)
    }

    /// [`Sshd::ssh_direct`] presenting `key` instead of the appliance's.
    pub fn ssh_direct_with_key(&self, key: &Path) -> Result<Command> {
        let mut cmd = Command::new("ssh");
        cmd.args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
        ])
        .arg(format!(
            "UserKnownHostsFile={}",
            self.known_hosts()?.display()
        ))
        .arg("-i")
        .arg(key)
        .args([
            "-p",
            &self.port().to_string(),
            "-l",
            &self.user,
            "127.0.0.1",
        ]);
        Ok(cmd)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn sshd_config(port: u16, host_key: &Path, authorized: &Path, user: &str) -> String {
    format!(
        "Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile none
AuthorizedKeysFile {authorized}
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
AllowUsers {user}
PrintMotd no
PrintLastLog no
MaxStartups 200:30:400
MaxSessions 100
Subsystem sftp internal-sftp
# The gateway must be what stops FOO (tests check it); LANG is allowed through.
AcceptEnv LANG FOO
LogLevel VERBOSE
",
        host_key = host_key.display(),
        authorized = authorized.display(),
    )
}

impl Drop for Sshd {
    fn drop(&mut self) {
        crate::testbed::terminate(&mut self.child, Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stock_ssh_logs_in_with_the_key_as_the_test_user() {
        let sshd = Sshd::start().unwrap();
        let out = sshd
            .ssh_direct()
            .unwrap()
            .args(["--", "id -un; echo $HOME; exit 7"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(7),
            "stderr: {} log: {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&sshd.log).unwrap_or_default()
        );
        assert_eq!(stdout.lines().next(), Some(sshd.user.as_str()));
        // Two live servers never share a login user.
        let other_server = Sshd::start().unwrap();
        assert_ne!(other_server.user, sshd.user);
        // A key that is not authorized is refused.
        let other = sshd.dir().join("other_ed25519");
        keygen(&other, "stranger").unwrap();
        let mut cmd = sshd.ssh_direct_with_key(&other).unwrap();
        cmd.arg("true");
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(255));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
