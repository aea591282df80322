//! Frame I/O over QUIC streams: the thin shell around the sans-IO codec in `endpoint-types`.

use bytes::{Bytes, BytesMut};
use endpoint_types::frame::{encode, Frame, FrameDecoder, FrameError};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum FramedError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("the peer closed the stream in the middle of a frame")]
    Truncated,
    #[error("timed out waiting for the peer")]
    Timeout,
}

/// Reads frames from a QUIC receive stream; bytes after the last frame are kept for the caller.
#[derive(Debug)]
pub struct FramedRecv {
    pub recv: quinn::RecvStream,
    decoder: FrameDecoder,
    buf: BytesMut,
}

impl FramedRecv {
    pub fn new(recv: quinn::RecvStream, max_len: usize) -> Self {
        FramedRecv {
            recv,
            decoder: FrameDecoder::new(max_len),
            buf: BytesMut::new(),
        }
    }

    /// The next frame, or `None` when the peer finished the stream cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, FramedError> {
        loop {
            if let Some(f) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some(f));
            }
            // Never read past the frame being assembled, so raw bytes that follow a header
            // frame stay in the stream for the pump.
            let need = self.decoder.bytes_needed(&self.buf)?;
            match self.recv.read_chunk(need, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(FramedError::Truncated),
            }
        }
    }

    pub async fn next_within(&mut self, limit: Duration) -> Result<Option<Frame>, FramedError> {
        tokio::time::timeout(limit, self.next())
            .await
            .map_err(|_| FramedError::Timeout)?
    }

    /// Gives back the stream and any bytes already read past the last frame.
    pub fn into_parts(self) -> (quinn::RecvStream, Bytes) {
        (self.recv, self.buf.freeze())
    }
}

/// Writes a frame, giving up after `limit`: a peer that stops reading (its flow-control window
/// stays shut) must not hold the writer past the point where it counts as lost.
pub async fn write_frame_within(
    send: &mut quinn::SendStream,
    frame: &Frame,
    limit: std::time::Duration,
) -> Result<(), FramedError> {
    tokio::time::timeout(limit, write_frame(send, frame))
        .await
        .map_err(|_| FramedError::Timeout)?
}

pub async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), FramedError> {
    let mut b = BytesMut::new();
    encode(frame, &mut b);
    send.write_all(&b).await.map_err(FramedError::Write)
}
