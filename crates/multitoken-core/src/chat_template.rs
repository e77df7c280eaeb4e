//! Chat templates: messages to the text a model was trained on.
//!
//! A model's own jinja `chat_template` (from `tokenizer_config.json` or a
//! `chat_template.jinja` file) is rendered with minijinja configured like
//! transformers' `apply_chat_template`: `trim_blocks`, `lstrip_blocks`, the
//! globals `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, the
//! functions `raise_exception` and `strftime_now`, and Python string/dict
//! methods (`.strip()`, `.startswith()`, `.items()`, ...) through
//! `minijinja-contrib`'s pycompat. Built-in templates cover models that ship
//! none (Mistral, ChatML, Llama-2, Idefics2, Phi-2).
//!
//! [`ChatTemplate::render_with_assistant_spans`] also says where each assistant
//! turn lies in the rendered text, which the input preparer needs for labels.

use std::ops::Range;
use std::path::Path;

use minijinja::value::ValueKind;
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Name under which the single template is stored in the environment.
const TEMPLATE_NAME: &str = "chat";

/// Fuel every render gets whatever the conversation (minijinja charges one
/// fuel per instruction and per 64 bytes of data produced): about a million
/// instructions or 64 MB, far above what any real chat template needs for a
/// short conversation, far below what a runaway one could take.
pub const TEMPLATE_BASE_FUEL: u64 = 1_000_000;

/// Extra fuel per byte of message text, so that a long conversation may be
/// copied ~16 times over (`strip`, `replace`, content parts, the output).
const TEMPLATE_FUEL_PER_4_BYTES: u64 = 1;

/// Deepest nesting of loops, blocks, macros and filters in a render (minijinja
/// allows 500; real templates nest a few levels, a recursive macro on tool
/// schemas a few dozen).
const TEMPLATE_RECURSION_LIMIT: usize = 200;

/// One chat message, as in a dataset row or an OpenAI-style request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text, with modality tokens such as `<image>` in place.
    pub content: String,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }

    /// Whether the message is an assistant turn (the turns that get labels).
    pub fn is_assistant(&self) -> bool {
        self.role == "assistant"
    }
}

/// A rendered conversation and the byte ranges of its assistant turns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    /// The whole conversation as text.
    pub text: String,
    /// Byte ranges of `text` that the model should learn to produce: each
    /// assistant turn's content through the end-of-turn token that closes it.
    /// Sorted and non-overlapping.
    pub assistant_ranges: Vec<Range<usize>>,
}

/// Built-in template sources, for models whose tokenizer config has none.
mod builtin_sources {
    /// Mistral-Instruct `[INST]` turns; a leading system message is folded into
    /// the first user turn, as Mistral's later templates do.
    pub const MISTRAL: &str = "{% if messages and messages[0]['role'] == 'system' %}\
{% set system_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}\
{% else %}{% set system_prefix = '' %}{% set loop_messages = messages %}{% endif %}\
{{ bos_token }}{% for message in loop_messages %}\
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
{% if message['role'] == 'user' %}{{ '[INST] ' + (system_prefix if loop.first else '') + message['content'] + ' [/INST]' }}\
{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";

    /// ChatML, as Qwen2 and SmolLM2 use (without their default system prompt).
    pub const CHATML: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    /// Meta's Llama-2-chat template.
    pub const LLAMA2: &str = "{% if messages and messages[0]['role'] == 'system' %}\
{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}\
{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}\
{% for message in loop_messages %}\
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
{% if loop.index0 == 0 and system_message != false %}\
{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}\
{% else %}{% set content = message['content'] %}{% endif %}\
{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}\
{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

    /// Idefics2 (Cephalo's base): `User:<image>...<end_of_utterance>\nAssistant:`;
    /// like HF's template, no space after the colon when the turn opens with an image.
    pub const IDEFICS2: &str = "{% for message in messages %}{{ message['role'] | capitalize }}\
{% if message['content'][:7] == '<image>' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}\
{{ message['content'] + '<end_of_utterance>\\n' }}{% endfor %}\
{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

    /// Phi-2's instruction format `Instruct: ...\nOutput: ...`.
    pub const PHI2: &str = "{% for message in messages %}\
{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}\
{% elif message['role'] == 'user' %}{{ 'Instruct: ' + message['content'] + '\\n' }}\
{% else %}{{ 'Output: ' + message['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ 'Output:' }}{% endif %}";
}

/// A chat template ready to render, with the BOS/EOS strings it refers to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    name: String,
    source: String,
    bos_token: String,
    eos_token: String,
    env: Environment<'static>,
}

impl ChatTemplate {
    /// The names [`ChatTemplate::builtin`] accepts.
    pub const BUILTIN_NAMES: [&'static str; 5] =
        ["mistral", "chatml", "llama2", "idefics2", "phi2"];

    /// Parses jinja `source`. `name` says where it came from in error messages.
    pub fn new(
        name: impl Into<String>,
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let name = name.into();
        let source = source.into();
        let env = build_environment(&source).map_err(|error| Error::template(&name, error))?;
        Ok(Self {
            name,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            env,
        })
    }

    /// A built-in template with its family's usual BOS/EOS strings: `mistral`,
    /// `chatml`, `llama2` (or `llama-2`), `idefics2`, `phi2` (or `phi-2`).
    pub fn builtin(name: &str) -> Result<Self> {
        let (canonical, source, bos, eos) = match name.to_ascii_lowercase().as_str() {
            "mistral" => ("mistral", builtin_sources::MISTRAL, "<s>", "</s>"),
            "chatml" => ("chatml", builtin_sources::CHATML, "", "<|im_end|>"),
            "llama2" | "llama-2" => ("llama2", builtin_sources::LLAMA2, "<s>", "</s>"),
            "idefics2" => (
                "idefics2",
                builtin_sources::IDEFICS2,
                "<s>",
                "<end_of_utterance>",
            ),
            "phi2" | "phi-2" => ("phi2", builtin_sources::PHI2, "", "<|endoftext|>"),
            _ => {
                return Err(Error::msg(format!(
                    "no built-in chat template named `{name}`; built-in templates: {}",
                    Self::BUILTIN_NAMES.join(", ")
                )))
            }
        };
        Self::new(format!("builtin {canonical}"), source, bos, eos)
    }

    /// The same template with other BOS/EOS strings (e.g. the tokenizer's own).
    pub fn with_special_tokens(
        mut self,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Self {
        self.bos_token = bos_token.into();
        self.eos_token = eos_token.into();
        self
    }

    /// The template in a `tokenizer_config.json` value, with its `bos_token`
    /// and `eos_token`; `Ok(None)` when it has no `chat_template`.
    ///
    /// `chat_template` may be a string or a list of `{name, template}`, in
    /// which case the one named `default` is taken (else the first).
    pub fn from_tokenizer_config_json(config: &serde_json::Value) -> Result<Option<Self>> {
        Self::from_tokenizer_config_named(config, "tokenizer_config.json")
    }

    /// The template of an HF model directory: `chat_template.jinja` when present,
    /// else `chat_template` in `tokenizer_config.json`; BOS/EOS from
    /// `tokenizer_config.json`. `Ok(None)` when the directory has no template.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
                path: config_path.clone(),
                source,
            })?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|error| Error::Json {
                    what: config_path.display().to_string(),
                    reason: error.to_string(),
                })?;
            Some(value)
        } else {
            None
        };
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            let source = std::fs::read_to_string(&jinja_path).map_err(|source| Error::Io {
                path: jinja_path.clone(),
                source,
            })?;
            let what = config_path.display().to_string();
            let (bos, eos) = match &config {
                Some(config) => (
                    special_token(config, "bos_token", &what)?,
                    special_token(config, "eos_token", &what)?,
                ),
                None => (String::new(), String::new()),
            };
            return Self::new(jinja_path.display().to_string(), source, bos, eos).map(Some);
        }
        match config {
            Some(config) => {
                Self::from_tokenizer_config_named(&config, &config_path.display().to_string())
            }
            None => Ok(None),
        }
    }

    fn from_tokenizer_config_named(config: &serde_json::Value, what: &str) -> Result<Option<Self>> {
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(source)) => source.clone(),
            Some(serde_json::Value::Array(named)) => pick_named_template(named, what)?,
            Some(other) => return Err(Error::Json {
                what: what.to_string(),
                reason: format!(
                    "`chat_template` must be a string or a list of {{name, template}}, got {other}"
                ),
            }),
        };
        let bos = special_token(config, "bos_token", what)?;
        let eos = special_token(config, "eos_token", what)?;
        Self::new(format!("{what} chat_template"), source, bos, eos).map(Some)
    }

    /// Where the template came from (`builtin chatml`, a path, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The BOS string the template sees as `bos_token`.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The EOS string the template sees as `eos_token`.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders the messages followed by the opening of an assistant turn
    /// (`add_generation_prompt=True`): the prompt for generation.
    pub fn render_prompt(&self, messages: &[Message]) -> Result<String> {
        self.render_with(messages, true)
    }

    /// Renders the messages as a finished conversation
    /// (`add_generation_prompt=False`): the text for training.
    pub fn render_conversation(&self, messages: &[Message]) -> Result<String> {
        self.render_with(messages, false)
    }

    /// Renders the finished conversation and finds each assistant turn in it.
    ///
    /// Turn `i` starts where the prompt rendering of `messages[..i]` ends and
    /// ends where the conversation rendering of `messages[..=i]` ends, trimmed
    /// to just after the last EOS in that stretch (so ChatML's newline after
    /// `<|im_end|>` is prompt, not label). Templates whose renderings are not
    /// prefixes of each other fall back to finding the turn's content in the
    /// text (plus an EOS right after it); a turn found neither way is an error.
    pub fn render_with_assistant_spans(&self, messages: &[Message]) -> Result<RenderedChat> {
        let text = self.render_conversation(messages)?;
        let mut assistant_ranges: Vec<Range<usize>> = Vec::new();
        let mut cursor = 0;
        for (index, message) in messages.iter().enumerate() {
            if !message.is_assistant() {
                continue;
            }
            let range = match self.turn_range_by_prefix(messages, index, &text, cursor)? {
                Some(range) => range,
                None => self.turn_range_by_search(message, &text, cursor).ok_or_else(|| {
                    Error::msg(format!(
                        "chat template `{}`: cannot locate assistant message {index} in the rendered \
                         conversation (the template rewrites it), so its labels cannot be set",
                        self.name
                    ))
                })?,
            };
            if !range.is_empty() {
                cursor = range.end;
                assistant_ranges.push(range);
            }
        }
        Ok(RenderedChat {
            text,
            assistant_ranges,
        })
    }

    fn turn_range_by_prefix(
        &self,
        messages: &[Message],
        index: usize,
        text: &str,
        cursor: usize,
    ) -> Result<Option<Range<usize>>> {
        let before = self.render_prompt(&messages[..index])?;
        let through = self.render_conversation(&messages[..=index])?;
        let consistent = text.starts_with(&before)
            && text.starts_with(&through)
            && before.len() >= cursor
            && through.len() >= before.len();
        if !consistent {
            return Ok(None);
        }
        let mut start = before.len();
        let mut end = through.len();
        let mut content_end = end;
        if !self.eos_token.is_empty() {
            if let Some(at) = text[start..end].rfind(&self.eos_token) {
                content_end = start + at;
                end = content_end + self.eos_token.len();
            }
        }
        // A template whose generation prompt does not open the turn (no
        // `add_generation_prompt` branch) leaves the turn header in the stretch:
        // start at the content instead (its last occurrence, as headers come
        // first), keeping the spaces right before it so that a BPE tokenizer
        // still sees ` word` as one token.
        let content = messages[index].content.trim();
        if !content.is_empty() {
            if let Some(at) = text[start..content_end].rfind(content) {
                let header = &text[start..start + at];
                start += header.trim_end_matches(' ').len();
            }
        }
        Ok(Some(start..end))
    }

    fn turn_range_by_search(
        &self,
        message: &Message,
        text: &str,
        cursor: usize,
    ) -> Option<Range<usize>> {
        let content = message.content.trim();
        if content.is_empty() {
            return Some(cursor..cursor);
        }
        let start = cursor + text.get(cursor..)?.find(content)?;
        let mut end = start + content.len();
        if !self.eos_token.is_empty() {
            let rest = &text[end..];
            let spaces = rest.len() - rest.trim_start().len();
            if rest[spaces..].starts_with(&self.eos_token) {
                end += spaces + self.eos_token.len();
            }
        }
        Some(start..end)
    }

    fn render_with(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        // Templates come from model files and `--chat-template`, and render
        // what clients send: every render is bounded in work and memory
        // (a nested loop or a string doubled in a loop ends in a clear error).
        let fuel = render_fuel(messages);
        let mut env = self.env.clone();
        env.set_fuel(Some(fuel));
        let template = env
            .get_template(TEMPLATE_NAME)
            .map_err(|error| Error::template(&self.name, error))?;
        let messages = if self.uses_content_parts() {
            Value::from(minijinja::value::Serde(content_parts(messages)))
        } else {
            Value::from(minijinja::value::Serde(messages))
        };
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        template.render(context).map_err(|error| {
            if error.kind() == ErrorKind::OutOfFuel {
                let detail = format!(
                    "rendering went over its budget of {fuel} fuel (about {fuel} steps or {} MB of text) \
                     for this conversation: does a loop never end, or text keep growing?",
                    fuel * 64 / 1_000_000
                );
                return Error::template(&self.name, minijinja::Error::new(ErrorKind::OutOfFuel, detail));
            }
            Error::template(&self.name, error)
        })
    }
}

/// The fuel one render of `messages` gets: [`TEMPLATE_BASE_FUEL`] plus some
/// per byte of message text.
fn render_fuel(messages: &[Message]) -> u64 {
    let bytes: u64 = messages.iter().map(|m| (m.content.len() + m.role.len()) as u64).sum();
    TEMPLATE_BASE_FUEL.saturating_add(bytes / 4 * TEMPLATE_FUEL_PER_4_BYTES)
}

impl ChatTemplate {
    /// Whether the template reads a message's content as a list of typed parts
    /// (`{"type": "image"}`, `{"type": "text", "text": …}`), as the processors'
    /// templates of multimodal checkpoints (Idefics2, LLaVA-NeXT, Qwen2-VL) do;
    /// llava-hf's LLaVA-NeXT / OneVision templates filter the parts with
    /// `selectattr('type', 'equalto', 'image')`.
    fn uses_content_parts(&self) -> bool {
        ["['type']", "[\"type\"]", ".type ", ".type=", ".type)", "selectattr('type'", "selectattr(\"type\""]
            .iter()
            .any(|probe| self.source.contains(probe))
    }
}

/// Part types of the modality tokens, as transformers' processors name them.
/// Qwen2-VL's image token, alone or with the `<|vision_start|>` /
/// `<|vision_end|>` its template writes around it, is an image part too (the
/// server writes a model's own modality token for an `image_url` part).
pub(crate) const PART_TOKENS: [(&str, &str); 6] = [
    ("<image>", "image"),
    ("<video>", "video"),
    ("<audio>", "audio"),
    ("<speech>", "audio"),
    ("<|vision_start|><|image_pad|><|vision_end|>", "image"),
    ("<|image_pad|>", "image"),
];

/// Messages with their content split at modality tokens into typed parts: the
/// structured content a processor's template expects (`"Compare <image>"` →
/// `[{"type": "text", "text": "Compare "}, {"type": "image"}]`).
fn content_parts(messages: &[Message]) -> Vec<serde_json::Value> {
    messages
        .iter()
        .map(|message| {
            let mut parts = Vec::new();
            let mut rest = message.content.as_str();
            loop {
                let next = PART_TOKENS
                    .iter()
                    .filter_map(|(token, kind)| rest.find(token).map(|at| (at, *token, *kind)))
                    .min_by_key(|(at, _, _)| *at);
                let Some((at, token, kind)) = next else { break };
                if at > 0 {
                    parts.push(serde_json::json!({"type": "text", "text": &rest[..at]}));
                }
                parts.push(serde_json::json!({"type": kind}));
                rest = &rest[at + token.len()..];
            }
            if !rest.is_empty() || parts.is_empty() {
                parts.push(serde_json::json!({"type": "text", "text": rest}));
            }
            serde_json::json!({"role": message.role, "content": parts})
        })
        .collect()
}

/// An environment configured like transformers' chat template sandbox, holding
/// `source` as its one template.
fn build_environment(source: &str) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", python_tojson);
    env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(source))?;
    Ok(env)
}

/// `tojson` as transformers defines it: Python's `json.dumps` with
/// `ensure_ascii=False`, so `", "` / `": "` separators without `indent` and
/// no HTML escaping (minijinja's own filter escapes `<` for HTML pages).
fn python_tojson(
    value: Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // Accepted for compatibility; output is never ASCII-escaped, as in transformers.
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_python_json(&value, indent, sort_keys.unwrap_or(false), 0, &mut out)?;
    Ok(out)
}

/// Writes `value` the way Python's `json.dumps` lays it out, keeping map order.
fn write_python_json(
    value: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let item_separator = if indent.is_some() { "," } else { ", " };
    let open_line = |out: &mut String, level: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * level));
        }
    };
    match value.kind() {
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push_str(item_separator);
                }
                open_line(out, depth + 1);
                write_python_json(item, indent, sort_keys, depth + 1, out)?;
            }
            open_line(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if sort_keys {
                keys.sort();
            }
            out.push('{');
            for (index, key) in keys.iter().enumerate() {
                if index > 0 {
                    out.push_str(item_separator);
                }
                open_line(out, depth + 1);
                // JSON keys are strings: Python turns 1 into "1".
                let key_text = key
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| key.to_string());
                out.push_str(&serde_json::Value::String(key_text).to_string());
                out.push_str(": ");
                write_python_json(&value.get_item(key)?, indent, sort_keys, depth + 1, out)?;
            }
            open_line(out, depth);
            out.push('}');
        }
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        _ => {
            let scalar = serde_json::to_string(value).map_err(|error| {
                minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {error}"))
            })?;
            out.push_str(&scalar);
        }
    }
    Ok(())
}

/// HF's `raise_exception(message)`: aborts rendering with the template's message.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// HF's `strftime_now(format)` on the UTC clock, for templates that print the
/// date (Llama-3.1). Supports `%Y %m %d %e %B %b %H %M %S %%`.
fn strftime_now(format: String) -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    format_utc(seconds, &format)
}

/// Formats a UNIX time (UTC) with a small strftime subset.
fn format_utc(unix_seconds: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = (unix_seconds / 86_400) as i64;
    let second_of_day = unix_seconds % 86_400;
    // Howard Hinnant's days-to-civil conversion.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let month_name = MONTHS[(month - 1).clamp(0, 11) as usize];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('H') => out.push_str(&format!("{:02}", second_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", second_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", second_of_day % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Removes transformers' `{% generation %}` / `{% endgeneration %}` markers,
/// which only tag assistant text for its own mask and render nothing.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        // The closing `%}` is searched after the opening `{%`: in `{%}` they
        // overlap, and slicing between them panicked (found by fuzzing).
        let Some(len) = rest[open + 2..].find("%}") else {
            break;
        };
        let end = open + 2 + len + 2;
        let tag = &rest[open + 2..open + 2 + len];
        let word = tag.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..open]);
        if word != "generation" && word != "endgeneration" {
            out.push_str(&rest[open..end]);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Chooses from a `[{name, template}, ...]` list: `default`, else the first.
fn pick_named_template(named: &[serde_json::Value], what: &str) -> Result<String> {
    let template_of = |entry: &serde_json::Value| {
        entry
            .get("template")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
    };
    let default = named
        .iter()
        .find(|entry| entry.get("name").and_then(serde_json::Value::as_str) == Some("default"));
    default
        .or_else(|| named.first())
        .and_then(template_of)
        .ok_or_else(|| Error::Json {
            what: what.to_string(),
            reason: "`chat_template` list has no entry with a string `template`".to_string(),
        })
}

/// A special token of a tokenizer config: a string, an AddedToken object with
/// `content`, or absent/null (empty string).
fn special_token(config: &serde_json::Value, key: &str, what: &str) -> Result<String> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(String::new()),
        Some(serde_json::Value::String(token)) => Ok(token.clone()),
        Some(object) => object
            .get("content")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| Error::Json {
                what: what.to_string(),
                reason: format!("`{key}` must be a string or {{\"content\": ...}}, got {object}"),
            }),
    }
}

#[cfg(test)]
mod tests;
