//! Python objects to [`Item`]s: paths and bytes as they are, numpy arrays encoded in
//! memory into a lossless file (PNG for images, 32-bit float WAV for audio), so
//! that an array reaches the modality through the very decoder a file does and
//! gives the same pixels or samples, without temporary files.
//!
//! PIL images are turned into arrays by the Python layer (`multitoken/_items.py`),
//! which also decides what their odd modes become.

use std::io::Cursor;
use std::path::PathBuf;

use multitoken::core::{Item, ItemsByKey};
use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::errors::{input_error, not_found_error};

/// Most samples an in-memory audio array may have: an hour at 48 kHz. The decoder
/// enforces the model's own limit afterwards; this only bounds the copy.
const MAX_AUDIO_SAMPLES: usize = 3600 * 48_000;

/// `{data_key: [object, ...]}` from Python to items.
pub fn items_from_dict(dict: &Bound<'_, PyDict>) -> PyResult<ItemsByKey> {
    let mut items = ItemsByKey::new();
    for (key, list) in dict.iter() {
        let key: String = key.extract()?;
        let list = list.cast_into::<PyList>().map_err(|_| input_error(format!("items for `{key}` must be a list")))?;
        for (index, object) in list.iter().enumerate() {
            let item = item_from_object(&key, &object).map_err(|e| with_place(e, &key, index))?;
            items.entry(key.clone()).or_default().push(item);
        }
    }
    Ok(items)
}

/// The same error with which item it was about (`images[1]: ...`).
pub fn with_place(error: PyErr, key: &str, index: usize) -> PyErr {
    Python::attach(|py| {
        let message = error.value(py).to_string();
        let text = format!("{key}[{index}]: {message}");
        match error.get_type(py).call1((text,)) {
            Ok(value) => PyErr::from_value(value),
            Err(_) => error,
        }
    })
}

/// One item: a path (`str` or `os.PathLike`), `bytes`, a numpy array (an image
/// under `images`) or `(array, sample_rate)` (audio).
pub fn item_from_object(key: &str, object: &Bound<'_, PyAny>) -> PyResult<Item> {
    if let Ok(bytes) = object.cast::<PyBytes>() {
        return Ok(Item::Bytes(bytes.as_bytes().to_vec()));
    }
    if object.is_instance_of::<PyString>() || object.hasattr("__fspath__")? {
        let path: PathBuf = object.extract()?;
        if let Err(e) = multitoken::core::check_regular_file(&path) {
            let message = format!("{}: {e}", path.display());
            return Err(if e.kind() == std::io::ErrorKind::NotFound { not_found_error(message) } else { input_error(message) });
        }
        return Ok(Item::Path(path));
    }
    if let Ok(tuple) = object.cast::<PyTuple>() {
        if tuple.len() == 2 {
            let rate: u32 = tuple
                .get_item(1)?
                .extract()
                .map_err(|_| input_error("an audio tuple is (array, sample_rate) with a positive integer rate"))?;
            return audio_item(&tuple.get_item(0)?, rate);
        }
        return Err(input_error(format!("a tuple item must be (array, sample_rate), got {} elements", tuple.len())));
    }
    if object.hasattr("__array_interface__")? {
        if key == "images" {
            return image_item(object);
        }
        if key == "speech_audios" {
            return Err(input_error("an audio array needs its sample rate: pass (array, sample_rate)"));
        }
        return Err(input_error(format!("arrays are images or (array, sample_rate) audio; `{key}` takes paths or bytes")));
    }
    Err(input_error(format!(
        "an item is a path, bytes, a PIL image or a numpy array, not {}",
        object.get_type().name()?
    )))
}

/// An `HxW`, `HxWx1`, `HxWx3` or `HxWx4` uint8 array as PNG bytes.
fn image_item(object: &Bound<'_, PyAny>) -> PyResult<Item> {
    let array: PyReadonlyArrayDyn<'_, u8> = object.extract().map_err(|_| {
        let dtype = object.getattr("dtype").map(|d| d.to_string()).unwrap_or_else(|_| "?".into());
        input_error(format!(
            "an image array must be uint8 (HxW or HxWxC, C = 1, 3 or 4), got dtype {dtype}; scale it with (x * 255).round().astype(numpy.uint8)"
        ))
    })?;
    let shape = array.shape().to_vec();
    let (height, width, channels) = match shape.as_slice() {
        [h, w] => (*h, *w, 1),
        [h, w, c] if matches!(c, 1 | 3 | 4) => (*h, *w, *c),
        _ => {
            return Err(input_error(format!(
                "an image array must be HxW or HxWxC with C = 1, 3 or 4 (channels last), got shape {shape:?}"
            )))
        }
    };
    if height == 0 || width == 0 {
        return Err(input_error(format!("an image array must not be empty, got shape {shape:?}")));
    }
    let (Ok(w), Ok(h)) = (u32::try_from(width), u32::try_from(height)) else {
        return Err(input_error(format!("image array too large: shape {shape:?}")));
    };
    // `as_array` reads any strides; the copy is in row-major HWC order.
    let pixels: Vec<u8> = array.as_array().iter().copied().collect();
    let color = match channels {
        1 => image::ExtendedColorType::L8,
        3 => image::ExtendedColorType::Rgb8,
        _ => image::ExtendedColorType::Rgba8,
    };
    let mut png = Vec::new();
    image::ImageEncoder::write_image(image::codecs::png::PngEncoder::new(&mut png), &pixels, w, h, color)
        .map_err(|e| input_error(format!("encoding the image array: {e}")))?;
    Ok(Item::Bytes(png))
}

/// A mono float array at `rate` Hz as 32-bit float WAV bytes.
fn audio_item(object: &Bound<'_, PyAny>, rate: u32) -> PyResult<Item> {
    if rate == 0 {
        return Err(input_error("the sample rate must be positive"));
    }
    let samples: Vec<f32> = if let Ok(array) = object.extract::<PyReadonlyArrayDyn<'_, f32>>() {
        check_mono(array.shape())?;
        array.as_array().iter().copied().collect()
    } else if let Ok(array) = object.extract::<PyReadonlyArrayDyn<'_, f64>>() {
        check_mono(array.shape())?;
        array.as_array().iter().map(|&v| v as f32).collect()
    } else {
        let dtype = object.getattr("dtype").map(|d| d.to_string()).unwrap_or_else(|_| "?".into());
        return Err(input_error(format!(
            "an audio array must be float32 or float64 samples in [-1, 1], got dtype {dtype}"
        )));
    };
    if samples.is_empty() {
        return Err(input_error("the audio array is empty"));
    }
    if samples.len() > MAX_AUDIO_SAMPLES {
        return Err(input_error(format!("the audio array has {} samples, more than {MAX_AUDIO_SAMPLES}", samples.len())));
    }
    if samples.iter().any(|v| !v.is_finite()) {
        return Err(input_error("the audio array holds NaN or infinite samples"));
    }
    Ok(Item::Bytes(wav_bytes(&samples, rate).map_err(|e| input_error(format!("encoding the audio array: {e}")))?))
}

/// Mono: `[n]` or `[n, 1]`; anything else is refused (which channel, or a mix, is
/// the caller's choice).
fn check_mono(shape: &[usize]) -> PyResult<()> {
    match shape {
        [_] | [_, 1] => Ok(()),
        _ => Err(input_error(format!(
            "an audio array must be mono, shape [n] (or [n, 1]), got {shape:?}; mix it down first, e.g. x.mean(axis=1)"
        ))),
    }
}

/// `samples` as a 32-bit float WAV file.
pub fn wav_bytes(samples: &[f32], rate: u32) -> Result<Vec<u8>, hound::Error> {
    let spec = hound::WavSpec { channels: 1, sample_rate: rate, bits_per_sample: 32, sample_format: hound::SampleFormat::Float };
    let mut cursor = Cursor::new(Vec::new());
    {
        let mut writer = hound::WavWriter::new(&mut cursor, spec)?;
        for &sample in samples {
            writer.write_sample(sample)?;
        }
        writer.finalize()?;
    }
    Ok(cursor.into_inner())
}
