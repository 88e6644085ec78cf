//! The health-check stream under tokio's paused clock: schedule, thresholds, timeouts, at
//! most one probe in flight, reloads that do not multiply probes, and the feed into a
//! backend set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;
use tower_lb::health::{HealthCheck, Settings, Transition};
use tower_lb::policy::RoundRobin;
use tower_lb::{Backends, BoxError};

/// A probe whose answers the test sets per target, recording every probe it runs.
#[derive(Clone, Default)]
struct Script {
    up: Arc<Mutex<HashMap<&'static str, bool>>>,
    delay: Arc<Mutex<Duration>>,
    log: Arc<Mutex<Vec<(&'static str, Instant)>>>,
    running: Arc<Mutex<HashMap<&'static str, usize>>>,
    max_running: Arc<Mutex<usize>>,
}

impl Script {
    fn set(&self, target: &'static str, up: bool) {
        self.up.lock().unwrap().insert(target, up);
    }

    fn probes(&self, target: &str) -> Vec<Instant> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t == target)
            .map(|(_, at)| *at)
            .collect()
    }

    fn probe(
        &self,
    ) -> impl Fn(
        &&'static str,
    )
        -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send>>
           + Unpin {
        let s = self.clone();
        move |target: &&'static str| {
            let s = s.clone();
            let target = *target;
            Box::pin(async move {
                s.log.lock().unwrap().push((target, Instant::now()));
                {
                    let mut running = s.running.lock().unwrap();
                    let n = running.entry(target).or_default();
                    *n += 1;
                    let mut max = s.max_running.lock().unwrap();
                    *max = (*max).max(*n);
                }
                struct Done(Script, &'static str);
                impl Drop for Done {
                    fn drop(&mut self) {
                        *self.0.running.lock().unwrap().get_mut(self.1).unwrap() -= 1;
                    }
                }
                let _done = Done(s.clone(), target);
                let delay = *s.delay.lock().unwrap();
                tokio::time::sleep(delay).await;
                if s.up.lock().unwrap().get(target).copied().unwrap_or(false) {
                    Ok(())
                } else {
                    Err("down".into())
                }
            })
        }
    }
}

fn settings(interval: u64, timeout: u64, healthy: u32, unhealthy: u32) -> Settings {
    Settings {
        interval: Duration::from_secs(interval),
        timeout: Duration::from_secs(timeout),
        healthy_threshold: healthy,
        unhealthy_threshold: unhealthy,
    }
}

fn flip(target: &'static str, healthy: bool) -> Transition<&'static str> {
    Transition { target, healthy }
}

#[tokio::test(start_paused = true)]
async fn a_new_target_is_probed_at_once_and_healthy_on_its_first_pass() {
    let script = Script::default();
    script.set("a", true);
    let (mut checks, handle) = HealthCheck::new(script.probe(), settings(10, 2, 3, 1));
    let start = Instant::now();
    handle.insert("a");
    // healthy_threshold is 3, but the first pass of a new target is enough (as in Envoy).
    assert_eq!(checks.next().await, Some(flip("a", true)));
    assert_eq!(script.probes("a"), [start]);
}

#[tokio::test(start_paused = true)]
async fn thresholds_count_consecutive_results() {
    let script = Script::default();
    script.set("a", true);
    let (mut checks, handle) = HealthCheck::new(script.probe(), settings(1, 0, 2, 3));
    let mut checks_timeout = settings(1, 0, 2, 3);
    checks_timeout.timeout = Duration::from_millis(500);
    handle.set_settings(checks_timeout);
    handle.insert("a");
    assert_eq!(checks.next().await, Some(flip("a", true)));

    script.set("a", false);
    let went_down = Instant::now();
    assert_eq!(checks.next().await, Some(flip("a", false)));
    // Three consecutive failures, one interval apart (give or take the first offset).
    let failures = script
        .probes("a")
        .into_iter()
        .filter(|at| *at > went_down)
        .count();
    assert_eq!(failures, 3);

    script.set("a", true);
    let went_up = Instant::now();
    assert_eq!(checks.next().await, Some(flip("a", true)));
    let passes = script
        .probes("a")
        .into_iter()
        .filter(|at| *at > went_up)
        .count();
    assert_eq!(passes, 2);
}

#[tokio::test(start_paused = true)]
async fn a_slow_probe_fails_by_timeout_and_never_overlaps() {
    let script = Script::default();
    script.set("a", true);
    let (mut checks, handle) = HealthCheck::new(script.probe(), settings(3, 1, 1, 1));
    handle.insert("a");
    assert_eq!(checks.next().await, Some(flip("a", true)));
    // Answers now take 10 s: longer than the timeout and than the interval.
    *script.delay.lock().unwrap() = Duration::from_secs(10);
    assert_eq!(checks.next().await, Some(flip("a", false)));
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        tokio::select! {
            _ = checks.next() => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }
    assert_eq!(*script.max_running.lock().unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn reloads_do_not_multiply_probes() {
    let script = Script::default();
    script.set("a", true);
    script.set("b", true);
    let (mut checks, handle) = HealthCheck::new(script.probe(), settings(10, 2, 1, 1));
    handle.insert("a");
    handle.insert("b");
    let mut up = vec![checks.next().await.unwrap(), checks.next().await.unwrap()];
    up.sort_by_key(|t| t.target);
    assert_eq!(up, [flip("a", true), flip("b", true)]);

    // A reload re-inserts both and changes the timeout: states and schedules stay.
    handle.insert("a");
    handle.insert("b");
    handle.set_settings(settings(10, 1, 1, 1));
    let start = Instant::now();
    let until = start + Duration::from_secs(100);
    tokio::select! {
        t = checks.next() => panic!("no transition expected, got {t:?}"),
        _ = tokio::time::sleep_until(until) => {}
    }
    for target in ["a", "b"] {
        let n = script
            .probes(target)
            .into_iter()
            .filter(|at| *at > start)
            .count();
        assert!(
            (9..=11).contains(&n),
            "{target}: {n} probes in 10 intervals"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn probes_spread_over_the_interval() {
    let script = Script::default();
    let names = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"];
    for n in names {
        script.set(n, true);
    }
    let (mut checks, handle) = HealthCheck::new(script.probe(), settings(10, 2, 1, 1));
    let start = Instant::now();
    for n in names {
        handle.insert(n);
    }
    for _ in names {
        checks.next().await;
    }
    let until = start + Duration::from_secs(25);
    tokio::select! {
        _ = checks.next() => panic!("no transition expected"),
        _ = tokio::time::sleep_until(until) => {}
    }
    // All first probes at once; the second ones at distinct offsets within the interval.
    let mut second: Vec<Duration> = names.iter().map(|n| script.probes(n)[1] - start).collect();
    second.sort();
    second.dedup();
    assert_eq!(second.len(), names.len(), "{second:?}");
    assert!(
        second
            .iter()
            .all(|d| *d >= Duration::from_secs(5) && *d < Duration::from_secs(10)),
        "{second:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn removed_targets_are_no_longer_probed() {
    let script = Script::default();
    script.set("a", true);
    let (mut checks, handle) = HealthCheck::new(script.probe(), settings(1, 0, 1, 1));
    handle.insert("a");
    assert_eq!(checks.next().await, Some(flip("a", true)));
    handle.remove("a");
    tokio::select! {
        _ = checks.next() => {}
        _ = tokio::time::sleep(Duration::from_millis(10)) => {}
    }
    let removed = Instant::now();
    tokio::select! {
        t = checks.next() => panic!("unexpected {t:?}"),
        _ = tokio::time::sleep(Duration::from_secs(30)) => {}
    }
    assert!(script.probes("a").iter().all(|at| *at <= removed));
    // With the handle gone and no target left, the stream ends.
    drop(handle);
    assert_eq!(checks.next().await, None);
}

#[tokio::test(start_paused = true)]
async fn transitions_drive_a_backend_set() {
    let script = Script::default();
    script.set("a", true);
    script.set("b", false);
    let backends = Backends::<&'static str, (), _>::new(RoundRobin::new());
    backends.healthy_on_insert(false);
    backends.insert("a", ());
    backends.insert("b", ());
    assert_eq!(backends.pick(None), None);

    let (checks, handle) = HealthCheck::new(script.probe(), settings(1, 0, 1, 1));
    handle.insert("a");
    handle.insert("b");
    let driver = tokio::spawn(checks.drive(&backends));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(backends.is_healthy(&"a"), Some(true));
    assert_eq!(backends.is_healthy(&"b"), Some(false));
    script.set("b", true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(backends.is_healthy(&"b"), Some(true));
    script.set("a", false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(backends.is_healthy(&"a"), Some(false));
    assert_eq!(backends.pick(None), Some("b"));
    handle.remove("a");
    handle.remove("b");
    drop(handle);
    driver.await.unwrap();
}

/// A health log line: whether it says healthy, and backend "a"'s state in the backend set
/// when it was written.
type Logged = (bool, Option<bool>);

/// Log output that records a [`Logged`] for each health log line.
#[derive(Clone)]
struct StateAtLog {
    backends: Backends<&'static str, (), RoundRobin>,
    lines: Arc<Mutex<Vec<Logged>>>,
}

impl std::io::Write for StateAtLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = String::from_utf8_lossy(buf);
        for (text, healthy) in [
            ("backend is healthy", true),
            ("backend is unhealthy", false),
        ] {
            if line.contains(text) {
                let state = self.backends.is_healthy(&"a");
                self.lines.lock().unwrap().push((healthy, state));
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_transition_is_logged_once_the_backend_set_has_it() {
    let script = Script::default();
    script.set("a", true);
    let backends = Backends::<&'static str, (), _>::new(RoundRobin::new());
    backends.healthy_on_insert(false);
    backends.insert("a", ());
    let log = StateAtLog {
        backends: backends.clone(),
        lines: Arc::default(),
    };
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let (checks, handle) = HealthCheck::new(script.probe(), settings(1, 0, 1, 1));
    handle.insert("a");
    let driver = tokio::spawn(checks.drive(&backends));
    tokio::time::sleep(Duration::from_millis(1)).await;
    script.set("a", false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    handle.remove("a");
    drop(handle);
    driver.await.unwrap();

    // Someone who reads "backend is healthy" and sends a request finds it in rotation.
    let lines = log.lines.lock().unwrap().clone();
    assert_eq!(lines, [(true, Some(true)), (false, Some(false))]);
}

/// Checks driven on a set hold it weakly: dropping the set (the balancer) ends them, with
/// targets still given and a stream that would otherwise go on probing for good.
#[tokio::test(start_paused = true)]
async fn driven_checks_end_with_the_set() {
    let script = Script::default();
    script.set("a", true);
    let backends = Backends::<&'static str, (), _>::new(RoundRobin::new());
    backends.insert("a", ());
    let (checks, handle) = HealthCheck::new(script.probe(), settings(1, 0, 1, 1));
    handle.insert("a");
    let driver = tokio::spawn(checks.drive(&backends));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(script.probes("a").len(), 2);
    drop(backends);
    tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("the checks outlived the set")
        .unwrap();
    let probed = script.probes("a").len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(script.probes("a").len(), probed);
    drop(handle);
}

/// A set follows one attachment: a second would set health back to its own view each
/// time the first did, without end. Attaching new checks (to replace the probe, say)
/// ends the earlier ones, whose verdicts no longer reach the set.
#[tokio::test(start_paused = true)]
async fn newly_attached_checks_replace_the_earlier_ones() {
    let (down, up) = (Script::default(), Script::default());
    down.set("a", false);
    up.set("a", true);
    let backends = Backends::<&'static str, (), _>::new(RoundRobin::new());
    backends.insert("a", ());
    let (first, _) = HealthCheck::new(down.probe(), settings(1, 0, 1, 1));
    let first = tokio::spawn(first.attach(&backends).drive());
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(backends.is_healthy(&"a"), Some(false));
    let (second, _) = HealthCheck::new(up.probe(), settings(1, 0, 1, 1));
    let _second = tokio::spawn(second.attach(&backends).drive());
    replaced(first, &down, "the earlier checks").await;
    assert_eq!(backends.is_healthy(&"a"), Some(true));
}

/// Waits for `checks`, replaced, to end (within 5 s), and 5 s more, in which `script`
/// (which probes "a") must not probe again.
async fn replaced(checks: tokio::task::JoinHandle<()>, script: &Script, what: &str) {
    tokio::time::timeout(Duration::from_secs(5), checks)
        .await
        .unwrap_or_else(|_| panic!("{what} went on"))
        .unwrap();
    let probed = script.probes("a").len();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(script.probes("a").len(), probed, "{what} still probe");
}

/// Checks driven by hand are a source of the set's health as attached ones are: attaching
/// checks ends driven ones, and driving checks ends attached ones, so that two never set
/// the health back to their own views in turn.
#[tokio::test(start_paused = true)]
async fn driven_and_attached_checks_replace_each_other() {
    let (down, up, b_up) = (Script::default(), Script::default(), Script::default());
    down.set("a", false);
    up.set("a", true);
    b_up.set("b", true);
    let backends = Backends::<&'static str, (), _>::new(RoundRobin::new());
    backends.healthy_on_insert(false);
    backends.insert("a", ());
    backends.insert("b", ());
    let (driven, driven_targets) = HealthCheck::new(down.probe(), settings(1, 0, 1, 1));
    driven_targets.insert("a");
    let driven = tokio::spawn(driven.drive(&backends));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(!down.probes("a").is_empty(), "the driven checks probe");

    // Attached checks that find "a" up (and "b", unknown to their script, down).
    let (attached, _) = HealthCheck::new(up.probe(), settings(1, 0, 1, 1));
    let attached = tokio::spawn(attached.attach(&backends).drive());
    replaced(driven, &down, "the driven checks").await;
    assert_eq!(backends.is_healthy(&"a"), Some(true));

    // Checks driven by hand that find "b" up: their verdict reaches the set, and the
    // attached checks end.
    let (again, again_targets) = HealthCheck::new(b_up.probe(), settings(1, 0, 1, 1));
    again_targets.insert("b");
    let _again = tokio::spawn(again.drive(&backends));
    replaced(attached, &up, "the attached checks").await;
    assert_eq!(backends.is_healthy(&"b"), Some(true));
    drop((driven_targets, again_targets));
}

/// A zero interval is taken as the shortest one, 1 ms: the checks probe on a schedule
/// and yield, instead of spinning on a target whose probe is still running.
#[tokio::test(start_paused = true)]
async fn a_zero_interval_does_not_spin() {
    let script = Script::default();
    script.set("a", true);
    *script.delay.lock().unwrap() = Duration::from_millis(10);
    let (mut checks, handle) = HealthCheck::new(script.probe(), settings(0, 1, 1, 1));
    handle.insert("a");
    // The first probe's verdict, then no transition while "a" stays up; the stream must
    // give the runtime back for the timer to fire at all.
    assert_eq!(checks.next().await, Some(flip("a", true)));
    let quiet = tokio::time::timeout(Duration::from_millis(50), checks.next()).await;
    assert!(quiet.is_err());
    let probes = script.probes("a").len();
    assert!((3..=6).contains(&probes), "{probes} probes in 60 ms");
}
