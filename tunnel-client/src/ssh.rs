//! SSH endpoint sessions in the appliance: the agent logs in to the VM's sshd itself (russh
//! client) as the customer's configured user with the appliance's key, pinning the VM's host
//! key from `agent.toml`. Whatever user name the engineer typed, the login upstream is that
//! user. One data stream = one upstream SSH session with one channel.
//!
//! Stream protocol: [`endpoint_types::ssh_stream`]. The customer's trail gets the recording
//! (`ssh.recording`, with an exec's input), each exec (`ssh.exec`), a refused host key and a
//! refused file transfer (`denied`). The endpoint's end is undone by [`crate::ssh_teardown`].

use crate::{
    audit::Entry,
    config::ResourceConfig,
    grants::Cut,
    sessions::{accept, cut_quic, entry as session_entry, refuse, trail_refusal, Sessions},
};
use bytes::BytesMut;
use endpoint_types::{
    asciicast::Recorder,
    frame::StreamOpen,
    resource::CloseReason,
    ssh_scope,
    ssh_stream::{self, ExitSignal, SshFrame, SshReady, SshStart},
    ApiError, ErrorCode,
};
use quinn::{RecvStream, SendStream};
use russh::{
    client,
    keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate},
    ChannelMsg, Disconnect, Pty, Sig,
};
use serde_json::json;
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Cap on one recording in the customer's trail.
const RECORDING_CAP: usize = 1024 * 1024;

/// Checked when the config is loaded: an ssh resource needs a target, a non-root user, the
/// key and the pinned host key.
pub fn validate_config(r: &ResourceConfig) -> Result<(), String> {
    let id = &r.id;
    let host = r
        .host
        .as_deref()
        .ok_or_else(|| format!("resource {id:?}: ssh needs `host` (host:port)"))?;
    if host
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .is_none()
    {
        return Err(format!(
            "resource {id:?}: `host` must be host:port, not {host:?}"
        ));
    }
    let user = r
        .user
        .as_deref()
        .ok_or_else(|| format!("resource {id:?}: ssh needs `user` (a standard, non-root user)"))?;
    if user.is_empty()
        || user == "root"
        || user.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "resource {id:?}: `user` must be a standard user, never root (got {user:?})"
        ));
    }
    if r.key.is_none() {
        return Err(format!("resource {id:?}: ssh needs `key`, the path of the private key the appliance logs in with"));
    }
    let host_key = r.host_key.as_deref().ok_or_else(|| {
        format!("resource {id:?}: ssh needs `host_key`, the VM's public host key (OpenSSH format)")
    })?;
    parse_host_key(host_key)
        .map_err(|e| format!("resource {id:?}: `host_key` is not an OpenSSH public key: {e}"))?;
    Ok(())
}

/// Accepts a bare key line or a known_hosts style line with a host in front.
pub(crate) fn parse_host_key(s: &str) -> Result<PublicKey, String> {
    let s = s.trim();
    PublicKey::from_openssh(s)
        .or_else(|e| {
            s.split_once(' ')
                .map(|(_, rest)| PublicKey::from_openssh(rest.trim()))
                .unwrap_or(Err(e))
        })
        .map_err(|e| e.to_string())
}

/// Pins the VM's host key; remembers what was presented when it does not match.
pub(crate) struct Pinned {
    pub(crate) expected: PublicKey,
    pub(crate) mismatch: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let presented = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(_) => {
                *self.mismatch.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some("a host certificate".into());
                return Ok(false);
            }
        };
        if presented.key_data() == self.expected.key_data() {
            return Ok(true);
        }
        *self.mismatch.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(presented.fingerprint(Default::default()).to_string());
        Ok(false)
    }
}

pub(crate) fn client_config() -> client::Config {
    client::Config {
        // The session lives as long as the engineer's; the gateway watches the engineer.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        nodelay: true,
        ..Default::default()
    }
}

fn unreachable(resource: &str) -> ApiError {
    ApiError::new(ErrorCode::TargetUnreachable, format!("the appliance cannot log in to resource {resource:?}"))
        .hint("the VM's sshd may be down or refuse the appliance's key; the appliance's agent log has the cause")
}

/// Connects and logs in upstream. Errors are for the engineer (no appliance internals) and the
/// cause for the appliance's log.
async fn login(
    ctx: &Sessions,
    open: &StreamOpen,
    r: &ResourceConfig,
) -> Result<client::Handle<Pinned>, ApiError> {
    login_for(ctx, &open.endpoint_id, Some(&open.session_id), r).await
}

/// [`login`] for work of the endpoint rather than one of its sessions (its teardown).
pub(crate) async fn login_for(
    ctx: &Sessions,
    endpoint_id: &str,
    session_id: Option<&str>,
    r: &ResourceConfig,
) -> Result<client::Handle<Pinned>, ApiError> {
    let (Some(host), Some(user), Some(key_path), Some(host_key)) =
        (&r.host, &r.user, &r.key, &r.host_key)
    else {
        return Err(ApiError::invalid(format!(
            "resource {:?} is not a complete ssh resource in agent.toml",
            r.id
        )));
    };
    let expected = parse_host_key(host_key).map_err(|_| unreachable(&r.id))?;
    let key: PrivateKey = russh::keys::load_secret_key(key_path, None).map_err(|e| {
        tracing::warn!(resource = %r.id, error = %e, "cannot load the ssh key");
        unreachable(&r.id)
    })?;
    let mismatch = Arc::new(Mutex::new(None));
    let handler = Pinned {
        expected: expected.clone(),
        mismatch: mismatch.clone(),
    };
    let tcp = tokio::net::TcpStream::connect(host.as_str())
        .await
        .map_err(|e| {
            tracing::warn!(resource = %r.id, error = %e, "cannot connect to the VM's sshd");
            unreachable(&r.id)
        })?;
    let _ = tcp.set_nodelay(true);
    let mut handle = match client::connect_stream(Arc::new(client_config()), tcp, handler).await {
        Ok(h) => h,
        Err(e) => {
            let presented = mismatch.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(presented) = presented {
                let expected_fp = expected.fingerprint(Default::default()).to_string();
                tracing::error!(resource = %r.id, %presented, expected = %expected_fp, "the VM's host key does not match agent.toml");
                let denied = Entry::new(
                    "denied",
                    ctx.audit.agent_actor(),
                    json!({
                        "action": "ssh-login",
                        "reason": "host key mismatch",
                        "resource_id": r.id,
                        "presented": presented,
                        "expected": expected_fp,
                    }),
                )
                .endpoint(endpoint_id.to_string());
                ctx.audit.record_or_log(match session_id {
                    Some(s) => denied.session(s.to_string()),
                    None => denied,
                });
                return Err(ApiError::new(
                    ErrorCode::TargetUnreachable,
                    format!("the host key of resource {:?} does not match the one pinned in the appliance; refusing to log in", r.id),
                )
                .hint("the customer must check the VM and update host_key in agent.toml if the change is expected"));
            }
            tracing::warn!(resource = %r.id, error = %e, "ssh handshake with the VM failed");
            return Err(unreachable(&r.id));
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
        other => {
            tracing::warn!(resource = %r.id, user = %user, outcome = ?other.map(|a| a.success()), "the VM's sshd refused the appliance's key");
            Err(unreachable(&r.id))
        }
    }
}

/// Why the gateway cut the stream, when it said so with its reset code.
fn reset_reason(e: &quinn::ReadError) -> Option<CloseReason> {
    match e {
        quinn::ReadError::Reset(c) => CloseReason::from_stream_code(c.into_inner()),
        _ => None,
    }
}

#[derive(Debug)]
struct StreamError {
    message: String,
    reason: Option<CloseReason>,
}

impl From<String> for StreamError {
    fn from(message: String) -> Self {
        StreamError {
            message,
            reason: None,
        }
    }
}

fn write_err(e: quinn::WriteError) -> StreamError {
    let reason = match &e {
        quinn::WriteError::Stopped(c) => CloseReason::from_stream_code(c.into_inner()),
        _ => None,
    };
    StreamError {
        message: format!("tunnel write: {e}"),
        reason,
    }
}

async fn read_frame(
    recv: &mut RecvStream,
    buf: &mut BytesMut,
) -> Result<Option<SshFrame>, StreamError> {
    loop {
        if let Some(f) = ssh_stream::decode(buf).map_err(|e| e.to_string())? {
            return Ok(Some(f));
        }
        match recv.read_chunk(256 * 1024, true).await {
            Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
            Ok(None) => return Ok(None),
            Err(e) => {
                return Err(StreamError {
                    message: format!("tunnel read: {e}"),
                    reason: reset_reason(&e),
                })
            }
        }
    }
}

fn pty_modes(modes: &[(u8, u32)]) -> Vec<(Pty, u32)> {
    modes
        .iter()
        .filter_map(|(c, v)| Pty::from_u8(*c).map(|p| (p, *v)))
        .filter(|(p, _)| *p != Pty::TTY_OP_END)
        .collect()
}

fn sig(name: &str) -> Sig {
    match name {
        "ABRT" => Sig::ABRT,
        "ALRM" => Sig::ALRM,
        "FPE" => Sig::FPE,
        "HUP" => Sig::HUP,
        "ILL" => Sig::ILL,
        "INT" => Sig::INT,
        "KILL" => Sig::KILL,
        "PIPE" => Sig::PIPE,
        "QUIT" => Sig::QUIT,
        "SEGV" => Sig::SEGV,
        "TERM" => Sig::TERM,
        "USR1" => Sig::USR1,
        other => Sig::Custom(other.chars().take(32).collect()),
    }
}

fn sig_name(s: &Sig) -> String {
    match s {
        Sig::ABRT => "ABRT".into(),
        Sig::ALRM => "ALRM".into(),
        Sig::FPE => "FPE".into(),
        Sig::HUP => "HUP".into(),
        Sig::ILL => "ILL".into(),
        Sig::INT => "INT".into(),
        Sig::KILL => "KILL".into(),
        Sig::PIPE => "PIPE".into(),
        Sig::QUIT => "QUIT".into(),
        Sig::SEGV => "SEGV".into(),
        Sig::TERM => "TERM".into(),
        Sig::USR1 => "USR1".into(),
        Sig::Custom(c) => c.clone(),
    }
}

/// Serves one SSH data stream the agent admitted, to its end.
pub async fn serve_stream(
    ctx: &Sessions,
    open: StreamOpen,
    resource: ResourceConfig,
    cut: Cut,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let handle = tokio::select! {
        r = tokio::time::timeout(CONNECT_TIMEOUT, login(ctx, &open, &resource)) => match r {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => return refuse(&mut send, e).await,
            Err(_) => return refuse(&mut send, unreachable(&resource.id)).await,
        },
        () = cut.cancelled() => return cut_quic(&mut send, &mut recv, cut.reason().unwrap_or(CloseReason::Interrupted)),
    };
    let disconnect = |why: &'static str| {
        let h = &handle;
        async move {
            let _ = h.disconnect(Disconnect::ByApplication, why, "en").await;
        }
    };
    if accept(&mut send).await.is_err() {
        return disconnect("gateway gone").await;
    }
    let mut buf = BytesMut::new();
    let start = tokio::select! {
        r = tokio::time::timeout(START_TIMEOUT, read_frame(&mut recv, &mut buf)) => match r {
            Ok(Ok(Some(SshFrame::Start(s)))) => s,
            _ => {
                cut_quic(&mut send, &mut recv, CloseReason::Error);
                return disconnect("no session request").await;
            }
        },
        () = cut.cancelled() => {
            cut_quic(&mut send, &mut recv, cut.reason().unwrap_or(CloseReason::Interrupted));
            return disconnect("endpoint ended").await;
        }
    };
    let user = resource.user.clone().unwrap_or_default();
    let record_input = resource.record_input.unwrap_or(false);
    if !within_scope(ctx, &open, &resource, &start, &mut send).await {
        return disconnect("session refused").await;
    }
    // An exec's input is what the program runs on (`bash -s < script.sh`): always recorded.
    let record_stdin = ssh_scope::records_input(start.pty.is_some(), record_input);
    let entry = |kind: &'static str, detail: serde_json::Value| session_entry(kind, &open, detail);
    // Durable before anything runs on the VM: no trail, no session.
    let opened = ctx.audit.write(entry("session.opened", json!({
        "resource_id": resource.id, "client_addr": open.client_addr, "kind": "ssh", "user": user,
        "command": start.command, "subsystem": start.subsystem, "pty": start.pty.is_some(),
    }))).await;
    if let Err(e) = opened {
        tracing::error!(error = %e, "cannot write the customer's audit trail; refusing the ssh session");
        let _ = send
            .write_all(&SshFrame::Error(trail_refusal()).to_bytes())
            .await;
        let _ = send.finish();
        return disconnect("session refused").await;
    }
    let (channel, early) = match start_upstream(&handle, &start).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(resource = %resource.id, error = %e, "the VM's sshd would not start the session");
            let err = ApiError::new(
                ErrorCode::TargetUnreachable,
                format!("the VM refused to start the session: {e}"),
            );
            let _ = send.write_all(&SshFrame::Error(err).to_bytes()).await;
            let _ = send.finish();
            return disconnect("session refused").await;
        }
    };
    if send
        .write_all(
            &SshFrame::Ready(SshReady {
                user: user.clone(),
                record_input,
            })
            .to_bytes(),
        )
        .await
        .is_err()
    {
        return disconnect("gateway gone").await;
    }
    let started = Instant::now();
    let started_at = jiff::Timestamp::now();

    let header = start.recording_header(
        started_at,
        format!("{} {}", open.endpoint_id, open.session_id),
    );
    let rec = Mutex::new(Recorder::new(&header, RECORDING_CAP));
    let mut exit: Option<u32> = None;
    let mut exit_signal: Option<ExitSignal> = None;
    let mut up_bytes = 0u64;
    let mut down_bytes = 0u64;
    let (mut reader, writer) = channel.split();
    let outcome: Result<(), StreamError> = {
        let record = |f: &dyn Fn(&mut Recorder, Duration)| {
            if let Ok(mut r) = rec.lock() {
                f(&mut r, started.elapsed());
            }
        };
        // Gateway → VM: input, window changes, signals, EOF.
        let up = async {
            loop {
                match read_frame(&mut recv, &mut buf).await? {
                    Some(SshFrame::Data(d)) => {
                        if record_stdin {
                            record(&|r, at| r.input(at, &d));
                        }
                        up_bytes += d.len() as u64;
                        writer
                            .data_bytes(d)
                            .await
                            .map_err(|e| format!("upstream write: {e}"))?;
                    }
                    Some(SshFrame::Eof) => {
                        let _ = writer.eof().await;
                    }
                    Some(SshFrame::WindowChange {
                        cols,
                        rows,
                        pix_width,
                        pix_height,
                    }) => {
                        record(&|r, at| r.resize(at, cols, rows));
                        let _ = writer
                            .window_change(cols, rows, pix_width, pix_height)
                            .await;
                    }
                    Some(SshFrame::Signal(s)) => {
                        let _ = writer.signal(sig(&s)).await;
                    }
                    Some(other) => {
                        return Err(format!("unexpected {} from the gateway", other.name()).into())
                    }
                    // The engineer closed the session.
                    None => {
                        let _ = writer.close().await;
                        return Ok::<(), StreamError>(());
                    }
                }
            }
        };
        // VM → gateway: output, stderr, EOF, exit status.
        let down = async {
            let mut early = early.into_iter();
            loop {
                let msg = match early.next() {
                    Some(m) => m,
                    None => match reader.wait().await {
                        Some(m) => m,
                        None => break,
                    },
                };
                let frame = match msg {
                    ChannelMsg::Data { data } => {
                        record(&|r, at| r.output(at, &data));
                        down_bytes += data.len() as u64;
                        send.write_all(&SshFrame::data_header(data.len(), false))
                            .await
                            .map_err(write_err)?;
                        send.write_chunk(data).await.map_err(write_err)?;
                        continue;
                    }
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        record(&|r, at| r.output(at, &data));
                        down_bytes += data.len() as u64;
                        SshFrame::Stderr(data)
                    }
                    ChannelMsg::Eof => SshFrame::Eof,
                    ChannelMsg::ExitStatus { exit_status } => {
                        exit = Some(exit_status);
                        SshFrame::ExitStatus(exit_status)
                    }
                    ChannelMsg::ExitSignal {
                        signal_name,
                        core_dumped,
                        error_message,
                        ..
                    } => {
                        let s = ExitSignal {
                            signal: sig_name(&signal_name),
                            core_dumped,
                            message: error_message,
                        };
                        exit_signal = Some(s.clone());
                        SshFrame::ExitSignal(s)
                    }
                    ChannelMsg::Close => break,
                    _ => continue,
                };
                send.write_all(&frame.to_bytes()).await.map_err(write_err)?;
            }
            let _ = send.finish();
            Ok::<(), StreamError>(())
        };
        tokio::pin!(up);
        tokio::pin!(down);
        tokio::select! {
            r = &mut down => r,
            r = &mut up => match r {
                Ok(()) => tokio::time::timeout(Duration::from_secs(5), &mut down).await.unwrap_or_else(|_| Err(String::from("the VM did not end the session").into())),
                Err(e) => Err(e),
            },
            () = cut.cancelled() => Err(String::from("cut").into()),
        }
    };
    let reason = match &outcome {
        Ok(()) => CloseReason::Client,
        Err(e) => cut.reason().or(e.reason).unwrap_or(CloseReason::Error),
    };
    if outcome.is_err() {
        cut_quic(&mut send, &mut recv, reason);
    }
    // The upstream session ends with the engineer's, whatever ended it.
    disconnect("session ended").await;
    if let Some(cmd) = &start.command {
        ctx.audit.record_or_log(entry("ssh.exec", json!({
            "command": cmd, "exit_status": exit, "exit_signal": exit_signal.map(|s| s.signal), "user": user,
            "resource_id": resource.id, "reason": reason.as_str(),
        })));
    }
    let recording = match rec.into_inner() {
        Ok(r) => r.finish(started.elapsed()),
        Err(p) => p.into_inner().finish(started.elapsed()),
    };
    ctx.audit.record_or_log(entry("ssh.recording", json!({
        "format": "asciicast-v2", "endpoint_id": open.endpoint_id, "session_id": open.session_id, "operator": open.operator,
        "user": user, "command": start.command, "input_recorded": record_stdin, "truncated": recording.truncated,
        "output_bytes": recording.output_bytes, "input_bytes": recording.input_bytes, "cast": recording.cast,
    })));
    ctx.audit.record_or_log(entry(
        "session.closed",
        json!({
            "reason": reason.as_str(), "bytes_up": up_bytes, "bytes_down": down_bytes,
            "duration_ms": started.elapsed().as_millis() as u64, "resource_id": resource.id,
        }),
    ));
    if let Err(e) = outcome {
        tracing::debug!(session = %open.session_id, reason = reason.as_str(), "ssh session ended: {}", e.message);
    }
}

/// The agent's own check of what the session runs: the gateway applies the same one, but the
/// customer's scope must hold even if the gateway does not. A refusal is audited and told.
async fn within_scope(
    ctx: &Sessions,
    open: &StreamOpen,
    resource: &ResourceConfig,
    start: &SshStart,
    send: &mut SendStream,
) -> bool {
    let Err(why) = ssh_scope::check_start(
        start.command.as_deref(),
        start.subsystem.as_deref(),
        resource.sftp.unwrap_or(false),
    ) else {
        return true;
    };
    tracing::info!(resource = %resource.id, session = %open.session_id, "refused an ssh session: {why}");
    ctx.audit.record_or_log(session_entry("denied", open, json!({
        "action": if start.command.is_some() { "exec" } else { "subsystem" },
        "reason": why, "code": ErrorCode::ForbiddenByScope.as_str(), "command": start.command, "subsystem": start.subsystem,
        "resource_id": resource.id, "user": resource.user,
    })));
    let err = ApiError::new(ErrorCode::ForbiddenByScope, why)
        .hint("file transfer (sftp, scp, rsync) is allowed only where the customer sets sftp = true on the resource");
    let _ = send.write_all(&SshFrame::Error(err).to_bytes()).await;
    let _ = send.finish();
    false
}

/// Opens the upstream channel and starts what the engineer asked for; waits for sshd's answer.
async fn start_upstream(
    handle: &client::Handle<Pinned>,
    start: &SshStart,
) -> Result<(russh::Channel<client::Msg>, Vec<ChannelMsg>), String> {
    let mut early = Vec::new();
    let mut channel = handle
        .channel_open_session()
        .await
        .map_err(|e| e.to_string())?;
    for (name, value) in &start.env {
        let _ = channel.set_env(false, name.as_str(), value.as_str()).await;
    }
    if let Some(p) = &start.pty {
        channel
            .request_pty(
                true,
                &p.term,
                p.cols,
                p.rows,
                p.pix_width,
                p.pix_height,
                &pty_modes(&p.modes),
            )
            .await
            .map_err(|e| e.to_string())?;
        expect_success(&mut channel, "pty", &mut early).await?;
    }
    match (&start.command, &start.subsystem) {
        (Some(cmd), _) => channel
            .exec(true, cmd.as_bytes())
            .await
            .map_err(|e| e.to_string())?,
        (None, Some(sub)) => channel
            .request_subsystem(true, sub.as_str())
            .await
            .map_err(|e| e.to_string())?,
        (None, None) => channel
            .request_shell(true)
            .await
            .map_err(|e| e.to_string())?,
    }
    expect_success(&mut channel, "program", &mut early).await?;
    Ok((channel, early))
}

/// Waits for sshd's reply to a request. What the channel carries meanwhile (a fast program's
/// first output) is kept in `early` for the relay.
async fn expect_success(
    channel: &mut russh::Channel<client::Msg>,
    what: &str,
    early: &mut Vec<ChannelMsg>,
) -> Result<(), String> {
    loop {
        match tokio::time::timeout(START_TIMEOUT, channel.wait()).await {
            Ok(Some(ChannelMsg::Success)) => return Ok(()),
            Ok(Some(ChannelMsg::Failure)) => return Err(format!("{what} request refused")),
            Ok(Some(ChannelMsg::WindowAdjusted { .. })) => continue,
            Ok(Some(other)) if early.len() < 1024 => early.push(other),
            Ok(Some(_)) => return Err(format!("too much traffic before the {what} reply")),
            Ok(None) => return Err("the VM closed the channel".into()),
            Err(_) => return Err(format!("no answer to the {what} request")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(user: Option<&str>, host_key: Option<&str>) -> ResourceConfig {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHvNC2Rpugiiw1pOjJYmMBaGVsELXpfLPjkH7LZq6NMY test";
        let toml = format!(
            "id = \"aws_instance.worker\"\nkind = \"ssh\"\nhost = \"127.0.0.1:22\"\n{}key = \"/etc/postern/vm.key\"\n{}",
            user.map(|u| format!("user = \"{u}\"\n")).unwrap_or_default(),
            host_key.map(|h| format!("host_key = \"{}\"\n", if h == "good" { key } else { h })).unwrap_or_default(),
        );
        toml::from_str(&toml).unwrap()
    }

    #[test]
    fn config_rules() {
        assert_eq!(
            validate_config(&resource(Some("deploy"), Some("good"))),
            Ok(())
        );
        let table: &[(Option<&str>, Option<&str>, &str)] = &[
            (Some("root"), Some("good"), "never root"),
            (None, Some("good"), "needs `user`"),
            (Some("de ploy"), Some("good"), "never root"),
            (Some("deploy"), None, "needs `host_key`"),
            (
                Some("deploy"),
                Some("ssh-ed25519 AAAA"),
                "not an OpenSSH public key",
            ),
        ];
        for (user, hk, want) in table {
            let err = validate_config(&resource(*user, *hk)).unwrap_err();
            assert!(err.contains(want), "{user:?} {hk:?}: {err}");
        }
    }

    #[test]
    fn host_key_may_carry_a_host_in_front() {
        let k = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHvNC2Rpugiiw1pOjJYmMBaGVsELXpfLPjkH7LZq6NMY";
        assert!(parse_host_key(k).is_ok());
        assert!(parse_host_key(&format!("[10.0.0.5]:22 {k}")).is_ok());
        assert!(parse_host_key("nonsense").is_err());
    }
}
