//! The `<document>` modality: multi_token's `document_gte`, and `document_minilm`
//! with all-MiniLM-L6-v2 as the default encoder.
//!
//! An item (a path, bytes or inline text) is extracted to text, cut into encoder
//! windows, and each window embedded by the sentence encoder; the window
//! embeddings become the document's features in one of two `pooling` modes:
//!
//! - `mean` (multi_token): averaged into one vector per document, which the vector
//!   projector turns into `num_tokens` LM positions; `[n, feature_dim]`;
//! - `chunks`: one token group per chunk, up to `max_chunks`; `[n, max_chunks,
//!   feature_dim]`, one LM position each through a per-position `mlp{num_layers}x_gelu`
//!   projector, so the token width is `max_chunks` for every document. The fixed width
//!   comes from adaptive average pooling along the chunk axis (torch's
//!   `adaptive_avg_pool1d` ranges): a document with more chunks has consecutive chunks
//!   averaged into `max_chunks` groups (nothing is dropped); one with fewer has its
//!   chunks repeated in order to fill the positions (a 1-chunk document repeats it
//!   `max_chunks` times). Each group is re-normalised when the encoder normalises.
//!
//! `preprocess` gives the token windows of one document as a `u32` tensor
//! `[chunks, 2, seq]` (row 0 the ids, row 1 the attention mask); `encode` takes a
//! batch `[n, chunks, 2, seq]` (documents with fewer chunks padded with all-zero
//! masks, which are skipped) and gives `[n, feature_dim]` (`mean`) or
//! `[n, max_chunks, feature_dim]` (`chunks`).

use candle_core::{DType, Device, IndexOp, Tensor};
use multitoken_core::{Item, Modality, ModalityContext, ProjectorSpec};
use serde::Deserialize;

use crate::chunk::ChunkConfig;
use crate::encoder::SentenceEncoder;
use crate::extract::{describe_item, extract_item, ExtractConfig, DEFAULT_MAX_BYTES};
use crate::{Error, Result};

/// The modality's token.
pub const DOCUMENT_TOKEN: &str = "<document>";
/// The dataset key of its items.
pub const DOCUMENT_DATA_KEY: &str = "documents";

/// The modality's config, as written in `multitoken.json`:
///
/// ```json
/// {"encoder": "document_encoder", "chunk_tokens": 512, "chunk_overlap": 32,
///  "pooling": "mean", "num_tokens": 4, "num_layers": 2, "max_bytes": 16777216,
///  "max_pages": 2000, "max_pdf_stream_bytes": 16777216, "max_text_bytes": 16777216}
/// ```
///
/// `encoder` is a sentence-transformers directory, relative to the model
/// directory (or absolute).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentConfig {
    /// The sentence-transformers model directory.
    pub encoder: Option<String>,
    /// Tokens per chunk, special tokens included; default: the encoder's
    /// `max_seq_length`.
    #[serde(default)]
    pub chunk_tokens: Option<usize>,
    /// Tokens shared by consecutive chunks.
    #[serde(default = "default_overlap")]
    pub chunk_overlap: usize,
    /// How chunk embeddings become the item's features: `mean` (one vector per
    /// document, multi_token's behaviour) or `chunks` (one token group per chunk, up
    /// to `max_chunks`; see the module docs for the padding rule).
    #[serde(default = "default_pooling")]
    pub pooling: String,
    /// LM positions per document in `mean` mode (multi_token: 4; its x16 variant: 32).
    #[serde(default = "default_num_tokens")]
    pub num_tokens: usize,
    /// LM positions per document in `chunks` mode (one per chunk group).
    #[serde(default = "default_max_chunks")]
    pub max_chunks: usize,
    /// Linear layers in each of the vector projector's MLPs.
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    /// Documents over this many bytes are rejected.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// PDFs with more pages are rejected.
    #[serde(default = "default_max_pages")]
    pub max_pages: usize,
    /// PDFs whose compressed streams inflate to more bytes are rejected.
    #[serde(default = "default_max_pdf_stream_bytes")]
    pub max_pdf_stream_bytes: u64,
    /// PDFs with more bytes of text are rejected.
    #[serde(default = "default_max_text_bytes")]
    pub max_text_bytes: u64,
}

fn default_overlap() -> usize {
    ChunkConfig::default().overlap
}
fn default_pooling() -> String {
    "mean".to_string()
}
fn default_num_tokens() -> usize {
    4
}
fn default_max_chunks() -> usize {
    8
}
fn default_num_layers() -> usize {
    2
}
fn default_max_bytes() -> u64 {
    DEFAULT_MAX_BYTES
}
fn default_max_pages() -> usize {
    ExtractConfig::default().max_pages
}
fn default_max_pdf_stream_bytes() -> u64 {
    ExtractConfig::default().max_pdf_stream_bytes
}
fn default_max_text_bytes() -> u64 {
    ExtractConfig::default().max_text_bytes
}

/// The document modality: extraction, chunking and a frozen sentence encoder.
#[derive(Debug)]
pub struct DocumentModality {
    name: &'static str,
    encoder: SentenceEncoder,
    chunking: ChunkConfig,
    extract: ExtractConfig,
    projector: ProjectorSpec,
    /// `Some(max_chunks)` in `chunks` pooling mode.
    chunk_groups: Option<usize>,
}

impl DocumentModality {
    /// Builds the modality registered as `name` from its config: loads the encoder
    /// named by `config.encoder`, resolved against the context's model directory.
    pub fn new(
        name: &'static str,
        config: &DocumentConfig,
        context: &ModalityContext,
    ) -> Result<Self> {
        let encoder_dir = config.encoder.as_deref().ok_or_else(|| {
            Error::Config(format!(
                "{name} needs `encoder`: a sentence-transformers directory, relative to the model \
                 directory"
            ))
        })?;
        let encoder = SentenceEncoder::load_trainable(
            context.resolve(encoder_dir),
            &context.device,
            context.dtype,
            context.trainable.as_ref(),
        )?;
        Self::with_encoder(name, config, encoder)
    }

    /// The modality around an already loaded encoder (`config.encoder` is ignored).
    pub fn with_encoder(
        name: &'static str,
        config: &DocumentConfig,
        encoder: SentenceEncoder,
    ) -> Result<Self> {
        let (projector, chunk_groups) = match config.pooling.as_str() {
            "mean" => (
                ProjectorSpec::VectorMlp {
                    num_layers: config.num_layers,
                    num_tokens: config.num_tokens,
                },
                None,
            ),
            "chunks" if config.max_chunks == 0 => {
                return Err(Error::Config(format!(
                    "{name}: max_chunks must be at least 1"
                )));
            }
            "chunks" => (
                ProjectorSpec::MlpGelu {
                    depth: config.num_layers,
                },
                Some(config.max_chunks),
            ),
            other => {
                return Err(Error::Config(format!(
                    "pooling `{other}` is not supported; use `mean` (one vector per document) or \
                     `chunks` (one token group per chunk, up to max_chunks)"
                )));
            }
        };
        projector
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        let chunking = ChunkConfig {
            max_tokens: config.chunk_tokens,
            overlap: config.chunk_overlap,
        };
        // Fail now, not on the first document, when the chunk settings cannot work.
        encoder.chunk("settings check", &chunking)?;
        Ok(Self {
            name,
            encoder,
            chunking,
            extract: ExtractConfig {
                max_bytes: config.max_bytes,
                max_pages: config.max_pages,
                max_pdf_stream_bytes: config.max_pdf_stream_bytes,
                max_text_bytes: config.max_text_bytes,
            },
            projector,
            chunk_groups,
        })
    }

    /// The sentence encoder.
    pub fn encoder(&self) -> &SentenceEncoder {
        &self.encoder
    }

    /// The extracted, normalised text of an item.
    pub fn extract(&self, item: &Item) -> Result<String> {
        extract_item(item, &self.extract)
    }

    /// Token windows of an item: `[chunks, 2, seq]` u32 (ids, attention mask).
    pub fn windows(&self, item: &Item) -> Result<Tensor> {
        let text = self.extract(item)?;
        let chunks = self.encoder.chunk(&text, &self.chunking)?;
        if chunks.is_empty() {
            return Err(Error::Empty {
                item: describe_item(item),
            });
        }
        pack_windows(&chunks, &Device::Cpu)
    }

    /// Encodes a batch `[n, chunks, 2, seq]` (or one item's `[chunks, 2, seq]`) to
    /// `[n, feature_dim]`.
    pub fn encode_windows(&self, batch: &Tensor) -> Result<Tensor> {
        let batch = match batch.rank() {
            3 => batch.unsqueeze(0)?,
            4 => batch.clone(),
            rank => {
                return Err(Error::Input(format!(
                    "expects preprocessed windows [n, chunks, 2, seq], got rank {rank} shape {:?}",
                    batch.dims()
                )))
            }
        };
        let (n, _, two, _) = batch.dims4()?;
        if two != 2 {
            return Err(Error::Input(format!(
                "expects [n, chunks, 2 (ids, mask), seq], got shape {:?}",
                batch.dims()
            )));
        }
        let batch = batch.to_dtype(DType::U32)?;
        let mut owners = Vec::with_capacity(n);
        let mut sequences = Vec::new();
        for item in 0..n {
            let windows = batch.i(item)?.to_vec3::<u32>()?;
            let start = sequences.len();
            for window in windows {
                let [ids, mask] = window.as_slice() else {
                    continue;
                };
                let len = mask.iter().take_while(|&&m| m != 0).count();
                if len > 0 {
                    sequences.push(ids[..len].to_vec());
                }
            }
            if sequences.len() == start {
                return Err(Error::Input(format!(
                    "document {} of the batch has no windows",
                    item + 1
                )));
            }
            owners.push(start..sequences.len());
        }
        let embeddings = self.encoder.embed_ids(&sequences)?;
        let rows = owners
            .into_iter()
            .map(|range| {
                let chunks = embeddings.narrow(0, range.start, range.len())?;
                match self.chunk_groups {
                    None => self.encoder.combine_chunks(&chunks),
                    Some(width) => self.chunk_group_features(&chunks, width),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// Chunk embeddings `[chunks, dim]` to `[width, dim]`: group `i` combines chunks
    /// `floor(i * chunks / width) .. ceil((i + 1) * chunks / width)` (fewer chunks than
    /// `width` are repeated, more are averaged in consecutive groups).
    pub fn chunk_group_features(&self, chunks: &Tensor, width: usize) -> Result<Tensor> {
        let count = chunks.dim(0)?;
        let rows = chunk_group_ranges(count, width)
            .into_iter()
            .map(|range| {
                self.encoder
                    .combine_chunks(&chunks.narrow(0, range.start, range.len())?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// One document's features: `[feature_dim]` (`mean`) or `[max_chunks, feature_dim]`
    /// (`chunks`): preprocess and encode.
    pub fn embed_item(&self, item: &Item) -> Result<Tensor> {
        Ok(self.encode_windows(&self.windows(item)?)?.squeeze(0)?)
    }
}

/// Adaptive-average-pooling ranges of `count` chunks onto `width` positions.
fn chunk_group_ranges(count: usize, width: usize) -> Vec<std::ops::Range<usize>> {
    (0..width)
        .map(|i| (i * count / width)..((i + 1) * count).div_ceil(width))
        .collect()
}

/// Windows as `[chunks, 2, longest]` u32: ids (padded with 0) and mask.
fn pack_windows(chunks: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let width = chunks.iter().map(Vec::len).max().unwrap_or(0);
    let mut data = Vec::with_capacity(chunks.len() * 2 * width);
    for chunk in chunks {
        data.extend_from_slice(chunk);
        data.extend(std::iter::repeat_n(0u32, width - chunk.len()));
        data.extend(std::iter::repeat_n(1u32, chunk.len()));
        data.extend(std::iter::repeat_n(0u32, width - chunk.len()));
    }
    Ok(Tensor::from_vec(data, (chunks.len(), 2, width), device)?)
}

impl Modality for DocumentModality {
    fn name(&self) -> &str {
        self.name
    }
    fn token(&self) -> &str {
        DOCUMENT_TOKEN
    }
    fn data_key(&self) -> &str {
        DOCUMENT_DATA_KEY
    }
    fn token_width(&self) -> usize {
        self.projector.output_width(self.chunk_groups.unwrap_or(1))
    }
    fn feature_dim(&self) -> usize {
        self.encoder.dim()
    }
    fn preprocess(&self, item: &Item) -> multitoken_core::Result<Tensor> {
        Ok(self.windows(item)?)
    }
    fn encode(&self, batch: &Tensor) -> multitoken_core::Result<Tensor> {
        Ok(self.encode_windows(batch)?)
    }
    fn projector(&self) -> ProjectorSpec {
        self.projector
    }
    fn media(&self) -> multitoken_core::ItemMedia {
        multitoken_core::ItemMedia::Document
    }
    fn encoder_weights(&self) -> Option<multitoken_core::EncoderWeights> {
        Some(multitoken_core::EncoderWeights::at("encoder"))
    }
    /// Documents may be inline text: a server's OpenAI route reads a text
    /// part's string as the document; a dataset row marks it (`{"text": ...}`,
    /// see [`DocumentModality::item_from_json`]).
    /// Size and, for a PDF, pages counted in the parsed page tree (a server
    /// calls it before queueing the item).
    fn check_item(&self, item: &Item) -> multitoken_core::Result<()> {
        Ok(crate::extract::check_document(item, &self.extract)?)
    }

    /// As `check_item`, with a caller's page limit applied when it is the
    /// tighter one (pages are counted in the parsed page tree either way).
    fn check_item_within(&self, item: &Item, limits: &multitoken_core::ItemLimits) -> multitoken_core::Result<()> {
        match limits.max_document_pages {
            Some(pages) if pages < self.extract.max_pages => {
                let config = crate::extract::ExtractConfig {
                    max_pages: pages,
                    ..self.extract
                };
                Ok(crate::extract::check_document(item, &config)?)
            }
            _ => self.check_item(item),
        }
    }

    fn inline_items(&self) -> bool {
        true
    }
    /// A dataset string is always a file path (so a missing file is an error,
    /// never silently trained on as the text of its name); inline text is
    /// written `{"text": "..."}`.
    fn item_from_json(&self, value: &serde_json::Value, base: &std::path::Path) -> multitoken_core::Result<Item> {
        document_item_from_json(value, base)
    }
}

/// A document item of a dataset row or request: a string is a file path
/// relative to `base` (URLs are refused), `{"text": "..."}` is the document's
/// text; anything else is an error saying so.
pub fn document_item_from_json(value: &serde_json::Value, base: &std::path::Path) -> multitoken_core::Result<Item> {
    match value {
        serde_json::Value::String(s) if s.starts_with("http://") || s.starts_with("https://") => Err(multitoken_core::Error::msg(format!(
            "`{s}` is a URL; items are read from local files only (download it first)"
        ))),
        serde_json::Value::String(s) => Ok(Item::Path(base.join(s))),
        serde_json::Value::Object(map) if map.len() == 1 && map.contains_key("text") => match map.get("text") {
            Some(serde_json::Value::String(text)) => Ok(Item::Text(text.clone())),
            _ => Err(multitoken_core::Error::msg(format!("`text` of a document must be a string, got {value}"))),
        },
        other => Err(multitoken_core::Error::msg(format!(
            "a document is a file path (a string) or inline text written {{\"text\": \"...\"}}, got {other}"
        ))),
    }
}

/// Parses a builder config; `null` means all defaults.
fn parse_config(name: &str, config: &serde_json::Value) -> Result<DocumentConfig> {
    let value = if config.is_null() {
        serde_json::json!({})
    } else {
        config.clone()
    };
    serde_json::from_value(value).map_err(|e| Error::Config(format!("{name}: {e}")))
}

fn build(
    name: &'static str,
    default_encoder: Option<&str>,
    config: &serde_json::Value,
    context: &ModalityContext,
) -> multitoken_core::Result<Box<dyn Modality>> {
    let mut config = parse_config(name, config)?;
    if config.encoder.is_none() {
        // A copy next to the model wins over the one `cargo xtask weights` installed.
        config.encoder = default_encoder.map(|dir| {
            if context.resolve(dir).is_dir() {
                dir.to_string()
            } else {
                crate::default_minilm_dir().display().to_string()
            }
        });
    }
    Ok(Box::new(DocumentModality::new(name, &config, context)?))
}

fn build_gte(
    config: &serde_json::Value,
    context: &ModalityContext,
) -> multitoken_core::Result<Box<dyn Modality>> {
    build("document_gte", None, config, context)
}

fn build_minilm(
    config: &serde_json::Value,
    context: &ModalityContext,
) -> multitoken_core::Result<Box<dyn Modality>> {
    build("document_minilm", Some("all-minilm-l6-v2"), config, context)
}

multitoken_core::inventory::submit! {
    multitoken_core::ModalityBuilder { name: "document_gte", build: build_gte }
}

multitoken_core::inventory::submit! {
    multitoken_core::ModalityBuilder { name: "document_minilm", build: build_minilm }
}

#[cfg(test)]
mod tests {
    use super::chunk_group_ranges;

    /// A dataset string is a path even when no such file exists (the reader
    /// reports it missing); inline text is `{"text": ...}`; other JSON is refused.
    #[test]
    fn document_items_are_paths_unless_marked_as_text() {
        use super::{document_item_from_json, Item};
        use std::path::Path;
        let base = Path::new("/data");
        let item = |v: serde_json::Value| document_item_from_json(&v, base).map_err(|e| e.to_string());
        assert_eq!(item(serde_json::json!("notes/a.txt")), Ok(Item::Path(base.join("notes/a.txt"))));
        assert_eq!(item(serde_json::json!("Plain words, no file")), Ok(Item::Path(base.join("Plain words, no file"))));
        assert_eq!(item(serde_json::json!({"text": "Plain words"})), Ok(Item::Text("Plain words".into())));
        for bad in [serde_json::json!(3), serde_json::json!({"text": 3}), serde_json::json!({"path": "a"}), serde_json::json!("https://x/y.pdf")] {
            let err = item(bad.clone()).err().unwrap_or_default();
            assert!(!err.is_empty(), "{bad} accepted");
        }
    }

    #[test]
    fn chunk_groups_repeat_few_and_average_many() {
        assert_eq!(chunk_group_ranges(1, 3), vec![0..1, 0..1, 0..1]);
        assert_eq!(chunk_group_ranges(2, 4), vec![0..1, 0..1, 1..2, 1..2]);
        assert_eq!(chunk_group_ranges(4, 4), vec![0..1, 1..2, 2..3, 3..4]);
        assert_eq!(chunk_group_ranges(8, 4), vec![0..2, 2..4, 4..6, 6..8]);
        assert_eq!(chunk_group_ranges(5, 2), vec![0..3, 2..5]);
        for (count, width) in [(1, 1), (3, 7), (7, 3), (100, 8)] {
            let ranges = chunk_group_ranges(count, width);
            assert_eq!(ranges.len(), width);
            assert!(
                ranges.iter().all(|r| !r.is_empty() && r.end <= count),
                "{count} {width}"
            );
            assert_eq!((ranges[0].start, ranges[width - 1].end), (0, count));
        }
    }
}
