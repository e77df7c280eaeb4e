//! The `multitoken-datasets` command line: `--help` names every task and the defaults.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use multitoken_datasets::{GenerateConfig, Task};

#[test]
fn help_lists_every_task_and_the_defaults() {
    let out = Command::new(env!("CARGO_BIN_EXE_multitoken-datasets")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for task in Task::ALL {
        assert!(help.lines().any(|l| l.trim() == task.name()), "{} missing from:\n{help}", task.name());
    }
    let defaults = GenerateConfig::default();
    assert!(help.contains(&format!("[default: {}]", defaults.train_per_task)), "{help}");
    let out = Command::new(env!("CARGO_BIN_EXE_multitoken-datasets")).arg("--bogus").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument `--bogus`"));
}
