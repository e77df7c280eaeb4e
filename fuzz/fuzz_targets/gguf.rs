//! Fuzz target: any bytes as a `.gguf` file load a model or fail with an error
//! naming the file, never a panic (candle's reader divided by a zero
//! `general.alignment`) or an abort.

#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use multitoken_lm::gguf::load_gguf;
use multitoken_lm::loader::LoadOptions;

fuzz_target!(init: keep_caught_panics(), |data: &[u8]| {
    // A crash libFuzzer cannot record (a stack overflow kills it outright): with
    // MULTITOKEN_FUZZ_LAST set, every input is written there first.
    if let Some(last) = std::env::var_os("MULTITOKEN_FUZZ_LAST") {
        let _ = std::fs::write(last, data);
    }
    // The loader memory-maps a path; /dev/shm keeps the write in memory.
    let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
    let path = dir.join(format!("multitoken-fuzz-{}.gguf", std::process::id()));
    let Ok(mut file) = std::fs::File::create(&path) else { return };
    if file.write_all(data).is_err() {
        return;
    }
    drop(file);
    let _ = load_gguf(&path, &LoadOptions::default());
    let _ = std::fs::remove_file(&path);
});

/// libfuzzer-sys aborts on every panic, even one our code catches by design (a
/// third-party parser's, turned into an error naming the item): this hook only
/// reports it. A panic that escapes the target still aborts (libfuzzer-sys
/// checks after each input), so those remain crashes.
fn keep_caught_panics() {
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
}
