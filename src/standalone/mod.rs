//! The standalone proxy, assembled from the library's parts and driven by `config.json`:
//! what `examples/standalone.rs` runs.
//!
//! [`Proxy::start`] binds the listener, builds the backend set (each backend unhealthy until
//! its first probe passes), starts the health checks and serves. [`Proxy::apply`] moves a
//! running proxy to a new [`Config`] by applying only the [`Diff`]: backends that stay keep
//! their health, counters, pools and requests in flight; removed ones drain.
//!
//! A server with `resolve` is a name: a task follows its DNS answers ([`Dns`]) into the set,
//! one backend per address, each unhealthy until its first probe passes.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::proxy::RequestBody;
use arc_swap::ArcSwap;
use futures_util::StreamExt;
use http::uri::Authority;
use http::Request;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tower::discover::Change;

use crate::balance::{Drain, MakeBackend, RequestKey, Retries, Update};
use crate::config::{Config, Diff, Protocol, ServerConfig};
use crate::discover::{Dns, FromSocketAddr, GaiResolver, Resolve};
use crate::health::{self, HealthCheck};
use crate::policy::Algorithm;
use crate::proxy::{
    self, AnyBackend, BackendProtocol, Client, ErrorResponses, HashKey, Http2Client, TrackBody,
};
use crate::{Backends, Balance};

mod demo;
mod probe;
pub use self::demo::DemoBackend;
use self::probe::ServerProbe;

/// The standalone proxy's backend set: HTTP/1.1 and HTTP/2 backends (`servers[].protocol`).
pub type Set = Backends<Authority, AnyBackend<RequestBody>, Algorithm>;

/// A running proxy. See the [module docs](self).
#[derive(Debug)]
pub struct Proxy {
    config: Config,
    local_addr: SocketAddr,
    backends: Set,
    client: Clients,
    probe: ServerProbe,
    health: health::Handle<Authority>,
    key: Arc<ArcSwap<HashKey>>,
    /// `retries` and `retry_budget`, shared with the balancer: changed live.
    retries: Retries,
    resolved: HashMap<Authority, Resolved>,
    demos: HashMap<Authority, DemoBackend>,
    /// Demo backends of removed servers, stopping once their requests have drained.
    retiring: HashMap<Authority, Retiring>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<io::Result<()>>,
    checks: JoinHandle<()>,
    /// The admin listener (`admin_listen`): its address and task.
    admin: Option<(SocketAddr, JoinHandle<io::Result<()>>)>,
}

fn client(config: &Config) -> Clients {
    Clients {
        http1: Client::new()
            .connect_timeout(config.connect_timeout)
            .response_timeout(config.response_timeout)
            .tunnel_idle_timeout(config.tunnel_idle_timeout),
        http2: Http2Client::new()
            .connect_timeout(config.connect_timeout)
            .response_timeout(config.response_timeout),
    }
}

/// The transports to backends of either protocol, with the configured timeouts.
#[derive(Debug, Clone)]
struct Clients {
    http1: Client,
    http2: Http2Client<RequestBody>,
}

impl Clients {
    fn make_backend(&self, key: &Authority, protocol: Protocol) -> AnyBackend<RequestBody> {
        match protocol {
            Protocol::Http1 => AnyBackend::Http1(self.http1.make_backend(key)),
            Protocol::Http2 => AnyBackend::Http2(self.http2.make_backend(key)),
        }
    }
}

impl Proxy {
    /// Starts the proxy: demo backends (with `spawn_backends`), listener, health checks.
    pub async fn start(config: Config) -> io::Result<Proxy> {
        let mut demos = HashMap::new();
        if config.spawn_backends {
            for key in demo_addresses(&config).await {
                start_demo(&mut demos, key, &config).await;
            }
        }
        let listen = config.listen;
        let listener = proxy::bind(listen).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot listen on {listen} (listen): {e}"))
        })?;
        let local_addr = listener.local_addr()?;
        // Bound before anything is started, so that a port in use fails the start cleanly.
        let admin_listener = match config.admin_listen {
            Some(addr) => Some(proxy::bind(addr).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr} (admin_listen): {e}"),
                )
            })?),
            None => None,
        };

        let client = client(&config);
        let backends: Set = Backends::new(config.algorithm.clone());
        backends.label_metrics(Authority::to_string);
        backends.passive_health(config.passive_health.into());
        // The checks follow the set: every backend that joins it, configured or resolved, is
        // probed and takes traffic from its first pass; one that leaves is no longer probed.
        let probe = ServerProbe::new(&config, &backends);
        let (checks, health) = HealthCheck::new(probe.clone(), config.health);
        let checks = tokio::spawn(checks.attach(&backends).drive());
        let fixed = || config.servers.iter().filter(|s| !s.resolve());
        backends.update(|set| fixed().for_each(|server| add_server(set, &client, server)));
        // After the servers of the start: they take full weight at their first pass.
        backends.slow_start(config.slow_start);
        let resolved = config
            .servers
            .iter()
            .filter(|s| s.resolve())
            .map(|s| {
                (
                    s.authority(),
                    Resolved::start(s, &config, &client, &backends),
                )
            })
            .collect();

        let key = Arc::new(ArcSwap::from_pointee(config.request_key()));
        let retries = Retries::new(config.retries).budget(config.retry_budget);
        let service = ErrorResponses::new(
            Balance::new(backends.clone())
                .with_key(LiveKey(key.clone()))
                .with_completion(TrackBody)
                .with_retries(retries.clone()),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let server = proxy::Server::new()
            .max_connections(max_connections(&config))
            .client_idle_timeout(config.client_idle_timeout)
            .shutdown_timeout(config.shutdown_timeout);
        let server = tokio::spawn(async move {
            let stopped = async {
                let _ = stopped.await;
            };
            server.serve(listener, service, stopped).await
        });
        let admin = match admin_listener {
            Some(listener) => Some(start_admin(listener, &backends)?),
            None => None,
        };
        tracing::info!(listen = %local_addr, algorithm = %config.algorithm, backends = config.servers.len(), "proxy started");
        Ok(Proxy {
            config,
            local_addr,
            backends,
            client,
            probe,
            health,
            key,
            retries,
            resolved,
            demos,
            retiring: HashMap::new(),
            stop: Some(stop),
            server,
            checks,
            admin,
        })
    }

    /// The address of the admin listener, when `admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(addr, _)| *addr)
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The backend set, with its health states and in-flight counts.
    pub fn backends(&self) -> &Set {
        &self.backends
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Moves to `next`, applying only what changed, and returns what that was.
    /// Keys that need a restart (`listen`, `trusted_proxies`, `admin_listen`, the tunnel idle
    /// and shutdown timeouts) are logged and kept as running.
    pub async fn apply(&mut self, mut next: Config) -> Diff {
        let diff = self.config.diff(&next);
        for key in &diff.needs_restart {
            tracing::warn!(
                key,
                "changing {key} needs a restart; keeping the running value"
            );
        }
        next.listen = self.config.listen;
        next.trusted_proxies = self.config.trusted_proxies.clone();
        next.admin_listen = self.config.admin_listen;
        next.max_connections = self.config.max_connections;
        next.client_idle_timeout = self.config.client_idle_timeout;
        next.tunnel_idle_timeout = self.config.tunnel_idle_timeout;
        next.shutdown_timeout = self.config.shutdown_timeout;
        if diff.is_empty() {
            return diff;
        }

        // Demo backends first, so that new servers answer their first probe. A server back
        // before its old demo backend stopped gets that one back.
        let demo_keys = if next.spawn_backends {
            demo_addresses(&next).await
        } else {
            Vec::new()
        };
        for key in &demo_keys {
            if self.demos.contains_key(key) {
                continue;
            }
            if let Some(retiring) = self.retiring.remove(key) {
                if let Some(demo) = retiring.cancel().await {
                    self.demos.insert(key.clone(), demo);
                    continue;
                }
            }
            start_demo(&mut self.demos, key.clone(), &next).await;
        }

        if diff.timeouts {
            self.client = client(&next);
        }
        let client = &self.client;
        // Before the set changes, so that a resolved backend never joins with the old client.
        for server in next.servers.iter().filter(|s| s.resolve()) {
            if let Some(resolved) = self.resolved.get(&server.authority()) {
                resolved.settings.send_if_modified(|s| {
                    let changed = diff.timeouts
                        || (s.weight, s.refresh) != (server.weight(), next.dns_refresh);
                    s.client = client.clone();
                    (s.weight, s.refresh) = (server.weight(), next.dns_refresh);
                    changed
                });
            }
        }
        let fixed = |servers: &[ServerConfig]| -> Vec<ServerConfig> {
            servers.iter().filter(|s| !s.resolve()).cloned().collect()
        };
        let (removed, added) = (fixed(&diff.removed), fixed(&diff.added));
        // The protocol each backend speaks now, for new services with new timeouts.
        let protocols: HashMap<Authority, Protocol> = if diff.timeouts {
            let snapshot = self.backends.snapshot();
            (0..snapshot.len())
                .filter_map(|i| snapshot.get(i))
                .map(|(key, service)| (key.clone(), protocol_of(service)))
                .collect()
        } else {
            HashMap::new()
        };
        if diff.slow_start {
            self.backends.slow_start(next.slow_start);
        }
        let mut drains: HashMap<Authority, Drain> = self.backends.update(|set| {
            let drains = removed
                .iter()
                .filter_map(|s| Some((s.authority(), set.remove_draining(&s.authority())?)))
                .collect();
            for server in &added {
                add_server(set, client, server);
            }
            for server in fixed(&diff.reweighted) {
                set.set_weight(&server.authority(), server.weight());
            }
            if let Some(algorithm) = &diff.algorithm {
                set.set_policy(algorithm.clone());
            }
            if diff.timeouts {
                // New services with the new timeouts; state and requests in flight stay.
                // (Servers added just now have them already.)
                let staying: Vec<Authority> = set
                    .keys()
                    .filter(|key| !added.iter().any(|s| s.authority() == **key))
                    .cloned()
                    .collect();
                for key in staying {
                    if let Some(protocol) = protocols.get(&key) {
                        set.insert(key.clone(), client.make_backend(&key, *protocol));
                    }
                }
            }
            drains
        });
        // Resolve servers: a removed one's task takes its backends out as it ends.
        for server in diff.removed.iter().filter(|s| s.resolve()) {
            self.resolved.remove(&server.authority());
        }
        for server in diff.added.iter().filter(|s| s.resolve()) {
            let task = Resolved::start(server, &next, client, &self.backends);
            self.resolved.insert(server.authority(), task);
        }
        if diff.hash_key.is_some() {
            self.key.store(Arc::new(next.request_key()));
        }
        if diff.retries {
            self.retries.set_retries(next.retries);
            self.retries.set_budget(next.retry_budget);
        }
        if diff.health {
            self.probe.configure(&next);
            self.health.set_settings(next.health);
        }
        if diff.passive_health {
            self.backends.passive_health(next.passive_health.into());
        }

        // Demo backends of removed servers (or all, with spawn_backends off) stop once the
        // requests that were sent to them have ended: stopped at once, a demo backend would
        // close pooled connections that requests picked before the removal are about to use.
        let gone: Vec<Authority> = self
            .demos
            .keys()
            .filter(|k| !demo_keys.contains(k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(demo) = self.demos.remove(&key) {
                let drain = drains.remove(&key);
                self.retiring.insert(key, Retiring::start(demo, drain));
            }
        }
        self.retiring.retain(|_, r| !r.task.is_finished());

        crate::stats::config_reload(true);
        tracing::info!(
            added = diff.added.len(),
            removed = diff.removed.len(),
            reweighted = diff.reweighted.len(),
            algorithm = %next.algorithm,
            "configuration applied"
        );
        self.config = next;
        diff
    }

    /// Stops accepting (new connections are refused), lets requests and tunnels in flight
    /// finish within `shutdown_timeout` and closes those still open then, then stops health
    /// checks and demo backends.
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = (&mut self.server).await.map_err(io::Error::other)?;
        self.checks.abort();
        for (_, resolved) in self.resolved.drain() {
            resolved.task.abort();
        }
        if let Some((_, admin)) = self.admin.take() {
            admin.abort();
        }
        for (_, demo) in self.demos.drain() {
            demo.stop().await;
        }
        // Requests in flight have ended with the server: the retiring ones stop now.
        for (_, retiring) in self.retiring.drain() {
            if let Some(demo) = retiring.cancel().await {
                demo.stop().await;
            }
        }
        served
    }
}

/// `max_connections`, or by default half of what the open-files limit leaves after 64
/// descriptors for the process itself: every client connection may need a backend one.
fn max_connections(config: &Config) -> usize {
    config.max_connections.unwrap_or_else(|| {
        #[cfg(unix)]
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        #[cfg(not(unix))]
        let limit: Option<u64> = None;
        // No limit: none of our own either.
        let limit = limit.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
        (limit.saturating_sub(64) / 2).max(1)
    })
}

/// A configured server joins the set unhealthy: it takes traffic from its first passed probe.
fn add_server(
    set: &mut Update<'_, Authority, AnyBackend<RequestBody>, Algorithm>,
    client: &Clients,
    server: &ServerConfig,
) {
    let key = server.authority();
    set.insert_with(
        key.clone(),
        client.make_backend(&key, server.protocol()),
        server.weight(),
        false,
    );
}

fn protocol_of(service: &AnyBackend<RequestBody>) -> Protocol {
    match service.protocol() {
        "http2" => Protocol::Http2,
        _ => Protocol::Http1,
    }
}

/// Binds the admin listener and serves `/metrics`, `/status` and `/` on it.
fn start_admin(
    listener: tokio::net::TcpListener,
    backends: &Set,
) -> io::Result<(SocketAddr, JoinHandle<io::Result<()>>)> {
    let local = listener.local_addr()?;
    let task = tokio::spawn(crate::admin::serve(
        listener,
        backends.clone(),
        std::future::pending(),
    ));
    tracing::info!("admin listener on http://{local}");
    Ok((local, task))
}

async fn start_demo(demos: &mut HashMap<Authority, DemoBackend>, key: Authority, config: &Config) {
    match DemoBackend::spawn(key.clone(), config.health_check_url.clone()).await {
        Ok(demo) => {
            demos.insert(key, demo);
        }
        // Something else may serve there already; the health checks will tell.
        Err(error) => tracing::warn!(backend = %key, %error, "cannot start demo backend"),
    }
}

/// The addresses of the demo backends: each server's, and each address of a `resolve`
/// server's name as it resolves now.
async fn demo_addresses(config: &Config) -> Vec<Authority> {
    let mut keys = Vec::new();
    for server in &config.servers {
        if !server.resolve() {
            keys.push(server.authority());
            continue;
        }
        match GaiResolver.resolve(server.host()).await {
            Ok(ips) => keys.extend(
                ips.into_iter()
                    .filter_map(|ip| Authority::from_socket_addr((ip, server.port()).into())),
            ),
            Err(error) => tracing::warn!(server = %server.authority(), %error, "cannot resolve"),
        }
    }
    keys
}

/// The hashing key in force, replaced whole when `hash_key` changes.
#[derive(Debug, Clone)]
struct LiveKey(Arc<ArcSwap<HashKey>>);

impl<B> RequestKey<Request<B>> for LiveKey {
    #[inline]
    fn key(&self, request: &Request<B>) -> Option<u64> {
        self.0.load().key(request)
    }
}

/// A `resolve` server: a task that follows its name's addresses into the set.
#[derive(Debug)]
struct Resolved {
    /// Dropped when the server leaves the configuration: the task then removes its backends.
    settings: watch::Sender<ResolveSettings>,
    task: JoinHandle<()>,
}

#[derive(Debug, Clone)]
struct ResolveSettings {
    client: Clients,
    protocol: Protocol,
    weight: u32,
    refresh: Duration,
}

impl Resolved {
    fn start(server: &ServerConfig, config: &Config, client: &Clients, backends: &Set) -> Resolved {
        let settings = ResolveSettings {
            client: client.clone(),
            protocol: server.protocol(),
            weight: server.weight(),
            refresh: config.dns_refresh,
        };
        let (tx, rx) = watch::channel(settings);
        let dns = Dns::new(
            server.host(),
            server.port(),
            GaiResolver,
            |_: &Authority| (),
        )
        .refresh(config.dns_refresh);
        let task = tokio::spawn(follow(dns, backends.clone(), rx));
        Resolved { settings: tx, task }
    }
}

/// Each new address joins the set unhealthy (the attached checks probe it); each vanished
/// one leaves (and drains). An address already in the set (listed by another server) is left to it.
async fn follow<M: MakeBackend<Authority, Service = ()>>(
    mut dns: Dns<GaiResolver, M, Authority>,
    backends: Set,
    mut settings: watch::Receiver<ResolveSettings>,
) {
    let mut mine: HashSet<Authority> = HashSet::new();
    loop {
        tokio::select! {
            change = dns.next() => match change {
                Some(Ok(Change::Insert(key, ()))) => {
                    let inserted = backends.update(|set| {
                        if set.contains(&key) {
                            return false;
                        }
                        let s = settings.borrow();
                        set.insert_with(key.clone(), s.client.make_backend(&key, s.protocol), s.weight, false);
                        true
                    });
                    if inserted {
                        tracing::info!(backend = %key, host = dns.host(), "resolved backend added");
                        mine.insert(key);
                    } else {
                        tracing::warn!(backend = %key, host = dns.host(), "already a backend");
                    }
                }
                Some(Ok(Change::Remove(key))) => {
                    if !mine.remove(&key) {
                        continue;
                    }
                    tracing::info!(backend = %key, host = dns.host(), "resolved backend removed");
                    backends.remove(&key);
                }
                None => break,
            },
            changed = settings.changed() => {
                if changed.is_err() {
                    break;
                }
                // A new client reaches these backends through `apply`'s re-insert of every key.
                let s = settings.borrow_and_update().clone();
                dns.set_refresh(s.refresh);
                backends.update(|set| mine.iter().for_each(|key| { set.set_weight(key, s.weight); }));
            }
        }
    }
    backends.update(|set| {
        mine.iter().for_each(|key| {
            set.remove(key);
        })
    });
}

/// The demo backend of a removed server: it stops once the requests sent to it before the
/// removal have ended, unless the server comes back first.
#[derive(Debug)]
struct Retiring {
    cancel: oneshot::Sender<()>,
    task: JoinHandle<Option<DemoBackend>>,
}

impl Retiring {
    fn start(demo: DemoBackend, drain: Option<Drain>) -> Retiring {
        let (cancel, cancelled) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let drained = async {
                if let Some(drain) = drain {
                    drain.drained().await;
                }
            };
            tokio::select! {
                _ = cancelled => return Some(demo),
                () = drained => {}
            }
            demo.stop().await;
            None
        });
        Retiring { cancel, task }
    }

    /// The demo backend back, still serving; `None` if it had drained and has stopped (its
    /// address is free again once this returns).
    async fn cancel(self) -> Option<DemoBackend> {
        let _ = self.cancel.send(());
        self.task.await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    fn demo_config(ports: &[u16]) -> Config {
        let servers: Vec<String> = ports
            .iter()
            .map(|p| format!(r#"{{"host": "127.0.0.1", "port": {p}}}"#))
            .collect();
        Config::from_json(&format!(
            r#"{{"listen": "127.0.0.1:0", "servers": [{}], "spawn_backends": true,
                "health_check_interval": 0.2, "health_check_timeout": 0.1}}"#,
            servers.join(", ")
        ))
        .unwrap()
    }

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("within 10 s")
    }

    /// `GET /` straight to a demo backend: the body, or why there is none.
    async fn get(port: u16) -> io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n")
            .await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        match answer.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
            _ => Err(io::Error::other(format!("not a 200: {answer:?}"))),
        }
    }

    #[tokio::test]
    async fn a_removed_demo_backend_serves_until_its_requests_end_then_stops() {
        let ports = [free_port(), free_port()];
        let mut proxy = Proxy::start(demo_config(&ports)).await.unwrap();
        let key: Authority = format!("127.0.0.1:{}", ports[0]).parse().unwrap();
        let config = |ports: &[u16]| {
            let mut c = demo_config(ports);
            c.listen = proxy.local_addr();
            c
        };
        let (only_second, both) = (config(&ports[1..]), config(&ports));

        // A request picked the first backend (it counts until its response body ends);
        // then the server is removed.
        let held = proxy.backends().with_snapshot(|s| {
            let index = s.iter().position(|(k, _)| *k == key).unwrap();
            s.start(index)
        });
        assert_eq!(proxy.apply(only_second.clone()).await.removed.len(), 1);
        // Its demo backend still serves: stopping now would close the connections that
        // request may be using.
        let own = key.to_string();
        assert_eq!(within(get(ports[0])).await.unwrap(), own);

        // The server comes back before the request ended: the same demo backend serves it.
        proxy.apply(both).await;
        drop(held);
        within(
            proxy
                .backends()
                .wait_until(|s| s.iter().any(|(k, e)| *k == key && e.is_healthy())),
        )
        .await;
        assert_eq!(within(get(ports[0])).await.unwrap(), own);

        // Removed with nothing in flight, it stops by itself.
        proxy.apply(only_second).await;
        let retiring = proxy.retiring.remove(&key).expect("stopping");
        assert!(within(retiring.task).await.unwrap().is_none(), "stopped");
        let refused = within(get(ports[0])).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        proxy.shutdown().await.unwrap();
    }
}
