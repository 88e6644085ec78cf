use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::Probe;
use crate::balance::MakeBackend;
use crate::proxy::Http2Client;
use crate::BoxError;

/// Probes a gRPC server with `grpc.health.v1.Health/Check`; passes on `SERVING`.
///
/// The [standard gRPC health protocol], as tonic's `tonic-health`, grpc-go and grpc-java
/// servers answer it: the probe asks for the status of one service (`""` for the server as
/// a whole) over a new HTTP/2 (h2c) connection, and fails on any other status
/// (`NOT_SERVING`, `UNKNOWN`, `SERVICE_UNKNOWN`), on a gRPC error (a server without the
/// health service answers `UNIMPLEMENTED`) and when it cannot connect. A fresh connection
/// per probe checks what a new client connection would meet, independent of the
/// balancer's own connection to the server.
///
/// Clones share the service name, which [`set_service`](GrpcHealthProbe::set_service)
/// changes for all.
///
/// ```
/// use tower_lb::health::{GrpcHealthProbe, HealthCheck, Settings};
/// use tower_lb::proxy::uri::Authority;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (checks, handle) = HealthCheck::new(GrpcHealthProbe::new(""), Settings::default());
/// handle.insert("127.0.0.1:50051".parse::<Authority>().unwrap());
/// # drop(checks);
/// # }
/// ```
///
/// [standard gRPC health protocol]: https://github.com/grpc/grpc/blob/master/doc/health-checking.md
#[derive(Debug, Clone)]
pub struct GrpcHealthProbe {
    service: Arc<ArcSwap<String>>,
    client: Http2Client<tonic::body::Body>,
}

impl GrpcHealthProbe {
    /// Probes the status of `service` (a fully qualified name such as
    /// `helloworld.Greeter`, or `""` for the whole server).
    pub fn new(service: impl Into<String>) -> Self {
        GrpcHealthProbe {
            service: Arc::new(ArcSwap::from_pointee(service.into())),
            client: Http2Client::new(),
        }
    }

    /// Time allowed to open the probe's connection (default 2 s); the health check's
    /// timeout bounds the whole probe in any case.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.client = self.client.connect_timeout(timeout);
        self
    }

    /// Probes `service` from the next probe on.
    pub fn set_service(&self, service: impl Into<String>) {
        self.service.store(Arc::new(service.into()));
    }
}

impl Probe<Authority> for GrpcHealthProbe {
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn probe(&self, target: &Authority) -> Self::Future {
        // A backend of its own: its connection ends with the probe.
        let mut health = HealthClient::new(self.client.make_backend(target));
        let service = String::clone(&self.service.load());
        Box::pin(async move {
            let response = health.check(HealthCheckRequest { service }).await?;
            match response.into_inner().status() {
                ServingStatus::Serving => Ok(()),
                status => Err(format!("health check answered {}", status.as_str_name()).into()),
            }
        })
    }
}
