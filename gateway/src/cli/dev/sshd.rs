//! The demo appliance's VM: a private OpenSSH `sshd` on a free loopback port with its own
//! config, host key and authorized_keys in the run dir, and the non-root login user
//! `postern-demo` (created on first use, key logins only). sshd must run as root to switch
//! to that user, so without root it is skipped.

use super::process::DemoProcess;
use anyhow::{bail, Context, Result};
use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::{io::AsyncReadExt, process::Command};

pub const USER: &str = "postern-demo";
const INSTALL: &str = "install OpenSSH's server (Debian: apt-get install openssh-server)";

pub struct DemoSshd {
    pub process: DemoProcess,
    pub addr: SocketAddr,
    /// The server's public host key line, which the agent pins.
    pub host_key: String,
    /// The private key the appliance logs in with.
    pub client_key: PathBuf,
}

fn find(names: &[&str]) -> Option<PathBuf> {
    names.iter().map(PathBuf::from).find(|p| p.exists())
}

/// sshd and ssh-keygen, when the user can run a private sshd. `Err` is the note for the user.
pub fn available() -> Result<(PathBuf, PathBuf), String> {
    let sshd = find(&["/usr/sbin/sshd", "/usr/local/sbin/sshd"])
        .ok_or_else(|| format!("no sshd found: {INSTALL}"))?;
    let keygen = find(&["/usr/bin/ssh-keygen", "/usr/local/bin/ssh-keygen"])
        .ok_or_else(|| format!("no ssh-keygen found: {INSTALL}"))?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "a private sshd must run as root to switch to its login user: run `postern dev` as root to try SSH endpoints"
                .into(),
        );
    }
    Ok((sshd, keygen))
}

async fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().await?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// An ed25519 key pair at `path` / `path.pub`; returns the public line.
async fn keygen(bin: &Path, path: &Path, comment: &str) -> Result<String> {
    run(Command::new(bin)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path))
    .await?;
    Ok(std::fs::read_to_string(path.with_extension("pub"))?
        .trim()
        .to_string())
}

/// The login user: created if missing; `*` as password (no password, but not locked: sshd
/// refuses locked accounts even for key logins).
async fn ensure_user() -> Result<()> {
    let exists = Command::new("id")
        .arg(USER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await?
        .success();
    if !exists {
        run(Command::new("useradd").args(["--create-home", "--shell", "/bin/bash", USER]))
            .await
            .context("creating the demo login user")?;
    }
    run(Command::new("usermod").args(["-p", "*", USER])).await
}

async fn speaks_ssh(addr: SocketAddr) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    else {
        return false;
    };
    let mut buf = [0u8; 8];
    matches!(
        tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && &buf == b"SSH-2.0-"
}

pub async fn start(sshd: &Path, keygen_bin: &Path, dir: &Path) -> Result<DemoSshd> {
    ensure_user().await?;
    // Privilege separation directory Debian's sshd insists on.
    std::fs::create_dir_all("/run/sshd")?;
    std::fs::create_dir_all(dir)?;
    // The login user reads authorized_keys from here.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let host_key_path = dir.join("host_ed25519");
    let host_key = keygen(keygen_bin, &host_key_path, "postern-dev-sshd").await?;
    let client_key = dir.join("appliance_ed25519");
    let client_pub = keygen(keygen_bin, &client_key, "postern-dev-appliance").await?;
    let authorized = dir.join("authorized_keys");
    std::fs::write(&authorized, format!("{client_pub}\n"))?;
    std::fs::set_permissions(&authorized, std::fs::Permissions::from_mode(0o644))?;
    let log = dir.join("sshd.log");
    for _ in 0..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = dir.join("sshd_config");
        std::fs::write(&config, sshd_config(port, &host_key_path, &authorized))?;
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(sshd);
        cmd.args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        let mut process =
            DemoProcess::spawn("sshd", &mut cmd, libc::SIGTERM).context("starting sshd")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        for _ in 0..100 {
            if process.exited().is_some() {
                break;
            }
            if speaks_ssh(addr).await {
                return Ok(DemoSshd {
                    process,
                    addr,
                    host_key,
                    client_key,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        process.stop(Duration::from_secs(2)).await;
    }
    bail!("sshd did not start; see {}", log.display())
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
Subsystem sftp internal-sftp
LogLevel VERBOSE
",
        host_key = host_key.display(),
        authorized = authorized.display(),
    )
}
