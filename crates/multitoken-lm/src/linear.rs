//! The linear layer every projection of every family goes through.
//!
//! Quantization is a choice of this layer, not a second copy of each model: a
//! weight is either a dense tensor or a quantized matrix kept in its GGUF blocks.
//! A LoRA adapter ([`crate::lora::LoraLayer`]) may be attached for training; a
//! layer without one pays a single `Option` check.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use multitoken_kernels::bf16::Bf16Matrix;
use multitoken_kernels::quantized::Format;
use crate::lora::LoraLayer;
use crate::Result;

/// A linear weight: dense (`[out, in]`, as in PyTorch) or quantized.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// A dense `[out, in]` matrix in the model dtype.
    Dense(Tensor),
    /// A quantized matrix multiplied without dequantizing the whole of it.
    Quantized(Arc<QMatMul>),
    /// A bf16 matrix multiplied with f32 activations rounded to bf16, sums in
    /// f32 (`--dtype bf16` on the CPU; [`multitoken_kernels::bf16`]).
    Bf16(Arc<Bf16Matrix>),
}

/// `y = x W^T + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    in_dim: usize,
    out_dim: usize,
    lora: Option<Arc<LoraLayer>>,
    /// A quantized weight whose prefill-sized products run in bf16 (AMX):
    /// `--dtype bf16` on the CPU ([`Linear::with_bf16_products`]).
    bf16_products: bool,
}

impl Linear {
    /// A linear layer from a dense `[out, in]` weight.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        Ok(Self { weight: LinearWeight::Dense(weight), bias, in_dim, out_dim, lora: None, bf16_products: false })
    }

    /// A linear layer from a quantized matrix of logical shape `[out, in]`.
    pub fn quantized(weight: QMatMul, in_dim: usize, out_dim: usize, bias: Option<Tensor>) -> Self {
        Self { weight: LinearWeight::Quantized(Arc::new(weight)), bias, in_dim, out_dim, lora: None, bf16_products: false }
    }

    /// A linear layer whose weight is kept in bf16 and multiplied by f32
    /// activations ([`LinearWeight::Bf16`]).
    pub fn bf16(weight: Bf16Matrix, bias: Option<Tensor>) -> Self {
        let (out_dim, in_dim) = (weight.out_dim(), weight.in_dim());
        Self { weight: LinearWeight::Bf16(Arc::new(weight)), bias, in_dim, out_dim, lora: None, bf16_products: false }
    }

    /// Whether this layer's prefill products run in bf16 (`--dtype bf16` on
    /// the CPU: a bf16 weight, or a quantized one with
    /// [`Linear::with_bf16_products`]); the attention beside it follows.
    pub fn computes_in_bf16(&self) -> bool {
        self.bf16_products || matches!(self.weight, LinearWeight::Bf16(_))
    }

    /// Lets a quantized weight's products of many rows (a prefill) run in
    /// bf16 (AMX, or AVX-512 BF16's GEMM), its blocks dequantized to bf16 for
    /// each product, instead of the exact dequantize-to-f32 GEMM (`--dtype
    /// bf16` on the CPU): SmolLM2 Q4_1 / Q8_0 prefill 1.38× on the Zen 5 dev
    /// VM. Decode-sized products keep the quantized kernels; nothing changes
    /// on a CPU without AVX-512 BF16.
    pub fn with_bf16_products(mut self) -> Self {
        self.bf16_products = true;
        self
    }

    /// The weight.
    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// Whether the weight is kept in bf16 ([`LinearWeight::Bf16`]).
    pub fn is_bf16(&self) -> bool {
        matches!(self.weight, LinearWeight::Bf16(_))
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Attaches (or with `None` removes) a LoRA adapter; fails when its shapes
    /// do not fit (`A: [r, in]`, `B: [out, r]`).
    pub fn set_lora(&mut self, lora: Option<LoraLayer>) -> Result<()> {
        if let Some(l) = &lora {
            let (r, a_in) = l.a.dims2()?;
            let (b_out, b_r) = l.b.dims2()?;
            if a_in != self.in_dim || b_out != self.out_dim || b_r != r {
                return Err(crate::Error::Msg(format!(
                    "LoRA A {:?} / B {:?} do not fit a [{}, {}] linear",
                    l.a.dims(),
                    l.b.dims(),
                    self.out_dim,
                    self.in_dim
                )));
            }
        }
        self.lora = lora.map(Arc::new);
        Ok(())
    }

    /// The attached LoRA adapter, if any.
    pub fn lora(&self) -> Option<&LoraLayer> {
        self.lora.as_deref()
    }

    /// Apply to `x` of shape `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = crate::profile::scope(crate::profile::Part::Matmul);
        let dims = x.dims().to_vec();
        let rows: usize = leading_rows(&dims);
        if let (Some(lora), LinearWeight::Dense(w)) = (&self.lora, &self.weight) {
            // A LoRA adapter being trained: one op that keeps only its output
            // for the backward pass (the composite kept six activations).
            if lora.a.track_op() && x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
                let flat = x.reshape((rows, self.in_dim))?;
                let mask = lora.dropout_mask(rows * self.in_dim)?;
                let y = multitoken_kernels::train::lora_linear(&flat, w, self.bias.as_ref(), &lora.a, &lora.b, lora.scale, mask)?;
                let out_dims = with_last_dim(&dims, self.out_dim);
                return Ok(y.reshape(out_dims)?);
            }
        }
        if let LinearWeight::Quantized(q) = &self.weight {
            let blocks = matches!(q.as_ref(), QMatMul::QTensor(_));
            let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
            // A LoRA adapter being trained over a quantized base (QLoRA): one op
            // that keeps only its inputs for the backward pass, as the dense path.
            if let Some(lora) = self.lora.as_ref().filter(|l| l.a.track_op() && blocks && cpu_f32) {
                let flat = x.reshape((rows, self.in_dim))?;
                let mask = lora.dropout_mask(rows * self.in_dim)?;
                let y = crate::quantize::qlora_linear(&flat, q, self.bias.as_ref(), &lora.a, &lora.b, lora.scale, mask)?;
                let out_dims = with_last_dim(&dims, self.out_dim);
                return Ok(y.reshape(out_dims)?);
            }
            // Under autograd without an adapter here (a quantized head, a frozen
            // layer): the product as an op whose backward reads the blocks, so
            // gradients reach earlier layers.
            if x.track_op() && blocks && x.device().is_cpu() && x.dtype() == DType::F32 {
                let flat = x.reshape((rows, self.in_dim))?;
                let y = crate::quantize::quantized_base(&flat, q, self.in_dim, self.out_dim)?;
                let out_dims = with_last_dim(&dims, self.out_dim);
                return self.add_bias_and_lora(y.reshape(out_dims)?, x);
            }
        }
        let y = match &self.weight {
            LinearWeight::Dense(w) => self.dense_matmul(x, w, &dims, rows)?,
            LinearWeight::Bf16(w) => self.bf16_matmul(x, w, &dims, rows, false)?,
            // Many rows (a prefill): candle's quantized kernel does not scale with
            // rows, while dequantizing once and running one f32 GEMM does (measured
            // 13-25 ms vs 96 ms for SmolLM2's up_proj on 512 rows).
            LinearWeight::Quantized(q) if rows >= DEQUANTIZE_FROM_ROWS => match q.as_ref() {
                QMatMul::QTensor(qt) => match self.bf16_prefill(qt, x) {
                    Some(format) => {
                        let data = self.own_blocks(format, qt)?;
                        let packed = Bf16Matrix::from_blocks(format, &data, self.out_dim, self.in_dim)
                            .ok_or_else(|| crate::Error::Msg(format!("{format:?} weight does not fit [{}, {}]", self.out_dim, self.in_dim)))?;
                        self.bf16_matmul(x, &packed, &dims, rows, false)?
                    }
                    None => {
                        let w = match own_kernel_format(qt, x) {
                            Some(format) => self.own_dequantized(format, qt, x.device())?,
                            None => qt.dequantize(x.device())?.to_dtype(x.dtype())?,
                        };
                        self.dense_matmul(x, &w, &dims, rows)?
                    }
                },
                other => other.forward(x)?,
            },
            LinearWeight::Quantized(q) => match q.as_ref() {
                QMatMul::QTensor(qt) => match own_kernel_format(qt, x) {
                    Some(format) => self.own_quantized_matmul(format, qt, x, &dims, rows)?,
                    None => q.forward(x)?,
                },
                other => other.forward(x)?,
            },
        };
        self.add_bias_and_lora(y, x)
    }

    /// [`Linear::forward`] for `x` `[rows, 1, in]`, one position of each of
    /// several independent sequences (a batched decode step), where each row's
    /// output is bit for bit what `forward` gives that row alone (`[1, 1, in]`).
    ///
    /// `forward` picks its kernel by row count (a GEMM from 16 rows, a
    /// dequantized GEMM for quantized weights from 32), and a GEMM sums in another
    /// order than the matrix-vector product a lone decode step runs. Here a
    /// dense f32 weight goes through [`multitoken_kernels::lm::linear_each_row`]
    /// and a Q4_1 / Q8_0 weight through our quantized kernel for any row count
    /// (both compute each output as one dot product in a fixed order); anything
    /// else (a LoRA adapter, other dtypes and formats) runs row by row through
    /// `forward`, equal by construction.
    pub fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = crate::profile::scope(crate::profile::Part::Matmul);
        let dims = x.dims().to_vec();
        let rows: usize = leading_rows(&dims);
        if self.lora.is_none() && !x.track_op() && rows > 0 {
            let out_dims = with_last_dim(&dims, self.out_dim);
            match &self.weight {
                LinearWeight::Dense(w) => {
                    if let Some(y) = multitoken_kernels::lm::linear_each_row(&x.reshape((rows, self.in_dim))?, w)? {
                        return self.add_bias_and_lora(y.reshape(out_dims)?, x);
                    }
                }
                LinearWeight::Bf16(w) => {
                    let y = self.bf16_matmul(x, w, &dims, rows, true)?;
                    return self.add_bias_and_lora(y, x);
                }
                LinearWeight::Quantized(q) => {
                    if let QMatMul::QTensor(qt) = q.as_ref() {
                        if let Some(format) = own_kernel_format(qt, x) {
                            let y = self.own_quantized_matmul(format, qt, x, &dims, rows)?;
                            return self.add_bias_and_lora(y, x);
                        }
                    }
                }
            }
        }
        each_row(x, |row| self.forward(row))
    }

    /// [`Linear::forward`], or [`Linear::forward_rows`] when `batched` (a batched
    /// decode step): what the model's layers pick between.
    pub(crate) fn forward_as(&self, x: &Tensor, batched: bool) -> Result<Tensor> {
        if batched {
            self.forward_rows(x)
        } else {
            self.forward(x)
        }
    }

    /// The blocks of this layer when its product of `x` (`rows` rows) may run
    /// together with others ([`Linear::products_together`]): a Q4_1 / Q8_0
    /// weight through our kernels, no adapter, an input that tracks no
    /// gradient, and a row count for which [`Linear::forward`] (`batched`
    /// false) or [`Linear::forward_rows`] (true) takes that kernel.
    fn blocks_for_together<'a>(&'a self, x: &Tensor, rows: usize, batched: bool) -> Option<(Format, &'a QTensor)> {
        let rows_fit = rows > 0 && (batched || rows < DEQUANTIZE_FROM_ROWS);
        if self.lora.is_some() || x.track_op() || !rows_fit || x.dims().last() != Some(&self.in_dim) {
            return None;
        }
        match &self.weight {
            LinearWeight::Quantized(q) => match q.as_ref() {
                QMatMul::QTensor(qt) => own_kernel_format(qt, x).map(|format| (format, qt.as_ref())),
                _ => None,
            },
            LinearWeight::Dense(_) | LinearWeight::Bf16(_) => None,
        }
    }

    /// `layers`' products of one `x` in one call to the kernels' pool (a decode
    /// step's q / k / v), each exactly what its own [`Linear::forward`]
    /// (`batched`: [`Linear::forward_rows`]) gives; `None` when any of them
    /// would take another path, and the caller runs them one by one.
    pub(crate) fn products_together(layers: &[&Linear], x: &Tensor, batched: bool) -> Result<Option<Vec<Tensor>>> {
        let _profile = crate::profile::scope(crate::profile::Part::Matmul);
        let dims = x.dims().to_vec();
        let rows: usize = leading_rows(&dims);
        if let Some(ys) = Self::dense_together(layers, x, rows, batched)? {
            let mut tensors = Vec::with_capacity(layers.len());
            for (l, y) in layers.iter().zip(ys) {
                tensors.push(l.add_bias_and_lora(y.reshape(with_last_dim(&dims, l.out_dim))?, x)?);
            }
            return Ok(Some(tensors));
        }
        let Some(parts) = layers.iter().map(|l| l.blocks_for_together(x, rows, batched)).collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        let data = layers.iter().zip(&parts).map(|(l, (format, qt))| l.own_blocks(*format, qt)).collect::<Result<Vec<_>>>()?;
        let weights: Vec<multitoken_kernels::quantized::Weights> = layers
            .iter()
            .zip(parts.iter().zip(&data))
            .map(|(l, ((format, _), blocks))| multitoken_kernels::quantized::Weights { format: *format, blocks, out_dim: l.out_dim })
            .collect();
        let in_dim = dims.last().copied().unwrap_or(0);
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut outs: Vec<Vec<f32>> = layers.iter().map(|l| vec![0f32; rows * l.out_dim]).collect();
        let mut ys: Vec<&mut [f32]> = outs.iter_mut().map(|y| &mut y[..]).collect();
        multitoken_kernels::quantized::matmul_many(&weights, in_dim, &xs, rows, &mut ys);
        let mut tensors = Vec::with_capacity(layers.len());
        for (l, y) in layers.iter().zip(outs) {
            let out_dims = with_last_dim(&dims, l.out_dim);
            tensors.push(l.add_bias_and_lora(Tensor::from_vec(y, out_dims, x.device())?, x)?);
        }
        Ok(Some(tensors))
    }

    /// Dense f32 `layers`' products of `x` in one pool call
    /// ([`multitoken_kernels::lm::linear_each_row_many`]), without bias: where
    /// each layer's own product would be the one-row kernel's (no adapter, an
    /// untracked input, fewer rows than the GEMM takes, or `batched`), so each
    /// value is the bits that product gives. `None` otherwise.
    fn dense_together(layers: &[&Linear], x: &Tensor, rows: usize, batched: bool) -> Result<Option<Vec<Tensor>>> {
        // `forward`'s one-row kernel: below the GEMM's rows and within gemv's.
        let one_row_kernel = rows < KERNEL_FROM_ROWS.min(multitoken_kernels::lm::GEMV_MAX_ROWS + 1);
        let rows_fit = rows > 0 && (batched || one_row_kernel);
        let Some(&in_dim) = x.dims().last() else { return Ok(None) };
        if !rows_fit || x.track_op() {
            return Ok(None);
        }
        let mut weights = Vec::with_capacity(layers.len());
        for l in layers {
            match &l.weight {
                LinearWeight::Dense(w) if l.lora.is_none() && l.in_dim == in_dim => weights.push(w),
                _ => return Ok(None),
            }
        }
        if weights.is_empty() {
            return Ok(None);
        }
        Ok(multitoken_kernels::lm::linear_each_row_many(&x.reshape((rows, in_dim))?, &weights)?)
    }

    /// `silu(gate(x)) · up(x)` in one call to the kernels' pool (a decode
    /// step's gated MLP), exactly what the two [`Linear::forward`] (`batched`:
    /// [`Linear::forward_rows`]) products and
    /// [`multitoken_kernels::train::silu_mul`] give; `None` when either layer
    /// would take another path or has a bias.
    pub(crate) fn silu_gated_together(gate: &Linear, up: &Linear, x: &Tensor, batched: bool) -> Result<Option<Tensor>> {
        let dims = x.dims().to_vec();
        let rows: usize = leading_rows(&dims);
        // Dense f32: both products in one pool call, then the same silu · up
        // as the products one by one get.
        if gate.bias.is_none() && up.bias.is_none() && gate.out_dim == up.out_dim {
            let products = {
                let _profile = crate::profile::scope(crate::profile::Part::Matmul);
                Self::dense_together(&[gate, up], x, rows, batched)?
            };
            if let Some([g, u]) = products.map(<[Tensor; 2]>::try_from).and_then(std::result::Result::ok) {
                let _profile = crate::profile::scope(crate::profile::Part::Activation);
                let out_dims = with_last_dim(&dims, gate.out_dim);
                return Ok(Some(multitoken_kernels::train::silu_mul(&g, &u)?.reshape(out_dims)?));
            }
        }
        let _profile = crate::profile::scope(crate::profile::Part::Matmul);
        let (Some((gf, gq)), Some((uf, uq))) = (gate.blocks_for_together(x, rows, batched), up.blocks_for_together(x, rows, batched)) else {
            return Ok(None);
        };
        if gate.bias.is_some() || up.bias.is_some() || gate.out_dim != up.out_dim {
            return Ok(None);
        }
        let (gd, ud) = (gate.own_blocks(gf, gq)?, up.own_blocks(uf, uq)?);
        use multitoken_kernels::quantized::Weights;
        let (gw, uw) = (Weights { format: gf, blocks: &gd, out_dim: gate.out_dim }, Weights { format: uf, blocks: &ud, out_dim: up.out_dim });
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut y = vec![0f32; rows * gate.out_dim];
        multitoken_kernels::quantized::matmul_gated(gw, uw, gate.in_dim, &xs, rows, multitoken_kernels::math::silu_times_in_place, &mut y);
        let out_dims = with_last_dim(&dims, gate.out_dim);
        Ok(Some(Tensor::from_vec(y, out_dims, x.device())?))
    }

    /// `y + b + lora(x)` for the base product `y` of `x`.
    fn add_bias_and_lora(&self, y: Tensor, x: &Tensor) -> Result<Tensor> {
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        Ok(match &self.lora {
            None => y,
            Some(lora) => (y + lora.forward(x)?)?,
        })
    }

    /// The raw blocks of a Q4_1 or Q8_0 weight, checked against its shape.
    fn own_blocks<'a>(&self, format: Format, qt: &'a QTensor) -> Result<std::borrow::Cow<'a, [u8]>> {
        let data = qt.data()?;
        let expected = self.out_dim * self.in_dim / multitoken_kernels::quantized::BLOCK * format.block_bytes();
        if data.len() != expected {
            return Err(crate::Error::Msg(format!(
                "{format:?} weight of [{}, {}] has {} bytes, expected {expected}",
                self.out_dim,
                self.in_dim,
                data.len()
            )));
        }
        Ok(data)
    }

    /// A Q4_1 or Q8_0 weight as the f32 `[out, in]` matrix candle's dequantize
    /// gives, computed on the kernels' pool ([`multitoken_kernels::quantized::dequantize`]).
    fn own_dequantized(&self, format: Format, qt: &QTensor, device: &candle_core::Device) -> Result<Tensor> {
        let data = self.own_blocks(format, qt)?;
        let w = multitoken_kernels::quantized::dequantize(format, &data, self.out_dim, self.in_dim);
        Ok(Tensor::from_vec(w, (self.out_dim, self.in_dim), device)?)
    }

    /// `x W^T` for a Q4_1 or Q8_0 weight with our kernels ([`crate::quantized`]).
    fn own_quantized_matmul(&self, format: Format, qt: &QTensor, x: &Tensor, dims: &[usize], rows: usize) -> Result<Tensor> {
        let data = self.own_blocks(format, qt)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut y = vec![0f32; rows * self.out_dim];
        multitoken_kernels::quantized::matmul(format, &data, self.out_dim, self.in_dim, &xs, rows, &mut y);
        let out_dims = with_last_dim(dims, self.out_dim);
        Ok(Tensor::from_vec(y, out_dims, x.device())?)
    }

    /// The block format when this prefill-sized product of a quantized weight
    /// runs in bf16 ([`Linear::with_bf16_products`]): asked for, AMX or AVX-512 BF16 present,
    /// a Q4_1 / Q8_0 weight and f32 activations that track no gradient.
    fn bf16_prefill(&self, qt: &QTensor, x: &Tensor) -> Option<Format> {
        // AMX, or AVX-512 BF16's register-tiled GEMM (Zen 4 / 5); the portable
        // bf16 code is slower than the exact f32 GEMM.
        let fast = multitoken_kernels::bf16::kernel() != multitoken_kernels::bf16::Kernel::Portable;
        (self.bf16_products && !x.track_op() && fast).then(|| own_kernel_format(qt, x)).flatten()
    }

    /// `x W^T` for a bf16 weight: the kernel for f32 CPU activations (with
    /// `each_row`, the fixed-order product of the batched decode step), else
    /// (a tracked input, another dtype or device) candle's matmul with the
    /// weight widened to `x`'s dtype, which keeps gradients flowing to `x`.
    fn bf16_matmul(&self, x: &Tensor, w: &Bf16Matrix, dims: &[usize], rows: usize, each_row: bool) -> Result<Tensor> {
        let flat = x.reshape((rows, self.in_dim))?;
        let fast = if each_row {
            multitoken_kernels::bf16::linear_each_row(&flat, w)?
        } else {
            multitoken_kernels::bf16::linear(&flat, w)?
        };
        let y = match fast {
            Some(y) => y,
            None => flat.matmul(&w.to_tensor(x.device())?.to_dtype(x.dtype())?.t()?)?,
        };
        let out_dims = with_last_dim(dims, self.out_dim);
        Ok(y.reshape(out_dims)?)
    }

    /// `x W^T` with the leading dims flattened, so one GEMM covers the batch.
    fn dense_matmul(&self, x: &Tensor, w: &Tensor, dims: &[usize], rows: usize) -> Result<Tensor> {
        let x = x.reshape((rows, self.in_dim))?;
        // Many rows (prefill, training): the threaded kernel, whose backward skips
        // the gradient of a frozen weight (LoRA and projector training never read
        // it). Decode steps (a few rows) stream the f32 weight once over the
        // threads (candle's matmul ran gemm's packing path on one thread: issue
        // 19); other dtypes, and tracked tensors, keep candle's matmul.
        let y = if rows >= KERNEL_FROM_ROWS {
            multitoken_kernels::linear(&x, w, None, multitoken_kernels::Activation::Identity)?
        } else {
            match multitoken_kernels::lm::linear_rows(&x, w)? {
                Some(y) => y,
                None => x.matmul(&w.t()?)?,
            }
        };
        let out_dims = with_last_dim(dims, self.out_dim);
        Ok(y.reshape(out_dims)?)
    }
}

/// `f` applied to each `[1, ...]` row of `x` alone, the results stacked again:
/// the exact fallback of the batched decode step's per-row operations.
pub(crate) fn each_row(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let rows = x.dim(0)?;
    let outs = (0..rows).map(|r| f(&x.narrow(0, r, 1)?)).collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&outs, 0)?)
}

/// Which of our kernels ([`crate::quantized`]) does this product, if any: a Q4_1
/// or Q8_0 matrix on the CPU times f32 activations whose width is whole blocks.
fn own_kernel_format(qt: &QTensor, x: &Tensor) -> Option<Format> {
    let format = Format::of_ggml(qt.dtype())?;
    let fits = x.device().is_cpu() && x.dtype() == DType::F32 && x.dims().last().is_some_and(|d| d % multitoken_kernels::quantized::BLOCK == 0);
    fits.then_some(format)
}

/// Rows of an `[..., in]` input: the product of every dimension but the last.
fn leading_rows(dims: &[usize]) -> usize {
    dims[..dims.len().saturating_sub(1)].iter().product()
}

/// `dims` with the last dimension replaced by `last` (an output's shape).
fn with_last_dim(dims: &[usize], last: usize) -> Vec<usize> {
    let mut out = dims.to_vec();
    if let Some(d) = out.last_mut() {
        *d = last;
    }
    out
}

/// From this many rows on, a dense product goes through multitoken-kernels.
const KERNEL_FROM_ROWS: usize = 16;

/// From this many rows on, a quantized weight is dequantized for the matmul;
/// below, our block kernel reads it in place. Dequantizing SmolLM2-135M's
/// Q4_1 linears costs ~100 ms whatever the row count, while the block kernel
/// (eight rows per unpacked block) grows with the rows: `generate --raw
/// --profile` prefills, alternating runs (2026-12-06), in place vs
/// dequantized: 20 tokens 64-75 ms vs 124-126, 32 tokens 105-143 vs 131-143,
/// 44 tokens 186-187 vs 168-176, 120 tokens 478-495 vs 245. Short prompts (a
/// chat turn, a served request) are prefilled in place.
const DEQUANTIZE_FROM_ROWS: usize = 32;
