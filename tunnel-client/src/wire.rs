//! Frames over async byte streams: the thin I/O shell around `endpoint_types::frame`.
//! Generic over tokio's traits so it works on QUIC streams and on in-memory pipes in tests.

use bytes::BytesMut;
use endpoint_types::frame::{encode_to_vec, Frame, FrameDecoder, FrameError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("stream I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the peer closed the stream")]
    Closed,
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), WireError> {
    w.write_all(&encode_to_vec(frame)).await?;
    Ok(())
}

/// Reads exactly one frame and not a byte more: on a data stream the proxied bytes follow the
/// header immediately, and they belong to the target, not to us.
pub async fn read_one_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_len: usize,
) -> Result<Frame, WireError> {
    let dec = FrameDecoder::new(max_len);
    let mut buf = BytesMut::new();
    loop {
        let need = dec.bytes_needed(&buf)?;
        if need == 0 {
            return dec.decode(&mut buf)?.ok_or(WireError::Closed);
        }
        let start = buf.len();
        buf.resize(start + need, 0);
        let Some(dst) = buf.get_mut(start..) else {
            return Err(WireError::Closed);
        };
        match r.read_exact(dst).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(WireError::Closed)
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads a stream that carries only frames (the control stream). `next` is cancel-safe, so
/// it can sit in a `select!` beside timers.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    dec: FrameDecoder,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max_len: usize) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(8 * 1024),
            dec: FrameDecoder::new(max_len),
        }
    }

    /// The next frame, or `Ok(None)` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(frame) = self.dec.decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            // read_buf either moves bytes into our buffer or nothing at all if cancelled.
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(WireError::Closed)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_types::frame::{MAX_FRAME_LEN, MAX_STREAM_HEADER_LEN};

    #[tokio::test]
    async fn one_frame_leaves_the_raw_tail_unread() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        write_frame(&mut a, &Frame::StreamAccept).await.unwrap();
        a.write_all(b"raw bytes").await.unwrap();
        drop(a);
        assert_eq!(
            read_one_frame(&mut b, MAX_STREAM_HEADER_LEN).await.unwrap(),
            Frame::StreamAccept
        );
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"raw bytes");
    }

    #[tokio::test]
    async fn oversized_header_and_early_eof_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        a.write_all(&[0, 1, 0, 0]).await.unwrap();
        assert!(matches!(
            read_one_frame(&mut b, 1024).await,
            Err(WireError::Frame(FrameError::TooLarge { .. }))
        ));
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        a.write_all(&[0, 0, 0, 9, 1]).await.unwrap();
        drop(a);
        assert!(matches!(
            read_one_frame(&mut b, 1024).await,
            Err(WireError::Closed)
        ));
    }

    #[tokio::test]
    async fn reader_yields_frames_then_clean_end() {
        let (mut a, b) = tokio::io::duplex(64 * 1024);
        for seq in 0..3 {
            write_frame(&mut a, &Frame::Heartbeat { seq })
                .await
                .unwrap();
        }
        drop(a);
        let mut r = FrameReader::new(b, MAX_FRAME_LEN);
        for seq in 0..3 {
            assert_eq!(r.next().await.unwrap(), Some(Frame::Heartbeat { seq }));
        }
        assert_eq!(r.next().await.unwrap(), None);
    }
}
