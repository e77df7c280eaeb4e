//! Broken benchmark and predictions files give errors naming the file, line
//! and row (or counted unparsed rows), never a panic or a silently wrong score.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use multitoken_eval::predict::read_predictions;
use multitoken_eval::table::RowKey;
use multitoken_eval::{Benchmark, Loaded};

/// A scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("multitoken-eval-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The error text of reading `data` as `benchmark` (and `predictions`, if any).
fn error(benchmark: Benchmark, data: &str, ext: &str, predictions: Option<&str>) -> String {
    let dir = scratch(&format!(
        "{benchmark}-{}",
        data.len() + predictions.map_or(0, str::len)
    ));
    let data_path = write(&dir, &format!("data.{ext}"), data);
    let loaded = match Loaded::read(benchmark, &data_path) {
        Ok(l) => l,
        Err(e) => return e.to_string().replace(&dir.display().to_string(), "DIR"),
    };
    let Some(predictions) = predictions else {
        panic!("{data} loaded")
    };
    let pred_path = write(&dir, "predictions.jsonl", predictions);
    match read_predictions(&pred_path, &loaded).and_then(|p| loaded.score(&p, None)) {
        Ok(_) => panic!("{predictions} scored"),
        Err(e) => e.to_string().replace(&dir.display().to_string(), "DIR"),
    }
}

const MMB: &str = "index\tquestion\thint\tA\tB\tanswer\timage\n1\tq\tNaN\tyes\tno\tA\tnot*base64!at*all*and*longer*than*sixty*four*characters*so*it*is*data\n1000001\tq\tnan\tno\tyes\tB\t1\n";

#[test]
fn predictions_that_do_not_belong() {
    assert_eq!(
        error(Benchmark::MmBench, MMB, "tsv", Some("{\"index\": 1, \"prediction\": \"A\", \"benchmark\": \"pope\"}\n")),
        "DIR/predictions.jsonl:1: a prediction for benchmark `pope`, but this is mmbench: a predictions file of another benchmark?"
    );
    assert_eq!(
        error(Benchmark::MmBench, MMB, "tsv", Some("{\"index\": 1, \"prediction\": \"A\"}\n{\"index\": 77, \"prediction\": \"B\"}\n")),
        "DIR/predictions.jsonl:2: index 77 names no row of the mmbench file (1 such line): predictions for another benchmark or file?"
    );
    assert_eq!(
        error(
            Benchmark::MmBench,
            MMB,
            "tsv",
            Some("{\"index\": 1, \"prediction\": \"A\"}\n{\"index\": 1, \"prediction\": \"B\"}\n")
        ),
        "DIR/predictions.jsonl:2: index 1 again, with another prediction"
    );
    assert_eq!(
        error(
            Benchmark::MmBench,
            MMB,
            "tsv",
            Some("{\"index\": 1, \"prediction\": [1]}\n")
        ),
        "DIR/predictions.jsonl:1: index 1: no `prediction` string"
    );
    assert_eq!(
        error(Benchmark::MmBench, MMB, "tsv", Some("not json\n"))
            .split(": not JSON")
            .next(),
        Some("DIR/predictions.jsonl:1")
    );
    // A row without a prediction is an error, not a silent zero.
    assert!(error(
        Benchmark::MmBench,
        MMB,
        "tsv",
        Some("{\"index\": 1, \"prediction\": \"A\"}\n")
    )
    .starts_with("1 of 2 rows have no prediction (index 1000001)"));
}

#[test]
fn bad_images_name_the_row_when_prompting() {
    let dir = scratch("b64");
    let data = write(&dir, "m.tsv", MMB);
    let loaded = Loaded::read(Benchmark::MmBench, &data).unwrap();
    let e = loaded
        .prompt(&RowKey::Int(1_000_001))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("m.tsv:3: row 1000001's image 1 is not valid base64"),
        "{e}"
    );
    // NaN hints are left out of the prompt.
    let good = MMB.replace(
        "not*base64!at*all*and*longer*than*sixty*four*characters*so*it*is*data",
        &"iVBORw0K".repeat(10),
    );
    let data = write(&dir, "good.tsv", &good);
    let loaded = Loaded::read(Benchmark::MmBench, &data).unwrap();
    let p = loaded.prompt(&RowKey::Int(1)).unwrap();
    assert!(p.text.starts_with("<image>\nQuestion: q\n"), "{}", p.text);
    assert_eq!(p.images.len(), 1);
}

#[test]
fn malformed_benchmark_files() {
    let check = |b: Benchmark, data: &str, ext: &str, want: &str| {
        assert_eq!(error(b, data, ext, None), want)
    };
    check(
        Benchmark::Pope,
        "question\tanswer\nq\tyes\n",
        "tsv",
        "DIR/data.tsv: not a POPE file: no `index`, `question_id` or `id` column to name rows by (its columns: question, answer)",
    );
    check(
        Benchmark::Pope,
        "index\tquestion\tanswer\n1\tq\tyes\n1\tq\tno\n",
        "tsv",
        "DIR/data.tsv:3: index 1 again (first on line 2)",
    );
    check(
        Benchmark::Vqav2,
        "{\"question_id\": 1, \"question\": \"q\", \"answers\": []}\n",
        "jsonl",
        "DIR/data.jsonl:1: no reference answers (`answers` / `answer` is empty or unreadable)",
    );
    check(
        Benchmark::Mmmu,
        "{\"id\": \"validation_Art_1\", \"question\": \"q\", \"options\": \"['a', 'b']\", \"answer\": \"C\", \"question_type\": \"multiple-choice\"}\n",
        "jsonl",
        "DIR/data.jsonl:1: the answer `C` is none of the option letters A, B",
    );
    check(
        Benchmark::Mmmu,
        "{\"id\": \"validation_Art_1\", \"question\": \"q\", \"options\": \"a, b\", \"answer\": \"A\", \"question_type\": \"multiple-choice\"}\n",
        "jsonl",
        "DIR/data.jsonl:1: `options` is not a list: a, b",
    );
    check(
        Benchmark::MmBench,
        "index\tquestion\tA\tB\tanswer\n",
        "tsv",
        "DIR/data.tsv: no rows",
    );
    check(
        Benchmark::MmBench,
        "{\"index\": 1}\n{oops\n",
        "jsonl",
        "DIR/data.jsonl:2: not JSON: key must be a string at line 1 column 2",
    );
}

#[test]
fn an_image_marker_without_its_image_names_the_row() {
    let dir = scratch("mmmu-marker");
    let data = write(
        &dir,
        "m.jsonl",
        "{\"id\": \"validation_Art_1\", \"question\": \"<image 1> vs <image 2>?\", \"options\": \"['a', 'b']\", \"answer\": \"A\", \"question_type\": \"multiple-choice\", \"image_1\": {\"bytes\": \"iVBORw0KGgo=\"}}\n",
    );
    let loaded = Loaded::read(Benchmark::Mmmu, &data).unwrap();
    let e = loaded
        .prompt(&RowKey::Text("validation_Art_1".into()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.ends_with("m.jsonl:1: row validation_Art_1 names <image 2>, but has no image 2"),
        "{e}"
    );
}

#[test]
fn a_null_prediction_is_a_counted_unparsed_answer() {
    let dir = scratch("null");
    let data = write(&dir, "m.tsv", MMB);
    let loaded = Loaded::read(Benchmark::MmBench, &data).unwrap();
    let preds = write(
        &dir,
        "p.jsonl",
        "{\"index\": 1, \"prediction\": \"A\"}\n{\"index\": \"1000001\", \"prediction\": null}\n",
    );
    let scores = loaded
        .score(&read_predictions(&preds, &loaded).unwrap(), None)
        .unwrap();
    assert_eq!(scores.rows.len(), 1);
    assert_eq!(scores.rows[0].score, 0.0);
    assert!(scores.rows[0].unparsed);
    assert_eq!(scores.rows[0].parsed.as_deref(), Some("A,?"));
}

/// A broken parquet file (truncated, bytes flipped, only the magic) is an
/// error naming the file or a table read from what survives: never a panic.
#[test]
fn broken_parquet_files_are_errors_naming_the_file() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/eval/mmmu.parquet");
    let good = std::fs::read(fixture).unwrap();
    let dir = scratch("parquet");
    let path = dir.join("broken.parquet");
    let read = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        Loaded::read(Benchmark::Mmmu, &path).map_err(|e| e.to_string())
    };
    let err = read(b"PAR1").unwrap_err();
    assert!(err.starts_with(&format!("{}: not a readable parquet file", path.display())), "{err}");
    for cut in [8, good.len() / 2, good.len() - 9, good.len() - 1] {
        let err = read(&good[..cut]).unwrap_err();
        assert!(err.contains("broken.parquet: not a readable parquet file"), "cut at {cut}: {err}");
    }
    // Flip bytes all over the file (a fixed LCG): each read ends in a table or an error.
    let (mut state, mut errors) = (12345u64, 0);
    for _ in 0..300 {
        let mut bytes = good.clone();
        for _ in 0..4 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let at = (state >> 33) as usize % bytes.len();
            bytes[at] ^= (state >> 20) as u8 | 1;
        }
        if let Err(e) = read(&bytes) {
            assert!(e.contains("broken.parquet"), "{e}");
            errors += 1;
        }
    }
    assert!(errors > 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
