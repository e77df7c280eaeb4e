//! `GET /health` and `GET /metrics`, plus the request metrics middleware.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::state::AppState;

/// `GET /health`: ok while the server accepts requests.
pub async fn health(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "model": state.config.model_name,
        "queue_depth": state.metrics.queue_depth(),
    }))
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// The routes served, as metrics labels.
pub const ROUTES: [&str; 6] = [
    "/",
    "/generate",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/metrics",
];

/// Counts every request by route and status, times it to its response head and
/// logs it ([`crate::log`]: method, path, status, tokens, time).
pub async fn track(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    // The path when it is one of ours; anything else is one label, so a scan of
    // random paths cannot grow the metrics without bound.
    let path = request.uri().path();
    let route = ROUTES
        .iter()
        .find(|r| **r == path)
        .copied()
        .unwrap_or("other")
        .to_string();
    // The path as asked (a URI holds no spaces or line breaks), cut short so that a
    // scan of long random paths cannot flood the log.
    let shown: String = path.chars().take(128).collect();
    let start = Instant::now();
    let response = next.run(request).await;
    let elapsed = start.elapsed();
    let status = response.status().as_u16();
    state.metrics.record_request(&route, status, elapsed);
    let tokens = response.extensions().get::<crate::log::TokenCounts>().copied();
    crate::log::request_line(method.as_str(), &shown, status, tokens, elapsed);
    response
}
