//! Prompts with items, as the CLI's `generate` and `chat` and the Python module
//! build them: where an item's modality token goes when the text has none, typed
//! special tokens kept as text, and a [`Conversation`] that keeps its history and
//! the items of every turn.
//!
//! One copy of these rules for every front end, so that a prompt means the same
//! tokens from the command line and from Python (the parity tests compare them).

use anyhow::Result;
use multitoken_core::{Item, ItemsByKey, Message};
use multitoken_lm::generate::{GenerationOutput, GenerationParams};
use multitoken_lm::multimodal::MultimodalModel;

/// The message with a modality token in front (each on its own line) for each
/// attached item the text does not already refer to; `items` are `(data key,
/// item)` pairs in the order they were given.
pub fn with_item_tokens(model: &MultimodalModel, text: &str, items: &[(String, Item)]) -> String {
    let mut prefix = String::new();
    for (key, _) in items {
        if let Some((_, runtime)) = model.modality_for_key(key) {
            let token = runtime.modality.token();
            let wanted = items.iter().filter(|(k, _)| k == key).count();
            let present = occurrences(text, token);
            if present < wanted && prefix.matches(token).count() < wanted - present {
                prefix.push_str(token);
                prefix.push('\n');
            }
        }
    }
    format!("{prefix}{text}")
}

/// How often `text` refers to `token`'s modality. Chat templates that take
/// content parts read `<image>` as an image part too (`chat_template.rs`,
/// `PART_TOKENS`), so a Qwen2-VL prompt written with `<image>` already places
/// its `<|image_pad|>` item.
fn occurrences(text: &str, token: &str) -> usize {
    let own = text.matches(token).count();
    if token != "<image>" && token.contains("image_pad") {
        own + text.matches("<image>").count()
    } else {
        own
    }
}

/// What a user typed, with the tokenizer's special tokens marked as text, so
/// that typing `<|im_end|>` cannot end a turn or forge another role's message
/// (modality tokens still work). The server does the same unless a request
/// sets `parse_special_tokens`.
pub fn typed_text(model: &MultimodalModel, text: &str) -> String {
    model.chat_preparer().mark_special_tokens_as_text(text)
}

/// `items` as `(data key, item)` pairs, keys in the map's order and items in
/// their order.
pub fn item_pairs(items: &ItemsByKey) -> Vec<(String, Item)> {
    items.iter().flat_map(|(key, list)| list.iter().map(move |item| (key.clone(), item.clone()))).collect()
}

/// Checks that the model reads every data key of `items`; the error names the
/// key and the model's modality tokens.
pub fn check_item_keys(model: &MultimodalModel, items: &ItemsByKey) -> Result<()> {
    for key in items.keys() {
        if model.modality_for_key(key).is_none() {
            anyhow::bail!("{} reads no {key} (its modalities: {})", model.lm.name, model.modality_tokens().join(" "));
        }
    }
    Ok(())
}

/// One completion of a chat: the last message (the user's) gets a token in front
/// for each item it does not refer to, as `multitoken generate` places them.
pub fn generate_chat(
    model: &MultimodalModel,
    messages: &mut [Message],
    items: &ItemsByKey,
    params: &GenerationParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerationOutput> {
    if let Some(user) = messages.last_mut() {
        user.content = with_item_tokens(model, &user.content, &item_pairs(items));
    }
    let prepared = model.prepare_chat(messages, items)?;
    Ok(model.generate(&prepared, items, params, on_text)?)
}

/// A chat that keeps its history: every turn re-renders the whole conversation
/// with the model's chat template (what transformers' `apply_chat_template`
/// gives), and the items of earlier turns stay attached to them.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    /// The messages so far (system, user, assistant, ...).
    pub messages: Vec<Message>,
    /// Every item of the conversation so far, in token order per modality.
    pub items: ItemsByKey,
}

impl Conversation {
    /// A conversation that opens with `system`, if given.
    pub fn new(system: Option<&str>) -> Conversation {
        Conversation { messages: system.map(Message::system).into_iter().collect(), items: ItemsByKey::new() }
    }

    /// Sends a user message with its new items and generates the answer, streaming
    /// it through `on_text`. On success the turn and its answer join the history;
    /// a turn that fails leaves the conversation as it was, so it stays usable.
    pub fn send(
        &mut self,
        model: &MultimodalModel,
        text: &str,
        new_items: &[(String, Item)],
        params: &GenerationParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerationOutput> {
        let text = with_item_tokens(model, text, new_items);
        let mut turn_items = self.items.clone();
        for (key, item) in new_items {
            turn_items.entry(key.clone()).or_default().push(item.clone());
        }
        check_item_keys(model, &turn_items)?;
        self.messages.push(Message::user(text));
        let result = model
            .prepare_chat(&self.messages, &turn_items)
            .and_then(|prepared| model.generate(&prepared, &turn_items, params, on_text));
        match result {
            Ok(output) => {
                self.messages.push(Message::assistant(output.text.trim()));
                self.items = turn_items;
                Ok(output)
            }
            Err(e) => {
                self.messages.pop();
                Err(e.into())
            }
        }
    }

    /// Forgets every turn and item; a system message stays.
    pub fn reset(&mut self) {
        self.messages.retain(|m| m.role == "system");
        self.items.clear();
    }
}
