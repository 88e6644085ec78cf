//! Peak EWMA over real sockets: a backend that answers late loses its share of the traffic.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

/// A keep-alive backend that answers every request but its health checks after `delay`,
/// and counts them.
async fn delayed_backend(delay: Duration) -> (RawServer, Arc<AtomicUsize>) {
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    let server = RawServer::start(move |mut stream| {
        let count = count.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            while let Some(head) = read_head(&mut stream).await {
                if !head.starts_with(b"GET /health ") {
                    count.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (server, requests)
}

#[tokio::test]
async fn a_backend_answering_50_ms_late_gets_under_a_tenth_of_the_requests() {
    let (fast_a, a) = delayed_backend(Duration::ZERO).await;
    let (slow, late) = delayed_backend(Duration::from_millis(50)).await;
    let (fast_b, b) = delayed_backend(Duration::ZERO).await;
    let addrs = [fast_a.addr, slow.addr, fast_b.addr];
    let proxy = proxy(config(&addrs, r#""algorithm": "peak_ewma""#)).await;

    let mut client = Client::connect(proxy.local_addr()).await;
    for _ in 0..300 {
        assert_eq!(client.get("/").await.0, 200);
    }
    let counts = [
        a.load(Ordering::SeqCst),
        late.load(Ordering::SeqCst),
        b.load(Ordering::SeqCst),
    ];
    assert_eq!(counts.iter().sum::<usize>(), 300);
    assert!(counts[1] < 30, "the late backend got {counts:?}");
    // Both fast backends take part: the pick is not stuck on one.
    assert!(counts[0] > 50 && counts[2] > 50, "{counts:?}");
    proxy.shutdown().await.unwrap();
}
