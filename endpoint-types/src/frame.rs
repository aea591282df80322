//! Tunnel frames (gateway ⇄ agent) and their sans-IO codec.
//!
//! Wire form: `u32` big-endian length `L`, then `L` bytes: one version byte ([`FRAME_VERSION`])
//! followed by the frame as JSON. The length is checked against the decoder's limit before
//! anything is buffered for it, so a peer cannot make us allocate past the limit.
//!
//! The control stream carries these frames for the connection's life. A data stream starts
//! with one [`Frame::StreamOpen`] from the gateway and one [`Frame::StreamAccept`] or
//! [`Frame::StreamRefuse`] from the agent; after that it carries the proxied bytes raw.

use crate::{
    api::{EnrollRequest, EnrollResponse},
    error::ApiError,
    resource::{CloseReason, EndpointType, PolicySummary, ResourceDescriptor},
};
use bytes::{Buf, BufMut, BytesMut};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

pub const FRAME_VERSION: u8 = 1;
/// Default limit for one frame on the control stream.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;
/// Limit for the header frames of a data stream, which are small.
pub const MAX_STREAM_HEADER_LEN: usize = 16 * 1024;
const LEN_PREFIX: usize = 4;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    /// Agent → gateway, the first frame on the control stream.
    Hello(Hello),
    /// Gateway → agent, the answer to a hello the gateway accepts.
    HelloAck(HelloAck),
    /// Either way; the peer answers with `HeartbeatAck` carrying the same `seq`.
    Heartbeat {
        seq: u64,
    },
    HeartbeatAck {
        seq: u64,
    },
    /// Gateway → agent: the full set of live endpoints of this appliance (sent after the hello).
    EndpointSync {
        endpoints: Vec<EndpointGrant>,
    },
    /// Gateway → agent: an endpoint became live.
    EndpointOpen(EndpointGrant),
    /// Gateway → agent: an endpoint ended; the agent cuts its sessions and refuses new ones.
    EndpointClose {
        endpoint_id: String,
        reason: CloseReason,
    },
    /// Gateway → agent: the appliance's live grants (the full set, after every change). The agent
    /// serves endpoint sessions and runs ops only under a live `operate` grant by its own clock.
    GrantSync {
        grants: Vec<LiveGrant>,
    },
    /// Gateway → agent: run a one-off op. The agent checks its own policy and grants first.
    OpDispatch(OpDispatch),
    /// Agent → gateway: the op was refused in the appliance (policy, grant, tool, command).
    OpRefused {
        op_id: String,
        error: ApiError,
    },
    /// Agent → gateway: the op's process started.
    OpStarted {
        op_id: String,
    },
    /// Agent → gateway: output. `preview` output is for an approver's eyes only and must not be
    /// stored or logged by the gateway.
    OpOutput {
        op_id: String,
        stream: OutputStream,
        data: String,
        preview: bool,
    },
    /// Agent → gateway: the op ended. With `held`, output, exit code and error stay in the
    /// appliance until released (then they follow as `OpOutput` + a final `OpFinished`).
    OpFinished(OpFinished),
    /// Agent → gateway: a record about a running op for the vendor trail too: what a
    /// `kubectl` op's per-op proxy forwarded or refused (`kind` is `kube.request` or `denied`;
    /// the gateway records no other kind from it).
    OpRecord {
        op_id: String,
        kind: String,
        detail: serde_json::Value,
    },
    /// Gateway → agent: send the held output of an op as preview (an approver is looking).
    OutputFetch {
        op_id: String,
    },
    /// Gateway → agent: the customer released the held output.
    OutputRelease {
        op_id: String,
        approved_by: String,
    },
    /// Gateway → agent: the customer denied the held output; destroy it.
    OutputDestroy {
        op_id: String,
        denied_by: String,
        message: Option<String>,
    },
    /// Gateway → agent, first frame of a data stream.
    StreamOpen(StreamOpen),
    /// Agent → gateway on a data stream: the target is connected; raw bytes follow.
    StreamAccept,
    /// Agent → gateway on a data stream: refused, with the reason.
    StreamRefuse(ApiError),
    /// Agent → gateway on an enrollment connection.
    EnrollRequest(EnrollRequest),
    /// Gateway → agent on an enrollment connection.
    EnrollResponse(EnrollResponse),
    /// Either way: a protocol error, sent before the sender closes.
    Error(ApiError),
    /// Agent → gateway: what an ended SSH endpoint's teardown did on the VM.
    SshTeardown(crate::ssh_scope::SshTeardown),
    /// Gateway → agent: a command the agent must not miss (grant sync, endpoint sync/open/close,
    /// op dispatch, output release/destroy), numbered per connection from 1. The agent applies
    /// `command` and then answers `CommandAck` with the same `seq`.
    Command {
        seq: u64,
        command: Box<Frame>,
    },
    /// Agent → gateway: every command up to and including `seq` has been applied.
    CommandAck {
        seq: u64,
    },
}

impl Frame {
    /// The frame's wire name (its `type`), for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::HelloAck(_) => "hello_ack",
            Frame::Heartbeat { .. } => "heartbeat",
            Frame::HeartbeatAck { .. } => "heartbeat_ack",
            Frame::EndpointSync { .. } => "endpoint_sync",
            Frame::EndpointOpen(_) => "endpoint_open",
            Frame::EndpointClose { .. } => "endpoint_close",
            Frame::GrantSync { .. } => "grant_sync",
            Frame::OpDispatch(_) => "op_dispatch",
            Frame::OpRefused { .. } => "op_refused",
            Frame::OpStarted { .. } => "op_started",
            Frame::OpOutput { .. } => "op_output",
            Frame::OpFinished(_) => "op_finished",
            Frame::OpRecord { .. } => "op_record",
            Frame::OutputFetch { .. } => "output_fetch",
            Frame::OutputRelease { .. } => "output_release",
            Frame::OutputDestroy { .. } => "output_destroy",
            Frame::StreamOpen(_) => "stream_open",
            Frame::StreamAccept => "stream_accept",
            Frame::StreamRefuse(_) => "stream_refuse",
            Frame::EnrollRequest(_) => "enroll_request",
            Frame::EnrollResponse(_) => "enroll_response",
            Frame::Error(_) => "error",
            Frame::SshTeardown(_) => "ssh_teardown",
            Frame::Command { .. } => "command",
            Frame::CommandAck { .. } => "command_ack",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    pub agent_version: String,
    pub resources: Vec<ResourceDescriptor>,
    pub policy: PolicySummary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloAck {
    pub appliance_id: String,
    pub app: String,
    pub customer: String,
    pub heartbeat_interval_ms: u64,
    pub lost_after_ms: u64,
}

/// An endpoint the agent may serve sessions for, until `expires_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointGrant {
    pub endpoint_id: String,
    pub endpoint_type: EndpointType,
    pub resource_id: String,
    pub expires_at: Timestamp,
    /// The operate grant the endpoint was created under; it must be live for every session.
    #[serde(default)]
    pub grant_id: Option<String>,
}

/// A grant as the agent needs it to enforce: what, until when, approved by whom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveGrant {
    pub grant_id: String,
    pub level: crate::control::GrantLevel,
    pub approved_by: String,
    pub approved_at: Timestamp,
    pub expires_at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// An op as dispatched to the agent, with the approvals it was given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpDispatch {
    pub op_id: String,
    pub tool: crate::control::OpTool,
    /// The exact command the approver saw; the agent splits it itself.
    pub command: String,
    pub resource_id: String,
    pub timeout_s: u64,
    pub operator: String,
    pub grant_id: String,
    /// Who approved the command: a person, or `policy:automatic` / `policy:window`.
    pub command_approved_by: String,
    pub command_approved_at: Timestamp,
    /// Whether output must be held for the customer's approval.
    pub hold_output: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpFinished {
    pub op_id: String,
    pub held: bool,
    #[serde(default)]
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub truncated: bool,
    #[serde(default)]
    pub timed_out: bool,
    /// COMMAND_FAILED / COMMAND_TIMEOUT with details; absent while held.
    #[serde(default)]
    pub error: Option<ApiError>,
    /// For a preview (approver view) rather than the op's real end.
    #[serde(default)]
    pub preview: bool,
    /// The held output was destroyed (denied).
    #[serde(default)]
    pub destroyed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamOpen {
    pub endpoint_id: String,
    pub session_id: String,
    pub resource_id: String,
    /// Who is on the other end (the endpoint's operator), for the customer's trail.
    pub operator: String,
    /// The client's address as the gateway saw it.
    pub client_addr: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("unsupported frame version {0} (this side speaks {FRAME_VERSION})")]
    Version(u8),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl FrameError {
    pub fn to_api_error(&self) -> ApiError {
        use crate::error::ErrorCode;
        let code = match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Version(_) => ErrorCode::ProtocolVersion,
            FrameError::Empty | FrameError::Malformed(_) => ErrorCode::MalformedFrame,
        };
        ApiError::new(code, self.to_string())
            .hint("the peer does not speak postern/1 correctly; check both versions")
    }
}

/// Appends one encoded frame to `dst`.
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    // Serialising these types to JSON cannot fail: no maps with non-string keys, no
    // custom serialisers that error.
    let json = serde_json::to_vec(frame).unwrap_or_default();
    dst.reserve(LEN_PREFIX + 1 + json.len());
    dst.put_u32((json.len() + 1) as u32);
    dst.put_u8(FRAME_VERSION);
    dst.extend_from_slice(&json);
}

pub fn encode_to_vec(frame: &Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode(frame, &mut b);
    b.to_vec()
}

/// Sans-IO decoder: feed bytes into a buffer, call [`FrameDecoder::decode`] until it returns
/// `Ok(None)` ("need more bytes"). Bytes after the last complete frame stay in the buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_len: usize,
}

impl FrameDecoder {
    pub fn new(max_len: usize) -> Self {
        FrameDecoder { max_len }
    }

    /// How many more bytes the buffer needs before the next frame can be decoded, given the
    /// length prefix already seen; lets the I/O shell read exactly one frame and no further.
    pub fn bytes_needed(&self, buf: &[u8]) -> Result<usize, FrameError> {
        let Some(prefix) = buf.get(..LEN_PREFIX) else {
            return Ok(LEN_PREFIX - buf.len());
        };
        let len = self.checked_len(prefix)?;
        Ok((LEN_PREFIX + len).saturating_sub(buf.len()))
    }

    fn checked_len(&self, prefix: &[u8]) -> Result<usize, FrameError> {
        let mut p = prefix;
        let len = p.get_u32() as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max_len {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        Ok(len)
    }

    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(prefix) = buf.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let len = self.checked_len(prefix)?;
        if buf.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        buf.advance(LEN_PREFIX);
        let body = buf.split_to(len);
        let (version, json) = body.split_first().ok_or(FrameError::Empty)?;
        if *version != FRAME_VERSION {
            return Err(FrameError::Version(*version));
        }
        serde_json::from_slice(json)
            .map(Some)
            .map_err(|e| FrameError::Malformed(e.to_string()))
    }
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(MAX_FRAME_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{ApprovalMode, ResourceKind};
    use proptest::prelude::*;

    fn hello() -> Frame {
        Frame::Hello(Hello {
            protocol_version: 1,
            agent_version: "0.1.0".into(),
            resources: vec![ResourceDescriptor {
                id: "null_resource.echo".into(),
                kind: ResourceKind::Tcp,
                scope: None,
            }],
            policy: PolicySummary {
                approval: ApprovalMode::Automatic,
                steady_state: true,
                ..Default::default()
            },
        })
    }

    #[test]
    fn round_trip_several_frames_in_one_buffer() {
        let frames = vec![
            hello(),
            Frame::Heartbeat { seq: 7 },
            Frame::EndpointClose {
                endpoint_id: "ep_1".into(),
                reason: CloseReason::Retired,
            },
            Frame::StreamAccept,
        ];
        let mut buf = BytesMut::new();
        for f in &frames {
            encode(f, &mut buf);
        }
        buf.extend_from_slice(b"raw tail");
        let dec = FrameDecoder::default();
        for f in &frames {
            assert_eq!(dec.decode(&mut buf).unwrap().as_ref(), Some(f));
        }
        // Raw bytes after the frames are left for the caller.
        assert_eq!(&buf[..], b"raw tail");
    }

    #[test]
    fn a_command_carries_its_sequence_number_and_the_frame_it_wraps() {
        let close = Frame::EndpointClose {
            endpoint_id: "ep_1".into(),
            reason: CloseReason::Revoked,
        };
        let cmd = Frame::Command {
            seq: 3,
            command: Box::new(close),
        };
        let v = serde_json::to_value(&cmd).unwrap();
        assert_eq!(v["type"], "command");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["command"]["type"], "endpoint_close");
        let mut buf = BytesMut::new();
        encode(&cmd, &mut buf);
        encode(&Frame::CommandAck { seq: 3 }, &mut buf);
        let dec = FrameDecoder::default();
        assert_eq!(dec.decode(&mut buf).unwrap(), Some(cmd));
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Some(Frame::CommandAck { seq: 3 })
        );
    }

    #[test]
    fn incomplete_is_none_and_byte_at_a_time_works() {
        let bytes = encode_to_vec(&hello());
        let dec = FrameDecoder::default();
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(dec.decode(&mut buf).unwrap(), None);
            assert!(dec.bytes_needed(&buf).unwrap() > 0, "at {i}");
            buf.put_u8(*b);
        }
        assert_eq!(dec.bytes_needed(&buf).unwrap(), 0);
        assert_eq!(dec.decode(&mut buf).unwrap(), Some(hello()));
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        let dec = FrameDecoder::new(1024);
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 1024
            })
        );
        assert!(dec.bytes_needed(&buf).is_err());
    }

    #[test]
    fn wrong_version_empty_and_garbage_are_errors() {
        let dec = FrameDecoder::default();
        let mut b = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(dec.decode(&mut b), Err(FrameError::Empty));
        let mut b = BytesMut::from(&[0u8, 0, 0, 3, 9, b'{', b'}'][..]);
        assert_eq!(dec.decode(&mut b), Err(FrameError::Version(9)));
        let mut b = BytesMut::from(&[0u8, 0, 0, 3, 1, b'{', b'}'][..]);
        assert!(matches!(dec.decode(&mut b), Err(FrameError::Malformed(_))));
        let mut b = BytesMut::from(&[0u8, 0, 0, 1, 1][..]);
        assert!(matches!(dec.decode(&mut b), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn name_is_the_wire_type() {
        for f in [
            hello(),
            Frame::Heartbeat { seq: 1 },
            Frame::StreamAccept,
            Frame::OutputFetch {
                op_id: "op_1".into(),
            },
        ] {
            assert_eq!(serde_json::to_value(&f).unwrap()["type"], f.name());
        }
    }

    #[test]
    fn errors_map_to_codes() {
        use crate::error::ErrorCode;
        assert_eq!(
            FrameError::TooLarge { len: 2, max: 1 }.to_api_error().code,
            ErrorCode::FrameTooLarge
        );
        assert_eq!(
            FrameError::Malformed("x".into()).to_api_error().code,
            ErrorCode::MalformedFrame
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        // Arbitrary bytes never panic, and the decoder never holds more than prefix + limit.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096), max in 1usize..2048) {
            let dec = FrameDecoder::new(max);
            let mut buf = BytesMut::from(&data[..]);
            for _ in 0..data.len() + 1 {
                match dec.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => {
                        let need = dec.bytes_needed(&buf).unwrap();
                        prop_assert!(buf.len() + need <= LEN_PREFIX + max);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }

        // A valid frame with arbitrary bytes spliced into its body is decoded or refused, never a panic.
        #[test]
        fn mutated_frames_never_panic(pos in 0usize..200, byte in any::<u8>(), seq in any::<u64>()) {
            let mut bytes = encode_to_vec(&Frame::Heartbeat { seq });
            let i = pos % bytes.len();
            bytes[i] = byte;
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = FrameDecoder::default().decode(&mut buf);
        }

        #[test]
        fn heartbeat_round_trips(seq in any::<u64>()) {
            let mut buf = BytesMut::new();
            encode(&Frame::Heartbeat { seq }, &mut buf);
            prop_assert_eq!(FrameDecoder::default().decode(&mut buf).unwrap(), Some(Frame::Heartbeat { seq }));
        }
    }
}
