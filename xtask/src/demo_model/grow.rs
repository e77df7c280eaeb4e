//! `demo-model grow-lm`: more layers for a trained llama-arch LM, appended so
//! that the grown model answers exactly as before until it is trained.
//!
//! Each new layer gets seeded random attention and MLP input weights
//! ([`init_tensor`]: N(0, 0.02²)), unit norms and **zero output projections**
//! (`o_proj`, `down_proj`): it adds nothing to the residual stream, so every
//! logit is unchanged, while Adam moves the zero projections off zero at the
//! first step and the layer starts to learn. Phase 10 of the demo model grew
//! its LM from 3 to 5 layers this way (unlike v4 92.8% before and after the
//! growth, untrained).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::random::init_tensor;

/// The weight matrices of one llama decoder layer and their shapes (`[out,
/// in]`), named as transformers saves them under `model.layers.N.`
/// (`kv_width`: key/value heads × head width).
pub(crate) fn llama_layer_matrices(
    hidden: usize,
    inner: usize,
    kv_width: usize,
) -> [(&'static str, [usize; 2]); 7] {
    [
        ("self_attn.q_proj.weight", [hidden, hidden]),
        ("self_attn.k_proj.weight", [kv_width, hidden]),
        ("self_attn.v_proj.weight", [kv_width, hidden]),
        ("self_attn.o_proj.weight", [hidden, hidden]),
        ("mlp.gate_proj.weight", [inner, hidden]),
        ("mlp.up_proj.weight", [inner, hidden]),
        ("mlp.down_proj.weight", [hidden, inner]),
    ]
}

/// Grows the LM in `lm_dir` (`config.json`, `model.safetensors`) in place to
/// `layers` layers, new weights drawn from `seed`.
pub fn grow_lm(lm_dir: &Path, layers: usize, seed: u64) -> Result<()> {
    let config_path = lm_dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )
    .with_context(|| format!("parsing {}", config_path.display()))?;
    let number = |name: &str| -> Result<usize> {
        config[name]
            .as_u64()
            .map(|n| n as usize)
            .with_context(|| format!("{}: {name} is not a number", config_path.display()))
    };
    let old = number("num_hidden_layers")?;
    let hidden = number("hidden_size")?;
    let inner = number("intermediate_size")?;
    let heads = number("num_attention_heads")?;
    let kv_heads = config["num_key_value_heads"]
        .as_u64()
        .map_or(heads, |n| n as usize);
    if old == 0 {
        bail!(
            "{}: num_hidden_layers is 0, no LM to grow",
            config_path.display()
        );
    }
    if layers <= old {
        bail!(
            "the LM in {} already has {old} layers (asked for {layers})",
            lm_dir.display()
        );
    }
    if heads == 0 || !hidden.is_multiple_of(heads) {
        bail!(
            "{}: hidden_size {hidden} is not a multiple of {heads} heads",
            config_path.display()
        );
    }
    let kv_width = kv_heads * (hidden / heads);

    let weights_path = lm_dir.join("model.safetensors");
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&weights_path, &Device::Cpu)
            .with_context(|| format!("reading {}", weights_path.display()))?;
    if !tensors.contains_key(&format!("model.layers.{}.self_attn.q_proj.weight", old - 1)) {
        bail!(
            "{} has no layer {} although its config says {old} layers",
            weights_path.display(),
            old - 1
        );
    }
    for layer in old..layers {
        let prefix = format!("model.layers.{layer}.");
        for (name, shape) in llama_layer_matrices(hidden, inner, kv_width) {
            let full = format!("{prefix}{name}");
            let tensor =
                if name.starts_with("self_attn.o_proj") || name.starts_with("mlp.down_proj") {
                    Tensor::zeros(&shape, DType::F32, &Device::Cpu)?
                } else {
                    init_tensor(seed, &full, &shape)?
                };
            tensors.insert(full, tensor);
        }
        for norm in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            tensors.insert(
                format!("{prefix}{norm}"),
                Tensor::ones(hidden, DType::F32, &Device::Cpu)?,
            );
        }
    }
    // Written beside and renamed over, so a failure leaves the old LM whole.
    let temporary = lm_dir.join("model.safetensors.growing");
    candle_core::safetensors::save(&tensors, &temporary)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, &weights_path)
        .with_context(|| format!("replacing {}", weights_path.display()))?;
    config["num_hidden_layers"] = serde_json::Value::from(layers);
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("writing {}", config_path.display()))?;
    println!("{}: {old} -> {layers} layers", lm_dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grown LM keeps every old tensor and adds layers whose outputs are
    /// zero, so it computes what the old one did.
    #[test]
    fn new_layers_add_nothing_and_old_weights_stay() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("grow-lm-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config = serde_json::json!({
            "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
            "num_key_value_heads": 1, "num_hidden_layers": 1,
        });
        std::fs::write(dir.join("config.json"), config.to_string())?;
        let mut old = HashMap::new();
        for (name, shape) in [
            ("model.layers.0.self_attn.q_proj.weight", vec![8, 8]),
            ("model.embed_tokens.weight", vec![5, 8]),
        ] {
            old.insert(name.to_string(), init_tensor(7, name, &shape)?);
        }
        candle_core::safetensors::save(&old, dir.join("model.safetensors"))?;

        grow_lm(&dir, 3, 1)?;
        assert!(
            grow_lm(&dir, 3, 1).is_err(),
            "growing to the same depth must fail"
        );
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty)?;
        std::fs::write(
            empty.join("config.json"),
            serde_json::json!({"hidden_size": 8, "intermediate_size": 16,
                "num_attention_heads": 2, "num_hidden_layers": 0})
            .to_string(),
        )?;
        let error = grow_lm(&empty, 2, 1).expect_err("a config with no layers must be refused");
        assert!(
            error.to_string().contains("num_hidden_layers is 0"),
            "{error}"
        );
        let grown = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
        for (name, tensor) in &old {
            let diff = (&grown[name] - tensor)?
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{name} changed");
        }
        for layer in 1..3 {
            let get = |n: &str| grown[&format!("model.layers.{layer}.{n}")].clone();
            let sum = |t: Tensor| -> Result<f32> { Ok(t.abs()?.sum_all()?.to_scalar::<f32>()?) };
            assert_eq!(sum(get("self_attn.o_proj.weight"))?, 0.0);
            assert_eq!(sum(get("mlp.down_proj.weight"))?, 0.0);
            assert!(sum(get("self_attn.q_proj.weight"))? > 0.0);
            assert_eq!(get("self_attn.k_proj.weight").dims(), &[4, 8]);
            assert_eq!(get("mlp.up_proj.weight").dims(), &[16, 8]);
            assert_eq!(
                get("input_layernorm.weight").to_vec1::<f32>()?,
                vec![1.0; 8]
            );
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        assert_eq!(config["num_hidden_layers"], 3);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
