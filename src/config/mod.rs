//! `config.json`: schema, validation, diffs, and live reload.
//!
//! [`Config::from_json`] parses and validates a configuration (see the contract in the
//! README for every key); every error names the file, the field and, for JSON syntax
//! errors, the line and column. [`Config::diff`] tells what changed between two
//! configurations, and [`watch`] turns edits of the file into a stream of new
//! configurations, never yielding a half-written or invalid one as valid.
//!
//! # Examples
//!
//! ```
//! use tower_lb::config::Config;
//!
//! let config = Config::from_json(r#"{
//!     "servers": [{ "host": "127.0.0.1", "port": 9001 }, { "host": "127.0.0.1", "port": 9002, "weight": 2 }],
//!     "algorithm": "least_connections"
//! }"#).unwrap();
//! assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
//! assert_eq!(config.servers[1].weight(), 2);
//!
//! let err = Config::from_json(r#"{ "servers": [{ "host": "127.0.0.1", "port": 0 }] }"#).unwrap_err();
//! assert_eq!(err.to_string(), "servers[0].port: 0 is not a port (1-65535)");
//! let err = Config::from_json("{\n  \"servers\": [,]\n}").unwrap_err();
//! assert!(err.to_string().contains("line 2 column 15"), "{err}");
//! ```

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery};
use serde::Deserialize;

use crate::health::Settings;
use crate::policy::Algorithm;
use crate::proxy::{ClientIpKey, HashKey, InvalidHashKey, TrustedProxy};

mod watch;
pub use self::watch::watch;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// The backends, in file order.
    pub servers: Vec<ServerConfig>,
    /// The policy.
    pub algorithm: Algorithm,
    /// What `hashing` hashes, as written: its client-IP fallback trusts no proxy; see
    /// [`Config::request_key`].
    pub hash_key: HashKey,
    /// Path probed with `GET` on every backend.
    pub health_check_url: PathAndQuery,
    /// Interval, timeout and thresholds of the health checks.
    pub health: Settings,
    /// Time to open a connection to a backend.
    pub connect_timeout: Duration,
    /// Time from sending a request until its response headers arrive.
    pub response_timeout: Duration,
    /// Standalone proxy only: start demo backends on the server addresses.
    pub spawn_backends: bool,
    /// Proxies whose `X-Forwarded-For` is trusted for the client IP (default: none).
    pub trusted_proxies: Vec<TrustedProxy>,
    /// Time between two DNS resolutions of the servers with `resolve` (default 30 s).
    pub dns_refresh: Duration,
    /// Address of the admin listener (`/metrics`, `/status`, `/`); none by default. Never
    /// served on `listen`; a change needs a restart.
    pub admin_listen: Option<SocketAddr>,
    /// Outlier ejection from live traffic (`passive_health`); on by default.
    pub passive_health: PassiveHealth,
    /// Further backends one request may be tried on (default 1; 0 turns retries off).
    pub retries: u32,
    /// Retries as a percentage of the requests of the last 10 seconds (default 20), with
    /// at least 3 retries a second allowed.
    pub retry_budget: f64,
    /// Ramp of a backend that joins or turns healthy from a tenth of its weight to all of
    /// it; zero (the default) turns slow start off.
    pub slow_start: Duration,
    /// Client connections held at once; `None` (the default) derives it from the
    /// open-files limit, (limit − 64) / 2.
    pub max_connections: Option<usize>,
    /// gRPC service name probed with `grpc.health.v1.Health/Check` instead of
    /// `GET health_check_url` (`Some("")`: the whole server); none by default.
    pub health_check_grpc: Option<String>,
    /// Silence in both directions after which a tunnel (WebSocket) is closed (default 3600 s).
    pub tunnel_idle_timeout: Duration,
    /// After SIGTERM, time given to requests and tunnels in flight (default 30 s; may be 0).
    pub shutdown_timeout: Duration,
    /// Time a keep-alive client connection may sit without a request (default 60 s).
    pub client_idle_timeout: Duration,
}

/// `passive_health`: outlier ejection settings, as validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveHealth {
    /// Failures in a row that eject a backend; 0 turns passive health off (default 5).
    pub consecutive_failures: u32,
    /// Base ejection time, multiplied by the ejections in a row, at most 10× (default 10 s).
    pub ejection_time: Duration,
    /// Largest share of the backends ejected at once, in percent, 0–100 (default 50);
    /// at least one backend may always be ejected.
    pub max_ejection_percent: u8,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        PassiveHealth {
            consecutive_failures: 5,
            ejection_time: Duration::from_secs(10),
            max_ejection_percent: 50,
        }
    }
}

impl PassiveHealth {
    /// Whether passive health is on (`consecutive_failures` above 0).
    pub fn enabled(&self) -> bool {
        self.consecutive_failures > 0
    }
}

impl From<PassiveHealth> for crate::balance::PassiveHealth {
    /// The settings of `config.json`'s `passive_health`, with
    /// [`ServerErrorsAsFailures`](crate::balance::outlier::ServerErrorsAsFailures).
    fn from(c: PassiveHealth) -> Self {
        crate::balance::PassiveHealth::new(c.consecutive_failures)
            .ejection_time(c.ejection_time)
            .max_ejection_percent(c.max_ejection_percent)
    }
}

/// The protocol spoken to a backend (`servers[].protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1 (the default).
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (h2c), as gRPC servers expect.
    Http2,
}

impl Protocol {
    /// The configuration name: `http1` or `http2`.
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One backend of the configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    host: String,
    port: u16,
    weight: u32,
    resolve: bool,
    protocol: Protocol,
    authority: Authority,
}

impl ServerConfig {
    /// Host name or IP address.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Port, 1-65535.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Weight, at least 1.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// `host:port`, with IPv6 addresses in brackets: the backend's identity (for a server
    /// with [`resolve`](Self::resolve), the name its backends come from).
    pub fn authority(&self) -> Authority {
        self.authority.clone()
    }

    /// Whether `host` is a DNS name to resolve at start and every `dns_refresh`, each
    /// address it yields being a backend with this port and weight. Without it, a host name
    /// is resolved by each connection to it and is one backend.
    pub fn resolve(&self) -> bool {
        self.resolve
    }

    /// The protocol spoken to this backend.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Whether `self` and `other` are the same server of two configurations: the same
    /// address, resolved or not, spoken to in the same protocol (a change of protocol
    /// replaces the server: its connections cannot be reused).
    fn same_as(&self, other: &ServerConfig) -> bool {
        self.authority == other.authority
            && self.resolve == other.resolve
            && self.protocol == other.protocol
    }
}

/// An invalid configuration: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    file: Option<PathBuf>,
    field: Option<String>,
    message: String,
}

impl ConfigError {
    fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            field: Some(field.into()),
            message: message.into(),
        }
    }

    fn in_file(mut self, file: &Path) -> Self {
        self.file = Some(file.to_owned());
        self
    }

    /// The field at fault, like `servers[1].port`, if the error is about one.
    pub fn field_name(&self) -> Option<&str> {
        self.field.as_deref()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The file as written: every key optional here, so that missing ones get defaults and
/// wrong ones get messages that name them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<String>,
    servers: Option<Vec<Object<RawServer>>>,
    algorithm: Option<Algorithm>,
    hash_key: Option<String>,
    health_check_url: Option<String>,
    #[serde(default, deserialize_with = "number")]
    health_check_interval: Option<f64>,
    #[serde(default, deserialize_with = "number")]
    health_check_timeout: Option<f64>,
    #[serde(default, deserialize_with = "int")]
    healthy_threshold: Option<i64>,
    #[serde(default, deserialize_with = "int")]
    unhealthy_threshold: Option<i64>,
    #[serde(default, deserialize_with = "number")]
    connect_timeout: Option<f64>,
    #[serde(default, deserialize_with = "number")]
    response_timeout: Option<f64>,
    spawn_backends: Option<bool>,
    trusted_proxies: Option<Vec<String>>,
    #[serde(default, deserialize_with = "number")]
    dns_refresh: Option<f64>,
    admin_listen: Option<String>,
    passive_health: Option<Object<RawPassiveHealth>>,
    #[serde(default, deserialize_with = "int")]
    retries: Option<i64>,
    #[serde(default, deserialize_with = "number")]
    retry_budget: Option<f64>,
    #[serde(default, deserialize_with = "number")]
    slow_start: Option<f64>,
    #[serde(default, deserialize_with = "int")]
    max_connections: Option<i64>,
    health_check_grpc: Option<String>,
    #[serde(default, deserialize_with = "number")]
    tunnel_idle_timeout: Option<f64>,
    #[serde(default, deserialize_with = "number")]
    shutdown_timeout: Option<f64>,
    #[serde(default, deserialize_with = "number")]
    client_idle_timeout: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPassiveHealth {
    #[serde(default, deserialize_with = "int")]
    consecutive_failures: Option<i64>,
    #[serde(default, deserialize_with = "number")]
    ejection_time: Option<f64>,
    #[serde(default, deserialize_with = "int")]
    max_ejection_percent: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    host: String,
    #[serde(deserialize_with = "port")]
    port: i64,
    #[serde(default, deserialize_with = "int")]
    weight: Option<i64>,
    resolve: Option<bool>,
    protocol: Option<String>,
}

/// A JSON object and nothing else. (serde's derived structs also take an array of their
/// fields in order, and name the Rust type in their errors: "expected struct RawServer".)
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = T;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }

        deserializer
            .deserialize_map(Visit(std::marker::PhantomData))
            .map(Object)
    }
}

/// An integer, called so in errors (serde's own says "i64").
struct Int(i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;

        impl serde::de::Visitor<'_> for Visit {
            type Value = Int;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Int, E> {
                Ok(Int(n))
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Int, E> {
                i64::try_from(n)
                    .map(Int)
                    .map_err(|_| E::custom(format_args!("integer `{n}` is too large")))
            }
        }

        deserializer.deserialize_i64(Visit)
    }
}

/// A number, integer or not, called so in errors (serde's own says "f64").
struct Number(f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;

        impl serde::de::Visitor<'_> for Visit {
            type Value = Number;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }

            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Number, E> {
                Ok(Number(n))
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Number, E> {
                Ok(Number(n as f64))
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Number, E> {
                Ok(Number(n as f64))
            }
        }

        deserializer.deserialize_f64(Visit)
    }
}

/// An optional integer field (`null` as good as absent).
fn int<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    Ok(Option::<Int>::deserialize(deserializer)?.map(|Int(n)| n))
}

/// An optional number field (`null` as good as absent).
fn number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    Ok(Option::<Number>::deserialize(deserializer)?.map(|Number(n)| n))
}

/// The one required integer field.
fn port<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    Int::deserialize(deserializer).map(|Int(n)| n)
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            field: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::from_json(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and validates a configuration.
    pub fn from_json(text: &str) -> Result<Config, ConfigError> {
        let syntax = |error: serde_json::Error| ConfigError {
            file: None,
            field: None,
            message: format!("invalid JSON: {error}"),
        };
        // A byte order mark, as some editors write at the start of a UTF-8 file, is no JSON.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: Object<Raw> = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = match inner.classify() {
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                    return syntax(inner)
                }
                _ => inner.to_string(),
            };
            ConfigError {
                file: None,
                field: (path != ".").then_some(path),
                message,
            }
        })?;
        // Only whitespace may follow the object: an edit half written over a longer file
        // (the new text, then the old one's tail) is an error, not the first part alone.
        de.end().map_err(syntax)?;
        Config::validate(raw.0)
    }

    fn validate(raw: Raw) -> Result<Config, ConfigError> {
        let listen = match raw.listen {
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
            Some(text) => text.parse().map_err(|_| {
                ConfigError::field("listen", format!("{text:?} is not an IP address and port"))
            })?,
        };

        let raw_servers = raw
            .servers
            .ok_or_else(|| ConfigError::field("servers", "missing: list at least one backend"))?;
        if raw_servers.is_empty() {
            return Err(ConfigError::field(
                "servers",
                "is empty: list at least one backend",
            ));
        }
        let mut servers = Vec::with_capacity(raw_servers.len());
        let mut seen = HashSet::new();
        for (i, Object(s)) in raw_servers.into_iter().enumerate() {
            let field = |name: &str| format!("servers[{i}].{name}");
            let host = s.host.trim().to_owned();
            if host.is_empty() {
                return Err(ConfigError::field(field("host"), "is empty"));
            }
            let port = u16::try_from(s.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    ConfigError::field(field("port"), format!("{} is not a port (1-65535)", s.port))
                })?;
            let weight = match s.weight {
                None => 1,
                Some(w) => u32::try_from(w).ok().filter(|w| *w >= 1).ok_or_else(|| {
                    ConfigError::field(
                        field("weight"),
                        format!("{w} is not a weight (an integer of at least 1)"),
                    )
                })?,
            };
            // An IPv6 address may come in brackets, as in a URI (`[::1]`).
            let ip = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                Some(inner) => Some(inner.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| {
                    ConfigError::field(field("host"), format!("{host:?} is not an IPv6 address"))
                })?),
                None => host.parse::<IpAddr>().ok(),
            };
            // Kept as the address itself, without the brackets of URI syntax.
            let host = match ip {
                Some(IpAddr::V6(ip)) if host.starts_with('[') => ip.to_string(),
                _ => host,
            };
            let resolve = s.resolve.unwrap_or(false);
            if resolve && ip.is_some() {
                return Err(ConfigError::field(
                    field("resolve"),
                    format!("{host:?} is an IP address: resolve needs a host name"),
                ));
            }
            let text = match ip {
                Some(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
                _ => format!("{host}:{port}"),
            };
            let authority = match text.parse::<Authority>() {
                Ok(a) if !host.contains(['/', '@', '?', '#', ' ']) => a,
                _ => {
                    return Err(ConfigError::field(
                        field("host"),
                        format!("{host:?} is not a host name or IP address"),
                    ))
                }
            };
            let protocol = match s.protocol.as_deref() {
                None | Some("http1") => Protocol::Http1,
                Some("http2") => Protocol::Http2,
                Some(other) => {
                    return Err(ConfigError::field(
                        field("protocol"),
                        format!("unknown protocol {other:?} (expected \"http1\" or \"http2\")"),
                    ))
                }
            };
            let server = ServerConfig {
                host,
                port,
                weight,
                resolve,
                protocol,
                authority,
            };
            // The same address however it is written: an IP in any of its forms, a name in
            // any case and with or without the root's dot.
            let same = match ip {
                Some(ip) => ip.to_string(),
                None => server.host.trim_end_matches('.').to_ascii_lowercase(),
            };
            if !seen.insert((same, port)) {
                return Err(ConfigError::field(
                    format!("servers[{i}]"),
                    format!("{} is listed twice", server.authority),
                ));
            }
            servers.push(server);
        }

        let algorithm = raw.algorithm.unwrap_or_default();
        let hash_key = match raw.hash_key {
            None => HashKey::default(),
            Some(text) => text
                .parse()
                .map_err(|e: InvalidHashKey| ConfigError::field("hash_key", e.to_string()))?,
        };

        let url = raw.health_check_url.unwrap_or_else(|| "/health".to_owned());
        let health_check_url = url
            .parse::<PathAndQuery>()
            .ok()
            .filter(|_| url.starts_with('/'))
            .ok_or_else(|| {
                ConfigError::field(
                    "health_check_url",
                    format!("{url:?} is not a path starting with /"),
                )
            })?;

        let interval = seconds("health_check_interval", raw.health_check_interval, 10.0)?;
        let timeout = seconds("health_check_timeout", raw.health_check_timeout, 2.0)?;
        if timeout >= interval {
            return Err(ConfigError::field(
                "health_check_timeout",
                format!("{timeout:?} must be less than health_check_interval ({interval:?})"),
            ));
        }
        let health = Settings {
            interval,
            timeout,
            healthy_threshold: threshold("healthy_threshold", raw.healthy_threshold)?,
            unhealthy_threshold: threshold("unhealthy_threshold", raw.unhealthy_threshold)?,
        };

        let trusted_proxies = raw
            .trusted_proxies
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                p.parse().map_err(|e: crate::proxy::InvalidTrustedProxy| {
                    ConfigError::field(format!("trusted_proxies[{i}]"), e.to_string())
                })
            })
            .collect::<Result<_, _>>()?;

        let admin_listen = match raw.admin_listen {
            None => None,
            Some(text) => Some(text.parse().map_err(|_| {
                ConfigError::field(
                    "admin_listen",
                    format!("{text:?} is not an IP address and port"),
                )
            })?),
        };
        if admin_listen == Some(listen) && listen.port() != 0 {
            return Err(ConfigError::field(
                "admin_listen",
                "must differ from listen: the admin listener is never served on listen",
            ));
        }

        let passive_health = match raw.passive_health {
            None => PassiveHealth::default(),
            Some(Object(p)) => {
                let defaults = PassiveHealth::default();
                PassiveHealth {
                    consecutive_failures: match p.consecutive_failures {
                        None => defaults.consecutive_failures,
                        Some(n) => count("passive_health.consecutive_failures", n)?,
                    },
                    ejection_time: seconds(
                        "passive_health.ejection_time",
                        p.ejection_time,
                        defaults.ejection_time.as_secs_f64(),
                    )?,
                    max_ejection_percent: match p.max_ejection_percent {
                        None => defaults.max_ejection_percent,
                        Some(n) => u8::try_from(n).ok().filter(|n| *n <= 100).ok_or_else(|| {
                            ConfigError::field(
                                "passive_health.max_ejection_percent",
                                format!("{n} is not a percentage (0-100)"),
                            )
                        })?,
                    },
                }
            }
        };
        let retries = match raw.retries {
            None => 1,
            Some(n) => count("retries", n)?,
        };
        let retry_budget = match raw.retry_budget {
            None => 20.0,
            Some(v) if v.is_finite() && (0.0..=1e6).contains(&v) => v,
            Some(v) => {
                return Err(ConfigError::field(
                    "retry_budget",
                    format!("{v} is not a percentage (a number of at least 0)"),
                ))
            }
        };
        let max_connections = match raw.max_connections {
            None => None,
            Some(n) => Some(usize::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                ConfigError::field(
                    "max_connections",
                    format!("{n} is not a count (an integer of at least 1)"),
                )
            })?),
        };

        Ok(Config {
            listen,
            servers,
            algorithm,
            hash_key,
            health_check_url,
            health,
            connect_timeout: seconds("connect_timeout", raw.connect_timeout, 2.0)?,
            response_timeout: seconds("response_timeout", raw.response_timeout, 30.0)?,
            spawn_backends: raw.spawn_backends.unwrap_or(true),
            trusted_proxies,
            dns_refresh: seconds("dns_refresh", raw.dns_refresh, 30.0)?,
            admin_listen,
            passive_health,
            retries,
            retry_budget,
            slow_start: seconds_or_zero("slow_start", raw.slow_start, 0.0)?,
            max_connections,
            health_check_grpc: raw.health_check_grpc,
            tunnel_idle_timeout: seconds("tunnel_idle_timeout", raw.tunnel_idle_timeout, 3600.0)?,
            shutdown_timeout: seconds_or_zero("shutdown_timeout", raw.shutdown_timeout, 30.0)?,
            client_idle_timeout: seconds("client_idle_timeout", raw.client_idle_timeout, 60.0)?,
        })
    }

    /// The hashing key of requests: [`hash_key`](Self::hash_key), with the client IP (its
    /// own or its fallback's) taken under [`trusted_proxies`](Self::trusted_proxies).
    pub fn request_key(&self) -> HashKey {
        let client_ip = ClientIpKey::trusting(self.trusted_proxies.iter().copied());
        self.hash_key.clone().with_client_ip(client_ip)
    }

    /// What changed from `self` (running) to `next`.
    pub fn diff(&self, next: &Config) -> Diff {
        // Servers of `a` that `b` does not list (a change of `resolve` replaces a server).
        let only_in = |a: &[ServerConfig], b: &[ServerConfig]| -> Vec<ServerConfig> {
            a.iter()
                .filter(|s| !b.iter().any(|o| o.same_as(s)))
                .cloned()
                .collect()
        };
        let added = only_in(&next.servers, &self.servers);
        let removed = only_in(&self.servers, &next.servers);
        let reweighted = next
            .servers
            .iter()
            .filter(|s| {
                self.servers
                    .iter()
                    .any(|o| o.same_as(s) && o.weight != s.weight)
            })
            .cloned()
            .collect();
        Diff {
            added,
            removed,
            reweighted,
            algorithm: (self.algorithm != next.algorithm).then(|| next.algorithm.clone()),
            hash_key: (self.hash_key != next.hash_key).then(|| next.hash_key.clone()),
            dns_refresh: self.dns_refresh != next.dns_refresh,
            health: self.health != next.health
                || self.health_check_url != next.health_check_url
                || self.health_check_grpc != next.health_check_grpc,
            passive_health: self.passive_health != next.passive_health,
            retries: self.retries != next.retries || self.retry_budget != next.retry_budget,
            slow_start: self.slow_start != next.slow_start,
            timeouts: self.connect_timeout != next.connect_timeout
                || self.response_timeout != next.response_timeout,
            spawn_backends: self.spawn_backends != next.spawn_backends,
            needs_restart: [
                (self.listen != next.listen).then_some("listen"),
                (self.trusted_proxies != next.trusted_proxies).then_some("trusted_proxies"),
                (self.admin_listen != next.admin_listen).then_some("admin_listen"),
                (self.max_connections != next.max_connections).then_some("max_connections"),
                (self.client_idle_timeout != next.client_idle_timeout)
                    .then_some("client_idle_timeout"),
                (self.tunnel_idle_timeout != next.tunnel_idle_timeout)
                    .then_some("tunnel_idle_timeout"),
                (self.shutdown_timeout != next.shutdown_timeout).then_some("shutdown_timeout"),
            ]
            .into_iter()
            .flatten()
            .collect(),
        }
    }
}

/// The difference between two configurations. See [`Config::diff`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// Servers to add.
    pub added: Vec<ServerConfig>,
    /// Servers to remove (they drain).
    pub removed: Vec<ServerConfig>,
    /// Servers that stay with a new weight.
    pub reweighted: Vec<ServerConfig>,
    /// The new algorithm, if it changed.
    pub algorithm: Option<Algorithm>,
    /// The new hash key, if it changed.
    pub hash_key: Option<HashKey>,
    /// `dns_refresh` changed.
    pub dns_refresh: bool,
    /// Health-check settings, URL or `health_check_grpc` changed.
    pub health: bool,
    /// `passive_health` changed.
    pub passive_health: bool,
    /// `retries` or `retry_budget` changed.
    pub retries: bool,
    /// `slow_start` changed.
    pub slow_start: bool,
    /// `connect_timeout` or `response_timeout` changed.
    pub timeouts: bool,
    /// `spawn_backends` changed.
    pub spawn_backends: bool,
    /// Keys whose change takes a restart.
    pub needs_restart: Vec<&'static str>,
}

impl Diff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        *self == Diff::default()
    }
}

/// A duration in seconds, at least a millisecond: tokio's timers count whole
/// milliseconds, so a shorter interval or timeout would not mean what it says (and
/// `1e-10` would round to zero: probes without pause, timeouts that expire at once).
fn seconds(field: &str, value: Option<f64>, default: f64) -> Result<Duration, ConfigError> {
    let v = value.unwrap_or(default);
    if !(v > 0.0 && v.is_finite()) {
        return Err(ConfigError::field(
            field,
            format!("{v} is not a positive number of seconds"),
        ));
    }
    if v >= 1e9 {
        return Err(ConfigError::field(
            field,
            format!("{v} seconds is too long (at most 999999999, about 31 years)"),
        ));
    }
    if v < 0.001 {
        return Err(ConfigError::field(
            field,
            format!("{v} is less than a millisecond (0.001)"),
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Like [`seconds`], but 0 is allowed (it turns the feature off or means "at once").
fn seconds_or_zero(field: &str, value: Option<f64>, default: f64) -> Result<Duration, ConfigError> {
    match value.unwrap_or(default) {
        0.0 => Ok(Duration::ZERO),
        v if v < 0.0 || !v.is_finite() => Err(ConfigError::field(
            field,
            format!("{v} is not a number of seconds (0 or more)"),
        )),
        v => seconds(field, Some(v), default),
    }
}

/// A count that may be 0.
fn count(field: &str, value: i64) -> Result<u32, ConfigError> {
    u32::try_from(value).map_err(|_| {
        ConfigError::field(
            field,
            format!("{value} is not a count (an integer of at least 0)"),
        )
    })
}

fn threshold(field: &str, value: Option<i64>) -> Result<u32, ConfigError> {
    match value {
        None => Ok(1),
        Some(v) => u32::try_from(v).ok().filter(|v| *v >= 1).ok_or_else(|| {
            ConfigError::field(
                field,
                format!("{v} is not a count (an integer of at least 1)"),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Config::from_json(json).unwrap_err().to_string()
    }

    /// Each configuration is refused with a message containing its expected text.
    fn refused(cases: &[(String, &str)]) {
        for (json, expected) in cases {
            let e = err(json);
            assert!(
                e.contains(expected),
                "{json}\n  gave: {e}\n  want: {expected}"
            );
        }
    }

    const ONE: &str = r#""servers": [{"host": "127.0.0.1", "port": 9001}]"#;

    /// The defaults are the contract's literals (`../shared/CONTRACT.md`), not the code's
    /// own constants, so that a changed default fails here.
    #[test]
    fn defaults() {
        let c = Config::from_json(&format!("{{{ONE}}}")).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.algorithm, "round_robin");
        assert_eq!(c.health_check_url, "/health");
        assert_eq!(c.health.interval, Duration::from_secs(10));
        assert_eq!(c.health.timeout, Duration::from_secs(2));
        assert_eq!(c.health.healthy_threshold, 1);
        assert_eq!(c.health.unhealthy_threshold, 1);
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.response_timeout, Duration::from_secs(30));
        assert!(c.spawn_backends);
        assert!(c.trusted_proxies.is_empty());
        assert_eq!(c.servers[0].weight, 1);
        // The contract's example file, with every key spelled out at its default, means the
        // same as the file with only `servers`.
        let spelled_out = Config::from_json(
            r#"{
                "listen": "127.0.0.1:8080",
                "servers": [{"host": "127.0.0.1", "port": 9001, "weight": 1}],
                "algorithm": "round_robin",
                "health_check_url": "/health",
                "health_check_interval": 10,
                "health_check_timeout": 2,
                "healthy_threshold": 1,
                "unhealthy_threshold": 1,
                "connect_timeout": 2,
                "response_timeout": 30,
                "spawn_backends": true,
                "trusted_proxies": []
            }"#,
        )
        .unwrap();
        assert_eq!(spelled_out, c);
    }

    #[test]
    fn version_0_2_keys() {
        let c = Config::from_json(&format!("{{{ONE}}}")).unwrap();
        assert_eq!(c.passive_health, PassiveHealth::default());
        assert!(c.passive_health.enabled());
        assert_eq!((c.retries, c.retry_budget), (1, 20.0));
        assert_eq!(c.slow_start, Duration::ZERO);
        assert_eq!(c.max_connections, None);
        assert_eq!(c.health_check_grpc, None);
        assert_eq!(c.tunnel_idle_timeout, Duration::from_secs(3600));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.client_idle_timeout, Duration::from_secs(60));
        assert_eq!(c.servers[0].protocol(), Protocol::Http1);
        // The contract's example of version 0.2, every key at its default.
        let spelled_out = Config::from_json(&format!(
            r#"{{{ONE}, "passive_health": {{ "consecutive_failures": 5, "ejection_time": 10, "max_ejection_percent": 50 }},
                "retries": 1, "retry_budget": 20, "slow_start": 0, "max_connections": null,
                "dns_refresh": 30, "health_check_grpc": null, "tunnel_idle_timeout": 3600,
                "shutdown_timeout": 30, "client_idle_timeout": 60, "admin_listen": null}}"#
        ))
        .unwrap();
        assert_eq!(spelled_out, c);

        // Objects in part: missing fields take their defaults.
        let c = Config::from_json(
            r#"{"servers": [{"host": "127.0.0.1", "port": 9001, "protocol": "http2"}],
                "passive_health": {"consecutive_failures": 0}, "retries": 0, "slow_start": 2.5,
                "max_connections": 100, "health_check_grpc": "", "shutdown_timeout": 0}"#,
        )
        .unwrap();
        assert_eq!(c.servers[0].protocol(), Protocol::Http2);
        assert!(!c.passive_health.enabled());
        assert_eq!(c.passive_health.ejection_time, Duration::from_secs(10));
        assert_eq!(c.retries, 0);
        assert_eq!(c.slow_start, Duration::from_millis(2500));
        assert_eq!(c.max_connections, Some(100));
        assert_eq!(c.health_check_grpc.as_deref(), Some(""));
        assert_eq!(c.shutdown_timeout, Duration::ZERO);

        let with = |rest: &str| format!("{{{ONE}, {rest}}}");
        refused(&[
            (
                r#"{"servers": [{"host": "127.0.0.1", "port": 9001, "protocol": "h3"}]}"#.into(),
                "servers[0].protocol: unknown protocol \"h3\"",
            ),
            (
                with(r#""passive_health": {"max_ejection_percent": 101}"#),
                "passive_health.max_ejection_percent: 101 is not a percentage",
            ),
            (
                with(r#""passive_health": {"ejection_time": -1}"#),
                "passive_health.ejection_time: -1 is not a positive number",
            ),
            (
                with(r#""passive_health": {"consecutive": 1}"#),
                "passive_health.consecutive: unknown field",
            ),
            (with(r#""retries": -1"#), "retries: -1 is not a count"),
            (
                with(r#""retry_budget": -5"#),
                "retry_budget: -5 is not a percentage",
            ),
            (
                with(r#""slow_start": -1"#),
                "slow_start: -1 is not a number of seconds",
            ),
            (with(r#""slow_start": "10s""#), "slow_start: invalid type"),
            (
                with(r#""max_connections": 0"#),
                "max_connections: 0 is not a count",
            ),
            (
                with(r#""tunnel_idle_timeout": 0"#),
                "tunnel_idle_timeout: 0 is not a positive",
            ),
            (
                with(r#""shutdown_timeout": -2"#),
                "shutdown_timeout: -2 is not a number",
            ),
            (
                with(r#""client_idle_timeout": 0"#),
                "client_idle_timeout: 0 is not a positive",
            ),
            (
                format!(r#"{{{ONE}, "connect_timeout": 1e12}}"#),
                "connect_timeout: 1000000000000 seconds is too long",
            ),
        ]);
    }

    #[test]
    fn fractions_of_seconds() {
        let c = Config::from_json(&format!(
            r#"{{{ONE}, "health_check_interval": 0.5, "health_check_timeout": 0.25}}"#
        ))
        .unwrap();
        assert_eq!(c.health.interval, Duration::from_millis(500));
        assert_eq!(c.health.timeout, Duration::from_millis(250));
    }

    #[test]
    fn every_error_names_its_field() {
        let cases = [
            (
                format!(r#"{{{ONE}, "algorithim": "hashing"}}"#),
                "unknown field `algorithim`",
            ),
            (r#"{"servers": []}"#.to_owned(), "servers: is empty"),
            (r#"{}"#.to_owned(), "servers: missing"),
            (
                r#"{"servers": [{"host": "a", "port": 1}, {"host": "a", "port": 1}]}"#.to_owned(),
                "servers[1]: a:1 is listed twice",
            ),
            // The same address in another form.
            (
                r#"{"servers": [{"host": "::1", "port": 1}, {"host": "0:0:0:0:0:0:0:1", "port": 1}]}"#
                    .to_owned(),
                "servers[1]: [::1]:1 is listed twice",
            ),
            (
                r#"{"servers": [{"host": "::1", "port": 1}, {"host": "[::1]", "port": 1}]}"#
                    .to_owned(),
                "servers[1]: [::1]:1 is listed twice",
            ),
            (
                r#"{"servers": [{"host": "Backend.example", "port": 1}, {"host": "backend.example.", "port": 1}]}"#
                    .to_owned(),
                "servers[1]: backend.example.:1 is listed twice",
            ),
            (
                r#"{"servers": [{"host": "[127.0.0.1]", "port": 1}]}"#.to_owned(),
                "servers[0].host: \"[127.0.0.1]\" is not an IPv6 address",
            ),
            (
                r#"{"servers": [{"host": "a", "port": 70000}]}"#.to_owned(),
                "servers[0].port: 70000 is not a port",
            ),
            (
                r#"{"servers": [{"host": "a", "port": 0}]}"#.to_owned(),
                "servers[0].port: 0 is not a port",
            ),
            (
                r#"{"servers": [{"host": "a", "port": "80"}]}"#.to_owned(),
                "servers[0].port: invalid type",
            ),
            (
                r#"{"servers": [{"host": "a", "port": 1, "weight": 0}]}"#.to_owned(),
                "servers[0].weight: 0 is not a weight",
            ),
            (
                r#"{"servers": [{"host": "a", "port": 1, "wieght": 2}]}"#.to_owned(),
                "servers[0].wieght: unknown field `wieght`",
            ),
            (
                r#"{"servers": [{"host": "a b", "port": 1}]}"#.to_owned(),
                "servers[0].host:",
            ),
            (
                format!(r#"{{{ONE}, "algorithm": "random"}}"#),
                "algorithm: unknown algorithm \"random\"",
            ),
            (
                format!(r#"{{{ONE}, "health_check_interval": 2, "health_check_timeout": 2}}"#),
                "health_check_timeout: 2s must be less than health_check_interval",
            ),
            (
                format!(r#"{{{ONE}, "health_check_interval": -1}}"#),
                "health_check_interval: -1 is not a positive number",
            ),
            (
                format!(r#"{{{ONE}, "connect_timeout": 1e-10}}"#),
                "connect_timeout: 0.0000000001 is less than a millisecond",
            ),
            (
                format!(r#"{{{ONE}, "healthy_threshold": 0}}"#),
                "healthy_threshold: 0 is not a count",
            ),
            (
                format!(r#"{{{ONE}, "listen": "localhost"}}"#),
                "listen: \"localhost\" is not an IP address and port",
            ),
            (
                format!(r#"{{{ONE}, "health_check_url": "health"}}"#),
                "health_check_url: \"health\" is not a path",
            ),
            (
                format!(r#"{{{ONE}, "trusted_proxies": ["10.0.0.0/99"]}}"#),
                "trusted_proxies[0]: \"10.0.0.0/99\"",
            ),
            (
                format!(r#"{{{ONE}, "spawn_backends": "yes"}}"#),
                "spawn_backends: invalid type",
            ),
        ];
        refused(&cases);
    }

    /// Type errors say what JSON was expected, in JSON's words, and objects are objects:
    /// serde's derived structs would also take an array of their fields, and name Rust
    /// types ("struct RawServer", "i64") in their messages.
    #[test]
    fn type_errors_speak_json() {
        let with = |extra: &str| format!("{{{ONE}, {extra}}}");
        let cases = [
            (
                "[]".to_owned(),
                "invalid type: sequence, expected an object",
            ),
            (r#""x""#.to_owned(), "expected an object"),
            (
                r#"{"servers": [[]]}"#.to_owned(),
                "servers[0]: invalid type: sequence, expected an object",
            ),
            (
                r#"{"servers": [["127.0.0.1", 9001, null, null, null]]}"#.to_owned(),
                "servers[0]: invalid type: sequence, expected an object",
            ),
            (
                with(r#""passive_health": [3, 30, 50]"#),
                "passive_health: invalid type: sequence, expected an object",
            ),
            (
                r#"{"servers": [{"host": "a", "port": "1"}]}"#.to_owned(),
                r#"servers[0].port: invalid type: string "1", expected an integer"#,
            ),
            (
                r#"{"servers": [{"host": "a", "port": 1.5}]}"#.to_owned(),
                "servers[0].port: invalid type: floating point `1.5`, expected an integer",
            ),
            (
                with(r#""retries": 18446744073709551615"#),
                "retries: integer `18446744073709551615` is too large",
            ),
            (
                with(r#""response_timeout": "30""#),
                r#"response_timeout: invalid type: string "30", expected a number"#,
            ),
            (
                with(r#""passive_health": {"ejection_time": true}"#),
                "passive_health.ejection_time: invalid type: boolean `true`, expected a number",
            ),
        ];
        refused(&cases);
        for json in ["[]", r#"{"servers": [[]]}"#, &with(r#""retries": "1""#)] {
            let e = err(json);
            for rust in ["struct", "Raw", "i64", "f64"] {
                assert!(!e.contains(rust), "{e}");
            }
        }
        // `null` is as good as leaving the key out; whole numbers are numbers.
        let c = Config::from_json(&with(
            r#""retries": null, "passive_health": {"ejection_time": null}, "response_timeout": 5"#,
        ))
        .unwrap();
        assert_eq!(
            c.retries,
            Config::from_json(&format!("{{{ONE}}}")).unwrap().retries
        );
        assert_eq!(c.response_timeout, Duration::from_secs(5));
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let e = err("{\n  \"servers\": [\n    {\"host\": \"a\" \"port\": 1}\n  ]\n}");
        assert!(e.starts_with("invalid JSON: "), "{e}");
        assert!(e.contains("line 3 column 18"), "{e}");
        let e = err("{\"servers\": [");
        assert!(e.contains("line 1 column 13"), "{e}");
        // What follows the object: an edit written over a longer file without truncating
        // it first leaves the old tail there.
        let servers = r#""servers": [{"host": "127.0.0.1", "port": 9001}]"#;
        for tail in ["}", " {}", "garbage", "\n<<<<<<< HEAD\n"] {
            let e = err(&format!("{{{servers}}}{tail}"));
            assert!(
                e.starts_with("invalid JSON: trailing characters"),
                "{tail:?}: {e}"
            );
            assert!(e.contains("line "), "{e}");
        }
        assert!(Config::from_json(&format!("{{{servers}}}\n \t\r\n")).is_ok());
        assert!(Config::from_json(&format!("\u{feff}{{{servers}}}")).is_ok());
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("tower-lb-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, r#"{"servers": [{"host": "a", "port": 0}]}"#).unwrap();
        let e = Config::load(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: servers[0].port: 0 is not a port (1-65535)",
                path.display()
            )
        );
        assert_eq!(e.field_name(), Some("servers[0].port"));
        let e = Config::load(&dir.join("missing.json")).unwrap_err();
        assert!(e.to_string().contains("missing.json: cannot read"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn diffs() {
        let a = Config::from_json(
            r#"{"servers": [{"host": "a", "port": 1}, {"host": "b", "port": 1, "weight": 2}]}"#,
        )
        .unwrap();
        let b = Config::from_json(
            r#"{"servers": [{"host": "b", "port": 1, "weight": 3}, {"host": "c", "port": 1}], "algorithm": "hashing",
                "health_check_interval": 5, "listen": "127.0.0.1:9999"}"#,
        )
        .unwrap();
        let d = a.diff(&b);
        assert_eq!(
            d.added.iter().map(|s| s.host.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(
            d.removed
                .iter()
                .map(|s| s.host.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        let reweighted: Vec<(String, u32)> = d
            .reweighted
            .iter()
            .map(|s| (s.authority().to_string(), s.weight()))
            .collect();
        assert_eq!(reweighted, [("b:1".to_owned(), 3)]);
        assert_eq!(d.algorithm.map(|a| a.name()), Some("hashing"));
        assert!(d.health);
        assert!(!d.timeouts);
        assert_eq!(d.needs_restart, ["listen"]);
        assert!(a.diff(&a).is_empty());
    }

    #[test]
    fn hash_key_resolve_and_dns_refresh() {
        let c = Config::from_json(&format!("{{{ONE}}}")).unwrap();
        assert_eq!(c.hash_key, HashKey::default());
        assert_eq!(c.dns_refresh, Duration::from_secs(30));
        assert!(!c.servers[0].resolve());
        let c = Config::from_json(
            r#"{"servers": [{"host": "localhost", "port": 9001, "resolve": true}],
                "hash_key": "cookie:sid", "dns_refresh": 0.5, "algorithm": "hashing",
                "trusted_proxies": ["10.0.0.0/8"]}"#,
        )
        .unwrap();
        assert!(c.servers[0].resolve());
        assert_eq!(c.hash_key.to_string(), "cookie:sid");
        assert_eq!(c.dns_refresh, Duration::from_millis(500));
        assert_eq!(c.algorithm, "hashing");
        // The request key falls back to the client IP under the trusted proxies.
        let trusting = ClientIpKey::trusting(["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(c.request_key(), c.hash_key.clone().with_client_ip(trusting));

        let cases = [
            (
                format!(r#"{{{ONE}, "hash_key": "query"}}"#),
                "hash_key: \"query\" is not a hash key",
            ),
            (
                format!(r#"{{{ONE}, "hash_key": "header:"}}"#),
                "hash_key: \"header:\" is not a hash key",
            ),
            (
                format!(r#"{{{ONE}, "hash_key": 1}}"#),
                "hash_key: invalid type",
            ),
            (
                r#"{"servers": [{"host": "127.0.0.1", "port": 1, "resolve": true}]}"#.to_owned(),
                "servers[0].resolve: \"127.0.0.1\" is an IP address",
            ),
            (
                r#"{"servers": [{"host": "::1", "port": 1, "resolve": true}]}"#.to_owned(),
                "servers[0].resolve: \"::1\" is an IP address",
            ),
            (
                r#"{"servers": [{"host": "[::1]", "port": 1, "resolve": true}]}"#.to_owned(),
                "servers[0].resolve: \"::1\" is an IP address",
            ),
            (
                r#"{"servers": [{"host": "a", "port": 1, "resolve": "yes"}]}"#.to_owned(),
                "servers[0].resolve: invalid type",
            ),
            (
                format!(r#"{{{ONE}, "dns_refresh": -1}}"#),
                "dns_refresh: -1 is not a positive number",
            ),
            (
                format!(r#"{{{ONE}, "dns_refresh": "30"}}"#),
                "dns_refresh: invalid type",
            ),
            (
                format!(r#"{{{ONE}, "algorithm": 3}}"#),
                "algorithm: invalid type",
            ),
        ];
        refused(&cases);
    }

    #[test]
    fn resolve_and_hash_key_diffs() {
        let a = Config::from_json(r#"{"servers": [{"host": "a", "port": 1}]}"#).unwrap();
        let b = Config::from_json(
            r#"{"servers": [{"host": "a", "port": 1, "resolve": true}], "hash_key": "path",
                "dns_refresh": 5}"#,
        )
        .unwrap();
        let d = a.diff(&b);
        // Turning resolve on replaces the server.
        assert_eq!(d.removed, a.servers);
        assert_eq!(d.added, b.servers);
        assert_eq!(d.hash_key, Some(HashKey::Path(crate::proxy::PathKey)));
        assert!(d.dns_refresh);
        assert!(b.diff(&b).is_empty());
    }

    #[test]
    fn ipv6_hosts() {
        let c = Config::from_json(r#"{"servers": [{"host": "::1", "port": 9001}]}"#).unwrap();
        assert_eq!(c.servers[0].authority(), "[::1]:9001");
    }
}
