//! The agent's own SSH scope, with no gateway policy in front of it: a fake gateway opens data
//! streams that ask the agent (in process) for file transfer against a real private sshd, and
//! the agent refuses them and audits why; an ended endpoint's teardown kills what its user left
//! and reports it on the control stream.

mod support;

use bytes::BytesMut;
use endpoint_types::{
    api::AuditRecord,
    control::GrantLevel,
    frame::{
        EndpointGrant, Hello, StreamAnswer, StreamHeader, StreamOpen, ToAgent, ToGateway,
        MAX_STREAM_HEADER_LEN,
    },
    resource::{CloseReason, EndpointType},
    ssh_scope,
    ssh_stream::{self, SshFrame, SshStart},
    ErrorCode,
};
use jiff::{SignedDuration, Timestamp};
use postern::sshd::Sshd;
use std::time::Duration;
use support::{
    edit_config, live_grant, read_one_frame, trail_until, write_frame, Control, Gateway,
};
use tokio_util::sync::CancellationToken;
use tunnel_client::{config::AgentConfig, tunnel};

const T: Duration = Duration::from_secs(20);
const RESOURCE: &str = "aws_instance.worker";
const CONTROL: Control = Control {
    check_hello: any_hello,
    lost_after_ms: 5000,
    answer_heartbeats: true,
};

fn any_hello(_: &Hello) {}

fn ssh_grant(id: &str) -> EndpointGrant {
    EndpointGrant {
        phase: endpoint_types::phase::operate(),
        endpoint_id: id.into(),
        endpoint_type: EndpointType::Ssh,
        resource_id: RESOURCE.into(),
        expires_at: Timestamp::now() + SignedDuration::from_secs(3600),
        grant_id: Some("gr_1".into()),
        signed_decision: None,
    }
}

/// Opens a session of endpoint `ep`, asks for `start`, and returns every frame the agent sends
/// until it ends the stream.
async fn session(
    conn: &quinn::Connection,
    ep: &str,
    session: &str,
    start: SshStart,
) -> Vec<SshFrame> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let open = StreamOpen {
        endpoint_id: ep.into(),
        session_id: session.into(),
        resource_id: RESOURCE.into(),
        operator: "mallory@vendor".into(),
        client_addr: "127.0.0.1:5000".into(),
    };
    write_frame(&mut send, &StreamHeader::StreamOpen(open))
        .await
        .unwrap();
    let answer: StreamAnswer =
        tokio::time::timeout(T, read_one_frame(&mut recv, MAX_STREAM_HEADER_LEN))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(answer, StreamAnswer::StreamAccept);
    send.write_all(&SshFrame::Start(start).to_bytes())
        .await
        .unwrap();
    // End of input, not of the session: the program runs to its end. (A refused session
    // stops reading at once, so this write may fail.)
    let _ = send.write_all(&SshFrame::Eof.to_bytes()).await;
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        while let Some(f) = ssh_stream::decode(&mut buf).unwrap() {
            frames.push(f);
        }
        match tokio::time::timeout_at(deadline, recv.read_chunk(64 * 1024, true))
            .await
            .expect("the agent ended the session in time")
        {
            Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
            _ => return frames,
        }
    }
}

fn exec(cmd: &str) -> SshStart {
    SshStart {
        pty: None,
        command: Some(cmd.into()),
        subsystem: None,
        env: vec![],
    }
}

fn stdout(frames: &[SshFrame]) -> String {
    frames
        .iter()
        .filter_map(|f| {
            if let SshFrame::Data(d) = f {
                Some(String::from_utf8_lossy(d).into_owned())
            } else {
                None
            }
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    // A killed process may linger as a zombie until its parent reaps it: that is dead too.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_file_transfer_itself_and_tears_down_an_ended_endpoint() {
    let sshd = Sshd::start().unwrap();
    let gw = Gateway::start(T);
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("agent.toml");
    gw.enroll(&config_path).await.unwrap();
    edit_config(&config_path, |text| {
        text + &format!(
            "\n[[resource]]\nid = \"{RESOURCE}\"\nkind = \"ssh\"\nhost = \"{}\"\nuser = \"{}\"\nkey = \"{}\"\nhost_key = \"{}\"\n",
            sshd.addr,
            sshd.user,
            sshd.client_key.display(),
            sshd.host_key
        )
    });
    let config = AgentConfig::load(&config_path).unwrap();
    let audit_path = config.audit_path.clone();
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(tunnel::run(config, shutdown.clone(), None));
    let conn = gw.accept().await;
    let mut link = gw.serve_tunnel(conn.clone(), CONTROL);
    link.send(ToAgent::GrantSync {
        grants: vec![live_grant("gr_1", GrantLevel::Operate, -1, 3600)],
    })
    .await;
    link.send(ToAgent::EndpointSync {
        endpoints: vec![ssh_grant("ep_ssh1")],
    })
    .await;
    trail_until(&audit_path, T, |r| {
        r.iter().any(|r| r.kind == "endpoint.opened")
    })
    .await;

    // The stream works: an ordinary exec runs as the resource's user.
    let frames = session(&conn, "ep_ssh1", "ses_ok", exec("id -un")).await;
    assert_eq!(stdout(&frames).trim(), sshd.user, "{frames:?}");
    assert!(frames.contains(&SshFrame::ExitStatus(0)), "{frames:?}");

    // What the gateway would refuse, asked of the agent directly (sftp is off by default).
    let attacks: Vec<(SshStart, &str)> = vec![
        (
            SshStart {
                pty: None,
                command: None,
                subsystem: Some("sftp".into()),
                env: vec![],
            },
            ssh_scope::SFTP_REFUSED,
        ),
        (exec("scp -t /tmp"), ssh_scope::SCP_REFUSED),
        (exec("scp -v -f /etc/passwd"), ssh_scope::SCP_REFUSED),
        (
            exec("rsync --server -vlogDtpre.iLsfxCIvu . /tmp/x"),
            ssh_scope::RSYNC_REFUSED,
        ),
        (
            exec("/usr/lib/openssh/sftp-server"),
            ssh_scope::SFTP_SERVER_REFUSED,
        ),
        (exec("internal-sftp"), ssh_scope::SFTP_SERVER_REFUSED),
    ];
    for (n, (start, why)) in attacks.iter().enumerate() {
        let frames = session(&conn, "ep_ssh1", &format!("ses_attack{n}"), start.clone()).await;
        match frames.as_slice() {
            [SshFrame::Error(e)] => {
                assert_eq!(e.code, ErrorCode::ForbiddenByScope, "{start:?}");
                assert_eq!(e.message, *why, "{start:?}");
            }
            other => panic!("{start:?} was not refused: {other:?}"),
        }
    }
    let records = trail_until(&audit_path, T, |r| {
        r.iter().filter(|r| r.kind == "denied").count() >= attacks.len()
    })
    .await;
    for (n, (start, why)) in attacks.iter().enumerate() {
        let sid = format!("ses_attack{n}");
        let d = records
            .iter()
            .find(|r| r.kind == "denied" && r.session_id.as_deref() == Some(sid.as_str()));
        let d = d.unwrap_or_else(|| panic!("no denial of {start:?} in the trail"));
        assert_eq!(d.detail["reason"], *why);
        assert_eq!(
            d.detail["action"],
            if start.subsystem.is_some() {
                "subsystem"
            } else {
                "exec"
            }
        );
        assert_eq!(d.actor, "mallory@vendor");
    }
    assert!(!records.iter().any(|r| r.kind == "session.opened"
        && r.session_id
            .as_deref()
            .is_some_and(|s| s.starts_with("ses_attack"))));

    // A process left behind through the endpoint dies with it, and the gateway hears of it.
    let frames = session(
        &conn,
        "ep_ssh1",
        "ses_leave",
        exec("nohup sleep 600 >/dev/null 2>&1 & echo $!"),
    )
    .await;
    let pid: u32 = stdout(&frames)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{frames:?}"));
    assert!(alive(pid));
    link.send(ToAgent::EndpointClose {
        endpoint_id: "ep_ssh1".into(),
        reason: CloseReason::Retired,
    })
    .await;
    let report = match link.next().await {
        (_, ToGateway::SshTeardown(r)) => r,
        (_, other) => panic!("unexpected frame {other:?}"),
    };
    assert_eq!(
        (
            report.endpoint_id.as_str(),
            report.reason,
            report.error.as_deref()
        ),
        ("ep_ssh1", CloseReason::Retired, None),
        "{report:?}"
    );
    assert!(
        report
            .killed
            .iter()
            .any(|k| k.pid == pid && k.command.contains("sleep 600")),
        "{report:?}"
    );
    // SIGKILL takes effect when the process is next scheduled: moments, on a busy machine.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while alive(pid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(pid), "the left-behind process survived the teardown");
    let records: Vec<AuditRecord> = trail_until(&audit_path, T, |r| {
        r.iter().any(|r| r.kind == "ssh.teardown")
    })
    .await;
    let td = records.iter().find(|r| r.kind == "ssh.teardown").unwrap();
    assert_eq!(td.endpoint_id.as_deref(), Some("ep_ssh1"));
    assert!(
        td.detail["killed"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k["pid"] == pid)),
        "{:?}",
        td.detail
    );

    // An endpoint that ends while the agent is away is torn down after the next sync.
    link.send(ToAgent::EndpointOpen(ssh_grant("ep_ssh2"))).await;
    trail_until(&audit_path, T, |r| {
        r.iter().filter(|r| r.kind == "endpoint.opened").count() == 2
    })
    .await;
    let frames = session(
        &conn,
        "ep_ssh2",
        "ses_leave2",
        exec("setsid sleep 601 >/dev/null 2>&1 </dev/null & echo $!"),
    )
    .await;
    let pid: u32 = stdout(&frames)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{frames:?}"));
    conn.close(0u32.into(), b"gateway restarting");
    drop(link);
    let conn2 = gw.accept().await;
    let mut link2 = gw.serve_tunnel(conn2, CONTROL);
    link2
        .send(ToAgent::GrantSync {
            grants: vec![live_grant("gr_1", GrantLevel::Operate, -1, 3600)],
        })
        .await;
    assert!(
        alive(pid),
        "the disconnect alone must not tear down a live endpoint"
    );
    link2
        .send(ToAgent::EndpointSync { endpoints: vec![] })
        .await;
    let report = match link2.next().await {
        (_, ToGateway::SshTeardown(r)) => r,
        (_, other) => panic!("unexpected frame {other:?}"),
    };
    assert_eq!(report.endpoint_id, "ep_ssh2");
    assert!(report.killed.iter().any(|k| k.pid == pid), "{report:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while alive(pid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !alive(pid),
        "the process left through an endpoint that ended meanwhile survived"
    );

    shutdown.cancel();
    drop(link2);
    let _ = tokio::time::timeout(T, agent).await;
}
