//! What the balancer and the proxy count: per backend, responses by status class, failures,
//! cancelled requests, latency and requests in flight; process-wide, answers the proxy made
//! itself, retries, health checks, configuration reloads and open client connections.
//!
//! # Cost on the request path
//!
//! Per-backend counters are plain atomics next to the backend's in-flight counter (the
//! `Load` that every snapshot of the backend shares), updated when a request's
//! [`InFlight`](crate::balance::InFlight) guard ends: one clock read at the pick and one at
//! the end, and three relaxed additions (status class, latency bucket, latency sum). No
//! lock, no map lookup with a label set, no allocation. [`Endpoint::stats`] reads them.
//! Measured with callgrind on the standalone proxy (release, one keep-alive client, 5,000
//! requests, two runs each), counters, facade checks and the access log's off-check
//! together cost about 490 user-space instructions per proxied request (20,130 before,
//! 20,620 after: +2.4%), of which the two clock reads are about 80; allocations per
//! request are unchanged.
//!
//! # The `metrics` facade
//!
//! The same events reach the [`metrics`] facade, so that an embedder's own exporter
//! (`metrics-exporter-prometheus`, StatsD, …) sees them under the names below. Per-backend
//! handles are registered once, when a backend joins a set that names its backends for
//! metrics ([`Backends::label_metrics`](crate::Backends::label_metrics); HTTP sets made by
//! [`proxy`](crate::proxy) do), and kept: with no recorder installed they are no-ops.
//! Rare events (a local `503`, a retry, a probe, a reload, a client connection) go through
//! the facade's macros as they happen.
//!
//! | name | type | labels |
//! | --- | --- | --- |
//! | `tower_lb_requests_total` | counter | `backend`, `class` (`1xx` … `5xx`) |
//! | `tower_lb_request_duration_seconds` | histogram | `backend` |
//! | `tower_lb_backend_in_flight` | gauge | `backend` |
//! | `tower_lb_backend_up` | gauge | `backend` |
//! | `tower_lb_backend_failures_total` | counter | `backend` |
//! | `tower_lb_requests_cancelled_total` | counter | `backend` |
//! | `tower_lb_ejections_total` | counter | `backend` |
//! | `tower_lb_local_responses_total` | counter | `status` |
//! | `tower_lb_retries_total` | counter | |
//! | `tower_lb_health_checks_total` | counter | `backend`, `result` (`pass`, `fail`) |
//! | `tower_lb_config_reloads_total` | counter | `result` (`applied`, `rejected`) |
//! | `tower_lb_client_connections` | gauge | |
//!
//! The standalone proxy installs no recorder: its admin listener renders Prometheus text from
//! the atomics directly (see `tower_lb::admin`), which costs the request path nothing more.
//!
//! Process-wide counters ([`global`]) add up every balancer and server of the process.
//!
//! # Examples
//!
//! ```
//! use tower_lb::{policy::RoundRobin, Backends};
//!
//! let backends = Backends::new(RoundRobin::new());
//! backends.insert("a", ());
//! let snapshot = backends.snapshot();
//! let (_, endpoint) = snapshot.iter().next().unwrap();
//! assert_eq!(endpoint.stats().requests(), 0);
//! assert_eq!(tower_lb::stats::LATENCY_BUCKETS.len(), 13);
//! ```
//!
//! [`Endpoint::stats`]: crate::policy::Endpoint::stats

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

/// Upper bounds, in seconds, of the latency histogram's buckets (then `+Inf`).
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The same bounds in microseconds, for the request path's integer comparison.
const BUCKET_MICROS: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// How a request on a backend ended, as its guard records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// No answer yet: dropped now, the request was cancelled (its client went away, the
    /// caller stopped waiting, or a shutdown cut it). Counted as cancelled, not as a
    /// response or a failure.
    Pending,
    /// The backend answered, with no status to count (a service that is not HTTP, or a
    /// completion that did not record one). Counted nowhere.
    Answered,
    /// The backend failed it: no connection, reset or closed before a response, timeout.
    Failed,
    /// A response with this status.
    Status(u16),
}

/// The live counters of one backend.
#[derive(Default)]
pub(crate) struct BackendStats {
    responses: [AtomicU64; 5],
    errors: AtomicU64,
    cancelled: AtomicU64,
    buckets: [AtomicU64; 14],
    latency_micros: AtomicU64,
    ejections: AtomicU64,
    facade: OnceLock<Facade>,
}

/// The backend's handles in the `metrics` facade.
struct Facade {
    responses: [Counter; 5],
    failures: Counter,
    cancelled: Counter,
    duration: Histogram,
    in_flight: Gauge,
    up: Gauge,
    ejections: Counter,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl BackendStats {
    /// Registers this backend's facade handles under `label`, once.
    pub(crate) fn register(&self, label: impl FnOnce() -> String) {
        self.facade.get_or_init(|| {
            let backend = label();
            Facade {
                responses: CLASSES.map(|class| {
                    metrics::counter!("tower_lb_requests_total", "backend" => backend.clone(), "class" => class)
                }),
                failures: metrics::counter!("tower_lb_backend_failures_total", "backend" => backend.clone()),
                cancelled: metrics::counter!("tower_lb_requests_cancelled_total", "backend" => backend.clone()),
                duration: metrics::histogram!("tower_lb_request_duration_seconds", "backend" => backend.clone()),
                in_flight: metrics::gauge!("tower_lb_backend_in_flight", "backend" => backend.clone()),
                ejections: metrics::counter!("tower_lb_ejections_total", "backend" => backend.clone()),
                up: metrics::gauge!("tower_lb_backend_up", "backend" => backend),
            }
        });
    }

    /// Publishes whether the backend takes traffic (off the request path).
    pub(crate) fn set_up(&self, up: bool) {
        if let Some(f) = self.facade.get() {
            f.up.set(if up { 1.0 } else { 0.0 });
        }
    }

    /// Passive health ejected the backend (off the request path).
    pub(crate) fn ejected(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = self.facade.get() {
            f.ejections.increment(1);
        }
    }

    #[inline]
    pub(crate) fn started(&self) {
        if let Some(f) = self.facade.get() {
            f.in_flight.increment(1.0);
        }
    }

    /// A request picked for this backend ended after `elapsed`.
    #[inline]
    pub(crate) fn ended(&self, outcome: Outcome, elapsed: Duration) {
        let facade = self.facade.get();
        if let Some(f) = facade {
            f.in_flight.decrement(1.0);
        }
        match outcome {
            Outcome::Pending => {
                self.cancelled.fetch_add(1, Ordering::Relaxed);
                if let Some(f) = facade {
                    f.cancelled.increment(1);
                }
            }
            Outcome::Answered => {}
            Outcome::Failed => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if let Some(f) = facade {
                    f.failures.increment(1);
                }
            }
            Outcome::Status(status) => {
                let class = (usize::from(status / 100)).clamp(1, 5) - 1;
                self.responses[class].fetch_add(1, Ordering::Relaxed);
                let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
                let bucket = BUCKET_MICROS
                    .iter()
                    .position(|&le| micros <= le)
                    .unwrap_or(BUCKET_MICROS.len());
                self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
                self.latency_micros.fetch_add(micros, Ordering::Relaxed);
                if let Some(f) = facade {
                    f.responses[class].increment(1);
                    if class == 4 {
                        f.failures.increment(1);
                    }
                    f.duration.record(elapsed.as_secs_f64());
                }
            }
        }
    }

    pub(crate) fn snapshot(&self) -> BackendCounters {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BackendCounters {
            responses: self.responses.each_ref().map(load),
            errors: load(&self.errors),
            cancelled: load(&self.cancelled),
            buckets: self.buckets.each_ref().map(load),
            latency_sum: Duration::from_micros(load(&self.latency_micros)),
            ejections: load(&self.ejections),
        }
    }
}

impl fmt::Debug for BackendStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.snapshot().fmt(f)
    }
}

/// A reading of one backend's counters (see [`Endpoint::stats`](crate::policy::Endpoint::stats)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendCounters {
    /// Responses that ended, by status class: `[1xx, 2xx, 3xx, 4xx, 5xx]`.
    pub responses: [u64; 5],
    /// Requests the backend failed without a response: no connection, a reset or close
    /// before the response head, a response timeout.
    pub errors: u64,
    /// Requests cancelled before the backend answered: their client went away, the caller
    /// of an embedded balancer dropped the response future, or a server's shutdown cut
    /// them. Neither responses nor failures: a backend's clients giving up on it shows
    /// here, not in its latency.
    pub cancelled: u64,
    /// Responses by latency (from the pick to the end of the body), one count per bucket
    /// of [`LATENCY_BUCKETS`] and a last one for longer; not cumulative.
    pub buckets: [u64; 14],
    /// The sum of those latencies.
    pub latency_sum: Duration,
    /// Times passive health ejected the backend.
    pub ejections: u64,
}

impl BackendCounters {
    /// Responses that ended.
    pub fn requests(&self) -> u64 {
        self.responses.iter().sum()
    }

    /// Failed requests: [`errors`](Self::errors) plus `5xx` responses.
    pub fn failures(&self) -> u64 {
        self.errors + self.responses[4]
    }
}

/// Process-wide counters: see [`global`].
#[derive(Debug, Default)]
pub struct Global {
    retries: AtomicU64,
    /// One per status of `LOCAL_STATUSES`.
    local: [AtomicU64; LOCAL_STATUSES.len()],
    reloads: [AtomicU64; 2],
    client_connections: AtomicI64,
    health: Mutex<BTreeMap<String, [u64; 2]>>,
}

/// The statuses the proxy answers itself, as [`Global::local_responses`] lists them.
/// (`405` answers `CONNECT`, `408` a request body that stopped arriving.)
pub const LOCAL_STATUSES: &[u16] = &[400, 431, 502, 503, 504, 405, 408];

/// The process-wide counters.
pub fn global() -> &'static Global {
    static GLOBAL: OnceLock<Global> = OnceLock::new();
    GLOBAL.get_or_init(Global::default)
}

impl Global {
    /// Retries: attempts on another backend for a request that its backend failed before
    /// acting on it (see [`Retries`](crate::balance::Retries)).
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Answers the proxy made itself: each status of [`LOCAL_STATUSES`] with its count.
    pub fn local_responses(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        LOCAL_STATUSES
            .iter()
            .zip(&self.local)
            .map(|(&status, n)| (status, n.load(Ordering::Relaxed)))
    }

    /// Configuration reloads: `[applied, rejected]`.
    pub fn config_reloads(&self) -> [u64; 2] {
        self.reloads.each_ref().map(|a| a.load(Ordering::Relaxed))
    }

    /// Client connections open now.
    pub fn client_connections(&self) -> i64 {
        self.client_connections.load(Ordering::Relaxed)
    }

    /// Health-check probes of a backend: `[passed, failed]`.
    pub fn health_checks(&self, backend: &str) -> [u64; 2] {
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.get(backend).copied().unwrap_or_default()
    }
}

/// Counts a request tried on another backend.
pub(crate) fn retry() {
    global().retries.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("tower_lb_retries_total").increment(1);
}

/// Counts an answer the proxy made itself.
#[cfg(feature = "http")]
pub(crate) fn local_response(status: u16) {
    if let Some(i) = LOCAL_STATUSES.iter().position(|&s| s == status) {
        global().local[i].fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tower_lb_local_responses_total", "status" => status.to_string())
            .increment(1);
    }
}

/// Counts a health-check probe of `backend`.
pub(crate) fn health_check(backend: &dyn fmt::Display, passed: bool) {
    let backend = backend.to_string();
    let result = if passed { "pass" } else { "fail" };
    metrics::counter!("tower_lb_health_checks_total", "backend" => backend.clone(), "result" => result)
        .increment(1);
    let mut health = global().health.lock().unwrap_or_else(|e| e.into_inner());
    health.entry(backend).or_default()[usize::from(!passed)] += 1;
}

/// Counts a configuration reload: applied, or rejected as invalid.
pub fn config_reload(applied: bool) {
    global().reloads[usize::from(!applied)].fetch_add(1, Ordering::Relaxed);
    let result = if applied { "applied" } else { "rejected" };
    metrics::counter!("tower_lb_config_reloads_total", "result" => result).increment(1);
}

/// Counts an open client connection until dropped.
#[cfg(feature = "http")]
#[derive(Debug)]
pub(crate) struct ClientConnection(());

#[cfg(feature = "http")]
impl ClientConnection {
    pub(crate) fn open() -> Self {
        global().client_connections.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("tower_lb_client_connections").increment(1.0);
        ClientConnection(())
    }
}

#[cfg(feature = "http")]
impl Drop for ClientConnection {
    fn drop(&mut self) {
        global().client_connections.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("tower_lb_client_connections").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_classes_and_failures() {
        let s = BackendStats::default();
        s.ended(Outcome::Status(200), Duration::from_micros(900));
        s.ended(Outcome::Status(503), Duration::from_millis(30));
        s.ended(Outcome::Status(404), Duration::from_secs(11));
        s.ended(Outcome::Failed, Duration::from_millis(1));
        s.ended(Outcome::Pending, Duration::from_millis(1));
        s.ended(Outcome::Answered, Duration::from_millis(1));
        let c = s.snapshot();
        assert_eq!(c.responses, [0, 1, 0, 1, 1]);
        assert_eq!((c.requests(), c.errors, c.failures()), (3, 1, 2));
        assert_eq!(c.cancelled, 1);
        assert_eq!(c.buckets[0], 1);
        assert_eq!(c.buckets[5], 1); // 30 ms <= 50 ms
        assert_eq!(c.buckets[13], 1); // +Inf
        assert_eq!(
            c.latency_sum,
            Duration::from_micros(900 + 30_000 + 11_000_000)
        );
    }
}
