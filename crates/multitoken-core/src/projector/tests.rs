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
        "error: projector `conv`: unknown kind; expected linear, mlp{N}x_gelu, vector_mlp, resblock, linear_resblock or idefics2_connector",
    );
    check_spec(
        r#"{"kind": "vector_mlp", "num_layers": 2}"#,
        "error: projector `vector_mlp`: needs both num_layers and num_tokens",
    );
    check_spec(
        r#"{"kind": "linear", "num_tokens": 3}"#,
        "error: projector `linear`: takes no parameters, got num_tokens",
    );
    check_spec(
        r#"{"kind": "vector_mlp", "num_layers": 2, "num_tokens": 3, "depth": 1}"#,
        "error: projector `vector_mlp`: unknown field `depth`, expected `num_layers` or `num_tokens`",
    );
}

/// Idefics2-8b's connector as multitoken.json writes it.
const IDEFICS2_8B: &str = r#"{"kind":"idefics2_connector","resampler_n_latents":64,"resampler_depth":3,"resampler_n_heads":16,"resampler_head_dim":96,"num_key_value_heads":4,"intermediate_size":14336,"rms_norm_eps":1e-5}"#;

/// `IDEFICS2_8B` with `field` set to `value` (a JSON literal).
fn idefics2_with(field: &str, value: &str) -> String {
    let mut spec: serde_json::Value = serde_json::from_str(IDEFICS2_8B).unwrap();
    spec[field] = serde_json::from_str(value).unwrap();
    spec.to_string()
}

#[test]
fn idefics2_connector_specs_parse_and_validate() {
    check_spec(
        IDEFICS2_8B,
        &format!(
            "idefics2_connector(n_latents=64, depth=3, heads=16x96, kv_heads=4, \
             intermediate_size=14336, rms_norm_eps=1e-5) -> {}",
            // serde_json writes 1e-5 in positional notation.
            IDEFICS2_8B.replace("1e-5", "0.00001")
        ),
    );
    check_spec(
        r#""idefics2_connector""#,
        "error: projector `idefics2_connector`: needs the perceiver's parameters; write it as an object",
    );
    let mut missing: serde_json::Value = serde_json::from_str(IDEFICS2_8B).unwrap();
    missing.as_object_mut().unwrap().remove("rms_norm_eps");
    check_spec(
        &missing.to_string(),
        "error: projector `idefics2_connector`: missing field `rms_norm_eps`",
    );
    let unknown = idefics2_with("hidden_act", r#""silu""#);
    let got = serde_json::from_str::<ProjectorSpec>(&unknown)
        .unwrap_err()
        .to_string();
    assert!(
        got.starts_with("projector `idefics2_connector`: unknown field `hidden_act`"),
        "{got}"
    );
    check_spec(
        &idefics2_with("resampler_depth", "0"),
        "error: projector `idefics2_connector`: resampler_depth must be at least 1",
    );
    check_spec(
        &idefics2_with("num_key_value_heads", "0"),
        "error: projector `idefics2_connector`: num_key_value_heads must be at least 1",
    );
    check_spec(
        &idefics2_with("num_key_value_heads", "5"),
        "error: projector `idefics2_connector`: resampler_n_heads 16 must be a multiple of \
         num_key_value_heads 5",
    );
    check_spec(
        &idefics2_with("rms_norm_eps", "0"),
        "error: projector `idefics2_connector`: rms_norm_eps must be a positive number, got 0",
    );
    check_spec(
        &idefics2_with("resampler_n_latents", "-1"),
        "error: projector `idefics2_connector`: invalid value: integer `-1`, expected usize",
    );
}

/// A small Idefics2 connector spec: 3 latents, `depth` layers, 2 heads of 4 over one
/// key/value head, projection width 10.
fn small_idefics2(depth: usize) -> ProjectorSpec {
    ProjectorSpec::Idefics2Connector(Idefics2ConnectorConfig {
        resampler_n_latents: 3,
        resampler_depth: depth,
        resampler_n_heads: 2,
        resampler_head_dim: 4,
        num_key_value_heads: 1,
        intermediate_size: 10,
        rms_norm_eps: 1e-6,
    })
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
    assert_eq!(small_idefics2(1).output_width(4900), 3);
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
    )?;
    check_layout(
        small_idefics2(1),
        6,
        8,
        &[
            "mm_projector.modality_projection.down_proj.weight",
            "mm_projector.modality_projection.gate_proj.weight",
            "mm_projector.modality_projection.up_proj.weight",
            "mm_projector.perceiver_resampler.latents",
            "mm_projector.perceiver_resampler.layers.0.input_context_norm.weight",
            "mm_projector.perceiver_resampler.layers.0.input_latents_norm.weight",
            "mm_projector.perceiver_resampler.layers.0.mlp.down_proj.weight",
            "mm_projector.perceiver_resampler.layers.0.mlp.gate_proj.weight",
            "mm_projector.perceiver_resampler.layers.0.mlp.up_proj.weight",
            "mm_projector.perceiver_resampler.layers.0.post_attention_layernorm.weight",
            "mm_projector.perceiver_resampler.layers.0.self_attn.k_proj.weight",
            "mm_projector.perceiver_resampler.layers.0.self_attn.o_proj.weight",
            "mm_projector.perceiver_resampler.layers.0.self_attn.q_proj.weight",
            "mm_projector.perceiver_resampler.layers.0.self_attn.v_proj.weight",
            "mm_projector.perceiver_resampler.norm.weight",
        ],
        &[3, 3, 8],
    )
}

/// Shapes of every tensor a `VarMap` gets for `spec`, sorted by key.
fn var_shapes(spec: ProjectorSpec, feature_dim: usize, hidden: usize) -> Result<Vec<String>> {
    let var_map = VarMap::new();
    let vb = VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu);
    Projector::load(spec, feature_dim, hidden, vb)?;
    let data = var_map.data().lock().unwrap();
    let mut shapes: Vec<String> = data
        .iter()
        .map(|(key, var)| format!("{key} {:?}", var.dims()))
        .collect();
    shapes.sort();
    Ok(shapes)
}

#[test]
fn idefics2_connector_shapes_follow_idefics2() -> Result<()> {
    // Heads x head_dim (8) differs from the hidden size (12); the MLP is 4x hidden.
    let shapes = var_shapes(small_idefics2(2), 6, 12)?;
    let layer0: Vec<&str> = shapes
        .iter()
        .map(String::as_str)
        .filter(|s| !s.contains("layers.1."))
        .collect();
    assert_eq!(
        layer0,
        [
            "modality_projection.down_proj.weight [12, 10]",
            "modality_projection.gate_proj.weight [10, 6]",
            "modality_projection.up_proj.weight [10, 6]",
            "perceiver_resampler.latents [3, 12]",
            "perceiver_resampler.layers.0.input_context_norm.weight [12]",
            "perceiver_resampler.layers.0.input_latents_norm.weight [12]",
            "perceiver_resampler.layers.0.mlp.down_proj.weight [12, 48]",
            "perceiver_resampler.layers.0.mlp.gate_proj.weight [48, 12]",
            "perceiver_resampler.layers.0.mlp.up_proj.weight [48, 12]",
            "perceiver_resampler.layers.0.post_attention_layernorm.weight [12]",
            "perceiver_resampler.layers.0.self_attn.k_proj.weight [4, 12]",
            "perceiver_resampler.layers.0.self_attn.o_proj.weight [12, 8]",
            "perceiver_resampler.layers.0.self_attn.q_proj.weight [8, 12]",
            "perceiver_resampler.layers.0.self_attn.v_proj.weight [4, 12]",
            "perceiver_resampler.norm.weight [12]",
        ]
    );
    assert_eq!(shapes.len(), 3 + 1 + 2 * 10 + 1);
    Ok(())
}

#[test]
fn idefics2_connector_takes_any_width_and_a_key_mask() -> Result<()> {
    let var_map = VarMap::new();
    let vb = VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu);
    let projector = Projector::load(small_idefics2(2), 6, 8, vb)?;
    let features = Tensor::randn(0f32, 1., (2, 7, 6), &Device::Cpu)?;
    // Row 1 padded after 4 positions: its output equals that of its first 4 alone.
    let mask = tensor(
        &[1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 0., 0., 0.],
        &[2, 7],
    );
    let batched = projector.forward_masked(&features, &mask)?;
    assert_eq!(batched.dims(), [2, 3, 8]);
    let alone = projector.forward(&features.narrow(0, 1, 1)?.narrow(1, 0, 4)?)?;
    let diff = (batched.narrow(0, 1, 1)? - alone)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(
        diff < 1e-5,
        "masked row differs from the row alone by {diff}"
    );
    // A full mask changes nothing.
    let full =
        projector.forward_masked(&features, &Tensor::ones((2, 7), DType::U8, &Device::Cpu)?)?;
    let plain = projector.forward(&features)?;
    let diff = (full - plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-6, "full mask changed the output by {diff}");
    // One vector per item ([n, feat]) is one position.
    assert_eq!(
        projector
            .forward(&features.narrow(1, 0, 1)?.squeeze(1)?)?
            .dims(),
        [2, 3, 8]
    );
    Ok(())
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
    )?;
    check_forward_error(
        small_idefics2(1),
        4,
        8,
        zeros(&[2, 3, 5])?,
        "projector `idefics2_connector`: expects feature width 4, got features of shape [2, 3, 5]",
    )?;
    let var_map = VarMap::new();
    let vb = VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu);
    let projector = Projector::load(small_idefics2(1), 4, 8, vb)?;
    let error = projector
        .forward_masked(&zeros(&[2, 3, 4])?, &zeros(&[2, 4])?)
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        error.as_deref(),
        Some(
            "projector `idefics2_connector`: expects a key mask [n, width] = [2, 3] for features \
             of shape [2, 3, 4], got [2, 4]"
        )
    );
    Ok(())
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
