//! A private OpenSSH `sshd` for tests: its own config, host key and authorized_keys in a temp
//! dir, a free loopback port, and a non-root login user. It stands in for the appliance's VM.
//!
//! sshd runs as root (the tests do) because only root can switch to the login user. The user
//! (`postern-ssh`) is created on first use; its password field is set to `*` (no password, but
//! not locked: sshd refuses locked accounts even for key logins). `StrictModes no` lets the
//! authorized_keys file live in the temp dir, which the user can read but does not own.
//! The server is killed by PID when the handle drops, and dies with the test process.

use anyhow::{anyhow, bail, Context, Result};
use std::{
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The login user on the private sshd. Never root.
pub const USER: &str = "postern-ssh";

pub struct Sshd {
    pub addr: SocketAddr,
    /// The server's public host key line (`ssh-ed25519 AAAA… comment`).
    pub host_key: String,
    /// A private key authorized for [`USER`] (what the appliance holds).
    pub client_key: PathBuf,
    pub user: String,
    pub log: PathBuf,
    dir: tempfile::TempDir,
    child: Child,
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

/// Creates the login user once per machine. Tests run in parallel processes, so creation is
/// serialised with an exclusive lock on a file.
fn ensure_user() -> Result<()> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/postern-sshd-user.lock")?;
    // SAFETY: flock on a file descriptor we own; released when `lock` closes.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        bail!(
            "cannot lock /tmp/postern-sshd-user.lock: {}",
            std::io::Error::last_os_error()
        );
    }
    let exists = Command::new("id")
        .arg(USER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success();
    if !exists {
        run(Command::new("useradd").args(["--create-home", "--shell", "/bin/bash", USER]))?;
    }
    // Unlocked without a usable password: key logins only.
    run(Command::new("usermod").args(["-p", "*", USER]))?;
    Ok(())
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
            bail!("the private sshd needs root (to switch to user {USER}); the tests run as root");
        }
        let sshd = ["/usr/sbin/sshd", "/usr/local/sbin/sshd"].into_iter().map(PathBuf::from).find(|p| p.exists()).ok_or_else(|| {
            anyhow!("sshd not found; install OpenSSH's server (Debian: apt-get install openssh-server; scripts/test does this)")
        })?;
        ensure_user()?;
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
            std::fs::write(&config, sshd_config(port, &host_key_path, &authorized))?;
            let mut cmd = Command::new(&sshd);
            cmd.args(["-D", "-e", "-f"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)?,
                );
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
                        user: USER.to_string(),
                        log,
                        dir,
                        child,
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

    /// Stock `ssh` straight to this server as [`USER`] with the appliance's key, host key
    /// pinned, no config file, no agent, no prompts. Append options and the command.
    pub fn ssh_direct(&self) -> Result<Command> {
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
        .arg(&self.client_key)
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

fn sshd_config(port: u16, host_key: &Path, authorized: &Path) -> String {
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
AllowUsers {USER}
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
        assert_eq!(stdout.lines().next(), Some(USER));
        // A key that is not authorized is refused.
        let other = sshd.dir().join("other_ed25519");
        keygen(&other, "stranger").unwrap();
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
            sshd.known_hosts().unwrap().display()
        ))
        .arg("-i")
        .arg(&other)
        .args([
            "-p",
            &sshd.port().to_string(),
            "-l",
            USER,
            "127.0.0.1",
            "true",
        ]);
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(255));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
