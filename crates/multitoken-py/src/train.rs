//! `multitoken.train`: a `multitoken train` run from Python, with the options as a
//! dict (the TOML file's snake_case keys) or a TOML path. The trainer runs on a
//! thread of its own while the calling thread, with the GIL released while it
//! waits, passes each row the trainer logs (a `metrics.jsonl` line) to the progress
//! callback, so a notebook sees the same per-step log the CLI writes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use multitoken::train::cli::TrainArgs;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{input_error, to_py_err};

/// How long a wait for the next logged row lasts before Ctrl-C is looked for.
const POLL: Duration = Duration::from_millis(200);

/// Logged rows the trainer may run ahead of the progress callback.
const PROGRESS_BACKLOG: usize = 8;

/// Trains; returns `{"steps", "output_dir", "final_loss"}`.
#[pyfunction]
#[pyo3(signature = (config_json = None, config_path = None, progress = None))]
pub fn train<'py>(
    py: Python<'py>,
    config_json: Option<String>,
    config_path: Option<PathBuf>,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let args: TrainArgs = match (config_json, config_path) {
        (Some(text), None) => {
            serde_json::from_str(&text).map_err(|e| input_error(format!("train options: {e}")))?
        }
        (None, Some(path)) => TrainArgs { config: Some(path), ..TrainArgs::default() },
        _ => return Err(input_error("give the train options as a dict or a TOML file path")),
    };
    // As `multitoken train --model org/name`.
    let mut config = py
        .detach(|| args.resolve_with(&multitoken::hub::resolve_model_arg))
        .map_err(to_py_err)?;
    if progress.is_some() {
        // The callback reports progress; a terminal bar would only clutter a notebook.
        config.progress = false;
    }
    // Set on Ctrl-C or when the callback raises: the trainer stops after the step
    // it is in, writes a checkpoint of it and returns `Interrupted`.
    let stop = Arc::new(AtomicBool::new(false));
    // Bounded: the trainer runs at most PROGRESS_BACKLOG logged rows ahead of the
    // callback, so a Ctrl-C (or an exception) raised at a row stops the run within
    // that many logged steps, however fast the steps are; unbounded, a fast run
    // could go on for many steps, or to its end, past the row that raised.
    let (sender, logged) = std::sync::mpsc::sync_channel::<String>(PROGRESS_BACKLOG);
    // Only this thread receives; the Mutex makes the receiver shareable with the
    // GIL-free closure below.
    let logged = Mutex::new(logged);
    let worker = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || multitoken::train::trainer::train_until(&config, &stop, Some(&sender)))
    };
    // The first Python exception raised while training ran: a KeyboardInterrupt
    // or the callback's own.
    let mut raised: Option<PyErr> = None;
    loop {
        // Wait (without the GIL) for the next logged row, at most POLL so that
        // Ctrl-C is seen while a long step runs.
        let (rows, finished) = py.detach(|| {
            let mut rows = Vec::new();
            let mut finished = false;
            let Ok(logged) = logged.lock() else {
                return (rows, true);
            };
            match logged.recv_timeout(POLL) {
                Ok(row) => rows.push(row),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => finished = true,
            }
            loop {
                match logged.try_recv() {
                    Ok(row) => rows.push(row),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        finished = true;
                        break;
                    }
                }
            }
            (rows, finished)
        });
        if raised.is_none() {
            if let Err(e) = py.check_signals() {
                raised = Some(e);
            }
        }
        if let Some(callback) = progress.as_ref().filter(|_| raised.is_none()) {
            for row in rows {
                let row = py.import("json").and_then(|json| json.call_method1("loads", (row,)));
                if let Err(e) = row.and_then(|row| callback.call1((row,))) {
                    raised = Some(e);
                    break;
                }
            }
        }
        if raised.is_some() {
            stop.store(true, Ordering::Relaxed);
        }
        if finished {
            break;
        }
    }
    // A signal that reached another thread during the last callback is seen here.
    if raised.is_none() {
        if let Err(e) = py.check_signals() {
            raised = Some(e);
        }
    }
    let outcome = py
        .detach(|| worker.join())
        .map_err(|_| to_py_err(anyhow::anyhow!("the training thread panicked")))?;
    if let Some(e) = raised {
        // The trainer's word on where it stopped (the checkpoint to resume from)
        // rides along as the exception's cause.
        if let Err(why) = &outcome {
            e.set_cause(py, Some(to_py_err(anyhow::anyhow!("{why}"))));
        }
        return Err(e);
    }
    let summary = outcome.map_err(|e| to_py_err(e.into()))?;
    let result = PyDict::new(py);
    result.set_item("steps", summary.steps)?;
    result.set_item("output_dir", summary.output_dir.display().to_string())?;
    result.set_item("final_loss", summary.log.last().map(|l| l.loss))?;
    Ok(result)
}
