//! One-off ops through the real agent, driven by a minimal in-process gateway: the agent's own
//! checks (grant, resource, policy, tool), streamed output, held output (fetch as preview,
//! release, destroy), and the customer's trail. The tool is a shell script registered under
//! `[tools]` (a script may *be* the tool; the agent itself never runs a shell).

mod support;

use endpoint_types::{
    api::AuditRecord,
    control::{GrantLevel, OpTool},
    frame::{Hello, OpDispatch, OpFinished, OutputStream, ToAgent, ToGateway},
    ErrorCode,
};
use jiff::Timestamp;
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};
use support::{edit_config, ensure_ops_user, live_grant, trail_until, Control, Gateway};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnel_client::{audit, config::AgentConfig, tunnel};

/// Upper bound for anything a test awaits, so a bug fails the test instead of hanging it.
const T: Duration = Duration::from_secs(20);
const KUBE: &str = "aws_eks_cluster.main";

/// The `kubectl` the appliance's `[tools]` names: its first argument picks the behaviour.
const KUBE_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
get)
  echo "args: $*"
  echo "op=$POSTERN_OP_ID res=$POSTERN_RESOURCE_ID kc=$KUBECONFIG"
  echo "cwd=$(pwd)"
  printf 'euro: \342\202'
  sleep 0.3
  printf '\254 done\n'
  echo "a warning" >&2
  ;;
fail)
  echo "partial"
  echo "boom" >&2
  exit 3
  ;;
sleep)
  echo "sleeping"
  sleep 30
  echo "never"
  ;;
configure)
  echo "profile=$AWS_PROFILE region=$AWS_REGION config=$AWS_CONFIG_FILE"
  cat "$AWS_CONFIG_FILE" "$AWS_SHARED_CREDENTIALS_FILE"
  if cat "$3" > /dev/null 2>&1; then echo "read the original"; fi
  ;;
probe)
  shift
  echo "uid=$(id -u) home=$HOME"
  for f in "$@"; do
    if cat "$f" > /dev/null 2>&1; then echo "read $f"; else echo "denied $f"; fi
  done
  if echo forged >> "$1" 2>/dev/null; then echo "wrote the trail"; else echo "denied writing the trail"; fi
  ;;
escape)
  setsid sleep 300 &
  echo $! > "$2/setsid"
  setsid sh -c 'sleep 300 & echo $! > "$1/double"' sh "$2" &
  nohup sleep 300 > /dev/null 2>&1 &
  echo $! > "$2/nohup"
  sh -c 'trap "" TERM HUP INT; echo $$ > "$1/trap"; while :; do sleep 1; done' sh "$2" &
  for f in setsid double nohup trap; do
    while [ ! -s "$2/$f" ]; do sleep 0.02; done
  done
  echo started
  sleep 300
  ;;
esac
"#;

/// Written once, before any test spawns a process: writing an executable while another thread
/// forks can leave the file "busy" (ETXTBSY) for a moment.
fn kube_script() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        for old in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            let name = old.file_name().to_string_lossy().into_owned();
            if name
                .strip_prefix("op_dispatch-")
                .is_some_and(|pid| !Path::new("/proc").join(pid).exists())
            {
                let _ = std::fs::remove_dir_all(old.path());
            }
        }
        let dir = tmp.join(format!("op_dispatch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kubectl");
        std::fs::write(&path, KUBE_SCRIPT).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    })
}

/// A gateway that expects the kubernetes resource in the hello and answers heartbeats.
const CONTROL: Control = Control {
    check_hello,
    lost_after_ms: 2000,
    answer_heartbeats: true,
};

fn check_hello(hello: &Hello) {
    assert!(hello.resources.iter().any(|r| r.id == KUBE));
}

/// stdout and stderr of output frames, checking each frame's `preview`.
fn output(frames: &[(Instant, ToGateway)], preview: bool) -> (String, String) {
    let (mut out, mut err) = (String::new(), String::new());
    for (_, f) in frames {
        if let ToGateway::OpOutput {
            stream,
            data,
            preview: p,
            ..
        } = f
        {
            assert_eq!(*p, preview, "{f:?}");
            match stream {
                OutputStream::Stdout => out.push_str(data),
                OutputStream::Stderr => err.push_str(data),
            }
        }
    }
    (out, err)
}

fn finished(frames: &[(Instant, ToGateway)]) -> &OpFinished {
    match frames.last() {
        Some((_, ToGateway::OpFinished(f))) => f,
        other => panic!("expected the op's end, got {other:?}"),
    }
}

fn dispatch(op_id: &str, command: &str, approved_by: &str) -> OpDispatch {
    OpDispatch {
        phase: endpoint_types::phase::operate(),
        op_id: op_id.into(),
        tool: OpTool::Kubectl,
        command: command.into(),
        resource_id: KUBE.into(),
        timeout_s: 30,
        operator: "alice@vendor.example".into(),
        grant_id: "gr_1".into(),
        command_approved_by: approved_by.into(),
        command_approved_at: Timestamp::now(),
        hold_output: false,
        signed_decision: None,
    }
}

struct Agent {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    audit_path: PathBuf,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), tunnel::TunnelError>>,
}

impl Agent {
    /// Enrolls an agent with `approval` as its policy and runs it against `gw`.
    async fn start(gw: &Gateway, approval: &str) -> Agent {
        Agent::start_with(gw, approval, "").await
    }

    /// [`Agent::start`] with `extra` appended to agent.toml.
    async fn start_with(gw: &Gateway, approval: &str, extra: &str) -> Agent {
        let script = kube_script();
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("agent.toml");
        gw.enroll(&config_path).await.unwrap();
        let kubeconfig = dir.path().join("main.kubeconfig");
        std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n").unwrap();
        edit_config(&config_path, |text| {
            assert!(text.contains("approval = \"manual\""), "{text}");
            let mut text = text.replace(
                "approval = \"manual\"",
                &format!("approval = \"{approval}\""),
            );
            text.push_str(&format!(
                "\n[tools]\nkubectl = \"{0}\"\naws = \"{0}\"\n\n[[resource]]\nid = \"{KUBE}\"\nkind = \"kubernetes\"\nkubeconfig = \"{1}\"\nnamespaces = [\"my-app-prod\"]\n\n[[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:7\"\n",
                script.display(),
                kubeconfig.display()
            ));
            text.push_str(extra);
            text
        });
        let config = AgentConfig::load(&config_path).unwrap();
        let audit_path = config.audit_path.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tunnel::run(config, shutdown.clone(), None));
        Agent {
            dir,
            kubeconfig,
            audit_path,
            shutdown,
            task,
        }
    }

    /// Stops the agent; the returned directory holds its files until dropped.
    async fn stop(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        tokio::time::timeout(T, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        self.dir
    }

    /// The trail once `cond` holds (or the bound passes).
    async fn trail(&self, cond: impl Fn(&[AuditRecord]) -> bool) -> Vec<AuditRecord> {
        trail_until(&self.audit_path, T, cond).await
    }
}

fn kinds_of<'a>(records: &'a [AuditRecord], op_id: &str) -> Vec<&'a str> {
    records
        .iter()
        .filter(|r| r.op_id.as_deref() == Some(op_id))
        .map(|r| r.kind.as_str())
        .collect()
}

fn record<'a>(records: &'a [AuditRecord], op_id: &str, kind: &str) -> &'a AuditRecord {
    records
        .iter()
        .find(|r| r.op_id.as_deref() == Some(op_id) && r.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} for {op_id} in {:?}", kinds_of(records, op_id)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_policy_streams_output_and_refuses_what_the_appliance_does_not_allow() {
    kube_script();
    let gw = Gateway::start(T);
    let agent = Agent::start(&gw, "automatic").await;
    let mut link = gw.link(CONTROL).await;
    link.send(ToAgent::GrantSync {
        grants: vec![
            live_grant("gr_1", GrantLevel::Operate, -1, 3600),
            live_grant("gr_old", GrantLevel::Operate, -7200, -3600),
            live_grant("gr_deploy", GrantLevel::Deploy, -1, 3600),
        ],
    })
    .await;

    // Streamed as it arrives, with the resource's kubeconfig, in a private working directory.
    link.send(ToAgent::OpDispatch(dispatch(
        "op_ok",
        "kubectl get pods -n 'my app'",
        "policy:automatic",
    )))
    .await;
    let frames = link.until_end("op_ok").await;
    assert!(
        matches!(frames[0].1, ToGateway::OpStarted { .. }),
        "{:?}",
        frames[0]
    );
    let (out, err) = output(&frames, false);
    assert!(out.contains("args: get pods -n my app\n"), "{out}");
    // KUBECONFIG is the op's own (its scoped proxy, in its working directory), never the appliance's.
    let kc = out
        .lines()
        .find_map(|l| l.strip_prefix(&format!("op=op_ok res={KUBE} kc=")))
        .unwrap_or_else(|| panic!("{out}"));
    let op_cwd = out
        .lines()
        .find_map(|l| l.strip_prefix("cwd="))
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(Path::new(kc), Path::new(op_cwd).join("kubeconfig"), "{out}");
    assert_ne!(Path::new(kc), agent.kubeconfig.as_path());
    // The euro sign was split across two reads 300 ms apart and still arrives whole.
    assert!(
        out.contains("euro: € done\n") && !out.contains('\u{FFFD}'),
        "{out:?}"
    );
    assert_eq!(err, "a warning\n");
    let cwd = out.lines().find_map(|l| l.strip_prefix("cwd=")).unwrap();
    assert!(Path::new(cwd).starts_with(std::env::temp_dir()), "{cwd}");
    assert!(
        !Path::new(cwd).exists(),
        "the op's working directory is removed afterwards"
    );
    let f = finished(&frames);
    assert_eq!(
        (
            f.held,
            f.exit_code,
            f.truncated,
            f.timed_out,
            f.preview,
            f.destroyed
        ),
        (false, Some(0), false, false, false, false)
    );
    assert!(f.error.is_none(), "{:?}", f.error);
    let first_output = frames
        .iter()
        .find(|(_, f)| matches!(f, ToGateway::OpOutput { .. }))
        .unwrap()
        .0;
    assert!(
        frames.last().unwrap().0 - first_output >= Duration::from_millis(150),
        "output is streamed, not sent at the end"
    );

    // A non-zero exit: COMMAND_FAILED with the exit code and stderr.
    link.send(ToAgent::OpDispatch(dispatch(
        "op_fail",
        "kubectl fail",
        "policy:automatic",
    )))
    .await;
    let frames = link.until_end("op_fail").await;
    assert_eq!(
        output(&frames, false),
        ("partial\n".to_string(), "boom\n".to_string())
    );
    let f = finished(&frames);
    assert_eq!((f.held, f.exit_code, f.timed_out), (false, Some(3), false));
    let e = f.error.as_ref().unwrap();
    assert_eq!(e.code, ErrorCode::CommandFailed);
    assert_eq!(
        (
            e.details["exit_code"].as_i64(),
            e.details["stderr"].as_str()
        ),
        (Some(3), Some("boom\n"))
    );

    // Past its timeout the op is killed: timed_out, COMMAND_TIMEOUT.
    let started = Instant::now();
    link.send(ToAgent::OpDispatch(OpDispatch {
        timeout_s: 1,
        ..dispatch("op_slow", "kubectl sleep", "policy:automatic")
    }))
    .await;
    let frames = link.until_end("op_slow").await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(output(&frames, false).0, "sleeping\n");
    let f = finished(&frames);
    assert!(f.timed_out && f.exit_code.is_none(), "{f:?}");
    assert_eq!(
        f.error.as_ref().map(|e| e.code),
        Some(ErrorCode::CommandTimeout)
    );

    // An op does not outlive its operate grant: stopped when the grant expires by the agent's
    // clock, and when the gateway's grant set no longer has it (revoked).
    let mut grants = vec![
        live_grant("gr_1", GrantLevel::Operate, -1, 3600),
        live_grant("gr_old", GrantLevel::Operate, -7200, -3600),
        live_grant("gr_deploy", GrantLevel::Deploy, -1, 3600),
        live_grant("gr_short", GrantLevel::Operate, -1, 2),
        live_grant("gr_revoked", GrantLevel::Operate, -1, 3600),
    ];
    link.send(ToAgent::GrantSync {
        grants: grants.clone(),
    })
    .await;
    let short_dir = tempfile::tempdir().unwrap();
    let mut short = dispatch(
        "op_short",
        &format!("kubectl escape {}", short_dir.path().display()),
        "policy:automatic",
    );
    short.grant_id = "gr_short".into();
    let started = Instant::now();
    link.send(ToAgent::OpDispatch(short)).await;
    let frames = link.until_end("op_short").await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped at the grant's end: {:?}",
        started.elapsed()
    );
    let f = finished(&frames);
    assert!(!f.timed_out && f.exit_code.is_none(), "{f:?}");
    let e = f.error.as_ref().unwrap();
    assert_eq!(e.code, ErrorCode::CommandFailed);
    assert!(e.message.contains("stopped in the appliance"), "{e}");
    // Everything the op started died with it at the grant's end: setsid, double-forked,
    // nohup'ed and SIGTERM-ignoring processes alike.
    escapes_are_dead(short_dir.path()).await;
    let revoked_dir = tempfile::tempdir().unwrap();
    let mut revoked = dispatch(
        "op_revoked",
        &format!("kubectl escape {}", revoked_dir.path().display()),
        "policy:automatic",
    );
    revoked.grant_id = "gr_revoked".into();
    link.send(ToAgent::OpDispatch(revoked)).await;
    assert!(matches!(link.next().await.1, ToGateway::OpStarted { .. }));
    // Revoked once every escape runs (the tool says "started" then).
    loop {
        match link.next().await.1 {
            ToGateway::OpOutput { data, .. } if data.contains("started") => break,
            ToGateway::OpOutput { .. } => {}
            other => panic!("expected the op's output, got {other:?}"),
        }
    }
    grants.pop();
    link.send(ToAgent::GrantSync { grants }).await;
    let frames = link.until_end("op_revoked").await;
    assert_eq!(
        finished(&frames).error.as_ref().map(|e| e.code),
        Some(ErrorCode::CommandFailed)
    );
    escapes_are_dead(revoked_dir.path()).await;

    // A tool runs only against a resource of its kind, whatever the gateway sent.
    let mut kind = dispatch("op_kind", "kubectl get pods", "policy:automatic");
    kind.resource_id = "null_resource.echo".into();
    link.send(ToAgent::OpDispatch(kind)).await;
    let e = link.refusal("op_kind").await;
    assert_eq!(e.code, ErrorCode::InvalidOriginResourceId);
    assert!(
        e.message.contains("is a tcp resource") && e.hint.contains("takes no one-off ops"),
        "{e}"
    );

    // Refused in the appliance, whatever the gateway says: nothing starts.
    let mut unknown = dispatch("op_nogrant", "kubectl get pods", "policy:automatic");
    unknown.grant_id = "gr_unknown".into();
    link.send(ToAgent::OpDispatch(unknown)).await;
    let e = link.refusal("op_nogrant").await;
    assert_eq!(e.code, ErrorCode::OperateAccessRequired);
    assert!(
        e.hint
            .contains("postern access request --app shop --customer acme --level operate"),
        "{}",
        e.hint
    );
    // A refused op may be dispatched again (here under a live grant), and then it runs.
    link.send(ToAgent::OpDispatch(dispatch(
        "op_nogrant",
        "kubectl fail",
        "policy:automatic",
    )))
    .await;
    assert_eq!(
        finished(&link.until_end("op_nogrant").await).exit_code,
        Some(3)
    );
    let mut expired = dispatch("op_expired", "kubectl get pods", "policy:automatic");
    expired.grant_id = "gr_old".into();
    link.send(ToAgent::OpDispatch(expired)).await;
    assert_eq!(
        link.refusal("op_expired").await.code,
        ErrorCode::OperateAccessExpired
    );
    let mut deploy = dispatch("op_deploy", "kubectl get pods", "policy:automatic");
    deploy.grant_id = "gr_deploy".into();
    link.send(ToAgent::OpDispatch(deploy)).await;
    assert_eq!(
        link.refusal("op_deploy").await.code,
        ErrorCode::OperateAccessRequired
    );
    link.send(ToAgent::OpDispatch(dispatch(
        "op_tool",
        "rm -rf /",
        "policy:automatic",
    )))
    .await;
    let e = link.refusal("op_tool").await;
    assert_eq!(e.code, ErrorCode::ForbiddenByScope);
    assert!(e.message.contains("starts with `rm`"), "{e}");
    link.send(ToAgent::OpDispatch(dispatch(
        "op_shell",
        "kubectl get pods | sh",
        "policy:automatic",
    )))
    .await;
    assert_eq!(
        link.refusal("op_shell").await.code,
        ErrorCode::InvalidRequest
    );
    let mut other = dispatch("op_res", "kubectl get pods", "policy:automatic");
    other.resource_id = "aws_db_instance.nope".into();
    link.send(ToAgent::OpDispatch(other)).await;
    assert_eq!(
        link.refusal("op_res").await.code,
        ErrorCode::InvalidOriginResourceId
    );
    // An approval is used once: the same op id does not run twice.
    link.send(ToAgent::OpDispatch(dispatch(
        "op_ok",
        "kubectl get pods",
        "policy:automatic",
    )))
    .await;
    assert_eq!(link.refusal("op_ok").await.code, ErrorCode::Conflict);
    link.quiet().await;

    let records = agent
        .trail(|r| {
            r.iter()
                .any(|r| r.op_id.as_deref() == Some("op_ok") && r.kind == "op.refused")
        })
        .await;
    assert_eq!(
        kinds_of(&records, "op_ok"),
        [
            "op.dispatched",
            "op.started",
            "op.finished",
            "op.dispatched",
            "denied",
            "op.refused"
        ]
    );
    let d = record(&records, "op_ok", "op.dispatched");
    assert_eq!(d.actor, "alice@vendor.example");
    assert_eq!(d.detail["command"], "kubectl get pods -n 'my app'");
    assert_eq!(
        (d.detail["tool"].as_str(), d.detail["resource_id"].as_str()),
        (Some("kubectl"), Some(KUBE))
    );
    assert_eq!(
        (
            d.detail["grant_id"].as_str(),
            d.detail["command_approved_by"].as_str()
        ),
        (Some("gr_1"), Some("policy:automatic"))
    );
    let fin = record(&records, "op_ok", "op.finished");
    assert_eq!(
        (
            fin.detail["exit_code"].as_i64(),
            fin.detail["held"].as_bool()
        ),
        (Some(0), Some(false))
    );
    assert!(
        fin.detail["duration_ms"].as_u64().unwrap() >= 300,
        "{}",
        fin.detail
    );
    let fin = record(&records, "op_slow", "op.finished");
    assert_eq!(fin.detail["timed_out"], true);
    for op in ["op_short", "op_revoked"] {
        let fin = record(&records, op, "op.finished");
        assert_eq!(
            (
                fin.detail["cancelled"].as_bool(),
                fin.detail["cancel_reason"].as_str()
            ),
            (Some(true), Some("operate grant ended"))
        );
    }
    assert_eq!(
        kinds_of(&records, "op_nogrant"),
        [
            "op.dispatched",
            "denied",
            "op.refused",
            "op.dispatched",
            "op.started",
            "op.finished"
        ]
    );
    assert_eq!(
        record(&records, "op_nogrant", "denied").detail["reason"],
        "OPERATE_ACCESS_REQUIRED"
    );
    assert_eq!(
        record(&records, "op_tool", "op.refused").detail["code"],
        "FORBIDDEN_BY_SCOPE"
    );
    assert_eq!(
        kinds_of(&records, "op_shell"),
        ["op.dispatched", "op.refused"]
    );
    assert_eq!(
        kinds_of(&records, "op_kind"),
        ["op.dispatched", "denied", "op.refused"]
    );
    let denied = record(&records, "op_kind", "denied");
    assert_eq!(denied.detail["reason"], "INVALID_ORIGIN_RESOURCE_ID");
    assert!(
        denied.detail["message"]
            .as_str()
            .unwrap()
            .contains("is a tcp resource"),
        "{}",
        denied.detail
    );

    drop(link);
    let path = agent.audit_path.clone();
    let _dir = agent.stop().await;
    assert!(audit::verify_file(&path).unwrap() as usize >= records.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_policy_holds_output_in_the_appliance_until_released_or_destroyed() {
    kube_script();
    let gw = Gateway::start(T);
    let agent = Agent::start(&gw, "manual").await;
    let mut link = gw.link(CONTROL).await;
    link.send(ToAgent::GrantSync {
        grants: vec![live_grant("gr_1", GrantLevel::Operate, -1, 3600)],
    })
    .await;

    // The policy approved it, but the appliance's policy wants a person.
    link.send(ToAgent::OpDispatch(dispatch(
        "op_auto",
        "kubectl get pods",
        "policy:automatic",
    )))
    .await;
    let e = link.refusal("op_auto").await;
    assert_eq!(e.code, ErrorCode::ApprovalDenied);
    assert!(e.message.contains("requires a person's approval"), "{e}");
    assert_eq!(
        e.hint,
        "an approver runs `postern approvals approve op_auto`"
    );

    // A person approved it: it runs, and its output stays in the appliance even though the
    // gateway did not ask to hold it. Only "started" and "finished, held" leave.
    link.send(ToAgent::OpDispatch(dispatch(
        "op_h1",
        "kubectl get pods",
        "carol@acme.example",
    )))
    .await;
    let frames = link.until_end("op_h1").await;
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert!(matches!(frames[0].1, ToGateway::OpStarted { .. }));
    let f = finished(&frames);
    assert_eq!(
        f,
        &OpFinished {
            op_id: "op_h1".into(),
            held: true,
            exit_code: None,
            truncated: false,
            timed_out: false,
            error: None,
            preview: false,
            destroyed: false
        }
    );
    link.quiet().await;

    // An approver looks: the preview, and it stays held.
    for _ in 0..2 {
        link.send(ToAgent::OutputFetch {
            op_id: "op_h1".into(),
        })
        .await;
        let frames = link.until_end("op_h1").await;
        let (out, err) = output(&frames, true);
        assert!(
            out.contains("euro: € done\n") && out.contains("args: get pods"),
            "{out}"
        );
        assert_eq!(err, "a warning\n");
        let f = finished(&frames);
        assert_eq!(
            (f.preview, f.held, f.exit_code, f.destroyed),
            (true, true, Some(0), false)
        );
    }

    // Released: the output leaves, then the op's real end; then it is gone.
    link.send(ToAgent::OutputRelease {
        op_id: "op_h1".into(),
        approved_by: "carol@acme.example".into(),
        signed_decision: None,
    })
    .await;
    let frames = link.until_end("op_h1").await;
    let (out, err) = output(&frames, false);
    assert!(out.contains("euro: € done\n"), "{out}");
    assert_eq!(err, "a warning\n");
    let f = finished(&frames);
    assert_eq!(
        (f.preview, f.held, f.exit_code, f.error.is_none()),
        (false, false, Some(0), true)
    );
    link.send(ToAgent::OutputFetch {
        op_id: "op_h1".into(),
    })
    .await;
    let e = link.refusal("op_h1").await;
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(
        e.message
            .contains("released, destroyed, or the agent restarted"),
        "{e}"
    );

    // A failing op is held too: not even its exit code leaves.
    link.send(ToAgent::OpDispatch(dispatch(
        "op_h2",
        "kubectl fail",
        "carol@acme.example",
    )))
    .await;
    let frames = link.until_end("op_h2").await;
    assert_eq!(frames.len(), 2, "{frames:?}");
    let f = finished(&frames);
    assert!(
        f.held && f.exit_code.is_none() && f.error.is_none(),
        "{f:?}"
    );

    // Held output outlives the connection: after a reconnect the agent says again that it waits.
    link.conn.close(0u32.into(), b"gateway restarting");
    let mut link = gw.link(CONTROL).await;
    let frames = link.until_end("op_h2").await;
    let f = finished(&frames);
    assert!(
        f.held && !f.preview && f.exit_code.is_none() && f.error.is_none(),
        "{f:?}"
    );
    link.send(ToAgent::OutputFetch {
        op_id: "op_h2".into(),
    })
    .await;
    let frames = link.until_end("op_h2").await;
    assert_eq!(
        output(&frames, true),
        ("partial\n".to_string(), "boom\n".to_string())
    );
    let f = finished(&frames);
    assert_eq!(
        (f.exit_code, f.error.as_ref().map(|e| e.code)),
        (Some(3), Some(ErrorCode::CommandFailed))
    );

    // Denied: destroyed in the appliance; nothing can fetch or release it afterwards.
    link.send(ToAgent::OutputDestroy {
        op_id: "op_h2".into(),
        denied_by: "dave@acme.example".into(),
        message: Some("not today".into()),
    })
    .await;
    let frames = link.until_end("op_h2").await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    let f = finished(&frames);
    assert!(
        f.destroyed && !f.held && f.exit_code.is_none() && f.error.is_none(),
        "{f:?}"
    );
    link.send(ToAgent::OutputFetch {
        op_id: "op_h2".into(),
    })
    .await;
    assert_eq!(link.refusal("op_h2").await.code, ErrorCode::NotFound);
    link.send(ToAgent::OutputRelease {
        op_id: "op_h2".into(),
        approved_by: "carol@acme.example".into(),
        signed_decision: None,
    })
    .await;
    assert_eq!(link.refusal("op_h2").await.code, ErrorCode::NotFound);
    link.quiet().await;

    let records = agent
        .trail(|r| r.iter().any(|r| r.kind == "output.destroyed"))
        .await;
    assert_eq!(
        kinds_of(&records, "op_auto"),
        ["op.dispatched", "denied", "op.refused"]
    );
    assert_eq!(
        record(&records, "op_auto", "denied").detail["reason"],
        "APPROVAL_DENIED"
    );
    assert_eq!(
        kinds_of(&records, "op_h1"),
        [
            "op.dispatched",
            "op.started",
            "op.finished",
            "output.previewed",
            "output.previewed",
            "output.released",
            // The preview after the release: refused by the op state machine, and said so.
            "denied"
        ]
    );
    let late = record(&records, "op_h1", "denied");
    assert_eq!(
        (
            late.detail["action"].as_str(),
            late.detail["state"].as_str(),
            late.detail["event"].as_str()
        ),
        (
            Some("output.preview"),
            Some("completed"),
            Some("output-previewed")
        )
    );
    assert_eq!(
        record(&records, "op_h1", "op.finished").detail["held"],
        true
    );
    let released = record(&records, "op_h1", "output.released");
    assert_eq!(
        (
            released.actor.as_str(),
            released.detail["approved_by"].as_str()
        ),
        ("carol@acme.example", Some("carol@acme.example"))
    );
    let destroyed = record(&records, "op_h2", "output.destroyed");
    assert_eq!(destroyed.actor, "dave@acme.example");
    assert_eq!(
        (
            destroyed.detail["denied_by"].as_str(),
            destroyed.detail["message"].as_str()
        ),
        (Some("dave@acme.example"), Some("not today"))
    );
    // The customer's trail records what ran, not the output itself.
    let text = std::fs::read_to_string(&agent.audit_path).unwrap();
    assert!(
        !text.contains("euro") && !text.contains("boom"),
        "output must not be in the trail"
    );

    drop(link);
    let path = agent.audit_path.clone();
    let _dir = agent.stop().await;
    assert!(audit::verify_file(&path).unwrap() as usize >= records.len());
}

/// Each escaped process of the `escape` tool (its PID in `dir`) is gone, or a zombie, within
/// a bounded wait.
async fn escapes_are_dead(dir: &Path) {
    for name in ["setsid", "double", "nohup", "trap"] {
        let pid: i32 = std::fs::read_to_string(dir.join(name))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, rest)| rest.trim_start().chars().next())
                });
            if matches!(state, None | Some('Z' | 'X')) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the {name} process ({pid}) outlived its op"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_ops_user_an_op_reads_none_of_the_agents_secrets_nor_writes_its_trail() {
    let user = ensure_ops_user();
    let gw = Gateway::start(T);
    let agent = Agent::start_with(
        &gw,
        "automatic",
        &format!("\n[ops]\nuser = \"{}\"\n", user.name),
    )
    .await;
    let mut link = gw.link(CONTROL).await;
    link.send(ToAgent::GrantSync {
        grants: vec![live_grant("gr_1", GrantLevel::Operate, -1, 3600)],
    })
    .await;
    // Only the files' own modes protect them: the directory is open to everyone.
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = AgentConfig::load(&agent.dir.path().join("agent.toml")).unwrap();
    let key = config.key_file.clone().unwrap();
    let secrets = [
        agent.audit_path.clone(),
        agent.dir.path().join("agent.toml"),
        key,
        agent.kubeconfig.clone(),
    ];
    // As the README asks of the customer: secrets root-owned 0600 (the agent writes its key and trail so).
    for f in &secrets[1..] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    assert_eq!(
        std::fs::metadata(&secrets[0]).unwrap().permissions().mode() & 0o777,
        0o600,
        "the trail"
    );
    let args: Vec<String> = secrets
        .iter()
        .map(|p| format!("'{}'", p.display()))
        .collect();
    link.send(ToAgent::OpDispatch(dispatch(
        "op_probe",
        &format!("kubectl probe {}", args.join(" ")),
        "policy:automatic",
    )))
    .await;
    let frames = link.until_end("op_probe").await;
    let (out, err) = output(&frames, false);
    assert!(
        out.starts_with(&format!("uid={} home=/", user.uid)),
        "{out}{err}"
    );
    for f in &secrets {
        assert!(
            out.contains(&format!("denied {}", f.display())),
            "{}: {out}",
            f.display()
        );
    }
    assert!(
        out.contains("denied writing the trail")
            && !out.contains("read ")
            && !out.contains("wrote"),
        "{out}"
    );
    assert_eq!(finished(&frames).exit_code, Some(0));
    let records = agent
        .trail(|r| {
            r.iter()
                .any(|r| r.op_id.as_deref() == Some("op_probe") && r.kind == "op.finished")
        })
        .await;
    assert_eq!(
        record(&records, "op_probe", "op.started").detail["run_as"],
        user.name.as_str()
    );
    drop(link);
    let path = agent.audit_path.clone();
    let _dir = agent.stop().await;
    // Nothing was forged into the trail: its chain still verifies, record for record.
    assert!(audit::verify_file(&path).unwrap() as usize >= records.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_op_gets_copies_of_its_resources_credentials_only() {
    let user = ensure_ops_user();
    let creds = tempfile::tempdir().unwrap();
    std::fs::set_permissions(creds.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (config, credentials) = (
        creds.path().join("config"),
        creds.path().join("credentials"),
    );
    std::fs::write(&config, "[profile vendor]\nregion = eu-west-1\n").unwrap();
    std::fs::write(&credentials, "[vendor]\naws_access_key_id = AKIAEXAMPLE\n").unwrap();
    for f in [&config, &credentials] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let extra = format!(
        "\n[[resource]]\nid = \"aws_account.main\"\nkind = \"cloud\"\naws_profile = \"vendor\"\naws_region = \"eu-west-1\"\n\
         aws_role_arn = \"arn:aws:iam::123456789012:role/vendor-ops\"\naws_config_file = \"{}\"\naws_credentials_file = \"{}\"\n\
         \n[ops]\nuser = \"{}\"\n",
        config.display(),
        credentials.display(),
        user.name
    );
    let gw = Gateway::start(T);
    let agent = Agent::start_with(&gw, "automatic", &extra).await;
    let mut link = gw.link(CONTROL).await;
    link.send(ToAgent::GrantSync {
        grants: vec![live_grant("gr_1", GrantLevel::Operate, -1, 3600)],
    })
    .await;
    let aws = |op_id: &str, resource: &str| OpDispatch {
        tool: OpTool::Aws,
        resource_id: resource.into(),
        ..dispatch(
            op_id,
            &format!("aws configure list '{}'", credentials.display()),
            "policy:automatic",
        )
    };
    link.send(ToAgent::OpDispatch(aws("op_aws", "aws_account.main")))
        .await;
    let frames = link.until_end("op_aws").await;
    let (out, err) = output(&frames, false);
    assert_eq!(finished(&frames).exit_code, Some(0), "{out}{err}");
    assert!(
        out.starts_with("profile=postern-op region=eu-west-1 config=/"),
        "{out}"
    );
    assert!(
        out.contains(
            "role_arn = arn:aws:iam::123456789012:role/vendor-ops\nsource_profile = vendor"
        ),
        "{out}"
    );
    assert!(
        out.contains("aws_access_key_id = AKIAEXAMPLE") && !out.contains("read the original"),
        "{out}"
    );
    // The copies lived in the op's directory, which is gone with the op.
    let copy = out
        .lines()
        .next()
        .and_then(|l| l.split("config=").nth(1))
        .unwrap()
        .to_string();
    assert!(!Path::new(&copy).exists(), "{copy} outlived the op");
    // The same tool against a resource of another kind is refused in the appliance.
    link.send(ToAgent::OpDispatch(aws("op_aws_kube", KUBE)))
        .await;
    assert_eq!(
        link.refusal("op_aws_kube").await.code,
        ErrorCode::InvalidOriginResourceId
    );
    drop(link);
    let _dir = agent.stop().await;
}

/// Sets the process's file size limit (writes past it fail with EFBIG instead of SIGXFSZ):
/// a disk that is full for the trail only. Each nextest test is its own process.
fn limit_file_size(bytes: Option<u64>) {
    let limit = libc::rlimit {
        rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscalls with a valid struct.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

/// An op whose `op.dispatched` cannot be made durable does not run: the gateway gets
/// `AUDIT_UNAVAILABLE` with its hint, the agent keeps serving, and the next op runs once the
/// trail takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_is_refused_when_the_trail_cannot_be_written() {
    // The file size limit is per process: only a runner that gives each test its own process
    // (nextest, as scripts/test uses) keeps it away from other tests.
    if std::env::var_os("NEXTEST").is_none() {
        eprintln!("SKIPPED: needs its own process (run it with cargo nextest)");
        return;
    }
    kube_script();
    let gw = Gateway::start(T);
    let agent = Agent::start(&gw, "automatic").await;
    let mut link = gw.link(CONTROL).await;
    link.send(ToAgent::GrantSync {
        grants: vec![live_grant("gr_1", GrantLevel::Operate, -1, 3600)],
    })
    .await;
    agent
        .trail(|r| r.iter().any(|r| r.kind == "grant.sync"))
        .await;
    let len = std::fs::metadata(&agent.audit_path).unwrap().len();
    limit_file_size(Some(len + 16));
    link.send(ToAgent::OpDispatch(dispatch(
        "op_full",
        "kubectl get pods -n my-app-prod",
        "policy:automatic",
    )))
    .await;
    let refused = link.refusal("op_full").await;
    limit_file_size(None);
    assert_eq!(refused.code, ErrorCode::AuditUnavailable, "{refused:?}");
    assert!(refused.hint.contains("audit_path"), "{refused:?}");
    assert_eq!(std::fs::metadata(&agent.audit_path).unwrap().len(), len);

    link.send(ToAgent::OpDispatch(dispatch(
        "op_after",
        "kubectl get pods -n my-app-prod",
        "policy:automatic",
    )))
    .await;
    let frames = link.until_end("op_after").await;
    assert!(finished(&frames).error.is_none());
    let records = agent
        .trail(|r| r.iter().any(|r| r.kind == "op.finished"))
        .await;
    assert!(kinds_of(&records, "op_full").is_empty());
    let path = agent.audit_path.clone();
    let _dir = agent.stop().await;
    assert!(audit::verify_file(&path).unwrap() as usize >= records.len());
}
