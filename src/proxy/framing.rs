//! Detecting requests that carry both `Content-Length` and `Transfer-Encoding`.
//!
//! hyper resolves such a request by RFC 9112 §6.3 (Transfer-Encoding wins, Content-Length is
//! dropped, the connection closes after the response) but does not tell the service that it
//! happened. The contract asks for a `400` and that the backend never sees such a request:
//! a request-smuggling attempt is refused, not repaired. So the server reads each connection
//! through [`FramingGuard`], which follows HTTP/1.1 request framing on the bytes as they
//! arrive and records the index of the first head that carried both fields; the
//! connection's service answers that request (and any after it) with `400`.
//!
//! The scan costs little: it jumps from line to line with `memchr`, looks only at lines that
//! start with `c` or `t`, and skips bodies by their length. Where it cannot follow the
//! framing (a request hyper will reject, or a CONNECT), it stops scanning: hyper closes such
//! connections itself.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared between the reader and the connection's service: `0`, or 1 + the index of the
/// first ambiguous request on the connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct Verdict(Arc<AtomicU64>);

impl Verdict {
    /// Whether the request with this index (0-based, in arrival order) must be refused.
    pub(crate) fn refuses(&self, index: u64) -> bool {
        match self.0.load(Ordering::Acquire) {
            0 => false,
            first => index + 1 >= first,
        }
    }

    fn set(&self, index: u64) {
        let _ = self
            .0
            .compare_exchange(0, index + 1, Ordering::Release, Ordering::Relaxed);
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
struct Scanner {
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
    /// `Content-Length` seen in this head, and its value if it parsed.
    content_length: Option<Option<u64>>,
    /// `Transfer-Encoding` seen in this head, and whether it ends in `chunked`.
    chunked: Option<bool>,
    connect: bool,
    chunk: u64,
    heads: u64,
    verdict: Verdict,
}

/// Longest line kept: names and values of the fields looked at are short.
const MAX_LINE: usize = 256;

impl Scanner {
    fn new(verdict: Verdict) -> Self {
        Scanner {
            phase: Phase::RequestLine,
            keep: false,
            partial: Vec::new(),
            line_start: true,
            truncated: false,
            content_length: None,
            chunked: None,
            connect: false,
            chunk: 0,
            heads: 0,
            verdict,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
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

    fn end_line(&mut self, line: Option<&[u8]>) {
        let line = line.map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        match self.phase {
            Phase::RequestLine => match line {
                // Blank lines before a request line are allowed (RFC 9112 §2.2).
                Some([]) => {}
                Some(l) => {
                    self.connect = l.starts_with(b"CONNECT ");
                    self.content_length = None;
                    self.chunked = None;
                    self.phase = Phase::Headers;
                }
                None => {}
            },
            Phase::Headers => match line {
                Some([]) => self.end_head(),
                Some(l) => {
                    if let Some(value) = field(l, b"content-length") {
                        let length = if self.truncated {
                            None
                        } else {
                            parse_length(value)
                        };
                        self.content_length = Some(length);
                    } else if let Some(value) = field(l, b"transfer-encoding") {
                        let last = value.rsplit(|&b| b == b',').next().unwrap_or(value);
                        let chunked =
                            !self.truncated && last.trim_ascii().eq_ignore_ascii_case(b"chunked");
                        self.chunked = Some(chunked);
                    }
                }
                None => {}
            },
            Phase::ChunkSize => {
                if self.chunk == u64::MAX {
                    // The CRLF that ends the previous chunk's data.
                    self.chunk = 0;
                    if line != Some(&[][..]) {
                        self.phase = Phase::Off;
                    }
                    return;
                }
                let size = line.and_then(|l| {
                    let digits = l.split(|&b| b == b';').next().unwrap_or(l).trim_ascii();
                    std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| u64::from_str_radix(d, 16).ok())
                });
                self.phase = match size {
                    Some(0) => Phase::Trailers,
                    Some(n) => Phase::ChunkData(n),
                    None => Phase::Off,
                };
            }
            Phase::Trailers => {
                if line == Some(&[][..]) {
                    self.phase = Phase::RequestLine;
                }
            }
            Phase::Body(_) | Phase::ChunkData(_) | Phase::Off => {}
        }
    }

    fn end_head(&mut self) {
        let index = self.heads;
        self.heads += 1;
        self.phase = match (self.content_length, self.chunked) {
            (Some(_), Some(_)) => {
                self.verdict.set(index);
                Phase::Off
            }
            // Tunnels and requests hyper refuses (a bad length, a final coding other than
            // chunked) end the connection's HTTP framing: stop following.
            _ if self.connect => Phase::Off,
            (None, Some(true)) => Phase::ChunkSize,
            (None, Some(false)) | (Some(None), None) => Phase::Off,
            (Some(Some(n)), None) if n > 0 => Phase::Body(n),
            (Some(Some(_)), None) | (None, None) => Phase::RequestLine,
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

fn parse_length(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
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
        let first = (0..s.heads + 1).find(|&i| verdict.refuses(i));
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
}
