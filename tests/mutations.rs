//! Mutated HTTP on both sides of the real proxy: whatever a client or a backend sends, the
//! proxy answers with a well-formed status line or closes the connection, never panics,
//! leaves nothing in flight and keeps serving.
//!
//! The inputs are valid messages with a few seeded mutations each (bytes changed, inserted,
//! deleted, repeated, or the message cut short), so that they get past the first checks and
//! into the framing, header and body code. Fixed seeds: a failure reproduces.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::Duration;

use http::StatusCode;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use support::*;
use tower_lb::config::Config;

/// Panics on the runtime's worker threads, where the proxy's tasks run. tokio catches a
/// panicking task, so a panic in a connection's task would otherwise pass unseen. (A
/// failed assertion of a test runs on the test's own thread and is not counted.)
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // tokio's workers: "tokio-rt-worker" ("tokio-runtime-worker" in older versions).
            let thread = std::thread::current();
            if thread.name().is_some_and(|n| n.starts_with("tokio-")) {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
    });
}

const REQUESTS: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, x-h\r\nX-H: 1\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET http://x/abs HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"PUT /u HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n",
];

const RESPONSES: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close, x-h\r\nX-H: 1\r\n\r\nbody until close",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 500 Oops\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
];

/// Bytes that mean something to an HTTP/1.1 parser, and two that never should appear.
const INTERESTING: &[u8] = b"\r\n: \t,;0x9aZ\x00\x7f\xff";

/// `message` with one to three seeded mutations.
fn mutate(rng: &mut SmallRng, message: &[u8]) -> Vec<u8> {
    support::mutate_bytes(rng, message, INTERESTING)
}

/// Everything the proxy sent must be HTTP/1.x responses: each answer starts with a status
/// line (later ones in a pipelined or 1xx sequence are not checked).
fn assert_well_formed(case: &[u8], answer: &[u8]) {
    if answer.is_empty() {
        return;
    }
    let line = answer.split(|&b| b == b'\n').next().unwrap_or_default();
    let ok = line.len() >= 13
        && line.starts_with(b"HTTP/1.")
        && line[8] == b' '
        && line[9..12].iter().all(u8::is_ascii_digit);
    assert!(
        ok,
        "answer {:?} to {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)]),
        String::from_utf8_lossy(case)
    );
}

/// What the first request head of a case is, by httparse (which hyper parses with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// Complete and well-formed: the proxy must answer it (or refuse it with a status).
    Valid,
    /// Cut short: the proxy waits for the rest, and must close once the client has.
    Partial,
    /// Malformed: a 4xx, the connection closed, nothing forwarded.
    Invalid,
}

fn first_head(case: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    match httparse::Request::new(&mut headers).parse(case) {
        Ok(httparse::Status::Complete(_)) => Head::Valid,
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(_) => Head::Invalid,
    }
}

/// How long an answer (or the close after a malformed head) may take: the backend is on
/// loopback and answers at once.
const ANSWER: Duration = Duration::from_secs(2);
/// How long a case that needs no answer is given before the client closes its side.
const SETTLE: Duration = Duration::from_millis(150);

/// Sends `case`, closing the sending side at once with `half_close`; reads what the proxy
/// sends. Then, if the proxy has not ended the connection, closes the sending side (if not
/// yet) and requires the proxy to end the connection within [`ANSWER`]: no case may hang.
/// Checks the answer against what the head requires.
async fn run_case(target: SocketAddr, case: Vec<u8>, half_close: bool) {
    use tokio::io::AsyncWriteExt;
    let head = first_head(&case);
    let shown = String::from_utf8_lossy(&case).into_owned();
    let mut s = tokio::net::TcpStream::connect(target).await.unwrap();
    let mut out = Vec::new();
    let wrote = s.write_all(&case).await.is_ok();
    if half_close && wrote {
        let _ = s.shutdown().await;
    }
    let must_answer = head == Head::Valid && !half_close && wrote;
    let mut end = match head {
        // The proxy answers and closes by itself.
        Head::Invalid => read_until_end(&mut s, &mut out, ANSWER).await,
        // The first bytes of an answer, at least.
        Head::Valid if must_answer => read_first_bytes(&mut s, &mut out, ANSWER).await,
        _ => End::Open,
    };
    if end == End::Open {
        end = read_until_end(&mut s, &mut out, SETTLE).await;
    }
    let answered_open = !out.is_empty();
    if end == End::Open {
        let _ = s.shutdown().await;
        end = read_until_end(&mut s, &mut out, ANSWER).await;
    }
    let answer = String::from_utf8_lossy(&out[..out.len().min(200)]).into_owned();
    assert_ne!(
        end,
        End::Open,
        "the connection stayed open {ANSWER:?} after the client closed its side: {head:?} {shown:?}, answer {answer:?}"
    );
    assert_well_formed(&case, &out);
    match head {
        Head::Valid if must_answer => {
            assert!(answered_open, "no answer within {ANSWER:?} to {shown:?}")
        }
        Head::Invalid => assert!(
            out.starts_with(b"HTTP/1.1 4") || !wrote,
            "a malformed head got {answer:?}, not a 4xx: {shown:?}"
        ),
        _ => {}
    }
}

/// Reads until the first bytes arrive, the peer ends the connection or `wait` passes.
async fn read_first_bytes(s: &mut tokio::net::TcpStream, out: &mut Vec<u8>, wait: Duration) -> End {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 8192];
    match tokio::time::timeout(wait, s.read(&mut buf)).await {
        Ok(Ok(0)) => End::Closed,
        Ok(Ok(n)) => {
            out.extend_from_slice(&buf[..n]);
            End::Open
        }
        Ok(Err(_)) => End::Reset,
        Err(_) => End::Open,
    }
}

/// Runs the cases, a hundred at a time.
async fn run_all(target: SocketAddr, cases: Vec<(Vec<u8>, bool)>) {
    for batch in cases.chunks(100) {
        let tasks: Vec<_> = batch
            .iter()
            .cloned()
            .map(|(case, half_close)| tokio::spawn(run_case(target, case, half_close)))
            .collect();
        for task in tasks {
            within(task).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_requests_get_a_status_line_or_a_close() {
    count_panics();
    let b = Backend::start().await;
    let proxy = proxy(config(&[b.addr], "")).await;
    let target = proxy.local_addr();
    let mut rng = SmallRng::seed_from_u64(0x7077_e71b);
    let cases: Vec<(Vec<u8>, bool)> = (0..800)
        .map(|_| {
            let message = REQUESTS[rng.gen_range(0..REQUESTS.len())];
            (mutate(&mut rng, message), rng.gen_bool(0.5))
        })
        .collect();
    let (invalid, rest): (Vec<_>, Vec<_>) = cases
        .into_iter()
        .partition(|(case, _)| first_head(case) == Head::Invalid);
    let count = |head| rest.iter().filter(|(c, _)| first_head(c) == head).count();
    // Every kind is well represented.
    assert!(
        invalid.len() > 100 && count(Head::Valid) > 100 && count(Head::Partial) > 100,
        "{} invalid, {} valid, {} partial",
        invalid.len(),
        count(Head::Valid),
        count(Head::Partial)
    );

    // Malformed heads first, alone: the backend must see none of them.
    run_all(target, invalid).await;
    assert_eq!(b.hits(), 0, "the backend saw a malformed request");
    run_all(target, rest).await;

    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic (see the output)");
    nothing_in_flight(&proxy).await;
    assert!(
        b.hits() > 0,
        "no mutated request was valid enough to forward"
    );
    assert_eq!(get(target, "/").await.0, StatusCode::OK);
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_responses_get_passed_on_or_502_never_a_panic() {
    count_panics();
    // Request n gets the n-th response of a seeded sequence, and the connection closes.
    let bad = raw_backend_with(|n| {
        let mut rng = SmallRng::seed_from_u64(0xbac_e4d + n as u64);
        mutate(&mut rng, RESPONSES[n % RESPONSES.len()])
    })
    .await;
    let good = Backend::start().await;
    // Passive health off: it would rightly eject the bad backend, which must keep its turn.
    let off = r#""passive_health": {"consecutive_failures": 0}"#;
    let proxy = proxy(config(&[bad.addr, good.addr], off)).await;
    let target = proxy.local_addr();
    let request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut answered = 0;
    for batch in 0..6 {
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let wait = Duration::from_secs(1);
                tokio::spawn(
                    async move { exchange(target, request, batch % 2 == 0, wait).await.bytes },
                )
            })
            .collect();
        for task in tasks {
            let answer = within(task).await.unwrap();
            assert_well_formed(request, &answer);
            answered += usize::from(batch % 2 == 1 && !answer.is_empty());
        }
    }

    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic (see the output)");
    nothing_in_flight(&proxy).await;
    assert!(
        bad.accepted.load(Ordering::SeqCst) > 100,
        "the bad backend was hardly used"
    );
    // A client that closes its sending side is taken to have gone (as nginx does); every
    // other one gets an answer: the backend's, cut short where it was, or a 502 for a
    // head that is malformed or incomplete when the backend closes.
    assert_eq!(
        answered, 150,
        "answers to the 150 requests of clients that stayed"
    );
    // Round robin over the two: one of two requests in a row reaches the good backend.
    let (first, second) = (get(target, "/").await.0, get(target, "/").await.0);
    assert!(first == StatusCode::OK || second == StatusCode::OK);
    proxy.shutdown().await.unwrap();
}

/// The keys of config.json (`../shared/CONTRACT.md`, plus `trusted_proxies`).
const CONFIG_KEYS: &[&str] = &[
    "listen",
    "servers",
    "algorithm",
    "health_check_url",
    "health_check_interval",
    "health_check_timeout",
    "healthy_threshold",
    "unhealthy_threshold",
    "connect_timeout",
    "response_timeout",
    "spawn_backends",
    "trusted_proxies",
];

#[test]
fn a_mutated_config_is_refused_naming_a_real_field_or_accepted_valid() {
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.json"))
        .expect("config.json at the crate root");
    let fuller = r#"{"listen": "[::1]:8080", "servers": [{"host": "a.example", "port": 80, "weight": 3},
        {"host": "::1", "port": 81}], "algorithm": "hashing", "health_check_interval": 0.5,
        "health_check_timeout": 0.25, "trusted_proxies": ["10.0.0.0/8", "::1"]}"#;
    let mut rng = SmallRng::seed_from_u64(0x000c_0f16);
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..5000 {
        let base = if i % 2 == 0 {
            shipped.as_bytes()
        } else {
            fuller.as_bytes()
        };
        let bytes = mutate(&mut rng, base);
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        match Config::from_json(text) {
            Err(e) => {
                refused += 1;
                assert!(!e.to_string().trim().is_empty(), "empty error for {text}");
                // The field at fault is a key of the file, or a key that is not one and is
                // reported as unknown.
                if let Some(field) = e.field_name() {
                    let key = field.split(['[', '.']).next().unwrap_or_default();
                    let unknown = e.to_string().contains("unknown field");
                    assert!(unknown || CONFIG_KEYS.contains(&key), "{e} for {text}");
                }
            }
            Ok(c) => {
                accepted += 1;
                assert!(!c.servers.is_empty(), "{text}");
                let mut seen = std::collections::HashSet::new();
                for s in &c.servers {
                    assert!(s.port() >= 1 && s.weight() >= 1, "{text}");
                    assert!(
                        seen.insert((s.host().to_ascii_lowercase(), s.port())),
                        "{text}"
                    );
                }
                assert!(c.health.timeout < c.health.interval, "{text}");
                let ms = Duration::from_millis(1);
                for d in [c.health.timeout, c.connect_timeout, c.response_timeout] {
                    assert!(d >= ms, "{d:?} in {text}");
                }
                assert!(c.health.healthy_threshold >= 1 && c.health.unhealthy_threshold >= 1);
            }
        }
    }
    // Both outcomes were exercised.
    assert!(
        accepted > 50 && refused > 2000,
        "{accepted} accepted, {refused} refused"
    );
}
