//! Header rewriting for a forwarded message: hop-by-hop removal and `X-Forwarded-For`.
//!
//! One rule for every message, with one exception: an upgrade (RFC 9110 §7.8). A message
//! whose `Connection` names `upgrade` and that carries an `Upgrade` field (WebSocket, say)
//! keeps that field and goes on with `Connection: upgrade`, so that the backend can answer
//! `101` and the connection becomes a tunnel. HTTP/2's own upgrade (`h2c`) stays hop-by-hop:
//! it is about the client's connection to the proxy, not the backend.

use std::io::Write as _;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The hop-by-hop fields of RFC 9110 §7.6.1 (besides those that `Connection` names),
/// lowercase. The one list that requests and responses are both filtered by.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Whether the field `name` is hop-by-hop by itself.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    // Names are lowercase: one comparison at most, chosen by the length.
    let name = name.as_str();
    match name.len() {
        2 => name == HOP_BY_HOP[3],
        7 => name == HOP_BY_HOP[5],
        10 => name == HOP_BY_HOP[0] || name == HOP_BY_HOP[2],
        16 => name == HOP_BY_HOP[1],
        17 => name == HOP_BY_HOP[4],
        _ => false,
    }
}

/// Whether the field `name` is hop-by-hop by itself in a message that carries an upgrade
/// (`upgrade`) or not: of an upgrade, `Upgrade` goes on (the one exception).
pub(crate) fn is_hop_by_hop_in(name: &HeaderName, upgrade: bool) -> bool {
    is_hop_by_hop(name) && !(upgrade && name == header::UPGRADE)
}

/// `Connection: upgrade`, the `Connection` field a forwarded upgrade carries instead of its
/// own (which may name fields that were left out).
pub(crate) const CONNECTION_UPGRADE: HeaderValue = HeaderValue::from_static("upgrade");

/// Whether an `Upgrade` value offers a protocol other than HTTP/2 (`h2c`, or the `h2` that
/// some servers advertise): only such an upgrade is forwarded.
fn offers_tunnel(value: &[u8]) -> bool {
    connection_tokens(value).any(|token| {
        let name = token.split(|&b| b == b'/').next().unwrap_or_default();
        !(name.eq_ignore_ascii_case(b"h2c") || name.eq_ignore_ascii_case(b"h2"))
    })
}

/// Whether the `Connection` value `value` has `token` (any case).
pub(crate) fn has_token(value: &[u8], token: &[u8]) -> bool {
    connection_tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

/// The tokens of a `Connection` value, trimmed, empty ones left out.
pub(crate) fn connection_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
}

/// The hop-by-hop fields of one message: those of RFC 9110 §7.6.1 and every field that its
/// `Connection` header names. The one rule for both directions: [`remove_hop_by_hop`]
/// removes them from a map, the proxy's request encoder leaves them out as it writes, and
/// the response parser as it reads.
#[derive(Debug, Default)]
pub(crate) struct HopByHop {
    /// Fields named in `Connection`: almost always none, so nothing is allocated.
    listed: Vec<HeaderName>,
    /// `Connection` named `upgrade`.
    connection_upgrade: bool,
    /// The message carries an upgrade to forward: `Connection: upgrade` and an `Upgrade`
    /// field offering more than HTTP/2 (set by [`HopByHop::of`]).
    upgrade: bool,
}

impl HopByHop {
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let mut hop = HopByHop::default();
        let mut offered = false;
        // A pass over a few entries costs less than hashing the name for a lookup.
        for (name, value) in headers {
            if name == header::CONNECTION {
                hop.add_connection(value.as_bytes());
            } else if name == header::UPGRADE {
                offered |= offers_tunnel(value.as_bytes());
            }
        }
        hop.upgrade = hop.connection_upgrade && offered;
        hop
    }

    /// Takes in the fields that a `Connection` value names (every option but `close`,
    /// `keep-alive` and `upgrade`; a token that is not a field name names nothing). Returns
    /// whether the value asks to close the connection.
    pub(crate) fn add_connection(&mut self, value: &[u8]) -> bool {
        // The usual values, as most servers and clients spell them: no splitting.
        match value {
            b"keep-alive" | b"Keep-Alive" => return false,
            b"close" => return true,
            _ => {}
        }
        let mut close = false;
        for token in connection_tokens(value) {
            if token.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                // `Upgrade` is hop-by-hop by itself; whether it goes on is `upgrade`'s call.
                self.connection_upgrade = true;
            } else if !token.eq_ignore_ascii_case(b"keep-alive")
                // `Host` names the target, not a hop: a client cannot have it taken out
                // (the backend would be sent its own address instead).
                && !token.eq_ignore_ascii_case(b"host")
            {
                self.listed.extend(HeaderName::from_bytes(token).ok());
            }
        }
        close
    }

    /// Whether the message carries an upgrade to forward: then `Upgrade` goes on, and the
    /// message is sent with [`CONNECTION_UPGRADE`] instead of its own `Connection`.
    pub(crate) fn upgrade(&self) -> bool {
        self.upgrade
    }

    /// Forwards no upgrade: `Upgrade` is dropped as any hop-by-hop field.
    pub(crate) fn refuse_upgrade(&mut self) {
        self.upgrade = false;
    }

    /// Whether `Connection` named no field.
    pub(crate) fn names_none(&self) -> bool {
        self.listed.is_empty()
    }

    /// Whether `Connection` named the field `name`.
    pub(crate) fn names(&self, name: &HeaderName) -> bool {
        self.listed.contains(name)
    }

    /// Whether the field `name` must not be forwarded.
    pub(crate) fn drops(&self, name: &HeaderName) -> bool {
        is_hop_by_hop_in(name, self.upgrade) || self.names(name)
    }
}

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Removes the hop-by-hop fields from `headers`: those of RFC 9110 §7.6.1 and every field
/// that a `Connection` header names.
///
/// The one exception is an upgrade: with `Connection: upgrade` and an `Upgrade` field (other
/// than HTTP/2's `h2c`), `Upgrade` stays and `Connection` becomes `upgrade`, so that the
/// next hop can switch protocols (WebSocket).
///
/// ```
/// use http::HeaderMap;
/// let mut headers = HeaderMap::new();
/// headers.insert("connection", "close, x-secret".parse().unwrap());
/// headers.insert("x-secret", "1".parse().unwrap());
/// headers.insert("keep-alive", "timeout=5".parse().unwrap());
/// headers.insert("accept", "*/*".parse().unwrap());
/// tower_lb::proxy::remove_hop_by_hop(&mut headers);
/// assert_eq!(headers.len(), 1);
/// assert!(headers.contains_key("accept"));
///
/// // An upgrade goes on.
/// let mut headers = HeaderMap::new();
/// headers.insert("connection", "keep-alive, Upgrade".parse().unwrap());
/// headers.insert("upgrade", "websocket".parse().unwrap());
/// tower_lb::proxy::remove_hop_by_hop(&mut headers);
/// assert_eq!(headers["connection"], "upgrade");
/// assert_eq!(headers["upgrade"], "websocket");
/// ```
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let hop = HopByHop::of(headers);
    // Most messages carry none of these.
    if !headers.keys().any(|name| hop.drops(name)) {
        return;
    }
    for name in &hop.listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        if !(hop.upgrade && name == "upgrade") {
            headers.remove(name);
        }
    }
    if hop.upgrade {
        headers.insert(header::CONNECTION, CONNECTION_UPGRADE);
    }
}

/// Appends `client` to `X-Forwarded-For`, joining any values the message already has into
/// one comma-separated list (RFC 7239's order: the client first, each proxy appending).
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let mut joined = Vec::with_capacity(64);
    forwarded_for_value(&mut joined, headers.get_all(X_FORWARDED_FOR), client);
    // Existing values were valid header values, and so is an address; joined with ", "
    // they still are.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

/// Writes the value of `X-Forwarded-For` with `client` appended to the `existing` values.
pub(crate) fn forwarded_for_value<'a>(
    out: &mut Vec<u8>,
    existing: impl IntoIterator<Item = &'a HeaderValue>,
    client: IpAddr,
) {
    for value in existing {
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b", ");
    }
    let mut buf = [0u8; 64];
    out.extend_from_slice(format_ip(client, &mut buf));
}

/// Writes `ip` in its usual text form into `buf`; IPv4 without `fmt` (this runs on every
/// request, and `fmt` costs a few hundred instructions more).
fn format_ip(ip: IpAddr, buf: &mut [u8; 64]) -> &[u8] {
    match ip {
        IpAddr::V4(v4) => {
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    buf[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    buf[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                buf[len] = b'0' + octet % 10;
                len += 1;
            }
            &buf[..len]
        }
        IpAddr::V6(_) => {
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            // An IPv6 address is at most 45 bytes: this cannot fail.
            let _ = write!(cursor, "{ip}");
            let len = cursor.position() as usize;
            &buf[..len]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_names_by_length_then_name() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "tk",
            "upgradf",
            "user-agent",
            "keep-alivf",
            "proxy-connectioo",
            "transfer-encodinh",
            "host",
            "x-upgrade",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        let mut hop = HopByHop::default();
        assert!(!hop.add_connection(b"keep-alive"));
        assert!(!hop.add_connection(b"Keep-Alive"));
        assert!(hop.add_connection(b"close"));
        assert!(hop.add_connection(b"Close"));
        assert!(hop.names_none());
        assert!(!hop.add_connection(b"keep-alive, X-Secret"));
        assert!(hop.names(&HeaderName::from_static("x-secret")));
    }

    #[test]
    fn removes_standard_and_named_hop_by_hop() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Custom"),
            ("connection", "upgrade"),
            ("x-custom", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("host", "example"),
            ("x-kept", "1"),
        ] {
            h.append(k, v.parse().unwrap());
        }
        remove_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        // An upgrade goes on, with `Connection: upgrade` alone.
        assert_eq!(left, ["connection", "host", "upgrade", "x-kept"]);
        assert_eq!(h["connection"], "upgrade");

        // Without `Connection: upgrade`, or for HTTP/2's own upgrade, `Upgrade` is dropped.
        for (connection, upgrade) in [
            ("keep-alive", "websocket"),
            ("Upgrade, HTTP2-Settings", "h2c"),
            ("upgrade", "h2, h2c"),
        ] {
            let mut h = HeaderMap::new();
            h.insert("connection", connection.parse().unwrap());
            h.insert("upgrade", upgrade.parse().unwrap());
            h.insert(
                "http2-settings",
                "AAMAAABkAAQAoAAAAAIAAAAA".parse().unwrap(),
            );
            h.insert("x-kept", "1".parse().unwrap());
            remove_hop_by_hop(&mut h);
            let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
            left.sort();
            let expected: &[&str] = if !connection.contains("HTTP2-Settings") {
                &["http2-settings", "x-kept"]
            } else {
                &["x-kept"]
            };
            assert_eq!(left, expected, "{connection} / {upgrade}");
        }
    }

    #[test]
    fn upgrades_are_seen_in_requests() {
        let mut h = HeaderMap::new();
        h.insert("connection", "Upgrade".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        let hop = HopByHop::of(&h);
        assert!(hop.upgrade());
        assert!(!hop.drops(&header::UPGRADE));
        assert!(hop.drops(&header::CONNECTION));
        h.remove("upgrade");
        assert!(!HopByHop::of(&h).upgrade());
        assert!(is_hop_by_hop_in(&header::UPGRADE, false));
        assert!(!is_hop_by_hop_in(&header::UPGRADE, true));
    }

    #[test]
    fn ips_format_as_std_does() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.2.3.100",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut buf = [0u8; 64];
            assert_eq!(format_ip(ip, &mut buf), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn connection_keep_alive_names_nothing_else() {
        let mut h = HeaderMap::new();
        h.insert("connection", "Keep-Alive".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "127.0.0.2".parse().unwrap());
        assert_eq!(h[X_FORWARDED_FOR], "127.0.0.2");
        append_forwarded_for(&mut h, "::1".parse().unwrap());
        assert_eq!(h[X_FORWARDED_FOR], "127.0.0.2, ::1");
        h.append(X_FORWARDED_FOR, "10.0.0.1".parse().unwrap());
        append_forwarded_for(&mut h, "127.0.0.3".parse().unwrap());
        assert_eq!(h[X_FORWARDED_FOR], "127.0.0.2, ::1, 10.0.0.1, 127.0.0.3");
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
    }
}
