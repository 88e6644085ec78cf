//! A tonic client balanced by tower-lb over real tonic servers with tonic-health: a
//! `NOT_SERVING` server gets no calls, a killed server costs no failed call, clones share
//! one HTTP/2 connection per server, and keep-alive pings end a connection to a silent one.
//!
//! Each server runs on a thread of its own with its own runtime, so that killing it (dropping
//! the runtime) closes its listener and every connection at once, as a process kill would.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::codegen::http;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tonic_prost::ProstCodec;
use tower::Service;
use tower_lb::balance::MakeBackend;
use tower_lb::health::{GrpcHealthProbe, Handle, HealthCheck, Settings};
use tower_lb::policy::RoundRobin;
use tower_lb::proxy::{uri::Authority, Http2Backend, Http2Client};
use tower_lb::{Backends, Balance, BoxError};

type Set = Backends<Authority, Http2Backend<tonic::body::Body>, RoundRobin>;

const CHECK: &str = "/grpc.health.v1.Health/Check";
const SAY_HELLO: &str = "/helloworld.Greeter/SayHello";

/// Every test finishes well within this, or fails.
async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("the test did not finish in 10 s")
}

fn settings(interval: Duration) -> Settings {
    Settings {
        interval,
        // Long: only a server that is down should fail a probe, even on a loaded machine.
        timeout: Duration::from_secs(2),
        ..Settings::default()
    }
}

/// The balanced set over `servers`, health-checked with `grpc.health.v1.Health/Check`;
/// backends take calls from their first passing probe on.
fn balanced(servers: &[&GrpcServer], settings: Settings) -> (Set, Handle<Authority>) {
    let client = Http2Client::new().connect_timeout(Duration::from_secs(1));
    let backends = Backends::new(RoundRobin::new());
    let (checks, health) = HealthCheck::new(GrpcHealthProbe::new(""), settings);
    tokio::spawn(checks.attach(&backends).drive());
    for server in servers {
        backends.insert(
            server.authority.clone(),
            client.make_backend(&server.authority),
        );
    }
    (backends, health)
}

fn healthy(backends: &Set, servers: &[&GrpcServer]) -> bool {
    let snapshot = backends.snapshot();
    servers.iter().all(|s| {
        snapshot
            .iter()
            .any(|(k, e)| *k == s.authority && e.is_healthy())
    })
}

/// `n` calls one after the other; every one must succeed. Calls per answering server.
async fn calls(greeter: &mut GreeterClient, n: usize) -> HashMap<String, usize> {
    let mut answered = HashMap::new();
    for i in 0..n {
        let reply = greeter
            .say_hello(format!("call {i}"))
            .await
            .unwrap_or_else(|status| panic!("call {i} failed: {status:?}"));
        *answered.entry(reply.message).or_insert(0) += 1;
    }
    answered
}

#[tokio::test]
async fn not_serving_server_gets_no_calls() {
    within(async {
        let (a, b, c) = (
            GrpcServer::start(ServingStatus::Serving).await,
            GrpcServer::start(ServingStatus::Serving).await,
            GrpcServer::start(ServingStatus::NotServing).await,
        );
        let (backends, _health) = balanced(&[&a, &b, &c], settings(Duration::from_millis(100)));
        backends.wait_until(|_| healthy(&backends, &[&a, &b])).await;
        // c has answered a second probe, so the answer to its first has been applied.
        c.checks_answered(2).await;

        let mut greeter = GreeterClient::new(Balance::new(backends.clone()));
        let answered = calls(&mut greeter, 30).await;
        assert_eq!(
            answered.get(&c.name()),
            None,
            "NOT_SERVING got calls: {answered:?}"
        );
        assert_eq!(answered.get(&a.name()), Some(&15), "{answered:?}");
        assert_eq!(answered.get(&b.name()), Some(&15), "{answered:?}");
        assert_eq!(backends.is_healthy(&c.authority), Some(false));

        // Once it reports SERVING, it takes its turn.
        c.set_status(ServingStatus::Serving).await;
        backends.wait_until(|_| healthy(&backends, &[&c])).await;
        let answered = calls(&mut greeter, 30).await;
        assert_eq!(answered.get(&c.name()), Some(&10), "{answered:?}");
    })
    .await
}

#[tokio::test]
async fn killed_server_costs_no_failed_call() {
    within(async {
        let (a, b, mut c) = (
            GrpcServer::start(ServingStatus::Serving).await,
            GrpcServer::start(ServingStatus::Serving).await,
            GrpcServer::start(ServingStatus::Serving).await,
        );
        // Probes far apart at first: c stays healthy while it is killed and called.
        let (backends, health) = balanced(&[&a, &b, &c], settings(Duration::from_secs(5)));
        backends
            .wait_until(|_| healthy(&backends, &[&a, &b, &c]))
            .await;
        let mut greeter = GreeterClient::new(Balance::new(backends.clone()));
        let answered = calls(&mut greeter, 30).await;
        assert_eq!(answered.get(&c.name()), Some(&10), "{answered:?}");

        let c_backend = backends
            .snapshot()
            .iter()
            .position(|(k, _)| *k == c.authority);
        let c_backend = backends
            .snapshot()
            .get(c_backend.unwrap())
            .unwrap()
            .1
            .clone();
        assert!(c_backend.is_connected());
        c.kill();
        // A call sent while the client has not yet read the connection's end is lost
        // like any call in flight; from the moment the client has, calls picked for c meet
        // a refused connection in poll_ready and are retried on a or b.
        while c_backend.is_connected() {
            tokio::task::yield_now().await;
        }
        let answered = calls(&mut greeter, 30).await;
        assert_eq!(answered.values().sum::<usize>(), 30);
        assert_eq!(
            backends.is_healthy(&c.authority),
            Some(true),
            "c was still picked for a third of these calls"
        );

        // Its probe fails: it leaves the rotation, and nothing fails either.
        health.set_settings(settings(Duration::from_millis(50)));
        backends
            .wait_until(|s| s.iter().any(|(k, e)| *k == c.authority && !e.is_healthy()))
            .await;
        let answered = calls(&mut greeter, 30).await;
        assert_eq!(answered.get(&a.name()), Some(&15), "{answered:?}");
        assert_eq!(answered.get(&b.name()), Some(&15), "{answered:?}");
    })
    .await
}

#[tokio::test]
async fn concurrent_calls_share_one_connection_per_server() {
    within(async {
        let (a, b) = (
            GrpcServer::start(ServingStatus::Serving).await,
            GrpcServer::start(ServingStatus::Serving).await,
        );
        let (backends, _health) = balanced(&[&a, &b], settings(Duration::from_secs(5)));
        backends.wait_until(|_| healthy(&backends, &[&a, &b])).await;
        let lb = Balance::new(backends.clone());
        // Twice: the first burst waits for the connections, the second finds them open.
        for _ in 0..2 {
            let replies = futures::future::join_all((0..20).map(|i| {
                let mut greeter = GreeterClient::new(lb.clone());
                async move { greeter.say_hello(format!("call {i}")).await }
            }))
            .await;
            assert!(replies.iter().all(Result::is_ok), "{replies:?}");
        }
        for server in [&a, &b] {
            // One connection per probe (one each so far), and one for all the calls.
            let probes = *server.checks.borrow();
            assert_eq!(probes, 1);
            assert_eq!(*server.connections.borrow(), probes + 1);
        }
    })
    .await
}

#[tokio::test]
async fn keep_alive_ends_the_connection_to_a_silent_server() {
    // A server that accepts and then says nothing, as a host that vanished would.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
    let silent = tokio::spawn(async move {
        let (_socket, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
    });
    let ping = Duration::from_millis(100);
    let client = Http2Client::new().keep_alive(ping, ping);
    let mut backend = client.make_backend(&authority);
    let request = http::Request::new(tonic::body::Body::empty());
    let call = tower::ServiceExt::ready(&mut backend)
        .await
        .unwrap()
        .call(request);
    // Without pings the call would wait forever; with them it fails once a ping goes
    // unanswered, and the connection is dropped for the next call.
    let result = tokio::time::timeout(Duration::from_secs(3), call).await;
    assert!(matches!(result, Ok(Err(_))), "{result:?}");
    assert!(!backend.is_connected());
    silent.abort();
}

/// A tonic server with the Greeter and tonic-health's Health service, on a thread and
/// runtime of its own.
struct GrpcServer {
    addr: SocketAddr,
    authority: Authority,
    reporter: HealthReporter,
    checks: watch::Receiver<usize>,
    connections: watch::Receiver<usize>,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GrpcServer {
    async fn start(status: ServingStatus) -> GrpcServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_service_status("", status).await;
        let (checks_tx, checks) = watch::channel(0);
        let (connections_tx, connections) = watch::channel(0);
        let (kill, killed) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let incoming = futures::stream::unfold(listener, move |listener| {
                    let connections = connections_tx.clone();
                    async move {
                        let accepted = listener.accept().await.map(|(stream, _)| stream);
                        connections.send_modify(|n| *n += 1);
                        Some((accepted, listener))
                    }
                });
                let checks_tx = Arc::new(checks_tx);
                let count_checks =
                    tower::util::MapRequestLayer::new(move |req: http::Request<_>| {
                        if req.uri().path() == CHECK {
                            checks_tx.send_modify(|n| *n += 1);
                        }
                        req
                    });
                let server = tonic::transport::Server::builder()
                    .layer(count_checks)
                    .add_service(health)
                    .add_service(GreeterServer {
                        name: addr.to_string(),
                    })
                    .serve_with_incoming(incoming);
                tokio::select! {
                    _ = server => {}
                    _ = killed => {}
                }
            });
            // Dropping the runtime drops every connection task: all sockets close.
            drop(runtime);
        });
        GrpcServer {
            addr,
            authority: addr.to_string().parse().unwrap(),
            reporter,
            checks,
            connections,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn name(&self) -> String {
        self.addr.to_string()
    }

    async fn set_status(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
    }

    async fn checks_answered(&self, n: usize) {
        let mut checks = self.checks.clone();
        checks.wait_for(|c| *c >= n).await.unwrap();
    }

    /// Stops the server at once: listener and connections closed, as by a process kill.
    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// `helloworld.Greeter` by hand (see examples/tonic.rs): the reply names the server.

#[derive(Clone, PartialEq, prost::Message)]
struct HelloRequest {
    #[prost(string, tag = "1")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HelloReply {
    #[prost(string, tag = "1")]
    message: String,
}

struct GreeterClient {
    inner: tonic::client::Grpc<Balance<Authority, Http2Backend<tonic::body::Body>, RoundRobin>>,
}

impl GreeterClient {
    fn new(lb: Balance<Authority, Http2Backend<tonic::body::Body>, RoundRobin>) -> Self {
        GreeterClient {
            inner: tonic::client::Grpc::new(lb),
        }
    }

    async fn say_hello(&mut self, name: String) -> Result<HelloReply, tonic::Status> {
        self.inner
            .ready()
            .await
            .map_err(|e: BoxError| tonic::Status::unavailable(e.to_string()))?;
        let path = http::uri::PathAndQuery::from_static(SAY_HELLO);
        let response = self
            .inner
            .unary(
                tonic::Request::new(HelloRequest { name }),
                path,
                ProstCodec::default(),
            )
            .await?;
        Ok(response.into_inner())
    }
}

#[derive(Clone)]
struct GreeterServer {
    name: String,
}

impl tonic::server::NamedService for GreeterServer {
    const NAME: &'static str = "helloworld.Greeter";
}

impl Service<http::Request<tonic::body::Body>> for GreeterServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let name = self.name.clone();
        let say_hello = tower::service_fn(move |_: tonic::Request<HelloRequest>| {
            let message = name.clone();
            async move { Ok::<_, tonic::Status>(tonic::Response::new(HelloReply { message })) }
        });
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
            Ok(grpc.unary(say_hello, request).await)
        })
    }
}

/// A backend that refuses the connection: tonic alone sees the balancer's error as
/// `UNKNOWN`, which gRPC clients do not retry; mapped with `grpc_status` it is
/// `UNAVAILABLE`, as tonic's own channel reports a server that is not running.
#[tokio::test]
async fn a_refused_connection_is_unavailable_to_a_grpc_client() {
    use tower::{ServiceBuilder, ServiceExt};
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let authority: Authority = format!("127.0.0.1:{port}").parse().unwrap();
    let backends: Set = Backends::new(RoundRobin::new());
    backends.insert(
        authority.clone(),
        Http2Client::new().make_backend(&authority),
    );
    let request = || {
        http::Request::post(format!("http://{authority}{SAY_HELLO}"))
            .header("content-type", "application/grpc")
            .body(tonic::body::Body::empty())
            .unwrap()
    };
    let raw = within(Balance::new(backends.clone()).oneshot(request()))
        .await
        .unwrap_err();
    assert_eq!(tonic::Status::from_error(raw).code(), tonic::Code::Unknown);
    let mapped = ServiceBuilder::new()
        .map_err(tower_lb::proxy::grpc_status)
        .service(Balance::new(backends));
    let status = within(mapped.oneshot(request())).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}
