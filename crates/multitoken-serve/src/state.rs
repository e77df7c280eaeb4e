//! The shared server state, and the path every generation request takes:
//! resolve and check items, prepare ids and spans, embed, queue for the scheduler.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use multitoken_core::{Item, ItemMedia, ItemsByKey, Message};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::multimodal::MultimodalModel;
use multitoken_lm::sampling::SamplingParams;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::config::ServeConfig;
use crate::error::{Error, Result};
use crate::items::{check_limits, resolve, ItemSource};
use crate::metrics::Metrics;
use crate::scheduler::{Event, Job, Scheduler};

/// Everything the routes share.
pub struct AppState {
    /// The model (prompt preparation and item embedding happen on request threads).
    pub model: Arc<MultimodalModel>,
    /// Operator settings.
    pub config: ServeConfig,
    /// The batching scheduler.
    pub scheduler: Scheduler,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Unix time the server started (OpenAI's `created`).
    pub created: u64,
    /// Turns to prepare a request (`max_preparing`).
    preparing: Arc<tokio::sync::Semaphore>,
    /// The message-text limit in force ([`crate::Limits::max_prompt_bytes`]).
    pub max_prompt_bytes: usize,
    next_id: AtomicU64,
}

/// Raises a request's abandon flag when dropped: the handler's future is
/// dropped when its client disconnects, and returns early at the deadline, so
/// the blocking preparation sees the flag at its next step and stops.
struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// One item of a request: the modality's data key, where its data is, and how
/// to name it in errors (e.g. `messages[0].content[1]`).
#[derive(Debug, Clone)]
pub struct RequestItem {
    /// The modality's data key (`images`, `speech_audios`, `documents`).
    pub data_key: String,
    /// Where the data is.
    pub source: ItemSource,
    /// The request field it came from.
    pub what: String,
}

/// A generation request, whichever API it came through.
#[derive(Debug, Clone, Default)]
pub struct GenerationRequest {
    /// The chat, modality tokens in place.
    pub messages: Vec<Message>,
    /// The items, in order per modality.
    pub items: Vec<RequestItem>,
    /// New-token budget (default and ceiling: the server's limit).
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature (default greedy).
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// Sampler seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Whether special tokens typed in message text act as the tokens they
    /// spell (`None`: the server's `--parse-special-tokens`). Otherwise
    /// `<|im_end|>` in a message is the ten characters, not a turn boundary.
    pub parse_special_tokens: Option<bool>,
}

/// A queued generation: its events and its prompt length.
pub struct Started {
    /// Text pieces, then `Done` or `Error`.
    pub events: UnboundedReceiver<Event>,
    /// Prompt positions, placeholders included.
    pub prompt_tokens: usize,
}

impl AppState {
    /// Starts the scheduler for `model` and wraps everything for the routes.
    pub fn new(model: MultimodalModel, config: ServeConfig) -> Result<Arc<Self>> {
        let metrics = Arc::new(Metrics::default());
        let scheduler = Scheduler::start(
            model.lm.model.clone(),
            model.lm.tokenizer.clone(),
            metrics.clone(),
            config.max_batch,
            config.max_queue,
        )?;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let max_prompt_bytes = config
            .limits
            .max_prompt_bytes
            .unwrap_or_else(|| default_prompt_bytes(&model));
        let preparing = Arc::new(tokio::sync::Semaphore::new(config.max_preparing.max(1)));
        Ok(Arc::new(Self {
            model: Arc::new(model),
            config,
            scheduler,
            metrics,
            created,
            preparing,
            max_prompt_bytes,
            next_id: AtomicU64::new(1),
        }))
    }

    /// A fresh id for a response.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The modalities as `/v1/models` and the web page show them.
    pub fn modalities_json(&self) -> serde_json::Value {
        let list: Vec<_> = self
            .model
            .modalities
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.modality.name(),
                    "token": m.modality.token(),
                    "data_key": m.modality.data_key(),
                    "token_width": m.modality.token_width(),
                    "media": match m.modality.media() {
                        ItemMedia::Image => "image",
                        ItemMedia::Audio => "audio",
                        ItemMedia::Document => "document",
                        ItemMedia::Other => "other",
                    },
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// The modality token for `data_key`, or a 400 when this model reads none.
    pub fn token_for(&self, data_key: &str, what: &str) -> Result<String> {
        if let Some(text) = self.model.text_modalities().find(|m| m.data_key() == data_key) {
            return Ok(text.token().to_string());
        }
        match self.model.modality_for_key(data_key) {
            Some((_, m)) => Ok(m.modality.token().to_string()),
            None => Err(Error::bad_param(
                what,
                format!(
                    "{what}: this model reads no `{data_key}` (its modalities: {})",
                    self.modality_list()
                ),
            )),
        }
    }

    /// The data key of the first modality whose items are `media` (the
    /// built-in content parts `image_url`, `input_audio`, `file` reach it), or
    /// a 400 naming the media's usual key when this model reads none.
    pub fn key_for_media(&self, media: ItemMedia, what: &str) -> Result<String> {
        if let Some(m) = self.model.modalities.iter().find(|m| m.modality.media() == media) {
            return Ok(m.modality.data_key().to_string());
        }
        let usual = match media {
            ItemMedia::Image => "images",
            ItemMedia::Audio => "speech_audios",
            ItemMedia::Document => "documents",
            ItemMedia::Other => "items",
        };
        Err(Error::bad_param(
            what,
            format!("{what}: this model reads no `{usual}` (its modalities: {})", self.modality_list()),
        ))
    }

    /// The data key of the modality (or text modality) that `name` names: its
    /// builder name, data key or token (the generic `input_item` part).
    pub fn key_for_modality(&self, name: &str, what: &str) -> Result<String> {
        let found = self
            .model
            .modalities
            .iter()
            .map(|m| (m.modality.name(), m.modality.data_key(), m.modality.token()))
            .chain(self.model.text_modalities().map(|m| (m.name(), m.data_key(), m.token())))
            .find(|(n, key, token)| *n == name || *key == name || *token == name);
        match found {
            Some((_, key, _)) => Ok(key.to_string()),
            None => Err(Error::bad_param(
                what,
                format!("{what}: this model has no modality `{name}` (its modalities: {})", self.modality_list()),
            )),
        }
    }

    /// Where a request's item value is, for the modality reading `data_key`:
    /// a string is a data URL, URL or allowed path ([`ItemSource::parse`]) or,
    /// when `inline_strings` is set and the modality takes inline items
    /// ([`multitoken_core::Modality::inline_items`]), the item's text; any other
    /// JSON value is read by the modality ([`multitoken_core::Modality::item_from_json`])
    /// and must become inline text (a server never reads a path a modality names).
    pub fn item_source(&self, data_key: &str, value: &serde_json::Value, inline_strings: bool, what: &str) -> Result<ItemSource> {
        let inline = match self.model.modality_for_key(data_key) {
            Some((_, m)) => m.modality.inline_items(),
            // Text modalities read text.
            None => self.model.text_modalities().any(|m| m.data_key() == data_key),
        };
        if let serde_json::Value::String(text) = value {
            let source = ItemSource::parse(text);
            return Ok(match source {
                ItemSource::Path(_) if inline && inline_strings => ItemSource::Text(text.clone()),
                other => other,
            });
        }
        let item = match self.model.modality_for_key(data_key) {
            Some((_, m)) => m.modality.item_from_json(value, std::path::Path::new("")).map_err(|e| {
                Error::bad_param(what, format!("{what}: modality `{}`: {e}", m.modality.name()))
            })?,
            None if inline => Item::Text(value.to_string()),
            None => return Err(Error::bad_param(what, format!("{what}: must be a string"))),
        };
        match item {
            Item::Text(text) => Ok(ItemSource::Text(text)),
            _ => Err(Error::bad_param(
                what,
                format!("{what}: this modality takes no inline JSON items; send a string (a data URL, URL or path)"),
            )),
        }
    }

    fn modality_list(&self) -> String {
        let keys: Vec<&str> = self
            .model
            .modalities
            .iter()
            .map(|m| m.modality.data_key())
            .chain(self.model.text_modalities().map(|m| m.data_key()))
            .collect();
        if keys.is_empty() {
            "none, it is a text-only model".into()
        } else {
            keys.join(", ")
        }
    }

    /// Checks, prepares and embeds a request, then queues it.
    pub async fn start(self: &Arc<Self>, request: GenerationRequest) -> Result<Started> {
        let limits = &self.config.limits;
        if request.items.len() > limits.max_items {
            return Err(Error::bad_request(format!(
                "the request has {} items, more than the limit of {}",
                request.items.len(),
                limits.max_items
            )));
        }
        let max_new_tokens = request.max_new_tokens.unwrap_or(limits.max_new_tokens);
        if max_new_tokens > limits.max_new_tokens {
            return Err(Error::bad_param(
                "max_new_tokens",
                format!(
                    "max_new_tokens is {max_new_tokens}, more than this server's limit of {}",
                    limits.max_new_tokens
                ),
            ));
        }
        if request.messages.is_empty() {
            return Err(Error::bad_param("messages", "messages is empty"));
        }
        // Before anything renders or tokenises the text (tokenising costs ~180
        // bytes of memory per byte): more text than could fit the context is
        // refused outright.
        let prompt_bytes: usize = request.messages.iter().map(|m| m.content.len()).sum();
        if prompt_bytes > self.max_prompt_bytes {
            return Err(Error::bad_param(
                "messages",
                format!(
                    "the messages hold {prompt_bytes} bytes of text, more than the limit of {} bytes \
                     for this model's context of {} tokens (--max-prompt-bytes)",
                    self.max_prompt_bytes,
                    self.model.lm.model.max_context()
                ),
            ));
        }
        // The scheduler thread matches stop strings for every user's tokens:
        // their number and length are bounded (and matching is incremental,
        // `detok::StopMatcher`).
        if request.stop.len() > limits.max_stop_strings {
            return Err(Error::bad_param(
                "stop",
                format!(
                    "`stop` holds {} strings, more than the limit of {} (--max-stop-strings)",
                    request.stop.len(),
                    limits.max_stop_strings
                ),
            ));
        }
        if let Some((i, long)) = request.stop.iter().enumerate().find(|(_, s)| s.len() > limits.max_stop_bytes) {
            return Err(Error::bad_param(
                "stop",
                format!(
                    "stop[{i}] is {} bytes long, more than the limit of {} bytes (--max-stop-bytes)",
                    long.len(),
                    limits.max_stop_bytes
                ),
            ));
        }
        let sampling = SamplingParams {
            temperature: Some(request.temperature.unwrap_or(0.0)),
            top_k: None,
            top_p: request.top_p,
            repetition_penalty: None,
            seed: request.seed,
        };
        sampling.validate().map_err(|e| Error::bad_request(e.to_string()))?;
        let params = GenerationParams {
            sampling,
            max_new_tokens,
            stop_strings: request.stop.clone(),
            eos_token_ids: self.model.lm.generation.eos_token_ids.clone(),
            ignore_eos: false,
        };
        // A --request-timeout too large for the clock means no limit (a year).
        let now = Instant::now();
        let deadline = now
            .checked_add(limits.request_timeout)
            .unwrap_or(now + std::time::Duration::from_secs(365 * 24 * 3600));
        let (embeds, prompt_ids, positions) = self.prepare(request, deadline).await?;
        let prompt_tokens = prompt_ids.len();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.scheduler.submit(Job {
            embeds,
            prompt_ids,
            positions,
            params,
            events: tx,
            deadline,
        })?;
        Ok(Started {
            events: rx,
            prompt_tokens,
        })
    }

    /// Prepares `request` on a blocking thread, one of at most `max_preparing`,
    /// by `deadline`: a 408 when no turn comes free or the work is not done in
    /// time. When the deadline passes or the client goes away (this future is
    /// dropped), the blocking work stops at its next step.
    #[allow(clippy::type_complexity)]
    async fn prepare(
        self: &Arc<Self>,
        request: GenerationRequest,
        deadline: Instant,
    ) -> Result<(candle_core::Tensor, Vec<u32>, Option<candle_core::Tensor>)> {
        let abandon = Arc::new(AtomicBool::new(false));
        let _abandon_on_drop = AbandonOnDrop(abandon.clone());
        let seconds = self.config.limits.request_timeout.as_secs_f64();
        let deadline = tokio::time::Instant::from_std(deadline);
        let permit = tokio::time::timeout_at(deadline, self.preparing.clone().acquire_owned())
            .await
            .map_err(|_| {
                Error::Timeout(format!(
                    "the server was busy preparing other requests for the whole --request-timeout ({seconds} s)"
                ))
            })?
            .map_err(|_| Error::ShuttingDown)?;
        let state = self.clone();
        let flag = abandon.clone();
        let task = tokio::task::spawn_blocking(move || {
            // The turn is held until the work really ends, even when the request
            // was abandoned, so that abandoned work still counts against the pool.
            let _permit = permit;
            state.embed(&request, &flag)
        });
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(prepared)) => prepared,
            Ok(Err(e)) => {
                tracing::error!("preparing a request: {e}");
                Err(Error::Internal("preparing the request stopped unexpectedly".into()))
            }
            Err(_) => Err(Error::Timeout(format!(
                "the request's items and prompt were not ready within --request-timeout ({seconds} s)"
            ))),
        }
    }

    /// `Err` once the request was abandoned (counted once, where it is seen).
    fn check_abandoned(&self, abandon: &AtomicBool) -> Result<()> {
        if abandon.load(Ordering::Relaxed) {
            self.metrics.add_preparation_abandoned();
            return Err(Error::Timeout("the request was abandoned during preparation".into()));
        }
        Ok(())
    }

    /// Items read and checked, ids prepared, embeddings with items spliced in,
    /// and the prompt's M-RoPE positions when the model reads them; stops
    /// between steps once `abandon` is set.
    #[allow(clippy::type_complexity)]
    fn embed(
        &self,
        request: &GenerationRequest,
        abandon: &AtomicBool,
    ) -> Result<(candle_core::Tensor, Vec<u32>, Option<candle_core::Tensor>)> {
        let mut items = ItemsByKey::new();
        // Pages are counted by the document modality from the parsed page tree.
        let item_limits = multitoken_core::ItemLimits {
            max_document_pages: Some(self.config.limits.max_document_pages),
        };
        for item in &request.items {
            self.check_abandoned(abandon)?;
            self.token_for(&item.data_key, &item.what)?;
            let resolved = resolve(&item.source, &item.what, &self.config)?;
            if let Some((_, m)) = self.model.modality_for_key(&item.data_key) {
                check_limits(m.modality.media(), &resolved, &item.what, &self.config.limits)?;
                // The modality crate's code: a panic in it is an error naming the modality.
                multitoken_core::guard(m.modality.name(), "checking an item", || m.modality.check_item_within(&resolved, &item_limits))
                    .map_err(|e| Error::bad_param(&item.what, format!("{}: modality `{}`: {e}", item.what, m.modality.name())))?;
            }
            items.entry(item.data_key.clone()).or_default().push(resolved);
        }
        self.check_abandoned(abandon)?;
        let parse_special = request.parse_special_tokens.unwrap_or(self.config.parse_special_tokens);
        let marked: Vec<Message>;
        let messages = if parse_special {
            &request.messages
        } else {
            let preparer = self.model.chat_preparer();
            marked = request
                .messages
                .iter()
                .map(|m| Message::new(m.role.clone(), preparer.mark_special_tokens_as_text(&m.content)))
                .collect();
            &marked
        };
        let prepared = self
            .model
            .prepare_chat(messages, &items)
            .map_err(|e| Error::bad_request(format!("preparing the prompt: {e}")))?;
        let max_context = self.model.lm.model.max_context();
        if prepared.input_ids.len() >= max_context {
            return Err(Error::bad_param(
                "messages",
                format!(
                    "the prompt takes {} positions, which leaves no room in the model's context of {max_context}",
                    prepared.input_ids.len()
                ),
            ));
        }
        self.check_abandoned(abandon)?;
        let embeds = match self.model.embed_while(&prepared, &items, &|| !abandon.load(Ordering::Relaxed)) {
            Ok(embeds) => embeds,
            Err(e) => {
                // Stopped between items because the request was abandoned.
                self.check_abandoned(abandon)?;
                return Err(Error::bad_request(format!("reading the items: {e}")));
            }
        };
        let positions = self
            .model
            .positions(&prepared)
            .map_err(|e| Error::Internal(format!("the prompt's positions: {e}")))?;
        Ok((embeds, prepared.input_ids, positions))
    }
}

/// The default message-text limit for `model`: the most text that could
/// still fit its context (context length times the UTF-8 length of its
/// longest vocabulary entry: byte-level BPE writes a byte as a 1-2 byte
/// character and SentencePiece a space as the 3-byte `▁`, so this over-counts),
/// but no more than [`PROMPT_BYTES_CAP`] or 8 bytes per context position,
/// whichever is larger (tokenising costs ~180 bytes of memory per byte, per
/// request being prepared; typical text is 3-5 bytes per token).
fn default_prompt_bytes(model: &MultimodalModel) -> usize {
    let longest = model
        .lm
        .tokenizer
        .get_vocab(true)
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max(16);
    let context = model.lm.model.max_context();
    let could_fit = context.saturating_mul(longest);
    could_fit.min(PROMPT_BYTES_CAP.max(context.saturating_mul(8)))
}

/// See [`default_prompt_bytes`]: 1 MiB.
const PROMPT_BYTES_CAP: usize = 1 << 20;
