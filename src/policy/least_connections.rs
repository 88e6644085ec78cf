//! Fewest requests in flight, relative to weight.

use std::cell::Cell;
use std::sync::Arc;

use super::{Endpoint, Load, Policy};

/// Picks the healthy backend with the fewest requests in flight per unit of weight.
///
/// A request counts from the pick until its response is finished or dropped (for HTTP,
/// until the response body ends; see [`Balance`](crate::Balance)). Ties are broken by
/// rotating the starting point of the scan, so that an idle pool is used round-robin rather
/// than always from its first backend. The rotation is per thread: a shared counter would
/// cost a contended atomic on every pick for no better spread.
///
/// A pick scans the healthy backends once: O(n).
#[derive(Debug, Default, Clone)]
pub struct LeastConnections {
    _priv: (),
}

thread_local! {
    static ROTOR: Cell<usize> = const { Cell::new(0) };
}

impl LeastConnections {
    /// A least-connections policy.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The healthy endpoints of a [`LeastConnections`] policy, with their counters.
#[derive(Debug)]
pub struct LeastConnectionsTable {
    candidates: Box<[Candidate]>,
    /// All weights are equal: compare counts directly.
    uniform: bool,
}

#[derive(Debug)]
struct Candidate {
    load: Arc<Load>,
    weight: u64,
    index: usize,
}

impl Policy for LeastConnections {
    type Table = LeastConnectionsTable;

    fn build(&self, endpoints: &[Endpoint], _: Option<&LeastConnectionsTable>) -> Self::Table {
        let candidates = endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_healthy())
            .map(|(index, e)| Candidate {
                load: e.load().clone(),
                weight: u64::from(e.weight()),
                index,
            })
            .collect::<Box<[Candidate]>>();
        let uniform = candidates.windows(2).all(|w| w[0].weight == w[1].weight);
        LeastConnectionsTable {
            candidates,
            uniform,
        }
    }

    fn needs_key(&self) -> bool {
        false
    }

    #[inline]
    fn pick(&self, table: &Self::Table, _: &[Endpoint], _key: Option<u64>) -> Option<usize> {
        let candidates = &table.candidates[..];
        if candidates.is_empty() {
            return None;
        }
        let start = ROTOR.with(|r| {
            let n = r.get();
            r.set(n.wrapping_add(1));
            n % candidates.len()
        });
        let (tail, head) = candidates.split_at(start);
        let mut best = &head[0];
        let mut best_load = best.load.get() as u64;
        if table.uniform {
            for c in head[1..].iter().chain(tail) {
                let load = c.load.get() as u64;
                if load < best_load {
                    best = c;
                    best_load = load;
                }
            }
        } else {
            // a / wa < b / wb  <=>  a * wb < b * wa, in integers.
            for c in head[1..].iter().chain(tail) {
                let load = c.load.get() as u64;
                if load * best.weight < best_load * c.weight {
                    best = c;
                    best_load = load;
                }
            }
        }
        Some(best.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::{endpoints, set_health};

    #[test]
    fn picks_the_least_loaded() {
        let eps = endpoints(&[1, 1, 1]);
        let policy = LeastConnections::new();
        let table = policy.build(&eps, None);
        eps[0].load().incr();
        eps[0].load().incr();
        eps[2].load().incr();
        for _ in 0..5 {
            assert_eq!(policy.pick(&table, &eps, None), Some(1));
        }
        eps[1].load().incr();
        eps[1].load().incr();
        assert_eq!(policy.pick(&table, &eps, None), Some(2));
    }

    #[test]
    fn ties_rotate() {
        let eps = endpoints(&[1, 1, 1]);
        let policy = LeastConnections::new();
        let table = policy.build(&eps, None);
        let picks: Vec<_> = (0..6)
            .map(|_| policy.pick(&table, &eps, None).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn load_is_relative_to_weight() {
        let eps = endpoints(&[3, 1]);
        let policy = LeastConnections::new();
        let table = policy.build(&eps, None);
        // Simulate held requests: each pick stays in flight.
        let mut count = [0; 2];
        for _ in 0..8 {
            let i = policy.pick(&table, &eps, None).unwrap();
            eps[i].load().incr();
            count[i] += 1;
        }
        assert_eq!(count, [6, 2]);
    }

    #[test]
    fn unhealthy_are_skipped() {
        let mut eps = endpoints(&[1, 1]);
        set_health(&mut eps, 0, false);
        let policy = LeastConnections::new();
        let table = policy.build(&eps, None);
        for _ in 0..3 {
            assert_eq!(policy.pick(&table, &eps, None), Some(1));
        }
        set_health(&mut eps, 1, false);
        let table = policy.build(&eps, None);
        assert_eq!(policy.pick(&table, &eps, None), None);
    }
}
