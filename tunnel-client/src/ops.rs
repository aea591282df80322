//! One-off ops: run one approved command inside the appliance, never through a shell.
//!
//! The command line is split into argv the way a POSIX shell would split it (quotes and
//! escapes), but nothing a shell would *do* is done: anything that needs a shell (`;`, `|`,
//! `&`, redirections, substitutions, variables, comments) is refused rather than passed on as
//! a literal argument. The first word must be the op's tool, and the executable is the one the
//! customer's `[tools]` names (or the agent's `PATH` finds), never a path the gateway sent.
//!
//! The child runs in its own process group (and cgroup, as the op user: [`crate::op_sandbox`])
//! with a cleared environment and no stdin; stdout and stderr are captured up to a cap each
//! (the rest is read and dropped, so the child never blocks on a full pipe). On timeout or
//! cancellation everything the op started is SIGKILLed; when the tool exits, anything it left
//! running is killed too: an op leaves nothing behind.

use crate::{
    config::ToolsConfig,
    op_launcher::{self, LaunchSteps},
    op_sandbox::{self, Confinement, OpCgroup},
};
use bytes::Bytes;
use endpoint_types::{control::OpTool, op_command::CommandError, ApiError, ErrorCode};
use jiff::Timestamp;
use serde_json::json;
use std::{
    ffi::OsStr,
    io,
    os::unix::{fs::PermissionsExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

/// Output kept per stream (DESIGN: "op output capped at 1 MiB per stream").
pub const DEFAULT_OUTPUT_CAP: usize = 1 << 20;
/// The op timeout when the request names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// The only variables of the agent's own environment a tool sees (plus what the caller adds).
/// `HOME` and `TMPDIR` are the op's own directory, never the agent's.
pub const ENV_ALLOW_LIST: &[&str] = &["PATH", "LANG", "TERM"];
/// How long, once the group is dead and reaped, the pipes may stay open (held by a process that
/// left the group, or by a stalled stream consumer) before capture stops.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
const READ_CHUNK: usize = 64 * 1024;

/// What to run: the op as the gateway dispatched it.
#[derive(Debug, Clone)]
pub struct OpSpec {
    pub op_id: String,
    pub tool: OpTool,
    pub command: String,
    pub timeout: Duration,
    /// Bytes kept per stream.
    pub output_cap: usize,
}

impl OpSpec {
    pub fn new(op_id: impl Into<String>, tool: OpTool, command: impl Into<String>) -> OpSpec {
        OpSpec {
            op_id: op_id.into(),
            tool,
            command: command.into(),
            timeout: DEFAULT_TIMEOUT,
            output_cap: DEFAULT_OUTPUT_CAP,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The command line is not one argv for its tool (the parser the gateway shares).
    #[error(transparent)]
    Command(#[from] CommandError),
    /// `searched`: the configured file, or the PATH directories looked in.
    #[error("{}", not_found_message(*tool, configured.as_deref(), searched))]
    ToolNotFound {
        tool: OpTool,
        configured: Option<PathBuf>,
        searched: Vec<PathBuf>,
    },
    #[error("cannot start {}: {source}", exe.display())]
    Spawn { exe: PathBuf, source: io::Error },
    #[error("lost track of the op's process: {0}")]
    Io(io::Error),
}

fn not_found_message(tool: OpTool, configured: Option<&Path>, searched: &[PathBuf]) -> String {
    match configured {
        Some(p) if searched.len() == 1 && searched[0] == p => {
            format!(
                "the [tools] entry for `{}` ({}) is not an executable file",
                tool.as_str(),
                p.display()
            )
        }
        _ => format!(
            "no `{}` executable on the agent's PATH (searched {} director{})",
            configured.map_or(Path::new(tool.as_str()), |p| p).display(),
            searched.len(),
            if searched.len() == 1 { "y" } else { "ies" }
        ),
    }
}

impl OpError {
    pub fn to_api_error(&self) -> ApiError {
        let msg = self.to_string();
        match self {
            OpError::Command(CommandError::EmptyCommand) => ApiError::invalid(msg)
                .hint("give the whole command line, starting with the tool's name (--command \"kubectl get pods\")"),
            OpError::Command(CommandError::BadQuoting { at, .. }) => ApiError::invalid(msg)
                .hint("close every quote; a backslash outside single quotes escapes the next character")
                .details(json!({ "at": at })),
            OpError::Command(CommandError::ShellSyntax { what, at }) => ApiError::invalid(msg)
                .hint("quote the character ('…') to pass it to the tool literally, or run each part of a pipeline as its own op")
                .details(json!({ "syntax": what, "at": at })),
            OpError::Command(CommandError::WrongTool { expected, got }) => {
                ApiError::new(ErrorCode::ForbiddenByScope, msg)
                .hint(format!(
                    "the first word must be `{0}`; the appliance chooses which `{0}` executable runs, so give the bare name, not a path",
                    expected.as_str()
                ))
                .details(json!({ "expected": expected.as_str(), "got": got }))
            }
            OpError::ToolNotFound { tool, searched, .. } => ApiError::new(ErrorCode::Internal, msg)
                .hint(format!(
                    "the customer can install `{0}` on the agent's PATH or set `{0} = \"/path/to/{0}\"` under [tools] in agent.toml",
                    tool.as_str()
                ))
                .details(json!({ "tool": tool.as_str(), "searched": searched })),
            OpError::Spawn { exe, source } => ApiError::new(ErrorCode::Internal, msg)
                .hint("check that the executable agent.toml's [tools] names (or PATH finds) exists and the agent's user may run it")
                .details(json!({ "executable": exe, "os_error": source.raw_os_error() })),
            OpError::Io(_) => ApiError::new(ErrorCode::Internal, msg)
                .hint("an environment problem in the appliance; the agent's log has the cause"),
        }
    }
}

/// Splits `command` into argv POSIX-shell-style, without a shell (see
/// [`endpoint_types::op_command::parse_command`], which the gateway uses too).
pub fn parse_command(tool: OpTool, command: &str) -> Result<Vec<String>, OpError> {
    endpoint_types::op_command::parse_command(tool, command).map_err(OpError::from)
}

/// The executable for a tool: the `[tools]` entry when there is one (a bare name there means
/// "this name, from PATH"), else the tool's name looked up on `path_env`. Empty and relative
/// PATH entries are skipped: the agent's working directory is never searched.
pub fn resolve_tool(
    tool: OpTool,
    tools: &ToolsConfig,
    path_env: Option<&OsStr>,
) -> Result<PathBuf, OpError> {
    let configured = match tool {
        OpTool::Kubectl => &tools.kubectl,
        OpTool::Psql => &tools.psql,
        OpTool::Ssh => &tools.ssh,
        OpTool::Docker => &tools.docker,
        OpTool::Aws => &tools.aws,
        OpTool::Gcloud => &tools.gcloud,
        OpTool::Az => &tools.az,
        OpTool::Doctl => &tools.doctl,
    };
    let not_found = |searched| OpError::ToolNotFound {
        tool,
        configured: configured.clone(),
        searched,
    };
    let name = match configured {
        Some(p) if p.components().count() > 1 => {
            return if is_executable(p) {
                Ok(p.clone())
            } else {
                Err(not_found(vec![p.clone()]))
            };
        }
        Some(p) => p.as_path(),
        None => Path::new(tool.as_str()),
    };
    let mut searched = Vec::new();
    for dir in path_env
        .map(std::env::split_paths)
        .into_iter()
        .flatten()
        .filter(|d| d.is_absolute())
    {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
        searched.push(dir);
    }
    Err(not_found(searched))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How an op's process ended and what it printed (each stream up to the spec's cap).
#[derive(Debug, Clone)]
pub struct OpOutcome {
    /// `None` when the process was killed by a signal (including on timeout or cancellation).
    pub exit_code: Option<i64>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
    /// Stopped through the caller's `CancellationToken`.
    pub cancelled: bool,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
}

impl OpOutcome {
    pub fn truncated(&self) -> bool {
        self.stdout_truncated || self.stderr_truncated
    }

    /// The error the op ends with, or `None` for exit code 0: `COMMAND_TIMEOUT`, or
    /// `COMMAND_FAILED` with the exit code (or signal). `with_stderr` adds the last 4 KiB of
    /// stderr to `details`: leave it false while output is held for approval, since held
    /// output must not leave the appliance.
    pub fn error(&self, spec: &OpSpec, with_stderr: bool) -> Option<ApiError> {
        let tool = spec.tool.as_str();
        let mut details = json!({ "exit_code": self.exit_code, "signal": self.signal, "truncated": self.truncated() });
        if with_stderr {
            let tail = &self.stderr[self.stderr.len().saturating_sub(4096)..];
            details["stderr"] = String::from_utf8_lossy(tail).into_owned().into();
        }
        let e = if self.timed_out {
            ApiError::new(ErrorCode::CommandTimeout, format!("`{tool}` ran past its {}s timeout and was killed", spec.timeout.as_secs()))
                .hint("its whole process group was killed; retry with a longer --timeout (at most 24h) or a narrower command")
        } else if self.cancelled {
            ApiError::new(ErrorCode::CommandFailed, format!("`{tool}` was stopped in the appliance before it finished"))
                .hint("the op was cancelled (its grant ended, or the agent is shutting down); request it again")
        } else if let Some(code) = self.exit_code.filter(|c| *c != 0) {
            ApiError::new(
                ErrorCode::CommandFailed,
                format!("`{tool}` exited with code {code}"),
            )
            .hint("the command's stderr says why")
        } else if let Some(sig) = self.signal {
            ApiError::new(
                ErrorCode::CommandFailed,
                format!("`{tool}` was killed by signal {sig}"),
            )
            .hint("the command's stderr may say why")
        } else {
            return None;
        };
        Some(e.details(details))
    }
}

/// [`run_streaming`] without streaming.
pub async fn run(
    spec: &OpSpec,
    exe: &Path,
    argv: &[String],
    env: &[(&str, &OsStr)],
    cwd: &Path,
    cancel: &CancellationToken,
) -> Result<OpOutcome, OpError> {
    run_streaming(spec, exe, argv, env, cwd, cancel, None).await
}

/// [`run_confined`] with no op user and no cgroup (ends the process group and what descends
/// from the tool).
pub async fn run_streaming(
    spec: &OpSpec,
    exe: &Path,
    argv: &[String],
    env: &[(&str, &OsStr)],
    cwd: &Path,
    cancel: &CancellationToken,
    tx: Option<mpsc::Sender<(Stream, Bytes)>>,
) -> Result<OpOutcome, OpError> {
    run_confined(
        spec,
        exe,
        argv,
        env,
        cwd,
        &Confinement::default(),
        cancel,
        tx,
    )
    .await
}

/// Runs `exe` with `argv[1..]` (argv as [`parse_command`] made it) in `cwd`, with stdin null,
/// in its own process group, as `confine`'s user and in a cgroup of its own when `confine` has
/// them, with an environment of [`ENV_ALLOW_LIST`] (from the agent's own), `HOME` and `TMPDIR`
/// set to `cwd`, plus `env`. Kept output (at most `spec.output_cap` bytes per stream) is also
/// sent to `tx` as it arrives; a slow receiver slows the reading, a dropped one is ignored.
/// When the tool exits, on timeout or `cancel`, everything the op started is SIGKILLed (see
/// [`crate::op_sandbox`]); so it is if this future is dropped.
#[allow(clippy::too_many_arguments)]
pub async fn run_confined(
    spec: &OpSpec,
    exe: &Path,
    argv: &[String],
    env: &[(&str, &OsStr)],
    cwd: &Path,
    confine: &Confinement,
    cancel: &CancellationToken,
    tx: Option<mpsc::Sender<(Stream, Bytes)>>,
) -> Result<OpOutcome, OpError> {
    if argv.is_empty() {
        return Err(OpError::Command(CommandError::EmptyCommand));
    }
    let spawn_error = |source| OpError::Spawn {
        exe: exe.to_path_buf(),
        source,
    };
    let cgroup = match &confine.cgroup_parent {
        Some(parent) => Some(OpCgroup::create(parent, &spec.op_id).map_err(OpError::Io)?),
        None => None,
    };
    let user = confine.user.as_ref().map(|u| (u.uid, u.gid));
    let (mut cmd, launch_status) = match &confine.launcher {
        // The launcher takes the sandbox steps in a process of its own (see op_launcher),
        // so the agent is never forked.
        Some(launcher) => {
            let procs = cgroup.as_ref().map(OpCgroup::procs_path);
            let steps = LaunchSteps {
                cgroup_procs: procs.as_deref(),
                user,
            };
            let (cmd, status) = op_launcher::command(launcher, exe, &steps).map_err(spawn_error)?;
            (cmd, Some(status))
        }
        None => {
            let mut cmd = tokio::process::Command::new(exe);
            let cgroup_fd = cgroup.as_ref().map(OpCgroup::procs_fd);
            cmd.stdin(Stdio::null());
            // SAFETY: child_setup makes only async-signal-safe syscalls (write, setgroups,
            // setgid, setuid, prctl) and touches no memory the parent shares.
            unsafe {
                cmd.pre_exec(move || op_sandbox::child_setup(cgroup_fd, user));
            }
            (cmd, None)
        }
    };
    cmd.args(&argv[1..]).env_clear();
    for key in ENV_ALLOW_LIST {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    cmd.env("HOME", cwd)
        .env("TMPDIR", cwd)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);

    let started_at = Timestamp::now();
    let spawned = op_sandbox::spawn_root(|| {
        let child = cmd.spawn()?;
        let pid = child.id();
        Ok((child, pid))
    });
    // Our end of the launcher's status pipe closes with the command.
    drop(cmd);
    let (mut child, pid) = spawned.map_err(spawn_error)?;
    let Some(pid) = pid else {
        return Err(OpError::Io(io::Error::other(
            "the tool exited before it could be supervised",
        )));
    };
    let pgid = pid as libc::pid_t;
    let mut guard = TreeGuard {
        pgid: Some(pgid),
        cgroup,
    };
    if let Some(status) = launch_status {
        // A failed step ends the launcher; the guard sweeps up what it leaves.
        op_launcher::started(status).await.map_err(spawn_error)?;
    }
    tracing::debug!(op_id = %spec.op_id, pid = pgid, exe = %exe.display(), "op started");
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(OpError::Io(io::Error::other(
            "the tool's output pipes were not set up",
        )));
    };

    let reaped = CancellationToken::new();
    let supervise = async {
        let end = tokio::select! {
            biased;
            status = child.wait() => End::Exited(status),
            _ = tokio::time::sleep(spec.timeout) => End::TimedOut,
            _ = cancel.cancelled() => End::Cancelled,
        };
        guard.kill().await;
        let (timed_out, cancelled) = (matches!(end, End::TimedOut), matches!(end, End::Cancelled));
        let status = match end {
            End::Exited(status) => status,
            _ => child.wait().await,
        };
        op_sandbox::forget_root(pgid);
        let finished_at = Timestamp::now();
        reaped.cancel();
        (timed_out, cancelled, status, finished_at)
    };
    let cap = spec.output_cap;
    let (
        (stdout, stdout_truncated),
        (stderr, stderr_truncated),
        (timed_out, cancelled, status, finished_at),
    ) = tokio::join!(
        pump(stdout, Stream::Stdout, cap, tx.as_ref(), &reaped),
        pump(stderr, Stream::Stderr, cap, tx.as_ref(), &reaped),
        supervise,
    );
    guard.pgid = None;
    let status: ExitStatus = status.map_err(OpError::Io)?;
    tracing::debug!(op_id = %spec.op_id, ?status, timed_out, cancelled, "op finished");
    Ok(OpOutcome {
        exit_code: status.code().map(i64::from),
        signal: status.signal(),
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
        timed_out,
        cancelled,
        started_at,
        finished_at,
    })
}

enum End {
    Exited(io::Result<ExitStatus>),
    TimedOut,
    Cancelled,
}

/// Everything the op started: its process group, its cgroup (or, without one, every process
/// descended from it and every orphan re-parented to the agent). Killed at the op's end and if
/// the run is abandoned half-way (its future dropped).
struct TreeGuard {
    pgid: Option<libc::pid_t>,
    cgroup: Option<OpCgroup>,
}

impl TreeGuard {
    async fn kill(&mut self) {
        let Some(pgid) = self.pgid else { return };
        kill_group(pgid);
        // The sweeps wait for the kernel (bounded); off the async workers.
        let cgroup = self.cgroup.take();
        let _ = tokio::task::spawn_blocking(move || match cgroup {
            Some(c) => drop(c),
            None => op_sandbox::kill_tree(pgid),
        })
        .await;
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            kill_group(pgid);
            match self.cgroup.take() {
                Some(c) => drop(c),
                None => op_sandbox::kill_tree(pgid),
            }
            op_sandbox::forget_root(pgid);
        }
    }
}

fn kill_group(pgid: libc::pid_t) {
    // SAFETY: kill(2) has no memory-safety preconditions. ESRCH (group already empty) is fine.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Reads one stream to its end, keeping the first `cap` bytes and dropping the rest; stops
/// `DRAIN_GRACE` after the group is reaped even if something still holds the pipe open.
async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    which: Stream,
    cap: usize,
    tx: Option<&mpsc::Sender<(Stream, Bytes)>>,
    reaped: &CancellationToken,
) -> (Vec<u8>, bool) {
    let stop = async {
        reaped.cancelled().await;
        tokio::time::sleep(DRAIN_GRACE).await;
    };
    tokio::pin!(stop);
    let mut buf = vec![0u8; READ_CHUNK];
    let (mut kept, mut truncated) = (Vec::new(), false);
    loop {
        let n = tokio::select! {
            biased;
            _ = &mut stop => break,
            r = r.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        let take = n.min(cap - kept.len());
        truncated |= take < n;
        if take == 0 {
            continue;
        }
        kept.extend_from_slice(&buf[..take]);
        if let Some(tx) = tx {
            tokio::select! {
                biased;
                _ = &mut stop => break,
                _ = tx.send((which, Bytes::copy_from_slice(&buf[..take]))) => {}
            }
        }
    }
    (kept, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(cmd: &str) -> Vec<String> {
        parse_command(OpTool::Kubectl, cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }

    fn err(cmd: &str) -> OpError {
        parse_command(OpTool::Kubectl, cmd).expect_err(cmd)
    }

    #[test]
    fn splits_like_a_posix_shell() {
        let table: &[(&str, &[&str])] = &[
            ("kubectl get pods", &["kubectl", "get", "pods"]),
            ("  kubectl\tget   pods  \n", &["kubectl", "get", "pods"]),
            (
                "kubectl get pods -l 'app=my app'",
                &["kubectl", "get", "pods", "-l", "app=my app"],
            ),
            (
                r#"kubectl logs "my pod" -c "a\"b\\c\$d\x""#,
                &["kubectl", "logs", "my pod", "-c", r#"a"b\c$d\x"#],
            ),
            (
                r"kubectl get my\ pod a\;b \'x",
                &["kubectl", "get", "my pod", "a;b", "'x"],
            ),
            ("kubectl get ''", &["kubectl", "get", ""]),
            ("kubectl 'a'\"b\"c", &["kubectl", "abc"]),
            ("kubectl get \\\n pods", &["kubectl", "get", "pods"]),
            (
                "kubectl exec p -- sh -c 'ls | wc -l; echo $HOME > /x'",
                &[
                    "kubectl",
                    "exec",
                    "p",
                    "--",
                    "sh",
                    "-c",
                    "ls | wc -l; echo $HOME > /x",
                ],
            ),
            (
                "kubectl get pods -o jsonpath={.items[*].metadata.name}",
                &[
                    "kubectl",
                    "get",
                    "pods",
                    "-o",
                    "jsonpath={.items[*].metadata.name}",
                ],
            ),
            (
                "kubectl get pods --selector=a!=b *.yaml ~ a#b $ \"$\" \"a$\"",
                &[
                    "kubectl",
                    "get",
                    "pods",
                    "--selector=a!=b",
                    "*.yaml",
                    "~",
                    "a#b",
                    "$",
                    "$",
                    "a$",
                ],
            ),
            ("kubectl 'it''s'", &["kubectl", "its"]),
            ("kubectl \"multi\nline\"", &["kubectl", "multi\nline"]),
        ];
        for (cmd, want) in table {
            assert_eq!(ok(cmd), *want, "{cmd:?}");
        }
    }

    #[test]
    fn refuses_what_needs_a_shell() {
        for (cmd, what) in [
            ("kubectl get pods; rm -rf /", ";"),
            ("kubectl get pods | grep x", "|"),
            ("kubectl get pods && echo", "&"),
            ("kubectl get pods &", "&"),
            ("kubectl get pods > /tmp/x", ">"),
            ("kubectl apply -f - < x.yaml", "<"),
            ("kubectl get `whoami`", "`"),
            ("kubectl get \"`whoami`\"", "`"),
            ("kubectl get $(whoami)", "$("),
            ("kubectl get \"$(whoami)\"", "$("),
            ("kubectl get ${HOME}", "${"),
            ("kubectl get $HOME/x", "$HOME"),
            ("kubectl get \"$HOME\"", "$HOME"),
            ("kubectl get price$5", "$5"),
            ("kubectl get (x)", "("),
            ("kubectl get pods\nrm -rf /", "a newline"),
            ("kubectl get pods # comment", "#"),
        ] {
            match err(cmd) {
                OpError::Command(CommandError::ShellSyntax { what: w, .. }) => {
                    assert_eq!(w, what, "{cmd:?}")
                }
                e => panic!("{cmd:?}: {e:?}"),
            }
        }
        let e = err("kubectl get pods; rm -rf /");
        assert!(
            matches!(
                e,
                OpError::Command(CommandError::ShellSyntax { at: 17, .. })
            ),
            "{e:?}"
        );
        let api = e.to_api_error();
        assert_eq!(api.code, ErrorCode::InvalidRequest);
        assert!(
            api.message.contains("never through a shell") && api.hint.contains("quote"),
            "{api}"
        );
    }

    #[test]
    fn refuses_bad_quoting_empty_commands_and_other_tools() {
        for cmd in [
            "kubectl get 'pods",
            "kubectl get \"pods",
            "kubectl get pods\\",
            "kubectl \0",
        ] {
            let e = err(cmd);
            assert!(
                matches!(e, OpError::Command(CommandError::BadQuoting { .. })),
                "{cmd:?}: {e:?}"
            );
            assert_eq!(e.to_api_error().code, ErrorCode::InvalidRequest);
        }
        assert!(matches!(
            err("kubectl get 'pods"),
            OpError::Command(CommandError::BadQuoting { at: 13, .. })
        ));
        for cmd in ["", "   ", "\n"] {
            assert!(
                matches!(err(cmd), OpError::Command(CommandError::EmptyCommand)),
                "{cmd:?}"
            );
        }
        for (cmd, got) in [
            ("rm -rf /", "rm"),
            ("/usr/bin/kubectl get pods", "/usr/bin/kubectl"),
            ("psql -c 'select 1'", "psql"),
            ("'' get", ""),
        ] {
            match err(cmd) {
                OpError::Command(CommandError::WrongTool {
                    expected: OpTool::Kubectl,
                    got: g,
                }) => assert_eq!(g, got),
                e => panic!("{cmd:?}: {e:?}"),
            }
        }
        let api = err("rm -rf /").to_api_error();
        assert_eq!(api.code, ErrorCode::ForbiddenByScope);
        assert!(api.hint.contains("first word must be `kubectl`"), "{api}");
        assert_eq!(api.details["got"], "rm");
        assert_eq!(
            parse_command(OpTool::Psql, "psql -c 'select 1'").unwrap(),
            ["psql", "-c", "select 1"]
        );
    }
}
