//! The backend's response head, parsed with `httparse` (hyper's parser) and framed by the
//! rules of [`framing`](super::framing): no body for `HEAD`, 1xx, 204 and 304; else what
//! `Transfer-Encoding` or `Content-Length` say; else until the connection closes.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{response, StatusCode, Version};

use super::body::Framing;
use super::chunked::Chunk;
use super::framing::{FramingFields, Length};
use super::name::field_name;
use super::{MAX_HEAD, MAX_HEADERS};
use crate::proxy::headers::{is_hop_by_hop_in, HopByHop, CONNECTION_UPGRADE};
use crate::BoxError;

thread_local! {
    /// The fields of the head being parsed, where their values are in it: an allocation
    /// kept per thread rather than made per response (at most `MAX_HEADERS` entries).
    static SPANS: RefCell<Vec<(HeaderName, usize, usize)>> = const { RefCell::new(Vec::new()) };
}

/// A response head, ready to forward.
#[derive(Debug)]
pub(crate) struct Parsed {
    /// Status, version and fields (no extensions).
    pub(crate) parts: response::Parts,
    pub(crate) framing: Framing,
    pub(crate) keep_alive: bool,
}

/// Parses a response head from the front of `buf`, skipping 1xx informational heads.
/// `None` if more bytes are needed.
///
/// One pass over the raw fields finds the framing and keep-alive, and leaves out the
/// hop-by-hop fields (RFC 9110 §7.6.1, and those that `Connection` names), so the head is
/// ready to forward.
pub(crate) fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<Parsed>, BoxError> {
    loop {
        if buf.is_empty() {
            return Ok(None);
        }
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        // The limit holds however the head arrived: one read can bring in all of it.
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, buf, &mut slots)?
        {
            httparse::Status::Complete(len) if len <= MAX_HEAD => len,
            httparse::Status::Partial if buf.len() <= MAX_HEAD => return Ok(None),
            _ => return Err("response head too large".into()),
        };
        let code = res.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)?;
        let version = if res.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        if status.is_informational() && code != 101 {
            buf.advance(len);
            continue;
        }

        // `101 Switching Protocols`: the connection is handed over; its `Upgrade` goes on.
        let switching = code == 101;
        let mut framing_fields = FramingFields::default();
        let mut close = version != Version::HTTP_11 || switching;
        // Fields that `Connection` names; left out once all of them are known.
        let mut hop = HopByHop::default();
        // Header values are slices of the head, shared rather than copied.
        let base = buf.as_ptr() as usize;
        let mut spans = SPANS.take();
        for h in res.headers.iter() {
            let name = field_name(h.name.as_bytes())?;
            if name == header::CONTENT_LENGTH {
                framing_fields.content_length(h.value);
            } else if name == header::TRANSFER_ENCODING {
                framing_fields.transfer_encoding(h.value);
                continue;
            } else if name == header::CONNECTION {
                close |= hop.add_connection(h.value);
                continue;
            } else if is_hop_by_hop_in(&name, switching) {
                continue;
            }
            let start = h.value.as_ptr() as usize - base;
            spans.push((name, start, start + h.value.len()));
        }
        let length = framing_fields.response(version == Version::HTTP_10)?;
        if framing_fields.has_transfer_encoding() && framing_fields.has_content_length() {
            // Transfer-Encoding overrides Content-Length, which an intermediary must
            // remove before forwarding (RFC 9112 §6.3); such a message may be an attempt
            // at response splitting, so its connection is not used again.
            spans.retain(|(name, ..)| name != header::CONTENT_LENGTH);
            close = true;
        }
        if !hop.names_none() {
            spans.retain(|(name, ..)| !hop.names(name));
        }
        let framing = if switching {
            // Not a body: what follows belongs to the upgraded protocol.
            Framing::Close
        } else if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Empty
        } else {
            match length {
                Length::Chunked => Framing::Chunked(Chunk::Size),
                Length::UntilClose => Framing::Close,
                Length::Fixed(0) => Framing::Empty,
                Length::Fixed(n) => Framing::Length(n),
            }
        };

        let head = buf.split_to(len).freeze();
        let mut parts = super::recycle::response_parts();
        parts.status = status;
        parts.version = version;
        let headers = &mut parts.headers;
        headers.reserve(spans.len());
        for (name, start, end) in spans.drain(..) {
            headers.append(
                name,
                HeaderValue::from_maybe_shared(head.slice(start..end))?,
            );
        }
        SPANS.set(spans);
        if switching {
            headers.insert(header::CONNECTION, CONNECTION_UPGRADE);
        }
        return Ok(Some(Parsed {
            parts,
            framing,
            keep_alive: !close,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_101_keeps_upgrade_says_connection_upgrade_and_has_no_body() {
        // What follows its head is the new protocol's.
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-A\r\nX-A: 1\r\nContent-Length: 0\r\nSec-WebSocket-Accept: a\r\n\r\n\x81\x00"[..],
        );
        let p = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(p.parts.status, 101);
        let mut names: Vec<&str> = p.parts.headers.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "connection",
                "content-length",
                "sec-websocket-accept",
                "upgrade"
            ]
        );
        assert_eq!(p.parts.headers["connection"], "upgrade");
        assert_eq!(p.framing, Framing::Close);
        assert!(!p.keep_alive);
        assert_eq!(&buf[..], b"\x81\x00");
    }

    #[test]
    fn heads_parse_with_framing() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabc"[..],
        );
        let p = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(p.parts.status, 200);
        assert_eq!(p.framing, Framing::Length(3));
        assert_eq!(p.parts.headers["x-a"], "b");
        assert!(p.keep_alive);
        assert_eq!(&buf[..], b"abc");

        for bad in ["+3", "-3", "3 3", "", "0x3", "3, 3"] {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\nabc");
            let mut buf = BytesMut::from(head.as_bytes());
            assert!(
                parse_head(&mut buf, false).is_err(),
                "Content-Length: {bad}"
            );
        }

        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"[..]);
        let p = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(p.framing, Framing::Close);
        assert!(!p.keep_alive);

        // Hop-by-hop fields, and those Connection names, are not forwarded.
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nUpgrade: h2c\r\nX-Kept: 1\r\nContent-Length: 0\r\n\r\n"[..],
        );
        let p = parse_head(&mut buf, false).unwrap().unwrap();
        let mut names: Vec<&str> = p.parts.headers.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-length", "x-kept"]);
        assert!(p.keep_alive);
        assert_eq!(p.framing, Framing::Empty);

        let mut buf = BytesMut::from(&b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"[..]);
        assert!(!parse_head(&mut buf, false).unwrap().unwrap().keep_alive);

        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"[..]);
        assert_eq!(
            parse_head(&mut buf, true).unwrap().unwrap().framing,
            Framing::Empty
        );

        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
        );
        assert!(parse_head(&mut buf, false).is_err());

        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        );
        let p = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(p.framing, Framing::Chunked(Chunk::Size));
        assert!(!p.parts.headers.contains_key("content-length"));
        assert!(!p.keep_alive);

        // The framing rules of requests hold for responses: chunked twice, or
        // Transfer-Encoding in HTTP/1.0, is an error.
        for bad in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"[..],
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(parse_head(&mut buf, false).is_err());
        }

        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(parse_head(&mut buf, false).unwrap().is_none());
    }
}
