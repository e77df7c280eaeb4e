//! Seeded random weights for any candle module: a var-builder backend that
//! creates every tensor it is asked for and records it for saving.
//!
//! Initialisation by name and rank (the modules' own hints are ignored so that
//! the result depends on the seed alone): rank-1 `*.weight` (norms) = 1,
//! `*.bias` = 0, everything else N(0, 0.02²).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use multitoken_datasets::Rng;

/// Creates and records tensors on demand.
pub struct RandomInit {
    seed: u64,
    tensors: Mutex<HashMap<String, Tensor>>,
}

impl RandomInit {
    /// A backend whose tensors derive from `seed` and their names.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            tensors: Mutex::new(HashMap::new()),
        }
    }

    /// A var builder (f32, CPU) over a fresh backend.
    pub fn var_builder(seed: u64) -> (VarBuilder<'static>, std::sync::Arc<RandomInit>) {
        let backend = std::sync::Arc::new(RandomInit::new(seed));
        let vb =
            VarBuilder::from_backend(Box::new(Shared(backend.clone())), DType::F32, Device::Cpu);
        (vb, backend)
    }

    /// Saves every tensor created so far as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors = self
            .tensors
            .lock()
            .map_err(|_| anyhow::anyhow!("random-init map poisoned"))?;
        candle_core::safetensors::save(&tensors, path)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Number of parameters created.
    pub fn parameters(&self) -> usize {
        self.tensors
            .lock()
            .map(|t| t.values().map(Tensor::elem_count).sum())
            .unwrap_or(0)
    }
}

/// Standard deviation of [`init_tensor`]'s normal draws (transformers' `initializer_range`).
pub const INIT_STD: f64 = 0.02;

/// A tensor of `shape` for parameter `name`.
pub fn init_tensor(seed: u64, name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = if shape.len() == 1 && name.ends_with("weight") {
        vec![1.0; n]
    } else if name.ends_with("bias") {
        vec![0.0; n]
    } else {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for b in name.bytes() {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        let mut rng = Rng::new(seed ^ hash);
        (0..n)
            .map(|_| {
                // Box-Muller.
                let u1 = rng.unit().max(1e-12);
                let u2 = rng.unit();
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * INIT_STD) as f32
            })
            .collect()
    };
    Tensor::from_vec(values, shape, &Device::Cpu)
}

struct Shared(std::sync::Arc<RandomInit>);

impl SimpleBackend for Shared {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut tensors = self
            .0
            .tensors
            .lock()
            .map_err(|_| candle_core::Error::Msg("random-init map poisoned".into()))?;
        if let Some(t) = tensors.get(name) {
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let t = init_tensor(self.0.seed, name, s.dims())?;
        tensors.insert(name.to_string(), t.clone());
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "random init needs a shape for `{name}`"
        )))
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}
