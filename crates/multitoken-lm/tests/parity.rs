//! Parity with transformers on the tiny random models of `tests/fixtures/lm/`
//! (made by `cargo xtask fixtures`): f32 logits within 1e-4, identical greedy
//! ids, left-padded batches, cache-vs-no-cache equality, half dtypes and
//! llama.cpp's interleaved rotary layout.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor, D};
use multitoken_core::{KvCache, LanguageModel, LogitsSelection};
use multitoken_lm::hf::{load_hf_dir, parse_config};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::model::CausalLm;
use multitoken_lm::weights::SafetensorsSource;
use multitoken_lm::{Linear, RopeStyle, WeightSource};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), BoxError>;

const FAMILIES: &[&str] = &["llama", "mistral", "qwen2", "phi2"];

fn fixture_dir(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lm").join(family)
}

/// What transformers recorded for one fixture.
struct Expected {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    batch_ids: Vec<Vec<u32>>,
    batch_mask: Vec<Vec<u32>>,
    batch_greedy_ids: Vec<Vec<u32>>,
    logits: Tensor,
    batch_logits: Tensor,
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect()).unwrap_or_default()
}

fn rows(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array().map(|a| a.iter().map(ids).collect()).unwrap_or_default()
}

fn expected(family: &str) -> Result<Expected, BoxError> {
    expected_in(&fixture_dir(family))
}

fn expected_in(model_dir: &Path) -> Result<Expected, BoxError> {
    let family = model_dir.display();
    let dir = model_dir.join("parity");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let mut tensors = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
    let mut take = |name: &str| tensors.remove(name).ok_or(format!("{family}: no {name} in expected.safetensors"));
    Ok(Expected {
        prompt_ids: ids(&json["prompt_ids"]),
        greedy_ids: ids(&json["greedy_ids"]),
        batch_ids: rows(&json["batch_ids"]),
        batch_mask: rows(&json["batch_mask"]),
        batch_greedy_ids: rows(&json["batch_greedy_ids"]),
        logits: take("logits")?,
        batch_logits: take("batch_logits")?,
    })
}

fn load(family: &str, dtype: DType) -> Result<CausalLm, BoxError> {
    load_in(&fixture_dir(family), dtype)
}

fn load_in(dir: &Path, dtype: DType) -> Result<CausalLm, BoxError> {
    let cfg = parse_config(&dir.join("config.json"))?;
    let weights = SafetensorsSource::from_dir(dir, dtype, &Device::Cpu)?;
    let mut model = CausalLm::load(&cfg.model, &weights)?;
    if let Some(windows) = &cfg.layer_sliding_windows {
        model.set_layer_sliding_windows(windows)?;
    }
    Ok(model)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32, BoxError> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    if a.dims() != b.dims() {
        return Err(format!("shape {:?} vs {:?}", a.dims(), b.dims()).into());
    }
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn row_tensor(ids: &[u32]) -> Result<Tensor, candle_core::Error> {
    Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)
}

/// Greedy decoding through the KV cache: prefill, then one token at a time.
fn greedy(
    model: &CausalLm,
    ids: &Tensor,
    mask: Option<&Tensor>,
    steps: usize,
) -> Result<Vec<Vec<u32>>, BoxError> {
    let b = ids.dim(0)?;
    let mut cache = KvCache::new(model.num_layers());
    let mut logits = model.forward_ids(ids, mask, &mut cache, LogitsSelection::Last)?;
    let mut out = vec![Vec::new(); b];
    for _ in 0..steps {
        let next = logits.to_dtype(DType::F32)?.argmax(D::Minus1)?; // [b]
        for (row, id) in out.iter_mut().zip(next.to_vec1::<u32>()?) {
            row.push(id);
        }
        let ones = Tensor::ones((b, 1), DType::U32, &Device::Cpu)?;
        logits = model.forward_ids(&next.unsqueeze(1)?, Some(&ones), &mut cache, LogitsSelection::Last)?;
    }
    Ok(out)
}

#[test]
fn logits_match_transformers() -> TestResult {
    for family in FAMILIES {
        check_logits(&fixture_dir(family))?;
    }
    Ok(())
}

fn check_logits(dir: &Path) -> TestResult {
    let family = dir.display();
    {
        let exp = expected_in(dir)?;
        let model = load_in(dir, DType::F32)?;
        let mut cache = KvCache::new(model.num_layers());
        let logits = model.forward_ids(&row_tensor(&exp.prompt_ids)?, None, &mut cache, LogitsSelection::All)?;
        let diff = max_abs_diff(&logits, &exp.logits)?;
        assert!(diff < 1e-4, "{family}: logits differ from transformers by {diff}");
        assert_eq!(cache.seen, exp.prompt_ids.len(), "{family}: cache length");
    }
    Ok(())
}

#[test]
fn greedy_ids_match_transformers() -> TestResult {
    for family in FAMILIES {
        check_greedy(&fixture_dir(family))?;
    }
    Ok(())
}

fn check_greedy(dir: &Path) -> TestResult {
    let family = dir.display();
    {
        let exp = expected_in(dir)?;
        let model = load_in(dir, DType::F32)?;
        let got = greedy(&model, &row_tensor(&exp.prompt_ids)?, None, exp.greedy_ids.len())?;
        assert_eq!(got[0], exp.greedy_ids, "{family}: greedy ids");
    }
    Ok(())
}

/// The left-padded batch: logits at real positions, and batched greedy decoding.
#[test]
fn left_padded_batch_matches_transformers() -> TestResult {
    for family in FAMILIES {
        check_batch(&fixture_dir(family))?;
    }
    Ok(())
}

fn check_batch(dir: &Path) -> TestResult {
    let family = dir.display();
    {
        let exp = expected_in(dir)?;
        let model = load_in(dir, DType::F32)?;
        let (b, t) = (exp.batch_ids.len(), exp.batch_ids[0].len());
        let ids = Tensor::new(exp.batch_ids.concat(), &Device::Cpu)?.reshape((b, t))?;
        let mask = Tensor::new(exp.batch_mask.concat(), &Device::Cpu)?.reshape((b, t))?;
        let mut cache = KvCache::new(model.num_layers());
        let logits = model.forward_ids(&ids, Some(&mask), &mut cache, LogitsSelection::All)?;
        for (r, row_mask) in exp.batch_mask.iter().enumerate() {
            for (p, m) in row_mask.iter().enumerate() {
                if *m == 1 {
                    let diff = max_abs_diff(&logits.i((r, p))?, &exp.batch_logits.i((r, p))?)?;
                    assert!(diff < 1e-4, "{family}: batch row {r} position {p} differs by {diff}");
                }
            }
        }
        let steps = exp.batch_greedy_ids[0].len();
        // generate pads a row after its EOS (id 2); compare up to and including it.
        let until_eos = |row: &Vec<u32>| -> Vec<u32> {
            let end = row.iter().position(|&id| id == 2).map_or(row.len(), |p| p + 1);
            row[..end].to_vec()
        };
        let got: Vec<Vec<u32>> = greedy(&model, &ids, Some(&mask), steps)?.iter().map(until_eos).collect();
        let want: Vec<Vec<u32>> = exp.batch_greedy_ids.iter().map(until_eos).collect();
        assert_eq!(got, want, "{family}: batched greedy ids");
    }
    Ok(())
}

/// Logits computed position by position through the cache equal one full pass,
/// also when the prefill is split in chunks (mistral's window crosses chunks).
#[test]
fn cache_matches_full_pass() -> TestResult {
    for family in FAMILIES {
        check_cache(&fixture_dir(family))?;
    }
    Ok(())
}

fn check_cache(dir: &Path) -> TestResult {
    let family = dir.display();
    {
        let exp = expected_in(dir)?;
        let model = load_in(dir, DType::F32)?;
        let ids = &exp.prompt_ids;
        let mut full_cache = KvCache::new(model.num_layers());
        let full = model.forward_ids(&row_tensor(ids)?, None, &mut full_cache, LogitsSelection::All)?;
        for chunk in [1usize, 5] {
            let mut cache = KvCache::new(model.num_layers());
            let mut start = 0;
            while start < ids.len() {
                let end = (start + chunk).min(ids.len());
                let part = model.forward_ids(&row_tensor(&ids[start..end])?, None, &mut cache, LogitsSelection::All)?;
                let diff = max_abs_diff(&part, &full.narrow(1, start, end - start)?)?;
                assert!(diff < 1e-5, "{family}: chunk {chunk} at {start} differs by {diff}");
                start = end;
            }
        }
    }
    Ok(())
}

/// f16 / bf16 stay close to the f32 reference.
#[test]
fn half_dtypes_stay_close() -> TestResult {
    for family in FAMILIES {
        let exp = expected(family)?;
        for (dtype, tol) in [(DType::BF16, 0.1f32), (DType::F16, 0.02)] {
            let model = load(family, dtype)?;
            assert_eq!(model.dtype(), dtype);
            let mut cache = KvCache::new(model.num_layers());
            let logits = model.forward_ids(&row_tensor(&exp.prompt_ids)?, None, &mut cache, LogitsSelection::All)?;
            assert_eq!(logits.dtype(), dtype);
            let diff = max_abs_diff(&logits, &exp.logits)?;
            assert!(diff < tol, "{family} {dtype:?}: logits differ by {diff}");
        }
    }
    Ok(())
}

/// `--dtype bf16` through the loader on the CPU: linears in bf16, activations
/// in f32 (`LoadOptions::cpu_bf16`). The logits stay near the f32 model's, for
/// a short prompt (the matrix-vector products) and a 48-token one (the AMX
/// tiles where the CPU has them), and they do differ from them (the weights and
/// activations really were rounded).
#[test]
fn cpu_bf16_linears_stay_close() -> TestResult {
    for family in FAMILIES {
        let dir = fixture_dir(family);
        let mixed = load_hf_dir(&dir, &LoadOptions { dtype: DType::BF16, ..LoadOptions::default() })?;
        assert_eq!(mixed.model.dtype(), DType::F32, "{family}: activations stay f32");
        let reference = load_hf_dir(&dir, &LoadOptions::default())?;
        let long: Vec<u32> = (0..48u32).map(|i| (i * 37 + 5) % 128).collect();
        for ids in [expected(family)?.prompt_ids, long] {
            let run = |model: &dyn LanguageModel| -> Result<Tensor, BoxError> {
                let mut cache = KvCache::new(model.num_layers());
                let embeds = model.embed_tokens(&row_tensor(&ids)?)?;
                Ok(model.forward_embeds(&embeds, None, &mut cache, LogitsSelection::All)?)
            };
            let diff = max_abs_diff(&run(mixed.model.as_ref())?, &run(reference.model.as_ref())?)?;
            assert!(diff < 0.05, "{family}, {} ids: bf16 linears' logits differ by {diff}", ids.len());
            assert!(diff > 0.0, "{family}, {} ids: the logits are f32's exactly", ids.len());
        }
    }
    Ok(())
}

/// A quantized linear under `--dtype bf16` ([`Linear::with_bf16_products`]):
/// decode-sized products keep the exact quantized kernels; a prefill-sized one
/// runs in bf16 on AMX or AVX-512 BF16 (close to the exact product, not
/// equal), and stays exact where the CPU has neither.
#[test]
fn quantized_linears_prefill_in_bf16_only_where_the_cpu_has_it() -> TestResult {
    let dev = Device::Cpu;
    let (n, k) = (96, 128);
    let w = Tensor::randn(0f32, 0.1, (n, k), &dev)?;
    for format in [multitoken_lm::quantize::Quantization::Q4_1, multitoken_lm::quantize::Quantization::Q8_0] {
        let q = multitoken_lm::quantize::quantize_matrix("w", &w, format)?;
        let exact = Linear::quantized(q.clone(), k, n, None);
        let bf16 = Linear::quantized(q, k, n, None).with_bf16_products();
        let fast = multitoken_kernels::bf16::kernel() != multitoken_kernels::bf16::Kernel::Portable;
        for rows in [5, 40] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev)?;
            let diff = max_abs_diff(&bf16.forward(&x)?, &exact.forward(&x)?)?;
            if rows < 16 || !fast {
                assert_eq!(diff, 0.0, "{format} {rows} rows");
            } else {
                assert!(diff > 0.0 && diff < 0.05, "{format} {rows} rows: {diff}");
            }
        }
    }
    Ok(())
}

/// `load_hf_dir` brings tokenizer, template and generation defaults along.
#[test]
fn hf_dir_loads_everything() -> TestResult {
    for family in FAMILIES {
        let loaded = load_hf_dir(&fixture_dir(family), &LoadOptions::default())?;
        assert_eq!(loaded.name, *family);
        assert_eq!(loaded.generation.eos_token_ids, vec![2], "{family}");
        assert_eq!(loaded.generation.temperature, Some(0.0), "{family}: do_sample false means greedy");
        assert_eq!(loaded.special_tokens.eos_token.as_deref(), Some("</s>"), "{family}");
        assert_eq!(loaded.special_tokens.bos_token_id, Some(1), "{family}");
        let exp = expected(family)?;
        let enc = loaded.tokenizer.encode("The quick brown fox jumps over", true)?;
        assert_eq!(enc.get_ids(), exp.prompt_ids.as_slice(), "{family}: tokenizer");
        assert_eq!(loaded.chat_template.is_some(), *family == "qwen2", "{family}: chat template");
        assert_eq!(loaded.model.vocab_size(), 128);
    }
    Ok(())
}

/// llama.cpp stores q/k rows permuted so that rotary pairs are adjacent; with
/// [`RopeStyle::Interleaved`] such weights must give the same logits.
#[test]
fn interleaved_rope_matches_half() -> TestResult {
    struct Permuted<'a> {
        inner: &'a SafetensorsSource,
        heads: usize,
        kv_heads: usize,
    }
    impl WeightSource for Permuted<'_> {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        fn contains(&self, name: &str) -> bool {
            self.inner.contains(name)
        }
        fn tensor(&self, name: &str, shape: &[usize]) -> multitoken_lm::Result<Tensor> {
            self.inner.tensor(name, shape)
        }
        fn linear(&self, prefix: &str, i: usize, o: usize, bias: bool) -> multitoken_lm::Result<Linear> {
            let heads = if prefix.ends_with("q_proj") {
                self.heads
            } else if prefix.ends_with("k_proj") {
                self.kv_heads
            } else {
                return self.inner.linear(prefix, i, o, bias);
            };
            // convert_hf_to_gguf.py: reshape(n_head, 2, hd / 2, in).swapaxes(1, 2).
            let w = self.inner.tensor(&format!("{prefix}.weight"), &[o, i])?;
            let w = w.reshape((heads, 2, o / heads / 2, i))?.transpose(1, 2)?.contiguous()?.reshape((o, i))?;
            Linear::dense(w, None)
        }
    }
    for family in ["llama", "mistral"] {
        let dir = fixture_dir(family);
        let mut cfg = parse_config(&dir.join("config.json"))?.model;
        let source = SafetensorsSource::from_dir(&dir, DType::F32, &Device::Cpu)?;
        cfg.rope_style = RopeStyle::Interleaved;
        let permuted = Permuted { inner: &source, heads: cfg.num_heads, kv_heads: cfg.num_kv_heads };
        let model = CausalLm::load(&cfg, &permuted)?;
        let exp = expected(family)?;
        let mut cache = KvCache::new(model.num_layers());
        let logits = model.forward_ids(&row_tensor(&exp.prompt_ids)?, None, &mut cache, LogitsSelection::All)?;
        let diff = max_abs_diff(&logits, &exp.logits)?;
        assert!(diff < 1e-4, "{family}: interleaved logits differ by {diff}");
    }
    Ok(())
}

/// More configurations, too big to commit: `lm.py --variants DIR` writes them and
/// `MULTITOKEN_LM_PARITY_DIR=DIR` points this test at them.
#[test]
fn extra_parity_dirs() -> TestResult {
    let Some(root) = std::env::var_os("MULTITOKEN_LM_PARITY_DIR") else {
        eprintln!("skipped: set MULTITOKEN_LM_PARITY_DIR to a dir made by `xtask/fixtures/lm.py --variants DIR`");
        return Ok(());
    };
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("parity/expected.json").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "MULTITOKEN_LM_PARITY_DIR holds no model dirs with parity/expected.json");
    for dir in &dirs {
        check_logits(dir)?;
        check_greedy(dir)?;
        check_batch(dir)?;
        check_cache(dir)?;
        eprintln!("ok: {}", dir.display());
    }
    Ok(())
}
