//! Active health checks as a [`Stream`] of health transitions.
//!
//! A [`HealthCheck`] probes every target on a schedule and yields a [`Transition`] each
//! time a target's state flips. Attached to a [`Backends`] set
//! ([`HealthCheck::attach`], what [`proxy::Builder`] does), its targets are the set's
//! backends, following every insertion, removal and discovery, and the set takes unhealthy
//! backends out of rotation without removing them: see [`Attached`]. Unattached, targets
//! are added and removed through a [`Handle`], and [`HealthCheck::drive`] feeds the
//! transitions into a set. Either way one stream serves every target, so a reload never
//! multiplies probes.
//!
//! The rules (those of `config.json`, as in Envoy):
//!
//! - a probe passes when the [`Probe`] future returns `Ok` within `timeout`;
//! - a target starts unhealthy, is probed as soon as it is added, and turns healthy on its
//!   first pass; later, `unhealthy_threshold` consecutive failures turn it unhealthy and
//!   `healthy_threshold` consecutive passes turn it healthy again;
//! - at most one probe per target is in flight; probes start every `interval`, and after
//!   the first probe each target is offset by a stable fraction of the interval, so that
//!   the probes of a pool spread over the interval instead of arriving in bursts;
//! - a target that stays across changes keeps its state; changing the settings keeps every
//!   target's state and reschedules its next probe.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use futures::StreamExt;
//! use tower_lb::health::{HealthCheck, Settings};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! // A probe that passes for "up" only.
//! let probe = |target: &&'static str| {
//!     let up = *target == "up";
//!     async move { if up { Ok(()) } else { Err("down".into()) } }
//! };
//! let (mut checks, handle) = HealthCheck::new(probe, Settings::default());
//! handle.insert("up");
//! handle.insert("down");
//! let first = checks.next().await.unwrap();
//! assert_eq!((first.target, first.healthy), ("up", true));
//! # }
//! ```
//!
//! [`Backends`]: crate::Backends
#![cfg_attr(feature = "http", doc = "[`proxy::Builder`]: crate::proxy::Builder")]
#![cfg_attr(not(feature = "http"), doc = "[`proxy::Builder`]: crate::Backends")]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};

use crate::balance::WeakBackends;
use crate::policy::{stable_hash, Load, Policy};
use crate::{Backends, BoxError};

#[cfg(feature = "grpc")]
mod grpc;
#[cfg(feature = "http")]
mod http;
#[cfg(feature = "http2")]
mod http2;
#[cfg(feature = "grpc")]
#[cfg_attr(docsrs, doc(cfg(feature = "grpc")))]
pub use self::grpc::GrpcHealthProbe;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use self::http::HttpProbe;
#[cfg(feature = "http2")]
#[cfg_attr(docsrs, doc(cfg(feature = "http2")))]
pub use self::http2::Http2Probe;

/// Checks one target once. Closures `Fn(&K) -> impl Future<Output = Result<(), BoxError>>`
/// are probes.
pub trait Probe<K> {
    /// The check in progress.
    type Future: Future<Output = Result<(), BoxError>> + Send + 'static;

    /// Starts a check of `target`. The health check applies the timeout.
    fn probe(&self, target: &K) -> Self::Future;
}

impl<K, F, Fut> Probe<K> for F
where
    F: Fn(&K) -> Fut,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    type Future = Fut;

    fn probe(&self, target: &K) -> Fut {
        self(target)
    }
}

/// Health-check settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Time between the starts of two probes of one target (at least 1 ms: a zero
    /// interval is taken as that, not as probing in a loop).
    pub interval: Duration,
    /// Time a probe may take before it counts as failed.
    pub timeout: Duration,
    /// Consecutive passes that turn an unhealthy target healthy (except the first pass of
    /// a new target, which is enough on its own).
    pub healthy_threshold: u32,
    /// Consecutive failures that turn a healthy target unhealthy.
    pub unhealthy_threshold: u32,
}

impl Settings {
    /// The settings as they are used.
    fn sane(mut self) -> Self {
        self.interval = self.interval.max(MIN_INTERVAL);
        self
    }
}

/// The shortest interval between probes of a target.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

impl Default for Settings {
    /// The defaults of `config.json`: every 10 s, 2 s timeout, thresholds of 1.
    fn default() -> Self {
        Settings {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        }
    }
}

/// A target's health flipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition<K> {
    /// The target.
    pub target: K,
    /// Its new state.
    pub healthy: bool,
}

/// Adds and removes the targets of a [`HealthCheck`], and changes its settings.
/// The stream ends once every handle is dropped and no target is left.
#[derive(Debug)]
pub struct Handle<K> {
    tx: mpsc::UnboundedSender<Command<K>>,
}

impl<K> Clone for Handle<K> {
    fn clone(&self) -> Self {
        Handle {
            tx: self.tx.clone(),
        }
    }
}

#[derive(Debug)]
enum Command<K> {
    Insert(K),
    Remove(K),
    Settings(Settings),
}

impl<K> Handle<K> {
    /// Starts checking `target` (at once) unless it is checked already.
    pub fn insert(&self, target: K) {
        let _ = self.tx.send(Command::Insert(target));
    }

    /// Stops checking `target`; a probe in flight is disregarded.
    pub fn remove(&self, target: K) {
        let _ = self.tx.send(Command::Remove(target));
    }

    /// Changes the settings; states are kept, next probes rescheduled.
    pub fn set_settings(&self, settings: Settings) {
        let _ = self.tx.send(Command::Settings(settings));
    }
}

struct Target {
    /// Changes when the target is rescheduled: stale timers are recognised by it.
    generation: u64,
    /// Set when the target is added: results of probes of an earlier incarnation (removed,
    /// then added again) are recognised by it.
    incarnation: u64,
    healthy: bool,
    /// No probe has passed yet.
    fresh: bool,
    passes: u32,
    failures: u32,
    probing: bool,
    probes: u64,
    /// A stable fraction of the interval, in [0, 1).
    phase: f64,
    /// Why the probe that made the target unhealthy failed, for [`HealthCheck::drive`]'s log.
    failure: Option<String>,
}

type Running<K> = Pin<Box<dyn Future<Output = (K, u64, Result<(), BoxError>)> + Send>>;

/// The health-check stream. See the [module docs](self).
#[must_use = "a health check probes nothing until it is driven: spawn `attach(&set).drive()`"]
pub struct HealthCheck<K, P> {
    probe: P,
    settings: Settings,
    targets: HashMap<K, Target>,
    next_generation: u64,
    schedule: BinaryHeap<Reverse<(Instant, u64)>>,
    by_generation: HashMap<u64, K>,
    running: FuturesUnordered<Running<K>>,
    commands: mpsc::UnboundedReceiver<Command<K>>,
    commands_closed: bool,
    timer: Pin<Box<Sleep>>,
    ready: VecDeque<Transition<K>>,
    /// Attached to a set: the stream ends with the set, not when it runs out of targets.
    attached: bool,
}

impl<K, P> HealthCheck<K, P>
where
    K: Hash + Eq + Clone + fmt::Display + Send + Unpin + 'static,
    P: Probe<K> + Unpin,
{
    /// A health check with no targets yet, and the handle that adds them.
    pub fn new(probe: P, settings: Settings) -> (Self, Handle<K>) {
        let (tx, commands) = mpsc::unbounded_channel();
        let check = HealthCheck {
            probe,
            settings: settings.sane(),
            targets: HashMap::new(),
            next_generation: 0,
            schedule: BinaryHeap::new(),
            by_generation: HashMap::new(),
            running: FuturesUnordered::new(),
            commands,
            commands_closed: false,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            ready: VecDeque::new(),
            attached: false,
        };
        (check, Handle { tx })
    }

    /// Applies every transition to `backends` until the stream ends or the set is
    /// dropped, and logs it once it has taken effect: "backend is healthy" means it takes
    /// requests. Spawn it. It holds the set weakly: the checks stop with the balancer.
    /// (Only the targets given through the [`Handle`] are probed; [`attach`](Self::attach)
    /// instead follows the set.)
    ///
    /// Like an attachment, it is the set's one source of health: checks driven or attached
    /// to the set later end these, and these end any driven or attached before. (The
    /// set's [`healthy_on_insert`](Backends::healthy_on_insert) stays as it is.)
    pub fn drive<S, Pol>(mut self, backends: &Backends<K, S, Pol>) -> impl Future<Output = ()>
    where
        S: Clone,
        Pol: Policy,
    {
        let attachment = backends.attach_checks();
        let set = backends.downgrade();
        let detached = backends.detached(attachment);
        async move {
            let mut detached = std::pin::pin!(detached);
            loop {
                let next = std::future::poll_fn(|cx| {
                    if detached.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    self.poll_next_unpin(cx)
                })
                .await;
                let Some(backends) = set.upgrade() else {
                    return;
                };
                let Some(t) = next.filter(|_| backends.checks_attached(attachment)) else {
                    if !backends.checks_attached(attachment) {
                        tracing::debug!("health checks driven on the set replaced by newer ones");
                    }
                    return;
                };
                backends.set_healthy(&t.target, t.healthy);
                self.log(&t);
            }
        }
    }

    /// Logs a transition that has taken effect.
    fn log(&self, t: &Transition<K>) {
        if t.healthy {
            tracing::info!(backend = %t.target, "backend is healthy");
        } else {
            let error = self
                .targets
                .get(&t.target)
                .and_then(|t| t.failure.as_deref());
            tracing::warn!(backend = %t.target, error = error.unwrap_or("?"), "backend is unhealthy");
        }
    }

    /// Attaches the checks to `backends`: see [`Attached`].
    ///
    /// Targets added through a [`Handle`] are checked as well, but need not be: the checks
    /// follow the set. The handle still changes the settings.
    ///
    /// A set follows one attachment: attaching checks to a set that has some (attached or
    /// [driven](Self::drive)) replaces them, and the earlier ones end (their stream ends,
    /// without touching the set again).
    /// Two would each set the set's health back to their own view, without end; one check
    /// may probe several ways, as its [`Probe`] decides.
    pub fn attach<S, Pol>(mut self, backends: &Backends<K, S, Pol>) -> Attached<K, S, Pol, P>
    where
        S: Clone,
        Pol: Policy,
    {
        // Before subscribing: the earlier checks wake to this, these need not.
        let attachment = backends.attach_checks();
        self.attached = true;
        backends.healthy_on_insert(false);
        // Subscribed before the first look, so that no change is missed.
        let published = backends.subscribe();
        let mut attached = Attached {
            check: self,
            set: backends.downgrade(),
            attachment,
            changed: Box::pin(changed(published)),
            known: HashMap::new(),
            epoch: 0,
            done: false,
        };
        attached.follow(backends);
        attached
    }

    /// Whether `target` is healthy, as far as this stream knows.
    pub fn is_healthy(&self, target: &K) -> Option<bool> {
        self.targets.get(target).map(|t| t.healthy)
    }

    fn schedule(&mut self, target: &K, at: Instant) {
        let generation = self.next_generation;
        self.next_generation += 1;
        if let Some(t) = self.targets.get_mut(target) {
            let old = std::mem::replace(&mut t.generation, generation);
            self.by_generation.remove(&old);
            self.by_generation.insert(generation, target.clone());
            self.schedule.push(Reverse((at, generation)));
        }
    }

    /// Checks `key` afresh: a new backend under a known key (removed and added again).
    fn restart(&mut self, key: &K) {
        self.command(Command::Remove(key.clone()));
        self.ready.retain(|t| &t.target != key);
        self.command(Command::Insert(key.clone()));
    }

    fn command(&mut self, command: Command<K>) {
        let now = Instant::now();
        match command {
            Command::Insert(key) => {
                if self.targets.contains_key(&key) {
                    return;
                }
                let phase = (stable_hash(&key) % 1_000_000) as f64 / 1_000_000.0;
                let incarnation = self.next_generation;
                self.next_generation += 1;
                self.targets.insert(
                    key.clone(),
                    Target {
                        generation: u64::MAX,
                        incarnation,
                        healthy: false,
                        fresh: true,
                        passes: 0,
                        failures: 0,
                        probing: false,
                        probes: 0,
                        phase,
                        failure: None,
                    },
                );
                self.schedule(&key, now);
            }
            Command::Remove(key) => {
                if let Some(t) = self.targets.remove(&key) {
                    self.by_generation.remove(&t.generation);
                }
            }
            Command::Settings(settings) => {
                let settings = settings.sane();
                let changed = settings.interval != self.settings.interval;
                self.settings = settings;
                if changed {
                    let keys: Vec<K> = self.targets.keys().cloned().collect();
                    for key in keys {
                        let at = now + self.settings.interval.mul_f64(self.targets[&key].phase);
                        self.schedule(&key, at);
                    }
                }
            }
        }
    }

    fn start_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, generation))) = self.schedule.peek().copied() {
            if at > now {
                break;
            }
            self.schedule.pop();
            let Some(key) = self.by_generation.get(&generation).cloned() else {
                continue; // stale: removed or rescheduled
            };
            let Some(target) = self.targets.get_mut(&key) else {
                continue;
            };
            if target.probing {
                // Still probing (settings changed under it): try again an interval on.
                self.schedule
                    .push(Reverse((now + self.settings.interval, generation)));
                continue;
            }
            target.probing = true;
            target.probes += 1;
            // The next start: one interval on, and for the second probe a stable offset,
            // which spreads a pool's probes over the interval.
            let interval = self.settings.interval;
            let next = if target.probes == 1 {
                now + interval.mul_f64(0.5 + target.phase / 2.0)
            } else {
                now + interval
            };
            let timeout = self.settings.timeout;
            let probe = self.probe.probe(&key);
            let incarnation = target.incarnation;
            let key2 = key.clone();
            self.running.push(Box::pin(async move {
                let result = match tokio::time::timeout(timeout, probe).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("no answer within {timeout:?}").into()),
                };
                (key2, incarnation, result)
            }));
            self.schedule.push(Reverse((next, generation)));
        }
    }

    fn finished(&mut self, key: K, incarnation: u64, result: Result<(), BoxError>) {
        let settings = self.settings;
        let Some(t) = self.targets.get_mut(&key) else {
            return;
        };
        if t.incarnation != incarnation {
            return;
        }
        t.probing = false;
        crate::stats::health_check(&key, result.is_ok());
        let flip = match &result {
            Ok(()) => {
                t.failures = 0;
                t.passes = t.passes.saturating_add(1);
                !t.healthy && (t.fresh || t.passes >= settings.healthy_threshold)
            }
            Err(_) => {
                t.passes = 0;
                t.failures = t.failures.saturating_add(1);
                t.healthy && t.failures >= settings.unhealthy_threshold
            }
        };
        if result.is_ok() {
            t.fresh = false;
        }
        match (&result, flip) {
            (Err(error), true) => t.failure = Some(error.to_string()),
            (Err(error), false) if !t.healthy && t.fresh => {
                tracing::debug!(backend = %key, %error, "backend not healthy yet")
            }
            _ => {}
        }
        if flip {
            t.healthy = !t.healthy;
            t.passes = 0;
            t.failures = 0;
            self.ready.push_back(Transition {
                target: key,
                healthy: t.healthy,
            });
        }
    }
}

impl<K, P> Stream for HealthCheck<K, P>
where
    K: Hash + Eq + Clone + fmt::Display + Send + Unpin + 'static,
    P: Probe<K> + Unpin,
{
    type Item = Transition<K>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Transition<K>>> {
        let this = &mut *self;
        loop {
            if let Some(t) = this.ready.pop_front() {
                return Poll::Ready(Some(t));
            }
            while !this.commands_closed {
                match this.commands.poll_recv(cx) {
                    Poll::Ready(Some(command)) => this.command(command),
                    Poll::Ready(None) => this.commands_closed = true,
                    Poll::Pending => break,
                }
            }
            if this.commands_closed && this.targets.is_empty() && !this.attached {
                return Poll::Ready(None);
            }
            this.start_due();
            let mut progressed = false;
            while let Poll::Ready(Some((key, incarnation, result))) =
                this.running.poll_next_unpin(cx)
            {
                this.finished(key, incarnation, result);
                progressed = true;
            }
            if progressed || !this.ready.is_empty() {
                continue;
            }
            // Sleep until the next scheduled start.
            if let Some(Reverse((at, _))) = this.schedule.peek() {
                let at = *at;
                if this.timer.deadline() != at {
                    this.timer.as_mut().reset(at);
                }
                if this.timer.as_mut().poll(cx).is_ready() {
                    continue;
                }
            }
            return Poll::Pending;
        }
    }
}

impl<K: fmt::Debug, P> fmt::Debug for HealthCheck<K, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthCheck")
            .field("settings", &self.settings)
            .field("targets", &self.targets.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Health checks attached to a [`Backends`] set ([`HealthCheck::attach`]): the set and its
/// checks are one thing.
///
/// - The checked targets follow the set: a backend inserted by [`Backends::update`],
///   [`Backends::insert`] or [`Backends::discover`] is probed at once, a removed one is no
///   longer probed, with no second registration. It watches the snapshots the set
///   publishes and compares their keys with the targets.
/// - A backend takes traffic only after its first probe passes: the set inserts backends
///   unhealthy ([`Backends::healthy_on_insert`]`(false)`), and backends that were in the
///   set before are taken out of rotation until they pass.
/// - Health belongs to the checks: a state set by hand ([`Backends::set_healthy`],
///   [`Update::insert_with`](crate::balance::Update::insert_with)) is put back to what the
///   checks know at the next change of the set. To take a backend out, remove it (its
///   requests in flight finish).
/// - A key removed and inserted again is a new backend: checked afresh.
///
/// As a [`Stream`], it applies every [`Transition`] to the set and then yields it, for
/// whoever wants to watch (metrics, logs). It ends when the set is dropped (every clone
/// of it, and so every balancer over it), which stops the probes. [`drive`](Self::drive)
/// polls it to the end and logs the transitions: spawn that.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_lb::health::{HealthCheck, Settings};
/// use tower_lb::{policy::RoundRobin, Backends};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// // Up: "a"; down: everything else.
/// let probe = |target: &&'static str| {
///     let up = *target == "a";
///     async move { if up { Ok(()) } else { Err("down".into()) } }
/// };
/// let backends = Backends::new(RoundRobin::new());
/// let (checks, _settings) = HealthCheck::new(probe, Settings::default());
/// tokio::spawn(checks.attach(&backends).drive());
///
/// backends.insert("a", ());
/// backends.insert("b", ()); // unhealthy until its first probe passes, which it never does
/// backends.wait_until(|s| s.iter().any(|(_, e)| e.is_healthy())).await;
/// assert_eq!(backends.is_healthy(&"a"), Some(true));
/// assert_eq!(backends.is_healthy(&"b"), Some(false));
/// # }
/// ```
#[must_use = "attached checks mark every backend unhealthy until they are driven: spawn `.drive()`"]
pub struct Attached<K, S, Pol: Policy, P> {
    check: HealthCheck<K, P>,
    set: WeakBackends<K, S, Pol>,
    /// Which attachment to the set these checks are; a later one ends them.
    attachment: u64,
    /// Resolves on the next published snapshot, or to `None` once the set is gone.
    changed: Pin<Box<dyn Future<Output = Option<watch::Receiver<u64>>> + Send>>,
    /// The backends of the set as last seen: which incarnation (its counters, new for every
    /// insertion of a key), and the last look that saw it.
    known: HashMap<K, Known>,
    epoch: u64,
    /// The set is gone: the stream has ended.
    done: bool,
}

struct Known {
    load: Weak<Load>,
    epoch: u64,
}

async fn changed(mut published: watch::Receiver<u64>) -> Option<watch::Receiver<u64>> {
    published.changed().await.ok()?;
    Some(published)
}

impl<K, S, Pol, P> Attached<K, S, Pol, P>
where
    K: Hash + Eq + Clone + fmt::Display + Send + Unpin + 'static,
    S: Clone,
    Pol: Policy,
    P: Probe<K> + Unpin,
{
    /// Follows the set's current snapshot: new backends become targets, gone ones stop
    /// being probed, and the set's health is brought in line with the checks.
    fn follow(&mut self, set: &Backends<K, S, Pol>) {
        self.epoch += 1;
        let epoch = self.epoch;
        let snapshot = set.snapshot();
        let mut fixes = Vec::new();
        for (key, endpoint) in snapshot.iter() {
            let load = endpoint.load();
            match self.known.get_mut(key) {
                Some(known) if std::ptr::eq(known.load.as_ptr(), Arc::as_ptr(load)) => {
                    known.epoch = epoch;
                }
                Some(known) => {
                    *known = Known {
                        load: Arc::downgrade(load),
                        epoch,
                    };
                    self.check.restart(key);
                }
                None => {
                    self.known.insert(
                        key.clone(),
                        Known {
                            load: Arc::downgrade(load),
                            epoch,
                        },
                    );
                    self.check.command(Command::Insert(key.clone()));
                }
            }
            let healthy = self.check.is_healthy(key).unwrap_or(false);
            if endpoint.passes_health_checks() != healthy {
                fixes.push((key.clone(), healthy));
            }
        }
        let check = &mut self.check;
        self.known.retain(|key, known| {
            let stays = known.epoch == epoch;
            if !stays {
                check.command(Command::Remove(key.clone()));
            }
            stays
        });
        if !fixes.is_empty() {
            // Publishes once more; the next look finds nothing to do.
            set.update(|u| {
                for (key, healthy) in &fixes {
                    u.set_healthy(key, *healthy);
                }
            });
        }
    }

    /// Whether `target` is healthy, as far as the checks know.
    pub fn is_healthy(&self, target: &K) -> Option<bool> {
        self.check.is_healthy(target)
    }

    /// Applies the transitions until the set is dropped, and logs each once it has taken
    /// effect. Spawn it.
    pub async fn drive(mut self) {
        while let Some(t) = self.next().await {
            self.check.log(&t);
        }
    }
}

impl<K, S, Pol, P> Stream for Attached<K, S, Pol, P>
where
    K: Hash + Eq + Clone + fmt::Display + Send + Unpin + 'static,
    S: Clone,
    Pol: Policy,
    P: Probe<K> + Unpin,
{
    type Item = Transition<K>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Transition<K>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        // Changes of the set first, so that no transition applies to a backend that has
        // been replaced meanwhile.
        // The set gone, or other checks attached since: the end.
        let attachment = this.attachment;
        let followed =
            |set: Option<Backends<K, S, Pol>>| set.filter(|set| set.checks_attached(attachment));
        while let Poll::Ready(published) = this.changed.as_mut().poll(cx) {
            let (Some(published), Some(set)) = (published, followed(this.set.upgrade())) else {
                this.done = true;
                return Poll::Ready(None);
            };
            this.changed = Box::pin(changed(published));
            this.follow(&set);
        }
        match this.check.poll_next_unpin(cx) {
            Poll::Ready(Some(t)) => {
                let Some(set) = followed(this.set.upgrade()) else {
                    this.done = true;
                    return Poll::Ready(None);
                };
                set.set_healthy(&t.target, t.healthy);
                Poll::Ready(Some(t))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<K: fmt::Debug, S, Pol: Policy, P> fmt::Debug for Attached<K, S, Pol, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attached")
            .field("check", &self.check)
            .finish_non_exhaustive()
    }
}
