//! Embedding the balancer in an existing axum app: its own routes stay, and everything
//! under `/api` is load-balanced (hashing by client IP, health-checked) over two backends.
//!
//! ```text
//! cargo run --example axum
//! curl http://127.0.0.1:3000/          # the app's own route
//! curl http://127.0.0.1:3000/api/      # proxied: the backend names itself
//! ```
//!
//! The client IP for hashing comes from axum's `ConnectInfo` (this crate's `axum` feature),
//! so serve with `into_make_service_with_connect_info::<SocketAddr>()`. The demo backends
//! are started here to keep the example self-contained.

use std::net::SocketAddr;

use axum::routing::get;
use axum::Router;
use tower_lb::health::{HealthCheck, HttpProbe, Settings};
use tower_lb::policy::Hashing;
use tower_lb::proxy::{self, Client, ClientIpKey};
use tower_lb::standalone::DemoBackend;

#[tokio::main]
async fn main() -> Result<(), tower_lb::BoxError> {
    let addresses: Vec<proxy::uri::Authority> =
        vec!["127.0.0.1:9201".parse()?, "127.0.0.1:9202".parse()?];
    let mut demos = Vec::new();
    for address in &addresses {
        demos.push(DemoBackend::spawn(address.clone(), "/health".parse()?).await?);
    }

    // The balancer: a tower Service, cheap to clone, shared by every connection.
    let backends =
        proxy::backends::<_, axum::body::Body>(Hashing::new(), &Client::new(), addresses.clone());
    let (checks, health) =
        HealthCheck::new(HttpProbe::new("/health".parse()?), Settings::default());
    addresses.into_iter().for_each(|a| health.insert(a));
    tokio::spawn(checks.drive(backends.clone()));
    let balancer = proxy::balancer(backends, ClientIpKey::new());

    let app = Router::new()
        .route("/", get(|| async { "the app's own route\n" }))
        .nest_service("/api", balancer);

    // The app now fronts the backends' clients: a listen backlog that takes a burst.
    let listener = proxy::bind("127.0.0.1:3000".parse()?)?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
