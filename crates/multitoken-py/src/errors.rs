//! Errors as Python exceptions with the CLI's messages: `multitoken.InputError`
//! (also a `ValueError`) for bad input, `multitoken.NotFoundError` (also a
//! `FileNotFoundError`) for a missing file or a hub id that is not in the cache,
//! `multitoken.Error` for the rest. The classes live in `multitoken/_errors.py`,
//! where Python's multiple inheritance gives each both bases.

use pyo3::prelude::*;
use pyo3::types::PyType;

/// An exception of class `name` from `multitoken._errors` (a plain `RuntimeError`
/// if that module cannot be imported, which only a broken install does).
fn exception(name: &str, message: String) -> PyErr {
    Python::attach(|py| {
        let class = py
            .import("multitoken._errors")
            .and_then(|module| module.getattr(name))
            .and_then(|class| class.cast_into::<PyType>().map_err(PyErr::from));
        match class {
            Ok(class) => PyErr::from_type(class, message),
            Err(_) => pyo3::exceptions::PyRuntimeError::new_err(message),
        }
    })
}

/// `multitoken.InputError`.
pub fn input_error(message: impl Into<String>) -> PyErr {
    exception("InputError", message.into())
}

/// `multitoken.NotFoundError`.
pub fn not_found_error(message: impl Into<String>) -> PyErr {
    exception("NotFoundError", message.into())
}

/// The exception for an engine error: the message is the whole chain of contexts
/// (`loading model x: cannot read y: ...`, as the CLI prints it on one line).
pub fn to_py_err(error: anyhow::Error) -> PyErr {
    let message = format!("{error:#}");
    let not_found = error.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
            || cause.is::<multitoken::hub::NotInCache>()
    });
    if not_found {
        return not_found_error(message);
    }
    let bad_input = error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<multitoken::core::Error>(),
            Some(e) if !matches!(e, multitoken::core::Error::Candle(_))
        ) || matches!(cause.downcast_ref::<multitoken::lm::Error>(), Some(multitoken::lm::Error::Core(_)))
    });
    if bad_input {
        return input_error(message);
    }
    exception("Error", message)
}
