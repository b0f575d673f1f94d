//! Counters the server keeps, written as Prometheus text at `GET /metrics`: HTTP requests by
//! route and status, generation latency (submission to last token), queue depth, active
//! sequences, generated tokens and decode throughput.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histograms.
const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// A cumulative histogram.
#[derive(Default, Clone)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(BUCKETS) {
            if v <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, b) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Everything `/metrics` reports.
#[derive(Default)]
pub struct Metrics {
    /// `(route, status)` → count.
    pub requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// HTTP latency (until the response head; a stream's body continues after it) per route.
    pub http_latency: Mutex<BTreeMap<String, Histogram>>,
    /// Submission to last token, per finished generation.
    pub generation_latency: Mutex<Histogram>,
    /// Requests queued or generating.
    pub queue_depth: AtomicUsize,
    /// Sequences in the running batch.
    pub active: AtomicUsize,
    /// Tokens generated.
    pub tokens: AtomicU64,
    /// Microseconds the model thread spent in prefill and decode.
    pub busy_us: AtomicU64,
    /// Tokens per second of the last decode step (f64 bits).
    pub last_step_tps: AtomicU64,
    /// Requests rejected because the queue was full.
    pub rejected: AtomicU64,
}

impl Metrics {
    /// Counts an HTTP request.
    pub fn http(&self, route: &str, status: u16, seconds: f64) {
        *self
            .requests
            .lock()
            .unwrap()
            .entry((route.to_string(), status))
            .or_default() += 1;
        self.http_latency
            .lock()
            .unwrap()
            .entry(route.to_string())
            .or_default()
            .observe(seconds);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        o.push_str("# HELP softprompt_requests_total HTTP requests by route and status.\n");
        o.push_str("# TYPE softprompt_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(
                o,
                "softprompt_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        o.push_str("# HELP softprompt_http_seconds Time to the response head, by route.\n");
        o.push_str("# TYPE softprompt_http_seconds histogram\n");
        for (route, h) in self.http_latency.lock().unwrap().iter() {
            h.write(&mut o, "softprompt_http_seconds", &format!("route=\"{route}\""));
        }
        o.push_str("# HELP softprompt_generation_seconds Submission to last token of each generation.\n");
        o.push_str("# TYPE softprompt_generation_seconds histogram\n");
        self.generation_latency
            .lock()
            .unwrap()
            .write(&mut o, "softprompt_generation_seconds", "");
        let gauge = |o: &mut String, name: &str, help: &str, kind: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        gauge(
            &mut o,
            "softprompt_queue_depth",
            "Requests queued or generating.",
            "gauge",
            self.queue_depth.load(Ordering::SeqCst).to_string(),
        );
        gauge(
            &mut o,
            "softprompt_active_sequences",
            "Sequences in the running batch.",
            "gauge",
            self.active.load(Ordering::SeqCst).to_string(),
        );
        gauge(
            &mut o,
            "softprompt_generated_tokens_total",
            "Tokens generated.",
            "counter",
            self.tokens.load(Ordering::SeqCst).to_string(),
        );
        gauge(
            &mut o,
            "softprompt_model_busy_seconds_total",
            "Time the model thread spent computing.",
            "counter",
            (self.busy_us.load(Ordering::SeqCst) as f64 / 1e6).to_string(),
        );
        gauge(
            &mut o,
            "softprompt_tokens_per_second",
            "Tokens per second of the last decode step (all sequences).",
            "gauge",
            f64::from_bits(self.last_step_tps.load(Ordering::SeqCst)).to_string(),
        );
        gauge(
            &mut o,
            "softprompt_rejected_total",
            "Requests refused with 503 because the queue was full.",
            "counter",
            self.rejected.load(Ordering::SeqCst).to_string(),
        );
        o
    }
}
