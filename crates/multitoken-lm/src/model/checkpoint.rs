//! Gradient checkpointing: a decoder layer as one autograd op that keeps only
//! its input, and recomputes the layer in the backward pass.
//!
//! candle keeps every op's output until `backward` returns, so training through
//! a decoder holds all its activations at once: for a Phi-2-size model at 256
//! tokens about 110 MB a layer, 3.5 GB in all, which is most of a QLoRA step's
//! memory once the base is 4-bit. With checkpointing on, each layer's forward
//! runs inside [`CheckpointedLayer`] and its graph is dropped at once; the
//! backward pass recomputes the layer from the kept input, tracked, and
//! backpropagates the incoming gradient through it (transformers'
//! `gradient_checkpointing_enable`, the same trade: one more forward per step).
//!
//! The recompute is the same ops on the same inputs, so the gradients are the
//! ones an unchecked step gives up to float rounding (a layer input's two
//! contributions, residual and norm, may be summed in the other order; the
//! trainer's test bounds the difference at 1e-6 of the loss): LoRA dropout masks come from the shared
//! generator, whose state is saved before the layer's forward and put back for
//! the recompute. The layer's LoRA adapters get their gradients inside the op's
//! backward; candle's op API returns only the input's, so the adapters' go to a
//! side store the trainer drains with [`take_grad`].

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, TensorId, Var};

use super::DecoderLayer;
use crate::lora::LoraDropout;
use crate::model::rope::RotaryEmbedding;

/// Gradients of adapter tensors computed inside checkpointed layers' backward
/// passes, by tensor id, until [`take_grad`] collects them.
static SIDE_GRADS: Mutex<Option<HashMap<TensorId, Tensor>>> = Mutex::new(None);

/// The gradient a checkpointed layer computed for `var` (a LoRA `A` or `B`)
/// in the last backward pass, removed from the side store; `None` when none
/// did. A trainer adds it to what `backward()`'s own store holds for `var`.
pub fn take_grad(var: &Tensor) -> Option<Tensor> {
    SIDE_GRADS.lock().ok()?.as_mut()?.remove(&var.id())
}

fn add_side_grad(var: &Tensor, grad: Tensor) -> candle_core::Result<()> {
    let mut guard = SIDE_GRADS
        .lock()
        .map_err(|_| candle_core::Error::Msg("checkpoint gradient store poisoned".into()))?;
    let map = guard.get_or_insert_with(HashMap::new);
    let sum = match map.remove(&var.id()) {
        Some(prev) => (prev + grad)?,
        None => grad,
    };
    map.insert(var.id(), sum);
    Ok(())
}

/// One decoder layer (without a KV cache) as an op on its input.
pub(super) struct CheckpointedLayer {
    pub(super) layer: DecoderLayer,
    pub(super) rope: RotaryEmbedding,
    pub(super) cos_sin: (Tensor, Tensor),
    pub(super) mask: Option<Tensor>,
    pub(super) causal: bool,
    /// The LoRA dropout generator the layer's adapters share, and its state
    /// before the forward pass (filled by `cpu_fwd`).
    pub(super) dropout: Option<LoraDropout>,
    pub(super) dropout_state: Mutex<Option<rand::rngs::StdRng>>,
}

impl CheckpointedLayer {
    fn run(&self, x: &Tensor) -> crate::Result<Tensor> {
        self.layer.forward(x, &self.rope, &self.cos_sin, self.mask.as_ref(), self.causal, &mut None, 0)
    }

    /// The LoRA tensors of the layer, which get gradients in `bwd`.
    fn adapters(&self) -> Vec<Tensor> {
        self.layer
            .linears()
            .into_iter()
            .filter_map(|l| l.lora())
            .flat_map(|l| [l.a.clone(), l.b.clone()])
            .filter(Tensor::is_variable)
            .collect()
    }
}

fn error(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("checkpointed layer: {e}"))
}

impl CustomOp1 for CheckpointedLayer {
    fn name(&self) -> &'static str {
        "checkpointed-decoder-layer"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| error("the input is not contiguous"))?;
        let data = &storage.as_slice::<f32>()?[start..end];
        // A variable, as in the backward's recompute: the layer's ops pick their
        // training kernels for tracked inputs, and both passes must run the same.
        let x = Var::from_slice(data, layout.shape(), &candle_core::Device::Cpu)?;
        if let Some(rng) = &self.dropout {
            if let Ok(mut saved) = self.dropout_state.lock() {
                *saved = Some(rng.state().map_err(error)?);
            }
        }
        // Its graph (the adapters are tracked) is dropped with `y`: only the
        // output's values leave.
        let y = self.run(x.as_tensor()).map_err(error)?.contiguous()?;
        let shape = y.shape().clone();
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Err(error("the layer ran off the CPU"));
        };
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| error("the output is not contiguous"))?;
        Ok((CpuStorage::F32(cpu.as_slice::<f32>()?[start..end].to_vec()), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        // Replay the forward's dropout masks, then leave the generator as it was.
        let saved = self.dropout_state.lock().ok().and_then(|s| s.clone());
        let now = match (&self.dropout, saved) {
            (Some(rng), Some(saved)) => Some((rng, rng.replace_state(saved).map_err(error)?)),
            _ => None,
        };
        let y = self.run(x.as_tensor()).map_err(error);
        if let Some((rng, now)) = now {
            rng.replace_state(now).map_err(error)?;
        }
        let y = y?;
        let grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        // Detached: candle's gradients are products of the incoming gradient and
        // the recomputed activations, which still track their ops, so a gradient
        // kept as it is holds the layer's whole recomputed graph. The side store
        // keeps the adapters' gradients until the step ends, so undetached they
        // kept every layer's activations alive at once (Phi-2 size, 1 x 256
        // tokens: ~125 MB a layer, 4 GB over 32: what checkpointing is there to
        // avoid).
        for adapter in self.adapters() {
            if let Some(g) = grads.get(&adapter) {
                add_side_grad(&adapter, g.detach())?;
            }
        }
        Ok(grads.get(x.as_tensor()).map(Tensor::detach))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use multitoken_core::{KvCache, LanguageModel, LogitsSelection};

    use crate::lora::{LoraDropout, LoraLayer};
    use crate::model::CausalLm;

    /// The llama fixture with a rank-2 adapter on every linear (variables),
    /// dropout 0.2 from one shared generator.
    fn adapted(checkpointing: bool) -> (CausalLm, Vec<Var>, LoraDropout) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lm/llama");
        let hf = crate::hf::parse_config(&dir.join("config.json")).unwrap();
        let source = crate::weights::SafetensorsSource::from_dir(&dir, DType::F32, &Device::Cpu).unwrap();
        let mut model = CausalLm::load(&hf.model, &source).unwrap();
        let rng = LoraDropout::new(3);
        let mut vars = Vec::new();
        for (k, (_, linear)) in model.decoder_linears_mut().into_iter().enumerate() {
            let (i, o) = (linear.in_dim(), linear.out_dim());
            let value = |n: usize, salt: usize| (0..n).map(|j| (((j * 31 + salt * 17 + k) % 13) as f32 - 6.0) * 0.01).collect::<Vec<_>>();
            let a = Var::from_tensor(&Tensor::from_vec(value(2 * i, 1), (2, i), &Device::Cpu).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::from_vec(value(2 * o, 2), (o, 2), &Device::Cpu).unwrap()).unwrap();
            linear
                .set_lora(Some(LoraLayer { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale: 2.0, dropout: 0.2, rng: rng.clone() }))
                .unwrap();
            vars.extend([a, b]);
        }
        model.set_gradient_checkpointing(checkpointing);
        (model, vars, rng)
    }

    /// Adapter gradients with checkpointing (collected from the side store)
    /// equal those without it (from `backward`'s store), and the dropout
    /// generator ends where it would have.
    #[test]
    fn checkpointed_layers_give_the_adapters_their_gradients() {
        let ids = Tensor::new(&[[5u32, 17, 33, 60, 2, 99, 41, 12]], &Device::Cpu).unwrap();
        let mut results = Vec::new();
        for checkpointing in [false, true] {
            let (model, vars, rng) = adapted(checkpointing);
            // Tracked, as a training input with items spliced in is (the layers
            // pick their training kernels for it either way).
            let embeds = Var::from_tensor(&model.embed_tokens(&ids).unwrap()).unwrap();
            let embeds = embeds.as_tensor();
            let logits = model.forward_embeds(embeds, None, &mut KvCache::new(model.num_layers()), LogitsSelection::All).unwrap();
            let loss = logits.sqr().unwrap().mean_all().unwrap();
            let store = loss.backward().unwrap();
            if checkpointing {
                // What the checkpointed layers hand back for their inputs, too.
                assert!(!store.get(embeds).unwrap().track_op(), "an input gradient keeps its layer's graph");
            }
            let grads: Vec<Tensor> = vars
                .iter()
                .map(|v| {
                    let side = super::take_grad(v.as_tensor());
                    let main = store.get(v.as_tensor()).cloned();
                    // Each path puts the adapters' gradients in one place only.
                    assert!(side.is_some() == checkpointing && main.is_some() != checkpointing);
                    // A kept gradient that tracked its ops would hold its layer's
                    // recomputed activations until the step ends.
                    assert!(side.as_ref().is_none_or(|g| !g.track_op()), "a side gradient keeps its graph");
                    side.or(main).unwrap()
                })
                .collect();
            let next: u64 = rand::Rng::random(&mut rng.state().unwrap());
            results.push((loss.to_scalar::<f32>().unwrap(), grads, next));
        }
        let ((l0, g0, r0), (l1, g1, r1)) = (&results[0], &results[1]);
        assert_eq!(l0, l1);
        assert_eq!(r0, r1, "the dropout generator ended elsewhere");
        for (a, b) in g0.iter().zip(g1) {
            let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-5 * scale.max(1e-6), "{diff} of {scale}");
        }
    }
}
