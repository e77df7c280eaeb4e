//! `POST /v1/chat/completions` and `GET /v1/models`, OpenAI-compatible.
//!
//! Content parts `text`, `image_url` (data URLs; http(s) with `--allow-urls`),
//! `input_audio` (base64 wav/mp3/...), `file` (base64 document), reaching the
//! modality whose [`multitoken_core::Modality::media`] is an image, audio or
//! document, and the generic `{"type": "input_item", "modality": NAME, "data": ...}`
//! (NAME: a builder name, data key or token; `data` a data URL, URL, allowed
//! path, or for modalities taking inline items text or any JSON value) become the
//! message text with each item's modality token at its place (parts joined by
//! newlines, so `[image, text]` reads `<image>\nquestion` as LLaVA prompts do).
//! `stream: true` answers with server-sent events in OpenAI's chunk format,
//! ending `data: [DONE]`; `stream_options.include_usage` adds a usage chunk.
//! `parse_special_tokens: true` lets special tokens typed in messages act as
//! tokens (default: the server's `--parse-special-tokens`, off: text is text).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use multitoken_core::{ItemMedia, Message};
use multitoken_lm::generate::FinishReason;
use serde_json::{json, Value};

use super::{collect, json_object, optional, sampling_fields, type_name, usize_field};
use crate::error::{Error, Result};
use crate::items::ItemSource;
use crate::scheduler::Event;
use crate::state::{AppState, GenerationRequest, RequestItem};

/// `GET /v1/models`: the one model served, with its modalities.
pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.config.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "multitoken",
            "modalities": state.modalities_json(),
        }]
    }))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let map = json_object(body, state.config.limits.max_body_bytes)?;
    let (request, stream, include_usage) = parse_request(&state, &map)?;
    let started = state.start(request).await?;
    let id = format!("chatcmpl-{}", state.next_id());
    if stream {
        return Ok(stream_response(state, started, id, include_usage).into_response());
    }
    let mut events = started.events;
    let (text, finished) = collect(&mut events).await?;
    let mut response = Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": now(),
        "model": state.config.model_name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish_reason(finished.reason),
        }],
        "usage": usage(finished.prompt_tokens, finished.completion_tokens),
    }))
    .into_response();
    response.extensions_mut().insert(crate::log::TokenCounts {
        prompt: finished.prompt_tokens,
        completion: finished.completion_tokens,
    });
    Ok(response)
}

fn stream_response(
    state: Arc<AppState>,
    started: crate::state::Started,
    id: String,
    include_usage: bool,
) -> Sse<impl tokio_stream::Stream<Item = std::result::Result<SseEvent, Infallible>>> {
    let model = state.config.model_name.clone();
    let created = now();
    let chunk = move |delta: Value, finish: Value, usage_value: Option<Value>| {
        let mut body = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": if delta.is_null() { json!([]) } else { json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]) },
        });
        if let Some(u) = usage_value {
            body["usage"] = u;
        }
        SseEvent::default().data(body.to_string())
    };
    let mut events = started.events;
    let stream = async_stream(move |tx| async move {
        let send = |e: SseEvent| tx.send(Ok(e)).is_ok();
        if !send(chunk(json!({"role": "assistant", "content": ""}), Value::Null, None)) {
            return;
        }
        while let Some(event) = events.recv().await {
            match event {
                Event::Text(piece) => {
                    if !send(chunk(json!({"content": piece}), Value::Null, None)) {
                        return;
                    }
                }
                Event::Done(finished) => {
                    send(chunk(json!({}), json!(finish_reason(finished.reason)), None));
                    if include_usage {
                        send(chunk(
                            Value::Null,
                            Value::Null,
                            Some(usage(finished.prompt_tokens, finished.completion_tokens)),
                        ));
                    }
                    break;
                }
                Event::Error(message) => {
                    let error = Error::Internal(message);
                    send(SseEvent::default().data(error.body().to_string()));
                    break;
                }
            }
        }
        send(SseEvent::default().data("[DONE]"));
    });
    Sse::new(stream)
}

/// A stream fed by a task: the task ends (and its receiver with it) when the
/// client goes away, which drops the scheduler's channel and frees the slot.
fn async_stream<F, Fut>(
    body: F,
) -> tokio_stream::wrappers::UnboundedReceiverStream<std::result::Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::UnboundedSender<std::result::Result<SseEvent, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let closed = tx.clone();
    let task = body(tx);
    tokio::spawn(async move {
        tokio::select! {
            _ = task => {}
            _ = closed.closed() => {}
        }
    });
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The request, whether it streams, whether the stream ends with usage.
fn parse_request(state: &AppState, map: &serde_json::Map<String, Value>) -> Result<(GenerationRequest, bool, bool)> {
    if let Some(model) = optional(map, "model", "a string", Value::as_str)? {
        if model != state.config.model_name && !model.is_empty() {
            return Err(Error::NotFound(format!(
                "the model `{model}` does not exist; this server serves `{}`",
                state.config.model_name
            )));
        }
    }
    let list = match map.get("messages") {
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(Error::bad_param(
                "messages",
                format!("`messages` must be an array, not {}", type_name(other)),
            ))
        }
        None => return Err(Error::bad_param("messages", "the request has no `messages`")),
    };
    let mut messages = Vec::with_capacity(list.len());
    let mut items = Vec::new();
    for (i, message) in list.iter().enumerate() {
        messages.push(parse_message(state, i, message, &mut items)?);
    }
    let n = usize_field(map, "n")?.unwrap_or(1);
    if n != 1 {
        return Err(Error::bad_param(
            "n",
            format!("n is {n}; this server returns one choice"),
        ));
    }
    let max_tokens = match usize_field(map, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => usize_field(map, "max_tokens")?,
    };
    let (temperature, top_p, seed) = sampling_fields(map)?;
    let stop = match map.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Error::bad_param("stop", "`stop` must hold strings"))
            })
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(Error::bad_param(
                "stop",
                format!("`stop` must be a string or an array, not {}", type_name(other)),
            ))
        }
    };
    let stream = optional(map, "stream", "a boolean", Value::as_bool)?.unwrap_or(false);
    let include_usage = match map.get("stream_options") {
        Some(Value::Object(o)) => o.get("include_usage").and_then(Value::as_bool).unwrap_or(false),
        _ => false,
    };
    let request = GenerationRequest {
        messages,
        items,
        max_new_tokens: max_tokens,
        temperature,
        top_p,
        seed,
        stop,
        parse_special_tokens: optional(map, "parse_special_tokens", "a boolean", Value::as_bool)?,
    };
    Ok((request, stream, include_usage))
}

fn parse_message(state: &AppState, index: usize, value: &Value, items: &mut Vec<RequestItem>) -> Result<Message> {
    let what = format!("messages[{index}]");
    let Value::Object(map) = value else {
        return Err(Error::bad_param(
            &what,
            format!("{what} must be an object, not {}", type_name(value)),
        ));
    };
    let role = match map.get("role") {
        Some(Value::String(role)) => match role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(Error::bad_param(
                    format!("{what}.role"),
                    format!("{what}.role {other:?} is not supported (system, developer, user, assistant)"),
                ))
            }
        },
        Some(other) => {
            return Err(Error::bad_param(
                format!("{what}.role"),
                format!("{what}.role must be a string, not {}", type_name(other)),
            ))
        }
        None => {
            return Err(Error::bad_param(
                format!("{what}.role"),
                format!("{what} has no `role`"),
            ))
        }
    };
    let content = match map.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut pieces = Vec::with_capacity(parts.len());
            for (k, part) in parts.iter().enumerate() {
                pieces.push(parse_part(state, &format!("{what}.content[{k}]"), part, items)?);
            }
            pieces.join("\n")
        }
        Some(other) => {
            return Err(Error::bad_param(
                format!("{what}.content"),
                format!(
                    "{what}.content must be a string or an array of parts, not {}",
                    type_name(other)
                ),
            ))
        }
    };
    Ok(Message::new(role, content))
}

/// One content part: its text, or its item's modality token.
fn parse_part(state: &AppState, what: &str, part: &Value, items: &mut Vec<RequestItem>) -> Result<String> {
    let Value::Object(map) = part else {
        return Err(Error::bad_param(
            what,
            format!("{what} must be an object, not {}", type_name(part)),
        ));
    };
    let kind = map.get("type").and_then(Value::as_str).unwrap_or_default();
    let string_at = |path: &[&str]| -> Result<String> {
        let mut v = part;
        for key in path {
            v = v.get(key).unwrap_or(&Value::Null);
        }
        v.as_str().map(str::to_string).ok_or_else(|| {
            Error::bad_param(
                what,
                format!("{what}.{} must be a string, not {}", path.join("."), type_name(v)),
            )
        })
    };
    let (data_key, source) = match kind {
        "text" | "input_text" => return string_at(&["text"]),
        "image_url" => {
            let url = match map.get("image_url") {
                Some(Value::String(url)) => url.clone(),
                _ => string_at(&["image_url", "url"])?,
            };
            (state.key_for_media(ItemMedia::Image, what)?, ItemSource::parse(&url))
        }
        "input_audio" => (
            state.key_for_media(ItemMedia::Audio, what)?,
            ItemSource::Base64(string_at(&["input_audio", "data"])?),
        ),
        // The generic part: any registered modality, by builder name, data key or token.
        "input_item" => {
            let name = string_at(&["modality"])?;
            let key = state.key_for_modality(&name, what)?;
            let data = map.get("data").ok_or_else(|| Error::bad_param(what, format!("{what}: an input_item needs `data`")))?;
            let source = state.item_source(&key, data, true, &format!("{what}.data"))?;
            (key, source)
        }
        "file" => {
            if map.get("file").and_then(|f| f.get("file_id")).is_some() {
                return Err(Error::bad_param(
                    what,
                    format!("{what}: uploaded file ids are not supported; send `file_data` (base64)"),
                ));
            }
            (state.key_for_media(ItemMedia::Document, what)?, ItemSource::Base64(string_at(&["file", "file_data"])?))
        }
        "" => return Err(Error::bad_param(what, format!("{what} has no `type`"))),
        other => {
            return Err(Error::bad_param(
                what,
                format!("{what}: content part type {other:?} is not supported (text, image_url, input_audio, file, input_item)"),
            ))
        }
    };
    let token = state.token_for(&data_key, what)?;
    items.push(RequestItem {
        data_key,
        source,
        what: what.to_string(),
    });
    Ok(token)
}
