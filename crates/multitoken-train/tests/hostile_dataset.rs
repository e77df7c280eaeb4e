//! Hostile dataset files (issue 23): a FIFO or a directory given as the dataset
//! is a clear error (it used to block `dataset check` forever or say "no such
//! file"), and a UTF-8 byte-order mark before the first row is not a syntax error.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use multitoken_train::data;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("multitoken-hostile-dataset-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const ROW: &str = r#"{"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;

#[test]
fn a_bom_before_the_first_row_is_skipped() {
    let dir = temp("bom");
    let path = dir.join("rows.jsonl");
    std::fs::write(&path, format!("\u{feff}{ROW}\n{ROW}\n")).unwrap();
    assert_eq!(data::read_jsonl(&path).unwrap().len(), 2);
    let report = data::check(&path, &BTreeMap::new()).unwrap();
    assert_eq!((report.rows, report.problems.len()), (2, 0), "{:?}", report.problems);
}

#[test]
fn fifos_and_directories_are_refused_without_reading() {
    let dir = temp("kinds");
    let fifo = dir.join("rows.jsonl");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    // Nothing ever writes to the FIFO: opening it would block this test forever.
    for (path, expect) in [(&fifo, "is not a regular file (a FIFO, socket or device)"), (&dir, "is a directory, not a file")] {
        let err = data::check(path, &BTreeMap::new()).unwrap_err().to_string();
        assert!(err.contains(expect) && err.contains(&path.display().to_string()), "{err}");
        let err = data::read_jsonl(path).unwrap_err().to_string();
        assert!(err.contains(expect), "{err}");
    }
}

#[test]
fn an_item_that_is_a_directory_is_named_as_one() {
    let dir = temp("items");
    std::fs::create_dir(dir.join("pictures")).unwrap();
    let path = dir.join("rows.jsonl");
    let row = r#"{"id": "a", "images": ["pictures"], "messages": [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "yo"}]}"#;
    std::fs::write(&path, format!("{row}\n")).unwrap();
    let tokens = BTreeMap::from([("images".to_string(), "<image>".to_string())]);
    let report = data::check(&path, &tokens).unwrap();
    assert!(report.problems.iter().any(|p| p.contains("is a directory, not a file")), "{:?}", report.problems);
}
