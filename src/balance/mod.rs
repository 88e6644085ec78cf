//! Load balancing over a changing set of backend services.
//!
//! [`Balance`] is a [`Service`](tower_service::Service) that sends each request to one
//! backend of a [`Backends`] set, chosen by a [`Policy`](crate::policy::Policy). It differs
//! from `tower::balance::p2c::Balance` in three ways that matter for servers:
//!
//! - **It is shared.** `Balance` is cheap to clone and every clone sees the same set,
//!   policy and counters, so hyper or axum can hand one to every connection; no `Buffer`
//!   (and no task hop per request) is needed in front.
//! - **Picking takes no lock.** The set is an immutable [`Snapshot`] behind an `ArcSwap`,
//!   replaced whole when discovery, a health check or a reload changes it; counters are
//!   atomics.
//! - **It fails fast.** When no backend can take a request, the call fails at once with
//!   [`error::NoHealthyBackend`] instead of staying pending.
//!
//! The set follows a [`tower::discover::Discover`] stream ([`Backends::discover`]), a static
//! list ([`Backends::from_services`], [`BalanceLayer`]) or explicit calls
//! ([`Backends::update`]). Health is a per-backend flag that health checks set
//! ([`Backends::set_healthy`]); only healthy backends are picked. Passive health
//! ([`outlier`], [`Backends::passive_health`]) ejects backends that fail requests in a row
//! for a while, apart from that flag.
//!
//! # Examples
//!
//! ```
//! use tower::{service_fn, ServiceExt};
//! use tower_lb::{policy::LeastConnections, Backends, Balance};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_lb::BoxError> {
//! let backend = |name: &'static str| {
//!     service_fn(move |req: u32| async move { Ok::<_, tower_lb::BoxError>(format!("{name}: {req}")) })
//! };
//! let backends = Backends::from_services(
//!     LeastConnections::new(),
//!     [("a", backend("a")), ("b", backend("b"))],
//! );
//! let lb = Balance::new(backends.clone());
//!
//! // Every clone shares the set; no Buffer needed.
//! let answer = lb.clone().oneshot(1).await?;
//! assert_eq!(answer, "a: 1");
//!
//! // The set changes at run time; requests see the new set at once.
//! backends.set_healthy(&"a", false);
//! assert_eq!(lb.clone().oneshot(2).await?, "b: 2");
//! backends.set_healthy(&"b", false);
//! let err = lb.oneshot(3).await.unwrap_err();
//! assert!(err.is::<tower_lb::balance::error::NoHealthyBackend>());
//! # Ok(()) }
//! ```

mod backends;
pub mod error;
pub mod future;
mod key;
mod layer;
pub mod outlier;
mod retry;
mod service;

pub(crate) use self::backends::WeakBackends;
pub use self::backends::{Backends, Drain, InFlight, Snapshot, Update};
pub use self::key::{NoKey, RequestKey};
pub use self::layer::{BalanceLayer, MakeBackend};
pub use self::outlier::PassiveHealth;
pub use self::retry::Retries;
pub use self::service::Balance;
