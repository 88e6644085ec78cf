//! A health-checked HTTP balancer in one expression.

use std::fmt;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery};

use super::{balancer, Client, ClientIpKey, ErrorResponses, HttpBackends, HttpBalance};
use crate::balance::{MakeBackend, PassiveHealth, Retries};
use crate::health::{self, HealthCheck, HttpProbe};
use crate::policy::{Policy, RoundRobin};
use crate::Backends;

/// Builds an [`HttpBalance`]: a backend set with its health checks attached, and the
/// balancer over it. What the standalone proxy does, with the same defaults, for an app
/// that embeds the balancer.
///
/// | setting | default |
/// | --- | --- |
/// | [`policy`](Self::policy) | [`RoundRobin`] |
/// | [`key`](Self::key) (for hashing) | [`ClientIpKey::new()`]: the connection's peer IP |
/// | [`health_check`](Self::health_check) | `GET /health`, passing on 2xx |
/// | [`health_interval`](Self::health_interval), [`health_timeout`](Self::health_timeout) | 10 s, 2 s |
/// | [`healthy_threshold`](Self::healthy_threshold), [`unhealthy_threshold`](Self::unhealthy_threshold) | 1, 1 |
/// | [`connect_timeout`](Self::connect_timeout), [`response_timeout`](Self::response_timeout) | 2 s, 30 s |
/// | [`retries`](Self::retries), [`retry_budget`](Self::retry_budget) | 1, 20 percent (see [`Retries`]) |
/// | [`passive_health`](Self::passive_health) (outlier ejection) | off |
/// | [`slow_start`](Self::slow_start) | off |
///
/// [`build`](Self::build) (or [`build_backends`](Self::build_backends)) must be called
/// within a tokio runtime: it spawns the health checks on it
/// ([`tokio::spawn`]). A backend takes requests only once its first probe has passed; a
/// backend that fails its probes from the start never gets one. The checks follow the
/// set (see [`health::Attached`]): backends inserted later, through
/// [`Backends::update`] or [`Backends::discover`], are probed before they take traffic,
/// removed ones are no longer probed, and the task ends when the balancer and every clone
/// of its set are dropped. With [`without_health_check`](Self::without_health_check),
/// every backend takes traffic at once.
///
/// The balancer is a [`tower::Service`] for `http::Request<B>` with any body type the
/// [`Backend`](super::Backend) takes (axum's, hyper's `Incoming`), cheap to clone.
///
/// # Examples
///
/// In an axum app, under a path prefix (the client IP comes from axum's `ConnectInfo`
/// with this crate's `axum` feature):
///
/// ```
/// # #[cfg(feature = "axum")]
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_lb::BoxError> {
/// use axum::{routing::get, Router};
/// use tower_lb::{policy::Hashing, proxy};
///
/// let addrs = ["127.0.0.1:9001".parse()?, "127.0.0.1:9002".parse()?];
/// let api = proxy::Builder::new().policy(Hashing::new()).build(addrs)?;
/// let app: Router = Router::new()
///     .route("/", get(|| async { "the app's own route" }))
///     .nest_service("/api", api);
/// # Ok(()) }
/// # #[cfg(not(feature = "axum"))] fn main() {}
/// ```
///
/// As the service of a `tower::ServiceBuilder`, under a layer, served by [`serve`]:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_lb::BoxError> {
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_lb::proxy;
///
/// fn served_by<B>(mut response: http::Response<B>) -> http::Response<B> {
///     let value = http::HeaderValue::from_static("tower-lb");
///     response.headers_mut().insert("x-served-by", value);
///     response
/// }
///
/// let api = proxy::Builder::new()
///     .health_check("/ready")
///     .health_interval(Duration::from_secs(5))
///     .connect_timeout(Duration::from_millis(500))
///     .build(["127.0.0.1:9001".parse()?])?;
/// let service = ServiceBuilder::new().map_response(served_by).service(api);
/// let listener = proxy::bind("127.0.0.1:0".parse()?)?;
/// proxy::serve(listener, service, async {}).await?; // shuts down at once
/// # Ok(()) }
/// ```
///
/// A plain hyper server is `examples/hyper.rs`.
///
/// [`serve`]: super::serve
#[derive(Clone)]
pub struct Builder<P = RoundRobin, E = ClientIpKey> {
    policy: P,
    key: E,
    client: Client,
    /// `None`: no health checks.
    health: Option<(String, health::Settings)>,
    /// Retries and the budget in percent.
    retries: (u32, f64),
    passive: PassiveHealth,
    slow_start: Duration,
}

impl Builder {
    /// A builder with the defaults in the table above.
    pub fn new() -> Self {
        Builder {
            policy: RoundRobin::new(),
            key: ClientIpKey::new(),
            client: Client::new(),
            health: Some(("/health".to_owned(), health::Settings::default())),
            retries: (1, 20.0),
            passive: PassiveHealth::off(),
            slow_start: Duration::ZERO,
        }
    }
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl<P, E> Builder<P, E> {
    /// Picks backends with `policy` (see [`crate::policy`]).
    pub fn policy<Q: Policy>(self, policy: Q) -> Builder<Q, E> {
        Builder {
            policy,
            key: self.key,
            client: self.client,
            health: self.health,
            retries: self.retries,
            passive: self.passive,
            slow_start: self.slow_start,
        }
    }

    /// Takes each request's hashing key from `key` (a
    /// [`RequestKey`](crate::balance::RequestKey)); for instance
    /// [`ClientIpKey::trusting`] to believe `X-Forwarded-For` from a proxy in front.
    pub fn key<F>(self, key: F) -> Builder<P, F> {
        Builder {
            policy: self.policy,
            key,
            client: self.client,
            health: self.health,
            retries: self.retries,
            passive: self.passive,
            slow_start: self.slow_start,
        }
    }

    /// The transport to the backends, for settings this builder does not repeat.
    pub fn client(mut self, client: Client) -> Self {
        self.client = client;
        self
    }

    /// Time allowed to open a connection to a backend.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.client = self.client.connect_timeout(timeout);
        self
    }

    /// Time allowed from sending a request until its response headers arrive.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.client = self.client.response_timeout(timeout);
        self
    }

    /// Further backends a request may be tried on when its backend failed before acting
    /// on it (default 1; 0 turns retries off). See [`Retries`].
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries.0 = retries;
        self
    }

    /// Retries stay within `percent` percent of the requests of the last 10 seconds, and
    /// 3 a second at least (default 20). See [`Retries`].
    pub fn retry_budget(mut self, percent: f64) -> Self {
        self.retries.1 = percent;
        self
    }

    /// Probes `GET {path}` on each backend (a 2xx passes); turns health checks on if
    /// they were off.
    pub fn health_check(mut self, path: impl Into<String>) -> Self {
        let settings = self.health_settings_or_default();
        self.health = Some((path.into(), settings));
        self
    }

    /// Ejects backends that fail requests in a row, for a while (see
    /// [`balance::outlier`](crate::balance::outlier)): for instance
    /// `PassiveHealth::default()`, the standalone proxy's 5 failures, 10 s, 50 %. Off by
    /// default.
    pub fn passive_health(mut self, settings: PassiveHealth) -> Self {
        self.passive = settings;
        self
    }

    /// A backend that joins the set later, or turns healthy again, ramps from a tenth of
    /// its weight to all of it over `duration` (see [`Backends::slow_start`]); the
    /// backends given to [`build`](Self::build) take their full weight at once. Zero: off.
    pub fn slow_start(mut self, duration: Duration) -> Self {
        self.slow_start = duration;
        self
    }

    /// Every backend takes traffic at once and keeps it: no health checks.
    pub fn without_health_check(mut self) -> Self {
        self.health = None;
        self
    }

    /// All health-check timings and thresholds at once.
    pub fn health_settings(self, settings: health::Settings) -> Self {
        self.with_settings(|s| *s = settings)
    }

    /// Time between the starts of two probes of one backend.
    pub fn health_interval(self, interval: Duration) -> Self {
        self.with_settings(|s| s.interval = interval)
    }

    /// Time a probe may take before it counts as failed; below the interval.
    pub fn health_timeout(self, timeout: Duration) -> Self {
        self.with_settings(|s| s.timeout = timeout)
    }

    /// Consecutive passes that bring an unhealthy backend back (at least 1).
    pub fn healthy_threshold(self, passes: u32) -> Self {
        self.with_settings(|s| s.healthy_threshold = passes.max(1))
    }

    /// Consecutive failures that take a healthy backend out (at least 1).
    pub fn unhealthy_threshold(self, failures: u32) -> Self {
        self.with_settings(|s| s.unhealthy_threshold = failures.max(1))
    }

    fn health_settings_or_default(&self) -> health::Settings {
        self.health.as_ref().map(|(_, s)| *s).unwrap_or_default()
    }

    /// Changes the health settings, turning the checks on (at `/health`) if they were off.
    fn with_settings(mut self, f: impl FnOnce(&mut health::Settings)) -> Self {
        let (_, settings) = self
            .health
            .get_or_insert_with(|| ("/health".to_owned(), health::Settings::default()));
        f(settings);
        self
    }
}

impl<P: Policy, E> Builder<P, E> {
    /// The balancer over backends at `addresses`, its health checks spawned on the
    /// current tokio runtime. Fails outside a runtime and for an invalid health-check
    /// path or timing.
    ///
    /// The set is the balancer's `get_ref().get_ref()`, for changes at run time.
    pub fn build(
        self,
        addresses: impl IntoIterator<Item = Authority>,
    ) -> Result<HttpBalance<P, E>, BuildError> {
        let backends = checked(self.policy, &self.client, self.health, addresses)?;
        backends.passive_health(self.passive);
        if !self.slow_start.is_zero() {
            backends.slow_start(self.slow_start);
        }
        let (retries, percent) = self.retries;
        let retries = Retries::new(retries).budget(percent);
        let balance = balancer(backends, self.key).into_inner();
        Ok(ErrorResponses::new(balance.with_retries(retries)))
    }

    /// The backend set alone, health-checked as in [`build`](Self::build); the balancer
    /// over it is [`proxy::balancer`](super::balancer)`(set, key)`. Its checks are attached
    /// to it: checks attached to it later replace them.
    pub fn build_backends(
        self,
        addresses: impl IntoIterator<Item = Authority>,
    ) -> Result<HttpBackends<P>, BuildError> {
        let backends = checked(self.policy, &self.client, self.health, addresses)?;
        backends.passive_health(self.passive);
        if !self.slow_start.is_zero() {
            backends.slow_start(self.slow_start);
        }
        Ok(backends)
    }
}

fn checked<P: Policy>(
    policy: P,
    client: &Client,
    health: Option<(String, health::Settings)>,
    addresses: impl IntoIterator<Item = Authority>,
) -> Result<HttpBackends<P>, BuildError> {
    let backends = Backends::new(policy);
    backends.label_metrics(Authority::to_string);
    if let Some((path, settings)) = health {
        let path: PathAndQuery = path
            .parse()
            .map_err(|_| BuildError::new(format!("invalid health-check path {path:?}")))?;
        if settings.timeout >= settings.interval {
            return Err(BuildError::new(format!(
                "the health-check timeout ({:?}) must be below the interval ({:?})",
                settings.timeout, settings.interval
            )));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            BuildError::new("the health checks need a tokio runtime: build within one")
        })?;
        let (checks, _settings) = HealthCheck::new(HttpProbe::new(path), settings);
        runtime.spawn(checks.attach(&backends).drive());
    }
    backends.update(|set| {
        for address in addresses {
            let backend = client.make_backend(&address);
            set.insert(address, backend);
        }
    });
    Ok(backends)
}

impl<P: fmt::Debug, E: fmt::Debug> fmt::Debug for Builder<P, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("policy", &self.policy)
            .field("key", &self.key)
            .field("client", &self.client)
            .field("health", &self.health)
            .field("retries", &self.retries)
            .field("passive_health", &self.passive)
            .field("slow_start", &self.slow_start)
            .finish()
    }
}

/// Why [`Builder::build`] failed.
#[derive(Debug)]
pub struct BuildError {
    message: String,
}

impl BuildError {
    fn new(message: impl Into<String>) -> Self {
        BuildError {
            message: message.into(),
        }
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BuildError {}
