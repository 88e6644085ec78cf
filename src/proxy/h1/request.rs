//! The request rules that need the parsed request: `Host` (RFC 9112 §3.2), the target's
//! authority, and `CONNECT`. A request they refuse is answered by the proxy and never
//! forwarded.
//!
//! - A request without `Host` goes on with the backend's address as its `Host`. (RFC 9112
//!   §3.2 has a server answer `400` to an HTTP/1.1 request without one, as nginx does;
//!   the contract names only two `Host`s and an invalid one, and clients written against
//!   it may leave `Host` out, so it is not refused.)
//! - Two `Host` fields, or a `Host` that is not `host[:port]` by RFC 3986 (an IP literal in
//!   brackets, an IPv4 address or a registered name of unreserved, percent-encoded and
//!   sub-delimiter characters; a port from 1 to 65535): `400`. So are spaces, `/`, `@`
//!   and any byte outside that grammar. An empty `Host` is valid (RFC 9112 §3.2: a client
//!   sends one when the target has no authority).
//! - An absolute-form target (`GET http://a.example/x`) must be `http` or `https` with a
//!   non-empty authority valid by the same rule and without user information (RFC 9110
//!   §4.2.4), else `400`; the backend then sees `/x` and `Host: a.example`
//!   ([`encode_head`](super::encode_head)).
//! - The asterisk form (`* `) is the target of `OPTIONS` only (RFC 9112 §3.2.4): `400`
//!   with another method.
//! - `CONNECT` is `405`, as nginx answers it (without `Allow`): this is a reverse proxy,
//!   not a forward proxy. The connection closes after it, since a client may already be
//!   sending tunnel bytes. (An HTTP/2 extended CONNECT, which carries `:protocol`, is left
//!   to the service.)
//!
//! Every refusal closes the connection.

use std::fmt;
use std::net::Ipv6Addr;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};

use super::framing::FramingError;

/// Why the proxy answers a request itself instead of forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The request's framing (or an earlier request's on the connection) breaks the rules.
    Framing(FramingError),
    /// More than one `Host` field.
    TwoHosts,
    /// A `Host` that is not `host[:port]`.
    InvalidHost,
    /// An absolute-form target that is not a valid `http` or `https` URI.
    InvalidTarget,
    /// A `CONNECT` request.
    Connect,
}

impl Refusal {
    /// The status of the answer.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Refusal::Connect => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::Framing(error) => error.as_str(),
            Refusal::TwoHosts => "two Host fields",
            Refusal::InvalidHost => "invalid Host",
            Refusal::InvalidTarget => "invalid request target",
            Refusal::Connect => "CONNECT is not served",
        }
    }

    /// The answer: the status, a one-line body, and `Connection: close`.
    pub(crate) fn response<B>(self) -> Response<Either<B, Full<Bytes>>> {
        let status = self.status();
        let text = format!(
            "{} {}: {}\n",
            status.as_str(),
            status.canonical_reason().unwrap_or_default(),
            self.reason()
        );
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(text))));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// Checks `request` by the rules of the module docs.
pub(crate) fn check_request<B>(request: &Request<B>) -> Result<(), Refusal> {
    if request.method() == Method::CONNECT && !extended_connect(request) {
        return Err(Refusal::Connect);
    }
    let uri = request.uri();
    let mut hosts = request.headers().get_all(header::HOST).iter();
    if let Some(host) = hosts.next() {
        if hosts.next().is_some() {
            return Err(Refusal::TwoHosts);
        }
        if !valid_host(host.as_bytes()) {
            return Err(Refusal::InvalidHost);
        }
    }
    if uri.path() == "*" && uri.authority().is_none() && request.method() != Method::OPTIONS {
        return Err(Refusal::InvalidTarget);
    }
    if let Some(authority) = uri.authority() {
        let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
        if !scheme_ok || authority.host().is_empty() || !valid_host(authority.as_str().as_bytes()) {
            return Err(Refusal::InvalidTarget);
        }
    }
    Ok(())
}

#[cfg(feature = "http2")]
fn extended_connect<B>(request: &Request<B>) -> bool {
    request.extensions().get::<hyper::ext::Protocol>().is_some()
}

#[cfg(not(feature = "http2"))]
fn extended_connect<B>(_: &Request<B>) -> bool {
    false
}

/// Whether `value` is `host [":" port]` by RFC 3986, the port from 1 to 65535.
///
/// One pass over the bytes, one table look-up each: this runs for every request.
pub(crate) fn valid_host(value: &[u8]) -> bool {
    if value.first() == Some(&b'[') {
        return ip_literal(value);
    }
    // `*( unreserved / pct-encoded / sub-delims )` (an IPv4 address is one too), then the
    // port after the first `:`.
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        match REG_NAME[usize::from(b)] {
            REG => i += 1,
            PCT => {
                let hex = value.get(i + 1..i + 3);
                if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 3;
            }
            COLON => return valid_port(&value[i + 1..]),
            _ => return false,
        }
    }
    true
}

/// `"[" IPv6address "]" [":" port]`. IPv6 only: IPvFuture (`[v1.x]`) names nothing a
/// backend serves.
#[cold]
fn ip_literal(value: &[u8]) -> bool {
    let Some(end) = memchr::memchr(b']', value) else {
        return false;
    };
    let literal = std::str::from_utf8(&value[1..end]).ok();
    if literal.and_then(|l| l.parse::<Ipv6Addr>().ok()).is_none() {
        return false;
    }
    match &value[end + 1..] {
        [] => true,
        [b':', port @ ..] => valid_port(port),
        _ => false,
    }
}

/// Byte classes of a reg-name: [`REG`] for unreserved and sub-delimiter characters,
/// [`PCT`] for `%`, [`COLON`] for the port's separator, 0 for any other byte.
const REG_NAME: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => REG,
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' => REG,
            b'%' => PCT,
            b':' => COLON,
            _ => 0,
        };
        b += 1;
    }
    table
};
const REG: u8 = 1;
const PCT: u8 = 2;
const COLON: u8 = 3;

/// `1*DIGIT` from 1 to 65535 (leading zeros allowed).
fn valid_port(port: &[u8]) -> bool {
    if port.is_empty() {
        return false;
    }
    let mut n = 0u32;
    for &b in port {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return false;
        }
        n = n * 10 + u32::from(digit);
        if n > 65535 {
            return false;
        }
    }
    n >= 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_host_and_port_by_rfc_3986() {
        for good in [
            "a.example",
            "a.example:8080",
            "127.0.0.1",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:65535",
            "[2001:db8::7]:80",
            "xn--bcher-kva.example",
            "a_b~c-d!$&'()*+,;=",
            "%41.example",
            "a.example:080",
            "a.example:0000065535",
            "a%41:80",
            "[::1]:00443",
            "",
        ] {
            assert!(valid_host(good.as_bytes()), "{good:?} refused");
        }
        for bad in [
            "a example",
            "a.example/x",
            "user@a.example",
            "a.example:0",
            "a.example:65536",
            "a.example:",
            "a.example:8o",
            "a.example:80:80",
            "a.example:-1",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[v1.x]",
            "[a.example]",
            "::1",
            "%4",
            "%zz",
            "a\tb",
            "a\"b",
            "ä.example",
            "a.example\\x",
            "a.example?x",
            "a.example#x",
            "a.example:%38%30",
            "a.example:65535x",
            "a.example:99999999999",
            "[::1]:0",
            "a.ex%",
            "a.ex%4:",
            "a:b@c",
            "a.example\0",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?} accepted");
        }
    }

    fn check(method: &str, target: &str, hosts: &[&str]) -> Result<(), Refusal> {
        let mut request = Request::builder().method(method).uri(target);
        for host in hosts {
            request = request.header("host", *host);
        }
        check_request(&request.body(()).unwrap())
    }

    #[test]
    fn requests_by_host_target_and_method() {
        assert_eq!(check("GET", "/", &["a.example"]), Ok(()));
        assert_eq!(check("GET", "/", &[]), Ok(()));
        assert_eq!(check("OPTIONS", "*", &["a"]), Ok(()));
        assert_eq!(check("GET", "*", &["a"]), Err(Refusal::InvalidTarget));
        assert_eq!(
            check("GET", "/", &["a.example", "a.example"]),
            Err(Refusal::TwoHosts)
        );
        assert_eq!(check("GET", "/", &["a b"]), Err(Refusal::InvalidHost));
        assert_eq!(check("GET", "http://a.example/x", &["other"]), Ok(()));
        assert_eq!(check("GET", "https://a.example:8443/x", &[]), Ok(()));
        assert_eq!(
            check("GET", "http://u@a.example/x", &[]),
            Err(Refusal::InvalidTarget)
        );
        assert_eq!(
            check("GET", "ftp://a.example/x", &[]),
            Err(Refusal::InvalidTarget)
        );
        assert_eq!(
            check("GET", "http://a.example:0/x", &[]),
            Err(Refusal::InvalidTarget)
        );
        assert_eq!(
            check("CONNECT", "a.example:443", &["a.example:443"]),
            Err(Refusal::Connect)
        );
        let response = Refusal::Connect.response::<()>();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()["connection"], "close");
        assert!(response.headers().get("allow").is_none());
        assert_eq!(
            Refusal::Framing(FramingError::LengthAndEncoding)
                .response::<()>()
                .status(),
            StatusCode::BAD_REQUEST
        );
    }
}
