//! `GET /`: the web chat page, compiled into the binary.

use axum::response::Html;

/// The page (HTML, CSS and JavaScript in one file; it talks to
/// `/v1/models` and `/v1/chat/completions`).
const INDEX_HTML: &str = include_str!("../web/index.html");

/// The handler.
pub async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}
