//! The admin listener: `GET /metrics` (Prometheus text), `GET /status` (JSON) and `GET /`
//! (a page that refreshes itself), served on their own address, never on the proxy's.
//!
//! The Prometheus text is rendered here from the counters the request path already keeps
//! (see [`crate::stats`]) when a scrape comes, instead of through a recorder: a proxied
//! request then costs the same whether or not anyone scrapes. The names are those of the
//! contract, plus `tower_lb_backend_failures_total`. `tower_lb_backend_up` is 1 for a
//! backend that takes traffic: healthy by its checks and not ejected by passive health;
//! `/status` gives the two apart (`healthy`, `ejected`), and `slow_start` is the share of
//! its weight a backend ramping up after joining or recovering has now (`null` at full
//! weight). `failures` counts `5xx` responses (also in `requests`) and `errors`, the requests
//! that got no response (no connection, a reset or close before the head, a timeout).
//! `cancelled` (`tower_lb_requests_cancelled_total`) counts requests whose client went
//! away before the backend answered (HAProxy's `cli_abrt`, nginx's `499`), and those a
//! shutdown cut at its `shutdown_timeout`: neither responses nor failures, and not in the
//! latency either.
//!
//! # Examples
//!
//! ```
//! use tower_lb::policy::Algorithm;
//! use tower_lb::proxy::{self, Client};
//!
//! let backends = proxy::backends(Algorithm::default(), &Client::new(), ["127.0.0.1:9001".parse().unwrap()]);
//! let text = tower_lb::admin::metrics(&backends);
//! assert!(text.contains(r#"tower_lb_requests_total{backend="127.0.0.1:9001",class="2xx"} 0"#));
//! let status = tower_lb::admin::status(&backends);
//! assert_eq!(status["backends"][0]["address"], "127.0.0.1:9001");
//! ```

use std::convert::Infallible;
use std::fmt::Write;
use std::future::Future;
use std::io;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::policy::{Algorithm, Endpoint};
use crate::proxy::uri::Authority;
use crate::proxy::BackendProtocol;
use crate::stats::{self, BackendCounters, LATENCY_BUCKETS};
use crate::Backends;

/// The status page: plain HTML, CSS and script in one file, no external assets.
const PAGE: &str = include_str!("page.html");

/// Serves the admin endpoints for `backends` on `listener` until `shutdown` completes;
/// then stops accepting and closes its connections.
pub async fn serve<S: BackendProtocol + Clone + Send + Sync + 'static>(
    listener: TcpListener,
    backends: Backends<Authority, S, Algorithm>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let backends = backends.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let response = respond(&backends, &request);
            async move { Ok::<_, Infallible>(response) }
        });
        connections.spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    connections.shutdown().await;
    Ok(())
}

fn respond<B, S: BackendProtocol + Clone>(
    backends: &Backends<Authority, S, Algorithm>,
    request: &Request<B>,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(metrics(backends)),
        ),
        (&Method::GET, "/status") => (
            StatusCode::OK,
            "application/json",
            Bytes::from(status(backends).to_string()),
        ),
        (&Method::GET, "/") => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(PAGE.as_bytes()),
        ),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"not found: try /, /status or /metrics\n"),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"method not allowed\n"),
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /status`: the policy and every backend's state and counters.
pub fn status<S: BackendProtocol + Clone>(
    backends: &Backends<Authority, S, Algorithm>,
) -> serde_json::Value {
    let snapshot = backends.snapshot();
    let list: Vec<serde_json::Value> = snapshot
        .iter()
        .enumerate()
        .map(|(index, (address, endpoint))| {
            let counters = endpoint.stats();
            let protocol = snapshot.get(index).map_or("http1", |(_, s)| s.protocol());
            serde_json::json!({
                "address": address.as_str(),
                "weight": endpoint.weight(),
                "protocol": protocol,
                "healthy": endpoint.passes_health_checks(),
                "ejected": endpoint.is_ejected(),
                "slow_start": endpoint.warmup(),
                "in_flight": endpoint.in_flight(),
                "requests": counters.requests(),
                "failures": counters.failures(),
                "errors": counters.errors,
                "cancelled": counters.cancelled,
            })
        })
        .collect();
    serde_json::json!({
        "algorithm": snapshot.policy().name(),
        "backends": list,
    })
}

/// `GET /metrics`: Prometheus text exposition format 0.0.4.
pub fn metrics<S: Clone>(backends: &Backends<Authority, S, Algorithm>) -> String {
    let snapshot = backends.snapshot();
    let rows: Vec<_> = snapshot
        .iter()
        .map(|(address, e)| (escape(address.as_str()), e.clone(), e.stats()))
        .collect();
    let global = stats::global();
    // Writing to a String cannot fail: the results of `writeln!` are ignored.
    let mut text = String::with_capacity(1024 + rows.len() * 2048);

    let name = family(
        &mut text,
        "tower_lb_requests_total",
        "counter",
        "Responses from each backend that ended, by status class.",
    );
    for (b, _, c) in &rows {
        for (class, n) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().zip(c.responses) {
            let _ = writeln!(text, "{name}{{backend=\"{b}\",class=\"{class}\"}} {n}");
        }
    }
    per_backend(
        &mut text,
        &rows,
        "tower_lb_backend_failures_total",
        "counter",
        "Requests a backend failed: no connection, reset or timeout before a response, or 5xx.",
        |_, c| c.failures(),
    );
    per_backend(
        &mut text,
        &rows,
        "tower_lb_requests_cancelled_total",
        "counter",
        "Requests cancelled before their backend answered: the client went away, or a shutdown cut them.",
        |_, c| c.cancelled,
    );
    let name = family(
        &mut text,
        "tower_lb_local_responses_total",
        "counter",
        "Answers the proxy made itself, by status.",
    );
    for (status, n) in global.local_responses() {
        let _ = writeln!(text, "{name}{{status=\"{status}\"}} {n}");
    }
    let name = family(
        &mut text,
        "tower_lb_request_duration_seconds",
        "histogram",
        "Time from the pick of a backend to the end of its response body.",
    );
    for (b, _, c) in &rows {
        let mut cumulative = 0;
        for (le, n) in LATENCY_BUCKETS.iter().zip(c.buckets) {
            cumulative += n;
            let _ = writeln!(
                text,
                "{name}_bucket{{backend=\"{b}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let count: u64 = c.buckets.iter().sum();
        let _ = writeln!(text, "{name}_bucket{{backend=\"{b}\",le=\"+Inf\"}} {count}");
        let _ = writeln!(
            text,
            "{name}_sum{{backend=\"{b}\"}} {}",
            c.latency_sum.as_secs_f64()
        );
        let _ = writeln!(text, "{name}_count{{backend=\"{b}\"}} {count}");
    }
    per_backend(
        &mut text,
        &rows,
        "tower_lb_backend_up",
        "gauge",
        "1 when the backend is healthy and not ejected, else 0.",
        |e, _| u64::from(e.is_healthy()),
    );
    per_backend(
        &mut text,
        &rows,
        "tower_lb_backend_in_flight",
        "gauge",
        "Requests and tunnels open on the backend now.",
        |e, _| e.in_flight() as u64,
    );
    per_backend(
        &mut text,
        &rows,
        "tower_lb_ejections_total",
        "counter",
        "Times passive health ejected the backend.",
        |_, c| c.ejections,
    );
    let name = family(
        &mut text,
        "tower_lb_health_checks_total",
        "counter",
        "Health-check probes of the backend, by result.",
    );
    for (address, _) in snapshot.iter() {
        let [pass, fail] = global.health_checks(address.as_str());
        let b = escape(address.as_str());
        let _ = writeln!(
            text,
            "{name}{{backend=\"{b}\",result=\"pass\"}} {pass}\n{name}{{backend=\"{b}\",result=\"fail\"}} {fail}"
        );
    }
    let name = family(
        &mut text,
        "tower_lb_retries_total",
        "counter",
        "Requests tried on another backend after the first could not take them.",
    );
    let _ = writeln!(text, "{name} {}", global.retries());
    let name = family(
        &mut text,
        "tower_lb_config_reloads_total",
        "counter",
        "Configuration reloads, applied or rejected as invalid.",
    );
    let [applied, rejected] = global.config_reloads();
    let _ = writeln!(
        text,
        "{name}{{result=\"applied\"}} {applied}\n{name}{{result=\"rejected\"}} {rejected}"
    );
    let name = family(
        &mut text,
        "tower_lb_client_connections",
        "gauge",
        "Client connections open now.",
    );
    let _ = writeln!(text, "{name} {}", global.client_connections().max(0));
    text
}

/// Writes a family with one value per backend of `rows`.
fn per_backend(
    text: &mut String,
    rows: &[(String, Endpoint, BackendCounters)],
    name: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&Endpoint, &BackendCounters) -> u64,
) {
    let name = family(text, name, kind, help);
    for (b, e, c) in rows {
        let _ = writeln!(text, "{name}{{backend=\"{b}\"}} {}", value(e, c));
    }
}

/// Writes a family's `# HELP` and `# TYPE` lines and returns its name.
fn family<'a>(text: &mut String, name: &'a str, kind: &str, help: &str) -> &'a str {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    name
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}
