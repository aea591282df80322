//! The processes `postern dev` starts: each dies with it (`PR_SET_PDEATHSIG`) and is ended by
//! its own PID, never by name, with a grace time before SIGKILL.

use std::{process::ExitStatus, time::Duration};
use tokio::process::{Child, Command};

/// A process `postern dev` started and must end.
pub struct DemoProcess {
    pub name: &'static str,
    child: Child,
    /// The signal that ends it cleanly (postgres: SIGINT, a fast shutdown).
    stop_signal: libc::c_int,
}

/// Asks the kernel to send `signal` to the child when `postern dev` dies, so a killed
/// `postern dev` leaves nothing behind either.
pub fn die_with_parent(cmd: &mut Command, signal: libc::c_int) -> &mut Command {
    // SAFETY: only prctl, an async-signal-safe call, runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

impl DemoProcess {
    pub fn spawn(
        name: &'static str,
        cmd: &mut Command,
        stop_signal: libc::c_int,
    ) -> std::io::Result<DemoProcess> {
        die_with_parent(cmd, stop_signal);
        let child = cmd.kill_on_drop(true).spawn()?;
        Ok(DemoProcess {
            name,
            child,
            stop_signal,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// `Some` once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Its stop signal, then SIGKILL if it is still there after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling our own child, which has not been reaped (id() is Some).
            unsafe { libc::kill(pid as libc::pid_t, self.stop_signal) };
            if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
                return;
            }
            tracing::warn!(process = self.name, pid, "did not stop in time; killing it");
        }
        let _ = self.child.kill().await;
    }
}
