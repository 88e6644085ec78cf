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

use crate::balance::{Drain, MakeBackend, Update};
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
    /// Demo backends of removed servers, stopping once their requests have drained.
    retiring: HashMap<Authority, Retiring>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<io::Result<()>>,
    checks: JoinHandle<()>,
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
        tracing::info!(listen = %local_addr, algorithm = %config.algorithm, backends = config.servers.len(), "proxy started");
        Ok(Proxy {
            config,
            local_addr,
            backends,
            client,
            probe,
            health,
            demos,
            retiring: HashMap::new(),
            stop: Some(stop),
            server,
            checks,
        })
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
        if diff.is_empty() {
            return diff;
        }

        // Demo backends first, so that new servers answer their first probe. A server back
        // before its old demo backend stopped gets that one back.
        if next.spawn_backends {
            for server in &next.servers {
                let key = server.authority();
                if self.demos.contains_key(&key) {
                    continue;
                }
                if let Some(retiring) = self.retiring.remove(&key) {
                    if let Some(demo) = retiring.cancel().await {
                        self.demos.insert(key, demo);
                        continue;
                    }
                }
                start_demo(&mut self.demos, key, &next).await;
            }
        }

        if diff.timeouts {
            self.client = client(&next);
        }
        let client = &self.client;
        let mut drains: HashMap<Authority, Drain> = self.backends.update(|set| {
            let drains = diff
                .removed
                .iter()
                .filter_map(|s| Some((s.authority(), set.remove_draining(&s.authority())?)))
                .collect();
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
            drains
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

        // Demo backends of removed servers (or all, with spawn_backends off) stop once the
        // requests that were sent to them have ended: stopped at once, a demo backend would
        // close pooled connections that requests picked before the removal are about to use.
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
                let drain = drains.remove(&key);
                self.retiring.insert(key, Retiring::start(demo, drain));
            }
        }
        self.retiring.retain(|_, r| !r.task.is_finished());

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

async fn start_demo(demos: &mut HashMap<Authority, DemoBackend>, key: Authority, config: &Config) {
    match DemoBackend::spawn(key.clone(), config.health_check_url.clone()).await {
        Ok(demo) => {
            demos.insert(key, demo);
        }
        // Something else may serve there already; the health checks will tell.
        Err(error) => tracing::warn!(backend = %key, %error, "cannot start demo backend"),
    }
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
