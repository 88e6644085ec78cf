//! gRPC end to end through the standalone proxy: a tonic client (over tower-lb's own
//! HTTP/2 client, aimed at the proxy) and tonic servers behind it as `http2` servers.
//! Unary and the three streaming kinds stream; statuses and trailers pass; the proxy's own
//! failures are gRPC statuses; `health_check_grpc` keeps `NOT_SERVING` servers out.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use support::{config_with_protocol, within};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tonic::codegen::http;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tonic_prost::ProstCodec;
use tower::Service;
use tower_lb::balance::MakeBackend;
use tower_lb::proxy::{uri::Authority, Http2Backend, Http2Client};
use tower_lb::standalone::Proxy;

#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
}

fn msg(text: &str) -> Msg {
    Msg { text: text.into() }
}

/// What the test and a server share.
struct Shared {
    /// Lets a server stream send its second message.
    gate: Semaphore,
    /// Client-stream messages received so far.
    received: watch::Sender<usize>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            gate: Semaphore::new(0),
            received: watch::Sender::new(0),
        }
    }
}

/// `test.Echo`, written by hand with tonic's server helpers (what tonic-build generates):
/// - `Unary`: answers `{server}:{text}`; `missing` → NOT_FOUND "no such thing"; `sleep` →
///   answers after 2 s;
/// - `ServerStream`: `one`, then (once the test opens the gate) `two`;
/// - `ClientStream`: the texts received, joined with `,`, counting each as it arrives;
/// - `Bidi`: echoes each message as it arrives.
#[derive(Clone)]
struct Echo {
    name: String,
    shared: Arc<Shared>,
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

type BoxStream = Pin<Box<dyn futures::Stream<Item = Result<Msg, Status>> + Send>>;

impl Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let (name, shared) = (self.name.clone(), self.shared.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<Msg, Msg>::default());
            let response = match request.uri().path() {
                "/test.Echo/Unary" => {
                    let unary = tower::service_fn(move |r: tonic::Request<Msg>| {
                        let name = name.clone();
                        async move {
                            match r.into_inner().text.as_str() {
                                "missing" => Err(Status::not_found("no such thing")),
                                "sleep" => {
                                    tokio::time::sleep(Duration::from_secs(2)).await;
                                    Ok(tonic::Response::new(msg("slept")))
                                }
                                text => Ok(tonic::Response::new(msg(&format!("{name}:{text}")))),
                            }
                        }
                    });
                    grpc.unary(unary, request).await
                }
                "/test.Echo/ServerStream" => {
                    let stream = tower::service_fn(move |_: tonic::Request<Msg>| {
                        let shared = shared.clone();
                        async move {
                            let messages = futures::stream::unfold(0, move |i| {
                                let shared = shared.clone();
                                async move {
                                    match i {
                                        0 => Some((Ok(msg("one")), 1)),
                                        1 => {
                                            shared.gate.acquire().await.ok()?.forget();
                                            Some((Ok(msg("two")), 2))
                                        }
                                        _ => None,
                                    }
                                }
                            });
                            let messages: BoxStream = Box::pin(messages);
                            Ok::<_, Status>(tonic::Response::new(messages))
                        }
                    });
                    grpc.server_streaming(stream, request).await
                }
                "/test.Echo/ClientStream" => {
                    let collect =
                        tower::service_fn(move |r: tonic::Request<tonic::Streaming<Msg>>| {
                            let shared = shared.clone();
                            async move {
                                let mut incoming = r.into_inner();
                                let mut texts = Vec::new();
                                while let Some(m) = incoming.message().await? {
                                    texts.push(m.text);
                                    shared.received.send_modify(|n| *n += 1);
                                }
                                Ok::<_, Status>(tonic::Response::new(msg(&texts.join(","))))
                            }
                        });
                    grpc.client_streaming(collect, request).await
                }
                "/test.Echo/Bidi" => {
                    let echo = tower::service_fn(
                        move |r: tonic::Request<tonic::Streaming<Msg>>| async move {
                            let incoming = r.into_inner();
                            let echoed: BoxStream = Box::pin(futures::stream::unfold(
                                incoming,
                                |mut incoming| async move {
                                    match incoming.message().await {
                                        Ok(Some(m)) => Some((Ok(m), incoming)),
                                        Ok(None) => None,
                                        Err(status) => Some((Err(status), incoming)),
                                    }
                                },
                            ));
                            Ok::<_, Status>(tonic::Response::new(echoed))
                        },
                    );
                    grpc.streaming(echo, request).await
                }
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(response)
        })
    }
}

/// A tonic server with `test.Echo` and tonic-health's `grpc.health.v1.Health`.
struct GrpcServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    reporter: HealthReporter,
    task: JoinHandle<()>,
}

impl GrpcServer {
    async fn start(status: ServingStatus) -> GrpcServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_service_status("", status).await;
        let shared = Arc::new(Shared::default());
        let echo = Echo {
            name: addr.to_string(),
            shared: shared.clone(),
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(health)
                .add_service(echo)
                .serve_with_incoming(TcpIncoming::from(listener))
                .await;
        });
        GrpcServer {
            addr,
            shared,
            reporter,
            task,
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A tonic client whose transport is one HTTP/2 connection to the proxy.
fn client(proxy: &Proxy) -> tonic::client::Grpc<Http2Backend<tonic::body::Body>> {
    let authority: Authority = proxy.local_addr().to_string().parse().unwrap();
    tonic::client::Grpc::new(Http2Client::new().make_backend(&authority))
}

type Client = tonic::client::Grpc<Http2Backend<tonic::body::Body>>;

fn path(method: &str) -> http::uri::PathAndQuery {
    format!("/test.Echo/{method}").parse().unwrap()
}

async fn unary(client: &mut Client, text: &str) -> Result<String, Status> {
    client
        .ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let reply = client
        .unary(
            tonic::Request::new(msg(text)),
            path("Unary"),
            ProstCodec::<Msg, Msg>::default(),
        )
        .await?;
    Ok(reply.into_inner().text)
}

async fn start_proxy(servers: &[&GrpcServer], extra: &str) -> Proxy {
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let config = config_with_protocol(&addrs, "http2", extra);
    Proxy::start(config).await.unwrap()
}

/// Waits until exactly the servers in `healthy` are healthy in the proxy's view.
async fn wait_healthy(proxy: &Proxy, servers: &[&GrpcServer], healthy: &[bool]) {
    let want: Vec<(Authority, bool)> = servers
        .iter()
        .zip(healthy)
        .map(|(s, h)| (s.addr.to_string().parse().unwrap(), *h))
        .collect();
    within(proxy.backends().wait_until(|snapshot| {
        want.iter().all(|(key, h)| {
            snapshot
                .iter()
                .any(|(k, e)| k == key && e.is_healthy() == *h)
        })
    }))
    .await;
}

#[tokio::test]
async fn unary_calls_spread_over_servers_and_statuses_pass_through() {
    let a = GrpcServer::start(ServingStatus::Serving).await;
    let b = GrpcServer::start(ServingStatus::Serving).await;
    let proxy = start_proxy(&[&a, &b], "").await;
    wait_healthy(&proxy, &[&a, &b], &[true, true]).await;
    let mut client = client(&proxy);

    let mut answers = Vec::new();
    for i in 0..4 {
        answers.push(within(unary(&mut client, &format!("hi{i}"))).await.unwrap());
    }
    // Round robin: each server answered two of them.
    let per_a = answers
        .iter()
        .filter(|t| t.starts_with(&format!("{}:", a.addr)))
        .count();
    assert_eq!(per_a, 2, "{answers:?}");
    assert!(answers
        .iter()
        .all(|t| t.ends_with(&format!(":hi{}", &t[t.len() - 1..]))));

    // The server's status and message come through intact (trailers).
    let status = within(unary(&mut client, "missing")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no such thing");
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn streaming_calls_stream_through_the_proxy() {
    let server = GrpcServer::start(ServingStatus::Serving).await;
    let proxy = start_proxy(&[&server], "").await;
    wait_healthy(&proxy, &[&server], &[true]).await;
    let mut client = client(&proxy);

    // Server streaming: the first message arrives while the server still holds the second.
    client.ready().await.unwrap();
    let response = within(client.server_streaming(
        tonic::Request::new(msg("go")),
        path("ServerStream"),
        ProstCodec::<Msg, Msg>::default(),
    ))
    .await
    .unwrap();
    let mut stream = response.into_inner();
    assert_eq!(within(stream.message()).await.unwrap().unwrap().text, "one");
    server.shared.gate.add_permits(1);
    assert_eq!(within(stream.message()).await.unwrap().unwrap().text, "two");
    assert!(within(stream.message()).await.unwrap().is_none());

    // Client streaming: the server has the first message before the client sends the next.
    let (tx, rx) = mpsc::channel::<Msg>(4);
    let outgoing =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let call = tokio::spawn({
        let mut client = client.clone();
        async move {
            client.ready().await.unwrap();
            client
                .client_streaming(
                    tonic::Request::new(outgoing),
                    path("ClientStream"),
                    ProstCodec::<Msg, Msg>::default(),
                )
                .await
        }
    });
    tx.send(msg("a")).await.unwrap();
    let mut received = server.shared.received.subscribe();
    within(received.wait_for(|&n| n == 1)).await.unwrap();
    tx.send(msg("b")).await.unwrap();
    drop(tx);
    let reply = within(call).await.unwrap().unwrap();
    assert_eq!(reply.into_inner().text, "a,b");

    // Bidirectional: each message is echoed before the next is sent.
    let (tx, rx) = mpsc::channel::<Msg>(4);
    let outgoing =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    tx.send(msg("x")).await.unwrap();
    client.ready().await.unwrap();
    let response = within(client.streaming(
        tonic::Request::new(outgoing),
        path("Bidi"),
        ProstCodec::<Msg, Msg>::default(),
    ))
    .await
    .unwrap();
    let mut echoed = response.into_inner();
    assert_eq!(within(echoed.message()).await.unwrap().unwrap().text, "x");
    tx.send(msg("y")).await.unwrap();
    assert_eq!(within(echoed.message()).await.unwrap().unwrap().text, "y");
    drop(tx);
    assert!(within(echoed.message()).await.unwrap().is_none());
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_proxys_own_failures_are_grpc_statuses() {
    let server = GrpcServer::start(ServingStatus::Serving).await;
    let proxy = start_proxy(&[&server], r#""response_timeout": 0.3"#).await;
    wait_healthy(&proxy, &[&server], &[true]).await;
    let mut client = client(&proxy);

    // The backend does not answer in time: DEADLINE_EXCEEDED (HTTP would get 504).
    let status = within(unary(&mut client, "sleep")).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // No healthy backend: UNAVAILABLE (HTTP would get 503), at once.
    server.task.abort();
    wait_healthy(&proxy, &[&server], &[false]).await;
    let status = within(unary(&mut client, "hi")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "no healthy backend");
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_check_grpc_keeps_not_serving_servers_out() {
    let serving = GrpcServer::start(ServingStatus::Serving).await;
    let not_serving = GrpcServer::start(ServingStatus::NotServing).await;
    let proxy = start_proxy(&[&serving, &not_serving], r#""health_check_grpc": """#).await;
    wait_healthy(&proxy, &[&serving, &not_serving], &[true, false]).await;
    let mut client = client(&proxy);
    for _ in 0..4 {
        let text = within(unary(&mut client, "hi")).await.unwrap();
        assert_eq!(text, format!("{}:hi", serving.addr));
    }

    // It turns serving: it takes calls; the other stops: it is taken out.
    not_serving
        .reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    serving
        .reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    wait_healthy(&proxy, &[&serving, &not_serving], &[false, true]).await;
    let text = within(unary(&mut client, "hi")).await.unwrap();
    assert_eq!(text, format!("{}:hi", not_serving.addr));
    proxy.shutdown().await.unwrap();
}
