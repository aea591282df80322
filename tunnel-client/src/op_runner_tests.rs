//! Unit tests of `op_runner` (the agent's decision on a dispatch, held output frames).
use super::*;
use endpoint_types::control::OpTool;
use jiff::SignedDuration;

// 2026-01-05 is a Monday.
fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn config(policy: &str) -> AgentConfig {
    let text = format!(
        "audit_path = \"a\"\n[policy]\n{policy}\n[tools]\nkubectl = \"/bin/sh\"\n\
         [[resource]]\nid = \"aws_eks_cluster.main\"\nkind = \"kubernetes\"\nkubeconfig = \"/etc/kc\"\n\
         [[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:7\"\n\
         [[resource]]\nid = \"aws_db_instance.main\"\nkind = \"postgres\"\nadmin_url = \"postgres://admin@127.0.0.1:5432/app\"\n\
         [[resource]]\nid = \"aws_instance.vm\"\nkind = \"ssh\"\nhost = \"127.0.0.1:22\"\nuser = \"ops\"\nkey = \"/k\"\n\
         host_key = \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHvNC2Rpugiiw1pOjJYmMBaGVsELXpfLPjkH7LZq6NMY\"\n\
         [[resource]]\nid = \"aws_account.main\"\nkind = \"cloud\"\naws_profile = \"vendor\"\n"
    );
    AgentConfig::parse(&text, Path::new("/etc/postern/agent.toml")).unwrap()
}

fn dispatch(approved_by: &str) -> OpDispatch {
    OpDispatch {
        phase: endpoint_types::phase::operate(),
        op_id: "op_1".into(),
        tool: OpTool::Kubectl,
        command: "kubectl get pods".into(),
        resource_id: "aws_eks_cluster.main".into(),
        timeout_s: 300,
        operator: "alice@vendor".into(),
        grant_id: "gr_1".into(),
        command_approved_by: approved_by.into(),
        command_approved_at: at("2026-01-05T08:00:00Z"),
        hold_output: false,
        signed_decision: None,
    }
}

fn grant(level: GrantLevel, from: &str, to: &str) -> LiveGrant {
    LiveGrant {
        grant_id: "gr_1".into(),
        level,
        approved_by: "bob".into(),
        approved_at: at(from),
        expires_at: at(to),
        signed_decision: None,
    }
}

fn check(
    config: &AgentConfig,
    d: &OpDispatch,
    grant_live: bool,
    seen: Option<&LiveGrant>,
    now: &str,
) -> Result<Authorized, Refusal> {
    let policy = Policy::parse(&config.policy_summary()).unwrap();
    let c = Checks {
        config,
        policy: &policy,
        grant_live,
        grant_seen: seen,
        path_env: None,
        access_hint: "postern access request --level operate",
    };
    authorize(d, &c, at(now))
}

fn code(r: Result<Authorized, Refusal>) -> (ErrorCode, bool) {
    let r = r.expect_err("refused");
    (r.error.code, r.denial)
}

#[test]
fn automatic_runs_and_streams() {
    let c = config("approval = \"automatic\"");
    let a = check(
        &c,
        &dispatch("policy:automatic"),
        true,
        None,
        "2026-01-05T12:00:00Z",
    )
    .unwrap();
    assert_eq!(a.argv, ["kubectl", "get", "pods"]);
    assert_eq!(a.exe, Path::new("/bin/sh"));
    assert!(!a.hold);
    assert_eq!(a.decision, Decision::Automatic);
    // The gateway may still ask to hold.
    let d = OpDispatch {
        hold_output: true,
        ..dispatch("policy:automatic")
    };
    assert!(
        check(&c, &d, true, None, "2026-01-05T12:00:00Z")
            .unwrap()
            .hold
    );
    assert_eq!(a.remote_command, None);
}

#[test]
fn manual_and_always_require_need_a_person_and_hold_output() {
    for mode in ["manual", "always-require"] {
        let c = config(&format!("approval = \"{mode}\""));
        for by in ["policy:automatic", "policy:window", "", "  "] {
            let r = check(&c, &dispatch(by), true, None, "2026-01-05T12:00:00Z").expect_err(by);
            assert_eq!(r.error.code, ErrorCode::ApprovalDenied);
            assert!(r.denial);
            assert!(
                r.error.message.contains("requires a person's approval")
                    && r.error.message.contains(mode),
                "{}",
                r.error
            );
            assert_eq!(
                r.error.hint,
                "an approver runs `postern approvals approve op_1`"
            );
        }
        let a = check(
            &c,
            &dispatch("carol@acme"),
            true,
            None,
            "2026-01-05T12:00:00Z",
        )
        .unwrap();
        assert!(a.hold, "{mode}: output needs approval");
    }
}

#[test]
fn windows_by_the_agents_clock() {
    let c = config("approval = \"windows\"\ntime_zone = \"Europe/Berlin\"\nwindows = [\"Mon-Fri 09:00-17:00\"]");
    // Inside (12:00 Berlin): approved by the window, output not held.
    let a = check(
        &c,
        &dispatch("policy:window"),
        true,
        None,
        "2026-01-05T11:00:00Z",
    )
    .unwrap();
    assert!(matches!(a.decision, Decision::InWindow { .. }) && !a.hold);
    // The window closed before dispatch: the window's approval no longer counts.
    let r = check(
        &c,
        &dispatch("policy:window"),
        true,
        None,
        "2026-01-05T16:00:00Z",
    )
    .expect_err("outside");
    assert_eq!(r.error.code, ErrorCode::ApprovalDenied);
    assert!(
        r.error.message.contains("outside its approval windows"),
        "{}",
        r.error
    );
    assert_eq!(r.error.details["next_window"], "2026-01-06T08:00:00Z");
    // A person's approval runs it, and its output is held outside the window.
    let a = check(
        &c,
        &dispatch("carol@acme"),
        true,
        None,
        "2026-01-05T16:00:00Z",
    )
    .unwrap();
    assert!(a.hold);
}

#[test]
fn grants_by_the_agents_clock() {
    let c = config("approval = \"automatic\"");
    let d = dispatch("policy:automatic");
    let now = "2026-01-05T12:00:00Z";
    assert_eq!(
        code(check(&c, &d, false, None, now)),
        (ErrorCode::OperateAccessRequired, true)
    );
    let old = grant(
        GrantLevel::Operate,
        "2026-01-05T10:00:00Z",
        "2026-01-05T11:00:00Z",
    );
    let r = check(&c, &d, false, Some(&old), now).expect_err("expired");
    assert_eq!(r.error.code, ErrorCode::OperateAccessExpired);
    assert!(r.error.hint.contains("--level operate"), "{}", r.error);
    let deploy = grant(
        GrantLevel::Deploy,
        "2026-01-05T10:00:00Z",
        "2026-01-05T14:00:00Z",
    );
    assert_eq!(
        code(check(&c, &d, false, Some(&deploy), now)),
        (ErrorCode::OperateAccessRequired, true)
    );
    let revoked = grant(
        GrantLevel::Operate,
        "2026-01-05T10:00:00Z",
        "2026-01-05T14:00:00Z",
    );
    assert_eq!(
        code(check(&c, &d, false, Some(&revoked), now)),
        (ErrorCode::OperateAccessExpired, true)
    );
    // The grant is checked before anything else.
    let bad = OpDispatch {
        resource_id: "nope".into(),
        command: "rm -rf /".into(),
        ..d.clone()
    };
    assert_eq!(
        code(check(&c, &bad, false, None, now)).0,
        ErrorCode::OperateAccessRequired
    );
}

#[test]
fn resource_command_tool_and_timeout() {
    let c = config("approval = \"automatic\"");
    let now = "2026-01-05T12:00:00Z";
    let d = dispatch("policy:automatic");
    let with = |f: &dyn Fn(&mut OpDispatch)| {
        let mut d = d.clone();
        f(&mut d);
        code(check(&c, &d, true, None, now))
    };
    assert_eq!(
        with(&|d| d.resource_id = "aws_db_instance.other".into()),
        (ErrorCode::InvalidOriginResourceId, true)
    );
    assert_eq!(
        with(&|d| d.command = "rm -rf /".into()),
        (ErrorCode::ForbiddenByScope, true)
    );
    assert_eq!(
        with(&|d| d.command = "/usr/bin/kubectl get pods".into()),
        (ErrorCode::ForbiddenByScope, true)
    );
    assert_eq!(
        with(&|d| d.command = "kubectl get pods; rm -rf /".into()),
        (ErrorCode::InvalidRequest, false)
    );
    assert_eq!(
        with(&|d| d.timeout_s = 0),
        (ErrorCode::InvalidRequest, false)
    );
    assert_eq!(
        with(&|d| d.timeout_s = 86_401),
        (ErrorCode::InvalidRequest, false)
    );
    assert_eq!(
        with(&|d| d.op_id = String::new()),
        (ErrorCode::InvalidRequest, false)
    );
    assert_eq!(
        with(&|d| d.op_id = "x".repeat(MAX_OP_ID_LEN + 1)),
        (ErrorCode::InvalidRequest, false)
    );
    // A tool with no [tools] entry and nothing on PATH.
    assert_eq!(
        with(&|d| {
            d.tool = OpTool::Psql;
            d.resource_id = "aws_db_instance.main".into();
            d.command = "psql -c 'select 1'".into();
        }),
        (ErrorCode::Internal, false)
    );
}

#[test]
fn approved_by_person_is_anyone_but_the_policy() {
    assert!(approved_by_person("carol@acme"));
    assert!(!approved_by_person("policy:automatic"));
    assert!(!approved_by_person("policy:window"));
    assert!(!approved_by_person(""));
}

#[test]
fn held_finished_frame_says_nothing_about_the_output() {
    let spec = OpSpec::new("op_1", OpTool::Kubectl, "kubectl get pods");
    let now = at("2026-01-05T12:00:00Z");
    let outcome = OpOutcome {
        exit_code: Some(3),
        signal: None,
        stdout: b"secret".to_vec(),
        stderr: b"boom".to_vec(),
        stdout_truncated: true,
        stderr_truncated: false,
        timed_out: false,
        cancelled: false,
        started_at: now,
        finished_at: now + SignedDuration::from_secs(1),
    };
    let held = Held { spec, outcome };
    let ToGateway::OpFinished(f) = held_notice("op_1") else {
        panic!()
    };
    assert_eq!(
        (f.held, f.exit_code, f.truncated, f.error.is_none()),
        (true, None, false, true)
    );
    let frames = held.frames(true, true);
    assert_eq!(frames.len(), 3);
    let Some(ToGateway::OpFinished(f)) = frames.last() else {
        panic!()
    };
    assert_eq!(
        (f.preview, f.held, f.exit_code, f.truncated),
        (true, true, Some(3), true)
    );
    assert_eq!(
        f.error.as_ref().map(|e| e.code),
        Some(ErrorCode::CommandFailed)
    );
    assert_eq!(f.error.as_ref().unwrap().details["stderr"], "boom");
}

#[test]
fn a_tool_runs_only_against_a_resource_of_its_kind() {
    let c = config("approval = \"automatic\"");
    let now = "2026-01-05T12:00:00Z";
    for (tool, command, resource, kind) in [
        (
            OpTool::Kubectl,
            "kubectl get pods",
            "null_resource.echo",
            "tcp",
        ),
        (
            OpTool::Kubectl,
            "kubectl get pods",
            "aws_db_instance.main",
            "postgres",
        ),
        (
            OpTool::Psql,
            "psql -c 'select 1'",
            "aws_eks_cluster.main",
            "kubernetes",
        ),
        (
            OpTool::Ssh,
            "ssh uptime",
            "aws_db_instance.main",
            "postgres",
        ),
        (OpTool::Docker, "docker ps", "aws_account.main", "cloud"),
        (OpTool::Aws, "aws s3 ls", "aws_instance.vm", "ssh"),
    ] {
        let d = OpDispatch {
            tool,
            command: command.into(),
            resource_id: resource.into(),
            ..dispatch("policy:automatic")
        };
        let r = check(&c, &d, true, None, now).expect_err(command);
        assert_eq!(
            (r.error.code, r.denial),
            (ErrorCode::InvalidOriginResourceId, true),
            "{command} on {resource}"
        );
        assert!(
            r.error.message.contains(&format!("is a {kind} resource")),
            "{}",
            r.error
        );
        assert_eq!(r.error.details["kind"], kind);
        assert!(r.error.hint.contains(kind), "{}", r.error.hint);
    }
}

#[test]
fn psql_and_ssh_commands_that_would_leave_the_resource_are_denied() {
    let c = config("approval = \"automatic\"");
    let now = "2026-01-05T12:00:00Z";
    let psql = |command: &str| OpDispatch {
        tool: OpTool::Psql,
        command: command.into(),
        resource_id: "aws_db_instance.main".into(),
        ..dispatch("policy:automatic")
    };
    for command in [
        r"psql -c '\! sh -c id'",
        r"psql -c '\o |sh'",
        "psql -h evil.example -c 'select 1'",
        "psql -f /etc/postern/agent.toml",
    ] {
        let r = check(&c, &psql(command), true, None, now).expect_err(command);
        assert_eq!(
            (r.error.code, r.denial),
            (ErrorCode::ForbiddenByScope, true),
            "{command}: {}",
            r.error
        );
    }
    let ssh = |command: &str| OpDispatch {
        tool: OpTool::Ssh,
        command: command.into(),
        resource_id: "aws_instance.vm".into(),
        ..dispatch("policy:automatic")
    };
    let r =
        check(&c, &ssh("ssh -oProxyCommand=sh uptime"), true, None, now).expect_err("ssh option");
    assert_eq!(
        (r.error.code, r.denial),
        (ErrorCode::ForbiddenByScope, true)
    );
    // A fine ssh op needs no local `ssh` program: the agent's client runs the remote command.
    let a = check(&c, &ssh("ssh uptime"), true, None, now).unwrap();
    assert_eq!(
        (a.remote_command.as_deref(), a.exe.as_os_str().is_empty()),
        (Some("'uptime'"), true)
    );
}

#[test]
fn phases_need_their_own_grant_identity_and_install_a_person() {
    let c = config("approval = \"automatic\"");
    let deploy = OpDispatch {
        phase: GrantLevel::Deploy,
        ..dispatch("policy:automatic")
    };
    // The grant named is an operate grant: not live for a deploy op, and said so.
    let seen = grant(
        GrantLevel::Operate,
        "2026-01-05T00:00:00Z",
        "2026-01-06T00:00:00Z",
    );
    let r = check(&c, &deploy, false, Some(&seen), "2026-01-05T12:00:00Z").expect_err("refused");
    assert_eq!(r.error.code, ErrorCode::OperateAccessRequired);
    assert!(
        r.error
            .message
            .contains("only a deploy grant authorises a deploy op"),
        "{}",
        r.error
    );
    // A live deploy grant, but the resource names no deploy identity.
    let r = check(&c, &deploy, true, None, "2026-01-05T12:00:00Z").expect_err("refused");
    assert_eq!(r.error.code, ErrorCode::ForbiddenByScope);
    assert!(r.denial);
    assert!(
        r.error.hint.contains("[resource.phases.deploy]"),
        "{}",
        r.error
    );
    // Install: a person approves each use, even under an automatic policy.
    let text = "audit_path = \"a\"\n[policy]\napproval = \"automatic\"\n[tools]\nkubectl = \"/bin/sh\"\n\
         [[resource]]\nid = \"aws_eks_cluster.main\"\nkind = \"kubernetes\"\nkubeconfig = \"/etc/kc\"\n\
         [resource.phases.install]\nimpersonate = { user = \"vendor-install\" }\n";
    let c = AgentConfig::parse(text, Path::new("/etc/postern/agent.toml")).unwrap();
    let install = |by: &str| OpDispatch {
        phase: GrantLevel::Install,
        ..dispatch(by)
    };
    let r = check(
        &c,
        &install("policy:automatic"),
        true,
        None,
        "2026-01-05T12:00:00Z",
    )
    .expect_err("an install op approved by policy");
    assert_eq!(r.error.code, ErrorCode::ApprovalDenied);
    assert!(r.error.message.contains("install"), "{}", r.error);
    assert!(check(
        &c,
        &install("carol@acme"),
        true,
        None,
        "2026-01-05T12:00:00Z"
    )
    .is_ok());
}

/// The runner checks a dispatch against its phase's `[policy.<phase>]` (else `[policy]`): a
/// gateway that says `policy:automatic` for an operate op, when only deploy is automatic, is
/// refused; the deploy op runs and its output is not held.
#[test]
fn a_dispatch_is_checked_against_its_own_phases_policy() {
    let text = "audit_path = \"a\"\n[policy]\napproval = \"manual\"\n[policy.deploy]\napproval = \"automatic\"\n\
                [tools]\nkubectl = \"/bin/sh\"\n\
                [[resource]]\nid = \"aws_eks_cluster.main\"\nkind = \"kubernetes\"\nkubeconfig = \"/etc/kc\"\n\
                impersonate = { user = \"vendor-operate\" }\n\
                [resource.phases.deploy]\nimpersonate = { user = \"vendor-deploy\" }\n";
    let c = AgentConfig::parse(text, Path::new("/etc/postern/agent.toml")).unwrap();
    let policies = crate::policy_phases::PhasePolicies::parse(&c.policy_summary()).unwrap();
    let run = |phase: GrantLevel| {
        let d = OpDispatch {
            phase,
            ..dispatch("policy:automatic")
        };
        let checks = Checks {
            config: &c,
            policy: policies.of(phase),
            grant_live: true,
            grant_seen: None,
            path_env: None,
            access_hint: "postern access request --level operate",
        };
        authorize(&d, &checks, at("2026-01-05T12:00:00Z"))
    };
    let deploy = run(GrantLevel::Deploy).unwrap();
    assert_eq!(deploy.decision, Decision::Automatic);
    assert!(!deploy.hold);
    let refused = run(GrantLevel::Operate).expect_err("operate is manual");
    assert_eq!(refused.error.code, ErrorCode::ApprovalDenied);
    assert!(
        refused.error.message.contains("manual"),
        "{}",
        refused.error
    );
    assert_eq!(
        policies
            .ruling(GrantLevel::Operate, at("2026-01-05T12:00:00Z"))
            .rule(),
        "a person: [policy] approval = \"manual\""
    );
}
