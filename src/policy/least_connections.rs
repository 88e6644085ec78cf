//! Fewest requests in flight, relative to weight.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Endpoint, Load, Policy, Watch};

/// Picks the healthy backend with the fewest requests in flight per unit of weight.
///
/// A request counts from the pick until its response is finished or dropped (for HTTP,
/// until the response body ends; see [`Balance`](crate::Balance)). Among backends with
/// equal load, the one whose count changed least recently is picked, so that an idle pool
/// is used in turn rather than always from its first backend.
///
/// Above [`scan_up_to`](Self::scan_up_to) healthy backends (64 by default), the table
/// keeps them in a tournament tree ordered by load, as HAProxy keeps its least-connections
/// tree: a request's start and end update the backend's leaf and its path to the root,
/// O(log n) under the table's lock, and a pick reads the root, O(1) without a lock. Only
/// this policy pays for the updates: its table registers for them when it is built and
/// unregisters when it is dropped. Smaller sets are scanned at each pick, O(n) but without
/// a write shared between threads, which is cheaper there; equal loads then take turns
/// from a per-thread rotating start.
#[derive(Debug, Clone)]
pub struct LeastConnections {
    scan_up_to: usize,
}

impl Default for LeastConnections {
    fn default() -> Self {
        LeastConnections { scan_up_to: 64 }
    }
}

impl LeastConnections {
    /// A least-connections policy.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets of up to `n` healthy backends are scanned at each pick rather than kept in a
    /// tree (see above); 0 always keeps the tree.
    pub fn scan_up_to(mut self, n: usize) -> Self {
        self.scan_up_to = n;
        self
    }
}

thread_local! {
    static ROTOR: Cell<usize> = const { Cell::new(0) };
}

/// The healthy endpoints of a [`LeastConnections`] policy, ordered by load.
#[derive(Debug)]
pub struct LeastConnectionsTable {
    /// Endpoint index of each candidate, by slot.
    indices: Box<[usize]>,
    loads: Box<[Arc<Load>]>,
    weights: Box<[u64]>,
    /// `None`: the candidates are scanned.
    tree: Option<Arc<Tree>>,
}

/// No candidate: the empty tree's root.
const NONE: u32 = u32::MAX;

#[derive(Debug)]
struct Tree {
    /// The root's winner (a slot), or `NONE`: what a pick reads.
    best: AtomicU32,
    heap: Mutex<Heap>,
}

#[derive(Debug)]
struct Heap {
    /// Per slot: in flight, weight, and when the count last changed (for ties).
    leaves: Vec<Leaf>,
    /// A complete binary tree over `width` leaves: node 1 is the root, node `width + s` is
    /// slot `s`, every inner node holds the winning slot of its subtree (or `NONE`).
    nodes: Vec<u32>,
    width: usize,
    clock: u64,
}

#[derive(Debug, Clone, Copy)]
struct Leaf {
    load: u64,
    weight: u64,
    changed: u64,
}

impl Heap {
    fn new(weights: &[u64]) -> Self {
        let width = weights.len().next_power_of_two();
        let mut nodes = vec![NONE; 2 * width];
        for (slot, node) in nodes[width..width + weights.len()].iter_mut().enumerate() {
            *node = slot as u32;
        }
        let leaves = weights
            .iter()
            .map(|&weight| Leaf {
                load: 0,
                weight,
                changed: 0,
            })
            .collect();
        let mut heap = Heap {
            leaves,
            nodes,
            width,
            clock: 0,
        };
        for node in (1..width).rev() {
            heap.nodes[node] = heap.winner(heap.nodes[2 * node], heap.nodes[2 * node + 1]);
        }
        heap
    }

    /// The better of two slots: lower load per weight, then the least recently changed.
    fn winner(&self, a: u32, b: u32) -> u32 {
        if a == NONE {
            return b;
        }
        if b == NONE {
            return a;
        }
        let (la, lb) = (&self.leaves[a as usize], &self.leaves[b as usize]);
        // a / wa < b / wb  <=>  a * wb < b * wa, in integers.
        let (ka, kb) = (
            u128::from(la.load) * u128::from(lb.weight),
            u128::from(lb.load) * u128::from(la.weight),
        );
        if (ka, la.changed, a) <= (kb, lb.changed, b) {
            a
        } else {
            b
        }
    }

    /// Sets a slot's load and re-plays its matches up to the root, stopping where the
    /// result no longer depends on it.
    fn set(&mut self, slot: usize, load: u64) {
        self.clock += 1;
        self.leaves[slot] = Leaf {
            load,
            changed: self.clock,
            ..self.leaves[slot]
        };
        let me = slot as u32;
        let mut node = (self.width + slot) / 2;
        while node >= 1 {
            let old = self.nodes[node];
            let new = self.winner(self.nodes[2 * node], self.nodes[2 * node + 1]);
            self.nodes[node] = new;
            if new == old && new != me {
                // Same winner, and not the slot that changed: nothing above changes.
                break;
            }
            node /= 2;
        }
    }

    fn root(&self) -> u32 {
        // With one leaf (or none), node 1 is that leaf.
        self.nodes[1]
    }
}

impl Tree {
    fn lock(&self) -> MutexGuard<'_, Heap> {
        // Every change leaves the heap consistent between statements that can panic.
        self.heap.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Watch for Tree {
    fn in_flight_changed(&self, slot: usize, in_flight: &AtomicUsize) {
        let mut heap = self.lock();
        // Read under the lock: the last of concurrent changes writes the last count.
        heap.set(slot, in_flight.load(Ordering::SeqCst) as u64);
        self.best.store(heap.root(), Ordering::Release);
    }
}

impl Policy for LeastConnections {
    type Table = LeastConnectionsTable;

    fn build(&self, endpoints: &[Endpoint], _: Option<&LeastConnectionsTable>) -> Self::Table {
        let (indices, loads, weights) = endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_healthy())
            .fold(
                (Vec::new(), Vec::new(), Vec::new()),
                |(mut i, mut l, mut w), (index, e)| {
                    i.push(index);
                    l.push(e.load().clone());
                    w.push(e.ramped_weight());
                    (i, l, w)
                },
            );
        let tree = (loads.len() > self.scan_up_to).then(|| {
            let tree = Arc::new(Tree {
                best: AtomicU32::new(NONE),
                heap: Mutex::new(Heap::new(&weights)),
            });
            let watch: Arc<dyn Watch> = tree.clone();
            // Register first, then read the counts: a change in between is applied twice,
            // never missed.
            for (slot, load) in loads.iter().enumerate() {
                load.watch(watch.clone(), slot);
            }
            let mut heap = tree.lock();
            for (slot, load) in loads.iter().enumerate() {
                heap.set(slot, load.get() as u64);
            }
            tree.best.store(heap.root(), Ordering::Release);
            drop(heap);
            tree
        });
        LeastConnectionsTable {
            indices: indices.into_boxed_slice(),
            loads: loads.into_boxed_slice(),
            weights: weights.into_boxed_slice(),
            tree,
        }
    }

    fn needs_key(&self) -> bool {
        false
    }

    #[inline]
    fn pick(&self, table: &Self::Table, _: &[Endpoint], _key: Option<u64>) -> Option<usize> {
        let slot = match &table.tree {
            Some(tree) => tree.best.load(Ordering::Acquire) as usize,
            None => table.scan()?,
        };
        table.indices.get(slot).copied()
    }
}

impl LeastConnectionsTable {
    /// The least loaded slot by a scan from a rotating start.
    #[inline]
    fn scan(&self) -> Option<usize> {
        let n = self.loads.len();
        if n == 0 {
            return None;
        }
        let start = ROTOR.with(|r| {
            let n = r.get();
            r.set(n.wrapping_add(1));
            n
        }) % n;
        let (mut best, mut best_load) = (start, self.loads[start].get() as u64);
        for slot in (start + 1..n).chain(0..start) {
            let load = self.loads[slot].get() as u64;
            // a / wa < b / wb  <=>  a * wb < b * wa, in integers.
            if u128::from(load) * u128::from(self.weights[best])
                < u128::from(best_load) * u128::from(self.weights[slot])
            {
                (best, best_load) = (slot, load);
            }
        }
        Some(best)
    }
}

impl Drop for LeastConnectionsTable {
    fn drop(&mut self) {
        if let Some(tree) = &self.tree {
            let watch: Arc<dyn Watch> = tree.clone();
            for load in self.loads.iter() {
                load.unwatch(&watch);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::tests::{endpoints, set_health};

    /// The policy with a tree whatever the size.
    fn tree() -> LeastConnections {
        LeastConnections::new().scan_up_to(0)
    }

    /// A request on `i` that starts (and, with `end`, ends), as `InFlight` does.
    fn start(eps: &[Endpoint], i: usize) {
        eps[i].load().incr();
    }

    fn end(eps: &[Endpoint], i: usize) {
        eps[i].load().decr(Duration::ZERO);
    }

    /// The least loaded slot by a full scan, for comparison.
    fn scan(table: &LeastConnectionsTable) -> u64 {
        let heap = table.tree.as_ref().unwrap().lock();
        heap.leaves
            .iter()
            .map(|l| (u128::from(l.load) << 64) / u128::from(l.weight))
            .min()
            .map(|k| k as u64)
            .unwrap_or(u64::MAX)
    }

    /// Every inner node holds the winner of its children, and every leaf the live count.
    fn assert_consistent(table: &LeastConnectionsTable) {
        let heap = table.tree.as_ref().unwrap().lock();
        for node in 1..heap.width {
            let expected = heap.winner(heap.nodes[2 * node], heap.nodes[2 * node + 1]);
            assert_eq!(heap.nodes[node], expected, "node {node}");
        }
        for (slot, load) in table.loads.iter().enumerate() {
            assert_eq!(heap.leaves[slot].load, load.get() as u64, "slot {slot}");
        }
        assert_eq!(
            table.tree.as_ref().unwrap().best.load(Ordering::Relaxed),
            heap.root()
        );
    }

    #[test]
    fn picks_the_least_loaded() {
        let eps = endpoints(&[1, 1, 1]);
        let policy = tree();
        let table = policy.build(&eps, None);
        start(&eps, 0);
        start(&eps, 0);
        start(&eps, 2);
        for _ in 0..5 {
            assert_eq!(policy.pick(&table, &eps, None), Some(1));
        }
        start(&eps, 1);
        start(&eps, 1);
        assert_eq!(policy.pick(&table, &eps, None), Some(2));
        end(&eps, 0);
        end(&eps, 0);
        assert_eq!(policy.pick(&table, &eps, None), Some(0));
        assert_consistent(&table);
    }

    #[test]
    fn ties_rotate() {
        let eps = endpoints(&[1, 1, 1]);
        let policy = tree();
        let table = policy.build(&eps, None);
        // Sequential requests on an idle pool: each ends before the next starts.
        let picks: Vec<_> = (0..6)
            .map(|_| {
                let i = policy.pick(&table, &eps, None).unwrap();
                start(&eps, i);
                end(&eps, i);
                i
            })
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn load_is_relative_to_weight() {
        let eps = endpoints(&[3, 1]);
        let policy = tree();
        let table = policy.build(&eps, None);
        // Simulate held requests: each pick stays in flight.
        let mut count = [0; 2];
        for _ in 0..8 {
            let i = policy.pick(&table, &eps, None).unwrap();
            start(&eps, i);
            count[i] += 1;
        }
        assert_eq!(count, [6, 2]);
    }

    #[test]
    fn unhealthy_are_skipped() {
        let mut eps = endpoints(&[1, 1]);
        set_health(&mut eps, 0, false);
        let policy = tree();
        let table = policy.build(&eps, None);
        for _ in 0..3 {
            let i = policy.pick(&table, &eps, None).unwrap();
            assert_eq!(i, 1);
            start(&eps, i);
        }
        set_health(&mut eps, 1, false);
        let table = policy.build(&eps, None);
        assert_eq!(policy.pick(&table, &eps, None), None);
    }

    #[test]
    fn small_sets_are_scanned_exactly_with_ties_taking_turns() {
        let eps = endpoints(&[3, 1, 1]);
        let policy = LeastConnections::new();
        let table = policy.build(&eps, None);
        assert!(table.tree.is_none());
        assert!(eps
            .iter()
            .all(|e| e.load().watched.load(Ordering::Relaxed) == 0));
        // Idle: every backend in turn.
        let mut seen: Vec<_> = (0..3)
            .map(|_| policy.pick(&table, &eps, None).unwrap())
            .collect();
        seen.sort();
        assert_eq!(seen, [0, 1, 2]);
        // Held requests: weight 3 takes three for each one on the others.
        let mut count = [0; 3];
        for _ in 0..50 {
            let i = policy.pick(&table, &eps, None).unwrap();
            start(&eps, i);
            count[i] += 1;
        }
        assert_eq!(count, [30, 10, 10]);
    }

    #[test]
    fn a_rebuilt_table_takes_over_and_a_dropped_one_lets_go() {
        let eps = endpoints(&[1, 1, 1]);
        let policy = tree();
        let old = policy.build(&eps, None);
        start(&eps, 0);
        let new = policy.build(&eps, Some(&old));
        start(&eps, 1);
        // The new table follows both requests; the old one stopped at the rebuild.
        assert_eq!(policy.pick(&new, &eps, None), Some(2));
        assert_eq!(old.tree.as_ref().unwrap().lock().leaves[1].load, 0);
        drop(old);
        assert!(eps
            .iter()
            .all(|e| e.load().watched.load(Ordering::Relaxed) == 1));
        drop(new);
        assert!(eps
            .iter()
            .all(|e| e.load().watched.load(Ordering::Relaxed) == 0));
        // Nothing watches now: changes go nowhere, and cost nothing.
        start(&eps, 2);
    }

    #[test]
    fn exact_against_a_scan_under_random_changes() {
        // Seeded, so a failure repeats.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let weights: Vec<u32> = (0..37).map(|i| 1 + i % 4).collect();
        let eps = endpoints(&weights);
        let policy = tree();
        let table = policy.build(&eps, None);
        for _ in 0..20_000 {
            let i = (next() % 37) as usize;
            if eps[i].in_flight() > 0 && next() % 2 == 0 {
                end(&eps, i);
            } else {
                start(&eps, i);
            }
            let picked = policy.pick(&table, &eps, None).unwrap();
            let e = &eps[picked];
            let key = ((e.in_flight() as u128) << 64) / u128::from(e.ramped_weight());
            assert_eq!(key as u64, scan(&table));
        }
        assert_consistent(&table);
    }

    #[test]
    fn concurrent_changes_stay_consistent() {
        let eps = Arc::new(endpoints(&[1, 2, 3, 1, 2, 3, 1, 2, 3, 5, 1]));
        let policy = tree();
        let table = policy.build(&eps, None);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let eps = eps.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    let mut x = t + 1;
                    for _ in 0..20_000 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let i = (x >> 33) as usize % eps.len();
                        if held.len() > 8 || (!held.is_empty() && x & 1 == 0) {
                            let j = held.swap_remove((x >> 40) as usize % held.len());
                            end(&eps, j);
                        } else {
                            start(&eps, i);
                            held.push(i);
                        }
                    }
                    held
                })
            })
            .collect();
        let mut left = Vec::new();
        for t in threads {
            left.extend(t.join().unwrap());
        }
        assert_consistent(&table);
        for i in left {
            end(&eps, i);
        }
        assert!(eps.iter().all(|e| e.in_flight() == 0));
        assert_consistent(&table);
    }
}
