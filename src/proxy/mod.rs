//! HTTP load balancing: the pieces of a reverse proxy, and [`Builder`], which puts them
//! together.
//!
//! - [`Builder`] makes a complete, health-checked [`HttpBalance`] in one expression, for
//!   an axum or hyper app or a `tower::ServiceBuilder` stack.
//! - [`Client`] is the transport: HTTP/1.1 over pooled keep-alive connections, driven in
//!   the task of the request that uses them (see [`Backend`]). As a
//!   [`MakeBackend`] it makes one [`Backend`] service per
//!   backend address, which rewrites requests for that backend (URI, hop-by-hop headers,
//!   `X-Forwarded-For`) and connects in `poll_ready`, so that a refused connection is
//!   retried on another backend by the balancer. A backend takes requests with any body
//!   type.
//! - [`TrackBody`] keeps a request in flight until its response body ends.
//! - [`ClientIpKey`] keys hashing by the client IP ([`ClientAddr`], or axum's
//!   `ConnectInfo` with the `axum` feature), trusting `X-Forwarded-For` only from
//!   configured proxies; [`HeaderKey`], [`CookieKey`] and [`PathKey`] key it by a header,
//!   a cookie or the path (the first two falling back to the client IP), and [`HashKey`]
//!   chooses one at run time.
//! - [`ErrorResponses`] answers failures with `502`, `503` and `504` (gRPC requests the
//!   gRPC way: `grpc-status` 14 or 4).
//! - [`Server`] / [`serve`] serve HTTP/1.1 and, with the `http2` feature, HTTP/2 over
//!   cleartext (prior knowledge) on the same port, with safe defaults and graceful shutdown.
//! - With the `http2` feature, [`Http2Client`] is the transport to HTTP/2 backends (h2c, as
//!   gRPC servers expect), and [`AnyBackend`] holds a backend of either protocol, for a set
//!   that mixes them.
//! - Upgrades (WebSocket) pass through: a `101` from the backend turns both connections
//!   into a tunnel that counts in flight until it closes (see [`Backend`]); [`Server`]'s
//!   shutdown waits for tunnels too, up to its shutdown timeout.
//!
//! [`backends`] and [`balancer`] are the steps of [`Builder::build`] without health checks;
//! [`HealthCheck::attach`](crate::health::HealthCheck::attach) adds them.
//!
//! # Examples
//!
//! A proxy in its own right: every backend health-checked (`GET /health` every 10 s,
//! spawned on this runtime), hashing by client IP.
//!
//! ```no_run
//! use tower_lb::policy::Hashing;
//! use tower_lb::proxy;
//!
//! # #[tokio::main] async fn main() -> Result<(), tower_lb::BoxError> {
//! let addrs = ["127.0.0.1:9001".parse()?, "127.0.0.1:9002".parse()?];
//! let service = proxy::Builder::new().policy(Hashing::new()).build(addrs)?;
//! let listener = proxy::bind("127.0.0.1:8080".parse()?)?;
//! proxy::serve(listener, service, std::future::pending()).await?;
//! # Ok(()) }
//! ```

mod access;
#[cfg(feature = "http2")]
mod any;
mod backend;
mod body;
mod builder;
mod client_ip;
pub mod error;
mod h1;
#[cfg(feature = "http2")]
mod h2;
mod hash_key;
mod headers;
#[cfg(feature = "http2")]
mod idle;
mod replay;
mod respond;
mod server;
mod shutdown;
mod upgrade;

/// The futures the services of this module return.
pub mod future {
    #[cfg(feature = "http2")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http2")))]
    pub use super::any::AnyResponseFuture as AnyBackendFuture;
    pub use super::backend::ResponseFuture as BackendFuture;
    #[cfg(feature = "http2")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http2")))]
    pub use super::h2::Http2ResponseFuture as Http2BackendFuture;
    pub use super::respond::ResponseFuture as ErrorResponsesFuture;
}

use http::uri::Authority;

#[cfg(feature = "http2")]
#[cfg_attr(docsrs, doc(cfg(feature = "http2")))]
pub use self::any::{AnyBackend, AnyBody, BackendProtocol};
pub use self::backend::{Backend, Client};
pub use self::body::{TrackBody, TrackedBody};
pub use self::builder::{BuildError, Builder};
pub use self::client_ip::{peer_ip, ClientAddr, ClientIpKey, InvalidTrustedProxy, TrustedProxy};
/// The HTTP/1 codec's parsers and checks, for the fuzz targets and differential tests:
/// not part of the API.
#[doc(hidden)]
pub use self::h1::fuzz as __fuzz;
pub use self::h1::{RequestBody, UpstreamBody};
#[cfg(feature = "http2")]
#[cfg_attr(docsrs, doc(cfg(feature = "http2")))]
pub use self::h2::{Http2Backend, Http2Body, Http2Client, StreamPlace};
pub use self::hash_key::{CookieKey, HashKey, HeaderKey, InvalidHashKey, PathKey};
pub use self::headers::{append_forwarded_for, remove_hop_by_hop, X_FORWARDED_FOR};
pub use self::replay::ReplayBody;
#[cfg(feature = "grpc")]
pub use self::respond::grpc_status;
pub use self::respond::{
    error_response, grpc_error_response, ErrorResponses, ErrorResponsesLayer, ProxyBody,
};
pub use self::server::{bind, serve, Server};

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
pub type HttpBackends<P> = Backends<Authority, Backend, P>;

/// A complete HTTP balancer: errors answered, hashing by `E` (the client IP by default),
/// requests in flight until their response body ends. It serves requests with any body
/// type a [`Backend`] takes.
pub type HttpBalance<P, E = ClientIpKey> =
    ErrorResponses<Balance<Authority, Backend, P, E, TrackBody>>;

/// A set of HTTP backends at `addresses`, with weight 1 each, all healthy: no health
/// checks. [`Builder`] makes a health-checked one.
pub fn backends<P: Policy>(
    policy: P,
    client: &Client,
    addresses: impl IntoIterator<Item = Authority>,
) -> HttpBackends<P> {
    let set = Backends::new(policy);
    set.label_metrics(Authority::to_string);
    set.update(|u| {
        for address in addresses {
            let backend = client.make_backend(&address);
            u.insert(address, backend);
        }
    });
    set
}

/// The HTTP balancer over `backends`: see [`HttpBalance`].
pub fn balancer<P: Policy, E>(backends: HttpBackends<P>, key: E) -> HttpBalance<P, E> {
    ErrorResponses::new(
        Balance::new(backends)
            .with_key(key)
            .with_completion(TrackBody),
    )
}
