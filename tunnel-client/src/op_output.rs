//! An op's output on its way out: lossy UTF-8 decoding of a stream that arrives in pieces,
//! frames of bounded size, and the forwarder that streams a running op's output.

use crate::{
    op_runner::{Outbox, MAX_OUTPUT_FRAME_DATA},
    ops::{OpOutcome, Stream},
};
use endpoint_types::frame::{OutputStream, ToGateway};

/// Lossy UTF-8 decoding of a byte stream that arrives in pieces: a character split between
/// two pieces is decoded whole; invalid bytes become U+FFFD as in `String::from_utf8_lossy`.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Decodes what can be decoded; keeps an incomplete trailing sequence for the next call.
    pub fn push(&mut self, input: &[u8]) -> String {
        self.pending.extend_from_slice(input);
        let mut out = String::with_capacity(self.pending.len());
        let mut at = 0;
        while at < self.pending.len() {
            match std::str::from_utf8(&self.pending[at..]) {
                Ok(s) => {
                    out.push_str(s);
                    at = self.pending.len();
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[at..at + valid]));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            at += valid + bad;
                        }
                        None => {
                            at += valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..at);
        out
    }

    /// The end of the stream: whatever is left, lossily.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

/// How many bytes `c` takes in a JSON string (serde_json's escaping).
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{08}' | '\u{0c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// Splits `text` at character boundaries into pieces of at most `budget` JSON-escaped bytes.
pub fn split_for_frames(text: &str, budget: usize) -> Vec<&str> {
    let budget = budget.max(6);
    let mut pieces = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, c) in text.char_indices() {
        let n = json_len(c);
        if size + n > budget {
            pieces.push(&text[start..i]);
            start = i;
            size = 0;
        }
        size += n;
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

fn output_stream(s: Stream) -> OutputStream {
    match s {
        Stream::Stdout => OutputStream::Stdout,
        Stream::Stderr => OutputStream::Stderr,
    }
}

pub(crate) fn output_frames<'a>(
    op_id: &str,
    stream: Stream,
    text: &'a str,
    preview: bool,
) -> impl Iterator<Item = ToGateway> + 'a {
    let op_id = op_id.to_string();
    split_for_frames(text, MAX_OUTPUT_FRAME_DATA)
        .into_iter()
        .map(move |data| ToGateway::OpOutput {
            op_id: op_id.clone(),
            stream: output_stream(stream),
            data: data.to_string(),
            preview,
        })
}

/// Streams one op's output as `OpOutput` frames while it runs.
pub(crate) struct Forwarder {
    op_id: String,
    out: Outbox,
    /// Per stream (stdout, stderr): decoder and bytes taken from the executor.
    decoders: [Utf8Stream; 2],
    taken: [usize; 2],
    /// False once a frame could not be queued (the connection is gone).
    pub(crate) delivered: bool,
}

impl Forwarder {
    pub(crate) fn new(op_id: &str, out: Outbox) -> Forwarder {
        Forwarder {
            op_id: op_id.to_string(),
            out,
            decoders: Default::default(),
            taken: [0, 0],
            delivered: true,
        }
    }

    fn index(stream: Stream) -> usize {
        match stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }

    pub(crate) async fn push(&mut self, stream: Stream, bytes: &[u8]) {
        let i = Self::index(stream);
        self.taken[i] += bytes.len();
        let text = self.decoders[i].push(bytes);
        self.emit(stream, &text).await;
    }

    /// After the run: what the executor kept but did not stream (it stops streaming to a
    /// stalled reader once the process is gone), then each decoder's tail.
    pub(crate) async fn finish(&mut self, outcome: &OpOutcome) {
        for (stream, kept) in [
            (Stream::Stdout, &outcome.stdout),
            (Stream::Stderr, &outcome.stderr),
        ] {
            let i = Self::index(stream);
            if let Some(rest) = kept.get(self.taken[i]..).filter(|r| !r.is_empty()) {
                self.push(stream, rest).await;
            }
            let tail = self.decoders[i].finish();
            self.emit(stream, &tail).await;
        }
    }

    async fn emit(&mut self, stream: Stream, text: &str) {
        if !self.delivered || text.is_empty() {
            return;
        }
        for frame in output_frames(&self.op_id, stream, text, false) {
            if self.out.send(frame).await.is_err() {
                self.delivered = false;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_stream_keeps_split_characters_whole() {
        let text = "a€b😀c";
        let bytes = text.as_bytes();
        // Every split point, including inside both multi-byte characters.
        for cut in 0..=bytes.len() {
            let mut s = Utf8Stream::default();
            let mut got = s.push(&bytes[..cut]);
            got.push_str(&s.push(&bytes[cut..]));
            got.push_str(&s.finish());
            assert_eq!(got, text, "cut at {cut}");
        }
        // Byte by byte.
        let mut s = Utf8Stream::default();
        let got: String = bytes.iter().map(|b| s.push(&[*b])).collect();
        assert_eq!(got + &s.finish(), text);
        // Invalid bytes are replaced as from_utf8_lossy does; a truncated tail at the end too.
        let bad = b"x\xffy\xe2\x82";
        let mut s = Utf8Stream::default();
        let got = s.push(bad) + &s.finish();
        assert_eq!(got, String::from_utf8_lossy(bad));
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(b"\xe2\x82z"), "\u{FFFD}z");
    }

    #[test]
    fn frames_stay_under_the_limit_whatever_the_bytes() {
        for text in [
            "x".repeat(600_000),
            "\u{1}".repeat(300_000),
            "€".repeat(200_000),
            "\"".repeat(300_000),
            String::new(),
        ] {
            let pieces = split_for_frames(&text, MAX_OUTPUT_FRAME_DATA);
            assert_eq!(pieces.concat(), text);
            for p in &pieces {
                assert!(!p.is_empty());
                let frame = ToGateway::OpOutput {
                    op_id: "op_1".repeat(32),
                    stream: OutputStream::Stdout,
                    data: p.to_string(),
                    preview: false,
                };
                let encoded = endpoint_types::frame::encode_to_vec(&frame);
                assert!(
                    encoded.len() <= MAX_OUTPUT_FRAME_DATA + 1024,
                    "{}",
                    encoded.len()
                );
            }
        }
    }
}
