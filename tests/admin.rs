//! The admin listener (`admin_listen`): `/metrics` checked against the requests sent,
//! `/status`, the status page rendered by a real headless browser, the admin endpoints never
//! served on `listen`; and the access log.
//!
//! Some counters are process-wide (local answers, retries, reloads, client connections), so
//! the tests of this file take turns ([`serial`]) and compare before and after.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use http::{Request, StatusCode};
use support::*;
use tower_lb::config;

/// One test at a time: the process-wide counters would see the others' requests.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

fn admin_config(backends: &[SocketAddr], extra: &str) -> config::Config {
    let extra = if extra.is_empty() {
        r#""admin_listen": "127.0.0.1:0""#.to_owned()
    } else {
        format!(r#""admin_listen": "127.0.0.1:0", {extra}"#)
    };
    config(backends, &extra)
}

/// `/metrics` as a map from series (name and labels, as written) to value.
async fn scrape(proxy: &tower_lb::standalone::Proxy) -> HashMap<String, f64> {
    let admin = proxy.admin_addr().expect("admin listener");
    let mut client = Client::connect(admin).await;
    let res = client
        .send(Request::get("/metrics").body(empty()).unwrap())
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    use http_body_util::BodyExt;
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let mut series = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').expect("series and value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        assert!(
            series.insert(name.to_owned(), value).is_none(),
            "{name} twice"
        );
    }
    series
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no {series} in {:?}", m.keys().collect::<Vec<_>>()))
}

fn by(name: &str, backend: &Backend, rest: &str) -> String {
    if rest.is_empty() {
        format!(r#"{name}{{backend="{}"}}"#, backend.addr)
    } else {
        format!(r#"{name}{{backend="{}",{rest}}}"#, backend.addr)
    }
}

#[tokio::test]
async fn metrics_count_what_was_sent() {
    let _turn = serial().await;
    let (a, b) = (Backend::start().await, Backend::start().await);
    let mut proxy = proxy(admin_config(&[a.addr, b.addr], "")).await;
    let before = scrape(&proxy).await;

    // Round robin: a, b, a, b, then a 404 from a.
    let mut client = Client::connect(proxy.local_addr()).await;
    for _ in 0..4 {
        assert_eq!(client.get("/").await.0, StatusCode::OK);
    }
    assert_eq!(client.get("/missing").await.0, StatusCode::NOT_FOUND);
    nothing_in_flight(&proxy).await;
    let m = scrape(&proxy).await;
    for backend in [&a, &b] {
        let ok = backend.paths().iter().filter(|p| *p == "/").count() as f64;
        let missing = backend.paths().iter().filter(|p| *p == "/missing").count() as f64;
        let requests = |class| value(&m, &by("tower_lb_requests_total", backend, class));
        assert_eq!(requests(r#"class="2xx""#), ok);
        assert_eq!(requests(r#"class="4xx""#), missing);
        assert_eq!(requests(r#"class="5xx""#), 0.0);
        let h = "tower_lb_request_duration_seconds";
        let count = value(&m, &by(&format!("{h}_count"), backend, ""));
        assert_eq!(count, ok + missing);
        assert_eq!(
            value(&m, &by(&format!("{h}_bucket"), backend, r#"le="+Inf""#)),
            count
        );
        assert!(value(&m, &by(&format!("{h}_sum"), backend, "")) > 0.0);
        // Cumulative buckets never decrease.
        let mut last = 0.0;
        for le in tower_lb::stats::LATENCY_BUCKETS {
            let n = value(
                &m,
                &by(&format!("{h}_bucket"), backend, &format!("le=\"{le}\"")),
            );
            assert!(n >= last, "bucket {le}");
            last = n;
        }
        assert_eq!(value(&m, &by("tower_lb_backend_up", backend, "")), 1.0);
        assert_eq!(
            value(&m, &by("tower_lb_backend_in_flight", backend, "")),
            0.0
        );
        assert_eq!(value(&m, &by("tower_lb_ejections_total", backend, "")), 0.0);
        assert!(
            value(
                &m,
                &by("tower_lb_health_checks_total", backend, r#"result="pass""#)
            ) >= 1.0
        );
    }
    assert_eq!(a.paths().len() + b.paths().len(), 5);
    // This client's connection is open (other tests wait their turn).
    assert!(value(&m, "tower_lb_client_connections") >= 1.0);

    // A request held open counts in flight on its backend.
    let mut held = Client::connect(proxy.local_addr()).await;
    let res = held
        .send(Request::get("/hold").body(empty()).unwrap())
        .await;
    let holder = if a.paths().contains(&"/hold".to_owned()) {
        &a
    } else {
        &b
    };
    let m = scrape(&proxy).await;
    assert_eq!(
        value(&m, &by("tower_lb_backend_in_flight", holder, "")),
        1.0
    );
    holder.release(1);
    use http_body_util::BodyExt;
    res.into_body().collect().await.unwrap();

    // No healthy backend: a local 503, both backends down, failed probes counted.
    a.set_healthy(false);
    b.set_healthy(false);
    wait_health(&proxy, &a, false).await;
    wait_health(&proxy, &b, false).await;
    assert_eq!(client.get("/").await.0, StatusCode::SERVICE_UNAVAILABLE);
    let m = scrape(&proxy).await;
    let local =
        |m: &HashMap<String, f64>| value(m, r#"tower_lb_local_responses_total{status="503"}"#);
    assert_eq!(local(&m) - local(&before), 1.0);
    for backend in [&a, &b] {
        assert_eq!(value(&m, &by("tower_lb_backend_up", backend, "")), 0.0);
        assert!(
            value(
                &m,
                &by("tower_lb_health_checks_total", backend, r#"result="fail""#)
            ) >= 1.0
        );
    }

    // A reload applied through the proxy.
    let reloads = |m: &HashMap<String, f64>, r: &str| {
        value(
            m,
            &format!(r#"tower_lb_config_reloads_total{{result="{r}"}}"#),
        )
    };
    let mut next = admin_config(&[a.addr, b.addr], r#""algorithm": "least_connections""#);
    next.listen = proxy.config().listen;
    proxy.apply(next).await;
    let after = scrape(&proxy).await;
    assert_eq!(reloads(&after, "applied") - reloads(&m, "applied"), 1.0);
    assert_eq!(reloads(&after, "rejected"), reloads(&m, "rejected"));

    // Connections closed: the gauge comes back down.
    drop((client, held));
    within(async {
        while value(&scrape(&proxy).await, "tower_lb_client_connections") > 0.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rejected_edit_and_a_retry_are_counted() {
    let _turn = serial().await;
    let (a, c) = (Backend::start().await, Backend::start().await);
    // Probes far apart: "c" stays healthy in the proxy's view after it dies.
    let mut slow_probes = admin_config(&[a.addr, c.addr], "");
    slow_probes.health.interval = Duration::from_secs(30);
    let proxy = proxy(slow_probes).await;
    let before = scrape(&proxy).await;
    let c_addr = c.addr;
    c.kill();

    // One of two requests picks "c": its connection is refused, and it is retried on "a".
    let mut client = Client::connect(proxy.local_addr()).await;
    for _ in 0..2 {
        assert_eq!(client.get("/").await, (StatusCode::OK, a.authority()));
    }
    let m = scrape(&proxy).await;
    let retries = |m: &HashMap<String, f64>| value(m, "tower_lb_retries_total");
    assert_eq!(retries(&m) - retries(&before), 1.0);
    let failures = format!(r#"tower_lb_backend_failures_total{{backend="{c_addr}"}}"#);
    assert_eq!(value(&m, &failures), 1.0);
    let status = proxy.backends().snapshot();
    let (_, dead) = status
        .iter()
        .find(|(k, _)| k.as_str() == c_addr.to_string())
        .unwrap();
    assert_eq!((dead.stats().requests(), dead.stats().failures()), (0, 1));

    // The file watcher reports an invalid edit: rejected.
    let dir = tempdir();
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        r#"{"servers": [{"host": "127.0.0.1", "port": 9001}]}"#,
    )
    .unwrap();
    let mut edits = config::watch(&path, Duration::from_millis(200));
    within(edits.next()).await.unwrap().unwrap();
    std::fs::write(&path, r#"{"servers": [{"host": "127.0.0.1", "port": 0}]}"#).unwrap();
    within(edits.next()).await.unwrap().unwrap_err();
    let after = scrape(&proxy).await;
    let rejected =
        |m: &HashMap<String, f64>| value(m, r#"tower_lb_config_reloads_total{result="rejected"}"#);
    assert_eq!(rejected(&after) - rejected(&m), 1.0);
    drop(edits);
    std::fs::remove_dir_all(&dir).unwrap();
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn status_reports_every_backend() {
    let _turn = serial().await;
    let (a, b) = (Backend::start().await, Backend::start().await);
    let proxy = proxy(admin_config(&[a.addr, b.addr], "")).await;
    let admin = proxy.admin_addr().unwrap();
    let mut client = Client::connect(proxy.local_addr()).await;
    for _ in 0..3 {
        client.get("/").await;
    }
    b.set_healthy(false);
    wait_health(&proxy, &b, false).await;
    nothing_in_flight(&proxy).await;

    let (code, body) = get(admin, "/status").await;
    assert_eq!(code, StatusCode::OK);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let expected = serde_json::json!({
        "algorithm": "round_robin",
        "backends": [
            {"address": a.authority(), "weight": 1, "protocol": "http1", "healthy": true,
             "ejected": false, "slow_start": null, "in_flight": 0, "requests": 2, "failures": 0, "errors": 0,
             "cancelled": 0},
            {"address": b.authority(), "weight": 1, "protocol": "http1", "healthy": false,
             "ejected": false, "slow_start": null, "in_flight": 0, "requests": 1, "failures": 0, "errors": 0,
             "cancelled": 0},
        ]
    });
    assert_eq!(status, expected);
    assert_eq!(get(admin, "/nothing").await.0, StatusCode::NOT_FOUND);
    proxy.shutdown().await.unwrap();
}

/// A client that closes its connection while its request waits for the backend cancels
/// it: the proxy closes its connection to the backend at once (not when the backend
/// answers), and the request counts as cancelled, neither as a response nor as a failure.
/// Over HTTP/1.1 both for a request without a body and for one whose body was read to its
/// end, and over HTTP/2 for a stream the client resets.
#[tokio::test]
async fn a_client_that_goes_away_cancels_its_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;
    let _turn = serial().await;
    // A backend that never answers, and tells when a request arrives and when the proxy
    // closes the connection it came on.
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (closed_tx, mut closed) = mpsc::unbounded_channel();
    let backend = RawServer::start(move |mut stream| {
        let (started, closed) = (started_tx.clone(), closed_tx.clone());
        async move {
            let Some(head) = read_head(&mut stream).await else {
                return;
            };
            if head.starts_with(b"GET /health ") {
                let _ = stream.write_all(HEALTH_OK).await;
                return;
            }
            let _ = started.send(());
            let mut rest = [0; 64];
            while let Ok(1..) = stream.read(&mut rest).await {}
            let _ = closed.send(());
        }
    })
    .await;
    let proxy = proxy(admin_config(&[backend.addr], "")).await;
    let admin = proxy.admin_addr().unwrap();
    let before = scrape(&proxy).await;
    let cancelled = format!(
        r#"tower_lb_requests_cancelled_total{{backend="{}"}}"#,
        backend.addr
    );

    let requests: [&[u8]; 2] = [
        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    ];
    for (n, request) in requests.into_iter().enumerate() {
        let mut client = tokio::net::TcpStream::connect(proxy.local_addr())
            .await
            .unwrap();
        client.write_all(request).await.unwrap();
        within(started.recv()).await;
        drop(client);
        // Without the watch on the client, the proxy waits for the answer.
        within(closed.recv()).await;
        let m = scrape(&proxy).await;
        assert_eq!(
            value(&m, &cancelled) - value(&before, &cancelled),
            n as f64 + 1.0
        );
    }
    // An HTTP/2 client cancels its stream (`RST_STREAM`) when it drops the response.
    let h2 = H2Client::connect(proxy.local_addr()).await;
    let uri = format!("http://{}/slow", proxy.local_addr());
    let waiting =
        tokio::spawn(async move { h2.send(Request::get(uri).body(full("")).unwrap()).await });
    within(started.recv()).await;
    waiting.abort();
    within(closed.recv()).await;
    let m = scrape(&proxy).await;
    assert_eq!(value(&m, &cancelled) - value(&before, &cancelled), 3.0);

    let (_, body) = get(admin, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let backend = &status["backends"][0];
    assert_eq!(
        (
            &backend["cancelled"],
            &backend["in_flight"],
            &backend["requests"],
            &backend["failures"]
        ),
        (&3.into(), &0.into(), &0.into(), &0.into())
    );
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn admin_is_never_served_on_listen() {
    let _turn = serial().await;
    let a = Backend::start().await;
    let mut proxy = proxy(admin_config(&[a.addr], "")).await;
    // On `listen`, these paths are proxied like any other.
    for path in ["/metrics", "/status", "/"] {
        assert_eq!(
            get(proxy.local_addr(), path).await,
            (StatusCode::OK, a.authority())
        );
    }
    assert_eq!(a.hits(), 3);
    assert_ne!(proxy.admin_addr(), Some(proxy.local_addr()));

    // Moving the admin listener needs a restart, like `listen`: it stays where it is.
    let admin = proxy.admin_addr();
    let mut moved = config(&[a.addr], r#""admin_listen": "127.0.0.1:1""#);
    moved.listen = proxy.config().listen;
    let diff = proxy.apply(moved).await;
    assert_eq!(diff.needs_restart, ["admin_listen"]);
    assert_eq!(proxy.admin_addr(), admin);
    assert_eq!(get(admin.unwrap(), "/status").await.0, StatusCode::OK);
    proxy.shutdown().await.unwrap();

    // Without admin_listen there is no admin listener.
    let proxy = support::proxy(config(&[a.addr], "")).await;
    assert_eq!(proxy.admin_addr(), None);
    proxy.shutdown().await.unwrap();

    // The same address as listen is refused.
    let err = config::Config::from_json(
        r#"{"servers": [{"host": "127.0.0.1", "port": 9001}], "listen": "127.0.0.1:8080", "admin_listen": "127.0.0.1:8080"}"#,
    )
    .unwrap_err();
    assert_eq!(err.field_name(), Some("admin_listen"));
    // `null` is the default: no admin listener; a bad address names the field.
    let one = r#""servers": [{"host": "127.0.0.1", "port": 9001}]"#;
    let c = config::Config::from_json(&format!(r#"{{{one}, "admin_listen": null}}"#)).unwrap();
    assert_eq!(c.admin_listen, None);
    let err = config::Config::from_json(&format!(r#"{{{one}, "admin_listen": "localhost"}}"#))
        .unwrap_err();
    assert_eq!(err.field_name(), Some("admin_listen"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_every_backend_in_a_browser() {
    let _turn = serial().await;
    let (a, b) = (Backend::start().await, Backend::start().await);
    // Answers 500: ejected by passive health at its first failure.
    let c = raw_backend(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n").await;
    let settings = r#""passive_health": {"consecutive_failures": 1, "ejection_time": 60, "max_ejection_percent": 100}, "slow_start": 60"#;
    let mut proxy = proxy(admin_config(&[a.addr, b.addr, c.addr], settings)).await;
    b.set_healthy(false);
    wait_health(&proxy, &b, false).await;
    // D joins after the start: it ramps up over slow_start once healthy.
    let d = Backend::start().await;
    proxy
        .apply(admin_config(&[a.addr, b.addr, c.addr, d.addr], settings))
        .await;
    wait_health(&proxy, &d, true).await;
    let c_key: http::uri::Authority = c.addr.to_string().parse().unwrap();
    for _ in 0..2 {
        get(proxy.local_addr(), "/").await;
    }
    assert_eq!(proxy.backends().is_ejected(&c_key), Some(true));
    let admin = proxy.admin_addr().unwrap();

    let (code, page) = get(admin, "/").await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        !page.contains("http://") && !page.contains("https://") && !page.contains("src="),
        "no external assets"
    );

    let profile = tempdir();
    let out = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=3000",
            &format!("--user-data-dir={}", profile.display()),
            "--dump-dom",
            &format!("http://{admin}/"),
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("chromium finished")
        .expect("chromium runs (.ci/run installs Debian's chromium)");
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The rows are built by the page's script from /status: each backend with its state.
    for (addr, state) in [
        (a.addr, "healthy"),
        (b.addr, "unhealthy"),
        (c.addr, "ejected"),
        (d.addr, "slow-starting"),
    ] {
        let row_start = dom
            .find(&format!(r#"<tr data-backend="{addr}">"#))
            .unwrap_or_else(|| panic!("no row for {addr}: {dom}"));
        let row = &dom[row_start..];
        let row = &row[..row.find("</tr>").unwrap()];
        assert!(
            row.contains(&format!(r#"<span class="{state}""#))
                && row.contains(&format!(">{state}</span>")),
            "{row}"
        );
    }
    assert!(dom.contains("2 of 4 backends taking traffic"), "{dom}");
    // C answered its one request 500: an error rate of 100 %, though the 500 counts both
    // as a response and as a failure.
    let row = &dom[dom
        .find(&format!(r#"<tr data-backend="{}">"#, c.addr))
        .unwrap()..];
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(row.contains(">100.0 %<"), "{row}");
    proxy.shutdown().await.unwrap();
}

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn the_access_log_is_one_line_per_request_when_turned_on() {
    let _turn = serial().await;
    let a = Backend::start().await;
    let proxy = proxy(config(&[a.addr], "")).await;

    let log = |filter: &str| {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(captured.clone())
            .with_ansi(false)
            .finish();
        (captured, subscriber)
    };

    // On: one line with client, method, path, backend, status, duration and bytes.
    let (on, subscriber) = log("tower_lb::access=info");
    let guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    let mut client = Client::connect(proxy.local_addr()).await;
    let (code, body) = client.get("/some/path?q=1").await;
    assert_eq!(code, StatusCode::OK);
    nothing_in_flight(&proxy).await;
    let text = on.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line = lines[0];
    for part in [
        "tower_lb::access",
        "client=127.0.0.1:",
        "method=GET",
        "path=/some/path?q=1",
        &format!("backend=\"{}\"", a.addr),
        "status=200",
        "duration=",
        &format!("bytes={}", body.len()),
    ] {
        assert!(line.contains(part), "{part:?} missing in {line}");
    }

    // A request whose client goes away before the answer: status 499, as nginx logs it.
    let mut gone = tokio::net::TcpStream::connect(proxy.local_addr())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut gone, b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    within(a.started()).await;
    drop(gone);
    // The line is written when the proxy notices; nothing else tells when that is.
    within(async {
        while !on.text().contains("path=/wait") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let text = on.text();
    let line = text.lines().find(|l| l.contains("path=/wait")).unwrap();
    assert!(line.contains("status=499"), "{line}");
    drop(guard);

    // Off by default (the standalone's default filter) and at other targets' levels.
    let (off, subscriber) = log("info,tower_lb::access=off");
    let guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    assert_eq!(client.get("/").await.0, StatusCode::OK);
    nothing_in_flight(&proxy).await;
    assert!(!off.text().contains("tower_lb::access"), "{}", off.text());
    drop(guard);
    proxy.shutdown().await.unwrap();
}
