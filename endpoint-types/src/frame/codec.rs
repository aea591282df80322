//! The length-prefixed, versioned codec, generic over the frame types of the protocol.

use super::{WireFrame, FRAME_VERSION, MAX_FRAME_LEN};
use crate::error::ApiError;
use bytes::{Buf, BufMut, BytesMut};

pub(super) const LEN_PREFIX: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("unsupported frame version {0} (this side speaks {FRAME_VERSION})")]
    Version(u8),
    /// Not JSON, or not a frame of the type expected here (a frame of another stream or
    /// direction included).
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
pub fn encode<F: WireFrame>(frame: &F, dst: &mut BytesMut) {
    // Serialising the frame types to JSON cannot fail: no maps with non-string keys, no
    // custom serialisers that error.
    let json = serde_json::to_vec(frame).unwrap_or_default();
    dst.reserve(LEN_PREFIX + 1 + json.len());
    dst.put_u32((json.len() + 1) as u32);
    dst.put_u8(FRAME_VERSION);
    dst.extend_from_slice(&json);
}

pub fn encode_to_vec<F: WireFrame>(frame: &F) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode(frame, &mut b);
    b.to_vec()
}

/// Sans-IO decoder: feed bytes into a buffer, call [`FrameDecoder::decode`] until it returns
/// `Ok(None)` ("need more bytes"). Bytes after the last complete frame stay in the buffer.
/// The frame type to decode is chosen per call, so one buffer can carry a handshake frame and
/// then the stream's other frames.
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

    /// The next frame of type `F`, `Ok(None)` if the buffer does not hold a whole frame yet.
    /// A whole frame that is not an `F` is [`FrameError::Malformed`], and it is consumed.
    pub fn decode<F: WireFrame>(&self, buf: &mut BytesMut) -> Result<Option<F>, FrameError> {
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
