//! Where a generation's time goes, by kind of work: `generate --profile`
//! (or `MULTITOKEN_PROFILE=1`) prints the table this module makes.
//!
//! The model's hot paths open a [`scope`] for their kind of work ([`Part`]):
//! every linear layer, the attention core, norms, rotary embeddings, the MLP's
//! activation, the token embedding, sampling. Times are *exclusive*: a scope
//! nested in another (the projections inside attention) pauses its parent, so
//! the parts add up to the time spent in scopes, and the rest of the wall time
//! of a phase is "overhead" (tensor bookkeeping, the KV cache append,
//! detokenising, the loop itself). Scopes are timed on the thread that opens
//! them: the forward pass is driven from one thread and its kernels' worker
//! threads are inside the caller's scope.
//!
//! Off (the default), a scope costs one relaxed atomic load; the counters are
//! process-wide, so profile one generation at a time.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A kind of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Linear layers: the projections and the MLP's matrices.
    Matmul,
    /// The output head (its final norm excluded): the vocabulary-wide product.
    /// SmolLM2's GGUF files keep this tied matrix in Q8_0 whatever the file's
    /// type (30 of the Q4_1 file's 96 MB read per token), so it is a part of
    /// its own rather than hidden in `matmul`.
    Head,
    /// Attention itself: scores, softmax, the weighted sum (projections excluded).
    Attention,
    /// RMSNorm / LayerNorm.
    Norm,
    /// Rotary position embeddings.
    Rope,
    /// The MLP's activation (and gating product).
    Activation,
    /// The token embedding lookup.
    Embedding,
    /// Picking the next token from the logits.
    Sampling,
}

impl Part {
    /// Every part, in report order.
    pub const ALL: [Part; PARTS] = [
        Part::Matmul,
        Part::Head,
        Part::Attention,
        Part::Norm,
        Part::Rope,
        Part::Activation,
        Part::Embedding,
        Part::Sampling,
    ];

    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Part::Matmul => "matmul",
            Part::Head => "head",
            Part::Attention => "attention",
            Part::Norm => "norms",
            Part::Rope => "rope",
            Part::Activation => "activation",
            Part::Embedding => "embedding",
            Part::Sampling => "sampling",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// How many parts there are.
const PARTS: usize = 8;

static NANOS: [AtomicU64; PARTS] = [const { AtomicU64::new(0) }; PARTS];
static CALLS: [AtomicU64; PARTS] = [const { AtomicU64::new(0) }; PARTS];

thread_local! {
    /// Open scopes on this thread: their part, start, and time spent in children.
    static STACK: RefCell<Vec<(Part, Instant, Duration)>> = const { RefCell::new(Vec::new()) };
}

/// Turns the counters on (and clears them).
pub fn enable() {
    reset();
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether scopes are being timed.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Clears the counters.
pub fn reset() {
    for (n, c) in NANOS.iter().zip(&CALLS) {
        n.store(0, Ordering::Relaxed);
        c.store(0, Ordering::Relaxed);
    }
}

/// Times its scope as `part` until dropped (see [`scope`]).
#[derive(Debug)]
pub struct Scope(());

/// Opens a scope of `part`; `None` (free) when profiling is off. A
/// [`Part::Matmul`] scope opened directly inside a [`Part::Head`] one is not
/// timed on its own (`None`), so its time stays the head's: the head is a
/// linear layer, and that layer's own scope must not take the time away from
/// the part that names it.
#[must_use = "the scope is timed until the guard is dropped"]
pub fn scope(part: Part) -> Option<Scope> {
    if !enabled() {
        return None;
    }
    STACK.with(|s| {
        let mut stack = s.borrow_mut();
        let folded = part == Part::Matmul && matches!(stack.last(), Some((Part::Head, ..)));
        (!folded).then(|| {
            stack.push((part, Instant::now(), Duration::ZERO));
            Scope(())
        })
    })
}

impl Drop for Scope {
    fn drop(&mut self) {
        STACK.with(|s| {
            let mut stack = s.borrow_mut();
            if let Some((part, start, children)) = stack.pop() {
                let elapsed = start.elapsed();
                let own = elapsed.saturating_sub(children);
                NANOS[part.index()].fetch_add(own.as_nanos() as u64, Ordering::Relaxed);
                CALLS[part.index()].fetch_add(1, Ordering::Relaxed);
                if let Some(parent) = stack.last_mut() {
                    parent.2 += elapsed;
                }
            }
        });
    }
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    nanos: [u64; PARTS],
    calls: [u64; PARTS],
}

/// The counters now.
pub fn snapshot() -> Snapshot {
    let mut s = Snapshot::default();
    for i in 0..PARTS {
        s.nanos[i] = NANOS[i].load(Ordering::Relaxed);
        s.calls[i] = CALLS[i].load(Ordering::Relaxed);
    }
    s
}

impl Snapshot {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let mut d = Snapshot::default();
        for i in 0..PARTS {
            d.nanos[i] = self.nanos[i].saturating_sub(earlier.nanos[i]);
            d.calls[i] = self.calls[i].saturating_sub(earlier.calls[i]);
        }
        d
    }

    /// Seconds spent in `part`.
    pub fn seconds(&self, part: Part) -> f64 {
        self.nanos[part.index()] as f64 / 1e9
    }

    /// Scopes of `part` closed.
    pub fn calls(&self, part: Part) -> u64 {
        self.calls[part.index()]
    }
}

/// One phase of a generation (the prefill, or the decode steps) as measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase {
    /// Wall time of the phase in seconds.
    pub wall_s: f64,
    /// Tokens it handled (prompt tokens, or decode steps).
    pub tokens: usize,
    /// The parts' times.
    pub parts: Snapshot,
}

impl Phase {
    /// A table: per part its time per token, share of the wall time and calls
    /// per token; then the overhead (wall minus parts) and the total.
    pub fn table(&self, title: &str) -> String {
        let per = |s: f64| s * 1e6 / self.tokens.max(1) as f64;
        let mut out = format!(
            "{title}: {} tokens in {:.1} ms ({:.1} tokens/s)\n{:<12} {:>12} {:>7} {:>12}\n",
            self.tokens,
            self.wall_s * 1e3,
            self.tokens as f64 / self.wall_s.max(1e-12),
            "",
            "µs/token",
            "share",
            "calls/token"
        );
        let mut covered = 0.0;
        for part in Part::ALL {
            let s = self.parts.seconds(part);
            covered += s;
            out.push_str(&format!(
                "{:<12} {:>12.1} {:>6.1}% {:>12.1}\n",
                part.name(),
                per(s),
                100.0 * s / self.wall_s.max(1e-12),
                self.parts.calls(part) as f64 / self.tokens.max(1) as f64
            ));
        }
        let overhead = (self.wall_s - covered).max(0.0);
        out.push_str(&format!(
            "{:<12} {:>12.1} {:>6.1}%\n{:<12} {:>12.1} {:>6.1}%\n",
            "overhead",
            per(overhead),
            100.0 * overhead / self.wall_s.max(1e-12),
            "total",
            per(self.wall_s),
            100.0
        ));
        out
    }
}

static PHASES: std::sync::Mutex<Vec<(String, Phase)>> = std::sync::Mutex::new(Vec::new());

/// Keeps a measured phase for [`take_phases`] (what [`crate::generate`] does
/// when profiling is on).
pub fn record_phase(name: &str, phase: Phase) {
    if let Ok(mut phases) = PHASES.lock() {
        phases.push((name.to_string(), phase));
    }
}

/// The phases recorded since the last call, oldest first.
pub fn take_phases() -> Vec<(String, Phase)> {
    PHASES.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(d: Duration) {
        let t = Instant::now();
        while t.elapsed() < d {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn scopes_are_counted_and_tabled() {
        enable();
        let before = snapshot();
        let outer_start = Instant::now();
        {
            let _outer = scope(Part::Attention);
            spin(Duration::from_millis(5));
            {
                let _inner = scope(Part::Matmul);
                spin(Duration::from_millis(10));
            }
        }
        let outer = outer_start.elapsed().as_secs_f64();
        let d = snapshot().since(&before);
        // A linear layer's own scope inside the head's counts as head time.
        let before_head = snapshot();
        {
            let _head = scope(Part::Head);
            let _linear = scope(Part::Matmul);
            spin(Duration::from_millis(20));
        }
        let h = snapshot().since(&before_head);
        ENABLED.store(false, Ordering::Relaxed);
        // All 20 ms are the head's (lower bounds: another test of this binary
        // that runs a model forward meanwhile opens head scopes too, which
        // made an exact call count fail now and then).
        assert!(h.seconds(Part::Head) >= 0.02 && h.calls(Part::Head) >= 1, "{h:?}");
        assert!(scope(Part::Norm).is_none());
        // Lower bounds only: other tests of this binary may time scopes meanwhile.
        assert!(d.seconds(Part::Attention) >= 0.005 && d.seconds(Part::Matmul) >= 0.01);
        assert!(d.calls(Part::Attention) >= 1 && d.calls(Part::Matmul) >= 1);
        let phase = Phase { wall_s: outer, tokens: 2, parts: d };
        let table = phase.table("decode");
        assert!(table.starts_with("decode: 2 tokens in"), "{table}");
        for name in ["matmul", "head", "attention", "sampling", "overhead", "total"] {
            assert!(table.contains(name), "{name}: {table}");
        }
    }
}
