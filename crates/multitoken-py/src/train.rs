//! `multitoken.train`: a `multitoken train` run from Python, with the options as a
//! dict (the TOML file's snake_case keys) or a TOML path. The trainer runs on a
//! thread of its own while the calling thread, with the GIL released between
//! looks, passes each new `metrics.jsonl` row to the progress callback, so a
//! notebook sees the same per-step log the CLI writes.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use multitoken::train::cli::TrainArgs;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{input_error, to_py_err};

/// How often the log is read for new rows while training runs.
const POLL: Duration = Duration::from_millis(200);

/// Trains; returns `{"steps", "output_dir", "final_loss"}`.
#[pyfunction]
#[pyo3(signature = (config_json = None, config_path = None, progress = None))]
pub fn train<'py>(
    py: Python<'py>,
    config_json: Option<String>,
    config_path: Option<PathBuf>,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let mut args: TrainArgs = match (config_json, config_path) {
        (Some(text), None) => {
            serde_json::from_str(&text).map_err(|e| input_error(format!("train options: {e}")))?
        }
        (None, Some(path)) => TrainArgs { config: Some(path), ..TrainArgs::default() },
        _ => return Err(input_error("give the train options as a dict or a TOML file path")),
    };
    // As `multitoken train --model org/name`.
    if let Some(model) = &args.model {
        args.model = Some(py.detach(|| multitoken::hub::resolve_model_arg(model)).map_err(to_py_err)?);
    }
    let mut config = args.resolve().map_err(to_py_err)?;
    if progress.is_some() {
        // The callback reports progress; a terminal bar would only clutter a notebook.
        config.progress = false;
    }
    let metrics = config.output_dir.join("metrics.jsonl");
    let worker = std::thread::spawn(move || multitoken::train::trainer::train(&config));
    let mut offset = 0u64;
    let mut callback_error: Option<PyErr> = None;
    loop {
        py.detach(|| std::thread::sleep(POLL));
        let finished = worker.is_finished();
        if let Some(callback) = progress.as_ref().filter(|_| callback_error.is_none()) {
            for line in new_lines(&metrics, &mut offset) {
                let row = py.import("json")?.call_method1("loads", (line,))?;
                if let Err(e) = callback.call1((row,)) {
                    // Training cannot be stopped from here; the error is raised when it ends.
                    callback_error = Some(e);
                    break;
                }
            }
        }
        if finished {
            break;
        }
    }
    let summary = py
        .detach(|| worker.join())
        .map_err(|_| to_py_err(anyhow::anyhow!("the training thread panicked")))?
        .map_err(|e| to_py_err(e.into()))?;
    if let Some(e) = callback_error {
        return Err(e);
    }
    let result = PyDict::new(py);
    result.set_item("steps", summary.steps)?;
    result.set_item("output_dir", summary.output_dir.display().to_string())?;
    result.set_item("final_loss", summary.log.last().map(|l| l.loss))?;
    Ok(result)
}

/// The complete lines appended to `path` since `offset` (which moves past them); a
/// file that shrank (a run that replaced an old one) is read from its start.
fn new_lines(path: &Path, offset: &mut u64) -> Vec<String> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len < *offset {
        *offset = 0;
    }
    let mut text = String::new();
    if file.seek(SeekFrom::Start(*offset)).is_err() || file.read_to_string(&mut text).is_err() {
        return Vec::new();
    }
    let Some(end) = text.rfind('\n') else {
        return Vec::new();
    };
    *offset += end as u64 + 1;
    text[..end].lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
}
