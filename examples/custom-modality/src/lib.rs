//! `sensor_series`: a modality written outside multitoken's own crates, for
//! CSV time series (token `<series>`, dataset key `series`).
//!
//! An item is a CSV file (or its bytes, or its text): one row per time step,
//! one numeric column per channel, an optional header line. The modality
//! resamples every channel to `length` points, standardises it, cuts it into
//! `length / window` windows and encodes each window with a small trainable
//! layer (`Linear` + GELU), so an item takes `length / window` LM positions.
//!
//! Linking this crate is all it takes to make the builder known: the
//! `inventory::submit!` at the bottom registers it with multitoken's registry,
//! and the binary in `src/main.rs` is `multitoken::cli::main()`.
//!
//! Config (`multitoken.json`'s `config` of the entry, all optional):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `channels` | 1 | numeric columns per row |
//! | `length` | 32 | points per channel after resampling |
//! | `window` | 8 | points per LM position |
//! | `hidden` | 32 | encoder output width (the projector's input) |
//! | `encoder` | `series-encoder` | directory of the encoder's weights (`model.safetensors`: `encoder.weight`, `encoder.bias`), relative to the model directory; without that file the encoder is seeded-random |
//! | `seed` | 0 | seed of the encoder weights when there is no weights file |
//! | `projector` | `mlp2x_gelu` | the projector ([`Modality::projector`]) |
//!
//! Training the encoder (`train --train-encoders sensor_series`) writes its
//! weights to a new directory of the trained model and points `encoder` at it
//! ([`Modality::encoder_weights`]).

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder};
use multitoken::core::{
    EncoderWeights, Error, Item, Modality, ModalityBuilder, ModalityContext, ModalityInfo, ProjectorSpec, Result,
};
use serde::Deserialize;

/// The builder's registry name.
pub const NAME: &str = "sensor_series";
/// The token that stands for one series in a prompt.
pub const TOKEN: &str = "<series>";
/// The dataset / request key listing a row's series.
pub const DATA_KEY: &str = "series";
/// Key prefix of the encoder's weights (in its weights file and, while it
/// trains, in the trainer's variable map).
pub const WEIGHTS_PREFIX: &str = "encoder";
/// The config key naming the encoder's weights directory.
pub const ENCODER_KEY: &str = "encoder";
/// The encoder's weights directory when the config names none (relative to
/// the model directory); without a weights file there the encoder is seeded.
pub const DEFAULT_ENCODER_DIR: &str = "series-encoder";
/// The weights file in that directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Largest series accepted (bytes of CSV), checked before any parsing.
pub const MAX_ITEM_BYTES: usize = 4 << 20;

/// The entry's `config` in `multitoken.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SeriesConfig {
    /// Numeric columns per CSV row.
    pub channels: usize,
    /// Points per channel after resampling.
    pub length: usize,
    /// Points per LM position; must divide `length`.
    pub window: usize,
    /// Encoder output width.
    pub hidden: usize,
    /// Directory of the encoder weights, relative to the model directory.
    pub encoder: Option<String>,
    /// Seed of the encoder weights when `encoder` is not given.
    pub seed: u64,
    /// The projector from the encoder's features to the LM.
    pub projector: ProjectorSpec,
}

impl Default for SeriesConfig {
    fn default() -> Self {
        Self {
            channels: 1,
            length: 32,
            window: 8,
            hidden: 32,
            encoder: None,
            seed: 0,
            projector: ProjectorSpec::MlpGelu { depth: 2 },
        }
    }
}

impl SeriesConfig {
    /// LM positions per item.
    pub fn positions(&self) -> usize {
        self.length / self.window
    }

    /// Features of one window: its standardised points of every channel, plus
    /// each channel's mean and standard deviation (the level and spread that
    /// standardising removed).
    pub fn window_features(&self) -> usize {
        self.channels * (self.window + 2)
    }

    fn check(&self) -> Result<()> {
        if self.channels == 0 || self.length < 2 || self.window == 0 || self.hidden == 0 {
            return Err(Error::msg(format!(
                "{NAME}: channels, window and hidden must be at least 1 and length at least 2 (got {self:?})"
            )));
        }
        self.projector.validate()?;
        if !self.length.is_multiple_of(self.window) {
            return Err(Error::msg(format!(
                "{NAME}: window {} does not divide length {}",
                self.window, self.length
            )));
        }
        Ok(())
    }
}

/// The modality: a parsed config and the encoder layer.
pub struct SensorSeries {
    config: SeriesConfig,
    encoder: Linear,
    device: Device,
    dtype: DType,
}

impl SensorSeries {
    /// Builds the modality from its config (see the crate docs).
    pub fn new(config: SeriesConfig, context: &ModalityContext) -> Result<Self> {
        config.check()?;
        let (input, output) = (config.window_features(), config.hidden);
        let dir = config.encoder.as_deref().unwrap_or(DEFAULT_ENCODER_DIR);
        let weights = Some(context.resolve(dir).join(WEIGHTS_FILE)).filter(|path| path.is_file());
        let vb = match (&context.trainable, weights) {
            // A weights file: `var_builder` memory-maps it for a frozen encoder,
            // or loads it into the trainer's map when the encoder trains.
            (_, Some(path)) => context.var_builder(&path)?,
            // A fresh encoder that trains: seeded variables in the trainer's map.
            (Some(map), None) => {
                let (weight, bias) = seeded_weights(input, output, config.seed, &context.device)?;
                let mut vars = map.data().lock().map_err(|_| Error::msg("variable map poisoned"))?;
                vars.insert(format!("{WEIGHTS_PREFIX}.weight"), Var::from_tensor(&weight.to_dtype(context.dtype)?)?);
                vars.insert(format!("{WEIGHTS_PREFIX}.bias"), Var::from_tensor(&bias.to_dtype(context.dtype)?)?);
                drop(vars);
                VarBuilder::from_varmap(map, context.dtype, &context.device)
            }
            // Frozen and seeded: a fixed random feature map the projector learns to read.
            (None, None) => {
                let (weight, bias) = seeded_weights(input, output, config.seed, &context.device)?;
                let encoder = Linear::new(weight.to_dtype(context.dtype)?, Some(bias.to_dtype(context.dtype)?));
                return Ok(Self { config, encoder, device: context.device.clone(), dtype: context.dtype });
            }
        };
        let encoder = candle_nn::linear(input, output, vb.pp(WEIGHTS_PREFIX))
            .map_err(|e| Error::msg(format!("{NAME}: encoder weights: {e}")))?;
        Ok(Self { config, encoder, device: context.device.clone(), dtype: context.dtype })
    }

    /// The parsed config.
    pub fn config(&self) -> &SeriesConfig {
        &self.config
    }
}

impl Modality for SensorSeries {
    fn name(&self) -> &str {
        NAME
    }
    fn token(&self) -> &str {
        TOKEN
    }
    fn data_key(&self) -> &str {
        DATA_KEY
    }
    fn token_width(&self) -> usize {
        self.config.positions()
    }
    fn feature_dim(&self) -> usize {
        self.config.hidden
    }
    fn preprocess(&self, item: &Item) -> Result<Tensor> {
        let text = item_text(item)?;
        let columns = parse_csv(&text, self.config.channels).map_err(|e| Error::msg(format!("{}: {e}", describe(item))))?;
        let features = window_features(&columns, &self.config);
        let shape = (self.config.positions(), self.config.window_features());
        Ok(Tensor::from_vec(features, shape, &self.device)?.to_dtype(self.dtype)?)
    }
    fn encode(&self, batch: &Tensor) -> Result<Tensor> {
        // [n, positions, window features] -> [n, positions, hidden]
        Ok(self.encoder.forward(batch)?.gelu_erf()?)
    }
    fn projector(&self) -> ProjectorSpec {
        self.config.projector
    }
    // The hooks below have defaults; a modality overrides what it needs.
    fn encoder_weights(&self) -> Option<EncoderWeights> {
        // `train --train-encoders sensor_series` saves the trained encoder to a
        // new directory and points this config key at it.
        Some(EncoderWeights::at(ENCODER_KEY).with_default(DEFAULT_ENCODER_DIR))
    }
    fn inline_items(&self) -> bool {
        // Dataset rows may hold the series itself: CSV text or a JSON array.
        true
    }
    fn check_item(&self, item: &Item) -> Result<()> {
        let size = match item {
            Item::Path(path) => std::fs::metadata(path).map(|m| m.len() as usize).unwrap_or(0),
            Item::Bytes(bytes) => bytes.len(),
            Item::Text(text) => text.len(),
        };
        if size > MAX_ITEM_BYTES {
            return Err(Error::msg(format!(
                "{}: {size} bytes, more than a series may have ({MAX_ITEM_BYTES})",
                describe(item)
            )));
        }
        Ok(())
    }
}

/// The registry entry point.
fn build(config: &serde_json::Value, context: &ModalityContext) -> Result<Box<dyn Modality>> {
    let config: SeriesConfig = if config.is_null() {
        SeriesConfig::default()
    } else {
        serde_json::from_value(config.clone()).map_err(|e| Error::msg(format!("{NAME} config: {e}")))?
    };
    Ok(Box::new(SensorSeries::new(config, context)?))
}

multitoken::core::inventory::submit! {
    ModalityBuilder { name: NAME, build }
}

// Token and data key without building: `dataset check` without `--model`
// and `modality list` read them from here.
multitoken::core::inventory::submit! {
    ModalityInfo { builder: NAME, token: TOKEN, data_key: DATA_KEY }
}

/// An item's CSV text: a file's, given bytes', or inline text.
fn item_text(item: &Item) -> Result<String> {
    let bytes = match item {
        Item::Path(path) => std::fs::read(path).map_err(|e| Error::msg(format!("{}: cannot read: {e}", path.display())))?,
        Item::Bytes(bytes) => bytes.clone(),
        Item::Text(text) => return Ok(text.clone()),
    };
    String::from_utf8(bytes).map_err(|_| Error::msg(format!("{}: not UTF-8 text", describe(item))))
}

/// How errors name an item.
fn describe(item: &Item) -> String {
    match item {
        Item::Path(path) => path.display().to_string(),
        Item::Bytes(bytes) => format!("a {}-byte series", bytes.len()),
        Item::Text(text) => format!("an inline series of {} characters", text.len()),
    }
}

/// Columns of numbers from CSV (a first line that is not numeric is a
/// header) or from a JSON array (`[1, 2, 3]` for one channel, `[[a, b], ...]`
/// for one row of channels per step), as inline dataset items give it.
pub fn parse_csv(text: &str, channels: usize) -> std::result::Result<Vec<Vec<f32>>, String> {
    if text.trim_start().starts_with('[') {
        return parse_json(text, channels);
    }
    let mut columns = vec![Vec::new(); channels];
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        let numbers: std::result::Result<Vec<f32>, _> = cells.iter().map(|c| c.parse::<f32>()).collect();
        let numbers = match numbers {
            Ok(numbers) => numbers,
            Err(_) if index == 0 => continue,
            Err(_) => return Err(format!("line {}: not numbers: {line:?}", index + 1)),
        };
        if numbers.len() != channels {
            return Err(format!("line {}: {} values, expected {channels} channels", index + 1, numbers.len()));
        }
        if let Some(bad) = numbers.iter().find(|v| !v.is_finite()) {
            return Err(format!("line {}: {bad} is not a finite number", index + 1));
        }
        for (column, value) in columns.iter_mut().zip(numbers) {
            column.push(value);
        }
    }
    if columns[0].len() < 2 {
        return Err(format!("{} time steps; a series needs at least 2", columns[0].len()));
    }
    Ok(columns)
}

/// A JSON array series (see [`parse_csv`]).
fn parse_json(text: &str, channels: usize) -> std::result::Result<Vec<Vec<f32>>, String> {
    let rows: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| format!("not a JSON array of numbers: {e}"))?;
    let as_csv: Vec<String> = rows
        .iter()
        .map(|row| match row {
            serde_json::Value::Array(cells) => cells.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","),
            other => other.to_string(),
        })
        .collect();
    parse_csv(&as_csv.join("\n"), channels)
}

/// Linear interpolation of `values` at `length` evenly spaced points.
pub fn resample(values: &[f32], length: usize) -> Vec<f32> {
    let last = (values.len() - 1) as f32;
    (0..length)
        .map(|i| {
            let at = i as f32 * last / (length - 1) as f32;
            let low = at.floor() as usize;
            let high = (low + 1).min(values.len() - 1);
            let frac = at - low as f32;
            values[low] * (1.0 - frac) + values[high] * frac
        })
        .collect()
}

/// `[positions, window_features]`, row-major: for each window, each channel's
/// standardised points, then each channel's mean and standard deviation.
fn window_features(columns: &[Vec<f32>], config: &SeriesConfig) -> Vec<f32> {
    let channels: Vec<(Vec<f32>, f32, f32)> = columns
        .iter()
        .map(|column| {
            let points = resample(column, config.length);
            let mean = points.iter().sum::<f32>() / points.len() as f32;
            let var = points.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / points.len() as f32;
            let std = var.sqrt();
            let scaled = points.iter().map(|v| (v - mean) / (std + 1e-6)).collect();
            (scaled, mean, std)
        })
        .collect();
    let mut out = Vec::with_capacity(config.positions() * config.window_features());
    for position in 0..config.positions() {
        let window = position * config.window..(position + 1) * config.window;
        for (scaled, _, _) in &channels {
            out.extend_from_slice(&scaled[window.clone()]);
        }
        for (_, mean, std) in &channels {
            out.push(*mean);
            out.push(*std);
        }
    }
    out
}

/// Seeded U(±1/√fan_in) weights `[output, input]` and a zero bias (a small
/// xorshift generator: the example needs no `rand`).
fn seeded_weights(input: usize, output: usize, seed: u64, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let bound = 1.0 / (input as f32).sqrt();
    let weights: Vec<f32> = (0..input * output)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * unit - 1.0) * bound
        })
        .collect();
    let weight = Tensor::from_vec(weights, (output, input), device)?;
    let bias = Tensor::zeros(output, DType::F32, device)?;
    Ok((weight, bias))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_header_resamples_and_standardises() {
        let columns = parse_csv("t\n0\n1\n2\n", 1).unwrap();
        assert_eq!(columns, vec![vec![0.0, 1.0, 2.0]]);
        assert_eq!(resample(&columns[0], 5), vec![0.0, 0.5, 1.0, 1.5, 2.0]);
        let config = SeriesConfig { length: 4, window: 2, ..SeriesConfig::default() };
        let features = window_features(&[vec![1.0, 4.0]], &config);
        // two positions of (2 points + mean + std)
        assert_eq!(features.len(), 8);
        assert!((features[2] - 2.5).abs() < 1e-6 && (features[6] - 2.5).abs() < 1e-6);
        assert!(features[0] < 0.0 && features[5] > 0.0, "{features:?}");
    }

    #[test]
    fn bad_rows_are_named() {
        assert!(parse_csv("1,2\n3\n", 2).unwrap_err().contains("line 2"));
        assert!(parse_csv("x\n1\n", 1).unwrap_err().contains("at least 2"));
        assert!(parse_csv("1\nnope\n", 1).unwrap_err().contains("line 2"));
        assert_eq!(parse_csv("[1, 2.5]", 1).unwrap(), vec![vec![1.0, 2.5]]);
        assert_eq!(parse_csv("[[1, 2], [3, 4]]", 2).unwrap(), vec![vec![1.0, 3.0], vec![2.0, 4.0]]);
    }
}
