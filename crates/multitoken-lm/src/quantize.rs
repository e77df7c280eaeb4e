//! Quantization at load and the quantized linear's backward pass (QLoRA).
//!
//! [`Quantization`] names the block formats `--quantize` takes. [`QuantizingSource`]
//! wraps a dense [`WeightSource`] (an HF directory's safetensors) and turns every
//! linear it hands out into a quantized [`Linear`] as it is read: one matrix is
//! converted to f32 and quantized at a time, so the model never exists as a full
//! f32 copy. Embeddings and norms come through unchanged (an embedding is a gather,
//! not a product), and so does the head unless asked for
//! ([`QuantizingSource::with_head`]): it is one matrix, and the one whose
//! rounding moves the logits most directly. Towers and projectors are loaded by other code and are never seen
//! here, so they stay in the load dtype.
//!
//! [`quantized_base`] is the frozen quantized product `x Wᵀ` as an autograd op: its
//! backward computes `dL/dx = dL/dy · W` from the quantized blocks a tile of output
//! rows at a time ([`TILE_ROWS`]), so training LoRA adapters over a quantized base
//! never holds a dequantized matrix beyond one tile. `W` itself is frozen and gets
//! no gradient.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::linear::Linear;
use crate::weights::WeightSource;
use crate::{Error, Result};

/// A block format a dense checkpoint can be quantized to at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quantization {
    /// ggml `Q8_0`: 32 weights per block, 8.5 bits per weight.
    Q8_0,
    /// ggml `Q4_1`: 32 weights per block, 5 bits per weight.
    Q4_1,
    /// ggml `Q4_K`: 256 weights per super-block, 4.5 bits per weight.
    Q4K,
}

impl Quantization {
    /// Every format, as `--quantize` spells them.
    pub const NAMES: &'static str = "q8_0, q4_1, q4_k";

    /// The ggml block type.
    pub fn ggml_dtype(self) -> GgmlDType {
        match self {
            Quantization::Q8_0 => GgmlDType::Q8_0,
            Quantization::Q4_1 => GgmlDType::Q4_1,
            Quantization::Q4K => GgmlDType::Q4K,
        }
    }

    /// Weights per block: a row length must be a multiple of it.
    pub fn block_size(self) -> usize {
        self.ggml_dtype().block_size()
    }

    /// The name `--quantize` takes (`q4_1`).
    pub fn name(self) -> &'static str {
        match self {
            Quantization::Q8_0 => "q8_0",
            Quantization::Q4_1 => "q4_1",
            Quantization::Q4K => "q4_k",
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Quantization {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(Quantization::Q8_0),
            "q4_1" => Ok(Quantization::Q4_1),
            "q4_k" | "q4k" => Ok(Quantization::Q4K),
            other => Err(Error::Msg(format!(
                "unknown quantization {other:?}; expected one of {}",
                Self::NAMES
            ))),
        }
    }
}

/// Quantizes one dense `[out, in]` matrix (any float dtype); `name` is used in
/// the error when a row is not whole blocks.
pub fn quantize_matrix(name: &str, weight: &Tensor, format: Quantization) -> Result<QMatMul> {
    let (out_dim, in_dim) = weight.dims2()?;
    let block = format.block_size();
    if !in_dim.is_multiple_of(block) {
        return Err(Error::Tensor {
            name: name.to_string(),
            message: format!(
                "cannot quantize a [{out_dim}, {in_dim}] matrix to {format}: its rows ({in_dim}) are not a multiple of the {block}-weight block"
            ),
        });
    }
    let w = if weight.dtype() == DType::F32 {
        Cow::Borrowed(weight)
    } else {
        Cow::Owned(weight.to_dtype(DType::F32)?)
    };
    let q = QTensor::quantize(&w, format.ggml_dtype())?;
    Ok(QMatMul::from_qtensor(q)?)
}

/// A dense weight source whose decoder linears come out quantized (see the
/// module docs); the head stays dense unless [`QuantizingSource::with_head`].
pub struct QuantizingSource<'a> {
    inner: &'a dyn WeightSource,
    format: Quantization,
    head: Option<Quantization>,
}

impl<'a> QuantizingSource<'a> {
    /// Wraps `inner`, quantizing its decoder linears to `format`.
    pub fn new(inner: &'a dyn WeightSource, format: Quantization) -> Self {
        Self {
            inner,
            format,
            head: None,
        }
    }

    /// Quantizes the head (`lm_head`, or the tied embedding table used as one) to
    /// `head` too; `None` keeps it in the load dtype. llama.cpp files usually keep
    /// the head in more bits than the layers (SmolLM2's Q4_1 file: Q8_0).
    pub fn with_head(mut self, head: Option<Quantization>) -> Self {
        self.head = head;
        self
    }
}

impl WeightSource for QuantizingSource<'_> {
    fn describe(&self) -> String {
        format!(
            "{} (quantized to {} at load)",
            self.inner.describe(),
            self.format
        )
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.inner.tensor(name, shape)
    }

    fn linear(&self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        // The dense layer (one matrix, read from the memory map) is dropped as soon
        // as its blocks exist.
        let dense = self.inner.linear(prefix, in_dim, out_dim, bias)?;
        let weight = match dense.weight() {
            crate::linear::LinearWeight::Dense(w) => w,
            // Already quantized (a source that quantizes itself): kept as it is.
            crate::linear::LinearWeight::Quantized(_) | crate::linear::LinearWeight::Bf16(_) => return Ok(dense),
        };
        // The head: `lm_head`, or `model.embed_tokens` asked for as a tied head.
        let is_head = prefix == "lm_head" || prefix == "model.embed_tokens";
        let format = match (is_head, self.head) {
            (false, _) => self.format,
            (true, Some(head)) => head,
            (true, None) => return Ok(dense),
        };
        let q = quantize_matrix(&format!("{prefix}.weight"), weight, format)?;
        Ok(Linear::quantized(q, in_dim, out_dim, dense.bias().cloned()))
    }
}

/// A weight source whose dense linears come out in bf16 ([`LinearWeight::Bf16`]):
/// `--dtype bf16` on the CPU. The tensors around them (embeddings, norms) stay
/// in the inner source's dtype (f32), and so do the activations; a linear the
/// inner source keeps quantized stays quantized, its prefill-sized products in
/// bf16 where the CPU has AMX ([`Linear::with_bf16_products`]).
///
/// [`LinearWeight::Bf16`]: crate::linear::LinearWeight::Bf16
pub struct Bf16LinearsSource<'a> {
    inner: &'a dyn WeightSource,
}

impl<'a> Bf16LinearsSource<'a> {
    /// Wraps `inner`.
    pub fn new(inner: &'a dyn WeightSource) -> Self {
        Self { inner }
    }
}

impl WeightSource for Bf16LinearsSource<'_> {
    fn describe(&self) -> String {
        format!("{} (linears in bf16)", self.inner.describe())
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.inner.tensor(name, shape)
    }

    fn linear(&self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let dense = self.inner.linear(prefix, in_dim, out_dim, bias)?;
        match dense.weight() {
            crate::linear::LinearWeight::Dense(w) => {
                let packed = multitoken_kernels::bf16::Bf16Matrix::from_tensor(w)?;
                Ok(Linear::bf16(packed, dense.bias().cloned()))
            }
            crate::linear::LinearWeight::Quantized(_) => Ok(dense.with_bf16_products()),
            crate::linear::LinearWeight::Bf16(_) => Ok(dense),
        }
    }
}

/// Output rows of a quantized matrix dequantized at a time by the backward pass
/// (and by the forward pass of many rows): 256 rows of a 10240-wide Phi-2 `fc2`
/// are 10 MB of f32.
pub const TILE_ROWS: usize = 256;

/// Rows `first..first + count` of the `[out, in]` quantized matrix `qt`, dequantized
/// to an f32 `[count, in]` tensor.
fn dequantize_rows(
    qt: &QTensor,
    blocks: &[u8],
    in_dim: usize,
    first: usize,
    count: usize,
) -> Result<Tensor> {
    let dtype = qt.dtype();
    let row_bytes = in_dim / dtype.block_size() * dtype.type_size();
    let bytes = blocks
        .get(first * row_bytes..(first + count) * row_bytes)
        .ok_or_else(|| {
            Error::Msg(format!(
                "quantized matrix rows {first}..{} lie outside its data",
                first + count
            ))
        })?;
    let values = match multitoken_kernels::quantized::Format::of_ggml(dtype) {
        Some(format) => multitoken_kernels::quantized::dequantize(format, bytes, count, in_dim),
        None => {
            let tile = candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                bytes,
                vec![count, in_dim],
                &Device::Cpu,
            )?;
            return Ok(tile.dequantize(&Device::Cpu)?);
        }
    };
    Ok(Tensor::from_vec(values, (count, in_dim), &Device::Cpu)?)
}

/// `x Wᵀ` for `x` `[rows, in]` (f32, CPU) and the quantized `W` `[out, in]`, as an
/// op whose backward gives `x` its gradient from the blocks (see the module docs).
pub fn quantized_base(
    x: &Tensor,
    weight: &Arc<QMatMul>,
    in_dim: usize,
    out_dim: usize,
) -> Result<Tensor> {
    let QMatMul::QTensor(qt) = weight.as_ref() else {
        return Err(Error::Msg(
            "the quantized backward needs a matrix kept in blocks".into(),
        ));
    };
    let (_, x_in) = x.dims2()?;
    if x_in != in_dim || qt.shape().dims() != [out_dim, in_dim] {
        return Err(Error::Msg(format!(
            "x {:?} does not fit a quantized [{out_dim}, {in_dim}] matrix",
            x.dims()
        )));
    }
    let op = QuantizedBase {
        weight: qt.clone(),
        in_dim,
        out_dim,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// See [`quantized_base`].
struct QuantizedBase {
    weight: Arc<QTensor>,
    in_dim: usize,
    out_dim: usize,
}

impl QuantizedBase {
    /// `x Wᵀ`, `[rows, out]`: our Q4_1/Q8_0 kernel for a few rows, else one f32
    /// GEMM per tile of dequantized rows.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let data = self.weight.data()?;
        let format = multitoken_kernels::quantized::Format::of_ggml(self.weight.dtype());
        if let Some(format) = format.filter(|_| rows < TILE_ROWS) {
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let mut y = vec![0f32; rows * self.out_dim];
            multitoken_kernels::quantized::matmul(format, &data, self.out_dim, self.in_dim, &xs, rows, &mut y);
            return Ok(Tensor::from_vec(y, (rows, self.out_dim), x.device())?);
        }
        // Each tile's product on the kernels' pool: candle's matmul runs on its
        // own pool, which the binaries size to one thread (a Phi-2-size QLoRA
        // step took 1.5x the f32 base's for that).
        let mut parts = Vec::with_capacity(self.out_dim.div_ceil(TILE_ROWS));
        for first in (0..self.out_dim).step_by(TILE_ROWS) {
            let count = TILE_ROWS.min(self.out_dim - first);
            let w = dequantize_rows(&self.weight, &data, self.in_dim, first, count)?;
            parts.push(multitoken_kernels::linear(x, &w, None, multitoken_kernels::Activation::Identity)?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// `g W`, `[rows, in]`, summed over tiles of output rows.
    fn input_grad(&self, grad: &Tensor) -> Result<Tensor> {
        let data = self.weight.data()?;
        let grad = grad.contiguous()?;
        let mut dx: Option<Tensor> = None;
        for first in (0..self.out_dim).step_by(TILE_ROWS) {
            let count = TILE_ROWS.min(self.out_dim - first);
            let w = dequantize_rows(&self.weight, &data, self.in_dim, first, count)?;
            // `g_tile W_tile` (W_tile `[count, in]` is the columns layout of
            // that product) plus what the tiles before gave, on the pool.
            let g_tile = grad.narrow(1, first, count)?.contiguous()?;
            dx = Some(multitoken_kernels::linear_columns(&g_tile, &w, dx.as_ref())?);
        }
        dx.ok_or_else(|| Error::Msg("a quantized matrix with no rows".into()))
    }
}

impl CustomOp1 for QuantizedBase {
    fn name(&self) -> &'static str {
        "multitoken-quantized-base"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = layout.shape().dims2()?;
        if !layout.is_contiguous() || cols != self.in_dim {
            candle_core::bail!(
                "quantized base: x {:?} is not a contiguous [rows, {}] matrix",
                layout.dims(),
                self.in_dim
            );
        }
        let xs = &storage.as_slice::<f32>()?[layout.start_offset()..][..rows * cols];
        let x = Tensor::from_slice(xs, (rows, cols), &Device::Cpu)?;
        let y = self
            .forward(&x)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let values: Vec<f32> = y.flatten_all()?.to_vec1()?;
        Ok((CpuStorage::F32(values), Shape::from((rows, self.out_dim))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dx = self
            .input_grad(grad)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Some(dx))
    }
}

/// `x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ` for `x` `[rows, in]` (f32, CPU), the quantized
/// frozen `W` `[out, in]`, and the LoRA matrices `a` `[r, in]`, `b` `[out, r]`, as
/// one op that keeps only its inputs for the backward pass (the composite of the
/// base op and candle's LoRA products kept three `[rows, out]` tensors per
/// linear). `x`, `a` and `b` get gradients; `W` and the bias are frozen.
#[allow(clippy::too_many_arguments)]
pub fn qlora_linear(
    x: &Tensor,
    weight: &Arc<QMatMul>,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<multitoken_kernels::train::DropoutMask>,
) -> Result<Tensor> {
    let QMatMul::QTensor(qt) = weight.as_ref() else {
        return Err(Error::Msg("the quantized backward needs a matrix kept in blocks".into()));
    };
    let (rows, in_dim) = x.dims2()?;
    let [out_dim, w_in] = qt.shape().dims() else {
        return Err(Error::Msg(format!("a quantized weight of shape {:?} is not a matrix", qt.shape().dims())));
    };
    let (r, a_in) = a.dims2()?;
    let (b_out, b_r) = b.dims2()?;
    if *w_in != in_dim || a_in != in_dim || b_out != *out_dim || b_r != r || mask.as_ref().is_some_and(|m| m.len() != rows * in_dim) {
        return Err(Error::Msg(format!(
            "qlora_linear: x {:?}, weight {:?}, A {:?} and B {:?} do not fit",
            x.dims(),
            qt.shape().dims(),
            a.dims(),
            b.dims()
        )));
    }
    let op = QloraLinear {
        base: QuantizedBase { weight: qt.clone(), in_dim, out_dim: *out_dim },
        bias: bias.cloned(),
        scale,
        mask,
    };
    Ok(x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)?)
}

/// See [`qlora_linear`].
struct QloraLinear {
    base: QuantizedBase,
    bias: Option<Tensor>,
    scale: f64,
    mask: Option<multitoken_kernels::train::DropoutMask>,
}

impl QloraLinear {
    fn dropped(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.mask {
            Some(m) => x * m.tensor(x.shape(), x.device())?,
            None => Ok(x.clone()),
        }
    }
}

/// A contiguous f32 CPU operand as a tensor (a copy: the op's inputs are borrowed).
fn operand(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Tensor> {
    let (rows, cols) = layout.shape().dims2()?;
    if !layout.is_contiguous() {
        candle_core::bail!("qlora_linear: a {:?} operand is not contiguous", layout.dims());
    }
    let data = &storage.as_slice::<f32>()?[layout.start_offset()..][..rows * cols];
    Tensor::from_slice(data, (rows, cols), &Device::Cpu)
}

impl candle_core::CustomOp3 for QloraLinear {
    fn name(&self) -> &'static str {
        "multitoken-qlora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, a, b) = (operand(xs, xl)?, operand(a_s, al)?, operand(bs, bl)?);
        // u = s · dropout(x) Aᵀ, [rows, r]: the scale on the narrow side.
        let u = (self.dropped(&x)?.matmul(&a.t()?)? * self.scale)?;
        let base = self.base.forward(&x).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut y = (base + u.matmul(&b.t()?)?)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let shape = y.shape().clone();
        let values: Vec<f32> = y.flatten_all()?.to_vec1()?;
        Ok((CpuStorage::F32(values), shape))
    }

    /// With `d = dropout(x)`, `u = d Aᵀ` (recomputed) and `g` the output's
    /// gradient: `dB = s gᵀ u`, `du = s g B`, `dA = duᵀ d`, `dx = g W + dropout(du A)`,
    /// `g W` from the blocks a tile at a time.
    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dropped = self.dropped(x)?;
        let u = dropped.matmul(&a.t()?)?;
        let grad_b = (grad.t()?.matmul(&u)? * self.scale)?;
        let du = (grad.matmul(b)? * self.scale)?;
        let grad_a = du.t()?.matmul(&dropped)?;
        let dx_adapter = self.dropped(&du.matmul(a)?)?;
        let dx_base = self.base.input_grad(grad).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((Some((dx_base + dx_adapter)?), Some(grad_a), Some(grad_b)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use candle_core::Var;

    use super::*;

    fn random(dims: &[usize], seed: u64) -> Tensor {
        // A fixed pseudo-random fill (candle's randn has no seed on the CPU).
        let n: usize = dims.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let values: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
    }

    /// The op's value and input gradient against candle's f32 product with the
    /// dequantized matrix, for each format, on shapes with a partial tile and on
    /// both forward paths (few rows: our kernel; many: tiles).
    #[test]
    fn quantized_base_and_its_input_gradient_match_the_dequantized_product() {
        for format in [Quantization::Q4_1, Quantization::Q8_0, Quantization::Q4K] {
            for (rows, out_dim, in_dim) in [(3, 300, 256), (260, 520, 512)] {
                let w = random(&[out_dim, in_dim], 1);
                let q = Arc::new(quantize_matrix("w", &w, format).unwrap());
                let QMatMul::QTensor(qt) = q.as_ref() else {
                    panic!("not kept in blocks")
                };
                let deq = qt.dequantize(&Device::Cpu).unwrap();
                let x = Var::from_tensor(&random(&[rows, in_dim], 2)).unwrap();
                let g = random(&[rows, out_dim], 3);
                let y = quantized_base(x.as_tensor(), &q, in_dim, out_dim).unwrap();
                let dx = (&y * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
                    .get(x.as_tensor())
                    .unwrap()
                    .clone();
                let want_y = x.as_tensor().matmul(&deq.t().unwrap()).unwrap();
                let want_dx = g.matmul(&deq).unwrap();
                let diff = |a: &Tensor, b: &Tensor| {
                    (a - b)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                };
                let case = format!("{format} {rows}x{in_dim} -> {out_dim}");
                assert!(
                    diff(&y, &want_y) < 1e-3,
                    "{case}: forward off by {}",
                    diff(&y, &want_y)
                );
                assert!(
                    diff(&dx, &want_dx) < 1e-3,
                    "{case}: input gradient off by {}",
                    diff(&dx, &want_dx)
                );
            }
        }
    }

    /// The fused QLoRA op against the composite (base op + candle's LoRA products)
    /// it replaces: value and the gradients of x, A and B, with dropout.
    #[test]
    fn qlora_linear_matches_the_composite() {
        for (rows, out_dim, in_dim) in [(5, 96, 64), (300, 260, 128)] {
            let w = random(&[out_dim, in_dim], 4);
            let q = Arc::new(quantize_matrix("w", &w, Quantization::Q4_1).unwrap());
            let bias = random(&[out_dim], 5);
            let x = Var::from_tensor(&random(&[rows, in_dim], 6)).unwrap();
            let a = Var::from_tensor(&random(&[4, in_dim], 7)).unwrap();
            let b = Var::from_tensor(&random(&[out_dim, 4], 8)).unwrap();
            let g = random(&[rows, out_dim], 9);
            let mask = || Some(multitoken_kernels::train::DropoutMask::from_seed(rows * in_dim, 0.25, 11));
            let run = |fused: bool| {
                let y = if fused {
                    qlora_linear(x.as_tensor(), &q, Some(&bias), a.as_tensor(), b.as_tensor(), 1.5, mask()).unwrap()
                } else {
                    let m = mask().unwrap().tensor(x.shape(), &Device::Cpu).unwrap();
                    let base = quantized_base(x.as_tensor(), &q, in_dim, out_dim).unwrap().broadcast_add(&bias).unwrap();
                    let d = (x.as_tensor() * m).unwrap();
                    let lora = (d.matmul(&a.as_tensor().t().unwrap()).unwrap().matmul(&b.as_tensor().t().unwrap()).unwrap() * 1.5).unwrap();
                    (base + lora).unwrap()
                };
                let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let get = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
                (y, get(&x), get(&a), get(&b))
            };
            let (fused, composite) = (run(true), run(false));
            let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            for (what, f, c) in [("y", &fused.0, &composite.0), ("dx", &fused.1, &composite.1), ("dA", &fused.2, &composite.2), ("dB", &fused.3, &composite.3)] {
                assert!(diff(f, c) < 1e-3, "{rows}x{in_dim}->{out_dim} {what}: off by {}", diff(f, c));
            }
        }
    }

    #[test]
    fn rows_not_whole_blocks_are_an_error_naming_the_tensor() {
        let w = random(&[4, 48], 1);
        let err = quantize_matrix("model.layers.0.mlp.up_proj.weight", &w, Quantization::Q4_1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.layers.0.mlp.up_proj.weight") && err.contains("48"),
            "{err}"
        );
        let err = quantize_matrix("m.weight", &random(&[4, 64], 1), Quantization::Q4K)
            .unwrap_err()
            .to_string();
        assert!(err.contains("256"), "{err}");
    }

    #[test]
    fn names_parse_and_bad_ones_list_the_choices() {
        assert_eq!("Q4_1".parse::<Quantization>().unwrap(), Quantization::Q4_1);
        assert_eq!("q4_k".parse::<Quantization>().unwrap(), Quantization::Q4K);
        let err = "q3".parse::<Quantization>().unwrap_err().to_string();
        assert!(err.contains("q8_0, q4_1, q4_k"), "{err}");
    }
}
