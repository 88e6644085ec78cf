//! Backend selection policies.
//!
//! A [`Policy`] decides which backend of the current set takes a request. The balancer calls
//! it in two places:
//!
//! - [`Policy::build`] runs off the request path, whenever the backend set, a weight or a
//!   health state changes. It derives whatever table the policy needs (a weighted sequence,
//!   a hash ring) from the [`Endpoint`]s. It gets the previous table, so that a policy can
//!   keep an expensive structure when only health changed.
//! - [`Policy::pick`] runs once per request, against an immutable snapshot: no lock is
//!   taken. It returns the index of a healthy endpoint, or `None` when no endpoint can take
//!   the request, which the balancer turns into an immediate
//!   [`NoHealthyBackend`](crate::balance::error::NoHealthyBackend) error.
//!
//! The built-in policies, one file each:
//!
//! | policy | picks | state per pick |
//! | --- | --- | --- |
//! | [`RoundRobin`] | the next entry of a smooth weighted round-robin sequence | one atomic counter |
//! | [`LeastConnections`] | the fewest requests in flight relative to weight; ties rotate | a scan up to 64 backends; above, one atomic read (a tree updated as requests start and end) |
//! | [`Hashing`] | the owner of the request's key on a consistent hash ring | one table lookup |
//! | [`PeakEwma`] | the cheaper of two random backends: latency average × (in flight + 1) | two random draws, one clock read |
//!
//! [`Algorithm`] wraps the four so that the choice can be made (and changed) at run time,
//! for example from a configuration file.
//!
//! # Examples
//!
//! A custom policy is one type and one trait impl. This one sends everything to the first
//! healthy backend, the others being standbys:
//!
//! ```
//! use tower_lb::policy::{Endpoint, Policy};
//!
//! #[derive(Debug)]
//! struct FirstHealthy;
//!
//! impl Policy for FirstHealthy {
//!     type Table = ();
//!
//!     fn build(&self, _endpoints: &[Endpoint], _previous: Option<&()>) {}
//!
//!     fn pick(&self, _table: &(), endpoints: &[Endpoint], _key: Option<u64>) -> Option<usize> {
//!         endpoints.iter().position(Endpoint::is_healthy)
//!     }
//! }
//!
//! let backends = tower_lb::Backends::new(FirstHealthy);
//! backends.insert("primary", ());
//! backends.insert("standby", ());
//! assert_eq!(backends.pick(None), Some("primary"));
//! backends.set_healthy(&"primary", false);
//! assert_eq!(backends.pick(None), Some("standby"));
//! ```

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::stats::{BackendCounters, BackendStats};

mod algorithm;
mod hashing;
mod least_connections;
mod peak_ewma;
mod round_robin;

pub use self::algorithm::{Algorithm, AlgorithmTable, UnknownAlgorithm};
pub use self::hashing::{stable_hash, Hashing, HashingTable};
pub use self::least_connections::{LeastConnections, LeastConnectionsTable};
pub use self::peak_ewma::{PeakEwma, PeakEwmaTable};
pub use self::round_robin::{RoundRobin, RoundRobinTable};

/// Chooses a backend for each request. See the [module docs](self).
pub trait Policy: Send + Sync + 'static {
    /// What the policy derives from the backend set, rebuilt only when the set changes.
    type Table: Send + Sync + 'static;

    /// Builds the table for `endpoints`; `previous` is the table of the snapshot being
    /// replaced, if any (and if it was built by this same policy value).
    fn build(&self, endpoints: &[Endpoint], previous: Option<&Self::Table>) -> Self::Table;

    /// Picks the index of a healthy endpoint for a request whose key (for hashing) is `key`.
    ///
    /// Returns `None` only when no endpoint can take the request.
    fn pick(&self, table: &Self::Table, endpoints: &[Endpoint], key: Option<u64>) -> Option<usize>;

    /// Whether [`pick`](Policy::pick) looks at the request's key. When it does not, the
    /// balancer skips extracting it (hashing a client IP on every request for nothing).
    /// The default is `true`, which is always correct.
    fn needs_key(&self) -> bool {
        true
    }

    /// Picks a healthy endpoint other than `exclude`, for a request that `exclude` could
    /// not take (its connection failed before the request was sent).
    ///
    /// The default asks [`pick`](Policy::pick) once more and, if that lands on `exclude`
    /// again, falls back deterministically to the next healthy endpoint after it.
    fn pick_excluding(
        &self,
        table: &Self::Table,
        endpoints: &[Endpoint],
        key: Option<u64>,
        exclude: usize,
    ) -> Option<usize> {
        match self.pick(table, endpoints, key) {
            Some(i) if i != exclude => Some(i),
            _ => {
                let n = endpoints.len();
                (1..n)
                    .map(|d| (exclude + d) % n)
                    .find(|&i| endpoints[i].is_healthy())
            }
        }
    }
}

/// What a policy sees of one backend.
///
/// `weight`, slow start's part of it, health and identity are fixed for the life of one
/// snapshot; the in-flight count is live, shared by every snapshot the backend appears in.
#[derive(Clone)]
pub struct Endpoint {
    id: u64,
    weight: u32,
    healthy: bool,
    /// Ejected by passive health (see [`crate::balance::outlier`]).
    ejected: bool,
    load: Arc<Load>,
    /// Twentieths of the weight in force: below `RAMP_STEPS` while slow-starting.
    ramp: u8,
}

/// Slow start ramps a weight in this many steps, from `RAMP_MIN` of them (a tenth).
pub(crate) const RAMP_STEPS: u8 = 20;
pub(crate) const RAMP_MIN: u8 = 2;

impl Endpoint {
    pub(crate) fn new(id: u64, weight: u32, healthy: bool, load: Arc<Load>) -> Self {
        Self {
            id,
            weight: weight.max(1),
            healthy,
            ejected: false,
            load,
            ramp: RAMP_STEPS,
        }
    }

    /// The same endpoint with `ramp` twentieths of its weight in force (slow start).
    pub(crate) fn ramped(mut self, ramp: u8) -> Self {
        self.ramp = ramp.clamp(RAMP_MIN, RAMP_STEPS);
        self
    }

    /// Whether the backend is slow-starting: it joined or turned healthy less than the
    /// set's [`slow_start`](crate::Backends::slow_start) ago, and the built-in policies
    /// (but hashing) give it only part of its weight.
    pub fn is_warming(&self) -> bool {
        self.ramp < RAMP_STEPS
    }

    /// While slow-starting, the part of its weight in force: from 0.1 up to 0.95, in steps
    /// of 0.05; `None` at full weight.
    pub fn warmup(&self) -> Option<f64> {
        self.is_warming()
            .then(|| f64::from(self.ramp) / f64::from(RAMP_STEPS))
    }

    /// The weight a policy uses: [`weight`](Self::weight) × 20 at full weight, less while
    /// slow-starting. Only ratios between endpoints matter.
    pub(crate) fn ramped_weight(&self) -> u64 {
        u64::from(self.weight) * u64::from(self.ramp)
    }

    /// A stable identity: the [`stable_hash`] of the backend's key. The same key has the same
    /// id in every process, which is what makes hashing agree across proxies.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The backend's configured weight, at least 1. While it slow-starts, the built-in
    /// policies use [`warmup`](Self::warmup) of it.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Whether the backend may take new requests: healthy by its health checks and not
    /// ejected by passive health. Policies pick only such backends.
    #[inline]
    pub fn is_healthy(&self) -> bool {
        self.healthy && !self.ejected
    }

    /// The active health state alone, as health checks (or
    /// [`Backends::set_healthy`](crate::Backends::set_healthy)) set it, ejected or not.
    pub fn passes_health_checks(&self) -> bool {
        self.healthy
    }

    /// Whether passive health has ejected the backend for a while
    /// (see [`crate::balance::outlier`]).
    pub fn is_ejected(&self) -> bool {
        self.ejected
    }

    pub(crate) fn set_ejected(&mut self, ejected: bool) {
        self.ejected = ejected;
    }

    /// Requests picked for this backend that have not finished yet.
    pub fn in_flight(&self) -> usize {
        self.load.get()
    }

    /// The backend's counters: responses by status class, failures, latency. Like the
    /// in-flight count, they are live and shared by every snapshot.
    pub fn stats(&self) -> BackendCounters {
        self.load.stats.snapshot()
    }

    pub(crate) fn load(&self) -> &Arc<Load> {
        &self.load
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &format_args!("{:#018x}", self.id))
            .field("weight", &self.weight)
            .field("healthy", &self.healthy)
            .field("ejected", &self.ejected)
            .field("warmup", &self.warmup())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// The in-flight counter of one backend, and its counters (see [`crate::stats`]).
///
/// A policy whose table follows the requests themselves (least connections keeps its
/// backends ordered by load; peak EWMA learns latencies) registers a [`Watch`] here with
/// [`Load::watch`]. Only such a table pays for it: without one, a request's start and end
/// cost one more relaxed load of `watched`, in the cache line they already write.
#[derive(Default)]
pub(crate) struct Load {
    pub(crate) in_flight: AtomicUsize,
    /// 1 while `hook` is set (0 or 1; briefly 2 while one table replaces another).
    watched: AtomicUsize,
    hook: ArcSwapOption<Hook>,
    pub(crate) stats: BackendStats,
    pub(crate) outlier: crate::balance::outlier::Tracker,
}

/// The table watching a [`Load`], and the backend's slot in it.
pub(crate) struct Hook {
    watch: Arc<dyn Watch>,
    slot: usize,
}

/// What a table that follows requests is told, for the backend in `slot`.
pub(crate) trait Watch: Send + Sync + 'static {
    /// The backend's in-flight count changed; `in_flight` is the live counter (read it
    /// under whatever lock orders the updates, so that the last reader sees the last value).
    fn in_flight_changed(&self, _slot: usize, _in_flight: &AtomicUsize) {}

    /// A request on the backend ended after `elapsed` (after `in_flight_changed`).
    fn request_ended(&self, _slot: usize, _elapsed: std::time::Duration) {}
}

impl Load {
    pub(crate) fn get(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    // SeqCst on the count and on `watched` (free on x86, where both are what Relaxed
    // compiles to) pairs with `watch`: either a table's build reads the new count, or
    // this change sees the table's hook.
    pub(crate) fn incr(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.watched.load(Ordering::SeqCst) != 0 {
            if let Some(hook) = &*self.hook.load() {
                hook.watch.in_flight_changed(hook.slot, &self.in_flight);
            }
        }
    }

    /// A request ended after `elapsed`.
    pub(crate) fn decr(&self, elapsed: std::time::Duration) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.watched.load(Ordering::SeqCst) != 0 {
            if let Some(hook) = &*self.hook.load() {
                hook.watch.in_flight_changed(hook.slot, &self.in_flight);
                hook.watch.request_ended(hook.slot, elapsed);
            }
        }
    }

    /// Sends this backend's changes to `watch`, as its `slot`, instead of to the table
    /// watching it so far. Register before reading the count for the table's first state.
    pub(crate) fn watch(&self, watch: Arc<dyn Watch>, slot: usize) {
        let previous = self.hook.swap(Some(Arc::new(Hook { watch, slot })));
        if previous.is_none() {
            self.watched.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Stops sending changes to `watch`, unless another table has replaced it already.
    pub(crate) fn unwatch(&self, watch: &Arc<dyn Watch>) {
        let current = self.hook.load_full();
        let ours = match &current {
            Some(hook) => std::ptr::addr_eq(Arc::as_ptr(&hook.watch), Arc::as_ptr(watch)),
            None => false,
        };
        if ours {
            let previous = self.hook.compare_and_swap(&current, None);
            let swapped = match (&*previous, &current) {
                (Some(p), Some(c)) => Arc::ptr_eq(p, c),
                _ => false,
            };
            if swapped {
                self.watched.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl fmt::Debug for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Load")
            .field("in_flight", &self.get())
            .field("watched", &(self.watched.load(Ordering::Relaxed) != 0))
            .field("stats", &self.stats)
            .finish()
    }
}

/// Indices of the healthy endpoints, the starting point of most tables.
pub(crate) fn healthy_indices(endpoints: &[Endpoint]) -> Vec<u32> {
    endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| e.is_healthy())
        .map(|(i, _)| i as u32)
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Endpoints with the given weights, all healthy, ids 0, 1, 2, ...
    pub(crate) fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Endpoint::new(stable_hash(&i), w, true, Arc::default()))
            .collect()
    }

    pub(crate) fn set_health(endpoints: &mut [Endpoint], i: usize, healthy: bool) {
        endpoints[i].healthy = healthy;
    }
}
