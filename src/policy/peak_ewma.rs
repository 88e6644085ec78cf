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

/// The candidates, each with all that a pick reads of it in one slot, and apart what only
/// samples and rebuilds read: a pick touches 32 bytes per candidate, two slots a cache
/// line.
#[derive(Debug)]
struct Estimates {
    decay_ns: f64,
    slots: Box<[Estimate]>,
    /// Per slot: when the last sample came (for the moving average's weight), in
    /// nanoseconds.
    at: Box<[AtomicU64]>,
    /// Per slot: the endpoint's id, to carry the estimate over a rebuild.
    ids: Box<[u64]>,
}

/// One backend's estimate, kept as a logarithm shifted by time: `ln(rtt) + at / decay`
/// for an estimate of `rtt` nanoseconds set at `at`. Decaying multiplies the estimate by
/// `e^(-elapsed / decay)`, which leaves this key unchanged: the estimate at any time `t` is
/// `e^(key - t / decay)`. So two backends compare by their keys alone and a pick reads no
/// clock; and one atomic holds the whole estimate, so a pick never reads half an update.
///
/// Aligned so that a slot never straddles two cache lines: a pick among many backends
/// then misses the cache once per candidate, not twice.
#[derive(Debug)]
#[repr(align(32))]
struct Estimate {
    key: AtomicU64,
    /// A copy of the backend's in-flight count, kept here so that a pick reads one place
    /// per candidate (see `in_flight_changed`).
    in_flight: AtomicUsize,
    weight: f64,
    index: usize,
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
        let (e, at) = (&self.slots[slot], &self.at[slot]);
        let now = now_ns();
        let rtt = nanos(elapsed);
        let current = e.read(now, self.decay_ns);
        let next = if rtt > current {
            rtt
        } else {
            // The sample's weight grows with the time since the previous one.
            let since = now.saturating_sub(at.load(Ordering::Relaxed)) as f64;
            let kept = (-since / self.decay_ns).exp();
            current * kept + rtt * (1.0 - kept)
        };
        // Two requests ending at once may each write their own update: one sample is
        // lost, which an average can afford better than a lock on every response.
        let next = key(next, now, self.decay_ns);
        e.key.store(next.to_bits(), Ordering::Relaxed);
        at.store(now, Ordering::Relaxed);
    }
}

impl Policy for PeakEwma {
    type Table = PeakEwmaTable;

    fn build(&self, endpoints: &[Endpoint], previous: Option<&PeakEwmaTable>) -> PeakEwmaTable {
        // Each kept estimate: its key and the time of its last sample.
        let kept: HashMap<u64, (f64, u64)> = previous
            .map(|t| {
                let e = &t.estimates;
                let kept = e
                    .slots
                    .iter()
                    .zip(&e.at[..])
                    .map(|(slot, at)| (slot.key(), at.load(Ordering::Relaxed)));
                e.ids.iter().copied().zip(kept).collect()
            })
            .unwrap_or_default();
        let now = now_ns();
        let healthy = || endpoints.iter().enumerate().filter(|(_, e)| e.is_healthy());
        let (mut slots, mut at, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        for (index, e) in healthy() {
            let (key, sampled) = kept
                .get(&e.id())
                .copied()
                .unwrap_or_else(|| (key(self.default_rtt_ns, now, self.decay_ns), now));
            slots.push(Estimate {
                key: AtomicU64::new(key.to_bits()),
                in_flight: AtomicUsize::new(0),
                weight: e.ramped_weight() as f64,
                index,
            });
            at.push(AtomicU64::new(sampled));
            ids.push(e.id());
        }
        let estimates = Arc::new(Estimates {
            decay_ns: self.decay_ns,
            slots: slots.into(),
            at: at.into(),
            ids: ids.into(),
        });
        let loads: Box<[Arc<Load>]> = healthy().map(|(_, e)| e.load().clone()).collect();
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
        let (a, b) = two_slots(n);
        // cost = rtt × (in flight + 1) / weight, with rtt = e^(key - now / decay), so
        // cost_a <= cost_b  <=>  e^(key_a - key_b) × load_a <= load_b: no clock needed.
        let (a, b) = (&slots[a], &slots[b]);
        let a_cheaper = no_dearer(a.key() - b.key(), a.load(), b.load());
        Some(if a_cheaper { a.index } else { b.index })
    }
}

/// Two distinct slots out of `n` (at least 2), every ordered pair equally likely: the
/// first out of `n`, the second out of the `n - 1` others. Both come from one 64-bit draw,
/// each half mapped to its range by Lemire's multiply-and-shift, with his rejection step
/// so that no slot is favoured.
#[inline]
fn two_slots(n: usize) -> (usize, usize) {
    let Ok(n) = u32::try_from(n) else {
        let a = fastrand::usize(..n);
        let b = fastrand::usize(..n - 1);
        return (a, if b >= a { b + 1 } else { b });
    };
    let r = fastrand::u64(..);
    let a = below(r as u32, n);
    let b = below((r >> 32) as u32, n - 1);
    let b = if b >= a { b + 1 } else { b };
    (a as usize, b as usize)
}

/// A uniform draw below `n` (at least 1) from the random `x`, drawing again only in the
/// rare case (`n` in 2^32) where `x` falls in the part of its range that would favour
/// some results (Lemire, "Fast random integer generation in an interval", 2019).
#[inline]
fn below(x: u32, n: u32) -> u32 {
    let mut m = u64::from(x) * u64::from(n);
    if (m as u32) < n {
        let threshold = n.wrapping_neg() % n;
        while (m as u32) < threshold {
            m = u64::from(fastrand::u32(..)) * u64::from(n);
        }
    }
    (m >> 32) as u32
}

/// `e^d × load_a <= load_b`: whether the first of two candidates costs no more than the
/// second, with `d` the difference of their keys and positive finite loads.
///
/// `exp` is only needed when `d` and the loads point different ways: for `d <= 0` and
/// `load_a <= load_b` the answer is yes, and for `d >= 2^-50` (or `d = 0`) and
/// `load_a >= load_b` (unequal when `d = 0`) it is no, exactly as computing it would say:
/// `exp` is faithfully rounded (error under one ulp), so `e^d <= 1` for `d <= 0` and
/// `e^d >= 1 + 2^-50` beyond, which lifts any load to a larger one. A pick between
/// backends with equal loads (no requests in flight, equal weights), or where the faster
/// of the two is also the less loaded, then costs no `exp`.
///
/// Which way the answer goes is as random as the draw, so it is computed without a
/// branch; the one branch, on whether `exp` is needed, is predictable when that rarely or
/// mostly happens.
#[inline]
fn no_dearer(d: f64, load_a: f64, load_b: f64) -> bool {
    let yes = (d <= 0.0) & (load_a <= load_b);
    let no = ((d == 0.0) | (d >= 4.0 * f64::EPSILON)) & (load_a >= load_b);
    if yes | no {
        return yes;
    }
    d.exp() * load_a <= load_b
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
    fn the_comparison_without_exp_agrees_with_exp() {
        let tiny = [
            2f64.powi(-60),
            2f64.powi(-54),
            2f64.powi(-53),
            2f64.powi(-52),
        ];
        let mut ds = vec![0.0, 4.0 * f64::EPSILON, 1e-9, 0.5, 1.0, 30.0, 709.0, 800.0];
        ds.extend(tiny);
        ds.extend(ds.clone().iter().map(|d| -d));
        let one_up = f64::from_bits(1f64.to_bits() + 1);
        let one_down = f64::from_bits(1f64.to_bits() - 1);
        let loads = [1.0, one_up, one_down, 0.05, 0.5, 2.0, 3.0, 1e6, 1e-9];
        for d in ds {
            for la in loads {
                for lb in loads {
                    let exact = d.exp() * la <= lb;
                    assert_eq!(no_dearer(d, la, lb), exact, "d {d:e}, loads {la} {lb}");
                }
            }
        }
    }

    #[test]
    fn two_slots_are_distinct_and_every_pair_equally_likely() {
        let mut counts = [[0u32; 3]; 3];
        for _ in 0..60_000 {
            let (a, b) = two_slots(3);
            counts[a][b] += 1;
        }
        for (a, row) in counts.iter().enumerate() {
            for (b, &count) in row.iter().enumerate() {
                if a == b {
                    assert_eq!(count, 0);
                } else {
                    // 10,000 expected; a standard deviation is 91.
                    assert!((9_500..10_500).contains(&count), "{counts:?}");
                }
            }
        }
    }

    #[test]
    fn draws_below_a_bound_favour_no_value() {
        // Without the rejection step, multiply-and-shift maps two 32-bit values of every
        // four to each multiple of 3 below this bound, and one to every other value.
        let n = 3 << 30;
        let draws = 30_000;
        let multiples_of_3 = (0..draws)
            .filter(|_| below(fastrand::u32(..), n) % 3 == 0)
            .count();
        // A third expected (10,000; a standard deviation is 82), not half.
        assert!(
            (9_500..10_500).contains(&multiples_of_3),
            "{multiples_of_3}"
        );
        assert!((0..1000).all(|_| below(fastrand::u32(..), 7) < 7));
        assert_eq!(below(u32::MAX, 1), 0);
    }

    #[test]
    fn a_candidate_is_read_from_one_cache_line() {
        // Slots a divisor of 64 bytes large, and aligned to their size, share no line.
        let size = std::mem::size_of::<Estimate>();
        assert!(size <= 32 && 64 % size == 0, "{size}");
        assert_eq!(std::mem::align_of::<Estimate>(), size);
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
