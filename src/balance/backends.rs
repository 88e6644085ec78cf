use std::fmt;
use std::future::{poll_fn, Future};
use std::hash::Hash;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Poll;

use arc_swap::ArcSwap;
use tower::discover::{Change, Discover};

use super::outlier::{self, Ejection, Hub, PassiveHealth};
use crate::policy::{stable_hash, Endpoint, Load, Policy, RAMP_MIN, RAMP_STEPS};
use crate::stats::Outcome;

/// The set of backends of a [`Balance`](super::Balance): what it can pick from.
///
/// `Backends` is a cheap, cloneable handle. Readers (every request) see an immutable
/// [`Snapshot`] swapped in atomically, so picking never takes a lock; writers (discovery,
/// health checks, configuration reloads) serialize on a mutex, apply their change, rebuild
/// the policy's table and publish a new snapshot.
///
/// A backend is identified by its key `K`. Keys are also what consistent hashing places on
/// its ring, through [`stable_hash`].
///
/// - A removed backend takes no new request; requests already on it keep its service (a
///   clone) and finish. It is dropped when the last of them ends.
/// - Inserting a key that is present replaces its service and keeps its weight, health
///   state and in-flight count.
///
/// # Examples
///
/// ```
/// use tower_lb::{policy::RoundRobin, Backends};
///
/// let backends = Backends::new(RoundRobin::new());
/// backends.update(|set| {
///     set.insert("a", ());
///     set.insert_with("b", (), 2, true);
/// });
/// assert_eq!(backends.pick(None), Some("b")); // smooth weighted: b a b
/// assert_eq!(backends.pick(None), Some("a"));
/// backends.set_healthy(&"b", false);
/// assert_eq!(backends.pick(None), Some("a"));
/// backends.remove(&"a");
/// assert_eq!(backends.pick(None), None);
/// ```
pub struct Backends<K, S, P: Policy> {
    shared: Arc<Shared<K, S, P>>,
}

struct Shared<K, S, P: Policy> {
    snapshot: ArcSwap<Snapshot<K, S, P>>,
    writer: Mutex<Writer<K, S, P>>,
    /// Bumped after every publish, for [`Backends::wait_until`].
    published: tokio::sync::watch::Sender<u64>,
    /// The attachment of health checks that follows the set: a newer one ends the older
    /// (two would each set health back to their own view of it, without end).
    checks: std::sync::atomic::AtomicU64,
}

struct Writer<K, S, P> {
    members: Vec<Member<K, S>>,
    policy: Arc<P>,
    healthy_on_insert: bool,
    /// Names backends in the `metrics` facade (see `label_metrics`).
    metrics_label: Option<fn(&K) -> String>,
    /// Passive health, shared with every backend's `Load`.
    hub: Arc<Hub>,
    /// See [`Backends::slow_start`]; zero: off.
    slow_start: std::time::Duration,
    /// A task republishes the set at each step of a ramp (changed under the lock only).
    ticking: std::sync::atomic::AtomicBool,
    /// Spawns that task, if there is a runtime (set by `slow_start`, where the set's types
    /// are known to be `Send`).
    ticker: Option<Box<dyn Fn() -> bool + Send>>,
}

#[derive(Clone)]
struct Member<K, S> {
    key: K,
    service: S,
    /// As the policy sees it, but for ejection, which publishing adds from `ejection`.
    endpoint: Endpoint,
    ejection: Ejection,
    /// Slow start: when it joined or turned healthy, if that ramps its weight.
    warm_since: Option<tokio::time::Instant>,
    /// It joined before slow start was on: its first turn to healthy takes full weight.
    exempt: bool,
}

impl<K, S> Member<K, S> {
    /// Stamps (or clears) the start of the member's ramp after its health was `was`.
    fn health_changed(&mut self, was: bool, slow_start: std::time::Duration) {
        match (was, self.endpoint.is_healthy()) {
            (false, true) => {
                let exempt = std::mem::take(&mut self.exempt);
                self.warm_since =
                    (!exempt && !slow_start.is_zero()).then(tokio::time::Instant::now);
            }
            (_, false) => self.warm_since = None,
            (true, true) => {}
        }
    }

    /// Twentieths of its weight in force at `now`, and when that next grows (if it does).
    fn ramp(
        &self,
        now: tokio::time::Instant,
        slow_start: std::time::Duration,
    ) -> (u8, Option<tokio::time::Instant>) {
        let Some(since) = self.warm_since else {
            return (RAMP_STEPS, None);
        };
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= slow_start {
            return (RAMP_STEPS, None);
        }
        // Linear from RAMP_MIN to RAMP_STEPS over slow_start, in whole steps; in integers,
        // so that the next step is always after `now`.
        let steps = u128::from(RAMP_STEPS - RAMP_MIN);
        let (elapsed, total) = (elapsed.as_nanos(), slow_start.as_nanos());
        let done = elapsed * steps / total;
        let next = (total * (done + 1)).div_ceil(steps);
        let next = since + std::time::Duration::from_nanos(u64::try_from(next).unwrap_or(u64::MAX));
        (RAMP_MIN + done.min(steps) as u8, Some(next))
    }
}

/// An immutable view of the backend set, as one request sees it.
pub struct Snapshot<K, S, P: Policy> {
    members: Box<[(K, S)]>,
    pub(crate) endpoints: Box<[Endpoint]>,
    policy: Arc<P>,
    pub(crate) table: P::Table,
}

impl<K, S, P: Policy> Snapshot<K, S, P> {
    /// Picks a backend with the policy: its index, or `None` if none can take a request.
    #[inline]
    pub fn pick(&self, key: Option<u64>) -> Option<usize> {
        self.policy.pick(&self.table, &self.endpoints, key)
    }

    /// The key and service of the backend at `index`.
    pub fn get(&self, index: usize) -> Option<(&K, &S)> {
        self.members.get(index).map(|(k, s)| (k, s))
    }

    /// What the policy sees of the backend at `index`.
    pub fn endpoint(&self, index: usize) -> Option<&Endpoint> {
        self.endpoints.get(index)
    }

    /// The number of backends, healthy or not.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Keys and endpoints, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &Endpoint)> {
        self.members
            .iter()
            .map(|(k, _)| k)
            .zip(self.endpoints.iter())
    }

    /// The policy in force.
    pub fn policy(&self) -> &P {
        &self.policy
    }
}

impl<K: fmt::Debug, S, P: Policy + fmt::Debug> fmt::Debug for Snapshot<K, S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("policy", &self.policy)
            .field("backends", &self.iter().collect::<Vec<_>>())
            .finish()
    }
}

/// A batch of changes to a [`Backends`] set, published as one snapshot.
/// See [`Backends::update`].
pub struct Update<'a, K, S, P> {
    writer: &'a mut Writer<K, S, P>,
}

impl<K: Hash + Eq, S, P> Update<'_, K, S, P> {
    fn position(&self, key: &K) -> Option<usize> {
        self.writer.members.iter().position(|m| &m.key == key)
    }

    /// Inserts a backend with weight 1 and the set's initial health
    /// ([`Backends::healthy_on_insert`]); an existing key gets the new service and keeps its
    /// state.
    pub fn insert(&mut self, key: K, service: S) {
        match self.position(&key) {
            Some(i) => self.writer.members[i].service = service,
            None => {
                let healthy = self.writer.healthy_on_insert;
                self.insert_with(key, service, 1, healthy)
            }
        }
    }

    /// Inserts a backend with a weight (at least 1) and a health state; an existing key gets
    /// the new service, weight and health and keeps its in-flight count.
    pub fn insert_with(&mut self, key: K, service: S, weight: u32, healthy: bool) {
        match self.position(&key) {
            Some(i) => {
                let m = &mut self.writer.members[i];
                let was = m.endpoint.is_healthy();
                m.service = service;
                m.endpoint =
                    Endpoint::new(m.endpoint.id(), weight, healthy, m.endpoint.load().clone());
                m.health_changed(was, self.writer.slow_start);
            }
            None => {
                let load = Arc::new(Load::default());
                load.outlier.attach(&self.writer.hub);
                let endpoint = Endpoint::new(stable_hash(&key), weight, healthy, load);
                let mut member = Member {
                    key,
                    service,
                    endpoint,
                    ejection: Ejection::default(),
                    warm_since: None,
                    exempt: self.writer.slow_start.is_zero(),
                };
                member.health_changed(false, self.writer.slow_start);
                self.writer.members.push(member);
            }
        }
    }

    /// Removes a backend; returns whether it was present.
    pub fn remove(&mut self, key: &K) -> bool {
        match self.position(key) {
            Some(i) => {
                self.writer.members.remove(i);
                true
            }
            None => false,
        }
    }

    /// Sets whether a backend is healthy (its active health state; an ejected backend stays
    /// ejected); returns whether it was present.
    pub fn set_healthy(&mut self, key: &K, healthy: bool) -> bool {
        self.modify(key, |e| {
            Endpoint::new(e.id(), e.weight(), healthy, e.load().clone())
        })
    }

    /// Sets a backend's weight (at least 1); returns whether it was present.
    pub fn set_weight(&mut self, key: &K, weight: u32) -> bool {
        self.modify(key, |e| {
            Endpoint::new(e.id(), weight, e.passes_health_checks(), e.load().clone())
        })
    }

    /// Replaces the policy; its table is built from the new set.
    pub fn set_policy(&mut self, policy: P) {
        self.writer.policy = Arc::new(policy);
    }

    /// Whether a backend with this key is in the set.
    pub fn contains(&self, key: &K) -> bool {
        self.position(key).is_some()
    }

    /// The keys in the set, in insertion order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.writer.members.iter().map(|m| &m.key)
    }

    fn modify(&mut self, key: &K, f: impl FnOnce(&Endpoint) -> Endpoint) -> bool {
        match self.position(key) {
            Some(i) => {
                let m = &mut self.writer.members[i];
                let was = m.endpoint.is_healthy();
                m.endpoint = f(&m.endpoint);
                m.health_changed(was, self.writer.slow_start);
                true
            }
            None => false,
        }
    }
}

impl<K, S, P> Backends<K, S, P>
where
    K: Hash + Eq + Clone,
    S: Clone,
    P: Policy,
{
    /// An empty set picking with `policy`. Inserted backends are healthy.
    pub fn new(policy: P) -> Self {
        let policy = Arc::new(policy);
        let writer = Writer {
            members: Vec::new(),
            policy: policy.clone(),
            healthy_on_insert: true,
            metrics_label: None,
            hub: Arc::new(Hub::new()),
            slow_start: std::time::Duration::ZERO,
            ticking: std::sync::atomic::AtomicBool::new(false),
            ticker: None,
        };
        let snapshot = Snapshot {
            members: Box::default(),
            endpoints: Box::default(),
            table: policy.build(&[], None),
            policy,
        };
        Backends {
            shared: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(snapshot),
                writer: Mutex::new(writer),
                published: tokio::sync::watch::Sender::new(0),
                checks: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// A set holding `backends`, each with weight 1.
    pub fn from_services(policy: P, backends: impl IntoIterator<Item = (K, S)>) -> Self {
        let set = Self::new(policy);
        set.update(|u| backends.into_iter().for_each(|(k, s)| u.insert(k, s)));
        set
    }

    /// Sets the health of backends inserted from now on without an explicit state (by
    /// [`Update::insert`] and by discovery). With active health checks this is `false`:
    /// a new backend takes traffic only once a probe has passed.
    pub fn healthy_on_insert(&self, healthy: bool) -> &Self {
        self.lock().healthy_on_insert = healthy;
        self
    }

    /// Names each backend (`label(key)`) in the [`metrics`] facade: its counters are
    /// registered there once, when it joins, under `backend="label"` (see
    /// [`crate::stats`]). Without it, only [`Endpoint::stats`] reads them.
    pub fn label_metrics(&self, label: fn(&K) -> String) -> &Self {
        let mut writer = self.lock();
        writer.metrics_label = Some(label);
        self.publish(&writer);
        self
    }

    /// Applies a batch of changes and publishes the result as one snapshot.
    pub fn update<R>(&self, f: impl FnOnce(&mut Update<'_, K, S, P>) -> R) -> R {
        let mut writer = self.lock();
        let out = f(&mut Update {
            writer: &mut writer,
        });
        self.publish(&writer);
        out
    }

    fn lock(&self) -> MutexGuard<'_, Writer<K, S, P>> {
        // A panic while holding the lock cannot leave the member list half-changed in a way
        // that matters (every change is a single Vec operation), so poisoning is ignored.
        self.shared.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, writer: &Writer<K, S, P>) {
        let now = tokio::time::Instant::now();
        let mut warming = false;
        let endpoints: Box<[Endpoint]> = writer
            .members
            .iter()
            .map(|m| {
                let (ramp, next) = m.ramp(now, writer.slow_start);
                warming |= next.is_some();
                let mut endpoint = m.endpoint.clone().ramped(ramp);
                endpoint.set_ejected(m.ejection.ejected);
                endpoint
            })
            .collect();
        if let Some(label) = writer.metrics_label {
            for (m, endpoint) in writer.members.iter().zip(endpoints.iter()) {
                let stats = &endpoint.load().stats;
                stats.register(|| label(&m.key));
                stats.set_up(endpoint.is_healthy());
            }
        }
        let previous = self.shared.snapshot.load();
        let same_policy = Arc::ptr_eq(&previous.policy, &writer.policy);
        let table = writer
            .policy
            .build(&endpoints, same_policy.then_some(&previous.table));
        let snapshot = Snapshot {
            members: writer
                .members
                .iter()
                .map(|m| (m.key.clone(), m.service.clone()))
                .collect(),
            endpoints,
            policy: writer.policy.clone(),
            table,
        };
        self.shared.snapshot.store(Arc::new(snapshot));
        self.shared.published.send_modify(|n| *n += 1);
        if warming {
            self.tick_ramps(writer);
        }
    }

    /// Starts the task that republishes the set at each step of a ramp, unless it runs.
    fn tick_ramps(&self, writer: &Writer<K, S, P>) {
        use std::sync::atomic::Ordering;
        if writer.ticking.load(Ordering::Relaxed) {
            return;
        }
        if let Some(start) = &writer.ticker {
            writer.ticking.store(start(), Ordering::Relaxed);
        }
    }

    /// Waits until `condition` holds for the current snapshot, re-checking after every
    /// change. For instance, to wait for a first healthy backend before taking traffic:
    ///
    /// ```
    /// # use tower_lb::{policy::RoundRobin, Backends};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let backends = Backends::new(RoundRobin::new());
    /// backends.healthy_on_insert(false).insert("a", ());
    /// let waiting = tokio::spawn({
    ///     let backends = backends.clone();
    ///     async move { backends.wait_until(|s| s.iter().any(|(_, e)| e.is_healthy())).await }
    /// });
    /// backends.set_healthy(&"a", true);
    /// waiting.await.unwrap();
    /// # }
    /// ```
    pub async fn wait_until(&self, mut condition: impl FnMut(&Snapshot<K, S, P>) -> bool) {
        let mut published = self.shared.published.subscribe();
        loop {
            if condition(&self.shared.snapshot.load()) {
                return;
            }
            // The sender lives as long as `self`: this cannot fail while we wait.
            if published.changed().await.is_err() {
                return;
            }
        }
    }

    /// A receiver that sees every snapshot published from now on, for followers of the
    /// set such as attached health checks. It closes when the set is dropped.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.published.subscribe()
    }

    /// Resolves once the set is dropped, without keeping it alive: for followers that
    /// would otherwise wait on something else for good.
    pub(crate) fn dropped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut published = self.subscribe();
        async move { while published.changed().await.is_ok() {} }
    }

    /// Resolves once the set is dropped or health checks other than `attachment` (from
    /// [`attach_checks`](Self::attach_checks)) follow it, without keeping it alive.
    pub(crate) fn detached(&self, attachment: u64) -> impl Future<Output = ()> {
        let mut published = self.subscribe();
        let shared = Arc::downgrade(&self.shared);
        async move {
            // Looked at before the first wait too: checks attached after `attachment` and
            // before the subscription above changed nothing it would see.
            loop {
                let followed = shared.upgrade().is_some_and(|shared| {
                    shared.checks.load(std::sync::atomic::Ordering::Acquire) == attachment
                });
                if !followed || published.changed().await.is_err() {
                    return;
                }
            }
        }
    }

    /// A handle that does not keep the set alive.
    pub(crate) fn downgrade(&self) -> WeakBackends<K, S, P> {
        WeakBackends {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// Inserts a backend (see [`Update::insert`]).
    pub fn insert(&self, key: K, service: S) {
        self.update(|u| u.insert(key, service))
    }

    /// Inserts a backend with a weight and health (see [`Update::insert_with`]).
    pub fn insert_with(&self, key: K, service: S, weight: u32, healthy: bool) {
        self.update(|u| u.insert_with(key, service, weight, healthy))
    }

    /// Removes a backend; returns whether it was present.
    pub fn remove(&self, key: &K) -> bool {
        self.update(|u| u.remove(key))
    }

    /// Sets whether a backend is healthy (its active health state, apart from ejection);
    /// returns whether it was present. Nothing is published when the state does not change.
    pub fn set_healthy(&self, key: &K, healthy: bool) -> bool {
        if self.is_healthy(key) == Some(healthy) {
            return true;
        }
        self.update(|u| u.set_healthy(key, healthy))
    }

    /// Sets a backend's weight; returns whether it was present.
    pub fn set_weight(&self, key: &K, weight: u32) -> bool {
        self.update(|u| u.set_weight(key, weight))
    }

    /// Replaces the policy.
    pub fn set_policy(&self, policy: P) {
        self.update(|u| u.set_policy(policy))
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot<K, S, P>> {
        self.shared.snapshot.load_full()
    }

    /// Runs `f` on the current snapshot without taking a reference count: the request path.
    #[inline]
    pub(crate) fn with_snapshot<R>(&self, f: impl FnOnce(&Snapshot<K, S, P>) -> R) -> R {
        f(&self.shared.snapshot.load())
    }

    /// Picks a backend for a request with this hashing key, and returns its key. The pick
    /// counts for the policy (a round-robin turn is used) but starts no request.
    pub fn pick(&self, key: Option<u64>) -> Option<K> {
        self.with_snapshot(|s| s.pick(key).map(|i| s.members[i].0.clone()))
    }

    /// Whether a backend is healthy (its active health state, ejected or not), or `None` if
    /// it is not in the set.
    pub fn is_healthy(&self, key: &K) -> Option<bool> {
        self.find(key, Endpoint::passes_health_checks)
    }

    /// Whether passive health has ejected a backend, or `None` if it is not in the set.
    pub fn is_ejected(&self, key: &K) -> Option<bool> {
        self.find(key, Endpoint::is_ejected)
    }

    /// Requests in flight on a backend in the set, or `None` if it is not in the set.
    pub fn in_flight(&self, key: &K) -> Option<usize> {
        self.find(key, Endpoint::in_flight)
    }

    fn find<R>(&self, key: &K, f: impl FnOnce(&Endpoint) -> R) -> Option<R> {
        self.with_snapshot(|s| s.iter().find(|(k, _)| *k == key).map(|(_, e)| f(e)))
    }

    /// Follows a [`Discover`] stream until it ends, or until the set is dropped:
    /// `Change::Insert` inserts (or replaces) a backend, `Change::Remove` removes it. The
    /// future holds the set weakly, so a stream that never ends (DNS) does not keep the set
    /// and its health checks alive after the balancer is gone: spawn it as it is,
    /// `tokio::spawn(backends.discover(dns))`, rather than in a task that owns a clone of the
    /// set. The balancer keeps serving from the latest snapshot meanwhile.
    ///
    /// ```
    /// use tower::discover::Change;
    /// use tower_lb::{policy::RoundRobin, Backends};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let backends = Backends::<&str, (), _>::new(RoundRobin::new());
    /// let changes = futures::stream::iter([
    ///     Ok::<_, std::convert::Infallible>(Change::Insert("a", ())),
    ///     Ok(Change::Insert("b", ())),
    ///     Ok(Change::Remove("a")),
    /// ]);
    /// backends.discover(changes).await.unwrap();
    /// assert_eq!(backends.snapshot().len(), 1);
    /// # }
    /// ```
    pub fn discover<D>(&self, discover: D) -> impl Future<Output = Result<(), D::Error>>
    where
        D: Discover<Key = K, Service = S>,
    {
        let set = self.downgrade();
        let gone = self.dropped();
        async move {
            let mut discover = pin!(discover);
            let mut gone = pin!(gone);
            loop {
                let change = poll_fn(|cx| {
                    if gone.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    discover.as_mut().poll_discover(cx)
                })
                .await;
                let Some(change) = change else {
                    return Ok(());
                };
                let change = change?;
                let Some(set) = set.upgrade() else {
                    return Ok(());
                };
                match change {
                    Change::Insert(key, service) => set.insert(key, service),
                    Change::Remove(key) => {
                        set.remove(&key);
                    }
                }
            }
        }
    }
}

impl<K, S, P: Policy> Backends<K, S, P> {
    /// Makes newly attached health checks the ones that follow the set, and wakes the
    /// followers, so that earlier checks see at once that they are no longer.
    pub(crate) fn attach_checks(&self) -> u64 {
        let attachment = self
            .shared
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        self.shared.published.send_modify(|n| *n += 1);
        attachment
    }

    /// Whether `attachment` (from [`attach_checks`](Self::attach_checks)) is the latest.
    pub(crate) fn checks_attached(&self, attachment: u64) -> bool {
        self.shared
            .checks
            .load(std::sync::atomic::Ordering::Acquire)
            == attachment
    }
}

/// Slow start needs a task, hence a set that can move across threads.
impl<K, S, P> Backends<K, S, P>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    S: Clone + Send + Sync + 'static,
    P: Policy,
{
    /// Puts passive health (outlier ejection, see [`outlier`](super::outlier)) in force
    /// with `settings`, for the requests that end from now on; off in a new set. Every
    /// backend's failure count starts again at zero. Turning it off
    /// ([`PassiveHealth::off`]) ends every ejection at once; other changes apply from the
    /// next ejection.
    ///
    /// An ejection ends on a timer: a task on the tokio runtime of the request that caused
    /// it, or a thread outside a runtime. That timer holds the set weakly, hence the
    /// `Send + Sync` keys and services (`tower::util::BoxCloneSyncService` rather than
    /// `BoxCloneService`).
    pub fn passive_health(&self, settings: PassiveHealth) -> &Self {
        let mut writer = self.lock();
        let on = settings.is_on();
        let set = self.downgrade();
        writer.hub.configure(settings, || {
            Box::new(move |load: &Arc<Load>| {
                if let Some(set) = set.upgrade() {
                    set.eject(load);
                }
            })
        });
        let now = tokio::time::Instant::now();
        let mut returned = false;
        for m in &mut writer.members {
            m.endpoint.load().outlier.reset();
            if !on && m.ejection.ejected {
                m.ejection.end(now);
                returned = true;
            }
        }
        if returned {
            self.publish(&writer);
        }
        self
    }

    /// Ejects the backend of `load`, whose failures in a row reached the threshold, unless
    /// it is ejected already or as many backends as allowed are.
    fn eject(&self, load: &Arc<Load>) {
        let mut writer = self.lock();
        // Counted again from zero, ejected or not: no lock per failure while refused.
        load.outlier.reset();
        let settings = writer.hub.settings().clone();
        if !settings.is_on() {
            return;
        }
        let cap = settings.cap(writer.members.len());
        let ejected = writer.members.iter().filter(|m| m.ejection.ejected).count();
        let label = writer.metrics_label;
        let Some(m) = writer
            .members
            .iter_mut()
            .find(|m| Arc::ptr_eq(m.endpoint.load(), load))
        else {
            return;
        };
        if m.ejection.ejected {
            return;
        }
        let name = label.map(|l| l(&m.key)).unwrap_or_default();
        if ejected >= cap {
            tracing::debug!(backend = %name, ejected, "not ejected: as many backends as allowed are");
            return;
        }
        let duration = m.ejection.start(&settings, tokio::time::Instant::now());
        let (generation, in_a_row) = (m.ejection.generation, m.ejection.in_a_row);
        tracing::warn!(backend = %name, ?duration, in_a_row, "backend ejected: failed requests in a row");
        load.stats.ejected();
        self.publish(&writer);
        drop(writer);
        let (set, load) = (self.downgrade(), Arc::downgrade(load));
        outlier::after(duration, move || {
            if let (Some(set), Some(load)) = (set.upgrade(), load.upgrade()) {
                set.end_ejection(&load, generation);
            }
        });
    }

    /// Ends the ejection `generation` of the backend of `load`, if it still lasts.
    fn end_ejection(&self, load: &Arc<Load>, generation: u64) {
        let mut writer = self.lock();
        let label = writer.metrics_label;
        let Some(m) = writer
            .members
            .iter_mut()
            .find(|m| Arc::ptr_eq(m.endpoint.load(), load))
        else {
            return;
        };
        if !m.ejection.ejected || m.ejection.generation != generation {
            return;
        }
        m.ejection.end(tokio::time::Instant::now());
        load.outlier.reset();
        let name = label.map(|l| l(&m.key)).unwrap_or_default();
        tracing::info!(backend = %name, "backend back from ejection");
        self.publish(&writer);
    }

    /// Slow start: turns a weight up step by step, from a tenth to all of it over
    /// `duration`, for each backend that joins or turns healthy from now on (round robin,
    /// least connections and peak EWMA; hashing ignores weights). Backends in the set now
    /// take their full weight when they first turn healthy: call this after inserting the
    /// backends there at start. Zero (the default) turns it off.
    ///
    /// The ramp advances in 18 steps (a twentieth of the weight each); at each step the
    /// set republishes its snapshot from a task on the tokio runtime, so that picks pay
    /// nothing for it. Without a runtime the ramp advances at the set's next change.
    /// [`Endpoint::is_warming`] tells which backends are ramping.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_lb::{policy::RoundRobin, Backends};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let backends = Backends::from_services(RoundRobin::new(), [("a", ())]);
    /// backends.slow_start(Duration::from_secs(30));
    /// backends.insert("b", ()); // joins after the start: ramps
    /// let snapshot = backends.snapshot();
    /// assert!(!snapshot.endpoint(0).unwrap().is_warming());
    /// assert_eq!(snapshot.endpoint(1).unwrap().warmup(), Some(0.1));
    /// # }
    /// ```
    pub fn slow_start(&self, duration: std::time::Duration) -> &Self {
        let mut writer = self.lock();
        writer.slow_start = duration;
        if writer.ticker.is_none() {
            let weak = self.downgrade();
            writer.ticker = Some(Box::new(move || {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return false;
                };
                runtime.spawn(Self::tick(WeakBackends {
                    shared: weak.shared.clone(),
                }));
                true
            }));
        }
        self.publish(&writer);
        self
    }

    /// Republishes the set at each step of a ramp, until none is left.
    async fn tick(weak: WeakBackends<K, S, P>) {
        use std::sync::atomic::Ordering;
        loop {
            // The next step of any ramp; with none left the task ends, under the lock, so
            // that a publish from then on starts another one.
            let next = {
                let Some(backends) = weak.upgrade() else {
                    return;
                };
                let writer = backends.lock();
                let now = tokio::time::Instant::now();
                let next = writer
                    .members
                    .iter()
                    .filter_map(|m| m.ramp(now, writer.slow_start).1)
                    .min();
                if next.is_none() {
                    writer.ticking.store(false, Ordering::Relaxed);
                }
                next
            };
            let Some(next) = next else { return };
            tokio::time::sleep_until(next).await;
            let Some(backends) = weak.upgrade() else {
                return;
            };
            let writer = backends.lock();
            // This publish finds `ticking` set and leaves the next step to this loop.
            backends.publish(&writer);
        }
    }
}

/// A [`Backends`] handle that does not keep the set alive.
pub(crate) struct WeakBackends<K, S, P: Policy> {
    shared: Weak<Shared<K, S, P>>,
}

impl<K, S, P: Policy> WeakBackends<K, S, P> {
    /// The set, unless every [`Backends`] handle has been dropped.
    pub(crate) fn upgrade(&self) -> Option<Backends<K, S, P>> {
        self.shared.upgrade().map(|shared| Backends { shared })
    }
}

impl<K, S, P: Policy> Clone for Backends<K, S, P> {
    fn clone(&self) -> Self {
        Backends {
            shared: self.shared.clone(),
        }
    }
}

impl<K: fmt::Debug, S, P: Policy + fmt::Debug> fmt::Debug for Backends<K, S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Backends")
            .field(&*self.shared.snapshot.load())
            .finish()
    }
}

impl<K: fmt::Debug, S, P> fmt::Debug for Update<'_, K, S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.writer.members.iter().map(|m| (&m.key, &m.endpoint)))
            .finish()
    }
}

/// Counts one request in flight on a backend until dropped.
///
/// The balancer creates one per request at the pick and hands it to its
/// [`TrackCompletion`](tower::load::completion::TrackCompletion), which decides how long
/// the request lasts: until the response for `CompleteOnResponse`, until the end of the
/// response body for [`proxy::TrackBody`](crate::proxy::TrackBody).
pub struct InFlight {
    load: Arc<Load>,
    // The backend's counters (crate::stats): when the request started and how it ended.
    start: std::time::Instant,
    outcome: Outcome,
    // For passive health, without a status: `Some(true)` failed, `Some(false)` answered.
    verdict: Option<bool>,
}

impl InFlight {
    pub(crate) fn new(load: &Arc<Load>) -> Self {
        load.incr();
        load.stats.started();
        InFlight {
            load: load.clone(),
            start: std::time::Instant::now(),
            outcome: Outcome::Pending,
            verdict: None,
        }
    }

    /// Records the status of the backend's response, counted by class when the request
    /// ends (see [`crate::stats`]).
    #[inline]
    pub fn respond(&mut self, status: u16) {
        self.outcome = Outcome::Status(status);
    }

    /// Records that the backend failed the request with `error` (no connection, no
    /// response); passive health classifies the error now.
    #[inline]
    pub(crate) fn fail(&mut self, error: &(dyn std::error::Error + Send + Sync + 'static)) {
        self.outcome = Outcome::Failed;
        self.verdict = self.load.outlier.classify_error(error);
    }

    /// Records that the backend answered (a success for passive health, unless
    /// [`respond`](Self::respond) gives a status to classify).
    #[inline]
    pub(crate) fn answered(&mut self) {
        self.verdict = Some(false);
        if self.outcome == Outcome::Pending {
            // Not cancelled, whether or not a status follows.
            self.outcome = Outcome::Answered;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        self.load.decr(elapsed);
        self.load.stats.ended(self.outcome, elapsed);
        let status = match self.outcome {
            Outcome::Status(status) => Some(status),
            _ => None,
        };
        outlier::record(&self.load, status, self.verdict);
    }
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight").finish_non_exhaustive()
    }
}

impl<K, S: Clone, P: Policy> Snapshot<K, S, P> {
    /// Starts a request on the backend at `index`: its service, in-flight guard and id.
    #[inline]
    pub(crate) fn start(&self, index: usize) -> (S, InFlight, u64) {
        let endpoint = &self.endpoints[index];
        (
            self.members[index].1.clone(),
            InFlight::new(endpoint.load()),
            endpoint.id(),
        )
    }
}

impl<K: Hash + Eq, S, P> Update<'_, K, S, P> {
    /// Removes a backend, as [`remove`](Update::remove) does, and returns a [`Drain`] to
    /// wait until the requests still in flight on it have ended; `None` if it was not in
    /// the set.
    pub fn remove_draining(&mut self, key: &K) -> Option<Drain> {
        let i = self.position(key)?;
        let member = self.writer.members.remove(i);
        Some(Drain {
            load: member.endpoint.load().clone(),
        })
    }
}

/// The requests in flight on a removed backend: see [`Update::remove_draining`].
///
/// A request counts from its pick until its [`InFlight`] guard drops (for HTTP, the end of
/// the response body), so once [`drained`](Drain::drained) returns nothing of the backend
/// is in use and it can be shut down: a server stopped only then closes no connection
/// that a request is about to use.
///
/// ```
/// use tower_lb::{policy::RoundRobin, Backends};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let backends = Backends::from_services(RoundRobin::new(), [("a", ())]);
/// let drain = backends.update(|set| set.remove_draining(&"a")).unwrap();
/// assert_eq!(drain.in_flight(), 0);
/// drain.drained().await; // at once: nothing was in flight
/// # }
/// ```
pub struct Drain {
    load: Arc<Load>,
}

impl Drain {
    /// Requests still in flight on the removed backend.
    pub fn in_flight(&self) -> usize {
        self.load.get()
    }

    /// Returns once no request is in flight on the removed backend. Once the removal is
    /// published no pick can choose it (only a pick already under way on the set as it
    /// was, for the nanoseconds between reading the set and counting the request), so the
    /// count only goes down; it is checked at intervals growing from 1 ms to 100 ms.
    pub async fn drained(self) {
        let mut pause = std::time::Duration::from_millis(1);
        while self.in_flight() > 0 {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(100));
        }
    }
}

impl fmt::Debug for Drain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("in_flight", &self.in_flight())
            .finish()
    }
}
