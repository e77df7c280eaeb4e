//! The crate's error type and its OpenAI-style JSON body.
//!
//! Every failure a client can cause becomes a 4xx whose body is OpenAI's
//! `{"error": {"message", "type", "param", "code"}}`, so the `openai` client
//! raises a readable exception; a 5xx is reserved for bugs and model failures.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Everything that can go wrong while serving a request (or starting the server).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or asks for something impossible (400).
    #[error("{message}")]
    BadRequest {
        /// What is wrong, naming the field or item.
        message: String,
        /// The request field at fault, if one is.
        param: Option<String>,
    },
    /// The body is larger than `--max-body-bytes` (413).
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// No such route or model (404).
    #[error("{0}")]
    NotFound(String),
    /// The method is not served on this route (405).
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    /// The client took longer than a time limit: to send its body, or for its
    /// request to be prepared within `--request-timeout` (408).
    #[error("{0}")]
    Timeout(String),
    /// The server is at its queue limit (429).
    #[error("the server is busy: {0}")]
    Overloaded(String),
    /// The server is shutting down (503).
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A failure on our side (500).
    #[error("internal error: {0}")]
    Internal(String),
    /// Loading the model or binding the socket failed.
    #[error("{0}")]
    Startup(String),
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A 400 naming the problem.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Error::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    /// A 400 naming the problem and the request field at fault.
    pub fn bad_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Error::BadRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) | Error::Startup(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's error `type` for this error.
    fn kind(&self) -> &'static str {
        match self {
            Error::BadRequest { .. } | Error::PayloadTooLarge { .. } | Error::MethodNotAllowed(_) => {
                "invalid_request_error"
            }
            Error::NotFound(_) => "not_found_error",
            Error::Timeout(_) => "timeout_error",
            Error::Overloaded(_) => "rate_limit_error",
            Error::ShuttingDown | Error::Internal(_) | Error::Startup(_) => "server_error",
        }
    }

    /// The JSON body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> serde_json::Value {
        let param = match self {
            Error::BadRequest { param, .. } => param.clone(),
            _ => None,
        };
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": param,
                "code": self.status().as_u16().to_string(),
            }
        })
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}

impl From<multitoken_lm::Error> for Error {
    fn from(e: multitoken_lm::Error) -> Self {
        Error::Internal(first_line(&e.to_string()))
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Internal(first_line(&e.to_string()))
    }
}

impl From<multitoken_core::Error> for Error {
    fn from(e: multitoken_core::Error) -> Self {
        Error::Internal(first_line(&e.to_string()))
    }
}

/// The message without the backtrace candle appends to some errors.
fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or_default().to_string()
}
