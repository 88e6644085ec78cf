//! The built-in policies, chosen at run time.

use std::fmt;
use std::str::FromStr;

use super::{Endpoint, Hashing, LeastConnections, PeakEwma, Policy, RoundRobin};
use super::{HashingTable, LeastConnectionsTable, PeakEwmaTable, RoundRobinTable};

/// One of the built-in policies, chosen by name at run time (`config.json`'s `algorithm`).
///
/// It parses from its name ([`FromStr`], and with the `config` feature serde's
/// `Deserialize`/`Serialize` as that string), and compares equal to another `Algorithm` of
/// the same name and to its name.
///
/// ```
/// use tower_lb::policy::Algorithm;
/// let algorithm: Algorithm = "least_connections".parse().unwrap();
/// assert_eq!(algorithm.name(), "least_connections");
/// assert!("fastest".parse::<Algorithm>().is_err());
/// assert_eq!(algorithm, "least_connections");
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Algorithm {
    /// [`RoundRobin`].
    RoundRobin(RoundRobin),
    /// [`LeastConnections`].
    LeastConnections(LeastConnections),
    /// [`Hashing`].
    Hashing(Hashing),
    /// [`PeakEwma`], with its default decay and RTT.
    PeakEwma(PeakEwma),
}

/// The table of an [`Algorithm`]: that of the policy it wraps.
#[derive(Debug)]
#[allow(missing_docs)]
pub enum AlgorithmTable {
    RoundRobin(RoundRobinTable),
    LeastConnections(LeastConnectionsTable),
    Hashing(HashingTable),
    PeakEwma(PeakEwmaTable),
}

impl Algorithm {
    /// The names accepted by [`FromStr`], in the order of the docs.
    pub const NAMES: [&'static str; 4] =
        ["round_robin", "least_connections", "hashing", "peak_ewma"];

    /// The configuration name of this algorithm.
    pub fn name(&self) -> &'static str {
        match self {
            Algorithm::RoundRobin(_) => "round_robin",
            Algorithm::LeastConnections(_) => "least_connections",
            Algorithm::Hashing(_) => "hashing",
            Algorithm::PeakEwma(_) => "peak_ewma",
        }
    }
}

/// A clone is the same algorithm with fresh state.
impl Clone for Algorithm {
    fn clone(&self) -> Self {
        match self {
            Algorithm::RoundRobin(p) => Algorithm::RoundRobin(p.clone()),
            Algorithm::LeastConnections(p) => Algorithm::LeastConnections(p.clone()),
            Algorithm::Hashing(p) => Algorithm::Hashing(p.clone()),
            Algorithm::PeakEwma(p) => Algorithm::PeakEwma(p.clone()),
        }
    }
}

/// Same name: the same policy (state such as a round-robin position is not compared).
impl PartialEq for Algorithm {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Algorithm {}

impl PartialEq<str> for Algorithm {
    fn eq(&self, name: &str) -> bool {
        self.name() == name
    }
}

impl PartialEq<&str> for Algorithm {
    fn eq(&self, name: &&str) -> bool {
        self.name() == *name
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(feature = "config")]
impl<'de> serde::Deserialize<'de> for Algorithm {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "config")]
impl serde::Serialize for Algorithm {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl Default for Algorithm {
    fn default() -> Self {
        Algorithm::RoundRobin(RoundRobin::new())
    }
}

/// The error of parsing an [`Algorithm`] name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownAlgorithm(pub String);

impl fmt::Display for UnknownAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown algorithm {:?} (expected one of: {})",
            self.0,
            Algorithm::NAMES.join(", ")
        )
    }
}

impl std::error::Error for UnknownAlgorithm {}

impl FromStr for Algorithm {
    type Err = UnknownAlgorithm;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "round_robin" => Algorithm::RoundRobin(RoundRobin::new()),
            "least_connections" => Algorithm::LeastConnections(LeastConnections::new()),
            "hashing" => Algorithm::Hashing(Hashing::new()),
            "peak_ewma" => Algorithm::PeakEwma(PeakEwma::new()),
            other => return Err(UnknownAlgorithm(other.to_owned())),
        })
    }
}

impl Policy for Algorithm {
    type Table = AlgorithmTable;

    fn build(&self, endpoints: &[Endpoint], previous: Option<&AlgorithmTable>) -> AlgorithmTable {
        use AlgorithmTable as T;
        match self {
            Algorithm::RoundRobin(p) => T::RoundRobin(p.build(
                endpoints,
                match previous {
                    Some(T::RoundRobin(t)) => Some(t),
                    _ => None,
                },
            )),
            Algorithm::LeastConnections(p) => T::LeastConnections(p.build(
                endpoints,
                match previous {
                    Some(T::LeastConnections(t)) => Some(t),
                    _ => None,
                },
            )),
            Algorithm::Hashing(p) => T::Hashing(p.build(
                endpoints,
                match previous {
                    Some(T::Hashing(t)) => Some(t),
                    _ => None,
                },
            )),
            Algorithm::PeakEwma(p) => T::PeakEwma(p.build(
                endpoints,
                match previous {
                    Some(T::PeakEwma(t)) => Some(t),
                    _ => None,
                },
            )),
        }
    }

    fn needs_key(&self) -> bool {
        match self {
            Algorithm::RoundRobin(p) => p.needs_key(),
            Algorithm::LeastConnections(p) => p.needs_key(),
            Algorithm::Hashing(p) => p.needs_key(),
            Algorithm::PeakEwma(p) => p.needs_key(),
        }
    }

    #[inline]
    fn pick(
        &self,
        table: &AlgorithmTable,
        endpoints: &[Endpoint],
        key: Option<u64>,
    ) -> Option<usize> {
        match (self, table) {
            (Algorithm::RoundRobin(p), AlgorithmTable::RoundRobin(t)) => p.pick(t, endpoints, key),
            (Algorithm::LeastConnections(p), AlgorithmTable::LeastConnections(t)) => {
                p.pick(t, endpoints, key)
            }
            (Algorithm::Hashing(p), AlgorithmTable::Hashing(t)) => p.pick(t, endpoints, key),
            (Algorithm::PeakEwma(p), AlgorithmTable::PeakEwma(t)) => p.pick(t, endpoints, key),
            // A snapshot always pairs a policy with the table it built.
            _ => unreachable!("policy and table of one snapshot always match"),
        }
    }

    fn pick_excluding(
        &self,
        table: &AlgorithmTable,
        endpoints: &[Endpoint],
        key: Option<u64>,
        exclude: usize,
    ) -> Option<usize> {
        use AlgorithmTable as T;
        match (self, table) {
            (Algorithm::RoundRobin(p), T::RoundRobin(t)) => {
                p.pick_excluding(t, endpoints, key, exclude)
            }
            (Algorithm::LeastConnections(p), T::LeastConnections(t)) => {
                p.pick_excluding(t, endpoints, key, exclude)
            }
            (Algorithm::Hashing(p), T::Hashing(t)) => p.pick_excluding(t, endpoints, key, exclude),
            (Algorithm::PeakEwma(p), T::PeakEwma(t)) => {
                p.pick_excluding(t, endpoints, key, exclude)
            }
            _ => unreachable!("policy and table of one snapshot always match"),
        }
    }
}
