//! Tests of projector specs and modules: parsing, key layout, shapes and
//! numbers against values worked out by hand.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::*;

/// torch's `nn.GELU()` of 1 and -1, to 16 digits.
const GELU_OF_ONE: f64 = 0.841_344_746_068_542_9;
const GELU_OF_MINUS_ONE: f64 = -0.158_655_253_931_457_07;

/// Exact GELU via Abramowitz-Stegun 7.1.26 erf (error below 1.5e-7), for
/// expectations that are tedious to write as constants.
fn reference_gelu(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf_abs = 1.0 - poly * (-z * z).exp();
    let erf = if z >= 0.0 { erf_abs } else { -erf_abs };
    0.5 * x * (1.0 + erf)
}

fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
}

fn var_builder(weights: Vec<(&str, Tensor)>) -> VarBuilder<'static> {
    let map: HashMap<String, Tensor> = weights
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect();
    VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
}

fn assert_close(got: &Tensor, expect: &[f64], shape: &[usize]) -> Result<()> {
    assert_eq!(got.dims(), shape);
    let got: Vec<f32> = got.flatten_all()?.to_vec1()?;
    assert_eq!(got.len(), expect.len());
    for (index, (g, e)) in got.iter().zip(expect).enumerate() {
        assert!(
            (f64::from(*g) - e).abs() < 1e-5,
            "element {index}: got {g}, expected {e}"
        );
    }
    Ok(())
}

/// Parses `json` as a spec and renders the result (or the error) as a string.
fn check_spec(json: &str, expect: &str) {
    let got = match serde_json::from_str::<ProjectorSpec>(json) {
        Ok(spec) => format!("{spec} -> {}", serde_json::to_string(&spec).unwrap()),
        Err(error) => format!("error: {error}"),
    };
    assert_eq!(got, expect, "for {json}");
}

#[test]
fn specs_parse_from_names_and_objects() {
    check_spec(r#""linear""#, r#"linear -> {"kind":"linear"}"#);
    check_spec(r#""mlp2x_gelu""#, r#"mlp2x_gelu -> {"kind":"mlp2x_gelu"}"#);
    check_spec(
        r#"{"kind": "mlp3x_gelu"}"#,
        r#"mlp3x_gelu -> {"kind":"mlp3x_gelu"}"#,
    );
    check_spec(
        r#""simple_res_block""#,
        r#"resblock -> {"kind":"resblock"}"#,
    );
    check_spec(
        r#"{"kind": "linear_resblock"}"#,
        r#"linear_resblock -> {"kind":"linear_resblock"}"#,
    );
    check_spec(
        r#"{"kind": "vector_mlp", "num_layers": 2, "num_tokens": 10}"#,
        r#"vector_mlp(num_layers=2, num_tokens=10) -> {"kind":"vector_mlp","num_layers":2,"num_tokens":10}"#,
    );
    check_spec(
        r#""mlp0x_gelu""#,
        "error: projector `mlp0x_gelu`: depth must be at least 1",
    );
    check_spec(
        r#""conv""#,
        "error: projector `conv`: unknown kind; expected linear, mlp{N}x_gelu, vector_mlp, resblock or linear_resblock",
    );
    check_spec(
        r#"{"kind": "vector_mlp", "num_layers": 2}"#,
        "error: projector `vector_mlp`: needs both num_layers and num_tokens",
    );
    check_spec(
        r#"{"kind": "linear", "num_tokens": 3}"#,
        "error: projector `linear`: num_layers/num_tokens only apply to vector_mlp",
    );
}

#[test]
fn output_width_depends_on_kind() {
    assert_eq!(ProjectorSpec::MlpGelu { depth: 2 }.output_width(576), 576);
    assert_eq!(
        ProjectorSpec::VectorMlp {
            num_layers: 2,
            num_tokens: 10
        }
        .output_width(1),
        10
    );
}

/// Creates each kind from a fresh `VarMap` and reports the key names and the
/// output shape for 3 items of 4 positions (1 for the vector kind).
fn check_layout(
    spec: ProjectorSpec,
    feature_dim: usize,
    hidden: usize,
    expect_keys: &[&str],
    expect_shape: &[usize],
) -> Result<()> {
    let var_map = VarMap::new();
    let vb = VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu);
    let projector = Projector::load(spec, feature_dim, hidden, vb.pp("mm_projector"))?;
    let mut keys: Vec<String> = var_map.data().lock().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, expect_keys, "keys of {spec}");
    let width = if matches!(spec, ProjectorSpec::VectorMlp { .. }) {
        1
    } else {
        4
    };
    let features = Tensor::zeros((3, width, feature_dim), DType::F32, &Device::Cpu)?;
    assert_eq!(
        projector.forward(&features)?.dims(),
        expect_shape,
        "shape of {spec}"
    );
    Ok(())
}

#[test]
fn key_names_match_the_python_modules_and_shapes_follow_the_kind() -> Result<()> {
    check_layout(
        ProjectorSpec::Linear,
        6,
        8,
        &["mm_projector.bias", "mm_projector.weight"],
        &[3, 4, 8],
    )?;
    check_layout(
        ProjectorSpec::MlpGelu { depth: 2 },
        6,
        8,
        &[
            "mm_projector.0.bias",
            "mm_projector.0.weight",
            "mm_projector.2.bias",
            "mm_projector.2.weight",
        ],
        &[3, 4, 8],
    )?;
    check_layout(
        ProjectorSpec::VectorMlp {
            num_layers: 2,
            num_tokens: 3,
        },
        6,
        8,
        &[
            "mm_projector.mlps.0.0.bias",
            "mm_projector.mlps.0.0.weight",
            "mm_projector.mlps.0.2.bias",
            "mm_projector.mlps.0.2.weight",
            "mm_projector.mlps.1.0.bias",
            "mm_projector.mlps.1.0.weight",
            "mm_projector.mlps.1.2.bias",
            "mm_projector.mlps.1.2.weight",
            "mm_projector.mlps.2.0.bias",
            "mm_projector.mlps.2.0.weight",
            "mm_projector.mlps.2.2.bias",
            "mm_projector.mlps.2.2.weight",
        ],
        &[3, 3, 8],
    )?;
    check_layout(
        ProjectorSpec::ResBlock,
        8,
        8,
        &[
            "mm_projector.pre_norm.bias",
            "mm_projector.pre_norm.weight",
            "mm_projector.proj.0.bias",
            "mm_projector.proj.0.weight",
            "mm_projector.proj.2.bias",
            "mm_projector.proj.2.weight",
        ],
        &[3, 4, 8],
    )?;
    check_layout(
        ProjectorSpec::LinearResBlock,
        6,
        8,
        &[
            "mm_projector.0.bias",
            "mm_projector.0.weight",
            "mm_projector.1.pre_norm.bias",
            "mm_projector.1.pre_norm.weight",
            "mm_projector.1.proj.0.bias",
            "mm_projector.1.proj.0.weight",
            "mm_projector.1.proj.2.bias",
            "mm_projector.1.proj.2.weight",
        ],
        &[3, 4, 8],
    )
}

#[test]
fn mlp2x_gelu_matches_hand_computed_values() -> Result<()> {
    // Linear 0 maps [x0, x1] to [x0, -x1]; linear 2 maps [a, b] to [a + b + 0.5, a - b].
    let vb = var_builder(vec![
        ("mm_projector.0.weight", tensor(&[1., 0., 0., -1.], &[2, 2])),
        ("mm_projector.0.bias", tensor(&[0., 0.], &[2])),
        ("mm_projector.2.weight", tensor(&[1., 1., 1., -1.], &[2, 2])),
        ("mm_projector.2.bias", tensor(&[0.5, 0.], &[2])),
    ]);
    let projector = Projector::load(
        ProjectorSpec::MlpGelu { depth: 2 },
        2,
        2,
        vb.pp("mm_projector"),
    )?;
    // Two patches of one item: [1, 1] and [0, 0].
    let out = projector.forward(&tensor(&[1., 1., 0., 0.], &[1, 2, 2]))?;
    // Patch 1: hidden [1, -1] -> GELU [g(1), g(-1)] -> [g(1) + g(-1) + 0.5, g(1) - g(-1)].
    // Patch 2: hidden [0, 0] -> GELU [0, 0] -> [0.5, 0].
    assert_close(
        &out,
        &[
            GELU_OF_ONE + GELU_OF_MINUS_ONE + 0.5,
            GELU_OF_ONE - GELU_OF_MINUS_ONE,
            0.5,
            0.0,
        ],
        &[1, 2, 2],
    )
}

#[test]
fn vector_projector_concatenates_independent_heads() -> Result<()> {
    // Two one-layer heads on a 2-wide vector to a 1-wide hidden: head 0 sums, head 1 subtracts.
    let vb = var_builder(vec![
        ("mlps.0.0.weight", tensor(&[1., 1.], &[1, 2])),
        ("mlps.0.0.bias", tensor(&[0.], &[1])),
        ("mlps.1.0.weight", tensor(&[1., -1.], &[1, 2])),
        ("mlps.1.0.bias", tensor(&[10.], &[1])),
    ]);
    let projector = Projector::load(
        ProjectorSpec::VectorMlp {
            num_layers: 1,
            num_tokens: 2,
        },
        2,
        1,
        vb,
    )?;
    // Items [3, 1] and [2, 5], given as [n, feat]: outputs [[4], [12]] and [[7], [7]].
    let out = projector.forward(&tensor(&[3., 1., 2., 5.], &[2, 2]))?;
    assert_close(&out, &[4., 12., 7., 7.], &[2, 2, 1])?;
    // The same items as [n, 1, feat] (multi_token's shape) give the same result.
    let out = projector.forward(&tensor(&[3., 1., 2., 5.], &[2, 1, 2]))?;
    assert_close(&out, &[4., 12., 7., 7.], &[2, 2, 1])
}

#[test]
fn resblock_normalizes_then_adds_its_mlp() -> Result<()> {
    // pre_norm: identity affine; proj.0 = identity, proj.2 = identity with bias 1.
    let vb = var_builder(vec![
        ("pre_norm.weight", tensor(&[1., 1.], &[2])),
        ("pre_norm.bias", tensor(&[0., 0.], &[2])),
        ("proj.0.weight", tensor(&[1., 0., 0., 1.], &[2, 2])),
        ("proj.0.bias", tensor(&[0., 0.], &[2])),
        ("proj.2.weight", tensor(&[1., 0., 0., 1.], &[2, 2])),
        ("proj.2.bias", tensor(&[1., 1.], &[2])),
    ]);
    let projector = Projector::load(ProjectorSpec::ResBlock, 2, 2, vb)?;
    let out = projector.forward(&tensor(&[1., 3.], &[1, 1, 2]))?;
    // [1, 3] has mean 2 and variance 1, so LayerNorm gives [-n, n] with n = 1/sqrt(1 + 1e-5);
    // the block returns normed + GELU(normed) + 1.
    let n = 1.0 / (1.0f64 + 1e-5).sqrt();
    assert_close(
        &out,
        &[-n + reference_gelu(-n) + 1.0, n + reference_gelu(n) + 1.0],
        &[1, 1, 2],
    )
}

#[test]
fn linear_resblock_projects_before_the_block() -> Result<()> {
    // Linear 3 -> 2 picks [x0, x2]; the block is the same as in the test above.
    let vb = var_builder(vec![
        ("0.weight", tensor(&[1., 0., 0., 0., 0., 1.], &[2, 3])),
        ("0.bias", tensor(&[0., 0.], &[2])),
        ("1.pre_norm.weight", tensor(&[1., 1.], &[2])),
        ("1.pre_norm.bias", tensor(&[0., 0.], &[2])),
        ("1.proj.0.weight", tensor(&[1., 0., 0., 1.], &[2, 2])),
        ("1.proj.0.bias", tensor(&[0., 0.], &[2])),
        ("1.proj.2.weight", tensor(&[1., 0., 0., 1.], &[2, 2])),
        ("1.proj.2.bias", tensor(&[1., 1.], &[2])),
    ]);
    let projector = Projector::load(ProjectorSpec::LinearResBlock, 3, 2, vb)?;
    let out = projector.forward(&tensor(&[1., 100., 3.], &[1, 1, 3]))?;
    let n = 1.0 / (1.0f64 + 1e-5).sqrt();
    assert_close(
        &out,
        &[-n + reference_gelu(-n) + 1.0, n + reference_gelu(n) + 1.0],
        &[1, 1, 2],
    )
}

/// Builds `spec` with random weights and reports the error of `forward(features)`.
fn check_forward_error(
    spec: ProjectorSpec,
    feature_dim: usize,
    hidden: usize,
    features: Tensor,
    expect: &str,
) -> Result<()> {
    let var_map = VarMap::new();
    let vb = VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu);
    let projector = Projector::load(spec, feature_dim, hidden, vb)?;
    let got = match projector.forward(&features) {
        Ok(out) => format!("ok {:?}", out.dims()),
        Err(error) => error.to_string(),
    };
    assert_eq!(got, expect);
    Ok(())
}

#[test]
fn bad_feature_shapes_are_named() -> Result<()> {
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu);
    check_forward_error(
        ProjectorSpec::MlpGelu { depth: 2 },
        4,
        8,
        zeros(&[2, 3, 5])?,
        "projector `mlp2x_gelu`: expects feature width 4, got features of shape [2, 3, 5]",
    )?;
    check_forward_error(
        ProjectorSpec::Linear,
        4,
        8,
        zeros(&[4])?,
        "projector `linear`: expects features [n, width, 4] or [n, 4], got rank 1 shape [4]",
    )?;
    check_forward_error(
        ProjectorSpec::VectorMlp { num_layers: 2, num_tokens: 3 },
        4,
        8,
        zeros(&[2, 5, 4])?,
        "projector `vector_mlp`: takes one pooled vector per item, got 5 positions per item (shape [2, 5, 4])",
    )
}

#[test]
fn missing_or_misshaped_weights_are_errors() {
    let missing = var_builder(vec![("0.weight", tensor(&[1., 0., 0., 1.], &[2, 2]))]);
    let error = Projector::load(ProjectorSpec::MlpGelu { depth: 2 }, 2, 2, missing)
        .err()
        .map(|e| e.to_string());
    assert!(
        error.as_deref().is_some_and(|e| e.contains("0.bias")),
        "{error:?}"
    );

    let misshaped = var_builder(vec![
        ("weight", tensor(&[1., 0., 0.], &[1, 3])),
        ("bias", tensor(&[0.], &[1])),
    ]);
    let error = Projector::load(ProjectorSpec::Linear, 2, 1, misshaped)
        .err()
        .map(|e| e.to_string());
    assert!(
        error.as_deref().is_some_and(|e| e.contains("weight")),
        "{error:?}"
    );

    let var_map = VarMap::new();
    let vb = VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu);
    let error = Projector::load(ProjectorSpec::ResBlock, 4, 8, vb)
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        error.as_deref(),
        Some(
            "projector `resblock`: a residual block keeps its width: feature_dim 4 must equal hidden size 8 \
             (use linear_resblock)"
        )
    );
}
