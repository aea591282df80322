//! The server side of SPDY/3.1 as kubectl up to 1.29 speaks it after an HTTP/1.1
//! `Upgrade: SPDY/3.1` (Go's spdystream): the client opens streams with SYN_STREAM (their
//! `streamtype` header says which is stdin, stdout, error…), the server answers each with a
//! SYN_REPLY, and both sides move bytes in DATA frames, a FIN flag closing one direction.
//! Header blocks are zlib-compressed as one stream per direction, primed with the SPDY/3
//! dictionary. Flow control (WINDOW_UPDATE, SETTINGS) is not used by spdystream and is ignored.
//!
//! Test code: a reader task turns frames into [`Event`]s; [`Writer`] sends frames.

use super::spdy_dictionary::DICTIONARY;
use anyhow::{anyhow, bail, Result};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, Mutex};

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 0x01;
/// Far above anything kubectl sends in one frame; a longer frame ends the connection.
const MAX_FRAME: usize = 1 << 20;

/// What the client did.
#[derive(Debug)]
pub enum Event {
    /// A new stream (already answered with SYN_REPLY); `headers` are lower-case names.
    Open {
        id: u32,
        headers: Vec<(String, String)>,
    },
    Data {
        id: u32,
        data: Vec<u8>,
        fin: bool,
    },
    Reset {
        id: u32,
    },
}

impl Event {
    pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends frames; shared by the reader task (SYN_REPLY, PING answers) and the session.
pub struct Writer<S> {
    inner: Mutex<(WriteHalf<S>, Compress)>,
}

impl<S: AsyncRead + AsyncWrite> Writer<S> {
    async fn control(&self, kind: u16, flags: u8, body: &[u8]) -> Result<()> {
        let mut w = self.inner.lock().await;
        w.0.write_all(&control_head(kind, flags, body.len())?)
            .await?;
        w.0.write_all(body).await?;
        w.0.flush().await?;
        Ok(())
    }

    async fn reply(&self, id: u32) -> Result<()> {
        let mut w = self.inner.lock().await;
        let block = deflate(&mut w.1, &encode_headers(&[]))?;
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&block);
        let head = control_head(SYN_REPLY, 0, body.len())?;
        w.0.write_all(&head).await?;
        w.0.write_all(&body).await?;
        w.0.flush().await?;
        Ok(())
    }

    /// DATA on a stream; `fin` closes our side of it.
    pub async fn data(&self, id: u32, data: &[u8], fin: bool) -> Result<()> {
        for (i, chunk) in data.chunks(64 * 1024).enumerate() {
            let last = (i + 1) * 64 * 1024 >= data.len();
            self.data_frame(id, chunk, fin && last).await?;
        }
        if data.is_empty() {
            self.data_frame(id, &[], fin).await?;
        }
        Ok(())
    }

    async fn data_frame(&self, id: u32, chunk: &[u8], fin: bool) -> Result<()> {
        let mut head = (id & 0x7fff_ffff).to_be_bytes().to_vec();
        let len = u32::try_from(chunk.len())?;
        head.push(if fin { FLAG_FIN } else { 0 });
        head.extend_from_slice(&len.to_be_bytes()[1..]);
        let mut w = self.inner.lock().await;
        w.0.write_all(&head).await?;
        w.0.write_all(chunk).await?;
        w.0.flush().await?;
        Ok(())
    }

    /// Ends the session: GOAWAY (last stream 0, status OK).
    pub async fn goaway(&self) -> Result<()> {
        self.control(GOAWAY, 0, &[0; 8]).await
    }
}

fn control_head(kind: u16, flags: u8, len: usize) -> Result<[u8; 8]> {
    let len = u32::try_from(len)?;
    if len >= 1 << 24 {
        bail!("frame too long");
    }
    let v = 0x8000 | VERSION;
    let l = len.to_be_bytes();
    let [v0, v1] = v.to_be_bytes();
    let [k0, k1] = kind.to_be_bytes();
    Ok([v0, v1, k0, k1, flags, l[1], l[2], l[3]])
}

/// A header block: count, then length-prefixed names and values (SPDY/3: 32-bit lengths).
fn encode_headers(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = (headers.len() as u32).to_be_bytes().to_vec();
    for (k, v) in headers {
        for s in [k, v] {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

fn decode_headers(block: &[u8]) -> Result<Vec<(String, String)>> {
    let mut pos = 0usize;
    let read_u32 = |pos: &mut usize| -> Result<usize> {
        let b = block
            .get(*pos..*pos + 4)
            .ok_or_else(|| anyhow!("header block is short"))?;
        *pos += 4;
        Ok(u32::from_be_bytes(b.try_into()?) as usize)
    };
    let count = read_u32(&mut pos)?;
    let mut out = Vec::new();
    for _ in 0..count.min(1000) {
        let mut pair = [String::new(), String::new()];
        for s in &mut pair {
            let n = read_u32(&mut pos)?;
            let b = block
                .get(pos..pos + n)
                .ok_or_else(|| anyhow!("header block is short"))?;
            pos += n;
            *s = String::from_utf8_lossy(b).into_owned();
        }
        let [k, v] = pair;
        out.push((k.to_ascii_lowercase(), v));
    }
    Ok(out)
}

fn deflate(c: &mut Compress, input: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() + 64);
    let mut pos = 0usize;
    for _ in 0..1000 {
        let before = c.total_in();
        out.reserve(input.len() + 64);
        c.compress_vec(&input[pos..], &mut out, FlushCompress::Sync)?;
        pos += usize::try_from(c.total_in() - before)?;
        // Done when all input is in and the flush did not fill the buffer.
        if pos >= input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
    }
    bail!("header compression did not finish")
}

fn inflate(d: &mut Decompress, input: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(4096);
    let mut pos = 0usize;
    for _ in 0..1000 {
        let before = d.total_in();
        out.reserve(4096);
        let r = d.decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync);
        pos += usize::try_from(d.total_in() - before)?;
        match r {
            Ok(Status::StreamEnd) => return Ok(out),
            Ok(_) if pos >= input.len() && out.len() < out.capacity() => return Ok(out),
            Ok(_) => {}
            Err(e) if e.needs_dictionary().is_some() => {
                d.set_dictionary(DICTIONARY)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    bail!("header decompression did not finish")
}

/// Splits an upgraded connection: the reader task answers SYN_STREAM and PING itself and
/// reports everything as [`Event`]s; the channel ends when the connection does.
pub fn start<S>(io: S) -> Result<(Arc<Writer<S>>, mpsc::Receiver<Event>)>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(io);
    let mut compress = Compress::new(Compression::best(), true);
    compress.set_dictionary(DICTIONARY)?;
    let writer = Arc::new(Writer {
        inner: Mutex::new((w, compress)),
    });
    let (tx, rx) = mpsc::channel(256);
    let w2 = writer.clone();
    tokio::spawn(async move {
        let _ = read_loop(r, w2, tx).await;
    });
    Ok((writer, rx))
}

async fn read_loop<S: AsyncRead + AsyncWrite>(
    mut r: ReadHalf<S>,
    w: Arc<Writer<S>>,
    tx: mpsc::Sender<Event>,
) -> Result<()> {
    let mut headers_in = Decompress::new(true);
    loop {
        let mut head = [0u8; 8];
        r.read_exact(&mut head).await?;
        let [h0, h1, h2, h3, flags, l0, l1, l2] = head;
        let len = u32::from_be_bytes([0, l0, l1, l2]) as usize;
        if len > MAX_FRAME {
            bail!("frame of {len} bytes");
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        if h0 & 0x80 == 0 {
            let id = u32::from_be_bytes([h0, h1, h2, h3]);
            let fin = flags & FLAG_FIN != 0;
            tx.send(Event::Data {
                id,
                data: body,
                fin,
            })
            .await?;
            continue;
        }
        let kind = u16::from_be_bytes([h2, h3]);
        let id = body
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]));
        match (kind, id) {
            (SYN_STREAM, Some(id)) => {
                let block = body.get(10..).ok_or_else(|| anyhow!("short SYN_STREAM"))?;
                let headers = decode_headers(&inflate(&mut headers_in, block)?)?;
                w.reply(id).await?;
                tx.send(Event::Open { id, headers }).await?;
            }
            (RST_STREAM, Some(id)) => tx.send(Event::Reset { id }).await?,
            (PING, Some(_)) => w.control(PING, 0, &body).await?,
            (GOAWAY, _) => return Ok(()),
            // SETTINGS, WINDOW_UPDATE, HEADERS: nothing to do for the test server.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        let mut a = 1u32;
        let mut b = 0u32;
        for &x in DICTIONARY.iter() {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!((b << 16) | a, 0xe3c6_a7c2);
    }

    #[test]
    fn header_blocks_round_trip_through_a_primed_zlib_stream() -> Result<()> {
        let mut c = Compress::new(Compression::best(), true);
        c.set_dictionary(DICTIONARY)?;
        let mut d = Decompress::new(true);
        for round in 0..3 {
            let v = format!("stdout{round}");
            let sent = encode_headers(&[("streamtype", &v), ("Port", "8080")]);
            let got = decode_headers(&inflate(&mut d, &deflate(&mut c, &sent)?)?)?;
            assert_eq!(
                got,
                vec![
                    ("streamtype".to_string(), v),
                    ("port".to_string(), "8080".to_string())
                ]
            );
        }
        Ok(())
    }
}
