//! Counters, gauges and histograms for `GET /metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A cumulative histogram of durations.
#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter()) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
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

/// The server's metrics, shared by the routes and the scheduler.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    first_token: Mutex<Histogram>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    disconnects: AtomicU64,
    preparations_abandoned: AtomicU64,
    queue_depth: AtomicI64,
    running: AtomicI64,
    connections: AtomicI64,
}

impl Metrics {
    /// Records a finished request of `route` with its status and latency.
    pub fn record_request(&self, route: &str, status: u16, latency: Duration) {
        if let Ok(mut map) = self.requests.lock() {
            *map.entry((route.to_string(), status)).or_default() += 1;
        }
        if let Ok(mut map) = self.latency.lock() {
            map.entry(route.to_string()).or_default().observe(latency.as_secs_f64());
        }
    }

    /// Records the time from admission to a sequence's first token.
    pub fn record_first_token(&self, latency: Duration) {
        if let Ok(mut h) = self.first_token.lock() {
            h.observe(latency.as_secs_f64());
        }
    }

    /// Adds prompt positions prefilled.
    pub fn add_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Adds generated tokens.
    pub fn add_generated_tokens(&self, n: usize) {
        self.generated_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a client that went away before its answer was complete.
    pub fn add_disconnect(&self) {
        self.disconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request's preparation stopped early (client gone or deadline passed).
    pub fn add_preparation_abandoned(&self) {
        self.preparations_abandoned.fetch_add(1, Ordering::Relaxed);
    }

    /// Changes the number of requests waiting for a batch slot.
    pub fn add_queued(&self, delta: i64) {
        self.queue_depth.fetch_add(delta, Ordering::Relaxed);
    }

    /// Requests waiting for a batch slot now.
    pub fn queue_depth(&self) -> i64 {
        self.queue_depth.load(Ordering::Relaxed)
    }

    /// Changes the number of open client connections.
    pub fn add_connections(&self, delta: i64) {
        self.connections.fetch_add(delta, Ordering::Relaxed);
    }

    /// Sets the number of sequences in the running batch.
    pub fn set_running(&self, n: usize) {
        self.running.store(n as i64, Ordering::Relaxed);
    }

    /// Tokens generated since start.
    pub fn generated_tokens(&self) -> u64 {
        self.generated_tokens.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP multitoken_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE multitoken_requests_total counter\n");
        if let Ok(map) = self.requests.lock() {
            for ((route, status), count) in map.iter() {
                let _ = writeln!(
                    out,
                    "multitoken_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}"
                );
            }
        }
        out.push_str(
            "# HELP multitoken_request_duration_seconds Time to the response head (streams: to the first byte).\n",
        );
        out.push_str("# TYPE multitoken_request_duration_seconds histogram\n");
        if let Ok(map) = self.latency.lock() {
            for (route, h) in map.iter() {
                h.render(
                    &mut out,
                    "multitoken_request_duration_seconds",
                    &format!("route=\"{route}\""),
                );
            }
        }
        out.push_str("# HELP multitoken_time_to_first_token_seconds From admission to the first generated token.\n");
        out.push_str("# TYPE multitoken_time_to_first_token_seconds histogram\n");
        if let Ok(h) = self.first_token.lock() {
            h.render(&mut out, "multitoken_time_to_first_token_seconds", "");
        }
        let counters = [
            (
                "multitoken_prompt_tokens_total",
                "Prompt positions prefilled.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "multitoken_generated_tokens_total",
                "Tokens generated.",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
            (
                "multitoken_client_disconnects_total",
                "Clients gone before their answer was complete.",
                self.disconnects.load(Ordering::Relaxed),
            ),
            (
                "multitoken_preparations_abandoned_total",
                "Request preparations stopped early because the client went away or the deadline passed.",
                self.preparations_abandoned.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        let gauges = [
            (
                "multitoken_queue_depth",
                "Requests waiting for a batch slot.",
                self.queue_depth.load(Ordering::Relaxed),
            ),
            (
                "multitoken_running_sequences",
                "Sequences in the decoding batch.",
                self.running.load(Ordering::Relaxed),
            ),
            (
                "multitoken_open_connections",
                "Client connections open (at most --max-connections).",
                self.connections.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        out
    }
}
