//! The standalone proxy, assembled from the library's parts and driven by `config.json`:
//! what `examples/standalone.rs` runs.
//!
//! [`Proxy::start`] binds the listener, builds the backend set (each backend unhealthy until
//! its first probe passes), starts the health checks and serves. [`Proxy::apply`] moves a
//! running proxy to a new [`Config`] by applying only the [`Diff`]: backends that stay keep
//! their health, counters, pools and requests in flight; removed ones drain.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;

use http::uri::Authority;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::balance::MakeBackend;
use crate::balance::Update;
use crate::config::{Config, Diff, ServerConfig};
use crate::health::{self, HealthCheck, HttpProbe};
use crate::policy::Algorithm;
use crate::proxy::{self, Backend, Client, ClientIpKey, HttpBackends};
use crate::Backends;

mod demo;
pub use self::demo::DemoBackend;

/// A running proxy. See the [module docs](self).
#[derive(Debug)]
pub struct Proxy {
    config: Config,
    local_addr: SocketAddr,
    backends: HttpBackends<Algorithm>,
    client: Client,
    probe: HttpProbe,
    health: health::Handle<Authority>,
    demos: HashMap<Authority, DemoBackend>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<io::Result<()>>,
    checks: JoinHandle<()>,
    /// The admin listener (`admin_listen`): its address and task.
    admin: Option<(SocketAddr, JoinHandle<io::Result<()>>)>,
}

fn client(config: &Config) -> Client {
    Client::new()
        .connect_timeout(config.connect_timeout)
        .response_timeout(config.response_timeout)
}

fn algorithm(name: &str) -> Algorithm {
    // Validated by Config.
    Algorithm::from_str(name).unwrap_or_default()
}

impl Proxy {
    /// Starts the proxy: demo backends (with `spawn_backends`), listener, health checks.
    pub async fn start(config: Config) -> io::Result<Proxy> {
        let mut demos = HashMap::new();
        if config.spawn_backends {
            for server in &config.servers {
                start_demo(&mut demos, server.authority(), &config).await;
            }
        }
        let listener = proxy::bind(config.listen)?;
        let local_addr = listener.local_addr()?;

        let client = client(&config);
        let backends: HttpBackends<Algorithm> = Backends::new(algorithm(&config.algorithm));
        backends.healthy_on_insert(false);
        backends.label_metrics(Authority::to_string);
        backends.update(|set| {
            for server in &config.servers {
                add_server(set, &client, server);
            }
        });

        let probe = HttpProbe::new(config.health_check_url.clone());
        let (checks, health) = HealthCheck::new(probe.clone(), config.health);
        for server in &config.servers {
            health.insert(server.authority());
        }
        let checks = tokio::spawn(checks.drive(backends.clone()));

        let key = ClientIpKey::trusting(config.trusted_proxies.iter().copied());
        let service = proxy::balancer(backends.clone(), key);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            proxy::serve(listener, service, async {
                let _ = stopped.await;
            })
            .await
        });
        let admin = match config.admin_listen {
            Some(addr) => Some(start_admin(addr, &backends)?),
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
            demos,
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
    pub fn backends(&self) -> &HttpBackends<Algorithm> {
        &self.backends
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Moves to `next`, applying only what changed, and returns what that was.
    /// Keys that need a restart (`listen`, `trusted_proxies`) are logged and kept as running.
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
        if diff.is_empty() {
            return diff;
        }

        // Demo backends first, so that new servers answer their first probe.
        if next.spawn_backends {
            for server in &next.servers {
                let key = server.authority();
                if !self.demos.contains_key(&key) {
                    start_demo(&mut self.demos, key, &next).await;
                }
            }
        }

        if diff.timeouts {
            self.client = client(&next);
        }
        let client = &self.client;
        self.backends.update(|set| {
            for server in &diff.removed {
                set.remove(&server.authority());
            }
            for server in &diff.added {
                add_server(set, client, server);
            }
            for server in &diff.reweighted {
                set.set_weight(&server.authority(), server.weight());
            }
            if let Some(name) = &diff.algorithm {
                set.set_policy(algorithm(name));
            }
            if diff.timeouts {
                // New services with the new timeouts; state and requests in flight stay.
                let staying: Vec<Authority> = set.keys().cloned().collect();
                for key in staying {
                    set.insert(key.clone(), client.make_backend(&key));
                }
            }
        });
        for server in &diff.removed {
            self.health.remove(server.authority());
        }
        for server in &diff.added {
            self.health.insert(server.authority());
        }
        if diff.health {
            self.probe.set_path(next.health_check_url.clone());
            self.health.set_settings(next.health);
        }

        // Demo backends of removed servers (or all, with spawn_backends off) drain and stop.
        let keep: Vec<Authority> = if next.spawn_backends {
            next.servers.iter().map(|s| s.authority()).collect()
        } else {
            Vec::new()
        };
        let gone: Vec<Authority> = self
            .demos
            .keys()
            .filter(|k| !keep.contains(k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(demo) = self.demos.remove(&key) {
                tokio::spawn(demo.stop());
            }
        }

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

    /// Stops accepting (new connections are refused), lets requests in flight finish, then
    /// stops health checks and demo backends.
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = (&mut self.server).await.map_err(io::Error::other)?;
        self.checks.abort();
        if let Some((_, admin)) = self.admin.take() {
            admin.abort();
        }
        for (_, demo) in self.demos.drain() {
            demo.stop().await;
        }
        served
    }
}

/// A configured server joins the set unhealthy: it takes traffic from its first passed probe.
fn add_server(
    set: &mut Update<'_, Authority, Backend, Algorithm>,
    client: &Client,
    server: &ServerConfig,
) {
    let key = server.authority();
    set.insert_with(
        key.clone(),
        client.make_backend(&key),
        server.weight(),
        false,
    );
}

/// Binds the admin listener and serves `/metrics`, `/status` and `/` on it.
fn start_admin(
    addr: SocketAddr,
    backends: &HttpBackends<Algorithm>,
) -> io::Result<(SocketAddr, JoinHandle<io::Result<()>>)> {
    let listener = proxy::bind(addr)?;
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
