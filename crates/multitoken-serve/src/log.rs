//! One log line per request, through `tracing` at info level (target
//! `multitoken_serve::request`), and the small subscriber `multitoken serve`
//! prints them with.
//!
//! ```text
//! INFO multitoken_serve::request: method=POST path=/generate status=200 tokens=31+4 time_ms=212.4
//! ```
//!
//! `tokens` is prompt + completion for the answers that know them when their
//! head is sent (`/generate`, non-streamed chat completions), `-` otherwise
//! (streams, errors, other routes); `time_ms` runs to the response head.
//! A program that embeds the server can install any `tracing` subscriber
//! instead (`tracing-subscriber`'s `fmt`, ...): the line is an ordinary event.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// The target of the per-request line.
pub const REQUEST_TARGET: &str = "multitoken_serve::request";

/// Token counts of an answer, put in the response's extensions by the handler
/// so that the request log can show them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCounts {
    /// Prompt positions (placeholders included).
    pub prompt: usize,
    /// Generated tokens.
    pub completion: usize,
}

/// Logs the request line (see the module docs).
pub fn request_line(method: &str, path: &str, status: u16, tokens: Option<TokenCounts>, elapsed: Duration) {
    let tokens = tokens.map_or_else(|| "-".to_string(), |t| format!("{}+{}", t.prompt, t.completion));
    let time_ms = format!("{:.1}", elapsed.as_secs_f64() * 1e3);
    tracing::info!(target: REQUEST_TARGET, method, path, status, tokens = tokens.as_str(), time_ms = time_ms.as_str());
}

/// A minimal `tracing` subscriber: every event at `INFO` or above from the
/// `multitoken*` crates (and `WARN` or above from the others) becomes one line
/// `LEVEL target: message key=value ...` handed to a sink. Spans are ignored.
/// (`tracing-subscriber` would do; this is enough for one line per request and
/// adds no dependency.)
pub struct LineSubscriber {
    sink: Box<dyn Fn(String) + Send + Sync>,
    next_span: AtomicU64,
}

impl std::fmt::Debug for LineSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineSubscriber").finish_non_exhaustive()
    }
}

impl LineSubscriber {
    /// Lines go to `sink`.
    pub fn new(sink: impl Fn(String) + Send + Sync + 'static) -> Self {
        Self { sink: Box::new(sink), next_span: AtomicU64::new(1) }
    }

    /// Lines go to stderr.
    pub fn stderr() -> Self {
        Self::new(|line| eprintln!("{line}"))
    }
}

/// Collects an event's message and fields as `message key=value ...`.
struct Line(String, String);

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.1, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.1, " {}={value:?}", field.name());
        }
    }
}

impl Subscriber for LineSubscriber {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let limit = if metadata.target().starts_with("multitoken") { Level::INFO } else { Level::WARN };
        *metadata.level() <= limit
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = Line(String::new(), String::new());
        event.record(&mut line);
        let metadata = event.metadata();
        let fields = if line.0.is_empty() { line.1.trim_start() } else { line.1.as_str() };
        (self.sink)(format!("{} {}: {}{fields}", metadata.level(), metadata.target(), line.0));
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Installs [`LineSubscriber::stderr`] as the process's subscriber unless one is
/// already set (a program embedding the server keeps its own).
pub fn init_stderr() {
    let _ = tracing::subscriber::set_global_default(LineSubscriber::stderr());
}
