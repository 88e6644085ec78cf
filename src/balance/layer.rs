use std::fmt;
use std::hash::Hash;

use tower::load::completion::CompleteOnResponse;
use tower_layer::Layer;

use super::{Backends, Balance, NoKey, Retries};
use crate::policy::Policy;

/// Aims a transport at one backend: the per-backend service of a [`BalanceLayer`].
///
/// For HTTP, [`proxy::Client`](crate::proxy::Client) makes a
/// [`proxy::Backend`](crate::proxy::Backend) that rewrites each request's URI to the
/// backend's address. Closures `Fn(&K) -> S` implement it too.
pub trait MakeBackend<K> {
    /// The service for one backend.
    type Service;

    /// The service that sends requests to `key`.
    fn make_backend(&self, key: &K) -> Self::Service;
}

impl<K, F, S> MakeBackend<K> for F
where
    F: Fn(&K) -> S,
{
    type Service = S;

    fn make_backend(&self, key: &K) -> S {
        self(key)
    }
}

/// Builds a [`Balance`] over a transport, for [`tower::ServiceBuilder`].
///
/// The inner service given to [`Layer::layer`] is the transport; the layer aims one copy of
/// it at each configured backend with [`MakeBackend`]. The set can then change at run time
/// through [`Balance::get_ref`].
///
/// ```
/// use std::convert::Infallible;
/// use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
/// use tower_lb::{policy::RoundRobin, BalanceLayer};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // A "transport" that says which backend it was aimed at.
/// let transport = |backend: &&'static str| {
///     let backend = *backend;
///     service_fn(move |_req: ()| async move { Ok::<_, Infallible>(backend) })
/// };
/// let mut lb = ServiceBuilder::new()
///     .layer(BalanceLayer::new(RoundRobin::new(), ["a", "b"]))
///     .service(transport);
/// assert_eq!(lb.ready().await.unwrap().call(()).await.unwrap(), "a");
/// assert_eq!(lb.ready().await.unwrap().call(()).await.unwrap(), "b");
/// # }
/// ```
pub struct BalanceLayer<K, P, E = NoKey, C = CompleteOnResponse> {
    backends: Vec<(K, u32)>,
    policy: P,
    key: E,
    completion: C,
    retries: Retries,
}

impl<K, P> BalanceLayer<K, P> {
    /// A layer balancing over `backends` (weight 1 each) with `policy`.
    pub fn new(policy: P, backends: impl IntoIterator<Item = K>) -> Self {
        Self::weighted(policy, backends.into_iter().map(|k| (k, 1)))
    }

    /// A layer balancing over weighted backends.
    pub fn weighted(policy: P, backends: impl IntoIterator<Item = (K, u32)>) -> Self {
        BalanceLayer {
            backends: backends.into_iter().collect(),
            policy,
            key: NoKey,
            completion: CompleteOnResponse::default(),
            retries: Retries::default(),
        }
    }
}

impl<K, P, E, C> BalanceLayer<K, P, E, C> {
    /// See [`Balance::with_key`].
    pub fn with_key<E2>(self, key: E2) -> BalanceLayer<K, P, E2, C> {
        BalanceLayer {
            backends: self.backends,
            policy: self.policy,
            key,
            completion: self.completion,
            retries: self.retries,
        }
    }

    /// See [`Balance::with_completion`].
    pub fn with_completion<C2>(self, completion: C2) -> BalanceLayer<K, P, E, C2> {
        BalanceLayer {
            backends: self.backends,
            policy: self.policy,
            key: self.key,
            completion,
            retries: self.retries,
        }
    }

    /// See [`Balance::with_retries`]. The balancers this layer makes share `retries` (and
    /// so one budget).
    pub fn with_retries(mut self, retries: Retries) -> Self {
        self.retries = retries;
        self
    }
}

impl<K, P, E, C, T> Layer<T> for BalanceLayer<K, P, E, C>
where
    K: Hash + Eq + Clone,
    P: Policy + Clone,
    E: Clone,
    C: Clone,
    T: MakeBackend<K>,
    T::Service: Clone,
{
    type Service = Balance<K, T::Service, P, E, C>;

    fn layer(&self, transport: T) -> Self::Service {
        let backends = Backends::new(self.policy.clone());
        backends.update(|set| {
            for (key, weight) in &self.backends {
                set.insert_with(key.clone(), transport.make_backend(key), *weight, true);
            }
        });
        Balance::new(backends)
            .with_key(self.key.clone())
            .with_completion(self.completion.clone())
            .with_retries(self.retries.clone())
    }
}

impl<K: Clone, P: Clone, E: Clone, C: Clone> Clone for BalanceLayer<K, P, E, C> {
    fn clone(&self) -> Self {
        BalanceLayer {
            backends: self.backends.clone(),
            policy: self.policy.clone(),
            key: self.key.clone(),
            completion: self.completion.clone(),
            retries: self.retries.clone(),
        }
    }
}

impl<K: fmt::Debug, P: fmt::Debug, E: fmt::Debug, C> fmt::Debug for BalanceLayer<K, P, E, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceLayer")
            .field("backends", &self.backends)
            .field("policy", &self.policy)
            .field("key", &self.key)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}
