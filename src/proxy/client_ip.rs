//! The client's address, and hashing keys taken from it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use http::Request;

use super::headers::X_FORWARDED_FOR;
use crate::balance::RequestKey;
use crate::policy::stable_hash;

/// The peer address of the connection a request came on: a request extension.
///
/// [`serve`](super::serve) sets it on every request. In an axum app, enable this crate's
/// `axum` feature and serve with `into_make_service_with_connect_info::<SocketAddr>()`:
/// axum's `ConnectInfo<SocketAddr>` is read as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// The peer IP of the connection `request` came on, from [`ClientAddr`] (or axum's
/// `ConnectInfo<SocketAddr>` with the `axum` feature).
pub fn peer_ip<B>(request: &Request<B>) -> Option<IpAddr> {
    if let Some(ClientAddr(addr)) = request.extensions().get() {
        return Some(addr.ip());
    }
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(addr)) = request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(addr.ip());
    }
    None
}

/// A network, `10.0.0.0/8` or a single address, that is trusted to set `X-Forwarded-For`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedProxy {
    network: IpAddr,
    prefix: u8,
}

impl TrustedProxy {
    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(ip)) => prefix_eq(
                u128::from(u32::from(n)) << 96,
                u128::from(u32::from(ip)) << 96,
                self.prefix,
            ),
            (IpAddr::V6(n), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(n), u128::from(ip), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8) -> bool {
    prefix == 0 || (a ^ b) >> (128 - u32::from(prefix)) == 0
}

/// The error of parsing a [`TrustedProxy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTrustedProxy(String);

impl fmt::Display for InvalidTrustedProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not an IP address or a CIDR network", self.0)
    }
}

impl std::error::Error for InvalidTrustedProxy {}

impl FromStr for TrustedProxy {
    type Err = InvalidTrustedProxy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidTrustedProxy(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let network: IpAddr = addr.trim().parse().map_err(|_| err())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(err)?,
            None => max,
        };
        Ok(TrustedProxy { network, prefix })
    }
}

/// The hashing key of an HTTP request: its client's IP address (not its port).
///
/// By default the IP is the connection's peer, so a client cannot choose its backend by
/// sending `X-Forwarded-For`. With trusted proxies, a request whose peer is one of them is
/// keyed by the right-most `X-Forwarded-For` entry that is not a trusted proxy (the address
/// that the nearest untrusted hop connected from).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIpKey {
    trusted: Arc<[TrustedProxy]>,
}

impl ClientIpKey {
    /// Keys by the connection's peer IP only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also trusts `X-Forwarded-For` from these proxies.
    pub fn trusting(proxies: impl IntoIterator<Item = TrustedProxy>) -> Self {
        ClientIpKey {
            trusted: proxies.into_iter().collect(),
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|t| t.contains(ip))
    }

    /// The client IP of `request` under this key's trust settings.
    pub fn client_ip<B>(&self, request: &Request<B>) -> Option<IpAddr> {
        let peer = peer_ip(request)?;
        if self.trusted.is_empty() || !self.is_trusted(peer) {
            return Some(peer);
        }
        let mut client = peer;
        let hops = request
            .headers()
            .get_all(X_FORWARDED_FOR)
            .iter()
            .rev()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.rsplit(','));
        for hop in hops {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !self.is_trusted(ip) {
                        break;
                    }
                }
                // Garbage in the chain: stop at the last address we could vouch for.
                Err(_) => break,
            }
        }
        Some(client)
    }
}

impl<B> RequestKey<Request<B>> for ClientIpKey {
    #[inline]
    fn key(&self, request: &Request<B>) -> Option<u64> {
        match self.client_ip(request) {
            Some(ip) => Some(stable_hash(&ip)),
            None => {
                no_peer_address();
                None
            }
        }
    }
}

/// Says once per process that requests come without their peer's address: hashing by
/// client IP then falls back to rotation, which an embedder would not otherwise notice.
#[cold]
fn no_peer_address() {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "a request carries no client address (`ClientAddr`, or axum's `ConnectInfo<SocketAddr>`): \
             hashing by client IP takes turns instead; serve with \
             `into_make_service_with_connect_info::<SocketAddr>()` or insert a `ClientAddr`"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(peer: &str, xff: &[&str]) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(ClientAddr(format!("{peer}:4000").parse().unwrap()));
        for v in xff {
            req.headers_mut()
                .append(X_FORWARDED_FOR, v.parse().unwrap());
        }
        req
    }

    #[test]
    fn peer_ip_by_default_even_with_forwarded_for() {
        let key = ClientIpKey::new();
        let req = request("127.0.0.2", &["1.2.3.4"]);
        assert_eq!(key.client_ip(&req), Some("127.0.0.2".parse().unwrap()));
        // The port does not matter.
        let mut other_port = request("127.0.0.2", &[]);
        other_port
            .extensions_mut()
            .insert(ClientAddr("127.0.0.2:5000".parse().unwrap()));
        assert_eq!(key.key(&req), key.key(&other_port));
    }

    #[test]
    fn forwarded_for_from_trusted_proxies() {
        let key =
            ClientIpKey::trusting(["127.0.0.0/8".parse().unwrap(), "10.0.0.1".parse().unwrap()]);
        let req = request("127.0.0.9", &["203.0.113.7, 10.0.0.1"]);
        assert_eq!(key.client_ip(&req), Some("203.0.113.7".parse().unwrap()));
        // Untrusted peer: its header is ignored.
        let req = request("192.0.2.1", &["203.0.113.7"]);
        assert_eq!(key.client_ip(&req), Some("192.0.2.1".parse().unwrap()));
        // The right-most untrusted entry wins: a client cannot prepend its choice.
        let req = request("127.0.0.9", &["6.6.6.6", "203.0.113.7"]);
        assert_eq!(key.client_ip(&req), Some("203.0.113.7".parse().unwrap()));
    }

    #[test]
    fn trusted_proxy_parsing() {
        let net: TrustedProxy = "192.168.0.0/16".parse().unwrap();
        assert!(net.contains("192.168.4.5".parse().unwrap()));
        assert!(!net.contains("192.169.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let v6: TrustedProxy = "::1".parse().unwrap();
        assert!(v6.contains("::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<TrustedProxy>().is_err());
        assert!("nonsense".parse::<TrustedProxy>().is_err());
        let all: TrustedProxy = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
    }
}
