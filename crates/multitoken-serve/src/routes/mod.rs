//! The HTTP routes, one file per endpoint family, and what they share: reading
//! a JSON body into a clear 4xx when it is not what the route expects.

pub mod generate;
pub mod openai;
pub mod ops;
pub mod web;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::scheduler::{Event, Finished};

/// The body as a JSON object, or a 4xx naming the problem.
pub fn json_object(
    body: std::result::Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<serde_json::Map<String, Value>> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::PayloadTooLarge { limit }
        } else {
            Error::bad_request(format!("cannot read the request body: {}", rejection.body_text()))
        }
    })?;
    if bytes.is_empty() {
        return Err(Error::bad_request("the request body is empty; expected a JSON object"));
    }
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::bad_request(format!("the request body is not valid JSON: {e}")))?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(Error::bad_request(format!(
            "the request body must be a JSON object, not {}",
            type_name(&other)
        ))),
    }
}

/// "a string", "an array", ... for error messages.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An optional field of a given JSON type.
pub fn optional<'a, T>(
    map: &'a serde_json::Map<String, Value>,
    key: &str,
    want: &str,
    get: impl Fn(&'a Value) -> Option<T>,
) -> Result<Option<T>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => get(v)
            .map(Some)
            .ok_or_else(|| Error::bad_param(key, format!("`{key}` must be {want}, not {}", type_name(v)))),
    }
}

/// Sampling fields shared by both APIs: (temperature, top_p, seed).
pub fn sampling_fields(map: &serde_json::Map<String, Value>) -> Result<(Option<f64>, Option<f64>, Option<u64>)> {
    Ok((
        optional(map, "temperature", "a number", Value::as_f64)?,
        optional(map, "top_p", "a number", Value::as_f64)?,
        optional(map, "seed", "a non-negative integer", Value::as_u64)?,
    ))
}

/// A non-negative integer field as usize.
pub fn usize_field(map: &serde_json::Map<String, Value>, key: &str) -> Result<Option<usize>> {
    Ok(optional(map, key, "a non-negative integer", Value::as_u64)?.map(|n| n as usize))
}

/// Collects a whole generation: its text and how it ended.
pub async fn collect(events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> Result<(String, Finished)> {
    let mut text = String::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Text(piece) => text.push_str(&piece),
            Event::Done(finished) => return Ok((text, finished)),
            Event::Error(message) => return Err(Error::Internal(message)),
        }
    }
    Err(Error::Internal(
        "the scheduler stopped before the answer was complete".into(),
    ))
}
