//! `hash_key` through the standalone proxy over loopback: hashing by a header, a cookie or
//! the path, and the fallback to the client IP when the header or cookie is missing.
//! Clients bind 127.0.0.2, 127.0.0.3, … to act as distinct IPs.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use http::Request;
use http_body_util::BodyExt;
use support::*;
use tower_lb::standalone::Proxy;

fn ip(i: usize) -> IpAddr {
    format!("127.0.0.{i}").parse().unwrap()
}

/// The backend that answers `path` sent from `from` with `headers`, on a new connection.
async fn who(proxy: SocketAddr, from: IpAddr, path: &str, headers: &[(&str, &str)]) -> String {
    let mut request = Request::get(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let res = Client::connect_from(proxy, from)
        .await
        .send(request.body(empty()).unwrap())
        .await;
    assert!(res.status().is_success(), "{}", res.status());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

async fn three_backends(hash_key: &str) -> ([Backend; 3], Proxy) {
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let extra = format!(r#""algorithm": "hashing", "hash_key": "{hash_key}""#);
    let proxy = proxy(config(&addrs, &extra)).await;
    (backends, proxy)
}

/// Each client IP in 2..=13, asked three times without the header or cookie: its backend.
/// Fails if one IP is not sticky.
async fn by_ip(proxy: SocketAddr, headers: &[(&str, &str)]) -> HashMap<IpAddr, String> {
    let mut owner = HashMap::new();
    for i in 2..=13 {
        for _ in 0..3 {
            let got = who(proxy, ip(i), "/", headers).await;
            let first = owner.entry(ip(i)).or_insert_with(|| got.clone());
            assert_eq!(*first, got, "{} moved between requests", ip(i));
        }
    }
    owner
}

#[tokio::test]
async fn header_key_sticks_spreads_and_falls_back_to_the_client_ip() {
    let (_backends, mut proxy) = three_backends("header:x-user").await;
    let addr = proxy.local_addr();

    // One user, whatever IP it comes from, reaches one backend; users spread.
    let mut owner = HashMap::new();
    for user in 0..16 {
        let name = format!("user-{user}");
        for from in [2, 3, 4] {
            let got = who(addr, ip(from), "/", &[("x-user", &name)]).await;
            let first = owner.entry(name.clone()).or_insert_with(|| got.clone());
            assert_eq!(*first, got, "{name} moved when it came from {}", ip(from));
        }
    }
    let spread: HashSet<_> = owner.values().collect();
    assert!(spread.len() >= 2, "16 users all on {spread:?}");

    // Without the header: by client IP, the same mapping as hash_key client_ip.
    let fallback = by_ip(addr, &[("x-other", "1")]).await;
    assert!(
        fallback.values().collect::<HashSet<_>>().len() >= 2,
        "12 client IPs all on one backend"
    );
    let mut next = proxy.config().clone();
    next.hash_key = "client_ip".parse().unwrap();
    let diff = proxy.apply(next).await;
    assert_eq!(
        diff.hash_key.map(|k| k.to_string()).as_deref(),
        Some("client_ip")
    );
    // Applied live: the header no longer matters, the client IP does.
    let by_client_ip = by_ip(addr, &[("x-user", "user-0")]).await;
    assert_eq!(fallback, by_client_ip);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn cookie_key_sticks_spreads_and_falls_back_to_the_client_ip() {
    let (_backends, proxy) = three_backends("cookie:sid").await;
    let addr = proxy.local_addr();

    let mut owner = HashMap::new();
    for session in 0..16 {
        let sid = format!("s{session}");
        // The cookie among others, in any position, from any IP.
        let cookies = [
            format!("sid={sid}"),
            format!("theme=dark; sid={sid}; lang=en"),
            format!("lang=fr;sid={sid}"),
        ];
        for (from, cookie) in [2, 3, 4].into_iter().zip(&cookies) {
            let got = who(addr, ip(from), "/", &[("cookie", cookie)]).await;
            let first = owner.entry(sid.clone()).or_insert_with(|| got.clone());
            assert_eq!(
                *first,
                got,
                "session {sid} moved ({cookie:?} from {})",
                ip(from)
            );
        }
    }
    let spread: HashSet<_> = owner.values().collect();
    assert!(spread.len() >= 2, "16 sessions all on {spread:?}");

    // Other cookies only (one named like a prefix of it): by client IP.
    let fallback = by_ip(addr, &[("cookie", "sidx=1; theme=dark")]).await;
    assert!(
        fallback.values().collect::<HashSet<_>>().len() >= 2,
        "12 client IPs all on one backend"
    );
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn path_key_ignores_the_query_and_the_client() {
    let (backends, proxy) = three_backends("path").await;
    let addr = proxy.local_addr();

    let mut owner = HashMap::new();
    for item in 0..16 {
        let path = format!("/item/{item}");
        for (from, query) in [(2, ""), (3, "?a=1"), (4, "?b=2&c=3")] {
            let got = who(addr, ip(from), &format!("{path}{query}"), &[]).await;
            let first = owner.entry(path.clone()).or_insert_with(|| got.clone());
            assert_eq!(*first, got, "{path}{query} from {} moved", ip(from));
        }
    }
    let spread: HashSet<_> = owner.values().collect();
    assert!(spread.len() >= 2, "16 paths all on {spread:?}");
    // The backends saw the query: only the key ignores it.
    let seen: Vec<String> = backends.iter().flat_map(|b| b.paths()).collect();
    assert!(seen.iter().any(|p| p.ends_with("?b=2&c=3")), "{seen:?}");
    proxy.shutdown().await.unwrap();
}
