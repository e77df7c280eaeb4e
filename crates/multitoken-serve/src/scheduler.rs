//! Continuous batching: one thread owns the LM and decodes every running
//! sequence in one forward per step.
//!
//! A new request is prefilled on its own (batch of one, its own [`KvCache`]) as
//! soon as a slot is free, then joins the running batch: the caches are
//! left-padded to a common length and stacked, with an attention mask hiding
//! the padding (position ids come from the mask, as in transformers). A finished
//! sequence, or one whose client went away, leaves at the end of its step: its
//! row is dropped and padding columns that no row needs any more are trimmed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use multitoken_core::{KvCache, LanguageModel, LogitsSelection};
use multitoken_lm::generate::{FinishReason, GenerationParams};
use multitoken_lm::sampling::Sampler;
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
}

/// What happened to a row after a token.
enum Outcome {
    Running,
    Finished,
}

struct Worker {
    model: Arc<dyn LanguageModel>,
    tokenizer: tokenizers::Tokenizer,
    metrics: Arc<Metrics>,
    max_batch: usize,
}

impl Worker {
    fn run(self, jobs: Receiver<Job>) {
        let mut rows: Vec<Row> = Vec::new();
        let mut cache = KvCache::new(self.model.num_layers());
        let mut open = true;
        loop {
            if rows.is_empty() {
                if !open {
                    return;
                }
                match jobs.recv() {
                    Ok(job) => self.admit(job, &mut rows, &mut cache),
                    Err(_) => return,
                }
            }
            while open && rows.len() < self.max_batch {
                match jobs.try_recv() {
                    Ok(job) => self.admit(job, &mut rows, &mut cache),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            self.metrics.set_running(rows.len());
            if rows.is_empty() {
                cache = KvCache::new(self.model.num_layers());
                continue;
            }
            if let Err(e) = self.step(&mut rows, &mut cache) {
                for row in rows.drain(..) {
                    let _ = row.events.send(Event::Error(format!("decoding failed: {e}")));
                }
                cache = KvCache::new(self.model.num_layers());
            }
            self.metrics.set_running(rows.len());
        }
    }

    /// Prefills a job alone, takes its first token, and joins it to the batch.
    fn admit(&self, job: Job, rows: &mut Vec<Row>, cache: &mut KvCache) {
        self.metrics.add_queued(-1);
        if job.events.is_closed() {
            self.metrics.add_disconnect();
            return;
        }
        let start = Instant::now();
        let events = job.events.clone();
        match self.prefill(job) {
            Ok(Some((row, own))) => {
                self.metrics.record_first_token(start.elapsed());
                let joined = if rows.is_empty() { Ok(own) } else { join(cache, &own) };
                match joined {
                    Ok(c) => {
                        *cache = c;
                        rows.push(row);
                    }
                    Err(e) => {
                        let _ = row.events.send(Event::Error(format!("joining the batch failed: {e}")));
                    }
                }
            }
            Ok(None) => self.metrics.record_first_token(start.elapsed()),
            Err(e) => {
                let _ = events.send(Event::Error(e.to_string()));
            }
        }
    }

    /// The prompt's forward and first token; `None` when the sequence already ended.
    fn prefill(&self, job: Job) -> Result<Option<(Row, KvCache)>> {
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
        };
        self.metrics.add_prompt_tokens(prompt_len);
        if row.params.max_new_tokens == 0 {
            self.finish(&mut row, FinishReason::Length);
            return Ok(None);
        }
        let mut own = KvCache::new(self.model.num_layers());
        let logits = self
            .model
            .forward_embeds_at(&job.embeds, None, &mut own, LogitsSelection::Last, job.positions.as_ref())?;
        let mut logits = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let token = row.sampler.sample(&mut logits, &row.seen)?;
        Ok(match self.accept(&mut row, token)? {
            Outcome::Running => Some((row, own)),
            Outcome::Finished => None,
        })
    }

    /// One decode forward for every row; finished rows leave the batch.
    fn step(&self, rows: &mut Vec<Row>, cache: &mut KvCache) -> Result<()> {
        let last: Vec<u32> = rows.iter().map(|r| r.generated.last().copied().unwrap_or(0)).collect();
        let ids = Tensor::from_vec(last, (rows.len(), 1), self.model.device())?;
        let embeds = self.model.embed_tokens(&ids)?;
        let logits = self.model.forward_embeds(&embeds, None, cache, LogitsSelection::Last)?;
        let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut keep = Vec::with_capacity(rows.len());
        for (i, (row, mut row_logits)) in rows.iter_mut().zip(logits).enumerate() {
            let token = row.sampler.sample(&mut row_logits, &row.seen)?;
            if let Outcome::Running = self.accept(row, token)? {
                keep.push(i);
            }
        }
        if keep.len() < rows.len() {
            let mut index = 0;
            rows.retain(|_| {
                let kept = keep.contains(&index);
                index += 1;
                kept
            });
            *cache = if rows.is_empty() {
                KvCache::new(self.model.num_layers())
            } else {
                select_rows(cache, &keep)?
            };
        }
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

/// The cache's `[b, seen]` mask (ones when it never saw padding).
fn mask_of(cache: &KvCache, batch: usize, device: &candle_core::Device) -> Result<Tensor> {
    Ok(match &cache.attention_mask {
        Some(m) => m.to_dtype(DType::F32)?,
        None => Tensor::ones((batch, cache.seen), DType::F32, device)?,
    })
}

fn batch_of(cache: &KvCache) -> Result<usize> {
    match cache.layers.iter().flatten().next() {
        Some((k, _)) => Ok(k.dim(0)?),
        None => Err(Error::Internal("the KV cache is empty".into())),
    }
}

/// `t` left-padded to `target` positions along `dim` with zeros.
fn pad_left(t: &Tensor, dim: usize, target: usize) -> Result<Tensor> {
    let have = t.dim(dim)?;
    if have == target {
        return Ok(t.clone());
    }
    let mut shape = t.dims().to_vec();
    shape[dim] = target - have;
    let zeros = Tensor::zeros(shape, t.dtype(), t.device())?;
    Ok(Tensor::cat(&[&zeros, t], dim)?)
}

/// The batch cache with `new` stacked under it, both left-padded to the longer one.
fn join(batch: &KvCache, new: &KvCache) -> Result<KvCache> {
    let target = batch.seen.max(new.seen);
    let mut layers = Vec::with_capacity(batch.layers.len());
    for (a, b) in batch.layers.iter().zip(&new.layers) {
        layers.push(match (a, b) {
            (Some((ka, va)), Some((kb, vb))) => {
                let fit = |t: &Tensor, seen: usize| -> Result<Tensor> { pad_left(&t.narrow(2, 0, seen)?, 2, target) };
                let k = Tensor::cat(&[&fit(ka, batch.seen)?, &fit(kb, new.seen)?], 0)?;
                let v = Tensor::cat(&[&fit(va, batch.seen)?, &fit(vb, new.seen)?], 0)?;
                Some((k, v))
            }
            _ => return Err(Error::Internal("a KV cache layer is missing".into())),
        });
    }
    let device = new
        .layers
        .iter()
        .flatten()
        .next()
        .map(|(k, _)| k.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let mask_a = pad_left(&mask_of(batch, batch_of(batch)?, &device)?, 1, target)?;
    let mask_b = pad_left(&mask_of(new, batch_of(new)?, &device)?, 1, target)?;
    let mask = Tensor::cat(&[&mask_a, &mask_b], 0)?;
    let all_real = mask.min_all()?.to_scalar::<f32>()? >= 0.5;
    // Each row keeps its own position shift (M-RoPE rows after their images).
    let position_shift = match (&batch.position_shift, &new.position_shift) {
        (None, None) => None,
        (a, b) => {
            let rows = |shift: &Option<Vec<i64>>, cache: &KvCache| -> Result<Vec<i64>> {
                match shift {
                    Some(shift) => Ok(shift.clone()),
                    None => Ok(vec![0; batch_of(cache)?]),
                }
            };
            let mut joined = rows(a, batch)?;
            joined.extend(rows(b, new)?);
            Some(joined)
        }
    };
    Ok(KvCache {
        layers,
        attention_mask: (!all_real).then_some(mask),
        seen: target,
        position_shift,
    })
}

/// The rows `keep` of the batch cache, without leading columns that are padding in every row.
fn select_rows(cache: &KvCache, keep: &[usize]) -> Result<KvCache> {
    let device = cache
        .layers
        .iter()
        .flatten()
        .next()
        .map(|(k, _)| k.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let index = Tensor::from_vec(keep.iter().map(|&i| i as u32).collect::<Vec<_>>(), keep.len(), &device)?;
    let mask = mask_of(cache, batch_of(cache)?, &device)?.index_select(&index, 0)?;
    let rows = mask.to_vec2::<f32>()?;
    let lead = rows
        .iter()
        .map(|r| r.iter().take_while(|&&m| m < 0.5).count())
        .min()
        .unwrap_or(0);
    let seen = cache.seen - lead;
    let mut layers = Vec::with_capacity(cache.layers.len());
    for layer in &cache.layers {
        layers.push(match layer {
            Some((k, v)) => {
                let pick = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.narrow(2, lead, seen)?.contiguous()?.index_select(&index, 0)?)
                };
                Some((pick(k)?, pick(v)?))
            }
            None => None,
        });
    }
    let mask = mask.narrow(1, lead, seen)?;
    let all_real = mask.min_all()?.to_scalar::<f32>()? >= 0.5;
    let position_shift = cache
        .position_shift
        .as_ref()
        .map(|shift| keep.iter().map(|&i| shift.get(i).copied().unwrap_or(0)).collect());
    Ok(KvCache {
        layers,
        attention_mask: (!all_real).then_some(mask),
        seen,
        position_shift,
    })
}
