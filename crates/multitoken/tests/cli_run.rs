//! `multitoken::cli::run` is the binary's whole command line as a library call:
//! help and version succeed, usage errors come back as errors (the process
//! keeps running), and subcommands run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[test]
fn run_takes_the_arguments_and_never_exits() {
    assert!(multitoken::cli::run(["multitoken", "--version"]).is_ok());
    assert!(multitoken::cli::run(["multitoken", "modality", "--help"]).is_ok());
    let error = multitoken::cli::run(["multitoken", "no-such-command"]).map(|_| ()).unwrap_err().to_string();
    assert!(error.contains("no-such-command"), "{error}");
    let error = multitoken::cli::run(["multitoken", "modality", "add", "--builder", "x"]).unwrap_err().to_string();
    assert!(error.contains("--model") && error.contains("--out"), "{error}");
    // A subcommand runs: listing the builders this crate links in.
    assert!(multitoken::cli::run(["multitoken", "modality", "list", "--json"]).is_ok());
    // The project's own modalities are linked by the call.
    let names = multitoken::core::builder_names();
    for name in ["vision_clip", "audio_whisper", "document_minilm"] {
        assert!(names.contains(&name), "{name} not linked: {names:?}");
    }
}

#[test]
fn a_missing_model_is_an_error_naming_it() {
    let out = std::env::temp_dir().join(format!("cli-run-test-{}", std::process::id()));
    let error = multitoken::cli::run([
        "multitoken", "modality", "add", "--model", "/no/such/model", "--builder", "vision_clip", "--out",
    ]
    .into_iter()
    .map(String::from)
    .chain([out.display().to_string()]))
    .unwrap_err()
    .to_string();
    assert!(error.contains("/no/such/model"), "{error}");
    assert!(!out.exists());
}
