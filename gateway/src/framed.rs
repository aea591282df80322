//! Frame I/O over QUIC streams: the thin shell around the sans-IO codec in `endpoint-types`.
//!
//! Typed by direction: the gateway reads only frames the agent sends ([`SentByAgent`]) and
//! writes only frames the agent reads ([`SentByGateway`]), so a frame sent the wrong way does
//! not compile.

use bytes::{Bytes, BytesMut};
use endpoint_types::frame::{encode, FrameDecoder, FrameError, SentByAgent, SentByGateway};
use std::{marker::PhantomData, time::Duration};

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

/// Reads frames of type `F` from a QUIC receive stream; bytes after the last frame are kept for
/// the caller. A frame of another type is [`FrameError::Malformed`].
#[derive(Debug)]
pub struct FramedRecv<F> {
    pub recv: quinn::RecvStream,
    decoder: FrameDecoder,
    buf: BytesMut,
    frames: PhantomData<fn() -> F>,
}

impl<F: SentByAgent> FramedRecv<F> {
    pub fn new(recv: quinn::RecvStream, max_len: usize) -> Self {
        FramedRecv {
            recv,
            decoder: FrameDecoder::new(max_len),
            buf: BytesMut::new(),
            frames: PhantomData,
        }
    }

    /// The same stream, from here on read as frames of type `G` (the control stream after the
    /// hello); bytes already buffered are kept.
    pub fn switch_to<G: SentByAgent>(self) -> FramedRecv<G> {
        FramedRecv {
            recv: self.recv,
            decoder: self.decoder,
            buf: self.buf,
            frames: PhantomData,
        }
    }

    /// The next frame, or `None` when the peer finished the stream cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<F>, FramedError> {
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

    pub async fn next_within(&mut self, limit: Duration) -> Result<Option<F>, FramedError> {
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
pub async fn write_frame_within<F: SentByGateway>(
    send: &mut quinn::SendStream,
    frame: &F,
    limit: std::time::Duration,
) -> Result<(), FramedError> {
    tokio::time::timeout(limit, write_frame(send, frame))
        .await
        .map_err(|_| FramedError::Timeout)?
}

pub async fn write_frame<F: SentByGateway>(
    send: &mut quinn::SendStream,
    frame: &F,
) -> Result<(), FramedError> {
    let mut b = BytesMut::new();
    encode(frame, &mut b);
    send.write_all(&b).await.map_err(FramedError::Write)
}
