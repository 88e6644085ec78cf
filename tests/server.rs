//! The proxy's own HTTP/1 server (`proxy::h1::serve`) on the wire: `Expect: 100-continue`,
//! HTTP/1.0 keep-alive, pipelined requests with bodies, and how a response of unknown
//! length is framed for each client version, and bodies in pieces larger than one write.

mod support;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads from `stream` until `pattern` has arrived (or fails the test after 10 s).
async fn read_until(stream: &mut TcpStream, out: &mut Vec<u8>, pattern: &[u8]) {
    within(async {
        let mut buf = [0u8; 4096];
        while !out.windows(pattern.len()).any(|w| w == pattern) {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before {:?}: {:?}",
                String::from_utf8_lossy(pattern),
                String::from_utf8_lossy(out)
            );
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await
}

/// Reads until the server closes the connection.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    within(stream.read_to_end(&mut out)).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // The client waits for the 100 before it sends a byte of the body.
    let mut out = Vec::new();
    read_until(&mut s, &mut out, b"\r\n\r\n").await;
    let interim = String::from_utf8_lossy(&out).into_owned();
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n\r\n"),
        "{interim}"
    );
    s.write_all(b"hello").await.unwrap();
    let answer = read_to_close(&mut s).await;
    let answer = format!(
        "{}{answer}",
        &interim["HTTP/1.1 100 Continue\r\n\r\n".len()..]
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nhello"), "{answer}");
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn http10_keeps_the_connection_only_when_asked() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        read_until(&mut s, &mut out, b"\r\n\r\n").await;
        let head = String::from_utf8_lossy(&out).to_ascii_lowercase();
        assert!(head.starts_with("http/1.0 200"), "{head}");
        assert!(head.contains("connection: keep-alive\r\n"), "{head}");
        assert!(head.contains("content-length:"), "{head}");
        let length: usize = head
            .split("content-length: ")
            .nth(1)
            .and_then(|v| v.split("\r\n").next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        let body_start = head.find("\r\n\r\n").unwrap() + 4;
        let mut have = out.len() - body_start;
        while have < length {
            let mut buf = [0u8; 256];
            have += within(s.read(&mut buf)).await.unwrap();
        }
    }
    // Without `keep-alive`, the connection closes after the response.
    let answer = raw(proxy.local_addr(), b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("connection: close\r\n"),
        "{answer}"
    );
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn pipelined_requests_with_bodies_are_answered_in_order() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let answer = raw(
        proxy.local_addr(),
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
          POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ndef\r\n0\r\n\r\n\
          GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let responses: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(responses.len(), 3, "{answer}");
    assert!(responses.iter().all(|r| r.starts_with("200")), "{answer}");
    assert!(responses[0].ends_with("\r\n\r\nabc"), "{answer}");
    // The second body's length was unknown to the backend: chunked to this HTTP/1.1 client.
    assert!(
        responses[1].contains("\r\n\r\n3\r\ndef\r\n0\r\n\r\n"),
        "{answer}"
    );
    assert!(responses[2].ends_with(&b.addr.to_string()), "{answer}");
    assert_eq!(b.paths(), ["/echo", "/echo", "/last"]);
    proxy.shutdown().await.unwrap();
}

/// Bytes from the client while its request waits for the backend are the next request,
/// not a sign that the client went away: both are answered, in order.
#[tokio::test]
async fn a_request_pipelined_while_one_waits_is_answered_after_it() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    client
        .write_all(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    within(b.started()).await;
    client
        .write_all(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // The proxy sees the bytes and keeps the connection (taking them as the client's
    // going away would close it): nothing comes back while the first request waits.
    let mut early = Vec::new();
    let end = read_until_end(
        &mut client,
        &mut early,
        std::time::Duration::from_millis(200),
    )
    .await;
    assert!(matches!(end, End::Open) && early.is_empty(), "{early:?}");
    b.release(1);
    let answer = read_to_close(&mut client).await;
    let responses: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(responses.len(), 2, "{answer}");
    assert!(responses.iter().all(|r| r.starts_with("200")), "{answer}");
    assert_eq!(b.paths(), ["/wait", "/last"]);
    proxy.shutdown().await.unwrap();
}

/// A client that sends two requests in one write and then shuts its sending side down:
/// the first is not cancelled while it waits, as the second already came after it, and
/// is answered; the second, waiting when the client's end is all that follows, is taken
/// to have lost its client (as nginx takes it) and the connection closes.
#[tokio::test]
async fn pipelined_requests_then_a_half_close_answer_all_but_the_last() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    client
        .write_all(
            b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /wait HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    within(b.started()).await;
    b.release(2);
    let answer = read_to_close(&mut client).await;
    let responses: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(responses.len(), 1, "{answer}");
    assert!(responses[0].starts_with("200"), "{answer}");
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_body_of_unknown_length_goes_chunked_to_http11_and_until_the_close_to_http10() {
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    // `/hold` streams "first;" and, once released, "last", without a length.
    b.release(2);
    let answer = raw(
        proxy.local_addr(),
        b"GET /hold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n0\r\n\r\n"), "{answer}");

    let answer = raw(
        proxy.local_addr(),
        b"GET /hold HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    )
    .await;
    let lower = answer.to_ascii_lowercase();
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(!lower.contains("transfer-encoding"), "{answer}");
    assert!(lower.contains("connection: close\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nfirst;last"), "{answer}");
    proxy.shutdown().await.unwrap();
}

/// A `proxy::Server` of its own: its address, a way to stop it, and its task.
type Served = (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
);

/// A listener on 127.0.0.1, port 0.
async fn listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// Serves `service` on `listener` with a `proxy::Server` of its own.
fn serve_on<S, B>(listener: tokio::net::TcpListener, service: S) -> Served
where
    S: tower::Service<
            Request<tower_lb::proxy::RequestBody>,
            Response = Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        tower_lb::proxy::Server::new()
            .serve(listener, service, async {
                let _ = stopped.await;
            })
            .await
    });
    (addr, stop, server)
}

/// Serves `pieces` as one response body, with its length or without.
async fn serve_pieces(pieces: Vec<Vec<u8>>, with_length: bool) -> Served {
    serve_pieces_on(listener().await, pieces, with_length)
}

fn serve_pieces_on(
    listener: tokio::net::TcpListener,
    pieces: Vec<Vec<u8>>,
    with_length: bool,
) -> Served {
    use futures::StreamExt;
    serve_on(
        listener,
        tower::service_fn(move |_req: Request<tower_lb::proxy::RequestBody>| {
            let pieces = pieces.clone();
            async move {
                let total: usize = pieces.iter().map(Vec::len).sum();
                let frames = futures::stream::iter(pieces)
                    .map(|p| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(p))));
                let mut response = Response::new(StreamBody::new(frames));
                if with_length {
                    response
                        .headers_mut()
                        .insert("content-length", total.to_string().parse().unwrap());
                }
                Ok::<_, std::convert::Infallible>(response)
            }
        }),
    )
}

/// Reads the body of `res` and compares it with `expected`.
async fn assert_body<B>(res: Response<B>, expected: &[u8])
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let body = within(res.into_body().collect()).await.unwrap().to_bytes();
    assert_eq!(body.len(), expected.len());
    assert!(body == expected, "the body differs");
}

/// Pieces of these sizes (`i`-th piece's bytes counting from `7 * i`, modulo 251).
fn pieces(sizes: &[usize]) -> Vec<Vec<u8>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| ((i * 7 + j) % 251) as u8).collect())
        .collect()
}

#[tokio::test]
async fn pieces_larger_than_a_gathered_write_arrive_whole_and_in_order() {
    // Small pieces are gathered into one write; one that does not fit goes out after
    // what is gathered, without a copy. Chunked and length-framed, twice on a connection.
    let pieces = pieces(&[10, 100_000, 5, 70_000, 65_536, 1]);
    let expected: Vec<u8> = pieces.concat();
    for with_length in [false, true] {
        let (addr, stop, server) = serve_pieces(pieces.clone(), with_length).await;
        let mut client = Client::connect(addr).await;
        for _ in 0..2 {
            let res = client.send(Request::get("/").body(empty()).unwrap()).await;
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(
                res.headers().contains_key("transfer-encoding"),
                !with_length,
                "{:?}",
                res.headers()
            );
            assert_body(res, &expected).await;
        }
        let _ = stop.send(());
        within(server).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_client_with_a_small_window_gets_large_pieces_whole() {
    // The client takes 4 KiB at a time: the server's writes of what it gathered (up to
    // 64 KiB of small pieces) and of a large piece stop part way, again and again, and go
    // on where they stopped.
    let pieces = pieces(&[3, 200_000, 7, 90_000, 16_000, 16_000, 16_000, 16_000, 5]);
    let expected = pieces.concat();
    // Small buffers on both sides (an accepted socket takes its listener's).
    let listening = tokio::net::TcpSocket::new_v4().unwrap();
    listening.set_send_buffer_size(4096).unwrap();
    listening.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let (addr, stop, server) = serve_pieces_on(listening.listen(16).unwrap(), pieces, false);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let res = within(
        sender.send_request(
            Request::get("/")
                .header("host", "x")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert!(res.headers().contains_key("transfer-encoding"));
    assert_body(res, &expected).await;
    let _ = stop.send(());
    within(server).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_body_that_fails_cuts_the_response_short_and_closes() {
    // What was gathered goes out, the terminating chunk does not, and the connection
    // closes: the client cannot take the response for a whole one.
    let (addr, stop, server) = serve_on(
        listener().await,
        tower::service_fn(|_req: Request<tower_lb::proxy::RequestBody>| async {
            let frames = futures::stream::iter([
                Ok(Frame::data(Bytes::from_static(b"0123456789"))),
                Err(std::io::Error::other("the body broke off")),
            ]);
            Ok::<_, std::convert::Infallible>(Response::new(StreamBody::new(frames)))
        }),
    );
    let answer = raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\na\r\n0123456789\r\n"),
        "{answer:?}"
    );
    let _ = stop.send(());
    within(server).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_closing_connection_says_close_whatever_the_service_set() {
    let (addr, stop, server) = serve_on(
        listener().await,
        tower::service_fn(|_req: Request<tower_lb::proxy::RequestBody>| async {
            let mut response = Response::new(http_body_util::Full::new(Bytes::from_static(b"ok")));
            response
                .headers_mut()
                .insert("connection", "keep-alive".parse().unwrap());
            Ok::<_, std::convert::Infallible>(response)
        }),
    );
    let answer = raw(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(!lower.contains("keep-alive"), "{answer}");
    let _ = stop.send(());
    within(server).await.unwrap().unwrap();
}
