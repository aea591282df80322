//! Starting an op's tool without forking the agent.
//!
//! The steps an op's process takes before it becomes the tool (join the op's cgroup, drop to
//! the op user, `no_new_privs`; see [`crate::op_sandbox`]) cannot run in a `pre_exec` hook
//! without making the standard library `fork` the whole agent: every page table copied, then
//! torn down again by the child's `exec`, which costs in proportion to the agent's memory (with
//! a thousand agents in one process, as `scale_bench` runs them, it was most of an op's time).
//! So when the agent knows a launcher (`postern-agent` names its own executable), it starts
//! that with `posix_spawn` (vfork-like: nothing is copied) in this hidden mode; the launcher, a
//! fresh and small process, takes the same steps and `execve`s the tool in place, so the tool
//! keeps the launcher's pid, process group and cgroup.
//!
//! A step that fails is reported to the agent through a status pipe passed as the launcher's
//! stdin (which the launcher then points at `/dev/null`, the tool's stdin): four bytes of
//! `errno`, or nothing when the `execve` succeeded and closed the pipe (close-on-exec). The
//! agent turns that into the same spawn error a failed `pre_exec` gives, never into the tool's
//! exit status.

use std::{
    ffi::{OsStr, OsString},
    io,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, process::CommandExt},
    },
    path::Path,
    process::Stdio,
    time::Duration,
};
use tokio::io::AsyncReadExt;

/// The hidden first argument that makes the agent's executable a launcher.
pub const LAUNCH_ARG: &str = "__postern-op-launch";
/// Stands for "no cgroup" / "no user switch" in the launcher's arguments.
const NONE: &str = "-";
/// How long the agent waits to hear whether the tool started; the launcher takes a few system
/// calls, so only a wedged machine reaches it.
const START_WAIT: Duration = Duration::from_secs(30);
/// The launcher's exit status when it could not start the tool (as a shell's for "cannot run").
const LAUNCH_FAILED: i32 = 127;

/// What the launcher must do before it becomes the tool.
#[derive(Debug, Clone, Default)]
pub struct LaunchSteps<'a> {
    /// The op cgroup's `cgroup.procs`, joined while still privileged.
    pub cgroup_procs: Option<&'a Path>,
    /// (uid, gid) to drop to for good.
    pub user: Option<(u32, u32)>,
}

/// A command that starts `exe` through `launcher` after `steps`; the caller adds the tool's
/// arguments, environment, working directory and output pipes. Its stdin is the status pipe:
/// keep the returned read end, and drop the command right after spawning it, or the pipe never
/// reports the `execve`.
pub fn command(
    launcher: &Path,
    exe: &Path,
    steps: &LaunchSteps<'_>,
) -> io::Result<(tokio::process::Command, OwnedFd)> {
    let (read, write) = status_pipe()?;
    let mut cmd = tokio::process::Command::new(launcher);
    cmd.arg(LAUNCH_ARG)
        .arg(steps.cgroup_procs.map_or(OsStr::new(NONE), Path::as_os_str))
        .arg(match steps.user {
            Some((uid, gid)) => format!("{uid}:{gid}"),
            None => NONE.to_string(),
        })
        .arg(exe)
        .stdin(Stdio::from(write));
    Ok((cmd, read))
}

fn status_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into `fds`; both close on exec in the agent.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Waits until the launcher became the tool (`Ok`) or reports the step that failed (its
/// `errno` as the error).
pub async fn started(status: OwnedFd) -> io::Result<()> {
    let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(status)?;
    let mut report = [0u8; 4];
    let mut got = 0;
    let read = async {
        while got < report.len() {
            match rx.read(&mut report[got..]).await? {
                0 => break,
                n => got += n,
            }
        }
        io::Result::Ok(())
    };
    tokio::time::timeout(START_WAIT, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the op launcher did not report"))??;
    match got {
        0 => Ok(()),
        4 => Err(io::Error::from_raw_os_error(i32::from_ne_bytes(report))),
        _ => Err(io::Error::other("the op launcher's report was cut short")),
    }
}

/// At the very start of the agent's `main`: when the process was started as a launcher, takes
/// the steps and becomes the tool; never returns then. Otherwise returns at once.
pub fn run_if_invoked() {
    let mut args = std::env::args_os();
    if args.nth(1).as_deref() != Some(OsStr::new(LAUNCH_ARG)) {
        return;
    }
    let rest: Vec<OsString> = args.collect();
    // SAFETY: fcntl and open/dup2/close on fds this fresh, single-threaded process owns. The
    // status pipe moves off stdin (close-on-exec, so a successful execve closes it) and the
    // tool's stdin becomes /dev/null.
    let status = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3) };
    if status < 0 {
        std::process::exit(LAUNCH_FAILED);
    }
    let err = match null_stdin().and_then(|()| launch(&rest)) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    let errno = err.raw_os_error().unwrap_or(libc::EINVAL).to_ne_bytes();
    // SAFETY: write(2) of a 4-byte buffer to the status fd.
    unsafe { libc::write(status, errno.as_ptr().cast(), errno.len()) };
    std::process::exit(LAUNCH_FAILED);
}

fn null_stdin() -> io::Result<()> {
    // SAFETY: plain syscalls on a path literal and fds this process owns.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if null < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = libc::dup2(null, 0);
        libc::close(null);
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `[cgroup.procs or -, uid:gid or -, exe, args…]`: takes the steps, then execs; returns only
/// the error that stopped it.
fn launch(args: &[OsString]) -> io::Result<std::convert::Infallible> {
    let [cgroup, user, exe, tool_args @ ..] = args else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let procs = match cgroup.as_os_str() {
        c if c == NONE => None,
        c => Some(OwnedFd::from(
            std::fs::OpenOptions::new().write(true).open(c)?,
        )),
    };
    let user = match user.as_bytes() {
        b"-" => None,
        spec => Some(parse_user(spec).ok_or(io::Error::from_raw_os_error(libc::EINVAL))?),
    };
    use std::os::fd::AsRawFd;
    crate::op_sandbox::child_setup(procs.as_ref().map(AsRawFd::as_raw_fd), user)?;
    drop(procs);
    // The environment, working directory, process group and output pipes are the agent's
    // choice, already in place; exec keeps them.
    Err(std::process::Command::new(exe).args(tool_args).exec())
}

fn parse_user(spec: &[u8]) -> Option<(u32, u32)> {
    let text = std::str::from_utf8(spec).ok()?;
    let (uid, gid) = text.split_once(':')?;
    Some((uid.parse().ok()?, gid.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_specs_parse_or_are_refused() {
        assert_eq!(parse_user(b"1000:1001"), Some((1000, 1001)));
        for bad in [&b"1000"[..], b"a:b", b"1:", b":1", b"1:2:3", b"-1:2"] {
            assert_eq!(parse_user(bad), None, "{bad:?}");
        }
    }
}
