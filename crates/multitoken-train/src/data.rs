//! Datasets: multi_token's JSONL rows, LLaVA conversion and checks.
//!
//! One row per line:
//!
//! ```json
//! {"id": "r1", "images": ["img/cat.png"],
//!  "messages": [{"role": "user", "content": "<image> What is this?"},
//!               {"role": "assistant", "content": "A cat."}]}
//! ```
//!
//! Every key other than `id` and `messages` is a modality's data key
//! (`images`, `speech_audios`, `documents`, ...) listing that row's items, in
//! the order their tokens appear. Item strings are paths relative to the
//! dataset file, and a path that names no file is an error naming the row and
//! the item; a document given as text is marked `{"text": "..."}`. Errors name
//! the file, the line and the row id.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use multitoken_core::{Item, ItemsByKey, Message};
use multitoken_lm::multimodal::MultimodalModel;
use serde_json::Value;

use crate::{Error, Result};

/// Roles a message may have.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// One training row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The row's `id`, or `line N` when it has none.
    pub id: String,
    /// 1-based line in the dataset file.
    pub line: usize,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Items per data key.
    pub items: ItemsByKey,
}

impl Row {
    /// ` (id X)` for error messages.
    pub fn id_suffix(&self) -> String {
        format!(" (id {})", self.id)
    }
}

/// How a row's items are read: `(data key, JSON value, dataset directory)` to
/// an item, or a message saying why not. With a model, each modality reads
/// its own ([`model_items`]); without one, [`default_items`].
pub type ItemReader<'a> = dyn Fn(&str, &Value, &Path) -> std::result::Result<Item, String> + 'a;

/// The item reader of a loaded model: the modality (or text modality) reading
/// the key parses the value ([`Modality::item_from_json`]: paths, inline text,
/// JSON numbers); keys no modality reads fall back to [`default_items`].
pub fn model_items(model: &MultimodalModel) -> impl Fn(&str, &Value, &Path) -> std::result::Result<Item, String> + '_ {
    move |key: &str, value: &Value, base: &Path| {
        if let Some((_, runtime)) = model.modality_for_key(key) {
            return runtime.modality.item_from_json(value, base).map_err(|e| format!("modality `{}`: {e}", runtime.modality.name()));
        }
        if model.text_modalities().any(|m| m.data_key() == key) {
            // A text modality's items are text or files, as the row gives them.
            return multitoken_core::item_from_json(value, base, true).map_err(|e| e.to_string());
        }
        default_items(key, value, base)
    }
}

/// The item reader without a model: strings are file paths relative to the
/// dataset. Other JSON can name no file: under `documents` it must be inline
/// text marked `{"text": "..."}` (as the document modality reads it), under
/// the other usual keys of multi_token ([`default_tokens`]'s, file modalities)
/// it is an error, and under any other key (a modality linked in, whose model
/// is not loaded) it is kept as inline text for that modality to parse.
pub fn default_items(key: &str, value: &Value, base: &Path) -> std::result::Result<Item, String> {
    if let Some(s) = value.as_str() {
        return resolve_item(s, base);
    }
    if key == "documents" {
        return match value.as_object().filter(|m| m.len() == 1).and_then(|m| m.get("text")) {
            Some(Value::String(text)) => Ok(Item::Text(text.clone())),
            _ => Err(format!(
                "a document is a file path (a string) or inline text written {{\"text\": \"...\"}}, got {value}"
            )),
        };
    }
    const FILE_KEYS: [&str; 3] = ["images", "speech_audios", "videos"];
    if FILE_KEYS.contains(&key) {
        return Err(format!("must be a string, got {value}"));
    }
    multitoken_core::item_from_json(value, base, true).map_err(|e| e.to_string())
}

/// What a missing item file's error adds for `key`: how inline text is written
/// where it may be (documents).
fn missing_hint(key: &str) -> &'static str {
    if key == "documents" {
        " (a document string is a file path; write a document's text inline as {\"text\": \"...\"})"
    } else {
        ""
    }
}

/// Reads every row of a JSONL dataset; the first bad row is an error naming its line and id.
pub fn read_jsonl(path: &Path) -> Result<Vec<Row>> {
    read_jsonl_with(path, &default_items)
}

/// [`read_jsonl`] with the items read by the modalities of `model`.
pub fn read_jsonl_for(path: &Path, model: &MultimodalModel) -> Result<Vec<Row>> {
    read_jsonl_with(path, &model_items(model))
}

/// [`read_jsonl`] with items read by `items`.
pub fn read_jsonl_with(path: &Path, items: &ItemReader<'_>) -> Result<Vec<Row>> {
    let text = read_dataset_text(path)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row = parse_row_with(path, &base, index + 1, line, items)?;
        // A missing file is found here, naming the row and the item, rather
        // than deep inside preprocessing.
        for (key, list) in &row.items {
            for (k, item) in list.iter().enumerate() {
                if let Item::Path(p) = item {
                    if let Err(e) = file_exists(p) {
                        return Err(Error::Row {
                            file: path.to_path_buf(),
                            line: row.line,
                            id: row.id_suffix(),
                            message: format!("`{key}` item {} {}: {e}{}", k + 1, p.display(), missing_hint(key)),
                        });
                    }
                }
            }
        }
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(Error::Config(format!(
            "{}: the dataset has no rows",
            path.display()
        )));
    }
    Ok(rows)
}

/// Parses one JSONL line.
pub fn parse_row(file: &Path, base: &Path, line: usize, text: &str) -> Result<Row> {
    parse_row_with(file, base, line, text, &default_items)
}

/// Parses one JSONL line, its items read by `reader`.
pub fn parse_row_with(file: &Path, base: &Path, line: usize, text: &str, reader: &ItemReader<'_>) -> Result<Row> {
    let fail = |id: &str, message: String| Error::Row {
        file: file.to_path_buf(),
        line,
        id: if id.is_empty() {
            String::new()
        } else {
            format!(" (id {id})")
        },
        message,
    };
    let value: Value =
        serde_json::from_str(text).map_err(|e| fail("", format!("not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(fail("", "a row must be a JSON object".into()));
    };
    let id = match map.get("id") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(fail(
                "",
                format!("`id` must be a string or a number, got {other}"),
            ))
        }
    };
    let messages = match map.get("messages") {
        Some(Value::Array(list)) => list,
        Some(_) => return Err(fail(&id, "`messages` must be a list".into())),
        None => return Err(fail(&id, "no `messages`".into())),
    };
    if messages.is_empty() {
        return Err(fail(&id, "`messages` is empty".into()));
    }
    let mut parsed = Vec::with_capacity(messages.len());
    for (k, message) in messages.iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str);
        let content = message.get("content").and_then(Value::as_str);
        match (role, content) {
            (Some(role), Some(content)) if ROLES.contains(&role) => {
                parsed.push(Message::new(role, content))
            }
            (Some(role), Some(_)) => {
                return Err(fail(
                    &id,
                    format!(
                        "message {}: role `{role}` is not one of {}",
                        k + 1,
                        ROLES.join(", ")
                    ),
                ))
            }
            _ => {
                return Err(fail(
                    &id,
                    format!("message {}: needs string `role` and `content`", k + 1),
                ))
            }
        }
    }
    if !parsed.iter().any(|m| m.role == "assistant") {
        return Err(fail(
            &id,
            "no assistant message: nothing to learn from".into(),
        ));
    }
    let mut items: ItemsByKey = BTreeMap::new();
    for (key, value) in &map {
        if key == "id" || key == "messages" {
            continue;
        }
        let Value::Array(list) = value else {
            return Err(fail(&id, format!("`{key}` must be a list of items")));
        };
        let mut row_items = Vec::with_capacity(list.len());
        for (k, item) in list.iter().enumerate() {
            row_items.push(
                reader(key, item, base)
                    .map_err(|m| fail(&id, format!("`{key}` item {}: {m}", k + 1)))?,
            );
        }
        items.insert(key.clone(), row_items);
    }
    let id = if id.is_empty() {
        format!("line {line}")
    } else {
        id
    };
    Ok(Row {
        id,
        line,
        messages: parsed,
        items,
    })
}

fn resolve_item(s: &str, base: &Path) -> std::result::Result<Item, String> {
    if s.starts_with("http://") || s.starts_with("https://") {
        return Err(format!(
            "`{s}` is a URL; training reads local files only (download it first)"
        ));
    }
    Ok(Item::Path(base.join(s)))
}

/// `Ok` when `p` is a readable-looking regular file.
fn file_exists(p: &Path) -> std::io::Result<()> {
    multitoken_core::check_regular_file(p)
}

/// Longest accepted dataset line (one row): rows name their items by path, so a
/// longer line is not a dataset row.
pub const MAX_ROW_BYTES: usize = 16 << 20;

/// The text of a JSONL dataset: a regular file (a FIFO would block `dataset
/// check` forever), without a leading UTF-8 byte-order mark (editors on Windows
/// write one; it made row 1 fail at column 1), every line at most
/// [`MAX_ROW_BYTES`].
pub fn read_dataset_text(path: &Path) -> Result<String> {
    multitoken_core::check_regular_file(path).map_err(|e| Error::io(path, e))?;
    let mut text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    if let Some((index, line)) = text.lines().enumerate().find(|(_, line)| line.len() > MAX_ROW_BYTES) {
        return Err(Error::Config(format!(
            "{}:{}: the line is {} bytes, more than the {MAX_ROW_BYTES}-byte limit of one row",
            path.display(),
            index + 1,
            line.len()
        )));
    }
    Ok(text)
}

/// What `dataset check` found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CheckReport {
    /// Rows read.
    pub rows: usize,
    /// Items per data key.
    pub items: BTreeMap<String, usize>,
    /// One line per problem: `file:line (id X): message`.
    pub problems: Vec<String>,
}

/// Checks every row of a dataset without a model: JSON schema, roles, item
/// files present and readable, and that each data key's items match the count of
/// `tokens[key]` (e.g. `images` -> `<image>`) in the text.
pub fn check(path: &Path, tokens: &BTreeMap<String, String>) -> Result<CheckReport> {
    check_with(path, tokens, &default_items)
}

/// [`check`] with the items read by `reader` (a model's: [`model_items`]).
pub fn check_with(path: &Path, tokens: &BTreeMap<String, String>, reader: &ItemReader<'_>) -> Result<CheckReport> {
    let text = read_dataset_text(path)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut report = CheckReport::default();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        report.rows += 1;
        let row = match parse_row_with(path, &base, index + 1, line, reader) {
            Ok(row) => row,
            Err(e) => {
                report.problems.push(e.to_string());
                continue;
            }
        };
        let at = format!("{}:{} (id {})", path.display(), row.line, row.id);
        for (key, items) in &row.items {
            *report.items.entry(key.clone()).or_default() += items.len();
            for (k, item) in items.iter().enumerate() {
                if let Item::Path(p) = item {
                    if let Err(e) = file_exists(p) {
                        report.problems.push(format!(
                            "{at}: `{key}` item {} {}: {e}{}",
                            k + 1,
                            p.display(),
                            missing_hint(key)
                        ));
                    }
                }
            }
            if let Some(token) = tokens.get(key) {
                let used: usize = row
                    .messages
                    .iter()
                    .map(|m| m.content.matches(token.as_str()).count())
                    .sum();
                if used != items.len() {
                    report.problems.push(format!(
                        "{at}: {} `{key}` item(s) but {used} `{token}` token(s) in the messages",
                        items.len()
                    ));
                }
            }
        }
        for (key, token) in tokens {
            let used: usize = row
                .messages
                .iter()
                .map(|m| m.content.matches(token.as_str()).count())
                .sum();
            if used > 0 && !row.items.contains_key(key) {
                report.problems.push(format!(
                    "{at}: {used} `{token}` token(s) but no `{key}` list"
                ));
            }
        }
    }
    if report.rows == 0 {
        report
            .problems
            .push(format!("{}: the dataset has no rows", path.display()));
    }
    Ok(report)
}

/// The usual modality tokens of multi_token's data keys, plus those of every
/// modality crate linked in that declares its token without a model
/// ([`multitoken_core::registered_tokens`]).
pub fn default_tokens() -> BTreeMap<String, String> {
    let mut tokens: BTreeMap<String, String> = [
        ("images", "<image>"),
        ("speech_audios", "<speech>"),
        ("documents", "<document>"),
        ("videos", "<video>"),
    ]
    .into_iter()
    .map(|(k, t)| (k.to_string(), t.to_string()))
    .collect();
    for (key, token) in multitoken_core::registered_tokens() {
        tokens.entry(key).or_insert(token);
    }
    tokens
}

/// Converts LLaVA's JSON (a list of `{"id", "image", "conversations": [{"from":
/// "human"|"gpt"|"system", "value"}]}`) to multitoken JSONL rows.
///
/// Image paths are written relative to the output file's directory (created
/// when missing); they are looked up under `image_folder` (default: the input
/// file's directory).
/// Returns the number of rows written.
pub fn convert_llava(input: &Path, output: &Path, image_folder: Option<&Path>) -> Result<usize> {
    let text = std::fs::read_to_string(input).map_err(|e| Error::io(input, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not valid JSON: {e}", input.display())))?;
    let Value::Array(list) = value else {
        return Err(Error::Config(format!(
            "{}: LLaVA data is a JSON list of rows",
            input.display()
        )));
    };
    let input_dir = input.parent().map(Path::to_path_buf).unwrap_or_default();
    let images_dir = image_folder.map(Path::to_path_buf).unwrap_or(input_dir);
    let out_dir = output.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut lines = String::new();
    for (index, row) in list.iter().enumerate() {
        let id = row
            .get("id")
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .unwrap_or_default();
        let fail = |message: String| Error::Row {
            file: input.to_path_buf(),
            line: index + 1,
            id: if id.is_empty() {
                String::new()
            } else {
                format!(" (id {id})")
            },
            message,
        };
        let Some(Value::Array(turns)) = row.get("conversations") else {
            return Err(fail("no `conversations` list".into()));
        };
        let mut messages = Vec::new();
        for (k, turn) in turns.iter().enumerate() {
            let from = turn.get("from").and_then(Value::as_str);
            let value = turn.get("value").and_then(Value::as_str);
            let role = match from {
                Some("human") | Some("user") => "user",
                Some("gpt") | Some("assistant") => "assistant",
                Some("system") => "system",
                other => return Err(fail(format!("turn {}: unknown speaker {other:?}", k + 1))),
            };
            let Some(value) = value else {
                return Err(fail(format!("turn {}: no string `value`", k + 1)));
            };
            messages.push(serde_json::json!({"role": role, "content": value}));
        }
        let mut out = serde_json::Map::new();
        out.insert(
            "id".into(),
            Value::String(if id.is_empty() {
                format!("{}", index + 1)
            } else {
                id.clone()
            }),
        );
        let images: Vec<String> = match row.get("image") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(other) => {
                return Err(fail(format!(
                    "`image` must be a string or a list, got {other}"
                )))
            }
        };
        if !images.is_empty() {
            let paths: Vec<Value> = images
                .iter()
                .map(|i| Value::String(relative_to(&images_dir.join(i), &out_dir)))
                .collect();
            out.insert("images".into(), Value::Array(paths));
        }
        out.insert("messages".into(), Value::Array(messages));
        lines.push_str(&Value::Object(out).to_string());
        lines.push('\n');
    }
    if !out_dir.as_os_str().is_empty() {
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    }
    write_atomic(output, lines.as_bytes())?;
    Ok(list.len())
}

/// `path` relative to `dir` when it lies under it, else absolute.
fn relative_to(path: &Path, dir: &Path) -> String {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let (p, d) = (abs(path), abs(dir));
    match p.strip_prefix(&d) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => p.display().to_string(),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Saves tensors as safetensors at `path` with the permissions any other file the
/// run writes gets (`0666` less the umask).
///
/// safetensors writes through a temporary file created `0600` and renames it, so
/// trained weights came out readable by their owner alone.
pub fn save_safetensors<K: AsRef<str> + Ord + std::fmt::Display>(
    tensors: &std::collections::HashMap<K, candle_core::Tensor>,
    path: &Path,
) -> Result<()> {
    candle_core::safetensors::save(tensors, path)?;
    respect_umask(path)
}

/// Gives `path` mode `0666` less the process umask (read from `/proc/self/status`;
/// `022` where that is unavailable), as `File::create` would have.
pub fn respect_umask(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let umask = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("Umask:"))?;
                u32::from_str_radix(line.trim_start_matches("Umask:").trim(), 8).ok()
            })
            .unwrap_or(0o022);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !umask)).map_err(|e| Error::io(path, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// `path` with `.tmp` appended to its name.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}
