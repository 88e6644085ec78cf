//! `examples/standalone.rs` as a process: bad configurations at start, demo backends,
//! round robin, live edits of its config file, and SIGTERM with a request in flight.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::process::{example, Running};
use support::*;
use tower_lb::config::Config;

/// A port that was free a moment ago (for demo backends, which need fixed ports).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_with(config: &str) -> (ExitStatus, String, PathBuf) {
    let dir = tempdir();
    let path = dir.join("config.json");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(example()).arg(&path).output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path,
    )
}

#[test]
fn an_address_in_use_is_named_with_its_field() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap();
    let free = free_port();
    for (listen, admin, expected) in [
        (
            free,
            busy.port(),
            format!("cannot listen on {busy} (admin_listen)"),
        ),
        (
            busy.port(),
            free,
            format!("cannot listen on {busy} (listen)"),
        ),
    ] {
        let (status, stderr, path) = run_with(&format!(
            r#"{{"listen": "127.0.0.1:{listen}", "admin_listen": "127.0.0.1:{admin}",
                "servers": [{{"host": "127.0.0.1", "port": 1}}], "spawn_backends": false}}"#
        ));
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&expected), "{stderr} lacks {expected}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}

#[test]
fn invalid_configs_at_start_exit_non_zero_with_one_message() {
    let cases = [
        (
            "{\n  \"servers\": [\n    {\"host\": \"127.0.0.1\" \"port\": 9001}\n  ]\n}",
            "line 3 column 26",
        ),
        (
            r#"{"servers": [{"host": "127.0.0.1", "port": 0}]}"#,
            "servers[0].port: 0 is not a port",
        ),
        (r#"{"servers": []}"#, "servers: is empty"),
        (
            r#"{"servers": [{"host": "127.0.0.1", "port": 1}], "algoritm": "hashing"}"#,
            "unknown field `algoritm`",
        ),
        (
            r#"{"servers": [{"host": "127.0.0.1", "port": 1, "weight": 0}]}"#,
            "servers[0].weight",
        ),
        (
            r#"{"servers": [{"host": "127.0.0.1", "port": 1}], "health_check_interval": 1, "health_check_timeout": 1}"#,
            "health_check_timeout",
        ),
    ];
    for (config, expected) in cases {
        let (status, stderr, path) = run_with(config);
        assert!(!status.success(), "{config}");
        assert_eq!(stderr.trim().lines().count(), 1, "one message: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "names the file: {stderr}"
        );
        assert!(stderr.contains(expected), "{stderr} lacks {expected}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
    let out = Command::new(example())
        .arg("/nonexistent/config.json")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/config.json: cannot read"));
}

#[test]
fn the_shipped_config_json_is_valid_and_as_documented() {
    let config = Config::load(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config.json")
            .as_path(),
    )
    .unwrap();
    assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
    let ports: Vec<u16> = config.servers.iter().map(|s| s.port()).collect();
    assert_eq!(ports, [9001, 9002, 9003]);
    assert!(config.spawn_backends);
}

/// The contract's "an edit is applied within 2 seconds": every answer meanwhile is a 200,
/// and `backend` answers within 2 s of the write.
async fn applied_within_2_s(client: &mut Client, backend: &str, written: Instant, what: &str) {
    let applied = within(async {
        loop {
            let (status, body) = client.get("/").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if body == backend {
                return written.elapsed();
            }
        }
    })
    .await;
    eprintln!("{what} and answering {applied:?} after the write");
    assert!(
        applied < Duration::from_secs(2),
        "the edit took {applied:?} to apply"
    );
}

/// Replaces the file in one step, as editors do, so that no reader sees it half-written.
fn replace(path: &Path, text: String) {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn demo_config(ports: &[u16], extra: &str) -> String {
    let servers: Vec<String> = ports
        .iter()
        .map(|p| format!(r#"{{"host": "127.0.0.1", "port": {p}}}"#))
        .collect();
    format!(
        r#"{{"listen": "127.0.0.1:0", "servers": [{}], "spawn_backends": true,
            "health_check_interval": 0.5, "health_check_timeout": 0.25{extra}}}"#,
        servers.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_demo_backends_and_applies_edits_live() {
    let dir = tempdir();
    let path = dir.join("config.json");
    let ports = [free_port(), free_port(), free_port()];
    std::fs::write(&path, demo_config(&ports, "")).unwrap();
    let mut proxy = Running::start(&path);
    let addr = proxy.listening();
    for _ in 0..3 {
        proxy.wait_for("backend is healthy");
    }

    // The demo backends take turns, each naming itself.
    let mut client = Client::connect(addr).await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        let (status, body) = client.get("/").await;
        assert_eq!(status, StatusCode::OK);
        seen.push(body);
    }
    let names: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    assert_eq!(seen[..3], names[..]);
    assert_eq!(seen[3..], names[..]);

    // Add a server (its demo backend starts) and remove one (its demo backend stops),
    // within 2 seconds of the write: the new one answers.
    let fourth = free_port();
    let written = Instant::now();
    replace(&path, demo_config(&[ports[1], ports[2], fourth], ""));
    applied_within_2_s(
        &mut client,
        &format!("127.0.0.1:{fourth}"),
        written,
        "demo backend added",
    )
    .await;
    proxy.wait_for("configuration applied");
    proxy.wait_for("backend is healthy");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        seen.insert(client.get("/").await.1);
    }
    let expected: std::collections::HashSet<String> = [ports[1], ports[2], fourth]
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    assert_eq!(seen, expected);
    proxy.wait_for(&format!(
        "demo backend stopped backend=127.0.0.1:{}",
        ports[0]
    ));

    // An invalid edit: logged, and the running configuration stays.
    replace(
        &path,
        demo_config(&[ports[1]], r#", "algorithm": "fastest""#),
    );
    let line = proxy.wait_for("keeping the running configuration");
    assert!(line.contains("algorithm"), "{line}");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        seen.insert(client.get("/").await.1);
    }
    assert_eq!(seen, expected);

    // Algorithm switch: one client sticks to one backend.
    replace(
        &path,
        demo_config(&[ports[1], ports[2], fourth], r#", "algorithm": "hashing""#),
    );
    proxy.wait_for("algorithm=hashing");
    let sticky: std::collections::HashSet<String> = [
        client.get("/").await.1,
        client.get("/").await.1,
        client.get("/").await.1,
    ]
    .into();
    assert_eq!(sticky.len(), 1);

    drop(client);
    assert!(proxy.terminate().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A config for `backends` (spawn_backends off), listening on an ephemeral port.
fn external_config(backends: &[SocketAddr], extra: &str) -> String {
    let servers: Vec<String> = backends
        .iter()
        .map(|b| format!(r#"{{"host": "127.0.0.1", "port": {}}}"#, b.port()))
        .collect();
    format!(
        r#"{{"listen": "127.0.0.1:0", "servers": [{}], "spawn_backends": false{extra}}}"#,
        servers.join(", ")
    )
}

const FAST_CHECKS: &str = r#", "health_check_interval": 0.5, "health_check_timeout": 0.25"#;

/// `signal` while a request is in flight: new connections are refused, the request
/// completes, then the proxy exits 0.
async fn a_signal_refuses_new_connections_and_finishes_requests_in_flight(signal: &str) {
    let backend = Backend::start().await;
    let dir = tempdir();
    let path = dir.join("config.json");
    std::fs::write(&path, external_config(&[backend.addr], FAST_CHECKS)).unwrap();
    let mut proxy = Running::start(&path);
    let addr = proxy.listening();
    proxy.wait_for("backend is healthy");

    let mut client = Client::connect(addr).await;
    let res = client
        .send(Request::get("/hold").body(empty()).unwrap())
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    proxy.signal(signal);
    proxy.wait_for("shutting down");
    within(async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "exited with a request in flight"
    );

    backend.release(1);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"first;last");
    let status = proxy.wait();
    assert_eq!(status.code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_connections_and_finishes_requests_in_flight() {
    a_signal_refuses_new_connections_and_finishes_requests_in_flight("TERM").await;
}

/// Ctrl-C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_refuses_new_connections_and_finishes_requests_in_flight() {
    a_signal_refuses_new_connections_and_finishes_requests_in_flight("INT").await;
}

/// Without an argument, the proxy reads `config.json` in its working directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_defaults_to_config_json_in_the_working_directory() {
    let backend = Backend::start().await;
    let dir = tempdir();
    std::fs::write(
        dir.join("config.json"),
        external_config(&[backend.addr], FAST_CHECKS),
    )
    .unwrap();
    let mut proxy = Running::start_in(&dir);
    let addr = proxy.listening();
    proxy.wait_for("backend is healthy");
    assert_eq!(get(addr, "/").await, (StatusCode::OK, backend.authority()));
    assert_eq!(backend.hits(), 1);
    assert_eq!(proxy.terminate().code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Requests in flight across an edit that removes one backend and keeps another: one
/// waiting for its response head on the removed backend, one streaming its body from the
/// staying one. Both complete. The edit applies (a new backend answers) within the
/// contract's 2 seconds of the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_applies_within_2_s_and_fails_no_request_in_flight() {
    let (a, b, c) = (
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    );
    let dir = tempdir();
    let path = dir.join("config.json");
    std::fs::write(&path, external_config(&[a.addr, b.addr], FAST_CHECKS)).unwrap();
    let mut proxy = Running::start(&path);
    let addr = proxy.listening();
    proxy.wait_for("backend is healthy");
    proxy.wait_for("backend is healthy");

    // A request waiting for its response head, on whichever backend round robin picks.
    let waiting = tokio::spawn(async move {
        let mut client = Client::connect(addr).await;
        client.get("/wait").await
    });
    let on_a = within(async {
        tokio::select! {
            () = a.started() => true,
            () = b.started() => false,
        }
    })
    .await;
    let (removed, staying) = if on_a { (&a, &b) } else { (&b, &a) };
    // The next one goes to the other backend: its head arrives, its body is held.
    let mut streaming = Client::connect(addr).await;
    let res = streaming
        .send(Request::get("/hold").body(empty()).unwrap())
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(staying.hits(), 1);

    // Remove the one with the waiting request, add "c".
    let written = Instant::now();
    replace(&path, external_config(&[staying.addr, c.addr], FAST_CHECKS));
    let mut client = Client::connect(addr).await;
    applied_within_2_s(&mut client, &c.authority(), written, "backend added").await;
    let before = removed.hits();
    for _ in 0..6 {
        assert_eq!(client.get("/").await.0, StatusCode::OK);
    }
    assert_eq!(
        removed.hits(),
        before,
        "a removed backend got a new request"
    );

    // Both requests in flight complete.
    removed.release(1);
    assert_eq!(
        within(waiting).await.unwrap(),
        (StatusCode::OK, removed.authority())
    );
    staying.release(1);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"first;last");
    assert_eq!(proxy.terminate().code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A server added by an edit whose first probe fails takes no request: not while that
/// probe is under way, not after it failed; it takes requests from its first pass on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_backend_failing_its_first_probe_gets_no_traffic() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    b.hold_probes(true);
    b.set_healthy(false);
    let dir = tempdir();
    let path = dir.join("config.json");
    std::fs::write(&path, external_config(&[a.addr], FAST_CHECKS)).unwrap();
    let mut proxy = Running::start(&path);
    let addr = proxy.listening();
    proxy.wait_for("backend is healthy");

    replace(&path, external_config(&[a.addr, b.addr], FAST_CHECKS));
    let mut client = Client::connect(addr).await;
    // Its first probe has arrived and is held: the server is in the set.
    b.wait_probes(1).await;
    for _ in 0..10 {
        assert_eq!(
            client.get("/").await,
            (StatusCode::OK, a.authority()),
            "a request reached the new backend before its first probe passed"
        );
    }
    // It fails (503); the next probe's arrival shows that the result was taken in.
    b.release_probes(1);
    b.wait_probes(2).await;
    for _ in 0..10 {
        assert_eq!(
            client.get("/").await,
            (StatusCode::OK, a.authority()),
            "a request reached the new backend after its first probe failed"
        );
    }
    assert_eq!(b.hits(), 0);

    // It passes: it takes requests.
    b.set_healthy(true);
    b.release_probes(1);
    proxy.wait_for("backend is healthy");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(client.get("/").await.1);
    }
    assert_eq!(seen, [a.authority(), b.authority()].into());
    b.hold_probes(false);
    b.release_probes(1);
    assert_eq!(proxy.terminate().code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// No busy loop: the proxy process uses next to no CPU while no backend is healthy, and
/// while every backend is down (not listening), with a client connection open. Every
/// timeout is 10 s, so the 503s that come at once did not wait for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_with_no_healthy_backend_and_with_every_backend_down() {
    // 10 ticks = 0.1 s of CPU in 1 s. The proxy probes two backends 5 times a second
    // meanwhile; a thread in a busy loop takes 100 ticks (at least 25 on a crowded 2-CPU
    // machine).
    const IDLE: u64 = 10;
    let (a, b) = (Backend::start().await, Backend::start().await);
    let dir = tempdir();
    let path = dir.join("config.json");
    let extra = r#", "health_check_interval": 0.2, "health_check_timeout": 0.1,
        "connect_timeout": 10, "response_timeout": 10"#;
    std::fs::write(&path, external_config(&[a.addr, b.addr], extra)).unwrap();
    let mut proxy = Running::start(&path);
    let addr = proxy.listening();
    proxy.wait_for("backend is healthy");
    proxy.wait_for("backend is healthy");
    let mut client = Client::connect(addr).await;
    let at_once = |took: Duration| assert!(took < Duration::from_secs(1), "503 after {took:?}");

    // Both answer their health checks with 503.
    a.set_healthy(false);
    b.set_healthy(false);
    proxy.wait_for("backend is unhealthy");
    proxy.wait_for("backend is unhealthy");
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(client.get("/").await.0, StatusCode::SERVICE_UNAVAILABLE);
        at_once(started.elapsed());
    }
    let unhealthy = proxy.ticks_over_a_second().await;

    // Healthy again, then both stop listening.
    a.set_healthy(true);
    b.set_healthy(true);
    proxy.wait_for("backend is healthy");
    proxy.wait_for("backend is healthy");
    a.kill();
    b.kill();
    proxy.wait_for("backend is unhealthy");
    proxy.wait_for("backend is unhealthy");
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(client.get("/").await.0, StatusCode::SERVICE_UNAVAILABLE);
        at_once(started.elapsed());
    }
    let down = proxy.ticks_over_a_second().await;
    eprintln!("CPU ticks in 1 s: {unhealthy} with no healthy backend, {down} with all down");
    assert!(
        unhealthy < IDLE,
        "{unhealthy} CPU ticks in 1 s with no healthy backend"
    );
    assert!(
        down < IDLE,
        "{down} CPU ticks in 1 s with every backend down"
    );
    assert!(client.get("/").await.0 == StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(proxy.terminate().code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_validates_and_exits_without_starting() {
    // The listen address is taken: a start would fail to bind, so a 0 here also shows that
    // --check started nothing.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let valid = format!(
        r#"{{"listen": "{}", "servers": [{{"host": "127.0.0.1", "port": 9001}}], "spawn_backends": true}}"#,
        taken.local_addr().unwrap()
    );
    let dir = tempdir();
    let path = dir.join("config.json");
    std::fs::write(&path, &valid).unwrap();
    for args in [vec!["--check".into(), path.clone()], vec!["--check".into()]] {
        let out = Command::new(example())
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert_eq!(stdout.lines().count(), 1, "one line: {stdout}");
        assert!(
            stdout.contains("config.json") && stdout.contains("valid"),
            "{stdout}"
        );
        assert!(stdout.contains("(1 server, round_robin)"), "{stdout}");
        assert!(out.stderr.is_empty(), "{out:?}");
    }

    // Invalid: status 1 and the very message a start prints, on stderr only.
    let invalid = r#"{"servers": [{"host": "127.0.0.1", "port": 70000}]}"#;
    let (start_status, start_stderr, bad) = run_with(invalid);
    assert_eq!(start_status.code(), Some(1));
    let out = Command::new(example())
        .arg("--check")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), start_stderr);
    assert!(start_stderr.contains("servers[0].port"), "{start_stderr}");

    // A typo in the flag is a usage error, not a start with a file named "--chek": a start
    // error, status 1, with the usage on stderr.
    let out = Command::new(example()).arg("--chek").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: unexpected argument \"--chek\"\nusage:"),
        "{stderr}"
    );
    // `--help` is not an error: the usage on stdout, status 0.
    let out = Command::new(example()).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.starts_with(b"usage: standalone"), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(bad.parent().unwrap()).unwrap();
    drop(taken);
}
