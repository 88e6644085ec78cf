use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use tokio::time::{Instant, Sleep};
use tower::discover::Change;

use crate::balance::MakeBackend;

/// Resolves a host name to its addresses. Closures
/// `Fn(&str) -> impl Future<Output = io::Result<Vec<IpAddr>>>` are resolvers.
pub trait Resolve {
    /// The resolution in progress.
    type Future: Future<Output = io::Result<Vec<IpAddr>>> + Send + 'static;

    /// Starts resolving `host` (A and AAAA).
    fn resolve(&self, host: &str) -> Self::Future;
}

impl<F, Fut> Resolve for F
where
    F: Fn(&str) -> Fut,
    Fut: Future<Output = io::Result<Vec<IpAddr>>> + Send + 'static,
{
    type Future = Fut;

    fn resolve(&self, host: &str) -> Fut {
        self(host)
    }
}

/// The system's resolver: `getaddrinfo` (tokio's [`lookup_host`](tokio::net::lookup_host),
/// on the blocking pool), so names resolve as for every other program on the host
/// (`/etc/hosts`, `nsswitch.conf`, the search domains of `resolv.conf`).
///
/// `localhost` and names under `.localhost` are the loopback addresses `127.0.0.1` and
/// `::1` without a lookup, as RFC 6761 (§6.3) asks of resolution APIs: a hosts file that
/// lists only one of them does not make a dual-stack local backend single-stack.
#[derive(Debug, Clone, Copy, Default)]
pub struct GaiResolver;

impl Resolve for GaiResolver {
    type Future = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>>;

    fn resolve(&self, host: &str) -> Self::Future {
        let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        if name == "localhost" || name.ends_with(".localhost") {
            let loopback = vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ];
            return Box::pin(std::future::ready(Ok(loopback)));
        }
        let host = host.to_owned();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// The key of the backend at a resolved address: the [`SocketAddr`] itself, or with the
/// `http` feature the [`Authority`](http::uri::Authority) `ip:port` (IPv6 in brackets) that
/// [`proxy`](crate::proxy) sets are keyed by.
pub trait FromSocketAddr: Sized {
    /// The key for `addr`, or `None` if it cannot name one (the address is then skipped).
    fn from_socket_addr(addr: SocketAddr) -> Option<Self>;
}

impl FromSocketAddr for SocketAddr {
    fn from_socket_addr(addr: SocketAddr) -> Option<Self> {
        Some(addr)
    }
}

#[cfg(feature = "http")]
impl FromSocketAddr for http::uri::Authority {
    fn from_socket_addr(addr: SocketAddr) -> Option<Self> {
        // An IPv6 address with a zone (`fe80::1%eth0`) is no authority.
        addr.to_string().parse().ok()
    }
}

/// A [`Discover`](tower::discover::Discover) of the addresses of a host name: see the
/// [module docs](super).
///
/// Backends are keyed by `K` ([`FromSocketAddr`]): `SocketAddr` by default, and for an
/// HTTP set `Authority`, which `Dns::new(host, port, resolver, proxy::Client::new())`
/// picks by itself since the client makes backends for authorities.
///
/// The first resolution starts on the first poll, the next ones every `refresh` (default
/// 30 s) after the previous one ended. Each address that appears is inserted as a backend
/// at `port`, its service made by `M`; each one that disappears is removed (it drains). A
/// failed resolution is logged and changes nothing: the last addresses stay until a later
/// answer says otherwise. A successful answer is the whole truth, even when empty.
///
/// Insertions come before removals, so that a set never empties in passing when every
/// address changes at once.
pub struct Dns<R: Resolve, M, K = SocketAddr> {
    host: Box<str>,
    port: u16,
    resolver: R,
    make: M,
    refresh: Duration,
    known: BTreeSet<SocketAddr>,
    changes: VecDeque<Change<SocketAddr, ()>>,
    resolving: Option<Pin<Box<R::Future>>>,
    next: Option<Pin<Box<Sleep>>>,
    /// When the last resolution ended.
    last: Option<Instant>,
    started: bool,
    _key: PhantomData<fn() -> K>,
}

// No field is ever pinned in place (the futures are boxed).
impl<R: Resolve, M, K> Unpin for Dns<R, M, K> {}

impl<R: Resolve, M, K> Dns<R, M, K> {
    /// The backends of `host`'s addresses at `port`, resolved with `resolver`, each served
    /// by `make`'s service for its address.
    pub fn new(host: impl Into<String>, port: u16, resolver: R, make: M) -> Self {
        Dns {
            host: host.into().into_boxed_str(),
            port,
            resolver,
            make,
            refresh: Duration::from_secs(30),
            known: BTreeSet::new(),
            changes: VecDeque::new(),
            resolving: None,
            next: None,
            last: None,
            started: false,
            _key: PhantomData,
        }
    }

    /// Sets the time between two resolutions (at least a millisecond).
    pub fn refresh(mut self, every: Duration) -> Self {
        self.set_refresh(every);
        self
    }

    /// Changes the time between two resolutions; the next one is due `every` after the
    /// last one ended.
    pub fn set_refresh(&mut self, every: Duration) {
        self.refresh = every.max(Duration::from_millis(1));
        if let (Some(next), Some(last)) = (&mut self.next, self.last) {
            next.as_mut().reset(last + self.refresh);
        }
    }

    /// The name resolved.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The addresses of the last successful answer, as yielded so far.
    pub fn addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.known.iter().copied()
    }

    /// Compares an answer with what is known and queues the differences.
    fn answer(&mut self, ips: Vec<IpAddr>) {
        let port = self.port;
        let now: BTreeSet<SocketAddr> = ips.into_iter().map(|ip| (ip, port).into()).collect();
        for added in now.difference(&self.known) {
            self.changes.push_back(Change::Insert(*added, ()));
        }
        for gone in self.known.difference(&now) {
            self.changes.push_back(Change::Remove(*gone));
        }
        if now != self.known {
            tracing::debug!(host = %self.host, addresses = ?now, "DNS answer changed");
        }
        self.known = now;
    }
}

impl<R, M, K> Stream for Dns<R, M, K>
where
    R: Resolve,
    M: MakeBackend<K>,
    K: FromSocketAddr,
{
    type Item = Result<Change<K, M::Service>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(change) = this.changes.pop_front() {
                let (Change::Insert(addr, ()) | Change::Remove(addr)) = change;
                let Some(key) = K::from_socket_addr(addr) else {
                    tracing::warn!(host = %this.host, %addr, "address skipped: it names no backend");
                    continue;
                };
                let change = match change {
                    Change::Insert(..) => {
                        let service = this.make.make_backend(&key);
                        Change::Insert(key, service)
                    }
                    Change::Remove(_) => Change::Remove(key),
                };
                return Poll::Ready(Some(Ok(change)));
            }
            if let Some(resolving) = &mut this.resolving {
                let answer = ready!(resolving.as_mut().poll(cx));
                this.resolving = None;
                match answer {
                    Ok(ips) => this.answer(ips),
                    Err(error) => tracing::warn!(
                        host = %this.host,
                        %error,
                        "DNS resolution failed; keeping the last addresses"
                    ),
                }
                let now = Instant::now();
                this.last = Some(now);
                let due = now + this.refresh;
                match &mut this.next {
                    Some(next) => next.as_mut().reset(due),
                    None => this.next = Some(Box::pin(tokio::time::sleep_until(due))),
                }
                continue;
            }
            if this.started {
                if let Some(next) = &mut this.next {
                    ready!(next.as_mut().poll(cx));
                }
            }
            this.started = true;
            this.resolving = Some(Box::pin(this.resolver.resolve(&this.host)));
        }
    }
}

impl<R: Resolve, M, K> fmt::Debug for Dns<R, M, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dns")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("refresh", &self.refresh)
            .field("addresses", &self.known)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn localhost_is_both_loopback_addresses() {
        for name in ["localhost", "LocalHost.", "app.localhost"] {
            let ips = GaiResolver.resolve(name).await.unwrap();
            assert_eq!(
                ips,
                [
                    IpAddr::from(Ipv4Addr::LOCALHOST),
                    IpAddr::from(Ipv6Addr::LOCALHOST)
                ],
                "{name}"
            );
        }
        // Other names go to the system: an IP address literal resolves to itself.
        let ips = GaiResolver.resolve("127.0.0.3").await.unwrap();
        assert_eq!(ips, [IpAddr::from([127, 0, 0, 3])]);
    }
}
