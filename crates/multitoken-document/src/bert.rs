//! A BERT encoder (Devlin et al. 2019) as transformers' `BertModel`
//! (`models/bert/modeling_bert.py`), on multitoken-kernels.
//!
//! candle-transformers has a BERT, but its layers run every projection and the
//! `[batch, heads, seq, seq]` scores through separate candle ops and its
//! LayerNorm has no backward pass, so a document encoder built on it could be
//! neither as fast as sentence-transformers nor trained. This one fuses the QKV
//! projection, masks padded keys inside the attention kernel, and takes the
//! differentiable composites whenever a tensor tracks gradients.
//!
//! Keys (with an optional `bert.` or `<model_type>.` prefix):
//! `embeddings.{word,position,token_type}_embeddings.weight`, `embeddings.LayerNorm.*`,
//! `encoder.layer.{i}.attention.self.{query,key,value}.*`,
//! `encoder.layer.{i}.attention.output.{dense,LayerNorm}.*`,
//! `encoder.layer.{i}.intermediate.dense.*`, `encoder.layer.{i}.output.{dense,LayerNorm}.*`.

use candle_core::{DType, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};
use multitoken_kernels::{layer_norm, Activation, Linear, QkvProjection};

/// One encoder layer (post-norm, as BERT).
#[derive(Debug, Clone)]
struct Layer {
    /// query, key and value: one fused product when frozen.
    qkv: QkvProjection,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// transformers' `BertModel` without the pooler: token ids to final hidden states.
#[derive(Debug, Clone)]
pub struct Bert {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    act: HiddenAct,
}

fn norm_from(vb: &VarBuilder, dim: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(vb.get(dim, "weight")?, vb.get(dim, "bias")?, eps))
}

impl Bert {
    /// Loads the model from `vb` (the checkpoint's root), finding the key prefix
    /// (none, `bert.`, or the config's `model_type`).
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let mut prefixes = vec![String::new(), "bert.".to_string()];
        if let Some(model_type) = &config.model_type {
            prefixes.push(format!("{model_type}."));
        }
        let Some(prefix) = prefixes
            .iter()
            .find(|p| vb.contains_tensor(&format!("{p}embeddings.word_embeddings.weight")))
        else {
            candle_core::bail!(
                "no `embeddings.word_embeddings.weight` under any of the prefixes {:?}",
                prefixes
            );
        };
        let vb = match prefix.strip_suffix('.') {
            Some(p) => vb.pp(p),
            None => vb,
        };
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        if config.num_attention_heads == 0 || !h.is_multiple_of(config.num_attention_heads) {
            candle_core::bail!("hidden_size {h} is not a multiple of num_attention_heads {}", config.num_attention_heads);
        }
        let emb = vb.pp("embeddings");
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layer.{i}"));
                let attn = vb.pp("attention");
                let query = Linear::load(&attn.pp("self.query"), h, h, true)?;
                let key = Linear::load(&attn.pp("self.key"), h, h, true)?;
                let value = Linear::load(&attn.pp("self.value"), h, h, true)?;
                Ok(Layer {
                    qkv: QkvProjection::new(query, key, value)?,
                    attention_output: Linear::load(&attn.pp("output.dense"), h, h, true)?,
                    attention_norm: norm_from(&attn.pp("output.LayerNorm"), h, eps)?,
                    intermediate: Linear::load(&vb.pp("intermediate.dense"), h, config.intermediate_size, true)?,
                    output: Linear::load(&vb.pp("output.dense"), config.intermediate_size, h, true)?,
                    output_norm: norm_from(&vb.pp("output.LayerNorm"), h, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word_embeddings: emb.get((config.vocab_size, h), "word_embeddings.weight")?,
            position_embeddings: emb.get((config.max_position_embeddings, h), "position_embeddings.weight")?,
            token_type_embeddings: emb.get((config.type_vocab_size, h), "token_type_embeddings.weight")?,
            embeddings_norm: norm_from(&emb.pp("LayerNorm"), h, eps)?,
            layers,
            heads: config.num_attention_heads,
            act: config.hidden_act,
        })
    }

    /// Final hidden states `[b, s, hidden]` for `ids` and `token_types` `[b, s]`
    /// (u32) and `mask` `[b, s]` (1 for a token, 0 for padding).
    pub fn forward(&self, ids: &Tensor, token_types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let positions = self.position_embeddings.dim(0)?;
        if s > positions {
            candle_core::bail!("{s} tokens exceed the model's {positions} positions");
        }
        let h = self.word_embeddings.dim(1)?;
        let lookup = |table: &Tensor, ids: &Tensor| table.index_select(&ids.flatten_all()?, 0)?.reshape((b, s, h));
        let embeddings = (lookup(&self.word_embeddings, ids)? + lookup(&self.token_type_embeddings, token_types)?)?
            .broadcast_add(&self.position_embeddings.narrow(0, 0, s)?)?;
        let mut x = layer_norm(&self.embeddings_norm, &embeddings)?;
        // transformers' extended attention mask: 0 to keep a key, the dtype's minimum to drop it.
        let key_bias = ((1.0 - mask.to_dtype(DType::F32)?)? * f64::from(f32::MIN))?;
        let key_bias = key_bias.to_dtype(x.dtype())?;
        let scale = ((h / self.heads) as f64).powf(-0.5);
        for layer in &self.layers {
            let (q, k, v) = layer.qkv.forward(&x)?;
            let attended = multitoken_kernels::attention(&q, &k, &v, self.heads, scale, Some(&key_bias))?;
            x = layer_norm(&layer.attention_norm, &layer.attention_output.forward_residual(&attended, &x)?)?;
            let inner = match self.act {
                HiddenAct::Gelu => layer.intermediate.forward_with(&x, Activation::Gelu)?,
                HiddenAct::GeluApproximate => layer.intermediate.forward(&x)?.gelu()?,
                HiddenAct::Relu => layer.intermediate.forward(&x)?.relu()?,
            };
            x = layer_norm(&layer.output_norm, &layer.output.forward_residual(&inner, &x)?)?;
        }
        Ok(x)
    }
}
