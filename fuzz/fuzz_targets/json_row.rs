//! Fuzz target: any bytes as a JSONL dataset: `dataset check` and the trainer's
//! reader report rows or errors naming the line, never a panic.

#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use multitoken_train::data;

fuzz_target!(init: keep_caught_panics(), |data: &[u8]| {
    // A crash libFuzzer cannot record (a stack overflow kills it outright): with
    // MULTITOKEN_FUZZ_LAST set, every input is written there first.
    if let Some(last) = std::env::var_os("MULTITOKEN_FUZZ_LAST") {
        let _ = std::fs::write(last, data);
    }
    let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
    let path = dir.join(format!("multitoken-fuzz-{}.jsonl", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let tokens = BTreeMap::from([("images".to_string(), "<image>".to_string()), ("documents".to_string(), "<document>".to_string())]);
    let _ = data::check(&path, &tokens);
    let _ = data::read_jsonl(&path);
    let _ = std::fs::remove_file(&path);
});

/// libfuzzer-sys aborts on every panic, even one our code catches by design (a
/// third-party parser's, turned into an error naming the item): this hook only
/// reports it. A panic that escapes the target still aborts (libfuzzer-sys
/// checks after each input), so those remain crashes.
fn keep_caught_panics() {
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
}
