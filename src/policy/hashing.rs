//! Consistent hashing of a request key (for HTTP, the client IP).

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Endpoint, Policy};

/// Consistent hashing on a ring with virtual nodes, looked up through a bucket table.
///
/// Every backend places `weight × v` points on a 64-bit ring, at [`stable_hash`]es of its
/// id; a key belongs to the first point at or after it. The ring is built over *all*
/// backends, healthy or not, and is rebuilt only when the membership or a weight changes.
/// A key whose owner is unhealthy walks on to the next point with a healthy owner, which is
/// exactly where a ring without that backend would have put it. So:
///
/// - the same set gives the same mapping in every process and after a restart (there is no
///   random seed);
/// - when a backend leaves or turns unhealthy only its own keys move, and they come back to
///   it when it returns.
///
/// A pick is one lookup in a table of `2^k` buckets (about twice as many as points) that
/// holds, per bucket, the ring position of the first point at or after the bucket's start:
/// O(1), independent of the number of backends. Keys are quantized to buckets, which only
/// coarsens the ring; consistency is exact.
///
/// Requests without a key are spread by a rotating counter.
#[derive(Debug, Default)]
pub struct Hashing {
    unkeyed: AtomicU64,
}

/// A clone has the same configuration and a fresh rotation.
impl Clone for Hashing {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl Hashing {
    /// A consistent-hashing policy.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The ring of a [`Hashing`] policy.
#[derive(Debug)]
pub struct HashingTable {
    ring: Arc<Ring>,
    healthy: usize,
}

#[derive(Debug)]
struct Ring {
    /// `(id, weight)` of every endpoint the ring was built from, to detect reuse.
    members: Vec<(u64, u32)>,
    /// Endpoint index owning each ring point, in ring order.
    owners: Box<[u32]>,
    /// Per bucket, the position in `owners` of the first point at or after the bucket.
    buckets: Box<[u32]>,
    shift: u32,
}

/// Virtual nodes per unit of weight, for small sets.
const VNODES: u64 = 160;
/// Total points aimed at for large sets; fewer virtual nodes per backend beyond that.
const MAX_POINTS: u64 = 1 << 20;

/// The points of a backend of `weight` in a set of `total` weight: `VNODES` per unit of
/// weight while the ring stays under `MAX_POINTS`, fewer per unit in larger sets, and
/// beyond `MAX_POINTS` units of weight the weight's share of `MAX_POINTS` (at least one),
/// so that the ring's size, and the time to build it, is bounded however large the weights
/// (a weight may be up to `u32::MAX`).
fn points_of(weight: u32, total: u64) -> u64 {
    let weight = u64::from(weight);
    if total <= MAX_POINTS {
        weight * (MAX_POINTS / total.max(1)).min(VNODES)
    } else {
        let share = u128::from(weight) * u128::from(MAX_POINTS) / u128::from(total);
        (share as u64).max(1)
    }
}

impl Ring {
    fn new(endpoints: &[Endpoint]) -> Self {
        let members: Vec<(u64, u32)> = endpoints.iter().map(|e| (e.id(), e.weight())).collect();
        let total_weight: u64 = members.iter().map(|&(_, w)| u64::from(w)).sum();
        let counts: Vec<u64> = members
            .iter()
            .map(|&(_, weight)| points_of(weight, total_weight))
            .collect();
        let mut points: Vec<(u64, u32)> = Vec::with_capacity(counts.iter().sum::<u64>() as usize);
        for (index, (&(id, _), &count)) in members.iter().zip(&counts).enumerate() {
            // A backend's points are the first `count` of one sequence: a change of weights
            // adds or removes points at its end and leaves the others where they were.
            for v in 0..count {
                points.push((stable_hash(&(id, v)), index as u32));
            }
        }
        // Ties (equal hashes) are ordered by index: deterministic.
        points.sort_unstable();

        let bits = (64 - (points.len().max(1) as u64).leading_zeros() + 1).clamp(4, 24);
        let shift = 64 - bits;
        let mut buckets = Vec::with_capacity(1 << bits);
        let mut next = 0;
        for b in 0..(1u64 << bits) {
            let start = b << shift;
            while next < points.len() && points[next].0 < start {
                next += 1;
            }
            // Past the last point, the ring wraps to its first.
            buckets.push(if next == points.len() { 0 } else { next as u32 });
        }
        Ring {
            members,
            owners: points.into_iter().map(|(_, owner)| owner).collect(),
            buckets: buckets.into_boxed_slice(),
            shift,
        }
    }
}

impl Policy for Hashing {
    type Table = HashingTable;

    fn build(&self, endpoints: &[Endpoint], previous: Option<&HashingTable>) -> HashingTable {
        let same_members = |ring: &Ring| {
            ring.members.len() == endpoints.len()
                && ring
                    .members
                    .iter()
                    .zip(endpoints)
                    .all(|(&(id, w), e)| id == e.id() && w == e.weight())
        };
        let ring = match previous {
            Some(t) if same_members(&t.ring) => t.ring.clone(),
            _ => Arc::new(Ring::new(endpoints)),
        };
        HashingTable {
            ring,
            healthy: endpoints.iter().filter(|e| e.is_healthy()).count(),
        }
    }

    #[inline]
    fn pick(
        &self,
        table: &HashingTable,
        endpoints: &[Endpoint],
        key: Option<u64>,
    ) -> Option<usize> {
        self.walk(table, endpoints, key, None)
    }

    /// The next healthy owner on the ring after the key's, skipping `exclude`: where the key
    /// would go if `exclude` were unhealthy.
    fn pick_excluding(
        &self,
        table: &HashingTable,
        endpoints: &[Endpoint],
        key: Option<u64>,
        exclude: usize,
    ) -> Option<usize> {
        self.walk(table, endpoints, key, Some(exclude))
    }
}

impl Hashing {
    #[inline]
    fn walk(
        &self,
        table: &HashingTable,
        endpoints: &[Endpoint],
        key: Option<u64>,
        skip: Option<usize>,
    ) -> Option<usize> {
        let usable = table.healthy - usize::from(skip.is_some_and(|i| endpoints[i].is_healthy()));
        if usable == 0 {
            return None;
        }
        let ring = &*table.ring;
        let key = match key {
            Some(key) => key,
            None => mix(self.unkeyed.fetch_add(1, Ordering::Relaxed)),
        };
        let mut at = ring.buckets[(key >> ring.shift) as usize] as usize;
        // Terminates: some endpoint is usable, and every endpoint owns points.
        loop {
            let owner = ring.owners[at] as usize;
            if endpoints[owner].is_healthy() && Some(owner) != skip {
                return Some(owner);
            }
            at += 1;
            if at == ring.owners.len() {
                at = 0;
            }
        }
    }
}

/// A 64-bit hash that is the same in every process, on every platform and after every
/// restart: FNV-1a over what `Hash` writes, finished with a strong bit mixer.
///
/// Used for backend ids and hashing keys. (`std`'s `DefaultHasher` is randomly keyed through
/// `RandomState` and not promised stable across releases, so proxies could disagree.)
///
/// ```
/// use std::net::{IpAddr, Ipv4Addr};
/// let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// assert_eq!(tower_lb::policy::stable_hash(&ip), tower_lb::policy::stable_hash(&ip));
/// ```
pub fn stable_hash<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    value.hash(&mut h);
    h.finish()
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        mix(self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The finalizer of SplitMix64: every input bit affects every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::{endpoints, set_health};

    fn map(policy: &Hashing, eps: &[Endpoint], keys: u64) -> Vec<usize> {
        let table = policy.build(eps, None);
        (0..keys)
            .map(|k| policy.pick(&table, eps, Some(stable_hash(&k))).unwrap())
            .collect()
    }

    #[test]
    fn stable_hash_is_fixed() {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        // These values must never change: proxies in front of one pool, and a proxy after a
        // restart, rely on them. Backend ids hash their address; hashing by client IP
        // hashes an `IpAddr` (what `ClientIpKey` keys by), so both forms are pinned, as are
        // the integers the ring's points hash.
        let v4 = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        let pinned: [(u64, u64); 6] = [
            (stable_hash(&0u64), 9_313_164_154_874_788_883),
            (stable_hash(&1u64), 6_676_229_981_160_887_125),
            (stable_hash(&(7u64, 3u64)), 5_096_888_390_665_919_359),
            (stable_hash("127.0.0.1:9001"), 9_003_990_147_998_655_315),
            (stable_hash(&v4), 14_072_060_680_357_475_590),
            (stable_hash(&v6), 12_016_896_422_029_113_877),
        ];
        for (i, (got, expected)) in pinned.into_iter().enumerate() {
            assert_eq!(got, expected, "value {i}");
        }
    }

    #[test]
    fn same_set_same_mapping() {
        let eps = endpoints(&[1, 1, 1, 1]);
        assert_eq!(
            map(&Hashing::new(), &eps, 1000),
            map(&Hashing::new(), &eps, 1000)
        );
    }

    #[test]
    fn spread_is_even_enough() {
        let eps = endpoints(&[1; 8]);
        let mut count = [0usize; 8];
        for i in map(&Hashing::new(), &eps, 80_000) {
            count[i] += 1;
        }
        for c in count {
            assert!((7_000..13_000).contains(&c), "{count:?}");
        }
    }

    #[test]
    fn a_leaving_backend_moves_only_its_keys() {
        const KEYS: u64 = 10_000;
        for n in [2usize, 3, 5, 10, 32] {
            let eps = endpoints(&vec![1; n]);
            let before = map(&Hashing::new(), &eps, KEYS);
            let gone = n / 2;
            // Removed from the set: the survivors keep their ids, in a shorter list.
            let rest: Vec<Endpoint> = eps
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != gone)
                .map(|(_, e)| e.clone())
                .collect();
            let after = map(&Hashing::new(), &rest, KEYS);
            let mut moved = 0;
            for (b, a) in before.iter().zip(&after) {
                let a_id = rest[*a].id();
                if *b == gone {
                    moved += 1;
                } else {
                    assert_eq!(eps[*b].id(), a_id, "a key of a staying backend moved");
                }
            }
            let bound = KEYS as f64 * (1.0 / n as f64 + 0.02);
            assert!((moved as f64) <= bound, "n={n}: moved {moved} > {bound}");
        }
    }

    #[test]
    fn unhealthy_keys_move_and_come_back() {
        let mut eps = endpoints(&[1; 5]);
        let policy = Hashing::new();
        let before = map(&policy, &eps, 5_000);
        set_health(&mut eps, 3, false);
        let during = map(&policy, &eps, 5_000);
        for (b, d) in before.iter().zip(&during) {
            if *b == 3 {
                assert_ne!(*d, 3);
            } else {
                assert_eq!(b, d);
            }
        }
        // Same as a ring built without it.
        let rest: Vec<Endpoint> = eps
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, e)| e.clone())
            .collect();
        let without = map(&policy, &rest, 5_000);
        for (d, w) in during.iter().zip(&without) {
            assert_eq!(eps[*d].id(), rest[*w].id());
        }
        set_health(&mut eps, 3, true);
        assert_eq!(map(&policy, &eps, 5_000), before);
    }

    #[test]
    fn health_changes_reuse_the_ring() {
        let mut eps = endpoints(&[1, 2, 3]);
        let policy = Hashing::new();
        let first = policy.build(&eps, None);
        set_health(&mut eps, 1, false);
        let second = policy.build(&eps, Some(&first));
        assert!(Arc::ptr_eq(&first.ring, &second.ring));
        assert_eq!(second.healthy, 2);
        let third = policy.build(&endpoints(&[1, 2, 4]), Some(&second));
        assert!(!Arc::ptr_eq(&second.ring, &third.ring));
    }

    #[test]
    fn weights_scale_the_share() {
        let eps = endpoints(&[1, 3]);
        let mut count = [0usize; 2];
        for i in map(&Hashing::new(), &eps, 40_000) {
            count[i] += 1;
        }
        let share = count[1] as f64 / 40_000.0;
        assert!((0.70..0.80).contains(&share), "{count:?}");
    }

    #[test]
    fn weights_near_u32_max_keep_the_ring_bounded_and_the_shares() {
        // A weight as large as a `u32` once gave a ring of that many points.
        let eps = endpoints(&[u32::MAX, 1, u32::MAX / 2]);
        let table = Hashing::new().build(&eps, None);
        let owners = &table.ring.owners;
        assert!(
            owners.len() as u64 <= MAX_POINTS + 3,
            "{} points",
            owners.len()
        );
        // The light backend keeps a point, and so some keys: it is still in the set.
        assert!(owners.contains(&1));
        let mut count = [0usize; 3];
        for i in map(&Hashing::new(), &eps, 30_000) {
            count[i] += 1;
        }
        let share = count[0] as f64 / 30_000.0;
        assert!((0.62..0.72).contains(&share), "{count:?}");
    }

    #[test]
    fn excluding_walks_on_like_an_unhealthy_owner() {
        let mut eps = endpoints(&[1; 4]);
        let policy = Hashing::new();
        let table = policy.build(&eps, None);
        let keys: Vec<u64> = (0..500u64).map(|k| stable_hash(&k)).collect();
        let first: Vec<usize> = keys
            .iter()
            .map(|&k| policy.pick(&table, &eps, Some(k)).unwrap())
            .collect();
        let retried: Vec<usize> = keys
            .iter()
            .zip(&first)
            .map(|(&k, &f)| policy.pick_excluding(&table, &eps, Some(k), f).unwrap())
            .collect();
        for (f, r) in first.iter().zip(&retried) {
            assert_ne!(f, r);
        }
        // Same as marking that owner unhealthy.
        set_health(&mut eps, 2, false);
        let table = policy.build(&eps, Some(&table));
        for ((&k, &f), &r) in keys.iter().zip(&first).zip(&retried) {
            if f == 2 {
                assert_eq!(policy.pick(&table, &eps, Some(k)), Some(r));
            }
        }
        // Nothing else to go to.
        let one = endpoints(&[1]);
        let table = policy.build(&one, None);
        assert_eq!(policy.pick_excluding(&table, &one, Some(1), 0), None);
    }

    #[test]
    fn all_unhealthy_is_none() {
        let mut eps = endpoints(&[1, 1]);
        set_health(&mut eps, 0, false);
        set_health(&mut eps, 1, false);
        let policy = Hashing::new();
        let table = policy.build(&eps, None);
        assert_eq!(policy.pick(&table, &eps, Some(42)), None);
    }
}
