//! The balancer embedded in an axum app under a path prefix, with `ConnectInfo` for hashing.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use axum::routing::get as route_get;
use axum::Router;
use http::StatusCode;
use support::*;
use tower_lb::policy::Hashing;
use tower_lb::proxy::{self, uri::Authority, Client as LbClient, ClientIpKey};

#[tokio::test]
async fn mounted_under_a_prefix_with_client_ip_hashing() {
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let addresses: Vec<Authority> = backends
        .iter()
        .map(|b| b.authority().parse().unwrap())
        .collect();
    let set = proxy::backends(Hashing::new(), &LbClient::new(), addresses);
    let app = Router::new()
        .route("/", route_get(|| async { "app" }))
        .nest_service("/api", proxy::balancer(set, ClientIpKey::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });

    // The app's own route still answers.
    assert_eq!(get(addr, "/").await, (StatusCode::OK, "app".to_owned()));

    // Under the prefix: proxied, with the prefix stripped and the query kept.
    let (status, _) = get(addr, "/api/missing?x=1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let paths: Vec<String> = backends.iter().flat_map(|b| b.paths()).collect();
    assert_eq!(paths, ["/missing?x=1"]);

    // Hashing by the client IP that axum's ConnectInfo reports.
    let mut owner: HashMap<IpAddr, String> = HashMap::new();
    for i in 2..=11 {
        let ip: IpAddr = format!("127.0.0.{i}").parse().unwrap();
        for _ in 0..3 {
            let (status, who) = Client::connect_from(addr, ip).await.get("/api/").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(owner.entry(ip).or_insert(who.clone()), &who);
        }
    }
    let distinct: std::collections::HashSet<_> = owner.values().collect();
    assert!(distinct.len() >= 2, "{owner:?}");
    // X-Forwarded-For carries the client.
    let seen = backends.iter().flat_map(|b| b.seen()).last().unwrap();
    assert!(seen["x-forwarded-for"]
        .to_str()
        .unwrap()
        .starts_with("127.0.0."));
    server.abort();
}
