//! An embedder's own `metrics` recorder sees the proxy's counters, under the contract's names.
//! (A test binary of its own: the recorder is process-wide.)

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::StatusCode;
use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};
use support::*;

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

/// Keeps every handle it hands out, by `name{label=value,...}`.
#[derive(Default, Clone)]
struct Recorder {
    counters: Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>,
    gauges: Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>,
    histograms: Arc<Mutex<HashMap<String, Arc<Samples>>>>,
}

fn name(key: &Key) -> String {
    let labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
        .collect();
    if labels.is_empty() {
        key.name().to_owned()
    } else {
        format!("{}{{{}}}", key.name(), labels.join(","))
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut c = self.counters.lock().unwrap();
        Counter::from_arc(c.entry(name(key)).or_default().clone())
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let mut g = self.gauges.lock().unwrap();
        Gauge::from_arc(g.entry(name(key)).or_default().clone())
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut h = self.histograms.lock().unwrap();
        Histogram::from_arc(h.entry(name(key)).or_default().clone())
    }
}

impl Recorder {
    fn counter(&self, series: &str) -> u64 {
        let c = self.counters.lock().unwrap();
        c.get(series)
            .unwrap_or_else(|| panic!("no {series} in {:?}", c.keys().collect::<Vec<_>>()))
            .load(Ordering::Relaxed)
    }

    fn gauge(&self, series: &str) -> f64 {
        let g = self.gauges.lock().unwrap();
        f64::from_bits(g.get(series).expect(series).load(Ordering::Relaxed))
    }

    fn samples(&self, series: &str) -> Vec<f64> {
        let h = self.histograms.lock().unwrap();
        let samples = h.get(series).expect(series).0.lock().unwrap().clone();
        samples
    }
}

#[tokio::test]
async fn an_installed_recorder_sees_every_backend() {
    let recorder = Recorder::default();
    metrics::set_global_recorder(recorder.clone()).expect("first recorder");

    let (a, b) = (Backend::start().await, Backend::start().await);
    let proxy = proxy(config(&[a.addr, b.addr], "")).await;
    let mut client = Client::connect(proxy.local_addr()).await;
    for _ in 0..4 {
        assert_eq!(client.get("/").await.0, StatusCode::OK);
    }
    assert_eq!(client.get("/missing").await.0, StatusCode::NOT_FOUND);
    nothing_in_flight(&proxy).await;

    for backend in [&a, &b] {
        let label = format!("backend=\"{}\"", backend.addr);
        let ok = backend.paths().iter().filter(|p| *p == "/").count() as u64;
        let missing = backend.paths().len() as u64 - ok;
        assert_eq!(
            recorder.counter(&format!("tower_lb_requests_total{{{label},class=\"2xx\"}}")),
            ok
        );
        assert_eq!(
            recorder.counter(&format!("tower_lb_requests_total{{{label},class=\"4xx\"}}")),
            missing
        );
        let samples = recorder.samples(&format!("tower_lb_request_duration_seconds{{{label}}}"));
        assert_eq!(samples.len() as u64, ok + missing);
        assert!(samples.iter().all(|s| *s > 0.0 && *s < 10.0), "{samples:?}");
        assert_eq!(
            recorder.gauge(&format!("tower_lb_backend_in_flight{{{label}}}")),
            0.0
        );
        assert_eq!(
            recorder.gauge(&format!("tower_lb_backend_up{{{label}}}")),
            1.0
        );
        assert!(
            recorder.counter(&format!(
                "tower_lb_health_checks_total{{{label},result=\"pass\"}}"
            )) >= 1
        );
    }

    // No healthy backend: a local 503 and both down.
    a.set_healthy(false);
    b.set_healthy(false);
    wait_health(&proxy, &a, false).await;
    wait_health(&proxy, &b, false).await;
    assert_eq!(client.get("/").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        recorder.counter("tower_lb_local_responses_total{status=\"503\"}"),
        1
    );
    assert_eq!(
        recorder.gauge(&format!("tower_lb_backend_up{{backend=\"{}\"}}", a.addr)),
        0.0
    );
    assert!(recorder.gauge("tower_lb_client_connections") >= 1.0);
    proxy.shutdown().await.unwrap();
}
