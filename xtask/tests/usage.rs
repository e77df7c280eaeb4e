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
