//! multitoken-serve: the HTTP server (see ARCHITECTURE.md, "multitoken-serve").
//!
//! multi_token's `POST /generate`, OpenAI-compatible `POST /v1/chat/completions`
//! (streaming with server-sent events), `GET /v1/models`, `GET /health`,
//! `GET /metrics` and a web chat page at `/`, on axum. Requests are batched by a
//! continuous-batching [`scheduler`]. This is the only crate of the workspace
//! that knows HTTP and OpenAI JSON; it finds modalities through the model, never
//! by naming a modality crate.
//!
//! ```no_run
//! # async fn run(model: multitoken_lm::multimodal::MultimodalModel) -> multitoken_serve::Result<()> {
//! let state = multitoken_serve::AppState::new(model, multitoken_serve::ServeConfig::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await.map_err(|e| multitoken_serve::Error::Startup(e.to_string()))?;
//! multitoken_serve::serve(listener, state, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod cli;
pub mod config;
pub mod detok;
pub mod error;
pub mod items;
pub mod log;
pub mod metrics;
pub mod routes;
pub mod scheduler;
pub mod server;
pub mod state;

pub use config::{ConnectionLimits, Limits, ServeConfig};
pub use error::{Error, Result};
pub use server::{router, serve};
pub use state::AppState;
