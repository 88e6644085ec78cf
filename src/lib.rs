//! A load balancer for Rust's HTTP ecosystem, as Tower middleware.
//!
//! - [`Balance`] is a [`tower::Service`] that spreads requests over a changing set of
//!   backend services ([`Backends`]), cheap to clone and share across connections, with
//!   lock-free picks and an immediate error when no backend is healthy.
//! - [`policy`] holds the selection policies: round robin (smooth weighted), least
//!   connections, consistent hashing, and the trait to write your own.
#![cfg_attr(
    feature = "http",
    doc = "- [`proxy`] forwards HTTP requests to backends with hyper, with hop-by-hop header \
           removal, `X-Forwarded-For`, client-IP keys and error responses; \
           [`proxy::Builder`] makes a health-checked balancer for an axum or hyper app in \
           one line.\n\
           - [`health`] probes backends; attached to a set, the checks follow its backends \
           and decide which take traffic."
)]
#![cfg_attr(
    feature = "dns",
    doc = "- [`discover`] follows the addresses of a DNS name as a `tower::discover::Discover`."
)]
#![cfg_attr(
    feature = "config",
    doc = "- [`config`] reads `config.json` and turns edits into changes of a running proxy."
)]
//!
//! # Examples
//!
//! ```
//! use tower::{service_fn, ServiceExt};
//! use tower_lb::{policy::RoundRobin, Backends, Balance};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_lb::BoxError> {
//! let backends = Backends::from_services(
//!     RoundRobin::new(),
//!     (1..=3).map(|n| (n, service_fn(move |()| async move { Ok::<_, tower_lb::BoxError>(n) }))),
//! );
//! let lb = Balance::new(backends);
//! let mut turns = Vec::new();
//! for _ in 0..4 {
//!     turns.push(lb.clone().oneshot(()).await?);
//! }
//! assert_eq!(turns, [1, 2, 3, 1]);
//! # Ok(()) }
//! ```
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
pub mod admin;
pub mod balance;
#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
pub mod config;
#[cfg(feature = "dns")]
#[cfg_attr(docsrs, doc(cfg(feature = "dns")))]
pub mod discover;
pub mod health;
pub mod policy;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod proxy;
#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
pub mod standalone;
pub mod stats;

pub use crate::balance::{Backends, Balance, BalanceLayer};

/// The error type at service boundaries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
