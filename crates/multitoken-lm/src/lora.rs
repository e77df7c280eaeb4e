//! LoRA (Hu et al. 2021, <https://arxiv.org/abs/2106.09685>) adapters attached
//! to a [`crate::Linear`] for training: `y = x Wᵀ + b + scale · dropout(x) Aᵀ Bᵀ`
//! with `A: [r, in]`, `B: [out, r]`, `scale = alpha / r`, as PEFT's `lora.Linear`.
//!
//! Dropout masks come from one seeded generator shared by all adapters of a
//! model ([`LoraDropout`]); the trainer reseeds it every micro-batch, so a
//! resumed run draws the same masks. Dropout applies only while the adapter is
//! being trained (its weights track gradients).

use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use multitoken_kernels::train::DropoutMask;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// A seeded generator for LoRA dropout masks, shared by a model's adapters.
#[derive(Debug, Clone)]
pub struct LoraDropout {
    rng: Arc<Mutex<rand::rngs::StdRng>>,
}

impl Default for LoraDropout {
    fn default() -> Self {
        Self::new(0)
    }
}

impl LoraDropout {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed))),
        }
    }

    /// The generator's state (to replay the same masks later, as gradient
    /// checkpointing's recompute does).
    pub fn state(&self) -> Result<rand::rngs::StdRng> {
        self.rng
            .lock()
            .map(|rng| rng.clone())
            .map_err(|_| Error::Msg("LoRA dropout generator poisoned".into()))
    }

    /// Puts `state` in place, returning the state it replaces.
    pub fn replace_state(&self, state: rand::rngs::StdRng) -> Result<rand::rngs::StdRng> {
        self.rng
            .lock()
            .map(|mut rng| std::mem::replace(&mut *rng, state))
            .map_err(|_| Error::Msg("LoRA dropout generator poisoned".into()))
    }

    /// Restarts the stream at `seed`.
    pub fn reseed(&self, seed: u64) {
        if let Ok(mut rng) = self.rng.lock() {
            *rng = rand::rngs::StdRng::seed_from_u64(seed);
        }
    }

    /// Which of `len` elements dropout with probability `p` keeps, kept ones
    /// scaled by `1/(1-p)`.
    fn mask(&self, len: usize, p: f32) -> Result<DropoutMask> {
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| Error::Msg("LoRA dropout generator poisoned".into()))?;
        // One draw from the shared stream seeds the whole mask.
        Ok(DropoutMask::from_seed(len, p, rng.random::<u64>()))
    }
}

/// One LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// `lora_A`, `[r, in]`.
    pub a: Tensor,
    /// `lora_B`, `[out, r]`.
    pub b: Tensor,
    /// `alpha / r`.
    pub scale: f64,
    /// Dropout probability on the adapter's input.
    pub dropout: f32,
    /// Mask generator.
    pub rng: LoraDropout,
}

impl LoraLayer {
    /// The dropout mask of an input of `len` elements, drawn from the shared
    /// generator, when dropout applies (a positive rate on an adapter that is
    /// being trained).
    pub fn dropout_mask(&self, len: usize) -> Result<Option<DropoutMask>> {
        if self.dropout > 0.0 && self.a.track_op() {
            self.rng.mask(len, self.dropout).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The adapter's contribution for `x` `[..., in]`: `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (_, in_dim) = self.a.dims2()?;
        let out_dim = self.b.dim(0)?;
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let x = x.reshape((rows, in_dim))?;
        let x = match self.dropout_mask(rows * in_dim)? {
            Some(mask) => (&x * mask.tensor(x.shape(), x.device())?.to_dtype(x.dtype())?)?,
            None => x,
        };
        let y = x.matmul(&self.a.t()?)?;
        let y = (y.matmul(&self.b.t()?)? * self.scale)?;
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = out_dim;
        }
        Ok(y.reshape(out)?)
    }
}
