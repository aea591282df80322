//! One-off ops against real processes: small shell scripts registered as the tool's
//! executable. (A script may *be* the tool; the agent itself never runs a shell.)

mod support;

use bytes::Bytes;
use endpoint_types::{control::OpTool, ErrorCode};
use std::{
    ffi::OsStr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{Duration, Instant},
};
use support::ensure_ops_user;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tunnel_client::{
    config::ToolsConfig,
    op_sandbox::Confinement,
    ops::{self, OpError, OpSpec, Stream},
};

/// Upper bound for anything a test awaits, so a bug fails the test instead of hanging it.
const BOUND: Duration = Duration::from_secs(60);

const SCRIPTS: &[(&str, &str)] = &[
    ("out_err", "echo out\necho err >&2\nexit 3\n"),
    ("args", "printf '%s\\n' \"$@\"\n"),
    ("big", "head -c 3145728 /dev/zero\necho \"done $?\" >&2\n"),
    (
        "tree",
        "sleep 300 &\necho $! > \"$1\"\necho started\nsleep 300\n",
    ),
    ("env", "pwd\nenv\n"),
    (
        "stream",
        "echo first\nwhile [ ! -e \"$1\" ]; do sleep 0.05; done\necho second >&2\necho third\n",
    ),
];

/// Every script, written once before any test spawns a process: writing an executable while
/// another thread forks can leave the file "busy" (ETXTBSY) for a moment.
fn scripts() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Per process (a concurrent run must not rewrite scripts we exec); earlier runs' go.
        for old in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            let name = old.file_name().to_string_lossy().into_owned();
            if name
                .strip_prefix("ops_exec-")
                .is_some_and(|pid| !Path::new("/proc").join(pid).exists())
            {
                let _ = std::fs::remove_dir_all(old.path());
            }
        }
        let dir = tmp.join(format!("ops_exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, body) in SCRIPTS {
            write_executable(&dir.join(name), &format!("#!/bin/sh\n{body}"));
        }
        dir
    })
}

fn write_executable(path: &Path, body: &str) {
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn spec(timeout: Duration) -> OpSpec {
    OpSpec {
        timeout,
        ..OpSpec::new("op_test", OpTool::Kubectl, "")
    }
}

fn argv(command: &str) -> Vec<String> {
    ops::parse_command(OpTool::Kubectl, command).unwrap()
}

/// `c` starting its ops through `postern-agent`'s launcher mode, as `postern-agent run` does.
fn launched(c: Confinement) -> Confinement {
    c.with_launcher(Some(PathBuf::from(env!("CARGO_BIN_EXE_postern-agent"))))
}

/// Both ways an op starts: forked from the agent, and through the launcher.
fn both_ways() -> [Confinement; 2] {
    [Confinement::default(), launched(Confinement::default())]
}

async fn run(script: &str, command: &str, spec: &OpSpec) -> ops::OpOutcome {
    let cwd = tempfile::tempdir().unwrap();
    let argv = argv(command);
    let (exe, cancel) = (scripts().join(script), CancellationToken::new());
    let fut = ops::run(spec, &exe, &argv, &[], cwd.path(), &cancel);
    tokio::time::timeout(BOUND, fut)
        .await
        .expect("op bounded")
        .expect("op runs")
}

/// Dead means gone or a zombie waiting for init to reap it; SIGKILL lands asynchronously, so
/// this waits (bounded) for the kernel to finish the job.
async fn wait_dead(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next())
            });
        if matches!(state, None | Some('Z' | 'X')) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn recv_until(rx: &mut mpsc::Receiver<(Stream, Bytes)>, want: &str) -> Vec<(Stream, Bytes)> {
    let mut got = Vec::new();
    let mut text = String::new();
    while !text.contains(want) {
        let chunk = tokio::time::timeout(BOUND, rx.recv())
            .await
            .expect("chunk bounded")
            .expect("chunk before the end");
        text.push_str(&String::from_utf8_lossy(&chunk.1));
        got.push(chunk);
    }
    got
}

#[tokio::test]
async fn exit_codes_and_stderr_are_captured() {
    let s = spec(Duration::from_secs(30));
    let o = run("out_err", "kubectl get pods", &s).await;
    assert_eq!(
        (o.exit_code, o.signal, o.timed_out, o.cancelled),
        (Some(3), None, false, false)
    );
    assert_eq!(
        (o.stdout.as_slice(), o.stderr.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert!(!o.truncated() && o.started_at <= o.finished_at);
    let e = o.error(&s, true).unwrap();
    assert_eq!(e.code, ErrorCode::CommandFailed);
    assert_eq!(
        (
            e.details["exit_code"].as_i64(),
            e.details["stderr"].as_str()
        ),
        (Some(3), Some("err\n"))
    );
    assert!(
        o.error(&s, false).unwrap().details.get("stderr").is_none(),
        "held stderr stays out"
    );

    // Exit 0, and argv reaches the tool verbatim: one argument per word, quotes removed,
    // quoted shell characters passed literally.
    let o = run("args", r#"kubectl get 'a b' "c;d" e\|f '$(x)' '' *"#, &s).await;
    assert_eq!(o.exit_code, Some(0));
    assert_eq!(
        String::from_utf8(o.stdout.clone()).unwrap(),
        "get\na b\nc;d\ne|f\n$(x)\n\n*\n"
    );
    assert!(o.error(&s, true).is_none());
}

#[tokio::test]
async fn output_past_the_cap_is_dropped_and_marked_without_blocking_the_child() {
    let s = spec(Duration::from_secs(30));
    assert_eq!(s.output_cap, 1 << 20);
    let cwd = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::channel(1024);
    let o = tokio::time::timeout(
        BOUND,
        ops::run_streaming(
            &s,
            &scripts().join("big"),
            &argv("kubectl"),
            &[],
            cwd.path(),
            &CancellationToken::new(),
            Some(tx),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    // `head` wrote all 3 MiB and exited 0 (not stuck on a full pipe, not killed by SIGPIPE).
    assert_eq!((o.exit_code, o.timed_out), (Some(0), false));
    assert_eq!(o.stderr, b"done 0\n");
    assert_eq!(o.stdout.len(), 1 << 20);
    assert!(o.stdout_truncated && !o.stderr_truncated && o.truncated());
    let mut streamed = 0;
    while let Some((which, chunk)) = rx.recv().await {
        if which == Stream::Stdout {
            streamed += chunk.len();
        }
    }
    assert_eq!(streamed, 1 << 20, "the cap applies to what is streamed too");
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let s = spec(Duration::from_secs(3));
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("grandchild.pid");
    let began = Instant::now();
    let o = run("tree", &format!("kubectl '{}'", pid_file.display()), &s).await;
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "took {:?}",
        began.elapsed()
    );
    assert!(o.timed_out && !o.cancelled);
    assert_eq!((o.exit_code, o.signal), (None, Some(libc::SIGKILL)));
    assert_eq!(o.stdout, b"started\n");
    let grandchild = read_pid(&pid_file);
    assert!(
        wait_dead(grandchild).await,
        "the background `sleep 300` ({grandchild}) survived the timeout"
    );
    let e = o.error(&s, false).unwrap();
    assert_eq!(e.code, ErrorCode::CommandTimeout);
    assert!(e.message.contains("3s timeout"), "{e}");
}

#[tokio::test]
async fn cancellation_kills_the_group_and_streaming_shows_output_before_the_end() {
    scripts();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("grandchild.pid");
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel(16);
    let (exe, argv, cwd, c) = (
        scripts().join("tree"),
        argv(&format!("kubectl '{}'", pid_file.display())),
        dir.path().to_path_buf(),
        cancel.clone(),
    );
    let task = tokio::spawn(async move {
        ops::run_streaming(
            &spec(Duration::from_secs(300)),
            &exe,
            &argv,
            &[],
            &cwd,
            &c,
            Some(tx),
        )
        .await
    });
    recv_until(&mut rx, "started\n").await;
    assert!(!task.is_finished());
    let grandchild = read_pid(&pid_file);
    assert!(
        std::fs::metadata(format!("/proc/{grandchild}")).is_ok(),
        "grandchild running before the cancel"
    );

    let began = Instant::now();
    cancel.cancel();
    let o = tokio::time::timeout(BOUND, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "took {:?}",
        began.elapsed()
    );
    assert!(o.cancelled && !o.timed_out);
    assert_eq!((o.exit_code, o.signal), (None, Some(libc::SIGKILL)));
    assert!(
        wait_dead(grandchild).await,
        "the background `sleep 300` ({grandchild}) survived the cancel"
    );
}

#[tokio::test]
async fn chunks_stream_while_the_tool_still_runs() {
    scripts();
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("go");
    let (tx, mut rx) = mpsc::channel(16);
    let (exe, argv, cwd) = (
        scripts().join("stream"),
        argv(&format!("kubectl '{}'", flag.display())),
        dir.path().to_path_buf(),
    );
    let task = tokio::spawn(async move {
        ops::run_streaming(
            &spec(Duration::from_secs(60)),
            &exe,
            &argv,
            &[],
            &cwd,
            &CancellationToken::new(),
            Some(tx),
        )
        .await
    });
    let first = recv_until(&mut rx, "first\n").await;
    assert!(first.iter().all(|(w, _)| *w == Stream::Stdout));
    assert!(
        !task.is_finished(),
        "the tool waits for the flag, so this chunk came before its exit"
    );
    std::fs::write(&flag, b"").unwrap();
    let o = tokio::time::timeout(BOUND, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(o.exit_code, Some(0));
    let mut rest = Vec::new();
    while let Some(c) = rx.recv().await {
        rest.push(c);
    }
    let joined = |w: Stream| -> Vec<u8> {
        first
            .iter()
            .chain(&rest)
            .filter(|(s, _)| *s == w)
            .flat_map(|(_, b)| b.to_vec())
            .collect()
    };
    assert_eq!(joined(Stream::Stdout), o.stdout);
    assert_eq!(o.stdout, b"first\nthird\n");
    assert_eq!(joined(Stream::Stderr), b"second\n");
}

#[tokio::test]
async fn the_environment_is_cleared_and_the_cwd_is_the_callers() {
    scripts();
    std::env::set_var("POSTERN_OPS_TEST_SECRET", "hunter2");
    for confine in both_ways() {
        environment_is_cleared(&confine).await;
    }
}

async fn environment_is_cleared(confine: &Confinement) {
    let cwd = tempfile::tempdir().unwrap();
    let kubeconfig = OsStr::new("/etc/postern/main.kubeconfig");
    let env = [("KUBECONFIG", kubeconfig)];
    let (s, exe, argv, cancel) = (
        spec(Duration::from_secs(30)),
        scripts().join("env"),
        argv("kubectl"),
        CancellationToken::new(),
    );
    let fut = ops::run_confined(&s, &exe, &argv, &env, cwd.path(), confine, &cancel, None);
    let o = tokio::time::timeout(BOUND, fut).await.unwrap().unwrap();
    let out = String::from_utf8(o.stdout).unwrap();
    let mut lines = out.lines();
    assert_eq!(
        Path::new(lines.next().unwrap()).canonicalize().unwrap(),
        cwd.path().canonicalize().unwrap()
    );
    let vars: Vec<&str> = lines.collect();
    assert!(
        !out.contains("hunter2") && !out.contains("POSTERN_OPS_TEST_SECRET"),
        "{out}"
    );
    assert!(
        vars.contains(&"KUBECONFIG=/etc/postern/main.kubeconfig"),
        "{out}"
    );
    // HOME and TMPDIR are the op's own directory, never the agent's.
    assert!(
        vars.contains(&format!("HOME={}", cwd.path().display()).as_str()),
        "{out}"
    );
    assert!(
        vars.contains(&format!("TMPDIR={}", cwd.path().display()).as_str()),
        "{out}"
    );
    if let Some(path) = std::env::var_os("PATH") {
        assert!(
            vars.contains(&format!("PATH={}", path.to_string_lossy()).as_str()),
            "{out}"
        );
    }
    for v in vars {
        let name = v.split('=').next().unwrap();
        // The rest are what /bin/sh itself sets.
        assert!(
            ops::ENV_ALLOW_LIST.contains(&name)
                || [
                    "KUBECONFIG",
                    "HOME",
                    "TMPDIR",
                    "PWD",
                    "OLDPWD",
                    "SHLVL",
                    "_"
                ]
                .contains(&name),
            "unexpected variable {v}"
        );
    }
}

#[tokio::test]
async fn spawn_failures_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("kubectl");
    std::fs::write(&plain, "not executable").unwrap();
    let cases = [
        (dir.path().join("missing"), libc::ENOENT),
        (plain, libc::EACCES),
    ];
    for ((exe, errno), confine) in cases
        .iter()
        .flat_map(|c| both_ways().map(|w| (c.clone(), w)))
    {
        let e = ops::run_confined(
            &spec(Duration::from_secs(5)),
            &exe,
            &argv("kubectl"),
            &[],
            dir.path(),
            &confine,
            &CancellationToken::new(),
            None,
        )
        .await
        .expect_err("cannot spawn");
        // Through the launcher too: the exec's own errno, not the launcher's exit status.
        assert!(
            matches!(&e, OpError::Spawn { exe: x, source } if *x == exe && source.raw_os_error() == Some(errno)),
            "{e:?}"
        );
        let api = e.to_api_error();
        assert_eq!(api.code, ErrorCode::Internal);
        assert!(
            api.message.contains(&*exe.to_string_lossy()) && api.hint.contains("[tools]"),
            "{api}"
        );
    }
}

#[test]
fn resolve_tool_prefers_the_tools_entry_then_path() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        root.path().join("a"),
        root.path().join("b"),
        root.path().join("c"),
    );
    for d in [&a, &b, &c] {
        std::fs::create_dir(d).unwrap();
    }
    write_executable(&a.join("kubectl"), "#!/bin/sh\n");
    write_executable(&b.join("kubectl"), "#!/bin/sh\n");
    write_executable(&b.join("kubectl-1.29"), "#!/bin/sh\n");
    std::fs::write(c.join("kubectl"), "not executable").unwrap();
    let path = std::env::join_paths([Path::new("relative"), &c, &b]).unwrap();
    let none = ToolsConfig::default();

    // The configured path wins over PATH.
    let tools = ToolsConfig {
        kubectl: Some(a.join("kubectl")),
        ..Default::default()
    };
    assert_eq!(
        ops::resolve_tool(OpTool::Kubectl, &tools, Some(&path)).unwrap(),
        a.join("kubectl")
    );
    // No entry: PATH, skipping relative entries and non-executable files.
    assert_eq!(
        ops::resolve_tool(OpTool::Kubectl, &none, Some(&path)).unwrap(),
        b.join("kubectl")
    );
    // A bare name in [tools] is looked up on PATH.
    let bare = ToolsConfig {
        kubectl: Some("kubectl-1.29".into()),
        ..Default::default()
    };
    assert_eq!(
        ops::resolve_tool(OpTool::Kubectl, &bare, Some(&path)).unwrap(),
        b.join("kubectl-1.29")
    );

    // Not on PATH: the error says where it looked and how to fix it.
    let e = ops::resolve_tool(OpTool::Psql, &none, Some(&path)).unwrap_err();
    match &e {
        OpError::ToolNotFound {
            tool: OpTool::Psql,
            searched,
            ..
        } => assert_eq!(searched, &[c.clone(), b.clone()]),
        e => panic!("{e:?}"),
    }
    let api = e.to_api_error();
    assert!(
        api.message
            .contains("no `psql` executable on the agent's PATH (searched 2 directories)"),
        "{api}"
    );
    assert!(api.hint.contains("[tools]"), "{api}");
    assert!(matches!(
        ops::resolve_tool(OpTool::Psql, &none, None),
        Err(OpError::ToolNotFound { .. })
    ));

    // A configured path that is missing or not executable is an error, not a PATH fallback.
    for p in [a.join("nope"), c.join("kubectl")] {
        let tools = ToolsConfig {
            kubectl: Some(p.clone()),
            ..Default::default()
        };
        let e = ops::resolve_tool(OpTool::Kubectl, &tools, Some(&path)).unwrap_err();
        assert!(
            e.to_string().contains("the [tools] entry for `kubectl`"),
            "{e}"
        );
        assert!(e.to_string().contains(&*p.to_string_lossy()), "{e}");
    }
}

/// An op that escapes every way a process can: a `setsid` child, a double fork into a new
/// session, a `nohup`ed child, and a shell that ignores SIGTERM and SIGHUP. Each writes its
/// PID to a file in `$1`, then the tool says "started" and waits.
const ESCAPES: &str = r#"
setsid sleep 300 &
echo $! > "$1/setsid"
setsid sh -c 'sleep 300 & echo $! > "$1/double"' sh "$1" &
nohup sleep 300 > /dev/null 2>&1 &
echo $! > "$1/nohup"
sh -c 'trap "" TERM HUP INT; echo $$ > "$1/trap"; while :; do sleep 1; done' sh "$1" &
for f in setsid double nohup trap; do
  while [ ! -s "$1/$f" ]; do sleep 0.02; done
done
echo started
sleep 300
"#;

const ESCAPE_NAMES: [&str; 4] = ["setsid", "double", "nohup", "trap"];

fn escapes_script() -> PathBuf {
    let path = scripts().join("escapes");
    // Written once per process (see `scripts`); later callers find it.
    static WRITTEN: OnceLock<()> = OnceLock::new();
    WRITTEN.get_or_init(|| write_executable(&path, &format!("#!/bin/sh\n{ESCAPES}")));
    path
}

/// Runs the escapes op under `confine`, ends it by timeout (`cancel_after: None`) or by
/// cancellation, and checks by PID that none of the escaped processes survived.
async fn escapes_end_with_the_op(confine: Confinement, cancel_after_start: bool) {
    let exe = escapes_script();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let cwd = tempfile::tempdir().unwrap();
    if let Some(u) = &confine.user {
        std::os::unix::fs::chown(cwd.path(), Some(u.uid), Some(u.gid)).unwrap();
    }
    let timeout = if cancel_after_start {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(4)
    };
    let s = spec(timeout);
    let argv = argv(&format!("kubectl '{}'", dir.path().display()));
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel(16);
    let (c, cwd_path) = (cancel.clone(), cwd.path().to_path_buf());
    let task = tokio::spawn(async move {
        ops::run_confined(&s, &exe, &argv, &[], &cwd_path, &confine, &c, Some(tx)).await
    });
    recv_until(&mut rx, "started\n").await;
    let pids: Vec<(&str, i32)> = ESCAPE_NAMES
        .iter()
        .map(|n| (*n, read_pid(&dir.path().join(n))))
        .collect();
    for (name, pid) in &pids {
        assert!(
            !wait_dead_within(*pid, Duration::from_millis(50)).await,
            "{name} ({pid}) should run before the op ends"
        );
    }
    if cancel_after_start {
        cancel.cancel();
    }
    let o = tokio::time::timeout(BOUND, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (o.timed_out, o.cancelled),
        (!cancel_after_start, cancel_after_start)
    );
    for (name, pid) in pids {
        assert!(
            wait_dead(pid).await,
            "the {name} process ({pid}) survived the op's end"
        );
    }
}

async fn wait_dead_within(pid: i32, limit: Duration) -> bool {
    tokio::time::timeout(limit, wait_dead(pid))
        .await
        .unwrap_or(false)
}

#[tokio::test]
async fn escaped_processes_die_on_timeout_in_the_ops_cgroup() {
    let c = Confinement::detect(None).unwrap();
    eprintln!("{}", c.describe());
    escapes_end_with_the_op(c, false).await;
}

#[tokio::test]
async fn escaped_processes_die_on_cancel_in_the_ops_cgroup() {
    escapes_end_with_the_op(Confinement::detect(None).unwrap(), true).await;
}

#[tokio::test]
async fn escaped_processes_die_on_timeout_without_cgroups() {
    escapes_end_with_the_op(Confinement::without_cgroups(None), false).await;
}

#[tokio::test]
async fn escaped_processes_die_on_cancel_without_cgroups() {
    escapes_end_with_the_op(Confinement::without_cgroups(None), true).await;
}

#[tokio::test]
async fn escaped_processes_of_the_ops_user_die_too() {
    let user = ensure_ops_user();
    escapes_end_with_the_op(
        Confinement {
            user: Some(user.clone()),
            ..Confinement::detect(None).unwrap()
        },
        true,
    )
    .await;
    escapes_end_with_the_op(Confinement::without_cgroups(Some(user)), false).await;
}

#[tokio::test]
async fn escaped_processes_die_with_the_op_through_the_launcher() {
    let c = launched(Confinement::detect(None).unwrap());
    escapes_end_with_the_op(c.clone(), false).await;
    escapes_end_with_the_op(c, true).await;
    escapes_end_with_the_op(launched(Confinement::without_cgroups(None)), false).await;
    let user = ensure_ops_user();
    escapes_end_with_the_op(
        launched(Confinement {
            user: Some(user.clone()),
            ..Confinement::detect(None).unwrap()
        }),
        true,
    )
    .await;
    escapes_end_with_the_op(launched(Confinement::without_cgroups(Some(user))), false).await;
}

#[tokio::test]
async fn an_op_run_as_the_ops_user_cannot_read_secrets_or_write_the_trail() {
    let user = ensure_ops_user();
    for launcher in [false, true] {
        let confine = Confinement {
            user: Some(user.clone()),
            ..Confinement::detect(None).unwrap()
        };
        let confine = if launcher { launched(confine) } else { confine };
        ops_user_is_confined(&user, &confine).await;
    }
}

async fn ops_user_is_confined(user: &tunnel_client::op_sandbox::OpsUser, confine: &Confinement) {
    let secrets = tempfile::tempdir().unwrap();
    std::fs::set_permissions(secrets.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // What an appliance holds, each root-owned 0600 as the README asks (the agent's key and the
    // trail are written so by the agent itself).
    let files = [
        "agent.key",
        "agent.toml",
        "admin_password",
        "vm_key",
        "audit.jsonl",
    ];
    for f in files {
        let p = secrets.path().join(f);
        std::fs::write(&p, format!("secret {f}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let probe = scripts().join("probe");
    static WRITTEN: OnceLock<()> = OnceLock::new();
    WRITTEN.get_or_init(|| {
        write_executable(
            &probe,
            "#!/bin/sh\nid -u\nfor f in agent.key agent.toml admin_password vm_key audit.jsonl; do\n\
             if cat \"$1/$f\" 2>/dev/null; then echo \"read $f\"; else echo \"denied read $f\"; fi\ndone\n\
             if echo forged >> \"$1/audit.jsonl\" 2>/dev/null; then echo 'wrote trail'; else echo 'denied write trail'; fi\n\
             if sudo -n true 2>/dev/null || su -c true root </dev/null 2>/dev/null; then echo 'became root'; fi\n\
             echo \"home=$HOME\"\ntouch \"$HOME/mine\" && echo 'home writable'\n",
        )
    });
    let cwd = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(cwd.path(), Some(user.uid), Some(user.gid)).unwrap();
    let argv = argv(&format!("kubectl '{}'", secrets.path().display()));
    let (s, cancel) = (spec(Duration::from_secs(30)), CancellationToken::new());
    let fut = ops::run_confined(&s, &probe, &argv, &[], cwd.path(), confine, &cancel, None);
    let o = tokio::time::timeout(BOUND, fut).await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(user.uid.to_string().as_str()), "{out}");
    for f in files {
        assert!(
            out.contains(&format!("denied read {f}")) && !out.contains("secret "),
            "{f}: {out}"
        );
    }
    assert!(
        out.contains("denied write trail") && !out.contains("became root"),
        "{out}"
    );
    assert!(
        out.contains(&format!("home={}", cwd.path().display())) && out.contains("home writable"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(secrets.path().join("audit.jsonl")).unwrap(),
        "secret audit.jsonl\n"
    );
}
