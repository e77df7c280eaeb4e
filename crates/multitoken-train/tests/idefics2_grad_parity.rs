//! One training step of an Idefics2 checkpoint against PyTorch
//! (`xtask/fixtures/idefics2_train.py`): `TrainableModel::load` on the tiny
//! `tests/fixtures/idefics2/split` checkpoint (rewritten once as a
//! `multitoken.json` directory under `$MULTITOKEN_WEIGHTS/imports`, here a
//! temporary directory) turns the rows of `tests/fixtures/idefics2_train/rows.jsonl`
//! into transformers' ids and labels, and a batch of both rows gives transformers'
//! loss (within 1e-5) and gradients (within 1e-4, max abs): every connector tensor
//! in stage 1 (`--stage projectors`); in stage 2 (`--stage lora`) every LoRA A and
//! B on the text model's q_proj / v_proj and the connector's latents and norms.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use multitoken_core::{ItemsByKey, PreparedInput};
use multitoken_train::data::read_jsonl;
use multitoken_train::model::{LoraSettings, TrainParts, TrainableModel};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const LOSS_TOLERANCE: f32 = 1e-5;
const GRAD_TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn checkpoint() -> PathBuf {
    fixtures().join("idefics2/split")
}

/// The temporary `MULTITOKEN_WEIGHTS` of this test process.
fn weights_dir() -> PathBuf {
    std::env::temp_dir().join(format!(
        "multitoken-idefics2-grad-parity-{}",
        std::process::id()
    ))
}

/// Points `MULTITOKEN_WEIGHTS` at a temporary directory (the export must not
/// land in the user's cache) and exports the checkpoint there once, so that
/// the tests, which run in parallel, find it ready. Returns the imports directory.
fn imports() -> Result<&'static Path, Box<dyn std::error::Error>> {
    static IMPORTS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = IMPORTS.get_or_init(|| {
        multitoken_vision::link();
        multitoken_vlm::link();
        std::env::set_var("MULTITOKEN_WEIGHTS", weights_dir());
        let imports = weights_dir().join("imports");
        match multitoken_lm::multimodal::export_imported(&checkpoint(), &imports) {
            Ok(Some(_)) => Ok(imports),
            Ok(None) => Err("the Idefics2 importer did not recognise the checkpoint".to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    match result {
        Ok(path) => Ok(path.as_path()),
        Err(e) => Err(e.clone().into()),
    }
}

/// Held by each test: the last test to finish (passed or failed) removes the
/// temporary weights directory. A test that starts later exports again.
struct Cleanup;

/// Tests (started, finished).
static RUNNING: Mutex<(usize, usize)> = Mutex::new((0, 0));

impl Cleanup {
    fn start() -> Self {
        if let Ok(mut count) = RUNNING.lock() {
            count.0 += 1;
        }
        Cleanup
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut count = match RUNNING.lock() {
            Ok(count) => count,
            Err(poisoned) => poisoned.into_inner(),
        };
        count.1 += 1;
        if count.0 == count.1 {
            let _ = std::fs::remove_dir_all(weights_dir());
        }
    }
}

struct Fixture {
    tensors: HashMap<String, Tensor>,
}

impl Fixture {
    fn load() -> Result<Self, Box<dyn std::error::Error>> {
        let path = fixtures().join("idefics2_train/step.safetensors");
        Ok(Self {
            tensors: candle_core::safetensors::load(path, &Device::Cpu)?,
        })
    }

    fn get(&self, key: &str) -> Result<&Tensor, String> {
        self.tensors
            .get(key)
            .ok_or_else(|| format!("fixture lacks `{key}`"))
    }

    fn ids(&self, key: &str) -> Result<Vec<i64>, Box<dyn std::error::Error>> {
        Ok(self.get(key)?.to_dtype(DType::I64)?.to_vec1()?)
    }

    /// `{stage}.grad.*` keys without the prefix, sorted.
    fn grads(&self, stage: &str) -> BTreeSet<String> {
        let prefix = format!("{stage}.grad.");
        self.tensors
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
            .collect()
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32, Box<dyn std::error::Error>> {
    if a.dims() != b.dims() {
        return Err(format!("shape {:?} vs {:?}", a.dims(), b.dims()).into());
    }
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn image_token_id() -> Result<i64, Box<dyn std::error::Error>> {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint().join("config.json"))?)?;
    config["image_token_id"]
        .as_i64()
        .ok_or_else(|| "config.json has no image_token_id".into())
}

/// Our prepared row against transformers': the same ids wherever we hold a
/// text token (our image slots hold the pad id, theirs `<image>`), the image
/// slots exactly where theirs are, and the same labels.
fn check_row(r: usize, ours: &PreparedInput, fx: &Fixture) -> TestResult {
    let ids = fx.ids(&format!("row{r}.input_ids"))?;
    let labels = fx.ids(&format!("row{r}.labels"))?;
    let image = image_token_id()?;
    assert_eq!(
        ours.input_ids.len(),
        ids.len(),
        "row {r}: length (ours {:?}, transformers {ids:?})",
        ours.input_ids
    );
    for (pos, (&our, &their)) in ours.input_ids.iter().zip(&ids).enumerate() {
        let slot = ours.spans.iter().any(|s| s.range().contains(&pos));
        if slot {
            assert_eq!(
                their, image,
                "row {r}: position {pos} is an image slot for us only"
            );
        } else {
            assert_eq!(
                i64::from(our),
                their,
                "row {r}: id at position {pos} (ours {:?})",
                ours.input_ids
            );
        }
    }
    assert_eq!(ours.labels, labels, "row {r}: labels");
    Ok(())
}

/// Loads the checkpoint for `parts`, sets the LoRA adapters to the fixture's,
/// runs the batch of both rows and compares the loss and the gradients of the
/// fixture's `{stage}.grad.*` tensors. Every LoRA tensor (and, when
/// `all_projectors`, every connector tensor) must have a fixture gradient.
fn check_stage(stage: &str, parts: TrainParts, all_projectors: bool) -> TestResult {
    let imports = imports()?;
    let fx = Fixture::load()?;
    let model = TrainableModel::load(&checkpoint(), parts, &Device::Cpu)?;
    assert!(
        model.model_dir.starts_with(imports),
        "trained from {} (not the temporary export)",
        model.model_dir.display()
    );

    let params = model.params();
    let mut by_fixture_name = HashMap::new();
    for p in &params {
        let name = p
            .name
            .strip_prefix("projectors/")
            .or_else(|| p.name.strip_prefix("lora/"));
        let name = name.ok_or_else(|| format!("unexpected trainable tensor {}", p.name))?;
        if p.name.starts_with("lora/") {
            p.var.set(fx.get(&format!("{stage}.init.{name}"))?)?;
        }
        by_fixture_name.insert(name.to_string(), p);
    }
    let recorded = fx.grads(stage);
    for (name, p) in &by_fixture_name {
        let required = p.name.starts_with("lora/") || all_projectors;
        assert!(
            !required || recorded.contains(name),
            "{stage}: the fixture has no gradient for our `{}`",
            p.name
        );
    }

    let rows = read_jsonl(&fixtures().join("idefics2_train/rows.jsonl"))?;
    let prepared = rows
        .iter()
        .map(|row| model.mm.prepare_training(&row.messages, &row.items))
        .collect::<Result<Vec<_>, _>>()?;
    for (r, p) in prepared.iter().enumerate() {
        check_row(r, p, &fx)?;
    }
    let batch: Vec<(&PreparedInput, &ItemsByKey)> = prepared
        .iter()
        .zip(rows.iter().map(|row| &row.items))
        .collect();
    let (loss, count) = model.loss(&batch)?;
    let labelled: usize = (0..rows.len())
        .map(|r| {
            Ok::<_, Box<dyn std::error::Error>>(
                fx.ids(&format!("row{r}.labels"))?
                    .iter()
                    .skip(1)
                    .filter(|&&l| l != -100)
                    .count(),
            )
        })
        .sum::<Result<_, _>>()?;
    assert_eq!(count, labelled, "{stage}: labelled tokens");
    let ours = loss.to_scalar::<f32>()?;
    let theirs = fx.get(&format!("{stage}.loss"))?.to_vec1::<f32>()?[0];
    assert!(
        (ours - theirs).abs() < LOSS_TOLERANCE,
        "{stage}: loss {ours} vs transformers {theirs}"
    );

    let grads = loss.backward()?;
    let mut failures = Vec::new();
    // Largest difference per group (connector, LoRA), with the tensor's name.
    let mut worst: Vec<(&str, f32, String)> = Vec::new();
    for name in &recorded {
        let p = by_fixture_name
            .get(name)
            .ok_or_else(|| format!("{stage}: we do not train `{name}`"))?;
        let Some(g) = grads.get(p.var.as_tensor()) else {
            failures.push(format!("{name}: no gradient"));
            continue;
        };
        let d = max_diff(g, fx.get(&format!("{stage}.grad.{name}"))?)
            .map_err(|e| format!("{name}: {e}"))?;
        if d.is_nan() || d >= GRAD_TOLERANCE {
            failures.push(format!("{name}: gradient differs by {d:e}"));
        }
        let group = if p.name.starts_with("lora/") {
            "lora"
        } else {
            "connector"
        };
        match worst.iter_mut().find(|(g, _, _)| *g == group) {
            Some(entry) if entry.1 >= d => {}
            Some(entry) => *entry = (group, d, name.clone()),
            None => worst.push((group, d, name.clone())),
        }
    }
    let worst: Vec<String> = worst
        .iter()
        .map(|(group, d, name)| format!("{group} {d:e} ({name})"))
        .collect();
    println!(
        "{stage}: loss {ours} (transformers {theirs}, |diff| {:e}); {} gradients, largest differences: {}",
        (ours - theirs).abs(),
        recorded.len(),
        worst.join(", ")
    );
    assert!(
        failures.is_empty(),
        "{stage}: {} of {} gradients differ:\n{}",
        failures.len(),
        recorded.len(),
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn connector_gradients_match_pytorch() -> TestResult {
    let _cleanup = Cleanup::start();
    check_stage(
        "projectors",
        TrainParts {
            projectors: true,
            ..Default::default()
        },
        true,
    )
}

#[test]
fn lora_gradients_match_pytorch() -> TestResult {
    let _cleanup = Cleanup::start();
    let lora = LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        gradient_checkpointing: false,
    };
    check_stage(
        "lora",
        TrainParts {
            projectors: true,
            lora: Some(lora),
            ..Default::default()
        },
        false,
    )
}
