//! The chunked transfer coding, decoded (RFC 9112 §7.1) by the rules of
//! [`framing`](super::framing): data as it arrives, then the trailer section as one
//! trailers frame.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue};
use http_body::Frame;

use super::framing::{chunk_size, forbidden_trailer, strip_cr, MAX_CHUNK_LINE};
use super::{MAX_HEAD, MAX_HEADERS};
use crate::BoxError;

/// Where a chunked body's decoding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// A chunk-size line.
    Size,
    /// This many bytes of chunk data.
    Data(u64),
    /// The CRLF after chunk data.
    DataEnd,
    /// The trailer section after the last chunk.
    Trailers,
    /// The body has ended.
    Done,
}

/// Decodes chunked data from `buf`: `Ok(Some(frame))` (data, or the trailers that end the
/// body), or `Ok(None)` when more bytes are needed or the body is done (`state == Done`).
pub(crate) fn decode_chunk(
    state: &mut Chunk,
    buf: &mut BytesMut,
) -> Result<Option<Frame<Bytes>>, BoxError> {
    loop {
        match *state {
            Chunk::Done => return Ok(None),
            Chunk::Size => {
                let Some(end) = memchr::memchr(b'\n', buf) else {
                    if buf.len() > MAX_CHUNK_LINE + 1 {
                        return Err("chunk size line too long".into());
                    }
                    return Ok(None);
                };
                let line = strip_cr(&buf[..end]).ok_or("chunk size line without CRLF")?;
                let size = chunk_size(line).ok_or("invalid chunk size")?;
                buf.advance(end + 1);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(remaining) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = remaining.min(buf.len() as u64);
                let data = buf.split_to(n as usize).freeze();
                *state = if n == remaining {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(remaining - n)
                };
                return Ok(Some(Frame::data(data)));
            }
            Chunk::DataEnd => {
                match buf.get(..2) {
                    Some(b"\r\n") => buf.advance(2),
                    Some(_) => return Err("missing CRLF after chunk".into()),
                    None if buf.first().is_some_and(|&b| b != b'\r') => {
                        return Err("missing CRLF after chunk".into())
                    }
                    None => return Ok(None),
                }
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                let Some(trailers) = trailer_section(buf)? else {
                    return Ok(None);
                };
                *state = Chunk::Done;
                if trailers.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(Frame::trailers(trailers)));
            }
        }
    }
}

/// The trailer section at the front of `buf` (field lines, then an empty line), taken off
/// `buf`; `None` if more bytes are needed. Every line ends with CRLF. Fields that must not
/// come from trailers are left out.
fn trailer_section(buf: &mut BytesMut) -> Result<Option<HeaderMap>, BoxError> {
    let end = if buf.starts_with(b"\r\n") {
        Some(2)
    } else {
        memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4)
    };
    let section = &buf[..end.unwrap_or(buf.len())];
    // A bare LF ends a line for some parsers and not for others: refused, as in hyper.
    for lf in memchr::memchr_iter(b'\n', section) {
        if lf == 0 || section[lf - 1] != b'\r' {
            return Err("trailer line without CRLF".into());
        }
    }
    // A trailer section is held until it ends: bound it as a head is, however it arrived.
    if end.unwrap_or(buf.len()) > MAX_HEAD {
        return Err("trailer section too large".into());
    }
    let Some(end) = end else {
        return Ok(None);
    };
    let mut trailers = HeaderMap::new();
    if end > 2 {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::parse_headers(section, &mut fields)? {
            httparse::Status::Complete((len, fields)) if len == end => {
                for f in fields {
                    let name = super::name::field_name(f.name.as_bytes())?;
                    if !forbidden_trailer(&name) {
                        trailers.append(name, HeaderValue::from_bytes(f.value)?);
                    }
                }
            }
            _ => return Err("invalid trailer section".into()),
        }
    }
    buf.advance(end);
    Ok(Some(trailers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], split: usize) -> Result<(Vec<u8>, HeaderMap), BoxError> {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut trailers = HeaderMap::new();
        for part in [&input[..split], &input[split..]] {
            buf.extend_from_slice(part);
            while let Some(frame) = decode_chunk(&mut state, &mut buf)? {
                match frame.into_data() {
                    Ok(data) => out.extend_from_slice(&data),
                    Err(frame) => trailers = frame.into_trailers().unwrap(),
                }
            }
        }
        assert_eq!(state, Chunk::Done);
        Ok((out, trailers))
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let input = b"5;ext=1\r\nhello\r\n6 \r\n world\r\n0\r\nx-trailer: 1\r\ncontent-length: 9\r\nx-other: 2\r\n\r\n";
        for split in 0..=input.len() {
            let (data, trailers) = decode_all(input, split).unwrap();
            assert_eq!(data, b"hello world", "split at {split}");
            assert_eq!(trailers.len(), 2, "split at {split}");
            assert_eq!(trailers["x-trailer"], "1");
            assert_eq!(trailers["x-other"], "2");
        }
        let input = b"2\r\nok\r\n0\r\n\r\n";
        for split in 0..=input.len() {
            let (data, trailers) = decode_all(input, split).unwrap();
            assert_eq!((&data[..], trailers.len()), (&b"ok"[..], 0));
        }
    }

    #[test]
    fn bad_chunks_are_errors() {
        let decode = |input: &[u8]| {
            let mut state = Chunk::Size;
            let mut buf = BytesMut::from(input);
            loop {
                match decode_chunk(&mut state, &mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Ok(state),
                    Err(e) => return Err(e),
                }
            }
        };
        for bad in [
            &b"zz\r\n"[..],
            b"2\r\nabXY",
            // Signs are not hex digits.
            b"+2\r\nab\r\n",
            // Bare LFs, anywhere.
            b"2\nab\r\n0\r\n\r\n",
            b"2\r\nab\n0\r\n\r\n",
            b"2\r\nab\r\n0\r\n\n",
            b"2\r\nab\r\n0\r\nx: 1\n\r\n",
            b" 2\r\nab\r\n",
            b"2;a\rb\r\nab\r\n",
            b"2\r\nab\r\n0\r\nbad field\r\n\r\n",
        ] {
            assert!(
                decode(bad).is_err(),
                "{:?} decoded",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn an_endless_trailer_section_is_an_error_not_a_growing_buffer() {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::from(&b"0\r\nx-trailer: "[..]);
        assert!(decode_chunk(&mut state, &mut buf).unwrap().is_none());
        buf.extend_from_slice(&vec![b'a'; MAX_HEAD]);
        assert!(decode_chunk(&mut state, &mut buf).is_err());
        let mut state = Chunk::Size;
        let mut buf = BytesMut::from(&b"1"[..]);
        buf.extend_from_slice(&vec![b'0'; MAX_CHUNK_LINE + 1]);
        assert!(decode_chunk(&mut state, &mut buf).is_err());
    }
}
