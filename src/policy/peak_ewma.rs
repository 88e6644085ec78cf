//! Power of two random choices, weighed by latency and load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::{Endpoint, Load, Policy, Watch};

/// Picks the cheaper of two healthy backends drawn at random, where a backend's cost is its
/// peak-sensitive moving average of response latency times its requests in flight plus
/// one, divided by its weight: tower's `PeakEwma`, after Finagle's and linkerd's.
///
/// - The average jumps to any latency above it at once (the *peak*), and follows lower
///   ones as an exponentially weighted moving average whose weight depends on the time
///   since the last sample: with the default decay of 10 s, a sample 10 s after the last
///   one counts for 63%.
/// - Between samples the average decays towards zero with the same time constant, so a
///   backend that was slow and is no longer picked is tried again after a while.
/// - A backend without samples starts at the default RTT (30 ms, as linkerd).
///
/// A sample is the time from the pick to the end of the request (for HTTP, the end of the
/// response body), taken when the request's [`InFlight`](crate::balance::InFlight) guard
/// drops. Estimates live in the table, two atomics per backend, and carry over when
/// the table is rebuilt. A pick draws two backends and compares them without reading the
/// clock: O(1).
///
/// ```
/// use std::time::Duration;
/// use tower_lb::{policy::PeakEwma, Backends};
///
/// let policy = PeakEwma::new()
///     .decay(Duration::from_secs(5))
///     .default_rtt(Duration::from_millis(10));
/// let backends = Backends::from_services(policy, [("a", ()), ("b", ())]);
/// assert!(backends.pick(None).is_some());
/// ```
#[derive(Debug, Clone)]
pub struct PeakEwma {
    decay_ns: f64,
    default_rtt_ns: f64,
}

impl Default for PeakEwma {
    fn default() -> Self {
        PeakEwma {
            decay_ns: 10e9,
            default_rtt_ns: 30e6,
        }
    }
}

impl PeakEwma {
    /// A peak-EWMA policy with a decay of 10 s and a default RTT of 30 ms.
    pub fn new() -> Self {
        Self::default()
    }

    /// The time constant of the moving average (at least 1 ms).
    pub fn decay(mut self, decay: Duration) -> Self {
        self.decay_ns = nanos(decay).max(1e6);
        self
    }

    /// The latency assumed for a backend before its first sample (at least 1 µs).
    pub fn default_rtt(mut self, rtt: Duration) -> Self {
        self.default_rtt_ns = nanos(rtt).max(1e3);
        self
    }
}

/// The healthy endpoints of a [`PeakEwma`] policy, with their latency estimates.
#[derive(Debug)]
pub struct PeakEwmaTable {
    estimates: Arc<Estimates>,
    /// The candidates' counters, watched by `estimates` until the table drops.
    loads: Box<[Arc<Load>]>,
}

/// The candidates, each with all that a pick reads of it in one slot.
#[derive(Debug)]
struct Estimates {
    decay_ns: f64,
    slots: Box<[Estimate]>,
}

/// One backend's estimate, kept as a logarithm shifted by time: `ln(rtt) + at / decay`
/// for an estimate of `rtt` nanoseconds set at `at`. Decaying multiplies the estimate by
/// `e^(-elapsed / decay)`, which leaves this key unchanged: the estimate at any time `t` is
/// `e^(key - t / decay)`. So two backends compare by their keys alone and a pick reads no
/// clock; and one atomic holds the whole estimate, so a pick never reads half an update.
#[derive(Debug)]
struct Estimate {
    key: AtomicU64,
    /// When the last sample came (for the moving average's weight), in nanoseconds.
    at: AtomicU64,
    /// A copy of the backend's in-flight count, kept here so that a pick reads one place
    /// per candidate (see `in_flight_changed`).
    in_flight: AtomicUsize,
    weight: f64,
    index: usize,
    id: u64,
}

impl Estimate {
    #[inline]
    fn load(&self) -> f64 {
        (self.in_flight.load(Ordering::Relaxed) + 1) as f64 / self.weight
    }

    #[inline]
    fn key(&self) -> f64 {
        f64::from_bits(self.key.load(Ordering::Relaxed))
    }

    /// The estimate in nanoseconds at `now`, decayed since its last update.
    fn read(&self, now: u64, decay_ns: f64) -> f64 {
        (self.key() - now as f64 / decay_ns).exp()
    }
}

/// The key of an estimate of `rtt_ns` at `now`.
fn key(rtt_ns: f64, now: u64, decay_ns: f64) -> f64 {
    rtt_ns.max(1.0).ln() + now as f64 / decay_ns
}

impl Watch for Estimates {
    fn in_flight_changed(&self, slot: usize, in_flight: &AtomicUsize) {
        // Copy the live count, then check it did not change meanwhile: whoever stores
        // last has seen the count it stored still live afterwards, and any later change
        // is followed by its own store, so the copy settles on the live count.
        let copy = &self.slots[slot].in_flight;
        loop {
            let live = in_flight.load(Ordering::SeqCst);
            copy.store(live, Ordering::SeqCst);
            if in_flight.load(Ordering::SeqCst) == live {
                break;
            }
        }
    }

    fn request_ended(&self, slot: usize, elapsed: Duration) {
        let e = &self.slots[slot];
        let now = now_ns();
        let rtt = nanos(elapsed);
        let current = e.read(now, self.decay_ns);
        let next = if rtt > current {
            rtt
        } else {
            // The sample's weight grows with the time since the previous one.
            let since = now.saturating_sub(e.at.load(Ordering::Relaxed)) as f64;
            let kept = (-since / self.decay_ns).exp();
            current * kept + rtt * (1.0 - kept)
        };
        // Two requests ending at once may each write their own update: one sample is
        // lost, which an average can afford better than a lock on every response.
        let next = key(next, now, self.decay_ns);
        e.key.store(next.to_bits(), Ordering::Relaxed);
        e.at.store(now, Ordering::Relaxed);
    }
}

impl Policy for PeakEwma {
    type Table = PeakEwmaTable;

    fn build(&self, endpoints: &[Endpoint], previous: Option<&PeakEwmaTable>) -> PeakEwmaTable {
        let kept: HashMap<u64, &Estimate> = previous
            .map(|t| t.estimates.slots.iter().map(|e| (e.id, e)).collect())
            .unwrap_or_default();
        let now = now_ns();
        let slots: Box<[Estimate]> = endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_healthy())
            .map(|(index, e)| {
                let (key, at) = match kept.get(&e.id()) {
                    Some(k) => (k.key(), k.at.load(Ordering::Relaxed)),
                    None => (key(self.default_rtt_ns, now, self.decay_ns), now),
                };
                Estimate {
                    key: AtomicU64::new(key.to_bits()),
                    at: AtomicU64::new(at),
                    in_flight: AtomicUsize::new(0),
                    weight: e.ramped_weight() as f64,
                    index,
                    id: e.id(),
                }
            })
            .collect();
        let estimates = Arc::new(Estimates {
            decay_ns: self.decay_ns,
            slots,
        });
        let loads: Box<[Arc<Load>]> = endpoints
            .iter()
            .filter(|e| e.is_healthy())
            .map(|e| e.load().clone())
            .collect();
        let watch: Arc<dyn Watch> = estimates.clone();
        // Register, then copy the counts: a change in between is copied twice, not missed.
        for (slot, load) in loads.iter().enumerate() {
            load.watch(watch.clone(), slot);
            watch.in_flight_changed(slot, &load.in_flight);
        }
        PeakEwmaTable { estimates, loads }
    }

    fn needs_key(&self) -> bool {
        false
    }

    #[inline]
    fn pick(&self, table: &PeakEwmaTable, _: &[Endpoint], _key: Option<u64>) -> Option<usize> {
        let slots = &table.estimates.slots[..];
        let n = slots.len();
        if n <= 1 {
            return slots.first().map(|e| e.index);
        }
        let a = fastrand::usize(..n);
        let b = fastrand::usize(..n - 1);
        let b = if b >= a { b + 1 } else { b };
        // cost = rtt × (in flight + 1) / weight, with rtt = e^(key - now / decay), so
        // cost_a <= cost_b  <=>  e^(key_a - key_b) × load_a <= load_b: no clock needed.
        let (a, b) = (&slots[a], &slots[b]);
        let a_cheaper = (a.key() - b.key()).exp() * a.load() <= b.load();
        Some(if a_cheaper { a.index } else { b.index })
    }
}

impl Drop for PeakEwmaTable {
    fn drop(&mut self) {
        let watch: Arc<dyn Watch> = self.estimates.clone();
        for load in self.loads.iter() {
            load.unwatch(&watch);
        }
    }
}

fn nanos(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

/// Nanoseconds since the first call in this process.
#[inline]
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::{endpoints, set_health};

    fn ended(eps: &[Endpoint], i: usize, elapsed: Duration) {
        eps[i].load().incr();
        eps[i].load().decr(elapsed);
    }

    fn rtt_ms(table: &PeakEwmaTable, slot: usize) -> f64 {
        table.estimates.slots[slot].read(now_ns(), table.estimates.decay_ns) / 1e6
    }

    #[test]
    fn the_slow_backend_loses_its_draws() {
        let eps = endpoints(&[1, 1, 1]);
        let policy = PeakEwma::new();
        let table = policy.build(&eps, None);
        for i in 0..3 {
            let late = if i == 1 { 50 } else { 1 };
            ended(&eps, i, Duration::from_millis(late));
        }
        // A peak is taken at once; a lower sample moves the estimate by its recency only.
        assert!(
            (rtt_ms(&table, 1) - 50.0).abs() < 0.1,
            "{}",
            rtt_ms(&table, 1)
        );
        assert!(rtt_ms(&table, 0) < 30.0);
        for _ in 0..100 {
            assert_ne!(policy.pick(&table, &eps, None), Some(1));
        }
    }

    #[test]
    fn requests_in_flight_weigh() {
        let eps = endpoints(&[1, 1]);
        let policy = PeakEwma::new();
        let table = policy.build(&eps, None);
        // Same latency; 0 has two requests in flight.
        eps[0].load().incr();
        eps[0].load().incr();
        for _ in 0..20 {
            assert_eq!(policy.pick(&table, &eps, None), Some(1));
        }
    }

    #[test]
    fn estimates_decay_and_survive_a_rebuild() {
        let eps = endpoints(&[1, 1]);
        let policy = PeakEwma::new().decay(Duration::from_millis(20));
        let table = policy.build(&eps, None);
        ended(&eps, 0, Duration::from_millis(500));
        let rebuilt = policy.build(&eps, Some(&table));
        drop(table);
        let first = rtt_ms(&rebuilt, 0);
        assert!(first > 100.0, "{first}");
        std::thread::sleep(Duration::from_millis(50));
        // e^(-50/20) < 0.1: the peak has mostly decayed without new samples.
        assert!(rtt_ms(&rebuilt, 0) < first * 0.1);
        // The rebuilt table gets the samples now.
        ended(&eps, 1, Duration::from_secs(1));
        assert!(rtt_ms(&rebuilt, 1) > 900.0);
    }

    #[test]
    fn unhealthy_are_skipped_and_an_empty_set_is_none() {
        let mut eps = endpoints(&[1, 1, 1]);
        set_health(&mut eps, 0, false);
        set_health(&mut eps, 2, false);
        let policy = PeakEwma::new();
        let table = policy.build(&eps, None);
        for _ in 0..10 {
            assert_eq!(policy.pick(&table, &eps, None), Some(1));
        }
        set_health(&mut eps, 1, false);
        let table = policy.build(&eps, None);
        assert_eq!(policy.pick(&table, &eps, None), None);
    }

    #[test]
    fn a_dropped_table_is_freed_and_unwatched() {
        let eps = endpoints(&[1, 1]);
        let policy = PeakEwma::new();
        let table = policy.build(&eps, None);
        // The loads hold the estimates through their hooks until the table drops.
        let estimates = Arc::downgrade(&table.estimates);
        drop(table);
        assert!(
            estimates.upgrade().is_none(),
            "a cycle kept the estimates alive"
        );
        eps[0].load().incr();
        eps[0].load().decr(Duration::from_millis(1));
    }

    #[test]
    fn the_copied_counts_settle_on_the_live_ones_under_concurrent_changes() {
        let eps = Arc::new(endpoints(&[1, 1, 1]));
        let table = PeakEwma::new().build(&eps, None);
        let threads: Vec<_> = (0..4usize)
            .map(|t| {
                let eps = eps.clone();
                std::thread::spawn(move || {
                    for n in 0..20_000usize {
                        let i = (n + t) % 3;
                        eps[i].load().incr();
                        if n % 3 != 0 {
                            eps[i].load().decr(Duration::ZERO);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for (slot, e) in table.estimates.slots.iter().enumerate() {
            assert_eq!(e.in_flight.load(Ordering::SeqCst), eps[slot].in_flight());
        }
    }

    #[test]
    fn weight_divides_the_cost() {
        let eps = endpoints(&[10, 1]);
        let policy = PeakEwma::new();
        let table = policy.build(&eps, None);
        // 0 has five requests in flight, but ten times the weight: 6/10 < 1/1.
        for _ in 0..5 {
            eps[0].load().incr();
        }
        for _ in 0..20 {
            assert_eq!(policy.pick(&table, &eps, None), Some(0));
        }
    }
}
