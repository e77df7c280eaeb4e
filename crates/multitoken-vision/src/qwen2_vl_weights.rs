//! A frozen f32 tower's weights read straight from its `*.safetensors` files
//! (positioned reads, no memory map), each 2-D weight stored transposed.
//!
//! Why: through candle's mmap'd var builder every weight was copied out of
//! the map into a fresh buffer, then copied again by the kernels' `Linear`,
//! which keeps a frozen weight as `[in, out]` (a strided transpose): two fresh
//! buffers the size of the checkpoint, whose page faults (the kernel zeroing
//! each page) and strided copy took most of Qwen2-VL-2B's 11-14 s load, and the
//! touched map plus the copies peaked at twice the weights in RSS. Here each
//! tensor is read into one reused staging buffer (the page cache, not this
//! process, holds the file) and a 2-D `[out, in]` weight is written once,
//! blocked, as `[in, out]` and handed out as the transposed view of that
//! buffer: the `[out, in]` shape the loader asks for, whose `.t()` the
//! `Linear` finds contiguous and keeps without a copy.
//!
//! Only for f32 (or bf16) tensors loaded as f32 on the CPU and not trained (the caller
//! checks with [`FrozenF32Weights::covers`]); anything else goes through
//! candle's var builders.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};

use crate::{Error, Result};

/// Where one tensor lies in its file.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// The tensors of a set of safetensors files, read on demand.
pub(crate) struct FrozenF32Weights {
    files: Vec<(PathBuf, File)>,
    entries: HashMap<String, Entry>,
    /// The raw bytes of the tensor being read (reused: one buffer the size of
    /// the largest tensor rather than one per tensor).
    staging: Mutex<Vec<u8>>,
}

/// Elements per side of a transpose tile (64² f32 = 16 KiB each way, in L1).
const TILE: usize = 64;

impl FrozenF32Weights {
    /// Reads the headers of `files`.
    pub(crate) fn open(files: &[PathBuf]) -> Result<Self> {
        let mut opened = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        for (index, path) in files.iter().enumerate() {
            let io = |source| Error::Io { path: path.clone(), source };
            let file = File::open(path).map_err(io)?;
            let len = file.metadata().map_err(io)?.len();
            let mut size = [0u8; 8];
            file.read_exact_at(&mut size, 0).map_err(io)?;
            let header_len = u64::from_le_bytes(size);
            if header_len.saturating_add(8) > len {
                return Err(bad(path, format!("header length {header_len} runs past the file's {len} bytes")));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact_at(&mut header, 8).map_err(io)?;
            let header: HashMap<String, serde_json::Value> =
                serde_json::from_slice(&header).map_err(|e| bad(path, format!("unreadable header: {e}")))?;
            let data_start = 8 + header_len;
            for (name, info) in header {
                if name == "__metadata__" {
                    continue;
                }
                let entry = parse_entry(index, data_start, len, &info).ok_or_else(|| bad(path, format!("tensor `{name}` has a malformed header entry")))?;
                entries.insert(name, entry);
            }
            opened.push((path.clone(), file));
        }
        Ok(Self {
            files: opened,
            entries,
            staging: Mutex::new(Vec::new()),
        })
    }

    /// Whether every one of `keys` is stored as f32 or bf16 (bf16 widens to
    /// f32 exactly, as torch's `.float()` does).
    pub(crate) fn covers<'a>(&self, mut keys: impl Iterator<Item = &'a str>) -> bool {
        keys.all(|k| self.entries.get(k).is_some_and(|e| element_size(&e.dtype).is_some()))
    }

    /// Reads tensor `name`; a 2-D one comes back as the transposed view of a
    /// dense `[in, out]` buffer (same shape and values as stored).
    fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        let (path, file) = &self.files[entry.file];
        let Some(size) = element_size(&entry.dtype) else {
            candle_core::bail!("{}: tensor `{name}` is {}, this reader takes F32 and BF16 only", path.display(), entry.dtype);
        };
        let count: usize = entry.shape.iter().product();
        let bytes = (entry.end - entry.start) as usize;
        if bytes != count * size {
            candle_core::bail!("{}: tensor `{name}` holds {bytes} bytes for shape {:?}", path.display(), entry.shape);
        }
        let mut staging = self.staging.lock().map_err(|_| candle_core::Error::Msg("weight staging buffer poisoned".into()))?;
        let len = bytes.max(staging.len());
        staging.resize(len, 0);
        file.read_exact_at(&mut staging[..bytes], entry.start)
            .map_err(|e| candle_core::Error::Msg(format!("{}: reading `{name}`: {e}", path.display())))?;
        let raw = &staging[..bytes];
        let value = |i: usize| match size {
            4 => f32::from_le_bytes([raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]]),
            // bf16 is the top half of an f32.
            _ => f32::from_bits(u32::from(u16::from_le_bytes([raw[2 * i], raw[2 * i + 1]])) << 16),
        };
        if let ([rows, cols], true) = (&entry.shape[..], count > 0) {
            let (rows, cols) = (*rows, *cols);
            let mut out = vec![0f32; count];
            // The fresh pages' first touch (the kernel zeroing each) costs more
            // than the transpose itself: split the columns over the threads.
            let threads = candle_core::utils::get_num_threads().clamp(1, cols.div_ceil(TILE).max(1));
            let per_thread = cols.div_ceil(TILE).div_ceil(threads) * TILE;
            std::thread::scope(|scope| {
                for (part, chunk) in out.chunks_mut(per_thread * rows).enumerate() {
                    let first = part * per_thread;
                    scope.spawn(move || {
                        let chunk_cols = chunk.len() / rows.max(1);
                        for r0 in (0..rows).step_by(TILE) {
                            for c0 in (0..chunk_cols).step_by(TILE) {
                                for c in c0..(c0 + TILE).min(chunk_cols) {
                                    let dst = &mut chunk[c * rows..(c + 1) * rows];
                                    for (r, slot) in dst.iter_mut().enumerate().take((r0 + TILE).min(rows)).skip(r0) {
                                        *slot = value(r * cols + first + c);
                                    }
                                }
                            }
                        }
                    });
                }
            });
            return Tensor::from_vec(out, (cols, rows), &Device::Cpu)?.t();
        }
        let out: Vec<f32> = (0..count).map(value).collect();
        Tensor::from_vec(out, entry.shape.clone(), &Device::Cpu)
    }
}

/// Bytes per element of the dtypes this reader takes.
fn element_size(dtype: &str) -> Option<usize> {
    match dtype {
        "F32" => Some(4),
        "BF16" => Some(2),
        _ => None,
    }
}

fn bad(path: &Path, reason: String) -> Error {
    Error::config(path.display().to_string(), reason)
}

/// One header entry: `{"dtype": "F32", "shape": [..], "data_offsets": [s, e]}`,
/// its offsets checked against the file.
fn parse_entry(file: usize, data_start: u64, len: u64, info: &serde_json::Value) -> Option<Entry> {
    let dtype = info.get("dtype")?.as_str()?.to_string();
    let shape = info
        .get("shape")?
        .as_array()?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<Vec<_>>>()?;
    let offsets = info.get("data_offsets")?.as_array()?;
    let (start, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
    let (start, end) = (data_start.checked_add(start)?, data_start.checked_add(end)?);
    (start <= end && end <= len).then_some(Entry { file, dtype, shape, start, end })
}

impl candle_nn::var_builder::SimpleBackend for FrozenF32Weights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::var_builder::SimpleBackend;

    /// Every tensor comes back with candle's loader's shape and values (bf16
    /// widened), a 2-D one as a transposed view.
    #[test]
    fn reads_as_candle_does() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("qwen2_vl_weights_{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
        let path = dir.join("w.safetensors");
        let values: Vec<f32> = (0..7 * 70).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let tensors = [
            ("a", Tensor::from_vec(values.clone(), (7, 70), &Device::Cpu)?),
            ("b", Tensor::from_vec(values[..70].to_vec(), 70, &Device::Cpu)?.to_dtype(DType::BF16)?),
            ("c", Tensor::from_vec(values.clone(), (70, 7), &Device::Cpu)?.to_dtype(DType::BF16)?),
            ("d", Tensor::from_vec(values[..24].to_vec(), (2, 3, 4), &Device::Cpu)?),
        ];
        candle_core::safetensors::save(&tensors.iter().cloned().map(|(k, v)| (k.to_string(), v)).collect::<HashMap<_, _>>(), &path)?;
        let weights = FrozenF32Weights::open(std::slice::from_ref(&path))?;
        assert!(weights.covers(["a", "b", "c", "d"].into_iter()));
        assert!(!weights.covers(["a", "missing"].into_iter()));
        for (name, want) in &tensors {
            let got = weights.get(want.shape().clone(), name, candle_nn::Init::Const(0.0), DType::F32, &Device::Cpu)?;
            let want = want.to_dtype(DType::F32)?;
            assert_eq!(got.dims(), want.dims(), "{name}");
            let diff = (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{name}");
        }
        let a = weights.get_unchecked("a", DType::F32, &Device::Cpu)?;
        assert!(a.t()?.is_contiguous(), "a 2-D weight is a transposed view of a dense [in, out]");
        std::fs::remove_dir_all(&dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
        Ok(())
    }
}
