//! Continuous batching: one thread owns the LM and runs every running
//! sequence in one forward per step.
//!
//! Where the model runs ragged steps ([`LanguageModel::runs_ragged`]: our
//! decoder LMs on the CPU with f32 or quantized linears), a step is one forward over every decoding
//! sequence's next token *and* chunks of the prompts waiting to start
//! (chunked prefill, [`LanguageModel::forward_ragged`]): beside decoding
//! sequences at most [`PREFILL_ROWS_BESIDE_DECODING`] prompt positions join a
//! step (half of them for the prompt waiting longest, the rest shortest
//! remaining prompt first), so a burst of new requests neither
//! stalls the running streams nor waits behind one long prompt, and several
//! new prompts share one forward. Every row of a ragged step is computed as it
//! would be alone, so a request gets the same tokens whatever runs beside it
//! and however its prompt is split. Each sequence keeps its own [`KvCache`]
//! (the batch is ragged, nothing is padded or copied when a sequence joins or
//! leaves; its prompt's keys go straight into a growable buffer).
//!
//! Other models (bf16 linears, M-RoPE, other dtypes, models outside this
//! workspace) take
//! the whole-prompt path: a new request is prefilled alone, at most
//! [`PREFILL_TOKENS_PER_STEP`] prompt positions between two decode steps (at
//! least one prompt), then joins [`LanguageModel::decode_step`], whose rows
//! equal one-at-a-time decoding bit for bit. A finished sequence, or one whose
//! client went away, leaves at the end of its step with its cache.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use multitoken_core::{KvCache, LanguageModel, LogitsSelection};
use multitoken_lm::generate::{FinishReason, GenerationParams};
use multitoken_lm::sampling::{sample_rows, SampleRow, Sampler};
use tokio::sync::mpsc::UnboundedSender;

use crate::detok::Detokenizer;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// What a request hears from the scheduler.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New final text.
    Text(String),
    /// Generation ended.
    Done(Finished),
    /// Generation failed.
    Error(String),
}

/// How a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finished {
    /// Why it ended.
    pub reason: FinishReason,
    /// Prompt positions (placeholders included).
    pub prompt_tokens: usize,
    /// Tokens generated (an EOS that ended it included).
    pub completion_tokens: usize,
}

/// A prepared request waiting for a slot.
pub struct Job {
    /// Prompt embeddings `[1, t, hidden]`, items spliced in.
    pub embeds: Tensor,
    /// The ids behind them (for the repetition penalty).
    pub prompt_ids: Vec<u32>,
    /// `[3, 1, t]` multimodal rotary positions of the prompt (Qwen2-VL's
    /// M-RoPE, [`multitoken_lm::multimodal::MultimodalModel::positions`]);
    /// `None`: plain positions.
    pub positions: Option<Tensor>,
    /// Sampling, stop strings, EOS ids, token budget.
    pub params: GenerationParams,
    /// Where text and the end go; a closed channel frees the slot.
    pub events: UnboundedSender<Event>,
    /// When the request's time is up (it ends with `length`).
    pub deadline: Instant,
}

/// The handle requests submit jobs through; dropping every handle stops the
/// scheduler once its running sequences are done.
#[derive(Clone)]
pub struct Scheduler {
    jobs: Sender<Job>,
    metrics: Arc<Metrics>,
    max_queue: usize,
    closing: Arc<AtomicBool>,
}

impl Scheduler {
    /// Starts the scheduler thread for `model`.
    pub fn start(
        model: Arc<dyn LanguageModel>,
        tokenizer: tokenizers::Tokenizer,
        metrics: Arc<Metrics>,
        max_batch: usize,
        max_queue: usize,
    ) -> Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel();
        let worker = Worker {
            ragged: model.runs_ragged(),
            model,
            tokenizer,
            metrics: metrics.clone(),
            max_batch: max_batch.max(1),
        };
        std::thread::Builder::new()
            .name("multitoken-scheduler".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| Error::Startup(format!("starting the scheduler thread: {e}")))?;
        Ok(Self {
            jobs,
            metrics,
            max_queue,
            closing: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Queues a job; a 429 when the queue is full, a 503 once shutting down.
    pub fn submit(&self, job: Job) -> Result<()> {
        if self.closing.load(Ordering::Relaxed) {
            return Err(Error::ShuttingDown);
        }
        if self.metrics.queue_depth() >= self.max_queue as i64 {
            return Err(Error::Overloaded(format!(
                "{} requests are already waiting",
                self.max_queue
            )));
        }
        self.metrics.add_queued(1);
        self.jobs.send(job).map_err(|_| {
            self.metrics.add_queued(-1);
            Error::ShuttingDown
        })
    }

    /// Refuses new jobs from now on (graceful shutdown); running ones finish.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }
}

/// One running sequence.
struct Row {
    sampler: Sampler,
    detok: Detokenizer,
    params: GenerationParams,
    events: UnboundedSender<Event>,
    deadline: Instant,
    /// Prompt ids then generated ids (repetition penalty).
    seen: Vec<u32>,
    generated: Vec<u32>,
    prompt_len: usize,
    /// This sequence's own KV cache: the batch is ragged, never padded or
    /// copied into a shared tensor.
    cache: KvCache,
    /// The prompt positions still to run through ragged steps; `None` once
    /// the prompt is in the cache (the row is decoding).
    prompt: Option<PendingPrompt>,
    /// When the request was queued (time to first token).
    queued: Instant,
}

/// A prompt being prefilled in chunks.
struct PendingPrompt {
    /// `[1, t, hidden]`, items spliced in.
    embeds: Tensor,
    /// Positions already in the cache.
    done: usize,
}

/// What happened to a row after a token.
enum Outcome {
    Running,
    Finished,
}

/// Prompt positions prefilled between two decode steps (beyond the first
/// prompt, which always goes): a burst of new requests is admitted over a few
/// steps instead of holding every running stream while all of them prefill.
const PREFILL_TOKENS_PER_STEP: usize = 256;

/// Prompt positions a ragged step takes beside decoding sequences: each adds
/// about what a decoding row costs, so this bounds how much a burst of new
/// prompts slows the running streams' steps, while new prompts still share
/// their forwards.
const PREFILL_ROWS_BESIDE_DECODING: usize = 64;

/// Prompt positions a ragged step takes when nothing is decoding (a long
/// prompt runs in chunks of this many).
const PREFILL_ROWS_ALONE: usize = 512;

/// How many positions of each waiting prompt a ragged step runs, given each
/// row's `(prompt positions still to run, when it was queued)` (0 for a
/// decoding row) and the step's `budget`: the prompt waiting longest gets up
/// to half the budget first, so a long prompt moves on while short ones keep
/// arriving; then the shortest remaining prompts first (the lowest mean time
/// to first token); then the oldest again with what is left.
fn allot(prompts: &[(usize, Instant)], mut budget: usize) -> Vec<usize> {
    let mut counts = vec![0; prompts.len()];
    let mut waiting: Vec<usize> = (0..prompts.len()).filter(|&i| prompts[i].0 > 0).collect();
    if let Some(oldest) = waiting.iter().copied().min_by_key(|&i| prompts[i].1) {
        let take = prompts[oldest].0.min((budget / 2).max(1)).min(budget);
        counts[oldest] = take;
        budget -= take;
    }
    waiting.sort_by_key(|&i| prompts[i].0);
    for &i in &waiting {
        let take = (prompts[i].0 - counts[i]).min(budget);
        counts[i] += take;
        budget -= take;
    }
    counts
}

struct Worker {
    model: Arc<dyn LanguageModel>,
    /// The model runs ragged steps (chunked prefill beside decoding).
    ragged: bool,
    tokenizer: tokenizers::Tokenizer,
    metrics: Arc<Metrics>,
    max_batch: usize,
}

impl Worker {
    fn run(self, jobs: Receiver<Job>) {
        let mut rows: Vec<Row> = Vec::new();
        let mut waiting: VecDeque<(Job, Instant)> = VecDeque::new();
        let mut open = true;
        loop {
            if rows.is_empty() && waiting.is_empty() {
                if !open {
                    return;
                }
                match jobs.recv() {
                    Ok(job) => waiting.push_back((job, Instant::now())),
                    Err(_) => return,
                }
            }
            while open {
                match jobs.try_recv() {
                    Ok(job) => waiting.push_back((job, Instant::now())),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            // Admit in arrival order: into ragged steps as free slots allow
            // (their prompts run in the steps' chunks), else prefilled whole
            // within the step's prefill budget.
            let mut budget = PREFILL_TOKENS_PER_STEP;
            let mut admitted = 0;
            while rows.len() < self.max_batch {
                let Some((job, _)) = waiting.front() else { break };
                let ragged = self.ragged && job.positions.is_none();
                let len = job.embeds.dim(1).unwrap_or(0);
                if !ragged && admitted > 0 && len > budget {
                    break;
                }
                if !ragged {
                    budget = budget.saturating_sub(len);
                    admitted += 1;
                }
                if let Some((job, queued)) = waiting.pop_front() {
                    if ragged {
                        self.enqueue(job, queued, &mut rows);
                    } else {
                        self.admit(job, queued, &mut rows);
                    }
                }
            }
            self.metrics.set_running(rows.len());
            if rows.is_empty() {
                continue;
            }
            let stepped = if self.ragged { self.step_ragged(&mut rows) } else { self.step(&mut rows) };
            if let Err(e) = stepped {
                for row in rows.drain(..) {
                    let _ = row.events.send(Event::Error(format!("decoding failed: {e}")));
                }
            }
            self.metrics.set_running(rows.len());
        }
    }

    /// Prefills a job alone, takes its first token, and joins it to the batch.
    fn admit(&self, job: Job, queued: Instant, rows: &mut Vec<Row>) {
        let Some((mut row, embeds, positions)) = self.take(job, queued) else { return };
        match self.prefill(&mut row, &embeds, positions.as_ref()) {
            Ok(outcome) => {
                self.metrics.record_first_token(queued.elapsed());
                if matches!(outcome, Outcome::Running) {
                    rows.push(row);
                }
            }
            Err(e) => {
                let _ = row.events.send(Event::Error(e.to_string()));
            }
        }
    }

    /// Takes a job into the batch with its prompt still to run (ragged
    /// steps); it gets its first token from the step that runs the prompt's
    /// last chunk.
    fn enqueue(&self, job: Job, queued: Instant, rows: &mut Vec<Row>) {
        if let Some((mut row, embeds, _)) = self.take(job, queued) {
            row.prompt = Some(PendingPrompt { embeds, done: 0 });
            rows.push(row);
        }
    }

    /// Takes `job` off the queue: its row (prompt checked against the
    /// context, sampler made, prompt tokens counted) with the job's prompt
    /// embeddings and explicit positions. `None` when nothing is left to run:
    /// the client is gone, the job is bad (the client hears why), or it wants
    /// no tokens (it ends here).
    fn take(&self, job: Job, queued: Instant) -> Option<(Row, Tensor, Option<Tensor>)> {
        self.metrics.add_queued(-1);
        if job.events.is_closed() {
            self.metrics.add_disconnect();
            return None;
        }
        let events = job.events.clone();
        let (mut row, embeds, positions) = match self.row_for(job, queued) {
            Ok(parts) => parts,
            Err(e) => {
                let _ = events.send(Event::Error(e.to_string()));
                return None;
            }
        };
        self.metrics.add_prompt_tokens(row.prompt_len);
        if row.params.max_new_tokens == 0 {
            self.metrics.record_first_token(queued.elapsed());
            self.finish(&mut row, FinishReason::Length);
            return None;
        }
        Some((row, embeds, positions))
    }

    /// A row for `job` (its prompt checked against the context, its sampler
    /// made), and the job's prompt embeddings and explicit positions.
    fn row_for(&self, job: Job, queued: Instant) -> Result<(Row, Tensor, Option<Tensor>)> {
        let (_, prompt_len, _) = job.embeds.dims3()?;
        let max_context = self.model.max_context();
        if prompt_len == 0 || prompt_len >= max_context {
            return Err(Error::bad_request(format!(
                "the prompt has {prompt_len} tokens; the model's context holds {max_context}"
            )));
        }
        let row = Row {
            sampler: Sampler::new(job.params.sampling.clone())?,
            detok: Detokenizer::new(job.params.stop_strings.clone()),
            params: job.params,
            events: job.events,
            deadline: job.deadline,
            seen: job.prompt_ids,
            generated: Vec::new(),
            prompt_len,
            cache: KvCache::new(self.model.num_layers()),
            prompt: None,
            queued,
        };
        Ok((row, job.embeds, job.positions))
    }

    /// The whole prompt's forward and the first token.
    fn prefill(&self, row: &mut Row, embeds: &Tensor, positions: Option<&Tensor>) -> Result<Outcome> {
        let logits = self.model.forward_embeds_at(embeds, None, &mut row.cache, LogitsSelection::Last, positions)?;
        let mut logits = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let token = row.sampler.sample(&mut logits, &row.seen)?;
        self.accept(row, token)
    }

    /// One ragged forward: every decoding row's next token and chunks of the
    /// waiting prompts (at most [`PREFILL_ROWS_BESIDE_DECODING`] positions
    /// beside decoding rows: up to half for the oldest prompt, the rest
    /// shortest remaining first); then
    /// a token for every decoding row and every prompt that ended.
    fn step_ragged(&self, rows: &mut Vec<Row>) -> Result<()> {
        // A prompt whose client left or whose time is up goes before running.
        let now = Instant::now();
        rows.retain_mut(|row| {
            if row.prompt.is_none() {
                return true;
            }
            if row.events.is_closed() {
                self.metrics.add_disconnect();
                return false;
            }
            if now >= row.deadline {
                self.metrics.record_first_token(row.queued.elapsed());
                self.finish(row, FinishReason::Length);
                return false;
            }
            true
        });
        if rows.is_empty() {
            return Ok(());
        }
        let decoding = rows.iter().filter(|r| r.prompt.is_none()).count();
        let budget = if decoding == 0 { PREFILL_ROWS_ALONE } else { PREFILL_ROWS_BESIDE_DECODING };
        let prompts: Vec<(usize, Instant)> =
            rows.iter().map(|r| (r.prompt.as_ref().map_or(0, |p| r.prompt_len - p.done), r.queued)).collect();
        let chunks = allot(&prompts, budget);
        let counts: Vec<usize> = rows.iter().zip(&chunks).map(|(r, &c)| if r.prompt.is_none() { 1 } else { c }).collect();

        // The step's rows, sequence by sequence in row order.
        let last: Vec<u32> = rows
            .iter()
            .filter(|r| r.prompt.is_none())
            .map(|r| r.generated.last().copied().unwrap_or(0))
            .collect();
        let decode_embeds = if last.is_empty() {
            None
        } else {
            let n = last.len();
            Some(self.model.embed_tokens(&Tensor::from_vec(last, (n, 1), self.model.device())?)?)
        };
        let hidden = self.model.hidden_size();
        let mut pieces = Vec::new();
        let mut decode_index = 0;
        let mut wants = Vec::new();
        for (row, &c) in rows.iter().zip(&counts) {
            if c == 0 {
                continue;
            }
            match (&row.prompt, &decode_embeds) {
                (Some(p), _) => {
                    pieces.push(p.embeds.narrow(1, p.done, c)?.reshape((c, 1, hidden))?);
                    wants.push(p.done + c == row.prompt_len);
                }
                (None, Some(d)) => {
                    pieces.push(d.narrow(0, decode_index, 1)?);
                    decode_index += 1;
                    wants.push(true);
                }
                (None, None) => return Err(Error::Internal("a decoding row without its token".into())),
            }
        }
        let embeds = Tensor::cat(&pieces, 0)?;
        let step_counts: Vec<usize> = counts.iter().copied().filter(|&c| c > 0).collect();
        let logits = {
            let mut caches: Vec<&mut KvCache> =
                rows.iter_mut().zip(&counts).filter(|(_, &c)| c > 0).map(|(r, _)| &mut r.cache).collect();
            self.model.forward_ragged(&embeds, &step_counts, &mut caches, &wants)?
        };
        let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;

        // Prompts advance; rows with logits draw a token.
        let mut takes_token = vec![false; rows.len()];
        for ((row, &c), takes) in rows.iter_mut().zip(&counts).zip(takes_token.iter_mut()) {
            if c == 0 {
                continue;
            }
            *takes = match &mut row.prompt {
                Some(p) => {
                    p.done += c;
                    p.done == row.prompt_len
                }
                None => true,
            };
        }
        let draws = sample_rows(
            rows.iter_mut()
                .zip(&takes_token)
                .filter(|(_, &t)| t)
                .zip(logits)
                .map(|((row, _), logits)| SampleRow { sampler: &mut row.sampler, logits, previous: &row.seen })
                .collect(),
        );
        let mut draws = draws.into_iter();
        let mut outcomes = Vec::with_capacity(rows.len());
        for (row, &takes) in rows.iter_mut().zip(&takes_token) {
            if !takes {
                outcomes.push(Outcome::Running);
                continue;
            }
            let token = draws.next().ok_or_else(|| Error::Internal("a ragged step returned too few logits".into()))??;
            if row.prompt.take().is_some() {
                self.metrics.record_first_token(row.queued.elapsed());
            }
            outcomes.push(self.accept(row, token)?);
        }
        let mut outcomes = outcomes.into_iter();
        rows.retain(|_| matches!(outcomes.next(), Some(Outcome::Running)));
        Ok(())
    }

    /// One decode forward for every row (each with its own cache); finished
    /// rows leave the batch, dropping their caches.
    fn step(&self, rows: &mut Vec<Row>) -> Result<()> {
        let last: Vec<u32> = rows.iter().map(|r| r.generated.last().copied().unwrap_or(0)).collect();
        let ids = Tensor::from_vec(last, (rows.len(), 1), self.model.device())?;
        let embeds = self.model.embed_tokens(&ids)?;
        let logits = {
            let mut caches: Vec<&mut KvCache> = rows.iter_mut().map(|r| &mut r.cache).collect();
            self.model.decode_step(&embeds, &mut caches)?
        };
        let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        // Draws over the pool (each row's own sampler), then each token taken
        // in row order on this thread (detokenizing, streaming).
        let draws = sample_rows(
            rows.iter_mut()
                .zip(logits)
                .map(|(row, logits)| SampleRow { sampler: &mut row.sampler, logits, previous: &row.seen })
                .collect(),
        );
        let mut outcomes = Vec::with_capacity(rows.len());
        for (row, token) in rows.iter_mut().zip(draws) {
            outcomes.push(self.accept(row, token?)?);
        }
        let mut outcomes = outcomes.into_iter();
        rows.retain(|_| matches!(outcomes.next(), Some(Outcome::Running)));
        Ok(())
    }

    /// Takes a new token: streams its text, decides whether the row goes on.
    fn accept(&self, row: &mut Row, token: u32) -> Result<Outcome> {
        row.generated.push(token);
        row.seen.push(token);
        self.metrics.add_generated_tokens(1);
        if !row.params.ignore_eos && row.params.eos_token_ids.contains(&token) {
            return Ok(self.finish(row, FinishReason::Eos));
        }
        let (piece, stopped) = row.detok.push(&self.tokenizer, &row.generated)?;
        if !piece.is_empty() && row.events.send(Event::Text(piece)).is_err() {
            self.metrics.add_disconnect();
            return Ok(Outcome::Finished);
        }
        if stopped {
            return Ok(self.finish(row, FinishReason::Stop));
        }
        if row.events.is_closed() {
            self.metrics.add_disconnect();
            return Ok(Outcome::Finished);
        }
        let full = row.prompt_len + row.generated.len() + 1 >= self.model.max_context();
        if row.generated.len() >= row.params.max_new_tokens || full || Instant::now() >= row.deadline {
            return Ok(self.finish(row, FinishReason::Length));
        }
        Ok(Outcome::Running)
    }

    fn finish(&self, row: &mut Row, reason: FinishReason) -> Outcome {
        if reason != FinishReason::Stop {
            let rest = row.detok.flush();
            if !rest.is_empty() {
                let _ = row.events.send(Event::Text(rest));
            }
        }
        let _ = row.events.send(Event::Done(Finished {
            reason,
            prompt_tokens: row.prompt_len,
            completion_tokens: row.generated.len(),
        }));
        Outcome::Finished
    }
}

#[cfg(test)]
mod tests {
    use super::allot;
    use std::time::{Duration, Instant};

    #[test]
    fn the_oldest_prompt_moves_on_and_short_ones_go_first() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // A long prompt queued first, three short ones after it, a decoding row.
        let rows = [(1000, at(0)), (10, at(5)), (0, at(1)), (30, at(3)), (5, at(9))];
        assert_eq!(allot(&rows, 64), vec![32, 10, 0, 17, 5]);
        // With room for everything short, the long one takes the rest.
        assert_eq!(allot(&rows, 200), vec![155, 10, 0, 30, 5]);
        // A budget of one goes to the oldest; nothing is ever over a prompt's
        // remaining positions or over the budget.
        assert_eq!(allot(&rows, 1), vec![1, 0, 0, 0, 0]);
        for budget in [0, 1, 2, 7, 64, 512, 5000] {
            let counts = allot(&rows, budget);
            assert!(counts.iter().sum::<usize>() <= budget);
            assert!(counts.iter().zip(&rows).all(|(c, (left, _))| c <= left));
        }
        assert_eq!(allot(&[(0, at(0)), (0, at(1))], 64), vec![0, 0]);
    }
}
