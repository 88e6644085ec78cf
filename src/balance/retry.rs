use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::time::Instant;

/// How many further backends one request may be tried on, under a budget: the retry
/// setting of a [`Balance`](super::Balance).
///
/// A request is tried on another backend when its backend failed before acting on it: its
/// readiness failed (for HTTP: the connection was refused or timed out), or it gave the
/// request back with [`Unsent`](super::error::Unsent). Each retry goes to a backend the
/// request has not tried yet, and only while the budget allows it: over the last 10
/// seconds, retries may number the larger of `budget` percent of the requests and 3 a
/// second (30), so that retries cannot multiply the load of an outage.
///
/// `Retries` is a cheap handle: the balancer and all its clones share one, and a change
/// ([`set_retries`](Self::set_retries), [`set_budget`](Self::set_budget)) applies to the
/// next request, as a configuration reload wants.
///
/// The default is one retry and a budget of 20 percent.
///
/// ```
/// use tower::{service_fn, ServiceExt};
/// use tower_lb::balance::{error::Unsent, Retries};
/// use tower_lb::{policy::RoundRobin, Backends, Balance, BoxError};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
/// let down = service_fn(|req: u32| async move {
///     Err::<u32, BoxError>(Box::new(Unsent::new(req, "connection reset")))
/// });
/// let up = service_fn(|req: u32| async move { Ok::<_, BoxError>(req) });
/// let backends = Backends::from_services(
///     RoundRobin::new(),
///     [("a", down.clone().boxed_clone()), ("b", down.boxed_clone()), ("c", up.boxed_clone())],
/// );
/// let retries = Retries::new(2).budget(10.0);
/// let lb = Balance::new(backends).with_retries(retries.clone());
/// assert_eq!(lb.clone().oneshot(1).await?, 1); // a, then b, then c
///
/// retries.set_retries(0); // live: the next request is not retried
/// assert!(lb.oneshot(2).await.is_err());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Retries {
    shared: Arc<Shared>,
}

struct Shared {
    retries: AtomicU32,
    /// The budget in percent, as `f64` bits.
    percent: AtomicU64,
    budget: Budget,
}

impl Retries {
    /// Up to `retries` further backends per request (0 turns retries off), with a budget of
    /// 20 percent.
    pub fn new(retries: u32) -> Self {
        Retries {
            shared: Arc::new(Shared {
                retries: AtomicU32::new(retries),
                percent: AtomicU64::new(20f64.to_bits()),
                budget: Budget::new(),
            }),
        }
    }

    /// No retries.
    pub fn none() -> Self {
        Self::new(0)
    }

    /// Sets the budget: retries may number `percent` percent of the requests of the last
    /// 10 seconds, and at least 3 a second. Negative or not a number counts as 0.
    pub fn budget(self, percent: f64) -> Self {
        self.set_budget(percent);
        self
    }

    /// Changes the number of retries of the requests that start from now on.
    pub fn set_retries(&self, retries: u32) {
        self.shared.retries.store(retries, Ordering::Relaxed);
    }

    /// Changes the budget (see [`budget`](Self::budget)); the requests and retries already
    /// counted stay counted.
    pub fn set_budget(&self, percent: f64) {
        let percent = if percent.is_nan() {
            0.0
        } else {
            percent.max(0.0)
        };
        self.shared
            .percent
            .store(percent.to_bits(), Ordering::Relaxed);
    }

    /// Further backends a request may be tried on.
    pub fn retries(&self) -> u32 {
        self.shared.retries.load(Ordering::Relaxed)
    }

    /// The budget, in percent of the requests.
    pub fn budget_percent(&self) -> f64 {
        f64::from_bits(self.shared.percent.load(Ordering::Relaxed))
    }

    /// Counts a request; returns the retries it may have (0: none, and it is not counted).
    #[inline]
    pub(crate) fn start(&self) -> u32 {
        let retries = self.retries();
        if retries > 0 {
            self.shared.budget.request();
        }
        retries
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub(crate) fn withdraw(&self) -> bool {
        self.shared.budget.retry(self.budget_percent())
    }
}

impl Default for Retries {
    fn default() -> Self {
        Self::new(1)
    }
}

impl fmt::Debug for Retries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retries")
            .field("retries", &self.retries())
            .field("budget_percent", &self.budget_percent())
            .finish()
    }
}

/// Seconds in the budget's window.
const WINDOW: u32 = 10;
/// Retries a second that the budget always allows.
const MIN_PER_SECOND: u64 = 3;

/// Requests and retries of the last [`WINDOW`] seconds, one slot per second, without a
/// lock: a slot holds its second (high 32 bits) and its count (low 32 bits), and is
/// restarted by the first event of a new second. Counting a request is one load and one
/// addition (a compare-and-swap once a second); only a retry reads the window.
///
/// (`tower::retry::budget::TpsBudget` adds the minimum to the percentage rather than
/// taking the larger of the two, and takes a lock on every deposit.)
struct Budget {
    start: Instant,
    requests: [AtomicU64; WINDOW as usize],
    retries: [AtomicU64; WINDOW as usize],
}

impl Budget {
    fn new() -> Self {
        Budget {
            start: Instant::now(),
            requests: Default::default(),
            retries: Default::default(),
        }
    }

    fn second(&self) -> u32 {
        u32::try_from(self.start.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    #[inline]
    fn request(&self) {
        let second = self.second();
        bump(&self.requests[(second % WINDOW) as usize], second);
    }

    fn retry(&self, percent: f64) -> bool {
        let second = self.second();
        let requests = sum(&self.requests, second);
        let retries = sum(&self.retries, second);
        let share = (requests as f64 * percent / 100.0) as u64;
        let allowed = share.max(MIN_PER_SECOND * u64::from(WINDOW));
        if retries >= allowed {
            return false;
        }
        bump(&self.retries[(second % WINDOW) as usize], second);
        true
    }
}

fn bump(slot: &AtomicU64, second: u32) {
    let current = slot.load(Ordering::Relaxed);
    if (current >> 32) as u32 == second {
        slot.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let fresh = (u64::from(second) << 32) | 1;
    if slot
        .compare_exchange(current, fresh, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        // Another thread restarted the slot (or counted in it) first: count in it.
        slot.fetch_add(1, Ordering::Relaxed);
    }
}

/// The counts of the slots of the last `WINDOW` seconds up to `second`.
fn sum(slots: &[AtomicU64], second: u32) -> u64 {
    slots
        .iter()
        .map(|slot| slot.load(Ordering::Relaxed))
        .filter(|v| second.wrapping_sub((v >> 32) as u32) < WINDOW)
        .map(|v| v & u64::from(u32::MAX))
        .sum()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_budget_is_the_larger_of_the_share_and_three_a_second() {
        // Few requests: 30 retries in 10 s, whatever the percentage.
        let r = Retries::new(1).budget(20.0);
        for _ in 0..10 {
            assert_eq!(r.start(), 1);
        }
        assert_eq!((0..100).filter(|_| r.withdraw()).count(), 30);

        // Many requests: 20 percent of them.
        let r = Retries::new(1).budget(20.0);
        for _ in 0..1000 {
            r.start();
        }
        assert_eq!((0..1000).filter(|_| r.withdraw()).count(), 200);

        // Retries off: requests are not even counted.
        let r = Retries::none();
        assert_eq!(r.start(), 0);
        assert_eq!(
            r.shared
                .budget
                .requests
                .iter()
                .map(|s| s.load(Ordering::Relaxed))
                .sum::<u64>(),
            0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides() {
        let r = Retries::new(1).budget(0.0);
        assert_eq!((0..40).filter(|_| r.withdraw()).count(), 30);
        // 5 s later the 30 retries are still in the window.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!r.withdraw());
        // 10 s after them, they have left it.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!((0..40).filter(|_| r.withdraw()).count(), 30);

        // Requests age out too.
        let r = Retries::new(1).budget(50.0);
        for _ in 0..200 {
            r.start();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!((0..200).filter(|_| r.withdraw()).count(), 30);
    }

    #[tokio::test]
    async fn each_retry_goes_to_a_backend_not_tried_yet() {
        use std::sync::Mutex;
        use tower::{service_fn, ServiceExt};

        use crate::balance::error::Unsent;
        use crate::policy::RoundRobin;
        use crate::{Backends, Balance, BoxError};

        let tried = Arc::new(Mutex::new(Vec::new()));
        let gives_back = |name: &'static str| {
            let tried = tried.clone();
            service_fn(move |req: u32| {
                tried.lock().unwrap().push(name);
                async move { Err::<u32, BoxError>(Box::new(Unsent::new(req, "reset"))) }
            })
            .boxed_clone()
        };
        let backends = Backends::from_services(
            RoundRobin::new(),
            [
                ("a", gives_back("a")),
                ("b", gives_back("b")),
                ("c", gives_back("c")),
            ],
        );
        let retries = Retries::new(5);
        let lb = Balance::new(backends).with_retries(retries.clone());
        // Five retries allowed, three backends: each is tried once, then the request fails.
        for _ in 0..3 {
            assert!(lb.clone().oneshot(1).await.is_err());
            let mut once = std::mem::take(&mut *tried.lock().unwrap());
            once.sort();
            assert_eq!(once, ["a", "b", "c"]);
        }
        retries.set_retries(1);
        assert!(lb.oneshot(1).await.is_err());
        assert_eq!(tried.lock().unwrap().len(), 2);
    }

    #[test]
    fn settings_change_live() {
        let r = Retries::default();
        assert_eq!((r.retries(), r.budget_percent()), (1, 20.0));
        let clone = r.clone();
        clone.set_retries(3);
        clone.set_budget(f64::NAN);
        assert_eq!((r.retries(), r.budget_percent()), (3, 0.0));
    }
}
