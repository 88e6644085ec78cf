//! `HttpProbe` against real sockets: what passes (any 2xx), what fails (3xx, 4xx, 5xx, a
//! refused connection), what it sends, and a stalled `/health` failing by the health
//! check's timeout.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use http::uri::Authority;
use support::*;
use tokio::io::AsyncWriteExt;
use tower_lb::health::{HealthCheck, HttpProbe, Probe, Settings};

/// A server that answers every request with `answer` and records the request heads.
async fn answering(answer: &'static [u8]) -> (RawServer, Arc<Mutex<Vec<String>>>) {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    let server = RawServer::start(move |mut stream| {
        let seen = seen.clone();
        async move {
            if let Some(head) = read_head(&mut stream).await {
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let _ = stream.write_all(answer).await;
            }
        }
    })
    .await;
    (server, heads)
}

fn authority(server: &RawServer) -> Authority {
    server.addr.to_string().parse().unwrap()
}

#[tokio::test]
async fn a_2xx_passes_and_anything_else_fails() {
    let probe = HttpProbe::new("/health".parse().unwrap());
    let cases: [(&'static [u8], bool); 7] = [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true),
        (b"HTTP/1.1 204 No Content\r\n\r\n", true),
        (b"HTTP/1.1 299 Fine\r\ncontent-length: 0\r\n\r\n", true),
        (
            b"HTTP/1.1 301 Moved Permanently\r\nlocation: /elsewhere\r\ncontent-length: 0\r\n\r\n",
            false,
        ),
        (b"HTTP/1.1 304 Not Modified\r\n\r\n", false),
        (
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            false,
        ),
        (
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
            false,
        ),
    ];
    for (answer, passes) in cases {
        let (server, heads) = answering(answer).await;
        let target = authority(&server);
        let result = within(probe.probe(&target)).await;
        let status = String::from_utf8_lossy(&answer[9..12]).into_owned();
        assert_eq!(result.is_ok(), passes, "{status}: {result:?}");
        if let Err(error) = result {
            assert!(error.to_string().contains(&status), "{error}");
        }
        // One GET of the configured path, naming the backend as the host.
        let heads = heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 1, "{heads:?}");
        assert!(
            heads[0].starts_with("GET /health HTTP/1.1\r\n"),
            "{heads:?}"
        );
        assert!(
            heads[0]
                .to_ascii_lowercase()
                .contains(&format!("\r\nhost: {target}\r\n")),
            "{heads:?}"
        );
    }
}

#[tokio::test]
async fn a_changed_path_is_probed_from_the_next_probe_on() {
    let probe = HttpProbe::new("/health".parse().unwrap());
    let (server, heads) = answering(b"HTTP/1.1 204 No Content\r\n\r\n").await;
    let target = authority(&server);
    within(probe.probe(&target)).await.unwrap();
    probe.clone().set_path("/ready?full=1".parse().unwrap());
    within(probe.probe(&target)).await.unwrap();
    let heads = heads.lock().unwrap().clone();
    assert!(heads[0].starts_with("GET /health "), "{heads:?}");
    assert!(heads[1].starts_with("GET /ready?full=1 "), "{heads:?}");
}

#[tokio::test]
async fn a_refused_connection_fails() {
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target: Authority = closed.local_addr().unwrap().to_string().parse().unwrap();
    drop(closed);
    let probe = HttpProbe::new("/health".parse().unwrap());
    let error = within(probe.probe(&target)).await.unwrap_err();
    assert!(
        error.to_string().to_lowercase().contains("refused"),
        "{error}"
    );
}

/// The next transition, within 3 s.
async fn next(
    checks: &mut HealthCheck<Authority, HttpProbe>,
) -> tower_lb::health::Transition<Authority> {
    tokio::time::timeout(Duration::from_secs(3), checks.next())
        .await
        .expect("no health transition within 3 s")
        .expect("the stream ended")
}

/// The first probe is answered, every later one is read and never answered: the health
/// check's timeout fails it, and the backend turns unhealthy about a timeout after that
/// probe arrived.
#[tokio::test]
async fn a_stalled_health_check_fails_by_the_timeout() {
    let arrived = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let log = arrived.clone();
    let server = RawServer::start(move |mut stream| {
        let log = log.clone();
        async move {
            if read_head(&mut stream).await.is_none() {
                return;
            }
            let first = {
                let mut log = log.lock().unwrap();
                log.push(Instant::now());
                log.len() == 1
            };
            if first {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            } else {
                // Stalled: the connection stays open, no answer.
                std::future::pending::<()>().await;
            }
        }
    })
    .await;
    let timeout = Duration::from_millis(150);
    let settings = Settings {
        interval: Duration::from_millis(300),
        timeout,
        healthy_threshold: 1,
        unhealthy_threshold: 1,
    };
    let (mut checks, handle) =
        HealthCheck::new(HttpProbe::new("/health".parse().unwrap()), settings);
    handle.insert(authority(&server));
    assert!(next(&mut checks).await.healthy);
    let failed = next(&mut checks).await;
    let at = Instant::now();
    assert!(!failed.healthy);
    let stalled = arrived.lock().unwrap()[1];
    let took = at - stalled;
    assert!(
        took >= timeout - Duration::from_millis(20) && took < Duration::from_secs(1),
        "unhealthy {took:?} after the stalled probe arrived"
    );
    drop(handle);
}
