//! `cargo xtask` with no task, `--help` or an unknown task prints the usage, not an error.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn no_task_prints_usage() {
    for (args, code) in [(&[][..], 0), (&["--help"][..], 0), (&["frobnicate"][..], 2)] {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stdout}{stderr}");
        let text = format!("{stdout}{stderr}");
        assert!(text.contains("usage: cargo xtask <task>"), "{args:?}: {text}");
        for task in ["weights", "fixtures", "bench", "tidy", "demo-model"] {
            assert!(text.contains(task), "{args:?}: {task} missing from {text}");
        }
        assert!(!text.contains("Error:"), "{args:?}: {text}");
    }
}

/// `cargo xtask demo-model` with no command or with `--help` prints its own
/// commands and options (the binary is built with `models` here).
#[cfg(feature = "models")]
#[test]
fn demo_model_help_prints_its_usage() {
    for args in [&["demo-model"][..], &["demo-model", "--help"], &["demo-model", "eval", "--help"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(0), "{args:?}: {text}");
        assert!(text.contains("usage: cargo xtask demo-model"), "{args:?}: {text}");
        assert!(text.contains("double-resolution --out DIR"), "{args:?}: {text}");
        assert!(!text.contains("Error:"), "{args:?}: {text}");
    }
}

/// `cargo xtask bench` with no bench, with `--help` anywhere (`bench lm
/// --help`) or with an unknown bench prints the benches and their options.
#[cfg(feature = "models")]
#[test]
fn bench_help_prints_its_usage() {
    for (args, code) in [
        (&["bench"][..], 0),
        (&["bench", "--help"], 0),
        (&["bench", "lm", "--help"], 0),
        (&["bench", "serve", "-h"], 0),
        (&["bench", "frobnicate"], 2),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(code), "{args:?}: {text}");
        assert!(text.contains("usage: cargo xtask bench <bench>"), "{args:?}: {text}");
        assert!(text.contains("--llama-cpp") && text.contains("decode-rows"), "{args:?}: {text}");
        assert!(!text.contains("Error:"), "{args:?}: {text}");
    }
}
