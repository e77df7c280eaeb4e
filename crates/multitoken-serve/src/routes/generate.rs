//! `POST /generate`: multi_token's API. The body is a dataset row
//! (`messages` plus item lists such as `images`, `speech_audios`, `documents`)
//! with optional `max_new_tokens`, `temperature`, `top_p`, `seed`, `stop`,
//! `parse_special_tokens` (see [`crate::state::GenerationRequest`]); the answer is
//! `{"output": "..."}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use multitoken_core::Message;
use serde_json::Value;

use super::{collect, json_object, optional, sampling_fields, type_name, usize_field};
use crate::error::{Error, Result};
use crate::state::{AppState, GenerationRequest, RequestItem};

/// Row keys that are never item lists.
const NON_ITEM_KEYS: [&str; 10] = [
    "messages",
    "max_new_tokens",
    "temperature",
    "top_p",
    "seed",
    "id",
    "stop",
    "conversations",
    "metadata",
    "parse_special_tokens",
];

/// The handler.
pub async fn generate(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let row = json_object(body, state.config.limits.max_body_bytes)?;
    let request = parse_row(&state, &row)?;
    let mut started = state.start(request).await?;
    let (text, finished) = collect(&mut started.events).await?;
    let mut response = Json(serde_json::json!({ "output": text })).into_response();
    response.extensions_mut().insert(crate::log::TokenCounts {
        prompt: finished.prompt_tokens,
        completion: finished.completion_tokens,
    });
    Ok(response)
}

/// A dataset row to a generation request.
pub fn parse_row(state: &AppState, row: &serde_json::Map<String, Value>) -> Result<GenerationRequest> {
    let messages = match row.get("messages") {
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, m)| parse_message(i, m))
            .collect::<Result<Vec<_>>>()?,
        Some(other) => {
            return Err(Error::bad_param(
                "messages",
                format!("`messages` must be an array, not {}", type_name(other)),
            ))
        }
        None => return Err(Error::bad_param("messages", "the row has no `messages`")),
    };
    let mut items = Vec::new();
    for (key, value) in row {
        if NON_ITEM_KEYS.contains(&key.as_str()) {
            continue;
        }
        let Value::Array(list) = value else {
            return Err(Error::bad_param(
                key,
                format!("`{key}` must be an array of items, not {}", type_name(value)),
            ));
        };
        if list.is_empty() {
            continue;
        }
        state.token_for(key, key)?;
        for (i, entry) in list.iter().enumerate() {
            let what = format!("{key}[{i}]");
            // A string is a data URL, URL or path; other JSON (numbers, lists)
            // is read by the modality when it takes inline items.
            let source = state.item_source(key, entry, false, &what).map_err(|e| {
                if entry.is_string() {
                    e
                } else {
                    Error::bad_param(
                        &what,
                        format!("{what} must be a string (a data URL, URL or path), not {}: {e}", type_name(entry)),
                    )
                }
            })?;
            items.push(RequestItem {
                data_key: key.clone(),
                source,
                what,
            });
        }
    }
    let (temperature, top_p, seed) = sampling_fields(row)?;
    let stop = match row.get("stop") {
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
    let _ = optional(row, "id", "a string or number", |v| {
        (v.is_string() || v.is_number()).then_some(())
    })?;
    Ok(GenerationRequest {
        messages,
        items,
        max_new_tokens: usize_field(row, "max_new_tokens")?,
        temperature,
        top_p,
        seed,
        stop,
        parse_special_tokens: optional(row, "parse_special_tokens", "a boolean", Value::as_bool)?,
    })
}

fn parse_message(index: usize, value: &Value) -> Result<Message> {
    let what = format!("messages[{index}]");
    let Value::Object(map) = value else {
        return Err(Error::bad_param(
            &what,
            format!(
                "{what} must be an object with `role` and `content`, not {}",
                type_name(value)
            ),
        ));
    };
    let field = |key: &str| match map.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(Error::bad_param(
            format!("{what}.{key}"),
            format!("{what}.{key} must be a string, not {}", type_name(other)),
        )),
        None => Err(Error::bad_param(
            format!("{what}.{key}"),
            format!("{what} has no `{key}`"),
        )),
    };
    let role = field("role")?;
    if !matches!(role.as_str(), "system" | "user" | "assistant") {
        return Err(Error::bad_param(
            format!("{what}.role"),
            format!("{what}.role is {role:?}; expected system, user or assistant"),
        ));
    }
    Ok(Message::new(role, field("content")?))
}
