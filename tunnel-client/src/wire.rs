//! Frames over async byte streams: the thin I/O shell around `endpoint_types::frame`.
//! Generic over tokio's traits so it works on QUIC streams and on in-memory pipes in tests.
//!
//! Typed by direction: the agent writes only frames the gateway reads ([`SentByAgent`]) and
//! reads only frames the gateway sends ([`SentByGateway`]), so a frame sent the wrong way does
//! not compile.

use bytes::BytesMut;
use endpoint_types::frame::{encode_to_vec, FrameDecoder, FrameError, SentByAgent, SentByGateway};
use std::marker::PhantomData;
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

pub async fn write_frame<W: AsyncWrite + Unpin, F: SentByAgent>(
    w: &mut W,
    frame: &F,
) -> Result<(), WireError> {
    w.write_all(&encode_to_vec(frame)).await?;
    Ok(())
}

/// Reads exactly one frame and not a byte more: on a data stream the proxied bytes follow the
/// header immediately, and they belong to the target, not to us. A frame that is not an `F` is
/// [`FrameError::Malformed`].
pub async fn read_one_frame<R: AsyncRead + Unpin, F: SentByGateway>(
    r: &mut R,
    max_len: usize,
) -> Result<F, WireError> {
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

/// Reads a stream that carries only frames of type `F` (the control stream). `next` is
/// cancel-safe, so it can sit in a `select!` beside timers.
pub struct FrameReader<R, F> {
    inner: R,
    buf: BytesMut,
    dec: FrameDecoder,
    frames: PhantomData<fn() -> F>,
}

impl<R: AsyncRead + Unpin, F: SentByGateway> FrameReader<R, F> {
    pub fn new(inner: R, max_len: usize) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(8 * 1024),
            dec: FrameDecoder::new(max_len),
            frames: PhantomData,
        }
    }

    /// The next frame, or `Ok(None)` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<F>, WireError> {
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
    use endpoint_types::frame::{
        FrameDecoder, StreamAnswer, StreamHeader, StreamOpen, ToAgent, ToGateway, MAX_FRAME_LEN,
        MAX_STREAM_HEADER_LEN,
    };

    fn header() -> StreamHeader {
        StreamHeader::StreamOpen(StreamOpen {
            endpoint_id: "ep_1".into(),
            session_id: "ses_1".into(),
            resource_id: "null_resource.echo".into(),
            operator: "alice@vendor".into(),
            client_addr: "127.0.0.1:5000".into(),
        })
    }

    #[tokio::test]
    async fn one_frame_leaves_the_raw_tail_unread() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        a.write_all(&encode_to_vec(&header())).await.unwrap();
        a.write_all(b"raw bytes").await.unwrap();
        drop(a);
        assert_eq!(
            read_one_frame::<_, StreamHeader>(&mut b, MAX_STREAM_HEADER_LEN)
                .await
                .unwrap(),
            header()
        );
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"raw bytes");
    }

    #[tokio::test]
    async fn written_frames_are_what_the_gateway_decodes() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        write_frame(&mut a, &StreamAnswer::StreamAccept)
            .await
            .unwrap();
        write_frame(&mut a, &ToGateway::CommandAck { seq: 4 })
            .await
            .unwrap();
        drop(a);
        let mut bytes = Vec::new();
        b.read_to_end(&mut bytes).await.unwrap();
        let mut buf = BytesMut::from(&bytes[..]);
        let dec = FrameDecoder::default();
        assert_eq!(
            dec.decode::<StreamAnswer>(&mut buf).unwrap(),
            Some(StreamAnswer::StreamAccept)
        );
        assert_eq!(
            dec.decode::<ToGateway>(&mut buf).unwrap(),
            Some(ToGateway::CommandAck { seq: 4 })
        );
    }

    #[tokio::test]
    async fn a_header_of_the_wrong_type_is_malformed() {
        // The agent's own answer echoed back is not a header it accepts.
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        write_frame(&mut a, &StreamAnswer::StreamAccept)
            .await
            .unwrap();
        assert!(matches!(
            read_one_frame::<_, StreamHeader>(&mut b, MAX_STREAM_HEADER_LEN).await,
            Err(WireError::Frame(FrameError::Malformed(_)))
        ));
    }

    #[tokio::test]
    async fn oversized_header_and_early_eof_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        a.write_all(&[0, 1, 0, 0]).await.unwrap();
        assert!(matches!(
            read_one_frame::<_, StreamHeader>(&mut b, 1024).await,
            Err(WireError::Frame(FrameError::TooLarge { .. }))
        ));
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        a.write_all(&[0, 0, 0, 9, 1]).await.unwrap();
        drop(a);
        assert!(matches!(
            read_one_frame::<_, StreamHeader>(&mut b, 1024).await,
            Err(WireError::Closed)
        ));
    }

    #[tokio::test]
    async fn reader_yields_frames_then_clean_end() {
        let (mut a, b) = tokio::io::duplex(64 * 1024);
        for seq in 0..3 {
            a.write_all(&encode_to_vec(&ToAgent::Heartbeat { seq }))
                .await
                .unwrap();
        }
        drop(a);
        let mut r = FrameReader::<_, ToAgent>::new(b, MAX_FRAME_LEN);
        for seq in 0..3 {
            assert_eq!(r.next().await.unwrap(), Some(ToAgent::Heartbeat { seq }));
        }
        assert_eq!(r.next().await.unwrap(), None);
    }
}
