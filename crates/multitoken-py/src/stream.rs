//! Streaming generation: the generation runs on a thread of its own and sends its
//! text pieces over a channel; the Python iterator waits for the next piece with
//! the GIL released, looking for Ctrl-C while it waits. Dropping or closing the
//! iterator stops the generation at its next token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use multitoken::lm::generate::GenerationOutput;
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_py_err;

/// How long the iterator waits for a piece before it looks for Ctrl-C again.
const WAIT: Duration = Duration::from_millis(50);

enum Event {
    Text(String),
    Done(anyhow::Result<GenerationOutput>),
}

/// An iterator of text pieces; `result` is the generation's dict once it ends.
#[pyclass(module = "multitoken._multitoken")]
pub struct Stream {
    events: Mutex<Receiver<Event>>,
    cancel: Arc<AtomicBool>,
    result: Option<Py<PyDict>>,
    finished: bool,
}

impl Stream {
    /// Starts `generate` on a new thread; it gets the text callback.
    pub fn spawn<F>(generate: F) -> Stream
    where
        F: FnOnce(&mut dyn FnMut(&str) -> bool) -> anyhow::Result<GenerationOutput> + Send + 'static,
    {
        let (sender, events) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&cancel);
        std::thread::spawn(move || {
            let pieces = sender.clone();
            let mut on_text = |text: &str| {
                // A receiver that is gone (the iterator was dropped) stops generation too.
                !stop.load(Ordering::Relaxed) && pieces.send(Event::Text(text.to_string())).is_ok()
            };
            let result = generate(&mut on_text);
            // Nobody may be listening any more; that is fine.
            let _ = sender.send(Event::Done(result));
        });
        Stream { events: Mutex::new(events), cancel, result: None, finished: false }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<String> {
        if self.finished {
            return Err(PyStopIteration::new_err(()));
        }
        loop {
            let events = &self.events;
            let event = py.detach(|| match events.lock() {
                Ok(receiver) => receiver.recv_timeout(WAIT),
                Err(_) => Err(RecvTimeoutError::Disconnected),
            });
            match event {
                Ok(Event::Text(text)) => return Ok(text),
                Ok(Event::Done(result)) => {
                    self.finished = true;
                    let output = result.map_err(to_py_err)?;
                    self.result = Some(crate::output_dict(py, &output)?.unbind());
                    return Err(PyStopIteration::new_err(()));
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(interrupt) = py.check_signals() {
                        self.close();
                        return Err(interrupt);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.finished = true;
                    return Err(to_py_err(anyhow::anyhow!("the generation thread ended without a result")));
                }
            }
        }
    }

    /// Stops the generation at its next token.
    fn close(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.finished = true;
    }

    /// The generation dict (text, token_ids, ...) once the iterator is exhausted;
    /// `None` before.
    #[getter]
    fn result(&self, py: Python<'_>) -> Option<Py<PyDict>> {
        self.result.as_ref().map(|r| r.clone_ref(py))
    }
}
