//! The request side of the server: every HTTP/1.1 request is checked by the codec's rules
//! before the service sees it.
//!
//! hyper parses requests, but where the framing is ambiguous it resolves it by RFC 9112
//! §6.3 (Transfer-Encoding wins, Content-Length is dropped, the connection closes after the
//! response) without telling the service that it happened. The contract asks for a `400`
//! and that the backend never sees such a request: a request-smuggling attempt is refused,
//! not repaired. So the server reads each connection through [`FramingGuard`], which
//! follows HTTP/1.1 request framing on the bytes as they arrive, by the rules of
//! [`framing`](super::framing) (the same the response parser and the chunk decoder use),
//! and records the index of the first head those rules refuse and why; the connection's
//! service answers that request (and any after it) with `400`. [`Verdict::check`] adds the
//! checks that need the parsed request ([`check_request`]: `Host`, the target, `CONNECT`).
//!
//! The scan costs little: it jumps from line to line with `memchr`, looks only at lines that
//! start with `c` or `t`, and skips bodies by their length. Where it cannot follow the
//! framing (a CONNECT, or chunked data the rules refuse, which hyper refuses too), it
//! stops scanning, refusing any later request on the connection.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::framing::{chunk_size, strip_cr, FramingError, FramingFields, Length, MAX_CHUNK_LINE};
use super::request::{check_request, Refusal};

/// Shared between the reader and the connection's service: the index of the first request
/// on the connection that the framing rules refuse, and why.
#[derive(Debug, Clone, Default)]
pub(crate) struct Verdict(Arc<OnceLock<(u64, FramingError)>>);

impl Verdict {
    /// Why the request with this index (0-based, in arrival order) must be refused by its
    /// framing, if it must.
    pub(crate) fn refuses(&self, index: u64) -> Option<FramingError> {
        self.0
            .get()
            .filter(|(first, _)| index >= *first)
            .map(|&(_, error)| error)
    }

    /// Why `request`, the one with this index, must be refused, if it must: by its framing,
    /// or by [`check_request`].
    pub(crate) fn check<B>(&self, index: u64, request: &http::Request<B>) -> Option<Refusal> {
        match self.refuses(index) {
            Some(error) => Some(Refusal::Framing(error)),
            None => check_request(request).err(),
        }
    }

    fn set(&self, index: u64, error: FramingError) {
        let _ = self.0.set((index, error));
    }
}

/// Reads through to `inner`, tracking request framing. See the module docs.
#[derive(Debug)]
pub(crate) struct FramingGuard<T> {
    inner: T,
    scan: Scanner,
}

impl<T> FramingGuard<T> {
    pub(crate) fn new(inner: T) -> (Self, Verdict) {
        let verdict = Verdict::default();
        let guard = FramingGuard {
            inner,
            scan: Scanner::new(verdict.clone()),
        };
        (guard, verdict)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            this.scan.feed(&buf.filled()[before..]);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Where the scanner is in the request stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The request line of a new head (or blank lines before it).
    RequestLine,
    /// Header lines.
    Headers,
    /// A body of known length.
    Body(u64),
    /// A chunk-size line.
    ChunkSize,
    /// Chunk data, then its CRLF.
    ChunkData(u64),
    /// Trailer lines after the last chunk.
    Trailers,
    /// Not following any more.
    Off,
}

#[derive(Debug)]
pub(super) struct Scanner {
    phase: Phase,
    /// The current line matters (a request line, a field we look for, a chunk size).
    keep: bool,
    /// The start of a kept line that spans reads; a line that arrives whole is looked at
    /// where it is, without a copy. Its capacity is reused from line to line.
    partial: Vec<u8>,
    /// At the start of a line.
    line_start: bool,
    /// The kept line was longer than [`MAX_LINE`]; only its start is looked at.
    truncated: bool,
    /// The framing fields of this head.
    fields: FramingFields,
    /// This head's request line ends in `HTTP/1.0`.
    http10: bool,
    connect: bool,
    chunk: u64,
    heads: u64,
    verdict: Verdict,
}

/// Longest line kept: names and values of the fields looked at are short, and a chunk-size
/// line is at most this long by the rules.
const MAX_LINE: usize = MAX_CHUNK_LINE;

impl Scanner {
    pub(super) fn new(verdict: Verdict) -> Self {
        Scanner {
            phase: Phase::RequestLine,
            keep: false,
            partial: Vec::new(),
            line_start: true,
            truncated: false,
            fields: FramingFields::default(),
            http10: false,
            connect: false,
            chunk: 0,
            heads: 0,
            verdict,
        }
    }

    pub(super) fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.phase {
                Phase::Off => return,
                Phase::Body(n) => {
                    let take = n.min(bytes.len() as u64);
                    bytes = &bytes[take as usize..];
                    self.phase = if take == n {
                        Phase::RequestLine
                    } else {
                        Phase::Body(n - take)
                    };
                    self.line_start = true;
                }
                Phase::ChunkData(n) => {
                    // The data, then its CRLF (counted as two more bytes).
                    let take = n.min(bytes.len() as u64);
                    bytes = &bytes[take as usize..];
                    self.phase = if take == n {
                        Phase::ChunkSize
                    } else {
                        Phase::ChunkData(n - take)
                    };
                    if take == n {
                        // The CRLF after the data is an empty "line" before the size line.
                        self.chunk = u64::MAX;
                        self.line_start = true;
                    }
                }
                _ => bytes = self.line_bytes(bytes),
            }
        }
    }

    /// Request heads seen so far.
    pub(super) fn heads(&self) -> u64 {
        self.heads
    }

    /// Consumes bytes of a line-oriented phase, up to and including one line end.
    fn line_bytes<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        if self.line_start {
            self.line_start = false;
            self.truncated = false;
            self.keep = self.wants_line(bytes[0]);
            self.partial.clear();
        }
        let (part, rest, complete) = match memchr::memchr(b'\n', bytes) {
            Some(i) => (&bytes[..i], &bytes[i + 1..], true),
            None => (bytes, &bytes[bytes.len()..], false),
        };
        if !self.keep {
            if complete {
                self.line_start = true;
                self.end_line(None);
            }
            return rest;
        }
        let room = MAX_LINE - self.partial.len();
        if part.len() > room {
            self.truncated = true;
        }
        let part = &part[..part.len().min(room)];
        if complete && self.partial.is_empty() {
            // The whole line (or its first MAX_LINE bytes) is in this read.
            self.line_start = true;
            self.end_line(Some(part));
        } else {
            self.partial.extend_from_slice(part);
            if complete {
                self.line_start = true;
                let line = std::mem::take(&mut self.partial);
                self.end_line(Some(&line));
                self.partial = line;
            }
        }
        rest
    }

    /// Whether a line starting with `first` needs to be kept.
    fn wants_line(&self, first: u8) -> bool {
        match self.phase {
            Phase::RequestLine => true,
            Phase::Headers => matches!(first, b'c' | b'C' | b't' | b'T' | b'\r' | b'\n'),
            Phase::ChunkSize | Phase::Trailers => true,
            _ => false,
        }
    }

    fn end_line(&mut self, raw: Option<&[u8]>) {
        // Heads may end lines with a bare LF (httparse takes them); chunked framing may not.
        let line = raw.map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        match self.phase {
            Phase::RequestLine => match line {
                // Blank lines before a request line are allowed (RFC 9112 §2.2).
                Some([]) => {}
                Some(l) => {
                    self.connect = l.starts_with(b"CONNECT ");
                    self.http10 = l.ends_with(b" HTTP/1.0");
                    self.fields = FramingFields::default();
                    self.phase = Phase::Headers;
                }
                None => {}
            },
            Phase::Headers => match line {
                Some([]) => self.end_head(),
                Some(l) => {
                    if let Some(value) = field(l, b"content-length") {
                        if self.truncated {
                            self.fields.too_long();
                        } else {
                            self.fields.content_length(value);
                        }
                    } else if let Some(value) = field(l, b"transfer-encoding") {
                        if self.truncated {
                            self.fields.too_long();
                        } else {
                            self.fields.transfer_encoding(value);
                        }
                    }
                }
                None => {}
            },
            Phase::ChunkSize => {
                let raw = raw.filter(|_| !self.truncated).and_then(strip_cr);
                if self.chunk == u64::MAX {
                    // The CRLF that ends the previous chunk's data.
                    self.chunk = 0;
                    if raw != Some(&[][..]) {
                        self.give_up();
                    }
                    return;
                }
                self.phase = match raw.and_then(chunk_size) {
                    Some(0) => Phase::Trailers,
                    Some(n) => Phase::ChunkData(n),
                    None => {
                        self.give_up();
                        return;
                    }
                };
            }
            // Trailer lines end with CRLF, as the chunk decoder has them (hyper takes a bare
            // LF here, and would read on differently).
            Phase::Trailers if self.truncated => {}
            Phase::Trailers => match raw.map(strip_cr) {
                Some(Some([])) => self.phase = Phase::RequestLine,
                Some(None) => self.give_up(),
                _ => {}
            },
            Phase::Body(_) | Phase::ChunkData(_) | Phase::Off => {}
        }
    }

    /// Chunked data that the rules refuse (hyper refuses it too and closes the
    /// connection): the requests after it cannot be told apart, so all are refused.
    fn give_up(&mut self) {
        self.verdict.set(self.heads, FramingError::InvalidChunk);
        self.phase = Phase::Off;
    }

    fn end_head(&mut self) {
        let index = self.heads;
        self.heads += 1;
        self.phase = match self.fields.request(self.http10) {
            Err(error) => {
                self.verdict.set(index, error);
                Phase::Off
            }
            // A tunnel ends the connection's HTTP framing (and is refused): stop following.
            Ok(_) if self.connect => Phase::Off,
            Ok(Length::Chunked) => Phase::ChunkSize,
            Ok(Length::Fixed(0)) => Phase::RequestLine,
            Ok(Length::Fixed(n)) => Phase::Body(n),
            Ok(Length::UntilClose) => Phase::Off,
        };
    }
}

/// The value of `line` if it is the field `name` (case-insensitive).
fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let colon = memchr::memchr(b':', line)?;
    line[..colon]
        .eq_ignore_ascii_case(name)
        .then(|| line[colon + 1..].trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> (Option<u64>, u64) {
        let verdict = Verdict::default();
        let mut s = Scanner::new(verdict.clone());
        for c in chunks {
            s.feed(c);
        }
        let first = (0..s.heads + 1).find(|&i| verdict.refuses(i).is_some());
        (first, s.heads)
    }

    /// Every way of splitting `bytes` in two gives the same answer.
    fn scan_all_splits(bytes: &[u8]) -> (Option<u64>, u64) {
        let whole = scan(&[bytes]);
        for i in 1..bytes.len() {
            assert_eq!(scan(&[&bytes[..i], &bytes[i..]]), whole, "split at {i}");
        }
        let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(scan(&bytewise), whole, "byte by byte");
        whole
    }

    #[test]
    fn plain_requests_pass() {
        let r = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\nContent-Type: x\r\n\r\n";
        assert_eq!(scan_all_splits(r), (None, 2));
    }

    #[test]
    fn bodies_are_skipped() {
        // A body that looks like an ambiguous head must not be taken for one.
        let body = b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut r =
            format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        r.extend_from_slice(body);
        r.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(scan_all_splits(&r), (None, 2));

        let mut r = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        r.extend_from_slice(format!("{:x};ext=1\r\n", body.len()).as_bytes());
        r.extend_from_slice(body);
        r.extend_from_slice(b"\r\n0\r\nTrailer: x\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(scan_all_splits(&r), (None, 2));
    }

    #[test]
    fn long_lines_are_followed_across_reads() {
        // A request line and a kept field longer than MAX_LINE, split every way.
        let long = "x".repeat(3 * MAX_LINE);
        let r = format!(
            "GET /{long} HTTP/1.1\r\nCookie: {long}\r\nContent-Length: 2\r\n\r\nokGET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        assert_eq!(scan_all_splits(r.as_bytes()), (Some(1), 2));
    }

    #[test]
    fn content_length_with_transfer_encoding_is_flagged() {
        let r = b"GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 5\r\nTRANSFER-ENCODING: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(scan_all_splits(r), (Some(1), 2));
        let r = b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(scan_all_splits(r), (Some(0), 1));
    }

    #[test]
    fn the_framing_rules_are_those_of_responses() {
        // `+5` is refused here as the response parser refuses it.
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ] {
            assert_eq!(
                scan_all_splits(bad),
                (Some(0), 1),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let same = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n";
        assert_eq!(scan_all_splits(same), (None, 2));
    }

    #[test]
    fn chunked_data_the_rules_refuse_refuses_what_follows() {
        // A bare LF after chunk data: hyper fails the body; nothing after it is trusted.
        let r = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(scan_all_splits(r), (Some(1), 1));
        let r = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\nok\r\n0\r\n\r\n";
        assert_eq!(scan_all_splits(r), (Some(1), 1));
        // A trailer section with a bare LF (found by tests/differential.rs: hyper reads
        // it on to the next CRLF CRLF, so the line after it is not a request line).
        let r = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\n0\r\nT: 1\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(scan_all_splits(r), (Some(1), 1));
    }
}
