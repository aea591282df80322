//! One SSH session channel ⇄ one QUIC data stream to the agent, recorded on the way.
//!
//! The channel waits for its program (shell, exec or subsystem) as decided by the policy,
//! opens the data stream, sends [`SshFrame::Start`], waits for the agent's
//! [`SshFrame::Ready`], then relays both ways: client input, window changes, signals and EOF
//! up; output, stderr, EOF and exit status down. What the terminal shows (and what is typed,
//! if the customer asks for it; an exec's input always) goes into an asciicast recording stored in the vendor trail
//! as `ssh.recording`; an exec's command line and exit status go in as `ssh.exec`.

use super::policy::Request;
use crate::{
    audit::Subject,
    endpoints::{front_ends::FrontEndContext, session, LiveEndpoint},
};
use bytes::{Bytes, BytesMut};
use endpoint_types::{
    asciicast::Recorder,
    resource::CloseReason,
    ssh_scope,
    ssh_stream::{self, ExitSignal, SshFrame, SshReady, SshStart},
    ApiError,
};
use russh::{server::Msg, Channel, ChannelMsg, ChannelWriteHalf, Sig};
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use tokio::sync::mpsc;

/// How long a channel may sit without asking for a program.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the agent may take to log in upstream and start the program.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Input buffered before the program starts; past it, reading from the client pauses.
const EARLY_INPUT_MAX: usize = 256 * 1024;
/// Cap on one recording in the vendor trail.
pub const RECORDING_CAP: usize = 1024 * 1024;
/// After the client closes its channel, how long the agent gets to end the program.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub enum Control {
    Start(SshStart),
    Forward(Request),
}

pub struct ChannelCtx {
    pub ctx: Arc<FrontEndContext>,
    pub ep: Arc<LiveEndpoint>,
    pub client: SocketAddr,
    pub login: String,
    pub slot: session::SessionSlot,
    pub handle: russh::server::Handle,
}

/// Tells the engineer why, on stderr, then ends the channel as sshd does for a failed start.
async fn fail(writer: &ChannelWriteHalf<Msg>, e: &ApiError) {
    let mut msg = format!("postern: {}", e.message);
    if !e.hint.is_empty() {
        msg.push_str(&format!(" ({})", e.hint));
    }
    msg.push_str("\r\n");
    let _ = writer.extended_data_bytes(1, Bytes::from(msg)).await;
    let _ = writer.exit_status(255).await;
    let _ = writer.eof().await;
    let _ = writer.close().await;
}

pub async fn run(channel_ctx: ChannelCtx, channel: Channel<Msg>, mut ctl: mpsc::Receiver<Control>) {
    let ChannelCtx {
        ctx,
        ep,
        client,
        login,
        slot,
        handle,
    } = channel_ctx;
    let _slot = slot;
    let (mut reader, writer) = channel.split();

    // 1. Until the program is chosen: keep early input, honour a cut.
    let mut early = BytesMut::new();
    let mut early_eof = false;
    let deadline = tokio::time::sleep(START_TIMEOUT);
    tokio::pin!(deadline);
    let start = loop {
        tokio::select! {
            _ = ep.cancel.cancelled() => return,
            _ = &mut deadline => {
                let _ = writer.close().await;
                return;
            }
            c = ctl.recv() => match c {
                Some(Control::Start(s)) => break s,
                Some(Control::Forward(_)) => continue,
                None => return,
            },
            m = reader.wait(), if early.len() < EARLY_INPUT_MAX => match m {
                Some(ChannelMsg::Data { data }) => early.extend_from_slice(&data),
                Some(ChannelMsg::Eof) => early_eof = true,
                Some(ChannelMsg::Close) | None => return,
                Some(_) => {}
            },
        }
    };

    // 2. A data stream to the agent.
    let session_id = session::new_session_id();
    let opened = tokio::select! {
        _ = ep.cancel.cancelled() => return,
        r = session::open_stream(&ctx, &ep, &session_id, client) => r,
    };
    let stream = match opened {
        Ok(s) => s,
        Err(e) => {
            session::deny(&*ctx.audit, &ep, &session_id, client, &e).await;
            return fail(&writer, &e).await;
        }
    };
    let session::DataStream {
        mut send,
        recv,
        leftover,
        connection,
    } = stream;
    let mut recv = recv;
    let mut buf = BytesMut::from(&leftover[..]);
    let start_frame = SshFrame::Start(start.clone()).to_bytes();
    let ready = async {
        send.write_all(&start_frame)
            .await
            .map_err(|e| ApiError::internal(format!("tunnel write: {e}")))?;
        loop {
            match ssh_stream::decode(&mut buf) {
                Ok(Some(SshFrame::Ready(r))) => return Ok(r),
                Ok(Some(SshFrame::Error(e))) => return Err(e),
                Ok(Some(other)) => {
                    return Err(ApiError::internal(format!(
                        "the agent sent {} before ready",
                        other.name()
                    )))
                }
                Ok(None) => {}
                Err(e) => return Err(ApiError::internal(e.to_string())),
            }
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
                Ok(None) => {
                    return Err(ApiError::internal(
                        "the agent ended the stream before the session started",
                    ))
                }
                Err(e) => return Err(ApiError::internal(format!("tunnel read: {e}"))),
            }
        }
    };
    let ready: Result<SshReady, ApiError> = tokio::select! {
        _ = ep.cancel.cancelled() => return,
        r = tokio::time::timeout(READY_TIMEOUT, ready) => r.unwrap_or_else(|_| Err(ApiError::internal("the appliance did not start the session in time"))),
    };
    let ready = match ready {
        Ok(r) => r,
        Err(e) => {
            let code = quinn::VarInt::from_u32(CloseReason::Error.stream_code());
            let _ = send.reset(code);
            let _ = recv.stop(code);
            session::deny(&*ctx.audit, &ep, &session_id, client, &e).await;
            return fail(&writer, &e).await;
        }
    };
    let started = Instant::now();
    let started_at = jiff::Timestamp::now();
    let trail = match session::opened(
        &ctx,
        &ep,
        &session_id,
        client,
        serde_json::json!({
            "kind": "ssh",
            "login": login,
            "upstream_user": ready.user,
            "command": start.command,
            "subsystem": start.subsystem,
            "pty": start.pty.is_some(),
        }),
    )
    .await
    {
        Ok(watch) => watch,
        Err(e) => {
            let code = quinn::VarInt::from_u32(CloseReason::Error.stream_code());
            let _ = send.reset(code);
            let _ = recv.stop(code);
            session::deny(&*ctx.audit, &ep, &session_id, client, &e).await;
            return fail(&writer, &e).await;
        }
    };

    // 3. Relay.
    let header = start.recording_header(started_at, format!("{} {}", ep.id, session_id));
    let rec = Mutex::new(Recorder::new(&header, RECORDING_CAP));
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);
    let mut exit: Option<u32> = None;
    let mut exit_signal: Option<ExitSignal> = None;
    let outcome: Result<(), String> = {
        let record = |f: &dyn Fn(&mut Recorder, Duration)| {
            if let Ok(mut r) = rec.lock() {
                f(&mut r, started.elapsed());
            }
        };
        // An exec's stdin is recorded whatever `record_input` says; keystrokes under a pty only
        // where the customer asks.
        let record_input = ssh_scope::records_input(start.pty.is_some(), ready.record_input);
        let up = async {
            if !early.is_empty() {
                let data = early.split().freeze();
                if record_input {
                    record(&|r, at| r.input(at, &data));
                }
                up_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                send.write_all(&SshFrame::Data(data).to_bytes()).await?;
            }
            if early_eof {
                send.write_all(&SshFrame::Eof.to_bytes()).await?;
            }
            loop {
                tokio::select! {
                    m = reader.wait() => match m {
                        Some(ChannelMsg::Data { data }) => {
                            if record_input {
                                record(&|r, at| r.input(at, &data));
                            }
                            up_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                            send.write_all(&SshFrame::data_header(data.len(), false)).await?;
                            send.write_chunk(data).await?;
                        }
                        Some(ChannelMsg::Eof) => send.write_all(&SshFrame::Eof.to_bytes()).await?,
                        Some(ChannelMsg::Close) | None => {
                            let _ = send.finish();
                            return Ok::<(), quinn::WriteError>(());
                        }
                        Some(_) => {}
                    },
                    c = ctl.recv() => match c {
                        Some(Control::Forward(Request::WindowChange { cols, rows, pix_width, pix_height })) => {
                            record(&|r, at| r.resize(at, cols, rows));
                            send.write_all(&SshFrame::WindowChange { cols, rows, pix_width, pix_height }.to_bytes()).await?;
                        }
                        Some(Control::Forward(Request::Signal(s))) => send.write_all(&SshFrame::Signal(s).to_bytes()).await?,
                        Some(_) => {}
                        // The connection is gone; the channel's Close follows on the reader.
                        None => std::future::pending::<()>().await,
                    },
                }
            }
        };
        let down = async {
            loop {
                loop {
                    match ssh_stream::decode(&mut buf) {
                        Ok(Some(SshFrame::Data(d))) => {
                            record(&|r, at| r.output(at, &d));
                            down_bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                            writer
                                .data_bytes(d)
                                .await
                                .map_err(|e| DownError::Client(e.to_string()))?;
                        }
                        Ok(Some(SshFrame::Stderr(d))) => {
                            record(&|r, at| r.output(at, &d));
                            down_bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                            writer
                                .extended_data_bytes(1, d)
                                .await
                                .map_err(|e| DownError::Client(e.to_string()))?;
                        }
                        Ok(Some(SshFrame::Eof)) => {
                            let _ = writer.eof().await;
                        }
                        Ok(Some(SshFrame::ExitStatus(c))) => {
                            exit = Some(c);
                            let _ = writer.exit_status(c).await;
                        }
                        Ok(Some(SshFrame::ExitSignal(s))) => {
                            let _ = handle
                                .exit_signal_request(
                                    writer.id(),
                                    sig_from_name(&s.signal),
                                    s.core_dumped,
                                    s.message.clone(),
                                    String::new(),
                                )
                                .await;
                            exit_signal = Some(s);
                        }
                        Ok(Some(SshFrame::Error(e))) => {
                            let msg = format!("postern: {}\r\n", e.message);
                            let _ = writer.extended_data_bytes(1, Bytes::from(msg)).await;
                        }
                        Ok(Some(other)) => {
                            return Err(DownError::Protocol(format!(
                                "unexpected {} from the agent",
                                other.name()
                            )))
                        }
                        Ok(None) => break,
                        Err(e) => return Err(DownError::Protocol(e.to_string())),
                    }
                }
                match recv.read_chunk(256 * 1024, true).await {
                    Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
                    Ok(None) => {
                        let _ = writer.close().await;
                        return Ok(());
                    }
                    Err(e) => return Err(DownError::Tunnel(e)),
                }
            }
        };
        tokio::pin!(up);
        tokio::pin!(down);
        tokio::select! {
            _ = ep.cancel.cancelled() => Err("cut".into()),
            // Nothing more runs unrecorded: the session ends with reason `error`.
            _ = trail.cancelled() => Err("the vendor audit trail cannot be written".into()),
            r = &mut down => r.map_err(|e| e.to_string()),
            // The client closed its channel (the agent then ends the program and the stream), or
            // the agent stopped reading because the program already ended: either way, what
            // the program printed is still on its way down.
            r = &mut up => match tokio::time::timeout(CLOSE_GRACE, &mut down).await {
                Ok(d) => d.map_err(|e| e.to_string()),
                Err(_) => Err(match r {
                    Ok(()) => "the agent did not end the session after the client closed it".to_string(),
                    Err(e) => format!("tunnel write: {e}"),
                }),
            },
        }
    };
    let reason = match &outcome {
        Ok(()) => CloseReason::Client,
        Err(_) if ep.cancel.is_cancelled() => ep.end_reason(),
        Err(_) if connection.close_reason().is_some() => CloseReason::Interrupted,
        Err(_) => CloseReason::Error,
    };
    if outcome.is_err() {
        let code = quinn::VarInt::from_u32(reason.stream_code());
        let _ = send.reset(code);
        let _ = recv.stop(code);
        let _ = writer.close().await;
    }

    // 4. Audit: exec, recording, close.
    let subject = Subject::session(&ep.appliance_id, &ep.id, &session_id);
    if let Some(cmd) = &start.command {
        ctx.audit
            .record(
                "ssh.exec",
                &ep.operator,
                subject.clone(),
                serde_json::json!({
                    "command": cmd,
                    "exit_status": exit,
                    "exit_signal": exit_signal.as_ref().map(|s| s.signal.clone()),
                    "upstream_user": ready.user,
                    "reason": reason.as_str(),
                }),
            )
            .await;
    }
    let recording = match rec.into_inner() {
        Ok(r) => r.finish(started.elapsed()),
        Err(p) => p.into_inner().finish(started.elapsed()),
    };
    ctx.audit
        .record(
            "ssh.recording",
            &ep.operator,
            subject,
            serde_json::json!({
                "format": "asciicast-v2",
                "endpoint_id": ep.id,
                "session_id": session_id,
                "operator": ep.operator,
                "login": login,
                "upstream_user": ready.user,
                "command": start.command,
                "input_recorded": ssh_scope::records_input(start.pty.is_some(), ready.record_input),
                "truncated": recording.truncated,
                "output_bytes": recording.output_bytes,
                "input_bytes": recording.input_bytes,
                "cast": recording.cast,
            }),
        )
        .await;
    let extra = match &outcome {
        Err(e) => serde_json::json!({ "error": e, "exit_status": exit }),
        Ok(()) => serde_json::json!({ "exit_status": exit }),
    };
    session::closed(
        &*ctx.audit,
        &ep,
        &session_id,
        reason,
        (
            up_bytes.load(Ordering::Relaxed),
            down_bytes.load(Ordering::Relaxed),
        ),
        started,
        extra,
    )
    .await;
    if let Err(e) = outcome {
        tracing::info!(endpoint = %ep.id, session = %session_id, reason = reason.as_str(), "ssh session ended: {e}");
    }
}

#[derive(Debug, thiserror::Error)]
enum DownError {
    #[error("client: {0}")]
    Client(String),
    #[error("agent protocol: {0}")]
    Protocol(String),
    #[error("tunnel read: {0}")]
    Tunnel(quinn::ReadError),
}

fn sig_from_name(name: &str) -> Sig {
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
