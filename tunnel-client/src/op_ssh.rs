//! `ssh` ops: the agent itself logs in to the VM (the russh client of [`crate::ssh`], the
//! resource's user and key, the VM's pinned host key) and runs the op's remote command. No
//! local `ssh` program runs, so nothing in the command can reach the appliance: OpenSSH
//! options (`-o ProxyCommand=…`, `-F`, `-J`, `-W`, `-L`, `-R`, `-D`, any word starting with
//! `-` before the command) are refused, and the destination is always the resource.
//!
//! The command is the words after `ssh` (`--command "ssh uptime"`, `"ssh ls -la /var/log"`),
//! each passed to the VM's shell single-quoted, so the remote program gets exactly those words
//! (unlike OpenSSH, which joins them with spaces for the remote shell to split again).

use crate::{
    config::ResourceConfig,
    ops::{OpOutcome, OpSpec, Stream},
    ssh::{client_config, parse_host_key, Pinned},
};
use bytes::Bytes;
use endpoint_types::{ApiError, ErrorCode};
use jiff::Timestamp;
use russh::{
    client,
    keys::{PrivateKey, PrivateKeyWithHashAlg},
    ChannelMsg, Disconnect, Sig,
};
use serde_json::json;
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A refused ssh op command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this ssh command is refused: {what} {why}")]
pub struct SshRefusal {
    pub what: String,
    pub why: &'static str,
}

impl SshRefusal {
    pub fn to_api_error(&self) -> ApiError {
        ApiError::new(ErrorCode::ForbiddenByScope, self.to_string())
            .hint("an ssh op runs one remote command on the resource's VM through the appliance's own SSH login: --command \"ssh uptime\" (the words after ssh are the remote command; no OpenSSH options, no destination)")
            .details(json!({ "refused": self.what, "reason": self.why }))
    }
}

/// The remote command for an ssh op's argv (as `ops::parse_command` split it).
pub fn remote_command(argv: &[String]) -> Result<String, SshRefusal> {
    let words = argv.get(1..).unwrap_or_default();
    let Some(first) = words.first() else {
        return Err(SshRefusal {
            what: "the command".into(),
            why: "names no remote command (e.g. \"ssh uptime\")",
        });
    };
    if first.starts_with('-') {
        let what: String = first.chars().take(64).collect();
        return Err(SshRefusal {
            what,
            why: "is an OpenSSH option; the appliance makes the connection itself, so no ssh options are taken",
        });
    }
    Ok(words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" "))
}

/// POSIX shell single quoting.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

#[derive(Debug, thiserror::Error)]
pub enum SshOpError {
    #[error("resource {0:?} is not a complete ssh resource in agent.toml")]
    Incomplete(String),
    #[error("the host key of resource {resource:?} does not match the one pinned in the appliance (presented {presented})")]
    HostKey { resource: String, presented: String },
    #[error("the appliance cannot log in to resource {resource:?}: {cause}")]
    Login { resource: String, cause: String },
}

impl SshOpError {
    pub fn to_api_error(&self) -> ApiError {
        let e = ApiError::new(ErrorCode::TargetUnreachable, self.to_string());
        match self {
            SshOpError::HostKey { .. } => e.hint("the customer must check the VM and update host_key in agent.toml if the change is expected"),
            _ => e.hint("the VM's sshd may be down or refuse the appliance's key; the appliance's agent log has the cause"),
        }
    }
}

async fn login(r: &ResourceConfig) -> Result<client::Handle<Pinned>, SshOpError> {
    let (Some(host), Some(user), Some(key_path), Some(host_key)) =
        (&r.host, &r.user, &r.key, &r.host_key)
    else {
        return Err(SshOpError::Incomplete(r.id.clone()));
    };
    let fail = |cause: String| SshOpError::Login {
        resource: r.id.clone(),
        cause,
    };
    let expected = parse_host_key(host_key).map_err(|e| fail(format!("host_key: {e}")))?;
    let key: PrivateKey = russh::keys::load_secret_key(key_path, None)
        .map_err(|e| fail(format!("cannot load the key: {e}")))?;
    let mismatch = Arc::new(Mutex::new(None));
    let handler = Pinned {
        expected,
        mismatch: mismatch.clone(),
    };
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(host.as_str()),
    )
    .await
    .map_err(|_| fail("connect timed out".into()))?
    .map_err(|e| fail(format!("connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let mut handle = match client::connect_stream(Arc::new(client_config()), tcp, handler).await {
        Ok(h) => h,
        Err(e) => {
            let presented = mismatch.lock().unwrap_or_else(|p| p.into_inner()).take();
            return Err(match presented {
                Some(presented) => SshOpError::HostKey {
                    resource: r.id.clone(),
                    presented,
                },
                None => fail(format!("handshake: {e}")),
            });
        }
    };
    let auth = handle
        .authenticate_publickey(
            user.clone(),
            PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await;
    match auth {
        Ok(a) if a.success() => Ok(handle),
        Ok(_) => Err(fail(format!("sshd refused the key for user {user}"))),
        Err(e) => Err(fail(format!("authentication: {e}"))),
    }
}

/// Runs `command` on the resource's VM with the op's timeout, cancellation and output cap;
/// output chunks also go to `tx` as they arrive.
pub async fn run(
    spec: &OpSpec,
    resource: &ResourceConfig,
    command: &str,
    cancel: &CancellationToken,
    tx: Option<mpsc::Sender<(Stream, Bytes)>>,
) -> Result<OpOutcome, SshOpError> {
    let started_at = Timestamp::now();
    let mut outcome = OpOutcome {
        exit_code: None,
        signal: None,
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        timed_out: false,
        cancelled: false,
        started_at,
        finished_at: started_at,
    };
    let deadline = tokio::time::Instant::now() + spec.timeout;
    let handle = tokio::select! {
        h = login(resource) => h?,
        _ = tokio::time::sleep_until(deadline) => {
            outcome.timed_out = true;
            outcome.finished_at = Timestamp::now();
            return Ok(outcome);
        }
        _ = cancel.cancelled() => {
            outcome.cancelled = true;
            outcome.finished_at = Timestamp::now();
            return Ok(outcome);
        }
    };
    let fail = |cause: String| SshOpError::Login {
        resource: resource.id.clone(),
        cause,
    };
    let mut channel = handle
        .channel_open_session()
        .await
        .map_err(|e| fail(format!("session: {e}")))?;
    channel
        .exec(true, command.as_bytes())
        .await
        .map_err(|e| fail(format!("exec: {e}")))?;
    let _ = channel.eof().await;
    loop {
        let msg = tokio::select! {
            m = channel.wait() => m,
            _ = tokio::time::sleep_until(deadline) => {
                outcome.timed_out = true;
                break;
            }
            _ = cancel.cancelled() => {
                outcome.cancelled = true;
                break;
            }
        };
        let (stream, data) = match msg {
            None | Some(ChannelMsg::Close) => break,
            Some(ChannelMsg::Failure) => {
                return Err(fail("sshd refused to run the command".into()));
            }
            Some(ChannelMsg::Data { data }) => (Stream::Stdout, data),
            Some(ChannelMsg::ExtendedData { data, ext: 1 }) => (Stream::Stderr, data),
            Some(ChannelMsg::ExitStatus { exit_status }) => {
                outcome.exit_code = Some(i64::from(exit_status));
                continue;
            }
            Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                outcome.signal = Some(signal_number(&signal_name));
                continue;
            }
            Some(_) => continue,
        };
        let (kept, truncated) = match stream {
            Stream::Stdout => (&mut outcome.stdout, &mut outcome.stdout_truncated),
            Stream::Stderr => (&mut outcome.stderr, &mut outcome.stderr_truncated),
        };
        let take = data.len().min(spec.output_cap.saturating_sub(kept.len()));
        *truncated |= take < data.len();
        if let Some(chunk) = data.get(..take).filter(|c| !c.is_empty()) {
            kept.extend_from_slice(chunk);
            if let Some(tx) = &tx {
                let _ = tx.send((stream, Bytes::copy_from_slice(chunk))).await;
            }
        }
    }
    if outcome.timed_out || outcome.cancelled {
        // sshd ends the remote program on a KILL request, and hangs it up on close anyway.
        let _ = channel.signal(Sig::KILL).await;
        let _ = channel.close().await;
        outcome.exit_code = None;
        outcome.signal = Some(libc::SIGKILL);
    }
    let _ = handle
        .disconnect(Disconnect::ByApplication, "op ended", "en")
        .await;
    outcome.finished_at = Timestamp::now();
    Ok(outcome)
}

fn signal_number(sig: &Sig) -> i32 {
    match sig {
        Sig::ABRT => libc::SIGABRT,
        Sig::ALRM => libc::SIGALRM,
        Sig::FPE => libc::SIGFPE,
        Sig::HUP => libc::SIGHUP,
        Sig::ILL => libc::SIGILL,
        Sig::INT => libc::SIGINT,
        Sig::KILL => libc::SIGKILL,
        Sig::PIPE => libc::SIGPIPE,
        Sig::QUIT => libc::SIGQUIT,
        Sig::SEGV => libc::SIGSEGV,
        Sig::TERM => libc::SIGTERM,
        Sig::USR1 => libc::SIGUSR1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        std::iter::once("ssh")
            .chain(words.iter().copied())
            .map(String::from)
            .collect()
    }

    #[test]
    fn words_after_ssh_are_the_remote_command_quoted() {
        assert_eq!(remote_command(&argv(&["uptime"])).unwrap(), "'uptime'");
        assert_eq!(
            remote_command(&argv(&["ls", "-la", "it's here"])).unwrap(),
            "'ls' '-la' 'it'\\''s here'"
        );
        assert_eq!(
            remote_command(&argv(&["sh", "-c", "echo $HOME | wc"])).unwrap(),
            "'sh' '-c' 'echo $HOME | wc'"
        );
    }

    #[test]
    fn openssh_options_are_refused() {
        for opt in [
            "-oProxyCommand=sh -c id",
            "-o",
            "-F",
            "-J",
            "-W",
            "-L",
            "-R",
            "-D",
            "-v",
            "--",
        ] {
            let e = remote_command(&argv(&[opt, "x"])).expect_err(opt);
            assert_eq!(e.what, opt);
            assert!(e.why.contains("OpenSSH option"), "{e}");
            assert_eq!(e.to_api_error().code, ErrorCode::ForbiddenByScope);
        }
        assert!(remote_command(&argv(&[]))
            .unwrap_err()
            .why
            .contains("no remote command"));
    }
}
