//! Smooth weighted round robin.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{healthy_indices, Endpoint, Policy};

/// Round robin, per request, with nginx's *smooth* weighting.
///
/// With weights 5, 1, 1 the sequence is `a a b a c a a`, not `a a a a a b c`: the heavy
/// backend gets its share without bursts. The whole cycle (one entry per unit of weight,
/// after dividing the weights by their greatest common divisor) is computed when the set
/// changes; a pick is one atomic increment and one array read, whatever the number of
/// backends.
///
/// A slow-starting backend counts with the part of its weight in force.
///
/// All clones of a balancer share the cursor, so the rotation is per request across every
/// connection, not per connection.
#[derive(Debug, Default)]
pub struct RoundRobin {
    cursor: AtomicUsize,
}

/// A clone has the same configuration and a fresh rotation.
impl Clone for RoundRobin {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl RoundRobin {
    /// A round-robin policy starting at the first backend.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The precomputed cycle of a [`RoundRobin`] policy: indices of healthy endpoints.
#[derive(Debug)]
pub struct RoundRobinTable {
    sequence: Box<[u32]>,
}

/// The longest cycle kept; larger total weights are scaled down to fit.
const MAX_CYCLE: u64 = 1 << 20;
/// Above this many steps (backends × cycle length), nginx's O(n) step is replaced by an
/// O(log n) spacing of each item's turns, which is just as smooth but orders ties differently.
const MAX_NAIVE_WORK: u64 = 1 << 24;

impl Policy for RoundRobin {
    type Table = RoundRobinTable;

    fn build(
        &self,
        endpoints: &[Endpoint],
        _previous: Option<&RoundRobinTable>,
    ) -> RoundRobinTable {
        let healthy = healthy_indices(endpoints);
        let weights: Vec<u64> = healthy
            .iter()
            .map(|&i| endpoints[i as usize].ramped_weight())
            .collect();
        RoundRobinTable {
            sequence: smooth_cycle(&healthy, &weights).into_boxed_slice(),
        }
    }

    fn needs_key(&self) -> bool {
        false
    }

    #[inline]
    fn pick(&self, table: &RoundRobinTable, _: &[Endpoint], _key: Option<u64>) -> Option<usize> {
        let len = table.sequence.len();
        if len == 0 {
            return None;
        }
        let n = self.cursor.fetch_add(1, Ordering::Relaxed);
        Some(table.sequence[n % len] as usize)
    }
}

/// One full cycle of smooth weighted round robin over `items` with `weights`.
pub(crate) fn smooth_cycle(items: &[u32], weights: &[u64]) -> Vec<u32> {
    debug_assert_eq!(items.len(), weights.len());
    if items.is_empty() {
        return Vec::new();
    }
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let mut weights: Vec<u64> = weights.iter().map(|w| (w / divisor).max(1)).collect();
    if weights.iter().all(|&w| w == 1) {
        return items.to_vec();
    }
    let mut total: u64 = weights.iter().sum();
    if total > MAX_CYCLE {
        for w in &mut weights {
            *w = (*w * MAX_CYCLE / total).max(1);
        }
        total = weights.iter().sum();
    }
    let mut out = Vec::with_capacity(total as usize);
    if items.len() as u64 * total <= MAX_NAIVE_WORK {
        // nginx's ngx_http_upstream_get_peer: every peer gains its weight, the richest is
        // chosen and pays the total. The first of equals wins.
        let total = total as i64;
        let mut current = vec![0i64; items.len()];
        for _ in 0..total {
            let mut best = 0;
            for i in 0..current.len() {
                current[i] += weights[i] as i64;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            out.push(items[best]);
        }
    } else {
        // Each item's turns are spaced evenly, total/weight apart, with a phase that
        // staggers items of equal weight; sorting all turns gives the cycle. O(W log W),
        // and every item is as smooth as under nginx's rule (ties are ordered differently).
        let n = weights.len() as u128;
        let scale = u128::from(total) << 16;
        let mut turns: Vec<(u128, u32)> = Vec::with_capacity(total as usize);
        for (i, &w) in weights.iter().enumerate() {
            let stride = scale / u128::from(w);
            let phase = stride * i as u128 / n;
            turns.extend((0..u128::from(w)).map(|k| (phase + k * stride, items[i])));
        }
        turns.sort_unstable();
        out.extend(turns.into_iter().map(|(_, item)| item));
    }
    out
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::{endpoints, set_health};

    fn picks(policy: &RoundRobin, endpoints: &[Endpoint], n: usize) -> Vec<usize> {
        let table = policy.build(endpoints, None);
        (0..n)
            .map(|_| policy.pick(&table, endpoints, None).unwrap())
            .collect()
    }

    #[test]
    fn equal_weights_take_turns() {
        let eps = endpoints(&[1, 1, 1]);
        assert_eq!(picks(&RoundRobin::new(), &eps, 7), [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn weights_are_smooth_like_nginx() {
        // The example from nginx's commit introducing smooth weighted round robin.
        let eps = endpoints(&[5, 1, 1]);
        assert_eq!(picks(&RoundRobin::new(), &eps, 7), [0, 0, 1, 0, 2, 0, 0]);
        // Common divisors do not change the sequence.
        let eps = endpoints(&[10, 2, 2]);
        assert_eq!(picks(&RoundRobin::new(), &eps, 7), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weighted_proportions_are_exact_per_cycle() {
        let eps = endpoints(&[3, 2, 1, 4]);
        let mut count = [0; 4];
        for i in picks(&RoundRobin::new(), &eps, 10 * 100) {
            count[i] += 1;
        }
        assert_eq!(count, [300, 200, 100, 400]);
    }

    #[test]
    fn unhealthy_are_skipped() {
        let mut eps = endpoints(&[1, 1, 1]);
        set_health(&mut eps, 1, false);
        assert_eq!(picks(&RoundRobin::new(), &eps, 4), [0, 2, 0, 2]);
        for i in 0..3 {
            set_health(&mut eps, i, false);
        }
        let policy = RoundRobin::new();
        let table = policy.build(&eps, None);
        assert_eq!(policy.pick(&table, &eps, None), None);
    }

    #[test]
    fn stride_fallback_keeps_proportions_and_spreads() {
        // 2,000 items with total weight 20,000 go past the naive bound.
        let items: Vec<u32> = (0..2000).collect();
        let weights: Vec<u64> = (0..2000)
            .map(|i| if i == 0 { 1001 } else { 9 + i % 3 })
            .collect();
        assert!(items.len() as u64 * weights.iter().sum::<u64>() > MAX_NAIVE_WORK);
        let cycle = smooth_cycle(&items, &weights);
        assert_eq!(cycle.len() as u64, weights.iter().sum::<u64>());
        let heavy: Vec<usize> = cycle
            .iter()
            .enumerate()
            .filter(|(_, &x)| x == 0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(heavy.len(), 1001);
        // Smooth: the heavy item never comes back-to-back more than its share allows.
        let max_gap = heavy.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(max_gap <= 2 * cycle.len() / 1001 + 1, "gap {max_gap}");
    }

    #[test]
    fn huge_weights_are_scaled_into_the_cycle_bound() {
        let cycle = smooth_cycle(&[0, 1], &[u64::from(u32::MAX), 1]);
        assert!(cycle.len() as u64 <= MAX_CYCLE + 2);
        assert!(cycle.contains(&1));
    }
}
