//! The Host rules of RFC 9112 §3.2 and the contract, through the real proxy: two `Host`
//! fields or an invalid one are `400`, `CONNECT` is `405`, neither ever forwarded; an
//! absolute-form target reaches the backend in origin form with its authority as `Host`.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::*;
use tower_lb::stats;

/// The count of local answers with `status`.
fn local(status: u16) -> u64 {
    stats::global()
        .local_responses()
        .find(|&(s, _)| s == status)
        .expect("a counted status")
        .1
}

#[tokio::test]
async fn two_hosts_or_an_invalid_host_is_400_closed_and_never_forwarded() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let before = local(400);
    let cases: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example/x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: user@a.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example:0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example:65536\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example:x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
        // HTTP/1.0 is held to the same rules.
        b"GET / HTTP/1.0\r\nHost: a example\r\n\r\n",
        // The asterisk form is for OPTIONS only.
        b"GET * HTTP/1.1\r\nHost: a.example\r\n\r\n",
        // An absolute-form target whose authority is not a valid host, or has user info.
        b"GET http://user@a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n",
        b"GET http://a.example:99999/x HTTP/1.1\r\nHost: a.example\r\n\r\n",
    ];
    for case in cases {
        let shown = String::from_utf8_lossy(case);
        let ex = exchange(proxy.local_addr(), case, false, Duration::from_secs(5)).await;
        let answer = ex.text();
        assert!(
            answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.0 400"),
            "{shown:?}: {answer}"
        );
        assert!(ex.closed(), "the connection stayed open after {shown:?}");
    }
    assert_eq!(b.hits(), 0, "the backend saw a refused request");
    // Counted as local answers (other tests of this file may add theirs).
    assert!(local(400) >= before + cases.len() as u64);

    // A request the rules refuse, after one they accept on the same connection.
    let answer = raw(
        proxy.local_addr(),
        b"GET /first HTTP/1.1\r\nHost: a.example\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\nGET /third HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 400").count(), 1, "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 2, "{answer}");
    assert_eq!(b.paths(), ["/first"]);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn valid_hosts_pass() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    for host in [
        "a.example",
        "a.example:8080",
        "127.0.0.1:1",
        "[::1]:65535",
        "xn--e1a.example",
    ] {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = raw(proxy.local_addr(), request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
        assert_eq!(b.seen().last().unwrap()["host"], host);
    }
    // No Host: the backend's address is sent (HTTP/1.1 too: see the README).
    let answer = raw(proxy.local_addr(), b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert_eq!(b.seen().last().unwrap()["host"], b.addr.to_string());
    let answer = raw(
        proxy.local_addr(),
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(b.seen().last().unwrap()["host"], b.addr.to_string());
    // `OPTIONS *` goes on as it is.
    let answer = raw(
        proxy.local_addr(),
        b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(b.paths().last().unwrap(), "*");
    // `Connection` cannot take `Host` out: it names the target, not a hop.
    let answer = raw(
        proxy.local_addr(),
        b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close, Host\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(b.seen().last().unwrap()["host"], "a.example");
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn connect_is_405_closed_and_never_forwarded() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let before = local(405);
    // Tunnel bytes right behind the CONNECT must not be taken for a request.
    let ex = exchange(
        proxy.local_addr(),
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        false,
        Duration::from_secs(5),
    )
    .await;
    let answer = ex.text();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("\r\nallow:"),
        "{answer}"
    );
    assert!(ex.closed(), "the connection stayed open after a CONNECT");
    assert_eq!(b.hits(), 0, "the backend saw a CONNECT");
    assert!(local(405) > before);
    assert_eq!(get(proxy.local_addr(), "/").await.0, StatusCode::OK);
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_absolute_form_target_reaches_the_backend_in_origin_form_with_its_host() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let answer = raw(
        proxy.local_addr(),
        b"GET http://a.example/x?y=1 HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = raw(
        proxy.local_addr(),
        b"GET https://b.example:8443 HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(b.paths(), ["/x?y=1", "/"]);
    let seen = b.seen();
    let hosts: Vec<Vec<_>> = seen
        .iter()
        .map(|h| h.get_all("host").iter().cloned().collect())
        .collect();
    assert_eq!(hosts, [vec!["a.example"], vec!["b.example:8443"]]);
    proxy.shutdown().await.unwrap();
}
