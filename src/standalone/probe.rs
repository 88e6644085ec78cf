//! The standalone proxy's health probe: each backend probed in its own protocol.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::uri::Authority;

use super::Set;
use crate::balance::WeakBackends;
use crate::config::Config;
use crate::health::{Http2Probe, HttpProbe, Probe};
use crate::policy::Algorithm;
use crate::proxy::{AnyBackend, BackendProtocol};
use crate::BoxError;

/// `GET health_check_url` over HTTP/1.1 or, for an `http2` server, over HTTP/2; with
/// `health_check_grpc`, `grpc.health.v1.Health/Check` over HTTP/2 for every server.
///
/// The protocol of a backend is that of its service in the set, so resolved backends are
/// probed as their server says too.
#[derive(Clone)]
pub(crate) struct ServerProbe {
    http1: HttpProbe,
    http2: Http2Probe,
    grpc: Http2Probe,
    use_grpc: Arc<AtomicBool>,
    backends: Arc<WeakBackends<Authority, AnyBackend<crate::proxy::RequestBody>, Algorithm>>,
}

impl std::fmt::Debug for ServerProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerProbe")
            .field("http1", &self.http1)
            .field("http2", &self.http2)
            .field("grpc", &self.grpc)
            .field("use_grpc", &self.use_grpc)
            .finish_non_exhaustive()
    }
}

impl ServerProbe {
    pub(crate) fn new(config: &Config, backends: &Set) -> Self {
        let probe = ServerProbe {
            http1: HttpProbe::new(config.health_check_url.clone()),
            http2: Http2Probe::get(config.health_check_url.clone()),
            grpc: Http2Probe::grpc(""),
            use_grpc: Arc::new(AtomicBool::new(false)),
            backends: Arc::new(backends.downgrade()),
        };
        probe.configure(config);
        probe
    }

    /// Takes `health_check_url` and `health_check_grpc` from `config`, from the next probe on.
    pub(crate) fn configure(&self, config: &Config) {
        self.http1.set_path(config.health_check_url.clone());
        self.http2.set_get(config.health_check_url.clone());
        if let Some(service) = &config.health_check_grpc {
            self.grpc.set_grpc(service.clone());
        }
        self.use_grpc
            .store(config.health_check_grpc.is_some(), Ordering::Relaxed);
    }

    fn is_http2(&self, target: &Authority) -> bool {
        let Some(backends) = self.backends.upgrade() else {
            return false;
        };
        let snapshot = backends.snapshot();
        (0..snapshot.len())
            .filter_map(|i| snapshot.get(i))
            .any(|(key, service)| key == target && service.protocol() == "http2")
    }
}

impl Probe<Authority> for ServerProbe {
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn probe(&self, target: &Authority) -> Self::Future {
        if self.use_grpc.load(Ordering::Relaxed) {
            self.grpc.probe(target)
        } else if self.is_http2(target) {
            self.http2.probe(target)
        } else {
            self.http1.probe(target)
        }
    }
}
