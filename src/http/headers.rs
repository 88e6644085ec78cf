//! Header rewriting for a forwarded message: hop-by-hop removal and `X-Forwarded-For`.

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

/// Whether the field `name` (in any case) is hop-by-hop by itself.
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    // Different lengths compare unequal at once: most names cost one length check each.
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

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
    // One pass over the names; most messages carry none of these, or only
    // `Connection: keep-alive`/`close`, which name no other field.
    let mut found = false;
    let mut named = false;
    for name in headers.keys() {
        if is_hop_by_hop(name.as_str().as_bytes()) {
            found = true;
        }
        if name == header::CONNECTION {
            named = true;
        }
    }
    if !found {
        return;
    }
    if named {
        // Fields listed in Connection; a value that is not a token list is ignored.
        let mut listed: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',').map(str::trim) {
                if token.is_empty()
                    || token.eq_ignore_ascii_case("close")
                    || token.eq_ignore_ascii_case("keep-alive")
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    listed.push(name);
                }
            }
        }
        for name in listed {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Appends `client` to `X-Forwarded-For`, joining any values the message already has into
/// one comma-separated list (RFC 7239's order: the client first, each proxy appending).
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let mut buf = [0u8; 64];
    let ip = format_ip(client, &mut buf);
    match headers.entry(X_FORWARDED_FOR) {
        header::Entry::Vacant(entry) => {
            entry.insert(
                HeaderValue::from_bytes(ip).expect("an IP address is a valid header value"),
            );
        }
        header::Entry::Occupied(mut entry) => {
            let mut joined = Vec::with_capacity(64);
            for v in entry.iter() {
                joined.extend_from_slice(v.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(ip);
            // Existing values were valid header values; joined with ", " they still are.
            if let Ok(value) = HeaderValue::from_bytes(&joined) {
                entry.insert(value);
            }
        }
    }
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
