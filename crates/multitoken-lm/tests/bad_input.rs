//! Broken checkpoints and inputs give errors that name the file or tensor at
//! fault: missing files, malformed or unsupported config.json, missing and
//! mis-shaped tensors, prompts longer than the context, bad token ids.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use multitoken_core::{KvCache, LogitsSelection};
use multitoken_lm::hf::load_hf_dir;
use multitoken_lm::loader::{load_model, LoadOptions};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), BoxError>;

fn fixture_dir(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lm").join(family)
}

/// A fresh copy of a fixture model directory (top-level files only).
fn copy_fixture(family: &str, case: &str) -> Result<PathBuf, BoxError> {
    let dir = std::env::temp_dir().join(format!("multitoken-lm-bad-{}-{family}-{case}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(fixture_dir(family))? {
        let path = entry?.path();
        if let (true, Some(name)) = (path.is_file(), path.file_name()) {
            std::fs::copy(&path, dir.join(name))?;
        }
    }
    Ok(dir)
}

/// Rewrite `model.safetensors` after `edit` changed its tensors.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) -> TestResult {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path)?;
    Ok(())
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> TestResult {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string(&cfg)?)?;
    Ok(())
}

/// Loading `dir` fails with a message containing every one of `expect`.
fn check_load_error(dir: &Path, expect: &[&str]) -> TestResult {
    let result = load_hf_dir(dir, &LoadOptions::default());
    let _ = std::fs::remove_dir_all(dir);
    let msg = result
        .err()
        .ok_or_else(|| format!("{}: loaded although broken (expected an error with {expect:?})", dir.display()))?
        .to_string();
    for part in expect {
        assert!(msg.contains(part), "error `{msg}` does not mention `{part}`");
    }
    Ok(())
}

#[test]
fn broken_directories_are_named_errors() -> TestResult {
    type Break = fn(&Path) -> TestResult;
    let cases: &[(&str, &str, Break, &[&str])] = &[
        ("llama", "missing-tensor", |d| {
            edit_weights(d, |t| {
                t.remove("model.layers.1.mlp.down_proj.weight");
            })
        }, &["model.layers.1.mlp.down_proj.weight", "missing", "model.safetensors"]),
        ("qwen2", "missing-bias", |d| {
            edit_weights(d, |t| {
                t.remove("model.layers.0.self_attn.k_proj.bias");
            })
        }, &["model.layers.0.self_attn.k_proj.bias"]),
        ("phi2", "wrong-shape", |d| {
            edit_weights(d, |t| {
                if let Ok(z) = Tensor::zeros((64, 32), DType::F32, &Device::Cpu) {
                    t.insert("model.layers.0.self_attn.dense.weight".into(), z);
                }
            })
        }, &["model.layers.0.self_attn.dense.weight", "[64, 64]", "[64, 32]", "model.safetensors"]),
        ("mistral", "bad-json", |d| Ok(std::fs::write(d.join("config.json"), "{ \"model_type\": ")?),
            &["config.json", "malformed JSON"]),
        ("llama", "unknown-type", |d| edit_config(d, |c| c["model_type"] = "gpt2".into()),
            &["config.json", "gpt2", "llama, mistral, qwen2, phi"]),
        ("llama", "missing-field", |d| {
            edit_config(d, |c| {
                if let Some(o) = c.as_object_mut() {
                    o.remove("hidden_size");
                }
            })
        }, &["config.json", "hidden_size"]),
        ("llama", "bad-rope", |d| edit_config(d, |c| c["rope_parameters"]["rope_type"] = "yarn".into()),
            &["config.json", "yarn", "llama3"]),
        ("llama", "bad-heads", |d| edit_config(d, |c| c["num_key_value_heads"] = 3.into()),
            &["num_key_value_heads", "3"]),
        // Issue 23: these loaded and then generated nothing (NaN logits).
        ("llama", "negative-eps", |d| edit_config(d, |c| c["rms_norm_eps"] = (-1e-6).into()),
            &["rms_norm_eps", "must be a positive number, got -0.000001"]),
        ("llama", "zero-rope-theta", |d| edit_config(d, |c| c["rope_parameters"]["rope_theta"] = 0.0.into()),
            &["rope_theta must be a positive number, got 0"]),
        ("llama", "no-config", |d| Ok(std::fs::remove_file(d.join("config.json"))?), &["config.json"]),
        ("llama", "no-weights", |d| Ok(std::fs::remove_file(d.join("model.safetensors"))?),
            &["model.safetensors"]),
        ("llama", "truncated-weights", |d| {
            let path = d.join("model.safetensors");
            let bytes = std::fs::read(&path)?;
            Ok(std::fs::write(&path, &bytes[..bytes.len() / 2])?)
        }, &["model.safetensors"]),
        ("llama", "no-tokenizer", |d| Ok(std::fs::remove_file(d.join("tokenizer.json"))?),
            &["tokenizer.json"]),
        ("llama", "bad-generation-config", |d| Ok(std::fs::write(d.join("generation_config.json"), "[")?),
            &["generation_config.json"]),
    ];
    for (family, case, break_it, expect) in cases {
        let dir = copy_fixture(family, case)?;
        break_it(&dir)?;
        check_load_error(&dir, expect)?;
    }
    Ok(())
}

#[test]
fn bad_paths_are_named_errors() -> TestResult {
    let missing = PathBuf::from("/nonexistent/multitoken/model");
    let text_file = fixture_dir("llama").join("config.json");
    let cases: [(&Path, &[&str]); 2] = [
        (&missing, &["/nonexistent/multitoken/model"]),
        (&text_file, &["config.json", "directory", ".gguf"]),
    ];
    for (path, expect) in cases {
        let msg = load_model(path, &LoadOptions::default())
            .err()
            .ok_or_else(|| format!("{} loaded", path.display()))?
            .to_string();
        for part in expect {
            assert!(msg.contains(part), "error `{msg}` does not mention `{part}`");
        }
    }
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> TestResult {
    let loaded = load_model(&fixture_dir("llama"), &LoadOptions::default())?;
    let model = loaded.model;
    let too_long: Vec<u32> = vec![5; model.max_context() + 1];
    let cases: Vec<(Tensor, Option<Tensor>, &str)> = vec![
        (Tensor::new(too_long.as_slice(), &Device::Cpu)?.unsqueeze(0)?, None, "context of 256"),
        (Tensor::new(&[[3u32, 500]], &Device::Cpu)?, None, "token id 500"),
        (Tensor::new(&[[3u32, 4]], &Device::Cpu)?, Some(Tensor::new(&[[1u32]], &Device::Cpu)?), "attention mask"),
    ];
    for (ids, mask, expect) in cases {
        let mut cache = KvCache::new(model.num_layers());
        let result = model
            .embed_tokens(&ids)
            .and_then(|e| model.forward_embeds(&e, mask.as_ref(), &mut cache, LogitsSelection::Last));
        let e = result.err().ok_or_else(|| format!("accepted bad input (expected an error with `{expect}`)"))?;
        assert!(e.to_string().contains(expect), "error `{e}` does not mention `{expect}`");
    }
    // The cache counts toward the context too.
    let mut cache = KvCache::new(model.num_layers());
    let ids = Tensor::new(&vec![5u32; 250][..], &Device::Cpu)?.unsqueeze(0)?;
    model.forward_embeds(&model.embed_tokens(&ids)?, None, &mut cache, LogitsSelection::Last)?;
    let more = Tensor::new(&[[5u32; 7]], &Device::Cpu)?;
    let err = model.forward_embeds(&model.embed_tokens(&more)?, None, &mut cache, LogitsSelection::Last);
    assert!(err.is_err_and(|e| e.to_string().contains("257")), "250 cached + 7 new must exceed 256");
    Ok(())
}

/// A processor's chat template (`chat_template.jinja`, else llava-hf's
/// `chat_template.json`) wins over the tokenizer's; a malformed one is an error
/// naming the file.
#[test]
fn processor_chat_template_files_are_read() -> TestResult {
    let dir = copy_fixture("llama", "chat-template")?;
    std::fs::write(dir.join("chat_template.json"), r#"{"chat_template": "{{ 'from json' }}"}"#)?;
    let loaded = load_model(&dir, &LoadOptions::default())?;
    assert_eq!(loaded.chat_template.as_deref(), Some("{{ 'from json' }}"));
    std::fs::write(dir.join("chat_template.jinja"), "{{ 'from jinja' }}")?;
    let loaded = load_model(&dir, &LoadOptions::default())?;
    assert_eq!(loaded.chat_template.as_deref(), Some("{{ 'from jinja' }}"));
    std::fs::remove_file(dir.join("chat_template.jinja"))?;
    std::fs::write(dir.join("chat_template.json"), r#"{"template": 3}"#)?;
    // check_load_error removes the directory.
    check_load_error(&dir, &["chat_template.json"])
}

/// Issue 23: `--chat-template my.jinja` with the file missing said "no built-in
/// chat template named `my.jinja`"; a directory was taken for a name too.
#[test]
fn a_template_path_that_is_not_a_file_names_the_file() -> TestResult {
    let loaded = load_model(&fixture_dir("llama"), &LoadOptions::default())?;
    let dir = std::env::temp_dir();
    let missing = dir.join(format!("multitoken-no-such-{}.jinja", std::process::id()));
    let cases = [
        (missing.display().to_string(), "No such file"),
        (dir.display().to_string(), "is a directory, not a file"),
        ("vicuna".to_string(), "no built-in chat template named `vicuna`"),
    ];
    for (spec, expect) in &cases {
        let err = multitoken_lm::multimodal::template_from_spec(spec, &loaded).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(expect), "{spec}: `{err}` should say `{expect}`");
        if spec != "vicuna" {
            assert!(err.contains(spec.as_str()) && !err.contains("built-in"), "{spec}: {err}");
        }
    }
    Ok(())
}
