//! Unit tests of `op_runner`'s held output against the op state machine: a preview, release
//! or destroy of an op that is not holding output is refused by the machine, recorded in the
//! customer's trail as `denied` and answered with the structured error the gateway always got
//! (`NOT_FOUND`), the machine's refusal in its details.
use super::*;
use endpoint_types::{api::AuditRecord, control::OpState};

struct Rig {
    runner: OpRunner,
    trail: PathBuf,
    _dir: tempfile::TempDir,
}

fn rig() -> Rig {
    rig_with("audit_path = \"a\"\n[policy]\napproval = \"automatic\"\n")
}

fn rig_with(config: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("audit.jsonl");
    let config = AgentConfig::parse(
        &config.replace(
            "audit_path = \"a\"",
            &format!("audit_path = {:?}", trail.display().to_string()),
        ),
        Path::new("/etc/postern/agent.toml"),
    )
    .unwrap();
    let runner = OpRunner::new(
        Arc::new(config),
        Arc::new(Mutex::new(LiveEndpoints::new())),
        AuditLog::open(&trail, Some("app_1".into())).unwrap(),
        CancellationToken::new(),
        TaskTracker::new(),
    )
    .unwrap();
    Rig {
        runner,
        trail,
        _dir: dir,
    }
}

impl Rig {
    /// An op admitted and started, as `run_op` does.
    fn running(&self, op_id: &str) {
        let mut state = self.runner.state();
        assert!(state.ops.admit(op_id));
        assert_eq!(
            state.ops.apply(op_id, &OpEvent::Started),
            Ok(OpState::Running)
        );
    }

    /// An op that ran and holds its output, as `report` leaves it.
    fn holding(&self, op_id: &str) {
        self.running(op_id);
        let mut state = self.runner.state();
        let held = OpEvent::Finished {
            exit_code: 0,
            output_held: true,
        };
        assert_eq!(
            state.ops.apply(op_id, &held),
            Ok(OpState::OutputPendingApproval)
        );
        let now = Timestamp::now();
        state.held.insert(
            op_id.to_string(),
            Held {
                spec: OpSpec {
                    op_id: op_id.to_string(),
                    tool: OpTool::Kubectl,
                    command: "kubectl get pods".into(),
                    timeout: Duration::from_secs(300),
                    output_cap: ops::DEFAULT_OUTPUT_CAP,
                },
                outcome: OpOutcome {
                    exit_code: Some(0),
                    signal: None,
                    stdout: b"pod-1 Running\n".to_vec(),
                    stderr: Vec::new(),
                    stdout_truncated: false,
                    stderr_truncated: false,
                    timed_out: false,
                    cancelled: false,
                    started_at: now,
                    finished_at: now,
                },
            },
        );
    }

    fn op_state(&self, op_id: &str) -> Option<OpState> {
        self.runner.state().ops.state(op_id)
    }

    async fn records(&self, kind: &str) -> Vec<AuditRecord> {
        self.runner.inner.audit.flush().await;
        std::fs::read_to_string(&self.trail)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap())
            .filter(|r| r.kind == kind)
            .collect()
    }
}

/// The frames sent about an op until its end (`OpFinished`) or its refusal.
async fn until_end(rx: &mut mpsc::Receiver<ToGateway>) -> Vec<ToGateway> {
    let mut frames = Vec::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a frame in time")
            .expect("the outbox is open");
        let end = matches!(
            frame,
            ToGateway::OpFinished(_) | ToGateway::OpRefused { .. }
        );
        frames.push(frame);
        if end {
            return frames;
        }
    }
}

/// The refusal at the end of `frames`.
fn refusal(frames: &[ToGateway]) -> &ApiError {
    match frames.last() {
        Some(ToGateway::OpRefused { error, .. }) => error,
        other => panic!("not refused: {other:?}"),
    }
}

#[tokio::test]
async fn a_second_release_is_refused_by_the_machine_and_denied_in_the_trail() {
    let rig = rig();
    rig.holding("op_1");
    let (tx, mut rx) = mpsc::channel(64);
    rig.runner
        .release("op_1".into(), "ana@customer".into(), None, tx.clone());
    let frames = until_end(&mut rx).await;
    assert!(
        matches!(&frames[0], ToGateway::OpOutput { data, .. } if data == "pod-1 Running\n"),
        "{frames:?}"
    );
    assert!(
        matches!(frames.last(), Some(ToGateway::OpFinished(f)) if !f.held && f.exit_code == Some(0))
    );
    rig.runner.inner.tracker.close();
    rig.runner.inner.tracker.wait().await;
    assert_eq!(rig.op_state("op_1"), Some(OpState::Completed));
    assert_eq!(rig.runner.held_count(), 0);

    rig.runner.inner.tracker.reopen();
    rig.runner
        .release("op_1".into(), "ana@customer".into(), None, tx);
    let frames = until_end(&mut rx).await;
    assert_eq!(frames.len(), 1, "nothing is sent again: {frames:?}");
    let e = refusal(&frames);
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(
        e.message
            .contains("released, destroyed, or the agent restarted"),
        "{e}"
    );
    assert_eq!(
        e.details,
        json!({ "id": "op_1", "record": "op", "state": "completed", "event": "output-approved", "ended": true })
    );
    let denied = rig.records("denied").await;
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0].op_id.as_deref(), Some("op_1"));
    assert_eq!(denied[0].actor, "ana@customer");
    assert_eq!(denied[0].detail["action"], "output.release");
    assert_eq!(denied[0].detail["reason"], "NOT_FOUND");
    assert_eq!(
        denied[0].detail["message"],
        "op op_1 has ended as completed; nothing changes it any more (refused: output-approved)"
    );
    assert_eq!(denied[0].detail["state"], "completed");
    assert_eq!(rig.records("output.released").await.len(), 1);
}

#[tokio::test]
async fn destroying_after_release_or_destroy_is_refused() {
    let rig = rig();
    let (tx, mut rx) = mpsc::channel(64);
    rig.holding("op_released");
    rig.runner.release(
        "op_released".into(),
        "ana@customer".into(),
        None,
        tx.clone(),
    );
    until_end(&mut rx).await;
    rig.runner.inner.tracker.close();
    rig.runner.inner.tracker.wait().await;
    rig.runner.inner.tracker.reopen();
    rig.runner.destroy(
        "op_released".into(),
        "bob@customer".into(),
        None,
        tx.clone(),
    );
    let e = refusal(&until_end(&mut rx).await).clone();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(e.details["state"], "completed");
    assert_eq!(e.details["event"], "output-denied");
    assert_eq!(rig.op_state("op_released"), Some(OpState::Completed));

    rig.holding("op_destroyed");
    rig.runner.destroy(
        "op_destroyed".into(),
        "bob@customer".into(),
        Some("no".into()),
        tx.clone(),
    );
    let frames = until_end(&mut rx).await;
    assert!(matches!(frames.last(), Some(ToGateway::OpFinished(f)) if f.destroyed));
    assert_eq!(rig.op_state("op_destroyed"), Some(OpState::Denied));
    for again in 0..2 {
        if again == 0 {
            rig.runner.destroy(
                "op_destroyed".into(),
                "bob@customer".into(),
                None,
                tx.clone(),
            );
        } else {
            rig.runner.fetch("op_destroyed", tx.clone());
        }
        let e = refusal(&until_end(&mut rx).await).clone();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.details["state"], "denied");
        assert_eq!(e.details["ended"], true);
    }
    let denied = rig.records("denied").await;
    let actions: Vec<&str> = denied
        .iter()
        .map(|r| r.detail["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["output.destroy", "output.destroy", "output.preview"]
    );
    assert_eq!(rig.records("output.destroyed").await.len(), 1);
}

#[tokio::test]
async fn output_of_an_op_that_is_not_holding_any_is_refused() {
    let rig = rig();
    let (tx, mut rx) = mpsc::channel(64);
    rig.running("op_run");
    rig.runner.fetch("op_run", tx.clone());
    rig.runner
        .release("op_run".into(), "ana@customer".into(), None, tx.clone());
    rig.runner
        .destroy("op_run".into(), "ana@customer".into(), None, tx.clone());
    for event in ["output-previewed", "output-approved", "output-denied"] {
        let e = refusal(&until_end(&mut rx).await).clone();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(
            (e.details["state"].as_str(), e.details["event"].as_str()),
            (Some("running"), Some(event))
        );
    }
    assert_eq!(rig.op_state("op_run"), Some(OpState::Running));
    let denied = rig.records("denied").await;
    let messages: Vec<&str> = denied
        .iter()
        .map(|r| r.detail["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        messages,
        [
            "op op_run is running, which does not take output-previewed",
            "op op_run is running, which does not take output-approved",
            "op op_run is running, which does not take output-denied",
        ]
    );

    // An op this process never ran is not found, as before; no denial is recorded for it.
    rig.runner
        .release("op_unknown".into(), "ana@customer".into(), None, tx);
    let e = refusal(&until_end(&mut rx).await).clone();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(e.details.is_null(), "{e:?}");
    assert_eq!(rig.records("denied").await.len(), 3);
}

#[tokio::test]
async fn a_preview_keeps_the_output_held() {
    let rig = rig();
    let (tx, mut rx) = mpsc::channel(64);
    rig.holding("op_1");
    rig.runner.fetch("op_1", tx.clone());
    let frames = until_end(&mut rx).await;
    assert!(matches!(frames.last(), Some(ToGateway::OpFinished(f)) if f.preview && f.held));
    assert_eq!(rig.op_state("op_1"), Some(OpState::OutputPendingApproval));
    assert_eq!(rig.runner.held_count(), 1);
    assert!(rig.records("denied").await.is_empty());
}

/// With `[[approver]]` keys, held output leaves only on a release one of them signed for
/// exactly this output; anything else destroys it, is `denied` in the trail and
/// `APPROVAL_INVALID` for the gateway.
#[tokio::test]
async fn a_release_needs_a_signature_over_the_held_outputs_digest() {
    use endpoint_types::approval::{ApprovalStatement, DecidedContent, Decision};
    let (bob, _) = certs::approver::ApproverKey::generate().unwrap();
    let rig = rig_with(&format!(
        "audit_path = \"a\"\nappliance_id = \"app_1\"\n[policy]\napproval = \"manual\"\n\
         [[approver]]\nname = \"bob\"\npublic_key = \"{}\"\n",
        bob.public().to_line("")
    ));
    let release = |op_id: &str, digest: &str| {
        let now = Timestamp::now();
        bob.sign(ApprovalStatement {
            record_id: op_id.into(),
            appliance_id: "app_1".into(),
            decision: Decision::Approve,
            content: DecidedContent::OpOutput {
                output_sha256: digest.into(),
            },
            issued_at: now,
            not_after: now + jiff::SignedDuration::from_hours(1),
            key_id: String::new(),
        })
    };
    let (tx, mut rx) = mpsc::channel(64);
    // Unsigned (a rogue gateway's release), and signed for other output.
    for (op_id, signed, reason) in [
        ("op_1", None, "missing"),
        ("op_2", Some(release("op_2", "00")), "content_mismatch"),
    ] {
        rig.holding(op_id);
        rig.runner
            .release(op_id.into(), "bob".into(), signed, tx.clone());
        let frames = until_end(&mut rx).await;
        assert_eq!(frames.len(), 1, "nothing leaves: {frames:?}");
        let e = refusal(&frames);
        assert_eq!(e.code, ErrorCode::ApprovalInvalid);
        assert_eq!(e.details["reason"], reason);
        assert_eq!(rig.op_state(op_id), Some(OpState::Denied));
    }
    assert_eq!(rig.runner.held_count(), 0, "refused output is destroyed");
    let denied = rig.records("denied").await;
    assert_eq!(denied.len(), 2);
    assert_eq!(denied[0].detail["approval"], "missing");
    assert_eq!(denied[1].detail["approval"], "content_mismatch");
    assert_eq!(rig.records("output.destroyed").await.len(), 2);

    // Signed over the digest of what the appliance holds: released.
    rig.holding("op_3");
    let digest = certs::approver::output_sha256("pod-1 Running\n", "");
    rig.runner.release(
        "op_3".into(),
        "bob".into(),
        Some(release("op_3", &digest)),
        tx,
    );
    let frames = until_end(&mut rx).await;
    assert!(
        matches!(frames.last(), Some(ToGateway::OpFinished(f)) if !f.held && f.exit_code == Some(0)),
        "{frames:?}"
    );
    let verified = rig.records("approval.verified").await;
    assert_eq!(verified.len(), 1);
    assert_eq!(verified[0].detail["approver"], "bob");
}
