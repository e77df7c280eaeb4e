//! AdamW (decoupled weight decay, bias correction, as `torch.optim.AdamW`),
//! learning-rate schedules with warmup (as transformers' `get_*_schedule_with_warmup`)
//! and clipping by global gradient norm (as `torch.nn.utils.clip_grad_norm_`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// AdamW settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε, added to the bias-corrected second-moment root.
    pub eps: f64,
    /// Decoupled weight decay (applied to parameters of rank ≥ 2 only, as
    /// transformers' Trainer skips biases and norms).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One named trainable parameter.
#[derive(Debug, Clone)]
pub struct Param {
    /// Stable name (the key it is saved under).
    pub name: String,
    /// The variable.
    pub var: Var,
}

/// AdamW over a fixed list of parameters.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<Param>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
}

impl AdamW {
    /// An optimizer with zero moments.
    pub fn new(params: Vec<Param>, config: AdamWConfig) -> Result<Self> {
        let zeros = |p: &Param| {
            p.var
                .as_tensor()
                .zeros_like()
                .and_then(|t| t.to_dtype(DType::F32))
        };
        let m = params
            .iter()
            .map(zeros)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = params
            .iter()
            .map(zeros)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config,
            params,
            m,
            v,
            step: 0,
        })
    }

    /// The parameters.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `params()[i]`
    /// (`None`: the parameter got no gradient and is left alone, moments included).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for (i, param) in self.params.iter().enumerate() {
            let Some(g) = grads.get(i).and_then(Option::as_ref) else {
                continue;
            };
            let decay = if c.weight_decay != 0.0 && param.var.rank() >= 2 {
                1.0 - lr * c.weight_decay
            } else {
                1.0
            };
            let fused = FusedUpdate {
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                decay: decay as f32,
                step_size: (lr / bias1) as f32,
                sqrt_bias2: bias2.sqrt() as f32,
                eps: c.eps as f32,
            };
            if let Some((p, m, v)) = fused.apply(param.var.as_tensor(), g, &self.m[i], &self.v[i])? {
                param.var.set(&p)?;
                self.m[i] = m;
                self.v[i] = v;
                continue;
            }
            let g = g.to_dtype(DType::F32)?;
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let p = param.var.as_tensor().to_dtype(DType::F32)?.detach();
            let p = (p * decay)?;
            // torch: p -= (lr / bias1) * m / (sqrt(v) / sqrt(bias2) + eps)
            let denom = ((v.sqrt()? / bias2.sqrt())? + c.eps)?;
            let update = ((&m / denom)? * (lr / bias1))?;
            let p = (p - update)?;
            param.var.set(&p.to_dtype(param.var.dtype())?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Saves moments (`m.{name}`, `v.{name}`) and the step count to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (i, p) in self.params.iter().enumerate() {
            tensors.insert(format!("m.{}", p.name), self.m[i].clone());
            tensors.insert(format!("v.{}", p.name), self.v[i].clone());
        }
        tensors.insert(
            "step".into(),
            Tensor::new(&[self.step as f64], &candle_core::Device::Cpu)?,
        );
        crate::data::save_safetensors(&tensors, path)?;
        Ok(())
    }

    /// Restores what [`AdamW::save`] wrote; every parameter must be present with its shape.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let fail = |message: String| Error::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        let device = self
            .params
            .first()
            .map(|p| p.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let tensors = candle_core::safetensors::load(path, &device)
            .map_err(|e| fail(format!("unreadable: {e}")))?;
        let step = tensors
            .get("step")
            .and_then(|t| t.to_vec1::<f64>().ok())
            .and_then(|v| v.first().copied())
            .ok_or_else(|| fail("no step count".into()))?;
        if !(step >= 0.0 && step.fract() == 0.0) {
            return Err(fail(format!("bad step count {step}")));
        }
        for (i, p) in self.params.iter().enumerate() {
            for (slot, kind) in [(0, "m"), (1, "v")] {
                let key = format!("{kind}.{}", p.name);
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| fail(format!("optimizer state lacks `{key}`")))?;
                if t.dims() != p.var.dims() {
                    return Err(fail(format!(
                        "`{key}` has shape {:?}, the parameter {:?}",
                        t.dims(),
                        p.var.dims()
                    )));
                }
                let t = t.to_dtype(DType::F32)?;
                if slot == 0 {
                    self.m[i] = t;
                } else {
                    self.v[i] = t;
                }
            }
        }
        self.step = step as usize;
        Ok(())
    }
}

/// Scales gradients so that their global L2 norm is at most `max_norm`
/// (`max_norm / (norm + 1e-6)` when over, as torch); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += squared_norm(g)?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm.is_finite() {
        let scale = max_norm / (norm + 1e-6);
        if scale < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * scale)?;
            }
        }
    }
    Ok(norm)
}

/// A buffer of `n` floats for the fused loop to write (the training crate may
/// not depend on multitoken-kernels, whose `output_buffer` this mirrors).
fn uninit(n: usize) -> Vec<std::mem::MaybeUninit<f32>> {
    (0..n).map(|_| std::mem::MaybeUninit::uninit()).collect()
}

/// The buffer of [`uninit`] once every element has been written.
///
/// # Safety
/// Every element must have been written.
unsafe fn assume_init(out: Vec<std::mem::MaybeUninit<f32>>) -> Vec<f32> {
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: MaybeUninit<f32> has f32's layout; the caller guarantees initialisation.
    unsafe { Vec::from_raw_parts(out.as_mut_ptr().cast::<f32>(), out.len(), out.capacity()) }
}

/// The constants of one AdamW update, for the fused loop.
struct FusedUpdate {
    beta1: f32,
    beta2: f32,
    decay: f32,
    step_size: f32,
    sqrt_bias2: f32,
    eps: f32,
}

/// Elements per unit of parallel work.
const CHUNK: usize = 1 << 14;

/// The f32 values of a contiguous CPU tensor, if it is one.
fn f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if t.dtype() != DType::F32 || !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let data = cpu.as_slice::<f32>().ok()?;
            let n = layout.shape().elem_count();
            Some(f(&data[layout.start_offset()..][..n]))
        }
        _ => None,
    }
}

impl FusedUpdate {
    /// The new parameter, first and second moments in one parallel pass over
    /// contiguous f32 CPU tensors — torch's per-element formula — or `None` when
    /// the tensors are not such (the composite below then runs). The composite
    /// took twelve tensor ops, each a single-threaded pass with its own
    /// allocation: a quarter of a second per LoRA step on SmolLM2-135M.
    fn apply(&self, p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        use rayon::prelude::*;
        let n = p.elem_count();
        if [g, m, v].iter().any(|t| t.elem_count() != n) {
            return Ok(None);
        }
        // A gradient may come out of backward as a transposed view.
        let g = &g.contiguous()?;
        // Uninitialised outputs: the loop writes every element, so zero-filling
        // three parameter-sized buffers first would be a pass for nothing.
        let (mut p_out, mut m_out, mut v_out) = (uninit(n), uninit(n), uninit(n));
        let done = f32_slice(p, |ps| {
            f32_slice(g, |gs| {
                f32_slice(m, |ms| {
                    f32_slice(v, |vs| {
                        p_out
                            .par_chunks_mut(CHUNK)
                            .zip(m_out.par_chunks_mut(CHUNK))
                            .zip(v_out.par_chunks_mut(CHUNK))
                            .enumerate()
                            .for_each(|(c, ((po, mo), vo))| {
                                let at = c * CHUNK;
                                for j in 0..po.len() {
                                    let (gj, i) = (gs[at + j], at + j);
                                    let mj = self.beta1 * ms[i] + (1.0 - self.beta1) * gj;
                                    let vj = self.beta2 * vs[i] + (1.0 - self.beta2) * (gj * gj);
                                    let denom = vj.sqrt() / self.sqrt_bias2 + self.eps;
                                    po[j].write(ps[i] * self.decay - self.step_size * (mj / denom));
                                    mo[j].write(mj);
                                    vo[j].write(vj);
                                }
                            });
                    })
                })
            })
        })
        .flatten()
        .flatten()
        .flatten();
        if done.is_none() {
            return Ok(None);
        }
        let device = p.device();
        // SAFETY: the loop above wrote every element of the three buffers.
        let (p_out, m_out, v_out) = unsafe { (assume_init(p_out), assume_init(m_out), assume_init(v_out)) };
        Ok(Some((
            Tensor::from_vec(p_out, p.shape(), device)?,
            Tensor::from_vec(m_out, p.shape(), device)?,
            Tensor::from_vec(v_out, p.shape(), device)?,
        )))
    }
}

/// Σ x² of a gradient in f64: one parallel pass for a contiguous f32 CPU
/// tensor (fixed chunks summed in order, so the result does not depend on the
/// thread count), candle's ops otherwise.
fn squared_norm(g: &Tensor) -> Result<f64> {
    use rayon::prelude::*;
    let fast = f32_slice(g, |xs| {
        let partial: Vec<f64> = xs
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
            .collect();
        partial.iter().sum::<f64>()
    });
    match fast {
        Some(total) => Ok(total),
        None => Ok(g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?),
    }
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Half a cosine from the peak to 0 (transformers' `cosine`).
    Cosine,
    /// Straight line from the peak to 0.
    Linear,
    /// The peak throughout.
    Constant,
}

/// Learning rate of optimizer step `step` (0-based) of `total`, as
/// transformers' `get_{cosine,linear,constant}_schedule_with_warmup`.
pub fn learning_rate(
    schedule: Schedule,
    peak: f64,
    step: usize,
    warmup: usize,
    total: usize,
) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / span;
    match schedule {
        Schedule::Cosine => peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        Schedule::Linear => peak * (1.0 - progress).max(0.0),
        Schedule::Constant => peak,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_warm_up_then_decay() {
        assert_eq!(learning_rate(Schedule::Cosine, 1.0, 0, 10, 110), 0.0);
        assert!((learning_rate(Schedule::Cosine, 1.0, 5, 10, 110) - 0.5).abs() < 1e-12);
        assert!((learning_rate(Schedule::Cosine, 1.0, 10, 10, 110) - 1.0).abs() < 1e-12);
        assert!((learning_rate(Schedule::Cosine, 1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!((learning_rate(Schedule::Linear, 2.0, 60, 10, 110) - 1.0).abs() < 1e-12);
        assert_eq!(learning_rate(Schedule::Constant, 2.0, 60, 10, 110), 2.0);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() -> Result<()> {
        let var = Var::from_tensor(&Tensor::new(&[[1f32, -2.0]], &Device::Cpu)?)?;
        let mut opt = AdamW::new(
            vec![Param {
                name: "w".into(),
                var: var.clone(),
            }],
            AdamWConfig::default(),
        )?;
        let g = Tensor::new(&[[0.5f32, -3.0]], &Device::Cpu)?;
        opt.step(&[Some(g)], 0.1)?;
        // First step: m̂ = g, v̂ = g², so the update is lr * sign(g).
        let got = var.as_tensor().to_vec2::<f32>()?;
        assert!(
            (got[0][0] - 0.9).abs() < 1e-5 && (got[0][1] + 1.9).abs() < 1e-5,
            "{got:?}"
        );
        Ok(())
    }

    #[test]
    fn fused_adamw_follows_torchs_formula() -> Result<()> {
        // 3 × 20000 values: several parallel chunks and a partial one.
        let (rows, cols) = (3, 20_000);
        let n = rows * cols;
        let wave = |k: f64| (0..n).map(move |i| ((i as f64 * 0.37 + k).sin() * 0.5) as f32);
        let start: Vec<f32> = wave(1.0).collect();
        let var = Var::from_tensor(&Tensor::from_vec(start.clone(), (rows, cols), &Device::Cpu)?)?;
        let config = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
        let mut opt = AdamW::new(vec![Param { name: "w".into(), var: var.clone() }], config)?;
        let (mut p, mut m, mut v) = (
            start.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
            vec![0f64; n],
            vec![0f64; n],
        );
        let lr = 0.01;
        for t in 1..=3 {
            let g: Vec<f32> = wave(t as f64 * 2.0).collect();
            // The gradient as a transposed view, as backward can give it.
            let g_tensor = Tensor::from_vec(g.clone(), (cols, rows), &Device::Cpu)?.t()?;
            let g_rows: Vec<f32> = g_tensor.flatten_all()?.to_vec1()?;
            opt.step(&[Some(g_tensor)], lr)?;
            let (b1, b2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.999f64.powi(t));
            for i in 0..n {
                let gi = f64::from(g_rows[i]);
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.999 * v[i] + 0.001 * gi * gi;
                p[i] = p[i] * (1.0 - lr * 0.1) - lr / b1 * m[i] / (v[i].sqrt() / b2.sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
        let worst = got.iter().zip(&p).map(|(&a, &b)| (f64::from(a) - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-5, "fused AdamW is {worst} off torch's formula");
        Ok(())
    }

    #[test]
    fn clipping_scales_to_max_norm() -> Result<()> {
        let mut grads = vec![Some(Tensor::new(&[3f32, 4.0], &Device::Cpu)?), None];
        let norm = clip_grad_norm(&mut grads, 1.0)?;
        assert!((norm - 5.0).abs() < 1e-9);
        let g = grads[0]
            .as_ref()
            .map(|g| g.to_vec1::<f32>())
            .transpose()?
            .unwrap_or_default();
        assert!(
            (g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5,
            "{g:?}"
        );
        Ok(())
    }
}
