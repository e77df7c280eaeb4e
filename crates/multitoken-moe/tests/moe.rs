//! multitoken-moe end to end: parity with the PyTorch reference of Cephalo's MoE
//! (`tests/fixtures/moe`, made by `cargo xtask fixtures moe`), experts that
//! really come from their own checkpoints, identical experts = the base model
//! (llama, qwen2, phi-2), sparse = dense dispatch, LoRA experts, multimodal
//! directories, gate files and gate training, and bad input.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use multitoken_core::{KvCache, LogitsSelection};
use multitoken_lm::loader::{load_model, LoadOptions};
use multitoken_moe::build::{build, BuildConfig};
use multitoken_moe::gate::{read_prompts, save_gates, set_gate, train_gates, TrainGateConfig};
use multitoken_moe::load::load_moe_lm;
use multitoken_moe::{Dispatch, Routing};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), BoxError>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn moe_fixture(name: &str) -> PathBuf {
    fixtures().join("moe").join(name)
}

/// A fresh scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p =
            std::env::temp_dir().join(format!("multitoken-moe-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }
    fn path(&self, sub: &str) -> PathBuf {
        self.0.join(sub)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn build_cfg(
    base: &Path,
    experts: &[PathBuf],
    k: usize,
    routing: Routing,
    out: &Path,
) -> BuildConfig {
    BuildConfig {
        base: base.to_path_buf(),
        experts: experts.to_vec(),
        k,
        routing,
        out: out.to_path_buf(),
        seed: 7,
        quantize: None,
    }
}

fn fixture_experts() -> Vec<PathBuf> {
    (0..3).map(|j| moe_fixture(&format!("expert{j}"))).collect()
}

fn prompt_ids() -> Result<Vec<u32>, BoxError> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(moe_fixture("expected.json"))?)?;
    Ok(json["prompt_ids"]
        .as_array()
        .ok_or("no prompt_ids")?
        .iter()
        .filter_map(|v| v.as_u64())
        .map(|v| v as u32)
        .collect())
}

/// Logits `[1, T, V]` of a model directory loaded through `load_model` (the MoE hook included).
fn logits_of(dir: &Path, ids: &[u32]) -> Result<Tensor, BoxError> {
    logits_with(dir, ids, &LoadOptions::default())
}

/// [`logits_of`] with `opts` (a `--quantize`, say).
fn logits_with(dir: &Path, ids: &[u32], opts: &LoadOptions) -> Result<Tensor, BoxError> {
    let lm = load_model(dir, opts)?;
    let ids = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let embeds = lm.model.embed_tokens(&ids)?;
    Ok(lm
        .model
        .forward_embeds(&embeds, None, &mut KvCache::default(), LogitsSelection::All)?)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32, BoxError> {
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

#[test]
fn matches_the_pytorch_reference_of_cephalos_layer() -> TestResult {
    let expected =
        candle_core::safetensors::load(moe_fixture("expected.safetensors"), &Device::Cpu)?;
    let ids = prompt_ids()?;
    for k in [1, 2] {
        for routing in [Routing::Cephalo, Routing::Renormalize] {
            let scratch = Scratch::new("parity");
            let out = scratch.path("moe");
            build(&build_cfg(
                &moe_fixture("base"),
                &fixture_experts(),
                k,
                routing,
                &out,
            ))?;
            set_gate(&out, &moe_fixture("gates.safetensors"))?;
            let got = logits_of(&out, &ids)?;
            let name = format!(
                "logits_k{k}_{}",
                if routing == Routing::Cephalo {
                    "cephalo"
                } else {
                    "renormalize"
                }
            );
            let want = expected.get(&name).ok_or(format!("no {name}"))?;
            let err = max_diff(&got, want)?;
            println!("{name}: max |diff| = {err:e}");
            assert!(err < 1e-4, "{name}: max |diff| {err}");
            // Sparse dispatch computes what computing every expert computes.
            let dense = load_moe_lm(&out, &LoadOptions::default(), Dispatch::Dense)?.model;
            let t = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let dense_logits =
                dense.forward_ids(&t, None, &mut KvCache::default(), LogitsSelection::All)?;
            assert!(max_diff(&got, &dense_logits)? < 1e-5);
        }
    }
    Ok(())
}

#[test]
fn each_expert_comes_from_its_own_checkpoint() -> TestResult {
    let scratch = Scratch::new("own");
    let out = scratch.path("moe");
    build(&build_cfg(
        &moe_fixture("base"),
        &fixture_experts(),
        1,
        Routing::Cephalo,
        &out,
    ))?;
    let built = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)?;
    let base = candle_core::safetensors::load(moe_fixture("base/model.safetensors"), &Device::Cpu)?;
    for j in 0..3 {
        let expert = candle_core::safetensors::load(
            moe_fixture(&format!("expert{j}/model.safetensors")),
            &Device::Cpu,
        )?;
        for l in 0..2 {
            for m in ["gate_proj", "up_proj", "down_proj"] {
                let got = built
                    .get(&format!("model.layers.{l}.mlp.experts.{j}.{m}.weight"))
                    .ok_or("expert tensor missing")?;
                let own = expert
                    .get(&format!("model.layers.{l}.mlp.{m}.weight"))
                    .ok_or("fixture tensor missing")?;
                let base_w = base
                    .get(&format!("model.layers.{l}.mlp.{m}.weight"))
                    .ok_or("base tensor missing")?;
                assert_eq!(
                    max_diff(got, own)?,
                    0.0,
                    "expert {j} layer {l} {m} is not the expert's own"
                );
                assert!(
                    max_diff(got, base_w)? > 1e-3,
                    "expert {j} layer {l} {m} equals the base's"
                );
            }
        }
        // Attention comes from the base, not the expert.
        let q = built
            .get("model.layers.0.self_attn.q_proj.weight")
            .ok_or("q_proj missing")?;
        assert_eq!(
            max_diff(
                q,
                base.get("model.layers.0.self_attn.q_proj.weight")
                    .ok_or("base q")?
            )?,
            0.0
        );
        assert!(
            max_diff(
                q,
                expert
                    .get("model.layers.0.self_attn.q_proj.weight")
                    .ok_or("expert q")?
            )? > 1e-3
        );
    }
    assert!(
        !built.contains_key("model.layers.0.mlp.gate_proj.weight"),
        "the base MLP is not kept"
    );
    let moe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("moe.json"))?)?;
    assert_eq!(moe["k"], 1);
    assert_eq!(moe["num_expert_models"], 3);
    assert_eq!(moe["routing"], "cephalo");
    assert_eq!(moe["experts"].as_array().map(Vec::len), Some(3));
    Ok(())
}

#[test]
fn identical_experts_give_the_base_model() -> TestResult {
    let ids: Vec<u32> = vec![5, 17, 33, 60, 2, 99, 41, 12];
    for family in ["llama", "qwen2", "phi2"] {
        let base = fixtures().join("lm").join(family);
        let want = logits_of(&base, &ids)?;
        for (k, routing) in [
            (1, Routing::Cephalo),
            (2, Routing::Renormalize),
            (2, Routing::Cephalo),
        ] {
            let scratch = Scratch::new(family);
            let out = scratch.path("moe");
            build(&build_cfg(
                &base,
                &[base.clone(), base.clone()],
                k,
                routing,
                &out,
            ))?;
            let got = logits_of(&out, &ids)?;
            let err = max_diff(&got, &want)?;
            assert!(err < 1e-4, "{family} k={k} {routing:?}: MoE of identical experts differs from the base by {err}");
        }
    }
    Ok(())
}

#[test]
fn lora_adapters_are_merged_per_expert() -> TestResult {
    let scratch = Scratch::new("lora");
    let adapter = scratch.path("adapter");
    std::fs::create_dir_all(&adapter)?;
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["up_proj"], "base_model_name_or_path": "base"}"#,
    )?;
    let a = (Tensor::arange(0f32, 64.0, &Device::Cpu)?.reshape((2, 32))? * 0.01)?;
    let b = (Tensor::arange(0f32, 128.0, &Device::Cpu)?.reshape((64, 2))? * -0.01)?;
    let mut map = std::collections::HashMap::new();
    map.insert(
        "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight".to_string(),
        a.clone(),
    );
    map.insert(
        "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight".to_string(),
        b.clone(),
    );
    candle_core::safetensors::save(&map, adapter.join("adapter_model.safetensors"))?;
    let out = scratch.path("moe");
    build(&build_cfg(
        &moe_fixture("base"),
        &[moe_fixture("expert0"), adapter.clone()],
        1,
        Routing::Cephalo,
        &out,
    ))?;
    let built = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)?;
    let base = candle_core::safetensors::load(moe_fixture("base/model.safetensors"), &Device::Cpu)?;
    let w = base
        .get("model.layers.1.mlp.up_proj.weight")
        .ok_or("base up_proj")?;
    let want = (w + (b.matmul(&a)? * 2.0)?)?;
    let got = built
        .get("model.layers.1.mlp.experts.1.up_proj.weight")
        .ok_or("merged up_proj")?;
    assert!(max_diff(got, &want)? < 1e-6);
    let untouched = built
        .get("model.layers.0.mlp.experts.1.up_proj.weight")
        .ok_or("layer 0 up_proj")?;
    assert_eq!(
        max_diff(
            untouched,
            base.get("model.layers.0.mlp.up_proj.weight")
                .ok_or("base")?
        )?,
        0.0
    );

    // An adapter with no LoRA on any MLP would silently be the base MLP: refused.
    let attn_only = scratch.path("attn-only");
    std::fs::create_dir_all(&attn_only)?;
    std::fs::copy(
        adapter.join("adapter_config.json"),
        attn_only.join("adapter_config.json"),
    )?;
    let mut map = std::collections::HashMap::new();
    map.insert(
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight".to_string(),
        a,
    );
    map.insert(
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight".to_string(),
        Tensor::zeros((32, 2), DType::F32, &Device::Cpu)?,
    );
    candle_core::safetensors::save(&map, attn_only.join("adapter_model.safetensors"))?;
    let err = build(&build_cfg(
        &moe_fixture("base"),
        &[attn_only],
        1,
        Routing::Cephalo,
        &scratch.path("bad"),
    ))
    .err()
    .ok_or("accepted")?;
    assert!(err.to_string().contains("changes no MLP weight"), "{err}");
    Ok(())
}

#[test]
fn multimodal_bases_keep_their_shell() -> TestResult {
    let scratch = Scratch::new("mm");
    let base = scratch.path("base");
    std::fs::create_dir_all(base.join("lm"))?;
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(moe_fixture("base").join(f), base.join("lm").join(f))?;
    }
    std::fs::write(
        base.join("multitoken.json"),
        r#"{"base_model": "lm", "modalities": []}"#,
    )?;
    std::fs::write(base.join("notes.txt"), "kept")?;
    let out = scratch.path("moe");
    let report = build(&build_cfg(
        &base,
        &fixture_experts(),
        2,
        Routing::Cephalo,
        &out,
    ))?;
    assert_eq!(report.lm_dir, out.join("lm"));
    assert!(out.join("multitoken.json").is_file() && out.join("notes.txt").is_file());
    assert!(out.join("lm/moe.json").is_file() && out.join("lm/tokenizer.json").is_file());
    let mm = multitoken_lm::multimodal::MultimodalModel::load(&out, &LoadOptions::default())?;
    assert_eq!(mm.lm.model.num_layers(), 2);
    // The gate file reaches the LM part through the multimodal directory.
    set_gate(&out, &moe_fixture("gates.safetensors"))?;
    Ok(())
}

#[test]
fn gate_training_separates_the_experts() -> TestResult {
    let scratch = Scratch::new("train");
    let out = scratch.path("moe");
    build(&build_cfg(
        &moe_fixture("base"),
        &fixture_experts(),
        1,
        Routing::Cephalo,
        &out,
    ))?;
    let prompts = scratch.path("prompts.jsonl");
    std::fs::write(
        &prompts,
        concat!(
            "{\"text\": \"aaaa aaaa\", \"expert\": 0}\n",
            "{\"text\": \"abab\", \"expert\": 0}\n",
            "{\"text\": \"}}}} ~~~~ ||||\", \"expert\": 1}\n",
            "{\"text\": \"0123456789\", \"expert\": 2}\n",
        ),
    )?;
    let cfg = TrainGateConfig {
        epochs: 300,
        lr: 0.05,
        loss_steps: 100,
        layer_offset: 1,
    };
    let gates = train_gates(&out, &prompts, &cfg)?;
    assert_eq!(gates.len(), 2);
    let gate_file = scratch.path("gates.safetensors");
    save_gates(&gates, &gate_file)?;
    set_gate(&out, &gate_file)?;
    // The stored gates are the trained ones, and the model still loads and runs.
    let built = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)?;
    assert!(
        max_diff(
            built.get("model.layers.0.mlp.gate.weight").ok_or("gate")?,
            &gates[0].0
        )? < 1e-6
    );
    logits_of(&out, &[5, 6, 7])?;
    // An offset past the last hidden state is refused.
    let too_far = TrainGateConfig {
        layer_offset: 2,
        ..cfg
    };
    let err = train_gates(&out, &prompts, &too_far)
        .err()
        .ok_or("accepted")?;
    assert!(err.to_string().contains("layer offset"), "{err}");
    Ok(())
}

/// Token ids the load-option tests run through an MoE of identical experts.
const OPTION_IDS: [u32; 8] = [5, 17, 33, 60, 2, 99, 41, 12];

/// An MoE of two copies of the llama fixture loaded with `opts` must equal the
/// fixture loaded with `opts`, and differ from the MoE loaded with the
/// defaults (the option reached every expert, and did something). Returns the
/// fixture's logits under `opts`.
fn identical_experts_follow(opts: &LoadOptions, flag: &str, scratch: &Scratch) -> Result<Tensor, BoxError> {
    let base = fixtures().join("lm/llama");
    let want = logits_with(&base, &OPTION_IDS, opts)?;
    let plain = scratch.path("plain");
    build(&build_cfg(&base, &[base.clone(), base.clone()], 1, Routing::Cephalo, &plain))?;
    let default = logits_of(&plain, &OPTION_IDS)?;
    let asked = logits_with(&plain, &OPTION_IDS, opts)?;
    assert_eq!(asked.dtype(), DType::F32, "{flag}: the activations stay f32");
    assert!(max_diff(&asked, &want)? < 1e-4, "{flag} on an MoE: {}", max_diff(&asked, &want)?);
    assert!(max_diff(&asked, &default)? > 0.0, "{flag} on an MoE changed nothing");
    Ok(want)
}

/// `moe build --quantize` (recorded in moe.json) and a loader's `--quantize`
/// both quantize every expert's linears: an MoE of identical experts then
/// equals the base quantized the same way, and differs from the dense MoE.
/// A format whose block the model's rows cannot take is refused at build.
#[test]
fn quantized_moes_quantize_every_expert() -> TestResult {
    use multitoken_lm::quantize::Quantization;
    let base = fixtures().join("lm/llama");
    let q8 = LoadOptions { quantize: Some(Quantization::Q8_0), ..LoadOptions::default() };
    let scratch = Scratch::new("quantize");
    let want = identical_experts_follow(&q8, "--quantize q8_0", &scratch)?;

    let recorded = scratch.path("recorded");
    let mut cfg = build_cfg(&base, &[base.clone(), base.clone()], 1, Routing::Cephalo, &recorded);
    cfg.quantize = Some(Quantization::Q8_0);
    build(&cfg)?;
    let moe: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(recorded.join("moe.json"))?)?;
    assert_eq!(moe["quantize"], "q8_0");
    let got = logits_of(&recorded, &OPTION_IDS)?;
    assert!(max_diff(&got, &want)? < 1e-4, "moe build --quantize: {}", max_diff(&got, &want)?);

    let mut cfg = build_cfg(&base, &[base.clone()], 1, Routing::Cephalo, &scratch.path("q4k"));
    cfg.quantize = Some(Quantization::Q4K);
    expect_error(build(&cfg), "not a multiple of the format's block of 256 weights")?;
    Ok(())
}

/// `--dtype bf16` on the CPU keeps every expert's linears in bf16 (with f32
/// activations), as it does a plain model's.
#[test]
fn bf16_moes_keep_every_expert_in_bf16() -> TestResult {
    let bf16 = LoadOptions { dtype: DType::BF16, ..LoadOptions::default() };
    identical_experts_follow(&bf16, "--dtype bf16", &Scratch::new("bf16"))?;
    Ok(())
}

fn expect_error(
    result: Result<impl std::fmt::Debug, multitoken_moe::Error>,
    needle: &str,
) -> TestResult {
    match result {
        Ok(v) => Err(format!("accepted, expected an error containing `{needle}`: {v:?}").into()),
        Err(e) if e.to_string().contains(needle) => Ok(()),
        Err(e) => Err(format!("error `{e}` does not mention `{needle}`").into()),
    }
}

#[test]
fn bad_input_gets_clear_errors() -> TestResult {
    let scratch = Scratch::new("bad");
    let base = moe_fixture("base");
    // Another architecture / shape.
    let qwen = fixtures().join("lm/qwen2");
    expect_error(
        build(&build_cfg(
            &base,
            &[qwen],
            1,
            Routing::Cephalo,
            &scratch.path("a"),
        )),
        "architecture",
    )?;
    let phi = fixtures().join("lm/phi2");
    expect_error(
        build(&build_cfg(
            &base,
            &[phi],
            1,
            Routing::Cephalo,
            &scratch.path("b"),
        )),
        "architecture",
    )?;
    // k larger than the number of experts.
    expect_error(
        build(&build_cfg(
            &base,
            &fixture_experts(),
            4,
            Routing::Cephalo,
            &scratch.path("c"),
        )),
        "--k 4",
    )?;
    // A missing MLP tensor, and a mis-shaped one.
    let broken = scratch.path("broken");
    std::fs::create_dir_all(&broken)?;
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(moe_fixture("expert0").join(f), broken.join(f))?;
    }
    let mut tensors =
        candle_core::safetensors::load(moe_fixture("expert0/model.safetensors"), &Device::Cpu)?;
    tensors.remove("model.layers.1.mlp.down_proj.weight");
    candle_core::safetensors::save(&tensors, broken.join("model.safetensors"))?;
    expect_error(
        build(&build_cfg(
            &base,
            std::slice::from_ref(&broken),
            1,
            Routing::Cephalo,
            &scratch.path("d"),
        )),
        "`model.layers.1.mlp.down_proj.weight` is missing",
    )?;
    tensors.insert(
        "model.layers.1.mlp.down_proj.weight".into(),
        Tensor::zeros((32, 63), DType::F32, &Device::Cpu)?,
    );
    candle_core::safetensors::save(&tensors, broken.join("model.safetensors"))?;
    expect_error(
        build(&build_cfg(
            &base,
            &[broken],
            1,
            Routing::Cephalo,
            &scratch.path("e"),
        )),
        "has shape [32, 63]",
    )?;
    // No experts; an output directory in use.
    expect_error(
        build(&build_cfg(
            &base,
            &[],
            1,
            Routing::Cephalo,
            &scratch.path("f"),
        )),
        "no experts",
    )?;
    expect_error(
        build(&build_cfg(
            &base,
            &fixture_experts(),
            1,
            Routing::Cephalo,
            &moe_fixture(""),
        )),
        "not empty",
    )?;

    // Gate files of the wrong shape, missing layers, extra keys.
    let out = scratch.path("moe");
    build(&build_cfg(
        &base,
        &fixture_experts(),
        1,
        Routing::Cephalo,
        &out,
    ))?;
    let mut gates = candle_core::safetensors::load(moe_fixture("gates.safetensors"), &Device::Cpu)?;
    let bad_gate = scratch.path("gates.safetensors");
    gates.insert(
        "layers.1.gate.weight".into(),
        Tensor::zeros((2, 32), DType::F32, &Device::Cpu)?,
    );
    candle_core::safetensors::save(&gates, &bad_gate)?;
    expect_error(
        set_gate(&out, &bad_gate),
        "`layers.1.gate.weight` has shape [2, 32], expected [3, 32]",
    )?;
    gates.remove("layers.1.gate.weight");
    candle_core::safetensors::save(&gates, &bad_gate)?;
    expect_error(
        set_gate(&out, &bad_gate),
        "no tensor `layers.1.gate.weight`",
    )?;
    gates.insert(
        "layers.1.gate.weight".into(),
        Tensor::zeros((3, 32), DType::F32, &Device::Cpu)?,
    );
    gates.insert(
        "layers.2.gate.bias".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    );
    candle_core::safetensors::save(&gates, &bad_gate)?;
    expect_error(
        set_gate(&out, &bad_gate),
        "unexpected tensor `layers.2.gate.bias`",
    )?;
    expect_error(
        set_gate(&base, &moe_fixture("gates.safetensors")),
        "not a mixture-of-experts model",
    )?;

    // Prompts with no expert label, an unknown expert, an expert without prompts.
    let prompts = scratch.path("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"text\": \"hi\", \"expert\": 0}\n{\"text\": \"no label\"}\n",
    )?;
    expect_error(read_prompts(&prompts, 2), "line 2: no `expert` label")?;
    std::fs::write(&prompts, "{\"text\": \"hi\", \"expert\": 5}\n")?;
    expect_error(read_prompts(&prompts, 2), "line 1: expert 5 does not exist")?;
    std::fs::write(&prompts, "{\"text\": \"hi\", \"expert\": 0}\n")?;
    expect_error(read_prompts(&prompts, 2), "no prompt for expert 1")?;

    // A bad moe.json: k above the expert count.
    std::fs::write(out.join("moe.json"), r#"{"k": 5, "num_expert_models": 3}"#)?;
    let err = load_model(&out, &LoadOptions::default())
        .err()
        .ok_or("accepted")?;
    assert!(
        err.to_string()
            .contains("k = 5 must be between 1 and the number of experts (3)"),
        "{err}"
    );
    Ok(())
}
