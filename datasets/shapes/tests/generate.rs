//! The generator is deterministic, balanced, and writes files that decode.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use multitoken_datasets::{generate, generate_split, judge, GenerateConfig, Split, Task};

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("multitoken-datasets-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Every file under `dir`, relative path -> bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .to_string();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

fn config(seed: u64) -> GenerateConfig {
    GenerateConfig {
        seed,
        train_per_task: 12,
        heldout_per_task: 4,
        tasks: Task::ALL.to_vec(),
        ..GenerateConfig::default()
    }
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let (a, b, c) = (temp_dir("a"), temp_dir("b"), temp_dir("c"));
    generate(&a, &config(5)).unwrap();
    generate(&b, &config(5)).unwrap();
    generate(&c, &config(6)).unwrap();
    let (sa, sb, sc) = (snapshot(&a), snapshot(&b), snapshot(&c));
    assert!(sa.len() > 100, "only {} files", sa.len());
    assert_eq!(sa, sb);
    assert_eq!(sa.keys().collect::<Vec<_>>(), sc.keys().collect::<Vec<_>>());
    assert_ne!(sa.get("train.jsonl"), sc.get("train.jsonl"));
    for d in [a, b, c] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn classes_are_balanced_and_splits_differ() {
    let dir = temp_dir("counts");
    let cfg = GenerateConfig {
        seed: 1,
        train_per_task: 24,
        heldout_per_task: 24,
        tasks: vec![
            Task::ImageShape,
            Task::AudioCount,
            Task::DocumentTopic,
            Task::ImageCompare,
        ],
        ..GenerateConfig::default()
    };
    let train = generate_split(&dir, Split::Train, 24, &cfg).unwrap();
    let heldout = generate_split(&dir, Split::Heldout, 24, &cfg).unwrap();
    assert_eq!(train.len(), 96);
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for row in &train {
        *answers.entry(row.answer().to_string()).or_default() += 1;
    }
    for shape in ["A circle.", "A square.", "A triangle."] {
        assert_eq!(answers.get(shape), Some(&8), "{answers:?}");
    }
    for count in ["One beep.", "Two beeps.", "Three beeps.", "Four beeps."] {
        assert_eq!(answers.get(count), Some(&6), "{answers:?}");
    }
    for topic in [
        "Cooking.",
        "Football.",
        "Weather.",
        "Space.",
        "Music.",
        "Gardening.",
    ] {
        assert_eq!(answers.get(topic), Some(&4), "{answers:?}");
    }
    // Two-image answers check both images, then give the verdict.
    let verdicts: Vec<&str> = train
        .iter()
        .filter(|r| r.images.len() == 2)
        .map(|r| {
            let answer = r.answer();
            assert!(answer.starts_with("First image: a "), "{answer}");
            let checks = (answer.contains("? Yes. Second"), answer.contains("? Yes. So"));
            assert!(checks.0 != checks.1, "exactly one image fits: {answer}");
            let verdict = answer.split("So the ").nth(1).unwrap_or_default();
            assert_eq!(verdict.starts_with("first"), checks.0, "{answer}");
            verdict
        })
        .collect();
    assert_eq!(verdicts.len(), 24);
    assert_eq!(verdicts.iter().filter(|v| v.starts_with("first image")).count(), 12);
    assert_eq!(verdicts.iter().filter(|v| v.starts_with("second image")).count(), 12);
    // Held-out files are other samples, not copies of training ones.
    let train_doc = std::fs::read(
        dir.join(
            &train
                .iter()
                .find(|r| !r.documents.is_empty())
                .unwrap()
                .documents[0],
        ),
    )
    .unwrap();
    for row in heldout.iter().filter(|r| !r.documents.is_empty()) {
        assert_ne!(
            std::fs::read(dir.join(&row.documents[0])).unwrap(),
            train_doc
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn files_decode_and_rows_match_their_items() {
    let dir = temp_dir("decode");
    let summary = generate(&dir, &config(3)).unwrap();
    let text = std::fs::read_to_string(&summary.heldout_file).unwrap();
    let mut seen = 0;
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let content = row["messages"][0]["content"].as_str().unwrap();
        for (key, token) in [
            ("images", "<image>"),
            ("speech_audios", "<speech>"),
            ("documents", "<document>"),
        ] {
            let items = row
                .get(key)
                .and_then(|v| v.as_array())
                .map(Vec::len)
                .unwrap_or(0);
            assert_eq!(content.matches(token).count(), items, "{line}");
        }
        for path in row
            .get("images")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let image = image::open(dir.join(path.as_str().unwrap()))
                .unwrap()
                .to_rgb8();
            assert!((64..=160).contains(&image.width()) && image.width() == image.height());
            // A light background in the corner, a saturated pixel somewhere.
            let corner = image.get_pixel(0, 0).0;
            assert!(corner.iter().all(|&c| c >= 210), "{corner:?}");
            assert!(image
                .pixels()
                .any(|p| p.0.iter().max().unwrap() - p.0.iter().min().unwrap() > 100));
            seen += 1;
        }
        for path in row
            .get("speech_audios")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let bytes = std::fs::read(dir.join(path.as_str().unwrap())).unwrap();
            assert_eq!(&bytes[0..4], b"RIFF");
            assert_eq!(&bytes[8..16], b"WAVEfmt ");
            assert_eq!(
                u32::from_le_bytes(bytes[24..28].try_into().unwrap()),
                16_000
            );
            let data = u32::from_le_bytes(bytes[40..44].try_into().unwrap()) as usize;
            assert_eq!(bytes.len(), 44 + data);
            assert!(data / 2 > 16_000 / 2, "clip shorter than half a second");
            seen += 1;
        }
        for path in row
            .get("documents")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let doc = std::fs::read_to_string(dir.join(path.as_str().unwrap())).unwrap();
            assert!(doc.split_whitespace().count() >= 15, "{doc}");
            seen += 1;
        }
        let answer = row["messages"][1]["content"].as_str().unwrap();
        assert!(judge(answer, answer), "{answer}");
    }
    assert!(seen >= 32);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn judge_checks_the_named_classes() {
    assert!(judge("A red circle.", "a red circle"));
    assert!(!judge("A red circle.", "A blue circle."));
    assert!(!judge("A red circle.", "A red circle and a square."));
    assert!(judge("Three beeps.", "Three beeps."));
    assert!(!judge("Three beeps.", "Four beeps."));
    assert!(judge(
        "The second image shows a triangle.",
        "The second image shows a triangle."
    ));
    assert!(!judge(
        "The second image shows a triangle.",
        "The first image shows a triangle."
    ));
    assert!(!judge("Hello.", "Hello."));
    // Groups the reference does not use are not judged.
    assert!(judge("A circle.", "A red circle."));
    // Two-image answers: each image described as itself, then the verdict.
    let reference = "First image: a blue square. A triangle? No. Second image: a red triangle. A triangle? Yes. So the second image shows a triangle.";
    assert!(judge(reference, reference));
    assert!(!judge(
        reference,
        "First image: a blue square. A triangle? No. Second image: a red triangle. A triangle? Yes. So the first image shows a triangle."
    ));
    assert!(!judge(
        reference,
        "First image: a red triangle. A triangle? Yes. Second image: a blue square. A triangle? No. So the second image shows a triangle."
    ));
    assert!(!judge(reference, "The second image shows a triangle."));
}

#[test]
fn train_weights_multiply_a_tasks_training_rows() {
    let dir = temp_dir("weights");
    let cfg = GenerateConfig {
        seed: 3,
        train_per_task: 4,
        heldout_per_task: 2,
        tasks: vec![Task::ImageShape, Task::ImageCompare],
        train_weights: vec![(Task::ImageCompare, 3)],
        ..GenerateConfig::default()
    };
    let summary = multitoken_datasets::generate(&dir, &cfg).unwrap();
    assert_eq!((summary.train_rows, summary.heldout_rows), (16, 4));
    let train = generate_split(&dir, Split::Train, 4, &cfg).unwrap();
    assert_eq!(train.iter().filter(|r| r.images.len() == 2).count(), 12);
    // The first rows of a weighted task are the unweighted run's rows.
    let plain = GenerateConfig { train_weights: Vec::new(), ..cfg.clone() };
    let unweighted = generate_split(&temp_dir("weights-plain"), Split::Train, 4, &plain).unwrap();
    let id = |rows: &[multitoken_datasets::Row], id: &str| rows.iter().find(|r| r.id == id).map(|r| r.messages.clone());
    assert_eq!(id(&train, "train-image_compare-00003"), id(&unweighted, "train-image_compare-00003"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn varied_and_unlike_phrasings_never_meet() {
    use multitoken_datasets::varied::all_questions;
    use multitoken_datasets::Style;
    let varied: std::collections::BTreeSet<String> =
        all_questions(Style::Varied).into_iter().collect();
    let unlike: std::collections::BTreeSet<String> =
        all_questions(Style::Unlike).into_iter().collect();
    assert!(varied.len() >= 300, "only {} varied questions", varied.len());
    assert!(unlike.len() >= 100, "only {} unlike questions", unlike.len());
    let shared: Vec<_> = varied.intersection(&unlike).collect();
    assert!(shared.is_empty(), "in both: {shared:?}");
}

#[test]
fn varied_style_adds_tasks_and_odd_shaped_images() {
    use multitoken_datasets::{Style, UNSURE};
    let dir = temp_dir("varied");
    let cfg = GenerateConfig {
        seed: 9,
        train_per_task: 12,
        heldout_per_task: 12,
        tasks: vec![Task::ImageShape, Task::DocumentTopic],
        style: Style::Varied,
        ..GenerateConfig::default()
    };
    let rows = generate_split(&dir, Split::Train, 12, &cfg).unwrap();
    assert_eq!(rows.len(), 48);
    let unsure: Vec<_> = rows.iter().filter(|r| r.id.contains("unanswerable")).collect();
    assert_eq!(unsure.len(), 12);
    assert!(unsure.iter().all(|r| r.answer() == UNSURE));
    let multi: Vec<_> = rows.iter().filter(|r| r.id.contains("multi_turn")).collect();
    assert!(multi.iter().all(|r| r.messages.len() >= 4 && r.prompt().len() == r.messages.len() - 1));
    // Some chats attach two or three items at once; their questions then name
    // the item's kind, never "this" or "it".
    let at_once: Vec<_> = multi.iter().filter(|r| r.messages[0].content.matches('<').count() >= 2).collect();
    assert!(!at_once.is_empty());
    for row in at_once {
        for m in row.messages.iter().filter(|m| m.role == "user") {
            let text = m.content.to_lowercase();
            assert!(!text.contains(" this?") && !text.contains(" it?") && !text.contains(" in it"), "{}: {text}", row.id);
        }
    }
    // Item tokens are followed by a space or (as `chat` writes them) a newline.
    assert!(rows.iter().any(|r| r.messages[0].content.contains(">\n")));
    assert!(rows.iter().any(|r| r.messages[0].content.contains("> ")));
    // Every item a row names exists, and the images are not all square.
    let mut aspects = Vec::new();
    for row in &rows {
        for p in row.images.iter().chain(&row.speech_audios).chain(&row.documents) {
            assert!(dir.join(p).is_file(), "{p}");
        }
        for p in &row.images {
            let img = image::open(dir.join(p)).unwrap();
            aspects.push(f64::from(img.width()) / f64::from(img.height()));
        }
    }
    assert!(aspects.iter().any(|a| *a > 1.5) && aspects.iter().any(|a| *a < 0.67), "{aspects:?}");
    // The unlike style writes the same tasks from other streams of words.
    let unlike_dir = temp_dir("unlike");
    let unlike = generate_split(&unlike_dir, Split::Heldout, 12, &GenerateConfig { style: Style::Unlike, ..cfg }).unwrap();
    assert_eq!(unlike.len(), 48);
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(unlike_dir).unwrap();
}

#[test]
fn judge_accepts_an_honest_reply_only_to_an_unanswerable_question() {
    use multitoken_datasets::UNSURE;
    assert!(judge(UNSURE, "I can't tell from this."));
    assert!(judge(UNSURE, "I cannot tell."));
    assert!(!judge(UNSURE, "A yellow triangle."));
    assert!(!judge(UNSURE, "I can't tell, maybe a circle."));
    assert!(!judge("A red circle.", UNSURE));
}

#[test]
fn dark_images_have_a_dark_background_and_a_shape_in_its_colour() {
    use multitoken_datasets::images::{render_on_dark, Colour, Shape, ShapeSpec};
    use multitoken_datasets::{Rng, Style};
    let mut rng = Rng::new(11);
    for (i, colour) in Colour::ALL.iter().cycle().take(24).enumerate() {
        let spec = ShapeSpec::random_styled(Shape::ALL[i % 3], *colour, Style::Varied, &mut rng);
        let image = render_on_dark(&spec, &mut rng);
        let luminance = |p: &image::Rgb<u8>| p.0.iter().map(|&c| f64::from(c)).sum::<f64>() / 3.0;
        // Most pixels are background (shapes cover well under half the image).
        let mut values: Vec<f64> = image.pixels().map(luminance).collect();
        values.sort_by(f64::total_cmp);
        let median = values[values.len() / 2];
        assert!(median <= 112.0, "image {i}: median luminance {median} is not dark");
        // The shape is drawn in its colour: the background's channels stay within
        // 24 of each other, every shade of the four colours spreads them wider.
        let chroma = |p: &image::Rgb<u8>| p.0.iter().max().copied().unwrap_or(0) - p.0.iter().min().copied().unwrap_or(0);
        let coloured = image.pixels().filter(|p| chroma(p) > 40).count();
        let (w, h) = image.dimensions();
        assert!(coloured * 100 >= (w * h) as usize, "image {i}: {coloured} of {} pixels coloured", w * h);
    }
}
