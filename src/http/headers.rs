//! Header rewriting for a forwarded message: hop-by-hop removal and `X-Forwarded-For`.

use std::io::Write as _;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The hop-by-hop fields of RFC 9110 §7.6.1 (besides those that `Connection` names).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Removes the hop-by-hop fields from `headers`: those of RFC 9110 §7.6.1 and every field
/// that a `Connection` header names.
///
/// ```
/// use http::HeaderMap;
/// let mut headers = HeaderMap::new();
/// headers.insert("connection", "close, x-secret".parse().unwrap());
/// headers.insert("x-secret", "1".parse().unwrap());
/// headers.insert("keep-alive", "timeout=5".parse().unwrap());
/// headers.insert("accept", "*/*".parse().unwrap());
/// tower_lb::http::remove_hop_by_hop(&mut headers);
/// assert_eq!(headers.len(), 1);
/// assert!(headers.contains_key("accept"));
/// ```
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Fast path: most messages carry none of these.
    if headers.contains_key(header::CONNECTION) {
        // Names listed in Connection; a value that is not a token list is ignored.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
}

/// Appends `client` to `X-Forwarded-For`, joining any values the message already has into
/// one comma-separated list (RFC 7239's order: the client first, each proxy appending).
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let mut buf = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // An IPv6 address is at most 45 bytes: this cannot fail.
    let _ = write!(cursor, "{client}");
    let len = cursor.position() as usize;
    let ip = &buf[..len];

    let value = match headers.entry(X_FORWARDED_FOR) {
        header::Entry::Vacant(entry) => {
            entry.insert(
                HeaderValue::from_bytes(ip).expect("an IP address is a valid header value"),
            );
            return;
        }
        header::Entry::Occupied(entry) => {
            let mut joined = Vec::with_capacity(64);
            for v in entry.iter() {
                joined.extend_from_slice(v.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(ip);
            drop(entry.remove_entry_mult());
            joined
        }
    };
    // Existing values were valid header values; joined with ", " they still are.
    if let Ok(value) = HeaderValue::from_bytes(&value) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(left, ["host", "x-kept"]);
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
