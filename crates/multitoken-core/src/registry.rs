//! The registry of modality builders.
//!
//! A modality crate registers a [`ModalityBuilder`] with [`inventory::submit!`];
//! linking the crate into a binary is the only other step. Nothing in `core`,
//! `train`, `moe` or `serve` names a concrete modality: they look builders up by
//! the name stored in the model's `multitoken.json`.
//!
//! ```
//! use multitoken_core::{
//!     Item, Modality, ModalityBuilder, ModalityContext, ProjectorSpec, Result,
//! };
//! use candle_core::Tensor;
//!
//! struct Thermometer;
//!
//! impl Modality for Thermometer {
//!     fn name(&self) -> &str { "sensor_thermometer" }
//!     fn token(&self) -> &str { "<temperature>" }
//!     fn data_key(&self) -> &str { "temperatures" }
//!     fn token_width(&self) -> usize { 1 }
//!     fn feature_dim(&self) -> usize { 1 }
//!     fn preprocess(&self, _item: &Item) -> Result<Tensor> { unimplemented!() }
//!     fn encode(&self, batch: &Tensor) -> Result<Tensor> { Ok(batch.clone()) }
//!     fn projector(&self) -> ProjectorSpec { ProjectorSpec::Linear }
//! }
//!
//! fn build_thermometer(
//!     _config: &serde_json::Value,
//!     _context: &ModalityContext,
//! ) -> Result<Box<dyn Modality>> {
//!     Ok(Box::new(Thermometer))
//! }
//!
//! // `multitoken_core::inventory` is re-exported, so the modality crate needs
//! // no direct dependency on `inventory`.
//! multitoken_core::inventory::submit! {
//!     ModalityBuilder { name: "sensor_thermometer", build: build_thermometer }
//! }
//!
//! # fn main() -> Result<()> {
//! let context = ModalityContext::cpu_f32(".");
//! let modality = multitoken_core::build_modality(
//!     "sensor_thermometer", &serde_json::json!({}), &context)?;
//! assert_eq!(modality.token(), "<temperature>");
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::preparer::TextModality;
use crate::{Error, Modality, Result};

/// What a builder gets besides its own config: where and in what precision to
/// put weights, and the model directory its relative paths resolve against.
#[derive(Clone)]
pub struct ModalityContext {
    /// Device the encoder weights are loaded on.
    pub device: Device,
    /// Activation dtype of the encoder.
    pub dtype: DType,
    /// The multimodal model directory (holds `multitoken.json`).
    pub model_dir: PathBuf,
    /// When set, the builder creates its encoder weights as trainable variables
    /// in this map (initialised from the checkpoint, or randomly where the
    /// modality's config asks for a fresh encoder) so that training can update
    /// them; when `None` the encoder is frozen and memory-mapped.
    pub trainable: Option<candle_nn::VarMap>,
    /// `--quantize-towers`: the block format the encoder's frozen linears are
    /// kept in (`None`, the default: `dtype`). [`build_modality`] runs the
    /// builder inside [`multitoken_kernels::quantizing_linears`], so every
    /// frozen `multitoken_kernels::Linear` the builder creates is quantized as
    /// it is read; a builder with linears of its own may read this field.
    pub quantize: Option<multitoken_kernels::quantized::Format>,
}

impl std::fmt::Debug for ModalityContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModalityContext")
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("model_dir", &self.model_dir)
            .field("trainable", &self.trainable.as_ref().map(|v| v.all_vars().len()))
            .field("quantize", &self.quantize)
            .finish()
    }
}

impl ModalityContext {
    /// A context for `model_dir` on `device` with `dtype`.
    pub fn new(device: Device, dtype: DType, model_dir: impl Into<PathBuf>) -> Self {
        Self {
            device,
            dtype,
            model_dir: model_dir.into(),
            trainable: None,
            quantize: None,
        }
    }

    /// A CPU, f32 context: what tests and small tools use.
    pub fn cpu_f32(model_dir: impl Into<PathBuf>) -> Self {
        Self::new(Device::Cpu, DType::F32, model_dir)
    }

    /// Resolves a path from a modality config against the model directory;
    /// absolute paths are kept as they are.
    pub fn resolve(&self, path: impl AsRef<Path>) -> PathBuf {
        self.model_dir.join(path)
    }

    /// The encoder weights in the safetensors file `weights` as a
    /// `VarBuilder`, the one way builders honour [`ModalityContext::trainable`]:
    /// with a trainable map, the file's tensors (when it exists) become
    /// variables of the map in the context's dtype, and weights it lacks are
    /// created there with the initialisation the builder asks for (`vb.get`
    /// gives zeros, `get_with_hints` or `candle_nn::linear` a random init:
    /// nothing reseeds them later, so ask for one); without one, the
    /// file is memory-mapped read-only and must exist.
    pub fn var_builder(&self, weights: &Path) -> Result<candle_nn::VarBuilder<'static>> {
        match &self.trainable {
            Some(map) => {
                if weights.is_file() {
                    load_into_varmap(map, weights, self.dtype, &self.device)?;
                }
                Ok(candle_nn::VarBuilder::from_varmap(map, self.dtype, &self.device))
            }
            None => {
                if !weights.is_file() {
                    return Err(Error::msg(format!("{}: the encoder weights are missing", weights.display())));
                }
                // SAFETY: the file is memory-mapped read-only; as everywhere in
                // candle, it must not be modified while the model is alive.
                unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[weights], self.dtype, &self.device) }
                    .map_err(|e| Error::msg(format!("{}: {e}", weights.display())))
            }
        }
    }
}

/// Every tensor of the safetensors file at `path` as a variable of `map`, in
/// `dtype` on `device` (replacing variables of the same name); returns how
/// many were loaded. Fails naming the file and, where one is bad, the tensor.
pub fn load_into_varmap(map: &candle_nn::VarMap, path: &Path, dtype: DType, device: &Device) -> Result<usize> {
    let tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| Error::msg(format!("{}: cannot read: {e}", path.display())))?;
    let mut vars = map
        .data()
        .lock()
        .map_err(|_| Error::msg("the trainable variable map is poisoned (an earlier panic while it was held)"))?;
    let count = tensors.len();
    for (name, tensor) in tensors {
        let var = tensor
            .to_dtype(dtype)
            .and_then(|t| candle_core::Var::from_tensor(&t))
            .map_err(|e| Error::msg(format!("{}: tensor `{name}`: {e}", path.display())))?;
        vars.insert(name, var);
    }
    Ok(count)
}

thread_local! {
    /// Set while [`guard`] runs modality code on this thread: a panic there is
    /// caught and reported as an error, so the hook stays quiet about it.
    static GUARDED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Runs third-party modality code (`build`, `layout`, `preprocess`, `encode`,
/// `check_item`), turning a panic into an error `"modality `name` panicked
/// while {what}: {message}"`. With [`install_panic_hook`] in place the panic
/// is not also printed as "thread 'main' panicked at ..." first: the error
/// that names the modality is the one report.
pub fn guard<T>(name: &str, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    GUARDED.with(|depth| depth.set(depth.get() + 1));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|depth| depth.set(depth.get().saturating_sub(1)));
    outcome.map_err(|payload| {
        Error::msg(format!("modality `{name}` panicked while {what}: {}", panic_message(payload.as_ref())))
    })?
}

/// Installs (once per process) a panic hook that stays silent for panics
/// inside [`guard`] and defers to the previous hook for every other panic.
/// `multitoken::cli::main()` and the server install it.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(|depth| depth.get()) == 0 {
                previous(info);
            }
        }));
    });
}

/// The message of a caught panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}

/// Constructor of one modality: its registry name and a function from the
/// modality's config (a serde value from `multitoken.json`) to the modality.
#[derive(Debug)]
pub struct ModalityBuilder {
    /// Registry name, e.g. `vision_clip`; equals the built modality's `name()`.
    pub name: &'static str,
    /// Builds the modality from its config.
    pub build: fn(&serde_json::Value, &ModalityContext) -> Result<Box<dyn Modality>>,
}

inventory::collect!(ModalityBuilder);

/// Every builder linked into the running binary, in no particular order.
pub fn builders() -> impl Iterator<Item = &'static ModalityBuilder> {
    inventory::iter::<ModalityBuilder>.into_iter()
}

/// The builder registered as `name`, if exactly one is.
pub fn find_builder(name: &str) -> Option<&'static ModalityBuilder> {
    let mut matching = builders().filter(|builder| builder.name == name);
    let first = matching.next()?;
    // An ambiguous name is treated as absent here; `build_modality` reports it.
    matching.next().is_none().then_some(first)
}

/// Names of every linked builder, sorted and without repeats.
pub fn builder_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = builders().map(|builder| builder.name).collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Builds the modality registered as `name` from its config.
///
/// Fails with [`Error::UnknownModality`] (listing the known names) when no crate
/// registered `name`, and with [`Error::DuplicateModalityBuilder`] when several did.
pub fn build_modality(
    name: &str,
    config: &serde_json::Value,
    context: &ModalityContext,
) -> Result<Box<dyn Modality>> {
    let builder = the_one(name, builders().filter(|builder| builder.name == name))?;
    if is_text_modality(name) {
        return Err(Error::msg(format!(
            "`{name}` is registered both as a modality and as a text modality; each name must be unique"
        )));
    }
    // A builder is third-party code: a panic in it is reported as an error
    // naming the modality instead of taking the process down.
    // `--quantize-towers` reaches the tower's linears through the kernels'
    // scope (trainable weights stay as they are).
    let quantize = if context.trainable.is_some() { None } else { context.quantize };
    if quantize.is_some() && context.dtype != candle_core::DType::F32 {
        // The blocks are made from, and multiply, f32 values: other towers would
        // silently stay unquantized.
        return Err(Error::msg(format!(
            "--quantize-towers needs f32 towers, not {:?} (use --dtype f32)",
            context.dtype
        )));
    }
    let built = guard(name, "building", || {
        multitoken_kernels::quantizing_linears(quantize, || (builder.build)(config, context))
    })?;
    if built.name() != name {
        return Err(Error::msg(format!(
            "modality builder `{name}` built a modality named `{}`; a modality's name() must equal its builder's name",
            built.name()
        )));
    }
    if built.token().is_empty() || built.data_key().is_empty() {
        return Err(Error::msg(format!("modality `{name}` has an empty token or data key")));
    }
    Ok(built)
}

/// The single builder among `matching`: unknown (listing every name) when there
/// is none, a duplicate registration when there are several.
fn the_one<B>(name: &str, matching: impl Iterator<Item = B>) -> Result<B> {
    let mut matching: Vec<B> = matching.collect();
    match matching.len() {
        1 => Ok(matching.remove(0)),
        0 => Err(Error::UnknownModality {
            name: name.to_string(),
            known: known_names(),
        }),
        count => Err(Error::DuplicateModalityBuilder {
            name: name.to_string(),
            count,
        }),
    }
}

/// What a modality crate may declare about one of its builders without
/// building it (building needs weights and a config), registered with
/// `inventory::submit!` next to its [`ModalityBuilder`]: tools that have no
/// model (`dataset check` without `--model`) then know its token and data key.
#[derive(Debug)]
pub struct ModalityInfo {
    /// Registry name of the builder.
    pub builder: &'static str,
    /// The token its modality reads, e.g. `<series>`.
    pub token: &'static str,
    /// The dataset row key of its items, e.g. `series`.
    pub data_key: &'static str,
}

inventory::collect!(ModalityInfo);

/// Every declared [`ModalityInfo`].
pub fn modality_infos() -> impl Iterator<Item = &'static ModalityInfo> {
    inventory::iter::<ModalityInfo>.into_iter()
}

/// `(data key, token)` of every declared [`ModalityInfo`], sorted by key.
pub fn registered_tokens() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = modality_infos().map(|i| (i.data_key.to_string(), i.token.to_string())).collect();
    out.sort();
    out.dedup();
    out
}

/// Constructor of one text modality (a token replaced by text made from an
/// item, such as `<transcript>`): registered like a [`ModalityBuilder`], and
/// listed in `multitoken.json`'s `modalities` the same way, but with no
/// encoder features and no projector.
#[derive(Debug)]
pub struct TextModalityBuilder {
    /// Registry name, e.g. `audio_whisper_transcript`; equals the built modality's `name()`.
    pub name: &'static str,
    /// Builds the text modality from its config.
    pub build: fn(&serde_json::Value, &ModalityContext) -> Result<Box<dyn TextModality>>,
}

inventory::collect!(TextModalityBuilder);

/// Whether `name` is a registered text modality (so `multitoken.json` entries
/// of that name need no projector).
pub fn is_text_modality(name: &str) -> bool {
    inventory::iter::<TextModalityBuilder>.into_iter().any(|builder| builder.name == name)
}

/// Builds the text modality registered as `name` from its config; errors as
/// [`build_modality`] does (unknown names list every modality of both kinds).
pub fn build_text_modality(
    name: &str,
    config: &serde_json::Value,
    context: &ModalityContext,
) -> Result<Box<dyn TextModality>> {
    let matching = inventory::iter::<TextModalityBuilder>.into_iter().filter(|builder| builder.name == name);
    let builder = the_one(name, matching)?;
    (builder.build)(config, context)
}

/// Every registered name of both kinds, comma separated (or `none`).
fn known_names() -> String {
    let mut names = builder_names();
    names.extend(inventory::iter::<TextModalityBuilder>.into_iter().map(|builder| builder.name));
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::*;
    use crate::{Item, ProjectorSpec};

    /// A modality whose width comes from its config, to see the config arrive.
    struct CountingModality {
        width: usize,
    }

    impl Modality for CountingModality {
        fn name(&self) -> &str {
            "test_counting"
        }
        fn token(&self) -> &str {
            "<count>"
        }
        fn data_key(&self) -> &str {
            "counts"
        }
        fn token_width(&self) -> usize {
            self.width
        }
        fn feature_dim(&self) -> usize {
            3
        }
        fn preprocess(&self, _item: &Item) -> Result<Tensor> {
            Err(Error::msg("test modality does not preprocess"))
        }
        fn encode(&self, batch: &Tensor) -> Result<Tensor> {
            Ok(batch.clone())
        }
        fn projector(&self) -> ProjectorSpec {
            ProjectorSpec::Linear
        }
    }

    fn build_counting(
        config: &serde_json::Value,
        _: &ModalityContext,
    ) -> Result<Box<dyn Modality>> {
        let width = config
            .get("width")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| Error::msg("test_counting needs an integer `width`"))?;
        Ok(Box::new(CountingModality {
            width: width as usize,
        }))
    }

    fn build_twice(_: &serde_json::Value, _: &ModalityContext) -> Result<Box<dyn Modality>> {
        Ok(Box::new(CountingModality { width: 1 }))
    }

    inventory::submit! { ModalityBuilder { name: "test_counting", build: build_counting } }
    inventory::submit! { ModalityBuilder { name: "test_twice", build: build_twice } }
    inventory::submit! { ModalityBuilder { name: "test_twice", build: build_twice } }

    fn build_panicking(_: &serde_json::Value, _: &ModalityContext) -> Result<Box<dyn Modality>> {
        panic!("no sensor attached")
    }

    /// Registered as `test_misnamed` but builds `test_counting`.
    fn build_misnamed(_: &serde_json::Value, _: &ModalityContext) -> Result<Box<dyn Modality>> {
        Ok(Box::new(CountingModality { width: 1 }))
    }

    inventory::submit! { ModalityBuilder { name: "test_panicking", build: build_panicking } }
    inventory::submit! { ModalityBuilder { name: "test_misnamed", build: build_misnamed } }
    inventory::submit! {
        ModalityInfo { builder: "test_counting", token: "<count>", data_key: "counts" }
    }

    /// Builds `name` with `config` and renders the outcome as a short string.
    fn check(name: &str, config: serde_json::Value, expect: &str) {
        let context = ModalityContext::cpu_f32("/models/demo");
        let got = match build_modality(name, &config, &context) {
            Ok(modality) => format!(
                "ok {} {} width {}",
                modality.name(),
                modality.token(),
                modality.token_width()
            ),
            Err(error) => format!("error: {error}"),
        };
        assert_eq!(got, expect);
    }

    #[test]
    fn builds_registered_modalities_and_explains_failures() {
        check(
            "test_counting",
            serde_json::json!({"width": 4}),
            "ok test_counting <count> width 4",
        );
        check(
            "test_counting",
            serde_json::json!({}),
            "error: test_counting needs an integer `width`",
        );
        check(
            "vision_nope",
            serde_json::json!({}),
            "error: no modality builder named `vision_nope` is linked in; known builders: \
             test_counting, test_misnamed, test_panicking, test_twice",
        );
        check("test_panicking", serde_json::json!({}), "error: modality `test_panicking` panicked while building: no sensor attached");
        check(
            "test_misnamed",
            serde_json::json!({}),
            "error: modality builder `test_misnamed` built a modality named `test_counting`; \
             a modality's name() must equal its builder's name",
        );
        check(
            "test_twice",
            serde_json::json!({}),
            "error: modality builder `test_twice` is registered 2 times; each name must be unique",
        );
    }

    #[test]
    fn lookup_by_name() {
        assert!(find_builder("test_counting").is_some());
        assert!(
            find_builder("test_twice").is_none(),
            "an ambiguous name must not resolve"
        );
        assert!(find_builder("missing").is_none());
        assert_eq!(builder_names(), vec!["test_counting", "test_misnamed", "test_panicking", "test_twice"]);
        assert_eq!(registered_tokens(), vec![("counts".to_string(), "<count>".to_string())]);
    }

    #[test]
    fn context_resolves_relative_paths_against_the_model_dir() {
        let context = ModalityContext::cpu_f32("/models/demo");
        assert_eq!(
            context.resolve("clip/model.safetensors"),
            PathBuf::from("/models/demo/clip/model.safetensors")
        );
        assert_eq!(context.resolve("/abs/x"), PathBuf::from("/abs/x"));
    }
}
