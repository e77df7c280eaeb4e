//! `multitoken._multitoken`: the native half of the Python package `multitoken`
//! (the Python half, `python/multitoken/`, turns PIL images into arrays, gives the
//! keyword arguments their defaults and wraps results in dataclasses).
//!
//! Everything calls the library functions the CLI calls (`ModelArgs::load`,
//! `SamplingArgs::params`, `conversation::generate_chat`, `Conversation::send`,
//! `hub::resolve_model_arg`), so a prompt gives the same ids from both. Every
//! model call runs with the GIL released; generation checks for Ctrl-C between
//! tokens (Python delivers signals only to the main thread, which is waiting
//! in Rust while it runs).

mod errors;
mod items;
mod stream;
mod train;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use multitoken::cli::{ModelArgs, SamplingArgs};
use multitoken::conversation::{generate_chat, Conversation};
use multitoken::core::{ItemsByKey, Message};
use multitoken::lm::generate::{GenerationOutput, GenerationParams};
use multitoken::lm::multimodal::MultimodalModel;
use numpy::{IntoPyArray, PyArray2};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use errors::{input_error, to_py_err};
use stream::Stream;

/// How often a running generation looks for a pending Ctrl-C.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// A loaded model (multimodal when its directory has `multitoken.json`).
#[pyclass(frozen, module = "multitoken._multitoken")]
pub struct Model {
    model: Arc<MultimodalModel>,
    conversation: Arc<Mutex<Conversation>>,
    path: String,
}

/// The sampling options as the CLI's flags hold them (and with its defaults,
/// which the Python layer repeats).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Sampling {
    max_new_tokens: usize,
    temperature: f64,
    top_p: Option<f64>,
    top_k: Option<usize>,
    repetition_penalty: Option<f32>,
    seed: u64,
    stop: Vec<String>,
    ignore_eos: bool,
}

impl Sampling {
    fn params(self, model: &MultimodalModel) -> PyResult<GenerationParams> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(input_error(format!("temperature must be a finite number >= 0, got {}", self.temperature)));
        }
        if let Some(p) = self.top_p.filter(|p| !(p.is_finite() && *p > 0.0 && *p <= 1.0)) {
            return Err(input_error(format!("top_p must be in (0, 1], got {p}")));
        }
        let args = SamplingArgs {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop_strings: self.stop,
            ignore_eos: self.ignore_eos,
        };
        Ok(args.params(model))
    }
}

/// The result of one generation as a dict (the Python layer makes it a dataclass).
fn output_dict<'py>(py: Python<'py>, output: &GenerationOutput) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("text", &output.text)?;
    dict.set_item("token_ids", output.token_ids.clone())?;
    dict.set_item("prompt_tokens", output.prompt_tokens)?;
    dict.set_item("finish_reason", output.finish_reason.as_str())?;
    let timings = PyDict::new(py);
    timings.set_item("prefill_tok_s", output.prefill_tok_s)?;
    timings.set_item("decode_tok_s", output.decode_tok_s)?;
    dict.set_item("timings", timings)?;
    Ok(dict)
}

/// `[{"role": ..., "content": ...}, ...]` to messages.
fn messages_from_list(list: &Bound<'_, PyList>) -> PyResult<Vec<Message>> {
    let mut messages = Vec::with_capacity(list.len());
    for (index, entry) in list.iter().enumerate() {
        let dict = entry
            .cast_into::<PyDict>()
            .map_err(|_| input_error(format!("messages[{index}] must be a dict with `role` and `content`")))?;
        let field = |name: &str| -> PyResult<String> {
            dict.get_item(name)?
                .ok_or_else(|| input_error(format!("messages[{index}] has no `{name}`")))?
                .extract()
                .map_err(|_| input_error(format!("messages[{index}].{name} must be a str")))
        };
        let role = field("role")?;
        if !matches!(role.as_str(), "system" | "user" | "assistant") {
            return Err(input_error(format!("messages[{index}].role must be system, user or assistant, got {role:?}")));
        }
        messages.push(Message::new(role, field("content")?));
    }
    if messages.last().is_none_or(|m| m.role != "user") {
        return Err(input_error("the last message must be the user's"));
    }
    Ok(messages)
}

/// A text callback for generation on this thread: `false` (stop) once Ctrl-C is
/// pending, whose exception is kept in `interrupt`.
fn interruptible(interrupt: &Mutex<Option<PyErr>>) -> impl FnMut(&str) -> bool + '_ {
    let mut last_check = Instant::now();
    move |_text: &str| {
        if last_check.elapsed() < SIGNAL_CHECK_INTERVAL {
            return true;
        }
        last_check = Instant::now();
        match Python::attach(|py| py.check_signals()) {
            Ok(()) => true,
            Err(e) => {
                if let Ok(mut slot) = interrupt.lock() {
                    *slot = Some(e);
                }
                false
            }
        }
    }
}

/// What a generation request is, once read from Python.
enum Request {
    /// Chat messages (the last is the user's), rendered with the chat template.
    Chat(Vec<Message>),
    /// A raw prompt, tokenized as it is.
    Raw(String),
}

impl Request {
    fn run(
        self,
        model: &MultimodalModel,
        items: &ItemsByKey,
        params: &GenerationParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> anyhow::Result<GenerationOutput> {
        match self {
            Request::Chat(mut messages) => generate_chat(model, &mut messages, items, params, on_text),
            Request::Raw(prompt) => {
                let prepared = model.prepare_raw(&prompt, items)?;
                Ok(model.generate(&prepared, items, params, on_text)?)
            }
        }
    }
}

fn read_request(messages: &Bound<'_, PyAny>, raw: bool) -> PyResult<Request> {
    if let Ok(prompt) = messages.extract::<String>() {
        return Ok(if raw { Request::Raw(prompt) } else { Request::Chat(vec![Message::user(prompt)]) });
    }
    if raw {
        return Err(input_error("raw=True takes a prompt str, not messages"));
    }
    let list = messages
        .cast::<PyList>()
        .map_err(|_| input_error("the prompt must be a str or a list of {\"role\", \"content\"} dicts"))?;
    Ok(Request::Chat(messages_from_list(list)?))
}

#[pymethods]
impl Model {
    /// Loads a model directory, a `.gguf` file or a hub id `org/name[@revision]`
    /// (from the Hugging Face cache, else downloaded unless HF_HUB_OFFLINE is set).
    #[staticmethod]
    #[pyo3(signature = (path, dtype = "f32", device = "cpu", quantize = None, chat_template = None, quantize_towers = None))]
    fn load(
        py: Python<'_>,
        path: std::path::PathBuf,
        dtype: &str,
        device: &str,
        quantize: Option<String>,
        chat_template: Option<String>,
        quantize_towers: Option<String>,
    ) -> PyResult<Model> {
        if device != "cpu" {
            return Err(input_error(format!("device {device:?}: only \"cpu\" is supported")));
        }
        let args = ModelArgs {
            model: Some(path.clone()),
            dtype: dtype.to_string(),
            dequantize: false,
            quantize,
            quantize_towers,
            // The exact products; the 8-bit-activation mode is the CLI's opt-in.
            int8_activations: false,
            chat_template,
        };
        multitoken::cli::setup_process();
        multitoken::cli::link_modalities();
        let model = py.detach(|| args.load()).map_err(to_py_err)?;
        Ok(Model {
            model: Arc::new(model),
            conversation: Arc::new(Mutex::new(Conversation::default())),
            path: path.display().to_string(),
        })
    }

    /// The model's name (its LM's).
    #[getter]
    fn name(&self) -> String {
        self.model.lm.name.clone()
    }

    /// The modality tokens the model reads (`<image>`, `<speech>`, ...).
    #[getter]
    fn modality_tokens(&self) -> Vec<String> {
        self.model.modality_tokens().into_iter().map(str::to_string).collect()
    }

    fn __repr__(&self) -> String {
        format!("multitoken.Model({:?}, name={:?})", self.path, self.model.lm.name)
    }

    /// One completion; returns a dict (text, token_ids, prompt_tokens,
    /// finish_reason, timings).
    #[pyo3(signature = (messages, items, sampling, raw = false))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
        items: &Bound<'py, PyDict>,
        sampling: Sampling,
        raw: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let request = read_request(messages, raw)?;
        let items = items::items_from_dict(items)?;
        let params = sampling.params(&self.model)?;
        let model = &self.model;
        let interrupt = Mutex::new(None);
        let result = py.detach(|| {
            let mut on_text = interruptible(&interrupt);
            request.run(model, &items, &params, &mut on_text)
        });
        if let Some(e) = interrupt.lock().ok().and_then(|mut slot| slot.take()) {
            return Err(e);
        }
        output_dict(py, &result.map_err(to_py_err)?)
    }

    /// Like `generate`, as an iterator of text pieces (generation runs on a thread
    /// of its own; the iterator's `result` holds the dict once it is exhausted).
    #[pyo3(signature = (messages, items, sampling, raw = false))]
    fn generate_stream(
        &self,
        messages: &Bound<'_, PyAny>,
        items: &Bound<'_, PyDict>,
        sampling: Sampling,
        raw: bool,
    ) -> PyResult<Stream> {
        let request = read_request(messages, raw)?;
        let items = items::items_from_dict(items)?;
        let params = sampling.params(&self.model)?;
        let model = Arc::clone(&self.model);
        Ok(Stream::spawn(move |on_text| request.run(&model, &items, &params, on_text)))
    }

    /// One chat turn: the message with its new items joins the history, then the
    /// answer does. Returns the generation dict.
    #[pyo3(signature = (text, items, sampling))]
    fn chat<'py>(
        &self,
        py: Python<'py>,
        text: String,
        items: &Bound<'py, PyDict>,
        sampling: Sampling,
    ) -> PyResult<Bound<'py, PyDict>> {
        let new_items = multitoken::conversation::item_pairs(&items::items_from_dict(items)?);
        let params = sampling.params(&self.model)?;
        let (model, conversation) = (&self.model, &self.conversation);
        let interrupt = Mutex::new(None);
        let result = py.detach(|| {
            let mut on_text = interruptible(&interrupt);
            let text = multitoken::conversation::typed_text(model, &text);
            let mut conversation = conversation.lock().map_err(|_| anyhow::anyhow!("the chat history is unusable after a crash"))?;
            conversation.send(model, &text, &new_items, &params, &mut on_text)
        });
        if let Some(e) = interrupt.lock().ok().and_then(|mut slot| slot.take()) {
            return Err(e);
        }
        output_dict(py, &result.map_err(to_py_err)?)
    }

    /// Like `chat`, as an iterator of text pieces.
    #[pyo3(signature = (text, items, sampling))]
    fn chat_stream(&self, text: String, items: &Bound<'_, PyDict>, sampling: Sampling) -> PyResult<Stream> {
        let new_items = multitoken::conversation::item_pairs(&items::items_from_dict(items)?);
        let params = sampling.params(&self.model)?;
        let model = Arc::clone(&self.model);
        let conversation = Arc::clone(&self.conversation);
        Ok(Stream::spawn(move |on_text| {
            let text = multitoken::conversation::typed_text(&model, &text);
            let mut conversation = conversation.lock().map_err(|_| anyhow::anyhow!("the chat history is unusable after a crash"))?;
            conversation.send(&model, &text, &new_items, &params, on_text)
        }))
    }

    /// Forgets the chat history; `system` opens the next conversation.
    #[pyo3(signature = (system = None))]
    fn reset_chat(&self, system: Option<String>) -> PyResult<()> {
        let mut conversation = self.conversation.lock().map_err(|_| input_error("the chat history is unusable"))?;
        *conversation = Conversation::new(system.as_deref());
        Ok(())
    }

    /// The chat history as `[{"role", "content"}, ...]`.
    #[getter]
    fn history<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let conversation = self.conversation.lock().map_err(|_| input_error("the chat history is unusable"))?;
        let list = PyList::empty(py);
        for message in &conversation.messages {
            let dict = PyDict::new(py);
            dict.set_item("role", &message.role)?;
            dict.set_item("content", &message.content)?;
            list.append(dict)?;
        }
        Ok(list)
    }
}

/// Sentence embeddings `[n, dim]` (float32) of texts and documents, pooled and
/// normalised as the model's sentence-transformers config says (as `multitoken embed`).
#[pyfunction]
#[pyo3(signature = (inputs, model = None))]
fn embed<'py>(
    py: Python<'py>,
    inputs: &Bound<'py, PyList>,
    model: Option<std::path::PathBuf>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    use multitoken::core::Item;
    let mut items = Vec::with_capacity(inputs.len());
    for (index, input) in inputs.iter().enumerate() {
        // A str is text; a path is an os.PathLike (pathlib.Path); bytes are a file's bytes.
        let item = if let Ok(text) = input.extract::<String>() {
            Item::Text(text)
        } else {
            items::item_from_object("documents", &input).map_err(|e| items::with_place(e, "inputs", index))?
        };
        items.push(item);
    }
    if items.is_empty() {
        return Err(input_error("nothing to embed: give texts or paths"));
    }
    let (rows, dim) = py
        .detach(|| -> anyhow::Result<(Vec<Vec<f32>>, usize)> {
            let dir = match &model {
                Some(model) => multitoken::hub::resolve_model_arg(model)?,
                None => multitoken::document::default_minilm_dir(),
            };
            multitoken::cli::embed_items(&dir, &items, multitoken::document::ChunkConfig::default().overlap)
        })
        .map_err(to_py_err)?;
    let flat: Vec<f32> = rows.into_iter().flatten().collect();
    let n = flat.len() / dim.max(1);
    let array = numpy::ndarray::Array2::from_shape_vec((n, dim), flat).map_err(|e| errors::to_py_err(anyhow::anyhow!(e)))?;
    Ok(array.into_pyarray(py))
}

/// Whisper's log-mel spectrogram windows `[windows, n_mels, 3000]` of an audio
/// item (path, bytes or `(array, sample_rate)`), as `multitoken mel` computes them.
#[pyfunction]
#[pyo3(signature = (audio, n_mels = 80))]
fn log_mel<'py>(py: Python<'py>, audio: &Bound<'py, PyAny>, n_mels: usize) -> PyResult<Bound<'py, numpy::PyArray3<f32>>> {
    let item = items::item_from_object("speech_audios", audio)?;
    let windows = py.detach(|| multitoken::cli::log_mel_windows(&item, n_mels)).map_err(to_py_err)?;
    let count = windows.len();
    let frames = windows.first().map_or(0, |w| w.len() / n_mels.max(1));
    let flat: Vec<f32> = windows.into_iter().flatten().collect();
    let array = numpy::ndarray::Array3::from_shape_vec((count, n_mels, frames), flat)
        .map_err(|e| errors::to_py_err(anyhow::anyhow!(e)))?;
    Ok(array.into_pyarray(py))
}

/// The transcript of an audio item (greedy Whisper with the CLI's fallbacks).
#[pyfunction]
#[pyo3(signature = (audio, model = None))]
fn transcribe(py: Python<'_>, audio: &Bound<'_, PyAny>, model: Option<std::path::PathBuf>) -> PyResult<String> {
    let item = items::item_from_object("speech_audios", audio)?;
    py.detach(|| multitoken::cli::transcribe_item(model.as_deref(), &item)).map_err(to_py_err)
}

/// The native module.
#[pymodule]
fn _multitoken(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<Stream>()?;
    m.add_function(wrap_pyfunction!(embed, m)?)?;
    m.add_function(wrap_pyfunction!(log_mel, m)?)?;
    m.add_function(wrap_pyfunction!(transcribe, m)?)?;
    m.add_function(wrap_pyfunction!(train::train, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
