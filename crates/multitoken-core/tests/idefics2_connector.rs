//! Parity of the `idefics2_connector` projector with transformers' `Idefics2Connector`
//! on the tiny random fixture `xtask/fixtures/idefics2_connector.py` wrote
//! (tests/fixtures/idefics2_connector): outputs per row and as one masked batch, the
//! gradients of `sum(output * probe)` for every weight and the input, and the errors
//! for a bad spec and missing or mis-shaped tensors.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarBuilder;
use multitoken_core::projector::Idefics2ConnectorConfig;
use multitoken_core::{Projector, ProjectorSpec};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// Outputs and gradients must be within this of transformers' (f64 reference).
const TOLERANCE: f32 = 1e-4;

struct Fixture {
    spec: ProjectorSpec,
    feature_dim: usize,
    hidden: usize,
    lengths: Vec<usize>,
    weights: HashMap<String, Tensor>,
    io: HashMap<String, Tensor>,
}

impl Fixture {
    fn read() -> TestResult<Self> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/idefics2_connector");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        let load = |name: &str| candle_core::safetensors::load(dir.join(name), &Device::Cpu);
        Ok(Self {
            spec: serde_json::from_value(config["projector"].clone())?,
            feature_dim: serde_json::from_value(config["feature_dim"].clone())?,
            hidden: serde_json::from_value(config["hidden_size"].clone())?,
            lengths: serde_json::from_value(config["lengths"].clone())?,
            weights: load("connector.safetensors")?,
            io: load("io.safetensors")?,
        })
    }

    fn load(
        &self,
        spec: ProjectorSpec,
        weights: HashMap<String, Tensor>,
    ) -> multitoken_core::Result<Projector> {
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        Projector::load(spec, self.feature_dim, self.hidden, vb.pp("connector"))
    }

    fn io(&self, key: &str) -> TestResult<&Tensor> {
        Ok(self
            .io
            .get(key)
            .ok_or_else(|| format!("io.safetensors has no {key}"))?)
    }

    fn config(&self) -> TestResult<Idefics2ConnectorConfig> {
        match self.spec {
            ProjectorSpec::Idefics2Connector(config) => Ok(config),
            other => Err(format!("fixture spec is {other}").into()),
        }
    }
}

fn max_abs_diff(got: &Tensor, expect: &Tensor) -> TestResult<f32> {
    assert_eq!(got.dims(), expect.dims());
    Ok((got - expect)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

/// Each row alone (no padding, no mask), stacked.
fn forward_rows(projector: &Projector, features: &Tensor, lengths: &[usize]) -> TestResult<Tensor> {
    let rows = lengths
        .iter()
        .enumerate()
        .map(|(row, &len)| projector.forward(&features.i((row..=row, ..len))?))
        .collect::<multitoken_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

#[test]
fn outputs_match_transformers() -> TestResult {
    let fx = Fixture::read()?;
    assert_eq!(
        fx.config()?,
        Idefics2ConnectorConfig {
            resampler_n_latents: 5,
            resampler_depth: 2,
            resampler_n_heads: 4,
            resampler_head_dim: 6,
            num_key_value_heads: 2,
            intermediate_size: 48,
            rms_norm_eps: 1e-2,
        }
    );
    let projector = fx.load(fx.spec, fx.weights.clone())?;
    let expect = fx.io("output")?;
    let features = fx.io("features")?;

    let rows = forward_rows(&projector, features, &fx.lengths)?;
    let rows_diff = max_abs_diff(&rows, expect)?;
    let masked = projector.forward_masked(features, fx.io("mask")?)?;
    let masked_diff = max_abs_diff(&masked, expect)?;
    eprintln!("output max abs diff: rows alone {rows_diff:.3e}, masked batch {masked_diff:.3e}");
    assert!(rows_diff < TOLERANCE, "rows alone: {rows_diff}");
    assert!(masked_diff < TOLERANCE, "masked batch: {masked_diff}");
    Ok(())
}

/// Loads the weights and the features as variables, runs `forward`, and checks the
/// gradients of `sum(output * probe)` against torch's; returns the largest difference.
fn check_gradients(
    fx: &Fixture,
    forward: impl Fn(&Projector, &Tensor) -> TestResult<Tensor>,
) -> TestResult<f32> {
    let vars: HashMap<String, Var> = fx
        .weights
        .iter()
        .map(|(key, tensor)| Ok((key.clone(), Var::from_tensor(tensor)?)))
        .collect::<candle_core::Result<_>>()?;
    let projector = fx.load(
        fx.spec,
        vars.iter()
            .map(|(key, var)| (key.clone(), var.as_tensor().clone()))
            .collect(),
    )?;
    let features = Var::from_tensor(fx.io("features")?)?;
    let output = forward(&projector, features.as_tensor())?;
    let loss = (output * fx.io("probe")?)?.sum_all()?;
    let grads = loss.backward()?;

    let mut keys: Vec<&String> = vars.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), 25);
    let named = std::iter::once(("features", &features))
        .chain(keys.into_iter().map(|key| (key.as_str(), &vars[key])));
    let mut worst = 0f32;
    for (name, var) in named {
        let got = grads
            .get(var.as_tensor())
            .ok_or_else(|| format!("no gradient for {name}"))?;
        let diff = max_abs_diff(got, fx.io(&format!("grad.{name}"))?)?;
        assert!(diff < TOLERANCE, "gradient of {name} differs by {diff}");
        worst = worst.max(diff);
    }
    Ok(worst)
}

#[test]
fn gradients_match_transformers() -> TestResult {
    let fx = Fixture::read()?;
    let masked = check_gradients(&fx, |projector, features| {
        Ok(projector.forward_masked(features, fx.io("mask")?)?)
    })?;
    let rows = check_gradients(&fx, |projector, features| {
        forward_rows(projector, features, &fx.lengths)
    })?;
    eprintln!("gradient max abs diff: masked batch {masked:.3e}, rows alone {rows:.3e}");
    Ok(())
}

/// What loading `spec` over `weights` says.
fn load_error(fx: &Fixture, spec: ProjectorSpec, weights: HashMap<String, Tensor>) -> String {
    match fx.load(spec, weights) {
        Ok(_) => "loaded".to_string(),
        Err(error) => error.to_string(),
    }
}

#[test]
fn bad_specs_and_weights_are_errors_naming_the_problem() -> TestResult {
    let fx = Fixture::read()?;
    let config = fx.config()?;

    let three_heads = ProjectorSpec::Idefics2Connector(Idefics2ConnectorConfig {
        resampler_n_heads: 3,
        ..config
    });
    assert_eq!(
        load_error(&fx, three_heads, fx.weights.clone()),
        "projector `idefics2_connector`: resampler_n_heads 3 must be a multiple of num_key_value_heads 2"
    );

    let missing_key = "connector.perceiver_resampler.layers.1.self_attn.k_proj.weight";
    let mut missing = fx.weights.clone();
    missing.remove(missing_key);
    let error = load_error(&fx, fx.spec, missing);
    assert!(error.contains(missing_key), "{error}");

    let mut misshaped = fx.weights.clone();
    misshaped.insert(
        "connector.perceiver_resampler.latents".to_string(),
        Tensor::zeros((4, fx.hidden), DType::F32, &Device::Cpu)?,
    );
    let error = load_error(&fx, fx.spec, misshaped);
    assert!(
        error.contains("connector.perceiver_resampler.latents"),
        "{error}"
    );

    // A deeper spec than the checkpoint asks for a layer it does not have.
    let deeper = ProjectorSpec::Idefics2Connector(Idefics2ConnectorConfig {
        resampler_depth: 3,
        ..config
    });
    let error = load_error(&fx, deeper, fx.weights.clone());
    assert!(
        error.contains("connector.perceiver_resampler.layers.2."),
        "{error}"
    );
    Ok(())
}
