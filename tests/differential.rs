//! Differential tests of the HTTP/1 codec against hyper (which parses with httparse): on
//! seeded mutations of valid messages, the proxy's request checks accept and refuse what
//! hyper's server does, and its response parser and body decoders read what hyper's client
//! reads, except where the contract or RFC 9112 makes the proxy stricter. Those exceptions
//! are listed below, by the reason the codec gives; any other disagreement fails.
//!
//! Requests are followed by a canary request, so that a different reading of the first
//! body (the start of request smuggling) shows as a different count of requests. The
//! mutations are those of `tests/mutations.rs` (bytes changed, inserted, deleted,
//! repeated, the message cut short), with fixed seeds: a failure reproduces.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_lb::proxy::__fuzz;

/// Where the codec refuses a request that hyper's server takes: the contract's rules
/// (ambiguous framing, Host, CONNECT) and RFC 9112's (chunked at most once).
const REQUEST_EXCEPTIONS: &[&str] = &[
    "both Content-Length and Transfer-Encoding",
    "chunked applied twice",
    "two Host fields",
    "invalid Host",
    "invalid request target",
    "CONNECT is not served",
];

/// Where the codec refuses a response that hyper's client takes: a `Content-Length`
/// given as a list (`5, 5`, which hyper's client reads as 5 but its server refuses; the
/// codec has one rule for both directions), `chunked` twice, a `Transfer-Encoding` with a
/// byte outside visible ASCII (which hyper's client reads as not chunked, so until the
/// connection closes: a reading another recipient may not share), a trailer line ended by
/// a bare LF (hyper reads trailers on to the next CRLF CRLF), and the `101` that hyper's
/// client takes as an upgrade.
const RESPONSE_EXCEPTIONS: &[&str] = &[
    "invalid Content-Length",
    "chunked applied twice",
    "invalid Transfer-Encoding",
    "trailer line without CRLF",
];

const REQUESTS: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /a?b=c HTTP/1.1\r\nHost: x:80\r\nConnection: keep-alive, x-h\r\nX-H: 1\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"GET http://a.example/abs HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
];

const RESPONSES: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nTrailer: t\r\n\r\n2;x=y\r\nok\r\n1\r\n!\r\n0\r\nt: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close, x-h\r\nX-H: 1\r\n\r\nbody until close",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 500 Oops\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
];

/// Bytes that mean something to an HTTP/1.1 parser (with the signs a number parser may
/// take), and two that never should appear.
const INTERESTING: &[u8] = b"\r\n: \t,;0x9aZ+-\x00\x7f\xff";

/// Values of framing and routing fields that parsers are known to read differently.
const TRICKY_VALUES: &[&[u8]] = &[
    b"+5",
    b"-5",
    b"05",
    b"5, 5",
    b"5,",
    b" 5 ",
    b"0x5",
    b"5\t",
    b"",
    b"99999999999999999999",
    b"chunked, chunked",
    b"chunked,",
    b"chunked , gzip",
    b"CHUNKED",
    b"identity",
    b"a.example:0",
    b"[::1]",
    b"u@a",
    b"a b",
];

/// `message` with one to three seeded mutations (the generator of `tests/mutations.rs`),
/// and one time in five the value of a field replaced by a tricky one first.
fn mutate(rng: &mut SmallRng, message: &[u8]) -> Vec<u8> {
    let mut m = message.to_vec();
    if rng.gen_bool(0.2) {
        let colons: Vec<usize> = (0..m.len())
            .filter(|&i| m[i..].starts_with(b": "))
            .collect();
        if !colons.is_empty() {
            let start = colons[rng.gen_range(0..colons.len())] + 2;
            let end = start + m[start..].iter().position(|&b| b == b'\r').unwrap_or(0);
            let value = TRICKY_VALUES[rng.gen_range(0..TRICKY_VALUES.len())];
            m.splice(start..end, value.iter().copied());
        }
        if rng.gen_bool(0.5) {
            return m;
        }
    }
    support::mutate_bytes(rng, &m, INTERESTING)
}

const CANARY: &[u8] = b"GET /canary HTTP/1.1\r\nHost: c\r\n\r\n";

/// A request as hyper's server handed it over: the codec's verdict on its Host, target
/// and method, and whether its body arrived whole.
#[derive(Debug)]
struct Delivered {
    target: String,
    refused: Option<&'static str>,
    body_ok: bool,
}

/// Serves `input` with hyper's HTTP/1 server, set up as the proxy's server is; returns the
/// requests it handed to the service and whether the connection ended without an error.
async fn hyper_server(input: &[u8]) -> (Vec<Delivered>, bool) {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let seen = delivered.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let target = request.uri().to_string();
            let refused = __fuzz::check_request(&request)
                .err()
                .map(|(_, reason)| reason);
            let index = {
                let mut seen = seen.lock().unwrap();
                seen.push(Delivered {
                    target,
                    refused,
                    body_ok: false,
                });
                seen.len() - 1
            };
            let body_ok = request.into_body().collect().await.is_ok();
            seen.lock().unwrap()[index].body_ok = body_ok;
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }
    });
    // Half-closed: the requests read before the end of input are answered, not dropped.
    let conn = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .timer(TokioTimer::new())
        .max_header_size(64 * 1024)
        .serve_connection(TokioIo::new(server), service);
    client.write_all(input).await.unwrap();
    client.shutdown().await.unwrap();
    let reader = tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink).await;
    });
    let clean = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("hyper's server finished")
        .is_ok();
    reader.abort();
    let delivered = std::mem::take(&mut *delivered.lock().unwrap());
    (delivered, clean)
}

/// Whether hyper refuses the head for something other than framing: a method, target
/// or field it cannot represent, or a head over its limits.
fn refused_for_other_than_framing(input: &[u8]) -> bool {
    let mut fields = [httparse::EMPTY_HEADER; 100];
    let mut parsed = httparse::Request::new(&mut fields);
    let len = match parsed.parse(input) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return true,
    };
    let method_ok = http::Method::from_bytes(parsed.method.unwrap_or_default().as_bytes()).is_ok();
    let uri_ok = http::Uri::try_from(parsed.path.unwrap_or_default()).is_ok();
    let fields_ok = parsed.headers.iter().all(|f| {
        http::HeaderName::from_bytes(f.name.as_bytes()).is_ok()
            && http::HeaderValue::from_bytes(f.value).is_ok()
    });
    !(method_ok && uri_ok && fields_ok && len <= 64 * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_refused_where_hyper_refuses_them_or_the_contract_is_stricter() {
    let mut rng = SmallRng::seed_from_u64(0xd1ff_0001);
    let (mut agreed, mut stricter, mut in_sync) = (0, 0, 0);
    let mut cases: Vec<Vec<u8>> = REQUESTS.iter().map(|r| r.to_vec()).collect();
    cases.extend((0..3000).map(|_| {
        let message = REQUESTS[rng.gen_range(0..REQUESTS.len())];
        mutate(&mut rng, message)
    }));
    for request in cases {
        let mut input = request.clone();
        input.extend_from_slice(CANARY);
        let shown = String::from_utf8_lossy(&input).into_owned();
        let (delivered, clean) = hyper_server(&input).await;
        let (heads, scan_refused) = __fuzz::scan_requests([&input[..]]);
        let first_refusal = scan_refused
            .filter(|&(index, _)| index == 0)
            .map(|(_, reason)| reason)
            .or_else(|| delivered.first().and_then(|d| d.refused));

        match delivered.first() {
            // hyper took the first request: the codec takes it too, or refuses it for a
            // reason of the contract's.
            Some(_) => match first_refusal {
                None => agreed += 1,
                Some(reason) => {
                    assert!(
                        REQUEST_EXCEPTIONS.contains(&reason),
                        "hyper took a request the codec refuses ({reason}): {shown:?}"
                    );
                    stricter += 1;
                }
            },
            // hyper refused it: for framing, the codec's rules refuse it too.
            None => {
                if !refused_for_other_than_framing(&input) && request.first() != Some(&b'\r') {
                    assert!(
                        scan_refused.is_some_and(|(index, _)| index == 0),
                        "hyper refused a request whose framing the codec takes: {shown:?}"
                    );
                }
                agreed += 1;
            }
        }

        // Framing agreement: where hyper read every request and body cleanly, the scanner
        // counted the same requests (so it reads bodies as hyper does), unless it refused
        // one before.
        let all_clean = clean && delivered.iter().all(|d| d.body_ok);
        let refused_before = scan_refused.is_some_and(|(index, _)| index < delivered.len() as u64);
        // (hyper stops reading after a request that closes the connection, HTTP/1.0 or
        // `Connection: close`; the scanner reads on, so it may count more.)
        if all_clean && !refused_before {
            let reached_canary = delivered.last().is_some_and(|d| d.target == "/canary");
            let counted = delivered.len() as u64;
            assert!(
                heads == counted || (!reached_canary && heads > counted),
                "the scanner and hyper read the bodies differently ({heads} heads): {shown:?}, hyper saw {delivered:?}"
            );
            in_sync += usize::from(reached_canary);
        }
    }
    // Each kind of outcome was exercised.
    assert!(
        agreed > 1000 && stricter > 100 && in_sync > 300,
        "{agreed} agreed, {stricter} stricter, {in_sync} in sync"
    );
}

/// What hyper's HTTP/1 client made of `input` as the answer to a `GET`: the status and
/// the whole body, or an error.
async fn hyper_client(input: &[u8]) -> Result<(StatusCode, Bytes), ()> {
    let (client, mut server) = tokio::io::duplex(1 << 20);
    let input = input.to_vec();
    let backend = tokio::spawn(async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match server.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = server.write_all(&input).await;
        let _ = server.shutdown().await;
        // Hold the connection until the client is done with it.
        let _ = server.read_to_end(&mut head).await;
    });
    let result = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .map_err(|_| ())?;
        tokio::spawn(conn);
        let request = Request::get("/")
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.map_err(|_| ())?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|_| ())?;
        Ok((status, body.to_bytes()))
    };
    let result = tokio::time::timeout(Duration::from_secs(5), result)
        .await
        .expect("hyper's client finished");
    backend.abort();
    result
}

/// What the codec makes of `input`: the status and the whole body, or the reason.
fn codec(input: &[u8]) -> Result<(StatusCode, Bytes), String> {
    let mut buf = BytesMut::from(input);
    let head = __fuzz::parse_response_head(&mut buf, false)
        .map_err(|e| e.to_string())?
        .ok_or("incomplete head")?;
    let body = match head.framing.as_str() {
        "empty" => Bytes::new(),
        "close" => buf.freeze(),
        "chunked" => {
            let decoded = __fuzz::decode_chunked([&buf[..]]).map_err(|e| e.to_string())?;
            if !decoded.done {
                return Err("incomplete chunked body".into());
            }
            Bytes::from(decoded.data)
        }
        length => {
            let n: usize = length["length ".len()..].parse().unwrap();
            if buf.len() < n {
                return Err("incomplete body".into());
            }
            buf.freeze().slice(..n)
        }
    };
    Ok((head.status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_read_as_hyper_reads_them_or_refused_where_the_codec_is_stricter() {
    let mut rng = SmallRng::seed_from_u64(0xd1ff_0002);
    let (mut same, mut stricter, mut both_refused) = (0, 0, 0);
    let mut cases: Vec<Vec<u8>> = RESPONSES.iter().map(|r| r.to_vec()).collect();
    cases.extend((0..3000).map(|_| {
        let message = RESPONSES[rng.gen_range(0..RESPONSES.len())];
        mutate(&mut rng, message)
    }));
    for response in cases {
        let shown = String::from_utf8_lossy(&response).into_owned();
        let theirs = hyper_client(&response).await;
        let ours = codec(&response);
        match (theirs, ours) {
            (Ok(theirs), Ok(ours)) => {
                assert_eq!(theirs, ours, "read differently: {shown:?}");
                same += 1;
            }
            // hyper's client takes a 101 as an upgrade; the proxy never asks for one here.
            (Ok((status, _)), Err(_)) if status == StatusCode::SWITCHING_PROTOCOLS => {}
            (Ok(_), Err(reason)) => {
                assert!(
                    RESPONSE_EXCEPTIONS.contains(&reason.as_str()),
                    "hyper took a response the codec refuses ({reason}): {shown:?}"
                );
                stricter += 1;
            }
            (Err(()), Ok((status, _))) => {
                assert!(
                    status == StatusCode::SWITCHING_PROTOCOLS,
                    "hyper refused a response the codec takes: {shown:?}"
                );
            }
            (Err(()), Err(_)) => both_refused += 1,
        }
    }
    assert!(
        same > 400 && stricter > 10 && both_refused > 500,
        "{same} read alike, {stricter} stricter, {both_refused} refused by both"
    );
}
