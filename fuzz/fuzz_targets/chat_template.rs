//! Fuzz target: any text as a chat template (what `--chat-template` and a model's
//! `tokenizer_config.json` supply) compiles and renders a short conversation or
//! fails with an error, never a panic.
//!
//! The input is the template source; a NUL byte splits off a user message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use multitoken_core::{ChatTemplate, Message};

fuzz_target!(init: keep_caught_panics(), |data: &[u8]| {
    // A crash libFuzzer cannot record (a stack overflow kills it outright): with
    // MULTITOKEN_FUZZ_LAST set, every input is written there first.
    if let Some(last) = std::env::var_os("MULTITOKEN_FUZZ_LAST") {
        let _ = std::fs::write(last, data);
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (source, user) = text.split_once('\0').unwrap_or((text, "Describe <image> please"));
    let Ok(template) = ChatTemplate::new("fuzz".to_string(), source.to_string(), "<s>", "</s>") else { return };
    let messages = [Message::system("Be brief."), Message::user(user), Message::assistant("A cat.")];
    let _ = template.render_prompt(&messages[..2]);
    let _ = template.render_with_assistant_spans(&messages);
});

/// libfuzzer-sys aborts on every panic, even one our code catches by design (a
/// third-party parser's, turned into an error naming the item): this hook only
/// reports it. A panic that escapes the target still aborts (libfuzzer-sys
/// checks after each input), so those remain crashes.
fn keep_caught_panics() {
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
}
