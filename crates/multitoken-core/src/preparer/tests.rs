//! Tests of the input preparer on multi-item, multi-modality prompts, with a
//! word-level tokenizer built in code so that every id is known by hand.

use std::collections::HashMap;

use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

use super::*;

/// The test vocabulary; a word's id is its index.
const VOCAB: [&str; 22] = [
    "<pad>",
    "<s>",
    "</s>",
    "[UNK]",
    "[INST]",
    "[/INST]",
    "Compare",
    "and",
    "then",
    "answer",
    "Both",
    "are",
    "cats",
    "Describe",
    "it",
    "A",
    "potato",
    "<|im_start|>",
    "<|im_end|>",
    "user",
    "assistant",
    "Now",
];

/// Id of a word of [`VOCAB`].
fn id(word: &str) -> u32 {
    VOCAB.iter().position(|w| *w == word).unwrap() as u32
}

/// A word-level tokenizer over [`VOCAB`] whose post-processor adds `<s>` in
/// front, like Llama's; `[INST]`, `[/INST]` and the ChatML markers are added
/// tokens so they split off neighbouring text.
fn tokenizer_with_bos() -> Tokenizer {
    let vocab: HashMap<String, u32> = VOCAB
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".to_string())
        .build()
        .unwrap();
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(WhitespaceSplit));
    tokenizer
        .add_special_tokens([
            AddedToken::from("<pad>", true),
            AddedToken::from("<s>", true),
            AddedToken::from("</s>", true),
            AddedToken::from("<|im_start|>", true),
            AddedToken::from("<|im_end|>", true),
        ])
        .unwrap();
    tokenizer
        .add_tokens([
            AddedToken::from("[INST]", false),
            AddedToken::from("[/INST]", false),
        ])
        .unwrap();
    let bos = TemplateProcessing::builder()
        .try_single("<s> $A")
        .unwrap()
        .special_tokens(vec![("<s>".to_string(), id("<s>"))])
        .build()
        .unwrap();
    tokenizer.with_post_processor(Some(bos));
    tokenizer
}

/// The same vocabulary without a post-processor (ChatML models add no BOS).
fn tokenizer_without_bos() -> Tokenizer {
    let mut tokenizer = tokenizer_with_bos();
    tokenizer.with_post_processor(None::<TemplateProcessing>);
    tokenizer
}

/// An image modality 3 positions wide and a speech modality 2 wide.
fn modalities() -> Vec<ModalityToken> {
    vec![
        ModalityToken::new("vision_clip", "<image>", "images", 3),
        ModalityToken::new("audio_whisper", "<speech>", "speech_audios", 2),
    ]
}

fn preparer(tokenizer: Tokenizer, template: &str, config: PreparerConfig) -> Result<InputPreparer> {
    InputPreparer::new(
        tokenizer,
        ChatTemplate::builtin(template)?,
        modalities(),
        config,
    )
}

/// `count` placeholder items under `key`.
fn items(entries: &[(&str, usize)]) -> ItemsByKey {
    entries
        .iter()
        .map(|(key, count)| {
            (
                key.to_string(),
                (0..*count)
                    .map(|i| Item::Text(format!("{key} {i}")))
                    .collect(),
            )
        })
        .collect()
}

/// Shorthand for expected spans: `(modality, item_index, start, len)`.
fn spans(list: &[(usize, usize, usize, usize)]) -> Vec<PlaceholderSpan> {
    list.iter()
        .map(|&(modality, item_index, start, len)| PlaceholderSpan {
            modality,
            item_index,
            item_offset: 0,
            start,
            len,
            grid: None,
        })
        .collect()
}

/// Ids of a whitespace-separated list of words, `_` standing for one placeholder (id 0).
fn ids(words: &str) -> Vec<u32> {
    words
        .split_whitespace()
        .map(|w| if w == "_" { 0 } else { id(w) })
        .collect()
}

/// Labels: `-` for IGNORE_INDEX, words for their ids.
fn labels(words: &str) -> Vec<i64> {
    words
        .split_whitespace()
        .map(|w| {
            if w == "-" {
                IGNORE_INDEX
            } else {
                i64::from(id(w))
            }
        })
        .collect()
}

fn check(
    got: Result<PreparedInput>,
    expect_ids: &str,
    expect_labels: &str,
    expect_spans: &[(usize, usize, usize, usize)],
) {
    let got = match got {
        Ok(got) => got,
        Err(error) => panic!("preparation failed: {error}"),
    };
    assert_eq!(got.input_ids, ids(expect_ids), "ids");
    assert_eq!(got.labels, labels(expect_labels), "labels");
    assert_eq!(got.spans, spans(expect_spans), "spans");
    assert_eq!(got.input_ids.len(), got.labels.len());
}

fn check_error(got: Result<PreparedInput>, expect: &str) {
    match got {
        Ok(prepared) => panic!("expected an error, got {prepared:?}"),
        Err(error) => assert_eq!(error.to_string(), expect),
    }
}

/// The multi_token example: two images and a speech clip in one user turn.
fn compare_chat() -> Vec<Message> {
    vec![
        Message::user("Compare <image> and <image> then answer <speech>"),
        Message::assistant("Both are cats"),
    ]
}

#[test]
fn mistral_prompt_with_two_images_and_speech() -> Result<()> {
    let preparer = preparer(tokenizer_with_bos(), "mistral", PreparerConfig::default())?;
    // "<s>[INST] Compare <image> and <image> then answer <speech> [/INST]Both are cats</s>":
    // the template writes the BOS, so the tokenizer's is not added again.
    check(
        preparer.prepare_training(
            &compare_chat(),
            &items(&[("images", 2), ("speech_audios", 1)]),
        ),
        "<s> [INST] Compare _ _ _ and _ _ _ then answer _ _ [/INST] Both are cats </s>",
        "- - - - - - - - - - - - - - - Both are cats </s>",
        &[(0, 0, 3, 3), (0, 1, 7, 3), (1, 0, 12, 2)],
    );
    // For generation the same prompt stops after [/INST], no labels.
    check(
        preparer.prepare_generation(
            &compare_chat()[..1],
            &items(&[("images", 2), ("speech_audios", 1)]),
        ),
        "<s> [INST] Compare _ _ _ and _ _ _ then answer _ _ [/INST]",
        "- - - - - - - - - - - - - - -",
        &[(0, 0, 3, 3), (0, 1, 7, 3), (1, 0, 12, 2)],
    );
    Ok(())
}

#[test]
fn chatml_multi_turn_with_items_in_both_turns() -> Result<()> {
    let preparer = preparer(tokenizer_without_bos(), "chatml", PreparerConfig::default())?;
    let messages = vec![
        Message::user("Describe <image>"),
        Message::assistant("A potato"),
        Message::user("Now <speech> and <image>"),
        Message::assistant("Both are cats"),
    ];
    check(
        preparer.prepare_training(&messages, &items(&[("images", 2), ("speech_audios", 1)])),
        "<|im_start|> user Describe _ _ _ <|im_end|> <|im_start|> assistant A potato <|im_end|> \
         <|im_start|> user Now _ _ and _ _ _ <|im_end|> <|im_start|> assistant Both are cats <|im_end|>",
        "- - - - - - - - - A potato <|im_end|> \
         - - - - - - - - - - - - Both are cats <|im_end|>",
        &[(0, 0, 3, 3), (1, 0, 15, 2), (0, 1, 18, 3)],
    );
    Ok(())
}

#[test]
fn leading_special_tokens_policy() -> Result<()> {
    let chat = [Message::user("Describe <image>")];
    let one_image = items(&[("images", 1)]);
    // ChatML writes no BOS: added once by default, spans shift with it.
    let add_if_missing = preparer(tokenizer_with_bos(), "chatml", PreparerConfig::default())?;
    assert_eq!(add_if_missing.leading_special_ids(), &[id("<s>")]);
    check(
        add_if_missing.prepare_generation(&chat, &one_image),
        "<s> <|im_start|> user Describe _ _ _ <|im_end|> <|im_start|> assistant",
        "- - - - - - - - - -",
        &[(0, 0, 4, 3)],
    );
    let template_only = PreparerConfig {
        leading_special_tokens: LeadingSpecialTokens::TemplateOnly,
        ..Default::default()
    };
    check(
        preparer(tokenizer_with_bos(), "chatml", template_only)?
            .prepare_generation(&chat, &one_image),
        "<|im_start|> user Describe _ _ _ <|im_end|> <|im_start|> assistant",
        "- - - - - - - - -",
        &[(0, 0, 3, 3)],
    );
    // AddOnce adds it even when the template already wrote one.
    let add_once = PreparerConfig {
        leading_special_tokens: LeadingSpecialTokens::AddOnce,
        ..Default::default()
    };
    check(
        preparer(tokenizer_with_bos(), "mistral", add_once)?.prepare_generation(&chat, &one_image),
        "<s> <s> [INST] Describe _ _ _ [/INST]",
        "- - - - - - - -",
        &[(0, 0, 4, 3)],
    );
    // A tokenizer without a post-processor has nothing to add.
    let no_bos = preparer(tokenizer_without_bos(), "chatml", PreparerConfig::default())?;
    assert!(no_bos.leading_special_ids().is_empty());
    Ok(())
}

#[test]
fn placeholder_id_is_configurable_and_raw_text_works() -> Result<()> {
    let config = PreparerConfig {
        placeholder_id: id("<pad>"),
        ..Default::default()
    };
    let preparer = preparer(tokenizer_without_bos(), "chatml", config)?;
    // Back-to-back tokens give back-to-back spans; raw text gets no template.
    check(
        preparer.prepare_text(
            "Describe <image><image> <speech>",
            &items(&[("images", 2), ("speech_audios", 1)]),
        ),
        "Describe _ _ _ _ _ _ _ _",
        "- - - - - - - - -",
        &[(0, 0, 1, 3), (0, 1, 4, 3), (1, 0, 7, 2)],
    );
    let custom = PreparerConfig {
        placeholder_id: 7,
        ..Default::default()
    };
    let prepared = InputPreparer::new(
        tokenizer_without_bos(),
        ChatTemplate::builtin("chatml")?,
        modalities(),
        custom,
    )?
    .prepare_text("<speech>", &items(&[("speech_audios", 1)]))?;
    assert_eq!(prepared.input_ids, vec![7, 7]);
    Ok(())
}

#[test]
fn item_counts_must_match_tokens() -> Result<()> {
    let preparer = preparer(tokenizer_with_bos(), "mistral", PreparerConfig::default())?;
    check_error(
        preparer.prepare_training(
            &compare_chat(),
            &items(&[("images", 1), ("speech_audios", 1)]),
        ),
        "the prompt has 2 `<image>` token(s) but 1 images item(s) were given",
    );
    check_error(
        preparer.prepare_training(&compare_chat(), &items(&[("images", 2)])),
        "the prompt has 1 `<speech>` token(s) but 0 speech_audios item(s) were given",
    );
    check_error(
        preparer.prepare_training(
            &compare_chat(),
            &items(&[("images", 2), ("speech_audios", 2)]),
        ),
        "the prompt has 1 `<speech>` token(s) but 2 speech_audios item(s) were given",
    );
    check_error(
        preparer.prepare_training(&compare_chat(), &items(&[("images", 2), ("speech_audios", 1), ("videos", 1)])),
        "1 `videos` item(s) given but no modality of this model reads `videos`; it reads: images, speech_audios",
    );
    Ok(())
}

#[test]
fn truncation_never_cuts_a_placeholder_run() -> Result<()> {
    let with_max = |max: usize| -> Result<InputPreparer> {
        preparer(
            tokenizer_with_bos(),
            "mistral",
            PreparerConfig {
                model_max_length: Some(max),
                ..Default::default()
            },
        )
    };
    let row = items(&[("images", 2), ("speech_audios", 1)]);
    // 19 positions fit in 19: unchanged.
    check(
        with_max(19)?.prepare_training(&compare_chat(), &row),
        "<s> [INST] Compare _ _ _ and _ _ _ then answer _ _ [/INST] Both are cats </s>",
        "- - - - - - - - - - - - - - - Both are cats </s>",
        &[(0, 0, 3, 3), (0, 1, 7, 3), (1, 0, 12, 2)],
    );
    // A cut between spans keeps whole spans and drops the labels past it.
    check(
        with_max(17)?.prepare_training(&compare_chat(), &row),
        "<s> [INST] Compare _ _ _ and _ _ _ then answer _ _ [/INST] Both are",
        "- - - - - - - - - - - - - - - Both are",
        &[(0, 0, 3, 3), (0, 1, 7, 3), (1, 0, 12, 2)],
    );
    // A cut just before the speech span drops that item whole.
    check(
        with_max(12)?.prepare_training(&compare_chat(), &row),
        "<s> [INST] Compare _ _ _ and _ _ _ then answer",
        "- - - - - - - - - - - -",
        &[(0, 0, 3, 3), (0, 1, 7, 3)],
    );
    // Issue 23: an item wider than the context (`token_width: 1e9`) is refused
    // before its placeholders are written, not by an allocation abort.
    let wide = InputPreparer::new(
        tokenizer_with_bos(),
        ChatTemplate::builtin("mistral")?,
        vec![ModalityToken::new("vision_clip", "<image>", "images", 1_000_000_000)],
        PreparerConfig { model_max_length: Some(64), ..Default::default() },
    )?;
    check_error(
        wide.prepare_training(&[Message::user("Describe <image>")], &items(&[("images", 1)])),
        "item 1 of <image> takes more than 64 positions, the longest sequence kept",
    );
    // A cut inside the second image rejects the row.
    check_error(
        with_max(8)?.prepare_training(&compare_chat(), &row),
        "truncating to model_max_length 8 would cut `<image>` item 1 (positions 7..10); the row is rejected",
    );
    Ok(())
}

#[test]
fn template_errors_and_bad_modalities_surface() -> Result<()> {
    let preparer = preparer(tokenizer_with_bos(), "mistral", PreparerConfig::default())?;
    let error = preparer
        .prepare_training(
            &[Message::user("a"), Message::user("b")],
            &ItemsByKey::new(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        error.contains("Conversation roles must alternate"),
        "{error}"
    );

    let same_token = vec![
        ModalityToken::new("a", "<x>", "xs", 1),
        ModalityToken::new("b", "<x>", "ys", 1),
    ];
    let error = InputPreparer::new(
        tokenizer_with_bos(),
        ChatTemplate::builtin("chatml")?,
        same_token,
        PreparerConfig::default(),
    )
    .err()
    .map(|e| e.to_string());
    assert_eq!(
        error.as_deref(),
        Some("modalities `a` and `b` share a token or data key (`<x>`/`ys`)")
    );
    let zero_width = vec![ModalityToken::new("a", "<x>", "xs", 0)];
    let error = InputPreparer::new(
        tokenizer_with_bos(),
        ChatTemplate::builtin("chatml")?,
        zero_width,
        PreparerConfig::default(),
    )
    .err()
    .map(|e| e.to_string());
    assert_eq!(error.as_deref(), Some("modality `a` has token_width 0"));
    Ok(())
}

#[test]
fn splitting_prefers_the_leftmost_then_longest_token() {
    let tokens = vec![
        ModalityToken::new("a", "<image>", "images", 1),
        ModalityToken::new("b", "<image_hd>", "hd", 1),
    ];
    let pieces = split_at_modality_tokens("x<image_hd>y<image>", &tokens);
    assert_eq!(
        pieces,
        vec![
            Piece::Text("x"),
            Piece::Modality(1),
            Piece::Text("y"),
            Piece::Modality(0)
        ]
    );
    assert_eq!(split_at_modality_tokens("", &tokens), vec![]);
}

/// Images whose layout depends on the item: `images 0` is two slot runs (2 and
/// 1 wide), any other image one slot, each run wrapped in `<|im_end|>` with
/// doubled wrappers collapsed, as Idefics2 wraps crops in
/// `<fake_token_around_image>`.
struct WrappedRuns;

impl LayoutSource for WrappedRuns {
    fn layout(&self, modality: usize, item: &Item) -> Result<ItemLayout> {
        let wrap = || LayoutPart::Text("<|im_end|>".into());
        let parts = match (modality, item) {
            (0, Item::Text(text)) if text == "images 0" => {
                vec![wrap(), LayoutPart::Slots(2), wrap(), LayoutPart::Slots(1), wrap()]
            }
            (0, _) => vec![wrap(), LayoutPart::Slots(1), wrap()],
            (_, Item::Bytes(_)) => return Err(Error::msg("unreadable clip")),
            _ => vec![LayoutPart::Slots(2)],
        };
        Ok(ItemLayout::new(parts)?.with_collapsed_repeats("<|im_end|>"))
    }
}

fn span_at(modality: usize, item_index: usize, item_offset: usize, start: usize, len: usize) -> PlaceholderSpan {
    PlaceholderSpan { modality, item_index, item_offset, start, len, grid: None }
}

#[test]
fn item_layouts_put_text_around_slot_runs_of_any_width() -> Result<()> {
    let config = PreparerConfig::default();
    let wrapped = preparer(tokenizer_with_bos(), "mistral", config.clone())?.with_layouts(std::sync::Arc::new(WrappedRuns));
    let prompt = "Compare <image><image> then answer <speech>";
    let items = items(&[("images", 2), ("speech_audios", 1)]);
    let got = wrapped.prepare_text(prompt, &items)?;
    // The wrappers between the two images meet and collapse into one.
    assert_eq!(
        got.input_ids,
        ids("<s> Compare <|im_end|> _ _ <|im_end|> _ <|im_end|> _ <|im_end|> then answer _ _")
    );
    assert_eq!(got.labels, labels("- - - - - - - - - - - - - -"));
    assert_eq!(
        got.spans,
        vec![span_at(0, 0, 0, 3, 2), span_at(0, 0, 2, 6, 1), span_at(0, 1, 0, 8, 1), span_at(1, 0, 0, 12, 2)]
    );

    // Truncation keeps whole items: a cut after the first image drops the rest;
    // a cut between the two runs of the first image rejects the row.
    let short = |max| {
        preparer(tokenizer_with_bos(), "mistral", PreparerConfig { model_max_length: Some(max), ..config.clone() })
            .map(|p| p.with_layouts(std::sync::Arc::new(WrappedRuns)))
    };
    let kept = short(8)?.prepare_text(prompt, &items)?;
    assert_eq!(kept.spans, vec![span_at(0, 0, 0, 3, 2), span_at(0, 0, 2, 6, 1)]);
    assert_eq!(kept.input_ids.len(), 8);
    let cut = short(5)?.prepare_text(prompt, &items).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(cut.contains("3..7"), "{cut}");

    // A layout that fails names the item.
    let mut bad = items.clone();
    bad.insert("speech_audios".into(), vec![Item::Bytes(vec![1])]);
    check_error(wrapped.prepare_text(prompt, &bad), "speech_audios item 1: unreadable clip");
    Ok(())
}

/// A span with a position grid.
fn grid_span(item_index: usize, start: usize, grid: [usize; 3]) -> PlaceholderSpan {
    PlaceholderSpan { modality: 0, item_index, item_offset: 0, start, len: grid.iter().product(), grid: Some(grid) }
}

#[test]
fn rope_positions_follow_get_rope_index() {
    // Numbers from transformers 5's Qwen2VLModel.get_rope_index: 2 text tokens,
    // a 1x2x3 image, 2 text tokens, a 1x3x2 image, 1 text token.
    let spans = [grid_span(0, 2, [1, 2, 3]), grid_span(1, 10, [1, 3, 2])];
    let got = RopePositions::of(17, &spans);
    assert_eq!(got.streams[0], [0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 7, 7, 7, 7, 7, 7, 10]);
    assert_eq!(got.streams[1], [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 7, 7, 8, 8, 9, 9, 10]);
    assert_eq!(got.streams[2], [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7, 8, 7, 8, 7, 8, 10]);
    assert_eq!(got.delta, 11 - 17);
    // No grid: plain positions, no shift.
    let plain = RopePositions::of(4, &[span_at(0, 0, 0, 1, 2)]);
    assert_eq!(plain.streams, [vec![0, 1, 2, 3], vec![0, 1, 2, 3], vec![0, 1, 2, 3]]);
    assert_eq!(plain.delta, 0);
    // An image at the very end.
    let last = RopePositions::of(5, &[grid_span(0, 1, [1, 2, 2])]);
    assert_eq!(last.streams[1], [0, 1, 1, 2, 2]);
    assert_eq!(last.delta, 3 - 5);
    let Ok(tensor) = RopePositions::batch_tensor(&[&last, &plain], 6, &candle_core::Device::Cpu) else {
        panic!("batch tensor")
    };
    assert_eq!(tensor.dims(), [3, 2, 6]);
    let rows = tensor.get(2).and_then(|t| t.to_vec2::<u32>()).ok();
    assert_eq!(rows, Some(vec![vec![0, 0, 1, 2, 1, 2], vec![0, 0, 0, 1, 2, 3]]));
}

/// Images of a 1x2x3 grid (Qwen2-VL-like), one run of six slots each.
struct GriddedImages;

impl LayoutSource for GriddedImages {
    fn layout(&self, _modality: usize, _item: &Item) -> Result<ItemLayout> {
        ItemLayout::new(vec![LayoutPart::Text("<|im_end|>".into()), LayoutPart::Slots(6)])?.with_grid([1, 2, 3])
    }
}

#[test]
fn item_grids_reach_the_spans_and_the_rope_positions() -> Result<()> {
    let gridded = preparer(tokenizer_with_bos(), "mistral", PreparerConfig::default())?.with_layouts(std::sync::Arc::new(GriddedImages));
    let got = gridded.prepare_text("Compare <image> then", &items(&[("images", 1)]))?;
    // <s> Compare <|im_end|> then six slots, then "then".
    assert_eq!(got.spans.len(), 1);
    assert_eq!((got.spans[0].start, got.spans[0].grid), (3, Some([1, 2, 3])));
    assert!(got.has_position_grids());
    let positions = got.rope_positions();
    assert_eq!(positions.streams[1], [0, 1, 2, 3, 3, 3, 4, 4, 4, 6]);
    assert_eq!(positions.streams[2], [0, 1, 2, 3, 4, 5, 3, 4, 5, 6]);
    assert_eq!(positions.delta, 7 - 10);
    let plain = preparer(tokenizer_with_bos(), "mistral", PreparerConfig::default())?.prepare_text("Compare <image>", &items(&[("images", 1)]))?;
    assert!(!plain.has_position_grids());
    Ok(())
}

/// A modality whose `layout` panics (third-party code with a bug).
struct PanickingLayout;

impl Modality for PanickingLayout {
    fn name(&self) -> &str {
        "test_panicking_layout"
    }
    fn token(&self) -> &str {
        "<vec>"
    }
    fn data_key(&self) -> &str {
        "vectors"
    }
    fn token_width(&self) -> usize {
        1
    }
    fn feature_dim(&self) -> usize {
        1
    }
    fn preprocess(&self, _item: &Item) -> Result<candle_core::Tensor> {
        Err(Error::msg("not used"))
    }
    fn encode(&self, batch: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        Ok(batch.clone())
    }
    fn projector(&self) -> crate::ProjectorSpec {
        crate::ProjectorSpec::Linear
    }
    #[allow(clippy::panic)]
    fn layout(&self, _item: &Item) -> Result<ItemLayout> {
        panic!("layout bug")
    }
}

#[test]
fn a_panicking_layout_is_an_error_naming_the_modality() {
    let source: Vec<Arc<dyn Modality>> = vec![Arc::new(PanickingLayout)];
    let error = source.layout(0, &Item::Text("1 2 3".into())).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("test_panicking_layout") && error.contains("layout bug"), "{error}");
}
