//! Hashing keys taken from a header, a cookie or the path, and [`HashKey`], the one that
//! `config.json`'s `hash_key` chooses.

use std::fmt;
use std::str::FromStr;

use http::header::{HeaderName, COOKIE};
use http::Request;

use super::client_ip::ClientIpKey;
use crate::balance::RequestKey;
use crate::policy::stable_hash;

/// Keys a request by the value of one request header; a request without it is keyed by
/// its client IP (with the [`ClientIpKey`]'s trusted-proxy rules).
///
/// Several fields of the header are hashed together, in order.
///
/// ```
/// use tower_lb::balance::RequestKey;
/// use tower_lb::proxy::{ClientAddr, HeaderKey};
///
/// let key = HeaderKey::new("x-user".parse().unwrap());
/// let request = |user: &str| {
///     let mut r = http::Request::builder().header("x-user", user).body(()).unwrap();
///     r.extensions_mut().insert(ClientAddr("127.0.0.2:4000".parse().unwrap()));
///     r
/// };
/// assert_eq!(key.key(&request("ann")), key.key(&request("ann")));
/// assert_ne!(key.key(&request("ann")), key.key(&request("bob")));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderKey {
    name: HeaderName,
    fallback: ClientIpKey,
}

impl HeaderKey {
    /// Keys by the header `name`, falling back to the connection's peer IP.
    pub fn new(name: HeaderName) -> Self {
        HeaderKey {
            name,
            fallback: ClientIpKey::new(),
        }
    }

    /// Falls back to `key` for requests without the header.
    pub fn with_fallback(mut self, key: ClientIpKey) -> Self {
        self.fallback = key;
        self
    }

    /// The header's name.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }
}

impl<B> RequestKey<Request<B>> for HeaderKey {
    fn key(&self, request: &Request<B>) -> Option<u64> {
        // The fields as a list: length-prefixed, so that `a`,`bc` and `ab`,`c` differ.
        let mut values = request.headers().get_all(&self.name).iter();
        let Some(first) = values.next() else {
            return self.fallback.key(request);
        };
        match values.next() {
            None => Some(stable_hash(&[first.as_bytes()][..])),
            Some(second) => {
                let all: Vec<&[u8]> = [first, second]
                    .into_iter()
                    .chain(values)
                    .map(|v| v.as_bytes())
                    .collect();
                Some(stable_hash(&all[..]))
            }
        }
    }
}

/// Keys a request by the value of one cookie; a request without it is keyed by its client
/// IP (with the [`ClientIpKey`]'s trusted-proxy rules).
///
/// ```
/// use tower_lb::balance::RequestKey;
/// use tower_lb::proxy::{ClientAddr, CookieKey};
///
/// let key = CookieKey::new("session").unwrap();
/// let request = |cookie: &str| {
///     let mut r = http::Request::builder().header("cookie", cookie).body(()).unwrap();
///     r.extensions_mut().insert(ClientAddr("127.0.0.2:4000".parse().unwrap()));
///     r
/// };
/// assert_eq!(key.key(&request("a=1; session=s1")), key.key(&request("session=s1")));
/// assert_ne!(key.key(&request("session=s1")), key.key(&request("session=s2")));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieKey {
    name: Box<str>,
    fallback: ClientIpKey,
}

impl CookieKey {
    /// Keys by the cookie `name`, falling back to the connection's peer IP. Fails if
    /// `name` is not a cookie name (an RFC 6265 token: no spaces, `;`, `=` or controls).
    pub fn new(name: &str) -> Result<Self, InvalidHashKey> {
        let is_token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !is_token {
            return Err(InvalidHashKey(format!("cookie:{name}")));
        }
        Ok(CookieKey {
            name: name.into(),
            fallback: ClientIpKey::new(),
        })
    }

    /// Falls back to `key` for requests without the cookie.
    pub fn with_fallback(mut self, key: ClientIpKey) -> Self {
        self.fallback = key;
        self
    }

    /// The cookie's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value of the cookie in `request`'s `Cookie` fields: the first one with this
    /// name, as sent.
    fn value<'r, B>(&self, request: &'r Request<B>) -> Option<&'r [u8]> {
        request
            .headers()
            .get_all(COOKIE)
            .iter()
            .flat_map(|field| field.as_bytes().split(|b| *b == b';'))
            .find_map(|pair| {
                let eq = pair.iter().position(|b| *b == b'=')?;
                (trim(&pair[..eq]) == self.name.as_bytes()).then(|| trim(&pair[eq + 1..]))
            })
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace());
    match (start, end) {
        (Some(s), Some(e)) => &bytes[s..=e],
        _ => &[],
    }
}

impl<B> RequestKey<Request<B>> for CookieKey {
    fn key(&self, request: &Request<B>) -> Option<u64> {
        match self.value(request) {
            Some(value) => Some(stable_hash(value)),
            None => self.fallback.key(request),
        }
    }
}

/// Keys a request by its path, without the query: every request for one resource goes to
/// one backend (for caches).
///
/// ```
/// use tower_lb::balance::RequestKey;
/// use tower_lb::proxy::PathKey;
///
/// let request = |uri: &str| http::Request::get(uri).body(()).unwrap();
/// assert_eq!(PathKey.key(&request("/a?x=1")), PathKey.key(&request("/a?x=2")));
/// assert_ne!(PathKey.key(&request("/a")), PathKey.key(&request("/b")));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathKey;

impl<B> RequestKey<Request<B>> for PathKey {
    fn key(&self, request: &Request<B>) -> Option<u64> {
        Some(stable_hash(request.uri().path()))
    }
}

/// What `hashing` hashes, chosen at run time: `config.json`'s `hash_key`.
///
/// Parses from `client_ip`, `header:NAME`, `cookie:NAME` or `path`, and displays as the
/// same text. The header and cookie keys fall back to the client IP; [`with_client_ip`]
/// sets the trusted proxies of that fallback (and of `client_ip`).
///
/// ```
/// use tower_lb::proxy::HashKey;
///
/// let key: HashKey = "header:X-User".parse().unwrap();
/// assert_eq!(key.to_string(), "header:x-user");
/// assert_eq!("path".parse::<HashKey>().unwrap(), HashKey::Path(tower_lb::proxy::PathKey));
/// assert!("query".parse::<HashKey>().is_err());
/// ```
///
/// [`with_client_ip`]: HashKey::with_client_ip
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HashKey {
    /// [`ClientIpKey`]: the default.
    ClientIp(ClientIpKey),
    /// [`HeaderKey`].
    Header(HeaderKey),
    /// [`CookieKey`].
    Cookie(CookieKey),
    /// [`PathKey`].
    Path(PathKey),
}

impl HashKey {
    /// Uses `key` for the client IP: the key itself for `client_ip`, the fallback of the
    /// header and cookie keys.
    pub fn with_client_ip(self, key: ClientIpKey) -> Self {
        match self {
            HashKey::ClientIp(_) => HashKey::ClientIp(key),
            HashKey::Header(h) => HashKey::Header(h.with_fallback(key)),
            HashKey::Cookie(c) => HashKey::Cookie(c.with_fallback(key)),
            HashKey::Path(p) => HashKey::Path(p),
        }
    }
}

impl Default for HashKey {
    fn default() -> Self {
        HashKey::ClientIp(ClientIpKey::new())
    }
}

impl<B> RequestKey<Request<B>> for HashKey {
    #[inline]
    fn key(&self, request: &Request<B>) -> Option<u64> {
        match self {
            HashKey::ClientIp(k) => k.key(request),
            HashKey::Header(k) => k.key(request),
            HashKey::Cookie(k) => k.key(request),
            HashKey::Path(k) => k.key(request),
        }
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::ClientIp(_) => f.write_str("client_ip"),
            HashKey::Header(k) => write!(f, "header:{}", k.name),
            HashKey::Cookie(k) => write!(f, "cookie:{}", k.name),
            HashKey::Path(_) => f.write_str("path"),
        }
    }
}

/// The error of parsing a [`HashKey`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidHashKey(String);

impl fmt::Display for InvalidHashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a hash key (expected client_ip, header:NAME, cookie:NAME or path)",
            self.0
        )
    }
}

impl std::error::Error for InvalidHashKey {}

impl FromStr for HashKey {
    type Err = InvalidHashKey;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidHashKey(s.to_owned());
        match s.split_once(':') {
            None if s == "client_ip" => Ok(HashKey::default()),
            None if s == "path" => Ok(HashKey::Path(PathKey)),
            Some(("header", name)) => name
                .parse::<HeaderName>()
                .map(|n| HashKey::Header(HeaderKey::new(n)))
                .map_err(|_| err()),
            Some(("cookie", name)) => CookieKey::new(name).map(HashKey::Cookie).map_err(|_| err()),
            _ => Err(err()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::ClientAddr;

    fn request(peer: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::builder().uri("/p?q=1");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let mut req = req.body(()).unwrap();
        req.extensions_mut()
            .insert(ClientAddr(format!("{peer}:4000").parse().unwrap()));
        req
    }

    #[test]
    fn header_falls_back_to_the_client_ip() {
        let key = HeaderKey::new(HeaderName::from_static("x-user"));
        let ip = ClientIpKey::new();
        let bare = request("127.0.0.2", &[]);
        assert_eq!(key.key(&bare), ip.key(&bare));
        let with = request("127.0.0.2", &[("x-user", "ann")]);
        assert_ne!(key.key(&with), ip.key(&with));
        assert_eq!(
            key.key(&with),
            key.key(&request("127.0.0.3", &[("x-user", "ann")]))
        );
        // Two fields are not their concatenation.
        let split = request("127.0.0.2", &[("x-user", "a"), ("x-user", "nn")]);
        assert_ne!(key.key(&split), key.key(&with));
        // The fallback follows the trusted proxies.
        let trusting = ClientIpKey::trusting(["127.0.0.0/8".parse().unwrap()]);
        let key = key.with_fallback(trusting.clone());
        let forwarded = request("127.0.0.9", &[("x-forwarded-for", "203.0.113.7")]);
        assert_eq!(key.key(&forwarded), trusting.key(&forwarded));
        assert_ne!(key.key(&forwarded), ip.key(&forwarded));
    }

    #[test]
    fn cookie_is_found_among_others() {
        let key = CookieKey::new("sid").unwrap();
        let sid = |cookies: &[&str]| {
            let headers: Vec<_> = cookies.iter().map(|c| ("cookie", *c)).collect();
            key.value(&request("127.0.0.2", &headers))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(sid(&["sid=1"]).as_deref(), Some("1"));
        assert_eq!(sid(&["a=2;  sid = 1 ; b=3"]).as_deref(), Some("1"));
        assert_eq!(sid(&["a=2", "sid=4"]).as_deref(), Some("4"));
        assert_eq!(sid(&["xsid=1; sidx=2"]), None);
        assert_eq!(sid(&["sid"]), None);
        assert_eq!(sid(&[]), None);
        let bare = request("127.0.0.2", &[("cookie", "other=1")]);
        assert_eq!(key.key(&bare), ClientIpKey::new().key(&bare));
    }

    #[test]
    fn parsing_and_display() {
        for text in ["client_ip", "path", "header:x-user", "cookie:SID"] {
            assert_eq!(text.parse::<HashKey>().unwrap().to_string(), text);
        }
        for bad in [
            "",
            "ip",
            "header:",
            "header:a b",
            "cookie:",
            "cookie:a;b",
            "cookie:a=b",
            "query:x",
            "path:x",
            "client_ip:x",
        ] {
            assert!(bad.parse::<HashKey>().is_err(), "{bad:?}");
        }
        // The path key ignores the query and the client.
        let a = request("127.0.0.2", &[]);
        let b = request("127.0.0.3", &[]);
        assert_eq!(PathKey.key(&a), PathKey.key(&b));
        assert_eq!(PathKey.key(&a), Some(stable_hash("/p")));
    }
}
