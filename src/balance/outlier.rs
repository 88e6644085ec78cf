//! Passive health: outlier ejection from live traffic.
//!
//! Active health checks probe a backend every few seconds; passive health watches the
//! requests themselves. Each request that ends is classified ([`Classify`]) as a success
//! or a failure of its backend. After [`consecutive_failures`](PassiveHealth::new) failures
//! in a row the backend is *ejected*: it takes no new request for the
//! [ejection time](PassiveHealth::ejection_time) times the number of times it was ejected
//! in a row (at most 10×), then returns with its failure count at zero. The multiplier
//! falls back to 1 once the backend has served without an ejection for as long as its last
//! ejection lasted. At most [`max_ejection_percent`](PassiveHealth::max_ejection_percent)
//! of the set's backends (rounded down, but at least one) are ejected at once.
//!
//! Ejection is separate from the active health state that health checks (or
//! [`Backends::set_healthy`](super::Backends::set_healthy)) set: a backend takes traffic
//! only when it is healthy *and* not ejected
//! ([`Endpoint::is_healthy`](crate::policy::Endpoint::is_healthy)); a passing probe does
//! not end an ejection, and an ejection does not change what the probes decided.
//!
//! The default classifier, [`ServerErrorsAsFailures`], counts every error of the backend
//! service (for HTTP: a connection that could not be opened, a connection closed or reset
//! before the response head, a response head that did not arrive within the response
//! timeout) and every `5xx` response as a failure; any other response is a success. A
//! request cancelled before its outcome is known counts as neither.
//!
//! # Cost on the request path
//!
//! Each backend keeps its failures in a row in one atomic next to its in-flight counter. A
//! request that ends reads whether passive health is on (one relaxed load), classifies its
//! outcome and, on success, resets the count only when it is not zero already (a read, no
//! write, when the backend is doing well). No lock, no allocation, no new snapshot: only an
//! ejection and a return take the set's writer lock and publish a snapshot, and a timer
//! (a tokio task, or a thread outside a runtime) ends the ejection.
//!
//! Passive health is off in a new [`Backends`](super::Backends) set; turn it on with
//! [`Backends::passive_health`](super::Backends::passive_health). The standalone proxy
//! turns it on from `config.json` (`passive_health`, on by default).
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use tower::util::BoxCloneSyncService;
//! use tower::{service_fn, ServiceExt};
//! use tower_lb::balance::outlier::PassiveHealth;
//! use tower_lb::{policy::RoundRobin, Backends, Balance, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
//! let failing = service_fn(|_: ()| async { Err::<&str, BoxError>("refused".into()) });
//! let working = service_fn(|_: ()| async { Ok::<_, BoxError>("b") });
//! let backends = Backends::from_services(
//!     RoundRobin::new(),
//!     [("a", BoxCloneSyncService::new(failing)), ("b", BoxCloneSyncService::new(working))],
//! );
//! backends.passive_health(PassiveHealth::new(2).ejection_time(Duration::from_secs(30)));
//! let lb = Balance::new(backends.clone());
//!
//! // "a" fails twice in a row...
//! let mut failed = 0;
//! for _ in 0..4 {
//!     failed += usize::from(lb.clone().oneshot(()).await.is_err());
//! }
//! assert_eq!(failed, 2);
//! // ...and is ejected: it keeps its health, but takes no request for 30 s.
//! assert_eq!(backends.is_ejected(&"a"), Some(true));
//! assert_eq!(backends.is_healthy(&"a"), Some(true));
//! assert_eq!(backends.pick(None), Some("b"));
//! # Ok(()) }
//! ```

use std::error::Error;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::policy::Load;

/// The most an ejection time is multiplied by.
pub(crate) const MAX_MULTIPLIER: u32 = 10;

/// Passive health settings: when a backend is ejected, for how long, how many at once, and
/// what counts as a failure. See the [module docs](self).
///
/// ```
/// use std::time::Duration;
/// use tower_lb::balance::outlier::{Outcome, PassiveHealth};
///
/// // The contract's defaults: 5 failures, 10 s, 50 %.
/// let settings = PassiveHealth::default();
/// assert_eq!(settings.consecutive_failures(), 5);
///
/// // Also count 429 Too Many Requests against a backend.
/// let settings = PassiveHealth::new(3)
///     .ejection_time(Duration::from_secs(5))
///     .max_ejection_percent(34)
///     .classify(|outcome: Outcome<'_>| match outcome {
///         Outcome::Status(status) => status == 429 || status >= 500,
///         _ => true,
///     });
/// assert!(settings.is_on());
/// assert!(!PassiveHealth::off().is_on());
/// ```
#[derive(Clone)]
pub struct PassiveHealth {
    consecutive_failures: u32,
    ejection_time: Duration,
    max_ejection_percent: u8,
    /// `None`: [`ServerErrorsAsFailures`], checked inline.
    classify: Option<Arc<dyn Classify>>,
}

impl Default for PassiveHealth {
    /// 5 failures in a row, 10 s, 50 %, [`ServerErrorsAsFailures`].
    fn default() -> Self {
        PassiveHealth::new(5)
    }
}

impl PassiveHealth {
    /// Ejects a backend after `consecutive_failures` failures in a row (0 turns passive
    /// health off), for 10 s at first, at most 50 % of the backends at once.
    pub fn new(consecutive_failures: u32) -> Self {
        PassiveHealth {
            consecutive_failures,
            ejection_time: Duration::from_secs(10),
            max_ejection_percent: 50,
            classify: None,
        }
    }

    /// No ejection at all.
    pub fn off() -> Self {
        PassiveHealth::new(0)
    }

    /// The base ejection time; the `n`th ejection in a row lasts `n` times as long (at most
    /// 10 times).
    pub fn ejection_time(mut self, time: Duration) -> Self {
        self.ejection_time = time;
        self
    }

    /// The largest share of the backends ejected at once, in percent (at most 100); rounded
    /// down, but one backend may always be ejected.
    pub fn max_ejection_percent(mut self, percent: u8) -> Self {
        self.max_ejection_percent = percent.min(100);
        self
    }

    /// Decides with `classify` which outcomes are failures, instead of
    /// [`ServerErrorsAsFailures`].
    pub fn classify(mut self, classify: impl Classify) -> Self {
        self.classify = Some(Arc::new(classify));
        self
    }

    /// Failures in a row that eject a backend; 0 when off.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Whether ejection is on.
    pub fn is_on(&self) -> bool {
        self.consecutive_failures > 0
    }

    /// How long the `in_a_row`th ejection in a row lasts.
    pub(crate) fn duration(&self, in_a_row: u32) -> Duration {
        self.ejection_time * in_a_row.clamp(1, MAX_MULTIPLIER)
    }

    /// How many of `backends` may be ejected at once.
    pub(crate) fn cap(&self, backends: usize) -> usize {
        (backends * usize::from(self.max_ejection_percent) / 100).max(1)
    }
}

impl fmt::Debug for PassiveHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PassiveHealth")
            .field("consecutive_failures", &self.consecutive_failures)
            .field("ejection_time", &self.ejection_time)
            .field("max_ejection_percent", &self.max_ejection_percent)
            .field("custom_classify", &self.classify.is_some())
            .finish()
    }
}

/// How a request on a backend ended, as a [`Classify`] sees it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Outcome<'a> {
    /// The backend answered with this (HTTP) status. Requests of a balancer whose
    /// completion records no status (anything but [`TrackBody`]) that got a response are
    /// successes without being classified.
    ///
    #[cfg_attr(feature = "http", doc = "[`TrackBody`]: crate::proxy::TrackBody")]
    #[cfg_attr(not(feature = "http"), doc = "[`TrackBody`]: crate::balance")]
    Status(u16),
    /// The backend service failed the request: its `poll_ready` or its call returned this
    /// error. For HTTP, a [`ConnectError`], a [`BackendError`] (reset or closed before the
    /// response head, or not HTTP) or a [`ResponseTimeout`]; for a request given back to
    /// the balancer ([`Unsent`](super::error::Unsent)), the error inside.
    ///
    #[cfg_attr(
        feature = "http",
        doc = "[`ConnectError`]: crate::proxy::error::ConnectError\n\
               [`BackendError`]: crate::proxy::error::BackendError\n\
               [`ResponseTimeout`]: crate::proxy::error::ResponseTimeout"
    )]
    #[cfg_attr(
        not(feature = "http"),
        doc = "[`ConnectError`]: crate::balance\n[`BackendError`]: crate::balance\n\
               [`ResponseTimeout`]: crate::balance"
    )]
    Error(&'a (dyn Error + Send + Sync + 'static)),
}

/// Decides whether an [`Outcome`] is a failure of the backend, for passive health.
///
/// A closure `Fn(Outcome<'_>) -> bool` is a `Classify`. It runs on the request path, once
/// per request that ends: keep it cheap.
pub trait Classify: Send + Sync + 'static {
    /// `true` when the outcome counts as a failure of the backend, `false` when it counts
    /// as a success (which ends a run of failures).
    fn is_failure(&self, outcome: Outcome<'_>) -> bool;
}

impl<F> Classify for F
where
    F: Fn(Outcome<'_>) -> bool + Send + Sync + 'static,
{
    fn is_failure(&self, outcome: Outcome<'_>) -> bool {
        self(outcome)
    }
}

/// The default [`Classify`]: every `5xx` response and every error is a failure, but for
/// an error of the request itself: one with a [`RequestFault`](super::error::RequestFault)
/// in its chain. A request whose own body fails (a client that sends a truncated or
/// malformed chunked upload, or goes away in the middle of it) fails at the backend service
/// too, but through no fault of the backend; otherwise any client could eject backends.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerErrorsAsFailures;

impl Classify for ServerErrorsAsFailures {
    #[inline]
    fn is_failure(&self, outcome: Outcome<'_>) -> bool {
        match outcome {
            Outcome::Status(status) => status >= 500,
            Outcome::Error(error) => !caused_by_request(error),
        }
    }
}

/// Whether `error` comes from the request rather than the backend (see
/// [`ServerErrorsAsFailures`]).
fn caused_by_request(error: &(dyn Error + 'static)) -> bool {
    super::error::RequestFault::in_chain(error)
}

/// Removes a backend from the set for a while: called with its `Load` when its failures
/// in a row reach the threshold. Set by `Backends::passive_health`, which knows the set's
/// types; it holds the set weakly.
pub(crate) type Ejector = Box<dyn Fn(&Arc<Load>) + Send + Sync>;

/// The passive health of one set, shared by its backends' `Load`s.
pub(crate) struct Hub {
    /// The failures that eject; 0 when off. Read by every request that ends.
    threshold: AtomicU32,
    /// Whether the classifier is [`ServerErrorsAsFailures`], checked without a call.
    default_classify: AtomicBool,
    settings: Mutex<PassiveHealth>,
    /// Loaded only with a custom classifier.
    classify: arc_swap::ArcSwapOption<Custom>,
    ejector: OnceLock<Ejector>,
}

impl Hub {
    pub(crate) fn new() -> Self {
        Hub {
            threshold: AtomicU32::new(0),
            default_classify: AtomicBool::new(true),
            settings: Mutex::new(PassiveHealth::off()),
            classify: arc_swap::ArcSwapOption::empty(),
            ejector: OnceLock::new(),
        }
    }

    /// Puts `settings` in force for the requests that end from now on.
    pub(crate) fn configure(&self, settings: PassiveHealth, ejector: impl FnOnce() -> Ejector) {
        if settings.is_on() {
            self.ejector.get_or_init(ejector);
        }
        let custom = settings.classify.clone().map(|c| Arc::new(Custom(c)));
        self.default_classify
            .store(custom.is_none(), Ordering::Relaxed);
        self.classify.store(custom);
        self.threshold
            .store(settings.consecutive_failures, Ordering::Relaxed);
        *self.settings() = settings;
    }

    pub(crate) fn settings(&self) -> std::sync::MutexGuard<'_, PassiveHealth> {
        self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[inline]
    fn is_failure(&self, outcome: Outcome<'_>) -> bool {
        if self.default_classify.load(Ordering::Relaxed) {
            return ServerErrorsAsFailures.is_failure(outcome);
        }
        match &*self.classify.load() {
            Some(custom) => custom.0.is_failure(outcome),
            None => ServerErrorsAsFailures.is_failure(outcome),
        }
    }
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("settings", &*self.settings())
            .finish_non_exhaustive()
    }
}

/// A custom classifier, in the sized type that `ArcSwap` holds.
struct Custom(Arc<dyn Classify>);

/// The passive health of one backend: its failures in a row and its set's [`Hub`]. Lives in
/// the backend's `Load`, shared by every snapshot.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    failures: AtomicU32,
    hub: OnceLock<Arc<Hub>>,
}

impl Tracker {
    /// Ties the backend to its set's passive health (once, as it joins).
    pub(crate) fn attach(&self, hub: &Arc<Hub>) {
        let _ = self.hub.set(hub.clone());
    }

    /// The set's passive health when it is on, and its threshold.
    #[inline]
    fn active(&self) -> Option<(&Hub, u32)> {
        let hub = self.hub.get()?;
        let threshold = hub.threshold.load(Ordering::Relaxed);
        (threshold > 0).then_some((&**hub, threshold))
    }

    /// Whether an error fails the backend; `None` when passive health is off.
    #[inline]
    pub(crate) fn classify_error(
        &self,
        error: &(dyn Error + Send + Sync + 'static),
    ) -> Option<bool> {
        self.active()
            .map(|(hub, _)| hub.is_failure(Outcome::Error(error)))
    }

    /// Starts the count again (on ejection and on return).
    pub(crate) fn reset(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }
}

/// Records how a request on the backend of `load` ended: `status`, if it got one, else
/// `verdict` (`Some(true)`: failed, `Some(false)`: answered; `None`: cancelled).
#[inline]
pub(crate) fn record(load: &Arc<Load>, status: Option<u16>, verdict: Option<bool>) {
    let tracker = &load.outlier;
    let Some((hub, threshold)) = tracker.active() else {
        return;
    };
    let failed = match status {
        Some(status) => hub.is_failure(Outcome::Status(status)),
        None => match verdict {
            Some(failed) => failed,
            None => return,
        },
    };
    if !failed {
        // A read, not a write, while the backend is doing well: the cache line stays shared.
        if tracker.failures.load(Ordering::Relaxed) != 0 {
            tracker.reset();
        }
        return;
    }
    let n = tracker.failures.fetch_add(1, Ordering::Relaxed) + 1;
    if n >= threshold {
        eject(hub, load);
    }
}

#[cold]
fn eject(hub: &Hub, load: &Arc<Load>) {
    if let Some(ejector) = hub.ejector.get() {
        ejector(load);
    }
}

/// Runs `f` after `delay`: on the current tokio runtime, or on a thread outside one.
pub(crate) fn after(delay: Duration, f: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                tokio::time::sleep(delay).await;
                f();
            });
        }
        Err(_) => {
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                f();
            });
        }
    }
}

/// A backend's ejection state, kept with it in the set (changed under the writer lock).
#[derive(Debug, Clone, Default)]
pub(crate) struct Ejection {
    /// Ejected now.
    pub(crate) ejected: bool,
    /// Ejections in a row: the multiplier of the last one.
    pub(crate) in_a_row: u32,
    /// How long the last ejection lasted.
    pub(crate) last: Duration,
    /// When the backend last returned.
    pub(crate) returned: Option<tokio::time::Instant>,
    /// Tells a timer whether the ejection it ends is still the one it was set for.
    pub(crate) generation: u64,
}

impl Ejection {
    /// Ejects now under `settings`; returns how long for.
    pub(crate) fn start(
        &mut self,
        settings: &PassiveHealth,
        now: tokio::time::Instant,
    ) -> Duration {
        // Served without an ejection for as long as the last one lasted: back to 1×.
        if self
            .returned
            .is_some_and(|returned| now.duration_since(returned) >= self.last)
        {
            self.in_a_row = 0;
        }
        self.in_a_row = (self.in_a_row + 1).min(MAX_MULTIPLIER);
        self.last = settings.duration(self.in_a_row);
        self.ejected = true;
        self.generation += 1;
        self.last
    }

    /// Ends the ejection.
    pub(crate) fn end(&mut self, now: tokio::time::Instant) {
        self.ejected = false;
        self.returned = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_rounds_down_but_allows_one() {
        let s = |p| PassiveHealth::new(1).max_ejection_percent(p);
        assert_eq!(s(50).cap(3), 1);
        assert_eq!(s(50).cap(4), 2);
        assert_eq!(s(0).cap(10), 1);
        assert_eq!(s(100).cap(3), 3);
        assert_eq!(s(200).cap(3), 3); // clamped to 100
    }

    #[test]
    fn multiplier_grows_to_ten_and_falls_back_after_a_quiet_spell() {
        let s = PassiveHealth::new(1).ejection_time(Duration::from_secs(1));
        let mut e = Ejection::default();
        let mut now = tokio::time::Instant::now();
        let mut lasted = Vec::new();
        for _ in 0..12 {
            let d = e.start(&s, now);
            lasted.push(d.as_secs());
            now += d;
            e.end(now);
            now += Duration::from_millis(1); // back, and failing again at once
        }
        assert_eq!(lasted, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10]);
        // Served for as long as the last ejection (10 s): the next one is 1× again.
        now += Duration::from_secs(10);
        assert_eq!(e.start(&s, now), Duration::from_secs(1));
        now += Duration::from_secs(1);
        e.end(now);
        // Not quite as long as that one: 2×.
        now += Duration::from_millis(999);
        assert_eq!(e.start(&s, now), Duration::from_secs(2));
    }

    #[test]
    fn the_default_counts_errors_and_5xx() {
        let c = ServerErrorsAsFailures;
        assert!(c.is_failure(Outcome::Status(500)));
        assert!(c.is_failure(Outcome::Status(503)));
        assert!(!c.is_failure(Outcome::Status(429)));
        assert!(!c.is_failure(Outcome::Status(200)));
        let error: crate::BoxError = "reset".into();
        assert!(c.is_failure(Outcome::Error(&*error)));
    }
}
