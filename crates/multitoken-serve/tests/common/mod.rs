//! Test helpers: tiny models (the llama fixture, alone or with the CLIP fixture
//! tower as an `<image>` modality), a server on a loopback port, an HTTP client.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use multitoken_serve::{AppState, ServeConfig};

/// Keeps every modality crate's registry entries in the test binary.
pub fn link_modalities() {
    multitoken_vision::link();
    multitoken_audio::link();
    multitoken_document::link();
}

/// The embedded demo model, once `cargo xtask demo-model` has built it.
pub fn demo_model() -> Option<MultimodalModel> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo-model");
    if !dir.join("multitoken.json").is_file() {
        return None;
    }
    link_modalities();
    match MultimodalModel::load(&dir, &LoadOptions::default()) {
        Ok(model) => Some(model),
        Err(e) => panic!("the demo model at {} does not load: {e}", dir.display()),
    }
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The llama fixture as a text-only model.
pub fn text_model() -> MultimodalModel {
    MultimodalModel::load(&fixtures().join("lm/llama"), &LoadOptions::default()).unwrap()
}

/// The llama fixture with the CLIP fixture tower reading `<image>` (random projector).
pub fn vision_model_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("multitoken-serve-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::json!({
        "base_model": fixtures().join("lm/llama"),
        "modalities": [{
            "builder": "vision_clip",
            "config": {
                "tower": fixtures().join("vision/clip"),
                "image_processor": {"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}},
                "vision_feature_layer": -2
            },
            "projector": "mlp2x_gelu"
        }]
    });
    std::fs::write(dir.join("multitoken.json"), config.to_string()).unwrap();
    let (features, hidden) = (32, 64);
    let dev = Device::Cpu;
    let tensors: HashMap<String, Tensor> = [
        (
            "vision_clip_lmm_projector.0.weight",
            Tensor::randn(0f32, 0.5, (hidden, features), &dev).unwrap(),
        ),
        (
            "vision_clip_lmm_projector.0.bias",
            Tensor::randn(0f32, 0.5, hidden, &dev).unwrap(),
        ),
        (
            "vision_clip_lmm_projector.2.weight",
            Tensor::randn(0f32, 0.2, (hidden, hidden), &dev).unwrap(),
        ),
        (
            "vision_clip_lmm_projector.2.bias",
            Tensor::randn(0f32, 0.2, hidden, &dev).unwrap(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    candle_core::safetensors::save(&tensors, dir.join("projectors.safetensors")).unwrap();
    dir
}

pub fn vision_model(name: &str) -> MultimodalModel {
    link_modalities();
    MultimodalModel::load(&vision_model_dir(name), &LoadOptions::default()).unwrap()
}

/// A running server; dropping it shuts it down gracefully and waits.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(model: MultimodalModel, config: ServeConfig) -> Self {
        let state = AppState::new(model, config).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let serve_state = state.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                multitoken_serve::serve(listener, serve_state, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Self {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Signals shutdown and waits for the serve loop to end.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }

    /// Signals shutdown without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// A client that returns 4xx/5xx responses instead of failing on them.
pub fn client() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// POST a body; (status, body text).
pub fn post(url: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let mut response = client()
        .post(url)
        .header("content-type", content_type)
        .send(body)
        .unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap_or_default())
}

/// POST JSON; (status, parsed body).
pub fn post_json(url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, text) = post(url, "application/json", body.to_string().as_bytes());
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// GET; (status, body text).
pub fn get(url: &str) -> (u16, String) {
    let mut response = client().get(url).call().unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap_or_default())
}

/// A data URL of a fixture image.
pub fn image_data_url(name: &str) -> String {
    use base64::Engine as _;
    let bytes = std::fs::read(fixtures().join("vision/images").join(name)).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}
