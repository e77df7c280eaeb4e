//! The SigLIP vision tower (Zhai et al. 2023, "Sigmoid Loss for Language Image
//! Pre-Training") as Idefics2 uses it: transformers' `Idefics2VisionTransformer`
//! (`models/idefics2/modeling_idefics2.py`), whose embeddings take images of any
//! size and aspect ratio with NaViT's fractional position buckets (Dehghani et
//! al. 2023, "Patch n' Pack: NaViT, a Vision Transformer for any Aspect Ratio
//! and Resolution").
//!
//! A crop of `rows × cols` whole patches is encoded on its own: transformers pads
//! a batch of crops to one size and masks the padding patches out of the
//! attention keys, which leaves the real patches' outputs equal to this.
//! Position ids: each patch row `i` of `rows` sits at the fraction `i · (1/rows)`
//! of the image, clamped below 1 and bucketed into the `image_size / patch_size`
//! grid of the checkpoint's position table ([`navit_position_ids`]; float32
//! arithmetic as torch does it on the CPU, so ties fall into the same bucket).
//!
//! Keys under the var builder given to [`SiglipVisionTower::load`] (the
//! `vision_model` level): `embeddings.patch_embedding.{weight,bias}`,
//! `embeddings.position_embedding.weight`, `encoder.layers.{i}.{self_attn.
//! {q,k,v,out}_proj, layer_norm1, mlp.{fc1,fc2}, layer_norm2}.*`,
//! `post_layernorm.*`. The layers go through multitoken-kernels as CLIP's do
//! (fused QKV, threaded linears with the residual sums inside, the kernels'
//! attention and LayerNorm); the tanh GELU, which the kernels lack, runs as a
//! parallel pass of its own ([`gelu_tanh`]).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use candle_nn::{layer_norm, LayerNorm, LayerNormConfig, VarBuilder};
use multitoken_kernels::{layer_norm as norm, Activation, Linear, QkvProjection};
use serde::Deserialize;

use crate::{Error, Result};

/// `Idefics2VisionConfig` (a SigLIP vision config) as in an Idefics2
/// `config.json`'s `vision_config`; other fields (`model_type`,
/// `attention_dropout`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SiglipVisionConfig {
    /// Width of the residual stream.
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    /// Width of the MLP.
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    /// Transformer layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads.
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Input channels.
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Side of the pretraining images: the position table is
    /// `(image_size / patch_size)²` entries.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Patch side in pixels.
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    /// `gelu_pytorch_tanh` (SigLIP, Idefics2), `gelu_new` / `gelu_fast` (the same
    /// tanh approximation), `gelu` (exact) or `quick_gelu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_hidden() -> usize {
    768
}
fn default_intermediate() -> usize {
    3072
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_channels() -> usize {
    3
}
fn default_image_size() -> usize {
    224
}
fn default_patch() -> usize {
    32
}
fn default_act() -> String {
    "gelu_pytorch_tanh".to_string()
}
fn default_eps() -> f64 {
    1e-6
}

impl Default for SiglipVisionConfig {
    /// `Idefics2VisionConfig()`'s defaults.
    fn default() -> Self {
        Self {
            hidden_size: default_hidden(),
            intermediate_size: default_intermediate(),
            num_hidden_layers: default_layers(),
            num_attention_heads: default_heads(),
            num_channels: default_channels(),
            image_size: default_image_size(),
            patch_size: default_patch(),
            hidden_act: default_act(),
            layer_norm_eps: default_eps(),
        }
    }
}

/// The MLP activation of a tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MlpActivation {
    /// One the kernels fuse into `fc1`.
    Fused(Activation),
    /// The tanh approximation of GELU, a pass after `fc1`.
    GeluTanh,
}

impl SiglipVisionConfig {
    /// Position buckets per side: `image_size / patch_size`.
    pub fn num_patches_per_side(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Checks that every size is positive and the shapes fit together; `what`
    /// names the config in errors.
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |reason: String| Err(Error::config(what, reason));
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_channels", self.num_channels),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be at least 1"));
        }
        if self.image_size < self.patch_size {
            return bad(format!(
                "patch_size {} is larger than image_size {}",
                self.patch_size, self.image_size
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return bad(format!("layer_norm_eps must be a finite number >= 0, got {}", self.layer_norm_eps));
        }
        self.activation().map(|_| ()).map_err(|reason| Error::config(what, reason))
    }

    fn activation(&self) -> std::result::Result<MlpActivation, String> {
        match self.hidden_act.as_str() {
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(MlpActivation::GeluTanh),
            "gelu" => Ok(MlpActivation::Fused(Activation::Gelu)),
            "quick_gelu" => Ok(MlpActivation::Fused(Activation::QuickGelu)),
            other => Err(format!(
                "hidden_act `{other}` is not supported (gelu_pytorch_tanh, gelu_new, gelu_fast, gelu, quick_gelu)"
            )),
        }
    }
}

/// The position ids of a `rows × cols` grid of real patches in a tower whose
/// position table is `side × side` (`side = image_size / patch_size`),
/// row-major: `bucket(i, rows) · side + bucket(j, cols)`.
///
/// `bucket(i, n)` is `torch.bucketize(min(i · (1/n), 1 - 1e-6), boundaries,
/// right=True)` with `boundaries = torch.arange(1/side, 1, 1/side)` in float32,
/// every step in the float32 arithmetic torch uses on the CPU
/// ([`position_boundaries`]), so that exact ties (`i · side / n` a whole
/// number) land where transformers puts them.
pub fn navit_position_ids(side: usize, rows: usize, cols: usize) -> Vec<u32> {
    let boundaries = position_boundaries(side);
    let row_buckets = buckets(&boundaries, rows);
    let col_buckets = buckets(&boundaries, cols);
    let mut ids = Vec::with_capacity(rows * cols);
    for &r in &row_buckets {
        for &c in &col_buckets {
            ids.push((r * side + c) as u32);
        }
    }
    ids
}

/// `torch.arange(1/side, 1.0, 1/side)` in float32 as torch computes it on the
/// CPU: the length is `ceil((1 - start) / step)` in doubles; the kernel writes
/// blocks of 8 lanes (`Vectorized<float>::arange`) from a float32 base
/// `start + step · i0` with each lane `base + k · step` in doubles, and the
/// tail past the last whole pair of blocks one value at a time as
/// `start + step · i` in doubles (checked against torch for every side up to 2000).
pub fn position_boundaries(side: usize) -> Vec<f32> {
    const LANES: usize = 8;
    let step = 1.0 / side as f64;
    let start = step;
    let len = ((1.0 - start) / step).ceil().max(0.0) as usize;
    let vectorised = len / (2 * LANES) * (2 * LANES);
    (0..len)
        .map(|i| {
            if i < vectorised {
                let block = i - i % LANES;
                let base = (start + step * block as f64) as f32;
                (f64::from(base) + (i - block) as f64 * step) as f32
            } else {
                (start + step * i as f64) as f32
            }
        })
        .collect()
}

/// The buckets of `0..n` patches along one side.
fn buckets(boundaries: &[f32], n: usize) -> Vec<usize> {
    // torch: `1.0 / n` (an int64 tensor, so a float32 division), index times
    // step in float32, clamped to float32(1 - 1e-6).
    let step = 1.0f32 / n as f32;
    let max = (1.0f64 - 1e-6) as f32;
    (0..n)
        .map(|i| {
            let x = (i as f32 * step).min(max);
            // bucketize(right=True): the number of boundaries <= x.
            boundaries.partition_point(|&b| b <= x)
        })
        .collect()
}

/// The SigLIP / Idefics2 vision transformer.
#[derive(Debug, Clone)]
pub struct SiglipVisionTower {
    config: SiglipVisionConfig,
    /// The patch convolution as a linear over flattened `c × p × p` patches.
    patch_embedding: Linear,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
}

impl SiglipVisionTower {
    /// Loads the tower from `vb` at the `vision_model` level. A missing or
    /// mis-shaped tensor is an error naming its key.
    pub fn load(vb: VarBuilder, config: &SiglipVisionConfig) -> Result<Self> {
        config.validate("SigLIP vision config")?;
        let d = config.hidden_size;
        let (c, p) = (config.num_channels, config.patch_size);
        let side = config.num_patches_per_side();
        let emb = vb.pp("embeddings");
        // A view of the checkpoint tensor: a training variable stays the variable
        // (Linear keeps it as it is), a frozen one is transposed once.
        let patch_weight = emb
            .get((d, c, p, p), "patch_embedding.weight")?
            .reshape((d, c * p * p))?;
        let patch_bias = emb.get(d, "patch_embedding.bias")?;
        let patch_embedding = Linear::new(patch_weight, Some(patch_bias))?;
        let position_embedding = emb.get((side * side, d), "position_embedding.weight")?;
        let act = config
            .activation()
            .map_err(|reason| Error::config("SigLIP vision config", reason))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(config, act, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = layer_norm(d, ln_config(config), vb.pp("post_layernorm"))?;
        Ok(Self {
            config: config.clone(),
            patch_embedding,
            position_embedding,
            layers,
            post_layernorm,
        })
    }

    /// The config the tower was built from.
    pub fn config(&self) -> &SiglipVisionConfig {
        &self.config
    }

    /// The patch grid `(rows, cols)` of an image `height × width` pixels: whole
    /// patches only (the patch convolution is "valid" with stride `patch_size`).
    pub fn patch_grid(&self, height: usize, width: usize) -> (usize, usize) {
        let p = self.config.patch_size;
        (height / p, width / p)
    }

    /// Encodes `pixels` `[batch, channels, h, w]`, every crop of the batch real
    /// over all its `⌊h/p⌋ × ⌊w/p⌋` whole patches (trailing pixel rows and
    /// columns that do not fill a patch are ignored, as the convolution does):
    /// the last hidden state after `post_layernorm`, `[batch, patches, hidden]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let cfg = &self.config;
        if c != cfg.num_channels {
            return Err(Error::config(
                "SigLIP vision tower",
                format!("pixel values have {c} channels but the tower takes {}", cfg.num_channels),
            ));
        }
        let (rows, cols) = self.patch_grid(h, w);
        if rows == 0 || cols == 0 || b == 0 {
            return Err(Error::config(
                "SigLIP vision tower",
                format!(
                    "a {w}x{h} image holds no whole {p}x{p} patch",
                    p = cfg.patch_size
                ),
            ));
        }
        let hidden = self.embed(pixels, rows, cols)?;
        let mut hidden = hidden;
        for layer in &self.layers {
            hidden = layer.forward(&hidden)?;
        }
        Ok(norm(&self.post_layernorm, &hidden)?)
    }

    /// Patch embeddings plus position embeddings: `[batch, rows · cols, hidden]`.
    fn embed(&self, pixels: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
        let (b, c, _, _) = pixels.dims4()?;
        let p = self.config.patch_size;
        let d = self.config.hidden_size;
        let dtype = self.position_embedding.dtype();
        // The stride-p convolution = a linear over flattened (c, p, p) patches.
        let patches = pixels
            .to_dtype(dtype)?
            .narrow(2, 0, rows * p)?
            .narrow(3, 0, cols * p)?
            .reshape((b, c, rows, p, cols, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * rows * cols, c * p * p))?;
        let patch_embeds = self.patch_embedding.forward(&patches)?.reshape((b, rows * cols, d))?;
        let ids = navit_position_ids(self.config.num_patches_per_side(), rows, cols);
        let ids = Tensor::from_vec(ids, rows * cols, self.position_embedding.device())?;
        let positions = self.position_embedding.index_select(&ids, 0)?;
        Ok(patch_embeds.broadcast_add(&positions.unsqueeze(0)?)?)
    }
}

/// A plain `SiglipVisionModel` (LLaVA-OneVision's tower): square images of the
/// checkpoint's size, position ids `0..patches` in order (no NaViT buckets).
impl SiglipVisionTower {
    /// `hidden_states` as transformers returns them, up to `upto` layers: the
    /// embeddings, then each layer's output (no `post_layernorm`), for
    /// `pixels` `[batch, channels, image_size, image_size]`.
    pub fn plain_hidden_states(&self, pixels: &Tensor, upto: usize) -> Result<Vec<Tensor>> {
        let (b, c, h, w) = pixels.dims4()?;
        let cfg = &self.config;
        if c != cfg.num_channels || h != cfg.image_size || w != cfg.image_size || b == 0 {
            return Err(Error::config(
                "SigLIP vision tower",
                format!(
                    "expects pixels [batch, {}, {s}, {s}], got {:?}",
                    cfg.num_channels,
                    pixels.dims(),
                    s = cfg.image_size
                ),
            ));
        }
        let side = cfg.num_patches_per_side();
        let (p, d) = (cfg.patch_size, cfg.hidden_size);
        let patches = pixels
            .to_dtype(self.position_embedding.dtype())?
            .narrow(2, 0, side * p)?
            .narrow(3, 0, side * p)?
            .reshape((b, c, side, p, side, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * side * side, c * p * p))?;
        let embeds = self.patch_embedding.forward(&patches)?.reshape((b, side * side, d))?;
        let mut hidden = embeds.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut states = vec![hidden.clone()];
        for layer in self.layers.iter().take(upto) {
            hidden = layer.forward(&hidden)?;
            states.push(hidden.clone());
        }
        Ok(states)
    }
}

fn ln_config(config: &SiglipVisionConfig) -> LayerNormConfig {
    LayerNormConfig {
        eps: config.layer_norm_eps,
        ..Default::default()
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    /// q, k and v: one fused product when the tower is frozen.
    qkv: QkvProjection,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    heads: usize,
    act: MlpActivation,
}

impl EncoderLayer {
    fn load(cfg: &SiglipVisionConfig, act: MlpActivation, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        let q_proj = Linear::load(&attn.pp("q_proj"), d, d, true)?;
        let k_proj = Linear::load(&attn.pp("k_proj"), d, d, true)?;
        let v_proj = Linear::load(&attn.pp("v_proj"), d, d, true)?;
        Ok(Self {
            qkv: QkvProjection::new(q_proj, k_proj, v_proj)?,
            out_proj: Linear::load(&attn.pp("out_proj"), d, d, true)?,
            layer_norm1: layer_norm(d, ln_config(cfg), vb.pp("layer_norm1"))?,
            fc1: Linear::load(&vb.pp("mlp.fc1"), d, cfg.intermediate_size, true)?,
            fc2: Linear::load(&vb.pp("mlp.fc2"), cfg.intermediate_size, d, true)?,
            layer_norm2: layer_norm(d, ln_config(cfg), vb.pp("layer_norm2"))?,
            heads: cfg.num_attention_heads,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let scale = ((d / self.heads) as f64).powf(-0.5);
        let h = norm(&self.layer_norm1, x)?;
        let (q, k, v) = self.qkv.forward(&h)?;
        let attn = multitoken_kernels::attention(&q, &k, &v, self.heads, scale, None)?;
        // The residual sums are formed inside the products (one pass less each).
        let x = self.out_proj.forward_residual(&attn, x)?;
        let h = norm(&self.layer_norm2, &x)?;
        let h = match self.act {
            MlpActivation::Fused(act) => self.fc1.forward_with(&h, act)?,
            MlpActivation::GeluTanh => gelu_tanh(&self.fc1.forward(&h)?)?,
        };
        Ok(self.fc2.forward_residual(&h, &x)?)
    }
}

/// `0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 x³)))`, torch's
/// `gelu(approximate="tanh")`: candle's (differentiable) `gelu` when `x`
/// tracks gradients or is not an f32 CPU tensor, else a pass over candle's
/// thread pool.
///
/// The pass writes it as `x · σ(2z)` (the same function: `(1 + tanh z) / 2 =
/// σ(2z)`), and `x · σ(2z) = q(y) · x / y` with `y = 2z / 1.702` and
/// `q(y) = y · σ(1.702 y)` the kernels' vectorised quick GELU; `x / y` has no
/// pole (`z` is `x` times a positive polynomial). Past `|x| > 10`, where
/// `σ(2z)` is 0 or 1 in f32, it is `0` or `x` outright (no subnormals, no
/// overflow of the cube).
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() || !x.device().is_cpu() || x.dtype() != DType::F32 {
        return x.gelu();
    }
    x.apply_op1_no_bwd(&GeluTanh)
}

/// √(2/π).
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh approximation.
const GELU_CUBIC: f32 = 0.044_715;
/// Elements per unit of work of the parallel pass.
const GELU_CHUNK: usize = 8192;

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "multitoken-gelu-tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu_tanh: the input is not contiguous");
        };
        let xs = &storage.as_slice::<f32>()?[start..end];
        let mut out = vec![0f32; xs.len()];
        {
            let chunks: Vec<Mutex<&mut [f32]>> = out.chunks_mut(GELU_CHUNK).map(Mutex::new).collect();
            let run = |i: usize| {
                let src = &xs[i * GELU_CHUNK..(i * GELU_CHUNK + GELU_CHUNK).min(xs.len())];
                // A poisoned lock only means another unit panicked; the data is ours.
                let mut dst = chunks[i].lock().unwrap_or_else(|e| e.into_inner());
                gelu_tanh_slice(src, &mut dst);
            };
            multitoken_kernels::pool::for_each_item(chunks.len(), run);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// [`gelu_tanh`] of `src` into `dst` (same length).
fn gelu_tanh_slice(src: &[f32], dst: &mut [f32]) {
    let ratio = 2.0 * SQRT_2_OVER_PI / 1.702;
    for (y, &x) in dst.iter_mut().zip(src) {
        *y = ratio * x * (1.0 + GELU_CUBIC * x * x);
    }
    multitoken_kernels::math::quick_gelu_in_place(dst);
    for (y, &x) in dst.iter_mut().zip(src) {
        let value = *y / (ratio * (1.0 + GELU_CUBIC * x * x));
        *y = if x > 10.0 {
            x
        } else if x < -10.0 {
            0.0
        } else {
            value
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: f32) -> f32 {
        let x = f64::from(x);
        let z = f64::from(SQRT_2_OVER_PI) * (x + f64::from(GELU_CUBIC) * x * x * x);
        (0.5 * x * (1.0 + z.tanh())) as f32
    }

    #[test]
    fn gelu_tanh_pass_is_the_tanh_approximation() {
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.005).chain([-1e30, -50.0, 50.0, 1e30, 0.0]).collect();
        let mut out = vec![0.0; xs.len()];
        gelu_tanh_slice(&xs, &mut out);
        for (&x, &y) in xs.iter().zip(&out) {
            let want = reference(x);
            assert!((y - want).abs() <= 2e-6 * (1.0 + want.abs()), "x {x}: {y} vs {want}");
            assert!(y == 0.0 || y.abs() >= f32::MIN_POSITIVE, "x {x}: subnormal {y}");
        }
        let t = Tensor::new(xs.as_slice(), &candle_core::Device::Cpu).unwrap();
        let fast = gelu_tanh(&t).unwrap().to_vec1::<f32>().unwrap();
        let slow = t.gelu().unwrap().to_vec1::<f32>().unwrap();
        for ((x, a), b) in xs.iter().zip(&fast).zip(&slow) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "x {x}: {a} vs candle {b}");
        }
    }

    #[test]
    fn buckets_spread_patches_over_the_table() {
        // 7 buckets per side: 7 patches take one each, 1 patch takes bucket 0,
        // 14 patches take each bucket twice.
        let b = position_boundaries(7);
        assert_eq!(buckets(&b, 7), vec![0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(buckets(&b, 1), vec![0]);
        assert_eq!(buckets(&b, 14), vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]);
        assert!(position_boundaries(1).is_empty());
        assert_eq!(navit_position_ids(7, 2, 3), vec![0, 2, 4, 21, 23, 25]);
    }
}
