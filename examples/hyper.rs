//! The balancer in a plain hyper server: one health-checked balancer shared by every
//! connection, the client IP taken from the accepted socket.
//!
//! ```text
//! cargo run --example hyper
//! curl http://127.0.0.1:3001/          # proxied: the backend names itself
//! ```
//!
//! The demo backends are started here to keep the example self-contained.

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_lb::policy::RoundRobin;
use tower_lb::proxy::{self, ClientAddr, HttpBalance};

/// Serves `api` on `listener` with hyper, each connection's requests carrying its peer
/// address ([`ClientAddr`]) for `X-Forwarded-For` and client-IP hashing.
pub async fn serve(listener: TcpListener, api: HttpBalance<RoundRobin>) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let service = ServiceBuilder::new()
            .map_request(move |mut request: http::Request<Incoming>| {
                request.extensions_mut().insert(ClientAddr(peer));
                request
            })
            .service(api.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            if let Err(error) = connection.await {
                eprintln!("connection from {peer}: {error}");
            }
        });
    }
}

#[allow(dead_code)] // included by tests/embed.rs, which has its own main
#[tokio::main]
async fn main() -> Result<(), tower_lb::BoxError> {
    let addrs: [proxy::uri::Authority; 2] = ["127.0.0.1:9301".parse()?, "127.0.0.1:9302".parse()?];
    let mut demos = Vec::new();
    for address in &addrs {
        let demo = tower_lb::standalone::DemoBackend::spawn(address.clone(), "/health".parse()?);
        demos.push(demo.await?);
    }

    // Health-checked (GET /health every 10 s), on this runtime; no task to spawn by hand.
    let api = proxy::Builder::new().build(addrs)?;
    let listener = proxy::bind("127.0.0.1:3001".parse::<SocketAddr>()?)?;
    println!("listening on http://{}", listener.local_addr()?);
    serve(listener, api).await?;
    Ok(())
}
