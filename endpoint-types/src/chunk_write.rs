//! Writing the chunks a QUIC stream hands over to a TCP socket, which the gateway's TCP
//! front end and the agent's TCP sessions both do on every byte of a session.

use bytes::{Buf, Bytes};
use std::io::IoSlice;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Writes every chunk with as few syscalls as the socket allows: QUIC hands data over in
/// packet-sized chunks, and one write per chunk would cost a syscall per ~1.2 KB. A write that
/// takes nothing is `WriteZero`; the chunks are left advanced past what was written, and
/// empty chunks are skipped.
pub async fn write_all_chunks(
    w: &mut (impl AsyncWrite + Unpin),
    chunks: &mut [Bytes],
) -> std::io::Result<()> {
    let mut first = 0;
    loop {
        // Chunks written already (or empty ones) take no part in the next write.
        while chunks.get(first).is_some_and(|c| c.is_empty()) {
            first += 1;
        }
        let Some(rest) = chunks.get_mut(first..).filter(|r| !r.is_empty()) else {
            return Ok(());
        };
        let slices: Vec<IoSlice<'_>> = rest.iter().map(|c| IoSlice::new(c)).collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        for chunk in rest.iter_mut() {
            let take = n.min(chunk.len());
            chunk.advance(take);
            n -= take;
            if n == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    /// A writer that takes at most `max` bytes a call, so writes end inside chunks.
    struct Trickle {
        got: Vec<u8>,
        max: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let me = self.get_mut();
            me.calls += 1;
            let n = buf.len().min(me.max);
            me.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let me = self.get_mut();
            me.calls += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(me.max - n);
                me.got.extend_from_slice(&b[..take]);
                n += take;
                if n == me.max {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn every_byte_arrives_in_order_whatever_each_write_takes() {
        let want: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        for max in [1, 7, 1200, 5000] {
            let mut chunks: Vec<Bytes> = want
                .chunks(1111)
                .map(Bytes::copy_from_slice)
                .chain([Bytes::new()])
                .collect();
            let mut w = Trickle {
                got: Vec::new(),
                max,
                calls: 0,
            };
            run(write_all_chunks(&mut w, &mut chunks)).unwrap();
            assert_eq!(w.got, want, "max {max}");
            assert!(chunks.iter().all(|c| c.is_empty()), "max {max}");
            if max >= 5000 {
                assert_eq!(w.calls, 1, "one vectored write takes every chunk");
            }
        }
    }

    #[test]
    fn a_writer_that_takes_nothing_is_write_zero() {
        let mut chunks = vec![Bytes::from_static(b"abc")];
        let mut w = Trickle {
            got: Vec::new(),
            max: 0,
            calls: 0,
        };
        let err = run(write_all_chunks(&mut w, &mut chunks)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WriteZero);
    }
}
