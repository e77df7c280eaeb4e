//! Flags that behave alike across `generate`, `chat`, `embed`, `mel`,
//! `transcribe`, `serve` and `modality`: boolean flags are bare switches
//! (`--json`, not `--json true`), defaults show in `--help`, and `serve` loads
//! models with the same `--dtype`, `--dequantize` and `--chat-template` as `generate`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use clap::{ArgAction, CommandFactory};

const OURS: [&str; 7] = ["generate", "chat", "embed", "mel", "transcribe", "serve", "modality"];

fn walk(command: &clap::Command, path: &str, visit: &mut dyn FnMut(&str, &clap::Arg)) {
    for arg in command.get_arguments() {
        visit(path, arg);
    }
    for sub in command.get_subcommands() {
        walk(sub, &format!("{path} {}", sub.get_name()), visit);
    }
}

#[test]
fn boolean_flags_are_bare_switches_and_defaults_show() {
    let mut cli = multitoken::cli::Cli::command();
    // Settles each argument's defaults (the number of values a switch takes, ...).
    cli.build();
    let mut checked = 0;
    for sub in cli.get_subcommands().filter(|s| OURS.contains(&s.get_name())) {
        walk(sub, sub.get_name(), &mut |path, arg| {
            let id = arg.get_id().as_str();
            assert!(!arg.is_hide_default_value_set(), "{path} --{id}: its default is hidden");
            let takes_bool = arg.get_value_names().is_some_and(|names| names.iter().any(|n| n.as_str().contains("true")));
            assert!(!takes_bool, "{path} --{id}: a boolean flag takes no value");
            if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
                checked += 1;
                assert_eq!(arg.get_num_args().map(|r| r.max_values()), Some(0), "{path} --{id}: not a bare switch");
            }
        });
    }
    assert!(checked >= 8, "only {checked} switches seen");
    // --help shows the defaults.
    let out = Command::new(env!("CARGO_BIN_EXE_multitoken")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in ["--dequantize", "--chat-template", "[default: 127.0.0.1]", "[default: 8080]", "[default: f32]"] {
        assert!(help.contains(needle), "{needle} missing from serve --help:\n{help}");
    }
}

#[test]
fn serve_takes_chat_template_and_dequantize_like_generate() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo-model");
    if !demo.join("multitoken.json").is_file() {
        eprintln!("skipped: no demo model at {}", demo.display());
        return;
    }
    // The same template error from both: the name is checked when the model loads,
    // before serve binds its port.
    for command in ["generate", "serve"] {
        let mut args = vec![command, "--model", demo.to_str().unwrap(), "--chat-template", "no-such-template", "--dequantize"];
        if command == "generate" {
            args.extend(["--prompt", "hi"]);
        } else {
            args.extend(["--port", "0"]);
        }
        let out = Command::new(env!("CARGO_BIN_EXE_multitoken")).args(&args).env("RUST_BACKTRACE", "0").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command}: should fail");
        assert!(stderr.contains("--chat-template no-such-template"), "{command}: {stderr}");
        assert!(!stderr.contains("panicked"), "{command}: {stderr}");
    }
}

/// Issue 23: `--max-seconds NaN` compared false with every length and turned the
/// limit off; it (and 0, negatives, infinity) is refused while parsing.
#[test]
fn a_length_limit_must_be_a_positive_number() {
    for sub in ["mel", "transcribe"] {
        for bad in ["NaN", "0", "-1", "inf", "lots"] {
            let flag = format!("--max-seconds={bad}");
            let parsed = multitoken::cli::Cli::command().try_get_matches_from(["multitoken", sub, flag.as_str(), "a.wav"]);
            let err = parsed.err().unwrap_or_else(|| panic!("{sub} {flag} was accepted")).to_string();
            assert!(err.contains("--max-seconds"), "{sub} {bad}: {err}");
        }
        let ok = multitoken::cli::Cli::command().try_get_matches_from(["multitoken", sub, "--max-seconds", "2.5", "a.wav"]);
        assert!(ok.is_ok(), "{sub}: {ok:?}");
    }
}
