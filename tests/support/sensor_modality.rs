//! A test-only modality, registered by the test crates that include this file
//! (`#[path = "../../../tests/support/sensor_modality.rs"] mod sensor;`): it
//! is none of the built-in ones (not `vision_`, `audio_`, `document_`) and
//! exercises the hooks the trainer and server use instead of names.
//!
//! `test_sensor` reads `<reading>` items under `readings`: a list of numbers,
//! given inline (a JSON list in a dataset row or request, or CSV text) or as a
//! file. Preprocessing lays the numbers out as `[WIDTH, INPUT]` (cycled); the
//! encoder is one linear layer `proj.weight` `[FEATURES, INPUT]` read from
//! `{encoder}/model.safetensors` through `ModalityContext::var_builder`, so
//! it can be trained. `{"panic": true}` in the config makes the builder panic,
//! `{"bad_shape": true}` makes the encoder return features of the wrong width,
//! `{"hide_weights": true}` makes it not say where its weights live,
//! `{"check_sleep_ms": N}` makes each item's cheap pre-check (`check_item`)
//! and `{"preprocess_sleep_ms": N}` its preprocessing take N ms (slow
//! preparation for the server's deadline tests).

#![allow(dead_code)]

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use multitoken_core::{
    EncoderWeights, Item, Modality, ModalityBuilder, ModalityContext, ModalityInfo, ProjectorSpec, Result,
};

/// The builder name.
pub const NAME: &str = "test_sensor";
/// Numbers per encoder position.
pub const INPUT: usize = 3;
/// Encoder feature width.
pub const FEATURES: usize = 4;
/// LM positions per item.
pub const WIDTH: usize = 2;

/// The modality.
pub struct Sensor {
    /// `[FEATURES, INPUT]`, a variable when the encoder trains.
    proj: Tensor,
    bad_shape: bool,
    hide_weights: bool,
    check_sleep: std::time::Duration,
    preprocess_sleep: std::time::Duration,
    projector: ProjectorSpec,
}

/// The numbers of an item: inline JSON list or CSV text, or a file holding either.
pub fn numbers(item: &Item) -> Result<Vec<f32>> {
    let text = match item {
        Item::Text(text) => text.clone(),
        Item::Bytes(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Item::Path(path) => std::fs::read_to_string(path).map_err(|e| multitoken_core::Error::msg(format!("{}: {e}", path.display())))?,
    };
    let values: Vec<f32> = text
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<f32>().map_err(|e| multitoken_core::Error::msg(format!("`{s}` is not a number: {e}"))))
        .collect::<Result<_>>()?;
    if values.is_empty() {
        return Err(multitoken_core::Error::msg("a reading needs at least one number"));
    }
    Ok(values)
}

impl Modality for Sensor {
    fn name(&self) -> &str {
        NAME
    }
    fn token(&self) -> &str {
        "<reading>"
    }
    fn data_key(&self) -> &str {
        "readings"
    }
    fn token_width(&self) -> usize {
        WIDTH
    }
    fn feature_dim(&self) -> usize {
        FEATURES
    }
    fn preprocess(&self, item: &Item) -> Result<Tensor> {
        std::thread::sleep(self.preprocess_sleep);
        let values = numbers(item)?;
        let data: Vec<f32> = (0..WIDTH * INPUT).map(|i| values[i % values.len()] / 10.0).collect();
        Ok(Tensor::from_vec(data, (WIDTH, INPUT), &Device::Cpu)?)
    }
    fn encode(&self, batch: &Tensor) -> Result<Tensor> {
        let out = batch.broadcast_matmul(&self.proj.t()?)?;
        if self.bad_shape {
            return Ok(out.narrow(2, 0, FEATURES - 1)?);
        }
        Ok(out)
    }
    fn projector(&self) -> ProjectorSpec {
        self.projector
    }
    fn encoder_weights(&self) -> Option<EncoderWeights> {
        if self.hide_weights {
            return None;
        }
        Some(EncoderWeights::at("encoder").with_default("sensor"))
    }
    fn inline_items(&self) -> bool {
        true
    }
    fn check_item(&self, _item: &Item) -> Result<()> {
        std::thread::sleep(self.check_sleep);
        Ok(())
    }
}

fn build(config: &serde_json::Value, context: &ModalityContext) -> Result<Box<dyn Modality>> {
    if config.get("panic").and_then(serde_json::Value::as_bool) == Some(true) {
        panic!("the sensor is unplugged");
    }
    let weights = EncoderWeights::at("encoder").with_default("sensor");
    let dir = weights.dir_in(&context.model_dir, config).unwrap_or_else(|| context.model_dir.join("sensor"));
    let vb = context.var_builder(&dir.join("model.safetensors"))?;
    let proj = vb.pp("proj").get((FEATURES, INPUT), "weight")?;
    let projector = match config.get("projector") {
        Some(spec) => serde_json::from_value(spec.clone()).map_err(|e| multitoken_core::Error::msg(format!("projector: {e}")))?,
        None => ProjectorSpec::MlpGelu { depth: 2 },
    };
    Ok(Box::new(Sensor {
        proj,
        bad_shape: config.get("bad_shape").is_some(),
        hide_weights: config.get("hide_weights").is_some(),
        check_sleep: sleep_ms(config, "check_sleep_ms"),
        preprocess_sleep: sleep_ms(config, "preprocess_sleep_ms"),
        projector,
    }))
}

fn sleep_ms(config: &serde_json::Value, key: &str) -> std::time::Duration {
    std::time::Duration::from_millis(config.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0))
}

multitoken_core::inventory::submit! { ModalityBuilder { name: NAME, build } }
multitoken_core::inventory::submit! { ModalityInfo { builder: NAME, token: "<reading>", data_key: "readings" } }

/// Writes the encoder weights (seeded) to `dir/model.safetensors`.
pub fn write_encoder(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| multitoken_core::Error::msg(e.to_string()))?;
    let values: Vec<f32> = (0..FEATURES * INPUT).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
    let weight = Tensor::from_vec(values, (FEATURES, INPUT), &Device::Cpu)?.to_dtype(DType::F32)?;
    let tensors = std::collections::HashMap::from([("proj.weight".to_string(), weight)]);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    std::fs::write(dir.join("config.json"), "{\"kind\": \"test_sensor\"}").map_err(|e| multitoken_core::Error::msg(e.to_string()))?;
    Ok(())
}
