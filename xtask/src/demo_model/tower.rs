//! Supervised pretraining of the demo model's vision tower: before the LM ever
//! sees an image, the tower learns to tell the shapes and colours apart on
//! generated images (classic and varied styles, plus brightness, contrast and
//! noise jitter), through a linear head on the very features the LM will read
//! (last layer, class position dropped, averaged `pool`×`pool`). LLaVA starts
//! from a CLIP that already sees; ours starts from random weights, and learning
//! vision through the LM's answers alone did not work on varied images
//! (45% on shapes after 7,000 steps; see the demo model's README).
//!
//! The head is thrown away; the tower's weights replace the skeleton's.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use multitoken_datasets::images::{self, Colour, Shape, ShapeSpec};
use multitoken_datasets::{Rng, Style};
use multitoken_vision::{ClipVisionConfig, ClipVisionTower, ImageProcessorConfig};

/// Pretraining settings.
#[derive(Debug, Clone, Copy)]
pub struct Pretrain {
    /// Optimizer steps.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate (linear warm-up over 5% of the steps, cosine decay to 10%).
    pub learning_rate: f64,
    /// `spatial_pool_stride` of the modality that will read the tower.
    pub pool: usize,
    /// Seed of the images.
    pub seed: u64,
}

impl Pretrain {
    /// The demo build's settings for `tower` (`steps` and `learning_rate`
    /// override the defaults).
    pub fn for_tower(
        tower: super::skeleton::Tower,
        seed: u64,
        steps: Option<usize>,
        learning_rate: Option<f64>,
    ) -> Self {
        Self {
            steps: steps.unwrap_or(3000),
            batch: 32,
            learning_rate: learning_rate.unwrap_or(1e-3),
            pool: tower.pool,
            seed,
        }
    }
}

/// Accuracy of the head on one style's images.
#[derive(Debug, Clone, Copy)]
pub struct StyleAccuracy {
    /// The style.
    pub style: Style,
    /// Shapes named right.
    pub shape: f64,
    /// Colours named right.
    pub colour: f64,
}

const CLASSES: usize = Shape::ALL.len() + Colour::ALL.len();

/// One generated image, preprocessed, with its labels.
struct Example {
    pixels: Vec<f32>,
    shape: u32,
    colour: u32,
}

/// Brightness, contrast and noise jitter on top of a style's own variety, so
/// the tower keys on the shape's outline and hue rather than exact pixel
/// values. (Backgrounds come from the style itself, and [`DARK_SHARE`]; the
/// unlike style's own backgrounds are never drawn here.)
fn jitter(image: &mut image::RgbImage, rng: &mut Rng) {
    let contrast = rng.range_f(0.6, 1.2);
    let brightness = rng.range_f(-40.0, 15.0);
    let gain = [0, 1, 2].map(|_| rng.range_f(0.92, 1.08));
    let noise = if rng.unit() < 0.3 {
        rng.range_f(0.0, 16.0)
    } else {
        0.0
    };
    for pixel in image.pixels_mut() {
        let n = if noise > 0.0 {
            rng.range_f(-noise, noise)
        } else {
            0.0
        };
        for (c, g) in pixel.0.iter_mut().zip(gain) {
            let v = ((f64::from(*c) - 128.0) * contrast + 128.0 + brightness) * g + n;
            *c = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    if rng.unit() < 0.2 {
        *image = image::imageops::blur(image, rng.range_f(0.4, 1.2) as f32);
    }
}

/// Which images [`example`] draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Draw {
    /// The style's own images.
    Style(Style),
    /// Varied-style shapes on flat dark grey ([`images::render_on_dark`]).
    Dark,
}

/// Share of the varied examples that pretraining draws on flat dark grey
/// instead of the varied style's own mix (where it is 1 in 18). At the varied
/// mix alone the tower named Pillow-drawn shapes on dark grey right 75% of the
/// time (94% elsewhere).
const DARK_SHARE: f64 = 0.2;

fn example(
    processor: &ImageProcessorConfig,
    draw: Draw,
    augment: bool,
    rng: &mut Rng,
) -> Result<Example> {
    let shape = rng.range(0, Shape::ALL.len() - 1);
    let colour = rng.range(0, Colour::ALL.len() - 1);
    let (shape_kind, colour_kind) = (Shape::ALL[shape], Colour::ALL[colour]);
    let mut image = match draw {
        Draw::Style(Style::Classic) => images::render_styled(
            &ShapeSpec::random(shape_kind, colour_kind, rng),
            Style::Classic,
            rng,
        ),
        Draw::Style(style) => images::render_styled(
            &ShapeSpec::random_styled(shape_kind, colour_kind, style, rng),
            style,
            rng,
        ),
        Draw::Dark => images::render_on_dark(
            &ShapeSpec::random_styled(shape_kind, colour_kind, Style::Varied, rng),
            rng,
        ),
    };
    if augment && rng.unit() < 0.7 {
        jitter(&mut image, rng);
    }
    let (width, height) = (image.width() as usize, image.height() as usize);
    let image = multitoken_vision::RgbImage {
        width,
        height,
        pixels: image.into_raw(),
    };
    let (pixels, _, _) = processor.preprocess(&image)?;
    Ok(Example {
        pixels,
        shape: shape as u32,
        colour: colour as u32,
    })
}

struct Classifier {
    tower: ClipVisionTower,
    head: candle_nn::Linear,
    pool: usize,
}

impl Classifier {
    /// Logits `[batch, CLASSES]`: shapes first, then colours.
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let config = self.tower.config();
        let out = self.tower.forward(pixels, None)?;
        let last = out
            .hidden_states
            .last()
            .context("the tower returned no hidden states")?;
        let patches = last.narrow(1, 1, config.num_patches())?;
        let pooled = multitoken_vision::modality::spatial_pool(&patches, config.grid(), self.pool)?;
        Ok(candle_nn::Module::forward(&self.head, &pooled.mean(1)?)?)
    }
}

fn batch(examples: &[Example], side: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let n = examples.len();
    let pixels: Vec<f32> = examples
        .iter()
        .flat_map(|e| e.pixels.iter().copied())
        .collect();
    let pixels = Tensor::from_vec(pixels, (n, 3, side, side), &Device::Cpu)?;
    let shapes = Tensor::new(
        examples.iter().map(|e| e.shape).collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    let colours = Tensor::new(
        examples.iter().map(|e| e.colour).collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    Ok((pixels, shapes, colours))
}

fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<f64> {
    let right = logits
        .argmax(D::Minus1)?
        .eq(labels)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok(f64::from(right))
}

/// [`pretrain`] with its result kept in `cache_dir`, keyed by the tower's
/// files and the settings: a second build with the same tower and settings
/// copies the weights instead of training again (the result is deterministic).
pub fn pretrain_cached(vision_dir: &Path, settings: Pretrain, cache_dir: &Path) -> Result<()> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for name in [
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
    ] {
        let path = vision_dir.join(name);
        std::fs::read(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .hash(&mut h);
    }
    // The image mix is part of the recipe: towers cached before the dark share
    // existed must not be taken for its results.
    format!("{settings:?} dark share {DARK_SHARE}").hash(&mut h);
    let cached = cache_dir.join(format!("tower-{:016x}.safetensors", h.finish()));
    let weights = vision_dir.join("model.safetensors");
    let summary = cached.with_extension("txt");
    if cached.is_file() {
        std::fs::copy(&cached, &weights)
            .with_context(|| format!("copying {}", cached.display()))?;
        println!("pretrained tower from {}", cached.display());
        if let Ok(text) = std::fs::read_to_string(&summary) {
            print!("{text}");
        }
        return Ok(());
    }
    let report = pretrain(vision_dir, settings)?;
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating {}", cache_dir.display()))?;
    let text: String = report
        .iter()
        .map(|r| {
            format!(
                "tower on fresh {} images: shape {:.1}%, colour {:.1}%\n",
                r.style.name(),
                100.0 * r.shape,
                100.0 * r.colour
            )
        })
        .collect();
    std::fs::write(&summary, text).with_context(|| format!("writing {}", summary.display()))?;
    // Written under another name first so that a killed copy is never taken for the result.
    let partial = cached.with_extension("partial");
    std::fs::copy(&weights, &partial).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &cached).with_context(|| format!("writing {}", cached.display()))?;
    Ok(())
}

/// Pretrains the tower in `vision_dir` (its `config.json`,
/// `preprocessor_config.json` and seeded `model.safetensors`) and overwrites
/// its weights; returns the head's accuracy on fresh images of each style,
/// the unlike style included (never trained on).
pub fn pretrain(vision_dir: &Path, settings: Pretrain) -> Result<Vec<StyleAccuracy>> {
    // The tower's weights are variables, so its products are candle's, which
    // the binaries pin to one thread (`CANDLE_NUM_THREADS=1`, for the frozen
    // kernels' pool); this loop has the cores to itself (xtask runs nothing
    // beside it), so candle may use them all while it runs.
    let pinned = std::env::var_os("CANDLE_NUM_THREADS");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    let result = pretrain_on_all_cores(vision_dir, settings);
    match pinned {
        Some(value) => std::env::set_var("CANDLE_NUM_THREADS", value),
        None => std::env::remove_var("CANDLE_NUM_THREADS"),
    }
    result
}

fn pretrain_on_all_cores(vision_dir: &Path, settings: Pretrain) -> Result<Vec<StyleAccuracy>> {
    let started = Instant::now();
    let config_text = std::fs::read_to_string(vision_dir.join("config.json"))
        .with_context(|| format!("reading {}/config.json", vision_dir.display()))?;
    let config: ClipVisionConfig = serde_json::from_str(&config_text)?;
    let processor = ImageProcessorConfig::from_model_dir(vision_dir)?;
    let side = config.image_size;
    let weights = vision_dir.join("model.safetensors");

    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let tower =
        ClipVisionTower::load(&config, vb.clone()).context("building the trainable tower")?;
    let head = candle_nn::linear(config.hidden_size, CLASSES, vb.pp("pretrain_head"))?;
    // The tower starts from the skeleton's seeded weights (the head from candle's init).
    {
        let saved = candle_core::safetensors::load(&weights, &Device::Cpu)?;
        let data = map
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("variable map poisoned"))?;
        for (name, var) in data.iter() {
            if let Some(value) = saved.get(name) {
                var.set(value)?;
            }
        }
    }
    let model = Classifier {
        tower,
        head,
        pool: settings.pool,
    };
    let mut optimizer = candle_nn::AdamW::new(
        map.all_vars(),
        candle_nn::ParamsAdamW {
            lr: settings.learning_rate,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let shapes = Shape::ALL.len();
    let mut rng = Rng::new(settings.seed ^ 0x5052_4554);
    let warmup = (settings.steps / 20).max(1);
    let mut running = (0.0, 0.0, 0usize);
    for step in 0..settings.steps {
        let progress = if step < warmup {
            (step + 1) as f64 / warmup as f64
        } else {
            let t = (step - warmup) as f64 / (settings.steps - warmup).max(1) as f64;
            0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        };
        optimizer.set_learning_rate(settings.learning_rate * progress);
        let examples = (0..settings.batch)
            .map(|i| {
                // A quarter classic (the embedded model's images), the rest varied,
                // DARK_SHARE of those on flat dark grey.
                let draw = if i % 4 == 0 {
                    Draw::Style(Style::Classic)
                } else if rng.unit() < DARK_SHARE {
                    Draw::Dark
                } else {
                    Draw::Style(Style::Varied)
                };
                example(&processor, draw, true, &mut rng)
            })
            .collect::<Result<Vec<_>>>()?;
        let (pixels, shape_labels, colour_labels) = batch(&examples, side)?;
        let logits = model.forward(&pixels)?;
        let shape_logits = logits.narrow(1, 0, shapes)?;
        let colour_logits = logits.narrow(1, shapes, CLASSES - shapes)?;
        let loss = (candle_nn::loss::cross_entropy(&shape_logits, &shape_labels)?
            + candle_nn::loss::cross_entropy(&colour_logits, &colour_labels)?)?;
        optimizer.backward_step(&loss)?;
        running.0 += f64::from(loss.to_scalar::<f32>()?);
        running.1 += accuracy(&shape_logits, &shape_labels)?;
        running.2 += 1;
        if (step + 1) % 50 == 0 || step + 1 == settings.steps {
            println!(
                "tower pretraining step {}/{}: loss {:.4}, shapes right {:.1}% (last {} steps), {:.0} s",
                step + 1,
                settings.steps,
                running.0 / running.2 as f64,
                100.0 * running.1 / running.2 as f64,
                running.2,
                started.elapsed().as_secs_f64()
            );
            running = (0.0, 0.0, 0);
        }
    }

    // Fresh images of every style, the unlike one included.
    let mut report = Vec::new();
    let mut eval_rng = Rng::new(settings.seed ^ 0x4556_414c);
    for draw in [
        Draw::Style(Style::Classic),
        Draw::Style(Style::Varied),
        Draw::Style(Style::Unlike),
        Draw::Dark,
    ] {
        let (mut shape_right, mut colour_right, mut total) = (0.0, 0.0, 0.0);
        for _ in 0..8 {
            let examples = (0..50)
                .map(|_| example(&processor, draw, false, &mut eval_rng))
                .collect::<Result<Vec<_>>>()?;
            let (pixels, shape_labels, colour_labels) = batch(&examples, side)?;
            let logits = model.forward(&pixels)?.detach();
            shape_right += accuracy(&logits.narrow(1, 0, shapes)?, &shape_labels)? * 50.0;
            colour_right +=
                accuracy(&logits.narrow(1, shapes, CLASSES - shapes)?, &colour_labels)? * 50.0;
            total += 50.0;
        }
        let (shape, colour) = (shape_right / total, colour_right / total);
        let name = match draw {
            Draw::Style(style) => style.name(),
            Draw::Dark => "dark grey",
        };
        println!(
            "tower on 400 fresh {name} images: shape {:.1}%, colour {:.1}%",
            100.0 * shape,
            100.0 * colour
        );
        if let Draw::Style(style) = draw {
            report.push(StyleAccuracy { style, shape, colour });
        }
    }

    let data = map
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("variable map poisoned"))?;
    let tensors: HashMap<String, Tensor> = data
        .iter()
        .filter(|(name, _)| !name.starts_with("pretrain_head"))
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, &weights)
        .with_context(|| format!("writing {}", weights.display()))?;
    println!(
        "tower pretrained in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        weights.display()
    );
    Ok(report)
}

/// Doubles the tower's input resolution in `vision_dir` without changing
/// what it computes: image size and patch size ×2 (so the same 12×12 grid and
/// position embeddings), each patch-embedding weight spread over the 2×2
/// pixels it now covers at a quarter of its value. On an image resized to the
/// new size the tower then sees each old pixel's average, as before, and
/// further training can use the detail inside a patch (a small triangle is a
/// few pixels across at 96 px). The LM's projector reads the same features.
pub fn double_resolution(vision_dir: &Path) -> Result<()> {
    let config_path = vision_dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )?;
    let doubled = |value: &mut serde_json::Value, name: &str| -> Result<usize> {
        let old = value
            .as_u64()
            .with_context(|| format!("{}: {name} is not a number", config_path.display()))?;
        *value = serde_json::Value::from(2 * old);
        Ok(old as usize)
    };
    let image = doubled(&mut config["image_size"], "image_size")?;
    doubled(&mut config["patch_size"], "patch_size")?;
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("writing {}", config_path.display()))?;

    let processor_path = vision_dir.join("preprocessor_config.json");
    let mut processor: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&processor_path)
            .with_context(|| format!("reading {}", processor_path.display()))?,
    )?;
    let side = serde_json::Value::from(2 * image);
    processor["size"] = serde_json::json!({ "shortest_edge": side });
    processor["crop_size"] = serde_json::json!({ "height": side, "width": side });
    std::fs::write(
        &processor_path,
        serde_json::to_string_pretty(&processor)? + "\n",
    )
    .with_context(|| format!("writing {}", processor_path.display()))?;

    let weights = vision_dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu)?;
    let name = "embeddings.patch_embedding.weight";
    let patch = tensors
        .get(name)
        .with_context(|| format!("{}: no {name}", weights.display()))?;
    // [out, in, k, k] -> [out, in, 2k, 2k]: each tap repeated over 2×2, a quarter each.
    let (out, channels, k, _) = patch.dims4()?;
    let spread = patch
        .unsqueeze(3)?
        .unsqueeze(5)?
        .repeat((1, 1, 1, 2, 1, 2))?
        .reshape((out, channels, 2 * k, 2 * k))?;
    let spread = (spread * 0.25)?;
    tensors.insert(name.to_string(), spread);
    candle_core::safetensors::save(&tensors, &weights)
        .with_context(|| format!("writing {}", weights.display()))?;
    println!(
        "{}: {} px, patches of {} px",
        vision_dir.display(),
        2 * image,
        2 * k
    );
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A fresh temporary directory (named after `tag`) holding the demo skeleton's
    /// seeded styled tower in `vision/`; returns both paths.
    fn seeded_vision(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("xtask-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let vision = dir.join("vision");
        std::fs::create_dir_all(&vision).unwrap();
        super::super::skeleton::write_vision(&vision, 5, super::super::skeleton::Tower::STYLED)
            .unwrap();
        (dir, vision)
    }

    /// The pooled features the LM reads, of the tower in `vision_dir`, for `image`.
    fn features(vision_dir: &Path, image: &image::RgbImage) -> Vec<f32> {
        let config: ClipVisionConfig =
            serde_json::from_str(&std::fs::read_to_string(vision_dir.join("config.json")).unwrap())
                .unwrap();
        let processor = ImageProcessorConfig::from_model_dir(vision_dir).unwrap();
        let tensors =
            candle_core::safetensors::load(vision_dir.join("model.safetensors"), &Device::Cpu)
                .unwrap();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let tower = ClipVisionTower::load(&config, vb).unwrap();
        let rgb = multitoken_vision::RgbImage {
            width: image.width() as usize,
            height: image.height() as usize,
            pixels: image.as_raw().clone(),
        };
        let (pixels, _, _) = processor.preprocess(&rgb).unwrap();
        let side = config.image_size;
        let pixels = Tensor::from_vec(pixels, (1, 3, side, side), &Device::Cpu).unwrap();
        let out = tower.forward(&pixels, None).unwrap();
        let last = out.hidden_states.last().unwrap();
        let patches = last.narrow(1, 1, config.num_patches()).unwrap();
        multitoken_vision::modality::spatial_pool(&patches, config.grid(), 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// A doubled tower reads a 192 px image as the original read it at 96 px
    /// (the same features up to the resampling's differences), so the LM's
    /// projector still fits it.
    #[test]
    fn doubled_resolution_keeps_the_features() {
        let (dir, vision) = seeded_vision("double");
        let mut rng = Rng::new(3);
        let spec = ShapeSpec::random_styled(Shape::Triangle, Colour::Blue, Style::Varied, &mut rng);
        let image = images::render_styled(&spec, Style::Varied, &mut rng);
        let before = features(&vision, &image);
        double_resolution(&vision).unwrap();
        let config = std::fs::read_to_string(vision.join("config.json")).unwrap();
        assert!(config.contains("\"image_size\": 192"), "{config}");
        let after = features(&vision, &image);
        assert_eq!(before.len(), after.len());
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let diff: Vec<f32> = before.iter().zip(&after).map(|(a, b)| a - b).collect();
        let relative = norm(&diff) / norm(&before);
        assert!(
            relative < 0.05,
            "features moved by {relative:.3} of their norm"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A few steps change the tower's weights (and only the tower's: the head
    /// is not saved), and a second run with the same tower and settings takes
    /// the cached result, byte for byte.
    #[test]
    fn pretraining_moves_the_tower_and_is_cached() {
        let (dir, vision) = seeded_vision("tower");
        let weights = vision.join("model.safetensors");
        let seeded = std::fs::read(&weights).unwrap();
        let settings = Pretrain {
            steps: 3,
            batch: 4,
            learning_rate: 1e-3,
            pool: 3,
            seed: 1,
        };
        let cache = dir.join("cache");
        pretrain_cached(&vision, settings, &cache).unwrap();
        let trained = std::fs::read(&weights).unwrap();
        assert_ne!(seeded, trained, "the weights did not move");
        let names = |bytes: &[u8]| -> Vec<String> {
            let mut names: Vec<String> = safetensors::SafeTensors::deserialize(bytes)
                .unwrap()
                .names()
                .into_iter()
                .map(str::to_string)
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(&seeded), names(&trained));
        // The same seeded tower again: the cached result, no training.
        std::fs::write(&weights, &seeded).unwrap();
        pretrain_cached(&vision, settings, &cache).unwrap();
        assert_eq!(std::fs::read(&weights).unwrap(), trained);
        assert_eq!(
            std::fs::read_dir(&cache).unwrap().count(),
            2,
            "weights and summary"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
