//! Input preparation: messages + items to token ids, labels and placeholder spans.
//!
//! This is multi_token's `encode_chat` generalised past Mistral's `[INST]`
//! format. multi_token renders the chat, splits it at `[INST]...[/INST]`
//! blocks, splits each block at modality tokens, tokenizes every text piece
//! on its own without special tokens, and expands each modality token into
//! `token_width` placeholder ids with label -100. Here the chat template itself
//! says where the assistant turns are ([`ChatTemplate::render_with_assistant_spans`]),
//! so any template works. Two deliberate differences: only assistant turns
//! (through the end-of-turn token) get labels, where multi_token also labels
//! text between instruction blocks such as the leading BOS; and placeholder
//! positions are recorded as [`PlaceholderSpan`]s rather than found again by
//! scanning for a magic negative id.

use std::collections::BTreeMap;
use std::ops::Range;

use tokenizers::Tokenizer;

use std::sync::Arc;

use crate::modality::{ItemLayout, LayoutPart, TextRule};
use crate::{ChatTemplate, Error, Item, Message, Modality, Result};

/// Label of positions that take no part in the loss (torch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Items of one row per modality, keyed by the modality's data key
/// (`images`, `speech_audios`, `documents`, ...), as in the dataset schema.
pub type ItemsByKey = BTreeMap<String, Vec<Item>>;

/// What the preparer needs to know of one modality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModalityToken {
    /// Builder name, e.g. `vision_clip`.
    pub name: String,
    /// The token in the text, e.g. `<image>`.
    pub token: String,
    /// The row key of its items, e.g. `images`.
    pub data_key: String,
    /// Placeholder positions per item.
    pub token_width: usize,
}

impl ModalityToken {
    /// A modality token from its parts.
    pub fn new(
        name: impl Into<String>,
        token: impl Into<String>,
        data_key: impl Into<String>,
        token_width: usize,
    ) -> Self {
        Self {
            name: name.into(),
            token: token.into(),
            data_key: data_key.into(),
            token_width,
        }
    }

    /// The token, data key and width of a loaded modality.
    pub fn of(modality: &dyn Modality) -> Self {
        Self::new(
            modality.name(),
            modality.token(),
            modality.data_key(),
            modality.token_width(),
        )
    }
}

/// Whether and how the tokenizer's own leading special tokens (the BOS its
/// post-processor adds, e.g. Llama's `<s>`) go in front of the ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeadingSpecialTokens {
    /// Only what the chat template writes (transformers' `apply_chat_template`
    /// and multi_token tokenize with `add_special_tokens=False`).
    TemplateOnly,
    /// Always once at the very start.
    AddOnce,
    /// Once at the start unless the rendered text already begins with them
    /// (a template that writes `{{ bos_token }}`); never twice.
    #[default]
    AddOnceIfMissing,
}

/// Settings of an [`InputPreparer`]. The default writes placeholder id 0,
/// keeps every position and adds the tokenizer's BOS once if missing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreparerConfig {
    /// Id written at placeholder positions; its embedding is replaced by the
    /// splice, so any valid id works (0 or the pad id are usual).
    pub placeholder_id: u32,
    /// Longest sequence kept (`model_max_length`); `None` keeps everything.
    pub model_max_length: Option<usize>,
    /// How the tokenizer's leading special tokens are handled.
    pub leading_special_tokens: LeadingSpecialTokens,
}

/// Where one item's placeholder positions are in a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlaceholderSpan {
    /// Index of the modality in the preparer's modality list.
    pub modality: usize,
    /// Which item of that modality (the k-th token gets the k-th item).
    pub item_index: usize,
    /// Index of this run's first slot among the item's projected rows (0 for
    /// a fixed-width item; an item whose layout has several slot runs has one
    /// span per run).
    pub item_offset: usize,
    /// First position.
    pub start: usize,
    /// Number of positions.
    pub len: usize,
    /// The item's position grid `[t, h, w]` ([`ItemLayout::with_grid`]): its
    /// slots take multimodal rotary positions ([`PreparedInput::rope_positions`]).
    pub grid: Option<[usize; 3]>,
}

impl PlaceholderSpan {
    /// One past the last position.
    pub fn end(&self) -> usize {
        self.start + self.len
    }

    /// The positions as a range.
    pub fn range(&self) -> Range<usize> {
        self.start..self.end()
    }
}

/// One row ready for the model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreparedInput {
    /// Token ids, placeholders included.
    pub input_ids: Vec<u32>,
    /// Per position: the id to predict there, or [`IGNORE_INDEX`].
    ///
    /// Like transformers, labels are not shifted: the loss compares logits at
    /// position `t` with the label at `t + 1`.
    pub labels: Vec<i64>,
    /// Placeholder spans in order of position.
    pub spans: Vec<PlaceholderSpan>,
    /// The number of positions before truncation to `model_max_length`, when
    /// the row was cut (so that an error can report the prompt's real length).
    pub truncated_from: Option<usize>,
}

impl PreparedInput {
    /// Number of positions.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether there are no positions.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Whether an item of this row has a position grid, so that a model with
    /// multimodal rotary positions (Qwen2-VL's M-RoPE) needs
    /// [`Self::rope_positions`] rather than plain positions.
    pub fn has_position_grids(&self) -> bool {
        self.spans.iter().any(|span| span.grid.is_some())
    }

    /// The row's three position streams (temporal, height, width) as
    /// transformers' Qwen2-VL `get_rope_index` computes them; see
    /// [`RopePositions`].
    pub fn rope_positions(&self) -> RopePositions {
        RopePositions::of(self.len(), &self.spans)
    }
}

/// The multimodal rotary positions of one row (Qwen2-VL's M-RoPE).
///
/// Text (and items without a grid) counts on from the previous position in
/// all three streams. The slot `(t, h, w)` of an item with grid `[T, H, W]`
/// that starts after position `p - 1` gets `(p + t, p + h, p + w)`, and the
/// text after it continues at `p + max(H, W)` (transformers 5's `current_pos +=
/// max(h, w)`; for an image, `T = 1`, this is its largest position + 1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RopePositions {
    /// Temporal, height and width positions, one per token each.
    pub streams: [Vec<u32>; 3],
    /// `max position + 1 - length`: added to the plain position of every later
    /// token (decoding), as transformers' `rope_deltas`.
    pub delta: i64,
}

impl RopePositions {
    /// The positions of a row of `len` tokens with `spans`.
    pub fn of(len: usize, spans: &[PlaceholderSpan]) -> Self {
        let mut streams: [Vec<u32>; 3] = std::array::from_fn(|_| Vec::with_capacity(len));
        let mut gridded: Vec<&PlaceholderSpan> = spans.iter().filter(|span| span.grid.is_some()).collect();
        gridded.sort_by_key(|span| span.start);
        let mut next = 0usize;
        let mut at = 0usize;
        let push_text = |streams: &mut [Vec<u32>; 3], count: usize, next: &mut usize| {
            for stream in streams.iter_mut() {
                stream.extend((*next..*next + count).map(|p| p as u32));
            }
            *next += count;
        };
        for span in gridded {
            let (Some([t, h, w]), true) = (span.grid, span.start >= at && span.end() <= len) else {
                continue;
            };
            push_text(&mut streams, span.start - at, &mut next);
            for ti in 0..t {
                for hi in 0..h {
                    for wi in 0..w {
                        streams[0].push((next + ti) as u32);
                        streams[1].push((next + hi) as u32);
                        streams[2].push((next + wi) as u32);
                    }
                }
            }
            next += h.max(w);
            at = span.end();
        }
        push_text(&mut streams, len - at.min(len), &mut next);
        let max = streams.iter().filter_map(|s| s.iter().max()).max().map_or(-1, |&m| i64::from(m));
        Self { streams, delta: max + 1 - len as i64 }
    }

    /// Number of positions.
    pub fn len(&self) -> usize {
        self.streams[0].len()
    }

    /// Whether there are no positions.
    pub fn is_empty(&self) -> bool {
        self.streams[0].is_empty()
    }

    /// The positions of `rows` left-padded to `seq` positions (padding at
    /// position 0, as transformers leaves it) as a `[3, rows, seq]` u32 tensor,
    /// the `positions` argument of [`crate::LanguageModel::forward_embeds_at`].
    pub fn batch_tensor(rows: &[&RopePositions], seq: usize, device: &candle_core::Device) -> Result<candle_core::Tensor> {
        let mut data = Vec::with_capacity(3 * rows.len() * seq);
        for stream in 0..3 {
            for row in rows {
                let have = row.len();
                if have > seq {
                    return Err(Error::msg(format!("a row of {have} positions does not fit in {seq}")));
                }
                data.extend(std::iter::repeat_n(0u32, seq - have));
                data.extend_from_slice(&row.streams[stream]);
            }
        }
        Ok(candle_core::Tensor::from_vec(data, (3, rows.len(), seq), device)?)
    }

    /// This row alone as a `[3, 1, len]` u32 tensor.
    pub fn to_tensor(&self, device: &candle_core::Device) -> Result<candle_core::Tensor> {
        Self::batch_tensor(&[self], self.len(), device)
    }
}

/// Where an [`InputPreparer`] gets the layout of each item (the loaded
/// modalities' [`Modality::layout`]).
pub trait LayoutSource: Send + Sync {
    /// The layout of `item`, an item of modality `modality` (an index into the
    /// preparer's modality list).
    fn layout(&self, modality: usize, item: &Item) -> Result<ItemLayout>;
}

impl LayoutSource for Vec<Arc<dyn Modality>> {
    fn layout(&self, modality: usize, item: &Item) -> Result<ItemLayout> {
        let found = self.get(modality).ok_or_else(|| {
            Error::msg(format!("no modality {modality} among {} for a layout", self.len()))
        })?;
        // `layout` is the modality crate's code: a panic in it is an error
        // naming the modality, as in `encode_item`, not the end of the process.
        crate::registry::guard(found.name(), "laying out an item", || found.layout(item))
    }
}

/// Starts text that is tokenised as plain text even where it spells one of
/// the tokenizer's special tokens ([`InputPreparer::mark_special_tokens_as_text`]).
/// A Unicode noncharacter: reserved for a program's internal use, never text.
pub const LITERAL_START: char = '\u{FDD0}';
/// Ends what [`LITERAL_START`] started.
pub const LITERAL_END: char = '\u{FDD1}';

/// Turns messages and items into [`PreparedInput`]s for one model.
#[derive(Clone)]
pub struct InputPreparer {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    modalities: Vec<ModalityToken>,
    config: PreparerConfig,
    leading_ids: Vec<u32>,
    layouts: Option<Arc<dyn LayoutSource>>,
    /// The tokenizer with special-token splitting off, built when first needed.
    literal_tokenizer: std::sync::OnceLock<Tokenizer>,
    /// The special tokens a user could type (not the modality tokens), longest first.
    special_tokens: std::sync::OnceLock<Vec<String>>,
}

impl std::fmt::Debug for InputPreparer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputPreparer")
            .field("modalities", &self.modalities)
            .field("config", &self.config)
            .field("leading_ids", &self.leading_ids)
            .field("layouts", &self.layouts.is_some())
            .finish_non_exhaustive()
    }
}

impl InputPreparer {
    /// A preparer for a model's tokenizer, chat template and modalities.
    ///
    /// Fails when a modality token is empty, repeated or has width 0, or when
    /// two modalities share a data key.
    pub fn new(
        tokenizer: Tokenizer,
        template: ChatTemplate,
        modalities: Vec<ModalityToken>,
        config: PreparerConfig,
    ) -> Result<Self> {
        for (index, modality) in modalities.iter().enumerate() {
            if modality.token.is_empty() {
                return Err(Error::msg(format!(
                    "modality `{}` has an empty token",
                    modality.name
                )));
            }
            if modality.token_width == 0 {
                return Err(Error::msg(format!(
                    "modality `{}` has token_width 0",
                    modality.name
                )));
            }
            if let Some(other) = modalities[..index]
                .iter()
                .find(|other| other.token == modality.token || other.data_key == modality.data_key)
            {
                return Err(Error::msg(format!(
                    "modalities `{}` and `{}` share a token or data key (`{}`/`{}`)",
                    other.name, modality.name, modality.token, modality.data_key
                )));
            }
        }
        let leading_ids = leading_special_ids(&tokenizer)?;
        Ok(Self {
            tokenizer,
            template,
            modalities,
            config,
            leading_ids,
            layouts: None,
            literal_tokenizer: std::sync::OnceLock::new(),
            special_tokens: std::sync::OnceLock::new(),
        })
    }

    /// `text` (a message's content) with every one of the tokenizer's special
    /// tokens in it (`<|im_end|>`, `</s>`, ...; modality tokens excepted)
    /// wrapped in [`LITERAL_START`] / [`LITERAL_END`], so that it is tokenised
    /// as the characters it spells and cannot become a real turn boundary or
    /// end of sequence; markers already in `text` are removed. A server marks
    /// what clients send this way unless they ask for special tokens to be
    /// parsed. (Each marked token is tokenised on its own, so the text right
    /// around it may split into tokens a little differently.)
    pub fn mark_special_tokens_as_text(&self, text: &str) -> String {
        let clean: std::borrow::Cow<'_, str> = if text.contains([LITERAL_START, LITERAL_END]) {
            text.replace([LITERAL_START, LITERAL_END], "").into()
        } else {
            text.into()
        };
        let specials = self.special_tokens();
        if specials.is_empty() {
            return clean.into_owned();
        }
        let bytes = clean.as_bytes();
        // Modality tokens, and the spellings of items that templates know
        // (Qwen2-VL's `<|vision_start|><|image_pad|><|vision_end|>`), stay as
        // they are: they place items, they are not turn structure.
        let item_spellings: Vec<&str> = self
            .modalities
            .iter()
            .map(|m| m.token.as_str())
            .chain(crate::chat_template::PART_TOKENS.iter().map(|(token, _)| *token))
            .collect();
        let mut out = String::with_capacity(clean.len());
        let (mut copied, mut at) = (0, 0);
        while at < bytes.len() {
            if let Some(item) = item_spellings.iter().find(|t| bytes[at..].starts_with(t.as_bytes())) {
                at += item.len();
                continue;
            }
            let found = specials
                .iter()
                .find(|token| token.as_bytes()[0] == bytes[at] && bytes[at..].starts_with(token.as_bytes()));
            match found {
                // A token starts with a character's first byte, so `at` is a boundary.
                Some(token) => {
                    out.push_str(&clean[copied..at]);
                    out.push(LITERAL_START);
                    out.push_str(token);
                    out.push(LITERAL_END);
                    at += token.len();
                    copied = at;
                }
                None => at += 1,
            }
        }
        out.push_str(&clean[copied..]);
        out
    }

    fn special_tokens(&self) -> &[String] {
        self.special_tokens.get_or_init(|| {
            let mut tokens: Vec<String> = self
                .tokenizer
                .get_added_tokens_decoder()
                .into_values()
                .filter(|token| token.special && !token.content.is_empty())
                .map(|token| token.content)
                .filter(|content| !self.modalities.iter().any(|m| &m.token == content))
                .collect();
            tokens.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
            tokens.dedup();
            tokens
        })
    }

    /// Asks `source` for each item's layout (items of any width, text around
    /// them); without it every item is one run of its modality's `token_width`.
    pub fn with_layouts(mut self, source: Arc<dyn LayoutSource>) -> Self {
        self.layouts = Some(source);
        self
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The modalities; [`PlaceholderSpan::modality`] indexes this list.
    pub fn modalities(&self) -> &[ModalityToken] {
        &self.modalities
    }

    /// The settings.
    pub fn config(&self) -> &PreparerConfig {
        &self.config
    }

    /// The ids the tokenizer's post-processor puts before a single sequence.
    pub fn leading_special_ids(&self) -> &[u32] {
        &self.leading_ids
    }

    /// A finished conversation for training: assistant turns (through their
    /// end-of-turn token) are labelled, everything else is [`IGNORE_INDEX`].
    pub fn prepare_training(
        &self,
        messages: &[Message],
        items: &ItemsByKey,
    ) -> Result<PreparedInput> {
        let rendered = self.template.render_with_assistant_spans(messages)?;
        let mut segments = Vec::new();
        let mut cursor = 0;
        for range in &rendered.assistant_ranges {
            segments.push((cursor..range.start, Labelled::No));
            segments.push((range.clone(), Labelled::Yes));
            cursor = range.end;
        }
        segments.push((cursor..rendered.text.len(), Labelled::No));
        self.prepare_segments(&rendered.text, &segments, items)
    }

    /// A prompt for generation: the messages plus the opening of the assistant
    /// turn, no labels.
    pub fn prepare_generation(
        &self,
        messages: &[Message],
        items: &ItemsByKey,
    ) -> Result<PreparedInput> {
        let text = self.template.render_prompt(messages)?;
        self.prepare_text(&text, items)
    }

    /// Text used as is (no chat template, e.g. `generate --raw`), no labels.
    pub fn prepare_text(&self, text: &str, items: &ItemsByKey) -> Result<PreparedInput> {
        self.prepare_segments(text, &[(0..text.len(), Labelled::No)], items)
    }

    fn prepare_segments(
        &self,
        text: &str,
        segments: &[(Range<usize>, Labelled)],
        items: &ItemsByKey,
    ) -> Result<PreparedInput> {
        self.check_item_keys(items)?;
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut rules: Vec<TextRule> = Vec::new();
        let mut tokens_seen = vec![0usize; self.modalities.len()];
        for (range, labelled) in segments {
            let segment = text.get(range.clone()).ok_or_else(|| {
                Error::msg(format!(
                    "assistant range {range:?} does not fall on character boundaries"
                ))
            })?;
            for piece in split_at_modality_tokens(segment, &self.modalities) {
                match piece {
                    Piece::Text(piece_text) => push_text(&mut chunks, piece_text, *labelled),
                    Piece::Modality(modality) => {
                        let item_index = tokens_seen[modality];
                        tokens_seen[modality] += 1;
                        let layout = self.item_layout(modality, item_index, items)?;
                        for rule in layout.text_rules() {
                            if !rules.contains(rule) {
                                rules.push(rule.clone());
                            }
                        }
                        let mut offset = 0;
                        for part in layout.parts() {
                            match part {
                                LayoutPart::Text(layout_text) => {
                                    push_text(&mut chunks, layout_text, Labelled::No);
                                }
                                LayoutPart::Slots(len) => {
                                    // Checked before any placeholder is written: a run
                                    // longer than the context can never be kept.
                                    if let Some(max) = self.config.model_max_length.filter(|&max| offset + len > max) {
                                        return Err(Error::msg(format!(
                                            "item {} of {} takes more than {max} positions, the longest sequence kept",
                                            item_index + 1,
                                            self.modalities[modality].token
                                        )));
                                    }
                                    chunks.push(Chunk::Slots { modality, item_index, offset, len: *len, grid: layout.grid() });
                                    offset += len;
                                }
                            }
                        }
                    }
                }
            }
        }
        self.check_item_counts(&tokens_seen, items)?;
        rules.sort_by_key(TextRule::rank);
        let mut prepared = PreparedInput::default();
        for chunk in chunks {
            match chunk {
                Chunk::Text(mut chunk_text, labelled) => {
                    for rule in &rules {
                        chunk_text = rule.apply(&chunk_text);
                    }
                    let ids = self.encode_marked(&chunk_text)?;
                    let labels = ids.iter().map(|&id| match labelled {
                        Labelled::Yes => i64::from(id),
                        Labelled::No => IGNORE_INDEX,
                    });
                    prepared.labels.extend(labels);
                    prepared.input_ids.extend(ids);
                }
                Chunk::Slots { modality, item_index, offset, len, grid } => {
                    prepared.spans.push(PlaceholderSpan {
                        modality,
                        item_index,
                        item_offset: offset,
                        start: prepared.input_ids.len(),
                        len,
                        grid,
                    });
                    prepared
                        .input_ids
                        .extend(std::iter::repeat_n(self.config.placeholder_id, len));
                    prepared.labels.extend(std::iter::repeat_n(IGNORE_INDEX, len));
                }
            }
        }
        self.add_leading_special_tokens(&mut prepared);
        self.truncate(&mut prepared)?;
        Ok(prepared)
    }

    /// The layout of the `item_index`-th item of `modality`: from the layout
    /// source when there is one and the item was given (a missing item fails
    /// the count check afterwards), else one run of `token_width` slots.
    fn item_layout(&self, modality: usize, item_index: usize, items: &ItemsByKey) -> Result<ItemLayout> {
        let token = &self.modalities[modality];
        let item = items.get(&token.data_key).and_then(|given| given.get(item_index));
        match (&self.layouts, item) {
            (Some(source), Some(item)) => source.layout(modality, item).map_err(|error| {
                Error::msg(format!("{} item {}: {error}", token.data_key, item_index + 1))
            }),
            _ => Ok(ItemLayout::fixed(token.token_width)),
        }
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|error| Error::Tokenizer(error.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Encodes text in which [`LITERAL_START`]..[`LITERAL_END`] stretches are
    /// plain text even where they spell special tokens.
    fn encode_marked(&self, text: &str) -> Result<Vec<u32>> {
        if !text.contains([LITERAL_START, LITERAL_END]) {
            return self.encode(text);
        }
        let plain = |piece: &str| piece.replace(LITERAL_END, "");
        let mut ids = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find(LITERAL_START) {
            let before = plain(&rest[..open]);
            if !before.is_empty() {
                ids.extend(self.encode(&before)?);
            }
            let after = &rest[open + LITERAL_START.len_utf8()..];
            let (literal, next) = match after.find(LITERAL_END) {
                Some(close) => (&after[..close], &after[close + LITERAL_END.len_utf8()..]),
                None => (after, ""),
            };
            if !literal.is_empty() {
                let tokenizer = self.literal_tokenizer.get_or_init(|| {
                    let mut tokenizer = self.tokenizer.clone();
                    tokenizer.set_encode_special_tokens(true);
                    tokenizer
                });
                let encoding = tokenizer
                    .encode(literal, false)
                    .map_err(|error| Error::Tokenizer(error.to_string()))?;
                ids.extend_from_slice(encoding.get_ids());
            }
            rest = next;
        }
        let tail = plain(rest);
        if !tail.is_empty() {
            ids.extend(self.encode(&tail)?);
        }
        Ok(ids)
    }

    fn check_item_keys(&self, items: &ItemsByKey) -> Result<()> {
        for (key, values) in items {
            if !values.is_empty()
                && !self
                    .modalities
                    .iter()
                    .any(|modality| &modality.data_key == key)
            {
                let known: Vec<&str> = self
                    .modalities
                    .iter()
                    .map(|modality| modality.data_key.as_str())
                    .collect();
                return Err(Error::msg(format!(
                    "{} `{key}` item(s) given but no modality of this model reads `{key}`; it reads: {}",
                    values.len(),
                    if known.is_empty() { "nothing".to_string() } else { known.join(", ") }
                )));
            }
        }
        Ok(())
    }

    fn check_item_counts(&self, tokens_seen: &[usize], items: &ItemsByKey) -> Result<()> {
        for (modality, &tokens) in self.modalities.iter().zip(tokens_seen) {
            let given = items.get(&modality.data_key).map_or(0, Vec::len);
            if given != tokens {
                return Err(Error::ItemCountMismatch {
                    token: modality.token.clone(),
                    data_key: modality.data_key.clone(),
                    tokens,
                    items: given,
                });
            }
        }
        Ok(())
    }

    fn add_leading_special_tokens(&self, prepared: &mut PreparedInput) {
        let add = match self.config.leading_special_tokens {
            LeadingSpecialTokens::TemplateOnly => false,
            LeadingSpecialTokens::AddOnce => true,
            LeadingSpecialTokens::AddOnceIfMissing => {
                !prepared.input_ids.starts_with(&self.leading_ids)
            }
        };
        if !add || self.leading_ids.is_empty() {
            return;
        }
        let shift = self.leading_ids.len();
        prepared
            .input_ids
            .splice(0..0, self.leading_ids.iter().copied());
        prepared
            .labels
            .splice(0..0, std::iter::repeat_n(IGNORE_INDEX, shift));
        for span in &mut prepared.spans {
            span.start += shift;
        }
    }

    /// Keeps the first `model_max_length` positions. Items wholly past the cut
    /// are dropped; an item the cut would split (inside one of its slot runs,
    /// or between two runs of the same item) rejects the row.
    fn truncate(&self, prepared: &mut PreparedInput) -> Result<()> {
        let Some(max_length) = self.config.model_max_length else {
            return Ok(());
        };
        if prepared.input_ids.len() <= max_length {
            return Ok(());
        }
        for span in &prepared.spans {
            let (start, end) = item_extent(&prepared.spans, span);
            if start < max_length && end > max_length {
                return Err(Error::PlaceholderCut {
                    token: self.modalities[span.modality].token.clone(),
                    item_index: span.item_index,
                    start,
                    end,
                    max_length,
                });
            }
        }
        prepared.spans.retain(|span| span.end() <= max_length);
        prepared.truncated_from = Some(prepared.input_ids.len());
        prepared.input_ids.truncate(max_length);
        prepared.labels.truncate(max_length);
        Ok(())
    }
}

/// First and one-past-last position of all slot runs of `span`'s item.
fn item_extent(spans: &[PlaceholderSpan], span: &PlaceholderSpan) -> (usize, usize) {
    spans
        .iter()
        .filter(|other| other.modality == span.modality && other.item_index == span.item_index)
        .fold((span.start, span.end()), |(start, end), other| {
            (start.min(other.start), end.max(other.end()))
        })
}

/// A stretch of the prompt before tokenising: text (prompt text and layout
/// text joined, so it is tokenised as the Python processors tokenise the whole
/// string) or a run of one item's slots.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    Text(String, Labelled),
    Slots { modality: usize, item_index: usize, offset: usize, len: usize, grid: Option<[usize; 3]> },
}

/// Appends text, joining it to a preceding text chunk with the same labelling.
fn push_text(chunks: &mut Vec<Chunk>, text: &str, labelled: Labelled) {
    if text.is_empty() {
        return;
    }
    if let Some(Chunk::Text(last, last_labelled)) = chunks.last_mut() {
        if *last_labelled == labelled {
            last.push_str(text);
            return;
        }
    }
    chunks.push(Chunk::Text(text.to_string(), labelled));
}


/// Whether a stretch of text is learned (assistant turn) or only read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Labelled {
    Yes,
    No,
}

/// A stretch of text between modality tokens, or one modality token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    /// Index into the modality list.
    Modality(usize),
}

/// Splits `text` at every modality token, leftmost first; at one position the
/// longest token wins so that `<image>` never shadows `<image_hd>`. Empty text
/// pieces are left out (multi_token skips them too).
fn split_at_modality_tokens<'a>(text: &'a str, modalities: &[ModalityToken]) -> Vec<Piece<'a>> {
    let mut pieces = Vec::new();
    let mut rest = text;
    loop {
        let next = modalities
            .iter()
            .enumerate()
            .filter_map(|(index, modality)| {
                rest.find(&modality.token)
                    .map(|at| (at, modality.token.len(), index))
            })
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let Some((at, token_len, modality)) = next else {
            break;
        };
        if at > 0 {
            pieces.push(Piece::Text(&rest[..at]));
        }
        pieces.push(Piece::Modality(modality));
        rest = &rest[at + token_len..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    pieces
}

/// The ids a tokenizer's post-processor puts before a single sequence, found
/// by encoding a probe with and without special tokens.
fn leading_special_ids(tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let probe = "x";
    let with = tokenizer
        .encode(probe, true)
        .map_err(|error| Error::Tokenizer(error.to_string()))?;
    let without = tokenizer
        .encode(probe, false)
        .map_err(|error| Error::Tokenizer(error.to_string()))?;
    let (with, without) = (with.get_ids(), without.get_ids());
    let position =
        (0..=with.len().saturating_sub(without.len())).find(|&at| with[at..].starts_with(without));
    Ok(position.map(|at| with[..at].to_vec()).unwrap_or_default())
}

/// A modality whose items enter the prompt as text rather than embeddings, e.g.
/// `<transcript>`: the transcript of an audio clip (multi_token's
/// `WhisperTranscriptModality`). It is not a [`Modality`]: it has no encoder,
/// projector or placeholder span. [`substitute_text_items`] replaces its tokens in
/// the messages before the [`InputPreparer`] tokenises them.
pub trait TextModality: Send + Sync {
    /// Builder name, e.g. `audio_whisper_transcript`.
    fn name(&self) -> &str;
    /// The token in the text, e.g. `<transcript>`.
    fn token(&self) -> &str;
    /// The row key of its items, e.g. `transcript_audios`.
    fn data_key(&self) -> &str;
    /// The text that replaces one item's token.
    fn to_text(&self, item: &Item) -> Result<String>;
}

/// Replaces, for each text modality, the k-th occurrence of its token (counted
/// through `messages` in order) with the text of its k-th item, and removes its
/// items from `items`, leaving the embedding modalities' items for the preparer.
///
/// Fails with [`Error::ItemCountMismatch`] when the numbers of tokens and items
/// differ (before any item is converted). Inserted text is not scanned again, so
/// a transcript that happens to contain a token is kept as plain text only if no
/// embedding modality uses that token.
pub fn substitute_text_items(
    messages: &mut [Message],
    items: &mut ItemsByKey,
    modalities: &[&dyn TextModality],
) -> Result<()> {
    for modality in modalities {
        let token = modality.token();
        if token.is_empty() {
            return Err(Error::msg(format!(
                "text modality `{}` has an empty token",
                modality.name()
            )));
        }
        let tokens: usize = messages
            .iter()
            .map(|message| message.content.matches(token).count())
            .sum();
        let given = items.get(modality.data_key()).map_or(0, Vec::len);
        if tokens != given {
            return Err(Error::ItemCountMismatch {
                token: token.to_string(),
                data_key: modality.data_key().to_string(),
                tokens,
                items: given,
            });
        }
        let texts = items
            .remove(modality.data_key())
            .unwrap_or_default()
            .iter()
            // An item boundary like `encode_item`'s: a panic in the modality's
            // code (a decoder asserting on a hostile file) is this item's error.
            .map(|item| crate::registry::guard(modality.name(), "turning an item into text", || modality.to_text(item)))
            .collect::<Result<Vec<_>>>()?;
        let mut texts = texts.into_iter();
        for message in messages.iter_mut() {
            if !message.content.contains(token) {
                continue;
            }
            let mut out = String::with_capacity(message.content.len());
            let mut pieces = message.content.split(token);
            out.push_str(pieces.next().unwrap_or_default());
            for piece in pieces {
                out.push_str(&texts.next().unwrap_or_default());
                out.push_str(piece);
            }
            message.content = out;
        }
    }
    Ok(())
}

#[cfg(test)]
mod text_modality_tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    struct Upper;

    impl TextModality for Upper {
        fn name(&self) -> &str {
            "upper"
        }
        fn token(&self) -> &str {
            "<transcript>"
        }
        fn data_key(&self) -> &str {
            "transcript_audios"
        }
        fn to_text(&self, item: &Item) -> Result<String> {
            match item {
                Item::Text(text) if text == "panic" => panic!("a decoder asserted"),
                Item::Text(text) => Ok(text.to_uppercase()),
                other => Err(Error::msg(format!("not text: {other:?}"))),
            }
        }
    }

    fn items(texts: &[&str]) -> ItemsByKey {
        let mut items = ItemsByKey::new();
        items.insert(
            "transcript_audios".into(),
            texts.iter().map(|t| Item::Text((*t).into())).collect(),
        );
        items.insert("images".into(), vec![Item::Text("kept".into())]);
        items
    }

    #[test]
    fn tokens_are_replaced_in_order_across_messages() {
        let mut messages = vec![
            Message::system("a <transcript> b"),
            Message::user("<image> <transcript><transcript>!"),
        ];
        let mut items = items(&["one", "two", "three"]);
        substitute_text_items(&mut messages, &mut items, &[&Upper]).unwrap();
        assert_eq!(messages[0].content, "a ONE b");
        assert_eq!(messages[1].content, "<image> TWOTHREE!");
        assert!(!items.contains_key("transcript_audios"));
        assert_eq!(items["images"].len(), 1);
    }

    #[test]
    fn count_mismatch_and_item_errors_are_reported() {
        let mut messages = vec![Message::user("<transcript>")];
        let mut two = items(&["one", "two"]);
        match substitute_text_items(&mut messages, &mut two, &[&Upper]) {
            Err(Error::ItemCountMismatch {
                tokens: 1,
                items: 2,
                ..
            }) => {}
            other => panic!("expected a count mismatch, got {other:?}"),
        }
        assert_eq!(messages[0].content, "<transcript>");
        let mut bad = ItemsByKey::new();
        bad.insert("transcript_audios".into(), vec![Item::Bytes(vec![1])]);
        let error = substitute_text_items(&mut messages, &mut bad, &[&Upper]).unwrap_err();
        assert!(error.to_string().contains("not text"), "{error}");
        // A panic in the modality is the item's error (issue 23).
        let mut panics = items(&["panic"]);
        let error = substitute_text_items(&mut messages, &mut panics, &[&Upper]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "modality `upper` panicked while turning an item into text: a decoder asserted"
        );
    }
}

#[cfg(test)]
mod tests;
