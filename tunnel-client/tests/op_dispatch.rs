//! One-off ops through the real agent, driven by a minimal in-process gateway: the agent's own
//! checks (grant, resource, policy, tool), streamed output, held output (fetch as preview,
//! release, destroy), and the customer's trail. The tool is a shell script registered under
//! `[tools]` (a script may *be* the tool; the agent itself never runs a shell).

mod support;

use endpoint_types::{
    api::AuditRecord,
    control::{GrantLevel, OpTool},
    frame::{Frame, Hello, OpDispatch, OpFinished, OutputStream},
    ErrorCode,
};
use jiff::Timestamp;
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};
use support::{edit_config, live_grant, trail_until, Control, Gateway};
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
fn output(frames: &[(Instant, Frame)], preview: bool) -> (String, String) {
    let (mut out, mut err) = (String::new(), String::new());
    for (_, f) in frames {
        if let Frame::OpOutput {
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

fn finished(frames: &[(Instant, Frame)]) -> &OpFinished {
    match frames.last() {
        Some((_, Frame::OpFinished(f))) => f,
        other => panic!("expected the op's end, got {other:?}"),
    }
}

fn dispatch(op_id: &str, command: &str, approved_by: &str) -> OpDispatch {
    OpDispatch {
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
                "\n[tools]\nkubectl = \"{}\"\n\n[[resource]]\nid = \"{KUBE}\"\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespaces = [\"my-app-prod\"]\n",
                script.display(),
                kubeconfig.display()
            ));
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
    link.send(Frame::GrantSync {
        grants: vec![
            live_grant("gr_1", GrantLevel::Operate, -1, 3600),
            live_grant("gr_old", GrantLevel::Operate, -7200, -3600),
            live_grant("gr_deploy", GrantLevel::Deploy, -1, 3600),
        ],
    })
    .await;

    // Streamed as it arrives, with the resource's kubeconfig, in a private working directory.
    link.send(Frame::OpDispatch(dispatch(
        "op_ok",
        "kubectl get pods -n 'my app'",
        "policy:automatic",
    )))
    .await;
    let frames = link.until_end("op_ok").await;
    assert!(
        matches!(frames[0].1, Frame::OpStarted { .. }),
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
        .find(|(_, f)| matches!(f, Frame::OpOutput { .. }))
        .unwrap()
        .0;
    assert!(
        frames.last().unwrap().0 - first_output >= Duration::from_millis(150),
        "output is streamed, not sent at the end"
    );

    // A non-zero exit: COMMAND_FAILED with the exit code and stderr.
    link.send(Frame::OpDispatch(dispatch(
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
    link.send(Frame::OpDispatch(OpDispatch {
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
    link.send(Frame::GrantSync {
        grants: grants.clone(),
    })
    .await;
    let mut short = dispatch("op_short", "kubectl sleep", "policy:automatic");
    short.grant_id = "gr_short".into();
    let started = Instant::now();
    link.send(Frame::OpDispatch(short)).await;
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
    let mut revoked = dispatch("op_revoked", "kubectl sleep", "policy:automatic");
    revoked.grant_id = "gr_revoked".into();
    link.send(Frame::OpDispatch(revoked)).await;
    assert!(matches!(link.next().await.1, Frame::OpStarted { .. }));
    grants.pop();
    link.send(Frame::GrantSync { grants }).await;
    let frames = link.until_end("op_revoked").await;
    assert_eq!(
        finished(&frames).error.as_ref().map(|e| e.code),
        Some(ErrorCode::CommandFailed)
    );

    // Refused in the appliance, whatever the gateway says: nothing starts.
    let mut unknown = dispatch("op_nogrant", "kubectl get pods", "policy:automatic");
    unknown.grant_id = "gr_unknown".into();
    link.send(Frame::OpDispatch(unknown)).await;
    let e = link.refusal("op_nogrant").await;
    assert_eq!(e.code, ErrorCode::OperateAccessRequired);
    assert!(
        e.hint
            .contains("postern access request --app shop --customer acme --level operate"),
        "{}",
        e.hint
    );
    // A refused op may be dispatched again (here under a live grant), and then it runs.
    link.send(Frame::OpDispatch(dispatch(
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
    link.send(Frame::OpDispatch(expired)).await;
    assert_eq!(
        link.refusal("op_expired").await.code,
        ErrorCode::OperateAccessExpired
    );
    let mut deploy = dispatch("op_deploy", "kubectl get pods", "policy:automatic");
    deploy.grant_id = "gr_deploy".into();
    link.send(Frame::OpDispatch(deploy)).await;
    assert_eq!(
        link.refusal("op_deploy").await.code,
        ErrorCode::OperateAccessRequired
    );
    link.send(Frame::OpDispatch(dispatch(
        "op_tool",
        "rm -rf /",
        "policy:automatic",
    )))
    .await;
    let e = link.refusal("op_tool").await;
    assert_eq!(e.code, ErrorCode::ForbiddenByScope);
    assert!(e.message.contains("starts with `rm`"), "{e}");
    link.send(Frame::OpDispatch(dispatch(
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
    link.send(Frame::OpDispatch(other)).await;
    assert_eq!(
        link.refusal("op_res").await.code,
        ErrorCode::InvalidOriginResourceId
    );
    // An approval is used once: the same op id does not run twice.
    link.send(Frame::OpDispatch(dispatch(
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
    link.send(Frame::GrantSync {
        grants: vec![live_grant("gr_1", GrantLevel::Operate, -1, 3600)],
    })
    .await;

    // The policy approved it, but the appliance's policy wants a person.
    link.send(Frame::OpDispatch(dispatch(
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
    link.send(Frame::OpDispatch(dispatch(
        "op_h1",
        "kubectl get pods",
        "carol@acme.example",
    )))
    .await;
    let frames = link.until_end("op_h1").await;
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert!(matches!(frames[0].1, Frame::OpStarted { .. }));
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
        link.send(Frame::OutputFetch {
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
    link.send(Frame::OutputRelease {
        op_id: "op_h1".into(),
        approved_by: "carol@acme.example".into(),
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
    link.send(Frame::OutputFetch {
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
    link.send(Frame::OpDispatch(dispatch(
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
    link.send(Frame::OutputFetch {
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
    link.send(Frame::OutputDestroy {
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
    link.send(Frame::OutputFetch {
        op_id: "op_h2".into(),
    })
    .await;
    assert_eq!(link.refusal("op_h2").await.code, ErrorCode::NotFound);
    link.send(Frame::OutputRelease {
        op_id: "op_h2".into(),
        approved_by: "carol@acme.example".into(),
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
            "output.released"
        ]
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
