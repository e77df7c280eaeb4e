//! CPU inference kernels for multitoken's encoder towers (CLIP, Whisper, BERT).
//!
//! Each function takes candle tensors and gives what candle's composite ops give,
//! faster on CPU: a linear layer threaded over column blocks with its bias and
//! activation fused in, and a multi-head attention that never materialises the
//! `[batch, heads, queries, keys]` score tensor. They fall back to candle's own
//! ops (the same composite the towers used before) whenever the fast path does
//! not apply: a tensor that tracks gradients (training needs candle's backward),
//! a device other than the CPU, or a dtype other than f32.
//!
//! **Architecture Invariant:** the fast path and the fallback compute the same
//! function; the tests here hold them within 1e-5 of each other.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod bf16;
pub mod cpu;
pub mod lm;
pub mod math;
pub mod pool;
pub mod quantized;
pub mod train;

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};

pub use cpu::{Activation, WeightLayout};

/// Whether the fast path may run on these tensors.
fn fast_path(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op())
}

/// The f32 data of a CPU storage from the layout's first element.
fn cpu_data<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => Ok(&cpu.as_slice::<f32>()?[layout.start_offset()..]),
        _ => candle_core::bail!("multitoken-kernels: expected a CPU tensor"),
    }
}

/// A pointer into a buffer that the pool's units write at disjoint places
/// (each unit its own rows, columns or words), so that it may cross threads.
#[derive(Clone, Copy)]
pub(crate) struct Shared<T>(pub(crate) *mut T);
// SAFETY: every use hands each unit its own region of the buffer, which the
// caller borrows mutably for the whole pool call.
unsafe impl<T> Sync for Shared<T> {}
unsafe impl<T> Send for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer `offset` elements in (a method, so that closures capture
    /// the whole `Sync` wrapper, not its raw field).
    pub(crate) fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// An output buffer for a kernel that writes every element: zero-filling it
/// first was 2% of a CLIP forward (a memset of every activation).
pub fn output_buffer(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut out = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { out.set_len(len) };
    out
}

/// The buffer of [`output_buffer`] once a kernel has written all of it.
///
/// # Safety
/// Every element must have been written.
pub unsafe fn assume_init(out: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: MaybeUninit<f32> has f32's layout; the caller guarantees initialisation.
    unsafe { Vec::from_raw_parts(out.as_mut_ptr().cast::<f32>(), out.len(), out.capacity()) }
}

/// `act(x W^T + b)` for `x` `[..., in]`, `weight` `[out, in]` (PyTorch's layout)
/// and `bias` `[out]`: what `candle_nn::Linear` followed by the activation gives.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    act: Activation,
) -> Result<Tensor> {
    linear_with(x, weight, WeightLayout::Rows, bias, None, act)
}

/// `x W + residual` for `x` `[..., k]` and `W` given as `[k, n]` (the columns
/// layout): a product with a weight read the other way round (`g W` of a
/// backward pass through `x Wᵀ`) on the pool, with an accumulator added in
/// (`residual`, `[..., n]`) instead of a separate sum.
pub fn linear_columns(x: &Tensor, weight: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    linear_with(x, weight, WeightLayout::Columns, None, residual, Activation::Identity)
}

/// [`linear`] with the weight in either layout (`[in, out]` for
/// [`WeightLayout::Columns`]) and an optional `residual` (`x`'s shape with the
/// output width) added before the activation.
fn linear_with(
    x: &Tensor,
    weight: &Tensor,
    layout: WeightLayout,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: Activation,
) -> Result<Tensor> {
    if let Some(residual) = residual {
        let mut all = vec![x, weight, residual];
        all.extend(bias);
        if !fast_path(&all) {
            // Training: the composite sum keeps the residual's gradient.
            let y = linear_with(x, weight, layout, bias, None, Activation::Identity)?;
            return activate_composite(y.add(residual)?, act);
        }
    }
    let mut all = vec![x, weight];
    all.extend(bias);
    if !fast_path(&all) {
        // A tracked input through a frozen weight (LoRA and projector training): the
        // kernel's forward, and a backward that gives the input's gradient only —
        // candle's matmul would also compute the weight's, which nobody reads.
        let frozen = [weight].into_iter().chain(bias).all(|t| fast_path(&[t]));
        if frozen && x.device().is_cpu() && x.dtype() == DType::F32 {
            let op = FrozenLinear {
                weight: weight.clone(),
                layout,
            };
            let y = x.contiguous()?.apply_op1(op)?;
            let y = match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            return activate_composite(y, act);
        }
        let weight = match layout {
            WeightLayout::Rows => weight.clone(),
            WeightLayout::Columns => weight.t()?,
        };
        return linear_composite(x, &weight, bias, act);
    }
    let (n, k) = match layout {
        WeightLayout::Rows => weight.dims2()?,
        WeightLayout::Columns => {
            let (k, n) = weight.dims2()?;
            (n, k)
        }
    };
    let in_dim = x.dim(D::Minus1)?;
    if in_dim != k {
        candle_core::bail!("linear: input width {in_dim} but the weight maps {k} to {n}");
    }
    if let Some(bias) = bias {
        if bias.dims() != [n] {
            candle_core::bail!(
                "linear: bias is {:?} but the layer has {n} outputs",
                bias.dims()
            );
        }
    }
    let x = x.contiguous()?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    if let Some(residual) = residual {
        if residual.dims() != dims.as_slice() {
            candle_core::bail!(
                "linear: residual is {:?} but the output is {dims:?}",
                residual.dims()
            );
        }
    }
    let weight = weight.contiguous()?;
    let bias = bias.map(Tensor::contiguous).transpose()?;
    let residual = residual.map(Tensor::contiguous).transpose()?;
    let m = x.elem_count() / k.max(1);
    let mut out = output_buffer(m * n);
    {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        let bias_guard = bias.as_ref().map(Tensor::storage_and_layout);
        let residual_guard = residual.as_ref().map(Tensor::storage_and_layout);
        let extras = cpu::LinearExtras {
            bias: match &bias_guard {
                Some((bs, bl)) => Some(cpu_data(bs, bl)?),
                None => None,
            },
            residual: match &residual_guard {
                Some((rs, rl)) => Some(cpu_data(rs, rl)?),
                None => None,
            },
        };
        let shape = cpu::LinearShape { m, k, n };
        cpu::linear(
            cpu_data(&xs, xl)?,
            cpu_data(&ws, wl)?,
            layout,
            extras,
            shape,
            act,
            &mut out,
        );
    }
    // SAFETY: cpu::linear writes every element of its output.
    let out = unsafe { assume_init(out) };
    Tensor::from_vec(out, dims, x.device())
}

/// The q, k and v projections of a self-attention: one fused product when all
/// three are frozen (only the fused weight is kept), three otherwise.
#[derive(Debug, Clone)]
pub enum QkvProjection {
    /// `[in, 3 · out]` (columns) in one layer.
    Fused {
        /// The fused layer.
        qkv: Linear,
        /// Width of each of q, k and v.
        width: usize,
    },
    /// Separate layers (trainable weights must stay the variables they are).
    Separate {
        /// Query projection.
        q: Linear,
        /// Key projection.
        k: Linear,
        /// Value projection.
        v: Linear,
    },
}

impl QkvProjection {
    /// Fuses `q`, `k` and `v` when they are frozen and of one shape.
    pub fn new(q: Linear, k: Linear, v: Linear) -> Result<Self> {
        let width = q.out_dim()?;
        Ok(match Linear::fuse(&[&q, &k, &v])? {
            Some(qkv) => QkvProjection::Fused { qkv, width },
            None => QkvProjection::Separate { q, k, v },
        })
    }

    /// `(q, k, v)` of `x` `[..., in]`; the fused form returns column views of one product.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            QkvProjection::Fused { qkv, width } => {
                let all = qkv.forward(x)?;
                let w = *width;
                Ok((
                    all.narrow(D::Minus1, 0, w)?,
                    all.narrow(D::Minus1, w, w)?,
                    all.narrow(D::Minus1, 2 * w, w)?,
                ))
            }
            QkvProjection::Separate { q, k, v } => {
                Ok((q.forward(x)?, k.forward(x)?, v.forward(x)?))
            }
        }
    }
}

/// `x W^T` through the kernel as a candle op whose backward gives the input's
/// gradient alone (the weight is frozen).
struct FrozenLinear {
    weight: Tensor,
    layout: WeightLayout,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "multitoken-frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = match self.layout {
            WeightLayout::Rows => self.weight.dims2()?,
            WeightLayout::Columns => {
                let (k, n) = self.weight.dims2()?;
                (n, k)
            }
        };
        let dims = layout.shape().dims();
        if !layout.is_contiguous() || dims.last() != Some(&k) {
            candle_core::bail!("frozen linear: input {dims:?} is not a contiguous [..., {k}]");
        }
        let x = &storage.as_slice::<f32>()?[layout.start_offset()..];
        let m = layout.shape().elem_count() / k.max(1);
        let weight = self.weight.contiguous()?;
        let (ws, wl) = weight.storage_and_layout();
        let mut out = output_buffer(m * n);
        let shape = cpu::LinearShape { m, k, n };
        cpu::linear(
            x,
            cpu_data(&ws, wl)?,
            self.layout,
            cpu::LinearExtras::default(),
            shape,
            Activation::Identity,
            &mut out,
        );
        // SAFETY: cpu::linear writes every element of its output.
        let out = unsafe { assume_init(out) };
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // d(x W^T)/dx applied to grad: grad · W, with W as [out, in] — through the
        // same kernel and pool as the forward (the weight read in the other
        // layout). candle's matmul ran it on rayon's threads while this pool's
        // worker spun beside them: four busy threads on two cores in the
        // stage-1 profile.
        if fast_path(&[grad]) {
            let flipped = match self.layout {
                WeightLayout::Rows => WeightLayout::Columns,
                WeightLayout::Columns => WeightLayout::Rows,
            };
            return linear_with(grad, &self.weight, flipped, None, None, Activation::Identity).map(Some);
        }
        let w = match self.layout {
            WeightLayout::Rows => self.weight.clone(),
            WeightLayout::Columns => self.weight.t()?,
        };
        Ok(Some(grad.broadcast_matmul(&w)?))
    }
}

/// A linear layer for the towers: `y = x W^T + b`, through the threaded kernel.
///
/// A frozen f32 CPU weight (not a training variable) is kept transposed, as
/// `[in, out]`, which the kernel packs faster; a variable is kept as it is, so
/// that training sees every update (a copy taken at load time would not).
/// Inside [`quantizing_linears`] a frozen weight is kept as Q4_1 or Q8_0 blocks
/// instead (`--quantize-towers`).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

/// How a [`Linear`] holds its weight.
#[derive(Debug, Clone)]
enum LinearWeight {
    /// f32 (or a trainable dtype) in either layout.
    Dense { weight: Tensor, layout: WeightLayout },
    /// ggml blocks, PyTorch's `[out, in]` row order.
    Quantized(std::sync::Arc<QuantizedMatrix>),
}

/// A frozen `[out, in]` weight as ggml `Q4_1` / `Q8_0` blocks, one row of blocks
/// per output.
#[derive(Debug)]
struct QuantizedMatrix {
    format: quantized::Format,
    blocks: Vec<u8>,
    out_dim: usize,
    in_dim: usize,
}

impl QuantizedMatrix {
    /// `weight` (`[out, in]`, f32) quantized as candle's `QTensor::quantize`
    /// does (the same blocks `--quantize` gives the LM's linears); `None` when
    /// a row is not whole blocks.
    fn quantize(weight: &Tensor, format: quantized::Format) -> Result<Option<Self>> {
        let (out_dim, in_dim) = weight.dims2()?;
        if in_dim % quantized::BLOCK != 0 || out_dim == 0 {
            return Ok(None);
        }
        let q = candle_core::quantized::QTensor::quantize(&weight.contiguous()?, format.ggml_dtype())?;
        let blocks = q.data()?.into_owned();
        if blocks.len() != out_dim * in_dim / quantized::BLOCK * format.block_bytes() {
            candle_core::bail!("quantizing a [{out_dim}, {in_dim}] weight gave {} bytes", blocks.len());
        }
        Ok(Some(Self { format, blocks, out_dim, in_dim }))
    }

    /// The f32 `[out, in]` matrix the blocks stand for.
    fn dequantized(&self, device: &candle_core::Device) -> Result<Tensor> {
        let w = quantized::dequantize(self.format, &self.blocks, self.out_dim, self.in_dim);
        Tensor::from_vec(w, (self.out_dim, self.in_dim), device)
    }
}

thread_local! {
    /// The block format [`Linear::new`] gives frozen weights on this thread
    /// (set by [`quantizing_linears`]).
    static QUANTIZE_LINEARS: std::cell::Cell<Option<quantized::Format>> = const { std::cell::Cell::new(None) };
}

/// Runs `build` with every frozen f32 [`Linear`] it creates on this thread kept
/// as `format` blocks (`None`: as f32, the default): how `--quantize-towers`
/// reaches the encoder towers without a parameter in each tower's loader.
/// `multitoken_core::build_modality` wraps a builder in it when the
/// `ModalityContext` asks, so a modality crate that builds its linears with
/// [`Linear`] is quantized without code of its own. Trainable weights and rows
/// that are not whole 32-weight blocks (SigLIP so400m's 4304-wide MLP input)
/// stay f32; each weight is quantized as it is read, so the tower never exists
/// in f32 all at once.
pub fn quantizing_linears<T>(format: Option<quantized::Format>, build: impl FnOnce() -> T) -> T {
    let before = QUANTIZE_LINEARS.with(|q| q.replace(format));
    let out = build();
    QUANTIZE_LINEARS.with(|q| q.set(before));
    out
}

/// From this many input rows on, a quantized weight is dequantized (on the
/// pool) for the GEMM kernel; below, the blocks are read in place.
const DEQUANTIZE_FROM_ROWS: usize = 16;

impl Linear {
    /// From PyTorch's `[out, in]` weight and an optional `[out]` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        weight.dims2()?;
        if weight.is_variable() || !fast_path(&[&weight]) {
            return Ok(Self {
                weight: LinearWeight::Dense { weight, layout: WeightLayout::Rows },
                bias,
            });
        }
        if let Some(format) = QUANTIZE_LINEARS.with(std::cell::Cell::get) {
            if let Some(q) = QuantizedMatrix::quantize(&weight, format)? {
                return Ok(Self {
                    weight: LinearWeight::Quantized(std::sync::Arc::new(q)),
                    bias,
                });
            }
        }
        Ok(Self {
            weight: LinearWeight::Dense {
                weight: weight.t()?.contiguous()?,
                layout: WeightLayout::Columns,
            },
            bias,
        })
    }

    /// Loads `weight` (`[out, in]`) and, when `with_bias`, `bias` from `vb`.
    pub fn load(
        vb: &candle_nn::VarBuilder,
        in_dim: usize,
        out_dim: usize,
        with_bias: bool,
    ) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if with_bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Self::new(weight, bias)
    }

    /// Number of outputs.
    pub fn out_dim(&self) -> Result<usize> {
        match &self.weight {
            LinearWeight::Dense { weight, layout: WeightLayout::Columns } => weight.dim(1),
            LinearWeight::Dense { weight, layout: WeightLayout::Rows } => weight.dim(0),
            LinearWeight::Quantized(q) => Ok(q.out_dim),
        }
    }

    /// Number of inputs.
    pub fn in_dim(&self) -> Result<usize> {
        match &self.weight {
            LinearWeight::Dense { weight, layout: WeightLayout::Columns } => weight.dim(0),
            LinearWeight::Dense { weight, layout: WeightLayout::Rows } => weight.dim(1),
            LinearWeight::Quantized(q) => Ok(q.in_dim),
        }
    }

    /// The block format of a quantized weight (`None`: dense).
    pub fn quantization(&self) -> Option<quantized::Format> {
        match &self.weight {
            LinearWeight::Dense { .. } => None,
            LinearWeight::Quantized(q) => Some(q.format),
        }
    }

    /// Bytes the weight takes in memory (its blocks when quantized).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense { weight, .. } => weight.elem_count() * weight.dtype().size_in_bytes(),
            LinearWeight::Quantized(q) => q.blocks.len(),
        }
    }

    /// One layer computing `layers`' outputs side by side (a fused QKV projection),
    /// when every layer is frozen and takes the same input width; `None` otherwise
    /// (variables must stay separate so that training updates them). Quantized
    /// layers of one format fuse too: their rows of blocks are concatenated.
    pub fn fuse(layers: &[&Linear]) -> Result<Option<Linear>> {
        let Some(first) = layers.first() else {
            return Ok(None);
        };
        let in_dim = first.in_dim()?;
        let bias = |layers: &[&Linear]| -> Result<Option<Tensor>> {
            if !layers.iter().any(|l| l.bias.is_some()) {
                return Ok(None);
            }
            let parts = layers
                .iter()
                .map(|l| match &l.bias {
                    Some(b) => Ok(b.clone()),
                    None => Tensor::zeros(l.out_dim()?, DType::F32, &candle_core::Device::Cpu),
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Some(Tensor::cat(&parts, 0)?))
        };
        if let LinearWeight::Quantized(q0) = &first.weight {
            let mut blocks = Vec::new();
            let mut out_dim = 0;
            for layer in layers {
                match &layer.weight {
                    LinearWeight::Quantized(q) if q.format == q0.format && q.in_dim == in_dim => {
                        blocks.extend_from_slice(&q.blocks);
                        out_dim += q.out_dim;
                    }
                    _ => return Ok(None),
                }
            }
            let q = QuantizedMatrix { format: q0.format, blocks, out_dim, in_dim };
            return Ok(Some(Linear {
                weight: LinearWeight::Quantized(std::sync::Arc::new(q)),
                bias: bias(layers)?,
            }));
        }
        let mut weights = Vec::new();
        for layer in layers {
            match &layer.weight {
                LinearWeight::Dense { weight, layout: WeightLayout::Columns } if weight.dim(0)? == in_dim => {
                    weights.push(weight)
                }
                _ => return Ok(None),
            }
        }
        let weight = Tensor::cat(&weights, 1)?;
        Ok(Some(Linear {
            weight: LinearWeight::Dense { weight, layout: WeightLayout::Columns },
            bias: bias(layers)?,
        }))
    }

    /// `act(x W^T + b)` for `x` `[..., in]`.
    pub fn forward_with(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        self.forward_full(x, None, act)
    }

    /// `residual + x W^T + b`, the sum formed inside the product (a residual
    /// connection: `x + out_proj(attn)`, `x + fc2(h)`).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.forward_full(x, Some(residual), Activation::Identity)
    }

    /// `x W^T + b`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Activation::Identity)
    }

    /// `act(x W^T + b + residual)` whatever the weight's form.
    fn forward_full(&self, x: &Tensor, residual: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        let bias = self.bias.as_ref();
        match &self.weight {
            LinearWeight::Dense { weight, layout } => linear_with(x, weight, *layout, bias, residual, act),
            LinearWeight::Quantized(q) => {
                let rows = x.elem_count() / q.in_dim.max(1);
                let few_rows = rows < DEQUANTIZE_FROM_ROWS && x.dim(D::Minus1)? == q.in_dim;
                if !few_rows || !fast_path(&[x]) {
                    // Many rows (an encoder's sequence) or a tracked input: the
                    // dequantized matrix through the GEMM kernel, one at a time.
                    let w = q.dequantized(x.device())?;
                    return linear_with(x, &w, WeightLayout::Rows, bias, residual, act);
                }
                // A few rows (a decoder step): the blocks read in place, exact
                // (the LM's 8-bit-activation mode never applies to the towers).
                let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                let mut y = vec![0f32; rows * q.out_dim];
                quantized::exact(|| quantized::matmul(q.format, &q.blocks, q.out_dim, q.in_dim, &xs, rows, &mut y));
                let mut dims = x.dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = q.out_dim;
                }
                let mut y = Tensor::from_vec(y, dims, x.device())?;
                if let Some(b) = bias {
                    y = y.broadcast_add(b)?;
                }
                if let Some(r) = residual {
                    y = (y + r)?;
                }
                activate_composite(y, act)
            }
        }
    }
}

/// The candle composite [`linear`] falls back to (differentiable).
fn linear_composite(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    act: Activation,
) -> Result<Tensor> {
    let y = x.broadcast_matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    activate_composite(y, act)
}

/// `act(y)` with candle's (differentiable) ops.
fn activate_composite(y: Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Identity => Ok(y),
        Activation::Gelu => y.gelu_erf(),
        Activation::QuickGelu => &y * candle_nn::ops::sigmoid(&(&y * 1.702)?)?,
    }
}

/// A 1-D convolution (PyTorch's `nn.Conv1d`, no dilation or groups) on
/// time-major data, `[b, time, channels]` in and out: for frozen weights an
/// im2col copy of the input times the threaded [`Linear`] with the activation
/// fused (candle's CPU conv1d ran Whisper's first convolution at ~45 GFLOP/s,
/// a fifth of what the same product gets here).
#[derive(Debug, Clone)]
pub struct Conv1d {
    /// `[out, in, kernel]` as in the checkpoint (kept for the fallback).
    weight: Tensor,
    bias: Option<Tensor>,
    /// The kernel as a linear layer over `[kernel · in]` im2col rows (tap-major),
    /// when the weight is frozen.
    unfolded: Option<Linear>,
    stride: usize,
    padding: usize,
}

impl Conv1d {
    /// From a `[out, in, kernel]` weight, an optional `[out]` bias, stride and padding.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let (out, input, kernel) = weight.dims3()?;
        if stride == 0 || kernel == 0 {
            candle_core::bail!("conv1d: stride {stride} and kernel {kernel} must be positive");
        }
        let frozen = !weight.is_variable() && fast_path(&[&weight]);
        let unfolded = if frozen {
            let taps = weight
                .permute((0, 2, 1))?
                .contiguous()?
                .reshape((out, kernel * input))?;
            Some(Linear::new(taps, bias.clone())?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            unfolded,
            stride,
            padding,
        })
    }

    /// Output length for `time` input steps.
    pub fn output_len(&self, time: usize) -> Result<usize> {
        let kernel = self.weight.dim(2)?;
        let padded = time + 2 * self.padding;
        if padded < kernel {
            candle_core::bail!(
                "conv1d: {time} steps are fewer than the kernel's {kernel} (padding {})",
                self.padding
            );
        }
        Ok((padded - kernel) / self.stride + 1)
    }

    /// `act(conv(x))` for `x` `[b, time, in]`, giving `[b, output_len(time), out]`.
    pub fn forward_time_major(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let (b, time, channels) = x.dims3()?;
        let (_, input, kernel) = self.weight.dims3()?;
        if channels != input {
            candle_core::bail!(
                "conv1d: input has {channels} channels but the weight takes {input}"
            );
        }
        let steps = self.output_len(time)?;
        let unfolded = match &self.unfolded {
            Some(unfolded) if fast_path(&[x]) => unfolded,
            _ => {
                let y = x
                    .transpose(1, 2)?
                    .conv1d(&self.weight, self.padding, self.stride, 1, 1)?;
                let y = match &self.bias {
                    Some(bias) => y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1))?)?,
                    None => y,
                };
                return activate_composite(y, act)?.transpose(1, 2)?.contiguous();
            }
        };
        let x = x.contiguous()?;
        let row = kernel * channels;
        // im2col, rows split over the pool: for Whisper's second convolution this is
        // a 1500 × 1536 matrix (9 MiB), which one thread zeroed and then filled.
        let mut cols = output_buffer(b * steps * row);
        {
            let (xs, xl) = x.storage_and_layout();
            let data = cpu_data(&xs, xl)?;
            cpu::for_each_row(b * steps, row, 64, &mut cols, |i, out_row| {
                let (batch, step) = (i / steps, i % steps);
                for (tap, dst) in out_row.chunks_exact_mut(channels).enumerate() {
                    // Input step of this tap; outside 0..time is the zero padding.
                    let src = (step * self.stride + tap)
                        .checked_sub(self.padding)
                        .filter(|&s| s < time);
                    match src {
                        Some(src) => {
                            let at = (batch * time + src) * channels;
                            for (o, &v) in dst.iter_mut().zip(&data[at..at + channels]) {
                                o.write(v);
                            }
                        }
                        None => dst.iter_mut().for_each(|o| {
                            o.write(0.0);
                        }),
                    }
                }
            });
        }
        // SAFETY: every row of `cols` was written above, padding taps included.
        let cols = unsafe { assume_init(cols) };
        let cols = Tensor::from_vec(cols, (b, steps, row), x.device())?;
        unfolded.forward_with(&cols, act)
    }
}

/// `ln(x)`, differentiable when training: candle's fused LayerNorm kernel has no
/// backward pass, so a tracked input or weight takes candle's composite one.
pub fn layer_norm(ln: &candle_nn::LayerNorm, x: &Tensor) -> Result<Tensor> {
    let Some(bias) = ln.bias() else {
        return candle_nn::Module::forward(ln, x);
    };
    if x.track_op() || ln.weight().track_op() || bias.track_op() {
        return candle_nn::ops::layer_norm_slow(x, ln.weight(), bias, ln.eps() as f32);
    }
    let width = x.dim(D::Minus1)?;
    if !fast_path(&[x, ln.weight(), bias])
        || ln.weight().dims() != [width]
        || bias.dims() != [width]
    {
        return candle_nn::Module::forward(ln, x);
    }
    let x = x.contiguous()?;
    let (weight, bias) = (ln.weight().contiguous()?, bias.contiguous()?);
    let mut out = output_buffer(x.elem_count());
    {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        let (bs, bl) = bias.storage_and_layout();
        let data = &cpu_data(&xs, xl)?[..x.elem_count()];
        let (gamma, beta) = (&cpu_data(&ws, wl)?[..width], &cpu_data(&bs, bl)?[..width]);
        cpu::layer_norm(data, gamma, beta, ln.eps() as f32, &mut out);
    }
    // SAFETY: cpu::layer_norm writes every element of its output.
    let out = unsafe { assume_init(out) };
    Tensor::from_vec(out, x.dims(), x.device())
}

/// Multi-head attention without a causal mask: `q` `[b, tq, d]`, `k` and `v`
/// `[b, tk, d]` with `d = heads · head_dim` (views whose last axis is dense,
/// such as column slices of a fused QKV projection, need no copy); `key_bias`
/// `[b, tk]` is added to every head's scores (0 to keep a key, a large negative
/// value or `-inf` to mask it). Returns `[b, tq, d]`:
/// `softmax(scale · q k^T + key_bias) v` per head, heads side by side.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    key_bias: Option<&Tensor>,
) -> Result<Tensor> {
    attention_with(cpu::attention, q, k, v, heads, scale, key_bias)
}

/// The slice kernel of an attention.
type AttentionKernel = fn(
    cpu::Rows,
    cpu::Rows,
    cpu::Rows,
    cpu::AttentionShape,
    f32,
    Option<&[f32]>,
    &mut [MaybeUninit<f32>],
);

/// [`attention`] through `kernel` on the fast path (the tests run each kernel).
fn attention_with(
    kernel: AttentionKernel,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    key_bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, tq, d) = q.dims3()?;
    let (kb, tk, kd) = k.dims3()?;
    if kb != b || kd != d || v.dims() != k.dims() || heads == 0 || d % heads != 0 {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} with {heads} heads do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if let Some(bias) = key_bias {
        if bias.dims() != [b, tk] {
            candle_core::bail!(
                "attention: key bias is {:?}, expected [{b}, {tk}]",
                bias.dims()
            );
        }
    }
    let mut all = vec![q, k, v];
    all.extend(key_bias);
    if !fast_path(&all) {
        return attention_composite(q, k, v, heads, scale, key_bias);
    }
    // Rows may be strided (views into a fused projection) but each row must be dense.
    let dense_rows = |t: &Tensor| -> Result<Tensor> {
        if t.stride()[2] == 1 {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    let (q, k, v) = (dense_rows(q)?, dense_rows(k)?, dense_rows(v)?);
    let key_bias = key_bias.map(Tensor::contiguous).transpose()?;
    let mut out = output_buffer(b * tq * d);
    {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let rows = |data: &'_ Storage, layout: &Layout| -> Result<(usize, usize)> {
            let _ = cpu_data(data, layout)?;
            Ok((layout.stride()[1], layout.stride()[0]))
        };
        let (q_rs, q_bs) = rows(&qs, ql)?;
        let (k_rs, k_bs) = rows(&ks, kl)?;
        let (v_rs, v_bs) = rows(&vs, vl)?;
        let bias_guard = key_bias.as_ref().map(Tensor::storage_and_layout);
        let bias_data = match &bias_guard {
            Some((bs, bl)) => Some(cpu_data(bs, bl)?),
            None => None,
        };
        let operand = |data, row_stride, batch_stride| cpu::Rows {
            data,
            row_stride,
            batch_stride,
        };
        kernel(
            operand(cpu_data(&qs, ql)?, q_rs, q_bs),
            operand(cpu_data(&ks, kl)?, k_rs, k_bs),
            operand(cpu_data(&vs, vl)?, v_rs, v_bs),
            cpu::AttentionShape {
                batch: b,
                queries: tq,
                keys: tk,
                heads,
                head_dim: d / heads,
            },
            scale as f32,
            bias_data,
            &mut out,
        );
    }
    // SAFETY: every attention kernel writes every element of its output.
    let out = unsafe { assume_init(out) };
    Tensor::from_vec(out, (b, tq, d), q.device())
}

/// The candle composite [`attention`] falls back to (differentiable).
fn attention_composite(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    key_bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, tq, d) = q.dims3()?;
    let split = |t: &Tensor| -> Result<Tensor> {
        let (b, t_len, _) = t.dims3()?;
        t.reshape((b, t_len, heads, d / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (qh, kh, vh) = (split(&(q * scale)?)?, split(k)?, split(v)?);
    let mut scores = qh.matmul(&kh.t()?)?;
    if let Some(bias) = key_bias {
        scores = scores.broadcast_add(&bias.unsqueeze(1)?.unsqueeze(1)?)?;
    }
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    probs.matmul(&vh)?.transpose(1, 2)?.reshape((b, tq, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic values in [-1, 1) (the `train` tests use it too).
    pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
        // A small LCG keeps the tests deterministic without a seeded candle RNG.
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// The largest absolute difference of two tensors of one shape.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn linear_matches_candle_for_every_activation_and_odd_sizes() {
        for (shape, n, seed) in [
            (vec![7, 33], 45, 1),
            (vec![3, 50, 768], 768, 2),
            (vec![2, 400, 64], 300, 3),
            (vec![1500, 40], 8, 4),
        ] {
            let k = *shape.last().unwrap();
            let x = random(&shape, seed);
            let w = random(&[n, k], seed + 10);
            let b = random(&[n], seed + 20);
            for act in [
                Activation::Identity,
                Activation::Gelu,
                Activation::QuickGelu,
            ] {
                for bias in [None, Some(&b)] {
                    let fast = linear(&x, &w, bias, act).unwrap();
                    let want = linear_composite(&x, &w, bias, act).unwrap();
                    let diff = max_diff(&fast, &want);
                    assert!(
                        diff < 1e-5 * (k as f32).sqrt(),
                        "{shape:?}x[{n},{k}] {act:?} bias {}: {diff}",
                        bias.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn a_residual_folded_into_the_product_equals_the_separate_sum() {
        for (shape, n, seed) in [
            (vec![7, 33], 45, 31),
            (vec![2, 50, 96], 96, 32),
            (vec![400, 64], 256, 33),
        ] {
            let k = *shape.last().unwrap();
            let x = random(&shape, seed);
            let mut out_shape = shape.clone();
            *out_shape.last_mut().unwrap() = n;
            let residual = random(&out_shape, seed + 1);
            for bias in [None, Some(random(&[n], seed + 2))] {
                let layer = Linear::new(random(&[n, k], seed + 3), bias).unwrap();
                let fused = layer.forward_residual(&x, &residual).unwrap();
                let want = (layer.forward(&x).unwrap() + &residual).unwrap();
                assert!(
                    max_diff(&fused, &want) < 1e-5,
                    "{shape:?}x[{n},{k}]: {}",
                    max_diff(&fused, &want)
                );
            }
            let wrong = random(&[3, n], seed);
            let layer = Linear::new(random(&[n, k], seed + 3), None).unwrap();
            assert!(
                layer.forward_residual(&x, &wrong).is_err(),
                "a residual of another shape is refused"
            );
        }
        // Training: a tracked residual keeps its gradient.
        let residual = Var::from_tensor(&random(&[4, 8], 40)).unwrap();
        let layer = Linear::new(random(&[8, 16], 41), None).unwrap();
        let y = layer
            .forward_residual(&random(&[4, 16], 42), residual.as_tensor())
            .unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(residual.as_tensor()).is_some());
    }

    #[test]
    fn layer_norm_matches_candle_on_odd_widths_and_large_means() {
        for (rows, width, offset, seed) in [
            (1, 1, 0.0, 50),
            (37, 768, 0.0, 51),
            (5, 45, 100.0, 52),
            (300, 64, -3.0, 53),
        ] {
            let x = (random(&[rows, width], seed) * 4.0)
                .unwrap()
                .affine(1.0, offset)
                .unwrap();
            let gamma = random(&[width], seed + 1);
            let beta = random(&[width], seed + 2);
            let ln = candle_nn::LayerNorm::new(gamma.clone(), beta.clone(), 1e-5);
            let fast = layer_norm(&ln, &x).unwrap();
            let want = candle_nn::ops::layer_norm_slow(&x, &gamma, &beta, 1e-5).unwrap();
            let tol = 1e-5 * (1.0 + offset.abs() as f32 / 4.0);
            assert!(
                max_diff(&fast, &want) < tol,
                "{rows}x{width} offset {offset}: {}",
                max_diff(&fast, &want)
            );
        }
    }

    #[test]
    fn linear_on_a_tracked_input_falls_back_and_has_gradients() {
        let x = Var::from_tensor(&random(&[4, 16], 5)).unwrap();
        let w = random(&[8, 16], 6);
        let y = linear(x.as_tensor(), &w, None, Activation::Gelu).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(x.as_tensor()).is_some(),
            "the fallback must be differentiable"
        );
        assert!(
            max_diff(
                &y,
                &linear(&x.as_tensor().detach(), &w, None, Activation::Gelu).unwrap()
            ) < 1e-5
        );
    }

    #[test]
    fn quantized_towers_compute_with_their_blocks_and_keep_what_cannot_be_blocks() {
        let (w, b) = (random(&[48, 64], 11), random(&[48], 12));
        for format in [quantized::Format::Q4_1, quantized::Format::Q8_0] {
            let layer = quantizing_linears(Some(format), || Linear::new(w.clone(), Some(b.clone()))).unwrap();
            let LinearWeight::Quantized(q) = &layer.weight else {
                panic!("{format:?}: a frozen 64-wide weight must be quantized");
            };
            assert_eq!(layer.quantization(), Some(format));
            assert!(layer.weight_bytes() * 3 < w.elem_count() * 4, "blocks take under a third of f32");
            // What the layer computes is the dequantized matrix's product, for a
            // decoder step (blocks read in place) and an encoder's sequence.
            let dense = Linear::new(q.dequantized(&Device::Cpu).unwrap(), Some(b.clone())).unwrap();
            assert!(max_diff(&q.dequantized(&Device::Cpu).unwrap(), &w) > 0.0, "{format:?} rounds the weights");
            for rows in [1, 3, 40] {
                let x = random(&[rows, 64], 13 + rows as u64);
                let r = random(&[rows, 48], 14);
                let got = layer.forward_with(&x, Activation::Gelu).unwrap();
                let want = dense.forward_with(&x, Activation::Gelu).unwrap();
                assert!(max_diff(&got, &want) < 1e-5, "{format:?} x {rows} rows: {}", max_diff(&got, &want));
                let got = layer.forward_residual(&x, &r).unwrap();
                assert!(max_diff(&got, &dense.forward_residual(&x, &r).unwrap()) < 1e-5);
            }
            // Fused q/k/v of quantized layers are their rows of blocks side by side.
            let (wk, wv) = (random(&[48, 64], 15), random(&[48, 64], 16));
            let [q_l, k_l, v_l] = [&w, &wk, &wv].map(|w| quantizing_linears(Some(format), || Linear::new(w.clone(), None)).unwrap());
            let qkv = QkvProjection::new(q_l.clone(), k_l.clone(), v_l.clone()).unwrap();
            assert!(matches!(qkv, QkvProjection::Fused { .. }));
            let x = random(&[20, 64], 17);
            let (q_out, k_out, v_out) = qkv.forward(&x).unwrap();
            for (fused, alone) in [(q_out, &q_l), (k_out, &k_l), (v_out, &v_l)] {
                assert!(max_diff(&fused.contiguous().unwrap(), &alone.forward(&x).unwrap()) < 1e-5);
            }
        }
        // Rows that are not whole 32-weight blocks, and training variables, stay f32.
        let odd = quantizing_linears(Some(quantized::Format::Q4_1), || Linear::new(random(&[8, 40], 18), None)).unwrap();
        assert_eq!(odd.quantization(), None);
        let var = Var::from_tensor(&w).unwrap();
        let trainable = quantizing_linears(Some(quantized::Format::Q4_1), || Linear::new(var.as_tensor().clone(), None)).unwrap();
        assert_eq!(trainable.quantization(), None);
        // The scope ends with the closure.
        assert_eq!(Linear::new(w.clone(), None).unwrap().quantization(), None);
    }

    #[test]
    fn a_frozen_layer_is_kept_transposed_and_a_variable_is_not() {
        let (w, b, x) = (
            random(&[24, 40], 1),
            random(&[24], 2),
            random(&[3, 5, 40], 3),
        );
        let frozen = Linear::new(w.clone(), Some(b.clone())).unwrap();
        assert!(matches!(frozen.weight, LinearWeight::Dense { layout: WeightLayout::Columns, .. }));
        let var = Var::from_tensor(&w).unwrap();
        let trainable = Linear::new(var.as_tensor().clone(), Some(b.clone())).unwrap();
        assert!(matches!(trainable.weight, LinearWeight::Dense { layout: WeightLayout::Rows, .. }));
        let want = linear_composite(&x, &w, Some(&b), Activation::Gelu).unwrap();
        for layer in [&frozen, &trainable] {
            assert!(max_diff(&layer.forward_with(&x, Activation::Gelu).unwrap(), &want) < 1e-5);
        }
        // Training sees an update to the variable.
        var.set(&w.zeros_like().unwrap()).unwrap();
        let after = trainable.forward(&x).unwrap();
        assert!(max_diff(&after, &b.broadcast_as((3, 5, 24)).unwrap()) < 1e-6);
    }

    #[test]
    fn fused_frozen_layers_give_each_layers_output_side_by_side() {
        let x = random(&[2, 7, 32], 1);
        let layers: Vec<Linear> = (0..3)
            .map(|i| {
                Linear::new(
                    random(&[16, 32], 10 + i),
                    (i != 1).then(|| random(&[16], 20 + i)),
                )
                .unwrap()
            })
            .collect();
        let refs: Vec<&Linear> = layers.iter().collect();
        let fused = Linear::fuse(&refs).unwrap().unwrap().forward(&x).unwrap();
        for (i, layer) in layers.iter().enumerate() {
            assert!(
                max_diff(
                    &fused.narrow(2, 16 * i, 16).unwrap(),
                    &layer.forward(&x).unwrap()
                ) < 1e-6
            );
        }
        let var = Linear::new(
            Var::from_tensor(&random(&[16, 32], 3))
                .unwrap()
                .as_tensor()
                .clone(),
            None,
        )
        .unwrap();
        assert!(
            Linear::fuse(&[&layers[0], &var]).unwrap().is_none(),
            "a variable must not be fused"
        );
        let [q, k, v] = [0, 1, 2].map(|i| layers[i].clone());
        let projection = QkvProjection::new(q, k, v).unwrap();
        assert!(matches!(projection, QkvProjection::Fused { width: 16, .. }));
        let (q, k, v) = projection.forward(&x).unwrap();
        for (got, layer) in [q, k, v].iter().zip(&layers) {
            assert!(max_diff(got, &layer.forward(&x).unwrap()) < 1e-6);
        }
    }

    #[test]
    fn conv1d_matches_candle_with_stride_padding_and_activation() {
        for (stride, padding, time) in [(1, 1, 17), (2, 1, 20), (2, 0, 9), (1, 2, 5)] {
            let x = random(&[2, time, 6], 1);
            let w = random(&[10, 6, 3], 2);
            let b = random(&[10], 3);
            let conv = Conv1d::new(w.clone(), Some(b.clone()), stride, padding).unwrap();
            assert!(conv.unfolded.is_some());
            let fast = conv.forward_time_major(&x, Activation::Gelu).unwrap();
            let want = x
                .transpose(1, 2)
                .unwrap()
                .conv1d(&w, padding, stride, 1, 1)
                .unwrap();
            let want = want
                .broadcast_add(&b.reshape((1, 10, 1)).unwrap())
                .unwrap()
                .gelu_erf()
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            assert!(
                max_diff(&fast, &want) < 1e-5,
                "stride {stride} padding {padding}"
            );
            // A variable weight takes candle's conv and gives the same.
            let var = Var::from_tensor(&w).unwrap();
            let trainable =
                Conv1d::new(var.as_tensor().clone(), Some(b.clone()), stride, padding).unwrap();
            assert!(trainable.unfolded.is_none());
            assert!(
                max_diff(
                    &trainable.forward_time_major(&x, Activation::Gelu).unwrap(),
                    &want
                ) < 1e-5
            );
        }
        let conv = Conv1d::new(random(&[4, 3, 3], 1), None, 1, 0).unwrap();
        assert!(
            conv.forward_time_major(&random(&[1, 2, 3], 2), Activation::Identity)
                .is_err(),
            "too short"
        );
        assert!(
            conv.forward_time_major(&random(&[1, 5, 4], 2), Activation::Identity)
                .is_err(),
            "channels"
        );
    }

    #[test]
    fn a_tracked_input_through_a_frozen_layer_gets_candles_gradient() {
        let x0 = random(&[2, 5, 24], 1);
        let (w, b) = (random(&[12, 24], 2), random(&[12], 3));
        for layer in [
            Linear::new(w.clone(), Some(b.clone())).unwrap(),
            Linear {
                weight: LinearWeight::Dense { weight: w.clone(), layout: WeightLayout::Rows },
                bias: Some(b.clone()),
            },
        ] {
            for act in [Activation::Identity, Activation::Gelu] {
                let x = Var::from_tensor(&x0).unwrap();
                let y = layer.forward_with(x.as_tensor(), act).unwrap();
                let loss = (&y * &y).unwrap().sum_all().unwrap();
                let ours = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
                let x2 = Var::from_tensor(&x0).unwrap();
                let y2 = linear_composite(x2.as_tensor(), &w, Some(&b), act).unwrap();
                let want = (&y2 * &y2)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
                    .get(x2.as_tensor())
                    .unwrap()
                    .clone();
                assert!(max_diff(&y, &y2) < 1e-5);
                assert!(
                    max_diff(&ours, &want) < 1e-4,
                    "{act:?}: {}",
                    max_diff(&ours, &want)
                );
            }
        }
    }

    #[test]
    fn linear_refuses_a_width_mismatch() {
        let err = linear(
            &random(&[2, 5], 1),
            &random(&[3, 4], 2),
            None,
            Activation::Identity,
        )
        .unwrap_err();
        assert!(err.to_string().contains("input width 5"), "{err}");
    }

    #[test]
    fn attention_matches_candle_with_masks_blocks_and_strided_views() {
        // Both kernels: the AVX-512 tiles (head widths that are multiples of 16, on a
        // CPU that has it) and gemm's (every CPU; the only one for other widths).
        let kernels: [(&str, AttentionKernel); 2] = [
            ("dispatched", cpu::attention),
            ("gemm", cpu::attention_gemm),
        ];
        // Widths of 1 to 5 vectors (the ·V tile's column chunks of 4 and the rest)
        // and one that is not a whole number of vectors.
        for (heads, hd) in [(3, 16), (2, 64), (1, 80), (2, 24)] {
            let d = heads * hd;
            // 600 queries span several query blocks of either kernel, the last one
            // partial; 9 keys are less than one vector, 130 more than a ·V key
            // chunk; 70 and 129 queries leave partial 6-row tiles.
            for (b, tq, tk) in [(2, 5, 9), (2, 70, 130), (1, 129, 64), (1, 600, 600)] {
                // q, k, v as column views of one fused [b, t, 3d] projection when tq == tk.
                let (q, k, v) = if tq == tk {
                    let qkv = random(&[b, tq, 3 * d], 7);
                    (
                        qkv.narrow(2, 0, d).unwrap(),
                        qkv.narrow(2, d, d).unwrap(),
                        qkv.narrow(2, 2 * d, d).unwrap(),
                    )
                } else {
                    (
                        random(&[b, tq, d], 8),
                        random(&[b, tk, d], 9),
                        random(&[b, tk, d], 10),
                    )
                };
                // The last two keys of batch 0 are padding; with two batches, every key
                // of batch 1 is masked, so its rows come out as zeros.
                let mut bias = vec![0f32; b * tk];
                bias[tk - 2] = f32::MIN;
                bias[tk - 1] = f32::NEG_INFINITY;
                if b > 1 {
                    bias[tk..2 * tk].fill(f32::NEG_INFINITY);
                }
                let bias = Tensor::from_vec(bias, (b, tk), &Device::Cpu).unwrap();
                let scale = (hd as f64).powf(-0.5);
                for key_bias in [None, Some(&bias)] {
                    let want = attention_composite(&q, &k, &v, heads, scale, key_bias).unwrap();
                    // candle's softmax of an all -inf row is NaN; ours is 0.
                    let want = if key_bias.is_some() && b > 1 {
                        Tensor::cat(
                            &[
                                &want.narrow(0, 0, 1).unwrap(),
                                &want.narrow(0, 1, 1).unwrap().zeros_like().unwrap(),
                            ],
                            0,
                        )
                        .unwrap()
                    } else {
                        want
                    };
                    for (name, kernel) in kernels {
                        let fast =
                            attention_with(kernel, &q, &k, &v, heads, scale, key_bias).unwrap();
                        let diff = max_diff(&fast, &want);
                        assert!(
                            diff < 1e-5,
                            "{name}: {heads}×{hd}, b {b} tq {tq} tk {tk} mask {}: {diff}",
                            key_bias.is_some()
                        );
                    }
                }
            }
        }
        let (q, k, v) = (
            random(&[2, 4, 48], 1),
            random(&[2, 6, 48], 2),
            random(&[2, 6, 48], 3),
        );
        let qkv = Tensor::cat(
            &[
                &random(&[2, 6, 48], 4),
                &random(&[2, 6, 48], 5),
                &random(&[2, 6, 48], 6),
            ],
            2,
        )
        .unwrap();
        let self_attention = attention(
            &qkv.narrow(2, 0, 48).unwrap(),
            &qkv.narrow(2, 48, 48).unwrap(),
            &qkv.narrow(2, 96, 48).unwrap(),
            4,
            0.3,
            None,
        )
        .unwrap();
        assert_eq!(self_attention.dims(), &[2, 6, 48]);
        assert_eq!(
            attention(&q, &k, &v, 4, 0.3, None).unwrap().dims(),
            &[2, 4, 48]
        );
    }

    #[test]
    fn attention_over_no_keys_is_zeros() {
        let (q, kv) = (random(&[1, 3, 32], 13), random(&[1, 0, 32], 14));
        let out = attention(&q, &kv, &kv, 2, 0.25, None).unwrap();
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0; 96]
        );
    }

    #[test]
    fn attention_gives_the_same_answer_twice_and_per_call() {
        // Each pool thread keeps the last head it packed; a second call on other
        // data with the same shape must not reuse it.
        let (a, b) = (random(&[1, 100, 128], 11), random(&[1, 100, 128], 12));
        let first = attention(&a, &a, &a, 2, 0.125, None).unwrap();
        let other = attention(&b, &b, &b, 2, 0.125, None).unwrap();
        let again = attention(&a, &a, &a, 2, 0.125, None).unwrap();
        assert_eq!(max_diff(&first, &again), 0.0);
        assert!(max_diff(&first, &other) > 1e-3);
        assert!(
            max_diff(
                &other,
                &attention_composite(&b, &b, &b, 2, 0.125, None).unwrap()
            ) < 1e-5
        );
    }

    #[test]
    fn attention_refuses_shapes_that_do_not_fit() {
        let err = attention(
            &random(&[1, 4, 48], 1),
            &random(&[1, 6, 32], 2),
            &random(&[1, 6, 32], 3),
            4,
            1.0,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    }
}
