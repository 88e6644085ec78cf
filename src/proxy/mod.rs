//! HTTP load balancing: the pieces of a reverse proxy.
//!
//! - [`Client`] is the transport: HTTP/1.1 over pooled keep-alive connections, driven in
//!   the task of the request that uses them (see [`Backend`]). As a
//!   [`MakeBackend`] it makes one [`Backend`] service per
//!   backend address, which rewrites requests for that backend (URI, hop-by-hop headers,
//!   `X-Forwarded-For`) and connects in `poll_ready`, so that a refused connection is
//!   retried on another backend by the balancer.
//! - [`TrackBody`] keeps a request in flight until its response body ends.
//! - [`ClientIpKey`] keys hashing by the client IP ([`ClientAddr`], or axum's
//!   `ConnectInfo` with the `axum` feature), trusting `X-Forwarded-For` only from
//!   configured proxies.
//! - [`ErrorResponses`] answers failures with `502`, `503` and `504`.
//! - [`Server`] / [`serve`] serve HTTP/1.1 with safe defaults and graceful shutdown.
//!
//! [`HttpBalance`] and [`balancer`] put them together.
//!
//! # Examples
//!
//! ```no_run
//! use tower_lb::proxy::{self, Client};
//! use tower_lb::policy::RoundRobin;
//!
//! # #[tokio::main] async fn main() -> std::io::Result<()> {
//! let backends = proxy::backends(RoundRobin::new(), &Client::new(), [
//!     "127.0.0.1:9001".parse().unwrap(),
//!     "127.0.0.1:9002".parse().unwrap(),
//! ]);
//! let service = proxy::balancer(backends.clone(), proxy::ClientIpKey::new());
//! let listener = proxy::bind("127.0.0.1:8080".parse().unwrap())?;
//! proxy::serve(listener, service, std::future::pending()).await
//! # }
//! ```

mod backend;
mod body;
mod client_ip;
pub mod error;
mod framing;
#[cfg(feature = "http2")]
mod h2;
mod headers;
mod respond;
mod server;
mod upstream;

/// The futures the services of this module return.
pub mod future {
    pub use super::backend::ResponseFuture as BackendFuture;
    pub use super::respond::ResponseFuture as ErrorResponsesFuture;
}

use http::uri::Authority;
use hyper::body::Incoming;

pub use self::backend::{Backend, Client};
pub use self::body::{TrackBody, TrackedBody};
pub use self::client_ip::{peer_ip, ClientAddr, ClientIpKey, InvalidTrustedProxy, TrustedProxy};
#[cfg(feature = "http2")]
#[cfg_attr(docsrs, doc(cfg(feature = "http2")))]
pub use self::h2::{Http2Backend, Http2Client, Http2ResponseFuture};
pub use self::headers::{append_forwarded_for, remove_hop_by_hop, X_FORWARDED_FOR};
pub use self::respond::{error_response, ErrorResponses, ErrorResponsesLayer, ProxyBody};
pub use self::server::{bind, serve, Server};
pub use self::upstream::UpstreamBody;

/// Re-exported for naming backend addresses.
pub use ::http::uri;

use crate::balance::MakeBackend;
use crate::policy::Policy;
use crate::{Backends, Balance};

/// The host and port to connect to for `authority`: IPv6 hosts without their brackets,
/// port 80 when none is given.
///
/// ```
/// let a: http::uri::Authority = "[::1]:9001".parse().unwrap();
/// assert_eq!(tower_lb::proxy::socket_target(&a), ("::1", 9001));
/// ```
pub fn socket_target(authority: &Authority) -> (&str, u16) {
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (host, authority.port_u16().unwrap_or(80))
}

/// The backend set of an HTTP balancer: backends by address.
pub type HttpBackends<P, B = Incoming> = Backends<Authority, Backend<B>, P>;

/// A complete HTTP balancer: errors answered, hashing by client IP, requests in flight
/// until their response body ends.
pub type HttpBalance<P, B = Incoming> =
    ErrorResponses<Balance<Authority, Backend<B>, P, ClientIpKey, TrackBody>>;

/// A set of HTTP backends at `addresses`, with weight 1 each, all healthy.
pub fn backends<P: Policy, B>(
    policy: P,
    client: &Client<B>,
    addresses: impl IntoIterator<Item = Authority>,
) -> HttpBackends<P, B> {
    let set = Backends::new(policy);
    set.update(|u| {
        for address in addresses {
            let backend = client.make_backend(&address);
            u.insert(address, backend);
        }
    });
    set
}

/// The HTTP balancer over `backends`: see [`HttpBalance`].
pub fn balancer<P: Policy, B>(backends: HttpBackends<P, B>, key: ClientIpKey) -> HttpBalance<P, B> {
    ErrorResponses::new(
        Balance::new(backends)
            .with_key(key)
            .with_completion(TrackBody),
    )
}
