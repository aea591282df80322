//! What an SSH endpoint's data stream carries after the agent accepted it (sans-IO codec).
//!
//! The gateway terminates the engineer's SSH connection; each session channel becomes one
//! data stream to the agent, which opens its own SSH session to the VM's sshd. The gateway
//! sends [`SshFrame::Start`] (pty, exec command or shell, environment), then input, window
//! changes, signals and EOF; the agent answers [`SshFrame::Ready`] once the upstream channel
//! runs, then output, stderr, EOF and the exit status.
//!
//! Wire form of a frame: one tag byte, a `u32` big-endian payload length, the payload. Data
//! payloads are the raw bytes; the others are JSON. The length is checked against
//! [`MAX_SSH_FRAME`] before anything is buffered for it.

use crate::error::ApiError;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Limit on one frame's payload. SSH packets are at most 32 KiB of data by default (OpenSSH
/// allows up to 256 KiB), so a data frame never needs more.
pub const MAX_SSH_FRAME: usize = 256 * 1024;
const HEADER_LEN: usize = 5;

const TAG_START: u8 = 1;
const TAG_READY: u8 = 2;
const TAG_DATA: u8 = 3;
const TAG_STDERR: u8 = 4;
const TAG_EOF: u8 = 5;
const TAG_WINDOW: u8 = 6;
const TAG_SIGNAL: u8 = 7;
const TAG_EXIT_STATUS: u8 = 8;
const TAG_EXIT_SIGNAL: u8 = 9;
const TAG_ERROR: u8 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyRequest {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
    #[serde(default)]
    pub pix_width: u32,
    #[serde(default)]
    pub pix_height: u32,
    /// Terminal modes as (opcode, value), as in RFC 4254 §8.
    #[serde(default)]
    pub modes: Vec<(u8, u32)>,
}

/// Gateway → agent, first frame: what the engineer asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshStart {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtyRequest>,
    /// The exec command line; `None` for an interactive shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// A subsystem (`sftp`) instead of a command or shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsystem: Option<String>,
    /// Accepted environment (only `TERM` and `LANG` pass the gateway).
    #[serde(default)]
    pub env: Vec<(String, String)>,
}

impl SshStart {
    /// The asciicast header of this session's recording, which the gateway and the agent each
    /// write: the terminal's size and `TERM` from the pty request (80x24 without one),
    /// `started_at` and `title`.
    pub fn recording_header(
        &self,
        started_at: jiff::Timestamp,
        title: String,
    ) -> crate::asciicast::Header {
        let (width, height, term) = self
            .pty
            .as_ref()
            .map(|p| (p.cols, p.rows, Some(p.term.clone())))
            .unwrap_or((80, 24, None));
        crate::asciicast::Header {
            version: 2,
            width,
            height,
            timestamp: started_at.as_second(),
            env: term.into_iter().map(|t| ("TERM".to_string(), t)).collect(),
            title: Some(title),
        }
    }
}

/// Agent → gateway: the upstream session runs, as `user`; whether the customer wants typed
/// input recorded too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshReady {
    pub user: String,
    #[serde(default)]
    pub record_input: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitSignal {
    pub signal: String,
    #[serde(default)]
    pub core_dumped: bool,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SshFrame {
    Start(SshStart),
    Ready(SshReady),
    /// Stdin (gateway → agent) or stdout (agent → gateway).
    Data(Bytes),
    /// Stderr, agent → gateway.
    Stderr(Bytes),
    Eof,
    WindowChange {
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
    },
    /// A signal name without the `SIG` prefix (`INT`, `TERM`).
    Signal(String),
    ExitStatus(u32),
    ExitSignal(ExitSignal),
    /// The agent could not start or carry on the session.
    Error(ApiError),
}

#[derive(Debug, Serialize, Deserialize)]
struct Window {
    cols: u32,
    rows: u32,
    pix_width: u32,
    pix_height: u32,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SshFrameError {
    #[error("ssh stream frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("unknown ssh stream frame tag {0}")]
    UnknownTag(u8),
    #[error("malformed ssh stream frame: {0}")]
    Malformed(String),
}

impl SshFrame {
    pub fn name(&self) -> &'static str {
        match self {
            SshFrame::Start(_) => "start",
            SshFrame::Ready(_) => "ready",
            SshFrame::Data(_) => "data",
            SshFrame::Stderr(_) => "stderr",
            SshFrame::Eof => "eof",
            SshFrame::WindowChange { .. } => "window_change",
            SshFrame::Signal(_) => "signal",
            SshFrame::ExitStatus(_) => "exit_status",
            SshFrame::ExitSignal(_) => "exit_signal",
            SshFrame::Error(_) => "error",
        }
    }

    /// Appends the wire form. Data longer than [`MAX_SSH_FRAME`] is split over several frames.
    pub fn encode(&self, dst: &mut BytesMut) {
        fn put(dst: &mut BytesMut, tag: u8, payload: &[u8]) {
            dst.reserve(HEADER_LEN + payload.len());
            dst.put_u8(tag);
            dst.put_u32(payload.len() as u32);
            dst.put_slice(payload);
        }
        fn json(v: &impl Serialize) -> Vec<u8> {
            // Plain structs of strings and numbers: serialising cannot fail.
            serde_json::to_vec(v).unwrap_or_default()
        }
        match self {
            SshFrame::Data(b) | SshFrame::Stderr(b) => {
                let tag = if matches!(self, SshFrame::Data(_)) {
                    TAG_DATA
                } else {
                    TAG_STDERR
                };
                for chunk in b.chunks(MAX_SSH_FRAME) {
                    put(dst, tag, chunk);
                }
            }
            SshFrame::Start(s) => put(dst, TAG_START, &json(s)),
            SshFrame::Ready(r) => put(dst, TAG_READY, &json(r)),
            SshFrame::Eof => put(dst, TAG_EOF, &[]),
            SshFrame::WindowChange {
                cols,
                rows,
                pix_width,
                pix_height,
            } => put(
                dst,
                TAG_WINDOW,
                &json(&Window {
                    cols: *cols,
                    rows: *rows,
                    pix_width: *pix_width,
                    pix_height: *pix_height,
                }),
            ),
            SshFrame::Signal(s) => put(dst, TAG_SIGNAL, s.as_bytes()),
            SshFrame::ExitStatus(c) => put(dst, TAG_EXIT_STATUS, &c.to_be_bytes()),
            SshFrame::ExitSignal(s) => put(dst, TAG_EXIT_SIGNAL, &json(s)),
            SshFrame::Error(e) => put(dst, TAG_ERROR, &json(e)),
        }
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }

    /// The header of a data frame of `len` bytes, for writers that send the payload without
    /// copying it (`len` must be at most [`MAX_SSH_FRAME`]).
    pub fn data_header(len: usize, stderr: bool) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = if stderr { TAG_STDERR } else { TAG_DATA };
        h[1..].copy_from_slice(&(len.min(MAX_SSH_FRAME) as u32).to_be_bytes());
        h
    }
}

/// Takes one complete frame off the front of `buf`, if there is one.
pub fn decode(buf: &mut BytesMut) -> Result<Option<SshFrame>, SshFrameError> {
    let Some(&[tag, a, b, c, d]) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if len > MAX_SSH_FRAME {
        return Err(SshFrameError::TooLarge {
            len,
            max: MAX_SSH_FRAME,
        });
    }
    if !(TAG_START..=TAG_ERROR).contains(&tag) {
        return Err(SshFrameError::UnknownTag(tag));
    }
    if buf.len() < HEADER_LEN + len {
        buf.reserve(HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(len).freeze();
    let bad = |e: serde_json::Error| SshFrameError::Malformed(e.to_string());
    Ok(Some(match tag {
        TAG_START => SshFrame::Start(serde_json::from_slice(&payload).map_err(bad)?),
        TAG_READY => SshFrame::Ready(serde_json::from_slice(&payload).map_err(bad)?),
        TAG_DATA => SshFrame::Data(payload),
        TAG_STDERR => SshFrame::Stderr(payload),
        TAG_EOF => SshFrame::Eof,
        TAG_WINDOW => {
            let w: Window = serde_json::from_slice(&payload).map_err(bad)?;
            SshFrame::WindowChange {
                cols: w.cols,
                rows: w.rows,
                pix_width: w.pix_width,
                pix_height: w.pix_height,
            }
        }
        TAG_SIGNAL => SshFrame::Signal(
            String::from_utf8(payload.to_vec())
                .map_err(|_| SshFrameError::Malformed("signal name is not UTF-8".into()))?,
        ),
        TAG_EXIT_STATUS => {
            let b: [u8; 4] = payload
                .as_ref()
                .try_into()
                .map_err(|_| SshFrameError::Malformed("exit status is not 4 bytes".into()))?;
            SshFrame::ExitStatus(u32::from_be_bytes(b))
        }
        TAG_EXIT_SIGNAL => SshFrame::ExitSignal(serde_json::from_slice(&payload).map_err(bad)?),
        _ => SshFrame::Error(serde_json::from_slice(&payload).map_err(bad)?),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use proptest::prelude::*;

    #[test]
    fn recording_header_takes_the_pty_or_a_plain_terminal() {
        let at = jiff::Timestamp::from_second(1_700_000_000).unwrap();
        let mut start = SshStart {
            pty: None,
            command: None,
            subsystem: None,
            env: vec![],
        };
        let h = start.recording_header(at, "ep_1 ss_1".into());
        assert_eq!((h.version, h.width, h.height), (2, 80, 24));
        assert_eq!(h.timestamp, 1_700_000_000);
        assert!(h.env.is_empty());
        assert_eq!(h.title.as_deref(), Some("ep_1 ss_1"));
        start.pty = Some(PtyRequest {
            term: "xterm-256color".into(),
            cols: 132,
            rows: 43,
            pix_width: 0,
            pix_height: 0,
            modes: vec![],
        });
        let h = start.recording_header(at, "t".into());
        assert_eq!((h.width, h.height), (132, 43));
        assert_eq!(
            h.env.get("TERM").map(String::as_str),
            Some("xterm-256color")
        );
    }

    fn all() -> Vec<SshFrame> {
        vec![
            SshFrame::Start(SshStart {
                pty: Some(PtyRequest {
                    term: "xterm".into(),
                    cols: 80,
                    rows: 24,
                    pix_width: 0,
                    pix_height: 0,
                    modes: vec![(53, 1)],
                }),
                command: None,
                subsystem: None,
                env: vec![("LANG".into(), "C.UTF-8".into())],
            }),
            SshFrame::Start(SshStart {
                pty: None,
                command: Some("tail -n 50 /var/log/x".into()),
                subsystem: None,
                env: vec![],
            }),
            SshFrame::Ready(SshReady {
                user: "deploy".into(),
                record_input: true,
            }),
            SshFrame::Data(Bytes::from_static(b"\x1b[Hhello\r\n")),
            SshFrame::Stderr(Bytes::from_static(b"oops")),
            SshFrame::Eof,
            SshFrame::WindowChange {
                cols: 120,
                rows: 40,
                pix_width: 1,
                pix_height: 2,
            },
            SshFrame::Signal("INT".into()),
            SshFrame::ExitStatus(255),
            SshFrame::ExitSignal(ExitSignal {
                signal: "KILL".into(),
                core_dumped: false,
                message: "".into(),
            }),
            SshFrame::Error(ApiError::new(ErrorCode::TargetUnreachable, "no")),
        ]
    }

    #[test]
    fn every_frame_round_trips_even_byte_by_byte() {
        let mut wire = BytesMut::new();
        for f in all() {
            f.encode(&mut wire);
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(f) = decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, all());
        assert!(buf.is_empty());
    }

    #[test]
    fn large_data_is_split_and_header_matches_encode() {
        let data = Bytes::from(vec![7u8; MAX_SSH_FRAME * 2 + 3]);
        let mut wire = SshFrame::Data(data.clone()).to_bytes().into();
        let mut back = Vec::new();
        while let Some(SshFrame::Data(d)) = decode(&mut wire).unwrap() {
            back.extend_from_slice(&d);
        }
        assert_eq!(back, data);
        let enc = SshFrame::Stderr(Bytes::from_static(b"abc")).to_bytes();
        assert_eq!(&enc[..HEADER_LEN], &SshFrame::data_header(3, true));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let table: Vec<(Vec<u8>, SshFrameError)> = vec![
            (
                vec![TAG_DATA, 0xff, 0xff, 0xff, 0xff],
                SshFrameError::TooLarge {
                    len: u32::MAX as usize,
                    max: MAX_SSH_FRAME,
                },
            ),
            (vec![0, 0, 0, 0, 0], SshFrameError::UnknownTag(0)),
            (vec![99, 0, 0, 0, 0], SshFrameError::UnknownTag(99)),
            (
                vec![TAG_EXIT_STATUS, 0, 0, 0, 1, 7],
                SshFrameError::Malformed("exit status is not 4 bytes".into()),
            ),
            (
                vec![TAG_SIGNAL, 0, 0, 0, 1, 0xff],
                SshFrameError::Malformed("signal name is not UTF-8".into()),
            ),
        ];
        for (bytes, want) in table {
            assert_eq!(
                decode(&mut BytesMut::from(&bytes[..])),
                Err(want),
                "{bytes:?}"
            );
        }
        assert!(matches!(
            decode(&mut BytesMut::from(&[TAG_START, 0, 0, 0, 1, b'{'][..])),
            Err(SshFrameError::Malformed(_))
        ));
        // Incomplete: waits.
        assert_eq!(decode(&mut BytesMut::from(&[TAG_DATA, 0, 0][..])), Ok(None));
        assert_eq!(
            decode(&mut BytesMut::from(&[TAG_DATA, 0, 0, 0, 2, 1][..])),
            Ok(None)
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..64 {
                match decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
        }
    }
}
