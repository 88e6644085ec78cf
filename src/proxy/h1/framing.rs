//! The one set of HTTP/1.1 framing rules (RFC 9112 §6 and §7), for requests and responses
//! alike: the request reader of the server ([`super::serve`]), the response head parser
//! ([`super::parse`]), both chunk decoders and the request encoder all decide by these
//! functions, so that no message is framed one way going in and another going out.
//!
//! - `Content-Length` is `1*DIGIT` (optional whitespace around it), at most `u64::MAX`. A
//!   sign, a comma list (`5, 5`), hex or an empty value is invalid. Several fields with the
//!   same value are one; different values are an error.
//! - `Transfer-Encoding` is a comma list of codings (visible ASCII, spaces and tabs only)
//!   whose last element decides: `chunked` frames the body. `chunked` twice is an error (RFC 9112 §7: a sender must not apply it
//!   more than once), and so is `Transfer-Encoding` in an HTTP/1.0 message (§6.1). A
//!   request whose last coding is not `chunked` is an error (§6.3: `400`); a response's body
//!   then runs until the connection closes.
//! - Both `Content-Length` and `Transfer-Encoding`: in a request, an error (the contract's
//!   `400`: smuggling is refused, not repaired); in a response, `Transfer-Encoding` wins and
//!   `Content-Length` is not forwarded (§6.3), and the connection is not reused.
//! - A chunk-size line is `1*HEXDIG *(SP / HTAB) [";" extension]` ended by CRLF (a bare LF
//!   is an error, as in hyper); the extension holds no CR or LF; the line is at most
//!   [`MAX_CHUNK_LINE`] bytes. The CRLF after chunk data is exactly CRLF.
//! - Trailer fields that frame, route or authenticate a message ([`forbidden_trailer`])
//!   are never forwarded, in either direction.

use std::fmt;

use http::header::{self, HeaderName};

/// Longest chunk-size line (with its extensions) accepted.
pub(crate) const MAX_CHUNK_LINE: usize = 1024;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Length {
    /// Exactly this many bytes (0: no body).
    Fixed(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}

/// Why a message's framing was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FramingError {
    /// A `Content-Length` that is not `1*DIGIT`.
    InvalidContentLength,
    /// Two `Content-Length`s that differ.
    ConflictingContentLength,
    /// A request with both `Content-Length` and `Transfer-Encoding`.
    LengthAndEncoding,
    /// A request whose last transfer coding is not `chunked`.
    NotChunked,
    /// `chunked` applied more than once.
    ChunkedTwice,
    /// `Transfer-Encoding` in an HTTP/1.0 message.
    EncodingInHttp10,
    /// A `Transfer-Encoding` with a byte that no coding has (hyper reads such a value as
    /// naming no coding it knows).
    InvalidTransferEncoding,
}

impl FramingError {
    /// A short description, for logs and the body of a `400`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FramingError::InvalidContentLength => "invalid Content-Length",
            FramingError::ConflictingContentLength => "two different Content-Lengths",
            FramingError::LengthAndEncoding => "both Content-Length and Transfer-Encoding",
            FramingError::NotChunked => "Transfer-Encoding not ending in chunked",
            FramingError::ChunkedTwice => "chunked applied twice",
            FramingError::EncodingInHttp10 => "Transfer-Encoding in HTTP/1.0",
            FramingError::InvalidTransferEncoding => "invalid Transfer-Encoding",
        }
    }
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for FramingError {}

/// The framing fields of one message head, taken in one at a time in the order they
/// arrive; [`request`](Self::request) or [`response`](Self::response) then applies the
/// rules.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FramingFields {
    content_length: Option<u64>,
    has_content_length: bool,
    has_transfer_encoding: bool,
    /// `chunked` elements over all `Transfer-Encoding` fields.
    chunked: u32,
    /// The last element of the last `Transfer-Encoding` field is `chunked`.
    chunked_last: bool,
    error: Option<FramingError>,
}

impl FramingFields {
    /// Takes in a `Content-Length` value.
    pub(crate) fn content_length(&mut self, value: &[u8]) {
        self.has_content_length = true;
        match (content_length(value), self.content_length) {
            (None, _) => self.fail(FramingError::InvalidContentLength),
            (Some(n), Some(m)) if n != m => self.fail(FramingError::ConflictingContentLength),
            (Some(n), _) => self.content_length = Some(n),
        }
    }

    /// Takes in a `Transfer-Encoding` value.
    pub(crate) fn transfer_encoding(&mut self, value: &[u8]) {
        self.has_transfer_encoding = true;
        // Codings are tokens with parameters: visible ASCII, spaces and tabs only.
        if !value
            .iter()
            .all(|&b| b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b))
        {
            self.fail(FramingError::InvalidTransferEncoding);
        }
        let mut last = false;
        for coding in value.split(|&b| b == b',') {
            // Empty elements count as codings (`chunked,` does not end in chunked), as in
            // hyper: a message is never read as chunked where hyper would not.
            last = trim_ows(coding).eq_ignore_ascii_case(b"chunked");
            self.chunked += u32::from(last);
        }
        self.chunked_last = last;
    }

    fn fail(&mut self, error: FramingError) {
        self.error.get_or_insert(error);
    }

    /// Whether the head had a `Content-Length` field (valid or not).
    pub(crate) fn has_content_length(&self) -> bool {
        self.has_content_length
    }

    /// Whether the head had a `Transfer-Encoding` field.
    pub(crate) fn has_transfer_encoding(&self) -> bool {
        self.has_transfer_encoding
    }

    /// The framing of a request's body; `http10` for an HTTP/1.0 request.
    pub(crate) fn request(&self, http10: bool) -> Result<Length, FramingError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if !self.has_transfer_encoding {
            return Ok(Length::Fixed(self.content_length.unwrap_or(0)));
        }
        self.encoding_rules(http10)?;
        if self.has_content_length {
            return Err(FramingError::LengthAndEncoding);
        }
        if !self.chunked_last {
            return Err(FramingError::NotChunked);
        }
        Ok(Length::Chunked)
    }

    /// The framing of a response's body, before the rules of status and method (1xx, 204,
    /// 304 and responses to `HEAD` have none: the caller knows those). When it is
    /// `Transfer-Encoding` that frames it, a `Content-Length` is not to be forwarded.
    pub(crate) fn response(&self, http10: bool) -> Result<Length, FramingError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if !self.has_transfer_encoding {
            return Ok(self
                .content_length
                .map_or(Length::UntilClose, Length::Fixed));
        }
        self.encoding_rules(http10)?;
        Ok(if self.chunked_last {
            Length::Chunked
        } else {
            Length::UntilClose
        })
    }

    fn encoding_rules(&self, http10: bool) -> Result<(), FramingError> {
        if http10 {
            return Err(FramingError::EncodingInHttp10);
        }
        if self.chunked > 1 {
            return Err(FramingError::ChunkedTwice);
        }
        Ok(())
    }
}

/// Spaces and tabs around a value (RFC 9110's OWS).
pub(crate) fn trim_ows(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |i| i + 1);
    &value[start..end]
}

/// A `Content-Length` value: `1*DIGIT`, whitespace around it allowed. Rust's integer
/// parsing alone would also take a leading `+`, and framing that the proxy reads
/// differently from its peer desynchronises the connection.
pub(crate) fn content_length(value: &[u8]) -> Option<u64> {
    let digits = trim_ows(value);
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let digit = char::from(b).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The chunk size of a chunk-size line, given without its CRLF:
/// `1*HEXDIG *(SP / HTAB) [";" extension]`, the extension holding no CR or LF.
pub(crate) fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || line.len() > MAX_CHUNK_LINE {
        return None;
    }
    let size = line[..digits].iter().try_fold(0u64, |n, &b| {
        let digit = char::from(b).to_digit(16)?;
        n.checked_mul(16)?.checked_add(u64::from(digit))
    })?;
    let rest = &line[digits..];
    let spaces = rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    match &rest[spaces..] {
        [] => Some(size),
        [b';', extension @ ..] if !extension.iter().any(|&b| b == b'\r' || b == b'\n') => {
            Some(size)
        }
        _ => None,
    }
}

/// A line of chunked framing (a size line, the end of chunk data, a trailer line) given
/// up to but without its LF: the line without its CR. `None` for a bare LF.
pub(crate) fn strip_cr(line: &[u8]) -> Option<&[u8]> {
    line.strip_suffix(b"\r")
}

/// Fields that must not be taken from trailers (RFC 9110 §6.5.1: framing, routing,
/// authentication, content description; hyper's list) and hop-by-hop fields: they are
/// left out when trailers are forwarded, in either direction.
pub(crate) fn forbidden_trailer(name: &HeaderName) -> bool {
    matches!(
        *name,
        header::AUTHORIZATION
            | header::CACHE_CONTROL
            | header::CONTENT_ENCODING
            | header::CONTENT_LENGTH
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::HOST
            | header::MAX_FORWARDS
            | header::SET_COOKIE
            | header::TRAILER
            | header::TRANSFER_ENCODING
            | header::TE
            | header::CONNECTION
            | header::UPGRADE
            | header::PROXY_AUTHORIZATION
    ) || super::super::headers::is_hop_by_hop(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> FramingFields {
        let mut f = FramingFields::default();
        for (name, value) in pairs {
            match *name {
                "cl" => f.content_length(value.as_bytes()),
                "te" => f.transfer_encoding(value.as_bytes()),
                _ => unreachable!(),
            }
        }
        f
    }

    #[test]
    fn content_length_is_digits_only_in_both_directions() {
        for good in ["0", "5", " 5 ", "\t12", "18446744073709551615"] {
            let f = fields(&[("cl", good)]);
            let n = content_length(good.as_bytes()).unwrap();
            assert_eq!(f.request(false), Ok(Length::Fixed(n)), "{good:?}");
            assert_eq!(f.response(false), Ok(Length::Fixed(n)), "{good:?}");
        }
        for bad in [
            "+5",
            "-5",
            "5, 5",
            "0x5",
            "",
            " ",
            "5 5",
            "٥",
            "18446744073709551616",
        ] {
            let f = fields(&[("cl", bad)]);
            assert_eq!(
                f.request(false),
                Err(FramingError::InvalidContentLength),
                "{bad:?}"
            );
            assert_eq!(
                f.response(false),
                Err(FramingError::InvalidContentLength),
                "{bad:?}"
            );
        }
        let same = fields(&[("cl", "5"), ("cl", "5")]);
        assert_eq!(same.request(false), Ok(Length::Fixed(5)));
        assert_eq!(same.response(false), Ok(Length::Fixed(5)));
        let differ = fields(&[("cl", "5"), ("cl", "6")]);
        assert_eq!(
            differ.request(false),
            Err(FramingError::ConflictingContentLength)
        );
        assert_eq!(
            differ.response(false),
            Err(FramingError::ConflictingContentLength)
        );
    }

    #[test]
    fn transfer_encoding_rules_by_direction() {
        let f = fields(&[("te", "gzip, chunked")]);
        assert_eq!(f.request(false), Ok(Length::Chunked));
        assert_eq!(f.response(false), Ok(Length::Chunked));

        let f = fields(&[("te", "chunked, gzip")]);
        assert_eq!(f.request(false), Err(FramingError::NotChunked));
        assert_eq!(f.response(false), Ok(Length::UntilClose));
        let f = fields(&[("te", "chunked,")]);
        assert_eq!(f.request(false), Err(FramingError::NotChunked));
        let f = fields(&[("te", "chunked"), ("te", "gzip")]);
        assert_eq!(f.request(false), Err(FramingError::NotChunked));

        for twice in [
            &[("te", "chunked, chunked")][..],
            &[("te", "chunked"), ("te", "chunked")],
        ] {
            let f = fields(twice);
            assert_eq!(f.request(false), Err(FramingError::ChunkedTwice));
            assert_eq!(f.response(false), Err(FramingError::ChunkedTwice));
        }

        let f = fields(&[("te", "gz\u{e9}p, chunked")]);
        assert_eq!(f.request(false), Err(FramingError::InvalidTransferEncoding));
        assert_eq!(
            f.response(false),
            Err(FramingError::InvalidTransferEncoding)
        );

        let f = fields(&[("te", "chunked")]);
        assert_eq!(f.request(true), Err(FramingError::EncodingInHttp10));
        assert_eq!(f.response(true), Err(FramingError::EncodingInHttp10));

        // Both: refused in a request, Transfer-Encoding wins in a response.
        let f = fields(&[("cl", "5"), ("te", "chunked")]);
        assert_eq!(f.request(false), Err(FramingError::LengthAndEncoding));
        assert_eq!(f.response(false), Ok(Length::Chunked));
        assert!(f.has_content_length());
        // An invalid Content-Length is an error even beside Transfer-Encoding.
        let f = fields(&[("te", "chunked"), ("cl", "+5")]);
        assert_eq!(f.request(false), Err(FramingError::InvalidContentLength));
        assert_eq!(f.response(false), Err(FramingError::InvalidContentLength));

        assert_eq!(fields(&[]).request(false), Ok(Length::Fixed(0)));
        assert_eq!(fields(&[]).response(false), Ok(Length::UntilClose));
    }

    #[test]
    fn chunk_size_lines() {
        for (line, size) in [
            ("0", 0),
            ("a", 10),
            ("FF", 255),
            ("5;ext=1", 5),
            ("5 ;ext", 5),
            ("5\t", 5),
            ("ffffffffffffffff", u64::MAX),
        ] {
            assert_eq!(chunk_size(line.as_bytes()), Some(size), "{line:?}");
        }
        for bad in [
            "",
            "+5",
            "-5",
            " 5",
            "0x5",
            "5 5",
            "5;a\rb",
            "g",
            "10000000000000000",
            "5\r",
        ] {
            assert_eq!(chunk_size(bad.as_bytes()), None, "{bad:?}");
        }
        let long = format!("5;{}", "x".repeat(MAX_CHUNK_LINE));
        assert_eq!(chunk_size(long.as_bytes()), None);
        assert_eq!(strip_cr(b"5\r"), Some(&b"5"[..]));
        assert_eq!(strip_cr(b"5"), None);
    }

    #[test]
    fn trailers_never_carry_framing() {
        for name in [
            "content-length",
            "transfer-encoding",
            "host",
            "connection",
            "te",
            "trailer",
        ] {
            assert!(forbidden_trailer(&HeaderName::from_static(name)), "{name}");
        }
        assert!(!forbidden_trailer(&HeaderName::from_static("grpc-status")));
        assert!(!forbidden_trailer(&HeaderName::from_static("x-checksum")));
    }
}
