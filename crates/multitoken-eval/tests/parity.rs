//! Scoring parity with the reference implementations: `tests/fixtures/eval/`
//! holds benchmark files, predictions and what VLMEvalKit's and lmms-eval's
//! own code scored them as (`xtask/fixtures/eval_scoring.py`, run once by
//! `cargo xtask fixtures eval_scoring`; no Python here).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use multitoken_eval::mcq::{can_infer, Choice};
use multitoken_eval::mmmu::{eval_open, parse_multi_choice, parse_open_response, OpenPred};
use multitoken_eval::predict::read_predictions;
use multitoken_eval::pytext::PyRandom;
use multitoken_eval::report::Report;
use multitoken_eval::table::RowKey;
use multitoken_eval::vqa::{process_digit_article, process_punctuation};
use multitoken_eval::{Benchmark, Loaded};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/eval")
}

fn json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn scored(benchmark: Benchmark, data: &str, predictions: &str) -> Report {
    let data = fixtures().join(data);
    let loaded = Loaded::read(benchmark, &data).unwrap();
    let predictions = read_predictions(&fixtures().join(predictions), &loaded).unwrap();
    let scores = loaded.score(&predictions, None).unwrap();
    Report::build(benchmark, &data, None, scores)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn can_infer_matches_vlmevalkit_on_every_case() {
    let cases = json("mcq_cases.json");
    let mut checked = 0;
    for case in cases.as_array().unwrap() {
        let answer = case["answer"].as_str().unwrap();
        let choices: Vec<Choice> = case["choices"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| Choice {
                letter: k.chars().next().unwrap(),
                text: v.as_str().unwrap().to_string(),
            })
            .collect();
        let want = case["expected"].as_str().map(|s| s.chars().next().unwrap());
        assert_eq!(
            can_infer(answer, &choices),
            want,
            "answer {answer:?} choices {:?}",
            case["choices"]
        );
        checked += 1;
    }
    assert!(checked > 200, "{checked}");
}

#[test]
fn mmbench_circular_scores_equal_vlmevalkits() {
    let report = check_mmbench(
        "mmbench.tsv",
        "mmbench_predictions.jsonl",
        "mmbench_expected.json",
    );
    assert!(
        report.notes.iter().any(|n| n.contains("3000099")),
        "{:?}",
        report.notes
    );
}

/// VLMEvalKit's own result file (a TSV with the data's columns and `prediction`,
/// written by pandas) scores as the JSON Lines predictions do.
#[test]
fn a_vlmevalkit_result_tsv_scores_the_same() {
    let from_tsv = scored(Benchmark::MmBench, "mmbench.tsv", "mmbench_result.tsv");
    let from_jsonl = scored(
        Benchmark::MmBench,
        "mmbench.tsv",
        "mmbench_predictions.jsonl",
    );
    assert_eq!(from_tsv.rows, from_jsonl.rows);
    assert!(close(
        from_tsv.score,
        json("mmbench_expected.json")["overall"].as_f64().unwrap()
    ));
}

#[test]
fn numeric_options_score_as_vlmevalkits_pandas_reads_them() {
    check_mmbench(
        "mmbench_numeric.tsv",
        "mmbench_numeric_predictions.jsonl",
        "mmbench_numeric_expected.json",
    );
}

fn check_mmbench(data: &str, predictions: &str, expected: &str) -> Report {
    let expected = json(expected);
    let report = scored(Benchmark::MmBench, data, predictions);
    // Every original's CircularEval hit.
    let hits: BTreeMap<String, f64> = report
        .rows
        .iter()
        .map(|r| (r.index.to_string(), r.score))
        .collect();
    let want: BTreeMap<String, f64> = expected["circular_hits"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    assert_eq!(hits, want);
    assert!(close(report.score, expected["overall"].as_f64().unwrap()));
    assert!(close(
        report.metrics["vanilla_all"],
        expected["vanilla_all"].as_f64().unwrap()
    ));
    // report_acc's per-split table: Overall, then each l2-category (abbreviated) and category.
    let abbreviations = [
        ("coarse_perception", "CP"),
        ("finegrained_perception (instance-level)", "FP-S"),
        ("finegrained_perception (cross-instance)", "FP-C"),
        ("logic_reasoning", "LR"),
        ("relation_reasoning", "RR"),
        ("attribute_reasoning", "AR"),
    ];
    for (split, table) in expected["report_acc_by_split"].as_object().unwrap() {
        let rows: Vec<_> = report
            .rows
            .iter()
            .filter(|r| r.split.as_deref().unwrap_or("none") == split)
            .collect();
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
        assert!(
            close(
                mean(rows.iter().map(|r| r.score).collect()),
                table["Overall"].as_f64().unwrap()
            ),
            "{split}"
        );
        for (name, value) in table.as_object().unwrap() {
            if name == "Overall" {
                continue;
            }
            let l2 = abbreviations
                .iter()
                .find(|(_, a)| a == name)
                .map(|(l, _)| *l)
                .unwrap_or(name);
            let group: Vec<f64> = rows
                .iter()
                .filter(|r| {
                    r.category.as_deref() == Some(l2)
                        || r.sub_category.as_deref() == Some(name.as_str())
                })
                .map(|r| r.score)
                .collect();
            match value.as_f64() {
                Some(v) => assert!(close(mean(group), v), "{split} {name}"),
                None => assert!(
                    group.is_empty(),
                    "{split} {name}: VLMEvalKit has NaN, we have rows"
                ),
            }
        }
    }
    check_rows(data, predictions, &expected);
    report
}

/// can_infer on every row of the file (pandas-loaded there, our reader here).
fn check_rows(data: &str, predictions: &str, expected: &Value) {
    let Loaded::MmBench(bench) = Loaded::read(Benchmark::MmBench, &fixtures().join(data)).unwrap()
    else {
        panic!()
    };
    let predictions = read_predictions(
        &fixtures().join(predictions),
        &Loaded::MmBench(bench.clone()),
    )
    .unwrap();
    for row in bench.rows() {
        let prediction = predictions.get(&RowKey::Int(row.index)).unwrap();
        let want = expected["can_infer_by_index"][row.index.to_string()]
            .as_str()
            .map(|s| s.chars().next().unwrap());
        assert_eq!(
            can_infer(prediction, &row.choices),
            want,
            "index {} {prediction:?} {:?}",
            row.index,
            row.choices
        );
    }
}

#[test]
fn mmmu_parsing_matches_lmms_eval_on_every_case() {
    let cases = json("mmmu_cases.json");
    for case in cases["multi_choice"].as_array().unwrap() {
        let response = case["response"].as_str().unwrap();
        let options: Vec<String> = case["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap().to_string())
            .collect();
        let mut rng = PyRandom::seed(0);
        let got = parse_multi_choice(response, &options, &mut rng);
        assert_eq!(
            got.letter.to_string(),
            case["expected"].as_str().unwrap(),
            "{response:?}"
        );
    }
    for case in cases["open"].as_array().unwrap() {
        let response = case["response"].as_str().unwrap();
        let mut got: Vec<(String, String)> = parse_open_response(response)
            .into_iter()
            .map(|p| match p {
                OpenPred::Num(x) => ("num".to_string(), multitoken_eval::pytext::py_float_repr(x)),
                OpenPred::Text(t) => ("text".to_string(), t),
            })
            .collect();
        got.sort();
        let mut want: Vec<(String, String)> = case["expected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let kind = p[0].as_str().unwrap().to_string();
                let value = match &p[1] {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => multitoken_eval::pytext::py_float_repr(n.as_f64().unwrap()),
                    other => other.to_string(),
                };
                (kind, value)
            })
            .collect();
        want.sort();
        assert_eq!(got, want, "{response:?}");
    }
    for case in cases["eval_open"].as_array().unwrap() {
        let (answer, response) = (
            case["answer"].as_str().unwrap(),
            case["response"].as_str().unwrap(),
        );
        assert_eq!(
            eval_open(answer, &parse_open_response(response)),
            case["expected"].as_bool().unwrap(),
            "{answer:?} {response:?}"
        );
    }
}

#[test]
fn mmmu_scores_equal_lmms_evals() {
    mmmu_scores_equal_lmms_evals_from("mmmu.jsonl");
}

/// The same questions in the Hugging Face parquet layout (`MMMU/MMMU`'s
/// files as `datasets` writes them: seven image columns of
/// struct<bytes, path>, snappy): the same prompts, images and scores.
#[test]
fn mmmu_parquet_reads_as_the_jsonl_does() {
    mmmu_scores_equal_lmms_evals_from("mmmu.parquet");
    let jsonl = Loaded::read(Benchmark::Mmmu, &fixtures().join("mmmu.jsonl")).unwrap();
    let parquet = Loaded::read(Benchmark::Mmmu, &fixtures().join("mmmu.parquet")).unwrap();
    let keys = jsonl.keys(None);
    assert_eq!(keys.len(), 48);
    assert_eq!(parquet.keys(None), keys);
    let mut images = 0;
    for key in &keys {
        let (a, b) = (jsonl.prompt(key).unwrap(), parquet.prompt(key).unwrap());
        assert_eq!(a.text, b.text, "{key}");
        assert_eq!(a.images, b.images, "{key}");
        images += b.images.len();
    }
    assert!(images >= 48, "{images}");
}

fn mmmu_scores_equal_lmms_evals_from(data: &str) {
    let expected = json("mmmu_expected.json");
    let report = scored(Benchmark::Mmmu, data, "mmmu_predictions.jsonl");
    for row in &report.rows {
        let want = &expected["rows"][row.index.to_string()];
        assert_eq!(
            row.score == 1.0,
            want["correct"].as_bool().unwrap(),
            "{} {:?} parsed {:?} vs {}",
            row.index,
            row.prediction,
            row.parsed,
            want["parsed"]
        );
    }
    for (subject, want) in expected["by_subject"].as_object().unwrap() {
        let got = &report.by_sub_category[subject];
        assert!(close(got.score, want["acc"].as_f64().unwrap()), "{subject}");
        assert_eq!(got.n as u64, want["num"].as_u64().unwrap());
    }
    for (domain, want) in expected["by_domain"].as_object().unwrap() {
        let got = &report.by_category[domain];
        assert!(close(got.score, want["acc"].as_f64().unwrap()), "{domain}");
    }
    let rounded = (report.score * 1e5).round() / 1e5;
    assert!(
        close(rounded, expected["overall_rounded"].as_f64().unwrap()),
        "{} vs {}",
        report.score,
        expected["overall_rounded"]
    );
}

#[test]
fn pope_metrics_equal_lmms_evals() {
    let expected = json("pope_expected.json");
    let report = scored(Benchmark::Pope, "pope.tsv", "pope_predictions.jsonl");
    for name in ["accuracy", "precision", "recall", "f1", "yes_ratio"] {
        assert!(
            close(report.metrics[name], expected[name].as_f64().unwrap()),
            "{name}"
        );
    }
    assert!(close(report.score, expected["accuracy"].as_f64().unwrap()));
}

#[test]
fn vqav2_accuracy_equals_lmms_evals() {
    let expected = json("vqav2_expected.json");
    let report = scored(Benchmark::Vqav2, "vqav2.jsonl", "vqav2_predictions.jsonl");
    for row in &report.rows {
        let want = expected["rows"][row.index.to_string()].as_f64().unwrap();
        assert!(
            close(row.score, want),
            "{} {:?}: {} vs {want}",
            row.index,
            row.prediction,
            row.score
        );
    }
    assert!(close(report.score, expected["mean"].as_f64().unwrap()));
    for case in json("vqa_cases.json").as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            process_digit_article(&process_punctuation(text)),
            case["expected"].as_str().unwrap(),
            "{text:?}"
        );
    }
}
