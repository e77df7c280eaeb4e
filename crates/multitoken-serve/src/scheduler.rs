//! Continuous batching: one thread owns the LM and decodes every running
//! sequence in one forward per step.
//!
//! A new request is prefilled on its own (batch of one, its own [`KvCache`]) as
//! soon as a slot is free, then joins the running batch with that cache: the
//! batch is ragged, each sequence attending over its own length, so nothing is
//! padded or copied when a sequence joins or leaves
//! ([`LanguageModel::decode_step`], whose rows equal one-at-a-time decoding
//! bit for bit). Between two decode steps at most [`PREFILL_TOKENS_PER_STEP`]
//! prompt positions are prefilled (at least one prompt), so a burst of new
//! requests does not stall the running streams for all of its prefills. A
//! finished sequence, or one whose client went away, leaves at the end of its
//! step with its cache.

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

struct Worker {
    model: Arc<dyn LanguageModel>,
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
            // Admit in arrival order within the step's prefill budget.
            let mut budget = PREFILL_TOKENS_PER_STEP;
            let mut admitted = 0;
            while rows.len() < self.max_batch {
                let Some((job, _)) = waiting.front() else { break };
                let len = job.embeds.dim(1).unwrap_or(0);
                if admitted > 0 && len > budget {
                    break;
                }
                budget = budget.saturating_sub(len);
                admitted += 1;
                if let Some((job, queued)) = waiting.pop_front() {
                    self.admit(job, queued, &mut rows);
                }
            }
            self.metrics.set_running(rows.len());
            if rows.is_empty() {
                continue;
            }
            if let Err(e) = self.step(&mut rows) {
                for row in rows.drain(..) {
                    let _ = row.events.send(Event::Error(format!("decoding failed: {e}")));
                }
            }
            self.metrics.set_running(rows.len());
        }
    }

    /// Prefills a job alone, takes its first token, and joins it to the batch.
    fn admit(&self, job: Job, queued: Instant, rows: &mut Vec<Row>) {
        self.metrics.add_queued(-1);
        if job.events.is_closed() {
            self.metrics.add_disconnect();
            return;
        }
        let events = job.events.clone();
        match self.prefill(job) {
            Ok(Some(row)) => {
                self.metrics.record_first_token(queued.elapsed());
                rows.push(row);
            }
            Ok(None) => self.metrics.record_first_token(queued.elapsed()),
            Err(e) => {
                let _ = events.send(Event::Error(e.to_string()));
            }
        }
    }

    /// The prompt's forward and first token; `None` when the sequence already ended.
    fn prefill(&self, job: Job) -> Result<Option<Row>> {
        let (_, prompt_len, _) = job.embeds.dims3()?;
        let max_context = self.model.max_context();
        if prompt_len == 0 || prompt_len >= max_context {
            return Err(Error::bad_request(format!(
                "the prompt has {prompt_len} tokens; the model's context holds {max_context}"
            )));
        }
        let sampler = Sampler::new(job.params.sampling.clone())?;
        let mut row = Row {
            sampler,
            detok: Detokenizer::new(job.params.stop_strings.clone()),
            params: job.params,
            events: job.events,
            deadline: job.deadline,
            seen: job.prompt_ids,
            generated: Vec::new(),
            prompt_len,
            cache: KvCache::new(self.model.num_layers()),
        };
        self.metrics.add_prompt_tokens(prompt_len);
        if row.params.max_new_tokens == 0 {
            self.finish(&mut row, FinishReason::Length);
            return Ok(None);
        }
        let logits = self.model.forward_embeds_at(
            &job.embeds,
            None,
            &mut row.cache,
            LogitsSelection::Last,
            job.positions.as_ref(),
        )?;
        let mut logits = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let token = row.sampler.sample(&mut logits, &row.seen)?;
        Ok(match self.accept(&mut row, token)? {
            Outcome::Running => Some(row),
            Outcome::Finished => None,
        })
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
