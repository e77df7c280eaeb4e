//! What the operator configures: which files and URLs items may come from, and
//! the limits every request is held to.

use std::path::PathBuf;
use std::time::Duration;

/// Per-request limits; a request over one gets a 4xx naming the limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Most items (images + audio + documents) in one request.
    pub max_items: usize,
    /// Most pixels (width x height) of one image.
    pub max_image_pixels: u64,
    /// Longest audio clip in seconds.
    pub max_audio_seconds: f64,
    /// Most pages of one PDF document.
    pub max_document_pages: usize,
    /// Most new tokens one request may ask for (also the default).
    pub max_new_tokens: usize,
    /// Wall-clock limit of one request, preparation included: a request whose
    /// items and prompt are not ready by then gets a 408; one that is decoding
    /// at the limit returns the answer so far with `finish_reason: "length"`.
    pub request_timeout: Duration,
    /// Most bytes of message text one request may carry; `None`: the model's
    /// context length times the byte length of its longest vocabulary entry
    /// (the most text that could still fit the context), capped at 1 MiB or 8
    /// bytes per context position, whichever is larger. Checked before the
    /// prompt is rendered or tokenised (tokenising costs ~180 bytes of memory
    /// per byte of text).
    pub max_prompt_bytes: Option<usize>,
    /// Most stop strings per request.
    pub max_stop_strings: usize,
    /// Longest stop string in bytes.
    pub max_stop_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 * 1024 * 1024,
            max_items: 16,
            max_image_pixels: 16 * 1024 * 1024,
            max_audio_seconds: 600.0,
            max_document_pages: 200,
            max_new_tokens: 512,
            request_timeout: Duration::from_secs(300),
            max_prompt_bytes: None,
            max_stop_strings: 32,
            max_stop_bytes: 1024,
        }
    }
}

/// How the server runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// The name `/v1/models` lists and responses carry.
    pub model_name: String,
    /// Items may name files under this directory (none by default: no local
    /// file is ever read).
    pub allow_files: Option<PathBuf>,
    /// Items may be http(s) URLs, fetched by the server.
    pub allow_urls: bool,
    /// Request limits.
    pub limits: Limits,
    /// Most sequences decoded together in one batch.
    pub max_batch: usize,
    /// Most requests waiting for a batch slot; beyond it requests get a 429.
    pub max_queue: usize,
    /// Connection limits (slow or idle clients).
    pub connections: ConnectionLimits,
    /// Whether special tokens typed in message text (`<|im_end|>`, `</s>`)
    /// act as the tokens they spell when a request does not say
    /// (`parse_special_tokens`). Off: message text is text, and only the chat
    /// template writes turn boundaries.
    pub parse_special_tokens: bool,
    /// Most requests prepared at once (items read and checked, prompt
    /// rendered and tokenised, items embedded), each on a blocking thread;
    /// more wait for a turn within their `request_timeout`.
    pub max_preparing: usize,
}

/// What one TCP connection may hold: an idle or half-sent request must not
/// keep a socket (and its file descriptor) forever, and the number of open
/// connections is capped so that a flood of sockets cannot exhaust the
/// process's file descriptors and make `/health` unreachable.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionLimits {
    /// Time a client has to send a request's headers, counted from the moment
    /// the server waits for them: a new connection, or a kept-alive one after
    /// its previous response (so it is also the idle timeout).
    pub header_read_timeout: Duration,
    /// Time a client has to send a whole request body once its headers arrived.
    pub body_read_timeout: Duration,
    /// Most connections open at once; further ones wait in the listen backlog
    /// until one closes. Lowered at start to fit the file-descriptor limit.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model_name: "multitoken".into(),
            allow_files: None,
            allow_urls: false,
            limits: Limits::default(),
            max_batch: 16,
            max_queue: 256,
            connections: ConnectionLimits::default(),
            parse_special_tokens: false,
            max_preparing: std::thread::available_parallelism().map_or(4, |n| n.get()),
        }
    }
}
