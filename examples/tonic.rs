//! A tonic gRPC client balanced over three servers, with gRPC health checks.
//!
//! ```text
//! cargo run --example tonic
//! ```
//!
//! Starts three tonic servers on loopback, each with a `Greeter` service and tonic-health's
//! `grpc.health.v1.Health` service; the third reports `NOT_SERVING`. The client's transport
//! is a tower-lb [`Balance`] over one HTTP/2 connection per server ([`Http2Client`]), fed by
//! a [`HealthCheck`] that probes every server with `grpc.health.v1.Health/Check`
//! ([`GrpcHealthProbe`]): the calls take turns over the two serving servers and never reach
//! the third. Then the example stops the servers and ends.
//!
//! tonic's own balanced channel (`Channel::balance_list`) has no health checks, and a tonic
//! `Channel` reports ready while it cannot connect, so it keeps picking servers that are
//! down or not serving. Here readiness is the connection, opened in `poll_ready`, so a
//! server that refuses it is skipped for another, and health decides which servers take
//! calls at all.
//!
//! The `Greeter` is written by hand with tonic's codec and `prost::Message` (what
//! `tonic-build` would generate from a `.proto` file), so that the crate needs no `build.rs`
//! and no `protoc`; a generated client is used the same way,
//! `GreeterClient::new(transport)`. Needs the `grpc` feature, which the examples enable.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus::{self, NotServing, Serving};
use tower::Service;
use tower_lb::balance::MakeBackend;
use tower_lb::health::{GrpcHealthProbe, HealthCheck, Settings};
use tower_lb::policy::RoundRobin;
use tower_lb::proxy::{grpc_status, uri::Authority, Http2Client};
use tower_lb::{Backends, Balance, BoxError};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Three servers; the third says it is not serving.
    let mut servers = Vec::new();
    for status in [Serving, Serving, NotServing] {
        servers.push(GrpcServer::start(status).await?);
    }

    // The balanced transport: a backend set whose members take calls only once their
    // health check has passed, one HTTP/2 connection per server.
    let client = Http2Client::new().connect_timeout(Duration::from_secs(1));
    let backends = Backends::new(RoundRobin::new());
    let settings = Settings {
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        ..Settings::default()
    };
    // The checks follow the set: every backend inserted is probed before it takes calls.
    let (checks, _) = HealthCheck::new(GrpcHealthProbe::new(""), settings);
    let checking = tokio::spawn(checks.attach(&backends).drive());
    for server in &servers {
        let address: Authority = server.addr.to_string().parse()?;
        backends.insert(address.clone(), client.make_backend(&address));
    }

    // Start calling once the first probes have answered (the two serving servers are in).
    backends
        .wait_until(|s| s.iter().filter(|(_, e)| e.is_healthy()).count() == 2)
        .await;
    for (address, endpoint) in backends.snapshot().iter() {
        let state = if endpoint.is_healthy() {
            "healthy: takes calls"
        } else {
            "unhealthy: skipped"
        };
        println!("{address}: {state}");
    }

    // The balancer's errors as gRPC codes: UNAVAILABLE when no server can take the call
    // (tonic alone reports these errors as UNKNOWN).
    let transport = tower::ServiceBuilder::new()
        .map_err(grpc_status)
        .service(Balance::new(backends));
    let mut greeter = greeter::GreeterClient::new(transport);
    let mut answers: HashMap<String, usize> = HashMap::new();
    for n in 1..=6 {
        let reply = greeter.say_hello(format!("call {n}")).await?;
        println!("call {n} answered by {}", reply.server);
        *answers.entry(reply.server).or_default() += 1;
    }
    for server in &servers {
        let calls = answers.get(&server.name).unwrap_or(&0);
        println!("{}: {calls} calls", server.name);
    }

    checking.abort();
    for server in servers {
        server.stop().await;
    }
    Ok(())
}

fn status_name(status: ServingStatus) -> &'static str {
    match status {
        Serving => "SERVING",
        NotServing => "NOT_SERVING",
        _ => "UNKNOWN",
    }
}

/// A tonic server on 127.0.0.1:0 with the Greeter and tonic-health's Health service.
struct GrpcServer {
    addr: SocketAddr,
    /// Its address, and what it tells health checks.
    name: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl GrpcServer {
    async fn start(status: ServingStatus) -> std::io::Result<GrpcServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_service_status("", status).await;
        let name = format!("{addr} ({})", status_name(status));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .add_service(greeter::GreeterServer::new(name.clone()))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    stopped.await.ok();
                }),
        );
        Ok(GrpcServer {
            addr,
            name,
            stop,
            task,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// `helloworld.Greeter`, as tonic-build would generate it from
///
/// ```proto
/// service Greeter { rpc SayHello (HelloRequest) returns (HelloReply); }
/// message HelloRequest { string name = 1; }
/// message HelloReply { string message = 1; string server = 2; }
/// ```
mod greeter {
    use super::*;

    use tonic::codegen::http;
    use tonic_prost::ProstCodec;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HelloRequest {
        #[prost(string, tag = "1")]
        pub name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HelloReply {
        #[prost(string, tag = "1")]
        pub message: String,
        /// Which server answered (a field this example adds to helloworld's reply).
        #[prost(string, tag = "2")]
        pub server: String,
    }

    const SAY_HELLO: &str = "/helloworld.Greeter/SayHello";

    /// The client, over any transport tonic accepts (here, the balancer).
    pub struct GreeterClient<T> {
        inner: tonic::client::Grpc<T>,
    }

    impl<T> GreeterClient<T>
    where
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::Error: Into<BoxError>,
        T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        <T::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
    {
        pub fn new(transport: T) -> Self {
            GreeterClient {
                inner: tonic::client::Grpc::new(transport),
            }
        }

        pub async fn say_hello(&mut self, name: String) -> Result<HelloReply, tonic::Status> {
            self.inner.ready().await.map_err(|e| {
                tonic::Status::unavailable(format!("transport not ready: {}", e.into()))
            })?;
            let path = http::uri::PathAndQuery::from_static(SAY_HELLO);
            let request = tonic::Request::new(HelloRequest { name });
            let response = self
                .inner
                .unary(request, path, ProstCodec::default())
                .await?;
            Ok(response.into_inner())
        }
    }

    /// The server: answers `SayHello` with its own name.
    #[derive(Clone)]
    pub struct GreeterServer {
        name: String,
    }

    impl GreeterServer {
        pub fn new(name: String) -> Self {
            GreeterServer { name }
        }
    }

    impl tonic::server::NamedService for GreeterServer {
        const NAME: &'static str = "helloworld.Greeter";
    }

    type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

    impl Service<http::Request<tonic::body::Body>> for GreeterServer {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
            if request.uri().path() != SAY_HELLO {
                return Box::pin(async { Ok(tonic::Status::unimplemented("").into_http()) });
            }
            let name = self.name.clone();
            let say_hello = tower::service_fn(move |request: tonic::Request<HelloRequest>| {
                let reply = HelloReply {
                    message: format!("hello, {}", request.into_inner().name),
                    server: name.clone(),
                };
                async move { Ok::<_, tonic::Status>(tonic::Response::new(reply)) }
            });
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.unary(say_hello, request).await)
            })
        }
    }
}
