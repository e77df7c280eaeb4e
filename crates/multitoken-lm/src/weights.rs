//! Where weights come from: memory-mapped safetensors or a GGUF file.
//!
//! [`SafetensorsSource`] serves HF checkpoints (single file or sharded with
//! `model.safetensors.index.json`); the GGUF source lives in `gguf.rs`.
//!
//! Model code asks for tensors by their transformers name
//! (`model.layers.0.self_attn.q_proj.weight`); each source maps that name to its
//! own layout and checks the shape, so a missing or mis-shaped tensor is an error
//! naming the key and the file, never a silent random init.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

use crate::linear::Linear;
use crate::{Error, Result};

/// A store of named weights in the transformers naming scheme.
pub trait WeightSource {
    /// The file(s) behind this source, for error messages.
    fn describe(&self) -> String;
    /// Whether a tensor of that name exists.
    fn contains(&self, name: &str) -> bool;
    /// A dense tensor of exactly `shape`, in the model dtype, on the model device.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// The linear layer `{prefix}.weight` (`[out_dim, in_dim]`) and, when `bias`,
    /// `{prefix}.bias`; a quantized source may keep the weight quantized.
    fn linear(&self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear>;
}

/// Where one tensor lives inside the memory-mapped files.
#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte range inside the file's mapping.
    start: usize,
    end: usize,
}

/// Memory-mapped safetensors, one file or a sharded set, served by name.
///
/// Tensors are converted to the requested dtype when asked for; shapes are
/// checked against what the model expects.
pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, TensorEntry>,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for SafetensorsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsSource")
            .field("files", &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>())
            .field("tensors", &self.index.len())
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl SafetensorsSource {
    /// Open the weights of an HF model directory: `model.safetensors`, or the
    /// shards listed in `model.safetensors.index.json`.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|source| Error::Io { path: index_path.clone(), source })?;
            let parsed: ShardIndex = serde_json::from_str(&text)
                .map_err(|e| Error::Config { path: index_path.clone(), message: e.to_string() })?;
            let mut shards: Vec<&String> = parsed.weight_map.values().collect();
            shards.sort();
            shards.dedup();
            if shards.is_empty() {
                return Err(Error::Config {
                    path: index_path,
                    message: "weight_map lists no shard files".into(),
                });
            }
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            Self::open(&paths, dtype, device)
        } else if single.is_file() {
            Self::open(&[single], dtype, device)
        } else {
            Err(Error::Io {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in the model directory",
                ),
            })
        }
    }

    /// Memory-map `paths` and index every tensor they hold.
    pub fn open(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (file_idx, path) in paths.iter().enumerate() {
            let io = |source| Error::Io { path: path.clone(), source };
            let file = std::fs::File::open(path).map_err(io)?;
            // SAFETY: the mapping is read-only; like every mmap-based loader we
            // rely on the checkpoint not being modified while it is loaded.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::Config {
                path: path.clone(),
                message: format!("not a valid safetensors file: {e}"),
            })?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                index.insert(
                    name,
                    TensorEntry {
                        file: file_idx,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
            files.push((path.clone(), mmap));
        }
        Ok(Self { files, index, dtype, device: device.clone() })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.index.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The stored shape of a tensor, if present.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|e| e.shape.as_slice())
    }

    /// The tensor as stored (any shape), converted to the source dtype.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let entry = self.index.get(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            message: format!("missing from {}", self.describe()),
        })?;
        let (path, mmap) = &self.files[entry.file];
        let tensor_err = |message: String| Error::Tensor {
            name: name.to_string(),
            message: format!("{message} (in {})", path.display()),
        };
        let bytes = mmap
            .get(entry.start..entry.end)
            .ok_or_else(|| tensor_err("data lies outside the file".into()))?;
        let view = TensorView::new(entry.dtype, entry.shape.clone(), bytes)
            .map_err(|e| tensor_err(format!("bad tensor data: {e}")))?;
        let t = candle_core::safetensors::Load::load(&view, &self.device)
            .map_err(|e| tensor_err(format!("cannot load: {e}")))?;
        if t.dtype() == self.dtype {
            Ok(t)
        } else {
            Ok(t.to_dtype(self.dtype)?)
        }
    }
}

impl WeightSource for SafetensorsSource {
    fn describe(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|(p, _)| p.display().to_string()).collect();
        names.join(", ")
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some(entry) = self.index.get(name) {
            if entry.shape != shape {
                return Err(Error::Tensor {
                    name: name.to_string(),
                    message: format!(
                        "expected shape {shape:?}, found {:?} in {}",
                        entry.shape,
                        self.files[entry.file].0.display()
                    ),
                });
            }
        }
        self.get(name)
    }

    fn linear(&self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let weight = self.tensor(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias { Some(self.tensor(&format!("{prefix}.bias"), &[out_dim])?) } else { None };
        Linear::dense(weight, bias)
    }
}

/// `model.safetensors.index.json`.
#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}
