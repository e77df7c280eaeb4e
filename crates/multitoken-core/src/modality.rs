//! The `Modality` trait: how an encoder plugs into multitoken.

use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::{ProjectorSpec, Result};

/// One item given to a modality: an image, an audio clip, a document.
///
/// URLs are fetched only by the CLI/server layer, never by a modality.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A file on disk.
    Path(PathBuf),
    /// Raw file bytes.
    Bytes(Vec<u8>),
    /// Inline text (documents).
    Text(String),
}

/// Checks, without opening it, that `path` is a regular file: opening a FIFO
/// blocks until something writes to it, and a directory or a device is never an
/// item, a dataset or a document. The error says which it is (missing, a
/// directory, or another kind of file); callers add the path.
pub fn check_regular_file(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        return Ok(());
    }
    let what = if meta.is_dir() {
        "is a directory, not a file"
    } else {
        "is not a regular file (a FIFO, socket or device)"
    };
    Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, what))
}

/// One part of an item's place in the token stream ([`ItemLayout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutPart {
    /// Text tokenized with the model's tokenizer together with the prompt text
    /// around it, e.g. Idefics2's `<fake_token_around_image>`.
    Text(String),
    /// A run of embedding slots, filled in order by the item's projected rows.
    Slots(usize),
}

/// A rewrite of the prompt text that a model's processor applies after it has
/// put its items' text in ([`ItemLayout::with_text_rule`]). The preparer
/// applies the rules of every item of a row to the whole text of that row, in
/// the order of this enum's variants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextRule {
    /// Every doubled `text` becomes one, in one pass (Idefics2's
    /// `replace(fake + fake, fake)` for `<fake_token_around_image>` between
    /// adjacent images).
    CollapseRepeats(String),
    /// A space goes after `text` when the next character is neither whitespace
    /// nor `<` (Idefics2 keeps a word written right after an image aligned to
    /// a word boundary: `<image>What` is tokenised as `… What`).
    SpaceAfter(String),
}

/// What one item puts in the token stream where its modality token stands:
/// text pieces and runs of embedding slots.
///
/// A fixed-width modality (CLIP, Whisper, documents) is one run of
/// `token_width` slots ([`ItemLayout::fixed`]); Idefics2 wraps each crop's 64
/// slots in `<fake_token_around_image>`, SmolVLM adds `<row_1_col_2>` tokens and
/// LLaVA-NeXT / Qwen2-VL give each image a number of slots that depends on its
/// size. The preparer joins an item's text with the prompt text next to it
/// before tokenising, as the Python processors do (they replace the token by a
/// string and tokenise the whole prompt), so the ids equal theirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemLayout {
    parts: Vec<LayoutPart>,
    rules: Vec<TextRule>,
    grid: Option<[usize; 3]>,
}

impl ItemLayout {
    /// One run of `width` slots and no text: a fixed-width modality.
    pub fn fixed(width: usize) -> Self {
        Self { parts: vec![LayoutPart::Slots(width)], rules: Vec::new(), grid: None }
    }

    /// A layout from its parts. Fails when it has no slot at all or an empty
    /// slot run (an item that puts nothing into the LM is a modality bug).
    pub fn new(parts: Vec<LayoutPart>) -> Result<Self> {
        if parts.iter().any(|part| matches!(part, LayoutPart::Slots(0))) {
            return Err(crate::Error::msg("an item layout has an empty run of slots"));
        }
        if !parts.iter().any(|part| matches!(part, LayoutPart::Slots(_))) {
            return Err(crate::Error::msg("an item layout has no embedding slots"));
        }
        Ok(Self { parts, rules: Vec::new(), grid: None })
    }

    /// Adds a rewrite of the row's text that this item's processor applies.
    pub fn with_text_rule(mut self, rule: TextRule) -> Self {
        if !self.rules.contains(&rule) {
            self.rules.push(rule);
        }
        self
    }

    /// Gives the item's slots a position grid `[t, h, w]` in LM slots (after
    /// any spatial merge), for LMs with multimodal rotary positions (Qwen2-VL's
    /// M-RoPE): slot `(t, h, w)` gets the position streams `(t, h, w)` offset
    /// by the text before it. The layout must be one run of `t * h * w` slots
    /// (text parts around it are fine).
    pub fn with_grid(mut self, grid: [usize; 3]) -> Result<Self> {
        let runs: Vec<usize> = self
            .parts
            .iter()
            .filter_map(|part| match part {
                LayoutPart::Slots(n) => Some(*n),
                LayoutPart::Text(_) => None,
            })
            .collect();
        let cells = grid.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        match (runs.as_slice(), cells) {
            ([run], Some(cells)) if cells == *run => {
                self.grid = Some(grid);
                Ok(self)
            }
            ([run], _) => Err(crate::Error::msg(format!(
                "an item's position grid {grid:?} does not cover its {run} slots"
            ))),
            _ => Err(crate::Error::msg(format!(
                "an item with a position grid must have one run of slots, this one has {}",
                runs.len()
            ))),
        }
    }

    /// The item's position grid `[t, h, w]` ([`Self::with_grid`]), if any.
    pub fn grid(&self) -> Option<[usize; 3]> {
        self.grid
    }

    /// Shorthand for `with_text_rule(TextRule::CollapseRepeats(text))`.
    pub fn with_collapsed_repeats(self, text: impl Into<String>) -> Self {
        self.with_text_rule(TextRule::CollapseRepeats(text.into()))
    }

    /// The parts, in order.
    pub fn parts(&self) -> &[LayoutPart] {
        &self.parts
    }

    /// The text rules ([`Self::with_text_rule`]).
    pub fn text_rules(&self) -> &[TextRule] {
        &self.rules
    }

    /// Total number of embedding slots: the rows the item's projected
    /// embeddings must have.
    pub fn slots(&self) -> usize {
        self.parts
            .iter()
            .map(|part| match part {
                LayoutPart::Slots(n) => *n,
                LayoutPart::Text(_) => 0,
            })
            .sum()
    }
}

impl TextRule {
    /// Applies the rule to `text`.
    pub fn apply(&self, text: &str) -> String {
        match self {
            // One left-to-right pass, as Python's `str.replace`: three in a row
            // become two.
            TextRule::CollapseRepeats(repeat) if !repeat.is_empty() => text.replace(&repeat.repeat(2), repeat),
            TextRule::SpaceAfter(marker) if !marker.is_empty() => {
                let mut out = String::with_capacity(text.len() + 8);
                let mut rest = text;
                while let Some(at) = rest.find(marker.as_str()) {
                    let end = at + marker.len();
                    out.push_str(&rest[..end]);
                    rest = &rest[end..];
                    if rest.chars().next().is_some_and(|c| !c.is_whitespace() && c != '<') {
                        out.push(' ');
                    }
                }
                out.push_str(rest);
                out
            }
            _ => text.to_string(),
        }
    }

    /// Order in which rules of different kinds are applied.
    pub(crate) fn rank(&self) -> u8 {
        match self {
            TextRule::CollapseRepeats(_) => 0,
            TextRule::SpaceAfter(_) => 1,
        }
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    fn check(rule: TextRule, input: &str, expect: &str) {
        assert_eq!(rule.apply(input), expect, "{rule:?} on {input:?}");
    }

    #[test]
    fn text_rules_rewrite_as_idefics2_does() {
        let fake = || "<fake>".to_string();
        check(TextRule::CollapseRepeats(fake()), "a<fake><fake>b<fake><fake><fake>", "a<fake>b<fake><fake>");
        check(TextRule::SpaceAfter(fake()), "<fake>What<fake> x<fake><fake>\n<fake>", "<fake> What<fake> x<fake><fake>\n<fake>");
        check(TextRule::SpaceAfter(String::new()), "abc", "abc");
    }

    #[test]
    fn layouts_count_slots_and_reject_empty_runs() {
        let layout = ItemLayout::new(vec![
            LayoutPart::Text("<fake>".into()),
            LayoutPart::Slots(3),
            LayoutPart::Text("<fake>".into()),
            LayoutPart::Slots(2),
        ]);
        assert_eq!(layout.map(|l| l.slots()).ok(), Some(5));
        assert!(ItemLayout::new(vec![LayoutPart::Slots(0)]).is_err());
        assert!(ItemLayout::new(vec![LayoutPart::Text("x".into())]).is_err());
        assert_eq!(ItemLayout::fixed(7).slots(), 7);
    }

    #[test]
    fn json_items_are_paths_or_inline_text() {
        let base = Path::new("/data");
        let read = |value: serde_json::Value, inline| item_from_json(&value, base, inline).map_err(|e| e.to_string());
        assert_eq!(read(serde_json::json!("a.png"), false), Ok(Item::Path(PathBuf::from("/data/a.png"))));
        assert_eq!(read(serde_json::json!("no such file"), true), Ok(Item::Text("no such file".into())));
        assert_eq!(read(serde_json::json!([1, 2.5]), true), Ok(Item::Text("[1,2.5]".into())));
        assert!(read(serde_json::json!([1]), false).is_err_and(|e| e.contains("no inline items")));
        assert!(read(serde_json::json!("https://x/a.png"), true).is_err_and(|e| e.contains("URL")));
        let weights = EncoderWeights::at("tower").with_default(".");
        assert_eq!(weights.dir_in(base, &serde_json::json!({"tower": "clip"})), Some(PathBuf::from("/data/clip")));
        assert_eq!(weights.dir_in(base, &serde_json::json!({})), Some(PathBuf::from("/data/.")));
        assert_eq!(EncoderWeights::at("x").dir_in(base, &serde_json::Value::Null), None);
    }

    #[test]
    fn grids_must_cover_the_single_slot_run() {
        let one = ItemLayout::new(vec![LayoutPart::Text("<s>".into()), LayoutPart::Slots(12)]).map(|l| l.with_grid([1, 3, 4]));
        assert_eq!(one.ok().and_then(|l| l.ok()).and_then(|l| l.grid()), Some([1, 3, 4]));
        assert!(ItemLayout::fixed(12).with_grid([1, 3, 3]).is_err());
        assert!(ItemLayout::fixed(12).grid().is_none());
        let two = ItemLayout::new(vec![LayoutPart::Slots(6), LayoutPart::Slots(6)]);
        assert!(two.map(|l| l.with_grid([1, 3, 4]).is_err()).unwrap_or(false));
    }
}

/// The kind of media a modality's items are. A server picks its per-item
/// limits by it (pixels of an image, seconds of audio, pages of a PDF) and the
/// OpenAI content part that reaches the modality (`image_url`, `input_audio`,
/// `file`); `Other` items get no media-specific limit and are reached through
/// the generic `input_item` part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ItemMedia {
    /// Still images (PNG, JPEG, ...).
    Image,
    /// Audio clips (WAV, MP3, FLAC, ...).
    Audio,
    /// Documents (PDF or text).
    Document,
    /// Anything else: the modality validates its items itself
    /// ([`Modality::check_item`]).
    #[default]
    Other,
}

/// Where a modality's encoder weights live: the key of the modality's config
/// (in `multitoken.json`) that names the weights directory, relative to the
/// model directory. Training saves a trained encoder into a new directory and
/// points this key at it; a frozen encoder's key is pointed at the original.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderWeights {
    /// The config key naming the directory, e.g. `tower`.
    pub config_key: String,
    /// The directory used when the config leaves the key out (relative to the
    /// model directory), if the builder has such a default.
    pub default_dir: Option<String>,
    /// The safetensors file in that directory a trained encoder's variables
    /// (`ModalityContext::trainable`, keyed as the builder created them) are
    /// saved as; `model.safetensors` unless [`EncoderWeights::with_file`].
    pub weights_file: String,
}

impl EncoderWeights {
    /// Weights named by `config_key`, with no default directory, saved as
    /// `model.safetensors`.
    pub fn at(config_key: impl Into<String>) -> Self {
        Self { config_key: config_key.into(), default_dir: None, weights_file: "model.safetensors".to_string() }
    }

    /// Sets the file name a trained encoder is saved as in its directory.
    pub fn with_file(mut self, file: impl Into<String>) -> Self {
        self.weights_file = file.into();
        self
    }

    /// Adds the directory used when the config leaves the key out.
    pub fn with_default(mut self, dir: impl Into<String>) -> Self {
        self.default_dir = Some(dir.into());
        self
    }

    /// The directory `config` names (or the default), resolved against
    /// `model_dir`; `None` when neither says.
    pub fn dir_in(&self, model_dir: &Path, config: &serde_json::Value) -> Option<PathBuf> {
        let relative = config.get(&self.config_key).and_then(serde_json::Value::as_str).or(self.default_dir.as_deref())?;
        Some(model_dir.join(relative))
    }
}

/// The default reading of one dataset/request item given as JSON
/// ([`Modality::item_from_json`]): a string is a file path relative to `base`
/// (URLs are refused: only the CLI/server layer fetches), and when `inline` is
/// set a string that names no file is the item's text and any other JSON value
/// (numbers, lists, objects) is the item's text as compact JSON, which the
/// modality parses in [`Modality::preprocess`].
pub fn item_from_json(value: &serde_json::Value, base: &Path, inline: bool) -> Result<Item> {
    match value {
        serde_json::Value::String(s) if s.starts_with("http://") || s.starts_with("https://") => Err(crate::Error::msg(format!(
            "`{s}` is a URL; items are read from local files only (download it first)"
        ))),
        serde_json::Value::String(s) => {
            let path = base.join(s);
            if inline && !path.is_file() {
                Ok(Item::Text(s.clone()))
            } else {
                Ok(Item::Path(path))
            }
        }
        other if inline => Ok(Item::Text(other.to_string())),
        other => Err(crate::Error::msg(format!(
            "an item must be a file path (a string), got {other}; this modality takes no inline items"
        ))),
    }
}

/// A pluggable encoder for one kind of input.
///
/// Fixed-width modalities implement the required methods only. A modality whose
/// items take a number of positions that depends on the item, or that wraps
/// them in text, also implements [`Modality::layout`] and, when one item is
/// encoded as several pieces (crops, tiles), [`Modality::encode_item`].
pub trait Modality: Send + Sync {
    /// Builder name, e.g. `vision_clip`.
    fn name(&self) -> &str;
    /// The token that stands for one item in the text, e.g. `<image>`.
    fn token(&self) -> &str;
    /// The dataset row key that lists the items, e.g. `images`.
    fn data_key(&self) -> &str;
    /// Number of LM positions one item occupies; for a modality of variable
    /// width, the positions of a typical item (used only for reports: the
    /// prompt counts [`Modality::layout`]'s slots).
    fn token_width(&self) -> usize;
    /// Width of the encoder features fed to the projector.
    fn feature_dim(&self) -> usize;
    /// CPU work on one item: decode, resize/normalize, resample, log-mel, chunk.
    fn preprocess(&self, item: &Item) -> Result<Tensor>;
    /// The frozen encoder on a batch of preprocessed items.
    fn encode(&self, batch: &Tensor) -> Result<Tensor>;
    /// The projector that maps this modality's features into the LM's
    /// embedding space (built with [`crate::Projector::load`]).
    fn projector(&self) -> ProjectorSpec;

    /// Where one item goes in the token stream. The default is one run of
    /// [`Modality::token_width`] slots. Called before any encoding, so it should
    /// be cheap (an image's size from its header, never a decode of the pixels
    /// when that can be avoided).
    fn layout(&self, item: &Item) -> Result<ItemLayout> {
        let _ = item;
        Ok(ItemLayout::fixed(self.token_width()))
    }

    /// Encodes one preprocessed item (the output of [`Modality::preprocess`])
    /// into the pieces its projector maps one at a time, each
    /// `[1, positions, feature_dim]` (or `[1, feature_dim]` for a pooled
    /// vector): the projected rows of all pieces, in order, fill the item's
    /// layout slots. The default is one piece, `encode` on a batch of one.
    fn encode_item(&self, preprocessed: &Tensor) -> Result<Vec<Tensor>> {
        Ok(vec![self.encode(&preprocessed.unsqueeze(0)?)?])
    }

    /// The kind of media the items are ([`ItemMedia`]): picks a server's
    /// per-item limits and OpenAI content part. The default is `Other`.
    fn media(&self) -> ItemMedia {
        ItemMedia::Other
    }

    /// Where the encoder's weights live, so that `train --train-encoders NAME`
    /// can save them and a trained model's config points at them. `None` (the
    /// default) means the encoder cannot be trained; a frozen one still works.
    fn encoder_weights(&self) -> Option<EncoderWeights> {
        None
    }

    /// Whether items may be given inline rather than as files: a dataset
    /// string that names no file, or a JSON number/list/object, becomes
    /// [`Item::Text`] (JSON as compact text). The default is files only.
    fn inline_items(&self) -> bool {
        false
    }

    /// Reads one item of a dataset row (`base` is the dataset's directory).
    /// The default is [`item_from_json`] with [`Modality::inline_items`].
    fn item_from_json(&self, value: &serde_json::Value, base: &Path) -> Result<Item> {
        item_from_json(value, base, self.inline_items())
    }

    /// A cheap check of one item before it is queued (a server calls it on
    /// every item of a request, after its media limits): e.g. a size or a
    /// header. The default accepts everything; `preprocess` reports the rest.
    fn check_item(&self, item: &Item) -> Result<()> {
        let _ = item;
        Ok(())
    }

    /// [`Modality::check_item`] under a server's [`ItemLimits`] as well as the
    /// modality's own bounds: a modality whose items have pages (or another
    /// bounded quantity the limits name) counts them from the parsed item, not
    /// from a byte search a crafted file can defeat. The default ignores the
    /// limits and calls `check_item`.
    fn check_item_within(&self, item: &Item, limits: &ItemLimits) -> Result<()> {
        let _ = limits;
        self.check_item(item)
    }
}

/// Bounds a caller (a server's `--max-document-pages`, say) puts on items on
/// top of each modality's own; `None` leaves the modality's bound alone.
/// Modalities read them in [`Modality::check_item_within`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ItemLimits {
    /// Most pages of a paged document (a PDF), counted from its page tree.
    pub max_document_pages: Option<usize>,
}
