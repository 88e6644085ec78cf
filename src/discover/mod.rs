//! Service discovery: backend sets that follow the outside world.
//!
//! [`Dns`] resolves a host name (A and AAAA) at start and every refresh, and yields a
//! [`Change`](tower::discover::Change) for every address that appears or disappears: it is
//! a [`tower::discover::Discover`], which [`Backends::discover`](crate::Backends::discover)
//! follows. Names are resolved through the [`Resolve`] trait: [`GaiResolver`] asks the
//! system (`getaddrinfo`, on tokio's blocking pool), and tests or other resolvers plug in
//! by implementing it (closures do).
//!
//! # Examples
//!
//! ```
//! use std::net::{IpAddr, SocketAddr};
//! use std::time::Duration;
//! use tower_lb::discover::Dns;
//! use tower_lb::{policy::RoundRobin, Backends};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // A resolver with a fixed answer; `GaiResolver` asks the system instead.
//! let resolver = |_: &str| async {
//!     Ok::<_, std::io::Error>(vec![IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2])])
//! };
//! // Each address becomes a backend on port 8080; here the "service" is its address.
//! let dns = Dns::new("api.internal", 8080, resolver, |addr: &SocketAddr| *addr)
//!     .refresh(Duration::from_secs(30));
//! let backends = Backends::new(RoundRobin::new());
//! backends.healthy_on_insert(false); // with health checks: no traffic before a probe passes
//! tokio::spawn(backends.discover(dns));
//! backends.wait_until(|set| set.len() == 2).await;
//! # }
//! ```
//!
//! An HTTP set is keyed by `Authority`, and the proxy's `Client` makes its backends:
//!
//! ```no_run
//! use tower_lb::discover::{Dns, GaiResolver};
//! use tower_lb::policy::RoundRobin;
//! use tower_lb::proxy::{Client, HttpBackends};
//! use tower_lb::Backends;
//!
//! # #[tokio::main] async fn main() {
//! let backends: HttpBackends<RoundRobin> = Backends::new(RoundRobin::new());
//! let dns = Dns::new("api.internal", 8080, GaiResolver, Client::new());
//! tokio::spawn(backends.discover(dns));
//! # }
//! ```

mod dns;

pub use self::dns::{Dns, FromSocketAddr, GaiResolver, Resolve};
