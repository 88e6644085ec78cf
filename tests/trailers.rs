//! Trailers through the proxy's HTTP/1 codec: a chunked request's trailers reach an
//! HTTP/1 backend after its last chunk, and a chunked response's trailers reach a client
//! that accepts them (`TE: trailers`).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEALTH_OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Reads a request head and, for anything but a health check, its chunked body through
/// the end of its trailer section; returns the bytes after the head.
async fn read_chunked_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut read = [0u8; 4096];
    loop {
        let n = stream.read(&mut read).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&read[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        if buf.starts_with(b"GET /health ") {
            return Some(Vec::new());
        }
        let body = &buf[end + 4..];
        // The last chunk, then the trailer section's blank line.
        if let Some(last) = body.windows(5).position(|w| w == b"\r\n0\r\n") {
            let rest = &body[last + 5..];
            if rest.starts_with(b"\r\n") || rest.windows(4).any(|w| w == b"\r\n\r\n") {
                return Some(body.to_vec());
            }
        }
    }
}

#[tokio::test]
async fn request_trailers_reach_an_http1_backend() {
    let bodies = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let seen = bodies.clone();
    let backend = RawServer::start(move |mut stream| {
        let seen = seen.clone();
        async move {
            let Some(body) = read_chunked_request(&mut stream).await else {
                return;
            };
            if body.is_empty() {
                let _ = stream.write_all(HEALTH_OK).await;
                return;
            }
            seen.lock().unwrap().push(body);
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await;
        }
    })
    .await;
    let proxy = proxy(config(&[backend.addr], "")).await;
    let answer = raw(
        proxy.local_addr(),
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n0\r\nX-Checksum: abc\r\nContent-Length: 99\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1);
    let body = String::from_utf8_lossy(&bodies[0]).into_owned();
    // The data, then the last chunk with the trailer; a framing field is never taken
    // from trailers.
    assert!(body.starts_with("5\r\nhello\r\n"), "{body:?}");
    assert!(body.ends_with("0\r\nx-checksum: abc\r\n\r\n"), "{body:?}");
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn response_trailers_reach_the_client() {
    let backend = raw_backend(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n\
          2\r\nok\r\n3\r\n!!!\r\n0\r\nx-checksum: abc\r\nset-cookie: no\r\n\r\n",
    )
    .await;
    let proxy = proxy(config(&[backend.addr], "")).await;
    let ex = exchange(
        proxy.local_addr(),
        b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n",
        false,
        Duration::from_secs(5),
    )
    .await;
    let answer = ex.text();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("transfer-encoding: chunked\r\n"),
        "{answer}"
    );
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    assert!(body.ends_with("0\r\nx-checksum: abc\r\n\r\n"), "{body:?}");
    assert!(!body.contains("set-cookie"), "{body:?}");
    nothing_in_flight(&proxy).await;
    proxy.shutdown().await.unwrap();
}
