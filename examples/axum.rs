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
use tower_lb::policy::Hashing;
use tower_lb::proxy;
use tower_lb::standalone::DemoBackend;

#[tokio::main]
async fn main() -> Result<(), tower_lb::BoxError> {
    let addrs: [proxy::uri::Authority; 2] = ["127.0.0.1:9201".parse()?, "127.0.0.1:9202".parse()?];
    let mut demos = Vec::new();
    for address in &addrs {
        demos.push(DemoBackend::spawn(address.clone(), "/health".parse()?).await?);
    }
    // The app now fronts the backends' clients: a listen backlog that takes a burst.
    let listener = proxy::bind("127.0.0.1:3000".parse()?)?;
    println!("listening on http://{}", listener.local_addr()?);

    // The balancer: a tower Service, cheap to clone, shared by every connection. Its
    // health checks (GET /health every 10 s) run on this runtime; a backend takes requests
    // once its first probe has passed.
    let api = proxy::Builder::new().policy(Hashing::new()).build(addrs)?;
    let app = Router::new()
        .route("/", get(|| async { "the app's own route\n" }))
        .nest_service("/api", api);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
