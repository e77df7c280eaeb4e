//! The router and the serve loop with graceful shutdown.

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use axum::Router;

use crate::error::{Error, Result};
use crate::routes::{generate, openai, ops, web};
use crate::state::AppState;

/// Every route, the body limit and the metrics middleware.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(web::index))
        .route("/generate", post(generate::generate))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/health", get(ops::health))
        .route("/metrics", get(ops::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), ops::track))
        .with_state(state)
}

async fn not_found(uri: Uri) -> Error {
    Error::NotFound(format!("no route {}", uri.path()))
}

async fn method_not_allowed(method: Method) -> Error {
    Error::MethodNotAllowed(method.to_string())
}

/// Serves until `shutdown` resolves, then stops accepting connections, refuses
/// new generations and waits for the running requests to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let closing = state.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            closing.scheduler.close();
        })
        .await
        .map_err(|e| Error::Internal(format!("serving: {e}")))
}
