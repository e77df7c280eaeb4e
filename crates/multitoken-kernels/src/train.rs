//! Fused RMSNorm and softmax with their backward passes, for training through a
//! frozen LM (stage 1 and LoRA: the input tracks gradients, the norm's weight
//! does not).
//!
//! candle's fused `rms_norm` and `softmax_last_dim` have no backward, so a
//! tracked input used to take the composite forms: seven ops for RMSNorm and
//! five for softmax, each a pass over the activations with its own allocation,
//! and as many again in the backward. Here each is one custom op whose forward
//! and backward are single row-parallel passes.
//!
//! Measured on 6 stage-1 steps of SmolLM2-135M + CLIP B/32 (`multitoken train`,
//! 2 threads): the fused RMSNorm took them from 25.5 s to 16.7 s and the peak RSS
//! from 2.81 to 2.47 GB.
//!
//! [`lora_linear`] is a frozen linear layer with a trained LoRA adapter as one
//! op. candle keeps every op's output until the backward pass has run, and the
//! composite (base product, dropout mask, masked input, `x Aᵀ`, `· Bᵀ`, the
//! scaling, the sum) kept six activations per layer where the fused op keeps its
//! output alone: the backward recomputes the cheap rank-r product instead.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use crate::{assume_init, cpu, cpu_data, fast_path, math, output_buffer};

/// Rows per unit of work on candle's pool.
const ROWS_PER_UNIT: usize = 16;

/// The data of a contiguous f32 CPU tensor.
fn with_data<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    f(cpu_data(&storage, layout)?)
}

/// `1 / sqrt(mean(x²) + eps)` of one row.
fn inverse_rms(row: &[f32], eps: f32) -> f32 {
    1.0 / (math::dot(row, row) / row.len() as f32 + eps).sqrt()
}

/// RMSNorm over the last axis, `x / sqrt(mean(x²) + eps) · weight`, that keeps
/// `x`'s gradient. With a frozen f32 CPU weight and an f32 CPU `x` it is one
/// fused op each way; otherwise (a trained weight, another device or dtype)
/// candle's composite.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let frozen = fast_path(&[weight]);
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
    if !frozen || !cpu_f32 || weight.dims() != [x.dim(D::Minus1)?] {
        return candle_nn::ops::rms_norm_slow(x, weight, eps);
    }
    x.contiguous()?.apply_op1(RmsNorm {
        weight: weight.contiguous()?,
        eps,
    })
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "multitoken-rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = self.weight.elem_count();
        if !layout.is_contiguous() || layout.dims().last() != Some(&width) {
            candle_core::bail!(
                "rms_norm: input {:?} is not a contiguous [..., {width}]",
                layout.dims()
            );
        }
        let x = &storage.as_slice::<f32>()?[layout.start_offset()..][..layout.shape().elem_count()];
        let rows = x.len() / width.max(1);
        let mut out = output_buffer(x.len());
        with_data(&self.weight, |w| {
            cpu::for_each_row(rows, width, ROWS_PER_UNIT, &mut out, |r, dst| {
                let row = &x[r * width..][..width];
                let inv = inverse_rms(row, self.eps);
                for ((o, &v), &g) in dst.iter_mut().zip(row).zip(w) {
                    o.write(v * inv * g);
                }
            });
            Ok(())
        })?;
        // SAFETY: cpu::for_each_row wrote every row.
        let out = unsafe { assume_init(out) };
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `dx = r (w ⊙ g) - x r³ mean(x ⊙ w ⊙ g)`, per row, with `r = 1 / rms(x)`.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let width = self.weight.elem_count();
        let rows = arg.elem_count() / width.max(1);
        let mut out = output_buffer(arg.elem_count());
        with_data(arg, |x| {
            with_data(grad, |g| {
                with_data(&self.weight, |w| {
                    cpu::for_each_row(rows, width, ROWS_PER_UNIT, &mut out, |r, dst| {
                        let (xr, gr) = (&x[r * width..][..width], &g[r * width..][..width]);
                        let inv = inverse_rms(xr, self.eps);
                        let mean: f32 = xr
                            .iter()
                            .zip(gr)
                            .zip(w)
                            .map(|((&a, &b), &c)| a * b * c)
                            .sum::<f32>()
                            / width as f32;
                        let coef = inv * inv * inv * mean;
                        for (((o, &xv), &gv), &wv) in dst.iter_mut().zip(xr).zip(gr).zip(w) {
                            o.write(inv * wv * gv - xv * coef);
                        }
                    });
                    Ok(())
                })
            })
        })?;
        // SAFETY: cpu::for_each_row wrote every row.
        let out = unsafe { assume_init(out) };
        Ok(Some(Tensor::from_vec(out, arg.dims(), arg.device())?))
    }
}

/// Softmax over the last axis that keeps its input's gradient: one fused op each
/// way on an f32 CPU tensor, candle's composite otherwise.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32) {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax { scale: 1.0, mask: None })
}

/// `softmax(scale · x + mask)` over the last axis that keeps `x`'s gradient,
/// for attention scores `x` `[batch, groups, rows, keys]` where `rows` is
/// `per_group` blocks of `queries` rows (the query heads that share a key
/// head), and an additive `mask` `[batch | 1, 1, 1, queries, keys]` (frozen)
/// shared by every head: the scaling, the mask's broadcast add and the
/// softmax as one op each way (three ops, each with its own gradient pass in
/// candle's autograd, before). `queries` is the mask's query axis.
pub fn scaled_masked_softmax(x: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
    let mask_fits = mask.is_none_or(|m| {
        let d = m.dims();
        d.len() == 5
            && d[1] == 1
            && d[2] == 1
            && x.rank() == 4
            && d[4] == x.dims()[3]
            && (d[0] == 1 || d[0] == x.dims()[0])
            && d[3] > 0
            && x.dims()[2].is_multiple_of(d[3])
            && m.dtype() == DType::F32
            && fast_path(&[m])
    });
    if !cpu_f32 || !mask_fits {
        let scaled = (x * scale)?;
        let scaled = match mask {
            Some(m) => {
                let (b, g, rows, keys) = scaled.dims4()?;
                let q = m.dim(3)?;
                scaled
                    .reshape((b, g, rows / q, q, keys))?
                    .broadcast_add(m)?
                    .reshape((b, g, rows, keys))?
            }
            None => scaled,
        };
        return softmax_last_dim(&scaled);
    }
    x.contiguous()?.apply_op1(Softmax {
        scale: scale as f32,
        mask: mask.map(Tensor::contiguous).transpose()?,
    })
}

struct Softmax {
    scale: f32,
    /// `[batch | 1, 1, 1, queries, keys]`.
    mask: Option<Tensor>,
}

/// Which mask row a score row reads: scores `[batch, groups, rows, keys]`
/// against a mask `[batch | 1, 1, 1, queries, keys]`.
#[derive(Clone, Copy)]
struct MaskRows {
    /// Whether the mask has one row block per batch (else one shared block).
    per_batch_mask: bool,
    queries: usize,
    /// Score rows per batch: `groups · rows`.
    rows_per_batch: usize,
}

impl MaskRows {
    fn row(self, r: usize) -> usize {
        let batch = if self.per_batch_mask { r / self.rows_per_batch } else { 0 };
        batch * self.queries + r % self.queries
    }
}

impl Softmax {
    /// The mask-row map for scores of `dims`, or `None` without a mask.
    fn mask_rows(&self, dims: &[usize]) -> Result<Option<MaskRows>> {
        let Some(mask) = &self.mask else {
            return Ok(None);
        };
        let (mask_batch, queries) = (mask.dim(0)?, mask.dim(3)?);
        if dims.len() != 4 || queries == 0 || !dims[2].is_multiple_of(queries) {
            candle_core::bail!("softmax: scores {dims:?} do not fit the mask {:?}", mask.dims());
        }
        Ok(Some(MaskRows {
            per_batch_mask: mask_batch != 1,
            queries,
            rows_per_batch: dims[1] * dims[2],
        }))
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "multitoken-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(&width) = layout.dims().last() else {
            candle_core::bail!("softmax: a scalar has no last axis");
        };
        if !layout.is_contiguous() {
            candle_core::bail!("softmax: input {:?} is not contiguous", layout.dims());
        }
        let x = &storage.as_slice::<f32>()?[layout.start_offset()..][..layout.shape().elem_count()];
        let rows = x.len() / width.max(1);
        let mut out = output_buffer(x.len());
        let mask_row = self.mask_rows(layout.dims())?;
        let mut fill = |mask: Option<&[f32]>| {
            cpu::for_each_row(rows, width, ROWS_PER_UNIT, &mut out, |r, dst| {
                let src = &x[r * width..][..width];
                match (mask, mask_row) {
                    (Some(m), Some(at)) => {
                        let m = &m[at.row(r) * width..][..width];
                        for ((o, &v), &b) in dst.iter_mut().zip(src).zip(m) {
                            o.write(v * self.scale + b);
                        }
                    }
                    _ => {
                        for (o, &v) in dst.iter_mut().zip(src) {
                            o.write(v * self.scale);
                        }
                    }
                }
                // SAFETY: every element was just written.
                let row = unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
                math::softmax_rows(row, width);
            });
        };
        match &self.mask {
            Some(m) => with_data(m, |m| {
                fill(Some(m));
                Ok(())
            })?,
            None => fill(None),
        }
        // SAFETY: cpu::for_each_row wrote every row.
        let out = unsafe { assume_init(out) };
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `dx = scale · p ⊙ (g - Σ g ⊙ p)`, per row.
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let width = arg.dim(D::Minus1)?;
        let rows = arg.elem_count() / width.max(1);
        let mut out = output_buffer(arg.elem_count());
        with_data(res, |p| {
            with_data(grad, |g| {
                cpu::for_each_row(rows, width, ROWS_PER_UNIT, &mut out, |r, dst| {
                    let (pr, gr) = (&p[r * width..][..width], &g[r * width..][..width]);
                    let dot = math::dot(pr, gr);
                    for ((o, &pv), &gv) in dst.iter_mut().zip(pr).zip(gr) {
                        o.write(self.scale * (pv * (gv - dot)));
                    }
                });
                Ok(())
            })
        })?;
        // SAFETY: cpu::for_each_row wrote every row.
        let out = unsafe { assume_init(out) };
        Ok(Some(Tensor::from_vec(out, arg.dims(), arg.device())?))
    }
}

/// Rotary position embedding of `x` `[batch, heads, seq, head_dim]` with the
/// `[≥ seq, head_dim / 2]` tables `cos` and `sin` (their first `seq` rows),
/// that keeps `x`'s gradient: `interleaved` rotates pairs `(2i, 2i + 1)`
/// (candle's `rope_i`), otherwise the two halves (`rope`, the llama layout).
/// One op each way on f32 CPU tensors, where candle's differentiable
/// `rope_slow` / `rope_i_slow` take seven; those otherwise. The backward is
/// the rotation by the opposite angle.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let (_, _, seq, dim) = x.dims4()?;
    let cpu_f32 = [x, cos, sin].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    let tables_fit = cos.rank() == 2 && cos.dims() == sin.dims() && cos.dim(0)? >= seq && cos.dim(1)? * 2 == dim;
    if !(cpu_f32 && tables_fit && fast_path(&[cos, sin])) {
        return if interleaved {
            candle_nn::rotary_emb::rope_i_slow(x, cos, sin)
        } else {
            candle_nn::rotary_emb::rope_slow(x, cos, sin)
        };
    }
    x.contiguous()?.apply_op1(Rope {
        cos: cos.narrow(0, 0, seq)?.contiguous()?,
        sin: sin.narrow(0, 0, seq)?.contiguous()?,
        interleaved,
    })
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

impl Rope {
    /// Rotates every row of `x` (`[rows, dim]`, row `r` at position `r % seq`)
    /// by the tables' angle, negated when `inverse`.
    fn rotate(&self, x: &[f32], dims: &[usize], inverse: bool) -> Result<Vec<f32>> {
        let (seq, dim) = (dims[2], dims[3]);
        let half = dim / 2;
        let rows = x.len() / dim.max(1);
        let sign = if inverse { -1.0 } else { 1.0 };
        let mut out = output_buffer(x.len());
        with_data(&self.cos, |cos| {
            with_data(&self.sin, |sin| {
                cpu::for_each_row(rows, dim, ROWS_PER_UNIT * 4, &mut out, |r, dst| {
                    let t = r % seq;
                    let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
                    let row = &x[r * dim..][..dim];
                    // The two layouts as separate branch-free loops over
                    // slices, which LLVM vectorises (the same operations in
                    // the same order as one element at a time).
                    if self.interleaved {
                        for (((d, two), &ci), &si) in dst.chunks_exact_mut(2).zip(row.chunks_exact(2)).zip(c).zip(s) {
                            let (a, b, si) = (two[0], two[1], sign * si);
                            d[0].write(a * ci - b * si);
                            d[1].write(b * ci + a * si);
                        }
                    } else {
                        let (lo, hi) = row[..2 * half].split_at(half);
                        let (dlo, dhi) = dst[..2 * half].split_at_mut(half);
                        for ((((dl, dh), &a), &b), (&ci, &si)) in dlo.iter_mut().zip(dhi.iter_mut()).zip(lo).zip(hi).zip(c.iter().zip(s)) {
                            let si = sign * si;
                            dl.write(a * ci - b * si);
                            dh.write(b * ci + a * si);
                        }
                    }
                });
                Ok(())
            })
        })?;
        // SAFETY: every row's `half` pairs cover all its elements.
        Ok(unsafe { assume_init(out) })
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "multitoken-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        if !layout.is_contiguous() || layout.dims().len() != 4 {
            candle_core::bail!("rope: input {:?} is not a contiguous [b, h, t, d]", layout.dims());
        }
        let x = &storage.as_slice::<f32>()?[layout.start_offset()..][..layout.shape().elem_count()];
        let out = self.rotate(x, layout.dims(), false)?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let out = with_data(grad, |g| self.rotate(g, arg.dims(), true))?;
        Ok(Some(Tensor::from_vec(out, arg.dims(), arg.device())?))
    }
}

/// `silu(gate) · up` (the llama MLP's gated activation) that keeps both
/// inputs' gradients: one op each way on f32 CPU tensors of one shape, where
/// candle's composite keeps two activations and takes about eight ops
/// backward; the composite otherwise.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let cpu_f32 = [gate, up].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !cpu_f32 || gate.dims() != up.dims() || gate.rank() == 0 {
        return candle_nn::ops::silu(gate)? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

struct SiluMul;

/// `1 / (1 + e^-x)`.
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl SiluMul {
    /// The forward values, `silu(gate) · up` by rows through
    /// [`math::silu_times_in_place`].
    fn forward(gate: &[f32], up: &[f32], width: usize) -> Vec<f32> {
        let rows = gate.len() / width.max(1);
        let mut out = output_buffer(gate.len());
        cpu::for_each_row(rows, width, ROWS_PER_UNIT, &mut out, |r, dst| {
            let (g, u) = (&gate[r * width..][..width], &up[r * width..][..width]);
            for (o, &uv) in dst.iter_mut().zip(u) {
                o.write(uv);
            }
            // SAFETY: every element of `dst` was written just above, and
            // `MaybeUninit<f32>` has `f32`'s layout.
            let dst = unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) };
            math::silu_times_in_place(g, dst);
        });
        // SAFETY: cpu::for_each_row wrote every row.
        unsafe { assume_init(out) }
    }

    /// `f(gate, up)` elementwise over rows of the last axis, in parallel.
    fn map(gate: &[f32], up: &[f32], width: usize, f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
        let rows = gate.len() / width.max(1);
        let mut out = output_buffer(gate.len());
        cpu::for_each_row(rows, width, ROWS_PER_UNIT, &mut out, |r, dst| {
            let (g, u) = (&gate[r * width..][..width], &up[r * width..][..width]);
            for ((o, &gv), &uv) in dst.iter_mut().zip(g).zip(u) {
                o.write(f(gv, uv));
            }
        });
        // SAFETY: cpu::for_each_row wrote every row.
        unsafe { assume_init(out) }
    }
}

impl candle_core::CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "multitoken-silu-mul"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Result<(CpuStorage, Shape)> {
        if !gl.is_contiguous() || !ul.is_contiguous() || gl.dims() != ul.dims() {
            candle_core::bail!("silu_mul: inputs {:?} and {:?} are not contiguous and alike", gl.dims(), ul.dims());
        }
        let n = gl.shape().elem_count();
        let gate = &gs.as_slice::<f32>()?[gl.start_offset()..][..n];
        let up = &us.as_slice::<f32>()?[ul.start_offset()..][..n];
        let width = gl.dims().last().copied().unwrap_or(1);
        let out = Self::forward(gate, up, width);
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }

    /// `d gate = grad · up · σ(g) (1 + g (1 - σ(g)))`, `d up = grad · g σ(g)`.
    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let width = gate.dims().last().copied().unwrap_or(1);
        let (d_gate, d_up) = with_data(gate, |g| {
            with_data(up, |u| {
                with_data(grad, |d| {
                    // The gradient rides in `up`'s slot of the row map for d gate,
                    // and in `gate`'s for d up.
                    let gu: Vec<f32> = u.iter().zip(d).map(|(&a, &b)| a * b).collect();
                    let d_gate = Self::map(g, &gu, width, |g, gu| {
                        let s = sigmoid(g);
                        gu * s * (1.0 + g * (1.0 - s))
                    });
                    let d_up = Self::map(g, d, width, |g, d| d * g * sigmoid(g));
                    Ok((d_gate, d_up))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(d_gate, gate.dims(), gate.device())?),
            Some(Tensor::from_vec(d_up, up.dims(), up.device())?),
        ))
    }
}

/// Which elements of a LoRA adapter's input dropout keeps (one bit each), and
/// the factor `1 / (1 - p)` that kept elements are scaled by.
#[derive(Debug, Clone)]
pub struct DropoutMask {
    bits: Vec<u64>,
    len: usize,
    keep: f32,
}

impl DropoutMask {
    /// A mask of `len` elements, element `i` kept when the `i`-th call of
    /// `kept` says so (called in order, once each), kept ones scaled by `keep`.
    pub fn from_fn(len: usize, keep: f32, mut kept: impl FnMut() -> bool) -> Self {
        let mut bits = vec![0u64; len.div_ceil(64)];
        for i in 0..len {
            if kept() {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        Self { bits, len, keep }
    }

    /// A mask of `len` elements, each dropped with probability `p` and kept ones
    /// scaled by `1 / (1 - p)`, drawn from `seed` alone: element `i`'s draw is a
    /// hash of `(seed, i)`, so the words fill in parallel and the mask is the
    /// same whatever the thread count. Per-element draws from one sequential
    /// generator were 4% of a LoRA step on SmolLM2-135M (43 M draws).
    pub fn from_seed(len: usize, p: f32, seed: u64) -> Self {
        let words = len.div_ceil(64);
        let mut bits = vec![0u64; words];
        let out = crate::Shared(bits.as_mut_ptr());
        cpu::for_each_unit(words.div_ceil(WORDS_PER_UNIT), |unit| {
            for w in unit * WORDS_PER_UNIT..((unit + 1) * WORDS_PER_UNIT).min(words) {
                let mut word = 0u64;
                for b in 0..64.min(len - w * 64) {
                    let i = (w * 64 + b) as u64;
                    let draw = (mix64(seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15))) >> 40)
                        as f32
                        / (1u32 << 24) as f32;
                    if draw >= p {
                        word |= 1 << b;
                    }
                }
                // SAFETY: word w lies inside `bits` and belongs to this unit only.
                unsafe { *out.at(w) = word };
            }
        });
        Self { bits, len, keep: 1.0 / (1.0 - p) }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mask has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn factor(&self, i: usize) -> f32 {
        if self.bits[i / 64] >> (i % 64) & 1 == 1 {
            self.keep
        } else {
            0.0
        }
    }

    /// `x ⊙ mask` (`x` of the mask's length, `None`: all ones), in parallel.
    fn scaled(&self, x: Option<&[f32]>) -> Vec<f32> {
        let mut out = output_buffer(self.len);
        let whole = self.len / 64;
        cpu::for_each_row(whole, 64, WORDS_PER_UNIT, &mut out, |w, dst| {
            for (b, o) in dst.iter_mut().enumerate() {
                let i = w * 64 + b;
                o.write(x.map_or(1.0, |x| x[i]) * self.factor(i));
            }
        });
        for (i, o) in out.iter_mut().enumerate().skip(whole * 64) {
            o.write(x.map_or(1.0, |x| x[i]) * self.factor(i));
        }
        // SAFETY: the rows and the tail cover every element.
        unsafe { assume_init(out) }
    }

    /// `x` with the mask applied: dropped elements 0, kept ones scaled.
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        self.scaled(Some(x))
    }

    /// The mask as a tensor of 0 and `keep` in `shape`.
    pub fn tensor(&self, shape: &Shape, device: &candle_core::Device) -> Result<Tensor> {
        Tensor::from_vec(self.scaled(None), shape, device)
    }
}

/// Mask words per unit of candle's pool.
const WORDS_PER_UNIT: usize = 256;

/// splitmix64's finaliser: a well-mixed 64-bit hash of `z`.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A frozen linear layer with a LoRA adapter (PEFT's `lora.Linear`):
/// `x Wᵀ + bias + scale · (dropout(x) Aᵀ) Bᵀ` for `x` `[rows, in]`, `weight`
/// `[out, in]`, `a` `[r, in]`, `b` `[out, r]`; `mask` is the dropout of `x`
/// (none: no dropout). The gradients of `x`, `a` and `b` are kept; `weight` and
/// `bias` must be frozen. On an f32 CPU tensor with a frozen f32 weight it is one
/// op that keeps only its output for the backward pass; otherwise candle's
/// composite of the same function.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<DropoutMask>,
) -> Result<Tensor> {
    let (rows, in_dim) = x.dims2()?;
    let (r, a_in) = a.dims2()?;
    let (out_dim, b_r) = b.dims2()?;
    let (w_out, w_in) = weight.dims2()?;
    if a_in != in_dim || w_in != in_dim || b_r != r || w_out != out_dim {
        candle_core::bail!(
            "lora_linear: x {:?}, weight {:?}, A {:?} and B {:?} do not fit",
            x.dims(),
            weight.dims(),
            a.dims(),
            b.dims()
        );
    }
    if mask.as_ref().is_some_and(|m| m.len() != rows * in_dim) {
        candle_core::bail!("lora_linear: the dropout mask does not cover x {:?}", x.dims());
    }
    let mut frozen = vec![weight];
    frozen.extend(bias);
    let cpu_f32 = [x, a, b]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !(fast_path(&frozen) && cpu_f32) {
        let dropped = match &mask {
            Some(m) => (x * m.tensor(x.shape(), x.device())?)?,
            None => x.clone(),
        };
        let base = crate::linear(x, weight, bias, cpu::Activation::Identity)?;
        let adapter = (dropped.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?;
        return base + adapter;
    }
    let op = LoraLinear {
        weight: weight.contiguous()?,
        bias: bias.map(Tensor::contiguous).transpose()?,
        scale: scale as f32,
        mask,
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f32,
    mask: Option<DropoutMask>,
}

/// The f32 data of a contiguous CPU storage in `layout`, and its two dims.
fn matrix<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<(&'a [f32], usize, usize)> {
    let (rows, cols) = layout.shape().dims2()?;
    if !layout.is_contiguous() {
        candle_core::bail!("lora_linear: a {:?} operand is not contiguous", layout.dims());
    }
    Ok((&storage.as_slice::<f32>()?[layout.start_offset()..][..rows * cols], rows, cols))
}

/// `out = x[m, k] · w[n, k]ᵀ (+ bias) (+ residual)` through the threaded kernel.
fn product(x: &[f32], w: &[f32], shape: cpu::LinearShape, extras: cpu::LinearExtras) -> Vec<f32> {
    let mut out: Vec<MaybeUninit<f32>> = output_buffer(shape.m * shape.n);
    cpu::linear(x, w, cpu::WeightLayout::Rows, extras, shape, cpu::Activation::Identity, &mut out);
    // SAFETY: cpu::linear writes every element of its output.
    unsafe { assume_init(out) }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "multitoken-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, m, k) = matrix(xs, xl)?;
        let (a, r, _) = matrix(a_s, al)?;
        let (b, n, _) = matrix(bs, bl)?;
        let dropped = self.mask.as_ref().map(|mask| mask.apply(x));
        // u = scale · dropout(x) Aᵀ, [m, r]: the scale on the narrow side.
        let mut u = product(dropped.as_deref().unwrap_or(x), a, cpu::LinearShape { m, k, n: r }, Default::default());
        for v in &mut u {
            *v *= self.scale;
        }
        drop(dropped);
        let out = with_data(&self.weight, |w| {
            let bias = self.bias.as_ref().map(|b| b.flatten_all()?.to_vec1::<f32>()).transpose()?;
            let base = product(
                x,
                w,
                cpu::LinearShape { m, k, n },
                cpu::LinearExtras { bias: bias.as_deref(), residual: None },
            );
            // x Wᵀ + bias + u Bᵀ: the base product folded in as the residual.
            Ok(product(
                &u,
                b,
                cpu::LinearShape { m, k: r, n },
                cpu::LinearExtras { bias: None, residual: Some(&base) },
            ))
        })?;
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    /// With `d = dropout(x)`, `u = d Aᵀ` (recomputed) and `g` the output's
    /// gradient: `dB = s gᵀ u`, `du = s g B`, `dA = duᵀ d`,
    /// `dx = g W + dropout(du A)`.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mask = self.mask.as_ref().map(|m| m.tensor(x.shape(), x.device())).transpose()?;
        let dropped = match &mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        let scale = f64::from(self.scale);
        let u = dropped.matmul(&a.t()?)?;
        let grad_b = (grad.t()?.matmul(&u)? * scale)?;
        let du = (grad.matmul(b)? * scale)?;
        let grad_a = du.t()?.matmul(&dropped)?;
        let dx_adapter = du.matmul(a)?;
        let dx_adapter = match &mask {
            Some(m) => (dx_adapter * m)?,
            None => dx_adapter,
        };
        // g W + the adapter's part, in one pass of the kernel (W as [in, out] columns of gᵀ).
        let grad_x = crate::linear_with(
            grad,
            &self.weight,
            cpu::WeightLayout::Columns,
            None,
            Some(&dx_adapter),
            cpu::Activation::Identity,
        )?;
        Ok((Some(grad_x), Some(grad_a), Some(grad_b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{max_diff, random};
    use candle_core::{Device, Var};

    /// The value and the input's gradient (through a weighted sum) of `f` at `x`.
    fn value_and_grad(
        f: impl Fn(&Tensor) -> Result<Tensor>,
        x: &Tensor,
        seed: u64,
    ) -> (Tensor, Tensor) {
        let var = Var::from_tensor(x).unwrap();
        let y = f(var.as_tensor()).unwrap();
        let weights = random(y.dims(), seed);
        let grads = (&y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (y, grads.get(var.as_tensor()).unwrap().clone())
    }

    #[test]
    fn rms_norm_and_its_gradient_match_the_composite() {
        // 37 rows cover several units and a partial one; 576 is SmolLM2's width.
        for (rows, width) in [(37, 576), (3, 7)] {
            let x = random(&[rows, width], 1);
            let weight = random(&[width], 2);
            let (y, dx) = value_and_grad(|x| rms_norm(x, &weight, 1e-5), &x, 3);
            let (want_y, want_dx) =
                value_and_grad(|x| candle_nn::ops::rms_norm_slow(x, &weight, 1e-5), &x, 3);
            assert!(max_diff(&y, &want_y) < 1e-5, "forward {rows}×{width}");
            assert!(
                max_diff(&dx, &want_dx) < 1e-4,
                "backward {rows}×{width}: {}",
                max_diff(&dx, &want_dx)
            );
        }
    }

    #[test]
    fn a_trained_rms_norm_weight_still_gets_its_gradient() {
        let x = random(&[4, 8], 4);
        let weight = Var::from_tensor(&random(&[8], 5)).unwrap();
        let loss = rms_norm(&x, weight.as_tensor(), 1e-5)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(weight.as_tensor()).is_some());
    }

    #[test]
    fn softmax_and_its_gradient_match_the_composite() {
        for (rows, width) in [(40, 130), (2, 5)] {
            let x = random(&[2, rows, width], 6);
            let (y, dx) = value_and_grad(softmax_last_dim, &x, 7);
            let (want_y, want_dx) =
                value_and_grad(|x| candle_nn::ops::softmax(x, D::Minus1), &x, 7);
            assert!(max_diff(&y, &want_y) < 1e-6, "forward {rows}×{width}");
            assert!(
                max_diff(&dx, &want_dx) < 1e-5,
                "backward {rows}×{width}: {}",
                max_diff(&dx, &want_dx)
            );
        }
    }

    #[test]
    fn a_masked_key_gets_no_probability_and_no_gradient() {
        let mut data = vec![0.5f32, -1.0, 2.0, 0.0];
        data[3] = f32::NEG_INFINITY;
        let x = Tensor::from_vec(data, (1, 4), &Device::Cpu).unwrap();
        let (y, dx) = value_and_grad(softmax_last_dim, &x, 8);
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dx = dx.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Exactly 0, not e^-87.3: products with that would be subnormal.
        assert_eq!(y[3], 0.0);
        assert_eq!(dx[3], 0.0);
        assert!(dx.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn lora_linear_and_its_gradients_match_the_composite() {
        // 37 rows: several units and a partial one; r 8; with and without dropout, with a bias.
        let (rows, in_dim, out_dim, r) = (37, 48, 40, 8);
        let x = random(&[rows, in_dim], 11);
        let weight = random(&[out_dim, in_dim], 12);
        let bias = random(&[out_dim], 13);
        let mut state = 7u64;
        let mask = DropoutMask::from_fn(rows * in_dim, 1.0 / 0.9, || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) % 10 != 0
        });
        for (mask, bias) in [(None, None), (Some(mask), Some(&bias))] {
            let (xv, av, bv) = (
                Var::from_tensor(&x).unwrap(),
                Var::from_tensor(&random(&[r, in_dim], 14)).unwrap(),
                Var::from_tensor(&random(&[out_dim, r], 15)).unwrap(),
            );
            let weights = random(&[rows, out_dim], 16);
            let run = |fused: bool| {
                let y = if fused {
                    lora_linear(xv.as_tensor(), &weight, bias, av.as_tensor(), bv.as_tensor(), 0.25, mask.clone())
                        .unwrap()
                } else {
                    let d = match &mask {
                        Some(m) => (xv.as_tensor() * m.tensor(x.shape(), x.device()).unwrap()).unwrap(),
                        None => xv.as_tensor().clone(),
                    };
                    let base = xv.as_tensor().matmul(&weight.t().unwrap()).unwrap();
                    let base = match bias {
                        Some(b) => base.broadcast_add(b).unwrap(),
                        None => base,
                    };
                    let adapter = d
                        .matmul(&av.as_tensor().t().unwrap())
                        .unwrap()
                        .matmul(&bv.as_tensor().t().unwrap())
                        .unwrap();
                    (base + (adapter * 0.25).unwrap()).unwrap()
                };
                let grads = (&y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
                let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
                (y, g(&xv), g(&av), g(&bv))
            };
            let (got, want) = (run(true), run(false));
            let with_mask = mask.is_some();
            assert!(max_diff(&got.0, &want.0) < 1e-5, "forward (mask {with_mask})");
            for (name, g, w) in [("x", &got.1, &want.1), ("A", &got.2, &want.2), ("B", &got.3, &want.3)] {
                assert!(max_diff(g, w) < 1e-4, "d{name} (mask {with_mask}): {}", max_diff(g, w));
            }
        }
    }

    #[test]
    fn lora_linear_rejects_operands_that_do_not_fit() {
        let x = random(&[4, 8], 1);
        let err = lora_linear(&x, &random(&[6, 8], 2), None, &random(&[2, 7], 3), &random(&[6, 2], 4), 1.0, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit"), "{err}");
        let mask = DropoutMask::from_fn(5, 2.0, || true);
        let err = lora_linear(&x, &random(&[6, 8], 2), None, &random(&[2, 8], 3), &random(&[6, 2], 4), 1.0, Some(mask))
            .unwrap_err()
            .to_string();
        assert!(err.contains("dropout mask"), "{err}");
    }

    #[test]
    fn rope_and_its_gradient_match_candles_differentiable_rope() {
        // Tables longer than the sequence (the model's whole table): the first rows are used.
        let (b, h, t, d) = (2, 3, 37, 16);
        let x = random(&[b, h, t, d], 21);
        let cos = random(&[t + 5, d / 2], 22);
        let sin = random(&[t + 5, d / 2], 23);
        for interleaved in [false, true] {
            let (y, dx) = value_and_grad(|x| rope(x, &cos, &sin, interleaved), &x, 24);
            let (c, s) = (cos.narrow(0, 0, t).unwrap(), sin.narrow(0, 0, t).unwrap());
            let slow = |x: &Tensor| {
                if interleaved {
                    candle_nn::rotary_emb::rope_i_slow(x, &c, &s)
                } else {
                    candle_nn::rotary_emb::rope_slow(x, &c, &s)
                }
            };
            let (want_y, want_dx) = value_and_grad(slow, &x, 24);
            assert!(max_diff(&y, &want_y) < 1e-6, "forward (interleaved {interleaved})");
            assert!(max_diff(&dx, &want_dx) < 1e-5, "backward (interleaved {interleaved})");
        }
    }

    #[test]
    fn silu_mul_and_its_gradients_match_the_composite() {
        let (gate, up) = (random(&[37, 48], 31), random(&[37, 48], 32));
        let weights = random(&[37, 48], 33);
        let run = |fused: bool| {
            let (g, u) = (Var::from_tensor(&gate).unwrap(), Var::from_tensor(&up).unwrap());
            let y = if fused {
                silu_mul(g.as_tensor(), u.as_tensor()).unwrap()
            } else {
                (candle_nn::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap()
            };
            let grads = (&y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(g.as_tensor()).unwrap().clone(), grads.get(u.as_tensor()).unwrap().clone())
        };
        let (got, want) = (run(true), run(false));
        assert!(max_diff(&got.0, &want.0) < 1e-6);
        assert!(max_diff(&got.1, &want.1) < 1e-5, "d gate: {}", max_diff(&got.1, &want.1));
        assert!(max_diff(&got.2, &want.2) < 1e-6, "d up");
    }

    #[test]
    fn a_seeded_dropout_mask_drops_about_p_and_repeats() {
        let n = 64 * 1000 + 37;
        let mask = DropoutMask::from_seed(n, 0.1, 42);
        let values = mask.tensor(&Shape::from(n), &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        let dropped = values.iter().filter(|&&v| v == 0.0).count();
        assert!((dropped as f64 / n as f64 - 0.1).abs() < 0.005, "{dropped} of {n} dropped");
        assert!(values.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        let again = DropoutMask::from_seed(n, 0.1, 42).tensor(&Shape::from(n), &Device::Cpu).unwrap();
        assert_eq!(again.to_vec1::<f32>().unwrap(), values);
        let other = DropoutMask::from_seed(n, 0.1, 43).tensor(&Shape::from(n), &Device::Cpu).unwrap();
        assert_ne!(other.to_vec1::<f32>().unwrap(), values);
        // apply is x ⊙ mask, the tail past the last whole word included.
        let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let applied = mask.apply(&x);
        assert!(applied.iter().zip(&values).enumerate().all(|(i, (&a, &m))| a == i as f32 * m));
    }

    #[test]
    fn scaled_masked_softmax_matches_scale_add_softmax() {
        // 2 batches, 3 key heads with 2 query heads each over 5 queries, 7 keys;
        // a per-batch mask with -inf entries, and a shared one.
        let (b, g, rep, q, keys) = (2, 3, 2, 5, 7);
        let x = random(&[b, g, rep * q, keys], 41);
        for mask_batch in [b, 1] {
            let mut data: Vec<f32> = random(&[mask_batch * q * keys], 42).to_vec1().unwrap();
            for (i, v) in data.iter_mut().enumerate() {
                if i % 7 > (i / 7) % 5 + 2 {
                    *v = f32::NEG_INFINITY;
                }
            }
            let mask = Tensor::from_vec(data, (mask_batch, 1, 1, q, keys), &Device::Cpu).unwrap();
            let (y, dx) = value_and_grad(|x| scaled_masked_softmax(x, 0.125, Some(&mask)), &x, 43);
            let composite = |x: &Tensor| {
                let s = (x * 0.125)?.reshape((b, g, rep, q, keys))?.broadcast_add(&mask)?.reshape((b, g, rep * q, keys))?;
                candle_nn::ops::softmax(&s, D::Minus1)
            };
            let (want_y, want_dx) = value_and_grad(composite, &x, 43);
            assert!(max_diff(&y, &want_y) < 1e-6, "forward (mask batch {mask_batch})");
            assert!(max_diff(&dx, &want_dx) < 1e-5, "backward (mask batch {mask_batch})");
        }
    }
}
