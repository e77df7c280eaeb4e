//! The router and the serve loop with graceful shutdown.
//!
//! The loop is our own rather than `axum::serve` because a server facing
//! untrusted clients needs what that one does not set: a header read timeout
//! (hyper's, which also ends kept-alive connections that stay idle), a cap on
//! open connections, and a file-descriptor limit raised at start. The body read
//! timeout is the [`read_body`] middleware.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{watch, Semaphore};
use tokio_stream::StreamExt as _;

use crate::error::{Error, Result};
use crate::routes::{generate, openai, ops, web};
use crate::state::AppState;

/// File descriptors kept free of connections: the listener, model files,
/// items read from `--allow-files`, the runtime's own.
const RESERVED_FDS: u64 = 64;

/// Every route, the body limit and timeout, and the metrics middleware.
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
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            read_body,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ops::track,
        ))
        .with_state(state)
}

async fn not_found(uri: Uri) -> Error {
    Error::NotFound(format!("no route {}", uri.path()))
}

async fn method_not_allowed(method: Method) -> Error {
    Error::MethodNotAllowed(method.to_string())
}

/// Reads the whole request body before any handler runs, within
/// `--body-read-timeout` and `--max-body-bytes`: a client that sends half a body
/// and stops gets a 408 and its connection back, instead of holding a handler
/// (and the socket) forever. Over the size limit it is a 413, checked on the
/// declared `Content-Length` first and then on the bytes as they arrive.
pub async fn read_body(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let limit = state.config.limits.max_body_bytes;
    let timeout = state.config.connections.body_read_timeout;
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Error::PayloadTooLarge { limit }.into_response();
    }
    let bytes = match tokio::time::timeout(timeout, collect_body(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(error)) => return error.into_response(),
        Err(_) => {
            return Error::Timeout(format!(
                "the request body did not arrive within {} s (--body-read-timeout)",
                timeout.as_secs_f64()
            ))
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The body's bytes, or a 413 once they pass `limit`.
async fn collect_body(body: Body, limit: usize) -> Result<Bytes> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| Error::bad_request(format!("cannot read the request body: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            return Err(Error::PayloadTooLarge { limit });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(bytes))
}

/// Serves until `shutdown` resolves, then stops accepting connections, refuses
/// new generations and waits for the running requests to finish.
///
/// At most `--max-connections` connections are open at once (fewer when the
/// file-descriptor limit is lower, see [`raise_fd_limit`]); at the cap the loop
/// stops accepting and further clients wait in the listen backlog until a
/// connection closes, which the header read timeout guarantees for idle ones.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let limits = state.config.connections.clone();
    let max_connections = connection_cap(limits.max_connections, raise_fd_limit());
    if max_connections < limits.max_connections {
        tracing::warn!(
            "the file-descriptor limit allows {max_connections} connections, fewer than --max-connections {}",
            limits.max_connections
        );
    }
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let app = router(state.clone());
    // Dropping `stop_rx` tells every connection to finish gracefully; each one
    // holds a `done_rx` clone, so `done_tx.closed()` resolves when all are gone.
    let (stop_tx, stop_rx) = watch::channel(());
    let (done_tx, done_rx) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors (or a connection reset before
                    // accept): wait a little instead of spinning; serving goes on.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let header_timeout = limits.header_read_timeout;
        let stop_tx = stop_tx.clone();
        let done_rx = done_rx.clone();
        let metrics = state.metrics.clone();
        metrics.add_connections(1);
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
            let mut stopping = pin!(stop_tx.closed());
            let mut asked_to_stop = false;
            loop {
                tokio::select! {
                    _ = connection.as_mut() => break,
                    () = &mut stopping, if !asked_to_stop => {
                        asked_to_stop = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            metrics.add_connections(-1);
            drop(permit);
            drop(done_rx);
        });
    }
    state.scheduler.close();
    drop(listener);
    drop(stop_rx);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// The connection cap that fits `fd_limit` (with [`RESERVED_FDS`] kept free).
fn connection_cap(wanted: usize, fd_limit: Option<u64>) -> usize {
    match fd_limit {
        Some(limit) => {
            let fit = usize::try_from(limit.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
            wanted.min(fit.max(1))
        }
        None => wanted,
    }
}

/// Raises the process's soft limit on open files to its hard limit (Linux's
/// default soft limit of 1,024 is what a flood of idle sockets exhausted) and
/// returns the soft limit now in force, or `None` where it cannot be read.
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            // SAFETY: as above.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        #[allow(clippy::useless_conversion)]
        Some(u64::from(limit.rlim_cur))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_fits_the_fd_limit() {
        assert_eq!(
            connection_cap(4096, Some(1024)),
            1024 - RESERVED_FDS as usize
        );
        assert_eq!(connection_cap(100, Some(1_000_000)), 100);
        assert_eq!(connection_cap(100, None), 100);
        assert_eq!(connection_cap(100, Some(10)), 1);
    }

    #[test]
    fn the_fd_limit_is_raised_to_the_hard_limit() {
        let soft = raise_fd_limit();
        assert!(soft.is_some_and(|n| n >= 64), "{soft:?}");
    }
}
